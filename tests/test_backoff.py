"""Backoff: exponential with full jitter, Retry-After honoured up to backoff.max.

Unit tests on ``workers/backoff.py``, then end to end through a real worker and sink.
"""

from __future__ import annotations

import random
import statistics
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from relay.config import Backoff, Duration
from tests.hub import (
    Reply,
    Sink,
    attempt_log,
    dead_letters,
    delivered,
    enqueue_event,
    event_body,
    worker,
    write_config,
)
from tests.support import wait_until
from workers.backoff import ceiling, parse_retry_after, retry_delay

#: Time between a failed attempt's due time and the next request reaching the sink: the
#: scheduler polls every 0.2 s, then a Celery task is fetched and an HTTP post made. Generous
#: for a loaded CI machine.
SLACK = 0.7


def backoff(initial: float, maximum: float) -> Backoff:
    return Backoff(initial=Duration(initial), max=Duration(maximum))


def test_ceiling_doubles_per_attempt_from_initial_and_is_capped_at_max() -> None:
    b = backoff(5, 3600)
    assert [ceiling(b, n) for n in range(1, 8)] == [5, 10, 20, 40, 80, 160, 320]
    assert ceiling(b, 11) == 3600  # 5 * 1024 = 5120 > 3600
    assert ceiling(b, 1000) == 3600  # no overflow for huge attempt numbers


def test_full_jitter_delay_stays_within_zero_and_the_ceiling_and_spreads_over_it() -> None:
    b = backoff(1, 60)
    rng = random.Random(7)
    for attempt in range(1, 10):
        top = ceiling(b, attempt)
        delays = [retry_delay(b, attempt, rng=rng) for _ in range(2000)]
        assert all(0 <= d <= top for d in delays)
        # Full jitter: uniform over [0, ceiling], not "ceiling plus a little noise".
        assert min(delays) < 0.05 * top
        assert max(delays) > 0.95 * top
        assert statistics.mean(delays) == pytest.approx(top / 2, rel=0.1)


def test_retry_after_replaces_the_computed_delay_and_is_capped_at_backoff_max() -> None:
    b = backoff(5, 30)
    assert retry_delay(b, 1, retry_after=12) == 12
    assert retry_delay(b, 7, retry_after=2) == 2  # even when below the jittered range
    assert retry_delay(b, 1, retry_after=86400) == 30
    assert retry_delay(b, 1, retry_after=-5) == 0


def test_retry_after_header_parses_seconds_and_http_dates() -> None:
    now = time.time()
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after(" 7 ", now) == 7
    assert parse_retry_after(formatdate(now + 90, usegmt=True), now) == pytest.approx(90, abs=1)
    assert parse_retry_after(formatdate(now - 90, usegmt=True), now) == 0  # in the past
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-3", now) is None



def test_failed_deliveries_are_retried_with_growing_jittered_gaps_until_success(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    initial, maximum = 0.4, 10.0
    b = backoff(initial, maximum)
    ceilings = [ceiling(b, n) for n in (1, 2, 3)]
    assert ceilings == sorted(set(ceilings))  # 0.4, 0.8, 1.6: they grow
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "flaky", "url": sink.url("/flaky"), "secret": "s"},
    ], delivery={"timeout": "2s", "max_attempts": 6,
                 "backoff": {"initial": "400ms", "max": "10s"}})
    # Per event: 500 for the first three requests, then 200.
    sink.behave_per_event("/flaky", lambda _event, n: Reply(500 if n <= 3 else 200))
    events = [f"EVGROW{i:03d}" for i in range(20)]
    with worker(config, tmp_path / "worker.log"):
        for event_id in events:
            enqueue_event(redis_client, event_body(event_id))
        sink.wait_for("/flaky", 4 * len(events), timeout=30)
        # Each success is recorded right after the sink answers.
        wait_until(lambda: all(delivered(redis_client, e, "flaky") for e in events),
                   10, what="done markers")
    got = sink.on("/flaky")
    assert len(got) == 4 * len(events)  # no extra attempt after the success
    gaps_by_attempt: list[list[float]] = [[], [], []]
    for event_id in events:
        times = sorted(r.at for r in got if r.event_id == event_id)
        assert len(times) == 4, event_id
        gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        for n, gap in enumerate(gaps, start=1):
            assert gap <= ceilings[n - 1] + SLACK, (event_id, n, gap)
            gaps_by_attempt[n - 1].append(gap)
        log = attempt_log(redis_client, event_id, "flaky")
        assert [a.attempt for a in log] == [1, 2, 3, 4]
        assert [a.status for a in log] == [500, 500, 500, 200]
        assert all(a.error is None for a in log)
    means = [statistics.mean(g) for g in gaps_by_attempt]
    print(f"mean gap after attempt 1..3: {[round(m, 3) for m in means]} (ceilings {ceilings})")
    # Single gaps are random (full jitter); over 20 events the third gap is clearly longer
    # on average than the first (expected ~0.8 s vs ~0.2 s).
    assert means[2] > means[0]
    assert redis_client.zcard("relay:schedule") == 0
    assert dead_letters(redis_client) == {}


def test_retry_after_on_429_and_503_is_honoured_and_capped_at_backoff_max(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    # Jitter alone would retry within 50 ms: any longer gap comes from Retry-After.
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "limited", "url": sink.url("/429"), "secret": "s"},
        {"name": "unavailable", "url": sink.url("/503"), "secret": "s"},
    ], delivery={"timeout": "2s", "max_attempts": 4,
                 "backoff": {"initial": "50ms", "max": "1500ms"}})
    sink.behave("/429", lambda n: Reply(429, {"Retry-After": "1"}) if n == 1 else Reply())
    sink.behave("/503", lambda n: Reply(503, {"Retry-After": "3600"}) if n == 1 else Reply())
    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EVRETRYAFTER"))
        limited = sink.wait_for("/429", 2, timeout=15)
        unavailable = sink.wait_for("/503", 2, timeout=15)
    gap_429 = limited[1].at - limited[0].at
    gap_503 = unavailable[1].at - unavailable[0].at
    print(f"gap after 429 Retry-After: 1 -> {gap_429:.3f}s; "
          f"after 503 Retry-After: 3600 (max 1.5s) -> {gap_503:.3f}s")
    assert 1.0 <= gap_429 <= 1.0 + SLACK
    assert 1.5 <= gap_503 <= 1.5 + SLACK
    assert [a.status for a in attempt_log(redis_client, "EVRETRYAFTER", "limited")] == [429, 200]
    assert [a.status for a in attempt_log(redis_client, "EVRETRYAFTER", "unavailable")] \
        == [503, 200]
