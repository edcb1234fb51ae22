"""Operator alerts: ``subscriber.circuit_opened``, ``subscriber.recovered``,
``subscriber.disabled`` and ``delivery.dead_lettered``, posted to every ``alerts:`` URL.

* **Rate-limited** per (type, subscriber): at most one per ``WINDOW`` (5 minutes); the ones
  in between are counted, and the next alert sent carries that count (``count``: how many
  occurrences it stands for).
* **Durable and retried**: an alert is a job in the ``alerts`` sorted set (scored by due
  time), one per target, taken with a lease like a delivery, retried with backoff up to
  ``MAX_ATTEMPTS``. A worker that dies mid-post leaves the job to fall due again.
* **Never in a delivery's way**: raising one is one Redis round trip after the outcome is
  written; posting runs in its own task on the worker's loop, outside every lane.

The body is ``{"eventId", "type", "subscriber", "at", "detail", "count"}``, signed like a
delivery with the target's own secret and scheme (``eventId`` is the alert's id, so an
Ingram-style verifier that signs the eventId verifies alerts unchanged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence

import aiohttp
import msgspec
from redis.exceptions import RedisError

from relay.batching import Script
from relay.config import AlertTarget
from relay.keys import Keys
from workers import http
from workers.ledger import Ledger, now_ms

log = logging.getLogger("relay.alerts")

WINDOW_MS = 5 * 60 * 1000
MAX_ATTEMPTS = 10
POLL_SECONDS = 1.0
#: How long a taken job is leased before another worker may take it.
LEASE_MS = 60_000
KINDS = {"opened": "subscriber.circuit_opened", "recovered": "subscriber.recovered",
         "disabled": "subscriber.disabled", "dead_lettered": "delivery.dead_lettered"}


class Alert(msgspec.Struct, frozen=True):
    eventId: str
    type: str
    subscriber: str
    at: str
    detail: str
    count: int = 1


class Job(msgspec.Struct, array_like=True, frozen=True):
    target: str       # the alert URL (its secret is looked up in the running config)
    attempt: int
    body: str         # JSON text (a JSON job: the script fills in the count by text)
    alert_id: str


# KEYS: window, folded, alerts. ARGV: window ms, now ms, then one job per target, each with
# a '@@count@@' slot for the number of occurrences it stands for. Returns the count sent, or
# 0 when this occurrence was folded into the next.
RAISE = Script("""
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[1]) then
  local count = 1 + tonumber(redis.call('GETDEL', KEYS[2]) or 0)
  for i = 3, #ARGV do
    local job = string.gsub(ARGV[i], '@@count@@', tostring(count))
    redis.call('ZADD', KEYS[3], ARGV[2], job)
  end
  return count
end
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], 86400000)
return 0
""")

# KEYS: alerts. ARGV: now ms, lease ms, most. Leases and returns the due jobs.
TAKE = Script("""
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, job in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), job)
end
return due
""")

# KEYS: alerts. ARGV: job, then optionally the retried job and its due ms.
SETTLE = Script("""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 and ARGV[2] then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
end
return 1
""")

_encode = msgspec.json.encode
_job = msgspec.json.encode
_decode_job = msgspec.json.Decoder(Job).decode


class Alerts:
    def __init__(self, ledger: Ledger, keys: Keys, targets: Sequence[AlertTarget]) -> None:
        self._ledger = ledger
        self._keys = keys
        self.targets = tuple(targets)

    async def raise_(self, transition: str, subscriber: str, detail: str) -> None:
        """Queue the alert for ``transition`` (a key of KINDS) unless one of its type for this
        subscriber went out within the window (then it is counted into the next)."""
        if not self.targets:
            return
        kind = KINDS[transition]
        alert_id = f"alert_{os.urandom(8).hex()}"
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
        # The count is only known inside the script: the body carries a slot for it.
        body = _encode(Alert(alert_id, kind, subscriber, at, detail[:500], 0)).decode().replace(
            '"count":0', '"count":@@count@@')
        jobs = [_job(Job(t.url, 1, body, alert_id)) for t in self.targets]
        try:
            count = await self._ledger.script(
                RAISE, (self._keys.alert_window(kind, subscriber),
                        self._keys.alert_folded(kind, subscriber), self._keys.alerts),
                (WINDOW_MS, now_ms(), *jobs))
        except (RedisError, OSError) as exc:
            log.warning("could not queue an alert", extra={"type": kind,
                                                          "subscriber": subscriber,
                                                          "error": repr(exc)})
            return
        log.info("alert queued" if count else "alert folded into the next",
                 extra={"type": kind, "subscriber": subscriber, "count": int(count)})

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Post due alerts until cancelled; each worker process runs one of these."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if not self.targets:
                continue
            try:
                due = await self._ledger.script(TAKE, (self._keys.alerts,),
                                                (now_ms(), LEASE_MS, 20))
                for raw in due:
                    await self._post(session, raw)
            except (RedisError, OSError) as exc:
                log.warning("alerts: redis unavailable; retrying", extra={"error": repr(exc)})
            except Exception:
                log.exception("alerts: unexpected error; retrying")

    async def _post(self, session: aiohttp.ClientSession, raw: bytes) -> None:
        job = _decode_job(raw)
        target = next((t for t in self.targets if t.url == job.target), None)
        if target is None:
            log.warning("alert dropped: its target is no longer configured",
                        extra={"alertId": job.alert_id})
            await self._ledger.script(SETTLE, (self._keys.alerts,), (raw,))
            return
        body = job.body.encode()
        headers = http.signed_headers(target.signature, target.secret, target.headers,
                                      job.alert_id, body)
        outcome = await http.post(session, target.url, body, headers, target.timeout)
        if outcome.ok:
            await self._ledger.script(SETTLE, (self._keys.alerts,), (raw,))
            log.info("alert sent", extra={"alertId": job.alert_id})
            return
        if job.attempt >= MAX_ATTEMPTS:
            await self._ledger.script(SETTLE, (self._keys.alerts,), (raw,))
            log.error("alert given up after its last attempt",
                      extra={"alertId": job.alert_id, "attempts": job.attempt,
                             "status": outcome.status, "error": outcome.error})
            return
        delay_ms = min(3_600_000, 1000 * 2 ** job.attempt)
        retry = _job(Job(job.target, job.attempt + 1, job.body, job.alert_id))
        await self._ledger.script(SETTLE, (self._keys.alerts,), (raw, retry, now_ms() + delay_ms))
        log.warning("alert not delivered; will retry",
                    extra={"alertId": job.alert_id, "attempt": job.attempt,
                           "status": outcome.status, "error": outcome.error})
