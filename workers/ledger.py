"""What workers write to Redis: leases, outcomes, held attempts, dead letters.

The schedule (a sorted set scored by due time) holds short references to Celery messages
(``relay.queue.member``: attempt, trigger, subscriber, event id; the scheduler turns each into
its message as it queues it) for "the next attempt of (event, subscriber)":

* before attempt *n* starts, a *lease* is added: the member for attempt *n+1*, due at
  ``now + timeout + lease_grace``. If the worker dies mid-attempt, the scheduler moves the
  lease into the queue when it falls due, and the delivery is tried again: nothing held only
  in a worker's memory is ever needed to finish it;
* a failed attempt re-scores the same member to its backoff due time (``ZADD XX``: if the
  lease already fell due and was moved, the retry is queued already and nothing is added);
* success removes it and marks the delivery done, so a redelivered task does not repeat it;
* the last failure (or a 410) removes it and writes a dead letter; the attempt history stays
  in the attempt log, which expires with it.

Each outcome is written all or nothing by one Lua script (``OUTCOMES``): the delivery record,
the attempt log, the lease, the pending index, the subscriber's health (circuit breaker,
disable) and, for a dead letter, the letter and its index. The outcomes that end while one
call is on its way share the next call (``_Outcomes``): one script call, one msgpack argument,
for all of them; a script is atomic as a whole, so each outcome in it still is. The per-minute
and running counters are statistics, counted in the process and written once a second
(workers/tally.py).
"""

from __future__ import annotations

from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay.batching import Batcher, GroupCommit, Script
from relay.clock import now, now_ms
from relay.config import Subscriber
from relay.connections import text
from relay.counters import STATS_TTL
from relay.health import RELEASE_HELD_FN
from relay.keys import Keys
from relay.models import Attempt, DeadLetter, StoredEvent
from relay.ordering import FUNCTIONS
from workers.tally import Tally

#: Attempt records kept per (event, subscriber); older ones are trimmed.
LOG_LENGTH = 50

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

# Whether the subscriber is held *now*, as ``health:{sub}`` says. A worker decides to hold an
# attempt from what it read a moment ago (its gate's cached verdict lasts a second); if an
# operator resumed the subscriber meanwhile, the resume has already released ``held:{sub}``
# and nothing would release it again: such an attempt goes to the schedule, due at once.
HELD_NOW_FN = """
local function held_now(health)
  if redis.call('HGET', health, 'paused') == '1' then return true end
  local state = redis.call('HGET', health, 'state')
  return state == 'open' or state == 'half' or state == 'disabled'
end
"""

