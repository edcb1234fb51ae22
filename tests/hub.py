"""A hub under test: config files, worker/ingress subprocesses and recording HTTP sinks.

Everything is real: the worker is ``relay worker`` in a subprocess on the private Redis,
sinks are aiohttp servers on 127.0.0.1 in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml
from aiohttp import web

from relay.config import Config
from relay.ingress.app import create_app
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
    #: When the request arrived (``at`` is when it was answered, after any delay).
    arrived: float = 0.0
    #: Every header as sent, repeats included (``headers`` keeps one per name).
    raw_headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def event_id(self) -> str:
        return str(msgspec.json.decode(self.body)["eventId"])


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: The answer's body (default ``ok``).
    body: bytes | None = None


class Sink:
    """Records every request; ``behave(path, fn)`` decides the reply per request.

    ``fn(request_number_on_that_path) -> Reply``; default: 200 at once.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self._behaviour: dict[str, Callable[[int], Reply]] = {}
        self._per_event: dict[str, Callable[[str, int], Reply]] = {}
        self._counts: dict[str, int] = {}
        self._event_counts: dict[tuple[str, str], int] = {}
        self._open: dict[str, int] = {}
        #: The most requests a path had open at once.
        self.peak_open: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def behave(self, path: str, fn: Callable[[int], Reply]) -> None:
        with self._lock:
            self._behaviour[path] = fn

    def behave_per_event(self, path: str, fn: Callable[[str, int], Reply]) -> None:
        """``fn(event_id, request_number_for_that_event_on_that_path) -> Reply``."""
        with self._lock:
            self._per_event[path] = fn

    def on(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 30.0) -> list[Received]:
        wait_until(lambda: len(self.on(path)) >= count, timeout,
                   what=f"{count} deliveries on {path} (have {len(self.on(path))})")
        return self.on(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        body = await request.read()
        with self._lock:
            n = self._counts.get(request.path, 0) + 1
            self._counts[request.path] = n
            self._open[request.path] = self._open.get(request.path, 0) + 1
            self.peak_open[request.path] = max(self.peak_open.get(request.path, 0),
                                               self._open[request.path])
            fn = self._behaviour.get(request.path)
            per_event = self._per_event.get(request.path)
            choose: Callable[[], Reply] = functools.partial(fn, n) if fn else Reply
            if per_event is not None:
                try:
                    event_id = str(msgspec.json.decode(body)["eventId"])
                except (msgspec.DecodeError, KeyError, TypeError):
                    event_id = ""
                m = self._event_counts.get((request.path, event_id), 0) + 1
                self._event_counts[(request.path, event_id)] = m
                choose = functools.partial(per_event, event_id, m)
        reply = choose()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        with self._lock:
            self._open[request.path] -= 1
            self.received.append(Received(time.time(), request.path, dict(request.headers),
                                          body, arrived, list(request.headers.items())))
        if reply.body is not None:
            return web.Response(status=reply.status, headers=reply.headers, body=reply.body)
        return web.Response(status=reply.status, headers=reply.headers, text="ok")

    def start(self) -> Sink:
        self._thread.start()

        async def up() -> None:
            # aiohttp's default (1 MiB) would answer Ingram's big stock updates 413.
            app = web.Application(client_max_size=16 * 1024 * 1024)
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
                 ingress: dict[str, Any] | None = None, redis: dict[str, Any] | None = None,
                 admin: dict[str, Any] | None = None) -> Path:
    """A hub config; ``redis`` adds to or overrides the ``redis:`` section (e.g. ``sentinel``,
    ``min_replicas``)."""
    delivery = dict(delivery or {"timeout": "2s", "max_attempts": 5,
                                 "backoff": {"initial": "100ms", "max": "1s"}})
    # Tests of retries and dead letters make subscribers fail on purpose, and a circuit
    # breaker (on by default: 10 failures) would hold their attempts instead; the breaker's
    # own tests set it.
    delivery.setdefault("circuit_breaker", {"failures": 0})
    doc = {
        "redis": {"url": redis_url, **(redis or {})},
        "ingress": {"secrets": [INGRESS_SECRET], "port": free_port(), **(ingress or {})},
        "delivery": delivery,
        "worker": {"pool": "prefork", "concurrency": 1, "lease_grace": "5s",
                   "visibility_timeout": "20s", **(worker or {})},
        "subscribers": subscribers,
    }
    if admin:
        doc["admin"] = admin
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ingress_port(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["ingress"]["port"])


