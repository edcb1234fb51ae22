"""The ingress over real HTTP against the private redis-server: every row of SPEC's table.

The aiohttp app runs in-process on a real TCP port (its own event loop in a thread); one test
runs it as ``relay ingress`` in a subprocess. Requests go over sockets with ``http.client``.
"""

from __future__ import annotations

import gzip
import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config import Config, load_config
from relay.keys import Keys
from relay.models import StoredEvent
from relay.queue import read_deliver_message
from relay.signatures import sign_ingram
from tests.hub import LiveIngress
from tests.support import SAMPLES, free_port, process, relay_cmd, wait_http, wait_until

SECRET = "s3cret"
OLD_SECRET = "correct horse battery staple"
ROUTES = (
    "/resellers/v1/webhooks/orderstatusevent",
    "/resellers/v1/webhooks/availabilityupdate",
    "/webhooks/ingram",
)
SAMPLE_FILES = sorted(SAMPLES.glob("*.json"))
KEYS = Keys()
SMALL_LIMIT = 2048


def sample(name: str) -> tuple[str, bytes]:
    """(eventId, body bytes exactly as in the file)."""
    body = (SAMPLES / name).read_bytes()
    return json.loads(body)["eventId"], body


def with_id(body: bytes, event_id: str) -> bytes:
    """The sample body with another eventId (same bytes otherwise)."""
    old = json.loads(body)["eventId"]
    return body.replace(f'"eventId":"{old}"'.encode(), f'"eventId":"{event_id}"'.encode())


def write_config(tmp_path: Path, redis_url: str, secrets: Iterable[str] = (SECRET,),
                 max_body_bytes: int = 1_048_576, name: str = "relay.yaml",
                 dedupe_window: str = "1h", read_timeout: str = "5s",
                 retention: str | None = None) -> Path:
    listed = ", ".join(json.dumps(s) for s in secrets)
    path = tmp_path / name
    # A short retention needs a short retry horizon (the config check compares them).
    horizon = ", max_attempts: 1, timeout: 1s" if retention else ""
    path.write_text(
        f"redis:\n  url: {redis_url}\n"
        + (f"  retention: {retention}\n" if retention else "")
        + f"ingress:\n  secrets: [{listed}]\n  max_body_bytes: {max_body_bytes}\n"
        f"  dedupe_window: {dedupe_window}\n  read_timeout: {read_timeout}\n"
        f"subscribers:\n  - {{name: erp, url: 'http://127.0.0.1:9/hook', secret: x{horizon}}}\n",
        encoding="utf-8")
    return path




class Answer:
    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.status = resp.status
        self.headers = resp.headers
        self.raw = resp.read()

    def json(self) -> dict[str, object]:
        return json.loads(self.raw)

    def __repr__(self) -> str:
        return f"<{self.status} {self.raw[:300]!r}>"


def request(port: int, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
            headers: dict[str, str] | None = None, chunked: bool = False) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        return Answer(conn.getresponse())
    finally:
        conn.close()


def post(port: int, body: bytes, path: str = "/webhooks/ingram", secret: str | None = SECRET,
         event_id: str | None = None, content_type: str = "application/json",
         headers: dict[str, str] | None = None) -> Answer:
    all_headers = {"Content-Type": content_type}
    if secret is not None:
        all_headers["X-Hub-Signature"] = sign_ingram(
            secret, event_id if event_id is not None else json.loads(body)["eventId"])
    all_headers.update(headers or {})
    return request(port, "POST", path, body, all_headers)


def queued(client) -> list:
    return [read_deliver_message(m) for m in client.lrange(KEYS.queue, 0, -1)]


def stored(client, event_id: str) -> StoredEvent | None:
    raw = client.get(KEYS.event(event_id))
    return None if raw is None else msgspec.msgpack.decode(raw, type=StoredEvent)


