"""The delivery engine of one worker process: an asyncio loop beside Celery's task thread.

Celery runs tasks synchronously, one at a time per pool slot; a delivery that waits 10 s on a
slow subscriber would hold that slot and delay every other event behind it. So a task only
*starts* deliveries: it loads the event, leases every pending (event, subscriber) attempt in
the schedule (see ``workers/ledger.py``), hands the posts to this process's event loop and
returns. The loop holds up to ``worker.max_in_flight`` attempts, shared equally among
subscribers; an attempt whose subscriber holds its whole share is parked in the schedule,
paced at the rate that subscriber answers, so memory stays flat and a slow subscriber fills
only its own share. Of a subscriber's attempts, only its *lane* (``worker.max_connections``
shared equally) are open posts at once, on one shared ``aiohttp.ClientSession``; the rest wait
in order. A slow subscriber costs open sockets, never another subscriber's turn.

Because each attempt is leased in Redis before it starts, a SIGKILL at any moment loses
nothing: the lease falls due and the scheduler queues the attempt again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relay.config import Config, Subscriber
from relay.keys import Keys
from relay.models import StoredEvent
from relay.queue import deliver_message
from workers import http
from workers.backoff import retry_delay
from workers.ledger import Attempt, Ledger, now_ms
from workers.routing import Router

log = logging.getLogger("relay.worker")
T = TypeVar("T")

#: Latency assumed for a subscriber not yet heard from (s), and the spread added to parked
#: attempts' due times (ms) so that they do not return in one wave.
INITIAL_LATENCY = 0.1
PARK_JITTER_MS = 200
#: How long an outcome write is retried while Redis is away before the lease takes over.
PERSIST_FOR = 120.0
#: Fewest posts a subscriber may have open at once, however many subscribers share
#: ``worker.max_connections``.
MIN_LANE = 2
#: Back-pressure: a task waits up to ROOM_WAIT seconds for room in the lanes that drain
#: quickly (all they hold posted within QUICK_DRAIN seconds at their recent latency).
ROOM_WAIT = 2.0
QUICK_DRAIN = 0.5


class Lane:
    """One subscriber's attempts in one process: ``width`` posts open at most, the rest wait
    in arrival order (each leased in Redis; ``Engine._keep_leases`` keeps the lease ahead)."""

    def __init__(self, width: int, hold: int) -> None:
        self.width = width
        self.hold = hold        # most attempts held (open + waiting) before parking
        self.held = 0
        self.open = 0
        self.last_done = 0.0    # loop time a post of this lane last ended (or an idle one began)
        self.waiting: deque[tuple[StoredEvent, Subscriber, int, bytes]] = deque()


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = Keys(queue=config.worker.queue)
        self.router = Router(config.subscribers)
        self._grace = config.worker.lease_grace
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay-delivery",
                                        daemon=True)
        self._thread.start()
        self._tasks: set[asyncio.Task[None]] = set()
        self._call(self._setup())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _setup(self) -> None:
        # Each subscriber may hold an equal share of worker.max_in_flight, so the total stays
        # bounded (flat memory) and a slow one fills only its own share; and may have an
        # equal share of worker.max_connections open: a thousand concurrent posts from one
        # process cost each post twice the client CPU of 64 (docs/benchmarks.md).
        n = max(1, len(self.config.subscribers))
        share = max(1, self.config.worker.max_in_flight // n)
        width = min(share, max(MIN_LANE, self.config.worker.max_connections // n))
        self._lanes = {sub.name: Lane(width, share) for sub in self.config.subscribers}
        self._leases: dict[bytes, tuple[int, Subscriber]] = {}  # held: lease -> (due ms, sub)
        self._freed = asyncio.Event()  # set whenever a held attempt ends
        self._latency: dict[str, float] = {}     # recent post latency (s), per subscriber
        self._next_free: dict[str, float] = {}   # pacing clock for parked attempts (unix ms)
        self._redis = aioredis.Redis.from_url(self.config.redis.url, socket_connect_timeout=2,
                                              health_check_interval=10)
        self.ledger = Ledger(self._redis, self.keys, self.config.redis.retention)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self._keeper = asyncio.create_task(self._keep_leases())

    # -- called from the Celery task thread -------------------------------------------------

    def start(self, event_ids: str | list[str], subscribers: list[str] | None, attempt: int,
              batch: str | None = None) -> int:
        """Lease and launch the attempts of one task; returns how many were launched."""
        return self._call(self._start(event_ids, subscribers, attempt, batch))

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` for held deliveries; returns how many were left (their
        leases bring them back)."""
        async def wait() -> int:
            deadline = time.monotonic() + timeout
            # A post that ends opens the next waiting one of its lane: wait for those too.
            while self._tasks and time.monotonic() < deadline:
                await asyncio.wait(list(self._tasks), timeout=deadline - time.monotonic(),
                                   return_when=asyncio.FIRST_COMPLETED)
            return sum(lane.held for lane in self._lanes.values())

        left = self._call(wait())
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        return left

    async def _close(self) -> None:
        self._keeper.cancel()
        await self._session.close()
        await self._redis.aclose()

    # -- on the loop --------------------------------------------------------------------------

    async def _start(self, event_ids: str | list[str], names: list[str] | None, attempt: int,
                     batch: str | None) -> int:
        # This task's own message: noted in ``unclaimed`` when queued, dropped from it here
        # (with the leases below) so it is not queued again (see workers/scheduler.py).
        taken = deliver_message(self.keys.queue, event_ids, names, attempt, batch)
        ids = [event_ids] if isinstance(event_ids, str) else list(dict.fromkeys(event_ids))
        await self._room(len(ids))
        now = now_ms()
        leases: dict[bytes, int] = {}
        launch: list[tuple[StoredEvent, Subscriber, bytes]] = []
        for event_id, (event, done, seen) in zip(
                ids, await self.ledger.load(ids, batch is not None), strict=True):
            if event is None:
                log.error("event record missing (expired or never stored); nothing to deliver",
                          extra={"eventId": event_id})
                continue
            if batch is not None and seen is not None and seen != batch:
                continue  # a duplicate in this batch: the batch that stored it fans it out
            targets = self._targets(event, names, done)
            parked: list[str] = []
            park_at = 0
            for sub in targets:
                if attempt > sub.max_attempts:
                    # Only a lease for an attempt past the last gets here: the worker that
                    # made the last attempt died before it could record the outcome.
                    await self.ledger.dead_letter(event, sub.name, None, None,
                                                  "no outcome recorded for the last attempt")
                    log.warning("dead-lettered", extra={
                        "eventId": event_id, "subscriber": sub.name,
                        "reason": "last attempt lost"})
                elif (lane := self._lanes[sub.name]).held >= lane.hold:
                    # This subscriber already holds its share of the process's attempts: park
                    # the attempt in the schedule (not in memory, not counted as an attempt)
                    # rather than wait, so its slowness never holds up anyone else.
                    parked.append(sub.name)
                    park_at = max(park_at, self._parking_slot(sub.name, now))
                else:
                    lease = deliver_message(self.keys.queue, event_id, [sub.name], attempt + 1)
                    leases[lease] = now + self._lease_ms(sub)
                    launch.append((event, sub, lease))
                    lane.held += 1
            if parked:
                # One message per event for all its parked subscribers: a Celery message costs
                # ~2 ms of worker CPU, so one per (event, subscriber) would turn a burst into
                # more work than the posts themselves.
                leases[deliver_message(self.keys.queue, event_id, parked, attempt)] = park_at
        try:
            await self.ledger.lease(leases, taken)
        except BaseException:
            for _, sub, _ in launch:
                self._lanes[sub.name].held -= 1
            raise
        for event, sub, lease in launch:
            self._leases[lease] = (leases[lease], sub)
            lane = self._lanes[sub.name]
            if lane.open < lane.width:
                self._open(lane, event, sub, attempt, lease)
            else:
                lane.waiting.append((event, sub, attempt, lease))
        return len(launch)

    def _open(self, lane: Lane, event: StoredEvent, sub: Subscriber, attempt: int,
              lease: bytes) -> None:
        if lane.open == 0:
            lane.last_done = self._loop.time()  # an idle lane starting again counts as moving
        lane.open += 1
        task = asyncio.create_task(self._deliver(event, sub, attempt, lease))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, lane, lease))

    async def _room(self, events: int) -> None:
        """Wait (up to ROOM_WAIT) until each lane that drains quickly has room for a task's
        ``events``. Without this a saturated worker takes message after message, parks what
        its lanes cannot hold, and the parked attempts come back as more messages (~2 ms of
        CPU each): the backlog cycles through the schedule instead of waiting in the Redis
        queue. A lane that drains slowly is never waited for (its attempts are parked), and
        one whose posts stop ending counts as slow after QUICK_DRAIN: a subscriber that
        hangs holds others up by half a second at most, once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ROOM_WAIT
        while any(self._crowded(name, lane, loop.time(), events)
                  for name, lane in self._lanes.items()):
            left = deadline - loop.time()
            if left <= 0:
                return
            self._freed.clear()
            # Look again at least every 0.1 s: a lane that stops answering turns slow.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.1)):
                    await self._freed.wait()

    def _crowded(self, name: str, lane: Lane, now: float, events: int) -> bool:
        """Too full for ``events`` more, yet draining quickly: worth waiting for."""
        if lane.held + min(events, max(1, lane.hold // 2)) <= lane.hold:
            return False
        if now - lane.last_done > QUICK_DRAIN:
            return False  # nothing ended lately: its posts hang, whatever its past latency
        drain = lane.held * self._latency.get(name, INITIAL_LATENCY) / lane.width
        return drain < QUICK_DRAIN

    def _lease_ms(self, sub: Subscriber) -> int:
        """How long a lease lasts past its last renewal: the post, then the grace."""
        return int((sub.timeout + self._grace) * 1000)

    async def _keep_leases(self) -> None:
        """Push back the leases of attempts this process still holds before they fall due.

        An attempt may wait in its lane behind slow posts for longer than one post's
        timeout; its lease must not fall due meanwhile (the scheduler would queue it again:
        a duplicate post). So, like SQS's ChangeMessageVisibility or a Celery visibility
        timeout renewed while a task runs, a live worker renews what it holds, and a dead
        one's leases fall due ``timeout + lease_grace`` after its last renewal. Nothing is
        written while deliveries finish quickly: only leases within half a grace of due.
        """
        interval = max(0.1, min(5.0, self._grace / 4))
        while True:
            await asyncio.sleep(interval)
            now = now_ms()
            soon = now + int(self._grace * 500)
            renew = {lease: now + self._lease_ms(sub)
                     for lease, (due, sub) in self._leases.items()
                     if due - int(sub.timeout * 1000) < soon}
            if not renew:
                continue
            try:
                await self.ledger.renew(renew)
            except (RedisError, OSError) as exc:
                log.warning("could not renew leases; retrying", extra={"error": repr(exc)})
                continue
            except Exception:  # a keeper that died would let held attempts be posted twice
                log.exception("renewing leases failed; retrying")
                continue
            for lease, due in renew.items():
                if lease in self._leases:
                    self._leases[lease] = (due, self._leases[lease][1])

    def _parking_slot(self, name: str, now: int) -> int:
        """When a parked attempt should come back: paced at the rate this subscriber frees
        posts (its lane's width / its recent latency), so a long backlog behind a slow
        subscriber returns at the rate it can be served instead of cycling through the queue."""
        pace_ms = 1000 * self._latency.get(name, INITIAL_LATENCY) / self._lanes[name].width
        slot = max(now, self._next_free.get(name, 0.0)) + pace_ms
        self._next_free[name] = slot
        return int(slot) + random.randint(0, PARK_JITTER_MS)

    def _finished(self, lane: Lane, lease: bytes, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._leases.pop(lease, None)
        lane.held -= 1
        lane.open -= 1
        lane.last_done = self._loop.time()
        self._freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
        if lane.waiting and lane.open < lane.width:
            self._open(lane, *lane.waiting.popleft())

    def _targets(self, event: StoredEvent, names: list[str] | None, done: set[str]
                 ) -> list[Subscriber]:
        if names is None:
            chosen = self.router.route(event)
        else:
            chosen = []
            for name in names:
                sub = self.config.subscriber(name)
                if sub is None:
                    log.warning("subscriber no longer configured; delivery dropped",
                                extra={"eventId": event.event_id, "subscriber": name})
                else:
                    chosen.append(sub)
        return [s for s in chosen if s.name not in done]

    async def _deliver(self, event: StoredEvent, sub: Subscriber, attempt: int,
                       lease: bytes) -> None:
        outcome = await http.attempt(self._session, sub, event)
        # The outcome write below re-scores or removes the lease: stop renewing it first.
        self._leases.pop(lease, None)
        seen = self._latency.get(sub.name, INITIAL_LATENCY)
        self._latency[sub.name] = 0.8 * seen + 0.2 * outcome.latency_ms / 1000
        record = Attempt(time.time(), attempt, outcome.status, outcome.error, outcome.latency_ms)
        context = {"eventId": event.event_id, "subscriber": sub.name, "attempt": attempt,
                   "status": outcome.status, "error": outcome.error,
                   "latency_ms": outcome.latency_ms}
        if outcome.ok:
            await self._persist(lambda: self.ledger.succeeded(event.event_id, sub.name, lease,
                                                              record))
            log.info("delivered", extra=context)
        elif outcome.gone or attempt >= sub.max_attempts:
            reason = "410 Gone" if outcome.gone else f"{attempt} attempts failed"
            await self._persist(lambda: self.ledger.dead_letter(event, sub.name, lease, record,
                                                                reason))
            log.warning("dead-lettered", extra={**context, "reason": reason})
        else:
            delay = retry_delay(sub.backoff, attempt, outcome.retry_after)
            due = now_ms() + int(delay * 1000)
            await self._persist(lambda: self.ledger.retry_at(event.event_id, sub.name, lease,
                                                             due, record))
            log.info("retry scheduled", extra={**context, "retry_in_s": round(delay, 3)})

    async def _persist(self, write: Callable[[], Awaitable[None]]) -> None:
        """Record an outcome, retrying while Redis is away; the lease covers the rest."""
        deadline = time.monotonic() + PERSIST_FOR
        pause = 0.1
        while True:
            try:
                await write()
                return
            except (RedisError, OSError) as exc:
                if time.monotonic() > deadline:
                    log.error("could not record outcome; the lease will retry it",
                              extra={"error": repr(exc)})
                    return
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


def shutdown_engine(timeout: float) -> None:
    global _engine
    with _engine_lock:
        if _engine is not None and _engine_pid == os.getpid():
            left = _engine.drain(timeout)
            if left:
                log.warning("stopped with deliveries in flight; their leases will retry them",
                            extra={"in_flight": left})
            _engine = None
