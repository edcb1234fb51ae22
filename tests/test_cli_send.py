"""`relay send` (a subprocess) against `relay ingress` (a subprocess) on the private Redis."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from relay.keys import Keys
from relay.models import StoredEvent
from relay.queue import read_deliver_message
from tests.support import ROOT, SAMPLES, free_port, process, relay_cmd, wait_http

SECRET = "s3cret: with #odd] chars"
KEYS = Keys()


class Ingress:
    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.url = f"http://127.0.0.1:{port}/webhooks/ingram"


@pytest.fixture(scope="module")
def ingress(tmp_path_factory, redis_server) -> Iterator[Ingress]:
    tmp = tmp_path_factory.mktemp("send")
    port = free_port()
    config = tmp / "relay.yaml"
    config.write_text(
        f"redis:\n  url: {redis_server.url}\n"
        "ingress:\n  secrets: [${SEND_TEST_SECRET}]\n"
        f"  host: 127.0.0.1\n  port: {port}\n", encoding="utf-8")
    env = {"SEND_TEST_SECRET": SECRET}
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    with process(relay_cmd("--config", str(config), "ingress"), env=env,
                 log_path=tmp / "ingress.log"):
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield Ingress(config, port)


def relay_send(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(relay_cmd("send", *args), env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def answer_of(result: subprocess.CompletedProcess[str]) -> tuple[int, dict[str, object]]:
    status, _, body = result.stdout.strip().partition(" ")
    return int(status), json.loads(body)


def test_send_prints_202_first_then_200_duplicate(ingress, redis_client):
    path = SAMPLES / "order_shipped.json"
    event_id = json.loads(path.read_bytes())["eventId"]

    first = relay_send(str(path), "--url", ingress.url, "--secret", SECRET)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("202 ")
    assert answer_of(first) == (202, {"eventId": event_id, "status": "accepted"})

    second = relay_send(str(path), "--url", ingress.url, "--secret", SECRET)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("200 ")
    assert answer_of(second)[1]["status"] == "duplicate"

    record = msgspec.msgpack.decode(redis_client.get(KEYS.event(event_id)), type=StoredEvent)
    assert record.body == path.read_bytes().rstrip(b"\n")  # the file, minus its last newline
    messages = [read_deliver_message(m) for m in redis_client.lrange(KEYS.queue, 0, -1)]
    assert [(m.event_id, m.subscribers, m.attempt) for m in messages] == [(event_id, None, 1)]


@pytest.mark.parametrize("route", ["/resellers/v1/webhooks/orderstatusevent",
                                   "/resellers/v1/webhooks/availabilityupdate"])
def test_send_to_sdk_routes_is_accepted(ingress, redis_client, route):
    path = SAMPLES / "stock_update.json"
    result = relay_send(str(path), "--url", f"http://127.0.0.1:{ingress.port}{route}",
                        "--secret", SECRET)
    assert result.returncode == 0, result.stderr
    assert answer_of(result)[0] == 202


def test_send_with_wrong_secret_prints_401_and_exits_1(ingress, redis_client):
    result = relay_send(str(SAMPLES / "quote_create.json"), "--url", ingress.url,
                        "--secret", "not-the-secret")
    assert result.returncode == 1
    status, body = answer_of(result)
    assert status == 401 and "error" in body
    assert redis_client.keys("*") == []


def test_send_defaults_url_and_secret_from_config(ingress, redis_client):
    result = relay_send("--config", str(ingress.config), str(SAMPLES / "quote_create.json"),
                        env={"SEND_TEST_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    assert answer_of(result)[0] == 202


def test_send_file_without_event_id_exits_2_naming_the_file(ingress, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"topic": "resellers/orders"}\n')
    result = relay_send(str(bad), "--url", ingress.url, "--secret", SECRET)
    assert result.returncode == 2
    assert "bad.json" in result.stderr and "eventId" in result.stderr


def test_send_to_unreachable_url_exits_1(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/webhooks/ingram"
    result = relay_send(str(SAMPLES / "order_shipped.json"), "--url", url, "--secret", SECRET)
    assert result.returncode == 1
    assert "could not post" in result.stderr


def test_send_help_documents_url_and_secret():
    result = relay_send("--help")
    assert result.returncode == 0
    assert "--url" in result.stdout and "--secret" in result.stdout
