"""``redis.min_replicas``: the ingress answers 2xx only once a replica holds the event.

A real primary and replica (tests/sentinel.py's nodes, no sentinels needed); the replica is
paused with SIGSTOP, so the primary still counts it as connected but it acknowledges nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from relay.ingress.ready import ReadinessProbe
from relay.ingress.store import EventStore, StoreUnavailable
from relay.keys import Keys
from relay.models import StoredEvent, parse_envelope
from tests.hub import event_body
from tests.sentinel import PASSWORD, Node
from tests.support import wait_until

KEYS = Keys()


class Pair:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="relay-test-replication-"))
        self.primary = Node("primary", self.root)
        self.replica = Node("replica", self.root, replica_of=self.primary.port)

    def start(self) -> Pair:
        self.primary.start()
        with self.primary.client() as c:
            c.config_set("repl-diskless-sync-delay", 0)  # the first sync now, not in 5 s
        self.replica.start()

        def linked() -> bool:
            with self.replica.client() as c:
                return c.info("replication").get("master_link_status") == "up"

        wait_until(linked, 20, 0.05, what="the replica in sync")
        return self

    def pause_replica(self) -> None:
        assert self.replica.proc is not None
        os.kill(self.replica.proc.pid, signal.SIGSTOP)

    def resume_replica(self) -> None:
        assert self.replica.proc is not None
        os.kill(self.replica.proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        if self.replica.proc is not None and self.replica.proc.poll() is None:
            self.resume_replica()
        self.replica.stop()
        self.primary.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def pair() -> Iterator[Pair]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    p = Pair()
    try:
        yield p.start()
    finally:
        p.cleanup()


def record(event_id: str) -> StoredEvent:
    body = event_body(event_id)
    envelope = parse_envelope(body)
    return StoredEvent(event_id=event_id, topic=envelope.topic,
                       event_types=envelope.event_types(), received_at=time.time(), body=body,
                       order_numbers=envelope.order_numbers())


#: How long WAIT may take where the replica is expected to acknowledge: generous, since a
#: replica on a busy 2-core CI machine once took longer than 0.3 s for its first write.
#: Where it is paused, the short one: the refusal waits that long.
ACKNOWLEDGES, PAUSED = 10.0, 0.3


async def accept(port: int, event: StoredEvent, min_replicas: int = 1,
                 replica_timeout: float = ACKNOWLEDGES) -> bool:
    """Store ``event`` as an ingress process would, on a client of its own (a new connection:
    another ingress process, or the same one after a reconnect)."""
    client = aioredis.Redis(port=port, password=PASSWORD)
    try:
        store = EventStore(client, KEYS, 86400, 86400, min_replicas=min_replicas,
                           replica_timeout=replica_timeout)
        return await store.accept(event)
    finally:
        await client.aclose()


def test_an_event_is_accepted_once_the_replica_holds_it_and_refused_while_it_cannot(
        pair: Pair) -> None:
    event = record("REPL-1")
    assert asyncio.run(accept(pair.primary.port, event)) is True
    with pair.replica.client() as c:
        assert c.exists(KEYS.event("REPL-1"))  # WAIT returned: the replica has it already

    pair.pause_replica()
    with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
        asyncio.run(accept(pair.primary.port, record("REPL-2"), replica_timeout=PAUSED))


def test_a_duplicate_is_not_answered_2xx_before_the_replica_holds_the_event(pair: Pair) -> None:
    # The first send is stored on the primary, but the replica does not acknowledge it: 503.
    pair.pause_replica()
    event = record("REPL-DUP")
    with pytest.raises(StoreUnavailable):
        asyncio.run(accept(pair.primary.port, event, replica_timeout=PAUSED))
    # The sender retries, through the other ingress process (a new connection). The store
    # finds the event and would say "duplicate"; until the replica holds it, that is a 503 too.
    # WAIT waits for the connection's last write: Redis 7.2 and later note it only after a
    # command that propagated (the end of call() in server.c), so a script that wrote nothing
    # left it at 0 on a new connection and WAIT counted the paused replica at once: "200
    # duplicate" for an event only the primary held. The store script now writes a marker
    # for such a batch. (Redis 7.0, on this machine, notes the offset after every command,
    # read-only ones too, so this test passes there with or without the marker.)
    with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
        asyncio.run(accept(pair.primary.port, event, replica_timeout=PAUSED))
    pair.resume_replica()
    assert asyncio.run(accept(pair.primary.port, event)) is False  # 200 duplicate, and now:
    with pair.replica.client() as c:
        assert c.exists(KEYS.event("REPL-DUP"))


def test_readyz_is_not_ready_while_no_replica_acknowledges_a_write(pair: Pair) -> None:
    async def probe(replica_timeout: float) -> tuple[bool, str]:
        client = aioredis.Redis(port=pair.primary.port, password=PASSWORD)
        try:
            return await ReadinessProbe(client, KEYS.ready_probe, min_replicas=1,
                                        replica_timeout=replica_timeout).check()
        finally:
            await client.aclose()

    assert asyncio.run(probe(ACKNOWLEDGES)) == (True, "")
    pair.pause_replica()
    ready, why = asyncio.run(probe(PAUSED))
    assert not ready and "0 of 1 replicas" in why
