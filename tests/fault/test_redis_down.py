"""Redis down: the ingress refuses (503, never 2xx) and both sides come back by themselves."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from relay.keys import Keys
from tests.fault.helpers import Load, account, bodies, wait_delivered, wait_quiet
from tests.hub import ingress, worker, write_config
from tests.support import wait_until

pytestmark = pytest.mark.fault

DOWN_FOR = 4.0


def ready_status(base: str) -> tuple[int, str | None]:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=5) as resp:
            return resp.status, resp.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")


def test_redis_down_gives_503_and_ingress_and_worker_recover_without_restart(
        tmp_path: Path, redis_server, redis_client, sink, report) -> None:
    config = write_config(
        tmp_path / "relay.yaml", redis_server.url,
        [{"name": "erp", "url": sink.url("/erp"), "secret": "s-erp"}],
        delivery={"timeout": "2s", "max_attempts": 10,
                  "backoff": {"initial": "100ms", "max": "1s"}},
        worker={"concurrency": 1, "lease_grace": "2s", "visibility_timeout": "10s"})
    before = bodies("RDOWN-B", 10)
    during = bodies("RDOWN-D", 40)
    after = bodies("RDOWN-A", 40)

    with ingress(config, tmp_path / "ingress.log") as url, \
            worker(config, tmp_path / "worker.log") as worker_proc:
        base = url.rsplit("/webhooks", 1)[0]
        assert Load(url).run(before).accepted == set(before)
        sink.wait_for("/erp", len(before))

        redis_server.kill()
        down_at = time.monotonic()
        down = Load(url, concurrency=4).run(during)
        ready_down = ready_status(base)
        time.sleep(max(0.0, down_at + DOWN_FOR - time.monotonic()))
        redis_server.start()
        up_at = time.monotonic()

        wait_until(lambda: ready_status(base)[0] == 200, 30, 0.05, what="/readyz 200")
        ready_s = time.monotonic() - up_at
        # The first request after the restart may meet a stale connection: 503, never 2xx
        # for something not stored. Keep sending one probe until it is accepted.
        probe = bodies("RDOWN-P", 1)
        prober = Load(url, concurrency=1)
        wait_until(lambda: prober.run(probe).accepted, 30, 0.05, what="first 202 after restart")
        accept_s = time.monotonic() - up_at
        recovered = Load(url).run(after)
        expected = {("/erp", e) for e in [*before, *probe, *after]}
        waited = wait_delivered(sink, expected, timeout=60)
        delivered_s = time.monotonic() - up_at
        left = wait_quiet(redis_client, timeout=20)
        assert worker_proc.poll() is None, "the worker exited instead of reconnecting"

    acct = account(sink, expected)
    stored_during = [e for e in during if redis_client.exists(Keys().event(e))]
    report(fault="redis down (SIGKILL) for 4 s, then back; no restarts",
           down_statuses=dict(down.statuses()),
           down_503_without_retry_after=down.unavailable_without_retry_after(),
           readyz_while_down=ready_down[0],
           readyz_200_s_after_redis_up=round(ready_s, 2),
           first_202_s_after_redis_up=round(accept_s, 2),
           after_statuses=dict(recovered.statuses()),
           worker_delivered_all_s_after_redis_up=round(delivered_s, 2),
           **acct.figures(), backlog_left=left)
    assert set(down.statuses()) == {503}, down.statuses()
    assert down.unavailable_without_retry_after() == 0
    assert ready_down[0] == 503 and ready_down[1]
    assert recovered.accepted == set(after), recovered.statuses()
    assert not acct.lost, acct.lost[:5]
    assert not stored_during
    assert not any(e in {r.event_id for r in sink.received} for e in during)
    assert waited < 60
