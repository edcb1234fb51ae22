"""Durable, deduplicating writes of accepted events, one atomic script per batch.

Requests that arrive while a write is in flight are stored together by the next one
(``relay.batching``). One Lua script per batch, atomically: for each event, ``SET seen NX EX
window`` with the batch's token; if that was new, store the event record; then, if any was
new, LPUSH *one* fan-out task for the whole batch onto the Celery queue and note it in
``unclaimed`` (queued again if no worker takes it: see ``relay/keys.py``). "Stored" and
"queued" never disagree, even if Redis dies mid-way (a script's effects reach the AOF as one
MULTI/EXEC). One task per batch rather than per event: a Celery message costs a worker ~2 ms
of CPU whatever it carries (docs/benchmarks.md), so under load this cost is shared by the batch.

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
from relay.keys import Keys
from relay.models import StoredEvent
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

# KEYS: queue, unclaimed. ARGV: key prefix, dedupe s, retention s, batch token, message,
# redeliver-at ms, then (event id, record) pairs. Returns 1 (stored) or 0 (duplicate) per event.
STORE_SCRIPT = Script("""
local stored, any = {}, false
for i = 7, #ARGV, 2 do
  if redis.call('SET', ARGV[1] .. 'seen:' .. ARGV[i], ARGV[4], 'NX', 'EX', ARGV[2]) then
    redis.call('SET', ARGV[1] .. 'event:' .. ARGV[i], ARGV[i + 1], 'EX', ARGV[3])
    stored[#stored + 1] = 1
    any = true
  else
    stored[#stored + 1] = 0
  end
end
if any then
  redis.call('LPUSH', KEYS[1], ARGV[5])
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
end
return stored
""")

_encode_record = msgspec.msgpack.Encoder().encode


class StoreUnavailable(Exception):
    """Redis could not be reached or did not confirm the write; nothing may be promised."""


class EventStore(Batcher[StoredEvent, bool]):
    def __init__(self, client: aioredis.Redis, keys: Keys, dedupe_seconds: float,
                 retention_seconds: float, redeliver_after: float = 60.0,
                 linger: float = 0.0) -> None:
        super().__init__(max_batch=MAX_BATCH, linger=linger, enough=ENOUGH)
        self._client = client
        #: A fan-out message no worker has taken within this long is queued again.
        self._redeliver_ms = int(redeliver_after * 1000)
        self._keys = keys
        self._dedupe = max(1, int(dedupe_seconds))
        self._retention = max(self._dedupe, int(retention_seconds))
        self._commit = GroupCommit(client, timeout=WRITE_TIMEOUT)

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
        args: list[object] = [k.prefix, self._dedupe, self._retention, token, message,
                              int(events[0].received_at * 1000) + self._redeliver_ms]
        for event in events:
            args += [event.event_id, _encode_record(event)]
        result = await self._commit.script(STORE_SCRIPT, (k.queue, k.unclaimed), args)
        if isinstance(result, Exception):
            raise result
        return [bool(r) for r in result]

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                return bool(await self._client.ping())
        except (RedisError, OSError):
            return False
