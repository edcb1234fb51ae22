"""The ceiling: a bare aiohttp handler that reads the body and answers 202.

``python -m bench.bare --port P``. Same server stack as the ingress (aiohttp's web server,
no access log), none of its work (no verification, validation or Redis).
"""

from __future__ import annotations

import argparse

from aiohttp import web

from relay import loops

_BODY = b'{"status":"accepted"}'


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, body=_BODY, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", accept)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=loops.new_event_loop())


if __name__ == "__main__":
    main()
