"""``celery -A workers.app worker``: the plain Celery command line runs the same hub worker."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from tests.hub import Reply, Sink, attempt_log, delivered, enqueue_event, event_body, write_config
from tests.support import process, wait_until


def test_plain_celery_worker_with_relay_config_env_delivers_and_retries(
        tmp_path: Path, redis_server, redis_client) -> None:
    sink = Sink().start()
    try:
        config = write_config(tmp_path / "relay.yaml", redis_server.url, [
            {"name": "cli", "url": sink.url("/cli"), "secret": "celery-cli-secret"},
        ], delivery={"timeout": "2s", "max_attempts": 3,
                     "backoff": {"initial": "100ms", "max": "200ms"}})
        # The first attempt fails: the retry needs the scheduler, which runs in this worker too.
        sink.behave("/cli", lambda n: Reply(500 if n == 1 else 200))
        log = tmp_path / "celery.log"
        cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo",
               "--loglevel", "INFO", "--without-gossip", "--without-mingle",
               "--without-heartbeat"]
        with process(cmd, env={"RELAY_CONFIG": str(config)}, log_path=log) as proc:
            wait_until(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 30,
                       what="celery worker ready")
            assert proc.poll() is None, log.read_text()
            enqueue_event(redis_client, event_body("EVCELERYCLI"))
            got = sink.wait_for("/cli", 2, timeout=15)
            wait_until(lambda: delivered(redis_client, 'EVCELERYCLI', "cli"), 10,
                       what="done marker")
        assert proc.returncode is not None
    finally:
        sink.stop()
    assert [r.body for r in got] == [event_body("EVCELERYCLI")] * 2
    assert [(a.attempt, a.status) for a in attempt_log(redis_client, "EVCELERYCLI", "cli")] \
        == [(1, 500), (2, 200)]
    text = log.read_text()
    # Every line JSON (no banner, no plain-text warning), the deliveries logged at INFO.
    lines = [msgspec.json.decode(line) for line in text.splitlines() if line.strip()]
    assert any(e["msg"] == "delivered" and e.get("eventId") == "EVCELERYCLI" for e in lines)
    assert "scheduler started" in text


def test_plain_celery_worker_takes_pool_size_from_the_yaml_and_logs_deliveries_without_l(
        tmp_path: Path, redis_server, redis_client) -> None:
    """``celery -A workers.app worker`` with neither -c nor -l: worker.concurrency from the
    YAML sizes the pool, and the delivery lines are logged (relay's loggers at INFO)."""
    sink = Sink().start()
    try:
        config = write_config(tmp_path / "relay.yaml", redis_server.url, [
            {"name": "cli", "url": sink.url("/cli"), "secret": "s"}],
            worker={"pool": "prefork", "concurrency": 3})
        log = tmp_path / "celery.log"
        cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]
        with process(cmd, env={"RELAY_CONFIG": str(config)}, log_path=log) as proc:
            # No "ready." line: that is Celery's own, at INFO; relay's own lines are there.
            wait_until(lambda: b"scheduler started" in log.read_bytes()
                       or proc.poll() is not None, 30, what="worker started")
            enqueue_event(redis_client, event_body("EVPLAIN"))
            sink.wait_for("/cli", 1, timeout=20)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            wait_until(lambda: b'"delivered"' in log.read_bytes(), 10, what="delivery logged")
    finally:
        sink.stop()
    assert len(children) == 3
