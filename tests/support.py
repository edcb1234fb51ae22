"""Real things for tests: a private redis-server, subprocesses, HTTP sinks, free ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
#: The shared contract data (samples, signature vectors) beside the repository; a clone on its
#: own falls back to the snapshot in tests/shared (kept equal by test_shared_snapshot.py).
SHARED_BESIDE = ROOT.parent / "shared"
SNAPSHOT = ROOT / "tests" / "shared"
SHARED = SHARED_BESIDE if (SHARED_BESIDE / "signature_vectors.json").exists() else SNAPSHOT
SAMPLES = SHARED / "samples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A private ``redis-server`` on a free port, with AOF (fsync always) in a temp dir.

    ``kill()`` SIGKILLs it; ``start()`` brings it back on the same port with the same data.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-test-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 15, what=f"redis-server on port {self.port}")
        client.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def relay_cmd(*args: str) -> list[str]:
    """The ``relay`` CLI, run with this interpreter (works from any venv)."""
    return [sys.executable, "-m", "relay.ops.cli", *args]


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str] | None = None,
            log_path: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` for the block; SIGTERM it after (SIGKILL if it lingers)."""
    full_env = {**os.environ, **(env or {})}
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if log_path:
            out.close()  # type: ignore[union-attr]


def wait_http(url: str, timeout: float = 20.0) -> None:
    import urllib.request

    def ok() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status < 500
        except OSError:
            return False

    wait_until(ok, timeout, 0.05, what=url)