# KEYS: schedule, held, health, pending. ARGV: lease, member, now ms, event id, received ms.
# An attempt admitted to no post (paused, disabled, breaker open): its lease becomes a held
# attempt, noted pending, unless the lease already fell due and was queued (then that message
# holds it when it runs).
HOLD = Script(HELD_NOW_FN + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', held_now(KEYS[3]) and KEYS[2] or KEYS[1], ARGV[3], ARGV[2])
  redis.call('ZADD', KEYS[4], 'NX', ARGV[5], ARGV[4])
  return 1
end
return 0
""")

# Released ordered events taken by a lane. ARGV: prefix, subscriber, lease due ms, then
# (event id, its attempt-1 message) pairs. Returns the messages of those this call took.
CLAIM = Script("""
local p, sub, due = ARGV[1], ARGV[2], ARGV[3]
local ready, taken = p .. 'ordready:' .. sub, {}
for i = 4, #ARGV, 2 do
  if redis.call('ZREM', ready, ARGV[i]) == 1 then
    redis.call('ZADD', p .. 'schedule', due, ARGV[i + 1])
    taken[#taken + 1] = ARGV[i + 1]
  end
end
return taken
""")

# KEYS: parked, schedule. ARGV: most, lease due ms.
PULL = Script("""
local members = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
for _, member in ipairs(members) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[2], ARGV[2], member)
end
return members
""")

# What one task (or one pull of parked attempts) decided, written all or nothing before any
# post starts. A pipeline would not do: when Redis is full (maxmemory, noeviction) it refuses
# the ZADDs but still accepts the final ZREM of the task's note in ``unclaimed``, and the
# fan-out would vanish with its message acknowledged. A script whose first write is refused
# writes nothing (Redis refuses a script's writes for OOM only until its first one succeeds).
# ARGV: key prefix, now ms, then sections, each led by its count:
#   leases   n, n x (due ms, member)                   -> schedule
#   held     n groups x (sub, k, k x (ms, member))     -> held:{sub}; due now in the schedule
#                                                         if the subscriber is held no longer
#   moves    n groups x (sub, k, k x member)           pulled members already in the schedule:
#                                                         to held:{sub} if held now, else due now
#   parked   n groups x (sub, k, k x (ms, member))     -> parked:{sub} (NX: keeps its place)
#   pending  n groups x (sub, k, k x (ms, event id))   -> pending:{sub} (NX)
#   unpending n groups x (sub, k, k x event id)        removed from pending:{sub} (delivered)
#   drops    n, n x member                             removed from the schedule
#   taken    n, n x member                             the task's notes in ``unclaimed``
# The task's note in ``unclaimed`` goes last, with everything it stands for (its message, and
# the short reference the scheduler notes for a member it queued: relay/queue.py).
LEASE = Script(HELD_NOW_FN + """
local p, now = ARGV[1], ARGV[2]
local schedule = p .. 'schedule'
local i = 3
local function take()
  local v = ARGV[i]
  i = i + 1
  return v
end
local n = tonumber(take())
for _ = 1, n do
  local due, member = take(), take()
  redis.call('ZADD', schedule, due, member)
end
for _ = 1, tonumber(take()) do
  local sub, k = take(), tonumber(take())
  local held = held_now(p .. 'health:' .. sub)
  for _ = 1, k do
    local ms, member = take(), take()
    if held then redis.call('ZADD', p .. 'held:' .. sub, ms, member)
    else redis.call('ZADD', schedule, now, member) end
  end
end
for _ = 1, tonumber(take()) do
  local sub, k = take(), tonumber(take())
  local held = held_now(p .. 'health:' .. sub)
  for _ = 1, k do
    local member = take()
    if held then
      if redis.call('ZREM', schedule, member) == 1 then
        redis.call('ZADD', p .. 'held:' .. sub, now, member)
      end
    else
      redis.call('ZADD', schedule, 'XX', now, member)
    end
  end
end
for _, name in ipairs({'parked:', 'pending:'}) do
  for _ = 1, tonumber(take()) do
    local key, k = p .. name .. take(), tonumber(take())
    for _ = 1, k do
      local ms, member = take(), take()
      redis.call('ZADD', key, 'NX', ms, member)
    end
  end
end
for _ = 1, tonumber(take()) do
  local key, k = p .. 'pending:' .. take(), tonumber(take())
  for _ = 1, k do redis.call('ZREM', key, take()) end
end
for _ = 1, tonumber(take()) do
  redis.call('ZREM', schedule, take())
end
local taken = {}
for _ = 1, tonumber(take()) do taken[#taken + 1] = take() end
if #taken > 0 then redis.call('ZREM', p .. 'unclaimed', unpack(taken)) end
return 1
""")

_encode = msgspec.msgpack.Encoder().encode
_decode_event = msgspec.msgpack.Decoder(StoredEvent).decode


def _scored(members: dict[bytes, int]) -> list[Any]:
    """``{member: score}`` as ZADD's ``score member ...`` arguments."""
    return [x for member, score in members.items() for x in (score, member)]


class Recorded(msgspec.Struct):
    """What an outcome script changed beyond the outcome itself."""

    #: health transitions (opened, recovered, disabled, dead_lettered)
    transitions: list[str]
    #: ordered events released by this one leaving its keys (now in ``ordready:{sub}``)
    released: list[str]


class LeasePlan(msgspec.Struct):
    """The Redis side of what a task decided (see LEASE)."""

    #: next-attempt message -> due ms
    leases: dict[bytes, int] = msgspec.field(default_factory=dict)
    #: subscriber -> {message -> ms}: not posted now (paused, disabled, breaker open)
    held: dict[str, dict[bytes, int]] = msgspec.field(default_factory=dict)
    #: subscriber -> pulled members (already in the schedule) to hold
    moves: dict[str, list[bytes]] = msgspec.field(default_factory=dict)
    #: subscriber -> {message -> ms}: no room in this process's lane
    parked: dict[str, dict[bytes, int]] = msgspec.field(default_factory=dict)
    #: subscriber -> {event id -> ms}
    pending: dict[str, dict[Any, int]] = msgspec.field(default_factory=dict)
    #: pulled members that need no lease (delivered meanwhile)
    drops: list[bytes] = msgspec.field(default_factory=list)
    #: subscriber -> event ids delivered already: no pending note may be left of them
    unpending: dict[str, list[Any]] = msgspec.field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.leases or self.held or self.moves or self.parked or self.pending
                    or self.drops or self.unpending)


class Loaded(msgspec.Struct, frozen=True):
    """One event as a task sees it: its record (None if expired), the subscribers it was
    delivered to, and (for a batch message) the token of the batch that stored it."""

    event: StoredEvent | None
    done: frozenset[str]
    seen: str | None
    #: Why the record could not be read (a poisoned record), if it could not.
    error: str | None = None
    #: Ordered subscribers' marks from the delivery record (relay/ordering.py): ``o`` first
    #: in line when accepted (the fan-out posts it), ``w`` waiting, ``q`` released to a lane.
    marks: dict[str, str] = {}


class Ledger:
    """Worker-side writes; concurrent deliveries share round trips (``GroupCommit``)."""

    def __init__(self, client: aioredis.Redis, keys: Keys, retention: float) -> None:
        self._r = client
        self._k = keys
        #: The counters and last successes of this process's outcomes (workers/tally.py).
        self.tally = Tally(keys.prefix, STATS_TTL)
        self.retention = retention
        self._batch = GroupCommit(client, timeout=10.0)
        self._outcomes = _Outcomes(self._batch, self)
        #: id(subscriber) -> (the subscriber, its health settings as OUTCOMES takes them)
        self._breakers: dict[int, tuple[Subscriber, tuple[int, int, int, int]]] = {}
        # A task's own round trips (load, lease) have their own pipeline: behind the outcome
        # writes of hundreds of posts they would wait their turn, and the task thread with
        # them, holding up every event queued behind it.
        self._tasks = GroupCommit(client, timeout=10.0)

    @property
    def retention(self) -> float:
        return self._retention

    @retention.setter
    def retention(self, seconds: float) -> None:
        self._retention = max(1, int(seconds))
        self.tally.stats_ttl = min(STATS_TTL, self._retention)

    async def flush_tally(self) -> None:
        """Write this process's statistics now (workers/tally.py)."""
        await self.tally.flush(self._batch)

    async def run_tally(self) -> None:
        """Write this process's statistics every second, until cancelled."""
        await self.tally.run(self._batch)

    async def final_tally(self) -> None:
        await self.tally.final(self._batch)

    async def run(self, commands: list[tuple[Any, ...]], task: bool = False) -> list[Any]:
        results = await (self._tasks if task else self._batch).execute(commands)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def script(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        result = await self._batch.script(script, keys, args)
        if isinstance(result, Exception):
            raise result
        return result

    async def load(self, event_ids: list[str], with_seen: bool = False) -> list[Loaded]:
        """Each event's record, delivery record and (when asked) batch token, one round trip."""
        results = await self.run(self._load_commands(event_ids, with_seen), task=True)
        return self._loaded(results, with_seen)

    def _load_commands(self, event_ids: list[str], with_seen: bool = False
                       ) -> list[tuple[Any, ...]]:
        commands: list[tuple[Any, ...]] = []
        for event_id in event_ids:
            commands += [("GET", self._k.event(event_id)),
                         ("HGETALL", self._k.deliveries(event_id))]
            if with_seen:
                commands.append(("GET", self._k.seen(event_id)))
        return commands

    def _loaded(self, results: list[Any], with_seen: bool = False) -> list[Loaded]:
        step = 3 if with_seen else 2
        loaded = []
        for i in range(0, len(results), step):
            raw, record = results[i], results[i + 1]
            seen = results[i + 2].decode() if with_seen and results[i + 2] else None
            done = frozenset(sub.decode() for sub, state in record.items()
                             if state[:1] == b"d")
            marks = {sub.decode(): state[:1].decode() for sub, state in record.items()
                     if state[:1] in (b"o", b"w", b"q")}
            try:
                event = _decode_event(raw) if raw else None
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                loaded.append(Loaded(None, done, seen, f"unreadable record: {exc}", marks))
                continue
            loaded.append(Loaded(event, done, seen, None, marks))
        return loaded

    async def lease(self, plan: LeasePlan, taken: tuple[bytes, ...] = ()) -> None:
        """Before attempts start, in one script (LEASE): add the next-attempt messages
        (leases), hold what may not be posted now, park what has no room, note what each
        subscriber has pending, drop pulled members that need no lease, and last remove
        ``taken`` (the notes of the task doing this) from ``unclaimed``: all or nothing, so
        the task's message stays noted (and is queued again) unless everything was written."""
        if plan.empty() and not taken:
            return
        args: list[Any] = [self._k.prefix, now_ms(), len(plan.leases), *_scored(plan.leases)]
        args.append(len(plan.held))
        for sub, held in plan.held.items():
            args += [sub, len(held), *_scored(held)]
        args.append(len(plan.moves))
        for sub, moved in plan.moves.items():
            args += [sub, len(moved), *moved]
        for groups in (plan.parked, plan.pending):
            args.append(len(groups))
            for sub, scored_members in groups.items():
                args += [sub, len(scored_members), *_scored(scored_members)]
        args.append(len(plan.unpending))
        for sub, ids in plan.unpending.items():
            args += [sub, len(ids), *ids]
        args += [len(plan.drops), *plan.drops, len(taken), *taken]
        result = await self._tasks.script(LEASE, (), args)
        if isinstance(result, Exception):
            raise result

    async def pull(self, sub: str, most: int, lease_due: int) -> list[bytes]:
        """Take up to ``most`` parked attempts of ``sub``, oldest first; each becomes its own
        lease in the schedule (due ``lease_due``) in the same step, so one taken by a worker
        that dies is queued again when that falls due."""
        return list(await self.script(PULL, (self._k.parked(sub), self._k.schedule),
                                      (most, lease_due)))

    async def claim_ready(self, sub: str, members: dict[str, bytes], lease_due: int
                          ) -> tuple[list[bytes], list[Loaded]]:
        """Take released ordered events of ``sub`` (``{event id: its attempt-1 message}``)
        from ``ordready:{sub}``; each becomes its own lease in the schedule (due
        ``lease_due``) in the same step, so one claimed by a worker that dies is queued again.
        The records are read in the same round trip. Returns the claimed members and every
        asked event's record (the caller keeps those it claimed)."""
        args: list[Any] = [self._k.prefix, sub, lease_due]
        for event_id, member in members.items():
            args += [event_id, member]
        claimed, records = await self._tasks.script(CLAIM, (), args,
                                                    then=self._load_commands(list(members)))
        for result in (claimed, *records):
            if isinstance(result, Exception):
                raise result
        return list(claimed), self._loaded(records)

    async def ready(self, sub: str, most: int) -> list[str]:
        """Up to ``most`` released ordered events of ``sub``, oldest first."""
        (ids,) = await self.run([("ZRANGE", self._k.order_ready(sub), 0, most - 1)], task=True)
        return [text(i) for i in ids]

    async def renew(self, leases: dict[bytes, int]) -> None:
        """Re-score held leases (``{message: due_ms}``); one already removed (its attempt
        ended) or moved to the queue stays so (``XX``)."""
        await self.run([("ZADD", self._k.schedule, "XX", *_scored(leases))])

    async def hold(self, sub: str, lease: bytes, member: bytes, event_id: str,
                   received_ms: int) -> None:
        await self.script(HOLD, (self._k.schedule, self._k.held(sub), self._k.health(sub),
                                 self._k.pending(sub)),
                          (lease, member, now_ms(), event_id, received_ms))

    async def succeeded(self, event_id: str, sub: Subscriber, lease: bytes,
                        record: Attempt, ordered: bool = True, noted: bool = True) -> Recorded:
        """``ordered`` False: the event is known not to be queued under ``sub`` for ordered
        delivery (no ordering configured, no mark in its delivery record when loaded), so
        there is no next event to release. ``noted`` False: a fan-out's first attempt,
        never noted in pending:{sub} (workers/engine.py _plan_event)."""
        return await self._outcome("ok", event_id, sub, lease, record, ordered=ordered,
                                   noted=noted)

    async def retry_at(self, event_id: str, sub: Subscriber, lease: bytes, record: Attempt,
                       next_member: bytes, due_ms: int, received_ms: int) -> Recorded:
        """``received_ms``: the event's, the score of its note in pending:{sub}."""
        return await self._outcome("retry", event_id, sub, lease, record,
                                   next_member=next_member, due_ms=due_ms,
                                   received_ms=received_ms)

    async def dead_letter(self, event_id: str, sub: Subscriber | str, reason: str,
                          event: StoredEvent | None, lease: bytes | None = None,
                          record: Attempt | None = None, block: bool = False) -> Recorded:
        """``block``: an ordered subscriber's ``on_dead: block`` applies (the letter keeps its
        keys waiting); otherwise the next event of its keys is released."""
        name = sub if isinstance(sub, str) else sub.name
        letter = DeadLetter(event_id, name, reason, now(), event)
        return await self._outcome("dead", event_id, sub, lease, record, letter=_encode(letter),
                                   block=block)

    def _breaker(self, sub: Subscriber | str) -> tuple[int, int, int, int]:
        """The outcome script's health settings of ``sub`` (see OUTCOMES)."""
        if isinstance(sub, str):  # no longer configured: no health settings to apply
            return (0, 0, 0, 0)
        cached = self._breakers.get(id(sub))
        if cached is None or cached[0] is not sub:
            cb = sub.circuit_breaker
            cached = (sub, (cb.failures, int(cb.cool_down * 1000), int(cb.max_cool_down * 1000),
                            int(sub.disable_after * 1000)))
            self._breakers[id(sub)] = cached
        return cached[1]

    async def _outcome(self, mode: str, event_id: str, sub: Subscriber | str,
                       lease: bytes | None, record: Attempt | None, *,
                       next_member: bytes = b"", due_ms: int = 0, letter: bytes = b"",
                       block: bool = False, ordered: bool = True, noted: bool = True,
                       received_ms: int = 0) -> Recorded:
        name = sub if isinstance(sub, str) else sub.name
        now = now_ms()
        item = [mode, now, name, event_id, _lua_str(_encode(record)) if record else "",
                _lua_str(lease) if lease else "", int(bool(record and record.probe)),
                record.describe() if record and mode != "ok" else "",
                _lua_str(next_member) if next_member else "", due_ms,
                _lua_str(letter) if letter else "", int(block), int(ordered),
                *self._breaker(sub), int(noted), received_ms]
        recorded = await self._outcomes.submit(item)
        # Counted once the outcome is recorded (workers/tally.py writes it within a second).
        self.tally.outcome(name, mode, now, record.latency_ms if record else None)
        return recorded


def _lua_str(value: bytes) -> msgspec.Raw:
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


class _Outcomes(Batcher[list[Any], Recorded]):
    """Outcomes that end while a batch is on its way are recorded together by the next one:
    one OUTCOMES call for all of them (each still all or nothing)."""

    #: Most outcomes in one script call (a call runs alone on Redis while it lasts).
    MAX_BATCH = 200

    def __init__(self, commit: GroupCommit, ledger: Ledger) -> None:
        super().__init__(max_batch=self.MAX_BATCH)
        self._commit = commit
        self._ledger = ledger

    async def _run(self, items: list[list[Any]]) -> list[Recorded]:
        ledger = self._ledger
        blob = _encode([ledger._k.prefix, ledger.retention, LOG_LENGTH, *items])
        result = await self._commit.script(OUTCOMES, (), (blob,))
        if isinstance(result, Exception):
            raise result
        out = [_NOTHING] * len(items)
        for i in range(0, len(result), 3):
            out[int(result[i]) - 1] = Recorded([text(t) for t in result[i + 1]],
                                               [text(r) for r in result[i + 2]])
        return out
