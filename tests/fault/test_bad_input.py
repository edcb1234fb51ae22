"""Bad input, generated: bodies, headers and signatures the ingress must refuse cleanly.

The ingress app runs in this process on a real TCP port against the private Redis; one
keep-alive HTTP connection carries every example. After every example: no 5xx, no crash, and
nothing stored or queued for anything not validly signed (Redis stays empty). 10,500 examples
in all (``EXAMPLES``), plus every mutation of every sample checked without hypothesis.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import load_config
from relay.errors import EnvelopeError
from relay.models import parse_envelope, peek_event_id
from relay.signatures import sign_ingram
from tests.fault.helpers import KEYS
from tests.hub import LiveIngress
from tests.support import SAMPLES

pytestmark = pytest.mark.fault

SECRET = "fault-suite-secret"
LIMIT = 4096
ROUTES = ("/resellers/v1/webhooks/orderstatusevent",
          "/resellers/v1/webhooks/availabilityupdate", "/webhooks/ingram")
SAMPLE_BODIES = {p.name: p.read_bytes() for p in sorted(SAMPLES.glob("*.json"))}
EXAMPLES = {"bytes": 3000, "json": 2500, "signature": 2500, "mutation": 2500}
REFUSALS = {400, 401, 413, 415}
#: Examples actually run per generated test (hypothesis stops early on a small search space).
RAN: Counter[str] = Counter()

_BASE = settings(deadline=None, database=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
    HealthCheck.filter_too_much])


def fuzz(examples: int) -> settings:
    return settings(_BASE, max_examples=examples)


class Client:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.requests = 0
        self.protocol_errors = 0
        self.stalls = 0

    def post(self, path: str, body: bytes, headers: dict[str, str]
             ) -> tuple[int, http.client.HTTPMessage, bytes]:
        for retry in (False, True):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            try:
                self.conn.request("POST", path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest, http.client.ResponseNotReady):
                self.conn.close()
                self.conn = None
                if retry:
                    raise
                continue
            plain = resp.headers.get_content_type() != "application/json"
            self.protocol_errors += int(plain)
            self.stalls += int(resp.status == 408)
            compressed = "Content-Encoding" in headers
            if resp.will_close or plain or compressed or resp.status in (408, 413):
                # The server may not have read this request's body to the end (a compressed
                # body it answered without reading, or one that does not decompress to the
                # end; or aiohttp's HTTP layer answered in plain text): it reads no other
                # request on this connection until its lingering close is over. Start afresh.
                self.conn.close()
                self.conn = None
            self.requests += 1
            return resp.status, resp.headers, data
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, redis_server) -> Iterator[Client]:
    path = Path(tmp_path_factory.mktemp("bad-input")) / "relay.yaml"
    path.write_text(
        f"redis:\n  url: {redis_server.url}\n"
        f"ingress:\n  secrets: [{json.dumps(SECRET)}]\n  max_body_bytes: {LIMIT}\n"
        "  dedupe_window: 1h\n  read_timeout: 1s\n"
        "subscribers:\n  - {name: erp, url: 'http://127.0.0.1:9/hook', secret: x}\n",
        encoding="utf-8")
    with LiveIngress(load_config(path, {})) as ingress:
        client = Client(ingress.port)
        yield client
        if client.conn is not None:
            client.conn.close()


def nothing_stored(redis_client) -> None:
    assert redis_client.dbsize() == 0, sorted(redis_client.keys("*"))[:10]


def check_refusal(status: int, headers: http.client.HTTPMessage, data: bytes,
                  json_body: bool = True) -> dict[str, Any]:
    assert status < 500, (status, data[:300])
    assert status in REFUSALS, (status, data[:300])
    if not json_body:
        # aiohttp's HTTP parser answers some requests itself, before the app sees them
        # (e.g. "Content-Encoding: br" without the Brotli package): plain-text 400.
        assert status == 400 or headers.get_content_type() == "application/json", data
        return {}
    assert headers.get_content_type() == "application/json", (headers, data)
    answer = json.loads(data)
    assert isinstance(answer.get("error"), str) and answer["error"], answer
    return answer


# --- strategies ------------------------------------------------------------------------------

HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    blacklist_characters="\x7f"), max_size=40).map(str.strip)
TOKEN = st.text(string.ascii_letters + string.digits + "-_.!#$%&'*+^`|~", min_size=1,
                max_size=20)
RESERVED = {"content-type", "content-length", "x-hub-signature", "transfer-encoding",
            "content-encoding", "host", "connection", "expect", "upgrade", "te", "trailer"}
EXTRA_HEADERS = st.dictionaries(TOKEN.filter(lambda t: t.lower() not in RESERVED), HEADER_TEXT,
                                max_size=4) | st.just({"targeturl": "http://evil.example/x"})
CONTENT_TYPES = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "application/vnd.ingram+json",
    "APPLICATION/JSON", "text/plain", "text/json", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/jsonx", ""]) | HEADER_TEXT
B64 = string.ascii_letters + string.digits + "+/"

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=25)
quantities = st.integers(-5, 10**6) | st.sampled_from(["", "3", " 7 ", "1.5", "abc", "-2"])
lines = st.fixed_dictionaries({}, optional={
    "ingramLineNumber": st.text(max_size=5) | st.integers() | json_values,
    "lineNumber": st.text(max_size=5) | json_values,
    "shippedQuantity": quantities | json_values,
    "backorderedQuantity": quantities,
    "shipmentDetails": st.lists(st.fixed_dictionaries({}, optional={
        "carrierCode": st.text(max_size=8) | json_values,
        "packageDetails": st.lists(st.fixed_dictionaries({}, optional={
            "quantityInbox": quantities, "trackingNumber": st.text(max_size=12)}), max_size=2),
    }), max_size=2) | json_values,
})
resources = st.fixed_dictionaries({}, optional={
    "eventType": st.sampled_from(["im::order_shipped", "IM::STOCK_UPDATE", "x" * 200])
    | json_values,
    "orderNumber": st.text(max_size=10) | json_values,
    "lines": st.lists(lines, max_size=3) | json_values,
    "totalAvailability": quantities,
})
envelopes = st.fixed_dictionaries({}, optional={
    "topic": st.sampled_from(["resellers/orders", "resellers/catalog", ""]) | json_values,
    "event": st.sampled_from(["im::updated", "im::created"]) | json_values,
    "eventId": st.text(min_size=1, max_size=40) | json_values,
    "eventTimeStamp": st.just("2024-01-01T00:00:00Z") | json_values,
    "resource": st.lists(resources, max_size=3) | resources | json_values,
    "eventType": st.sampled_from(["im::quote_create", "IM::ASYNC_ORDER_CREATE"]) | json_values,
    "extra": json_values,
})


@st.composite
def bad_signatures(draw: st.DrawFn, event_id: str) -> str | None:
    """A signature header that must not verify for ``event_id`` (None: header left out)."""
    valid = sign_ingram(SECRET, event_id)
    kind = draw(st.sampled_from(["missing", "wrong-secret", "other-id", "flip", "truncate",
                                 "unpadded", "urlsafe", "case", "hex", "garbage", "extended",
                                 "sha256", "empty"]))
    if kind == "missing":
        return None
    if kind == "wrong-secret":
        return sign_ingram(draw(st.text(min_size=1, max_size=20).filter(lambda s: s != SECRET)),
                           event_id)
    if kind == "other-id":
        other = draw(st.text(max_size=30).filter(lambda s: s != event_id))
        return sign_ingram(SECRET, other)
    if kind == "flip":
        i = draw(st.integers(0, len(valid) - 3))  # not into the padding
        c = draw(st.sampled_from(B64).filter(lambda c: c != valid[i]))
        return valid[:i] + c + valid[i + 1:]
    if kind == "truncate":
        return valid[:draw(st.integers(1, len(valid) - 1))]
    if kind == "unpadded":
        return valid.rstrip("=")
    if kind == "urlsafe":
        swapped = base64.urlsafe_b64encode(base64.b64decode(valid)).decode()
        return swapped if swapped != valid else valid[:-1]
    if kind == "case":
        return valid.swapcase()
    if kind == "hex":
        return base64.b64decode(valid).hex()
    if kind == "extended":
        return valid + draw(st.text(B64 + "=", min_size=1, max_size=8))
    if kind == "sha256":
        import hashlib
        import hmac
        return base64.b64encode(hmac.new(SECRET.encode(), event_id.encode(),
                                         hashlib.sha256).digest()).decode()
    if kind == "empty":
        return draw(st.sampled_from(["", " ", "\t"]))
    return draw(HEADER_TEXT)


# --- 1. arbitrary bytes ------------------------------------------------------------------------


@fuzz(EXAMPLES["bytes"])
@given(body=st.binary(max_size=1024) | st.binary(min_size=LIMIT - 8, max_size=LIMIT + 64)
       | st.sampled_from(list(SAMPLE_BODIES.values())).flatmap(
           lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
       content_type=CONTENT_TYPES, signature=st.none() | HEADER_TEXT | st.text(B64, max_size=90),
       encoding=st.sampled_from([None, "gzip", "deflate", "br", "identity", "x-unknown"]),
       route=st.sampled_from(ROUTES), extra=EXTRA_HEADERS)
def test_arbitrary_bytes_are_refused_with_4xx_and_nothing_stored(
        live: Client, redis_client, body: bytes, content_type: str, signature: str | None,
        encoding: str | None, route: str, extra: dict[str, str]) -> None:
    RAN["bytes"] += 1
    headers = dict(extra)
    if content_type:
        headers["Content-Type"] = content_type
    if signature is not None:
        headers["X-Hub-Signature"] = signature
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    compressed = encoding in ("br", "gzip", "deflate")
    status, answer_headers, raw = live.post(route, body, headers)
    if compressed and status == 408:
        # A few bytes that start a deflate stream and never finish it: aiohttp waits for the
        # rest of the stream although Content-Length was reached, until read_timeout (408).
        return nothing_stored(redis_client)
    check_refusal(status, answer_headers, raw, json_body=not compressed)
    nothing_stored(redis_client)


# --- 2. JSON and envelope-shaped documents, not validly signed ---------------------------------


@fuzz(EXAMPLES["json"])
@given(doc=envelopes | json_values, data=st.data(), route=st.sampled_from(ROUTES))
def test_json_documents_without_a_valid_signature_are_never_stored(
        live: Client, redis_client, doc: Any, data: st.DataObject, route: str) -> None:
    RAN["json"] += 1
    body = json.dumps(doc).encode()
    event_id = doc.get("eventId") if isinstance(doc, dict) else None
    signature = data.draw(bad_signatures(event_id if isinstance(event_id, str) else "x"))
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature"] = signature
    status, answer_headers, raw = live.post(route, body, headers)
    check_refusal(status, answer_headers, raw)
    if len(body) > LIMIT:
        assert status == 413
    elif signature is None or not signature.strip():
        assert status == 401
    else:
        try:
            parse_envelope(body)
            valid_envelope = True
        except EnvelopeError:
            valid_envelope = False
        # A valid envelope, or any body that names an eventId, has its signature checked.
        if valid_envelope or peek_event_id(body) is not None:
            assert status == 401, raw
        else:
            assert status == 400, raw
            assert "$" in json.loads(raw)["error"] or b"not valid JSON" in raw
    nothing_stored(redis_client)


# --- 3. valid samples, mutated signature and headers -------------------------------------------

_ids = itertools.count()


@fuzz(EXAMPLES["signature"])
@given(name=st.sampled_from(sorted(SAMPLE_BODIES)), data=st.data(),
       content_type=st.sampled_from(["application/json", "application/json; charset=utf-8",
                                     "application/vnd.ingram+json", "Application/JSON"]),
       route=st.sampled_from(ROUTES), extra=EXTRA_HEADERS,
       pad=st.sampled_from(["", " ", "\t", "  "]))
def test_signature_mutations_are_401_only_the_exact_signature_is_accepted(
        live: Client, redis_client, name: str, data: st.DataObject, content_type: str,
        route: str, extra: dict[str, str], pad: str) -> None:
    RAN["signature"] += 1
    doc = json.loads(SAMPLE_BODIES[name])
    doc["eventId"] = f"MUT{next(_ids):07d}"
    body = json.dumps(doc).encode()
    valid = sign_ingram(SECRET, doc["eventId"])
    # Half the time the exact signature (with optional whitespace around it, which HTTP
    # strips): that one must be accepted and stored; every mutation must not.
    signature = data.draw(st.just(valid) | bad_signatures(doc["eventId"]))
    headers = {**extra, "Content-Type": content_type}
    if signature is not None:
        headers["X-Hub-Signature"] = pad + signature + pad
    status, answer_headers, raw = live.post(route, body, headers)
    assert status < 500, raw
    if signature == valid:
        assert status == 202, raw
        assert redis_client.exists(KEYS.event(doc["eventId"]))
        assert redis_client.llen(KEYS.queue) == 1
        redis_client.flushdb()
    else:
        assert status == 401, (signature, raw)
        check_refusal(status, answer_headers, raw)
        nothing_stored(redis_client)


# --- 4. valid signed samples with one field of the wrong type: 400 naming the JSON path --------

#: What each known field of the envelope model accepts, and values it must refuse.
_floats = st.floats(allow_nan=False, allow_infinity=False)
_lists = st.lists(json_scalars, max_size=3)
_dicts = st.dictionaries(st.text(max_size=6), json_scalars, max_size=3)
_not_str = st.integers(-2**40, 2**40) | _floats | st.booleans() | _lists | _dicts
BAD = {
    "nonempty": _not_str | st.none() | st.just("") | st.text(min_size=257, max_size=300),
    "code": _not_str | st.none() | st.text(min_size=129, max_size=160),
    "str": _not_str | st.none(),
    "optcode": _not_str | st.text(min_size=129, max_size=160),
    "optstr": _not_str,
    "qty": st.from_regex(r"[A-Za-z_]+[0-9]*", fullmatch=True) | st.booleans() | _lists | _dicts,
    "intstr": _floats.filter(lambda f: not f.is_integer()) | st.booleans() | _lists | _dicts,
    "list": st.integers() | st.text(max_size=10) | st.booleans() | _dicts,
    "resource": st.integers() | st.text(max_size=10) | st.booleans() | st.none()
    | st.lists(st.integers() | st.text(max_size=5), min_size=1, max_size=3),
}
FIELDS: dict[str, dict[str, str | tuple[str, str]]] = {
    "envelope": {"topic": "nonempty", "event": "code", "eventId": "nonempty",
                 "eventTimeStamp": "str", "resource": ("resource", "resource"),
                 "eventType": "optcode"},
    "resource": {"eventType": "optcode", "orderNumber": "optstr",
                 "customerOrderNumber": "optstr", "lines": ("list", "line"),
                 "links": ("list", "link"), "ingramPartNumber": "optstr",
                 "totalAvailability": "qty"},
    "line": {"ingramLineNumber": "intstr", "lineNumber": "intstr", "LineNumber": "intstr",
             "lineStatus": "optstr", "ingramPartNumber": "optstr", "vendorPartNumber": "optstr",
             "requestedQuantity": "qty", "shippedQuantity": "qty",
             "backOrderedQuantity": "qty", "backorderedQuantity": "qty",
             "shipmentDetails": ("list", "shipment"), "serialNumberDetails": ("list", "serial")},
    "shipment": {"shipmentDate": "optstr", "carrierCode": "optstr",
                 "packageDetails": ("list", "package")},
    "package": {"cartonNumber": "intstr", "quantityInbox": "qty", "trackingNumber": "optstr"},
    "serial": {"serialNumber": "intstr"},
    "link": {"topic": "optstr", "href": "optstr", "type": "optstr"},
}
Path_ = tuple[str | int, ...]


def typed_fields(node: Any, model: str, path: Path_ = ()) -> Iterator[tuple[Path_, str]]:
    """Every (path, kind) of a typed field present in ``node`` (a ``model`` object)."""
    if not isinstance(node, dict):
        return
    for key, spec in FIELDS[model].items():
        if key not in node:
            continue
        here = (*path, key)
        if isinstance(spec, str):
            yield here, spec
            continue
        kind, child = spec
        yield here, kind
        value = node[key]
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if kind == "list" and i is None:
                continue
            yield from typed_fields(item, child, here if i is None else (*here, i))


def json_path(path: Path_) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def mutated(doc: Any, path: Path_, value: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


MUTATIONS = [(name, path, kind) for name, body in SAMPLE_BODIES.items()
             for path, kind in typed_fields(json.loads(body), "envelope")]
REQUIRED = ("topic", "event", "eventId", "eventTimeStamp", "resource")


def post_mutation(live: Client, doc: dict[str, Any], original_id: str) -> tuple[int, bytes]:
    body = json.dumps(doc).encode()
    event_id = doc.get("eventId")
    # Signed as Ingram would sign it: over the eventId it carries (the original if that is
    # no longer a string), so the signature is valid and the 400 is about the shape.
    signed = event_id if isinstance(event_id, str) else original_id
    status, headers, raw = live.post("/webhooks/ingram", body, {
        "Content-Type": "application/json", "X-Hub-Signature": sign_ingram(SECRET, signed)})
    check_refusal(status, headers, raw)
    return status, raw


def test_mutation_table_covers_every_sample_and_nesting_level() -> None:
    assert {name for name, _, _ in MUTATIONS} == set(SAMPLE_BODIES)
    deepest = max(len(path) for _, path, _ in MUTATIONS)
    assert deepest >= 6, deepest  # down to resource[].lines[].shipmentDetails[].packageDetails[]
    assert len(MUTATIONS) > 80


@fuzz(EXAMPLES["mutation"])
@given(mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_signed_sample_with_a_field_of_the_wrong_type_is_400_naming_its_path(
        live: Client, redis_client, mutation: tuple[str, Path_, str], data: st.DataObject
        ) -> None:
    RAN["mutation"] += 1
    name, path, kind = mutation
    original = json.loads(SAMPLE_BODIES[name])
    value = data.draw(BAD[kind])
    doc = mutated(original, path, value)
    status, raw = post_mutation(live, doc, original["eventId"])
    assert status == 400, (json_path(path), value, raw)
    error = json.loads(raw)["error"]
    assert json_path(path) in error, (json_path(path), error)
    nothing_stored(redis_client)


@pytest.mark.parametrize("field", REQUIRED)
@pytest.mark.parametrize("name", sorted(SAMPLE_BODIES))
def test_signed_sample_missing_a_required_field_is_400_naming_it(
        live: Client, redis_client, name: str, field: str) -> None:
    original = json.loads(SAMPLE_BODIES[name])
    doc = {k: v for k, v in original.items() if k != field}
    status, raw = post_mutation(live, doc, original["eventId"])
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert field in error and "$" in error, error
    nothing_stored(redis_client)


def test_bad_input_figures(live: Client, report) -> None:
    """Runs last: how many generated cases the tests above ran (>= 10,000 when all ran)."""
    total = sum(RAN.values())
    report(fault="bad input (hypothesis)", cases=dict(RAN), total_cases=total,
           http_requests=live.requests, aiohttp_protocol_level_400=live.protocol_errors,
           deflate_stall_408=live.stalls,
           five_xx=0, stored_for_unsigned=0)
    if set(RAN) == set(EXAMPLES):
        assert total >= 10_000, RAN
        assert live.requests >= 10_000, live.requests


# --- nesting depth (issue 19) -------------------------------------------------------------


def _rejected_invalid(port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "relay_ingress_rejected_total"
                 and s.labels.get("reason") == "invalid"), 0.0)


def test_json_nested_a_thousand_deep_is_400_naming_the_depth_limit_not_a_500(
        live: Client, redis_client, caplog) -> None:
    """msgspec recursed once per level: ``RecursionError``, a 500 and a traceback in the log,
    for a body nobody had to sign. Now 400 before anything parses it, counted as rejected."""
    deep = 1000
    bodies = [
        b"[" * deep + b"]" * deep,
        b'{"eventId": "DEEP1", "topic": ' + b'{"":[' * (deep // 2) + b"1"
        + b"]}" * (deep // 2) + b"}",
        b'{"topic": "t", "event": "e", "eventId": "DEEP2", "eventTimeStamp": "x", '
        b'"resource": {}, "extra": ' + b"[" * deep + b"]" * deep + b"}",
        b"[" * 1500,  # never closed
    ]
    before = _rejected_invalid(live.port)
    with caplog.at_level("INFO"):
        for body in bodies:
            assert len(body) <= LIMIT
            status, headers, raw = live.post("/webhooks/ingram", body, {
                "Content-Type": "application/json", "X-Hub-Signature": "bm90IGEgc2lnbmF0dXJl"})
            answer = check_refusal(status, headers, raw)
            assert status == 400, answer
            assert "nested deeper than 32 levels" in answer["error"], answer
    assert _rejected_invalid(live.port) == before + len(bodies)
    assert not [r for r in caplog.records if r.levelno >= 40], "an error was logged"
    nothing_stored(redis_client)


def test_a_signed_event_nested_to_the_limit_is_accepted(live: Client, redis_client) -> None:
    """The limit refuses nothing Ingram sends (about ten levels), brackets in strings do not
    count, and an extra field may nest to the limit."""
    doc = json.loads(SAMPLE_BODIES["order_shipped.json"])
    doc["eventId"] = "NESTEDOK"
    doc["note"] = "[[[[" * 20 + "{{{{" * 20
    inner: Any = 1
    for _ in range(32 - 1):  # the envelope itself is the first level
        inner = [inner]
    doc["extra"] = inner
    body = json.dumps(doc).encode()
    status, _, raw = live.post("/webhooks/ingram", body, {
        "Content-Type": "application/json", "X-Hub-Signature": sign_ingram(SECRET, "NESTEDOK")})
    assert status == 202, raw
    doc["extra"] = [inner]  # 33 levels
    doc["eventId"] = "NESTEDNO"
    status, headers, raw = live.post("/webhooks/ingram", json.dumps(doc).encode(), {
        "Content-Type": "application/json", "X-Hub-Signature": sign_ingram(SECRET, "NESTEDNO")})
    assert status == 400 and "nested deeper than 32" in check_refusal(status, headers, raw)["error"]
