"""What an outside review found, each proven against real processes: isolation of
subscribers, attempts that raise, SIGTERM to a whole process group, header overrides,
hostile input, readiness, JSON-only output, masked credentials, a self-contained repo."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import redis
import yaml

from relay.keys import Keys
from relay.models import StoredEvent
from relay.signatures import IngramSigner, sign_ingram
from tests.hub import (
    INGRESS_SECRET,
    STANDARD_SECRET,
    Reply,
    Sink,
    attempt_log,
    dead_letters,
    delivered,
    event_body,
    ingress,
    ingress_port,
    post,
    worker,
    write_config,
)
from tests.support import ROOT, free_port, process, relay_cmd, wait_http, wait_until

KEYS = Keys()


def relay(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(relay_cmd("--config", str(config), *args), capture_output=True,
                          text=True, timeout=30)


# -- 1. one subscriber's load never delays another's --------------------------------------


def test_a_busy_catalog_subscriber_does_not_delay_an_order_subscriber(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """A catalog-only subscriber answering in 60 ms under a stock-update burst; an
    order-only subscriber answering at once gets one order event every 100 ms: its p95 from
    POST to receipt stays under 50 ms.

    The catalog sink and the burst run in processes of their own: in this process they
    would share the GIL (and the sink's loop) with the order sink, and measure themselves."""
    catalog_port = free_port()
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "catalog", "url": f"http://127.0.0.1:{catalog_port}/catalog", "secret": "s",
         "topics": ["resellers/catalog"]},
        {"name": "orders", "url": sink.url("/orders"), "secret": "s",
         "topics": ["resellers/orders"]},
    ], worker={"max_in_flight": 8, "max_connections": 4})
    # 2 posts open and 4 attempts held per subscriber: at 50 stock updates/s the catalog
    # lane (2 posts of 60 ms: ~33/s) is crowded but quick, the case where a task used to
    # wait (up to 2 s) for room in every lane before routing its events; the rest of the
    # burst is parked and pulled back as the lane drains. Paced well within what the whole
    # pipeline on a small machine sustains (docs/benchmarks.md), so that what is measured
    # is isolation, not an overloaded CPU.
    sent: dict[str, float] = {}
    with process([sys.executable, "-c", SLOW_SINK, str(catalog_port)]), \
            worker(config, tmp_path / "worker.log"), \
            ingress(config, tmp_path / "in.log") as url:
        wait_http(f"http://127.0.0.1:{catalog_port}/count")
        with process([sys.executable, "-c", BURST, url, "250", "50"]) as burst:
            time.sleep(0.5)
            for i in range(40):
                event_id = f"EVORDER{i:02d}"
                sent[event_id] = time.time()
                assert post(url, event_body(event_id))[0] == 202
                time.sleep(0.1)
            catalog_during = _count(catalog_port)
            assert burst.wait(60) == 0
        got = sink.wait_for("/orders", len(sent))
        wait_until(lambda: _count(catalog_port) >= 250, 60, what="the whole burst delivered")
    latencies = sorted(r.arrived - sent[r.event_id] for r in got)
    p95 = statistics.quantiles(latencies, n=20)[18]
    print(f"\nHARDENING-FIGURES orders p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p95 {p95 * 1000:.1f} ms while the catalog subscriber took {catalog_during} of a "
          f"250-event burst")
    assert 0 < catalog_during < 250, "the orders did not overlap the burst"
    assert p95 < 0.050, [round(x * 1000, 1) for x in latencies]


#: A subscriber that answers every post after 60 ms, in its own process; GET /count.
SLOW_SINK = """
import asyncio, sys
from aiohttp import web
seen = [0]
async def hook(request):
    await request.read()
    await asyncio.sleep(0.06)
    seen[0] += 1
    return web.Response(text="ok")
async def count(request):
    return web.Response(text=str(seen[0]))
app = web.Application()
app.router.add_post("/{tail:.*}", hook)
app.router.add_get("/count", count)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
#: Stock updates posted to the ingress at a steady rate, in their own process.
BURST = """
import sys
from tests.fault.helpers import Load, bodies
url, count, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
load = Load(url, concurrency=16, rate=rate).run(
    bodies("EVSTOCK", count, topic_of=lambda i: "resellers/catalog"))
