"""Statistics of outcomes, kept in the process and written to Redis once a second.

The admin's figures (``stats:{minute}``, ``totals``: relay/counters.py) and each
subscriber's ``last_success_at`` (relay/health.py) are statistics, not state: nothing
decides anything from them. Written by the outcome script they were most of its commands (two
``HINCRBY`` per counter, the minute's ``EXPIRE``, an ``HSET`` of the subscriber's health hash
per success: 8 of its 16 commands for a delivered attempt). So each worker process counts
them here, after the outcome script that recorded the outcome has returned, and ``flush``
writes what it counted in one script call per second (and when the process drains).

What this costs: the admin's figures lag by up to a second; a process killed by SIGKILL
loses the statistics of at most its last second, never an outcome (the outcome script wrote
that). A flush that fails (Redis away) keeps its counts for the next one, so a Redis outage
delays statistics rather than losing them; a flush whose answer is lost after Redis ran it
(a timeout at that very moment) may count that second twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from relay.batching import ARGV_FROM_FN, GroupCommit, Script
from relay.clock import now_ms
from relay.counters import LATENCY_BUCKETS_MS, latency_bucket

log = logging.getLogger("relay.worker")

#: How often the counts are written (seconds).
FLUSH_SECONDS = 1.0

# ARGV: key prefix, stats ttl s, then sections, each led by its count:
#   minutes  n groups x (minute, k, k x (field, increment))  -> stats:{minute} (and its TTL)
#   totals   k x (field, increment)                          -> totals
#   sums     k x (field, float increment)                    -> totals (HINCRBYFLOAT)
#   success  k x (subscriber, ms)                            -> health:{sub} last_success_at,
#                                                               unless a later one is there
#   then this process's id and the time, and
#   held     k x (subscriber, count, oldest received ms)     -> inflight {sub}|{process}
#   ended    k x subscriber                                  <- inflight {sub}|{process}
FLUSH = Script(ARGV_FROM_FN + """
local p, ttl = ARGV[1], ARGV[2]
local take = argv_from(3)
for _ = 1, tonumber(take()) do
  local key, k = p .. 'stats:' .. take(), tonumber(take())
  for _ = 1, k do redis.call('HINCRBY', key, take(), take()) end
  redis.call('EXPIRE', key, ttl)
end
for _ = 1, tonumber(take()) do redis.call('HINCRBY', p .. 'totals', take(), take()) end
for _ = 1, tonumber(take()) do redis.call('HINCRBYFLOAT', p .. 'totals', take(), take()) end
for _ = 1, tonumber(take()) do
  local health, at = p .. 'health:' .. take(), take()
  local last = tonumber(redis.call('HGET', health, 'last_success_at') or 0)
  if tonumber(at) > last then redis.call('HSET', health, 'last_success_at', at) end
end
local process, now = take(), take()
for _ = 1, tonumber(take()) do
  local sub, count, oldest = take(), take(), take()
  redis.call('HSET', p .. 'inflight', sub .. '|' .. process, count .. ' ' .. oldest .. ' ' .. now)
