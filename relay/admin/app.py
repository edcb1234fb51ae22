"""``relay admin``: the console, the JSON API (docs/admin-api.md) and hub-wide metrics.

A listener of its own (``admin.host``/``admin.port``), never the public ingress port. It
reads what the ingress and workers wrote to Redis and changes it only through the same
scripts the CLI uses (relay/ops/deadletters.py, relay/ops/timeline.py, relay/health.py); it never
imports the worker side.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from relay import clock, health, loops
from relay.admin.metrics import Snapshot, render
from relay.config import Config
from relay.connections import async_client
from relay.hosts import HostRule
from relay.keys import Keys
from relay.nesting import TooDeep, check_depth
from relay.ops.deadletters import DeadLetters, Filters, UnknownSubscriber
from relay.ops.status import Status
from relay.ops.timeline import Events, NotFound
from relay.reload import Reloader
from relay.serve import json_answer, json_errors, serve
from relay.timefmt import iso, parse_time

log = logging.getLogger("relay.admin")

STATIC = Path(__file__).parent / "static"


class Admin:
    """The admin's state: the running config (a reload replaces it) and one Redis client."""

    def __init__(self, config: Config, client: aioredis.Redis) -> None:
        self.redis = client
        self.apply(config)

    def apply(self, config: Config) -> None:
        self.config = config
        self.hosts = HostRule(config.admin.allowed_hosts)

    @property
    def keys(self) -> Keys:
        return Keys.of(self.config)

    def status(self) -> Status:
        return Status(self.redis, self.config)

    def events(self) -> Events:
        return Events(self.redis, self.config)

    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.redis, self.config)


ADMIN: web.AppKey[Admin] = web.AppKey("admin", Admin)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ValueError):
    pass


def _error(status: int, message: str) -> web.Response:
    return json_answer(status, {"error": message})


#: On every answer: the console runs only its own files (no inline script, no other site's),
#: cannot be framed (clickjacking), and sends no Referer with the event ids in its URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
#: Methods that change something: refused when another site's page sends them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _refusal(request: web.Request) -> tuple[int, str] | None:
    """Why a request that is not the console's own (or a shell's) is refused, if it is.

    * ``Host`` not a name of the admin: 421 (a page of another site whose DNS name was
      re-pointed at the admin's address: DNS rebinding);
    * a change (POST, DELETE) from another site's page: 403. Browsers name the page's site
      in ``Origin`` (and ``Sec-Fetch-Site``); ``curl`` sends neither;
    * a body not sent as ``application/json``: 415. A page of another site can send
      ``text/plain`` or a form without asking the admin first (no CORS preflight);
      ``application/json`` it cannot.
    """
    rule = request.app[ADMIN].hosts
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    local_port = sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None
    host = request.headers.get("Host", "")
    if not rule.allows(host, local_port):
        return 421, (f"Host {host[:100]!r} does not name this admin: it answers its loopback "
                     f"names on its own port and admin.allowed_hosts")
    if request.method not in SAFE_METHODS:
        origin = request.headers.get("Origin")
        if origin is not None and not rule.allows_origin(origin, local_port):
            return 403, (f"Origin {origin[:100]!r} is not this admin's own: a change must come "
                         f"from the console or a client that sends no Origin")
        site = request.headers.get("Sec-Fetch-Site", "").lower()
        if origin is None and site in ("cross-site", "same-site"):
            return 403, f"a change sent by a page of another site (Sec-Fetch-Site: {site})"
    if request.body_exists and request.content_type != "application/json":
        return 415, (f"a request body must be sent as Content-Type: application/json, got "
                     f"{request.content_type[:100] or 'none'!r}")
    return None


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what another web page could make a browser send (``_refusal``); /healthz stays
    open to probes whatever name they use (a container healthcheck, a kubelet)."""
    if request.path != "/healthz":
        refused = _refusal(request)
        if refused is not None:
            status, error = refused
            log.warning("admin request refused", extra={
                "status": status, "method": request.method, "path": request.path[:200],
                "error": error})
            return _error(status, error)
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With ``admin.token``, every route but /healthz and the console's own files needs
    ``Authorization: Bearer <token>`` (compared in constant time)."""
    token = request.app[ADMIN].config.admin.token
    public = request.path in ("/", "/healthz") or request.path.startswith("/static/")
    if token and not public:
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                 token.encode()):
            return json_answer(401, {"error": "missing or wrong bearer token"},
                               {"WWW-Authenticate": 'Bearer realm="relay admin"'})
    return await handler(request)


