"""The Celery app. ``relay worker`` runs it; so does ``celery -A workers.app worker``.

With plain ``celery -A workers.app``, the config comes from ``RELAY_CONFIG`` (default
``config/relay.yaml``) and the scheduler runs in every worker unless ``RELAY_SCHEDULER=0``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, bootsteps, signals
from celery.exceptions import Reject
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from relay.config import Config, config_path, load_config
from relay.gcfreeze import freeze_startup_objects
from relay.keys import Keys
from relay.logs import setup_logging
from relay.queue import DELIVER_TASK
from workers.engine import get_engine, shutdown_engine
from workers.scheduler import Scheduler

log = logging.getLogger("relay.worker")


def _detached_channel_is_a_connection_error() -> None:
    """Keep a worker consuming after Redis dies under load (kombu 5.7; found by tests/fault).

    When Redis goes away while a BRPOP is in flight, Celery's reconnect detaches the kombu
    transport from its connection (``transport.client = None``) while the old channel still has
    work to do: closing it restores the prefetched, unacknowledged messages, and a task that
    ends after the reconnect rejects or acks its message on it. Each needs a Redis client, and
    building one reads the detached connection's parameters: AttributeError. That is not a
    connection error, so Celery logs "Unrecoverable error" and the worker stops consuming for
    good while its process lives on. Raise the connection error this is: Celery then logs it
    and reconnects, and the messages stay in kombu's ``unacked`` hash in Redis, handed out
    again after the visibility timeout.
    """
    channel = kombu_redis.Channel
    if getattr(channel._connparams, "_relay", False):
        return
    original = channel._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection of this channel is closed")
        return original(self, asynchronous)

    _connparams._relay = True  # type: ignore[attr-defined]
    channel._connparams = _connparams  # type: ignore[method-assign]


_detached_channel_is_a_connection_error()


def create_app(config: Config, scheduler: bool = True) -> Celery:
    app = Celery("relay", broker=config.redis.url, set_as_current=False)
    app.conf.update(
        task_default_queue=config.worker.queue,
        task_ignore_result=True,
        # At-least-once: a task is acknowledged only once it has leased its attempts, and a
        # task whose process died is handed out again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=False,
        worker_prefetch_multiplier=8,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": config.worker.visibility_timeout,
            # Sweep for tasks of dead workers every 5 s (kombu's default sweep is ~100 s).
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
        },
        worker_enable_remote_control=True,
    )
    app.relay_config = config  # type: ignore[attr-defined]
    app.relay_scheduler = scheduler  # type: ignore[attr-defined]

    @app.task(name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def deliver(self: Any, event_id: str | list[str], subscribers: list[str] | None,
                attempt: int, batch: str | None = None) -> int:
        """Lease and start the attempts for one event or a batch of them (to every matching
        subscriber, or to those named)."""
        try:
            return get_engine(config).start(event_id, subscribers, attempt, batch)
        except (RedisError, OSError) as exc:
            # Not acknowledged: back to the queue, tried again once Redis answers.
            raise Reject(repr(exc), requeue=True) from exc

    app.steps["worker"].add(SchedulerStep)
    return app


class SchedulerStep(bootsteps.StartStopStep):
    """Runs the retry scheduler in the worker's main process, beside the pool."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.scheduler: Scheduler | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        app = worker.app
        if not getattr(app, "relay_scheduler", True):
            return
        import redis

        config: Config = app.relay_config
        client = redis.Redis.from_url(config.redis.url, socket_connect_timeout=2,
                                      socket_timeout=10)
        self.scheduler = Scheduler(client, Keys(queue=config.worker.queue),
                                   redeliver_after=config.worker.visibility_timeout)
        self.scheduler.start()
        log.info("scheduler started")

    def stop(self, worker: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()


@signals.setup_logging.connect
def _json_logs(loglevel: int | str | None = None, **_: Any) -> None:
    """JSON lines under ``celery -A workers.app worker`` too (Celery then leaves logging alone)."""
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or "INFO")
    setup_logging(str(level))


@signals.worker_process_init.connect
@signals.worker_ready.connect
def _freeze_startup_objects(**_: Any) -> None:
    """Pool processes once forked, the main process once ready (relay/gcfreeze.py: why)."""
    log.debug("startup objects frozen", extra={"objects": freeze_startup_objects()})


@signals.worker_process_shutdown.connect
def _drain_child(**_: Any) -> None:
    shutdown_engine(timeout=30)


@signals.worker_shutdown.connect
def _drain_main(**_: Any) -> None:
    shutdown_engine(timeout=30)


def run_worker(config: Config, concurrency: int | None = None, pool: str | None = None,
               queue: str | None = None, scheduler: bool = True, log_level: str = "INFO") -> None:
    app = create_app(config, scheduler=scheduler)
    argv = [
        "worker",
        f"--loglevel={log_level}",
        f"--pool={pool or config.worker.pool}",
        f"--concurrency={concurrency or config.worker.concurrency}",
        f"--queues={queue or config.worker.queue}",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    app.worker_main(argv)


_default: Celery | None = None


def __getattr__(name: str) -> Celery:
    """``celery -A workers.app`` finds ``app`` here, built from RELAY_CONFIG on first use."""
    global _default
    if name in ("app", "celery"):
        if _default is None:
            _default = create_app(load_config(config_path()),
                                  scheduler=os.environ.get("RELAY_SCHEDULER", "1") != "0")
        return _default
    raise AttributeError(name)
