"""Durable, deduplicating writes of accepted events.

One Lua script per event does, atomically: ``SET seen NX EX window``; if that was new,
store the event record, LPUSH its fan-out task onto the Celery queue and note it in
``unclaimed`` (queued again if no worker takes it: see ``relay/keys.py``). "Stored" and
"queued" therefore never disagree, even if Redis dies mid-way (a script's effects are written
to the AOF as one MULTI/EXEC). Concurrent requests share round trips (``relay.batching``).
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relay.batching import GroupCommit, Script
from relay.keys import Keys
from relay.models import StoredEvent
from relay.queue import deliver_message

log = logging.getLogger("relay.ingress.store")

#: A write Redis has not confirmed within this long is answered 503 (seconds).
WRITE_TIMEOUT = 5.0
PING_TIMEOUT = 2.0

STORE_SCRIPT = Script("""
if redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', ARGV[1]) then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[2])
  redis.call('LPUSH', KEYS[3], ARGV[5])
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
  return 1
end
return 0
""")

_encode_record = msgspec.msgpack.Encoder().encode


class StoreUnavailable(Exception):
    """Redis could not be reached or did not confirm the write; nothing may be promised."""


class EventStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, dedupe_seconds: float,
                 retention_seconds: float, redeliver_after: float = 60.0) -> None:
        self._client = client
        #: A fan-out message no worker has taken within this long is queued again.
        self._redeliver_ms = int(redeliver_after * 1000)
        self._keys = keys
        self._dedupe = max(1, int(dedupe_seconds))
        self._retention = max(self._dedupe, int(retention_seconds))
        self._batch = GroupCommit(client, timeout=WRITE_TIMEOUT)

    async def accept(self, event: StoredEvent) -> bool:
        """Store ``event`` and queue its fan-out. True if new, False if a duplicate.

        Raises StoreUnavailable when Redis does not confirm: the caller must answer 503.
        """
        k = self._keys
        try:
            result = await self._batch.script(
                STORE_SCRIPT,
                (k.seen(event.event_id), k.event(event.event_id), k.queue, k.unclaimed),
                (self._dedupe, self._retention, str(int(event.received_at)),
                 _encode_record(event), deliver_message(k.queue, event.event_id, None, 1),
                 int(event.received_at * 1000) + self._redeliver_ms))
        except (RedisError, OSError) as exc:
            log.warning("redis write failed", extra={"eventId": event.event_id,
                                                     "error": repr(exc)})
            raise StoreUnavailable(str(exc)) from exc
        if isinstance(result, Exception):
            log.warning("redis refused the write", extra={"eventId": event.event_id,
                                                          "error": repr(result)})
            raise StoreUnavailable(str(result))
        return bool(result)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                return bool(await self._client.ping())
        except (RedisError, OSError):
            return False