def assert_nothing_stored(client) -> None:
    assert client.keys("*") == [], "a refused request left something in Redis"


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = request(port, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(answer.raw.decode()):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


@pytest.fixture
def config(tmp_path, redis_server) -> Config:
    return load_config(write_config(tmp_path, redis_server.url), {})


@pytest.fixture
def ingress(config, redis_client) -> Iterator[LiveIngress]:
    with LiveIngress(config) as live:
        yield live


@pytest.fixture
def small_ingress(tmp_path, redis_server, redis_client) -> Iterator[LiveIngress]:
    path = write_config(tmp_path, redis_server.url, max_body_bytes=SMALL_LIMIT, name="small.yaml")
    with LiveIngress(load_config(path, {})) as live:
        yield live


# --- 202 accepted, stored, queued ---------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_signed_sample_is_accepted_stored_with_exact_bytes_and_queued(
        ingress, redis_client, route, path):
    event_id, body = sample(path.name)
    before = time.time()
    answer = post(ingress.port, body, route)
    assert answer.status == 202, answer
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json() == {"eventId": event_id, "status": "accepted"}

    record = stored(redis_client, event_id)
    assert record is not None
    assert record.body == body  # byte for byte, trailing newline included
    assert record.event_id == event_id
    assert record.topic == json.loads(body)["topic"]
    assert before - 1 <= record.received_at <= time.time() + 1
    seen_ttl = redis_client.ttl(KEYS.seen(event_id))
    assert 0 < seen_ttl <= 3600  # the dedupe window of this config
    assert redis_client.ttl(KEYS.event(event_id)) >= seen_ttl

    messages = queued(redis_client)
    assert len(messages) == 1
    assert [messages[0].event_id, messages[0].subscribers, messages[0].attempt] == \
        [event_id, None, 1]


def test_stored_event_types_are_lower_cased(ingress, redis_client):
    event_id, body = sample("stock_update.json")
    assert post(ingress.port, body).status == 202
    assert stored(redis_client, event_id).event_types == ("im::stock_update",)


def test_celery_message_is_a_kombu_json_envelope_for_relay_deliver(ingress, redis_client):
    event_id, body = sample("order_shipped.json")
    assert post(ingress.port, body).status == 202
    message = json.loads(redis_client.lindex(KEYS.queue, 0))
    assert message["headers"]["task"] == "relay.deliver"
    assert message["properties"]["delivery_info"]["routing_key"] == "relay:queue"
    args = json.loads(message["body"])[0]
    assert args[:3] == [event_id, None, 1]
    # The batch token: what the seen marker of each event this batch stored holds.
    assert args[3] == redis_client.get(KEYS.seen(event_id)).decode()


# --- 200 duplicate ------------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_second_send_of_same_event_is_duplicate_without_second_queue_message(
        ingress, redis_client, path):
    event_id, body = sample(path.name)
    assert post(ingress.port, body).status == 202
    again = post(ingress.port, body, "/resellers/v1/webhooks/orderstatusevent")
    assert again.status == 200, again
    assert again.json()["status"] == "duplicate"
    assert len(queued(redis_client)) == 1
    assert stored(redis_client, event_id).body == body


def test_duplicate_is_decided_by_event_id_not_by_bytes(ingress, redis_client):
    event_id, body = sample("order_shipped.json")
    assert post(ingress.port, body).status == 202
    changed = body.replace(b'"orderNumber":"20-RD128"', b'"orderNumber":"20-RD999"')
    assert changed != body
    assert post(ingress.port, changed).status == 200
    assert stored(redis_client, event_id).body == body  # the first copy is kept
    assert len(queued(redis_client)) == 1


def test_duplicate_with_wrong_signature_is_401_not_200(ingress, redis_client):
    _, body = sample("order_shipped.json")
    assert post(ingress.port, body).status == 202
    assert post(ingress.port, body, secret="wrong").status == 401
    assert post(ingress.port, body, secret=None).status == 401


