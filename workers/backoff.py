"""How long to wait before attempt ``n + 1``: exponential backoff with full jitter.

Full jitter (delay uniform in [0, min(max, initial * 2**(n-1))]) spreads the retries of many
events that failed together, so a subscriber coming back is not hit by a synchronised wave
(https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/). A ``Retry-After``
from the subscriber replaces the computed delay, capped at ``backoff.max``.
"""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime

from relay.config import Backoff


def ceiling(backoff: Backoff, attempt: int) -> float:
    """The largest delay after failed attempt ``attempt`` (1-based)."""
    return min(backoff.max, backoff.initial * 2 ** min(attempt - 1, 62))


def retry_delay(backoff: Backoff, attempt: int, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
    if retry_after is not None:
        return min(max(retry_after, 0.0), backoff.max)
    return (rng or random).uniform(0, ceiling(backoff, attempt))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None
