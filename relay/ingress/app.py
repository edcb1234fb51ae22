"""The aiohttp application: routes and the answer table of docs/contract.md ("Ingress").

Order of checks, cheapest and least revealing first: media type (415), size (413), signature
header present (401), nesting depth (400: before anything parses the body, relay/nesting.py),
JSON envelope (400, with the JSON path), signature valid (401), store
(503 if Redis does not confirm), then 202 or 200 duplicate. A body that fails validation
still has its signature checked first when it carries an eventId, so an unsigned caller
learns nothing about the schema beyond "unauthorised".
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay import clock, loops, tracing
from relay.config import Config
from relay.connections import async_client
from relay.errors import EnvelopeError, SignatureError
from relay.gcfreeze import freeze_startup_objects
from relay.ingress.metrics import IngressMetrics
from relay.ingress.ready import ReadinessProbe
from relay.ingress.store import EventStore, StoreUnavailable
from relay.keys import Keys
from relay.models import StoredEvent, parse_envelope, peek_event_id
from relay.nesting import TooDeep, check_depth
from relay.ordering import Sequencer
from relay.reload import Reloader
from relay.serve import json_answer, json_errors, serve
from relay.signatures import INGRAM_HEADER, IngramSigner

log = logging.getLogger("relay.ingress")

WEBHOOK_ROUTES = (
    "/resellers/v1/webhooks/orderstatusevent",
    "/resellers/v1/webhooks/availabilityupdate",
    "/webhooks/ingram",
)
RETRY_AFTER_SECONDS = "5"
#: After answering a request whose body was not read to the end (413, 408), aiohttp reads and
#: discards what keeps coming for this long before closing, so the client can read the answer.
#: aiohttp's default, 10 s, let a slow-drip sender hold a connection 10 s past read_timeout.
LINGERING_SECONDS = 2.0
#: Connections the ingress opens to Redis at most (the store's round trips are group
#: committed, so a few carry any load; the readiness probe has two of its own).
REDIS_CONNECTIONS = 64

STORE: web.AppKey[EventStore] = web.AppKey("store", EventStore)
METRICS: web.AppKey[IngressMetrics] = web.AppKey("metrics", IngressMetrics)
PROBE: web.AppKey[ReadinessProbe] = web.AppKey("probe", ReadinessProbe)


def _answer(status: int, payload: dict[str, str], headers: dict[str, str] | None = None
            ) -> web.Response:
    return json_answer(status, payload, headers)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


class _TooLarge(Exception):
    pass


class WebhookHandler:
    """Handles every webhook route; ``targeturl`` is never read: callers don't pick targets."""

    def __init__(self, config: Config, store: EventStore, metrics: IngressMetrics,
                 probe: ReadinessProbe | None = None) -> None:
        self._store = store
        self._metrics = metrics
        self._probe = probe
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Take the settings a reload may change (secrets, limits, dedupe, retention)."""
        self._limit = config.ingress.max_body_bytes
        self._read_timeout = config.ingress.read_timeout
        self._signer = IngramSigner(config.ingress.secrets)
        self._store.configure(config.ingress.dedupe_window, config.redis.retention)
        self._store.sequencer = Sequencer(config.subscribers)
        self._store.set_linger(config.ingress.linger)

    async def __call__(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            if tracing.on:
                return await self._traced(request)
            return await self._handle(request)
        finally:
            self._metrics.latency.observe(time.perf_counter() - started)

    async def _traced(self, request: web.Request) -> web.Response:
        """``_handle`` inside the request's server span (relay/tracing.py), which continues
        a ``traceparent`` the caller sent and ends with the answer."""
        # The webhook routes are fixed paths: the path is the route.
        span = tracing.server_span(request.method, request.path, request.headers,
                                   request.remote)
        status, error = None, None
        try:
            answer = await self._handle(request, span)
            status = answer.status
            if status >= 400 and isinstance(answer.body, bytes):
                error = msgspec.json.decode(answer.body).get("error")
            return answer
        finally:
            tracing.end_server(span, status, error)

    def _reject(self, status: int, reason: str, error: str,
                headers: dict[str, str] | None = None, event_id: str | None = None
                ) -> web.Response:
        self._metrics.rejected.labels(reason).inc()
        log.info("rejected", extra={"status": status, "reason": reason, "error": error[:500],
                                    "eventId": event_id})
        return _answer(status, {"error": error}, headers)

    async def _read(self, request: web.Request) -> bytes:
        """The body, refused past the *current* limit (a reload may change it) without ever
        buffering more than the limit plus one chunk."""
        body = bytearray()
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > self._limit:
                raise _TooLarge
        return bytes(body)

    async def _handle(self, request: web.Request, span: object = None) -> web.Response:
        if not _is_json(request.content_type):
            return self._reject(415, "media_type",
                                f"Content-Type must be application/json, got "
                                f"{request.content_type[:100] or 'none'!r}")
        if request.content_length is not None and request.content_length > self._limit:
            return self._reject(413, "too_large", f"body is {request.content_length} bytes; "
                                f"the limit is {self._limit}")
        signature = request.headers.get(INGRAM_HEADER)
        if not signature:
            return self._reject(401, "signature", f"missing {INGRAM_HEADER} header")
        try:
            if request.content.is_eof():
                body = await self._read(request)  # all here already: no timer to arm (~7 us)
            else:
                async with asyncio.timeout(self._read_timeout):
                    body = await self._read(request)
        except _TooLarge:
            return self._reject(413, "too_large", f"body exceeds the limit of {self._limit} bytes")
        except TimeoutError:
            return self._reject(408, "slow_body", f"body not received within "
                                f"{self._read_timeout:g}s")
        except web.RequestPayloadError:
            # e.g. "Content-Encoding: gzip" on bytes that are not gzip (was a 500).
            encoding = request.headers.get("Content-Encoding", "none")
            return self._reject(400, "bad_body", f"body could not be decoded "
                                f"(Content-Encoding: {encoding[:40]!r})")

        try:
            check_depth(body)  # before anything parses it (msgspec recurses per level)
        except TooDeep as exc:
            return self._reject(400, "invalid", f"$: {exc}")
        signer = self._signer
        try:
            envelope = parse_envelope(body)
        except EnvelopeError as exc:
            event_id = peek_event_id(body)
            if event_id is not None:
                try:
                    signer.verify(event_id, signature)
                except SignatureError as sig_exc:
                    return self._reject(401, "signature", str(sig_exc), event_id=event_id)
            return self._reject(400, "invalid", str(exc), event_id=event_id)

        event_id = envelope.eventId
        try:
            signer.verify(event_id, signature)
        except SignatureError as exc:
            return self._reject(401, "signature", str(exc), event_id=event_id)

        record = StoredEvent(event_id=event_id, topic=envelope.topic,
                             event_types=envelope.event_types(), received_at=clock.now(),
                             body=body, order_numbers=envelope.order_numbers())
        if span is not None:
            record = tracing.with_trace(span, record)  # stored: the workers' spans join it
        try:
            is_new = await self._store.accept(record)
        except StoreUnavailable:
            # The store logged the Redis error with the eventId; the caller is not told it.
            if self._probe is not None:
                self._probe.failed("an event could not be stored just now")
            return self._reject(503, "unavailable", "event not stored: storage unavailable, "
                                f"retry after {RETRY_AFTER_SECONDS}s",
                                headers={"Retry-After": RETRY_AFTER_SECONDS}, event_id=event_id)
        if self._probe is not None:
            self._probe.succeeded()
        if not is_new:
            self._metrics.duplicates.inc()
            log.info("duplicate", extra={"eventId": event_id})
            return _answer(200, {"eventId": event_id, "status": "duplicate"})
        self._metrics.accepted.inc()
        log.info("accepted", extra={"eventId": event_id, "topic": envelope.topic,
                                    "eventTypes": list(record.event_types)})
        return _answer(202, {"eventId": event_id, "status": "accepted"})


HANDLER: web.AppKey[WebhookHandler] = web.AppKey("handler", WebhookHandler)


async def healthz(request: web.Request) -> web.Response:
    return _answer(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, why = await request.app[PROBE].check()
    if ready:
        return _answer(200, {"status": "ready"})
    return _answer(503, {"status": "unavailable", "error": why},
                   {"Retry-After": RETRY_AFTER_SECONDS})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def redis_client(config: Config, max_connections: int = REDIS_CONNECTIONS) -> aioredis.Redis:
    """A client that fails fast, so a dead Redis becomes a prompt 503, not a hung request."""
    # No socket_timeout: the store bounds each round trip itself (relay/batching.py).
    return async_client(config.redis, socket_connect_timeout=2, health_check_interval=10,
                        max_connections=max_connections)


def create_app(config: Config, client: aioredis.Redis | None = None) -> web.Application:
    """The ingress app. ``client`` defaults to one built from ``config.redis``."""
    app = web.Application(middlewares=[json_errors])
    redis = client if client is not None else redis_client(config)
    keys = Keys.of(config)
    store = EventStore(redis, keys, config.ingress.dedupe_window, config.redis.retention,
                       redeliver_after=config.worker.visibility_timeout,
                       linger=config.ingress.linger, min_replicas=config.redis.min_replicas,
                       replica_timeout=config.redis.min_replicas_timeout)
    app[STORE] = store
    app[METRICS] = IngressMetrics()
    app[PROBE] = ReadinessProbe(redis_client(config, max_connections=2), keys.ready_probe,
                                min_replicas=config.redis.min_replicas,
                                replica_timeout=config.redis.min_replicas_timeout)
    app[HANDLER] = WebhookHandler(config, store, app[METRICS], app[PROBE])
    for path in WEBHOOK_ROUTES:
        app.router.add_post(path, app[HANDLER].__call__)  # a coroutine function, as aiohttp expects
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)

    async def close_redis(app: web.Application) -> None:
        await redis.aclose()
        await app[PROBE].close()

    async def freeze(app: web.Application) -> None:
        freeze_startup_objects()  # relay/gcfreeze.py: why

    app.on_startup.append(freeze)
    app.cleanup_ctx.append(clock.measuring(redis))  # received times on Redis's clock
    app.on_cleanup.append(close_redis)
    return app


def run_ingress(config: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM (then stop accepting and finish what is in flight);
    SIGHUP re-reads the config."""
    bind_host = host or config.ingress.host
    bind_port = port or config.ingress.port
    tracing.setup("ingress")  # if OTEL_EXPORTER_OTLP_ENDPOINT asks for it
    app = create_app(config)
    reloader = Reloader(config, app[HANDLER].apply, "ingress")
    log.info("ingress listening", extra={"host": bind_host, "port": bind_port,
                                         "subscribers": [s.name for s in config.subscribers],
                                         "loop": loops.name()})
    try:
        loops.run(serve(app, bind_host, bind_port, on_reload=reloader.reload,
                          lingering_time=LINGERING_SECONDS))
    finally:
        tracing.shutdown()
