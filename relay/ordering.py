"""Ordered delivery: per subscriber and key, events are posted in the order the ingress
accepted them (the order of its 202s).

The order is a fact in Redis, written by the ingress's store script: each (event, ordered
subscriber) joins the end of one list per key (``ordq:{sub}:{key}``, relay/keys.py), in the
same atomic step that stores the event. Only the *head* of a list may be posted. An event
first on every one of its keys when it is accepted is marked ``o`` and fanned out as usual;
any other is marked ``w`` (waiting): no Celery message, no lease, no lane slot, nothing but
its place in the lists. When the head leaves its lists (delivered, or dead-lettered with
``on_dead: skip``) the outcome script that records that pops it and *releases* each new head
that is now first on all its keys, in the same step: marked ``q`` and put in
``ordready:{sub}``, from which a lane of the subscriber (the worker that recorded the outcome
first of all) takes it like a parked attempt. Nothing polls for it, and no worker's memory
holds it: a worker killed at any point leaves it in a list, in ``ordready`` or leased.

A key is ``o:{order number}`` (``by: order``: every Ingram order number of the event, so an
event of several orders waits to be first on each) or ``t:{topic}`` (``by: topic``). An event
with no order number is not ordered. With ``on_dead: block`` a dead-lettered head stays in
its lists (``ordblocked:{sub}``) until an operator replays it (it goes first again) or purges
it (the key moves on).

Because acceptance order is total (one store script at a time, events of a batch in order),
two events that share keys are in the same order on every list: no event ever waits for one
that waits for it.

The Lua functions here are prepended to the scripts that change ordering state: the store
(join), the outcome (advance, block), replay, resend and purge, the release of everything
(ordering turned off, subscriber removed) and the scheduler's sweep of blocked keys whose dead
letter expired.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relay.batching import Script
from relay.config import Ordering, Subscriber
from relay.keys import Keys
from relay.models import StoredEvent
from relay.routing import Router

ORDER_KEY = "o:"
TOPIC_KEY = "t:"


def event_keys(ordering: Ordering, event: StoredEvent) -> tuple[str, ...]:
    """The keys ``event`` is ordered under for a subscriber with ``ordering``."""
    if ordering.by == "topic":
        return (TOPIC_KEY + event.topic,)
    return tuple(ORDER_KEY + number for number in event.order_numbers)


def bare(key: str) -> str:
    """The order number or topic of a key, as operators know it."""
    return key[2:] if key[:2] in (ORDER_KEY, TOPIC_KEY) else key


class Sequencer:
    """At acceptance: the ordered subscribers an event goes to, with its keys for each."""

    def __init__(self, subscribers: Sequence[Subscriber]) -> None:
        self._ordered = [s for s in subscribers if s.ordering is not None]
        self._router = Router(self._ordered)

    def __bool__(self) -> bool:
        return bool(self._ordered)

    def joins(self, event: StoredEvent) -> list[tuple[str, tuple[str, ...]]]:
        if not self._ordered:
            return []
        out = []
        for sub in self._router.route(event):
            assert sub.ordering is not None
            keys = event_keys(sub.ordering, event)
            if keys:
                out.append((sub.name, keys))
        return out


# Lua, prepended to every script that changes ordering state. ``p`` is the key prefix, ``ret``
# the retention in seconds (a delivery record written here expires like the others).
FUNCTIONS = """
local function ord_queue(p, sub, key) return p .. 'ordq:' .. sub .. ':' .. key end

-- (id, sub) joins the end of each of its keys' lists. Returns true if it is first on all of
-- them, false if it waits, nil if it is queued already (a resend of a queued event).
local function ord_join(p, sub, id, keys, now)
  local okeys = p .. 'ordkeys:' .. id
  if redis.call('HEXISTS', okeys, sub) == 1 then return nil end
  local head = true
  for _, key in ipairs(keys) do
    if redis.call('RPUSH', ord_queue(p, sub, key), id) > 1 then
      head = false
      redis.call('ZADD', p .. 'ordheld:' .. sub, 'NX', now, key)
    end
  end
  redis.call('HSET', okeys, sub, table.concat(keys, '\\n'))
  redis.call('SADD', p .. 'ordsubs', sub)
  if not head then redis.call('HINCRBY', p .. 'ordwaiting', sub, 1) end
  return head
