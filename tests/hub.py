"""A hub under test: config files, worker/ingress subprocesses and recording HTTP sinks.

Everything is real: the worker is ``relay worker`` in a subprocess on the private Redis,
sinks are aiohttp servers on 127.0.0.1 in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml
from aiohttp import web

from relay.signatures import sign_ingram
from tests.support import free_port, process, relay_cmd, wait_http, wait_until

INGRESS_SECRET = "test-ingress-secret"
STANDARD_SECRET = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


@dataclass
class Received:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event_id(self) -> str:
        return str(msgspec.json.decode(self.body)["eventId"])


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class Sink:
    """Records every request; ``behave(path, fn)`` decides the reply per request.

    ``fn(request_number_on_that_path) -> Reply``; default: 200 at once.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self._behaviour: dict[str, Callable[[int], Reply]] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def behave(self, path: str, fn: Callable[[int], Reply]) -> None:
        with self._lock:
            self._behaviour[path] = fn

    def on(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 30.0) -> list[Received]:
        wait_until(lambda: len(self.on(path)) >= count, timeout,
                   what=f"{count} deliveries on {path} (have {len(self.on(path))})")
        return self.on(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self._lock:
            n = self._counts.get(request.path, 0) + 1
            self._counts[request.path] = n
            fn = self._behaviour.get(request.path)
        reply = fn(n) if fn else Reply()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        with self._lock:
            self.received.append(Received(time.time(), request.path, dict(request.headers),
                                          body))
        return web.Response(status=reply.status, headers=reply.headers, text="ok")

    def start(self) -> Sink:
        self._thread.start()

        async def up() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(up(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def write_config(path: Path, redis_url: str, subscribers: list[dict[str, Any]],
                 delivery: dict[str, Any] | None = None, worker: dict[str, Any] | None = None,
                 ingress: dict[str, Any] | None = None) -> Path:
    doc = {
        "redis": {"url": redis_url},
        "ingress": {"secrets": [INGRESS_SECRET], "port": free_port(), **(ingress or {})},
        "delivery": delivery or {"timeout": "2s", "max_attempts": 5,
                                 "backoff": {"initial": "100ms", "max": "1s"}},
        "worker": {"pool": "prefork", "concurrency": 1, "lease_grace": "5s",
                   "visibility_timeout": "20s", **(worker or {})},
        "subscribers": subscribers,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ingress_port(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["ingress"]["port"])


@contextlib.contextmanager
def worker(config: Path, log: Path, *extra: str) -> Iterator[Any]:
    with process(relay_cmd("--config", str(config), "worker", *extra), log_path=log) as proc:
        wait_until(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 30,
                   what="celery worker ready")
        assert proc.poll() is None, log.read_text()
        yield proc


@contextlib.contextmanager
def ingress(config: Path, log: Path) -> Iterator[str]:
    port = ingress_port(config)
    with process(relay_cmd("--config", str(config), "ingress"), log_path=log) as proc:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        assert proc.poll() is None
        yield f"http://127.0.0.1:{port}/webhooks/ingram"


def event_body(event_id: str, event_type: str = "im::order_shipped",
               topic: str = "resellers/orders") -> bytes:
    return msgspec.json.encode({
        "topic": topic, "event": "im::updated", "eventId": event_id,
        "eventTimeStamp": "2024-01-01T00:00:00Z",
        "resource": [{"eventType": event_type, "orderNumber": "20-X", "lines": []}],
    })


def signed_headers(body: bytes, secret: str = INGRESS_SECRET) -> dict[str, str]:
    event_id = msgspec.json.decode(body)["eventId"]
    return {"Content-Type": "application/json", "X-Hub-Signature": sign_ingram(secret, event_id)}


def post(url: str, body: bytes, secret: str = INGRESS_SECRET) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers=signed_headers(body, secret),
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, msgspec.json.decode(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, msgspec.json.decode(exc.read() or b"{}")
