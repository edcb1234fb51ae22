"""One delivery attempt over HTTP: sign, post the exact bytes, classify the outcome.

Every failure of an attempt becomes an ``Outcome`` with an error class, whatever raised it:
an attempt that escaped as an exception would never be recorded, and would come back only
when its lease expired, with no history in its dead letter.
"""

from __future__ import annotations

import asyncio
import functools
import time

import aiohttp
import msgspec
from multidict import CIMultiDict

from relay.config import SignatureScheme
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


def signed_headers(signature: SignatureScheme, secret: str, own: dict[str, str],
                   event_id: str, body: bytes) -> CIMultiDict[str] | dict[str, str]:
    """The endpoint's own headers, then content type and signatures. Header names are
    case-insensitive: the hub's win over a configured ``content-type`` or ``x-hub-signature``
    in any case, instead of going out twice. (Without own headers a plain dict does: the
    hub's names do not repeat.)"""
    headers: CIMultiDict[str] | dict[str, str] = CIMultiDict(own) if own else {}
    headers["Content-Type"] = "application/json"
    headers["User-Agent"] = USER_AGENT
    if signature in ("ingram", "both"):
        headers[INGRAM_HEADER] = sign_ingram(secret, event_id)
    if signature in ("standard", "both"):
        # webhook-id is stable across retries (receivers dedupe on it); timestamp is fresh.
        for name, value in StandardWebhook(secret).headers(f"msg_{event_id}", body).items():
            headers[name] = value
    return headers


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


async def post(session: aiohttp.ClientSession, url: str, body: bytes,
               headers: CIMultiDict[str] | dict[str, str], timeout: float) -> Outcome:
    started = time.perf_counter()

    def elapsed() -> float:
        return round((time.perf_counter() - started) * 1000, 2)

    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                timeout=_timeout(timeout)) as resp:
            await resp.content.read(_ANSWER_BYTES)
            # Retry-After is honoured on any status (a 500 with one means it too).
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
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # e.g. ValueError for a header aiohttp refuses: still an attempt
        return Outcome(None, type(exc).__name__, elapsed())
