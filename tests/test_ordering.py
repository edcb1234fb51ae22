"""Ordered delivery (per order, per topic): per subscriber and key, events reach the subscriber
in the order the ingress accepted them; a retrying or blocked key delays nothing else.

A real worker subprocess, the private Redis and recording sinks; events are stored with the
ingress's own store (its script decides the order) or posted to a real ingress."""

from __future__ import annotations

import time
from collections.abc import Callable
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
    assert first_arrivals(sink, "/erp") == ids
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


def relay(config: Config, *args: str) -> Any:
    import subprocess

    from tests.support import ROOT, relay_cmd

    return subprocess.run(relay_cmd("--config", config.source, *args), cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def three_of_one_order(redis_client: redis.Redis, config: Config) -> list[str]:
    return enqueue_events(redis_client, [
        order_event("HOLD1", "im::order_hold", ("20-C",)),
        order_event("SHIP1", "im::order_shipped", ("20-C",)),
        order_event("INV1", "im::order_invoiced", ("20-C",))], config=config)


def test_on_dead_skip_dead_letters_the_head_and_the_next_event_goes(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    sink.behave_per_event("/erp", lambda e, n: Reply(500) if e == "HOLD1" else Reply(200))
    config = hub([erp(sink, max_attempts=2)])
    ids = three_of_one_order(redis_client, config)
    wait_until(lambda: delivered(redis_client, "INV1", "erp"), 20)
    assert ("HOLD1", "erp") in dead_letters(redis_client)
    assert first_arrivals(sink, "/erp") == ids
    assert redis_client.keys("relay:ordq:*") == []


def test_on_dead_block_holds_the_key_until_the_dead_letter_is_replayed(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    failing = {"on": True}
    sink.behave_per_event("/erp", lambda e, n: Reply(500) if e == "HOLD1" and failing["on"]
                          else Reply(200))
    config = hub([erp(sink, max_attempts=2, ordering={"by": "order", "on_dead": "block"}),
                  crm(sink)])
    ids = three_of_one_order(redis_client, config)
    wait_until(lambda: ("HOLD1", "erp") in dead_letters(redis_client), 20)
    wait_until(lambda: len(sink.on("/crm")) == 3, 10)
    import time
    time.sleep(1.0)
    # Blocked: the later events of the order wait, not posted, no attempts spent.
    assert set(receipts(sink, "/erp")) == {"HOLD1"}
    assert attempt_log(redis_client, "SHIP1", "erp") == []
    assert redis_client.zrange("relay:ordblocked:erp", 0, -1) == [b"o:20-C"]

    failing["on"] = False
    result = relay(config, "dlq", "replay", "--subscriber", "erp")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: delivered(redis_client, "INV1", "erp"), 20)
    # The replayed letter went first again, then the key moved on.
    assert first_arrivals(sink, "/erp") == ids
    assert [r for r in receipts(sink, "/erp") if r != "HOLD1"] == ids[1:]
    assert redis_client.zcard("relay:ordblocked:erp") == 0


def test_on_dead_block_purging_the_dead_letter_lets_the_key_move_on(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    sink.behave_per_event("/erp", lambda e, n: Reply(500) if e == "HOLD1" else Reply(200))
    config = hub([erp(sink, max_attempts=1, ordering={"by": "order", "on_dead": "block"})])
    three_of_one_order(redis_client, config)
    wait_until(lambda: ("HOLD1", "erp") in dead_letters(redis_client), 20)
    assert relay(config, "dlq", "purge", "--subscriber", "erp").returncode == 0
    wait_until(lambda: delivered(redis_client, "INV1", "erp"), 20)
    assert receipts(sink, "/erp") == ["HOLD1", "SHIP1", "INV1"]
    assert redis_client.keys("relay:ordq:*") == []


def test_a_resend_joins_the_end_of_its_order(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    resent = {"done": False}
    # The order's next event fails until the resend of its first one has been queued: the
    # resend must wait behind it.
    sink.behave_per_event("/erp", lambda e, n: Reply(503) if e == "REF1" and not resent["done"]
                          else Reply(200))
    config = hub([erp(sink, max_attempts=30)])
    enqueue_events(redis_client, [order_event("SHIP1", "im::order_shipped", ("20-D",))],
                   config=config)
    wait_until(lambda: delivered(redis_client, "SHIP1", "erp"), 20)
    enqueue_events(redis_client, [order_event("REF1", "im::order_hold", ("20-D",))],
                   config=config)
    wait_until(lambda: "REF1" in receipts(sink, "/erp"), 10)
    assert relay(config, "events", "resend", "SHIP1", "--subscriber", "erp").returncode == 0
    assert redis_client.hget("relay:deliveries:SHIP1", "erp")[:1] == b"w"
    resent["done"] = True
    wait_until(lambda: receipts(sink, "/erp").count("SHIP1") == 2, 20)
    got = receipts(sink, "/erp")
    assert got[-2:] == ["REF1", "SHIP1"], got


# -- changing the config, retention ------------------------------------------------------------


def test_turning_ordering_off_releases_every_waiting_event(
        tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
        sink: Sink) -> None:
    import os
    import signal

    import yaml

    sink.behave_per_event("/erp", lambda e, n: Reply(503) if e == "OFF1" else Reply(200))
    path = write_config(tmp_path / "relay.yaml", redis_server.url, [erp(sink, max_attempts=50)],
                        delivery={"timeout": "2s", "max_attempts": 5,
                                  "backoff": {"initial": "200ms", "max": "500ms"}})
    config = load_config(path)
    with worker(path, tmp_path / "worker.log") as proc:
        enqueue_events(redis_client, [order_event(f"OFF{i}", "im::order_shipped", ("20-E",))
                                      for i in range(1, 5)], config=config)
        wait_until(lambda: len(sink.on("/erp")) >= 2, 10)
        assert set(receipts(sink, "/erp")) == {"OFF1"}
        assert redis_client.hget(KEYS.order_waiting, "erp") == b"3"
        doc = yaml.safe_load(path.read_text())
        doc["subscribers"][0]["ordering"] = False
        path.write_text(yaml.safe_dump(doc))
        os.killpg(proc.pid, signal.SIGHUP)
        wait_until(lambda: all(delivered(redis_client, f"OFF{i}", "erp") for i in (2, 3, 4)),
                   20, what="the waiting events released")
    assert not delivered(redis_client, "OFF1", "erp")   # still retrying
    assert redis_client.keys("relay:ordq:*") == []
    assert not redis_client.hget(KEYS.order_waiting, "erp")


def test_released_events_left_by_a_killed_worker_are_taken_though_no_task_comes(
        tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
        sink: Sink) -> None:
    """A worker killed right after an outcome released the next events (``ordready:{sub}``)
    and before a lane claimed them leaves nothing queued or scheduled: a worker that has no
    task to run must still take them (its delivery loop's puller), not wait for new traffic.
    The released state is made with the hub's own release script once the fan-out task is
    gone (taken by the worker that died); the head, which that worker was posting, is not
    this test's."""
    from relay import ordering

    path = write_config(tmp_path / "relay.yaml", redis_server.url, [erp(sink)])
    config = load_config(path)
    enqueue_events(redis_client, [order_event(e, "im::order_shipped", ("20-L",))
                                  for e in ("LEFT0", "LEFT1", "LEFT2")], config=config)
    redis_client.delete(KEYS.queue, KEYS.unclaimed)
    assert ordering.release_all(redis_client, KEYS, "erp", int(time.time() * 1000),
                                config.redis.retention) == 2
    with worker(path, tmp_path / "worker.log"):
        wait_until(lambda: delivered(redis_client, "LEFT1", "erp")
                   and delivered(redis_client, "LEFT2", "erp"), 15,
                   what="the released events delivered")
    assert sorted(receipts(sink, "/erp")) == ["LEFT1", "LEFT2"]
    assert redis_client.zcard(KEYS.order_ready("erp")) == 0


def test_a_removed_subscribers_waiting_events_are_dead_lettered_as_removed(
        tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
        sink: Sink) -> None:
    sink.behave_per_event("/erp", lambda e, n: Reply(503))
    with_erp = write_config(tmp_path / "with.yaml", redis_server.url,
                            [erp(sink, max_attempts=50), crm(sink)])
    without = write_config(tmp_path / "without.yaml", redis_server.url, [crm(sink)])
    ids = [f"RM{i}" for i in range(1, 4)]
    with worker(with_erp, tmp_path / "worker.log"):
        enqueue_events(redis_client, [order_event(e, "im::order_shipped", ("20-F",))
                                      for e in ids], config=load_config(with_erp))
        wait_until(lambda: len(sink.on("/erp")) >= 1, 10)
    # erp is gone from every worker's config: once no live worker has had it for 15 s, its
    # head and the events waiting behind it are dead letters, none dropped.
    with worker(without, tmp_path / "worker2.log"):
        wait_until(lambda: all((e, "erp") in dead_letters(redis_client) for e in ids), 45,
                   what="every erp delivery dead-lettered")
    assert {dead_letters(redis_client)[(e, "erp")].reason for e in ids} == {"subscriber removed"}
    assert redis_client.keys("relay:ordq:*") == []


def test_an_event_that_expires_while_waiting_is_dead_lettered_and_its_key_moves_on(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    gate = {"open": False}
    sink.behave_per_event("/erp", lambda e, n: Reply(200) if gate["open"] or e != "EXP1"
                          else Reply(503))
    config = hub([erp(sink, max_attempts=50)])
    enqueue_events(redis_client, [order_event(f"EXP{i}", "im::order_shipped", ("20-G",))
                                  for i in range(1, 4)], config=config)
    wait_until(lambda: "EXP1" in receipts(sink, "/erp"), 10)
    redis_client.delete(KEYS.event("EXP2"), KEYS.deliveries("EXP2"))  # what retention does
    gate["open"] = True
    wait_until(lambda: delivered(redis_client, "EXP3", "erp"), 20)
    assert dead_letters(redis_client)[("EXP2", "erp")].reason == "event expired"
    assert receipts(sink, "/erp")[-1] == "EXP3"
    assert "EXP2" not in receipts(sink, "/erp")
    assert redis_client.keys("relay:ordq:*") == []


# -- what operators see -----------------------------------------------------------------------


def test_the_admin_shows_waiting_events_blocked_keys_and_counts(
        tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
        sink: Sink) -> None:
    from tests.hub import call
    from tests.support import free_port, process, relay_cmd, wait_http

    sink.behave_per_event("/erp", lambda e, n: Reply(500) if e in ("VIS1", "VIS3") else
                          Reply(200))
    port = free_port()
    path = write_config(tmp_path / "relay.yaml", redis_server.url,
                        [erp(sink, max_attempts=1, ordering={"by": "order", "on_dead": "block"}),
                         crm(sink)], admin={"port": port})
    config = load_config(path)
    with worker(path, tmp_path / "worker.log"), \
            process(relay_cmd("--config", str(path), "admin"), log_path=tmp_path / "admin.log"):
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        enqueue_events(redis_client, [order_event("VIS1", "im::order_shipped", ("20-H",)),
                                      order_event("VIS2", "im::order_invoiced", ("20-H",)),
                                      order_event("VIS3", "im::order_shipped", ("20-J",))],
                       config=config)
        wait_until(lambda: ("VIS3", "erp") in dead_letters(redis_client), 20)
        wait_until(lambda: ("VIS1", "erp") in dead_letters(redis_client), 20)

        status, _, detail = call(f"{base}/api/events/VIS2")
        assert status == 200
        erp_delivery = next(d for d in detail["deliveries"] if d["subscriber"] == "erp")
        assert erp_delivery["state"] == "waiting"
        assert erp_delivery["waitingFor"] == "VIS1"

        status, _, keys = call(f"{base}/api/ordering/erp")
        assert status == 200
        # Oldest first by ``since`` (when each was blocked): VIS1 and VIS3 fail concurrently,
        # so either key may come first.
        assert sorted((k["key"], k["headEventId"], k["state"], k["waiting"])
                      for k in keys["keys"]) \
            == [("20-H", "VIS1", "blocked", 1), ("20-J", "VIS3", "blocked", 0)]
        assert [k["since"] for k in keys["keys"]] == sorted(k["since"] for k in keys["keys"])

        status, _, subs = call(f"{base}/api/subscribers")
        by_name = {s["name"]: s for s in subs}
        assert by_name["erp"]["ordering"] == {"by": "order", "onDead": "block", "waiting": 1,
                                              "blockedKeys": 2}
        assert by_name["crm"]["ordering"] is None

        status, _, metrics = call(f"{base}/metrics")
        assert 'relay_ordering_waiting{subscriber="erp"} 1.0' in metrics
        assert 'relay_ordering_blocked_keys{subscriber="erp"} 2.0' in metrics

        status, _, found = call(f"{base}/api/events?state=waiting")
        assert [e["eventId"] for e in found["events"]] == ["VIS2"]

    shown = relay(config, "status")
    assert shown.returncode == 0, shown.stderr
    assert "WAITING" in shown.stdout and "BLOCKED" in shown.stdout


def test_a_key_blocked_by_a_dead_letter_that_expired_moves_on(
        tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
        sink: Sink) -> None:
    """on_dead: block keeps the key for an operator; once the letter itself has expired
    (redis.retention) there is nothing left to replay or purge, and the key moves on."""
    sink.behave_per_event("/erp", lambda e, n: Reply(500) if e == "STALE1" else Reply(200))
    path = write_config(tmp_path / "relay.yaml", redis_server.url,
                        [erp(sink, max_attempts=1, timeout="1s",
                             ordering={"by": "order", "on_dead": "block"})],
                        delivery={"timeout": "1s", "max_attempts": 1,
                                  "backoff": {"initial": "100ms", "max": "100ms"}},
                        redis={"retention": "3s"}, ingress={"dedupe_window": "3s"})
    config = load_config(path)
    with worker(path, tmp_path / "worker.log"):
        enqueue_events(redis_client, [order_event("STALE1", "im::order_shipped", ("20-K",)),
                                      order_event("STALE2", "im::order_invoiced", ("20-K",))],
                       config=config)
        wait_until(lambda: redis_client.zcard(KEYS.order_blocked("erp")) == 1, 10)
        assert receipts(sink, "/erp") == ["STALE1"]
        # The letter expires 3 s after it was written; the scheduler then unblocks the key.
        wait_until(lambda: "STALE2" in receipts(sink, "/erp"), 15,
                   what="the next event once the blocking letter expired")
    assert redis_client.zcard(KEYS.order_blocked("erp")) == 0
    assert redis_client.keys("relay:ordq:*") == []


def test_a_paused_ordered_subscriber_holds_the_head_and_delivers_the_order_in_turn_on_resume(
        hub: Any, redis_client: redis.Redis, sink: Sink) -> None:
    config = hub([erp(sink)])
    assert relay(config, "subscribers", "pause", "erp").returncode == 0
    ids = enqueue_events(redis_client, [order_event(f"PZ{i}", "im::order_shipped", ("20-L",))
                                        for i in range(1, 5)], config=config)
    wait_until(lambda: redis_client.zcard(KEYS.held("erp")) == 1, 10, what="the head held")
    assert receipts(sink, "/erp") == []
    assert redis_client.hget(KEYS.order_waiting, "erp") == b"3"   # the rest spend nothing
    assert relay(config, "subscribers", "resume", "erp").returncode == 0
    wait_until(lambda: delivered(redis_client, "PZ4", "erp"), 20)
    assert receipts(sink, "/erp") == ids
