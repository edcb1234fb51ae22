"""Moves due attempts from the schedule (a sorted set) into the Celery queue.

One Lua script pops the due members and LPUSHes them onto the queue list in a single atomic
step, so any number of schedulers may run at once (one per worker) without moving a member
twice, and a scheduler killed between two steps cannot drop one: there are no two steps.
This is how delayed retries stay out of workers' memory: Celery's own ETA/countdown on the
Redis broker parks tasks unacknowledged in a worker and re-delivers them after the
visibility timeout (Celery docs, "Using Redis: Caveats").

Members are short references (relay/queue.py ``member``; a full Celery message written
before those moves as it is): the script builds the message a reference stands for as it
queues it. A moved member is also noted in ``unclaimed`` until a worker's task takes it (the engine
removes it with the leases it writes): kombu pops a message and only then records it as
unacknowledged, so a worker killed between the two would lose it. The same script queues
again any member left unclaimed past ``redeliver_after`` that is neither still in the queue
nor in kombu's ``unacked`` hash (which kombu restores itself): only the lost ones.
"""

from __future__ import annotations

import logging
import threading

import redis
from redis.exceptions import RedisError

from relay import clock
from relay.keys import Keys
from relay.ordering import FUNCTIONS
from relay.queue import MESSAGE_FN, message_spec

log = logging.getLogger("relay.scheduler")

MOVE_DUE = FUNCTIONS + MESSAGE_FN + """
-- KEYS: 1 schedule, 2 queue, 3 unclaimed, 4 kombu unacked, 5 breakers, 6 stats of this minute,
--       7 the time the queue last became non-empty
-- ARGV: 1 now ms, 2 batch, 3 redeliver-at ms, 4 searchable queue length, 5 key prefix,
--       6 redeliver after ms, 7 probe retry ms, 8 stats ttl s, 9 retention s,
--       10-13 the deliver task's message spec (relay/queue.py message_spec)
local now = tonumber(ARGV[1])
local spec = {ARGV[10], ARGV[11], ARGV[12], ARGV[13]}
-- A member is a short reference (relay/queue.py) or, written before those, a message: the
-- queue gets the message, ``unclaimed`` the member (the worker removes both forms).
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[3], ARGV[3], member)
  redis.call('LPUSH', KEYS[2], (message_of(spec, member)))
end
local overdue = redis.call('ZRANGE', KEYS[3], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
local lost = 0
-- Behind a long backlog an overdue note most likely still waits in the queue, and LPOS would
-- scan the whole list for each one (O(n) per note blocked Redis for seconds in an overload
-- run, docs/benchmarks.md): look again later, once the queue is short enough to search.
local searchable = redis.call('LLEN', KEYS[2]) <= tonumber(ARGV[4])
for _, member in ipairs(overdue) do
  redis.call('ZADD', KEYS[3], ARGV[3], member)
  -- Not lost if it still waits in the queue (the oldest are at the tail: search from there),
  -- or if kombu recorded it as unacknowledged (kombu's own restore hands that out again).
  local queued, tag = message_of(spec, member)
  if searchable and not redis.call('LPOS', KEYS[2], queued, 'RANK', -1) then
    if not tag then  -- a message noted as it is: its tag is in it
      local ok, message = pcall(cjson.decode, member)
      tag = ok and type(message) == 'table' and type(message.properties) == 'table'
        and message.properties.delivery_tag
    end
    if not (tag and redis.call('HEXISTS', KEYS[4], tag) == 1) then
      redis.call('LPUSH', KEYS[2], queued)
      lost = lost + 1
    end
  end
end
-- Circuit breakers whose cool-down is over: release one held attempt as the probe (the gate
-- lets exactly one through); look again later in case it never reports back.
local probes = 0
for _, sub in ipairs(redis.call('ZRANGE', KEYS[5], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, 20)) do
  local held = redis.call('ZPOPMIN', ARGV[5] .. 'held:' .. sub)
  if held[1] then
    redis.call('LPUSH', KEYS[2], (message_of(spec, held[1])))
    redis.call('ZADD', KEYS[3], ARGV[3], held[1])
    redis.call('ZADD', KEYS[5], now + tonumber(ARGV[7]), sub)
    probes = probes + 1
  else
    redis.call('ZREM', KEYS[5], sub)  -- nothing held: the next attempt due will probe
  end
end
-- Ordered keys blocked (on_dead: block) by a dead letter that has since expired (retention):
-- nothing is left to replay or purge, so the key moves on as if it had been purged.
local unblocked = 0
local p, ret = ARGV[5], tonumber(ARGV[9])
for _, sub in ipairs(redis.call('SMEMBERS', p .. 'ordsubs')) do
  local stale = redis.call('ZRANGE', p .. 'ordblocked:' .. sub, '-inf', now - ret * 1000,
                           'BYSCORE', 'LIMIT', 0, 20)
  for _, key in ipairs(stale) do
    local head = redis.call('LINDEX', ord_queue(p, sub, key), 0)
    redis.call('ZREM', p .. 'ordblocked:' .. sub, key)
    if head then ord_advance(p, sub, head, now, ret, {}) end
    unblocked = unblocked + 1
  end
end
-- The age of the oldest work no worker has taken: how long the queue has not been empty
-- (an upper bound of its oldest message's age), or an overdue member of the schedule. Kept
-- per minute for the console's chart and the backlog metric.
local age = 0
if redis.call('LLEN', KEYS[2]) > 0 then
  redis.call('SET', KEYS[7], now, 'NX')
  age = now - tonumber(redis.call('GET', KEYS[7]))
else
  redis.call('DEL', KEYS[7])
end
local late = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if late[2] and tonumber(late[2]) < now then age = math.max(age, now - tonumber(late[2])) end
if age > tonumber(redis.call('HGET', KEYS[6], 'backlog') or 0) then
  redis.call('HSET', KEYS[6], 'backlog', age)
  redis.call('EXPIRE', KEYS[6], ARGV[8])
end
return {#due, lost, probes, unblocked}
"""
#: Longest queue searched for overdue notes (LPOS is O(length)); behind a longer backlog, a
#: message lost in kombu's window is queued again once the backlog has drained to this.
SEARCHABLE_QUEUE = 2000
#: A released probe that has not reported back (its breaker still open) after this long is
#: followed by another.
PROBE_RETRY_MS = 30_000
#: kombu's hash of messages delivered to a worker and not yet acknowledged (its default name).
KOMBU_UNACKED = "unacked"


