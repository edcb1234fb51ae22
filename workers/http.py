"""One delivery attempt over HTTP: sign, post the exact bytes, classify the outcome."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec

from relay.config import Subscriber
from relay.models import StoredEvent
from relay.signatures import INGRAM_HEADER, StandardWebhook, sign_ingram
from workers.backoff import parse_retry_after

USER_AGENT = "order-event-relay/0.1"
#: Bytes of a subscriber's answer kept for the attempt log; the rest is drained unread.
_ANSWER_BYTES = 512


class Outcome(msgspec.Struct, frozen=True):
    """What one attempt gave: an HTTP status, or an error class when there was no answer."""

    status: int | None
    error: str | None
    latency_ms: float
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410


def signed_headers(sub: Subscriber, event: StoredEvent) -> dict[str, str]:
    """The subscriber's own headers, then content type and signatures (which win)."""
    headers = dict(sub.headers)
    headers["Content-Type"] = "application/json"
    headers["User-Agent"] = USER_AGENT
    if sub.signature in ("ingram", "both"):
        headers[INGRAM_HEADER] = sign_ingram(sub.secret, event.event_id)
    if sub.signature in ("standard", "both"):
        # webhook-id is stable across retries (receivers dedupe on it); timestamp is fresh.
        headers.update(StandardWebhook(sub.secret).headers(f"msg_{event.event_id}", event.body))
    return headers


async def attempt(session: aiohttp.ClientSession, sub: Subscriber, event: StoredEvent
                  ) -> Outcome:
    started = time.perf_counter()

    def elapsed() -> float:
        return round((time.perf_counter() - started) * 1000, 2)

    try:
        async with session.post(sub.url, data=event.body, headers=signed_headers(sub, event),
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=sub.timeout)) as resp:
            await resp.content.read(_ANSWER_BYTES)
            retry_after = None
            if resp.status in (429, 503):
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
            return Outcome(resp.status, None, elapsed(), retry_after)
    except TimeoutError:
        return Outcome(None, "timeout", elapsed())
    except aiohttp.ClientConnectorDNSError:
        return Outcome(None, "dns", elapsed())
    except aiohttp.ClientConnectorError:
        return Outcome(None, "connect", elapsed())
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
        return Outcome(None, type(exc).__name__, elapsed())
