"""Hub health at a glance: subscribers, the overview strip, per-minute series, metrics.

Read from the counters (relay/counters.py), the health hashes (relay/health.py), the pending
and dead letter indexes and the heartbeats, all bounded: the last hour is 60 per-minute
hashes, whatever the traffic.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError, RedisError

from relay import clock
from relay.config import Config, Subscriber
from relay.connections import text
from relay.counters import LATENCY_BUCKETS_MS, quantile
from relay.health import field_ms, public_state
from relay.keys import Keys
from relay.masking import mask_url
from relay.ops import ordered
from relay.ops.deadletters import DeadLetters
from relay.timefmt import iso_ms

#: Unhealthy first: the order of the subscribers table.
_SEVERITY = {"disabled": 0, "open": 1, "half-open": 2, "paused": 3, "active": 4}
WORKER_FRESH_MS = 60_000
BACKLOG_DEGRADED_S = 60.0
#: Worker processes write what they hold (``inflight``) every second: figures older than
#: this are a stopped process's (left out), and older than the second one forgotten.
IN_FLIGHT_FRESH_MS = 5_000
IN_FLIGHT_FORGET_MS = 60_000
#: A subscriber that failed every attempt over this many minutes (the current one included)
#: makes the hub "degraded".
FAILING_MINUTES = 5


class Status:
    def __init__(self, client: aioredis.Redis, config: Config) -> None:
        self._r = client
        self._config = config
        self._k = Keys.of(config)

    async def minutes(self, count: int) -> tuple[list[int], list[dict[str, float]]]:
        """The last ``count`` minutes (oldest first): their starts (unix s) and counters."""
        now_minute = int(clock.now() // 60)
        minutes = list(range(now_minute - count + 1, now_minute + 1))
        async with self._r.pipeline(transaction=False) as pipe:
            for minute in minutes:
                pipe.hgetall(self._k.stats(minute))
            raw = await pipe.execute()
        series = [{text(k): float(v) for k, v in hash_.items()} for hash_ in raw]
        return [m * 60 for m in minutes], series

    # -- subscribers -----------------------------------------------------------------------

    async def subscribers(self) -> list[dict[str, Any]]:
        _, hour = await self.minutes(60)
        dead = await DeadLetters(self._r, self._config).counts()
        names = [s.name for s in self._config.subscribers]
        names += [n for n in dead if n not in names]
        retention_ms = self._config.redis.retention * 1000
        now = clock.now() * 1000
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._k.health(name))
                pipe.zremrangebyscore(self._k.pending(name), "-inf", now - retention_ms)
                pipe.zcard(self._k.pending(name))
                pipe.zrange(self._k.pending(name), 0, 0, withscores=True)
            pipe.hgetall(self._k.inflight)
            raw = await pipe.execute()
        held = await self._in_flight(raw.pop(), now)
        waits = await ordered.counts(self._r, self._k, names)
        rows = []
        for i, name in enumerate(names):
            health, _, pending, noted = raw[4 * i: 4 * i + 4]
            count, oldest = held.get(name, (0, None))
            if noted and (oldest is None or noted[0][1] < oldest):
                oldest = noted[0][1]
            row = self._row(name, self._config.subscriber(name), health, hour,
                            dead.get(name, 0), int(pending) + count, oldest, now)
            sub = self._config.subscriber(name)
            waiting, blocked = waits[name]
            row["ordering"] = ({"by": sub.ordering.by, "onDead": sub.ordering.on_dead,
                                "waiting": waiting, "blockedKeys": blocked}
                               if sub is not None and sub.ordering is not None else None)
            rows.append(row)
        rows.sort(key=lambda r: (_SEVERITY.get(r["state"], 9), r["name"]))
        return rows

    async def holding(self, name: str, limit: int = 100, only: list[str] | None = None
                      ) -> list[dict[str, Any]]:
        """The ordered keys of ``name`` holding events back (relay/ordering.py), oldest
        first; ``only``: just these keys. State of each head: ``blocked`` (its dead letter
        blocks the key), ``paused`` (the subscriber is paused or disabled), ``open`` (its
        breaker is open) or ``retrying``."""
        fields: Any = await self._r.hgetall(self._k.health(name))
        state = public_state(fields)

        async def head_state(event_id: str, blocked: bool) -> str:
            if blocked:
                return "blocked"
            if state in ("paused", "disabled"):
                return "paused"
            return "open" if state in ("open", "half-open") else "retrying"

        rows = await ordered.holding(self._r, self._k, name, limit, head_state, only)
        for row in rows:
            row["since"] = iso_ms(row["since"] * 1000)
        return rows

    async def subscriber(self, name: str) -> dict[str, Any]:
        return next(r for r in await self.subscribers() if r["name"] == name)

    async def _in_flight(self, fields: dict[bytes, bytes], now: float
                         ) -> dict[str, tuple[int, float]]:
        """Per subscriber, the first attempts of fan-outs that live worker processes hold
        (count, oldest received ms): pending, with no note in pending:{sub}. Each process
        writes its figures every second; those of a process silent for IN_FLIGHT_FRESH_MS are
        left out (its attempts come back when their leases fall due), and forgotten later."""
        out: dict[str, tuple[int, float]] = {}
        stale = []
        for field, value in fields.items():
            try:
                count, oldest, at = (float(x) for x in text(value).split())
            except ValueError:
                stale.append(field)
                continue
            if now - at > IN_FLIGHT_FORGET_MS:
                stale.append(field)
            if now - at > IN_FLIGHT_FRESH_MS:
                continue
            name = text(field).split("|", 1)[0]
            total, first = out.get(name, (0, oldest))
            out[name] = (total + int(count), min(first, oldest))
        if stale:
            await self._r.hdel(self._k.inflight, *stale)
        return out

    def _row(self, name: str, sub: Subscriber | None, health: dict[bytes, bytes],
             hour: list[dict[str, float]], dead: int, pending: int,
             oldest: float | None, now: float) -> dict[str, Any]:
        def total(suffix: str) -> int:
            return int(sum(m.get(f"{name}|{suffix}", 0) for m in hour))

        delivered, failed = total("d"), total("f")
        buckets = [total(f"l{i}") for i in range(len(LATENCY_BUCKETS_MS) + 1)]
        last_error = health.get(b"last_error")
        return {
            "name": name,
            "url": mask_url(sub.url) if sub else None,
            "configured": sub is not None,
            "signature": sub.signature if sub else None,
            "state": public_state(health) if sub else "disabled",
            "delivered": delivered,
            "failed": failed,
            "deadLettered": total("x"),
            "deadLetters": dead,
            "successRate": (round(delivered / (delivered + failed), 4)
                            if delivered + failed else None),
            "pending": pending,
            "oldestPendingSeconds": (round(max(0.0, now - oldest) / 1000, 1)
                                     if oldest is not None and pending else None),
            "latencyP50Ms": quantile(buckets, 0.5),
            "latencyP99Ms": quantile(buckets, 0.99),
            "lastError": last_error.decode() if last_error else None,
            "lastErrorAt": iso_ms(field_ms(health, "last_error_at")),
            "lastSuccessAt": iso_ms(field_ms(health, "last_success_at")),
            "breaker": {
                "failures": field_ms(health, "failures") or 0,
                "openUntil": iso_ms(field_ms(health, "open_until")),
                "coolDownSeconds": ((field_ms(health, "cool_down") or 0) / 1000
                                    or (float(sub.circuit_breaker.cool_down) if sub else None)),
            },
            "rateLimit": (f"{sub.rate_limit:g}/s" if sub and sub.rate_limit else None),
        }

    # -- the hub -----------------------------------------------------------------------------

    async def overview(self) -> dict[str, Any]:
        now = clock.now() * 1000
        redis_info: dict[str, Any] = {"reachable": False, "writable": False, "version": None,
                                      "role": None}
        try:
            info = await self._r.info("server")
            replication = await self._r.info("replication")
            redis_info.update(reachable=True, version=info.get("redis_version"),
                              role=replication.get("role"))
            await self._r.set(self._k.ready_probe, str(now), ex=60)
            redis_info["writable"] = True
        except ReadOnlyError:
            pass
        except (RedisError, OSError):
            return {"status": "down", "reasons": ["redis is not reachable"], "redis": redis_info,
                    "workers": [], "now": iso_ms(now)}
        if not redis_info["writable"]:
            return {"status": "down", "reasons": ["redis is not writable (a replica?)"],
                    "redis": redis_info, "workers": [], "now": iso_ms(now)}
        k = self._k
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(k.workers, now - WORKER_FRESH_MS, "+inf", withscores=True)
            pipe.llen(k.queue)
            pipe.zcard(k.schedule)
            pipe.get(k.backlog_since)
            pipe.zrange(k.schedule, 0, 0, withscores=True)
            workers, queued, scheduled, since, first = await pipe.execute()
        backlog = backlog_age(now, since, first)
        _, hour = await self.minutes(60)
        subs = await self.subscribers()
        dead = sum(s["deadLetters"] for s in subs)
        reasons = []
        if not workers:
            reasons.append("no worker seen in the last minute")
        if backlog > BACKLOG_DEGRADED_S:
            reasons.append(f"backlog is {backlog:.0f}s old")
        reasons += [f"subscriber {s['name']} is {s['state']}" for s in subs
                    if s["configured"] and s["state"] in ("open", "disabled")]
        failing = failing_all(hour[-FAILING_MINUTES:], [s["name"] for s in subs
                                                        if s["configured"]])
        reasons += [f"{name}: every attempt failed in the last {FAILING_MINUTES} min"
                    for name in failing]
        return {
            "status": "degraded" if reasons else "healthy",
            "reasons": reasons,
            "redis": redis_info,
            "workers": [{"id": text(w), "lastSeenAt": iso_ms(at)} for w, at in workers],
            "queueMessages": int(queued),
            "retriesScheduled": int(scheduled),
            "backlogOldestSeconds": round(backlog, 1),
            "acceptedLastHour": int(sum(m.get("accepted", 0) for m in hour)),
            "deliveredLastHour": sum(s["delivered"] for s in subs),
            "failedLastHour": sum(s["failed"] for s in subs),
            "deadLetters": dead,
            "failingSubscribers": failing,
            "now": iso_ms(now),
        }

    async def stats(self, minutes: int) -> dict[str, Any]:
        starts, series = await self.minutes(minutes)
        names = [s.name for s in self._config.subscribers]
        names += sorted({key.split("|", 1)[0] for m in series for key in m
                         if "|" in key} - set(names))

        def line(field: str) -> list[int]:
            return [int(m.get(field, 0)) for m in series]

        def summed(suffix: str) -> list[int]:
            return [int(sum(m.get(f"{n}|{suffix}", 0) for n in names)) for m in series]

        return {
            "minutes": minutes,
            "t": starts,
            "accepted": line("accepted"),
            "delivered": summed("d"),
            "failed": summed("f"),
            "deadLettered": summed("x"),
            "backlogAgeSeconds": [round(m.get("backlog", 0) / 1000, 1) for m in series],
            "subscribers": {n: {"delivered": line(f"{n}|d"), "failed": line(f"{n}|f"),
                                "deadLettered": line(f"{n}|x")} for n in names},
        }

    async def totals(self) -> dict[str, float]:
        return {text(k): float(v) for k, v in (await self._r.hgetall(self._k.totals)).items()}


def failing_all(minutes: list[dict[str, float]], names: list[str]) -> list[str]:
    """The subscribers that failed every attempt over ``minutes`` (per-minute counters): at
    least one failed, none delivered."""
    def total(name: str, field: str) -> float:
        return sum(m.get(f"{name}|{field}", 0) for m in minutes)

    return [n for n in names if total(n, "f") > 0 and total(n, "d") == 0]


def backlog_age(now_ms: float, since: bytes | None, first: list[tuple[bytes, float]]) -> float:
    """Seconds: how long the queue has not been empty, or how overdue the schedule is."""
    age = (now_ms - float(since)) / 1000 if since else 0.0
    if first and first[0][1] < now_ms:
        age = max(age, (now_ms - first[0][1]) / 1000)
    return max(0.0, age)
