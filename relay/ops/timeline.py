"""One event's story, finding events, and sending one again: for the admin API and the CLI.

Everything is read from what the ingress and workers wrote (relay/keys.py): the record
``event:{id}``, the delivery record ``deliveries:{id}`` (subscriber -> ``d``elivered /
``r``etry due / ``h``eld / ``x`` dead, with a time), the attempt logs ``log:{id}:{sub}``, the
time index ``events`` and the order index ``order:{number}``. Each call reads a bounded
amount: one event's keys, or one page of an index (at most ``SCAN_LIMIT`` events examined).
"""

from __future__ import annotations

from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay import clock
from relay.batching import Script
from relay.config import Config
from relay.connections import as_bytes, text
from relay.health import public_state
from relay.keys import RECORD_MARK, Keys
from relay.models import Attempt, DeadLetter, StoredEvent
from relay.ops.ordered import waiting_for
from relay.ops.status import Status
from relay.ordering import FUNCTIONS, ORDER_KEY, event_keys
from relay.queue import deliver_message
from relay.routing import Router
from relay.timefmt import iso

#: Most events one listing examines when filtering by subscriber or state.
SCAN_LIMIT = 2000
#: Most events an order's page lists (oldest first).
ORDER_LIMIT = 500
_decode_event = msgspec.msgpack.Decoder(StoredEvent).decode
_decode_attempt = msgspec.msgpack.Decoder(Attempt).decode
_decode_letter = msgspec.msgpack.Decoder(DeadLetter).decode
_json = msgspec.json.Decoder()

# KEYS: deliveries, queue, unclaimed, then per subscriber: letter, dead index, pending.
# ARGV: event id, redeliver-at ms, now ms, key prefix, retention s, then per subscriber: its
# name, its message (a fresh first attempt), its ordering keys ('\n'-joined; '' if none).
# Sending again means: forget that it was delivered (or dead), queue one fresh first attempt
# for those subscribers, noted in unclaimed like every queued message. An ordered subscriber's
# resend joins the end of its keys' lists (relay/ordering.py) and waits there unless first;
# one still queued there is left as it is (it is on its way). Returns how many were queued.
RESEND = Script(FUNCTIONS + """
local id, p, now, ret = ARGV[1], ARGV[4], ARGV[3], ARGV[5]
local queued = 0
for i = 0, (#ARGV - 5) / 3 - 1 do
  local sub, message, okeys = ARGV[6 + 3 * i], ARGV[7 + 3 * i], ARGV[8 + 3 * i]
  if not ord_queued(p, sub, id) then
    redis.call('DEL', KEYS[3 + i * 3 + 1])
    redis.call('ZREM', KEYS[3 + i * 3 + 2], id)
    redis.call('ZADD', KEYS[3 + i * 3 + 3], 'NX', now, id)
    local go = true
    if okeys ~= '' then
      local keys = {}
      for key in string.gmatch(okeys, '[^\\n]+') do keys[#keys + 1] = key end
      go = ord_join(p, sub, id, keys, now)
    end
    if go then
      redis.call('HDEL', KEYS[1], sub)
      redis.call('LPUSH', KEYS[2], message)
      redis.call('ZADD', KEYS[3], ARGV[2], message)
    else
      redis.call('HSET', KEYS[1], sub, 'w' .. now)
      redis.call('EXPIRE', KEYS[1], ret)
    end
    queued = queued + 1
    -- What the new attempts will write to without refreshing its expiry (an outcome sets
    -- it only on what it creates, or on a failure) starts its retention again now.
    redis.call('EXPIRE', p .. 'log:' .. id .. ':' .. sub, ret)
  end
end
if queued > 0 then
  redis.call('EXPIRE', KEYS[1], ret)
  redis.call('EXPIRE', p .. 'event:' .. id, ret)
end
return queued
""")


class NotFound(LookupError):
    pass


def _position(cursor: str) -> tuple[float, str]:
    """(time ms, event ID) from a listing's cursor; ValueError if it is not one."""
    at, sep, event_id = cursor.partition(":")
    try:
        if not sep or not event_id:
            raise ValueError(cursor)
        return float(at), event_id
    except ValueError:
        raise ValueError(f"not a cursor of this listing: {cursor[:60]!r}") from None


def delivery_state(value: bytes | None, held_state: str | None, has_attempts: bool
                   ) -> tuple[str, float | None]:
    """(state, next attempt at) of one (event, subscriber) from its delivery record."""
    kind = value[:1] if value else b""
    at = float(value[1:]) / 1000 if value and len(value) > 1 else None
    if kind == b"d":
        return "delivered", None
    if kind == b"x":
        return "dead", None
    if kind == b"w":  # ordered, behind another event of its key (relay/ordering.py)
        return "waiting", None
    if held_state in ("paused", "disabled"):
        return "paused", None
    if kind == b"r":
        return "retrying", at
    if kind == b"h" or has_attempts:
        return "retrying", None
    return "pending", None


