"""Dead letters: list them, replay them with fresh attempts, purge them.

Used by the CLI (``relay dlq ...``) and the admin API alike, reading what the workers wrote
(relay/keys.py): ``letter:{sub}:{id}`` (reason, time, a copy of the event) indexed by
``dead:{sub}``, with the attempt history in ``log:{id}:{sub}``. All three expire with
``redis.retention``; an index entry whose letter has expired is dropped when seen.
"""

from __future__ import annotations

from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay import clock
from relay.batching import Script
from relay.config import Config
from relay.connections import as_bytes, text
from relay.keys import Keys
from relay.models import Attempt, DeadLetter
from relay.ordering import FUNCTIONS, event_keys
from relay.queue import deliver_message

_decode_letter = msgspec.msgpack.Decoder(DeadLetter).decode
_decode_attempt = msgspec.msgpack.Decoder(Attempt).decode
_encode = msgspec.msgpack.Encoder().encode

# KEYS: letter, dead index, event, deliveries, queue, unclaimed, pending.
# ARGV: event id, subscriber, event record copy ('' if none), retention s, message,
# redeliver-at ms, now ms, key prefix, the event's ordering keys for the subscriber now
# (``\n``-joined; '' when it is not ordered). Returns 1 replayed, 0 letter gone, -1 no event
# body to deliver.
# One atomic step: the letter disappears exactly when its event record is restored and a
# fresh first attempt is queued (and noted in unclaimed, like every queued message), so a
# crash can neither lose nor double it. The attempt log stays: the history of what failed.
# Ordered (relay/ordering.py): a letter that blocks its keys goes first again; any other
# joins the end of its keys' lists, and waits there unless it is first.
REPLAY = Script(FUNCTIONS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4], 'NX')
elseif redis.call('EXISTS', KEYS[3]) == 0 then
  return -1
end
local p, id, sub, now = ARGV[8], ARGV[1], ARGV[2], ARGV[7]
local go = true
if ord_queued(p, sub, id) then
  ord_unblock(p, sub, id, now)
elseif ARGV[9] ~= '' then
  local keys = {}
  for key in string.gmatch(ARGV[9], '[^\\n]+') do keys[#keys + 1] = key end
  if ord_join(p, sub, id, keys, now) == false then
    go = false
    redis.call('HSET', KEYS[4], sub, 'w' .. now)
    redis.call('EXPIRE', KEYS[4], ARGV[4])
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], id)
if go then
  redis.call('HDEL', KEYS[4], sub)
  redis.call('LPUSH', KEYS[5], ARGV[5])
  redis.call('ZADD', KEYS[6], ARGV[6], ARGV[5])
end
redis.call('ZADD', KEYS[7], 'NX', now, id)
-- What the new attempts will write to without refreshing its expiry (an outcome sets it
-- only on what it creates, or on a failure) starts its retention again now.
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[4])
redis.call('EXPIRE', p .. 'log:' .. id .. ':' .. sub, ARGV[4])
return 1
""")

# KEYS: letter, dead index. ARGV: event id, subscriber, key prefix, now ms, retention s.
# A letter that blocks its ordered keys leaves them with it: the next event goes.
PURGE = Script(FUNCTIONS + """
local p, id, sub = ARGV[3], ARGV[1], ARGV[2]
redis.call('ZREM', KEYS[2], id)
local deleted = redis.call('DEL', KEYS[1])
if deleted == 1 and ord_queued(p, sub, id) then
  ord_advance(p, sub, id, ARGV[4], ARGV[5], {})
end
return deleted
""")


class UnknownSubscriber(ValueError):
    """A subscriber named in a filter is not in the config."""


class Filters(msgspec.Struct, frozen=True):
    subscriber: str | None = None
    event: str | None = None
    since: float | None = None     # unix seconds
    until: float | None = None


class Letter(msgspec.Struct, frozen=True):
    """A dead letter as listed: the letter, its attempt history, whether its subscriber is
    still configured."""

    letter: DeadLetter
    attempts: list[Attempt]
    configured: bool

    @property
    def last_error(self) -> str:
        return self.attempts[-1].describe() if self.attempts else self.letter.reason


def _key(entry: tuple[float, str, str]) -> tuple[int, str, str]:
    """An index entry's place in the newest-first order, with the time in whole ms."""
    return (round(entry[0] * 1000), entry[1], entry[2])


def _cursor(entry: tuple[float, str, str]) -> str:
    at, name, event_id = _key(entry)
    return f"{at}|{name}|{event_id}"  # a subscriber name has no "|"; an eventId may, last


def _position(cursor: str) -> tuple[int, str, str]:
    at, _, rest = cursor.partition("|")
    name, sep, event_id = rest.partition("|")
    try:
        if not sep:
            raise ValueError(cursor)
        return (int(at), name, event_id)
    except ValueError:
        raise ValueError(f"not a replay position: {cursor[:60]!r}") from None