end

-- (id, sub) is first on every one of its keys now: release it to a lane (``ordready``).
-- Returns 1 if released, 0 if it still waits somewhere or was started already.
local function ord_release(p, sub, id, now, ret)
  local keys = redis.call('HGET', p .. 'ordkeys:' .. id, sub)
  for key in string.gmatch(keys or '', '[^\\n]+') do
    if redis.call('LINDEX', ord_queue(p, sub, key), 0) ~= id then return 0 end
  end
  local d = p .. 'deliveries:' .. id
  local state = redis.call('HGET', d, sub)
  if state and string.sub(state, 1, 1) ~= 'w' then return 0 end
  -- (No state: the record expired while it waited; released all the same, so that the
  -- worker dead-letters it as "event expired" and the key moves on.)
  if redis.call('HINCRBY', p .. 'ordwaiting', sub, -1) < 0 then
    redis.call('HSET', p .. 'ordwaiting', sub, 0)
  end
  redis.call('HSET', d, sub, 'q' .. now)
  redis.call('EXPIRE', d, ret)
  redis.call('ZADD', p .. 'ordready:' .. sub, 'NX', now, id)
  return 1
end

-- The head of ``q`` changed: note whether the key holds others back, and since when.
local function ord_note(p, sub, key, q, now)
  if redis.call('LLEN', q) > 1 or redis.call('ZSCORE', p .. 'ordblocked:' .. sub, key) then
    redis.call('ZADD', p .. 'ordheld:' .. sub, now, key)
  else
    redis.call('ZREM', p .. 'ordheld:' .. sub, key)
  end
end

