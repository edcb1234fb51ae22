"""What each attempt keeps (docs/contract.md, "Seeing why it fails"): the request as sent with
its credentials masked, the response's status, headers and first 4 KiB, and what set the
attempt off (auto, resend, replay, probe). A real ``relay worker`` on the private Redis posts
to recording sinks; the records are read back from Redis and through the admin API.
"""

from __future__ import annotations

import base64
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from relay.config import load_config
from relay.keys import Keys
from relay.models import ANSWER_BODY_BYTES, Attempt
from relay.queue import deliver_message, read_deliver_message
from tests.hub import (
    STANDARD_SECRET,
    LiveAdmin,
    Reply,
    Sink,
    call,
    enqueue_event,
    order_event,
    worker,
    write_config,
)
from tests.support import RedisServer, wait_until

PREFIX = "attempts:"
FAST = {"initial": "50ms", "max": "100ms"}
#: The erp subscriber's credentials: none of them may reach a stored record.
ERP_SECRET = "erp-Secret-Zq8f3kP1xV7mN2"
ERP_TOKEN = "erp-bearer-token-9a8b7c6d"
URL_PASSWORD = "url-pass-Wq2e3r4t"
QUERY_TOKEN = "query-token-Lk5j6h7g"
#: A 200 KB error page: only its first 4 KiB is read and kept.
BIG_PAGE = b"<html><body><h1>Internal Server Error</h1>\n" + b"x" * 200_000 + b"</body></html>"


def subscribers(sink: Sink) -> list[dict[str, Any]]:
    def sub(name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "url": sink.url(f"/{name}"), "secret": f"{name}-secret-long",
                "event_types": [f"t::{name}"], **extra}

    return [
        {**sub("erp", max_attempts=2),
         "url": (f"http://ops:{URL_PASSWORD}@127.0.0.1:{sink.port}/erp"
                 f"?token={QUERY_TOKEN}&tenant=acme"),
         "secret": ERP_SECRET,
         # (Not Authorization: aiohttp refuses it beside credentials in the URL.)
         "headers": {"X-Api-Key": ERP_TOKEN, "X-Tenant": "acme-tenant-1"}},
        sub("wh", signature="both", secret=STANDARD_SECRET),
        sub("slow", timeout="300ms", max_attempts=1),
        sub("gz", max_attempts=1),
        sub("again", max_attempts=2),
        {**sub("echo", max_attempts=1), "secret": "echo-secret-abcdefgh",
         "headers": {"X-Api-Key": "echo-key-1234567890"}},
        sub("cb", max_attempts=20, circuit_breaker={"failures": 2, "cool_down": "300ms",
                                                    "max_cool_down": "300ms"}),
    ]


class Hub:
    def __init__(self, redis_server: RedisServer, tmp: Path) -> None:
        self.sink = Sink().start()
        self.sink.behave("/erp", lambda n: Reply(500, {"X-Request-Id": f"r-{n}",
                                                       "Content-Type": "text/html"}, body=BIG_PAGE))
        self.sink.behave("/wh", lambda n: Reply(200, {"X-Seen": "yes"}, body=b"thanks"))
        self.sink.behave("/slow", lambda n: Reply(200, delay=1.0))
        self.sink.behave("/gz", lambda n: Reply(
            503, {"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"},
            body=gzip.compress(("maintenance window é\n" * 3000).encode())))
        self.sink.behave("/again", lambda n: Reply(500, body=b"still down"))
        # A debugging endpoint that echoes what it got, credentials and all.
        self.sink.behave("/echo", lambda n: Reply(
            400, {"X-Echo": "key echo-key-1234567890"},
            body=b"bad request; you sent X-Api-Key: echo-key-1234567890, signed with "
                 b"echo-secret-abcdefgh (ZWNoby1zZWNyZXQtYWJjZGVmZ2g=)"))
        self.sink.behave("/cb", lambda n: Reply(500 if n <= 2 else 200, body=b"cb says no"))
        self.path = write_config(tmp / "relay.yaml", redis_server.url, subscribers(self.sink),
                                 delivery={"timeout": "2s", "max_attempts": 3, "backoff": FAST},
                                 redis={"prefix": PREFIX})
        self.config = load_config(self.path)
        self.keys = Keys.of(self.config)
        self.redis = redis_server.client()
        self.tmp = tmp

    def send(self, event_id: str, sub: str) -> str:
        return enqueue_event(self.redis, order_event(event_id, f"t::{sub}"), PREFIX)

    def state(self, event_id: str, sub: str) -> str:
        value = self.redis.hget(self.keys.deliveries(event_id), sub)
        return value[:1].decode() if value else ""

    def wait_state(self, event_id: str, sub: str, want: str, timeout: float = 15) -> None:
        wait_until(lambda: self.state(event_id, sub) == want, timeout, 0.03,
                   what=f"{event_id} -> {sub}: {want}")

    def raw_log(self, event_id: str, sub: str) -> list[bytes]:
        return list(reversed(self.redis.lrange(self.keys.log(event_id, sub), 0, -1)))

    def log(self, event_id: str, sub: str) -> list[Attempt]:
        return [msgspec.msgpack.decode(r, type=Attempt) for r in self.raw_log(event_id, sub)]


