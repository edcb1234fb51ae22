"""The obvious design's processes for the bench: its ingress and its Celery worker."""

from __future__ import annotations

import json
from pathlib import Path

from bench.events import INGRESS_SECRET, event_id, signed
from bench.hub import Sinks
from bench.procs import Proc, free_port, python_cmd, wait_http, wait_until

QUEUE = "obvious"


class ObviousDesign:
    """Its ingress and worker on ``redis_url`` (a database of its own), delivering to the
    first ``fanout`` subscribers of ``sinks``; ``pool`` and ``concurrency`` as the hub's."""

    def __init__(self, redis_url: str, sinks: Sinks, fanout: int, pool: str, concurrency: int,
                 log_dir: Path) -> None:
        self.config = log_dir / "obvious.json"
        self.config.write_text(json.dumps({
            "redis": redis_url, "queue": QUEUE, "secret": INGRESS_SECRET,
            "subscribers": [{"url": sinks.url(i), "secret": f"bench-subscriber-secret-{i}"}
                            for i in range(fanout)],
            "timeout": 10, "max_retries": 7}))
        env = {"OBVIOUS_CONFIG": str(self.config)}
        self.port = free_port()
        self.ingress = Proc("obvious-ingress", python_cmd(
            "-m", "bench.obvious.ingress", "--port", str(self.port)), log_dir, env=env)
        self.worker = Proc("obvious-worker", python_cmd(
            "-m", "celery", "-A", "bench.obvious.app", "worker", "--loglevel=WARNING",
            f"--pool={pool}", f"--concurrency={concurrency}", f"--queues={QUEUE}",
            "--without-gossip", "--without-mingle", "--without-heartbeat"), log_dir, env=env)
        try:
            wait_http(f"http://127.0.0.1:{self.port}/healthz")
        except BaseException as exc:
            self.stop()
            if isinstance(exc, TimeoutError):
                raise RuntimeError(f"obvious ingress did not start:\n{self.ingress.tail()}"
                                   ) from None
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/ingram"

    def post(self, eid: str) -> int:
        import urllib.request

        body, sig = signed(eid)
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "X-Hub-Signature": sig})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)

    def warm_up(self, sinks: Sinks, fanout: int, prefix: str, events: int,
                timeout: float = 60.0) -> None:
        """A few events through ingress and worker, every delivery received; sinks reset."""
        sinks.reset()
        for n in range(events):
            status = self.post(event_id(prefix, n))
            if status != 202:
                raise RuntimeError(f"obvious design warm-up post answered {status}")

        def done() -> bool:
            for proc in (self.ingress, self.worker):
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} died:\n{proc.tail()}")
            return bool(sinks.stats()["distinct"] >= events * fanout)

        wait_until(done, timeout, "obvious design warm-up deliveries", interval=0.1)
        sinks.reset()

    def stop(self) -> None:
        self.ingress.stop()
        self.worker.stop(40)
