"""The Celery app. ``relay worker`` runs it; so does ``celery -A workers.app worker``.

With plain ``celery -A workers.app``, the config comes from ``RELAY_CONFIG`` (default
``config/relay.yaml``), including ``worker.pool``, ``worker.concurrency`` and the queue (a
``-c``/``-P`` given on that command line still wins, as Celery does), and the scheduler runs in
every worker unless ``RELAY_SCHEDULER=0``. Both print JSON lines only: no banner, relay's own
delivery lines at INFO whatever Celery's ``-l``.

Signals, in every pool:

* SIGTERM (to the main process or to its whole process group, as systemd and ``relay up``
  send it): warm shutdown. Pool children ignore SIGTERM themselves (Celery resets it to
  "die" in them, which cut in-flight posts); the main process stops taking tasks and each
  child drains its posts (up to their timeout) before it exits.
* SIGHUP: reload the config (relay/reload.py). The main process validates and applies it,
  then bumps a counter it shares with its pool children; a child reloads before its next
  task when the counter has moved. (Children cannot keep a SIGHUP handler of their own:
  billiard resets SIGHUP in them to "exit" right after Celery's initialiser, so a SIGHUP to
  the whole process group killed them. They ignore it, and follow the counter.)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

import kombu
from celery import Celery, bootsteps, signals
from celery.apps import worker as celery_worker
from celery.exceptions import Reject
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from relay.config import Config, config_path, load_config
from relay.connections import PreflightError, celery_broker, preflight, sync_client
from relay.gcfreeze import freeze_startup_objects
from relay.keys import Keys
from relay.logs import setup_logging
from relay.queue import DELIVER_TASK
from relay.reload import Reloader
from workers.engine import current_engine, get_engine, shutdown_engine
from workers.heartbeat import Heartbeat
from workers.scheduler import Scheduler

log = logging.getLogger("relay.worker")

#: The kombu this module's two kombu-specific parts were written and tested against.
KOMBU_TESTED = (5, 7)


def _check_kombu() -> None:
    """Fail loudly at start, not silently later, if the kombu internals relied on are gone:
    ``Channel._connparams`` (patched below) and the ``unacked_restore_interval`` transport
    option (without it kombu sweeps for a dead worker's tasks every ~100 s, and the two-minute
    recovery promise breaks)."""
    missing = []
    if not callable(getattr(kombu_redis.Channel, "_connparams", None)):
        missing.append("kombu.transport.redis.Channel._connparams")
    if "unacked_restore_interval" not in kombu_redis.Channel.from_transport_options:
        missing.append("the 'unacked_restore_interval' transport option")
    if missing or tuple(kombu.VERSION[:2]) < KOMBU_TESTED:
        raise RuntimeError(
            f"kombu {kombu.__version__} lacks what the hub relies on "
            f"({', '.join(missing) or 'needs 5.7 or newer'}): install kombu>=5.7")


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


def _say_as_json(msg: str, file: Any = None) -> None:
    """Celery prints a few lines itself ("worker: Warm shutdown (MainProcess)") with
    ``safe_say`` to stdout; every line the hub writes is JSON, so they go to the log."""
    log.info(str(msg).strip())


_check_kombu()
_detached_channel_is_a_connection_error()
celery_worker.safe_say = _say_as_json  # type: ignore[assignment]

#: The config this process runs on now (a reload replaces it; tasks read it from here).
_live: dict[str, Config] = {}
#: Reloads applied by the main process, in memory shared with the pool children it forks.
_generation = multiprocessing.Value("L", 0, lock=False)
#: In a pool child: the generation it runs and how it reloads.
_child: dict[str, object] = {}


def live_config() -> Config:
    return _live["config"]


def create_app(config: Config, scheduler: bool = True) -> Celery:
    _live["config"] = config
    broker, transport = celery_broker(config.redis)
    app = Celery("relay", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=Keys.of(config).queue,
        task_ignore_result=True,
        # At-least-once: a task whose process died is handed out again. (A task returns once
        # it has handed its events to the delivery loop; until their leases are written, its
        # message stays noted in ``unclaimed`` and is queued again if the process dies:
        # workers/engine.py Engine.start.)
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=False,
        worker_prefetch_multiplier=8,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Also for plain ``celery -A workers.app worker`` (its -c / -P still win).
        worker_concurrency=config.worker.concurrency,
        worker_pool=config.worker.pool,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            **transport,
            "visibility_timeout": config.worker.visibility_timeout,
            # Sweep for tasks of dead workers every 5 s (kombu's default sweep is ~100 s).
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
        },
        worker_enable_remote_control=True,
    )
    app.relay_scheduler = scheduler  # type: ignore[attr-defined]

    @app.task(name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def deliver(self: Any, event_id: str | list[str], subscribers: list[str] | None,
                attempt: int, batch: str | None = None, trigger: str | None = None) -> None:
        """Lease and start the attempts for one event or a batch of them (to every matching
        subscriber, or to those named): handed to this process's delivery loop. ``trigger``:
        what an operator asked for (``resend``, ``replay``), recorded with the attempt."""
        _catch_up()
        try:
            get_engine(live_config()).start(event_id, subscribers, attempt, batch, trigger)
        except (RedisError, OSError) as exc:
            # Not acknowledged: back to the queue, tried again once Redis answers.
            raise Reject(repr(exc), requeue=True) from exc

    app.steps["worker"].add(MainProcessStep)
    return app


class MainProcessStep(bootsteps.StartStopStep):
    """In the worker's main process: the retry scheduler, the heartbeat, SIGHUP reload."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.scheduler: Scheduler | None = None
        self.heartbeat: Heartbeat | None = None
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        config = live_config()
        client = sync_client(config.redis, socket_connect_timeout=2, socket_timeout=10)
        keys = Keys.of(config)
        if getattr(worker.app, "relay_scheduler", True):
            self.scheduler = Scheduler(client, keys,
                                       redeliver_after=config.worker.visibility_timeout,
                                       stats_ttl=config.redis.retention,
                                       retention=config.redis.retention)
            self.scheduler.start()
            log.info("scheduler started")
        self.heartbeat = Heartbeat(client, keys, [s.name for s in config.subscribers],
                                   [s.name for s in config.subscribers if s.ordering],
                                   config.redis.retention)
        self.heartbeat.start()
        reloader = Reloader(config, self._apply, "worker")

        def on_hup(signum: int, frame: Any) -> None:
            if reloader.reload():
                _generation.value += 1  # pool children reload before their next task

        # Replaces Celery's own SIGHUP handler, which re-executes the whole worker.
        signal.signal(signal.SIGHUP, on_hup)

    def _apply(self, config: Config) -> None:
        _live["config"] = config
        if self.heartbeat is not None:
            self.heartbeat.subscribers = [s.name for s in config.subscribers]
            self.heartbeat.ordered = [s.name for s in config.subscribers if s.ordering]
            self.heartbeat.beat()  # note new subscribers as known at once
        engine = current_engine()  # solo and threads pools deliver in this process
        if engine is not None:
            engine.reload(config)

    def stop(self, worker: Any) -> None:
        for part in (self.scheduler, self.heartbeat):
            if part is not None:
                part.stop()