def _headers(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Header pairs as a JSON object; a name sent more than once has its values joined with
    ", " (as HTTP allows)."""
    out: dict[str, str] = {}
    for name, value in pairs:
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def attempt_json(a: Attempt) -> dict[str, Any]:
    """One attempt as the admin API shows it (docs/admin-api.md)."""
    return {
        "attempt": a.attempt, "at": iso(a.at), "status": a.status, "error": a.error,
        "latencyMs": a.latency_ms, "probe": a.probe, "trigger": a.cause,
        "request": ({"url": a.request.url, "headers": _headers(a.request.headers)}
                    if a.request else None),
        "response": ({"status": a.response.status, "headers": _headers(a.response.headers),
                      "body": a.response.body, "truncated": a.response.truncated}
                     if a.response else None),
    }


class Events:
    def __init__(self, client: aioredis.Redis, config: Config) -> None:
        self._r = client
        self._config = config
        self._k = Keys.of(config)
        self._router = Router(config.subscribers)

    # -- one event ---------------------------------------------------------------------------

    async def detail(self, event_id: str) -> dict[str, Any]:
        k = self._k
        raw, record = await self._pipe([("get", k.event(event_id)),
                                        ("hgetall", k.deliveries(event_id))])
        if raw is None and not record:
            raise NotFound(f"no event {event_id!r} (never received, or expired)")
        event = _decode_event(raw) if raw else None
        names = self._subscribers_of(event, record)
        results = await self._pipe([cmd for name in names for cmd in (
            ("lrange", k.log(event_id, name), 0, -1), ("get", k.letter(name, event_id)),
            ("hgetall", k.health(name)))])
        deliveries = []
        for i, name in enumerate(names):
            log, letter, health = results[3 * i: 3 * i + 3]
            attempts = [_decode_attempt(a) for a in reversed(log)]
            state, next_at = delivery_state(record.get(name.encode()), public_state(health),
                                            bool(attempts))
            deliveries.append({
                "subscriber": name,
                "configured": self._config.subscriber(name) is not None,
                "state": state,
                "waitingFor": (await waiting_for(self._r, k, event_id, name)
                               if state == "waiting" else None),
                "nextAttemptAt": iso(next_at) if state == "retrying" else None,
                "deadReason": _decode_letter(letter).reason if letter else None,
                "attempts": [attempt_json(a) for a in attempts],
            })
        return {
            "eventId": event_id,
            "topic": event.topic if event else None,
            "eventTypes": list(event.event_types) if event else [],
            "orderNumbers": list(event.order_numbers) if event else [],
            "receivedAt": iso(event.received_at) if event else None,
            "body": _json.decode(event.body) if event else None,
            "bodyExpired": event is None,
            "deliveries": deliveries,
        }

    def _subscribers_of(self, event: StoredEvent | None, record: dict[bytes, bytes]
                        ) -> list[str]:
        """Every subscriber the event is for: those it matches now, and those with a
        delivery record (even if no longer configured, or the filters changed)."""
        names = [s.name for s in self._router.route(event)] if event else []
        names += [n.decode() for n in record
                  if n != RECORD_MARK and n.decode() not in names]
        return names

    async def resend(self, event_id: str, subscriber: str | None = None) -> int:
        """Deliver a stored event again (to ``subscriber``, or to every matching one) with a
        fresh first attempt, even if it was delivered before. How many subscribers."""
        k = self._k
        raw = await self._r.get(k.event(event_id))
        if raw is None:
            raise NotFound(f"no stored event {event_id!r} (never received, or expired)")
        if subscriber is not None:
            if self._config.subscriber(subscriber) is None:
                raise NotFound(f"subscriber {subscriber!r} is not configured")
            names = [subscriber]
        else:
            names = [s.name for s in self._router.route(_decode_event(as_bytes(raw)))]
        if not names:
            return 0
        event = _decode_event(as_bytes(raw))
        now = clock.now()
        keys = [k.deliveries(event_id), k.queue, k.unclaimed]
        args: list[Any] = [event_id, int((now + self._config.worker.visibility_timeout) * 1000),
                           int(now * 1000), k.prefix, max(1, int(self._config.redis.retention))]
        for name in names:
            keys += [k.letter(name, event_id), k.dead(name), k.pending(name)]
            sub = self._config.subscriber(name)
            ordered = (event_keys(sub.ordering, event)
                       if sub is not None and sub.ordering is not None else ())
            args += [name, deliver_message(k.queue, event_id, [name], 1, trigger="resend"),
                     "\n".join(ordered)]
        return int(await self._r.eval(RESEND.text, len(keys), *keys, *args))

    # -- many events -------------------------------------------------------------------------

    async def find(self, *, subscriber: str | None = None, state: str | None = None,
                   order: str | None = None, since: float | None = None,
                   until: float | None = None, limit: int = 50, cursor: str | None = None
                   ) -> tuple[list[dict[str, Any]], str | None]:
        """Event summaries, newest first, and the cursor of the next page (or None).

        The cursor is the place of the last event examined (its time and ID), not an offset:
        events arriving, or expiring from the index, between two pages move no event from one
        page to the other."""
        index = self._k.order(order) if order else self._k.events
        if state == "dead" and subscriber and not order:
            index = self._k.dead(subscriber)
        wanted = subscriber is not None or state is not None
        chunk = SCAN_LIMIT if wanted else limit
        low = since * 1000 if since is not None else "-inf"
        top: float | str = until * 1000 if until is not None else "+inf"
        entries: list[tuple[str, float]] = []
        if cursor:
            at, last = _position(cursor)
            # Events at the very same millisecond as the last one: Redis lists them by ID,
            # descending; those after it in that order are still to come.
            ties = await self._scored(index, at, at)
            entries = [(m, score) for m, score in ties if m.encode() < last.encode()]
            top = f"({at:.0f}"
        rest = await self._scored(index, top, low, num=chunk)
        candidates = entries + rest
        entries = candidates[:chunk]
        summaries = []
        examined = 0
        found = await self.summaries([event_id for event_id, _ in entries])
        for summary in found:
            examined += 1
            if summary is None:
                continue
            states = summary["states"]
            if subscriber and subscriber not in states:
                continue
            if state and not ((states.get(subscriber) == state) if subscriber
                              else state in states.values()):
                continue
            summaries.append(summary)
            if len(summaries) == limit:
                break
        more = examined < len(candidates) or len(rest) == chunk
        next_cursor = None
        if more and examined:
            event_id, score = entries[examined - 1]
            next_cursor = f"{score:.0f}:{event_id}"
        return summaries, next_cursor

    async def order(self, number: str) -> dict[str, Any]:
        """Every event of one Ingram order, oldest first (at most ORDER_LIMIT), with each
        subscriber's delivery state: the order's whole story, from its index."""
        ids = [text(m) for m in await self._r.zrange(self._k.order(number), 0, ORDER_LIMIT)]
        found = [s for s in await self.summaries(ids[:ORDER_LIMIT]) if s is not None]
        if not found:
            raise NotFound(f"no event for order {number!r} (never received, or expired)")
        return {
            "orderNumber": number,
            "events": [{"eventId": s["eventId"], "receivedAt": s["receivedAt"],
                        "topic": s["topic"], "eventTypes": s["eventTypes"],
                        "states": s["states"]} for s in found],
            "more": len(ids) > ORDER_LIMIT,
            "ordering": await self.order_waits(number),
        }

    async def order_waits(self, number: str) -> list[dict[str, Any]]:
        """Per subscriber ordered by order, where this order's events wait and why: its head
        event, ``retrying`` | ``blocked`` | ``paused`` | ``open``, since when, how many wait
        (relay/ordering.py). Empty when nothing of the order is held back."""
        status = Status(self._r, self._config)
        out = []
        for sub in self._config.subscribers:
            if sub.ordering is not None and sub.ordering.by == "order":
                for row in await status.holding(sub.name, only=[ORDER_KEY + number]):
                    out.append({"subscriber": sub.name, **row})
        return out

    async def summary(self, event_id: str) -> dict[str, Any] | None:
        return (await self.summaries([event_id]))[0]

    async def summaries(self, event_ids: list[str]) -> list[dict[str, Any] | None]:
        """Each event's summary (None for one the hub no longer holds), in one round trip."""
        k = self._k
        names = [s.name for s in self._config.subscribers]
        # Each subscriber's health once (paused or disabled: its pending deliveries are
        # "paused"), then each event's two keys: one round trip.
        results = await self._pipe([("hgetall", k.health(n)) for n in names] + [
            cmd for event_id in event_ids for cmd in (
                ("get", k.event(event_id)), ("hgetall", k.deliveries(event_id)))])
        held = {n: public_state(h) for n, h in zip(names, results, strict=False)}
        results = results[len(names):]
        out: list[dict[str, Any] | None] = []
        for event_id, raw, record in zip(event_ids, results[0::2], results[1::2], strict=True):
            if raw is None and not record:
                out.append(None)
                continue
            event = _decode_event(raw) if raw else None
            states = {}
            for name in self._subscribers_of(event, record):
                states[name] = delivery_state(record.get(name.encode()), held.get(name),
                                              False)[0]
            out.append({"eventId": event_id,
                        "topic": event.topic if event else None,
                        "eventTypes": list(event.event_types) if event else [],
                        "orderNumbers": list(event.order_numbers) if event else [],
                        "receivedAt": iso(event.received_at) if event else None,
                        "states": states})
        return out

    async def _scored(self, index: str, top: float | str, low: float | str,
                      num: int | None = None) -> list[tuple[str, float]]:
        """(member, score) of ``index`` from ``top`` down to ``low`` (the first ``num``)."""
        found: Any = await self._r.zrevrangebyscore(
            index, top, low, start=0 if num is not None else None, num=num, withscores=True)
        return [(text(m), float(score)) for m, score in found]

    async def _pipe(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async with self._r.pipeline(transaction=False) as pipe:
            for name, *args in commands:
                getattr(pipe, name)(*args)
            return list(await pipe.execute())
