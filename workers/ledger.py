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

Each outcome is written all or nothing by one Lua script, the outcomes that end together by
one call (workers/outcomes.py); the per-minute and running counters are statistics, counted
in the process and written once a second (workers/tally.py).
"""

from __future__ import annotations

from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay.batching import ARGV_FROM_FN, GroupCommit, Script
from relay.clock import now, now_ms
from relay.config import Subscriber
from relay.connections import text
from relay.counters import STATS_TTL
from relay.keys import Keys
from relay.models import Attempt, DeadLetter, StoredEvent
from workers.outcomes import Outcomes, Recorded, lua_str
from workers.tally import Tally

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
LEASE = Script(ARGV_FROM_FN + HELD_NOW_FN + """
local p, now = ARGV[1], ARGV[2]
local schedule = p .. 'schedule'
local take = argv_from(3)
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
        self._outcomes = Outcomes(self._batch, lambda: (self._k.prefix, int(self.retention)))
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
        return await self._batch.call(script, keys, args)

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
        await self._tasks.call(LEASE, (), args)

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
        never noted in pending:{sub} (workers/planning.py _plan_event)."""
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
        item = [mode, now, name, event_id, lua_str(_encode(record)) if record else "",
                lua_str(lease) if lease else "", int(bool(record and record.probe)),
                record.describe() if record and mode != "ok" else "",
                lua_str(next_member) if next_member else "", due_ms,
                lua_str(letter) if letter else "", int(block), int(ordered),
                *self._breaker(sub), int(noted), received_ms]
        recorded = await self._outcomes.submit(item)
        # Counted once the outcome is recorded (workers/tally.py writes it within a second).
        self.tally.outcome(name, mode, now, record.latency_ms if record else None)
        return recorded
