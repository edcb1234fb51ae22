"""One attempt: admitted by the gate, signed, posted, its outcome recorded.

A post runs as a task on the process's loop, in its subscriber's lane; when it ends the lane
opens the next waiting one and, before it runs dry, pulls parked work. The outcome is one
script (workers/ledger.py), retried while Redis is away; what it changed (health transitions,
ordered events released) is acted on here: released events are claimed at once, transitions
logged and alerted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from relay import clock, tracing
from relay.config import Subscriber
from relay.models import Attempt, StoredEvent
from relay.queue import member
from workers import http
from workers.backoff import retry_delay
from workers.gate import GO
from workers.lanes import Lane
from workers.ledger import now_ms
from workers.outcomes import Recorded
from workers.parts import EngineParts
from workers.planning import _blocks

log = logging.getLogger("relay.worker")
T = TypeVar("T")

#: How long an outcome write is retried while Redis is away before the lease takes over.
PERSIST_FOR = 120.0
#: What an operator reads in the log when a subscriber's health changes.
HEALTH_NEWS = {"opened": "circuit breaker opened: attempts are held until a probe succeeds",
               "recovered": "subscriber recovered: held attempts flow again",
               "disabled": "subscriber disabled after failing too long: resume it to retry"}


class Attempts(EngineParts):
    """The engine's attempts part (workers/engine.py puts the parts together)."""

    def _open(self, lane: Lane, event: StoredEvent, sub: Subscriber, attempt: int,
              lease: bytes, trigger: str | None = None, ordered: bool = True,
              fresh: bool = False) -> None:
        lane.open += 1
        task = asyncio.create_task(self._deliver(event, sub, attempt, lease, trigger, ordered,
                                                 fresh))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, lane, lease))

    def _finished(self, lane: Lane, lease: bytes, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.leases.forget(lease)
        self._fresh[lane.name].pop(lease, None)
        lane.held -= 1
        lane.open -= 1
        if self._room_wanted:
            self._room_made()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
        if lane.waiting and lane.open < lane.width:
            self._open(lane, *lane.waiting.popleft())
        if ((lane.parked or lane.ready) and not lane.pulling
                and len(lane.waiting) <= lane.width // 2 and lane.name in self.subscribers):
            # Refill from the parked attempts before the lane runs dry, in one go: a pull is
            # three round trips whatever it takes, so not one per finished post.
            self._background_pull(lane.name)

    async def _deliver(self, event: StoredEvent, sub: Subscriber, attempt: int,
                       lease: bytes, trigger: str | None = None, ordered: bool = True,
                       fresh: bool = False) -> None:
        verdict = GO if self.gate.fast(sub) else await self.gate.admit(sub)
        if verdict.hold:
            # Paused, disabled, breaker open, or a probe already out: held (not an attempt).
            self.leases.forget(lease)
            held = member(event.event_id, sub.name, attempt, trigger)
            received = int(event.received_at * 1000)
            await self._persist(lambda: self.ledger.hold(sub.name, lease, held, event.event_id,
                                                         received))
            return
        headers = http.signed_headers(sub.signature, sub.secret, sub.headers, event.event_id,
                                      event.body)
        # What made this attempt: a breaker probe, an operator's resend or replay (its first
        # attempt), or the hub itself.
        made_by = "probe" if verdict.probe else (trigger or "auto")
        span = None
        if tracing.on:  # a child of the event's stored context: one trace per event
            span = tracing.attempt_span(event.trace, event.event_id, sub.name, sub.url, attempt,
                                        made_by, verdict.probe)
            if sub.propagate_trace:
                tracing.trace_headers(span, headers)
        outcome = await http.post(self._session, sub.url, event.body, headers, sub.timeout)
        # The outcome write below re-scores or removes the lease: stop renewing it first.
        self.leases.forget(lease)
        final = outcome.gone or (attempt >= sub.max_attempts and not verdict.probe)
        if span is not None:
            tracing.end_attempt(span, outcome.status, outcome.error, "delivered" if outcome.ok
                                else "dead_lettered" if final else "retry", tracing.now_ns())
        self.lanes[sub.name].observe(outcome.latency_ms)
        # What was sent and what came back, credentials masked (workers/http.py); a 2xx
        # keeps no body (docs/benchmarks.md, "What an attempt keeps").
        record = Attempt(clock.now(), attempt, outcome.status, outcome.error, outcome.latency_ms,
                         verdict.probe, made_by,
                         http.sent_request(sub, headers),
                         http.answer(sub, outcome, keep_body=not outcome.ok))
        if outcome.ok:
            recorded = await self._persist(
                lambda: self.ledger.succeeded(event.event_id, sub, lease, record, ordered,
                                              noted=not fresh))
            if log.isEnabledFor(logging.INFO):
                log.info("delivered", extra=self._context(event, sub, attempt, outcome))
            if recorded is not None and (recorded.released or recorded.transitions):
                self.gate.learn(sub, True, recorded.transitions)
                await self._recorded(recorded, sub.name,
                                     f"{event.event_id}: {record.describe()}")
            else:  # the common case: nothing but the outcome changed
                self.gate.learn(sub, True, [])
            return
        context = self._context(event, sub, attempt, outcome)
        if final:
            reason = ("410 Gone" if outcome.gone
                      else f"{attempt} attempt{'s' if attempt != 1 else ''} failed")
            recorded = await self._persist(
                lambda: self.ledger.dead_letter(event.event_id, sub, reason, event, lease,
                                                record, block=_blocks(sub, reason)))
            log.warning("dead-lettered", extra={**context, "reason": reason})
        else:
            delay = retry_delay(sub.backoff, attempt, outcome.retry_after)
            due = now_ms() + int(delay * 1000)
            # A failed probe does not use up an attempt: the same attempt waits for the next.
            n = attempt if verdict.probe else attempt + 1
            nxt = member(event.event_id, sub.name, n)
            recorded = await self._persist(
                lambda: self.ledger.retry_at(event.event_id, sub, lease, record, nxt, due,
                                             int(event.received_at * 1000)))
            log.info("retry scheduled", extra={**context, "retry_in_s": round(delay, 3),
                                               "probe": verdict.probe})
        self.gate.learn(sub, outcome.ok, recorded.transitions if recorded else [])
        await self._recorded(recorded, sub.name, f"{event.event_id}: {record.describe()}")

    @staticmethod
    def _context(event: StoredEvent, sub: Subscriber, attempt: int,
                 outcome: http.Outcome) -> dict[str, Any]:
        """What a log line about an attempt names."""
        return {"eventId": event.event_id, "subscriber": sub.name, "attempt": attempt,
                "status": outcome.status, "error": outcome.error,
                "latency_ms": outcome.latency_ms}

    def _said_dead(self, event_id: str, sub: Subscriber | str, reason: str) -> None:
        log.warning("dead-lettered", extra={"eventId": event_id,
                                            "subscriber": sub if isinstance(sub, str)
                                            else sub.name, "reason": reason})

    async def _recorded(self, recorded: Recorded | None, name: str, detail: str) -> None:
        """After an outcome: start the ordered events it released (at once, in this process,
        if the lane has room: the next event of an order follows its predecessor's 2xx by
        two round trips), then say and alert what changed."""
        if recorded is None:
            return
        if recorded.released and name in self.lanes:
            self.lanes[name].ready = True
            if not self.lanes[name].pulling:
                self._background_pull(name)
        await self._alert(recorded.transitions, name, detail)

    async def _alert(self, transitions: list[str] | None, name: str, detail: str) -> None:
        for transition in transitions or []:
            if transition in HEALTH_NEWS:
                log.warning(HEALTH_NEWS[transition], extra={"subscriber": name, "detail": detail})
            await self.alerts.raise_(transition, name, detail)

    async def _persist(self, write: Callable[[], Awaitable[T]]) -> T | None:
        """Record an outcome, retrying while Redis is away; the lease covers the rest."""
        return await self._until_redis_answers(
            write, "recording an outcome", "could not record outcome; the lease will retry it")

    async def _until_redis_answers(self, write: Callable[[], Awaitable[T]], what: str,
                                   gave_up: str, context: dict[str, Any] | None = None,
                                   ) -> T | None:
        """``write()``, retried with backoff while Redis is away, for up to PERSIST_FOR;
        None if it never answered. Other errors are the caller's."""
        deadline = time.monotonic() + PERSIST_FOR
        pause = 0.1
        while True:
            try:
                return await write()
            except (RedisError, OSError) as exc:
                extra = {**(context or {}), "error": repr(exc)}
                if pause == 0.1:  # said once: a script error would otherwise go unseen
                    log.warning(f"{what} failed; retrying", extra=extra)
                if time.monotonic() > deadline:
                    log.error(gave_up, extra=extra)
                    return None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
