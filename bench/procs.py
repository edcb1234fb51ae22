"""Processes for the bench: a private redis-server, servers, load generators, RSS sampling."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def http_post(url: str, data: bytes = b"", timeout: float = 5.0) -> bytes:
    req = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


def wait_http(url: str, timeout: float = 30.0) -> None:
    def up() -> bool:
        try:
            http_get(url, 1)
            return True
        except OSError:
            return False

    wait_until(up, timeout, url)


class Proc:
    """A child process in its own session; ``stop`` SIGTERMs its group, SIGKILLs a laggard."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


class RedisServer:
    """A private ``redis-server`` on a free port, AOF on, in a temp dir (never port 6379);
    with ``replica_of``, a replica of the one on that port."""

    #: Extra redis-server arguments for every server of the run (``--no-aof-rewrite``).
    extra_args: tuple[str, ...] = ()

    def __init__(self, appendfsync: str, log_dir: Path, replica_of: int | None = None,
                 name: str = "redis") -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-bench-redis-"))
        self.appendfsync = appendfsync
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
        replication = ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []
        self.proc = Proc(name, [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", appendfsync,
            "--save", "", "--protected-mode", "no", "--loglevel", "warning", *self.extra_args,
            *replication],
            log_dir)
        import redis

        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 15, f"redis-server on port {self.port}")
        self.version = str(client.info("server")["redis_version"])
        client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port)

    def wait_in_sync(self, primary: RedisServer, timeout: float) -> None:
        """Wait until this replica is online on ``primary`` and has acknowledged all of it."""
        def synced() -> bool:
            with contextlib.closing(primary.client()) as c:
                info = c.info("replication")
            offset = int(info.get("master_repl_offset", 0))
            return any(isinstance(v, dict) and v.get("port") == self.port
                       and v.get("state") == "online" and int(v.get("offset", -1)) >= offset
                       for v in info.values())

        wait_until(synced, timeout, f"the replica on port {self.port} in sync")

    def set_fsync(self, mode: str) -> None:
        with contextlib.closing(self.client()) as c:
            c.config_set("appendfsync", mode)
        self.appendfsync = mode

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- memory ------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


def mem_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in kB; (0, 0) if it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process so far; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class RssSampler:
    """Samples the RSS of named process trees every ``interval`` s in a thread.

    Keeps, per role: the time series of the tree's summed VmRSS, the largest sum seen, and the
    largest VmHWM of any one process of the tree (the kernel's own peak, between samples too).
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.roots: dict[str, int] = {}
        self.series: dict[str, list[tuple[float, int]]] = {}
        self.peak_sum: dict[str, int] = {}
        self.peak_hwm: dict[str, int] = {}
        #: role -> pid -> (first, last) VmRSS seen, to tell which process of a tree grew.
        self.by_pid: dict[str, dict[int, tuple[int, int]]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def watch(self, role: str, pid: int) -> None:
        with self._lock:
            self.roots[role] = pid

    def unwatch(self, role: str) -> None:
        with self._lock:
            self.roots.pop(role, None)

    def sample(self) -> None:
        now = time.time()
        with self._lock:
            roots = dict(self.roots)
        for role, pid in roots.items():
            total, hwm = 0, 0
            per = self.by_pid.setdefault(role, {})
            for p in descendants(pid):
                r, h = mem_kb(p)
                total += r
                hwm = max(hwm, h)
                if r:
                    per[p] = (per[p][0] if p in per else r, r)
            if not total:
                continue
            self.series.setdefault(role, []).append((now, total))
            self.peak_sum[role] = max(self.peak_sum.get(role, 0), total)
            self.peak_hwm[role] = max(self.peak_hwm.get(role, 0), hwm)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def cpu(self) -> tuple[float, dict[str, float]]:
        """(monotonic time, {role: CPU seconds of the tree so far}) for every watched role."""
        with self._lock:
            roots = dict(self.roots)
        out = {}
        for role, pid in roots.items():
            tree = descendants(pid)
            out[role] = sum(cpu_seconds(p) for p in tree)
            if len(tree) > 1:  # e.g. Celery's main process apart from its pool
                out[f"{role}:main"] = cpu_seconds(pid)
        return time.monotonic(), out

    @staticmethod
    def cores(before: tuple[float, dict[str, float]], after: tuple[float, dict[str, float]]
              ) -> dict[str, float]:
        """CPU used per role between two ``cpu()`` snapshots, in cores (1.0 = one core)."""
        wall = after[0] - before[0]
        if wall <= 0:
            return {}
        return {role: round((after[1][role] - before[1].get(role, 0.0)) / wall, 2)
                for role in after[1] if role in before[1]}

    def window(self, role: str, t0: float, t1: float) -> list[int]:
        return [v for t, v in self.series.get(role, []) if t0 <= t <= t1]


# -- load generators ---------------------------------------------------------------------------


def run_loadgen(spec: dict[str, Any], processes: int, log_dir: Path, name: str,
                on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run ``processes`` generators on slices of ``spec``; their results merged.

    Each builds its requests first; all start together on ``go``. ``t_start``/``t_end`` are
    the earliest start and the latest end (wall clock), ``records`` concatenated.
    """
    count, start, rate = int(spec["count"]), int(spec.get("start", 0)), spec.get("rate")
    gens: list[tuple[subprocess.Popen[str], Path]] = []
    try:
        for i in range(processes):
            lo = start + count * i // processes
            hi = start + count * (i + 1) // processes
            out = log_dir / f"{name}.{i}.json"
            part = {**spec, "start": lo, "count": hi - lo, "out": str(out)}
            if rate:
                part["rate"] = rate / processes
            if "concurrency" in spec:
                part["concurrency"] = max(1, int(spec["concurrency"]) // processes)
            proc = subprocess.Popen(python_cmd("-m", "bench.loadgen"), cwd=ROOT, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(part) + "\n")
            proc.stdin.flush()
            gens.append((proc, out))
        for proc, _ in gens:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"load generator failed to start: {line!r}")
        if on_start is not None:
            on_start()
        for proc, _ in gens:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        limit = float(spec.get("deadline", 60)) + 30
        for proc, _ in gens:
            proc.wait(limit)
    finally:
        for proc, _ in gens:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    parts = [json.loads(out.read_text()) for proc, out in gens]
    for _, out in gens:
        out.unlink(missing_ok=True)
    merged: dict[str, Any] = {"statuses": {}, "errors": {}, "records": []}
    for part in parts:
        for key in ("statuses", "errors"):
            for k, v in part[key].items():
                merged[key][k] = merged[key].get(k, 0) + v
        merged["records"].extend(part["records"] or [])
    merged["sent"] = sum(p["sent"] for p in parts)
    merged["cpu_s"] = round(sum(p.get("cpu_s", 0.0) for p in parts), 3)
    merged["completed"] = sum(p["completed"] for p in parts)
    merged["t_start"] = min(p["t_start"] for p in parts)
    merged["t_end"] = max(p["t_end"] for p in parts)
    merged["latency_ms"] = {"p50": max(p["latency_ms"]["p50"] or 0 for p in parts),
                            "p99": max(p["latency_ms"]["p99"] or 0 for p in parts)}
    return merged
