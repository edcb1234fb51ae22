"""OpenTelemetry tracing: one trace per event, from Ingram's request to every attempt.

Off unless the standard variables turn it on: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` set (and ``OTEL_SDK_DISABLED`` not true, ``OTEL_TRACES_EXPORTER``
not ``none``). Every other ``OTEL_*`` variable is the SDK's to read: headers, timeout,
compression and certificates (the OTLP exporter), ``OTEL_TRACES_SAMPLER`` (the provider),
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the resource), ``OTEL_BSP_*`` (the batch
processor), ``OTEL_PROPAGATORS`` (the headers read from Ingram and sent to subscribers).

Off costs nothing: OpenTelemetry is not even imported, and the hot paths test one module
attribute (``tracing.on``) before doing anything. On:

* the ingress makes a server span per webhook request (``server_span`` / ``end_server``),
  continuing a ``traceparent`` the caller sent, and stores that span's W3C context in the
  event record (``StoredEvent.trace``);
* a worker makes a client span per attempt (``attempt_span`` / ``end_attempt``), a child of
  the stored context, so every attempt of an event (retries, held, parked, resent, after a
  worker restart) is in the event's one trace, and nothing per attempt is stored;
* ``trace_headers`` gives the attempt span's ``traceparent`` to send to the subscriber.

Spans leave in batches from the SDK's own thread (``BatchSpanProcessor``): never on the
delivery path. While the collector does not answer, batches are dropped and that is logged
once (``_Reporting``), with the SDK's own warnings, until an export succeeds again.

Processes: ``relay ingress`` calls ``setup`` before serving; a worker process calls it when its
delivery engine starts, i.e. in each pool process after the fork (the batch processor's thread
does not survive a fork), and ``shutdown`` when it drains. ``relay up`` passes its environment
to both.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from relay.gcfreeze import freeze_startup_objects
from relay.masking import mask_url
from relay.models import StoredEvent

log = logging.getLogger("relay.tracing")

#: True once ``setup`` has installed a tracer in this process: the hot paths test only this.
on = False

_tracer: Any = None
_provider: Any = None
_pid = 0
_sdk: dict[str, Any] = {}

#: Span kinds and status codes, fetched once at setup (no import on the hot path).
_SERVER: Any = None
_CLIENT: Any = None
_ERROR: Any = None

DEFAULT_PROTOCOL = "http/protobuf"
#: How long a process waits at exit for its last spans to leave (the collector may be away).
SHUTDOWN_SECONDS = 3.0
#: The longest error text kept on a span.
_TEXT = 300


def requested(environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP endpoint the environment asks traces to go to, or None: tracing off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())
    if not endpoint or env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    return endpoint


def setup(component: str) -> bool:
    """Install the tracer of this process if the environment asks for it (once per process;
    a forked child sets up its own). ``component``: ``ingress`` or ``worker``, the default
    service name's suffix (``OTEL_SERVICE_NAME`` wins). Never raises: a hub without the
    OpenTelemetry packages, or with an unusable setting, runs untraced and says so once."""
    global on, _pid
    if _pid == os.getpid():
        return on
    _pid, on = os.getpid(), False
    endpoint = requested()
    if endpoint is None:
        return False
    context = {"endpoint": mask_url(endpoint), "component": component}
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip() or DEFAULT_PROTOCOL)
    if exporter_name != "otlp":
        log.warning("tracing off: only the otlp exporter is supported",
                    extra={**context, "OTEL_TRACES_EXPORTER": exporter_name})
        return False
    try:
        _install(component, protocol, endpoint)
    except ImportError as exc:
        log.warning("tracing off: the OpenTelemetry packages are not installed "
                    "(pip install '.[tracing]')", extra={**context, "error": str(exc)})
        return False
    except _Unsupported as exc:
        log.warning(f"tracing off: {exc}", extra={**context, "protocol": protocol})
        return False
    except Exception as exc:  # a malformed OTEL_* value: the hub runs untraced, not at all
        log.warning("tracing off: the OpenTelemetry settings are not usable",
                    extra={**context, "error": f"{type(exc).__name__}: {exc}"})
        return False
    # The SDK's modules, classes and functions (and protobuf's, requests'), loaded just now:
    # exempt from the collector's full passes like the rest of what a process loads at start
    # (relay/gcfreeze.py; a worker sets up after its own freeze, on its first task).
    freeze_startup_objects()
    on = True
    log.info("tracing on", extra={**context, "protocol": protocol,
                                  "service": _provider.resource.attributes.get("service.name"),
                                  "sampler": type(_provider.sampler).__name__})
    return True


class _Unsupported(Exception):
    pass


def _install(component: str, protocol: str, endpoint: str) -> None:
    """Build provider, batch processor and exporter from the environment."""
    global _tracer, _provider, _SERVER, _CLIENT, _ERROR
    from opentelemetry import propagate, trace
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    elif protocol == "grpc":
        try:  # not installed by the tracing extra; used when the operator installs it
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore
                OTLPSpanExporter,
            )
        except ImportError:
            raise _Unsupported("OTLP over grpc needs opentelemetry-exporter-otlp-proto-grpc "
                               "(the hub installs http/protobuf)") from None
    else:
        raise _Unsupported(f"OTLP protocol {protocol!r} is not supported; use http/protobuf")

    from relay import __version__

    # Our defaults first, then the environment (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES)
    # over them: Resource.create alone would let the defaults win.
    resource = Resource.create({"service.name": f"relay-{component}",
                                "service.namespace": "order-event-relay",
                                "service.version": __version__}
                               ).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_reporting(OTLPSpanExporter(), endpoint)))
    _quiet_sdk_logs()
    _sdk.update(trace=trace, inject=propagate.inject, extract=propagate.extract,
                w3c=TraceContextTextMapPropagator())
    _SERVER, _CLIENT = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
    _ERROR = trace.StatusCode.ERROR
    _provider = provider
    _tracer = provider.get_tracer("relay", __version__)


def shutdown(timeout: float = SHUTDOWN_SECONDS) -> None:
    """Export what is left, waiting at most ``timeout`` (a collector that is away does not
    hold up a stopping process), and stop tracing in this process."""
    global on
    if not on or _pid != os.getpid():
        return
    on = False
    done = threading.Thread(target=_provider.shutdown, name="relay-tracing-shutdown",
                            daemon=True)
    done.start()
    done.join(timeout)
    if done.is_alive():
        log.warning("tracing: the last spans were not exported in time; dropped",
                    extra={"timeout_s": timeout})


# -- the ingress -------------------------------------------------------------------------------

def server_span(method: str, route: str, headers: Mapping[str, str],
                client: str | None) -> Any:
    """The span of one webhook request, continuing the caller's trace context if it sent
    one (``traceparent``, or what ``OTEL_PROPAGATORS`` names)."""
    parent = _sdk["extract"](headers)
    attributes = {"http.request.method": method, "http.route": route, "url.path": route}
    if client:
        attributes["client.address"] = client
    return _tracer.start_span(f"{method} {route}", context=parent, kind=_SERVER,
                              attributes=attributes)


def with_trace(span: Any, record: StoredEvent) -> StoredEvent:
    """Name the (verified) event on its request's span, and give its record the span's
    context to store (``StoredEvent.trace``: ``traceparent``, + ``"\\n" + tracestate``)."""
    span.set_attributes({"relay.event_id": record.event_id, "relay.topic": record.topic,
                         "relay.event_types": list(record.event_types),
                         "relay.order_numbers": list(record.order_numbers)})
    carrier: dict[str, str] = {}
    _sdk["w3c"].inject(carrier, context=_sdk["trace"].set_span_in_context(span))
    state = carrier.get("tracestate")
    trace = carrier["traceparent"] + (f"\n{state}" if state else "")
    return msgspec.structs.replace(record, trace=trace)


#: The ingress's answer, by status, as the span's ``relay.answer``.
_ANSWERS = {202: "accepted", 200: "duplicate", 503: "unavailable"}


def end_server(span: Any, status: int | None, error: str | None) -> None:
    """End a request's span with the answer (``status`` None: the handler raised)."""
    if status is None:
        span.set_status(_ERROR, "the handler failed")
    else:
        span.set_attributes({"http.response.status_code": status,
                             "relay.answer": _ANSWERS.get(status, "rejected"),
                             "relay.duplicate": status == 200})
        if error:
            span.set_attribute("relay.error", error[:_TEXT])
        if status >= 500:
            span.set_status(_ERROR, (error or str(status))[:_TEXT])
    span.end()