@signals.celeryd_init.connect
def _quiet_and_preflight(instance: Any = None, **_: Any) -> None:
    """No banner (every line is JSON), and refuse a Redis that fails the preflight. Logging is
    set up here already: Celery warns (SecurityWarning) before its own logging setup."""
    setup_logging(os.environ.get("RELAY_LOG_LEVEL", "INFO"))  # set by `relay --log-level`
    if instance is not None:
        instance.quiet = True
    config = _live.get("config")
    if config is None:
        return
    try:
        with sync_client(config.redis, socket_connect_timeout=2, socket_timeout=5) as client:
            preflight(config.redis, client, "worker")
    except PreflightError as exc:
        log.error("refusing to start: redis fails the preflight", extra={"error": str(exc)})
        sys.stderr.flush()
        os._exit(2)


@signals.setup_logging.connect
def _json_logs(loglevel: int | str | None = None, **_: Any) -> None:
    """JSON lines under ``celery -A workers.app worker`` too (Celery then leaves logging alone);
    relay's own lines at INFO at least, whatever Celery's -l."""
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or "INFO")
    setup_logging(str(level))
    relay = logging.getLogger("relay")
    if "RELAY_LOG_LEVEL" not in os.environ and relay.getEffectiveLevel() > logging.INFO:
        # Plain celery without -l defaults to WARNING: deliveries would go unlogged. A level
        # given to `relay --log-level` is kept as given.
        relay.setLevel(logging.INFO)


@signals.worker_process_init.connect
def _child_signals(**_: Any) -> None:
    """In a prefork child: SIGTERM and SIGHUP are the main process's to act on (it drains
    us on the one and tells us to reload on the other); ignoring them here survives
    billiard's reset of the signals it would otherwise make fatal."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _child.update(generation=_generation.value,
                  reloader=Reloader(live_config(), _apply_in_child, "worker child"))


@signals.worker_process_init.connect
def _start_engine_in_child(**_: Any) -> None:
    """A prefork child starts its delivery loop at once, not with its first task: the loop's
    puller takes released ordered events (``ordready:{sub}``) and parked attempts that a
    worker killed after writing them left behind, and with nothing queued no task would ever
    come to start it (seen in tests/fault/test_ordering_faults.py: an order's last events
    waited for good). In a thread: the child must finish its start-up within billiard's
    alive timeout whatever Redis does; a task arriving meanwhile shares the same engine."""
    threading.Thread(target=_start_engine, name="relay-engine-start", daemon=True).start()


@signals.worker_ready.connect
def _start_engine_in_main(**_: Any) -> None:
    """The solo and threads pools deliver in the main process: its loop starts at once too."""
    if live_config().worker.pool != "prefork":
        threading.Thread(target=_start_engine, name="relay-engine-start", daemon=True).start()


def _start_engine() -> None:
    try:
        get_engine(live_config())
    except Exception as exc:  # the first task starts it instead
        log.warning("delivery loop not started before the first task",
                    extra={"error": repr(exc)})


def _catch_up() -> None:
    """In a pool child, before a task: apply the reloads the main process applied."""
    if _child and _child["generation"] != _generation.value:
        _child["generation"] = _generation.value
        _child["reloader"].reload()  # type: ignore[attr-defined]


def _apply_in_child(config: Config) -> None:
    _live["config"] = config
    engine = current_engine()
    if engine is not None:
        engine.reload(config)


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
               scheduler: bool = True, log_level: str = "INFO") -> None:
    app = create_app(config, scheduler=scheduler)
    argv = [
        "worker",
        f"--loglevel={log_level}",
        f"--pool={pool or config.worker.pool}",
        f"--concurrency={concurrency or config.worker.concurrency}",
        f"--queues={Keys.of(config).queue}",
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
