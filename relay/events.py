"""One event's story, finding events, and sending one again: for the admin API and the CLI.

Everything is read from what the ingress and workers wrote (relay/keys.py): the record
``event:{id}``, the delivery record ``deliveries:{id}`` (subscriber -> ``d``elivered /
``r``etry due / ``h``eld / ``x`` dead, with a time), the attempt logs ``log:{id}:{sub}``, the
time index ``events`` and the order index ``order:{number}``. Each call reads a bounded
amount: one event's keys, or one page of an index (at most ``SCAN_LIMIT`` events examined).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay.batching import Script
from relay.config import Config
from relay.connections import as_bytes, text
from relay.health import public_state
from relay.keys import Keys
from relay.models import Attempt, DeadLetter, StoredEvent
from relay.queue import deliver_message
from relay.routing import Router
from relay.timefmt import iso

#: Most events one listing examines when filtering by subscriber or state.
SCAN_LIMIT = 2000
_decode_event = msgspec.msgpack.Decoder(StoredEvent).decode
_decode_attempt = msgspec.msgpack.Decoder(Attempt).decode
_decode_letter = msgspec.msgpack.Decoder(DeadLetter).decode
_json = msgspec.json.Decoder()

# KEYS: deliveries, queue, unclaimed, then per subscriber: letter, dead index, pending.
# ARGV: event id, message, redeliver-at ms, now ms, then the subscribers.
# Sending again means: forget that it was delivered (or dead), queue one fresh first attempt
# for those subscribers, noted in unclaimed like every queued message.
RESEND = Script("""
local n = #ARGV - 4
for i = 1, n do
  local sub = ARGV[4 + i]
  redis.call('HDEL', KEYS[1], sub)
  redis.call('DEL', KEYS[3 + (i - 1) * 3 + 1])
  redis.call('ZREM', KEYS[3 + (i - 1) * 3 + 2], ARGV[1])
  redis.call('ZADD', KEYS[3 + (i - 1) * 3 + 3], 'NX', ARGV[4], ARGV[1])
end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return n
""")


class NotFound(LookupError):
    pass


def delivery_state(value: bytes | None, held_state: str | None, has_attempts: bool
                   ) -> tuple[str, float | None]:
    """(state, next attempt at) of one (event, subscriber) from its delivery record."""
    kind = value[:1] if value else b""
    at = float(value[1:]) / 1000 if value and len(value) > 1 else None
    if kind == b"d":
        return "delivered", None
    if kind == b"x":
        return "dead", None
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
        names += [n.decode() for n in record if n.decode() not in names]
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
        message = deliver_message(k.queue, event_id, names, 1, trigger="resend")
        now = time.time()
        keys = [k.deliveries(event_id), k.queue, k.unclaimed]
        for name in names:
            keys += [k.letter(name, event_id), k.dead(name), k.pending(name)]
        args: list[Any] = [
            event_id, message, int((now + self._config.worker.visibility_timeout) * 1000),
                int(now * 1000), *names]
        return int(await self._r.eval(RESEND.text, len(keys), *keys, *args))

    # -- many events -------------------------------------------------------------------------

    async def find(self, *, subscriber: str | None = None, state: str | None = None,
                   order: str | None = None, since: float | None = None,
                   until: float | None = None, limit: int = 50, cursor: str | None = None
                   ) -> tuple[list[dict[str, Any]], str | None]:
        """Event summaries, newest first, and the cursor of the next page (or None)."""
        # The page's upper bound is fixed at the first page (now, unless ``until``), so events
        # arriving between pages do not shift the offsets of the next page.
        top: float = until * 1000 if until is not None else time.time() * 1000
        if cursor:
            top_text, _, offset_text = cursor.partition(":")
            top, offset = float(top_text), int(offset_text)
        else:
            offset = 0
        low = since * 1000 if since is not None else "-inf"
        index = self._k.order(order) if order else self._k.events
        if state == "dead" and subscriber and not order:
            index = self._k.dead(subscriber)
        wanted = subscriber is not None or state is not None
        chunk = SCAN_LIMIT if wanted else limit
        ids = [text(m) for m in await self._r.zrevrangebyscore(
            index, top, low, start=offset, num=chunk)]
        summaries = []
        examined = 0
        for event_id in ids:
            examined += 1
            summary = await self.summary(event_id)
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
        more = examined < len(ids) or len(ids) == chunk
        next_cursor = f"{top:.0f}:{offset + examined}" if more else None
        return summaries, next_cursor

    async def summary(self, event_id: str) -> dict[str, Any] | None:
        k = self._k
        raw, record = await self._pipe([("get", k.event(event_id)),
                                        ("hgetall", k.deliveries(event_id))])
        if raw is None and not record:
            return None
        event = _decode_event(raw) if raw else None
        states = {}
        for name in self._subscribers_of(event, record):
            states[name] = delivery_state(record.get(name.encode()), None, False)[0]
        return {"eventId": event_id,
                "topic": event.topic if event else None,
                "eventTypes": list(event.event_types) if event else [],
                "orderNumbers": list(event.order_numbers) if event else [],
                "receivedAt": iso(event.received_at) if event else None,
                "states": states}

    async def _pipe(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async with self._r.pipeline(transaction=False) as pipe:
            for name, *args in commands:
                getattr(pipe, name)(*args)
            return list(await pipe.execute())
