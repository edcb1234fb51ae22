"""``relay up``: ingress, worker (with its scheduler), admin and optionally the demo sink.

Each runs as its own process, supervised here: if one exits, ``up`` says which and why in
one JSON line, stops the others and exits non-zero, so a half-running hub is never mistaken
for a working one. Every line the children write passes through here (a line that is not
JSON, a crash's traceback, is wrapped into one), so ``up`` writes JSON lines only.

Redis: the one at ``redis.url`` (``REDIS_URL``) is used when it answers and passes the
preflight (relay/connections.py). Otherwise a ``redis-server`` is started with append-only
persistence (fsync always) under ``./var/redis``, on that URL's port if it is this machine's
and free, else on the first free port from 6390, and ``up`` says why. The children are
pointed at it with ``RELAY_REDIS_URL``. With ``redis.sentinel`` there is no such fallback:
a Sentinel set that does not answer, or whose primary fails the preflight, stops ``up``.

SIGHUP is passed on to every child: each re-reads the config (relay/reload.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import msgspec
import redis

from relay.config import REDIS_URL_OVERRIDE, Config
from relay.connections import describe, problems, sync_client
from relay.masking import mask_text

log = logging.getLogger("relay.up")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
OWN_PORTS = range(6390, 6490)
#: Order of stopping: the way data flows (no new events first, the worker drains last).
STOP_ORDER = ["ingress", "admin", "sink", "worker", "redis"]


def _unusable(config: Config) -> str | None:
    """Why the configured Redis cannot be used (None if it can)."""
    try:
        with sync_client(config.redis, socket_connect_timeout=1, socket_timeout=2) as client:
            info = client.info()
    except (redis.RedisError, OSError) as exc:
        return f"no Redis answers at {describe(config.redis)} ({type(exc).__name__})"
    fatal, unsafe = problems(info)
    if fatal or (unsafe and not config.redis.allow_unsafe):
        return f"the Redis at {describe(config.redis)} fails the preflight: " \
               f"{'; '.join(fatal + unsafe)}"
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _own_port(config: Config) -> int:
    parts = urlsplit(config.redis.url)
    if config.redis.sentinel is None and parts.hostname in LOCAL_HOSTS \
            and _port_free(parts.port or 6379):
        return parts.port or 6379
    for port in OWN_PORTS:
        if _port_free(port):
            return port
    raise SystemExit("error: no free port for a local redis-server in 6390-6489")


def start_local_redis(port: int, var_dir: Path) -> subprocess.Popen[bytes]:
    if shutil.which("redis-server") is None:
        raise SystemExit("error: no usable Redis and redis-server is not installed "
                         "(apt-get install redis-server)")
    data = var_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(data.resolve()), "--appendonly", "yes", "--appendfsync", "always",
         "--save", "", "--maxmemory-policy", "noeviction",
         "--logfile", str((data / "redis.log").resolve())],
        start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    while True:
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
                client.ping()
                break
        except (redis.RedisError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: redis-server did not start; see "
                                 f"{data / 'redis.log'}") from None
            time.sleep(0.1)
    return proc


class Child:
    """One supervised process, its output passed through as JSON lines."""

    def __init__(self, label: str, cmd: list[str], env: dict[str, str]) -> None:
        self.label = label
        self.last_error = ""
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        assert self.proc.stdout is not None
        self._relay = threading.Thread(target=self._pass_through, args=(self.proc.stdout,),
                                       name=f"relay-up-{label}", daemon=True)
        self._relay.start()

    def _pass_through(self, stream: IO[bytes]) -> None:
        out = sys.stderr.buffer
        for raw in iter(stream.readline, b""):
            line = raw.rstrip(b"\r\n")
            if not line:
                continue
            try:
                entry = msgspec.json.decode(line)
                if not isinstance(entry, dict):
                    raise ValueError
            except (msgspec.DecodeError, ValueError):
                entry = {"level": "error", "logger": "relay.up", "proc": self.label,
                         "msg": mask_text(line.decode("utf-8", "replace"))}
                line = msgspec.json.encode(entry)
            if entry.get("level") in ("error", "critical"):
                self.last_error = str(entry.get("error") or entry.get("msg") or "")
            out.write(line + b"\n")
            out.flush()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def stop(self, timeout: float) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)
        self._relay.join(2)


def run_up(config: Config, host: str | None, port: int | None, with_sink: bool,
           log_level: str = "INFO", var_dir: Path = Path("var"), sink_port: int = 9100,
           admin_port: int | None = None) -> int:
    env = dict(os.environ)
    own_redis: subprocess.Popen[bytes] | None = None
    why = _unusable(config)
    if why is not None and config.redis.sentinel is not None:
        # With Sentinel the hub's Redis is a replicated set shared by other machines' workers
        # and ingress; a redis-server of our own (what follows, for a plain redis.url) would
        # silently take events into a store nobody else reads, and RELAY_REDIS_URL would even
        # switch Sentinel off in every child. Refuse instead: the operator fixes the set.
        log.error("refusing to start: the Sentinel set is not usable, and relay up starts a "
                  "Redis of its own only for a plain redis.url", extra={"why": why})
        return 2
    if why is not None:
        redis_port = _own_port(config)
        log.warning("starting a local redis-server with append-only persistence",
                    extra={"why": why, "port": redis_port, "dir": str(var_dir / "redis")})
        own_redis = start_local_redis(redis_port, var_dir)
        env[REDIS_URL_OVERRIDE] = f"redis://127.0.0.1:{redis_port}/0"
        log.warning("operator commands (relay status, events, dlq, subscribers) must be "
                    "pointed at this Redis too", extra={
                        "env": f"{REDIS_URL_OVERRIDE}={env[REDIS_URL_OVERRIDE]}"})

    base = [sys.executable, "-m", "relay.ops.cli", "--log-level", log_level,
            "--config", config.source]
    commands: list[tuple[str, list[str]]] = []
    if with_sink:
        commands.append(("sink", [*base, "sink", "--port", str(sink_port)]))
    commands.append(("worker", [*base, "worker"]))
    ingress = [*base, "ingress"]
    if host:
        ingress += ["--host", host]
    if port:
        ingress += ["--port", str(port)]
    commands.append(("ingress", ingress))
    admin = [*base, "admin"]
    if admin_port:
        admin += ["--port", str(admin_port)]
    commands.append(("admin", admin))

    stopping = threading.Event()
    children: list[Child] = []

    def on_stop(signum: int, frame: object) -> None:
        stopping.set()

    def on_hup(signum: int, frame: object) -> None:
        for child in children:
            child.signal(signal.SIGHUP)

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    for label, cmd in commands:
        children.append(Child(label, cmd, env))
    log.info("hub starting", extra={
        "ingress": f"http://{host or config.ingress.host}:{port or config.ingress.port}/",
        "admin": f"http://{config.admin.host}:{admin_port or config.admin.port}/",
        "sink": f"http://127.0.0.1:{sink_port}/" if with_sink else None,
        "redis": env.get(REDIS_URL_OVERRIDE) or describe(config.redis)})
    code = 0
    try:
        while not stopping.is_set():
            for child in children:
                if child.proc.poll() is not None:
                    child._relay.join(2)  # its last words first
                    log.error("process exited; stopping the hub", extra={
                        "proc": child.label, "code": child.proc.returncode,
                        "reason": child.last_error or f"exit code {child.proc.returncode}"})
                    stopping.set()
                    code = 1
                    break
            stopping.wait(0.2)
    finally:
        for child in sorted(children, key=lambda c: STOP_ORDER.index(c.label)):
            child.stop(45)
        if own_redis is not None and own_redis.poll() is None:
            own_redis.terminate()
            try:
                own_redis.wait(15)
            except subprocess.TimeoutExpired:
                own_redis.kill()
    log.info("hub stopped", extra={"code": code})
    return code
