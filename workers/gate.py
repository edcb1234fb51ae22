"""Whether an attempt may be posted now: pause, disable, circuit breaker, rate limit.

The state is shared by every worker in Redis (``health:{sub}``, relay/health.py); one Lua
script (``ADMIT``) decides for one post: hold it (paused, disabled, breaker open, or a probe
already out), let it go, let it go as the breaker's one probe (claiming the half-open state
atomically, so exactly one worker probes), or make it wait for the rate limiter.

The rate limit is GCRA (the generic cell rate algorithm, as in redis-cell): one timestamp
per subscriber, the "theoretical arrival time"; a post may start while it is at most one
second's worth of posts ahead of now, so bursts are at most one second's worth and the rate
holds across all workers together. It is applied where a post *starts* (not when a task
leases attempts), so attempts that waited in a lane cannot bunch up past the limit.

A healthy subscriber without a rate limit costs no round trip: its state is cached for
``CACHE_SECONDS`` (so a pause or another worker's breaker takes effect within that), and any
failed attempt drops the cache, so a failing subscriber is checked on every post.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from relay.batching import Script
from relay.config import Subscriber
from relay.keys import Keys
from workers.ledger import Ledger, now_ms

#: How long a "healthy" (or "held") verdict is reused without asking Redis.
CACHE_SECONDS = 1.0

# KEYS: health, rate. ARGV: now ms, probe window ms, rate interval ms (0: no limit),
# burst tolerance ms. Returns {verdict, detail}: verdict go | probe | hold | wait; detail is
# the state (hold) or the ms to wait (wait).
ADMIT = Script("""
local now, h = tonumber(ARGV[1]), KEYS[1]
if redis.call('HGET', h, 'paused') == '1' then return {'hold', 'paused'} end
local state = redis.call('HGET', h, 'state') or 'closed'
if state == 'disabled' then return {'hold', 'disabled'} end
local probe = false
if state == 'open' then
  if now < tonumber(redis.call('HGET', h, 'open_until') or 0) then return {'hold', 'open'} end
  probe = true
elseif state == 'half' then
  if now < tonumber(redis.call('HGET', h, 'probe_until') or 0) then return {'hold', 'half'} end
  probe = true
end
local interval = tonumber(ARGV[3])
if interval > 0 then
  local tat = math.max(tonumber(redis.call('GET', KEYS[2]) or 0), now)
  local wait = tat - now - tonumber(ARGV[4])
  if wait > 0 then return {'wait', tostring(wait)} end
  redis.call('SET', KEYS[2], tat + interval, 'PX', math.ceil(tat + interval - now) + 1000)
end
if probe then
  redis.call('HSET', h, 'state', 'half', 'probe_until', now + tonumber(ARGV[2]))
  return {'probe', 'half'}
end
return {'go', 'closed'}
""")


class Verdict(msgspec.Struct, frozen=True):
    kind: str            # go | probe | hold | wait
    detail: str = ""     # the state held in, or ms to wait

    @property
    def hold(self) -> bool:
        return self.kind == "hold"

    @property
    def probe(self) -> bool:
        return self.kind == "probe"


GO = Verdict("go", "closed")


class Gate:
    def __init__(self, ledger: Ledger, keys: Keys, lease_grace: float) -> None:
        self._ledger = ledger
        self._keys = keys
        self.lease_grace = lease_grace
        #: subscriber -> (state, monotonic time learnt, ms until which "open" holds)
        self._cache: dict[str, tuple[str, float, int]] = {}

    def cached_hold(self, sub: Subscriber) -> str | None:
        """The state a fresh cached verdict holds ``sub`` in, if any (no round trip)."""
        cached = self._cache.get(sub.name)
        if cached is None or time.monotonic() - cached[1] >= CACHE_SECONDS:
            return None
        state, _, open_until = cached
        if state in ("paused", "disabled", "half") or (state == "open"
                                                       and now_ms() < open_until):
            return state
        return None

    def fast(self, sub: Subscriber) -> bool:
        """True when ``sub`` may post now without asking Redis (no rate limit, a fresh
        "healthy" verdict cached): the common case, checked without an await."""
        if sub.rate_limit is not None:
            return False
        cached = self._cache.get(sub.name)
        return (cached is not None and cached[0] == "closed"
                and time.monotonic() - cached[1] < CACHE_SECONDS)

    async def admit(self, sub: Subscriber) -> Verdict:
        """May an attempt of ``sub`` be posted now? Waits here for the rate limiter."""
        while True:
            if self.fast(sub):
                return GO
            verdict = await self._ask(sub)
            if verdict.kind != "wait":
                return verdict
            await asyncio.sleep(int(verdict.detail) / 1000)

    async def _ask(self, sub: Subscriber) -> Verdict:
        interval, burst = 0, 0
        if sub.rate_limit is not None:
            interval = max(1, int(1000 / sub.rate_limit))
            # at most one second's worth at once (at least one post)
            burst = max(0, 1000 - interval)
        probe_window = int((sub.timeout + self.lease_grace) * 1000)
        kind, detail = await self._ledger.script(
            ADMIT, (self._keys.health(sub.name), self._keys.rate(sub.name)),
            (now_ms(), probe_window, interval, burst))
        verdict = Verdict(kind.decode(), detail.decode())
        if verdict.kind in ("go", "probe"):
            self._remember(sub.name, "closed" if verdict.kind == "go" else "half")
        elif verdict.hold:
            self._remember(sub.name, verdict.detail)
        return verdict

    def _remember(self, name: str, state: str, open_until: int = 0) -> None:
        self._cache[name] = (state, time.monotonic(), open_until)

    def learn(self, sub: Subscriber, ok: bool, transitions: list[str]) -> None:
        """What an outcome script said: keep the cache in step with Redis."""
        if "opened" in transitions:
            until = now_ms() + int(sub.circuit_breaker.cool_down * 1000)
            self._remember(sub.name, "open", until)
        elif "disabled" in transitions:
            self._remember(sub.name, "disabled")
        elif ok:
            self._remember(sub.name, "closed")
        else:
            self._cache.pop(sub.name, None)  # failing: ask Redis before every post

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)
