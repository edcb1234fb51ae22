"""Time as Redis keeps it: the one clock every machine of the hub compares.

Lease and retry due times, ``unclaimed`` deadlines, ``known`` freshness, breaker cool-downs
and pending ages are written by one machine and compared by another (the scheduler of any
worker, the heartbeat, the admin). Compared on each host's own wall clock, a worker 15 s
behind writes leases already due (another worker's scheduler queues them at once: the
attempt is posted twice), and one whose notes look 15 s old has its subscribers taken for
removed (their attempts dead-lettered during a rolling deploy). So each process measures
how far its clock is from Redis's (``TIME``, halfway through the round trip, keeping the
sample with the shortest round trip of the last few) and every such time is this host's
clock plus that offset. Reading ``TIME`` on every call instead would cost a round trip per
delivery.

Wall-clock times that only this host reads (latencies, timeouts) use ``time.monotonic``;
a Standard Webhooks timestamp is for the subscriber to check against its own clock, so it
stays on this host's (NTP-kept) clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("relay.clock")

#: Samples kept; the one with the shortest round trip sets the offset.
SAMPLES = 12
#: A sample whose round trip took longer says too little about the offset.
MAX_RTT = 0.25
#: Round trips one measure may take to find a fast one.
TRIES = 3
#: Past this, the offset is logged (once per process, and again if it changes that much).
WARN_OFFSET_MS = 1000
#: An offset smaller than this is taken as none: a sample is only good to half its round trip
#: (a few ms on a busy machine), and processes on one host would otherwise disagree by that
#: much about the same instant (a retry due in 1.5 s queued 17 ms early by another process).
#: What the offset guards against (leases and notes of seconds) needs far less precision.
DEADBAND_MS = 100


class Clock:
    def __init__(self) -> None:
        self.offset_ms = 0.0
        self._samples: deque[tuple[float, float]] = deque(maxlen=SAMPLES)  # (rtt, offset)
        self._warned_at: float | None = None

    def now_ms(self) -> int:
        """Milliseconds since the epoch on Redis's clock."""
        return int(time.time() * 1000 + self.offset_ms)

    def now(self) -> float:
        """Seconds since the epoch on Redis's clock."""
        return time.time() + self.offset_ms / 1000

    def measure(self, client: Any) -> None:
        """Sample until one round trip is fast enough (at most ``TRIES``), from a synchronous
        redis-py client."""
        for attempt in range(1, TRIES + 1):
            before = time.time()
            seconds, micros = client.time()
            if self._sample(before, time.time(), seconds, micros, last=attempt == TRIES):
                return

    async def ameasure(self, client: Any) -> None:
        """``measure``, from an asyncio redis-py client."""
        for attempt in range(1, TRIES + 1):
            before = time.time()
            seconds, micros = await client.time()
            if self._sample(before, time.time(), seconds, micros, last=attempt == TRIES):
                return

    def _sample(self, before: float, after: float, seconds: int, micros: int,
                last: bool = False) -> bool:
        """Keep one sample; False when its round trip was too slow to say much (measure
        again). The ``last`` try of a process that has no sample yet is kept all the same:
        a process's first round trip is often slow (it opens the connection, on a busy
        host), and an offset good to half of it beats none, which left a host 20 s behind
        writing its first notes and leases on its own clock."""
        rtt = after - before
        if rtt > MAX_RTT and (self._samples or not last):
            return False
        offset = (int(seconds) + int(micros) / 1e6 - (before + after) / 2) * 1000
        self._samples.append((rtt, offset))
        best = min(self._samples)[1]
        self.offset_ms = best if abs(best) >= DEADBAND_MS else 0.0
        if abs(self.offset_ms) >= WARN_OFFSET_MS and (
                self._warned_at is None
                or abs(self.offset_ms - self._warned_at) >= WARN_OFFSET_MS):
            self._warned_at = self.offset_ms
            log.warning("this host's clock differs from Redis's; the hub uses Redis's time",
                        extra={"offset_ms": round(self.offset_ms)})
        return rtt <= MAX_RTT


#: This process's clock (each process measures its own: a prefork child after its fork).
CLOCK = Clock()


def now_ms() -> int:
    return CLOCK.now_ms()


def now() -> float:
    return CLOCK.now()


#: How often a long-running process without a heartbeat of its own measures again.
MEASURE_EVERY = 30.0


async def keep_measured(client: Any, every: float = MEASURE_EVERY) -> None:
    """Measure now and every ``every`` seconds, for as long as the task runs."""
    task = asyncio.current_task()
    while True:
        with contextlib.suppress(Exception):  # Redis away: keep the last offset
            await CLOCK.ameasure(client)
        # redis-py may turn a cancellation that lands mid-connect into a ConnectionError,
        # which the line above swallows: honour the cancellation all the same.
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        await asyncio.sleep(every)


def measuring(client: Any) -> Callable[[Any], AsyncIterator[None]]:
    """An aiohttp ``cleanup_ctx`` entry running ``keep_measured`` while the app serves."""
    async def ctx(app: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(keep_measured(client))
        yield
        task.cancel()
        await asyncio.wait([task], timeout=2)
    return ctx
