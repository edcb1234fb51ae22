"""Tracing (OpenTelemetry): one trace per event, from Ingram's request to every attempt.

Everything is real: an OTLP/HTTP receiver on 127.0.0.1 (aiohttp, decoding each
``ExportTraceServiceRequest`` with opentelemetry-proto), ``relay ingress`` and ``relay worker``
subprocesses with the standard ``OTEL_*`` variables, recording sinks.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from relay.config import parse_config
from relay.errors import ConfigError
from relay.keys import Keys
from relay.models import StoredEvent
from relay.tracing import requested
from tests.hub import (
    Reply,
    Sink,
    event_body,
    ingress,
    ingress_port,
    signed_headers,
    worker,
    write_config,
)
from tests.support import ROOT, RedisServer, free_port, process, wait_http, wait_until

#: Spans leave every 50 ms; an export to a collector that is away gives up within 1 s.
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
DROP_LINE = "tracing: spans cannot be exported"
BACK_LINE = "tracing: the collector answers again"


# -- a real OTLP/HTTP receiver ------------------------------------------------------------------

@dataclass
class SpanSeen:
    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: str
    status: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    start_ns: int
    end_ns: int


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


class Collector:
    """Accepts OTLP/HTTP protobuf exports on ``/v1/traces``, as Jaeger or Tempo would, and
    keeps every span, decoded."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.spans: list[SpanSeen] = []
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _export(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )
        from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        seen = []
        for rs in export.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    seen.append(SpanSeen(
                        s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                        Span.SpanKind.Name(s.kind), Status.StatusCode.Name(s.status.code),
                        {a.key: _value(a.value) for a in s.attributes}, resource,
                        s.start_time_unix_nano, s.end_time_unix_nano))
        with self._lock:
            self.requests.append(dict(request.headers))
            self.spans.extend(seen)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def start(self) -> Collector:
        self._thread.start()

        async def up() -> None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/v1/traces", self._export)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(up(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def named(self, kind: str) -> list[SpanSeen]:
        with self._lock:
            return [s for s in self.spans if s.kind == f"SPAN_KIND_{kind}"]

    def wait_for(self, kind: str, count: int, timeout: float = 30.0) -> list[SpanSeen]:
        wait_until(lambda: len(self.named(kind)) >= count, timeout,
                   what=f"{count} {kind} spans (have {len(self.named(kind))})")
        return self.named(kind)