-- (id, sub) leaves its keys' lists (delivered, dead-lettered and not blocking, purged):
-- pops it and releases each new head that is now first on all its keys. Returns the
-- released event ids (appended to ``released``).
local function ord_advance(p, sub, id, now, ret, released)
  local okeys = p .. 'ordkeys:' .. id
  local keys = redis.call('HGET', okeys, sub)
  if not keys then return released end
  redis.call('HDEL', okeys, sub)
  for key in string.gmatch(keys, '[^\\n]+') do
    local q = ord_queue(p, sub, key)
    redis.call('ZREM', p .. 'ordblocked:' .. sub, key)
    if redis.call('LINDEX', q, 0) == id then
      redis.call('LPOP', q)
      local nxt = redis.call('LINDEX', q, 0)
      -- An id that is no longer queued under this subscriber (released when ordering was
      -- turned off) is not a head anyone waits for: skip it.
      while nxt and redis.call('HEXISTS', p .. 'ordkeys:' .. nxt, sub) == 0 do
        redis.call('LPOP', q)
        nxt = redis.call('LINDEX', q, 0)
      end
      if nxt and ord_release(p, sub, nxt, now, ret) == 1 then
        released[#released + 1] = nxt
      end
    else
      redis.call('LREM', q, 1, id)  -- it left before its turn (never released)
    end
    ord_note(p, sub, key, q, now)
  end
  return released
end

-- (id, sub) was dead-lettered under on_dead: block: it stays first on its keys, which wait
-- for an operator (replay: it goes again; purge: the key moves on).
local function ord_block(p, sub, id, now)
  local keys = redis.call('HGET', p .. 'ordkeys:' .. id, sub)
  for key in string.gmatch(keys or '', '[^\\n]+') do
    if redis.call('LINDEX', ord_queue(p, sub, key), 0) == id then
      redis.call('ZADD', p .. 'ordblocked:' .. sub, now, key)
      redis.call('ZADD', p .. 'ordheld:' .. sub, now, key)
    end
  end
end

-- Is (id, sub) queued (not yet delivered, or blocking)?
local function ord_queued(p, sub, id)
  return redis.call('HEXISTS', p .. 'ordkeys:' .. id, sub) == 1
end

-- Unblock the keys (id, sub) blocks (a replay: it goes first again).
local function ord_unblock(p, sub, id, now)
  local keys = redis.call('HGET', p .. 'ordkeys:' .. id, sub)
  for key in string.gmatch(keys or '', '[^\\n]+') do
    if redis.call('ZREM', p .. 'ordblocked:' .. sub, key) == 1 then
      ord_note(p, sub, key, ord_queue(p, sub, key), now)
    end
  end
end
"""

# Ordering turned off for a subscriber (or the subscriber removed): every queue of it given in
# ARGV is dissolved. Each waiting event is released (``ordready``), the head is left to finish
# as it is, and the keys no longer hold or block anything.
# ARGV: prefix, subscriber, now ms, retention s, then the queue keys (full names) and their
# bare keys alternately. Returns how many events were released.
RELEASE_ALL = Script(FUNCTIONS + """
local p, sub, now, ret = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local released = 0
for i = 5, #ARGV, 2 do
  local q, key = ARGV[i], ARGV[i + 1]
  local ids = redis.call('LRANGE', q, 0, -1)
  for _, id in ipairs(ids) do
    if ord_queued(p, sub, id) then
      redis.call('HDEL', p .. 'ordkeys:' .. id, sub)
      local d = p .. 'deliveries:' .. id
      local state = redis.call('HGET', d, sub)
      if not state or string.sub(state, 1, 1) == 'w' then
        if redis.call('HINCRBY', p .. 'ordwaiting', sub, -1) < 0 then
          redis.call('HSET', p .. 'ordwaiting', sub, 0)
        end
        redis.call('HSET', d, sub, 'q' .. now)
        redis.call('EXPIRE', d, ret)
        redis.call('ZADD', p .. 'ordready:' .. sub, 'NX', now, id)
        released = released + 1
      end
    end
  end
  redis.call('DEL', q)
  redis.call('ZREM', p .. 'ordheld:' .. sub, key)
  redis.call('ZREM', p .. 'ordblocked:' .. sub, key)
end
return released
""")

# After RELEASE_ALL has dissolved every queue: forget the subscriber's ordering counters
# unless new queues appeared meanwhile. ARGV: prefix, subscriber.
FORGET = Script("""
local p, sub = ARGV[1], ARGV[2]
if redis.call('ZCARD', p .. 'ordheld:' .. sub) == 0 then
  redis.call('HDEL', p .. 'ordwaiting', sub)
  redis.call('SREM', p .. 'ordsubs', sub)
end
return 1
""")


def release_all(client: Any, keys: Keys, subscriber: str, now_ms: int, retention: float,
                batch: int = 200) -> int:
    """Dissolve every queue of ``subscriber`` (sync client; the worker's main process runs
    it when a subscriber's ordering was turned off or the subscriber removed). Returns how
    many waiting events were released. The queues are found with SCAN: this is rare, and an
    index of every queue would cost a write per event on the hot path."""
    pattern = keys.order_queue(_glob_escape(subscriber), "*")
    prefix_len = len(keys.order_queue(subscriber, ""))
    released, chunk = 0, []
    script = client.register_script(RELEASE_ALL.text)
    for name in client.scan_iter(match=pattern, count=1000):
        full = name.decode() if isinstance(name, bytes) else name
        chunk += [full, full[prefix_len:]]
        if len(chunk) >= 2 * batch:
            released += int(script(args=[keys.prefix, subscriber, now_ms, int(retention),
                                         *chunk]))
            chunk = []
    if chunk:
        released += int(script(args=[keys.prefix, subscriber, now_ms, int(retention), *chunk]))
    client.register_script(FORGET.text)(args=[keys.prefix, subscriber])
    return released


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
