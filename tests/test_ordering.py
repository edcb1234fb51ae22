"""Ordered delivery (per order, per topic): per subscriber and key, events reach the subscriber
in the order the ingress accepted them; a retrying or blocked key delays nothing else.

A real worker subprocess, the private Redis and recording sinks; events are stored with the
ingress's own store (its script decides the order) or posted to a real ingress."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from relay.config import Config, load_config
from relay.keys import Keys
from tests.hub import (
    Received,
    Reply,
    Sink,
    attempt_log,
    dead_letters,
    delivered,
    enqueue_events,
    order_event,
    worker,
    write_config,
)
from tests.support import RedisServer, wait_until

KEYS = Keys()


def receipts(sink: Sink, path: str) -> list[str]:
    """Event ids in the order the sink answered them 2xx... and every other answer too."""
    return [r.event_id for r in sink.on(path)]


def first_arrivals(sink: Sink, path: str) -> list[str]:
    """Each event id once, in the order it first reached the sink."""
    seen: dict[str, None] = {}
    for r in sorted(sink.on(path), key=lambda r: r.arrived):
        seen.setdefault(r.event_id, None)
    return list(seen)


def assert_in_order(sink: Sink, path: str, expected: list[str],
                    ok: Callable[[Received], bool] | None = None) -> None:
    """Per the contract: no event is posted before every earlier one was delivered (its 2xx
    answered); a duplicate of an event may come again before the next one, never after."""
    got = sorted(sink.on(path), key=lambda r: r.arrived)
    position = {e: i for i, e in enumerate(expected)}
    done_at: dict[str, float] = {}
    for r in got:
        if r.event_id not in position:
            continue
        for earlier in expected[:position[r.event_id]]:
            assert earlier in done_at and done_at[earlier] <= r.arrived, (
                f"{r.event_id} posted before {earlier} was delivered: "
                f"{[x.event_id for x in got]}")
        later = expected[position[r.event_id] + 1:]
        assert not any(e in done_at for e in later), (
            f"{r.event_id} posted again after a later event: {[x.event_id for x in got]}")
        if ok is None or ok(r):
            done_at.setdefault(r.event_id, r.at)


@pytest.fixture
def hub(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
        sink: Sink) -> Callable[..., Any]:
    """``hub(subscribers, **delivery)``: a config and a running worker for the test."""
    stack: list[Any] = []

    def start(subscribers: list[dict[str, Any]], **settings: Any) -> Config:
        path = write_config(tmp_path / "relay.yaml", redis_server.url, subscribers,
                            delivery={"timeout": "2s", "max_attempts": 5,
                                      "backoff": {"initial": "100ms", "max": "300ms"},
                                      **settings})
        ctx = worker(path, tmp_path / "worker.log")
        ctx.__enter__()
        stack.append(ctx)
        return load_config(path)

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def erp(sink: Sink, **extra: Any) -> dict[str, Any]:
    return {"name": "erp", "url": sink.url("/erp"), "secret": "erp-secret",
            "ordering": {"by": "order"}, **extra}


def crm(sink: Sink) -> dict[str, Any]:
    return {"name": "crm", "url": sink.url("/crm"), "secret": "crm-secret"}


def test_a_retried_event_is_not_overtaken_by_the_next_event_of_its_order(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    sink.behave_per_event("/erp", lambda e, n: Reply(503) if e == "SHIP1" and n <= 2
                          else Reply(200))
    config = hub([erp(sink), crm(sink)])
    ids = enqueue_events(redis_client, [order_event("SHIP1", "im::order_shipped", ("20-A",)),
                                        order_event("INV1", "im::order_invoiced", ("20-A",))],
                         config=config)
    sink.wait_for("/erp", 4)
    assert receipts(sink, "/erp") == ["SHIP1", "SHIP1", "SHIP1", "INV1"]
    # The unordered subscriber got both at once, whatever erp's retries.
    wait_until(lambda: len(sink.on("/crm")) == 2, 10)
    assert [r.event_id for r in sorted(sink.on("/erp"), key=lambda r: r.arrived)] == ids[:1] * 3 + ids[1:]
    # The waiting event spent no attempt while it waited.
    assert [a.attempt for a in attempt_log(redis_client, "INV1", "erp")] == [1]


def test_each_order_waits_only_for_its_own_events(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    sink.behave_per_event("/erp", lambda e, n: Reply(503) if e.startswith("A") and n <= 3
                          else Reply(200))
    config = hub([erp(sink)])
    enqueue_events(redis_client, [order_event("A1", "im::order_shipped", ("20-A",)),
                                  order_event("A2", "im::order_invoiced", ("20-A",)),
                                  order_event("B1", "im::order_shipped", ("20-B",)),
                                  order_event("B2", "im::order_invoiced", ("20-B",))],
                   config=config)
    wait_until(lambda: delivered(redis_client, "A2", "erp"), 20)
    order = first_arrivals(sink, "/erp")
    # Order B went through while A was retrying.
    assert order.index("B2") < order.index("A2")
    assert order.index("B1") < order.index("B2")
    assert order.index("A1") < order.index("A2")


def test_an_event_of_two_orders_waits_to_be_first_on_both(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    sink.behave_per_event("/erp", lambda e, n: Reply(503) if e == "B1" and n <= 2
                          else Reply(200))
    config = hub([erp(sink)])
    ids = enqueue_events(redis_client, [order_event("A1", "im::order_shipped", ("20-A",)),
                                        order_event("B1", "im::order_shipped", ("20-B",)),
                                        order_event("AB", "im::order_invoiced",
                                                    ("20-A", "20-B"))],
                         config=config)
    wait_until(lambda: delivered(redis_client, "AB", "erp"), 20)
    order = first_arrivals(sink, "/erp")
    assert order[-1] == "AB", order
    assert set(order) == set(ids)


def test_by_topic_keeps_stock_updates_in_the_order_ingram_sent_them(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    sink.behave_per_event("/wms", lambda e, n: Reply(503) if e == "S1" and n == 1
                          else Reply(200))
    config = hub([{"name": "wms", "url": sink.url("/wms"), "secret": "wms-secret",
                   "ordering": {"by": "topic"}}])
    bodies = [msgspec.json.encode({
        "topic": "resellers/catalog", "event": "im::updated", "eventId": f"S{i}",
        "eventTimeStamp": "2024-01-01T00:00:00Z",
        "resource": [{"eventType": "im::stock_update", "ingramPartNumber": f"P{i}"}]})
        for i in range(1, 6)]
    ids = enqueue_events(redis_client, bodies, config=config)
    wait_until(lambda: all(delivered(redis_client, e, "wms") for e in ids), 20)
    assert first_arrivals(sink, "/wms") == ids
