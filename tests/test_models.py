"""The envelope model: every sample, Ingram's spelling variants, and errors with JSON paths."""

from __future__ import annotations

import json

import msgspec
import pytest

from relay.errors import EnvelopeError
from relay.models import Envelope, StoredEvent, parse_envelope, peek_event_id
from tests.support import SAMPLES

SAMPLE_FILES = sorted(SAMPLES.glob("*.json"))

EXPECTED_TYPES = {
    "order_shipped.json": ("resellers/orders", ("im::order_shipped",)),
    "order_invoiced_docs_variant.json": ("resellers/orders", ("im::order_invoiced",)),
    "order_voided_spec_variant.json": ("resellers/orders", ("im::order_voided",)),
    "quote_create.json": ("resellers/quotes", ("im::quote_create",)),
    "stock_update.json": ("resellers/catalog", ("im::stock_update",)),
}


def envelope(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "topic": "resellers/orders", "event": "im::updated", "eventId": "E1",
        "eventTimeStamp": "2024-01-01T00:00:00Z",
        "resource": [{"eventType": "im::order_shipped", "lines": [{"ingramLineNumber": "001"}]}],
    }
    base.update(overrides)
    return base


def parse(doc: object) -> Envelope:
    return parse_envelope(json.dumps(doc).encode())


def refusal(doc: object) -> str:
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return str(info.value)


def test_samples_directory_holds_every_shape():
    assert {p.name for p in SAMPLE_FILES} >= set(EXPECTED_TYPES)


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_every_sample_parses(path):
    body = path.read_bytes()
    env = parse_envelope(body)
    raw = json.loads(body)
    assert env.eventId == raw["eventId"]
    assert env.topic == raw["topic"]
    assert peek_event_id(body) == raw["eventId"]
    if path.name in EXPECTED_TYPES:
        topic, types = EXPECTED_TYPES[path.name]
        assert (env.topic, env.event_types()) == (topic, types)


def test_sample_without_trailing_newline_parses_too():
    for path in SAMPLE_FILES:
        parse_envelope(path.read_bytes().rstrip(b"\n"))


def test_event_types_are_lower_cased():
    env = parse_envelope((SAMPLES / "stock_update.json").read_bytes())
    assert env.resources()[0].eventType == "IM::STOCK_UPDATE"  # the original is kept
    assert env.event_types() == ("im::stock_update",)


def test_event_types_top_level_first_without_repeats():
    env = parse(envelope(eventType="IM::Async_Order_Create",
                         resource=[{"eventType": "im::order_shipped"},
                                   {"eventType": "IM::ORDER_SHIPPED"},
                                   {"eventType": "im::order_hold"}, {}]))
    assert env.event_types() == ("im::async_order_create", "im::order_shipped", "im::order_hold")


def test_top_level_event_type_with_object_resource():
    env = parse_envelope((SAMPLES / "quote_create.json").read_bytes())
    assert isinstance(env.resource, msgspec.Struct)
    assert len(env.resources()) == 1
    assert env.event_types() == ("im::quote_create",)


def test_event_types_empty_when_none_given():
    assert parse(envelope(resource={"orderNumber": "1"})).event_types() == ()


@pytest.mark.parametrize("spelling", ["ingramLineNumber", "lineNumber", "LineNumber"])
@pytest.mark.parametrize("value", ["001", 1])
def test_every_line_number_spelling_is_accepted(spelling, value):
    env = parse(envelope(resource=[{"lines": [{spelling: value}]}]))
    assert getattr(env.resources()[0].lines[0], spelling) == value


@pytest.mark.parametrize(("path", "number"), [
    ("order_shipped.json", "001"), ("order_invoiced_docs_variant.json", "001"),
    ("order_voided_spec_variant.json", "002"),
])
def test_samples_line_numbers_are_found_whatever_the_spelling(path, number):
    env = parse_envelope((SAMPLES / path).read_bytes())
    line = env.resources()[0].lines[0]
    assert number in (line.ingramLineNumber, line.lineNumber, line.LineNumber)


