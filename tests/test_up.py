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
                                        "--sink-port", str(sink_port)),
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