class Scheduler:
    """Polls the schedule every ``interval`` seconds (at once again while it finds a full batch)."""

    def __init__(self, client: redis.Redis, keys: Keys, interval: float = 0.2,
                 batch: int = 500, redeliver_after: float = 60.0,
                 stats_ttl: float = 8 * 86400, retention: float = 14 * 86400) -> None:
        self._client = client
        self._redeliver_ms = int(redeliver_after * 1000)
        self._keys = keys
        self._interval = interval
        self._stats_ttl = int(stats_ttl)
        self._retention = max(1, int(retention))
        self._batch = batch
        self._move = client.register_script(MOVE_DUE)
        self._spec = message_spec(keys.queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def move_due(self, now_ms: int | None = None) -> int:
        """Queue every attempt due by ``now_ms`` (up to one batch); returns how many.

        Each moved member is also noted in ``unclaimed``; one still there ``redeliver_after``
        later that is neither in the queue nor recorded by kombu as unacknowledged was popped by
        a worker that died before kombu recorded it: it is queued again and counted too.
        """
        now = clock.now_ms() if now_ms is None else now_ms
        k = self._keys
        due, lost, probes, unblocked = self._move(
            keys=[k.schedule, k.queue, k.unclaimed, KOMBU_UNACKED, k.breakers,
                  k.stats(now // 60_000), k.backlog_since],
            args=[now, self._batch, now + self._redeliver_ms, SEARCHABLE_QUEUE, k.prefix,
                  self._redeliver_ms, PROBE_RETRY_MS, self._stats_ttl, self._retention,
                  *self._spec])
        if unblocked:
            log.warning("ordered keys unblocked: their dead letters expired",
                        extra={"count": int(unblocked)})
        if lost:
            log.warning("queued again: messages no worker took", extra={"count": int(lost)})
        if probes:
            log.info("circuit breaker probes released", extra={"count": int(probes)})
        return int(due) + int(lost)

    def run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                moved = self.move_due()
                if failing:
                    log.info("scheduler reconnected to redis")
                    failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("scheduler cannot reach redis; retrying",
                                extra={"error": repr(exc)})
                failing = True
                self._stop.wait(1.0)
                continue
            if moved:
                log.debug("moved due attempts", extra={"moved": moved})
            if moved < self._batch:
                self._stop.wait(self._interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="relay-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