def post_event(url: str, body: bytes, extra: dict[str, str] | None = None,
               headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={**(headers or signed_headers(body)), **(extra or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def log_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a hub log, each of which must be a JSON object."""
    lines = []
    for raw in path.read_text().splitlines():
        entry = json.loads(raw)
        assert isinstance(entry, dict), raw
        lines.append(entry)
    return lines


def sampled(traceparent: str) -> bool:
    """The W3C ``sampled`` flag (bit 0; the SDK may set ``random``, bit 1, too)."""
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)


def otel_env(endpoint: str, **more: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **FAST, **more}


# -- one traced run, shared by the tests that read it --------------------------------------------

@dataclass
class TracedRun:
    collector: Collector
    sink: Sink
    plain: str
    continued: str
    records: dict[str, StoredEvent]

    def server(self, event_id: str, answer: str = "accepted") -> SpanSeen:
        found = [s for s in self.collector.named("SERVER")
                 if s.attributes.get("relay.event_id") == event_id
                 and s.attributes.get("relay.answer") == answer]
        assert len(found) == 1, found
        return found[0]

    def attempts(self, event_id: str) -> list[SpanSeen]:
        return sorted((s for s in self.collector.named("CLIENT")
                       if s.attributes["relay.event_id"] == event_id),
                      key=lambda s: (s.attributes["relay.subscriber"],
                                     s.attributes["relay.attempt"]))


@pytest.fixture(scope="module")
def traced(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TracedRun]:
    """Two events through a traced hub: ``erp`` fails each event's first attempt (500,
    Retry-After 3 s) and its retry is made by another worker process (the first is stopped
    in between); ``wms`` succeeds at once; ``crm`` has ``propagate_trace: false``. The second
    event comes with a caller's ``traceparent``; the first is sent again (a duplicate), and
    a request with a wrong signature is refused."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    tmp = tmp_path_factory.mktemp("traced")
    collector, sink = Collector().start(), Sink().start()
    sink.behave_per_event("/erp", lambda eid, n: Reply(500, {"Retry-After": "3"}) if n == 1
                          else Reply(200))
    config = write_config(tmp / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "erp-secret"},
        {"name": "wms", "url": sink.url("/wms"), "secret": "wms-secret"},
        {"name": "crm", "url": sink.url("/crm"), "secret": "crm-secret",
         "propagate_trace": False},
    ], delivery={"timeout": "2s", "max_attempts": 3,
                 "backoff": {"initial": "100ms", "max": "5s"}})
    env = otel_env(collector.endpoint)
    plain, continued = "trace-plain-1", "trace-continued-1"
    try:
        with ingress(config, tmp / "ingress.log", env=env) as url:
            assert post_event(url, event_body(plain)) == 202
            assert post_event(url, event_body(continued), {
                "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}) == 202
            assert post_event(url, event_body(plain)) == 200
            wrong = {**signed_headers(event_body("trace-unsigned")), "X-Hub-Signature": "AAAA"}
            assert post_event(url, event_body("trace-unsigned"), headers=wrong) == 401
            with worker(config, tmp / "worker-1.log", env=env):
                for path in ("/erp", "/wms", "/crm"):
                    sink.wait_for(path, 2)
            # erp's retries fall due 3 s after its first attempts, in the next worker.
            with worker(config, tmp / "worker-2.log", env=env):
                sink.wait_for("/erp", 4)
                collector.wait_for("CLIENT", 8)
            collector.wait_for("SERVER", 4)
        records = {eid: msgspec.msgpack.decode(client.get(Keys().event(eid)), type=StoredEvent)
                   for eid in (plain, continued)}
        yield TracedRun(collector, sink, plain, continued, records)
    finally:
        client.close()
        sink.stop()
        collector.stop()


def test_one_trace_holds_the_ingress_span_and_every_attempt_to_every_subscriber(
        traced: TracedRun) -> None:
    for event_id in (traced.plain, traced.continued):
        server = traced.server(event_id)
        attempts = traced.attempts(event_id)
        assert [(s.attributes["relay.subscriber"], s.attributes["relay.attempt"])
                for s in attempts] == [("crm", 1), ("erp", 1), ("erp", 2), ("wms", 1)]
        for span in attempts:
            assert span.trace_id == server.trace_id
            assert span.parent == server.span_id, "each attempt is a child of the ingress span"
            assert span.name == f"deliver {span.attributes['relay.subscriber']}"
            assert span.attributes["relay.trigger"] == "auto"
            assert span.attributes["relay.probe"] is False
            assert span.resource["service.name"] == "relay-worker"
        assert server.resource["service.name"] == "relay-ingress"
        # The context travelled in the stored record, not in any Celery message.
        stored = traced.records[event_id].trace
        assert stored is not None and stored.startswith(f"00-{server.trace_id}-{server.span_id}-")
        assert sampled(stored)


def test_a_retry_by_another_worker_process_is_in_the_same_trace(traced: TracedRun) -> None:
    for event_id in (traced.plain, traced.continued):
        first, retry = [s for s in traced.attempts(event_id)
                        if s.attributes["relay.subscriber"] == "erp"]
        assert first.trace_id == retry.trace_id == traced.server(event_id).trace_id
        assert first.attributes["http.response.status_code"] == 500
        assert first.attributes["relay.outcome"] == "retry"
        assert first.attributes["error.type"] == "500"
        assert first.status == "STATUS_CODE_ERROR"
        assert retry.attributes["http.response.status_code"] == 200
        assert retry.attributes["relay.outcome"] == "delivered"
        assert retry.status != "STATUS_CODE_ERROR"
        # Made by two different processes: the first worker was stopped in between.
        assert first.resource["service.instance.id"] != retry.resource["service.instance.id"]


def test_an_incoming_traceparent_is_continued(traced: TracedRun) -> None:
    server = traced.server(traced.continued)
    assert server.trace_id == CALLER_TRACE
    assert server.parent == CALLER_SPAN
    assert {s.trace_id for s in traced.attempts(traced.continued)} == {CALLER_TRACE}
    # Without one, the ingress span starts a trace of its own.
    plain = traced.server(traced.plain)
    assert plain.parent == "" and plain.trace_id != CALLER_TRACE


def test_the_ingress_span_names_the_event_and_the_answer(traced: TracedRun) -> None:
    server = traced.server(traced.plain)
    assert server.name == "POST /webhooks/ingram"
    assert server.attributes["http.response.status_code"] == 202
    assert server.attributes["relay.topic"] == "resellers/orders"
    assert server.attributes["relay.event_types"] == ["im::order_shipped"]
    assert server.attributes["relay.order_numbers"] == ["20-X"]
    assert server.attributes["relay.duplicate"] is False
    duplicate = traced.server(traced.plain, answer="duplicate")
    assert duplicate.attributes["http.response.status_code"] == 200
    assert duplicate.attributes["relay.duplicate"] is True
    refused = [s for s in traced.collector.named("SERVER")
               if s.attributes.get("relay.answer") == "rejected"]
    assert len(refused) == 1
    assert refused[0].attributes["http.response.status_code"] == 401
    assert "relay.event_id" not in refused[0].attributes, "an unverified eventId is not named"
    assert refused[0].attributes["relay.error"]


def test_each_delivery_carries_the_traceparent_of_its_attempt_span(traced: TracedRun) -> None:
    spans = {s.span_id: s for s in traced.collector.named("CLIENT")}
    for path in ("/erp", "/wms"):
        received = traced.sink.on(path)
        assert len(received) == (4 if path == "/erp" else 2)
        for r in received:
            version, trace_id, span_id, _ = r.headers["traceparent"].split("-")
            span = spans[span_id]
            assert version == "00" and sampled(r.headers["traceparent"])
            assert span.trace_id == trace_id
            assert span.attributes["relay.subscriber"] == path.strip("/")
            assert span.attributes["relay.event_id"] == r.event_id
    # Each attempt its own span: the retry's header names the retry.
    assert len({r.headers["traceparent"] for r in traced.sink.on("/erp")}) == 4


def test_propagate_trace_false_sends_no_traceparent(traced: TracedRun) -> None:
    received = traced.sink.on("/crm")
    assert len(received) == 2
    for r in received:
        assert not {"traceparent", "tracestate"} & {k.lower() for k in r.headers}
    # Its attempts are traced all the same.
    assert len([s for s in traced.collector.named("CLIENT")
                if s.attributes["relay.subscriber"] == "crm"]) == 2


# -- the collector away ---------------------------------------------------------------------------

def test_collector_away_loses_no_delivery_and_says_so_once(
        redis_client: Any, tmp_path: Path, redis_server: RedisServer) -> None:
    """Spans to a closed port: every event delivered, the drop logged once per process (the
    SDK's own warnings folded into it); when the collector comes, spans flow again."""
    sink = Sink().start()
    port = free_port()  # nothing listens here until the collector starts below
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "a", "url": sink.url("/a"), "secret": "a-secret"},
        {"name": "b", "url": sink.url("/b"), "secret": "b-secret"}])
    env = otel_env(f"http://127.0.0.1:{port}")
    collector = None
    logs = {"ingress": tmp_path / "ingress.log", "worker": tmp_path / "worker.log"}
    try:
        with ingress(config, logs["ingress"], env=env) as url, \
                worker(config, logs["worker"], env=env):
            for wave in range(2):  # two waves: two failed exports in each process at least
                for n in range(5):
                    assert post_event(url, event_body(f"away-{wave}-{n}")) == 202
                for path in ("/a", "/b"):
                    sink.wait_for(path, 5 * (wave + 1))
                time.sleep(2.5)  # the export of this wave has failed (1 s timeout)
            collector = Collector(port).start()
            for n in range(3):
                assert post_event(url, event_body(f"back-{n}")) == 202
            for path in ("/a", "/b"):
                sink.wait_for(path, 13)
            collector.wait_for("SERVER", 3)
            collector.wait_for("CLIENT", 6)
        assert {r.event_id for r in sink.on("/a")} == {r.event_id for r in sink.on("/b")}
        assert len({r.event_id for r in sink.on("/a")}) == 13
        assert {s.attributes["relay.event_id"] for s in collector.named("SERVER")} == {
            f"back-{n}" for n in range(3)}, "the spans of the outage were dropped, not kept"
        for proc, dropped in (("ingress", 10), ("worker", 20)):
            lines = log_lines(logs[proc])
            drops = [e for e in lines if e["msg"].startswith(DROP_LINE)]
            assert len(drops) == 1, (proc, drops)
            assert drops[0]["level"] == "warning" and str(port) in drops[0]["endpoint"]
            backs = [e for e in lines if e["msg"].startswith(BACK_LINE)]
            assert len(backs) == 1 and backs[0]["dropped_spans"] == dropped, (proc, backs)
            sdk = [e["msg"] for e in lines if e["logger"].startswith("opentelemetry")]
            assert len(sdk) == len(set(sdk)), f"{proc}: the SDK repeated itself: {sdk}"
    finally:
        sink.stop()
        if collector is not None:
            collector.stop()


