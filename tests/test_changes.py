"""Changing the hub without losing work: SIGHUP reload, removed and renamed subscribers,
expired records, poisoned events, several hubs on one Redis, the Redis preflight."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
import redis
import yaml

from relay.keys import Keys
from relay.models import StoredEvent
from relay.queue import deliver_message
from tests.hub import (
    Reply,
    Sink,
    attempt_log,
    dead_letters,
    enqueue_event,
    event_body,
    ingress,
    ingress_port,
    post,
    worker,
    write_config,
)
from tests.support import free_port, process, relay_cmd, wait_http, wait_until

KEYS = Keys()


def relay(config: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(relay_cmd("--config", str(config), *args), capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


def edit(config: Path, change) -> None:  # noqa: ANN001 - a function of the YAML document
    doc = yaml.safe_load(config.read_text())
    change(doc)
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def lines(log: Path) -> list[dict]:
    return [msgspec.json.decode(line) for line in log.read_text().splitlines() if line.strip()]


# -- reload -------------------------------------------------------------------------------


def test_sighup_applies_a_new_subscriber_and_secret_in_worker_and_ingress_within_5s(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "s"}])
    wlog, ilog = tmp_path / "worker.log", tmp_path / "ingress.log"
    port = ingress_port(config)
    url = f"http://127.0.0.1:{port}/webhooks/ingram"
    with worker(config, wlog) as wproc, \
            process(relay_cmd("--config", str(config), "ingress"), log_path=ilog) as iproc:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        assert post(url, event_body("EVBEFORE"))[0] == 202
        sink.wait_for("/erp", 1)

        edit(config, lambda d: (
            d["subscribers"].append({"name": "wms", "url": sink.url("/wms"), "secret": "t"}),
            d["ingress"]["secrets"].append("rotated-secret"),
            d["ingress"].update(port=free_port())))  # a key that needs a restart
        reloaded = time.monotonic()
        os.killpg(wproc.pid, signal.SIGHUP)  # the whole group: pool children must survive it
        os.kill(iproc.pid, signal.SIGHUP)
        wait_until(lambda: any("config reloaded" in e["msg"] for e in lines(wlog))
                   and any("config reloaded" in e["msg"] for e in lines(ilog)), 5,
                   what="worker and ingress reloaded")
        # The ingress takes the rotated secret now (still on its old port); the new
        # subscriber receives the next event.
        assert post(url, event_body("EVAFTER"), secret="rotated-secret")[0] == 202
        sink.wait_for("/wms", 1, timeout=5)
        assert time.monotonic() - reloaded < 5
        sink.wait_for("/erp", 2)
        assert any(e["msg"].startswith("restart required") and e["keys"] == ["ingress.port"]
                   for e in lines(ilog))

        # A bad file is refused, logged at error with check-config's message; all keeps going.
        config.write_text(config.read_text().replace("max_attempts", "max_attemps"))
        os.kill(wproc.pid, signal.SIGHUP)
        os.kill(iproc.pid, signal.SIGHUP)
        check = relay(config, "check-config")
        assert check.returncode == 2
        for log in (ilog, wlog):
            wait_until(lambda log=log: any(e["level"] == "error" and "reload refused" in e["msg"]
                                           for e in lines(log)), 5, what=f"{log.name} refused")
        refused = next(e for e in lines(ilog) if "reload refused" in e["msg"])
        assert refused["error"] in check.stderr
        assert post(url, event_body("EVSTILL"), secret="rotated-secret")[0] == 202
        sink.wait_for("/wms", 2, timeout=5)
        assert wproc.poll() is None and iproc.poll() is None


# -- removed and renamed subscribers -----------------------------------------------------


def test_renamed_subscriber_pending_retries_are_dead_lettered_not_dropped(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    sink.behave("/erp", lambda n: Reply(500))
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "s"}],
        delivery={"timeout": "1s", "max_attempts": 5,
                  "backoff": {"initial": "3s", "max": "3s"}})
    with worker(config, tmp_path / "w1.log"):
        enqueue_event(redis_client, event_body("EVRENAME"))
        wait_until(lambda: attempt_log(redis_client, "EVRENAME", "erp"), 10, what="attempt 1")
    edit(config, lambda d: d["subscribers"][0].update(name="erp-v2"))
    with worker(config, tmp_path / "w2.log"):
        wait_until(lambda: ("EVRENAME", "erp") in dead_letters(redis_client), 35,
                   what="the renamed subscriber's retry dead-lettered")
    letter = dead_letters(redis_client)[("EVRENAME", "erp")]
    assert letter.reason == "subscriber removed"
    assert letter.event.event_id == "EVRENAME"  # kept whole, so it can be replayed or moved
    assert [a.status for a in letter.attempts] == [500]
    assert redis_client.zcard(KEYS.schedule) == 0
    # Replaying to a name not in the config is refused and changes nothing.
    refused = relay(config, "dlq", "replay", "--subscriber", "erp")
    assert refused.returncode == 2 and "not configured" in refused.stderr
    assert ("EVRENAME", "erp") in dead_letters(redis_client)
    listed = relay(config, "dlq", "list", "--subscriber", "erp")
    assert "not configured" in listed.stderr and "EVRENAME" in listed.stdout


def test_a_worker_without_a_subscriber_leaves_its_attempts_to_a_worker_that_has_it(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """A rolling deploy: the new config adds "new"; a worker still on the old config takes
    one of its attempts. It must not drop it (nor dead-letter it): it waits for a worker
    that knows the subscriber."""
    new = write_config(tmp_path / "new.yaml", redis_server.url, [
        {"name": "old", "url": sink.url("/old"), "secret": "s"},
        {"name": "new", "url": sink.url("/new"), "secret": "s"}])
    old = tmp_path / "old.yaml"
    old.write_text(new.read_text())
    edit(old, lambda d: d["subscribers"].pop())
    events = [f"EVROLL{i}" for i in range(5)]
    for event_id in events:
        enqueue_event(redis_client, event_body(event_id))
    redis_client.delete(KEYS.queue, KEYS.unclaimed)  # only the attempts below are queued
    with worker(new, tmp_path / "new.log") as fresh:
        wait_until(lambda: redis_client.hexists(KEYS.known, "new"), 10, what="heartbeat")
        os.killpg(fresh.pid, signal.SIGSTOP)  # it lives, but takes nothing for now
        try:
            with worker(old, tmp_path / "old.log"):
                for event_id in events:
                    redis_client.lpush(KEYS.queue, deliver_message(KEYS.queue, event_id,
                                                                   ["new"], 2))
                wait_until(lambda: redis_client.llen(KEYS.queue) == 0, 10, what="taken")
                time.sleep(0.5)
                assert dead_letters(redis_client) == {}
                assert sink.on("/new") == []
        finally:
            os.killpg(fresh.pid, signal.SIGCONT)
        got = sink.wait_for("/new", len(events), timeout=20)
    assert sorted(r.event_id for r in got) == events
    assert dead_letters(redis_client) == {}


# -- expired records, poisoned events -----------------------------------------------------


def test_expired_event_record_with_attempts_pending_is_dead_lettered_and_counted(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    sink.behave("/erp", lambda n: Reply(503))
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "s"}],
        delivery={"timeout": "1s", "max_attempts": 5,
                  "backoff": {"initial": "1s", "max": "1s"}})
    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EVEXPIRE"))
        wait_until(lambda: attempt_log(redis_client, "EVEXPIRE", "erp"), 10, what="attempt 1")
        redis_client.delete(KEYS.event("EVEXPIRE"))  # what redis.retention does to it
        wait_until(lambda: ("EVEXPIRE", "erp") in dead_letters(redis_client), 10,
                   what="dead letter")
    letter = dead_letters(redis_client)[("EVEXPIRE", "erp")]
    assert letter.reason == "event expired"
    assert letter.event is None
    assert redis_client.hget(KEYS.totals, "erp|x") == b"1"  # counted, for /metrics
    assert len(sink.on("/erp")) == 1
    assert redis_client.zcard(KEYS.schedule) == 0


def test_poisoned_event_is_dead_lettered_and_the_rest_of_its_batch_delivered(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "s"}])
    events = ["EVPOISON-A", "EVPOISON-B", "EVPOISON-C"]
    _store_batch(redis_server.port, [event_body(e) for e in events])
    assert redis_client.llen(KEYS.queue) == 1  # one fan-out task for the three
    redis_client.set(KEYS.event("EVPOISON-B"), b"\xc1 not a record")
    with worker(config, tmp_path / "worker.log"):
        got = sink.wait_for("/erp", 2)
        wait_until(lambda: ("EVPOISON-B", "*") in dead_letters(redis_client), 10,
                   what="the poisoned event dead-lettered")
        wait_until(lambda: redis_client.zcard(KEYS.unclaimed) == 0, 5,
                   what="its message taken for good")
        time.sleep(0.5)
    assert sorted(r.event_id for r in got) == ["EVPOISON-A", "EVPOISON-C"]
    assert dead_letters(redis_client)[("EVPOISON-B", "*")].reason.startswith(
        "cannot be processed")
    assert redis_client.llen(KEYS.queue) == 0


def _store_batch(port: int, bodies: list[bytes]) -> None:
    """Store several events in one batch (one fan-out task), as concurrent requests are."""
    import redis.asyncio as aioredis

    from relay.ingress.store import EventStore
    from relay.models import parse_envelope

    async def store() -> None:
        client = aioredis.Redis(port=port)
        events = []
        for body in bodies:
            env = parse_envelope(body)
            events.append(StoredEvent(env.eventId, env.topic, env.event_types(), time.time(),
                                      body, env.order_numbers()))
        store = EventStore(client, KEYS, 3600, 3600)
        assert await store._run(events) == [True] * len(events)
        await client.aclose()

    asyncio.run(store())


# -- several hubs, one Redis -------------------------------------------------------------


def test_hubs_with_different_prefixes_share_one_redis_without_meeting(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    configs = {}
    for hub in ("a", "b"):
        path = write_config(tmp_path / f"{hub}.yaml", redis_server.url, [
            {"name": "sub", "url": sink.url(f"/{hub}"), "secret": "s"}],
            delivery={"timeout": "1s", "max_attempts": 2,
                      "backoff": {"initial": "100ms", "max": "200ms"}})
        edit(path, lambda d, hub=hub: d["redis"].update(prefix=f"hub-{hub}:"))
        configs[hub] = path
    sink.behave("/b", lambda n: Reply(500 if n == 1 else 200))  # b has a retry too
    with worker(configs["a"], tmp_path / "wa.log"), worker(configs["b"], tmp_path / "wb.log"), \
            ingress(configs["a"], tmp_path / "ia.log") as url_a, \
            ingress(configs["b"], tmp_path / "ib.log") as url_b:
        for i in range(5):
            assert post(url_a, event_body(f"EVHUBA{i}"))[0] == 202
            assert post(url_b, event_body(f"EVHUBB{i}"))[0] == 202
        # The same eventId is a different event to each hub.
        assert post(url_b, event_body("EVHUBA0"))[0] == 202
        sink.wait_for("/a", 5)
        sink.wait_for("/b", 7)
        time.sleep(1.0)
    assert sorted(r.event_id for r in sink.on("/a")) == [f"EVHUBA{i}" for i in range(5)]
    assert sorted({r.event_id for r in sink.on("/b")}) == sorted(
        [f"EVHUBB{i}" for i in range(5)] + ["EVHUBA0"])
    stray = [k for k in redis_client.keys("*")
             if not k.startswith((b"hub-a:", b"hub-b:", b"unacked", b"_kombu"))]
    assert stray == []


# -- preflight --------------------------------------------------------------------------


@pytest.fixture
def unsafe_redis(tmp_path: Path):
    """A redis-server as some distros ship it: no AOF."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_until(lambda: _pings(client), 10, what="redis up")
    yield port, client
    proc.terminate()
    proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_ingress_worker_and_admin_refuse_a_redis_without_aof_or_with_an_evicting_policy(
        tmp_path: Path, unsafe_redis) -> None:
    port, client = unsafe_redis
    config = write_config(tmp_path / "relay.yaml", f"redis://127.0.0.1:{port}/0", [])
    for command in ("ingress", "worker", "admin"):
        out = relay(config, command)
        assert out.returncode == 2, (command, out.stderr[-500:])
        error = lines_of(out.stderr)[-1]
        assert error["level"] == "error" and "appendonly is no" in error["msg"], error
        assert "appendonly yes" in error["msg"]  # how to fix it
    client.config_set("appendonly", "yes")
    client.config_set("maxmemory-policy", "allkeys-lru")
    out = relay(config, "ingress")
    assert out.returncode == 2
    assert "maxmemory-policy is allkeys-lru" in out.stderr and "noeviction" in out.stderr


