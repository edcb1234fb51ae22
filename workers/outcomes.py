"""Recording outcomes: what each attempt's end writes to Redis, all or nothing.

One Lua script (``OUTCOMES``) per batch of outcomes that end together, each outcome in it
still all or nothing (a script is atomic as a whole): the delivery record, the attempt log,
the lease, the pending index, the subscriber's health (circuit breaker, disable), for a dead
letter the letter and its index, and for an ordered event its leaving its keys, releasing
the next (relay/ordering.py). The ledger (workers/ledger.py) hands outcomes here; counters
are the tally's (workers/tally.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from relay.batching import Batcher, GroupCommit, Script
from relay.connections import text
from relay.health import RELEASE_HELD_FN
from relay.ordering import FUNCTIONS

#: Attempt records kept per (event, subscriber); older ones are trimmed.
LOG_LENGTH = 50
_encode = msgspec.msgpack.Encoder().encode


# The outcomes of attempts that ended together, each recorded all or nothing (the script is
# atomic as a whole). One call for a batch rather than one per outcome: fewer round trips and
# scripts for Redis, one msgpack blob instead of ~16 arguments per outcome for the worker to
# pack. ARGV[1]: msgpack of {prefix, retention s, log length, outcome...}; each outcome is
#   {mode (ok | retry | dead), now ms, subscriber, event id, attempt record ('' if no attempt
#    was made), lease ('' if none), probe (0/1), last error, next member, its due ms, dead
#    letter, block (0/1), ordered (0/1), breaker failures, cool-down ms, max cool-down ms,
#    disable_after ms, noted (0/1: may have a note in pending:{sub}), received ms}
# (byte strings as msgpack str: Redis's cmsgpack reads no bin). Returns, for each outcome
# that changed more than the outcome itself, its position, its health transitions and the
# ordered events its leaving released.
#
# Key names are built here from the prefix (as relay/keys.py builds them) rather than sent
# as KEYS: fine on one Redis, not on Redis Cluster. Counters and last_success_at are not
# written here: each worker process counts them and writes them once a second
# (workers/tally.py).
OUTCOMES = Script(RELEASE_HELD_FN + FUNCTIONS + """
local batch = cmsgpack.unpack(ARGV[1])
local p, ret, loglen = batch[1], batch[2], batch[3]
local schedule, breakers = p .. 'schedule', p .. 'breakers'
-- Each subscriber's breaker state, read once per batch (most outcomes are successes of a
-- healthy subscriber: they write nothing to it); dropped when an outcome writes it.
local seen = {}