@pytest.fixture(scope="module")
def hub(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(redis_server, tmp_path_factory.mktemp("attempts"))
    try:
        with worker(h.path, h.tmp / "worker.log"), LiveAdmin(h.config) as admin:
            h.admin_url = admin.url  # type: ignore[attr-defined]
            yield h
    finally:
        h.sink.stop()
        h.redis.close()


def lower(headers: Any) -> dict[str, str]:
    """Header names as HTTP has them: case-insensitive."""
    return {name.lower(): value for name, value in headers}


def api(hub: Hub, method: str, path: str, body: Any = None) -> Any:
    status, _, data = call(hub.admin_url + path, method, body)  # type: ignore[attr-defined]
    assert status == 200, (path, status, data)
    return data


def test_a_failed_attempt_keeps_the_request_sent_and_the_first_4_kib_of_the_answer(
        hub: Hub) -> None:
    hub.send("EV-AT-ERP", "erp")
    hub.wait_state("EV-AT-ERP", "erp", "x")
    first, second = hub.log("EV-AT-ERP", "erp")
    assert (first.attempt, first.status, first.trigger) == (1, 500, "auto")
    assert (second.attempt, second.trigger) == (2, "auto")

    request = first.request
    assert request is not None
    assert request.url == (f"http://ops:***@127.0.0.1:{hub.sink.port}/erp"
                           "?token=***&tenant=***")
    sent = dict(request.headers)
    received = hub.sink.on("/erp")[0].headers
    # As sent: the hub's own headers and the signature, values and all...
    assert sent["Content-Type"] == "application/json"
    assert sent["X-Hub-Signature"] == received["X-Hub-Signature"]
    assert sent["User-Agent"] == received["User-Agent"]
    # ...but configured headers are masked, credentials or not.
    assert sent["X-Api-Key"] == "***" and sent["X-Tenant"] == "***"

    response = first.response
    assert response is not None
    assert response.status == 500
    assert lower(response.headers)["x-request-id"] == "r-1"
    assert response.truncated is True
    assert response.body == BIG_PAGE[:ANSWER_BODY_BYTES].decode()
    # Bounded: a 200 KB page costs about 4 KiB per attempt in Redis, not 200 KB.
    assert all(len(raw) < ANSWER_BODY_BYTES + 1500 for raw in hub.raw_log("EV-AT-ERP", "erp"))

    # The admin API shows the same, camelCase, with `trigger`.
    lane = next(d for d in api(hub, "GET", "/api/events/EV-AT-ERP")["deliveries"]
                if d["subscriber"] == "erp")
    shown = lane["attempts"][0]
    assert shown["trigger"] == "auto"
    assert shown["request"]["url"] == request.url
    assert shown["request"]["headers"]["X-Api-Key"] == "***"
    assert shown["response"]["status"] == 500
    assert lower(shown["response"]["headers"].items())["x-request-id"] == "r-1"
    assert shown["response"]["body"].startswith("<html><body><h1>Internal Server Error</h1>")
    assert shown["response"]["truncated"] is True


def test_neither_a_secret_nor_its_base64_is_stored_in_the_attempt_log(hub: Hub) -> None:
    hub.send("EV-AT-SECRET", "erp")
    hub.wait_state("EV-AT-SECRET", "erp", "x")
    stored = b"".join(hub.raw_log("EV-AT-SECRET", "erp"))
    assert len(hub.raw_log("EV-AT-SECRET", "erp")) == 2
    secrets = [ERP_SECRET, ERP_TOKEN, URL_PASSWORD, QUERY_TOKEN, "acme-tenant-1"]
    for secret in secrets:
        raw = secret.encode()
        for form in (raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw),
                     base64.b64encode(raw).rstrip(b"=")):
            assert form not in stored, (secret, form)
    # The API's answer neither.
    text = msgspec.json.encode(api(hub, "GET", "/api/events/EV-AT-SECRET"))
    for secret in secrets:
        assert secret.encode() not in text
        assert base64.b64encode(secret.encode()) not in text


def test_an_answer_echoing_credentials_is_kept_without_them(hub: Hub) -> None:
    hub.send("EV-AT-ECHO", "echo")
    hub.wait_state("EV-AT-ECHO", "echo", "x")
    (attempt,) = hub.log("EV-AT-ECHO", "echo")
    assert attempt.response is not None
    assert attempt.response.body == "bad request; you sent X-Api-Key: ***, signed with *** (***)"
    assert lower(attempt.response.headers)["x-echo"] == "key ***"
    stored = b"".join(hub.raw_log("EV-AT-ECHO", "echo"))
    for secret in (b"echo-key-1234567890", b"echo-secret-abcdefgh"):
        assert secret not in stored and base64.b64encode(secret) not in stored


