"""Serving an aiohttp app the hub's way: every answer JSON, SIGTERM drains, SIGHUP reloads.

``web.run_app`` would do most of this, but not two things the hub promises:

* aiohttp answers requests it cannot parse (a malformed request line, a body that does not
  match its ``Content-Encoding``) itself, in plain text, before any middleware runs. The
  protocol handler's ``handle_error`` builds that answer; ``_JsonErrors`` builds the same
  status as JSON with an ``error``.
* SIGHUP re-reads the configuration (relay/reload.py) instead of killing the process.

Unknown routes and wrong methods (404/405, raised by the router) become JSON in
``json_errors``, a middleware every hub app installs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

log = logging.getLogger("relay.serve")


def json_answer(status: int, payload: Any, headers: dict[str, str] | None = None
                ) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(payload), headers=headers,
                        content_type="application/json")


@web.middleware
async def json_errors(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """aiohttp's own HTTP errors (404 no such route, 405 wrong method, ...) as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            error = f"no route {request.method} {request.path[:200]}"
        elif exc.status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
            error = f"method {request.method} not allowed on {request.path[:200]}" + (
                f"; allowed: {allowed}" if allowed else "")
        else:
            error = exc.reason
        headers = {k: v for k, v in exc.headers.items()
                   if k.lower() not in ("content-type", "content-length")}
        return json_answer(exc.status, {"error": error}, headers)


class _JsonErrorHandler(RequestHandler):
    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs, may raise
        if status == 500:
            error = "internal error"
        else:
            error = (message or getattr(exc, "message", None) or plain.reason or "bad request")
        answer = json_answer(plain.status, {"error": str(error).splitlines()[0][:300]})
        answer.force_close()
        return answer


class _JsonErrorServer(Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


async def serve(app: web.Application, host: str, port: int, *,
                on_reload: Callable[[], object] | None = None,
                shutdown_timeout: float = 15.0, **handler_args: Any) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then stop accepting and finish what is in
    flight (up to ``shutdown_timeout``). SIGHUP calls ``on_reload``. A port that cannot be
    bound raises OSError (the CLI reports it as one line)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=shutdown_timeout, **handler_args)
    await runner.setup()
    assert runner.server is not None
    # The protocol handler is built by the server per connection; this swaps in the one
    # that answers parse errors as JSON (see the module docstring).
    runner.server.__class__ = _JsonErrorServer
    try:
        await web.TCPSite(runner, host, port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        if on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, on_reload)
        await stop.wait()
        log.info("stopping: finishing requests in flight", extra={"port": port})
    finally:
        await runner.cleanup()
