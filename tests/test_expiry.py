"""Everything kept per event expires: the outcome script sets an expiry only on what it
creates (and with a failure), so every other path that writes those keys must leave them with
one, and a resend or a replay starts their retention again."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from relay.config import load_config
from relay.keys import Keys
from tests.hub import (
    Reply,
    Sink,
    dead_letters,
    delivered,
    enqueue_event,
    enqueue_events,
    event_body,
    order_event,
    worker,
    write_config,
)
from tests.support import relay_cmd, wait_until

KEYS = Keys()
RETENTION = 86400
#: Key kinds (the part after the prefix) kept per event, and the other kinds of the layout,
#: which hold hub-wide state and indexes that are trimmed or emptied rather than expired.
PER_EVENT = {"seen", "event", "deliveries", "log", "letter", "order", "stats"}
HUB_WIDE = {"queue", "schedule", "unclaimed", "events", "dead", "deadsubs", "pending", "totals",
            "health", "parked", "held", "breakers", "rate", "known", "workers",
            "backlog_since", "alerts", "inflight", "ordq", "ordkeys", "ordheld", "ordblocked",
            "ordready", "ordsubs", "ordwaiting"}


def relay(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(relay_cmd("--config", str(config), *args), capture_output=True,
                          text=True, timeout=30, env=dict(os.environ))


def test_every_key_kept_per_event_expires_and_resend_and_replay_renew_it(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    sink.behave("/flaky", lambda n: Reply(503) if n == 1 else Reply(200))
    sink.behave("/dead", lambda n: Reply(500))
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "ok", "url": sink.url("/ok"), "secret": "s"},
        {"name": "flaky", "url": sink.url("/flaky"), "secret": "s"},
        {"name": "dead", "url": sink.url("/dead"), "secret": "s"},
        {"name": "ord", "url": sink.url("/ord"), "secret": "s", "ordering": {"by": "order"}},
    ], delivery={"timeout": "2s", "max_attempts": 2,
                 "backoff": {"initial": "100ms", "max": "200ms"}},
        redis={"retention": f"{RETENTION}s"})
    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EV-TTL-1"))
        enqueue_events(redis_client, [order_event("EV-TTL-2", "im::order_shipped"),
                                      order_event("EV-TTL-3", "im::order_invoiced")],
                       config=load_config(config))
        ids = ("EV-TTL-1", "EV-TTL-2", "EV-TTL-3")
        wait_until(lambda: all(delivered(redis_client, i, s) for i in ids
                               for s in ("ok", "flaky", "ord"))
                   and len(dead_letters(redis_client)) == 3, 20, what="every outcome")

        # Retention run down (as days would), then an operator's resend and replay: what
        # they will write to starts its retention again.
        for key in (KEYS.event("EV-TTL-1"), KEYS.deliveries("EV-TTL-1"),
                    KEYS.log("EV-TTL-1", "ok"), KEYS.event("EV-TTL-2"),
                    KEYS.deliveries("EV-TTL-2"), KEYS.log("EV-TTL-2", "dead")):
            redis_client.expire(key, 100)
        out = relay(config, "events", "resend", "EV-TTL-1", "--subscriber", "ok")
        assert out.returncode == 0, out.stderr
        out = relay(config, "dlq", "replay", "--subscriber", "dead", "--event", "EV-TTL-2")
        assert out.returncode == 0, out.stderr
        for key in (KEYS.event("EV-TTL-1"), KEYS.deliveries("EV-TTL-1"),
                    KEYS.log("EV-TTL-1", "ok"), KEYS.event("EV-TTL-2"),
                    KEYS.deliveries("EV-TTL-2"), KEYS.log("EV-TTL-2", "dead")):
            assert redis_client.ttl(key) > RETENTION - 60, key
        sink.wait_for("/ok", 4)
        wait_until(lambda: len(redis_client.lrange(KEYS.log("EV-TTL-2", "dead"), 0, -1)) == 4
                   and redis_client.exists(KEYS.letter("dead", "EV-TTL-2")), 20,
                   what="the replayed letter dead again")
        wait_until(lambda: delivered(redis_client, "EV-TTL-1", "ok"), 10, what="the resend")

    prefix = KEYS.prefix.encode()
    kinds = set()
    for key in redis_client.scan_iter(match=prefix + b"*"):
        kind = key[len(prefix):].split(b":")[0].decode()
        kinds.add(kind)
        assert kind in PER_EVENT | HUB_WIDE, f"a key of a kind the test does not know: {key!r}"
        if kind in PER_EVENT:
            assert redis_client.ttl(key) > 0, f"{key!r} has no expiry"
    assert {"seen", "event", "deliveries", "log", "letter", "stats"} <= kinds