# -- the worker --------------------------------------------------------------------------------

def attempt_span(trace: str | None, event_id: str, subscriber: str, url: str, attempt: int,
                 trigger: str, probe: bool) -> Any:
    """The client span of one attempt, a child of the event's stored context (a root of its
    own when the event was stored untraced)."""
    parent = None
    if trace:
        traceparent, _, state = trace.partition("\n")
        carrier = {"traceparent": traceparent}
        if state:
            carrier["tracestate"] = state
        parent = _sdk["w3c"].extract(carrier)
    return _tracer.start_span(f"deliver {subscriber}", context=parent, kind=_CLIENT,
                              attributes={
                                  "http.request.method": "POST", "url.full": _safe_url(url),
                                  "relay.event_id": event_id, "relay.subscriber": subscriber,
                                  "relay.attempt": attempt, "relay.trigger": trigger,
                                  "relay.probe": probe})


def trace_headers(span: Any, headers: MutableMapping[str, str]) -> None:
    """Add the attempt span's trace context (``traceparent``, ``tracestate`` if any) to a
    delivery's headers, replacing any already there."""
    _sdk["inject"](headers, context=_sdk["trace"].set_span_in_context(span))


def now_ns() -> int:
    return time.time_ns()


def end_attempt(span: Any, status: int | None, error: str | None, outcome: str,
                end_ns: int) -> None:
    """End an attempt's span when its post ended (``end_ns``), with what came of it:
    ``outcome`` is ``delivered``, ``retry`` or ``dead_lettered``."""
    attributes: dict[str, Any] = {"relay.outcome": outcome}
    if status is not None:
        attributes["http.response.status_code"] = status
    if outcome != "delivered":
        attributes["error.type"] = error or str(status)
        span.set_status(_ERROR, error or f"HTTP {status}")
    span.set_attributes(attributes)
    span.end(end_time=end_ns)


