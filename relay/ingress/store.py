"""Durable, deduplicating writes of accepted events, one atomic script per batch.

Requests that arrive while a write is in flight are stored together by the next one
(``relay.batching``). One Lua script per batch, atomically: for each event, ``SET seen NX EX
window`` with the batch's token; if that was new, store the event record; then, if any was
new, LPUSH *one* fan-out task for the whole batch onto the Celery queue and note it in
``unclaimed`` (queued again if no worker takes it: see ``relay/keys.py``). "Stored" and
"queued" never disagree, even if Redis dies mid-way (a script's effects reach the AOF as one
MULTI/EXEC). One task per batch rather than per event: a Celery message costs a worker
milliseconds of CPU whatever it carries (docs/benchmarks.md), so under load this cost is
shared by the batch.

The script names its keys from the prefix it is given rather than in KEYS: fine on a single
Redis (the hub's deployment), not on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relay.batching import Batcher, GroupCommit, Script
from relay.counters import STATS_TTL
from relay.keys import Keys
from relay.models import StoredEvent
from relay.ordering import FUNCTIONS, Sequencer
from relay.queue import deliver_message

log = logging.getLogger("relay.ingress.store")

#: A write Redis has not confirmed within this long is answered 503 (seconds).
WRITE_TIMEOUT = 5.0
PING_TIMEOUT = 2.0
#: Most events stored (and fanned out by one task) together.
MAX_BATCH = 100
#: A batch this large is written at once, lingering or not: it already shares a Celery
#: message widely, and at saturation waiting for more would only cost throughput.
ENOUGH = 32

# KEYS: queue, unclaimed, events index, this minute's stats, totals.
# ARGV: key prefix, dedupe s, retention s, batch token, message, redeliver-at ms, received ms,
# stats ttl s, then per event: id, record, count of order numbers, the order numbers, count
# of ordered subscribers it goes to, and for each: name, count of keys, the keys.
# Returns 1 (stored) or 0 (duplicate) per event.
#
# An event an ordered subscriber gets joins the end of its keys' lists here, in acceptance
# order (relay/ordering.py): first on all of them, its delivery record says ``o`` and the
# fan-out posts it; otherwise ``w``, and it waits for the event ahead of it.
#
# An event is a duplicate while the hub still holds anything of it: its dedupe marker, its
# record or its delivery record. Past the dedupe window alone, a resend would otherwise be
# answered 202 while the delivery record silently suppressed every delivery.
STORE_SCRIPT = Script(FUNCTIONS + """
local p, stored, new = ARGV[1], {}, 0
local i = 9
while i <= #ARGV do
  local id, record, orders = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local j = i + 3 + orders
  local joins = tonumber(ARGV[j])
  local fresh = redis.call('EXISTS', p .. 'seen:' .. id, p .. 'event:' .. id,
                           p .. 'deliveries:' .. id) == 0
  if fresh then
    redis.call('SET', p .. 'seen:' .. id, ARGV[4], 'EX', ARGV[2])
    redis.call('SET', p .. 'event:' .. id, record, 'EX', ARGV[3])
    redis.call('ZADD', KEYS[3], ARGV[7], id)
    for j = 1, orders do
      local order = p .. 'order:' .. ARGV[i + 2 + j]
      redis.call('ZADD', order, ARGV[7], id)
      redis.call('EXPIRE', order, ARGV[3])
    end
    stored[#stored + 1] = 1
    new = new + 1
  else
    stored[#stored + 1] = 0
  end
  j = j + 1
  for _ = 1, joins do
    local sub, n = ARGV[j], tonumber(ARGV[j + 1])
    if fresh then
      local keys = {}
      for k = 1, n do keys[k] = ARGV[j + 1 + k] end
      local d = p .. 'deliveries:' .. id
      redis.call('HSET', d, sub, (ord_join(p, sub, id, keys, ARGV[7]) and 'o' or 'w') .. ARGV[7])
      redis.call('EXPIRE', d, ARGV[3])
      redis.call('ZADD', p .. 'pending:' .. sub, 'NX', ARGV[7], id)
    end
    j = j + 2 + n
  end
  i = j
end
if new > 0 then
  redis.call('LPUSH', KEYS[1], ARGV[5])
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
  redis.call('HINCRBY', KEYS[4], 'accepted', new)
  redis.call('EXPIRE', KEYS[4], ARGV[8])
  redis.call('HINCRBY', KEYS[5], 'accepted', new)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[7]) - tonumber(ARGV[3]) * 1000)
