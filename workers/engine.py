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
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
from redis.exceptions import RedisError

from relay import tracing
from relay.config import Config, Subscriber
from relay.connections import async_client
from relay.keys import Keys
from relay.models import Attempt, StoredEvent
from relay.queue import deliver_message, read_deliver_message
from relay.routing import Router
from workers import http
from workers.alerts import Alerts
from workers.backoff import retry_delay
from workers.gate import GO, Gate
from workers.lanes import Lane, Lanes
from workers.leases import LeaseKeeper
from workers.ledger import Ledger, Loaded, now_ms

log = logging.getLogger("relay.worker")
T = TypeVar("T")

#: How long an outcome write is retried while Redis is away before the lease takes over.
PERSIST_FOR = 120.0
#: Tasks being started at once before a new one waits (workers/engine.py Engine.start).
MAX_PENDING_STARTS = 32
#: Longest a task waits for a full process to have room (then its overflow is parked).
FULL_WAIT = 30.0
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


class _Plan:
    """What one task decided, written in one round trip before any post starts."""

    def __init__(self) -> None:
        self.leases: dict[bytes, int] = {}
        self.held: dict[str, dict[bytes, int]] = defaultdict(dict)
        self.parked: dict[str, dict[bytes, int]] = defaultdict(dict)
        self.pending: dict[str, dict[str, int]] = defaultdict(dict)
        self.launch: list[tuple[StoredEvent, Subscriber, int, bytes]] = []
        self.dead: list[tuple[str, Subscriber | str, str, StoredEvent | None]] = []


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = Keys.of(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay-delivery",
                                        daemon=True)
        self._thread.start()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pulls: set[asyncio.Task[None]] = set()
        self._pending: set[concurrent.futures.Future[int]] = set()
        self._pending_lock = threading.Lock()
        self._call(self._setup())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _setup(self) -> None:
        tracing.setup("worker")  # in this process, after any fork (relay/tracing.py)
        self._redis = async_client(self.config.redis, socket_connect_timeout=2,
                                   health_check_interval=10)
        self.ledger = Ledger(self._redis, self.keys, self.config.redis.retention)
        self.leases = LeaseKeeper(self.ledger, self.config.worker.lease_grace)
        self.gate = Gate(self.ledger, self.keys, self.config.worker.lease_grace)
        self.alerts = Alerts(self.ledger, self.keys, self.config.alerts)
        self.lanes = Lanes()
        self._apply(self.config)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self._background = [asyncio.create_task(self.leases.run()),
                            asyncio.create_task(self.alerts.run(self._session)),
                            asyncio.create_task(self._note_known()),
                            asyncio.create_task(self._puller())]

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
              batch: str | None = None) -> None:
        """Hand one task's events to the loop, which routes, leases and launches them.

        The task does not wait for that (two Redis round trips on a busy loop, ~5-10 ms): it
        returns and Celery acknowledges its message at once, so the next message, maybe
        another subscriber's event, is not queued behind it. Nothing is lost if this process
        dies before the leases are written: the message's note in ``unclaimed`` is removed
        only together with them, and the scheduler queues the message again otherwise
        (workers/scheduler.py). Only when MAX_PENDING_STARTS are in progress does the task
        wait, so a worker whose loop cannot keep up leaves the backlog in the Redis queue.
        """
        # A process whose lanes are all full takes no more (the backlog waits in the Redis
        # queue, where any worker can take it, instead of being parked attempt by attempt).
        # One subscriber alone never gets here: it holds at most its share of max_in_flight.
        waited = 0.0
        while self.lanes.held() >= self.config.worker.max_in_flight and waited < FULL_WAIT:
            time.sleep(0.005)
            waited += 0.005
        future = asyncio.run_coroutine_threadsafe(
            self._start_until_done(event_ids, subscribers, attempt, batch), self._loop)
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._started)
        while len(self._pending) > MAX_PENDING_STARTS:
            concurrent.futures.wait(list(self._pending), timeout=1.0,
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def _started(self, future: concurrent.futures.Future[int]) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    async def _start_until_done(self, event_ids: str | list[str], names: list[str] | None,
                                attempt: int, batch: str | None) -> int:
        """``_start``, retried while Redis is away (PERSIST_FOR), dead-lettering what can
        never be processed."""
        try:
            started = await self._until_redis_answers(
                lambda: self._start(event_ids, names, attempt, batch),
                "starting a task's deliveries",
                "task not started: redis unavailable; its message is queued again from unclaimed",
                {"eventId": event_ids})
            return started or 0
        except Exception as exc:
            # Not a passing condition: retrying would fail the same way, forever.
            log.exception("task cannot be processed; its events are dead-lettered",
                          extra={"eventId": event_ids, "subscribers": names})
            await self._give_up(event_ids, names, attempt, batch, exc)
            return 0

    async def _give_up(self, event_ids: str | list[str], names: list[str] | None,
                       attempt: int, batch: str | None, error: BaseException) -> None:
        """A task failed in a way no retry can mend: dead-letter its events and drop its
        message, so it is not queued again forever (holding up the rest of its batch)."""
        reason = f"cannot be processed: {type(error).__name__}: {error}"[:300]
        ids = [event_ids] if isinstance(event_ids, str) else list(dict.fromkeys(event_ids))
        for event_id in ids:
            for name in names or [ANY]:
                await self._dead(event_id, self.subscribers.get(name, name), reason, None)
        taken = deliver_message(self.keys.queue, event_ids, names, attempt, batch)
        await self._persist(lambda: self.ledger.run([("ZREM", self.keys.unclaimed, taken)]))

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
        await self._session.close()
        await self._redis.aclose()

    # -- a task: route, lease, launch --------------------------------------------------------

    async def _start(self, event_ids: str | list[str], names: list[str] | None, attempt: int,
                     batch: str | None) -> int:
        # This task's own message: noted in ``unclaimed`` when queued, dropped from it here
        # (with the leases below) so it is not queued again (see workers/scheduler.py).
        taken = deliver_message(self.keys.queue, event_ids, names, attempt, batch)
        ids = [event_ids] if isinstance(event_ids, str) else list(dict.fromkeys(event_ids))
        loaded = await self.ledger.load(ids, batch is not None)
        unknown = await self._known_elsewhere(names)
        plan, now = _Plan(), now_ms()
        for event_id, item in zip(ids, loaded, strict=True):
            try:
                self._plan_event(plan, event_id, item, names, attempt, batch, unknown, now)
            except Exception as exc:  # a poisoned event: dead-letter it, deliver the rest
                log.exception("event cannot be processed; dead-lettered",
                              extra={"eventId": event_id})
                reason = f"cannot be processed: {type(exc).__name__}: {exc}"[:300]
                for name in names or [ANY]:
                    plan.dead.append((event_id, self.subscribers.get(name, name), reason,
                                      item.event))
        await self._commit(plan, taken)
        return len(plan.launch)

    async def _commit(self, plan: _Plan, taken: bytes | None) -> None:
        """Write the plan (leases, parked, held, pending) in one round trip, then dead-letter
        and launch what it says."""
        try:
            await self.ledger.lease(plan.leases, plan.held, plan.pending, taken, plan.parked)
        except BaseException:
            for _, sub, _, _ in plan.launch:
                self.lanes[sub.name].held -= 1
            raise
        for name in plan.parked:
            lane = self.lanes[name]
            lane.parked = True
            lane.parkings += 1
            if not lane.full and not lane.pulling:
                # Its posts ended while the plan was written: no post is left whose end would
                # pull the parked attempts, so pull now rather than at the next poll (1 s).
                self._background_pull(name)
        for event_id, target, reason, event in plan.dead:
            await self._dead(event_id, target, reason, event)
        for event, sub, attempt, lease in plan.launch:
            self.leases.track(lease, plan.leases[lease], sub)
            lane = self.lanes[sub.name]
            if lane.open < lane.width:
                self._open(lane, event, sub, attempt, lease)
            else:
                lane.waiting.append((event, sub, attempt, lease))

    def _plan_event(self, plan: _Plan, event_id: str, item: Loaded, names: list[str] | None,
                    attempt: int, batch: str | None, unknown: dict[str, bool], now: int,
                    lease: bytes | None = None) -> None:
        """Decide what happens to one event's attempts. ``lease``: a parked attempt pulled
        back (its own message is its lease)."""
        event = item.event
        if item.error is not None:
            raise ValueError(item.error)  # dead-lettered by the caller, the rest go on
        if event is None:
            # The record expired (redis.retention) while attempts were pending: each becomes a
            # dead letter, counted, never dropped silently.
            for name in names or [ANY]:
                if name not in item.done:
                    plan.dead.append((event_id, self.subscribers.get(name, name),
                                      "event expired", None))
            log.error("event record expired with attempts pending; dead-lettered",
                      extra={"eventId": event_id, "subscribers": names or ANY})
            return
        if batch is not None and item.seen is not None and item.seen != batch:
            return  # a duplicate in this batch: the batch that stored it fans it out
        if names is None:
            targets, missing = self.router.route(event), []
        else:
            targets = [self.subscribers[n] for n in names if n in self.subscribers]
            missing = [n for n in names if n not in self.subscribers and n not in item.done]
        for name in missing:
            if unknown.get(name):  # another live worker knows it: leave it to them
                message = deliver_message(self.keys.queue, event_id, [name], attempt)
                plan.leases[message] = now + PARK_UNKNOWN_MS
            else:
                plan.dead.append((event_id, name, "subscriber removed", event))
        for sub in targets:
            if sub.name in item.done:
                continue
            plan.pending[sub.name][event_id] = int(event.received_at * 1000)
            lane = self.lanes[sub.name]
            own = deliver_message(self.keys.queue, event_id, [sub.name], attempt)
            if attempt > sub.max_attempts:
                # Only a lease for an attempt past the last gets here: the worker that made
                # the last attempt died before it could record the outcome.
                plan.dead.append((event_id, sub, "no outcome recorded for the last attempt",
                                  event))
            elif self.gate.cached_hold(sub):
                # Paused, disabled or its breaker open: held, not posted, not counted.
                plan.held[sub.name][own] = now
            elif lease is None and (lane.full or lane.parked):
                # It already holds its share of the process's attempts (or has attempts parked
                # before this one: they go first): park the attempt in ``parked:{sub}``, from
                # which lanes of this subscriber in any worker pull as they have room. Not in
                # memory, not a Celery message, not counted as an attempt: one subscriber's
                # slowness costs nobody else anything.
                plan.parked[sub.name][own] = now
            else:
                own_lease = lease or deliver_message(self.keys.queue, event_id, [sub.name],
                                                     attempt + 1)
                plan.leases[own_lease] = now + self.leases.lease_ms(sub)
                plan.launch.append((event, sub, attempt, own_lease))
                lane.held += 1

    async def _pull(self, name: str) -> None:
        """Take parked attempts of ``name`` into its lane while it has room for them."""
        lane, sub = self.lanes[name], self.subscribers.get(name)
        if sub is None or lane.pulling:
            return
        lane.pulling = True
        try:
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

    async def _launch_pulled(self, sub: Subscriber, members: list[bytes]) -> None:
        taken = [(m, read_deliver_message(m)) for m in members]
        ids = [str(args.event_id) for _, args in taken]
        loaded = await self.ledger.load(ids)
        plan, now = _Plan(), now_ms()
        for (member, args), item, event_id in zip(taken, loaded, ids, strict=True):
            try:
                self._plan_event(plan, event_id, item, [sub.name], args.attempt, None, {}, now,
                                 lease=member)
            except Exception as exc:
                plan.dead.append((event_id, sub, f"cannot be processed: {exc}"[:300],
                                  item.event))
        await self._commit(plan, None)
        # What was not launched (delivered meanwhile, held, dead-lettered) needs no lease.
        done = [m for m in members if m not in plan.leases]
        if done:
            await self._persist(lambda: self.ledger.run([("ZREM", self.keys.schedule, *done)]))

    async def _puller(self) -> None:
        """Pull parked attempts into lanes with room: at once when a post ends (``_finished``)
        and every PULL_SECONDS for parked work another process left (one round trip)."""
        while True:
            await asyncio.sleep(PULL_SECONDS)
            names = [n for n in self.subscribers if self.lanes[n].held < self.lanes[n].hold]
            if not names:
                continue
            try:
                counts = await self.ledger.run([("ZCARD", self.keys.parked(n)) for n in names])
                for name, count in zip(names, counts, strict=True):
                    if count:
                        self.lanes[name].parked = True
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
              lease: bytes) -> None:
        lane.open += 1
        task = asyncio.create_task(self._deliver(event, sub, attempt, lease))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, lane, lease))

    def _finished(self, lane: Lane, lease: bytes, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.leases.forget(lease)
        lane.held -= 1
        lane.open -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
        if lane.waiting and lane.open < lane.width:
            self._open(lane, *lane.waiting.popleft())
        if (lane.parked and not lane.pulling and len(lane.waiting) <= lane.width // 2
                and lane.name in self.subscribers):
            # Refill from the parked attempts before the lane runs dry, in one go: a pull is
            # three round trips whatever it takes, so not one per finished post.
            self._background_pull(lane.name)

    # -- one attempt ------------------------------------------------------------------------

    async def _deliver(self, event: StoredEvent, sub: Subscriber, attempt: int,
                       lease: bytes) -> None:
        verdict = GO if self.gate.fast(sub) else await self.gate.admit(sub)
        if verdict.hold:
            # Paused, disabled, breaker open, or a probe already out: held (not an attempt).
            self.leases.forget(lease)
            member = deliver_message(self.keys.queue, event.event_id, [sub.name], attempt)
            await self._persist(lambda: self.ledger.hold(sub.name, lease, member))
            return
        headers = http.signed_headers(sub.signature, sub.secret, sub.headers, event.event_id,
                                      event.body)
        span = None
        if tracing.on:  # a child of the event's stored context: one trace per event
            trigger = "probe" if verdict.probe else "auto"  # the attempt's trigger
            span = tracing.attempt_span(event.trace, event.event_id, sub.name, sub.url, attempt,
                                        trigger, verdict.probe)
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
        record = Attempt(time.time(), attempt, outcome.status, outcome.error, outcome.latency_ms,
                         verdict.probe)
        context = {"eventId": event.event_id, "subscriber": sub.name, "attempt": attempt,
                   "status": outcome.status, "error": outcome.error,
                   "latency_ms": outcome.latency_ms}
        if outcome.ok:
            transitions = await self._persist(
                lambda: self.ledger.succeeded(event.event_id, sub, lease, record))
            if log.isEnabledFor(logging.INFO):
                log.info("delivered", extra=context)
        elif final:
            reason = ("410 Gone" if outcome.gone
                      else f"{attempt} attempt{'s' if attempt != 1 else ''} failed")
            transitions = await self._persist(
                lambda: self.ledger.dead_letter(event.event_id, sub, reason, event, lease,
                                                record))
            log.warning("dead-lettered", extra={**context, "reason": reason})
        else:
            delay = retry_delay(sub.backoff, attempt, outcome.retry_after)
            due = now_ms() + int(delay * 1000)
            # A failed probe does not use up an attempt: the same attempt waits for the next.
            n = attempt if verdict.probe else attempt + 1
            nxt = deliver_message(self.keys.queue, event.event_id, [sub.name], n)
            transitions = await self._persist(
                lambda: self.ledger.retry_at(event.event_id, sub, lease, record, nxt, due))
            log.info("retry scheduled", extra={**context, "retry_in_s": round(delay, 3),
                                               "probe": verdict.probe})
        self.gate.learn(sub, outcome.ok, transitions or [])
        await self._alert(transitions, sub.name, f"{event.event_id}: {record.describe()}")

    async def _dead(self, event_id: str, sub: Subscriber | str, reason: str,
                    event: StoredEvent | None) -> None:
        name = sub if isinstance(sub, str) else sub.name
        transitions = await self._persist(
            lambda: self.ledger.dead_letter(event_id, sub, reason, event))
        log.warning("dead-lettered", extra={"eventId": event_id, "subscriber": name,
                                            "reason": reason})
        await self._alert(transitions, name, f"{event_id}: {reason}")

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