end
for _ = 1, tonumber(take()) do redis.call('HDEL', p .. 'inflight', take() .. '|' .. process) end
return 1
""")


#: subscriber -> its counter fields: the latency buckets', then ls, d, f, x (relay/counters.py)
_FIELDS: dict[str, tuple[str, ...]] = {}


def _fields(sub: str) -> tuple[str, ...]:
    names = tuple(f"{sub}|l{i}" for i in range(len(LATENCY_BUCKETS_MS) + 1)) + tuple(
        f"{sub}|{x}" for x in ("ls", "d", "f", "x"))
    if len(_FIELDS) < 10_000:
        _FIELDS[sub] = names
    return names


class Tally:
    """Counts of one process since its last flush, and what it holds now.

    ``in_flight`` (set by the engine): per subscriber, how many first attempts of a fan-out
    the process holds and the oldest one's received ms. Those deliveries are pending but have
    no note in ``pending:{sub}`` (workers/planning.py ``_plan_event``); each flush writes the
    figures to ``inflight`` (relay/keys.py), where the admin adds them to the pending ones.
    """

    def __init__(self, prefix: str, stats_ttl: int) -> None:
        self.prefix = prefix
        self.stats_ttl = stats_ttl
        self.in_flight: Callable[[], dict[str, tuple[int, int]]] = dict
        self.process = f"{socket.gethostname()}:{os.getpid()}"
        #: Subscribers this process's last flush wrote in-flight figures for.
        self._reported: set[str] = set()
        self._clear()

    def _clear(self) -> None:
        #: minute -> field -> count (the fields of relay/counters.py)
        self.minutes: dict[int, dict[str, int]] = {}
        self.totals: dict[str, int] = {}
        #: field -> sum of latencies (ms)
        self.sums: dict[str, float] = {}
        #: subscriber -> ms of its last 2xx
        self.success: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.minutes or self.totals or self.sums or self.success)

    def _add(self, minute: dict[str, int], field: str, n: int = 1) -> None:
        minute[field] = minute.get(field, 0) + n
        self.totals[field] = self.totals.get(field, 0) + n

    def outcome(self, sub: str, mode: str, now_ms: int, latency_ms: float | None) -> None:
        """One outcome the outcome script recorded: ``mode`` ok | retry | dead;
        ``latency_ms`` None when no attempt was made (a dead letter without a post)."""
        minute = self.minutes.get(now_ms // 60_000)
        if minute is None:
            minute = self.minutes[now_ms // 60_000] = {}
        names = _FIELDS.get(sub) or _fields(sub)
        if latency_ms is not None:
            self._add(minute, names[latency_bucket(latency_ms)])
            self.sums[names[-4]] = self.sums.get(names[-4], 0.0) + latency_ms
        if mode == "ok":
            self._add(minute, names[-3])
            if latency_ms is not None and now_ms > self.success.get(sub, 0):
                self.success[sub] = now_ms
        elif mode == "retry":
            self._add(minute, names[-2])
        else:
            if latency_ms is not None:
                self._add(minute, names[-2])
            self._add(minute, names[-1])

    def take(self) -> list[Any] | None:
        """The FLUSH script's arguments for everything counted, which is then forgotten
        (``give_back`` if the write fails), and the in-flight figures; None if there is
        nothing to write."""
        held = self.in_flight()
        ended = self._reported - set(held)
        if not (self or held or ended):
            return None
        args: list[Any] = [self.prefix, self.stats_ttl, len(self.minutes)]
        for minute, fields in self.minutes.items():
            args += [minute, len(fields)]
            for field, n in fields.items():
                args += [field, n]
        for section in (self.totals, self.sums, self.success):
            args.append(len(section))
            for field, value in section.items():
                args += [field, value]
        args += [self.process, now_ms(), len(held)]
        for sub, (count, oldest) in held.items():
            args += [sub, count, oldest]
        args += [len(ended), *ended]
        self._taken = (self.minutes, self.totals, self.sums, self.success)
        self._held = set(held)
        self._clear()
        return args

    def give_back(self) -> None:
        """A flush failed: what it carried is counted again, for the next one."""
        minutes, totals, sums, success = self._taken
        for minute, fields in minutes.items():
            mine = self.minutes.setdefault(minute, {})
            for field, n in fields.items():
                mine[field] = mine.get(field, 0) + n
        for field, n in totals.items():
            self.totals[field] = self.totals.get(field, 0) + n
        for field, s in sums.items():
            self.sums[field] = self.sums.get(field, 0.0) + s
        for sub, at in success.items():
            self.success[sub] = max(at, self.success.get(sub, 0))

    async def flush(self, commit: GroupCommit) -> None:
        """Write what was counted (one script call); kept for the next flush on failure."""
        args = self.take()
        if args is None:
            return
        try:
            await commit.call(FLUSH, (), args)
        except BaseException:
            self.give_back()
            raise
        self._reported = self._held

    async def run(self, commit: GroupCommit) -> None:
        """Flush every FLUSH_SECONDS until cancelled."""
        failing = False
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush(commit)
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("could not write delivery statistics; kept for the next try",
                                extra={"error": repr(exc)})
                failing = True
            except Exception:
                log.exception("writing delivery statistics failed; kept for the next try")

    async def final(self, commit: GroupCommit, timeout: float = 5.0) -> None:
        """The last flush of a process that stops (drain): best effort, bounded."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(timeout):
                await self.flush(commit)
