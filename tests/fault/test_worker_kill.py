"""Workers SIGKILLed again and again during a fan-out: nothing is lost, duplicates stay rare."""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import pytest

from tests.fault.helpers import (
    Load,
    account,
    backlog,
    bodies,
    kill_group,
    wait_delivered,
    wait_quiet,
)
from tests.hub import Reply, ingress, worker, write_config

pytestmark = pytest.mark.fault

EVENTS = 200
SUBSCRIBERS = 10
KILLS = 4
KILL_EVERY = 2.5
#: Where in the 50 ms between two events each kill lands: as an event arrives (its fan-out
#: message being taken from the queue) or 12 ms later (its posts in flight).
KILL_OFFSETS = (0.0, 0.012, 0.0, 0.012)


def test_workers_sigkilled_repeatedly_lose_nothing(tmp_path: Path, redis_server, redis_client,
                                                   sink, report) -> None:
    paths = [f"/s{i}" for i in range(SUBSCRIBERS)]
    config = write_config(
        tmp_path / "relay.yaml", redis_server.url,
        [{"name": f"s{i}", "url": sink.url(p), "secret": f"secret-{i}"}
         for i, p in enumerate(paths)],
        delivery={"timeout": "2s", "max_attempts": 10,
                  "backoff": {"initial": "100ms", "max": "1s"}},
        worker={"concurrency": 1, "lease_grace": "2s", "visibility_timeout": "10s"})
    # Subscribers take 0-20 ms to answer, so a kill lands on posts in flight: those are
    # retried when their lease falls due, and any the subscriber had already taken are the
    # duplicates counted below.
    rng = random.Random(4)
    for p in paths:
        sink.behave_per_event(p, lambda event_id, k: Reply(delay=rng.uniform(0, 0.02)))
    events = bodies("WKILL", EVENTS)
    expected = {(p, e) for e in events for p in paths}

    kills = []
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(ingress(config, tmp_path / "ingress.log"))
        workers = [stack.enter_context(worker(config, tmp_path / f"worker-{i}.log"))
                   for i in range(2)]
        started = time.monotonic()
        # 20 events/s for 10 s: the kills land while deliveries are being made.
        load = Load(url, concurrency=8, rate=20).start(events)
        for k in range(KILLS):
            at = started + (k + 1) * KILL_EVERY + KILL_OFFSETS[k]
            time.sleep(max(0.0, at - time.monotonic()))
            victim = k % 2
            kills.append({"at_s": round(time.monotonic() - started, 2), "worker": victim,
                          "delivered_so_far": len(sink.received)})
            kill_group(workers[victim])
            workers[victim] = stack.enter_context(
                worker(config, tmp_path / f"worker-{victim}-restart-{k}.log"))
        load.join(60)
        assert load.accepted == set(events), load.statuses()
        waited = wait_delivered(sink, expected, timeout=90)
        left = wait_quiet(redis_client, timeout=30)
        time.sleep(1.0)  # a late duplicate would show up here
        total = time.monotonic() - started

    acct = account(sink, expected)
    report(fault="worker SIGKILL x4 (2 workers, every 2.5 s)", events=EVENTS,
           subscriber_delay_ms="0-20",
           subscribers=SUBSCRIBERS, **acct.figures(),
           all_delivered_s_after_load=round(waited, 2), total_s=round(total, 1),
           backlog_left=left, kills=kills)
    assert not acct.lost, f"{len(acct.lost)} deliveries lost, e.g. {acct.lost[:5]}"
    assert not acct.unexpected
    assert not any(backlog(redis_client).values())
    # The target is < 0.5 %; the assertion leaves room for an unlucky kill on a slow machine.
    assert acct.duplicate_rate < 0.02, acct.figures()