else
  -- Only duplicates: write something all the same, so that the WAIT after this script covers
  -- the records they found. WAIT waits for the replicas to reach this connection's last
  -- write, which Redis 7.2+ notes only after a command that propagated: a script that writes
  -- nothing leaves it where it was (0 on a new connection), and WAIT would count a replica
  -- that never got the event, answering "200 duplicate" for an event only this primary holds
  -- (the first send got 503 when WAIT timed out, the retry went to the other ingress).
  redis.call('SET', p .. 'dupmark', ARGV[4], 'EX', 60)
end
return stored
""")

_encode_record = msgspec.msgpack.Encoder().encode


class StoreUnavailable(Exception):
    """Redis could not be reached or did not confirm the write; nothing may be promised."""


class NotReplicated(RedisError):
    """Fewer replicas than ``redis.min_replicas`` acknowledged the write in time."""


class EventStore(Batcher[StoredEvent, bool]):
    def __init__(self, client: aioredis.Redis, keys: Keys, dedupe_seconds: float,
                 retention_seconds: float, redeliver_after: float = 60.0,
                 linger: float = 0.0, min_replicas: int = 0,
                 replica_timeout: float = 1.0) -> None:
        super().__init__(max_batch=MAX_BATCH, linger=linger, enough=ENOUGH)
        self._client = client
        #: A fan-out message no worker has taken within this long is queued again.
        self._redeliver_ms = int(redeliver_after * 1000)
        self._keys = keys
        #: The ordered subscribers an event joins (relay/ordering.py); set on (re)load.
        self.sequencer = Sequencer(())
        self.configure(dedupe_seconds, retention_seconds)
        # WAIT in the same round trip as the script: the answer waits for the replicas, and
        # a write that did not reach enough of them is a 503 (the sender's retry is then a
        # duplicate if the write survives, or stored anew if a failover lost it).
        self._wait: tuple[tuple[object, ...], ...] = (
            (("WAIT", min_replicas, max(1, int(replica_timeout * 1000))),)
            if min_replicas > 0 else ())
        self._min_replicas = min_replicas
        self._commit = GroupCommit(client, timeout=WRITE_TIMEOUT + replica_timeout)

    def configure(self, dedupe_seconds: float, retention_seconds: float) -> None:
        """Settings a reload may change (relay/reload.py)."""
        self._dedupe = max(1, int(dedupe_seconds))
        self._retention = max(self._dedupe, int(retention_seconds))

    async def accept(self, event: StoredEvent) -> bool:
        """Store ``event`` and queue its fan-out. True if new, False if a duplicate.

        Raises StoreUnavailable when Redis does not confirm: the caller must answer 503.
        """
        try:
            return await self.submit(event)
        except (RedisError, OSError) as exc:
            log.warning("redis write failed", extra={"eventId": event.event_id,
                                                     "error": repr(exc)})
            raise StoreUnavailable(str(exc)) from exc

    async def _run(self, events: list[StoredEvent]) -> list[bool]:
        k = self._keys
        ids = [e.event_id for e in events]
        token = os.urandom(8).hex()
        message = deliver_message(k.queue, ids[0] if len(ids) == 1 else ids, None, 1, token)
        received_ms = int(events[0].received_at * 1000)
        args: list[object] = [k.prefix, self._dedupe, self._retention, token, message,
                              received_ms + self._redeliver_ms, received_ms,
                              min(STATS_TTL, self._retention)]
        for event in events:
            args += [event.event_id, _encode_record(event), len(event.order_numbers),
                     *event.order_numbers]
            joins = self.sequencer.joins(event)
            args.append(len(joins))
            for name, event_keys in joins:
                args += [name, len(event_keys), *event_keys]
        keys = (k.queue, k.unclaimed, k.events, k.stats(received_ms // 60_000), k.totals)
        result = await self._commit.script(STORE_SCRIPT, keys, args, then=self._wait)
        if self._wait:
            result, (acked,) = result
            if isinstance(acked, Exception):
                raise acked
            if not isinstance(result, Exception) and int(acked) < self._min_replicas:
                raise NotReplicated(f"{acked} of {self._min_replicas} replicas acknowledged "
                                    f"the write in time")
        if isinstance(result, Exception):
            raise result
        return [bool(r) for r in result]

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                return bool(await self._client.ping())
        except (RedisError, OSError):
            return False
