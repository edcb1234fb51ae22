"""``relay sink``: a demo subscriber that logs each delivery and whether it verifies.

It is what ``config/relay.dev.yaml`` routes to, so ``make run`` shows an event going all the
way through. It answers 200 to everything; it is a demo, not a subscriber to copy. Like the
hub's own processes it writes JSON lines (``relay up`` passes them through).
"""

from __future__ import annotations

import asyncio
import binascii
import logging

import msgspec
from aiohttp import web

from relay.errors import SignatureError
from relay.models import peek_event_id
from relay.nesting import TooDeep, check_depth
from relay.serve import serve
from relay.signatures import INGRAM_HEADER, IngramSigner, StandardWebhook

log = logging.getLogger("relay.sink")


def verdict(body: bytes, headers: dict[str, str], secrets: list[str]) -> str:
    """Which signatures on this delivery verify under one of ``secrets``."""
    found = []
    if INGRAM_HEADER.lower() in {k.lower() for k in headers}:
        event_id = peek_event_id(body) or ""
        try:
            IngramSigner(secrets or ["-"]).verify(event_id, headers.get(INGRAM_HEADER))
            found.append("X-Hub-Signature verified")
        except SignatureError:
            found.append("X-Hub-Signature NOT verified")
    if "webhook-signature" in {k.lower() for k in headers}:
        ok = False
        for secret in secrets:
            try:
                StandardWebhook(secret).verify(body, headers)
                ok = True
                break
            except (SignatureError, ValueError, binascii.Error):
                continue
        found.append("webhook-signature verified" if ok else "webhook-signature NOT verified")
    return ", ".join(found) or "unsigned"


def create_sink_app(secrets: list[str]) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        try:
            check_depth(body)  # msgspec recurses per level (relay/nesting.py)
            doc = msgspec.json.decode(body)
            summary = f"{doc.get('eventId')} topic={doc.get('topic')}"
        except (msgspec.DecodeError, AttributeError, TooDeep):
            summary = f"{len(body)} bytes (not a JSON object)"
        log.info(f"sink {request.path}: {summary}: {verdict(body, headers, secrets)}")
        return web.json_response({"received": True})

    # Past aiohttp's default 1 MiB: the hub forwards stock updates of ~1.7 MB (4 MiB admitted).
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", receive)
    return app


def run_sink(host: str, port: int, secrets: list[str]) -> None:
    log.info("demo sink listening", extra={"url": f"http://{host}:{port}/",
                                           "secrets": len(secrets)})
    asyncio.run(serve(create_sink_app(secrets), host, port))
