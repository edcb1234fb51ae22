"""``relay up --with-sink``: the whole hub in one command, with its own Redis when none answers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import msgspec
import pytest

from tests.support import ROOT, SAMPLES, free_port, relay_cmd, wait_http, wait_until


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children in their own sessions included)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {p for p, parent in parents.items() if parent in frontier} - found
        found |= children
        frontier = children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_with_sink_starts_its_own_redis_delivers_an_event_and_stops_everything_on_signal(
        tmp_path: Path, stop_signal: signal.Signals) -> None:
    ingress_port, sink_port, redis_port = free_port(), free_port(), free_port()
    assert not port_open(redis_port)
    dev = (ROOT / "config" / "relay.dev.yaml").read_text()
    assert "port: 8080" in dev and "127.0.0.1:9100" in dev
    config = tmp_path / "relay.yaml"
    config.write_text(dev.replace("port: 8080", f"port: {ingress_port}")
                      .replace("127.0.0.1:9100", f"127.0.0.1:{sink_port}"))
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    log = tmp_path / "up.log"
    sample = SAMPLES / "order_shipped.json"
    event_id = msgspec.json.decode(sample.read_bytes())["eventId"]
    tree: set[int] = set()
    with open(log, "wb") as out:
        up = subprocess.Popen(relay_cmd("--config", str(config), "up", "--with-sink",
                                        "--sink-port", str(sink_port), "--admin-port",
                                        str(free_port())),
                              cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{ingress_port}/readyz", timeout=30)
        wait_until(lambda: port_open(sink_port), 15, what="demo sink listening")
        wait_until(lambda: b"ready." in log.read_bytes(), 30, what="worker ready")
        assert up.poll() is None, log.read_text()

        # Its own Redis, with append-only persistence under ./var/redis of the working dir.
        data = tmp_path / "var" / "redis"
        assert port_open(redis_port)
        wait_until(lambda: (data / "appendonlydir").is_dir()
                   or (data / "appendonly.aof").exists(), 10, what="append-only file")

        def send() -> subprocess.CompletedProcess[str]:
            return subprocess.run(relay_cmd("--config", str(config), "send", str(sample)),
                                  cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=30, check=False)

        first = send()
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("202"), first.stdout
        assert "accepted" in first.stdout
        again = send()
        assert again.returncode == 0, again.stderr
        assert again.stdout.startswith("200"), again.stdout
        assert "duplicate" in again.stdout

        # Both demo subscribers (order_shipped matches im::order_*) get it, signatures verified.
        wanted = [f"sink /hooks/ingram: {event_id} topic=resellers/orders: "
                  "X-Hub-Signature verified",
                  f"sink /hooks/standard: {event_id} topic=resellers/orders: "
                  "webhook-signature verified"]
        wait_until(lambda: all(w in log.read_text() for w in wanted), 20,
                   what="deliveries printed by the demo sink")
        time.sleep(0.5)  # a duplicate fan-out would show up by now
        text = log.read_text()
        assert text.count(f"sink /hooks/ingram: {event_id}") == 1
        assert text.count(f"sink /hooks/standard: {event_id}") == 1

        tree = descendants(up.pid)
        assert len(tree) >= 4, tree  # redis, sink, worker (+ its pool), ingress
        os.kill(up.pid, stop_signal)
        code = up.wait(60)
        assert code == 0, log.read_text()[-3000:]
        wait_until(lambda: not any(alive(p) for p in tree), 15, what="every child gone")
        for port in (ingress_port, sink_port, redis_port):
            assert not port_open(port), f"port {port} still open"
        assert "hub stopped" in log.read_text()
    finally:
        if up.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
        for pid in tree | descendants(up.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _json_lines(text: str) -> list[dict]:
    return [msgspec.json.decode(line) for line in text.splitlines() if line.strip()]


def test_up_says_which_process_exited_and_why_in_one_json_line_and_stops_the_rest(
        tmp_path: Path) -> None:
    """The ingress port is taken: ``relay up`` must not crash (it once did, on a log field
    named like a LogRecord attribute), but say which process exited and why, stop the
    others and exit non-zero; every line it writes is JSON."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    redis_port = free_port()
    config = tmp_path / "relay.yaml"
    config.write_text((ROOT / "config" / "relay.dev.yaml").read_text()
                      .replace("port: 8080", f"port: {port}"))
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    try:
        out = subprocess.run(relay_cmd("--config", str(config), "up", "--admin-port",
                                       str(free_port())),
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    finally:
        taken.close()
    assert out.returncode == 1, out.stderr[-2000:]
    lines = _json_lines(out.stdout + out.stderr)  # raises if any line is not JSON
    exited = [e for e in lines if e["msg"] == "process exited; stopping the hub"]
    assert len(exited) == 1, exited
    assert exited[0]["proc"] == "ingress" and exited[0]["code"] == 1
    assert f"cannot listen on 127.0.0.1:{port}" in exited[0]["reason"]
    assert lines[-1]["msg"] == "hub stopped"
    assert not port_open(redis_port)  # its own Redis was stopped too


def test_up_starts_its_own_redis_when_the_one_at_redis_url_fails_the_preflight(
        tmp_path: Path) -> None:
    """A distro Redis without AOF answers at REDIS_URL: adopting it would make a 202 not
    durable. ``relay up`` says why and starts its own, with append-only persistence."""
    unsafe_port = free_port()
    unsafe = subprocess.Popen(["redis-server", "--port", str(unsafe_port), "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL)
    ingress_port, sink_port = free_port(), free_port()
    config = tmp_path / "relay.yaml"
    config.write_text((ROOT / "config" / "relay.dev.yaml").read_text()
                      .replace("port: 8080", f"port: {ingress_port}")
                      .replace("127.0.0.1:9100", f"127.0.0.1:{sink_port}"))
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{unsafe_port}/0"}
    log = tmp_path / "up.log"
    up = None
    try:
        wait_until(lambda: port_open(unsafe_port), 10, what="the unsafe redis")
        with open(log, "wb") as out:
            up = subprocess.Popen(relay_cmd("--config", str(config), "up", "--with-sink",
                                            "--sink-port", str(sink_port), "--admin-port",
                                            str(free_port())),
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        wait_http(f"http://127.0.0.1:{ingress_port}/readyz", timeout=40)
        sent = subprocess.run(relay_cmd("--config", str(config), "send",
                                        str(SAMPLES / "order_shipped.json"), "--url",
                                        f"http://127.0.0.1:{ingress_port}/webhooks/ingram"),
                              env=env, capture_output=True, text=True, timeout=30)
        assert sent.stdout.startswith("202"), sent
        wait_until(lambda: "X-Hub-Signature verified" in log.read_text(), 20,
                   what="delivered to the demo sink")
        why = next(e for e in _json_lines(log.read_text())
                   if e["msg"].startswith("starting a local redis-server"))
        assert "fails the preflight" in why["why"] and "appendonly is no" in why["why"]
        assert why["port"] != unsafe_port
        import redis as redis_lib

        assert redis_lib.Redis(port=unsafe_port).dbsize() == 0  # nothing went to the unsafe one
        os.kill(up.pid, signal.SIGTERM)
        assert up.wait(60) == 0
    finally:
        if up is not None and up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        unsafe.terminate()
        unsafe.wait(10)