@contextlib.contextmanager
def worker(config: Path, log: Path, *extra: str,
           env: dict[str, str] | None = None) -> Iterator[Any]:
    """``relay worker`` on ``config`` (``env``: added to this process's environment)."""
    with process(relay_cmd("--config", str(config), "worker", *extra), env=env,
                 log_path=log) as proc:
        wait_until(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 30,
                   what="celery worker ready")
        assert proc.poll() is None, log.read_text()
        yield proc


@contextlib.contextmanager
def ingress(config: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    port = ingress_port(config)
    with process(relay_cmd("--config", str(config), "ingress"), env=env,
                 log_path=log) as proc:
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


def _run(coro: Any) -> Any:
    """``asyncio.run``, in a thread of its own when this one already runs a loop (Playwright's
    sync API does)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def enqueue_event(client: Any, body: bytes, prefix: str = "relay:") -> str:
    """Store an event and queue its fan-out with the ingress's own store, without its HTTP."""
    import redis.asyncio as aioredis

    from relay.ingress.store import EventStore
    from relay.keys import Keys
    from relay.models import StoredEvent, parse_envelope

    envelope = parse_envelope(body)
    record = StoredEvent(event_id=envelope.eventId, topic=envelope.topic,
                         event_types=envelope.event_types(), received_at=time.time(), body=body,
                         order_numbers=envelope.order_numbers())
    params = client.connection_pool.connection_kwargs

    async def accept() -> bool:
        aclient = aioredis.Redis(host=params.get("host", "127.0.0.1"),
                                 port=params.get("port", 6379), db=params.get("db", 0))
        try:
            return await EventStore(aclient, Keys(prefix=prefix), 86400, 86400).accept(record)
        finally:
            await aclient.aclose()

    assert _run(accept()), f"{envelope.eventId} was stored before"
    return envelope.eventId


def attempt_log(client: Any, event_id: str, subscriber: str) -> list[Any]:
    """The attempt records of (event, subscriber), oldest first."""
    from relay.keys import Keys
    from relay.models import Attempt

    raw = client.lrange(Keys().log(event_id, subscriber), 0, -1)
    return [msgspec.msgpack.decode(r, type=Attempt) for r in reversed(raw)]


@dataclass
class Letter:
    """A dead letter with its attempt history (kept in the attempt log)."""

    event_id: str
    subscriber: str
    reason: str
    dead_at: float
    event: Any
    attempts: list[Any]


def dead_letters(client: Any) -> dict[tuple[str, str], Letter]:
    """Every dead letter, keyed (event_id, subscriber)."""
    from relay.keys import Keys
    from relay.models import DeadLetter

    keys = Keys()
    found = {}
    for name in client.smembers(keys.dead_subscribers):
        sub = name.decode()
        for member in client.zrange(keys.dead(sub), 0, -1):
            raw = client.get(keys.letter(sub, member.decode()))
            if raw is None:
                continue
            d = msgspec.msgpack.decode(raw, type=DeadLetter)
            found[(d.event_id, d.subscriber)] = Letter(
                d.event_id, d.subscriber, d.reason, d.dead_at, d.event,
                attempt_log(client, d.event_id, d.subscriber))
    return found


def delivered(client: Any, event_id: str, subscriber: str) -> bool:
    """Whether the delivery record says (event, subscriber) was delivered."""
    from relay.keys import Keys

    state = client.hget(Keys().deliveries(event_id), subscriber)
    return bool(state) and state[:1] == b"d"


class LiveIngress:
    """``create_app(config)`` served on 127.0.0.1:<free port> from its own loop and thread."""

    def __init__(self, config: Config,
                 factory: Callable[[Config], web.Application] = create_app) -> None:
        self.config = config
        self._factory = factory
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> LiveIngress:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._factory(self.config), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class LiveAdmin(LiveIngress):
    """The admin app (``relay.admin.app.create_app``) served the same way; ``url`` is its base."""

    def __init__(self, config: Config) -> None:
        from relay.admin.app import create_app as admin_app

        super().__init__(config, admin_app)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def call(url: str, method: str = "GET", body: Any = None, token: str | None = None,
         timeout: float = 15.0) -> tuple[int, dict[str, str], Any]:
    """One HTTP request: (status, headers, the body decoded as JSON, or as text if not JSON).
    ``body``: JSON-encoded unless bytes; ``token``: sent as ``Authorization: Bearer``."""
    import urllib.error
    import urllib.request

    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, got, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, got, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, got, msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        return status, got, raw.decode(errors="replace")


def order_event(event_id: str, event_type: str, orders: tuple[str, ...] = ("20-X",)) -> bytes:
    """An envelope of one event type with one resource per Ingram order number."""
    return msgspec.json.encode({
        "topic": "resellers/orders", "event": "im::updated", "eventId": event_id,
        "eventTimeStamp": "2024-01-01T00:00:00Z",
        "resource": [{"eventType": event_type, "orderNumber": o, "lines": []} for o in orders],
    })


def enqueue_events(client: Any, bodies: list[bytes], prefix: str = "relay:",
                   config: Config | None = None) -> list[str]:
    """``enqueue_event`` for many at once: stored together in batches (one fan-out task each),
    as the ingress stores concurrent requests (in this order). With ``config``, ordered
    subscribers' queues are joined as the ingress would."""
    import redis.asyncio as aioredis

    from relay.ingress.store import EventStore
    from relay.keys import Keys
    from relay.models import StoredEvent, parse_envelope

    now = time.time()
    records = []
    for body in bodies:
        envelope = parse_envelope(body)
        records.append(StoredEvent(event_id=envelope.eventId, topic=envelope.topic,
                                   event_types=envelope.event_types(), received_at=now,
                                   body=body, order_numbers=envelope.order_numbers()))
    params = client.connection_pool.connection_kwargs

    async def accept() -> list[bool]:
        aclient = aioredis.Redis(host=params.get("host", "127.0.0.1"),
                                 port=params.get("port", 6379), db=params.get("db", 0))
        try:
            store = EventStore(aclient, Keys(prefix=prefix), 86400, 86400)
            if config is not None:
                from relay.ordering import Sequencer

                store.sequencer = Sequencer(config.subscribers)
            return list(await asyncio.gather(*(store.accept(r) for r in records)))
        finally:
            await aclient.aclose()

    assert all(_run(accept())), "some events were stored before"
    return [r.event_id for r in records]


def plant_expired_letters(client: Any, prefix: str, subscriber: str, count: int,
                          tag: str = "EXP") -> list[str]:
    """``count`` dead letters of ``subscriber`` whose event has expired (no record, no copy in
    the letter: they cannot be replayed), dead-lettered just now (newest first in listings).
    As the outcome script writes them for reason ``event expired``."""
    from relay.keys import Keys
    from relay.models import DeadLetter

    keys = Keys(prefix=prefix)
    now = time.time()
    ids = [f"EV-{tag}-{n:04d}" for n in range(count)]
    pipe = client.pipeline(transaction=False)
    for n, event_id in enumerate(ids):
        at = now + n / 1000
        pipe.set(keys.letter(subscriber, event_id),
                 msgspec.msgpack.encode(DeadLetter(event_id, subscriber, "event expired", at,
                                                   None)), ex=86400)
        pipe.zadd(keys.dead(subscriber), {event_id: int(at * 1000)})
    pipe.sadd(keys.dead_subscribers, subscriber)
    pipe.execute()
    return ids
