"""The delivery engine of one worker process: an asyncio loop beside Celery's task thread.

Celery runs tasks synchronously, one at a time per pool slot; a delivery that waits 10 s on a
slow subscriber would hold that slot and delay every other event behind it. So a task only
*starts* deliveries: its events are loaded, routed, every pending (event, subscriber)
attempt leased in the schedule (workers/ledger.py) and posted on this process's event loop
(the task itself only hands its message over and returns: Engine.start). It never
waits for a subscriber: one subscriber's slowness
never holds up a task, so never another subscriber's events (a subscriber already holding its
share of the process is *parked* instead: workers/lanes.py).

The parts, one module each: ``lanes`` (how much each subscriber holds and posts at once),
``leases`` (renewing what is held), ``gate`` (pause, breaker, rate limit), ``ledger`` (what is
written to Redis), ``alerts``, ``http`` (one attempt). Because each attempt is leased in Redis
before it starts, a SIGKILL at any moment loses nothing: the lease falls due and the
scheduler queues the attempt again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import msgspec
from redis.exceptions import RedisError

from relay import clock, loops, tracing
from relay.config import Config, Subscriber
from relay.connections import async_client
from relay.keys import Keys
from relay.models import Attempt, StoredEvent
from relay.queue import deliver_message, member, read_member
from relay.routing import Router
from workers import http
from workers.alerts import Alerts
from workers.backoff import retry_delay
from workers.gate import GO, Gate
from workers.lanes import Lane, Lanes
from workers.leases import LeaseKeeper
from workers.ledger import LeasePlan, Ledger, Loaded, Recorded, now_ms

log = logging.getLogger("relay.worker")
T = TypeVar("T")

#: How long an outcome write is retried while Redis is away before the lease takes over.
PERSIST_FOR = 120.0
#: Tasks being started at once before a new one waits (workers/engine.py Engine.start).
MAX_PENDING_STARTS = 32
#: A full process lets tasks wait for room for at most visibility_timeout / this, in all
#: (then their overflow is parked): see Engine._wait_for_room.
FULL_WAIT_SHARE = 6
#: A subscriber this process does not know, that another live worker had configured within
#: this long (workers/heartbeat.py), is not "removed": its attempt waits PARK_UNKNOWN_MS for
#: a worker that knows it (a rolling deploy, or a reload not everywhere yet).
KNOWN_FRESH_MS = 15_000
PARK_UNKNOWN_MS = 5_000
KNOWN_NOTE_SECONDS = 5.0
#: What an operator reads in the log when a subscriber's health changes.
HEALTH_NEWS = {"opened": "circuit breaker opened: attempts are held until a probe succeeds",
               "recovered": "subscriber recovered: held attempts flow again",
               "disabled": "subscriber disabled after failing too long: resume it to retry"}
#: How often a lane with room looks for parked attempts left by other processes.
PULL_SECONDS = 1.0
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


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = Keys.of(config)
        self._loop = loops.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay-delivery",
                                        daemon=True)
        self._thread.start()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pulls: set[asyncio.Task[None]] = set()
        self._pending: set[concurrent.futures.Future[int]] = set()
        self._pending_lock = threading.Lock()
        self._full_since: float | None = None
        #: Attempts of the tasks handed to the loop and not yet planned (see _wait_for_room).
        self._reserved = 0.0
        #: Per subscriber, the fresh attempts this process holds (lease -> received ms): the
        #: pending deliveries with no note in pending:{sub} (see _plan_event), whose count
        #: and oldest the tally writes every second.
        self._fresh: defaultdict[str, dict[bytes, int]] = defaultdict(dict)
        #: Tasks waiting for room (thread id -> the level of held + reserved they need), and
        #: the event that wakes them.
        self._room_wanted: dict[int, float] = {}
        self._room = threading.Event()
        #: Attempts per event of a fan-out task, as planned lately (a moving average).
        self._per_event = float(max(1, len(config.subscribers)))
        #: Event records in memory, one per (id, received_at) while any attempt holds it.
        self._live: weakref.WeakValueDictionary[tuple[str, float], StoredEvent] = (
            weakref.WeakValueDictionary())
        self._call(self._setup())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _setup(self) -> None:
        tracing.setup("worker")  # in this process, after any fork (relay/tracing.py)
        self._redis = async_client(self.config.redis, socket_connect_timeout=2,
                                   health_check_interval=10)
        with contextlib.suppress(RedisError, OSError):  # measured again with every note
            await clock.CLOCK.ameasure(self._redis)
        self.ledger = Ledger(self._redis, self.keys, self.config.redis.retention)
        self.ledger.tally.in_flight = self._in_flight
        self.leases = LeaseKeeper(self.ledger, self.config.worker.lease_grace)
        self.gate = Gate(self.ledger, self.keys, self.config.worker.lease_grace)
        self.alerts = Alerts(self.ledger, self.keys, self.config.alerts)
        self.lanes = Lanes()
        self._apply(self.config)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              cookie_jar=aiohttp.DummyCookieJar())
        self._background = [asyncio.create_task(self.leases.run()),
                            asyncio.create_task(self.alerts.run(self._session)),
                            asyncio.create_task(self._note_known()),
                            asyncio.create_task(self._puller()),
                            asyncio.create_task(self.ledger.run_tally())]

    def _in_flight(self) -> dict[str, tuple[int, int]]:
        """Per subscriber, how many fresh attempts this process holds and the oldest one's
        received ms (pending deliveries with no note in pending:{sub})."""
        return {name: (len(held), min(held.values())) for name, held in self._fresh.items()
                if held}

    def _apply(self, config: Config) -> None:
        """Take a (re)loaded config: new, changed and removed subscribers apply to new work;
        attempts in flight finish with the settings they started with."""
        self.config = config
        self.router = Router(config.subscribers)
        self.subscribers = {s.name: s for s in config.subscribers}
        self.lanes.resize(config.subscribers, config.worker.max_in_flight,
                          config.worker.max_connections)
        self.leases.grace = self.gate.lease_grace = config.worker.lease_grace
        self.ledger.retention = config.redis.retention
        self.alerts.targets = config.alerts

    # -- called from other threads ----------------------------------------------------------

    def start(self, event_ids: str | list[str], subscribers: list[str] | None, attempt: int,
              batch: str | None = None, trigger: str | None = None) -> None:
        """Hand one task's events to the loop, which routes, leases and launches them.

        The task does not wait for that (two Redis round trips on a busy loop, ~5-10 ms): it
        returns and Celery acknowledges its message at once, so the next message, maybe
        another subscriber's event, is not queued behind it. Nothing is lost if this process
        dies before the leases are written: the message's note in ``unclaimed`` is removed
        only together with them, and the scheduler queues the message again otherwise
        (workers/scheduler.py). Only when MAX_PENDING_STARTS are in progress does the task
        wait, so a worker whose loop cannot keep up leaves the backlog in the Redis queue.
        """
        events = 1 if isinstance(event_ids, str) else len(event_ids)
        expected = events * (len(subscribers) if subscribers is not None else self._per_event)
        self._wait_for_room(expected)
        future = asyncio.run_coroutine_threadsafe(
            self._start_until_done(event_ids, subscribers, attempt, batch, trigger),
            self._loop)
        with self._pending_lock:
            self._pending.add(future)
            self._reserved += expected
        future.add_done_callback(functools.partial(self._started, expected))
        while len(self._pending) > MAX_PENDING_STARTS:
            concurrent.futures.wait(list(self._pending), timeout=1.0,
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def _wait_for_room(self, expected: float) -> None:
        """While the lanes have no room for this task's attempts (``expected`` of them), let
        the backlog wait in the Redis queue (where any worker can take it) rather than park it
        attempt by attempt; but only for a bounded time in all. Room counts the attempts of
        tasks handed to the loop and not yet planned (``_reserved``): without them a burst of
        tasks, each started before the one ahead had filled the lanes, parked most of what it
        carried (at fan-out 10 half the deliveries of a saturated run, each costing a park,
        a pull and a second load).

        Celery has prefetched messages behind this one, unacknowledged until their tasks
        return: held past ``worker.visibility_timeout``, kombu's restore (run by whichever
        worker polls) queues them again, re-serialised, so neither the worker holding them nor
        the scheduler's unclaimed check recognises them, and they run twice. So the process
        waits at most ``visibility_timeout / FULL_WAIT_SHARE`` from the moment it filled up,
        however many tasks arrive meanwhile; past that, tasks park their overflow at once. One
        subscriber alone never gets here: it holds at most its share of max_in_flight."""
        most = self.config.worker.max_in_flight

        def full() -> bool:
            # A task of more than half the process's share starts once half is free (the
            # rest of it parks): waiting for all of it would idle the lanes meanwhile.
            busy = self.lanes.held() + self._reserved
            return busy > 0 and busy + min(expected, most // 2) > most

        if not full():
            self._full_since = None
            return
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        deadline = self._full_since + self.config.worker.visibility_timeout / FULL_WAIT_SHARE
        # Woken by the loop when a post ends with room enough (``_room_made``), not by
        # polling: a thread waking every few milliseconds took the GIL from the loop each time.
        me = threading.get_ident()
        self._room_wanted[me] = most - min(expected, most // 2)
        try:
            while True:
                self._room.clear()
                left = deadline - time.monotonic()
                if not full() or left <= 0:
                    return
                self._room.wait(min(left, 0.1))
        finally:
            del self._room_wanted[me]

    def _room_made(self) -> None:
        """On the loop, when held attempts end or a plan is written: wake a task waiting in
        ``_wait_for_room`` if there is room enough for it now."""
        if self._room_wanted and (self.lanes.held() + self._reserved
                                  <= max(self._room_wanted.values(), default=0)):
            self._room.set()

    def _started(self, expected: float, future: concurrent.futures.Future[int]) -> None:
        with self._pending_lock:
            self._pending.discard(future)
            self._reserved -= expected
        self._room_made()

    async def _start_until_done(self, event_ids: str | list[str], names: list[str] | None,
                                attempt: int, batch: str | None, trigger: str | None = None
                                ) -> int:
        """``_start``, retried while Redis is away (PERSIST_FOR), dead-lettering what can
        never be processed."""
        try:
            started = await self._until_redis_answers(
                lambda: self._start(event_ids, names, attempt, batch, trigger),
                "starting a task's deliveries",
                "task not started: redis unavailable; its message is queued again from unclaimed",
                {"eventId": event_ids})
            return started or 0
        except Exception as exc:
            # Not a passing condition: retrying would fail the same way, forever.
            log.exception("task cannot be processed; its events are dead-lettered",
                          extra={"eventId": event_ids, "subscribers": names})
            await self._give_up(event_ids, names, attempt, batch, exc, trigger)
            return 0

    async def _give_up(self, event_ids: str | list[str], names: list[str] | None,
                       attempt: int, batch: str | None, error: BaseException,
                       trigger: str | None = None) -> None:
        """A task failed in a way no retry can mend: dead-letter its events and drop its
        message, so it is not queued again forever (holding up the rest of its batch)."""
        reason = f"cannot be processed: {type(error).__name__}: {error}"[:300]
        ids = [event_ids] if isinstance(event_ids, str) else list(dict.fromkeys(event_ids))
        plan = _Plan()
        plan.dead = [(event_id, self.subscribers.get(name, name), reason, None, None)
                     for event_id in ids for name in names or [ANY]]
        taken = self._taken(event_ids, names, attempt, batch, trigger)
        # The letters, then the note: if Redis never takes the letters, the note stays and
        # the message is queued again (and fails the same way, and is dead-lettered then).
        await self._persist(lambda: self._commit(plan, taken))

    def reload(self, config: Config) -> None:
        """Apply ``config`` on the loop (safe from a signal handler or another thread)."""
        self._loop.call_soon_threadsafe(self._apply, config)

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` for held deliveries; returns how many were left (their
        leases bring them back)."""
        deadline = time.monotonic() + timeout
        concurrent.futures.wait(list(self._pending), timeout=timeout)  # tasks being started

        async def wait() -> int:
            # A post that ends opens the next waiting one of its lane: wait for those too.
            while self._tasks and time.monotonic() < deadline:
                await asyncio.wait(list(self._tasks), timeout=deadline - time.monotonic(),
                                   return_when=asyncio.FIRST_COMPLETED)
            return self.lanes.held()

        left = self._call(wait())
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        tracing.shutdown()  # the last spans, if the collector answers in time
        return left

    async def _close(self) -> None:
        for task in self._background:
            task.cancel()
        # The statistics of the last second (workers/tally.py); outcomes are written already.
        await self.ledger.final_tally()
        await self._session.close()
        await self._redis.aclose()

    # -- a task: route, lease, launch --------------------------------------------------------

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

    async def _pull(self, name: str) -> None:
        """Take parked attempts of ``name`` into its lane while it has room for them."""
        lane, sub = self.lanes[name], self.subscribers.get(name)
        if sub is None or lane.pulling:
            return
        lane.pulling = True
        try:
            # Released ordered events first: each is the head of a key others wait behind.
            while lane.ready and (room := lane.hold - lane.held) > 0:
                ids = await self.ledger.ready(name, room)
                if len(ids) < room:
                    lane.ready = False
                if ids:
                    await self._launch_ready(sub, ids)
            while lane.parked and (room := lane.hold - lane.held) > 0:
                parkings = lane.parkings
                members = await self.ledger.pull(name, room,
                                                 now_ms() + self.leases.lease_ms(sub))
                # Drained (for now), unless a plan parked more while the pull was on its way:
                # the pull may have missed those, so look again rather than leave them to the
                # next poll.
                if len(members) < room and lane.parkings == parkings:
                    lane.parked = False
                if members:
                    await self._launch_pulled(sub, members)
        finally:
            lane.pulling = False

    async def _launch_ready(self, sub: Subscriber, ids: list[str]) -> None:
        """Claim released ordered events (each becomes its own lease: its first attempt) and
        launch them; another process may have claimed some first."""
        members = {event_id: member(event_id, sub.name, 1) for event_id in ids}
        claimed, loaded = await self.ledger.claim_ready(
            sub.name, members, now_ms() + self.leases.lease_ms(sub))
        if claimed:
            taken = set(claimed)
            mine = [(m, item) for m, item in zip(members.values(), loaded, strict=True)
                    if m in taken]
            await self._launch_pulled(sub, [m for m, _ in mine], [item for _, item in mine])

    async def _launch_pulled(self, sub: Subscriber, members: list[bytes],
                             loaded: list[Loaded] | None = None) -> None:
        taken = [(m, read_member(m)) for m in members]
        ids = [str(args.event_id) for _, args in taken]
        loaded = self._shared(loaded) if loaded is not None else await self._load(ids)
        plan, now = _Plan(), now_ms()
        for (pulled, args), item, event_id in zip(taken, loaded, ids, strict=True):
            try:
                self._plan_event(plan, event_id, item, [sub.name], args.attempt, None, {}, now,
                                 lease=pulled, trigger=args.trigger)
            except Exception as exc:
                plan.dead.append((event_id, sub, f"cannot be processed: {exc}"[:300],
                                  item.event, pulled))
        # Every member is accounted for in the one script: launched (its lease re-scored),
        # held (moved), dropped (delivered meanwhile) or dead-lettered (removed with the
        # letter). Should the write fail, each stays in the schedule as its own lease.
        await self._commit(plan, ())

    async def _puller(self) -> None:
        """Pull parked attempts into lanes with room: at once when a post ends (``_finished``)
        and every PULL_SECONDS for parked work another process left (one round trip)."""
        while True:
            await asyncio.sleep(PULL_SECONDS)
            names = [n for n in self.subscribers if self.lanes[n].held < self.lanes[n].hold]
            if not names:
                continue
            try:
                counts = await self.ledger.run(
                    [("ZCARD", key) for n in names
                     for key in (self.keys.parked(n), self.keys.order_ready(n))])
                for i, name in enumerate(names):
                    parked, ready = counts[2 * i], counts[2 * i + 1]
                    if parked or ready:
                        self.lanes[name].parked |= bool(parked)
                        self.lanes[name].ready |= bool(ready)
                        await self._pull(name)
            except (RedisError, OSError) as exc:
                log.warning("could not pull parked attempts; retrying",
                            extra={"error": repr(exc)})
            except Exception:
                log.exception("pulling parked attempts failed; retrying")

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

    async def _note_known(self) -> None:
        """Note in ``known`` the subscribers this process delivers to (configured, or still
        holding attempts after a reload removed them): workers/heartbeat.py dead-letters the
        attempts of a name no live process has noted for a while."""
        while True:
            names = set(self.subscribers) | set(self.lanes.busy())
            with contextlib.suppress(RedisError, OSError):
                await clock.CLOCK.ameasure(self._redis)
            if names:
                with contextlib.suppress(RedisError, OSError):
                    await self.ledger.run([("HSET", self.keys.known,
                                            *[x for n in names for x in (n, now_ms())])])
            await asyncio.sleep(KNOWN_NOTE_SECONDS)

    def _background_pull(self, name: str) -> None:
        task = asyncio.create_task(self._pull(name))
        self._pulls.add(task)
        task.add_done_callback(self._pull_done)

    def _pull_done(self, task: asyncio.Task[None]) -> None:
        self._pulls.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not pull parked attempts", extra={"error": repr(task.exception())})

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

    # -- one attempt ------------------------------------------------------------------------

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


_engine: Engine | None = None
_engine_pid = 0
_engine_lock = threading.Lock()


def get_engine(config: Config) -> Engine:
    """This process's engine, created on first use (after a prefork fork, never before)."""
    global _engine, _engine_pid
    with _engine_lock:
        if _engine is None or _engine_pid != os.getpid():
            _engine, _engine_pid = Engine(config), os.getpid()
        return _engine


def current_engine() -> Engine | None:
    """This process's engine if it has one (a reload applies to it)."""
    return _engine if _engine is not None and _engine_pid == os.getpid() else None


def shutdown_engine(timeout: float) -> None:
    global _engine
    with _engine_lock:
        if _engine is not None and _engine_pid == os.getpid():
            left = _engine.drain(timeout)
            if left:
                log.warning("stopped with deliveries in flight; their leases will retry them",
                            extra={"in_flight": left})
            _engine = None
