"""Lanes: how many attempts of each subscriber one worker process holds, and posts at once.

Each subscriber holds at most an equal share of ``worker.max_in_flight`` (its *hold*), so
memory stays flat and a slow subscriber fills only its own share; past it, the engine parks
the attempt in Redis (``parked:{sub}``), and lanes of that subscriber pull parked attempts
back, oldest first, as they have room (in whichever worker process). Of what it
holds, at most its share of ``worker.max_connections`` (its *width*, at least ``MIN_LANE``)
are open posts; the rest wait in order. A thousand posts open at once cost each post twice
the client CPU of sixty-four (211 against 97 us; docs/benchmarks.md), flood the subscriber,
and deliver no faster. Each subscriber has its own lane, so subscribers that share a host do
not share a limit, and one subscriber's slowness never takes another's turn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from relay.config import Subscriber

#: Fewest posts a subscriber may have open at once, however many subscribers share
#: ``worker.max_connections``.
MIN_LANE = 2
#: Latency assumed for a subscriber not yet heard from (s).
INITIAL_LATENCY = 0.1


class Lane:
    """One subscriber's attempts in one process: ``width`` posts open at most, the rest wait
    in arrival order (each leased in Redis; workers/leases.py keeps the lease ahead)."""

    def __init__(self, name: str, width: int, hold: int) -> None:
        self.name = name
        self.width = width
        self.hold = hold        # most attempts held (open + waiting) before parking
        self.held = 0
        self.open = 0
        self.latency = INITIAL_LATENCY  # recent post latency (s), moving average
        self.parked = False     # attempts of this subscriber are (or may be) parked in Redis
        self.ready = False      # released ordered events may wait in ``ordready:{sub}``
        self.pulling = False    # a pull of parked attempts is in flight
        self.parkings = 0       # plans that parked attempts, written so far (see Engine._pull)
        self.waiting: deque[Any] = deque()

    @property
    def full(self) -> bool:
        return self.held >= self.hold

    def observe(self, latency_ms: float) -> None:
        self.latency = 0.8 * self.latency + 0.2 * latency_ms / 1000


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
            lane = self._lanes.setdefault(name, Lane(name, width, hold))
            lane.width, lane.hold = width, hold
        for name in [name for name, lane in self._lanes.items()
                     if name not in names and lane.held == 0]:
            del self._lanes[name]

    def __getitem__(self, name: str) -> Lane:
        return self._lanes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._lanes

    def busy(self) -> list[str]:
        """Subscribers holding attempts in this process."""
        return [name for name, lane in self._lanes.items() if lane.held]

    def held(self) -> int:
        return sum(lane.held for lane in self._lanes.values())
