"""A collector for the bench's tracing phase: ``python -m bench.otlp --port P``.

Accepts OTLP/HTTP protobuf exports on ``POST /v1/traces`` (200, as a collector does), counts
the spans (decoded with opentelemetry-proto, when it is installed) and discards them.
``GET /_stats``: ``{"requests", "spans", "bytes"}``. Its CPU is not the hub's.
"""

from __future__ import annotations

import argparse

import msgspec
from aiohttp import web


def create_app() -> web.Application:
    counts = {"requests": 0, "spans": 0, "bytes": 0}
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
    except ImportError:  # counts requests and bytes only
        ExportTraceServiceRequest = None  # noqa: N806

    async def export(request: web.Request) -> web.Response:
        body = await request.read()
        counts["requests"] += 1
        counts["bytes"] += len(body)
        if ExportTraceServiceRequest is not None:
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            counts["spans"] += sum(len(ss.spans) for rs in message.resource_spans
                                   for ss in rs.scope_spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stats(request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(counts), content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", export)
    app.router.add_get("/_stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
