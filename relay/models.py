"""The shapes that cross a boundary: Ingram's envelope coming in, the stored event record.

The envelope model validates; it never re-serialises. The hub stores and forwards the exact
bytes it received, so a field Ingram adds tomorrow reaches subscribers untouched. Fields are
typed where their shape matters to a consumer and left open (extra keys allowed) elsewhere.

Ingram's own documents disagree on names, types and case (see ``tests/shared/samples``), so:

* the line number is ``ingramLineNumber``, ``lineNumber`` or ``LineNumber``;
* quantities are numbers or numeric strings (``""`` too: Ingram sends it for "unknown");
* ``resource`` is an array (order status, stock) or an object (quote, async order create);
* ``eventType`` sits at the top level or in each resource item, in any case.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from relay.errors import EnvelopeError

# Patterns: msgspec applies them with ``re.search``, where ``$`` also matches before a trailing
# newline; ``\A`` and ``\Z`` anchor at the very start and end.
# A quantity: a number, or a string holding one (or empty). Strings with letters are refused.
_NUMERIC = msgspec.Meta(pattern=r"\A\s*(-?\d+(\.\d+)?)?\s*\Z")
Quantity = int | float | Annotated[str, _NUMERIC] | None
LineNo = int | str | None
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: An eventId: 1-256 characters, none of them a control character (it becomes a header,
#: ``webhook-id``, and a Redis key on the way out; a line break there would break both).
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=256,
                                      pattern=r"\A[^\x00-\x1f\x7f]+\Z")]
Code = Annotated[str, msgspec.Meta(max_length=128)]


class _Open(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    """Unknown keys are kept in the bytes and ignored here."""


class Package(_Open):
    cartonNumber: str | int | None = None
    quantityInbox: Quantity = None
    trackingNumber: str | None = None


class Shipment(_Open):
    shipmentDate: str | None = None
    carrierCode: str | None = None
    packageDetails: list[Package] | None = None


class Serial(_Open):
    serialNumber: str | int | None = None


class Line(_Open):
    ingramLineNumber: LineNo = None
    lineNumber: LineNo = None
    LineNumber: LineNo = None
    lineStatus: str | None = None
    ingramPartNumber: str | None = None
    vendorPartNumber: str | None = None
    requestedQuantity: Quantity = None
    shippedQuantity: Quantity = None
    backOrderedQuantity: Quantity = None
    backorderedQuantity: Quantity = None
    shipmentDetails: list[Shipment] | None = None
    serialNumberDetails: list[Serial] | None = None


class Link(_Open):
    topic: str | None = None
    href: str | None = None
    type: str | None = None


class Resource(_Open):
    eventType: Code | None = None
    orderNumber: str | None = None
    # Spellings of the order number seen outside Ingram's main documents: indexed, not required.
    OrderNumber: str | int | None = None
    ingramOrderNumber: str | int | None = None
    customerOrderNumber: str | None = None
    lines: list[Line] | None = None
    links: list[Link] | None = None
    ingramPartNumber: str | None = None
    totalAvailability: Quantity = None


class Envelope(_Open):
    topic: NonEmpty
    event: Code
    eventId: EventId
    eventTimeStamp: str
    resource: list[Resource] | Resource
    eventType: Code | None = None

    def resources(self) -> list[Resource]:
        return self.resource if isinstance(self.resource, list) else [self.resource]

    def event_types(self) -> tuple[str, ...]:
        """Every eventType in the envelope, lower-cased, top level first, without repeats."""
        found = [self.eventType] + [r.eventType for r in self.resources()]
        return tuple(dict.fromkeys(t.lower() for t in found if t))

    def order_numbers(self) -> tuple[str, ...]:
        """Ingram order numbers of every resource item, whichever spelling, without repeats."""
        found = (n for r in self.resources()
                 for n in (r.orderNumber, r.OrderNumber, r.ingramOrderNumber))
        return tuple(dict.fromkeys(str(n).strip() for n in found
                                   if n is not None and str(n).strip()))[:MAX_ORDER_NUMBERS]


class _IdOnly(msgspec.Struct):
    eventId: str


#: Order numbers indexed per event (a bound on what one request can make the hub write).
MAX_ORDER_NUMBERS = 20

_envelope_decoder = msgspec.json.Decoder(Envelope)
_id_decoder = msgspec.json.Decoder(_IdOnly)


def parse_envelope(body: bytes) -> Envelope:
    """Validate ``body`` as an envelope. EnvelopeError names what and where (a JSON path)."""
    try:
        return _envelope_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise EnvelopeError(f"invalid envelope: {_with_path(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise EnvelopeError(f"body is not valid JSON: {exc}") from None
    except RecursionError:  # the ingress measures depth first (relay/nesting.py); a backstop
        raise EnvelopeError("$: JSON nested too deeply") from None


def peek_event_id(body: bytes) -> str | None:
    """The ``eventId`` of a body that is JSON but not a valid envelope, if it has one and it
    could be an eventId (at most 256 characters: an attacker's megabyte is not logged)."""
    try:
        event_id = _id_decoder.decode(body).eventId
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    return event_id if 0 < len(event_id) <= 256 else None


def _with_path(message: str) -> str:
    # msgspec says "Expected `array`, got `int` - at `$.resource[0].lines`"; lead with the path.
    what, sep, where = message.rpartition(" - at ")
    path = where.strip("`")
    if path == "$.eventId" and "matching regex" in what:
        what = "must not contain control characters (line breaks, tabs, NUL)"
    return f"{path}: {what}" if sep else f"$: {message}"


class StoredEvent(msgspec.Struct, array_like=True, frozen=True, weakref=True):
    """What the ingress stores per event and the workers read: msgpack under ``event:{id}``.
    ``weakref``: a worker shares one in-memory copy among the subscribers it posts it to."""

    event_id: str
    topic: str
    event_types: tuple[str, ...]
    received_at: float
    body: bytes
    order_numbers: tuple[str, ...] = ()
    #: The ingress span's W3C trace context (``traceparent``, then ``"\n" + tracestate`` if
    #: any) when tracing was on: every attempt's span joins that trace (relay/tracing.py).
    #: Last and optional, so records written without it decode.
    trace: str | None = None


class SentRequest(msgspec.Struct, array_like=True, frozen=True):
    """What an attempt sent, as kept in its record: the URL (credentials masked) and the
    headers in the order sent (credential headers masked, signatures kept). Never the body:
    that is the event's, stored once in ``event:{id}``."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()


class Answer(msgspec.Struct, array_like=True, frozen=True):
    """What came back: the status, the headers, the first ``ANSWER_BODY_BYTES`` of the body as
    text (``truncated`` when there was more). ``body`` is None when it was not kept (a 2xx
    keeps status and headers only: see docs/benchmarks.md, "What an attempt keeps")."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None
    truncated: bool = False


#: Bytes of a subscriber's answer body kept per attempt (the rest is never read).
ANSWER_BODY_BYTES = 4096
#: What set an attempt off: the hub's own retries, an operator (resend, replay), or the one
#: attempt let through a half-open circuit breaker.
TRIGGERS = ("auto", "resend", "replay", "probe")


class Attempt(msgspec.Struct, array_like=True, frozen=True):
    """One delivery attempt, as kept in ``log:{id}:{sub}``: an HTTP status, or an error class
    when there was no answer. A probe (the one attempt let through a half-open circuit
    breaker) that fails does not use up an attempt: it keeps its number.

    Fields after ``probe`` were added later, with defaults, so records written before them
    still decode (``trigger`` None reads as ``auto``, or ``probe`` for a probe)."""

    at: float
    attempt: int
    status: int | None
    error: str | None
    latency_ms: float
    probe: bool = False
    trigger: str | None = None
    request: SentRequest | None = None
    response: Answer | None = None

    def describe(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else (self.error or "?")

    @property
    def cause(self) -> str:
        """The trigger, for records written before it was kept too."""
        return self.trigger or ("probe" if self.probe else "auto")


class DeadLetter(msgspec.Struct, array_like=True, frozen=True):
    """A delivery given up on, under ``letter:{sub}:{id}``; its attempts stay in the log.
    ``event`` is a copy of the record (None when it had expired), so a replay can restore it."""

    event_id: str
    subscriber: str
    reason: str
    dead_at: float
    event: StoredEvent | None
