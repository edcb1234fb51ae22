"""The delivery engine of one worker process: an asyncio loop beside Celery's task thread.

Celery runs tasks synchronously, one at a time per pool slot; a delivery that waits 10 s on a
slow subscriber would hold that slot and delay every other event behind it. So a task only
*starts* deliveries: its events are loaded, routed, every pending (event, subscriber)
attempt leased in the schedule (workers/ledger.py) and posted on this process's event loop
(the task itself only hands its message over and returns: Engine.start). It never
waits for a subscriber: one subscriber's slowness
never holds up a task, so never another subscriber's events (a subscriber already holding its
share of the process is *parked* instead: workers/lanes.py).

The engine is put together here from its parts, one module each: ``planning`` (what a task
decides, written before any post), ``pulling`` (parked and released ordered attempts taken
into lanes), ``attempts`` (one post and its outcome); around them ``lanes`` (how much each
subscriber holds and posts at once), ``leases`` (renewing what is held), ``gate`` (pause,
breaker, rate limit), ``ledger`` (what is written to Redis), ``alerts``, ``http``. Because
each attempt is leased in Redis before it starts, a SIGKILL at any moment loses nothing: the
lease falls due and the scheduler queues the attempt again.
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
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp
from redis.exceptions import RedisError

from relay import clock, loops, tracing
from relay.config import Config
from relay.connections import async_client
from relay.keys import Keys
from relay.models import StoredEvent
from relay.routing import Router
from workers.alerts import Alerts
from workers.attempts import Attempts
from workers.gate import Gate
from workers.lanes import Lanes
from workers.leases import LeaseKeeper
from workers.ledger import Ledger, now_ms
from workers.planning import ANY, Planning, _Plan
from workers.pulling import Pulling

log = logging.getLogger("relay.worker")
T = TypeVar("T")

#: Tasks being started at once before a new one waits (Engine.start).
MAX_PENDING_STARTS = 32
#: A full process lets tasks wait for room for at most visibility_timeout / this, in all
#: (then their overflow is parked): see Engine._wait_for_room.
FULL_WAIT_SHARE = 6
KNOWN_NOTE_SECONDS = 5.0


class Engine(Planning, Pulling, Attempts):
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
