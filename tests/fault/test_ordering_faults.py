"""Ordered delivery through faults: workers SIGKILLed right around a head's 2xx (before its
outcome is written, between the outcome's release of the next event and a lane claiming it,
between the claim and the post), and Redis SIGKILLed and restarted from its AOF. Per order,
the subscriber gets every event, in the order the ingress stored them (the order of its
202s, save an event whose answer was lost with Redis); a duplicate of an event may come again
before the next one, never after it."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from relay.keys import Keys
from relay.models import StoredEvent
from tests.fault.helpers import (
    Load,
    account,
    assert_each_order_in_order,
    kill_group,
    wait_delivered,
    wait_quiet,
)
from tests.hub import Reply, Sink, ingress, order_event, write_config
from tests.support import process, relay_cmd, wait_until

pytestmark = pytest.mark.fault

ORDERS = 8
PER_ORDER = 8
#: A kill this long after the sink has answered the n-th post (s): before the outcome, in
#: the outcome-to-claim gap, between the claim and the next post.
KILL_DELAYS = (0.0, 0.001, 0.003, 0.008, 0.0, 0.002)


def ordered_bodies(prefix: str) -> dict[str, bytes]:
    """ORDERS orders of PER_ORDER events each, interleaved (in sending order)."""
    out = {}
    for n in range(PER_ORDER):
        for o in range(ORDERS):
            event_id = f"{prefix}{o:02d}{n:02d}"
            out[event_id] = order_event(event_id, "im::order_shipped", (f"20-{prefix}{o}",))
    return out


def by_order(accepted: list[str]) -> dict[str, list[str]]:
    """Accepted event ids (in acceptance order) per order: ids are {prefix}{order}{n}."""
    out: dict[str, list[str]] = {}
    for event_id in accepted:
        out.setdefault(event_id[:-2], []).append(event_id)
    return out


def received_at(client: redis.Redis, events: list[str]) -> dict[str, float]:
    """Each stored event's ``receivedAt``: given by the ingress just before it stores it."""
    decode = msgspec.msgpack.Decoder(StoredEvent).decode
    return {e: decode(client.get(Keys().event(e))).received_at for e in events}


@contextlib.contextmanager
def a_worker(config: Path, log: Path) -> Iterator[Any]:
    with process(relay_cmd("--config", str(config), "worker"), log_path=log) as proc:
        wait_until(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 30,
                   what="worker ready")
        yield proc


def config_for(tmp_path: Path, redis_server: Any, sink: Sink) -> Path:
    return write_config(
        tmp_path / "relay.yaml", redis_server.url,
        [{"name": "erp", "url": sink.url("/erp"), "secret": "s-erp",
          "ordering": {"by": "order"}}],
        delivery={"timeout": "2s", "max_attempts": 20,
                  "backoff": {"initial": "100ms", "max": "500ms"}},
        worker={"concurrency": 1, "lease_grace": "1s", "visibility_timeout": "5s"})


def test_workers_killed_around_each_heads_2xx_keep_every_order(
        tmp_path: Path, redis_server, redis_client, sink, report) -> None:
    config = config_for(tmp_path, redis_server, sink)
    sink.behave("/erp", lambda n: Reply(200, delay=0.03))
    events = ordered_bodies("K")
    rng = random.Random(7)
    kills: list[tuple[int, float]] = []
    with ingress(config, tmp_path / "ingress.log") as url:
        # One at a time: the order the events are sent is the order of their 202s.
        load = Load(url, concurrency=1, rate=40).start(events)
        generation = 0
        while len(kills) < len(KILL_DELAYS):
            with a_worker(config, tmp_path / f"worker-{generation}.log") as proc:
                target = len(sink.on("/erp")) + rng.randint(4, 10)
                wait_until(lambda t=target: len(sink.on("/erp")) >= t, 60,  # type: ignore[misc]
                           interval=0.0005, what="posts before the kill")
                delay = KILL_DELAYS[len(kills)]
                time.sleep(delay)
                kill_group(proc)
                kills.append((len(sink.on("/erp")), delay))
            generation += 1
        assert load.join(60).accepted == set(events)
        with a_worker(config, tmp_path / "worker-last.log"):
            waited = wait_delivered(sink, {("/erp", e) for e in events}, timeout=90)
            left = wait_quiet(redis_client, timeout=30)
    acct = account(sink, {("/erp", e) for e in events})
    report(fault="worker SIGKILLed around heads' 2xx, ordered by order", orders=ORDERS,
           per_order=PER_ORDER, kills=kills, **acct.figures(), delivered_s=round(waited, 1),
           backlog_left=left)
    assert not acct.lost, acct.lost[:5]
    assert_each_order_in_order(sink, "/erp", by_order(list(events)))
    assert not any(left.values())
    assert redis_client.keys("relay:ordq:*") == []


def test_redis_killed_and_restarted_keeps_every_order(
        tmp_path: Path, redis_server, redis_client, sink, report) -> None:
    config = config_for(tmp_path, redis_server, sink)
    sink.behave("/erp", lambda n: Reply(200, delay=0.02))
    events = ordered_bodies("R")
    with ingress(config, tmp_path / "ingress.log") as url, \
            a_worker(config, tmp_path / "worker.log"):
        load = Load(url, concurrency=1, rate=40).start(events)
        wait_until(lambda: len(sink.on("/erp")) >= 15, 30)
        redis_server.kill()
        time.sleep(1.0)
        redis_server.start()
        load.join(60)
        # The sender re-sends what got a 503, in its order, as Ingram would.
        sent_again = [e for e in events if e in load.refused]
        resent_at = time.time()
        if sent_again:
            Load(url, concurrency=1).run({e: events[e] for e in sent_again})
        waited = wait_delivered(sink, {("/erp", e) for e in events}, timeout=90)
        left = wait_quiet(redis_client, timeout=30)
    # Per order, the order the ingress stored them. The sender waits for each answer before
    # the next request, so ``receivedAt`` gives it. Not the order of the 202s alone: an event
    # whose store reached Redis's AOF as Redis was killed got a 503 (its answer lost with the
    # connection) and, sent again, a 200 duplicate: its place is where it was stored.
    received = received_at(redis_client, list(events))
    accepted = sorted(events, key=received.__getitem__)
    stored_unanswered = [e for e in sent_again if received[e] < resent_at]
    # That is the 202s' order but for those: each sits where its first send was stored.
    assert accepted == [e for e in events if e not in sent_again or e in stored_unanswered] \
        + [e for e in sent_again if e not in stored_unanswered]
    acct = account(sink, {("/erp", e) for e in events})
    report(fault="redis SIGKILL + restart, ordered by order", resent=len(sent_again),
           stored_though_503=len(stored_unanswered),
           **acct.figures(), delivered_s=round(waited, 1), backlog_left=left)
    assert not acct.lost, acct.lost[:5]
    assert_each_order_in_order(sink, "/erp", by_order(accepted))
    assert not any(left.values())
