"""A subscriber down for much longer than its retry horizon: with the circuit breaker its
deliveries wait and all arrive once it is back; without it, every one is dead-lettered.

The real case is hours (a 6-hour outage, max_attempts 8, backoff up to 1 h); here it is
scaled down to seconds: an outage of 15 s against a retry horizon of 4.5 s."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relay.config import retry_horizon
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

OUTAGE = 15.0
EVENTS = 20


def outage(tmp_path: Path, redis_server, redis_client, sink: Sink, breaker: dict,
           name: str) -> dict:
    back_at = time.time() + OUTAGE
    sink.behave(f"/{name}", lambda n: Reply(503 if time.time() < back_at else 200))
    config = write_config(tmp_path / f"{name}.yaml", redis_server.url, [
        {"name": name, "url": sink.url(f"/{name}"), "secret": "s"}],
        delivery={"timeout": "500ms", "max_attempts": 4,
                  "backoff": {"initial": "500ms", "max": "1s"}, "circuit_breaker": breaker})
    events = [f"EV{name.upper()}{i:02d}" for i in range(EVENTS)]
    with worker(config, tmp_path / f"{name}.log"):
        for event_id in events:
            enqueue_event(redis_client, event_body(event_id))
        wait_until(lambda: all(delivered(redis_client, e, name)
                               or (e, name) in dead_letters(redis_client) for e in events),
                   OUTAGE + 20, what="every delivery settled")
    attempts = [a for e in events for a in attempt_log(redis_client, e, name)]
    return {"delivered": sum(delivered(redis_client, e, name) for e in events),
            "dead_letters": sum((e, name) in dead_letters(redis_client) for e in events),
            "requests": len(sink.on(f"/{name}")),
            "probes": sum(a.probe for a in attempts),
            "requests_during_outage": sum(r.arrived < back_at for r in sink.on(f"/{name}"))}


@pytest.mark.fault
def test_an_outage_longer_than_the_retry_horizon_loses_nothing_with_the_breaker(
        tmp_path: Path, redis_server, redis_client, sink: Sink, report) -> None:
    from relay.config import Backoff, Duration, Subscriber

    horizon = retry_horizon(Subscriber(
        name="x", url="http://x", secret="s", signature="ingram", topics=(), event_types=(),
        headers={}, timeout=0.5, max_attempts=4,
        backoff=Backoff(initial=Duration(0.5), max=Duration(1))))
    assert horizon * 2 < OUTAGE
    without = outage(tmp_path, redis_server, redis_client, sink, {"failures": 0}, "nobreaker")
    with_breaker = outage(tmp_path, redis_server, redis_client, sink,
                          {"failures": 5, "cool_down": "1s", "max_cool_down": "4s"}, "breaker")
    report(fault=f"subscriber down {OUTAGE:g} s, retry horizon {horizon:g} s, {EVENTS} events",
           without_breaker=without, with_breaker=with_breaker)
    assert without["dead_letters"] == EVENTS  # the horizon ran out during the outage
    assert with_breaker["delivered"] == EVENTS and with_breaker["dead_letters"] == 0
    assert with_breaker["requests_during_outage"] < without["requests_during_outage"]