def test_same_event_after_dedupe_window_is_a_duplicate_while_the_hub_still_holds_it(
        tmp_path, redis_server, redis_client):
    # A 202 always means a fan-out follows: past the dedupe window, the event's record (and
    # its delivery record) would otherwise suppress every delivery of the "accepted" resend.
    path = write_config(tmp_path, redis_server.url, dedupe_window="1s", retention="3s")
    event_id, body = sample("order_shipped.json")
    with LiveIngress(load_config(path, {})) as live:
        assert post(live.port, body).status == 202
        assert post(live.port, body).status == 200
        wait_until(lambda: not redis_client.exists(KEYS.seen(event_id)), 5,
                   what="the dedupe marker to expire")
        assert redis_client.exists(KEYS.event(event_id))
        assert post(live.port, body).status == 200  # the record is still held
        redis_client.hset(KEYS.deliveries(event_id), "erp", b"d1")  # a delivery record
        wait_until(lambda: not redis_client.exists(KEYS.event(event_id)), 5,
                   what="the record to expire")
        assert post(live.port, body).status == 200  # the delivery record is still held
        redis_client.delete(KEYS.deliveries(event_id))
        assert post(live.port, body).status == 202  # nothing held any more: a new event
    assert [m.event_id for m in queued(redis_client)] == [event_id, event_id]


