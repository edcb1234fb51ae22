"""Recording sinks: ``python -m bench.sink --port P``, an aiohttp server in its own process.

Every POST (any path) is answered 200 and counted, with its receive time (after ``?delay=S``
seconds, if the subscriber's URL asks for it: a slow subscriber); while recording is
on (``POST /_record?on=1``) the event id and path of each receipt are kept too, for latency.
Control, all on the same port: ``GET /_stats`` (count, distinct (eventId, path) pairs, first
and last receive time, count per path), ``GET /_receipts`` (the recorded
``[eventId, path, t]``), ``POST /_reset``. ``POST /_delay?path=P&ms=N`` makes posts to ``P``
answer after N ms (the ordering phase's subscriber latency); ``GET /_answers`` lists, for
those, ``[eventId, path, t received, t answered]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import msgspec
from aiohttp import web

from bench.events import id_of
from relay import loops


class Recorder:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.per_path: Counter[str] = Counter()
        self.recording = False
        self.receipts: list[tuple[str, str, float]] = []
        #: hash of (eventId, path) of every receipt: distinct deliveries, so duplicates show.
        self.seen: set[int] = set()
        self.delays: dict[str, float] = {}
        self.answers: list[tuple[str, str, float, float]] = []


def create_app() -> web.Application:
    rec = Recorder()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        rec.count += 1
        if not rec.first:
            rec.first = now
        rec.last = now
        rec.per_path[request.path] += 1
        eid = id_of(body)
        rec.seen.add(hash((eid, request.path)))
        if rec.recording:
            rec.receipts.append((eid, request.path, now))
        delay = rec.delays.get(request.path)
        if delay is not None:
            await asyncio.sleep(delay)
            rec.answers.append((eid, request.path, now, time.time()))
        elif "delay" in request.query:  # a subscriber URL's own ?delay=s (slow subscribers)
            await asyncio.sleep(float(request.query["delay"]))
        return web.Response(text="ok")

    async def set_delay(request: web.Request) -> web.Response:
        rec.delays[request.query["path"]] = int(request.query["ms"]) / 1000
        return web.Response(text="ok")

    async def answers(request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(rec.answers),
                            content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode({
            "count": rec.count, "distinct": len(rec.seen), "first": rec.first, "last": rec.last,
            "per_path": dict(rec.per_path)}), content_type="application/json")

    async def receipts(request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(rec.receipts),
                            content_type="application/json")

    async def reset(request: web.Request) -> web.Response:
        rec.reset()
        return web.Response(text="reset")

    async def record(request: web.Request) -> web.Response:
        rec.recording = request.query.get("on", "1") == "1"
        return web.Response(text="ok")

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_get("/_stats", stats)
    app.router.add_get("/_receipts", receipts)
    app.router.add_post("/_reset", reset)
    app.router.add_post("/_record", record)
    app.router.add_post("/_delay", set_delay)
    app.router.add_get("/_answers", answers)
    app.router.add_post("/{tail:.*}", receive)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(), host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=loops.new_event_loop())


if __name__ == "__main__":
    main()
