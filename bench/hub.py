"""The hub under test (``relay ingress`` and ``relay worker`` as real processes) and its sinks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from bench.events import INGRESS_SECRET, event_id, signed
from bench.procs import (
    Proc,
    free_port,
    http_get,
    http_post,
    python_cmd,
    wait_http,
    wait_until,
)


class Sinks:
    """``count`` sink processes; subscriber *i* posts to sink ``i % count`` at ``/s/{i}``."""

    def __init__(self, count: int, log_dir: Path) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.procs = [Proc(f"sink{i}", python_cmd("-m", "bench.sink", "--port", str(p)), log_dir)
                      for i, p in enumerate(self.ports)]
        for p in self.ports:
            wait_http(f"http://127.0.0.1:{p}/_stats")

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i % len(self.ports)]}/s/{i}"

    def _each(self, path: str, post: bool = False) -> list[bytes]:
        call = http_post if post else http_get
        return [call(f"http://127.0.0.1:{p}{path}", timeout=30) for p in self.ports]

    def reset(self) -> None:
        self._each("/_reset", post=True)

    def record(self, on: bool) -> None:
        self._each(f"/_record?on={int(on)}", post=True)

    def stats(self) -> dict[str, Any]:
        parts = [json.loads(b) for b in self._each("/_stats")]
        firsts = [p["first"] for p in parts if p["first"]]
        return {"count": sum(p["count"] for p in parts),
                "distinct": sum(p["distinct"] for p in parts),
                "first": min(firsts) if firsts else 0.0,
                "last": max(p["last"] for p in parts)}

    def receipts(self) -> list[list[Any]]:
        out: list[list[Any]] = []
        for raw in self._each("/_receipts"):
            out.extend(json.loads(raw))
        return out

    def wait_count(self, expected: int, timeout: float) -> dict[str, Any]:
        """Poll until ``expected`` distinct deliveries (or ``timeout``); the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["distinct"] >= expected or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def write_config(path: Path, redis_url: str, ingress_port: int, subscribers: list[str],
                 worker: dict[str, Any], ingress: dict[str, Any] | None = None,
                 redis: dict[str, Any] | None = None) -> Path:
    doc = {
        "redis": {"url": redis_url, **(redis or {})},
        "ingress": {"secrets": [INGRESS_SECRET], "host": "127.0.0.1", "port": ingress_port,
                    **(ingress or {})},
        "delivery": {"timeout": "10s", "max_attempts": 8,
                     "backoff": {"initial": "1s", "max": "10s"}},
        "worker": worker,
        "subscribers": [{"name": f"s{i}", "url": url, "secret": f"bench-subscriber-secret-{i}",
                         "signature": "ingram"} for i, url in enumerate(subscribers)],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def hub_keys(config: Path) -> Any:
    """The hub's Redis key layout for ``config``, as the hub itself builds it (``relay.keys``
    with the queue named in the config): the bench never spells a key of the hub itself."""
    from relay.config import load_config
    from relay.keys import Keys

    return Keys.of(load_config(config))


def relay_proc(name: str, config: Path, command: str, log_dir: Path,
               env: dict[str, str] | None = None) -> Proc:
    return Proc(name, python_cmd("-m", "relay.ops.cli", "--log-level", "WARNING", "--config",
                                 str(config), command), log_dir, env=env)


class Ingress:
    def __init__(self, config: Path, port: int, log_dir: Path, name: str = "ingress",
                 env: dict[str, str] | None = None) -> None:
        self.port = port
        #: Its name in logs and in the RSS/CPU sampler.
        self.role = name
        self.proc = relay_proc(name, config, "ingress", log_dir, env)
        wait_http(f"http://127.0.0.1:{port}/healthz")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/ingram"

    def post(self, eid: str) -> int:
        import urllib.error
        import urllib.request

        body, sig = signed(eid)
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "X-Hub-Signature": sig})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def stop(self) -> None:
        self.proc.stop()


class Worker:
    """``relay worker`` on ``config``; ready once a few warm-up events reached every sink."""

    def __init__(self, name: str, config: Path, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.proc = relay_proc(name, config, "worker", log_dir, env)

    def warm_up(self, ingress: Ingress, sinks: Sinks, fanout: int, prefix: str,
                events: int = 20, timeout: float = 60.0) -> None:
        sinks.reset()
        for n in range(events):
            status = ingress.post(event_id(prefix, n))
            if status != 202:
                raise RuntimeError(f"warm-up post answered {status}")

        def done() -> bool:
            if not self.proc.alive():
                raise RuntimeError(f"worker died:\n{self.proc.tail()}")
            return bool(sinks.stats()["distinct"] >= events * fanout)

        wait_until(done, timeout, "worker warm-up deliveries", interval=0.1)
        sinks.reset()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.stop(40)
