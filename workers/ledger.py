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
from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay.batching import GroupCommit, Script
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


# One script per outcome: the work is the same inside Redis, but the worker packs, sends and
# parses one command instead of six (Redis client work was ~30 % of a worker's CPU at fan-out
# 10, docs/benchmarks.md). Order within each still makes any prefix harmless.
# ARGV[1] retention seconds and ARGV[2] attempt-log length in both.
# SUCCEEDED: KEYS done hash, attempt log, schedule; ARGV[3..6] subscriber, done at ms, record, lease
SUCCEEDED = Script("""
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[5])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[6])
""")
# RETRY_AT: KEYS event record, attempt log, schedule; ARGV[3..5] due ms, record, lease
RETRY_AT = Script("""
redis.call('LPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], 'XX', ARGV[3], ARGV[5])
""")

_encode = msgspec.msgpack.Encoder().encode


def _scored(members: dict[bytes, int]) -> list[Any]:
    """``{member: score}`` as ZADD's ``score member ...`` arguments."""
    return [x for member, score in members.items() for x in (score, member)]
_decode_event = msgspec.msgpack.Decoder(StoredEvent).decode
_decode_attempts = msgspec.msgpack.Decoder(Attempt).decode
decode_dead_letter = msgspec.msgpack.Decoder(DeadLetter).decode


def now_ms() -> int:
    return int(time.time() * 1000)


class Ledger:
    """Worker-side writes. Outcome writes of concurrent deliveries share round trips
    (``GroupCommit``); each outcome's commands are ordered so that any prefix of them, left by a
    Redis that died mid-pipeline, is harmless: the done marker is set before the lease is
    removed, and a lease is only ever removed last."""

    def __init__(self, client: aioredis.Redis, keys: Keys, retention: float) -> None:
        self._r = client
        self._k = keys
        self._retention = int(retention)
        self._batch = GroupCommit(client, timeout=10.0)

    async def _run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        results = await self._batch.execute(commands)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def load(self, event_ids: list[str], with_seen: bool = False
                   ) -> list[tuple[StoredEvent | None, set[str], str | None]]:
        """Per event: its record, the subscribers it was already delivered to, and (when
        asked) the token of the batch that stored it, in one round trip."""
        step = 3 if with_seen else 2
        commands: list[tuple[Any, ...]] = []
        for event_id in event_ids:
            commands += [("GET", self._k.event(event_id)), ("HKEYS", self._k.done(event_id))]
            if with_seen:
                commands.append(("GET", self._k.seen(event_id)))
        results = await self._run(commands)
        loaded = []
        for i in range(0, len(results), step):
            raw, done = results[i], results[i + 1]
            seen = results[i + 2].decode() if with_seen and results[i + 2] else None
            loaded.append((_decode_event(raw) if raw else None, {d.decode() for d in done}, seen))
        return loaded

    async def lease(self, leases: dict[bytes, int], taken: bytes | None = None) -> None:
        """Add the next-attempt messages (``{message: due_ms}``) before attempts start, then
        drop ``taken`` (the message of the task doing this) from ``unclaimed``."""
        commands: list[tuple[Any, ...]] = []
        if leases:
            commands.append(("ZADD", self._k.schedule, *_scored(leases)))
        if taken is not None:
            commands.append(("ZREM", self._k.unclaimed, taken))
        if commands:
            await self._run(commands)

    async def renew(self, leases: dict[bytes, int]) -> None:
        """Re-score held leases (``{message: due_ms}``); one already removed (its attempt
        ended) or moved to the queue stays so (``XX``)."""
        await self._run([("ZADD", self._k.schedule, "XX", *_scored(leases))])

    async def succeeded(self, event_id: str, sub: str, lease: bytes, record: Attempt) -> None:
        await self._script(SUCCEEDED, (self._k.done(event_id), self._k.log(event_id, sub),
                                       self._k.schedule),
                           (sub, int(record.at * 1000), _encode(record), lease))

    async def retry_at(self, event_id: str, sub: str, lease: bytes, due_ms: int,
                       record: Attempt) -> None:
        await self._script(RETRY_AT, (self._k.event(event_id), self._k.log(event_id, sub),
                                      self._k.schedule),
                           (due_ms, _encode(record), lease))

    async def _script(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...]
                      ) -> Any:
        result = await self._batch.script(script, keys, (self._retention, LOG_LENGTH, *args))
        if isinstance(result, Exception):
            raise result
        return result

    async def dead_letter(self, event: StoredEvent, sub: str, lease: bytes | None,
                          record: Attempt | None, reason: str) -> None:
        log_key = self._k.log(event.event_id, sub)
        logged = self._log(event.event_id, sub, record) if record is not None else []
        results = await self._run([*logged, ("LRANGE", log_key, 0, -1)])
        attempts = [_decode_attempts(a) for a in reversed(results[-1])]
        letter = DeadLetter(event.event_id, sub, reason, time.time(), attempts, event)
        commands: list[tuple[Any, ...]] = [
            ("HSET", self._k.dlq, Keys.dlq_field(event.event_id, sub), _encode(letter))]
        if lease is not None:
            commands.append(("ZREM", self._k.schedule, lease))
        await self._run(commands)

    def _log(self, event_id: str, sub: str, record: Attempt) -> list[tuple[Any, ...]]:
        key = self._k.log(event_id, sub)
        return [("LPUSH", key, _encode(record)), ("LTRIM", key, 0, LOG_LENGTH - 1),
                ("EXPIRE", key, self._retention)]