#: Spans made faster than a collector that is away can take them: the SDK's queue overflows.
OVERFLOW = """
import logging, sys
from relay.logs import setup_logging
from relay import tracing
setup_logging("INFO")
assert tracing.setup("worker")
for n in range(300):
    span = tracing.attempt_span(None, f"e{n}", "a", "http://a.example/", 1, "auto", False)
    tracing.end_attempt(span, 200, None, "delivered", tracing.now_ns())
queue = logging.getLogger("opentelemetry.sdk._shared_internal")
print(queue.isEnabledFor(logging.WARNING), file=sys.stderr)
"""


def test_a_full_span_queue_is_said_once_and_then_costs_no_log_record(tmp_path: Path) -> None:
    """The SDK warns "Queue full, dropping Span" for every span it drops: one JSON line, and
    its logger is muted (no record made per dropped span) until an export succeeds."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
           **otel_env(f"http://127.0.0.1:{free_port()}"),
           "OTEL_BSP_MAX_QUEUE_SIZE": "8", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "5"}
    out = subprocess.run([sys.executable, "-c", OVERFLOW], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    *lines, enabled = out.stderr.strip().splitlines()
    entries = [json.loads(line) for line in lines]
    full = [e for e in entries if "Queue full" in e["msg"]]
    assert len(full) == 1, entries
    assert full[0]["level"] == "warning" and full[0]["logger"].startswith("opentelemetry")
    assert enabled == "False", "the queue's warnings are muted while spans are dropped"


def test_setting_up_exempts_the_sdk_from_full_gc_passes() -> None:
    """A worker sets up tracing on its first task, after its start-up ``gc.freeze()``: the
    SDK's modules (and protobuf's, requests') are frozen then too, or every full GC pass walks
    them (in the bench that tripled tracing's CPU per delivery)."""
    code = ("import gc, sys; from relay import tracing; gc.collect(); gc.freeze(); "
            "before = gc.get_freeze_count(); assert tracing.setup('worker'); "
            "import opentelemetry.sdk.trace as t; "
            "print(gc.get_freeze_count() - before, any(o is t.Tracer for o in gc.get_objects()))")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
           **otel_env(f"http://127.0.0.1:{free_port()}")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    frozen, tracked = out.stdout.split()
    assert int(frozen) > 10_000 and tracked == "False"


# -- without the packages, or with tracing off ---------------------------------------------------

#: ``python -c`` that makes ``import opentelemetry`` fail, then runs the relay CLI.
WITHOUT_OTEL = ("import sys; sys.modules['opentelemetry'] = None; sys.argv[0] = 'relay'; "
                "from relay.ops.cli import main; main()")


def test_without_the_opentelemetry_packages_the_hub_delivers_and_says_tracing_is_off(
        redis_client: Any, tmp_path: Path, redis_server: RedisServer, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "a", "url": sink.url("/a"), "secret": "a-secret"}])
    env = otel_env(f"http://127.0.0.1:{free_port()}")
    args = ["--config", str(config)]
    port = ingress_port(config)
    with process([sys.executable, "-c", WITHOUT_OTEL, *args, "ingress"], env=env,
                 log_path=tmp_path / "ingress.log"), \
            process([sys.executable, "-c", WITHOUT_OTEL, *args, "worker"], env=env,
                    log_path=tmp_path / "worker.log"):
        wait_http(f"http://127.0.0.1:{port}/healthz")
        for n in range(2):
            assert post_event(f"http://127.0.0.1:{port}/webhooks/ingram",
                              event_body(f"untraced-{n}")) == 202
        received = sink.wait_for("/a", 2)
    assert not any("traceparent" in r.headers for r in received)
    for name in ("ingress.log", "worker.log"):
        off = [e for e in log_lines(tmp_path / name) if e["msg"].startswith("tracing off")]
        assert len(off) == 1, (name, off)
        assert "pip install '.[tracing]'" in off[0]["msg"]