@pytest.mark.parametrize("quantity", [3, 3.5, "3", " 12 ", "-1", "2.50", "", None])
@pytest.mark.parametrize("field", ["requestedQuantity", "shippedQuantity",
                                   "backOrderedQuantity", "backorderedQuantity"])
def test_quantities_as_numbers_or_numeric_strings_are_accepted(field, quantity):
    env = parse(envelope(resource=[{"lines": [{field: quantity}]}]))
    assert getattr(env.resources()[0].lines[0], field) == quantity


def test_both_backordered_spellings_are_kept():
    voided = parse_envelope((SAMPLES / "order_voided_spec_variant.json").read_bytes())
    assert voided.resources()[0].lines[0].backorderedQuantity == "2"
    shipped = parse_envelope((SAMPLES / "order_shipped.json").read_bytes())
    assert shipped.resources()[0].lines[0].backOrderedQuantity == 1


@pytest.mark.parametrize("quantity", ["abc", "3 units", "1e5x", "--1"])
def test_non_numeric_quantity_string_is_refused_with_its_path(quantity):
    message = refusal(envelope(resource=[{"lines": [{}, {"shippedQuantity": quantity}]}]))
    assert "$.resource[0].lines[1].shippedQuantity" in message


def test_non_numeric_stock_availability_is_refused_with_its_path():
    message = refusal(envelope(resource=[{"totalAvailability": "lots"}]))
    assert "$.resource[0].totalAvailability" in message


def test_package_quantity_in_box_is_validated_deep_down():
    line = {"shipmentDetails": [{"packageDetails": [{"quantityInbox": "x"}]}]}
    message = refusal(envelope(resource=[{"lines": [line]}]))
    assert "$.resource[0].lines[0].shipmentDetails[0].packageDetails[0].quantityInbox" in message


def test_lines_not_an_array_is_refused_with_its_path():
    message = refusal(envelope(resource=[{"lines": {"ingramLineNumber": "001"}}]))
    assert "$.resource[0].lines" in message
    assert "array" in message


@pytest.mark.parametrize("field", ["eventId", "topic", "event", "eventTimeStamp", "resource"])
def test_missing_required_field_is_named(field):
    doc = envelope()
    del doc[field]
    message = refusal(doc)
    assert "$" in message and f"`{field}`" in message


def test_empty_event_id_is_refused():
    assert "$.eventId" in refusal(envelope(eventId=""))


def test_event_id_of_wrong_type_is_refused_with_its_path():
    assert "$.eventId" in refusal(envelope(eventId=123))


@pytest.mark.parametrize("resource", ["text", 5, None, [1]])
def test_resource_of_wrong_shape_is_refused(resource):
    assert "$.resource" in refusal(envelope(resource=resource))


@pytest.mark.parametrize("doc", [[], "x", 5, None, [envelope()]])
def test_json_that_is_not_an_object_is_refused(doc):
    assert "$" in refusal(doc)


@pytest.mark.parametrize("body", [b"", b"not json", b'{"eventId": "E1"', b"\xff\xfe"])
def test_body_that_is_not_json_is_refused(body):
    assert "not valid JSON" in refusal(body)


def test_unknown_fields_are_allowed():
    env = parse(envelope(newField={"a": 1}, resource=[{"future": True, "lines": [{"x": 1}]}]))
    assert env.eventId == "E1"


def test_peek_event_id_finds_id_of_invalid_envelope_only_if_string():
    assert peek_event_id(b'{"eventId": "E9", "resource": 5}') == "E9"
    assert peek_event_id(b'{"eventId": 9}') is None
    assert peek_event_id(b"[]") is None
    assert peek_event_id(b"nope") is None


def test_stored_event_round_trips_through_msgpack_with_exact_body():
    body = (SAMPLES / "order_shipped.json").read_bytes()
    event = StoredEvent(event_id="E1", topic="t", event_types=("a",), received_at=1.5,
                        body=body)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(event), type=StoredEvent)
    assert decoded == event and decoded.body == body