def _safe_url(url: str) -> str:
    """The URL without credentials and without its query (which may carry a token)."""
    parts = urlsplit(mask_url(url))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


# -- export failures, said once ----------------------------------------------------------------

class _Outage:
    """Whether the collector is away, shared by the exporter wrapper and the log filter."""

    def __init__(self) -> None:
        self.away = False
        self.dropped = 0
        #: What the exporter said during the export under way (its first line is the cause:
        #: "connection refused", an HTTP status; the last is "gave up").
        self.said_now: list[str] = []
        #: (logger, message template) of the SDK's records already let through this outage.
        self.said: set[tuple[str, str]] = set()
        self.muted: list[logging.Logger] = []


_outage = _Outage()


def _reporting(inner: Any, endpoint: str) -> Any:
    """``inner`` (the OTLP exporter), saying once when exports start failing (spans dropped,
    deliveries untouched) and once when they succeed again."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class _Reporting(SpanExporter):
        def export(self, spans: Any) -> Any:
            _outage.said_now.clear()
            try:
                result = inner.export(spans)
            except Exception as exc:
                _outage.said_now.insert(0, f"{type(exc).__name__}: {exc}")
                result = SpanExportResult.FAILURE
            if result is SpanExportResult.SUCCESS:
                if _outage.away:
                    log.info("tracing: the collector answers again; spans are exported",
                             extra={"endpoint": mask_url(endpoint),
                                    "dropped_spans": _outage.dropped})
                if _outage.away or _outage.said:
                    _recovered()
                return result
            _outage.dropped += len(spans)
            if not _outage.away:
                _outage.away = True
                log.warning("tracing: spans cannot be exported; they are dropped until the "
                            "collector answers (deliveries are not affected)",
                            extra={"endpoint": mask_url(endpoint),
                                   "error": (_outage.said_now or ["?"])[0][:_TEXT]})
            return result

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(inner.force_flush(timeout_millis))

    return _Reporting()


def _recovered() -> None:
    _outage.away = False
    _outage.dropped = 0
    _outage.said.clear()
    for logger in _outage.muted:
        logger.setLevel(logging.NOTSET)
    _outage.muted.clear()


class _OnceFilter(logging.Filter):
    """The SDK's own log records, as JSON lines like every other: the exporter's (one per
    failed batch, retries included) are folded into the one line ``_Reporting`` writes; any
    other passes once per (logger, message) until an export succeeds. A warning also mutes
    its logger below ERROR until then: the SDK warns "Queue full, dropping Span" once per
    span while the collector is away, and a muted logger makes no record of it at all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("opentelemetry.exporter"):
            if len(_outage.said_now) < 4:
                _outage.said_now.append(record.getMessage())
            return False
        key = (record.name, str(record.msg))
        if key in _outage.said:
            return False
        _outage.said.add(key)
        logger = logging.getLogger(record.name)
        if record.levelno < logging.ERROR and logger.level <= record.levelno:
            logger.setLevel(record.levelno + 1)
            _outage.muted.append(logger)
        return True


class _ToRoot(logging.Handler):
    """Hands the SDK's records that pass ``_OnceFilter`` to the root's (JSON) handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def _quiet_sdk_logs() -> None:
    sdk = logging.getLogger("opentelemetry")
    if not any(isinstance(h, _ToRoot) for h in sdk.handlers):
        handler = _ToRoot()
        handler.addFilter(_OnceFilter())
        sdk.addHandler(handler)
        sdk.propagate = False