def test_a_2xx_keeps_status_and_headers_and_standard_signatures_as_sent(hub: Hub) -> None:
    hub.send("EV-AT-WH", "wh")
    hub.wait_state("EV-AT-WH", "wh", "d")
    (attempt,) = hub.log("EV-AT-WH", "wh")
    assert attempt.request is not None and attempt.response is not None
    sent, received = dict(attempt.request.headers), hub.sink.on("/wh")[0].headers
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature", "X-Hub-Signature"):
        assert sent[name] == received[name], name
    assert attempt.response.status == 200
    assert lower(attempt.response.headers)["x-seen"] == "yes"
    # A success keeps no body (docs/benchmarks.md, "What an attempt keeps").
    assert attempt.response.body is None and attempt.response.truncated is False
    whsec = STANDARD_SECRET.removeprefix("whsec_").encode()
    assert whsec not in b"".join(hub.raw_log("EV-AT-WH", "wh"))


def test_no_answer_keeps_the_request_a_null_response_and_the_error(hub: Hub) -> None:
    hub.send("EV-AT-SLOW", "slow")
    hub.wait_state("EV-AT-SLOW", "slow", "x")
    (attempt,) = hub.log("EV-AT-SLOW", "slow")
    assert attempt.status is None and attempt.error == "timeout"
    assert attempt.response is None
    assert attempt.request is not None and attempt.request.url.endswith("/slow")
    shown = api(hub, "GET", "/api/events/EV-AT-SLOW")["deliveries"][0]["attempts"][0]
    assert shown["response"] is None and shown["error"] == "timeout"


def test_a_gzipped_error_page_is_kept_as_text(hub: Hub) -> None:
    hub.send("EV-AT-GZ", "gz")
    hub.wait_state("EV-AT-GZ", "gz", "x")
    (attempt,) = hub.log("EV-AT-GZ", "gz")
    assert attempt.response is not None
    body = attempt.response.body
    assert body is not None and body.startswith("maintenance window é\n")
    assert len(body.encode()) <= ANSWER_BODY_BYTES and attempt.response.truncated


def test_a_resend_and_a_replay_start_new_runs_marked_with_their_trigger(hub: Hub) -> None:
    hub.send("EV-AT-AGAIN", "again")
    hub.wait_state("EV-AT-AGAIN", "again", "x")
    api(hub, "POST", "/api/events/EV-AT-AGAIN/resend", {"subscriber": "again"})
    wait_until(lambda: len(hub.log("EV-AT-AGAIN", "again")) == 4
               and hub.state("EV-AT-AGAIN", "again") == "x", 15, what="the resend's two attempts")
    api(hub, "POST", "/api/replay", {"subscriber": "again", "event": "EV-AT-AGAIN"})
    wait_until(lambda: len(hub.log("EV-AT-AGAIN", "again")) == 6
               and hub.state("EV-AT-AGAIN", "again") == "x", 15, what="the replay's two attempts")
    runs = [(a.attempt, a.trigger) for a in hub.log("EV-AT-AGAIN", "again")]
    assert runs == [(1, "auto"), (2, "auto"), (1, "resend"), (2, "auto"), (1, "replay"),
                    (2, "auto")]
    shown = api(hub, "GET", "/api/events/EV-AT-AGAIN")["deliveries"][0]["attempts"]
    assert [a["trigger"] for a in shown] == ["auto", "auto", "resend", "auto", "replay", "auto"]
    assert shown[2]["response"]["body"] == "still down"


def test_the_breakers_probe_is_marked_probe(hub: Hub) -> None:
    hub.send("EV-AT-CB", "cb")
    hub.wait_state("EV-AT-CB", "cb", "d", timeout=30)
    log = hub.log("EV-AT-CB", "cb")
    assert [a.trigger for a in log][:2] == ["auto", "auto"]
    assert log[-1].trigger == "probe" and log[-1].probe and log[-1].status == 200


def test_a_trigger_rides_the_message_and_other_messages_keep_their_bytes() -> None:
    plain = deliver_message("q", "EV1", ["erp"], 2)
    batch = deliver_message("q", ["EV1", "EV2"], None, 1, "tok")
    resend = deliver_message("q", "EV1", ["erp"], 1, trigger="resend")
    assert msgspec.json.decode(msgspec.json.decode(plain)["body"])[0] == ["EV1", ["erp"], 2]
    assert msgspec.json.decode(msgspec.json.decode(batch)["body"])[0] \
        == [["EV1", "EV2"], None, 1, "tok"]
    assert msgspec.json.decode(msgspec.json.decode(resend)["body"])[0] \
        == ["EV1", ["erp"], 1, None, "resend"]
    assert read_deliver_message(resend).trigger == "resend"
    assert read_deliver_message(plain).trigger is None
    assert resend == deliver_message("q", "EV1", ["erp"], 1, trigger="resend")


def test_attempt_records_written_before_the_new_fields_still_decode() -> None:
    old = msgspec.msgpack.encode([1700000000.5, 3, 503, None, 12.5, False])
    attempt = msgspec.msgpack.decode(old, type=Attempt)
    assert (attempt.attempt, attempt.status, attempt.trigger, attempt.request,
            attempt.response) == (3, 503, None, None, None)
    assert attempt.cause == "auto"
    probe = msgspec.msgpack.decode(msgspec.msgpack.encode([1.0, 3, None, "timeout", 1.0, True]),
                                   type=Attempt)
    assert probe.cause == "probe"
