"""``relay up``: ingress, worker (with its scheduler) and optionally the demo sink, together.

Each runs as its own process, supervised here: if one dies, the rest are stopped and ``up``
exits non-zero, so a half-running hub is never mistaken for a working one. When no Redis
answers at ``redis.url`` and it names this machine, a ``redis-server`` is started with
append-only persistence (fsync always) under ``./var/redis``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from relay.config import Config

log = logging.getLogger("relay.up")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


def _reachable(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def start_local_redis(url: str, var_dir: Path) -> subprocess.Popen[bytes]:
    parts = urlsplit(url)
    if parts.hostname not in LOCAL_HOSTS:
        raise SystemExit(f"error: no Redis answers at {url}, and it is not on this machine")
    if shutil.which("redis-server") is None:
        raise SystemExit("error: no Redis is reachable and redis-server is not installed "
                         "(apt-get install redis-server)")
    data = var_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = str(parts.port or 6379)
    proc = subprocess.Popen(
        ["redis-server", "--port", port, "--bind", "127.0.0.1", "--dir", str(data.resolve()),
         "--appendonly", "yes", "--appendfsync", "always", "--save", "",
         "--logfile", str((data / "redis.log").resolve())],
        start_new_session=True)
    deadline = time.monotonic() + 15
    while not _reachable(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"error: redis-server did not start; see {data / 'redis.log'}")
        time.sleep(0.1)
    log.info("started redis-server", extra={"port": port, "dir": str(data)})
    return proc


def run_up(config: Config, host: str | None, port: int | None, with_sink: bool,
           log_level: str = "INFO", var_dir: Path = Path("var"), sink_port: int = 9100) -> int:
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    if not _reachable(config.redis.url):
        started.append(("redis", start_local_redis(config.redis.url, var_dir)))
    base = [sys.executable, "-m", "relay.cli", "--log-level", log_level,
            "--config", config.source]
    commands = []
    if with_sink:
        commands.append(("sink", [*base, "sink", "--port", str(sink_port)]))
    commands.append(("worker", [*base, "worker"]))
    ingress = [*base, "ingress"]
    if host:
        ingress += ["--host", host]
    if port:
        ingress += ["--port", str(port)]
    commands.append(("ingress", ingress))
    env = {**os.environ, "REDIS_URL": config.redis.url}

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for name, cmd in commands:
        started.append((name, subprocess.Popen(cmd, env=env, start_new_session=True)))
    code = 0
    try:
        while not stopping:
            for name, proc in started:
                if proc.poll() is not None:
                    log.error("process exited; stopping the hub",
                              extra={"process": name, "code": proc.returncode})
                    stopping, code = True, 1
            time.sleep(0.2)
    finally:
        # Stop in the order data flows: ingress first (no new events), then sink, then the
        # worker (it finishes what it holds), Redis last.
        for _name, proc in sorted(started, key=lambda p: ["ingress", "sink", "worker", "redis"]
                                 .index(p[0])):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(45)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    log.info("hub stopped")
    return code