local function outcome(o)
  local mode, now, sub, id, record, lease = o[1], o[2], o[3], o[4], o[5], o[6]
  local d, h = p .. 'deliveries:' .. id, p .. 'health:' .. sub
  local transitions, released = {}, {}
  if record ~= '' then
    -- EXPIRE when the log is created (and with every failure, which the delivery record's
    -- expiry follows too), not with every success; LTRIM only past its length.
    local log = p .. 'log:' .. id .. ':' .. sub
    local length = redis.call('LPUSH', log, record)
    if length == 1 or mode ~= 'ok' then redis.call('EXPIRE', log, ret) end
    if length > loglen then redis.call('LTRIM', log, 0, loglen - 1) end
  end

  -- Health: only an attempt that was made moves the breaker.
  local current = seen[sub]
  if not current then
    current = redis.call('HMGET', h, 'state', 'failures')
    seen[sub] = current
  end
  local state = current[1] or 'closed'
  if record ~= '' and mode == 'ok' then
    if state ~= 'closed' or (current[2] and current[2] ~= '0') then  -- healthy: nothing
      seen[sub] = nil
      redis.call('HSET', h, 'state', 'closed', 'failures', 0)
      redis.call('HDEL', h, 'failing_since', 'open_until', 'probe_until', 'cool_down',
                 'disabled_at')
      redis.call('ZREM', breakers, sub)
    end
    if state ~= 'closed' then
      transitions[#transitions + 1] = 'recovered'
      if redis.call('HGET', h, 'paused') ~= '1' then
        release_held(p .. 'held:' .. sub, schedule, now)
      end
    end
    state = 'closed'
  elseif record ~= '' then
    seen[sub] = nil
    local failures = redis.call('HINCRBY', h, 'failures', 1)
    redis.call('HSET', h, 'last_error', o[8], 'last_error_at', now)
    local since = tonumber(redis.call('HGET', h, 'failing_since'))
    if not since then
      since = now
      redis.call('HSET', h, 'failing_since', now)
    end
    local threshold, cool, max_cool, disable_after = o[14], o[15], o[16], o[17]
    if disable_after > 0 and now - since >= disable_after and state ~= 'disabled' then
      redis.call('HSET', h, 'state', 'disabled', 'disabled_at', now)
      redis.call('ZREM', breakers, sub)
      transitions[#transitions + 1] = 'disabled'
      state = 'disabled'
    elseif threshold > 0 and (state == 'half' or (state == 'open' and o[7] == 1)) then
      -- the probe failed: open again, the cool-down doubled up to its maximum
      local next_cool = math.min((tonumber(redis.call('HGET', h, 'cool_down')) or cool) * 2,
                                 max_cool)
      redis.call('HSET', h, 'state', 'open', 'open_until', now + next_cool,
                 'cool_down', next_cool)
      redis.call('HDEL', h, 'probe_until')
      redis.call('ZADD', breakers, now + next_cool, sub)
      state = 'open'
    elseif threshold > 0 and state == 'closed' and failures >= threshold then
      redis.call('HSET', h, 'state', 'open', 'open_until', now + cool, 'cool_down', cool)
      redis.call('ZADD', breakers, now + cool, sub)
      transitions[#transitions + 1] = 'opened'
      state = 'open'
    end
  end

  if mode == 'ok' then
    -- With the marker field '#' (no subscriber can be named so), HSET answers 2 whenever it
    -- creates the record, which then needs its EXPIRE, and 1 once any success has written
    -- the marker: every record that exists has its expiry (each other writer sets it).
    if redis.call('HSET', d, sub, 'd' .. now, '#', '') == 2 then
      redis.call('EXPIRE', d, ret)
    end
    redis.call('ZREM', schedule, lease)
    -- A fan-out's first attempt has no note in pending:{sub} (its worker counts it).
    if o[18] == 1 then redis.call('ZREM', p .. 'pending:' .. sub, id) end
    -- Ordered: the next event of each of its keys may go now (relay/ordering.py). Skipped
    -- for an event the worker knows not to be queued under this subscriber (no ordering
    -- configured, no mark in its delivery record when it was loaded).
    if o[13] == 1 then ord_advance(p, sub, id, now, ret, released) end
  elseif mode == 'retry' then
    local next, due = o[9], o[10]
    -- A failed probe keeps its attempt number (next is then attempt n, not the lease's n+1)
    -- and waits with the held attempts for the next probe.
    local to_held = o[7] == 1 and (state == 'open' or state == 'disabled')
    if next == lease and not to_held then
      redis.call('ZADD', schedule, 'XX', due, lease)
    elseif redis.call('ZREM', schedule, lease) == 1 then
      if to_held then
        redis.call('ZADD', p .. 'held:' .. sub, now, next)
      else
        redis.call('ZADD', schedule, due, next)
      end
    end
    redis.call('HSET', d, sub, (to_held and 'h' or 'r') .. due)
    redis.call('EXPIRE', d, ret)
    redis.call('ZADD', p .. 'pending:' .. sub, 'NX', o[19], id)
    redis.call('EXPIRE', p .. 'event:' .. id, ret)
  else  -- dead
    local dead = p .. 'dead:' .. sub
    redis.call('SET', p .. 'letter:' .. sub .. ':' .. id, o[11], 'EX', ret)
    redis.call('ZADD', dead, now, id)
    redis.call('ZREMRANGEBYSCORE', dead, '-inf', now - ret * 1000)
    redis.call('SADD', p .. 'deadsubs', sub)
    redis.call('HSET', d, sub, 'x' .. now)
    redis.call('EXPIRE', d, ret)
    if lease ~= '' then redis.call('ZREM', schedule, lease) end
    redis.call('ZREM', p .. 'pending:' .. sub, id)
    transitions[#transitions + 1] = 'dead_lettered'
    -- Ordered: block (on_dead: block, and a reason that blocks) keeps it first on its keys
    -- until an operator replays or purges it; otherwise the next event goes.
    if o[12] == 1 then
      ord_block(p, sub, id, now)
    else
      ord_advance(p, sub, id, now, ret, released)
    end
  end
  return transitions, released
end

local out = {}
for i = 4, #batch do
  local transitions, released = outcome(batch[i])
  if #transitions > 0 or #released > 0 then
    out[#out + 1] = i - 3
    out[#out + 1] = transitions
    out[#out + 1] = released
  end
end
return out
""")


class Recorded(msgspec.Struct):
    """What an outcome script changed beyond the outcome itself."""

    #: health transitions (opened, recovered, disabled, dead_lettered)
    transitions: list[str]
    #: ordered events released by this one leaving its keys (now in ``ordready:{sub}``)
    released: list[str]


def lua_str(value: bytes) -> msgspec.Raw:
    """``value`` as a msgpack *str* (Redis's cmsgpack reads no bin, which msgspec writes for
    bytes); the bytes as they are, whatever they hold."""
    n = len(value)
    if n < 32:
        head = bytes((0xA0 | n,))
    elif n < 0x100:
        head = b"\xd9" + n.to_bytes(1, "big")
    elif n < 0x10000:
        head = b"\xda" + n.to_bytes(2, "big")
    else:
        head = b"\xdb" + n.to_bytes(4, "big")
    return msgspec.Raw(head + value)


#: What an outcome that changed nothing beyond itself returns.
_NOTHING = Recorded([], [])


class Outcomes(Batcher[list[Any], Recorded]):
    """Outcomes that end while a batch is on its way are recorded together by the next one:
    one OUTCOMES call for all of them (each still all or nothing)."""

    #: Most outcomes in one script call (a call runs alone on Redis while it lasts).
    MAX_BATCH = 200

    def __init__(self, commit: GroupCommit, settings: Callable[[], tuple[str, int]]) -> None:
        """``settings()``: the key prefix and the retention (s) the outcomes apply."""
        super().__init__(max_batch=self.MAX_BATCH)
        self._commit = commit
        self._settings = settings

    async def _run(self, items: list[list[Any]]) -> list[Recorded]:
        prefix, retention = self._settings()
        blob = _encode([prefix, retention, LOG_LENGTH, *items])
        result = await self._commit.call(OUTCOMES, (), (blob,))
        out = [_NOTHING] * len(items)
        for i in range(0, len(result), 3):
            out[int(result[i]) - 1] = Recorded([text(t) for t in result[i + 1]],
                                               [text(r) for r in result[i + 2]])
        return out
