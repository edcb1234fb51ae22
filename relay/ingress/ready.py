"""``GET /readyz``: can this ingress store an event right now?

Ready means "a write succeeds", not "Redis answers PING": after a failover the old primary
comes back as a read-only replica that still answers PING, and every event would get 503.
With ``redis.min_replicas`` a write succeeds only once that many replicas acknowledge it, as
for an event (relay/ingress/store.py): while they do not (a replica down, a new primary that
has none yet), every event gets 503, and so does the probe.

The probe writes a small key; it has its own two-connection client, so a flood of probes
while Redis is slow cannot take connections from real webhooks, and one answer is shared
for a second by every caller (one write a second at most, whatever the probe rate).

The ingress's own writes are the freshest evidence: a store that failed (the ingress just
answered 503) replaces the shared answer with "not ready" at once, and a store that
succeeded replaces a "not ready" with "ready", so a cached answer never contradicts the
last write by up to a second (``failed`` and ``succeeded``).
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError, RedisError

PROBE_TIMEOUT = 2.0
#: How long one answer is reused.
CACHE_SECONDS = 1.0


class ReadinessProbe:
    def __init__(self, client: aioredis.Redis, key: str, min_replicas: int = 0,
                 replica_timeout: float = 1.0) -> None:
        self._client = client
        self._key = key
        self._min_replicas = min_replicas
        self._replica_ms = max(1, int(replica_timeout * 1000))
        self._lock = asyncio.Lock()
        self._answer: tuple[bool, str] = (False, "not checked yet")
        self._at = float("-inf")

    async def check(self) -> tuple[bool, str]:
        """``(ready, why not)``."""
        if time.monotonic() - self._at < CACHE_SECONDS:
            return self._answer
        async with self._lock:  # one probe in flight; the others wait for its answer
            if time.monotonic() - self._at >= CACHE_SECONDS:
                started = time.monotonic()
                answer = await self._probe()
                if self._at < started:  # no event's write told otherwise meanwhile
                    self._answer, self._at = answer, time.monotonic()
        return self._answer

    def failed(self, why: str) -> None:
        """A write of an event failed: not ready, from now (the next probe may say ready)."""
        self._answer, self._at = (False, why), time.monotonic()

    def succeeded(self) -> None:
        """A write of an event succeeded: ready, if the shared answer said otherwise."""
        if not self._answer[0]:
            self._answer, self._at = (True, ""), time.monotonic()

    async def _probe(self) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT + self._replica_ms / 1000):
                if not self._min_replicas:
                    await self._client.set(self._key, str(time.time()), ex=60)
                    return True, ""
                # One pipeline: WAIT counts the replicas that hold this connection's writes.
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.set(self._key, str(time.time()), ex=60)
                    pipe.execute_command("WAIT", self._min_replicas, self._replica_ms)
                    _, acked = await pipe.execute()
            if int(acked) < self._min_replicas:
                return False, (f"{acked} of {self._min_replicas} replicas acknowledged a write "
                               f"(redis.min_replicas): no replica, or too slow")
            return True, ""
        except ReadOnlyError:
            return False, "redis is a read-only replica (a failover in progress?)"
        except (RedisError, OSError):
            return False, "redis is not reachable"

    async def close(self) -> None:
        await self._client.aclose()