def test_allow_unsafe_starts_with_a_warning(tmp_path: Path, unsafe_redis) -> None:
    port, _ = unsafe_redis
    config = write_config(tmp_path / "relay.yaml", f"redis://127.0.0.1:{port}/0", [])
    edit(config, lambda d: d["redis"].update(allow_unsafe=True))
    log = tmp_path / "ingress.log"
    with process(relay_cmd("--config", str(config), "ingress"), log_path=log) as proc:
        wait_http(f"http://127.0.0.1:{ingress_port(config)}/healthz")
        assert proc.poll() is None
    warned = [e for e in lines(log) if e["level"] == "warning" and "unsafe" in e["msg"]]
    assert warned and "appendonly is no" in warned[0]["problem"]


def lines_of(text: str) -> list[dict]:
    return [msgspec.json.decode(line) for line in text.splitlines() if line.startswith("{")]


def test_a_redis_that_fsyncs_lazily_is_warned_about_at_start(tmp_path: Path,
                                                            unsafe_redis) -> None:
    """``appendfsync everysec`` (Redis's default) passes the preflight, but a host crash
    loses up to a second of events already answered 202: one JSON line says so."""
    from relay.config import RedisSettings
    from relay.connections import fsync_risk, preflight

    port, client = unsafe_redis
    client.config_set("appendonly", "yes")
    client.config_set("appendfsync", "everysec")
    config = write_config(tmp_path / "relay.yaml", f"redis://127.0.0.1:{port}/0", [])
    log = tmp_path / "ingress.log"
    with process(relay_cmd("--config", str(config), "ingress"), log_path=log) as proc:
        wait_http(f"http://127.0.0.1:{ingress_port(config)}/healthz")
        assert proc.poll() is None
    warned = [e for e in lines(log) if e.get("appendfsync")]
    assert len(warned) == 1, warned
    assert warned[0]["level"] == "warning" and warned[0]["who"] == "ingress"
    assert "up to about a second" in warned[0]["problem"]
    assert "appendfsync always" in warned[0]["problem"]

    settings = RedisSettings(url=f"redis://127.0.0.1:{port}/0")
    for value, expected in (("no", "not yet written"), ("always", None)):
        client.config_set("appendfsync", value)
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logging.getLogger("relay.redis").addHandler(handler)
        try:
            preflight(settings, client, "test")
        finally:
            logging.getLogger("relay.redis").removeHandler(handler)
        found = [r for r in records if getattr(r, "appendfsync", None)]
        if expected is None:
            assert found == [] and fsync_risk(value) is None
        else:
            assert len(found) == 1 and expected in found[0].problem