sys.exit(0 if len(load.accepted) == count else 1)
"""


def _count(port: int) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as resp:
        return int(resp.read())


# -- 2. an attempt that raises is still an attempt -----------------------------------------


def test_an_attempt_that_raises_is_recorded_with_its_error_class_and_dead_lettered(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """An eventId with a line break (stored before the ingress refused them) makes aiohttp
    refuse the webhook-id header with ValueError: still an attempt, recorded and retried."""
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "std", "url": sink.url("/std"), "secret": STANDARD_SECRET,
         "signature": "standard", "max_attempts": 2},
    ], delivery={"timeout": "1s", "max_attempts": 2,
                 "backoff": {"initial": "50ms", "max": "100ms"}})
    event_id = "EV\nBROKEN"
    body = msgspec.json.encode({"eventId": event_id})
    _store(redis_server.port, StoredEvent(event_id, "resellers/orders", ("x",), time.time(),
                                          body))
    with worker(config, tmp_path / "worker.log"):
        wait_until(lambda: (event_id, "std") in dead_letters(redis_client), 10,
                   what="dead letter")
    letter = dead_letters(redis_client)[(event_id, "std")]
    assert [(a.attempt, a.error) for a in letter.attempts] == [(1, "ValueError"),
                                                               (2, "ValueError")]
    assert sink.on("/std") == []


def test_control_characters_are_refused_in_event_ids_and_configured_headers(
        tmp_path: Path, redis_server, redis_client) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [])
    with ingress(config, tmp_path / "in.log") as url:
        body = event_body("EV\nNEWLINE")
        status, answer = post(url, body)
        assert status == 400 and "$.eventId" in answer["error"]
        assert "control characters" in answer["error"]
        status, answer = post(url, event_body("E" * 300))
        assert status == 400 and "$.eventId" in answer["error"]
    for headers, what in (({"Authorization": "Bearer tok\n"}, "control character"),
                          ({"Host": "evil.example"}, "set by the hub"),
                          ({"transfer-encoding": "chunked"}, "set by the hub"),
                          ({"Bad Name": "x"}, "not a valid header name")):
        bad = write_config(tmp_path / "bad.yaml", redis_server.url, [
            {"name": "erp", "url": "http://127.0.0.1:9/x", "secret": "s", "headers": headers}])
        out = relay(bad, "check-config")
        assert out.returncode == 2 and what in out.stderr, (headers, out.stderr)
        assert "subscribers[0].headers" in out.stderr


def _store(port: int, event: StoredEvent) -> None:
    import redis.asyncio as aioredis

    from relay.ingress.store import EventStore

    async def store() -> None:
        client = aioredis.Redis(port=port)
        assert await EventStore(client, KEYS, 3600, 3600)._run([event]) == [True]
        await client.aclose()

    asyncio.run(store())


# -- 3. SIGTERM to the whole process group drains -----------------------------------------


def test_sigterm_to_the_whole_process_group_lets_in_flight_posts_finish(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """As systemd (KillMode=control-group) and ``relay up`` stop a worker: every process of
    it gets SIGTERM. The post in flight finishes and is recorded; nothing is posted twice."""
    sink.behave("/slow", lambda n: Reply(200, delay=2.0))
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "slow", "url": sink.url("/slow"), "secret": "s", "timeout": "5s"}],
        worker={"pool": "prefork", "concurrency": 1})
    from tests.hub import enqueue_event

    with worker(config, tmp_path / "w1.log") as proc:
        enqueue_event(redis_client, event_body("EVDRAIN"))
        wait_until(lambda: sink.peak_open.get("/slow"), 10, what="the post in flight")
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    assert delivered(redis_client, "EVDRAIN", "slow")
    assert [a.status for a in attempt_log(redis_client, "EVDRAIN", "slow")] == [200]
    with worker(config, tmp_path / "w2.log"):
        time.sleep(3.0)  # a lease that fell due would be posted again by now
    assert len(sink.on("/slow")) == 1


# -- 4. headers are case-insensitive; the hub's win -----------------------------------------


def test_subscriber_headers_cannot_duplicate_or_override_the_hubs_own(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "erp-secret",
         "headers": {"content-type": "text/plain", "x-hub-signature": "forged",
                     "Authorization": "Bearer t0k"}}])
    from tests.hub import enqueue_event

    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EVHEADERS"))
        got = sink.wait_for("/erp", 1)[0]
    names = [name.lower() for name, _ in got.raw_headers]
    assert names.count("content-type") == 1 and names.count("x-hub-signature") == 1
    assert got.headers["Content-Type"] == "application/json"
    IngramSigner(["erp-secret"]).verify("EVHEADERS", got.headers["X-Hub-Signature"])
    assert got.headers["Authorization"] == "Bearer t0k"


# -- 5, 6. hostile input, readiness -------------------------------------------------------


def test_a_huge_attacker_chosen_event_id_is_neither_accepted_nor_logged_whole(
        tmp_path: Path, redis_server, redis_client) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [])
    log = tmp_path / "in.log"
    huge = "X" * 900_000
    body = msgspec.json.encode({"eventId": huge, "topic": 5})
    with ingress(config, log) as url:
        status, _ = post(url, body)
        assert status in (400, 401)
    assert max(len(line) for line in log.read_text().splitlines()) < 2000


def test_a_readyz_flood_while_redis_is_slow_does_not_turn_webhooks_into_503(
        tmp_path: Path, redis_server, redis_client) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [])
    with ingress(config, tmp_path / "in.log") as url:
        port = ingress_port(config)
        redis_server.proc.send_signal(signal.SIGSTOP)  # Redis stalls (a fork, a slow disk)
        try:
            async def flood() -> tuple[list[int], int]:
                async with aiohttp.ClientSession() as session:
                    async def ready() -> int:
                        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            return resp.status

                    async def webhook() -> int:
                        await asyncio.sleep(0.3)
                        body = event_body("EVFLOOD")
                        headers = {"Content-Type": "application/json",
                                   "X-Hub-Signature": sign_ingram(INGRESS_SECRET, "EVFLOOD")}
                        async with session.post(url, data=body, headers=headers) as resp:
                            return resp.status

                    async def resume() -> None:
                        await asyncio.sleep(0.8)
                        redis_server.proc.send_signal(signal.SIGCONT)

                    readies = [ready() for _ in range(200)]
                    *answers, status, _ = await asyncio.gather(*readies, webhook(), resume())
                    return answers, status

            answers, status = asyncio.run(flood())
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
    assert status == 202
    assert set(answers) <= {200, 503}


def test_readyz_says_unavailable_when_redis_is_a_read_only_replica(
        tmp_path: Path, redis_server, redis_client) -> None:
    """After a failover the old primary comes back as a replica: it answers PING, but no
    event can be stored on it."""
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [])
    other = free_port()
    primary = subprocess.Popen(["redis-server", "--port", str(other), "--save", "",
                                "--appendonly", "no", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _pings(other), 10, what="other redis")
        with ingress(config, tmp_path / "in.log") as url:
            port = ingress_port(config)
            assert _get(port, "/readyz")[0] == 200
            redis_client.replicaof("127.0.0.1", other)
            wait_until(lambda: _get(port, "/readyz")[0] == 503, 5, what="/readyz 503")
            assert "read-only" in _get(port, "/readyz")[1]["error"]
            assert post(url, event_body("EVREPLICA"))[0] == 503
            redis_client.replicaof("NO", "ONE")
            wait_until(lambda: _get(port, "/readyz")[0] == 200, 5, what="/readyz 200")
    finally:
        redis_client.replicaof("NO", "ONE")
        primary.terminate()
        primary.wait(10)


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port).ping())
    except redis.ConnectionError:
        return False


def _get(port: int, path: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, msgspec.json.decode(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, msgspec.json.decode(exc.read())


# -- 8. every line JSON, every answer JSON --------------------------------------------------


def test_every_line_of_ingress_worker_and_admin_is_json_from_start_to_stop(
        tmp_path: Path, redis_server, redis_client) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [])
    doc = yaml.safe_load(config.read_text())
    doc["admin"] = {"port": free_port()}
    config.write_text(yaml.safe_dump(doc))
    logs = {name: tmp_path / f"{name}.log" for name in ("ingress", "worker", "admin")}
    with process(relay_cmd("--config", str(config), "ingress"), log_path=logs["ingress"]), \
            process(relay_cmd("--config", str(config), "worker"), log_path=logs["worker"]), \
            process(relay_cmd("--config", str(config), "admin"), log_path=logs["admin"]):
        wait_http(f"http://127.0.0.1:{ingress_port(config)}/healthz")
        wait_http(f"http://127.0.0.1:{doc['admin']['port']}/healthz")
        wait_until(lambda: b"ready." in logs["worker"].read_bytes(), 30, what="worker ready")
    for name, log in logs.items():
        text = log.read_text()
        assert text.strip(), name
        for line in text.splitlines():
            assert isinstance(msgspec.json.decode(line), dict), (name, line)
    assert "Warm shutdown" in logs["worker"].read_text()  # Celery's own words, as JSON


def test_requests_aiohttp_cannot_parse_are_answered_in_json(
        tmp_path: Path, redis_server, redis_client) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [])
    with ingress(config, tmp_path / "in.log"):
        port = ingress_port(config)
        for raw in (b"GARBAGE / HTTP/1.1\r\n\r\n",
                    b"POST /webhooks/ingram HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(raw)
                answer = s.recv(65536)
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert b" 400 " in head.split(b"\r\n")[0], head
            assert b"application/json" in head.lower()
            assert "error" in msgspec.json.decode(payload)
        for method, path, status in (("GET", "/nope", 404), ("GET", "/webhooks/ingram", 405)):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                          .encode())
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert f" {status} ".encode() in head.split(b"\r\n")[0]
            assert "error" in msgspec.json.decode(payload)


# -- 9. credentials are masked ---------------------------------------------------------------


def test_credentials_in_urls_are_masked_in_errors_listings_and_logs(
        tmp_path: Path, redis_server, redis_client) -> None:
    config = write_config(tmp_path / "relay.yaml", "http://:hunter2@127.0.0.1:1/0", [])
    out = relay(config, "check-config")
    assert out.returncode == 2 and "redis.url" in out.stderr
    assert "hunter2" not in out.stderr and "***" in out.stderr
    config = write_config(tmp_path / "relay.yaml", f"redis://:hunter2@127.0.0.1:{free_port()}/0",
                          [{"name": "erp", "url": "https://user:s3cr3t@erp.example/hook",
                            "secret": "s"}])
    out = relay(config, "check-config")
    assert out.returncode == 0, out.stderr
    assert "s3cr3t" not in out.stdout and "hunter2" not in out.stdout
    assert "https://user:***@erp.example/hook" in out.stdout
    log = tmp_path / "worker.log"
    with process(relay_cmd("--config", str(config), "worker"), log_path=log):
        wait_until(lambda: b"redis" in log.read_bytes().lower(), 20, what="a line about redis")
        time.sleep(2)
    assert "hunter2" not in log.read_text()


def test_credentials_in_query_strings_are_masked_in_listings_errors_and_logs(
        tmp_path: Path, redis_server, redis_client) -> None:
    """``?api_key=``, ``?sig=``, ``?code=``: a listed URL shows none of its query values;
    free text (errors, log lines) none of the values of parameters named like credentials."""
    import logging

    from relay.config import load_config
    from relay.logs import JsonFormatter
    from tests.hub import LiveAdmin, call

    url = "https://erp.example/hook?api_key=K3YVALUE&tenant=acme&sig=S1GVALUE"
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": url, "secret": "s"}])
    out = relay(config, "check-config")
    assert out.returncode == 0, out.stderr
    assert "https://erp.example/hook?api_key=***&tenant=***&sig=***" in out.stdout
    assert "K3YVALUE" not in out.stdout and "S1GVALUE" not in out.stdout
    with LiveAdmin(load_config(config)) as admin:
        status, _, subs = call(admin.url + "/api/subscribers")
    assert status == 200
    assert subs[0]["url"] == "https://erp.example/hook?api_key=***&tenant=***&sig=***"
    bad = write_config(tmp_path / "bad.yaml", redis_server.url, [
        {"name": "erp", "url": "ftp://erp.example/x?access_token=T0KENVALUE", "secret": "s"}])
    out = relay(bad, "check-config")
    assert out.returncode == 2 and "access_token=***" in out.stderr
    assert "T0KENVALUE" not in out.stderr
    record = logging.makeLogRecord({
        "msg": "could not post to https://fn.example/api/hook?code=AZUREKEY&page=2",
        "levelno": logging.WARNING, "levelname": "WARNING",
        "error": "Cannot connect to https://x.example/?X-Amz-Signature=AMZSIG&password=PW1"})
    line = JsonFormatter().format(record)
    assert "AZUREKEY" not in line and "AMZSIG" not in line and "PW1" not in line
    assert "code=***" in line and "page=2" in line


def test_a_set_cookie_from_one_subscriber_is_never_sent_back_to_any(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """The worker's HTTP client kept a cookie jar shared by every subscriber: one that set a
    cookie got it back on every delivery, and so did every other subscriber on that host."""
    from tests.hub import enqueue_event

    sink.behave("/a", lambda n: Reply(200, {"Set-Cookie": "session=s3cr3t; Path=/"}))
    host = f"http://localhost:{sink.port}"  # a name: cookies of IP addresses were dropped
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "a", "url": f"{host}/a", "secret": "s"},
        {"name": "b", "url": f"{host}/b", "secret": "s"}])
    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EVCOOKIE1"))
        sink.wait_for("/a", 1)
        sink.wait_for("/b", 1)
        enqueue_event(redis_client, event_body("EVCOOKIE2"))
        sink.wait_for("/a", 2)
        sink.wait_for("/b", 2)
    for got in sink.on("/a") + sink.on("/b"):
        assert not any(name.lower() == "cookie" for name, _ in got.raw_headers), got.raw_headers


def test_a_worker_holds_one_copy_of_an_event_for_every_subscriber_it_posts_it_to(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """Ingram's stock updates are 1.7 MB. Attempts parked while a subscriber held its share
    are pulled back per subscriber, each pull loading the records again: three lanes held
    three copies of each pulled event (ten at fan-out 10). One copy, shared, now."""
    from relay.config import load_config
    from tests.hub import enqueue_event
    from workers.engine import Engine

    names = ["s0", "s1", "s2"]
    for name in names:
        sink.behave(f"/{name}", lambda n: Reply(200, delay=2.0))
    # Each subscriber holds 4 attempts (2 posted at once, 2 waiting); the rest are parked.
    # The posts take 2 s: a timeout well past that. The tests' default (2 s) races them, and a
    # post that times out is left to a retry no scheduler runs here (one was, in a full run).
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": n, "url": sink.url(f"/{n}"), "secret": "s"} for n in names],
        delivery={"timeout": "10s", "max_attempts": 5,
                  "backoff": {"initial": "100ms", "max": "1s"}},
        worker={"max_in_flight": 12, "max_connections": 6})
    ids = [enqueue_event(redis_client, event_body(f"EVSHARE{i}")) for i in range(6)]
    pulled = {"EVSHARE4", "EVSHARE5"}
    engine = Engine(load_config(config))
    try:
        engine.start(ids, None, 1)

        async def waiting() -> dict[str, list[Any]]:  # read on the engine's own loop
            return {n: [item[0] for item in engine.lanes[n].waiting
                        if item[0].event_id in pulled] for n in names}

        def all_pulled() -> dict[str, list[Any]] | None:
            held = engine._call(waiting())
            return held if all(len(events) == 2 for events in held.values()) else None

        held = wait_until(all_pulled, 15, what="every lane holding the pulled-back attempts")
        for event_id in pulled:
            copies = {id(e) for events in held.values() for e in events if e.event_id == event_id}
            assert len(copies) == 1, f"{event_id}: {len(copies)} copies in memory"
    finally:
        engine.drain(15)
    for name in names:
        assert sorted(r.event_id for r in sink.on(f"/{name}")) == sorted(ids)


# -- 10. the repository stands alone --------------------------------------------------------


def test_no_tracked_file_links_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    offenders = []
    for name in files:
        if name.startswith("tests/") or name.endswith((".png", ".json", ".js", ".css")):
            continue
        text = (ROOT / name).read_text(errors="replace")
        if "../shared" in text:
            offenders.append(name)
    assert offenders == []


def test_the_contract_lives_in_docs() -> None:
    contract = (ROOT / "docs" / "contract.md").read_text()
    for must in ("X-Hub-Signature", "202", "dead-letter", "SIGHUP", "Sentinel", "relay admin"):
        assert must in contract, must
    assert "docs/contract.md" in (ROOT / "README.md").read_text()



# -- 7. dependency floors and the lock file -------------------------------------------------


def test_the_lock_file_pins_every_dependency_at_or_above_its_floor() -> None:
    """``make`` installs with requirements.lock as constraints (so CI installs from it);
    each dependency must be pinned there, at a version its floor in pyproject.toml allows."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = Version(version)
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    for text in wanted:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock"
        assert req.specifier.contains(pins[name]), (name, str(req.specifier), pins[name])
    assert "-c requirements.lock" in (ROOT / "Makefile").read_text()
