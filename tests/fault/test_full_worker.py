"""A worker whose lanes are full holds Celery's prefetched messages unacknowledged while it
waits for room. Past ``worker.visibility_timeout`` kombu restores them to the queue (re-
serialised, so the scheduler does not recognise them either) and they run twice: the wait
must stay well inside the visibility timeout, whatever the prefetch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fault.helpers import account, wait_delivered, wait_quiet
from tests.hub import Reply, enqueue_event, event_body, worker, write_config

pytestmark = pytest.mark.fault

EVENTS = 12
SLOW = 2.5          # seconds the subscriber takes per post
VISIBILITY = 5      # seconds (the smallest worker.visibility_timeout allowed)


def test_a_full_worker_does_not_hold_prefetched_messages_past_the_visibility_timeout(
        tmp_path: Path, redis_server, redis_client, sink, report) -> None:
    config = write_config(
        tmp_path / "relay.yaml", redis_server.url,
        [{"name": "erp", "url": sink.url("/erp"), "secret": "s-erp"}],
        delivery={"timeout": "10s", "max_attempts": 5,
                  "backoff": {"initial": "100ms", "max": "1s"}},
        worker={"concurrency": 1, "lease_grace": "5s", "visibility_timeout": f"{VISIBILITY}s",
                "max_in_flight": 2, "max_connections": 2})
    sink.behave("/erp", lambda n: Reply(200, delay=SLOW))
    # One message per event (the ingress would batch a burst): Celery prefetches eight of them
    # while the first two hold the process's whole share.
    events = [enqueue_event(redis_client, event_body(f"FULL{i:03d}")) for i in range(EVENTS)]

    started = time.monotonic()
    with worker(config, tmp_path / "worker-a.log"):
        # A second worker, polling the same Redis with room to spare: kombu's restore runs
        # in whichever worker polls, and hands out what the full one has held too long.
        time.sleep(1.0)
        with worker(config, tmp_path / "worker-b.log", "--no-scheduler"):
            took = wait_delivered(sink, {("/erp", e) for e in events}, timeout=90)
            # Anything restored or queued twice shows up within a visibility timeout or two.
            time.sleep(2 * VISIBILITY)
            left = wait_quiet(redis_client, timeout=30)

    erp = account(sink, {("/erp", e) for e in events})
    report(fault="worker full for longer than the visibility timeout, 8 messages prefetched",
           erp=erp.figures(), all_delivered_s=round(took, 1),
           run_s=round(time.monotonic() - started, 1), backlog_left=left)
    assert not erp.lost
    assert erp.duplicates == 0
    assert not any(left.values())
