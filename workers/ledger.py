"""What the workers write to Redis about deliveries: leases, outcomes, attempt logs, dead letters.

The schedule (a sorted set scored by due time, as in arq's delayed jobs) is the source of
truth for every delivery that is not yet done. Its members are ready-made Celery messages
(``relay.queue.deliver_message``) for "the next attempt of (event, subscriber)":

* before attempt *n* starts, a *lease* is added: the message for attempt *n+1*, due at
  ``now + timeout + lease_grace``. If the worker dies mid-attempt, the scheduler moves the
  lease into the queue when it falls due, and the delivery is tried again: nothing held only
  in a worker's memory is ever needed to finish it;
* a failed attempt re-scores the same member to its backoff due time (``ZADD XX``: if the
  lease already fell due and was moved, the retry is already queued, and nothing is added);
* success removes it and records a done marker, so a redelivered task does not repeat it;
* the last failure removes it and writes a dead letter with the attempt history.
"""

from __future__ import annotations

import time

import msgspec
import redis.asyncio as aioredis

from relay.keys import Keys
from relay.models import StoredEvent

#: Attempt records kept per (event, subscriber); older ones are trimmed.
LOG_LENGTH = 50


class Attempt(msgspec.Struct, array_like=True, frozen=True):
    at: float
    attempt: int
    status: int | None
    error: str | None
    latency_ms: float

    def describe(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else (self.error or "?")


class DeadLetter(msgspec.Struct, array_like=True, frozen=True):
    event_id: str
    subscriber: str
    reason: str
    dead_at: float
    attempts: list[Attempt]
    event: StoredEvent


_encode = msgspec.msgpack.Encoder().encode
_decode_event = msgspec.msgpack.Decoder(StoredEvent).decode
_decode_attempts = msgspec.msgpack.Decoder(Attempt).decode
decode_dead_letter = msgspec.msgpack.Decoder(DeadLetter).decode


def now_ms() -> int:
    return int(time.time() * 1000)


class Ledger:
    def __init__(self, client: aioredis.Redis, keys: Keys, retention: float) -> None:
        self._r = client
        self._k = keys
        self._retention = int(retention)

    async def load(self, event_id: str) -> tuple[StoredEvent | None, set[str]]:
        """The event record and the subscribers it was already delivered to."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.get(self._k.event(event_id))
            pipe.hkeys(self._k.done(event_id))
            raw, done = await pipe.execute()
        event = _decode_event(raw) if raw else None
        return event, {d.decode() for d in done}

    async def lease(self, leases: dict[bytes, int]) -> None:
        """Add the next-attempt messages (``{message: due_ms}``) before attempts start."""
        if leases:
            await self._r.zadd(self._k.schedule, leases)

    async def succeeded(self, event_id: str, sub: str, lease: bytes, record: Attempt) -> None:
        done = self._k.done(event_id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(done, sub, int(record.at * 1000))
            pipe.expire(done, self._retention)
            pipe.zrem(self._k.schedule, lease)
            self._log(pipe, event_id, sub, record)
            await pipe.execute()

    async def retry_at(self, event_id: str, sub: str, lease: bytes, due_ms: int,
                       record: Attempt) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.zadd(self._k.schedule, {lease: due_ms}, xx=True)
            pipe.expire(self._k.event(event_id), self._retention)
            self._log(pipe, event_id, sub, record)
            await pipe.execute()

    async def dead_letter(self, event: StoredEvent, sub: str, lease: bytes | None,
                          record: Attempt | None, reason: str) -> None:
        log_key = self._k.log(event.event_id, sub)
        async with self._r.pipeline(transaction=True) as pipe:
            if record is not None:
                self._log(pipe, event.event_id, sub, record)
            pipe.lrange(log_key, 0, -1)
            results = await pipe.execute()
        attempts = [_decode_attempts(a) for a in reversed(results[-1])]
        letter = DeadLetter(event.event_id, sub, reason, time.time(), attempts, event)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self._k.dlq, Keys.dlq_field(event.event_id, sub), _encode(letter))
            if lease is not None:
                pipe.zrem(self._k.schedule, lease)
            await pipe.execute()

    def _log(self, pipe: aioredis.client.Pipeline, event_id: str, sub: str,
             record: Attempt) -> None:
        key = self._k.log(event_id, sub)
        pipe.lpush(key, _encode(record))
        pipe.ltrim(key, 0, LOG_LENGTH - 1)
        pipe.expire(key, self._retention)