def test_tracing_off_loads_no_tracer_and_no_exporter() -> None:
    """No OTLP endpoint: setting up is a no-op, and neither the tracing SDK nor the exporter
    nor the propagators are loaded. (redis-py itself imports OpenTelemetry's metrics API
    when it is installed, for metrics of its own that the hub does not turn on.)"""
    code = ("import sys, relay.ingress.app, workers.engine, workers.app; "
            "from relay import tracing; assert tracing.setup('worker') is False; "
            "assert tracing.on is False; "
            "print(sorted(m for m in sys.modules if m.startswith(("
            "'opentelemetry.sdk.trace', 'opentelemetry.exporter', 'opentelemetry.propagate'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("environ", "endpoint"), [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
     "http://c:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
])
def test_tracing_is_on_only_when_the_standard_variables_ask(
        environ: dict[str, str], endpoint: str | None) -> None:
    assert requested(environ) == endpoint


# -- config and record ----------------------------------------------------------------------------

CONFIG = """
ingress: {secrets: [s]}
delivery: {propagate_trace: %s}
subscribers:
  - {name: a, url: "http://a.example/", secret: x}
  - {name: b, url: "http://b.example/", secret: x, propagate_trace: %s}
"""


def test_propagate_trace_defaults_to_true_and_is_overridden_per_subscriber() -> None:
    default = parse_config(CONFIG.replace("delivery: {propagate_trace: %s}\n", "")
                           .replace(", propagate_trace: %s", ""), "t.yaml", {})
    assert [s.propagate_trace for s in default.subscribers] == [True, True]
    config = parse_config(CONFIG % ("false", "true"), "t.yaml", {})
    assert [s.propagate_trace for s in config.subscribers] == [False, True]
    with pytest.raises(ConfigError, match=r"subscribers\[1\]\.propagate_trace"):
        parse_config(CONFIG % ("true", "sometimes"), "t.yaml", {})


def test_a_configured_traceparent_header_needs_propagate_trace_false() -> None:
    text = ('ingress: {secrets: [s]}\nsubscribers:\n  - {name: a, url: "http://a/", secret: x, '
            'headers: {TraceParent: "00-x"}%s}\n')
    with pytest.raises(ConfigError, match=r"subscribers\[0\]\.headers\.TraceParent: .*"
                                          r"propagate_trace: false"):
        parse_config(text % "", "t.yaml", {})
    assert not parse_config(text % ", propagate_trace: false", "t.yaml",
                            {}).subscribers[0].propagate_trace


def test_a_record_stored_before_tracing_decodes_without_a_trace() -> None:
    old = msgspec.msgpack.encode(["e1", "t", ["x"], 1.0, b"{}", ["20-X"]])
    record = msgspec.msgpack.decode(old, type=StoredEvent)
    assert record.trace is None and record.order_numbers == ("20-X",)
    new = StoredEvent("e1", "t", ("x",), 1.0, b"{}", (), trace="00-a-b-01")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=StoredEvent) == new

