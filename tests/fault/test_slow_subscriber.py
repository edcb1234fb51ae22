"""A subscriber that hangs past its timeout is retried; a fast one's latency is unaffected."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.helpers import (
    Load,
    account,
    attempt_log,
    bodies,
    latency_figures,
    wait_delivered,
    wait_quiet,
)
from tests.hub import Reply, ingress, worker, write_config

pytestmark = pytest.mark.fault

EVENTS = 40
RATE = 10            # events/s: the hung posts pile up while the fast ones flow
HANG = 4.0           # s the slow subscriber holds each first request
TIMEOUT = "1s"       # the slow subscriber's timeout
LATENCY_BOUND = 1.5  # s, POST to receipt at the fast subscriber


def test_hung_subscriber_times_out_and_is_retried_fast_one_keeps_its_latency(
        tmp_path: Path, redis_server, redis_client, sink, report) -> None:
    config = write_config(
        tmp_path / "relay.yaml", redis_server.url,
        [{"name": "slow", "url": sink.url("/slow"), "secret": "s-slow", "timeout": TIMEOUT,
          "backoff": {"initial": "100ms", "max": "500ms"}},
         {"name": "fast", "url": sink.url("/fast"), "secret": "s-fast"}],
        delivery={"timeout": "2s", "max_attempts": 5,
                  "backoff": {"initial": "100ms", "max": "1s"}},
        worker={"concurrency": 1, "lease_grace": "2s", "visibility_timeout": "10s"})
    # The first request for each event hangs well past the timeout; a retry is answered at once.
    sink.behave_per_event("/slow", lambda event_id, k: Reply(delay=HANG) if k == 1 else Reply())
    events = bodies("SLOW", EVENTS)

    with ingress(config, tmp_path / "ingress.log") as url, \
            worker(config, tmp_path / "worker.log"):
        load = Load(url, concurrency=4, rate=RATE).run(events)
        assert load.accepted == set(events)
        fast_s = wait_delivered(sink, {("/fast", e) for e in events}, timeout=20)
        # A retry is answered at once: every slow delivery lands while the hung ones still hang.
        slow_done = wait_delivered(sink, {("/slow", e) for e in events}, timeout=30)
        wait_quiet(redis_client, timeout=20)

    first_fast = {}
    for r in sink.on("/fast"):
        first_fast.setdefault(r.event_id, r.at)
    latencies = [first_fast[e] - load.sent_at[e] for e in events]
    fast = latency_figures(latencies)
    logs = {e: attempt_log(redis_client, e, "slow") for e in events}
    slow_attempts = [len(a) for a in logs.values()]
    report(fault="subscriber hangs 4 s past a 1 s timeout; fast subscriber beside it",
           events=EVENTS, fast_latency=fast, fast_all_delivered_s=round(fast_s, 2),
           slow_all_delivered_s=round(slow_done, 2),
           slow_first_attempt_errors=sorted({str(a[0].error) for a in logs.values()}),
           slow_attempts_max=max(slow_attempts),
           fast_acct=account(sink, {("/fast", e) for e in events}).figures())
    for attempts in logs.values():
        assert attempts[0].error == "timeout", attempts
        assert attempts[-1].status == 200
    assert fast["p50_ms"] < LATENCY_BOUND * 1000 and fast["max_ms"] < LATENCY_BOUND * 1000, fast
