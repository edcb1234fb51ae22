"""The load generator: ``python -m bench.loadgen``, one process per instance.

It reads a JSON spec on stdin, builds every request (signed, distinct events) up front, prints
``ready``, waits for ``go`` on stdin, sends, writes its result JSON to ``spec["out"]`` and
prints ``done``. Two engines:

* ``raw``: a minimal HTTP/1.1 keep-alive client on asyncio protocols (one request in flight
  per connection), cheap enough per request that the server, not the generator, is the limit
  (on 2 cores, every core the generator uses is one the hub does not get);
* ``aiohttp``: ``aiohttp.ClientSession``, used for the egress ceiling, where the hub's
  workers use the same client.

Modes: ``closed`` keeps ``concurrency`` requests in flight until ``count`` are done;
``open`` starts request *i* at ``t0 + i / rate`` whatever happened to the others.
Every loop is bounded by ``count`` and by ``deadline`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

from bench.events import event_id, signed
from relay import loops


class _Conn(asyncio.Protocol):
    """One keep-alive connection; ``request`` sends bytes and returns the response status."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"\ncontent-length:")
        length = 0
        if at >= 0:
            eol = head.find(b"\r", at + 1)
            length = int(head[at + 16:eol if eol > 0 else len(head)])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        del self.buf[:total]
        waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class Requests:
    """The requests of one generator: urls round-robin, one signed event each."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.urls = [urlsplit(u) for u in spec["urls"]]
        self.raw_urls = spec["urls"]
        start, count = spec["start"], spec["count"]
        self.ids: list[str] = []
        self.bodies: list[bytes] = []
        self.sigs: list[str] = []
        for n in range(start, start + count):
            eid = event_id(spec["prefix"], n)
            body, sig = signed(eid, spec["secret"])
            self.ids.append(eid)
            self.bodies.append(body)
            self.sigs.append(sig)

    def __len__(self) -> int:
        return len(self.ids)

    def url(self, i: int) -> str:
        return str(self.raw_urls[i % len(self.raw_urls)])

    def raw(self, i: int) -> tuple[str, int, bytes]:
        u = self.urls[i % len(self.urls)]
        body = self.bodies[i]
        head = (f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                f"Content-Type: application/json\r\nX-Hub-Signature: {self.sigs[i]}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        return u.hostname or "127.0.0.1", u.port or 80, head + body


class Result:
    def __init__(self, record: bool) -> None:
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.record = record
        self.records: list[tuple[str, float, int]] = []
        self.t_start = 0.0
        self.t_end = 0.0

    def done(self, eid: str, status: int, started: float) -> None:
        now = time.perf_counter()
        self.statuses[str(status)] += 1
        self.latencies.append(now - started)
        if self.record:
            self.records.append((eid, time.time(), status))

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

        return {"statuses": dict(self.statuses), "errors": dict(self.errors),
                "completed": len(lat), "t_start": self.t_start, "t_end": self.t_end,
                "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
                "records": self.records if self.record else None}


async def _send(conn: _Conn | None, request: tuple[str, int, bytes], res: Result
                ) -> tuple[_Conn | None, int]:
    """Send on ``conn`` (a new connection if it is missing or closed): the connection and the
    status, or (None, 0) with the error counted in ``res``."""
    host, port, data = request
    try:
        if conn is None or conn.transport is None or conn.transport.is_closing():
            _, conn = await asyncio.get_running_loop().create_connection(_Conn, host, port)
        return conn, await conn.request(data)
    except OSError as exc:
        res.errors[type(exc).__name__] += 1
        return None, 0


async def _paced(count: int, rate: float, deadline: float,
                 one: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """Open loop: start ``one(i)`` at ``t0 + i / rate`` whatever happened to the others, then
    wait (until ``deadline``) for those still running."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    t0 = loop.time()
    for i in range(count):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() > deadline:
            break
        task = loop.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=max(0.1, deadline - time.monotonic()))


async def run_raw_closed(reqs: Requests, concurrency: int, deadline: float, res: Result) -> None:
    prepared = [reqs.raw(i) for i in range(len(reqs))]
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        conn: _Conn | None = None
        while next_index < len(prepared) and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            conn, status = await _send(conn, prepared[i], res)
            if conn is not None:
                res.done(reqs.ids[i], status, started)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    res.t_start = time.time()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prepared)))))
    res.t_end = time.time()


async def run_raw_open(reqs: Requests, concurrency: int, rate: float, deadline: float,
                       res: Result) -> None:
    """Request *i* at ``t0 + i / rate`` on an idle keep-alive connection (a new one when none
    is idle, at most ``concurrency`` in flight), whatever happened to the others."""
    prepared = [reqs.raw(i) for i in range(len(reqs))]
    idle: list[_Conn] = []
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        started = time.perf_counter()
        async with slots:
            conn, status = await _send(idle.pop() if idle else None, prepared[i], res)
            if conn is not None:
                res.done(reqs.ids[i], status, started)
                idle.append(conn)

    res.t_start = time.time()
    await _paced(len(prepared), rate, deadline, one)
    res.t_end = time.time()
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()


async def run_aiohttp(reqs: Requests, mode: str, concurrency: int, rate: float,
                      deadline: float, res: Result) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=max(1.0, deadline - time.monotonic()))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False) as session:

        async def one(i: int) -> None:
            started = time.perf_counter()
            headers = {"Content-Type": "application/json", "X-Hub-Signature": reqs.sigs[i]}
            try:
                async with session.post(reqs.url(i), data=reqs.bodies[i], headers=headers) as r:
                    await r.read()
                    res.done(reqs.ids[i], r.status, started)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                res.errors[type(exc).__name__] += 1

        res.t_start = time.time()
        if mode == "closed":
            next_index = 0

            async def worker() -> None:
                nonlocal next_index
                while next_index < len(reqs) and time.monotonic() < deadline:
                    i = next_index
                    next_index += 1
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(reqs)))))
        else:
            await _paced(len(reqs), rate, deadline, one)
        res.t_end = time.time()


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    reqs = Requests(spec)
    res = Result(bool(spec.get("record")))
    if spec.get("engine") == "aiohttp":
        import aiohttp  # noqa: F401  (imported before "ready": not part of what is timed)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    cpu_before = time.process_time()
    deadline = time.monotonic() + float(spec.get("deadline", 60))
    if spec.get("engine", "raw") == "raw" and spec.get("mode", "closed") == "closed":
        coro = run_raw_closed(reqs, int(spec["concurrency"]), deadline, res)
    elif spec.get("engine", "raw") == "raw":
        coro = run_raw_open(reqs, int(spec["concurrency"]), float(spec["rate"]), deadline, res)
    else:
        coro = run_aiohttp(reqs, spec.get("mode", "closed"), int(spec.get("concurrency", 64)),
                           float(spec.get("rate", 0) or 1), deadline, res)
    loops.run(coro)
    out = res.summary()
    out["sent"] = len(reqs)
    out["cpu_s"] = time.process_time() - cpu_before
    with open(spec["out"], "w") as fh:
        json.dump(out, fh)
    print("done", flush=True)


if __name__ == "__main__":
    main()
