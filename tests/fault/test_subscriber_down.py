"""A subscriber down (port closed) and back; another down for good: bounded attempts, no loss."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from tests.fault.helpers import (
    Load,
    account,
    attempt_log,
    backlog,
    bodies,
    wait_delivered,
    wait_quiet,
)
from tests.hub import Sink, dead_letters, ingress, worker, write_config
from tests.support import free_port, wait_until

pytestmark = pytest.mark.fault

EVENTS = 30
DOWN_FOR = 3.0
ERP_MAX_ATTEMPTS = 20
GONE_MAX_ATTEMPTS = 3


def test_subscriber_down_then_back_gets_everything_within_max_attempts(
        tmp_path: Path, redis_server, redis_client, sink, report) -> None:
    erp_port = free_port()   # nothing listens here until the subscriber comes back
    gone_port = free_port()  # nothing ever listens here
    config = write_config(
        tmp_path / "relay.yaml", redis_server.url,
        [{"name": "erp", "url": f"http://127.0.0.1:{erp_port}/erp", "secret": "s-erp",
          "max_attempts": ERP_MAX_ATTEMPTS, "backoff": {"initial": "250ms", "max": "1s"}},
         {"name": "gone", "url": f"http://127.0.0.1:{gone_port}/gone", "secret": "s-gone",
          "max_attempts": GONE_MAX_ATTEMPTS, "backoff": {"initial": "50ms", "max": "200ms"}},
         {"name": "crm", "url": sink.url("/crm"), "secret": "s-crm"}],
        delivery={"timeout": "2s", "max_attempts": 5,
                  "backoff": {"initial": "100ms", "max": "1s"}},
        worker={"concurrency": 1, "lease_grace": "2s", "visibility_timeout": "10s"})
    events = bodies("SDOWN", EVENTS)
    back = Sink()
    back.port = erp_port

    with ingress(config, tmp_path / "ingress.log") as url, \
            worker(config, tmp_path / "worker.log"):
        started = time.monotonic()
        assert Load(url, concurrency=4).run(events).accepted == set(events)
        # The healthy subscriber is not held up by the one that is down.
        crm_s = wait_delivered(sink, {("/crm", e) for e in events}, timeout=10)
        time.sleep(max(0.0, started + DOWN_FOR - time.monotonic()))
        back.start()
        try:
            recovered_s = wait_delivered(back, {("/erp", e) for e in events}, timeout=60)
            wait_until(lambda: len(dead_letters(redis_client)) >= EVENTS, 30, 0.1,
                       what="every 'gone' delivery dead-lettered")
            left = wait_quiet(redis_client, timeout=20)
            time.sleep(0.5)
        finally:
            back.stop()

    erp = account(back, {("/erp", e) for e in events})
    crm = account(sink, {("/crm", e) for e in events})
    erp_attempts = {e: attempt_log(redis_client, e, "erp") for e in events}
    erp_counts = [len(a) for a in erp_attempts.values()]
    letters = list(dead_letters(redis_client).values())
    gone_counts = [len(attempt_log(redis_client, e, "gone")) for e in events]
    report(fault="subscriber down 3 s then back; another down for good",
           erp=erp.figures(), crm=crm.figures(),
           crm_all_delivered_s=round(crm_s, 2),
           erp_all_delivered_s_after_back=round(recovered_s, 2),
           erp_attempts_max=max(erp_counts), erp_attempts_mean=round(sum(erp_counts) / EVENTS, 2),
           erp_max_attempts=ERP_MAX_ATTEMPTS,
           gone_dead_letters=len(letters), gone_attempts_max=max(gone_counts),
           gone_max_attempts=GONE_MAX_ATTEMPTS, backlog_left=left)
    assert not erp.lost and not crm.lost
    assert max(erp_counts) <= ERP_MAX_ATTEMPTS
    for attempts in erp_attempts.values():
        assert attempts[-1].status == 200
        assert all(a.error == "connect" for a in attempts[:-1]), attempts
    # Every delivery to the subscriber that never came back: dead-lettered after exactly
    # max_attempts attempts, with that history, and never tried again.
    assert sorted(d.event_id for d in letters) == sorted(events)
    for letter in letters:
        assert letter.subscriber == "gone"
        assert [a.attempt for a in letter.attempts] == list(range(1, GONE_MAX_ATTEMPTS + 1))
        assert {a.error for a in letter.attempts} == {"connect"}
        assert msgspec.json.decode(letter.event.body)["eventId"] == letter.event_id
    assert gone_counts == [GONE_MAX_ATTEMPTS] * EVENTS
    assert not any(backlog(redis_client).values())