class DeadLetters:
    def __init__(self, client: aioredis.Redis, config: Config) -> None:
        self._r = client
        self._config = config
        self._k = Keys.of(config)

    def check(self, filters: Filters) -> None:
        """Refuse a subscriber filter naming no configured subscriber (nothing changes)."""
        if filters.subscriber and self._config.subscriber(filters.subscriber) is None:
            raise UnknownSubscriber(f"subscriber {filters.subscriber!r} is not configured")

    async def subscribers(self) -> list[str]:
        """Every subscriber with dead letters (configured or not)."""
        names = {text(n) for n in await self._r.smembers(self._k.dead_subscribers)}
        return sorted(names)

    async def _index(self, filters: Filters) -> list[tuple[float, str, str]]:
        """(dead at, subscriber, event id) of the letters matching ``filters``, newest first."""
        now = clock.now()
        names = [filters.subscriber] if filters.subscriber else await self.subscribers()
        low = "-inf" if filters.since is None else filters.since * 1000
        high = "+inf" if filters.until is None else filters.until * 1000
        found: list[tuple[float, str, str]] = []
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zremrangebyscore(self._k.dead(name), "-inf",
                                      (now - self._config.redis.retention) * 1000)
                pipe.zrangebyscore(self._k.dead(name), low, high, withscores=True)
            results = await pipe.execute()
        for name, entries in zip(names, results[1::2], strict=True):
            for member, score in entries:
                event_id = member.decode()
                if filters.event is None or event_id == filters.event:
                    found.append((score / 1000, name, event_id))
        found.sort(reverse=True)
        return found

    async def count(self, filters: Filters) -> int:
        return len(await self._index(filters))

    async def counts(self) -> dict[str, int]:
        """Dead letters held now, per subscriber."""
        return {name: len(await self._index(Filters(subscriber=name)))
                for name in await self.subscribers()}

    async def list(self, filters: Filters, limit: int = 100, offset: int = 0) -> list[Letter]:
        index = (await self._index(filters))[offset:offset + limit]
        async with self._r.pipeline(transaction=False) as pipe:
            for _, name, event_id in index:
                pipe.get(self._k.letter(name, event_id))
                pipe.lrange(self._k.log(event_id, name), 0, -1)
            results = await pipe.execute()
        letters = []
        for (_, name, event_id), letter, log in zip(index, results[0::2], results[1::2],
                                                    strict=True):
            if letter is None:  # expired meanwhile
                await self._r.zrem(self._k.dead(name), event_id)
                continue
            letters.append(Letter(_decode_letter(letter),
                                  [_decode_attempt(a) for a in reversed(log)],
                                  self._config.subscriber(name) is not None))
        return letters

    async def replay(self, filters: Filters, dry_run: bool = False,
                     limit: int | None = None, after: str | None = None) -> dict[str, Any]:
        """Queue matching dead letters again as fresh first attempts.

        Only letters of subscribers still configured are replayed (the others would only be
        dead-lettered again as "subscriber removed"); they are counted as ``skipped``. A
        letter whose event is gone (its record expired and the letter holds no copy) cannot
        be replayed: it stays, counted as ``failed``.

        With ``limit``, at most that many letters are tried, newest first, past ``after``
        (the ``next`` of the call before): a client replays a large set in steps and passes
        every letter once, whatever some of them do. ``remaining``: replayable letters past
        this step; ``next``: where the next step starts (None when none remain).
        """
        self.check(filters)
        index = await self._index(filters)
        if after:
            mark = _position(after)
            index = [e for e in index if _key(e) < mark]
        replayable = [e for e in index if self._config.subscriber(e[1]) is not None]
        result: dict[str, Any] = {
            "matched": len(index), "replayed": 0, "failed": 0,
            "skipped": len(index) - len(replayable), "remaining": len(replayable),
            "next": None}
        if dry_run:
            return result
        chosen = replayable if limit is None else replayable[:limit]
        for _, name, event_id in chosen:
            done = await self._replay_one(name, event_id)
            result["replayed"] += int(done == 1)
            result["failed"] += int(done == -1)
        result["remaining"] = len(replayable) - len(chosen)
        if result["remaining"] and chosen:
            result["next"] = _cursor(chosen[-1])
        return result

    async def _replay_one(self, name: str, event_id: str) -> int:
        k, config = self._k, self._config
        reply = await self._r.get(k.letter(name, event_id))
        if reply is None:
            return 0
        letter = _decode_letter(as_bytes(reply))
        message = deliver_message(k.queue, event_id, [name], 1, trigger="replay")
        now = clock.now()
        keys = [k.letter(name, event_id), k.dead(name), k.event(event_id),
                k.deliveries(event_id), k.queue, k.unclaimed, k.pending(name)]
        sub = config.subscriber(name)
        ordered = (event_keys(sub.ordering, letter.event)
                   if sub is not None and sub.ordering is not None and letter.event else ())
        args: list[Any] = [event_id, name, _encode(letter.event) if letter.event else b"",
                           max(1, int(config.redis.retention)), message,
                           int((now + config.worker.visibility_timeout) * 1000), int(now * 1000),
                           k.prefix, "\n".join(ordered)]
        return int(await self._r.eval(REPLAY.text, len(keys), *keys, *args))

    async def purge(self, filters: Filters, dry_run: bool = False) -> dict[str, int]:
        """Delete matching dead letters (a subscriber filter may name a removed one)."""
        index = await self._index(filters)
        result = {"matched": len(index), "deleted": 0}
        if dry_run:
            return result
        retention = max(1, int(self._config.redis.retention))
        for _, name, event_id in index:
            keys = [self._k.letter(name, event_id), self._k.dead(name)]
            result["deleted"] += int(await self._r.eval(
                PURGE.text, 2, *keys, event_id, name, self._k.prefix, clock.now_ms(),
                retention))
        return result