def test_concurrent_sends_of_one_event_give_exactly_one_accept(ingress, redis_client):
    _, body = sample("order_shipped.json")
    answers: list[int] = []

    def send() -> None:
        answers.append(post(ingress.port, body).status)

    threads = [threading.Thread(target=send) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [200] * 9 + [202]
    assert len(queued(redis_client)) == 1


def test_many_distinct_events_in_parallel_are_all_stored_and_queued(ingress, redis_client):
    _, body = sample("order_shipped.json")
    ids = [f"BATCH{i:04d}" for i in range(40)]
    answers: dict[str, int] = {}

    def send(event_id: str) -> None:
        answers[event_id] = post(ingress.port, with_id(body, event_id)).status

    threads = [threading.Thread(target=send, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(answers.values()) == {202}
    # Concurrent events share group-committed batches, one fan-out message per batch.
    messages = queued(redis_client)
    named = [i for m in messages for i in ([m.event_id] if isinstance(m.event_id, str)
                                           else m.event_id)]
    assert sorted(named) == ids
    assert len(messages) <= len(ids)
    assert all(stored(redis_client, i).body == with_id(body, i) for i in ids)


# --- 401 ----------------------------------------------------------------------------------


def test_missing_signature_is_401_and_nothing_stored(ingress, redis_client):
    _, body = sample("order_shipped.json")
    answer = post(ingress.port, body, secret=None)
    assert answer.status == 401, answer
    assert "X-Hub-Signature" in answer.json()["error"]
    assert_nothing_stored(redis_client)


@pytest.mark.parametrize("signature", ["", "   "])
def test_empty_signature_is_401(ingress, redis_client, signature):
    _, body = sample("order_shipped.json")
    answer = post(ingress.port, body, secret=None, headers={"X-Hub-Signature": signature})
    assert answer.status == 401, answer
    assert_nothing_stored(redis_client)


def test_wrong_secret_is_401_and_nothing_stored(ingress, redis_client):
    _, body = sample("order_shipped.json")
    answer = post(ingress.port, body, secret="not-the-secret")
    assert answer.status == 401, answer
    assert "error" in answer.json()
    assert_nothing_stored(redis_client)


def test_signature_for_another_event_id_is_401(ingress, redis_client):
    _, body = sample("order_shipped.json")
    other_id, _ = sample("stock_update.json")
    assert post(ingress.port, body, event_id=other_id).status == 401
    assert_nothing_stored(redis_client)


def test_garbage_signature_header_is_401(ingress, redis_client):
    _, body = sample("order_shipped.json")
    answer = post(ingress.port, body, secret=None, headers={"X-Hub-Signature": "x" * 500})
    assert answer.status == 401
    assert_nothing_stored(redis_client)


def test_invalid_envelope_with_bad_signature_is_401_not_400(ingress, redis_client):
    body = b'{"eventId": "E1", "resource": [{"lines": 5}]}'
    answer = post(ingress.port, body, secret="wrong", event_id="E1")
    assert answer.status == 401, answer
    assert "resource" not in answer.json()["error"]  # nothing about the schema leaks


def test_rotation_both_configured_secrets_verify(tmp_path, redis_server, redis_client):
    path = write_config(tmp_path, redis_server.url, secrets=[SECRET, OLD_SECRET])
    with LiveIngress(load_config(path, {})) as live:
        first_id, first = sample("order_shipped.json")
        second_id, second = sample("stock_update.json")
        assert post(live.port, first, secret=SECRET).status == 202
        assert post(live.port, second, secret=OLD_SECRET).status == 202
        assert post(live.port, with_id(first, "ROTATED3"), secret="retired").status == 401
        assert {m.event_id for m in queued(redis_client)} == {first_id, second_id}


def test_shared_vector_signature_is_accepted_as_sent(ingress, redis_client):
    vectors = json.loads((SAMPLES.parent / "signature_vectors.json").read_text())
    vector = next(v for v in vectors["ingram_x_hub_signature"]
                  if v["secret"] == SECRET and v["eventId"] == "AH7ESSIWSIO22Y77DD")
    _, body = sample("stock_update.json")
    answer = post(ingress.port, body, secret=None,
                  headers={"X-Hub-Signature": vector["signature"]})
    assert answer.status == 202, answer


# --- 400 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"not json", b'{"eventId": "E1"', b"", b"\xff\xfe\x00"])
def test_body_that_is_not_json_is_400(ingress, redis_client, body):
    answer = post(ingress.port, body, event_id="E1")
    assert answer.status == 400, answer
    assert "JSON" in answer.json()["error"]
    assert_nothing_stored(redis_client)


def test_envelope_with_lines_not_an_array_is_400_naming_the_json_path(ingress, redis_client):
    doc = json.loads(sample("order_shipped.json")[1])
    doc["resource"][0]["lines"] = {"ingramLineNumber": "001"}
    answer = post(ingress.port, json.dumps(doc).encode())
    assert answer.status == 400, answer
    assert "$.resource[0].lines" in answer.json()["error"]
    assert_nothing_stored(redis_client)


def test_envelope_with_non_numeric_quantity_is_400_naming_the_json_path(ingress, redis_client):
    doc = json.loads(sample("order_invoiced_docs_variant.json")[1])
    doc["resource"][0]["lines"][0]["shippedQuantity"] = "abc"
    answer = post(ingress.port, json.dumps(doc).encode())
    assert answer.status == 400, answer
    assert "$.resource[0].lines[0].shippedQuantity" in answer.json()["error"]
    assert_nothing_stored(redis_client)


def test_envelope_without_event_id_is_400_naming_event_id(ingress, redis_client):
    doc = json.loads(sample("order_shipped.json")[1])
    del doc["eventId"]
    answer = post(ingress.port, json.dumps(doc).encode(), event_id="N01CIB9VVFYKR9J6ZW")
    assert answer.status == 400, answer
    error = answer.json()["error"]
    assert "$" in error and "eventId" in error
    assert_nothing_stored(redis_client)


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null", b"{}"])
def test_json_that_is_not_an_envelope_is_400(ingress, redis_client, body):
    answer = post(ingress.port, body, event_id="E1")
    assert answer.status == 400, answer
    assert answer.json()["error"].startswith("invalid envelope: $")
    assert_nothing_stored(redis_client)


# --- 415, 413 -----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/xml"])
def test_content_type_not_json_is_415(ingress, redis_client, content_type):
    _, body = sample("order_shipped.json")
    answer = post(ingress.port, body, content_type=content_type)
    assert answer.status == 415, answer
    assert "Content-Type" in answer.json()["error"]
    assert_nothing_stored(redis_client)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "application/cloudevents+json", "Application/JSON"])
def test_json_content_types_are_accepted(ingress, redis_client, content_type):
    _, body = sample("order_shipped.json")
    assert post(ingress.port, body, content_type=content_type).status == 202


def padded(body: bytes, size: int) -> bytes:
    """A valid envelope of at least ``size`` bytes (an extra field carries the padding)."""
    doc = json.loads(body)
    doc["padding"] = "x" * size
    return json.dumps(doc).encode()


def test_body_over_limit_with_content_length_is_413(small_ingress, redis_client):
    _, body = sample("order_shipped.json")
    big = padded(body, SMALL_LIMIT)
    answer = post(small_ingress.port, big)
    assert answer.status == 413, answer
    assert str(SMALL_LIMIT) in answer.json()["error"]
    assert_nothing_stored(redis_client)


def test_body_over_limit_sent_chunked_is_413(small_ingress, redis_client):
    event_id, body = sample("order_shipped.json")
    big = padded(body, SMALL_LIMIT)
    chunks = [big[i:i + 512] for i in range(0, len(big), 512)]
    answer = request(small_ingress.port, "POST", "/webhooks/ingram", iter(chunks),
                     {"Content-Type": "application/json",
                      "X-Hub-Signature": sign_ingram(SECRET, event_id)}, chunked=True)
    assert answer.status == 413, answer
    assert_nothing_stored(redis_client)


def test_body_under_limit_sent_chunked_is_accepted(small_ingress, redis_client):
    event_id, body = sample("order_shipped.json")
    assert len(body) < SMALL_LIMIT
    chunks = [body[i:i + 100] for i in range(0, len(body), 100)]
    answer = request(small_ingress.port, "POST", "/webhooks/ingram", iter(chunks),
                     {"Content-Type": "application/json",
                      "X-Hub-Signature": sign_ingram(SECRET, event_id)}, chunked=True)
    assert answer.status == 202, answer
    assert stored(redis_client, event_id).body == body


def test_body_exactly_at_limit_is_not_413(small_ingress, redis_client):
    event_id, body = sample("order_shipped.json")
    exact = padded(body, 0)
    exact = padded(body, SMALL_LIMIT - len(exact))
    assert len(exact) == SMALL_LIMIT
    assert post(small_ingress.port, exact).status == 202
    assert stored(redis_client, event_id).body == exact


def test_gzip_bomb_is_413_after_decompression(ingress, redis_client):
    event_id, body = sample("order_shipped.json")
    bomb = gzip.compress(padded(body, 20 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < ingress.config.ingress.max_body_bytes
    answer = post(ingress.port, bomb, event_id=event_id, headers={"Content-Encoding": "gzip"})
    assert answer.status == 413, answer
    assert_nothing_stored(redis_client)


def test_body_that_does_not_arrive_within_read_timeout_is_408(tmp_path, redis_server,
                                                              redis_client):
    path = write_config(tmp_path, redis_server.url, read_timeout="500ms")
    event_id, body = sample("order_shipped.json")
    with LiveIngress(load_config(path, {})) as live, \
            socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        head = (f"POST /webhooks/ingram HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"X-Hub-Signature: {sign_ingram(SECRET, event_id)}\r\n\r\n")
        sock.sendall(head.encode() + body[:20])  # and then nothing more
        started = time.monotonic()
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert time.monotonic() - started < 5
    assert_nothing_stored(redis_client)


# --- targeturl is ignored -----------------------------------------------------------------


def test_targeturl_header_and_query_are_ignored(ingress, redis_client):
    event_id, body = sample("order_shipped.json")
    answer = post(ingress.port, body,
                  "/webhooks/ingram?targeturl=http%3A%2F%2Fevil.example%2Fsteal",
                  headers={"targeturl": "http://evil.example/steal"})
    assert answer.status == 202, answer
    assert answer.json() == {"eventId": event_id, "status": "accepted"}
    assert stored(redis_client, event_id).body == body
    assert [(m.event_id, m.subscribers, m.attempt) for m in queued(redis_client)] == \
        [(event_id, None, 1)]
    minute = KEYS.stats(int(time.time() // 60))
    assert set(redis_client.keys("*")) - {minute.encode(), KEYS.stats(int(
        time.time() // 60) - 1).encode()} == {k.encode() for k in (
            KEYS.seen(event_id), KEYS.event(event_id), KEYS.queue, KEYS.unclaimed, KEYS.events,
            KEYS.order("20-RD128"), KEYS.totals)}
    assert b"evil.example" not in b"".join(redis_client.lrange(KEYS.queue, 0, -1))


# --- health, readiness, Redis down and back -----------------------------------------------


def test_healthz_is_200(ingress):
    answer = request(ingress.port, "GET", "/healthz")
    assert answer.status == 200
    assert answer.json()["status"] == "ok"


def test_unknown_route_is_404_and_get_on_webhook_route_is_405(ingress):
    assert request(ingress.port, "GET", "/nope").status == 404
    assert request(ingress.port, "GET", "/webhooks/ingram").status == 405


@pytest.mark.fault
def test_redis_down_gives_503_with_retry_after_then_recovers_without_restart(
        ingress, redis_server, redis_client):
    first_id, first = sample("order_shipped.json")
    second_id, second = sample("stock_update.json")
    assert request(ingress.port, "GET", "/readyz").status == 200
    assert post(ingress.port, first).status == 202

    redis_server.kill()
    try:
        started = time.monotonic()
        # /readyz reuses one probe's answer for a second (a flood of probes costs one write)
        wait_until(lambda: request(ingress.port, "GET", "/readyz").status == 503, 3,
                   what="/readyz 503")
        answer = post(ingress.port, second)
        assert answer.status == 503, answer
        assert int(answer.headers["Retry-After"]) > 0
        assert "error" in answer.json()
        assert time.monotonic() - started < 10, "503 must come promptly, not after a hang"
        assert request(ingress.port, "GET", "/healthz").status == 200  # the process is alive
    finally:
        redis_server.start()

    client = redis_server.client()
    # the event answered 503 was not stored; the one answered 202 survived the SIGKILL
    assert client.get(KEYS.event(second_id)) is None
    assert client.get(KEYS.seen(second_id)) is None
    assert stored(client, first_id).body == first
    assert [m.event_id for m in queued(client)] == [first_id]

    wait_until(lambda: request(ingress.port, "GET", "/readyz").status == 200, 15,
               what="/readyz to recover")
    answer = post(ingress.port, second)
    assert answer.status == 202, answer  # not "duplicate": nothing was kept from the 503
    assert post(ingress.port, first).status == 200
    assert stored(client, second_id).body == second
    assert [m.event_id for m in queued(client)] == [second_id, first_id]
    assert ("relay_ingress_rejected_total", (("reason", "unavailable"),)) in metrics(ingress.port)
    client.close()


@pytest.mark.fault
def test_redis_stopped_gracefully_also_gives_503_and_recovers(ingress, redis_server,
                                                              redis_client):
    event_id, body = sample("quote_create.json")
    redis_server.stop()
    try:
        assert request(ingress.port, "GET", "/readyz").status == 503
        answer = post(ingress.port, body)
        assert answer.status == 503 and "Retry-After" in answer.headers
    finally:
        redis_server.start()
    wait_until(lambda: request(ingress.port, "GET", "/readyz").status == 200, 15,
               what="/readyz to recover")
    assert post(ingress.port, body).status == 202
    client = redis_server.client()
    assert stored(client, event_id).body == body
    client.close()


@pytest.mark.fault
def test_redis_refusing_writes_when_full_gives_503_and_stores_nothing(ingress, redis_server,
                                                                      redis_client):
    event_id, body = sample("stock_update.json")
    redis_client.config_set("maxmemory", "1")  # every write is refused with OOM
    try:
        answer = post(ingress.port, body)
        assert answer.status == 503, answer
        assert "Retry-After" in answer.headers
    finally:
        redis_client.config_set("maxmemory", "0")
    assert_nothing_stored(redis_client)
    assert post(ingress.port, body).status == 202
    assert stored(redis_client, event_id).body == body


@pytest.mark.fault
def test_hung_redis_gives_503_within_the_client_timeout_not_a_hang(ingress, redis_server,
                                                                   redis_client):
    event_id, body = sample("quote_create.json")
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = post(ingress.port, body)
        elapsed = time.monotonic() - started
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert answer.status == 503, answer
    assert "Retry-After" in answer.headers
    assert elapsed < 8
    # the write may have landed once Redis resumed: a retry is then a duplicate, never lost
    wait_until(lambda: request(ingress.port, "GET", "/readyz").status == 200, 15,
               what="/readyz to recover")
    retry = post(ingress.port, body)
    assert retry.status in (200, 202), retry
    assert stored(redis_client, event_id).body == body
    assert [m.event_id for m in queued(redis_client)] == [event_id]


# --- metrics ------------------------------------------------------------------------------


def test_metrics_count_accepted_duplicates_rejections_and_latency(ingress, redis_client):
    _, body = sample("order_shipped.json")
    _, other = sample("stock_update.json")
    assert post(ingress.port, body).status == 202
    assert post(ingress.port, other).status == 202
    assert post(ingress.port, body).status == 200
    assert post(ingress.port, body, secret="wrong").status == 401
    assert post(ingress.port, b"nope", event_id="x").status == 400
    assert post(ingress.port, body, content_type="text/plain").status == 415

    values = metrics(ingress.port)
    assert values[("relay_ingress_accepted_total", ())] == 2
    assert values[("relay_ingress_duplicates_total", ())] == 1
    assert values[("relay_ingress_rejected_total", (("reason", "signature"),))] == 1
    assert values[("relay_ingress_rejected_total", (("reason", "invalid"),))] == 1
    assert values[("relay_ingress_rejected_total", (("reason", "media_type"),))] == 1
    assert values[("relay_ingress_request_seconds_count", ())] == 6
    assert values[("relay_ingress_request_seconds_bucket", (("le", "+Inf"),))] == 6
    assert values[("relay_ingress_request_seconds_sum", ())] > 0


def test_metrics_is_prometheus_text_format(ingress):
    answer = request(ingress.port, "GET", "/metrics")
    assert answer.status == 200
    content_type = answer.headers["Content-Type"]
    assert content_type.startswith("text/plain;") and "version=" in content_type
    text = answer.raw.decode()
    for line in ("# TYPE relay_ingress_accepted_total counter",
                 "# TYPE relay_ingress_duplicates_total counter",
                 "# TYPE relay_ingress_rejected_total counter",
                 "# TYPE relay_ingress_request_seconds histogram"):
        assert line in text.splitlines()


# --- end to end: `relay ingress` as a subprocess ------------------------------------------


def test_relay_ingress_subprocess_accepts_dedupes_and_stops_on_sigterm(
        tmp_path, redis_server, redis_client):
    path = write_config(tmp_path, redis_server.url)
    port = free_port()
    log = tmp_path / "ingress.log"
    with process(relay_cmd("--config", str(path), "ingress", "--host", "127.0.0.1",
                           "--port", str(port)), log_path=log) as proc:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        assert request(port, "GET", "/readyz").status == 200
        event_id, body = sample("order_voided_spec_variant.json")
        answer = post(port, body, "/resellers/v1/webhooks/orderstatusevent")
        assert answer.status == 202, answer
        assert post(port, body).status == 200
        assert post(port, body, secret="wrong").status == 401
        assert stored(redis_client, event_id).body == body
        assert [(m.event_id, m.subscribers, m.attempt) for m in queued(redis_client)] == \
            [(event_id, None, 1)]
        proc.terminate()
        assert proc.wait(20) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    accepted = [e for e in lines if e.get("msg") == "accepted"]
    assert accepted and accepted[0]["eventId"] == event_id
    text = log.read_text()
    assert SECRET not in text and sign_ingram(SECRET, event_id) not in text
    with pytest.raises(OSError):  # it stopped listening
        request(port, "GET", "/healthz")


# --- issue 19: hostile event ids, readiness after a failed store, Ingram's big events ------


def test_an_event_id_ending_in_a_newline_is_400_naming_event_id(ingress, redis_client):
    """msgspec applies a ``pattern`` with ``re.search``: ``^...$`` let ``abc\\n`` through (202,
    then every ``standard`` delivery failed on the header ``webhook-id``)."""
    _, body = sample("order_shipped.json")
    for event_id in ("abc\n", "abc\r\n", "\nabc"):
        answer = post(ingress.port, with_id(body, json.dumps(event_id)[1:-1]), event_id=event_id)
        assert answer.status == 400, (event_id, answer)
        assert answer.json()["error"].startswith("invalid envelope: $.eventId:"), answer
    assert_nothing_stored(redis_client)


def test_readyz_is_503_right_after_a_store_failed(ingress, redis_client):
    """The ingress just answered 503 for an event: a load balancer asking now must not be
    told "ready" from the 1 s cache."""
    _, body = sample("order_shipped.json")
    assert request(ingress.port, "GET", "/readyz").status == 200  # cached for a second
    redis_client.config_set("maxmemory", "1")  # every write is refused (OOM)
    try:
        assert post(ingress.port, with_id(body, "READY1")).status == 503
        answer = request(ingress.port, "GET", "/readyz")
    finally:
        redis_client.config_set("maxmemory", "0")
    assert answer.status == 503, answer
    assert "Retry-After" in answer.headers and answer.json()["error"]


def test_readyz_is_200_right_after_an_event_was_stored(ingress, redis_client):
    """Redis refused writes (the probe's "not ready" is cached for a second), then takes
    them again: the first event stored makes /readyz answer 200 at once."""
    _, body = sample("order_shipped.json")
    redis_client.config_set("maxmemory", "1")
    try:
        # The first 503 seen is the probe's fresh answer (polled every 20 ms).
        wait_until(lambda: request(ingress.port, "GET", "/readyz").status == 503, 5,
                   what="/readyz 503")
    finally:
        redis_client.config_set("maxmemory", "0")
    assert post(ingress.port, with_id(body, "READY2")).status == 202
    answer = request(ingress.port, "GET", "/readyz")
    assert answer.status == 200, answer


def test_a_4000_sku_stock_update_is_accepted_by_default_and_delivered_byte_exact(
        tmp_path, redis_server, redis_client):
    """Ingram splits stock updates at 4,000 SKUs: ~1.7 MB indented. The default
    ``ingress.max_body_bytes`` (4 MiB) admits it; the subscriber gets the exact bytes."""
    from bench.events import stock_update
    from tests.hub import Sink, worker
    from tests.hub import ingress as run_ingress
    from tests.hub import post as signed_post
    from tests.hub import write_config as hub_config

    body = stock_update("STOCK4000SKUS", skus=4000)
    assert 1_600_000 < len(body) < 4 * 1024 * 1024
    sink = Sink().start()
    try:
        path = hub_config(tmp_path / "relay.yaml", redis_server.url, [
            {"name": "erp", "url": sink.url("/erp"), "secret": "s"}])
        with worker(path, tmp_path / "worker.log"), \
                run_ingress(path, tmp_path / "ingress.log") as url:
            status, answer = signed_post(url, body)
            assert (status, answer) == (202, {"eventId": "STOCK4000SKUS", "status": "accepted"})
            (got,) = sink.wait_for("/erp", 1, timeout=60)
        assert got.body == body
    finally:
        sink.stop()
