"""Planning a task: what happens to each (event, subscriber) attempt it carries.

The task's events are loaded (one copy of each record per process), then each attempt is
decided: dead-lettered (the record expired, the subscriber removed, the attempts spent, the
event poisoned), left to a worker that knows the subscriber, held (paused, disabled, breaker
open), parked (its subscriber holds its share of the process already), or leased and
launched. The decision is written before any post starts: the dead letters first, then one
script (``LEASE`` in workers/ledger.py) for the rest, the task's own note in ``unclaimed``
last, so a failure anywhere leaves the note and the message is queued again.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import msgspec

from relay.config import Subscriber
from relay.models import StoredEvent
from relay.queue import deliver_message, member
from workers.ledger import LeasePlan, Loaded, now_ms
from workers.parts import EngineParts

log = logging.getLogger("relay.worker")

#: A subscriber this process does not know, that another live worker had configured within
#: this long (workers/heartbeat.py), is not "removed": its attempt waits PARK_UNKNOWN_MS for
#: a worker that knows it (a rolling deploy, or a reload not everywhere yet).
KNOWN_FRESH_MS = 15_000
PARK_UNKNOWN_MS = 5_000
#: Subscriber name of a dead letter for an event whose record expired before any subscriber
#: was chosen for it (its fan-out found nothing to route).
ANY = "*"
#: Dead letters that never block an ordered key: the event is gone, or the subscriber is.
NEVER_BLOCKS = ("event expired", "subscriber removed")


def _blocks(sub: Subscriber | str, reason: str) -> bool:
    """Does this dead letter keep its ordered keys waiting (``on_dead: block``)?"""
    return (not isinstance(sub, str) and sub.ordering is not None
            and sub.ordering.on_dead == "block" and reason not in NEVER_BLOCKS)


class _Plan:
    """What one task decided: its dead letters, then one script (ledger.LEASE) for the rest,
    written before any post starts."""

    def __init__(self) -> None:
        self.redis = LeasePlan(held=defaultdict(dict), moves=defaultdict(list),
                               parked=defaultdict(dict), pending=defaultdict(dict),
                               unpending=defaultdict(list))
        #: (event, subscriber, attempt, lease, trigger, ordered: may be queued under the
        #: subscriber for ordered delivery, fresh: a fan-out's first attempt with no note in
        #: pending:{sub})
        self.launch: list[tuple[StoredEvent, Subscriber, int, bytes, str | None, bool,
                                bool]] = []
        #: (event id, subscriber, reason, event, the pulled member it was, if it was one)
        self.dead: list[tuple[str, Subscriber | str, str, StoredEvent | None,
                              bytes | None]] = []

    @property
    def leases(self) -> dict[bytes, int]:
        return self.redis.leases


class Planning(EngineParts):
    """The engine's planning part (workers/engine.py puts the parts together)."""

    async def _start(self, event_ids: str | list[str], names: list[str] | None, attempt: int,
                     batch: str | None, trigger: str | None = None) -> int:
        # This task's own message: noted in ``unclaimed`` when queued, dropped from it here
        # (with the leases below) so it is not queued again (see workers/scheduler.py).
        taken = self._taken(event_ids, names, attempt, batch, trigger)
        ids = [event_ids] if isinstance(event_ids, str) else list(dict.fromkeys(event_ids))
        loaded = await self._load(ids, batch is not None)
        unknown = await self._known_elsewhere(names)
        plan, now = _Plan(), now_ms()
        for event_id, item in zip(ids, loaded, strict=True):
            try:
                self._plan_event(plan, event_id, item, names, attempt, batch, unknown, now,
                                 trigger=trigger)
            except Exception as exc:  # a poisoned event: dead-letter it, deliver the rest
                log.exception("event cannot be processed; dead-lettered",
                              extra={"eventId": event_id})
                reason = f"cannot be processed: {type(exc).__name__}: {exc}"[:300]
                for name in names or [ANY]:
                    plan.dead.append((event_id, self.subscribers.get(name, name), reason,
                                      item.event, None))
        await self._commit(plan, taken)
        if names is None and ids:
            attempts = len(plan.launch) + sum(len(m) for m in plan.redis.parked.values()) \
                + sum(len(m) for m in plan.redis.held.values())
            self._per_event = 0.8 * self._per_event + 0.2 * attempts / len(ids)
        return len(plan.launch)

    def _taken(self, event_ids: str | list[str], names: list[str] | None, attempt: int,
               batch: str | None, trigger: str | None) -> tuple[bytes, ...]:
        """What may note this task's message in ``unclaimed``: the message itself (queued by
        the ingress, a resend, a replay, or as a full message by the scheduler), and for a
        task of one (event, subscriber) the short reference the scheduler notes when it
        queues a member (relay/queue.py ``member``)."""
        message = deliver_message(self.keys.queue, event_ids, names, attempt, batch, trigger)
        if isinstance(event_ids, str) and names is not None and len(names) == 1 \
                and batch is None:
            return (message, member(event_ids, names[0], attempt, trigger))
        return (message,)

    async def _load(self, ids: list[str], with_seen: bool = False) -> list[Loaded]:
        """``ledger.load``, each record replaced by the copy already in memory, if any.

        A retry, and a parked attempt pulled back, is loaded per subscriber: without this,
        an event of 1.7 MB pulled back by ten subscribers' lanes was held ten times.
        """
        return self._shared(await self.ledger.load(ids, with_seen))

    def _shared(self, loaded: list[Loaded]) -> list[Loaded]:
        """Each record replaced by the copy already in memory, if any (see ``_load``)."""
        for i, item in enumerate(loaded):
            if item.event is not None:
                event = item.event
                live = self._live.setdefault((event.event_id, event.received_at), event)
                if live is not event:
                    loaded[i] = msgspec.structs.replace(item, event=live)
        return loaded

    async def _commit(self, plan: _Plan, taken: tuple[bytes, ...]) -> None:
        """Write the plan, then launch what it says. Dead letters first: the task's note in
        ``unclaimed`` (removed by the lease script) must outlive them, or a SIGKILL or a Redis
        outage between the two would forget a delivery that no dead letter records. A failed
        write raises (the caller retries the whole task; a dead letter written twice is one
        letter)."""
        try:
            for event_id, target, reason, event, member in plan.dead:
                recorded = await self.ledger.dead_letter(
                    event_id, target, reason, event, member, block=_blocks(target, reason))
                self._said_dead(event_id, target, reason)
                await self._recorded(recorded, target if isinstance(target, str)
                                     else target.name, f"{event_id}: {reason}")
            await self.ledger.lease(plan.redis, taken)
        except BaseException:
            for _, sub, *_ in plan.launch:
                self.lanes[sub.name].held -= 1
            raise
        for name in plan.redis.parked:
            lane = self.lanes[name]
            lane.parked = True
            lane.parkings += 1
            if not lane.full and not lane.pulling:
                # Its posts ended while the plan was written: no post is left whose end would
                # pull the parked attempts, so pull now rather than at the next poll (1 s).
                self._background_pull(name)
        for launch in plan.launch:
            event, sub, lease = launch[0], launch[1], launch[3]
            self.leases.track(lease, plan.leases[lease], sub)
            if launch[6]:
                self._fresh[sub.name][lease] = int(event.received_at * 1000)
            lane = self.lanes[sub.name]
            if lane.open < lane.width:
                self._open(lane, *launch)
            else:
                lane.waiting.append(launch)

    def _plan_event(self, plan: _Plan, event_id: str, item: Loaded, names: list[str] | None,
                    attempt: int, batch: str | None, unknown: dict[str, bool], now: int,
                    lease: bytes | None = None, trigger: str | None = None) -> None:
        """Decide what happens to one event's attempts. ``lease``: a parked attempt pulled
        back (its own message is its lease). ``trigger``: an operator's resend or replay,
        kept by this attempt's own message when it is held or parked (not by its lease: the
        retries it leads to are ``auto``)."""
        event = item.event
        if item.error is not None:
            raise ValueError(item.error)  # dead-lettered by the caller, the rest go on
        if event is None:
            # The record expired (redis.retention) while attempts were pending: each becomes a
            # dead letter, counted, never dropped silently.
            for name in names or [ANY]:
                if name not in item.done:
                    plan.dead.append((event_id, self.subscribers.get(name, name),
                                      "event expired", None, lease))
            log.error("event record expired with attempts pending; dead-lettered",
                      extra={"eventId": event_id, "subscribers": names or ANY})
            return
        if batch is not None and item.seen is not None and item.seen != batch:
            return  # a duplicate in this batch: the batch that stored it fans it out
        if names is None:
            targets, missing = self._fan_out(event, item)
        else:
            # A waiting ordered event is never posted by a message (a stale lease of an
            # earlier run): the event ahead of it releases it (relay/ordering.py).
            named = [n for n in names if item.marks.get(n) != "w"]
            targets = [self.subscribers[n] for n in named if n in self.subscribers]
            missing = [n for n in named if n not in self.subscribers and n not in item.done]
        for name in missing:
            if unknown.get(name):  # another live worker knows it: leave it to them
                plan.leases[member(event_id, name, attempt, trigger)] = now + PARK_UNKNOWN_MS
            else:
                plan.dead.append((event_id, name, "subscriber removed", event, lease))
        received = int(event.received_at * 1000)
        for sub in targets:
            if sub.name in item.done:
                if lease is not None:
                    plan.redis.drops.append(lease)  # delivered meanwhile: no lease needed
                # A message for a delivery made already (a task run again, a lease that fell
                # due after the outcome): a pending note left of it goes too.
                plan.redis.unpending[sub.name].append(event_id)
                continue
            lane = self.lanes[sub.name]
            own = member(event_id, sub.name, attempt, trigger)
            # The first attempt of a fan-out, launched here and now, is pending in this
            # process's hands: counted by its in-flight figures (workers/tally.py) rather
            # than noted in pending:{sub} (a ZADD and a ZREM per delivery). Every other
            # pending attempt has its note: held, parked, retried, resent, pulled, ordered.
            fresh = names is None and lease is None and sub.name not in item.marks
            if attempt > sub.max_attempts:
                # Only a lease for an attempt past the last gets here: the worker that made
                # the last attempt died before it could record the outcome.
                plan.dead.append((event_id, sub, "no outcome recorded for the last attempt",
                                  event, lease))
            elif self.gate.cached_hold(sub):
                # Paused, disabled or its breaker open: held, not posted, not counted. (If a
                # resume came after the cached verdict, the script puts it due now instead.)
                plan.redis.pending[sub.name][event_id] = received
                if lease is None:
                    plan.redis.held[sub.name][own] = now
                else:  # a pulled member is its own lease in the schedule: moved, not copied
                    plan.redis.moves[sub.name].append(lease)
            elif lease is None and (lane.full or lane.parked):
                # It already holds its share of the process's attempts (or has attempts parked
                # before this one: they go first): park the attempt in ``parked:{sub}``, from
                # which lanes of this subscriber in any worker pull as they have room. Not in
                # memory, not a Celery message, not counted as an attempt: one subscriber's
                # slowness costs nobody else anything.
                plan.redis.pending[sub.name][event_id] = received
                plan.redis.parked[sub.name][own] = now
            else:
                if not fresh:
                    plan.redis.pending[sub.name][event_id] = received
                own_lease = lease or member(event_id, sub.name, attempt + 1)
                plan.leases[own_lease] = now + self.leases.lease_ms(sub)
                # Queued under this subscriber's ordering only if it has ordering (here) or
                # the delivery record marks it so (the ingress had it on): else its success
                # has no next event to release, and the outcome script skips looking.
                ordered = sub.ordering is not None or sub.name in item.marks
                plan.launch.append((event, sub, attempt, own_lease, trigger, ordered, fresh))
                lane.held += 1

    def _fan_out(self, event: StoredEvent, item: Loaded) -> tuple[list[Subscriber], list[str]]:
        """The subscribers an event's first fan-out posts to now, and the names it was queued
        for that are no longer configured here. The ingress decided, at acceptance, which
        ordered subscribers get it: ``o`` marks one to post now, ``w``/``q`` one that waits
        or was released already (its turn comes from the event ahead: never from here)."""
        if not item.marks:
            return self.router.route(event), []
        targets = [s for s in self.router.route(event) if s.name not in item.marks]
        missing = []
        for name, mark in item.marks.items():
            if mark != "o" or name in item.done:
                continue
            sub = self.subscribers.get(name)
            if sub is None:
                missing.append(name)
            else:
                targets.append(sub)
        return targets, missing

    async def _known_elsewhere(self, names: list[str] | None) -> dict[str, bool]:
        """For names this process does not have configured: did a live worker have them
        configured lately? (Then they are not removed, just not here yet or any more.)"""
        missing = [n for n in names or [] if n not in self.subscribers]
        if not missing:
            return {}
        (seen,) = await self.ledger.run([("HMGET", self.keys.known, *missing)])
        now = now_ms()
        return {name: bool(at) and now - int(at) < KNOWN_FRESH_MS
                for name, at in zip(missing, seen, strict=True)}
