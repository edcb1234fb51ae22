"""What the parts of a worker process's delivery engine share (workers/engine.py).

The engine is one object on one asyncio loop, built from parts that each hold one concept:
planning a task (workers/planning.py), pulling parked and released attempts into lanes
(workers/pulling.py), making one attempt (workers/attempts.py). They share the state below
and call each other through the methods declared here; ``Engine`` inherits every part, so
each call resolves to the part that implements it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import defaultdict
from typing import TYPE_CHECKING

import aiohttp
import redis.asyncio as aioredis

from relay.config import Config, Subscriber
from relay.keys import Keys
from relay.models import StoredEvent
from relay.routing import Router
from workers.alerts import Alerts
from workers.gate import Gate
from workers.lanes import Lane, Lanes
from workers.leases import LeaseKeeper
from workers.ledger import Ledger, Loaded
from workers.outcomes import Recorded

if TYPE_CHECKING:
    from workers.planning import _Plan


class EngineParts:
    """The state every part of the engine reads, and the seams between the parts."""

    config: Config
    keys: Keys
    router: Router
    subscribers: dict[str, Subscriber]
    ledger: Ledger
    leases: LeaseKeeper
    gate: Gate
    alerts: Alerts
    lanes: Lanes
    _loop: asyncio.AbstractEventLoop
    _redis: aioredis.Redis
    _session: aiohttp.ClientSession
    #: Posts running on the loop, and pulls of parked or released attempts.
    _tasks: set[asyncio.Task[None]]
    _pulls: set[asyncio.Task[None]]
    #: Per subscriber, the fresh attempts this process holds (lease -> received ms).
    _fresh: defaultdict[str, dict[bytes, int]]
    #: Tasks waiting for room (thread id -> the level they need) and the event waking them.
    _room_wanted: dict[int, float]
    _room: threading.Event
    #: Attempts per event of a fan-out task, as planned lately (a moving average).
    _per_event: float
    #: Event records in memory, one per (id, received_at) while any attempt holds it.
    _live: weakref.WeakValueDictionary[tuple[str, float], StoredEvent]

    # -- planning (workers/planning.py) ------------------------------------------------------

    async def _load(self, ids: list[str], with_seen: bool = False) -> list[Loaded]:
        raise NotImplementedError

    def _shared(self, loaded: list[Loaded]) -> list[Loaded]:
        raise NotImplementedError

    async def _commit(self, plan: _Plan, taken: tuple[bytes, ...]) -> None:
        raise NotImplementedError

    def _plan_event(self, plan: _Plan, event_id: str, item: Loaded, names: list[str] | None,
                    attempt: int, batch: str | None, unknown: dict[str, bool], now: int,
                    lease: bytes | None = None, trigger: str | None = None) -> None:
        raise NotImplementedError

    # -- pulling (workers/pulling.py) --------------------------------------------------------

    def _background_pull(self, name: str) -> None:
        raise NotImplementedError

    # -- attempts (workers/attempts.py) ------------------------------------------------------

    def _open(self, lane: Lane, event: StoredEvent, sub: Subscriber, attempt: int,
              lease: bytes, trigger: str | None = None, ordered: bool = True,
              fresh: bool = False) -> None:
        raise NotImplementedError

    def _said_dead(self, event_id: str, sub: Subscriber | str, reason: str) -> None:
        raise NotImplementedError

    async def _recorded(self, recorded: Recorded | None, name: str, detail: str) -> None:
        raise NotImplementedError

    # -- the engine itself (workers/engine.py) -----------------------------------------------

    def _room_made(self) -> None:
        raise NotImplementedError