@web.middleware
async def failures(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bad parameters are 400 naming the parameter; Redis trouble is 503, not a traceback."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return _error(400, str(exc))
    except NotFound as exc:
        return _error(404, str(exc))
    except (RedisError, OSError) as exc:
        log.warning("redis unavailable", extra={"path": request.path, "error": repr(exc)})
        return json_answer(503, {"error": "redis is unavailable"}, {"Retry-After": "5"})


# -- helpers -------------------------------------------------------------------------------


def _time(params: Any, name: str) -> float | None:
    try:
        return parse_time(params.get(name))
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


def _int(params: Any, name: str, default: int, low: int, high: int) -> int:
    value = params.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name}: expected a whole number, got {str(value)[:40]!r}") from None
    if not low <= number <= high:
        raise BadRequest(f"{name}: must be between {low} and {high}")
    return number


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    raw = await request.read()
    try:
        check_depth(raw)  # before msgspec recurses into it
        data = msgspec.json.decode(raw)
    except TooDeep as exc:
        raise BadRequest(f"body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _filters(params: dict[str, Any]) -> Filters:
    for key in ("subscriber", "event"):
        if params.get(key) is not None and not isinstance(params.get(key), str):
            raise BadRequest(f"{key}: expected a string")
    return Filters(subscriber=params.get("subscriber") or None,
                   event=params.get("event") or None,
                   since=_time(params, "since"), until=_time(params, "until"))


def _dry_run(params: dict[str, Any]) -> bool:
    value = params.get("dryRun", False)
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    if not isinstance(value, bool):
        raise BadRequest("dryRun: expected true or false")
    return value


def _configured(admin: Admin, name: str) -> None:
    if admin.config.subscriber(name) is None:
        raise NotFound(f"subscriber {name!r} is not configured")


# -- routes --------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_answer(200, {"status": "ok"})


async def console(request: web.Request) -> web.StreamResponse:
    index = STATIC / "index.html"
    if not index.exists():
        return _error(404, "the console's files are not installed")
    return web.FileResponse(index, headers={"Cache-Control": "no-cache"})


async def overview(request: web.Request) -> web.Response:
    return json_answer(200, await request.app[ADMIN].status().overview())


async def subscribers(request: web.Request) -> web.Response:
    return json_answer(200, await request.app[ADMIN].status().subscribers())


async def pause_or_resume(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    name, action = request.match_info["name"], request.match_info["action"]
    _configured(admin, name)
    now = clock.now_ms()
    if action == "pause":
        await health.pause(admin.redis, admin.keys, name, now)
    else:
        await health.resume(admin.redis, admin.keys, name, now)
    log.info(f"subscriber {action}d", extra={"subscriber": name})
    return json_answer(200, await admin.status().subscriber(name))


async def ordering_keys(request: web.Request) -> web.Response:
    """The keys of an ordered subscriber holding events back, oldest first."""
    admin = request.app[ADMIN]
    name = request.match_info["name"]
    _configured(admin, name)
    sub = admin.config.subscriber(name)
    limit = _int(request.query, "limit", 100, 1, 1000)
    return json_answer(200, {
        "subscriber": name,
        "ordering": ({"by": sub.ordering.by, "onDead": sub.ordering.on_dead}
                     if sub is not None and sub.ordering is not None else None),
        "keys": await admin.status().holding(name, limit)})


async def stats(request: web.Request) -> web.Response:
    minutes = _int(request.query, "minutes", 60, 1, 1440)
    return json_answer(200, await request.app[ADMIN].status().stats(minutes))


async def event(request: web.Request) -> web.Response:
    return json_answer(200, await request.app[ADMIN].events().detail(
        request.match_info["event_id"]))


async def events(request: web.Request) -> web.Response:
    q = request.query
    state = q.get("state") or None
    if state not in (None, "delivered", "pending", "retrying", "dead", "paused", "waiting"):
        raise BadRequest("state: expected delivered, pending, retrying, dead, paused or "
                         "waiting")
    since, until, limit = _time(q, "since"), _time(q, "until"), _int(q, "limit", 50, 1, 500)
    try:
        found, cursor = await request.app[ADMIN].events().find(
            subscriber=q.get("subscriber") or None, state=state, order=q.get("order") or None,
            since=since, until=until, limit=limit, cursor=q.get("cursor") or None)
    except ValueError as exc:
        raise BadRequest(f"cursor: {exc}") from None
    return json_answer(200, {"events": found, "next": cursor})


async def order(request: web.Request) -> web.Response:
    return json_answer(200, await request.app[ADMIN].events().order(
        request.match_info["order_number"]))


async def resend(request: web.Request) -> web.Response:
    body = await _body(request)
    subscriber = body.get("subscriber")
    if subscriber is not None and not isinstance(subscriber, str):
        raise BadRequest("subscriber: expected a string")
    queued = await request.app[ADMIN].events().resend(request.match_info["event_id"],
                                                      subscriber or None)
    return json_answer(200, {"queued": queued})


async def dead_letters(request: web.Request) -> web.Response:
    q = dict(request.query)
    filters = _filters(q)
    letters = request.app[ADMIN].dead_letters()
    limit = _int(q, "limit", 100, 1, 1000)
    offset = _int(q, "cursor", 0, 0, 10**9)
    total = await letters.count(filters)
    listed = await letters.list(filters, limit=limit, offset=offset)
    orders = {}
    for item in listed:
        event = item.letter.event
        orders[(item.letter.subscriber, item.letter.event_id)] = \
            list(event.order_numbers) if event else []
    return json_answer(200, {
        "deadLetters": [{
            "eventId": d.letter.event_id, "subscriber": d.letter.subscriber,
            "configured": d.configured, "reason": d.letter.reason,
            "deadAt": iso(d.letter.dead_at), "attempts": len(d.attempts),
            "lastError": d.last_error,
            "orderNumbers": orders[(d.letter.subscriber, d.letter.event_id)],
        } for d in listed],
        "total": total,
        "next": str(offset + limit) if offset + limit < total else None,
    })


async def replay(request: web.Request) -> web.Response:
    body = await _body(request)
    filters = _filters(body)
    limit = body.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise BadRequest("limit: expected a whole number of at least 1")
    after = body.get("after")
    if after is not None and not isinstance(after, str):
        raise BadRequest("after: expected the `next` of an earlier answer")
    try:
        result = await request.app[ADMIN].dead_letters().replay(filters, _dry_run(body), limit,
                                                                after or None)
    except UnknownSubscriber as exc:
        raise NotFound(str(exc)) from None
    except ValueError as exc:
        raise BadRequest(f"after: {exc}") from None
    if result["replayed"]:
        log.info("dead letters replayed", extra={"replayed": result["replayed"]})
    return json_answer(200, result)


async def purge(request: web.Request) -> web.Response:
    params = {**request.query, **(await _body(request))}
    result = await request.app[ADMIN].dead_letters().purge(_filters(params), _dry_run(params))
    if result["deleted"]:
        log.info("dead letters purged", extra={"deleted": result["deleted"]})
    return json_answer(200, result)


async def metrics(request: web.Request) -> web.Response:
    status = request.app[ADMIN].status()
    totals, subs, view = await asyncio.gather(status.totals(), status.subscribers(),
                                              status.overview())
    return web.Response(body=render(Snapshot(totals, subs, view)),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: Config, client: aioredis.Redis | None = None) -> web.Application:
    app = web.Application(middlewares=[json_errors, guard, auth, failures])
    app.on_response_prepare.append(_security_headers)
    redis = client if client is not None else async_client(
        config.redis, socket_connect_timeout=2, socket_timeout=10, health_check_interval=10,
        max_connections=16)
    app[ADMIN] = Admin(config, redis)
    r = app.router
    r.add_get("/", console)
    if STATIC.exists():
        r.add_static("/static/", STATIC, append_version=False)
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/api/overview", overview)
    r.add_get("/api/subscribers", subscribers)
    r.add_post(r"/api/subscribers/{name}/{action:pause|resume}", pause_or_resume)
    r.add_get("/api/stats", stats)
    r.add_get("/api/ordering/{name}", ordering_keys)
    r.add_get("/api/events", events)
    r.add_get("/api/events/{event_id}", event)
    r.add_post("/api/events/{event_id}/resend", resend)
    r.add_get("/api/orders/{order_number}", order)
    r.add_get("/api/dlq", dead_letters)
    r.add_delete("/api/dlq", purge)
    r.add_post("/api/replay", replay)

    async def close(app: web.Application) -> None:
        await redis.aclose()

    app.cleanup_ctx.append(clock.measuring(redis))  # ages against workers' times
    app.on_cleanup.append(close)
    return app


def run_admin(config: Config, host: str | None = None, port: int | None = None) -> None:
    bind_host = host or config.admin.host
    bind_port = port or config.admin.port
    app = create_app(config)
    reloader = Reloader(config, app[ADMIN].apply, "admin", admin_bound=bind_host)
    log.info("admin listening", extra={"url": f"http://{bind_host}:{bind_port}/",
                                       "token": bool(config.admin.token)})
    loops.run(serve(app, bind_host, bind_port, on_reload=reloader.reload))
