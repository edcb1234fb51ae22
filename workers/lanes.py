"""Lanes: how many attempts of each subscriber one worker process holds, and posts at once.

Each subscriber holds at most an equal share of ``worker.max_in_flight`` (its *hold*), so
memory stays flat and a slow subscriber fills only its own share; past it, the engine parks
the attempt in the Redis schedule, paced at the rate this subscriber frees posts. Of what it
holds, at most its share of ``worker.max_connections`` (its *width*, at least ``MIN_LANE``)
are open posts; the rest wait in order. A thousand posts open at once cost each post twice
the client CPU of sixty-four (211 against 97 us; docs/benchmarks.md), flood the subscriber,
and deliver no faster. Each subscriber has its own lane, so subscribers that share a host do
not share a limit, and one subscriber's slowness never takes another's turn.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from typing import Any

from relay.config import Subscriber

#: Fewest posts a subscriber may have open at once, however many subscribers share
#: ``worker.max_connections``.
MIN_LANE = 2
#: Latency assumed for a subscriber not yet heard from (s), and the spread added to parked
#: attempts' due times (ms) so that they do not return in one wave.
INITIAL_LATENCY = 0.1
PARK_JITTER_MS = 200


class Lane:
    """One subscriber's attempts in one process: ``width`` posts open at most, the rest wait
    in arrival order (each leased in Redis; workers/leases.py keeps the lease ahead)."""

    def __init__(self, width: int, hold: int) -> None:
        self.width = width
        self.hold = hold        # most attempts held (open + waiting) before parking
        self.held = 0
        self.open = 0
        self.latency = INITIAL_LATENCY  # recent post latency (s), moving average
        self.next_free = 0.0            # pacing clock for parked attempts (unix ms)
        self.waiting: deque[Any] = deque()

    @property
    def full(self) -> bool:
        return self.held >= self.hold

    def observe(self, latency_ms: float) -> None:
        self.latency = 0.8 * self.latency + 0.2 * latency_ms / 1000

    def parking_slot(self, now: int, count: int, rate: float | None) -> int:
        """When ``count`` parked attempts should come back: paced at the rate this lane frees
        posts (width / latency, or the subscriber's rate limit if slower), so a backlog behind
        a slow subscriber returns at the rate it can be served instead of cycling."""
        pace_ms = 1000 * self.latency / self.width
        if rate:
            pace_ms = max(pace_ms, 1000 / rate)
        slot = max(now, self.next_free) + pace_ms * count
        self.next_free = slot
        return int(slot) + random.randint(0, PARK_JITTER_MS)


class Lanes:
    """Every subscriber's lane in this process, sized from the worker settings."""

    def __init__(self) -> None:
        self._lanes: dict[str, Lane] = {}

    def resize(self, subscribers: Iterable[Subscriber], max_in_flight: int,
               max_connections: int) -> None:
        """(Re)size the lanes for this set of subscribers; a removed subscriber's lane stays
        until what it holds has ended."""
        names = [s.name for s in subscribers]
        n = max(1, len(names))
        hold = max(1, max_in_flight // n)
        width = min(hold, max(MIN_LANE, max_connections // n))
        for name in names:
            lane = self._lanes.setdefault(name, Lane(width, hold))
            lane.width, lane.hold = width, hold
        for name in [name for name, lane in self._lanes.items()
                     if name not in names and lane.held == 0]:
            del self._lanes[name]

    def __getitem__(self, name: str) -> Lane:
        return self._lanes[name]

    def busy(self) -> list[str]:
        """Subscribers holding attempts in this process."""
        return [name for name, lane in self._lanes.items() if lane.held]

    def held(self) -> int:
        return sum(lane.held for lane in self._lanes.values())
