"""The obvious design's ingress: ``python -m bench.obvious.ingress --port P``.

The simplest aiohttp handler that does the job: read the body, find the ``eventId``, verify
``X-Hub-Signature``, store the event in Redis (``SET NX``, so a repeat is a duplicate) and call
Celery's ``send_task`` once per subscriber (synchronous: it blocks the event loop while it
writes each message), then answer 202.
"""

from __future__ import annotations

import argparse
import hmac
import json

import redis.asyncio as aioredis
from aiohttp import web

from bench.obvious.app import TASK, event_key, settings, sign
from bench.obvious.app import app as celery_app

RETENTION_S = 7 * 86400


def create_app() -> web.Application:
    store = aioredis.Redis.from_url(settings["redis"])
    subscribers = range(len(settings["subscribers"]))

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event_id = str(json.loads(body)["eventId"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "not an event"}, status=400)
        given = request.headers.get("X-Hub-Signature", "")
        if not hmac.compare_digest(sign(settings["secret"], event_id), given):
            return web.json_response({"error": "bad signature"}, status=401)
        if not await store.set(event_key(event_id), body, nx=True, ex=RETENTION_S):
            return web.json_response({"eventId": event_id, "status": "duplicate"})
        for i in subscribers:
            celery_app.send_task(TASK, args=[event_id, i])
        return web.json_response({"eventId": event_id, "status": "accepted"}, status=202)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    web_app = web.Application()
    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_post("/{tail:.*}", receive)
    return web_app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
