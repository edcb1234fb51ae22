"""``relay send``: sign a payload as Ingram Micro would and post it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from relay.errors import EnvelopeError
from relay.models import peek_event_id
from relay.signatures import INGRAM_HEADER, sign_ingram


@dataclass(frozen=True)
class SendResult:
    status: int
    body: str


def send_payload(body: bytes, url: str, secret: str, timeout: float = 10.0) -> SendResult:
    """POST ``body`` to ``url`` with ``X-Hub-Signature`` computed over its ``eventId``."""
    event_id = peek_event_id(body)
    if event_id is None:
        raise EnvelopeError("payload has no string eventId at $.eventId; nothing to sign")
    headers = {"Content-Type": "application/json", INGRAM_HEADER: sign_ingram(secret, event_id)}

    async def post() -> SendResult:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                s.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            return SendResult(resp.status, await resp.text())

    return asyncio.run(post())
