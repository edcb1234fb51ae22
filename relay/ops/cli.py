"""The ``relay`` command line. ``--config PATH`` goes before or after any command name.

This module is the composition root: it may start worker-side code, which the ingress and
admin modules never import (data flows HTTP -> Redis -> worker -> HTTP).

The long-running commands (``ingress``, ``worker``, ``admin``, ``up``) write JSON lines only,
errors included; the others print for people (tables, counts) and errors as ``error: ...``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from relay import clock
from relay.config import Config, config_path, is_loopback, load_config
from relay.errors import ConfigError, EnvelopeError
from relay.logs import setup_logging
from relay.masking import mask_text, mask_url

T = TypeVar("T")
log = logging.getLogger("relay.cli")
_CONFIG_HELP = "YAML config file (default: $RELAY_CONFIG or config/relay.yaml)."
#: Commands whose every output line is a JSON log line.
_SERVERS = ("ingress", "worker", "admin", "up")


def with_config(func: Callable[..., Any]) -> Callable[..., Any]:
    """Accept ``--config`` after the command (or group) name too; the last one given wins."""

    @click.option("--config", "config_file", default=None, metavar="PATH", help=_CONFIG_HELP)
    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, config_file: str | None, **kwargs: Any) -> Any:
        root = ctx.find_root()
        root.obj = root.obj or {}
        if config_file:
            root.obj["config_file"] = config_file
        return ctx.invoke(func, **kwargs)

    return wrapper


def _server() -> bool:
    ctx = click.get_current_context()
    return ctx.info_name in _SERVERS


def fail(message: str, code: int = 2) -> None:
    """End the command: a JSON log line from a server command, ``error: ...`` otherwise."""
    message = mask_text(message)
    if _server():
        log.error(message)
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def get_config() -> Config:
    """Load the config chosen on the command line; a bad one ends the command with exit 2."""
    ctx = click.get_current_context()
    path = config_path(ctx.find_root().obj.get("config_file"))
    try:
        config = load_config(path)
    except ConfigError as exc:
        fail(f"invalid config: {exc}")
        raise  # unreachable: fail exits
    if _server():
        for warning in config.warnings:
            log.warning("config warning", extra={"warning": warning})
    return config


def preflight(config: Config, who: str) -> None:
    """Refuse to start on a Redis where a 202 would not be durable (relay/connections.py)."""
    from relay.connections import PreflightError, sync_client
    from relay.connections import preflight as check

    try:
        with sync_client(config.redis, socket_connect_timeout=2, socket_timeout=5) as client:
            check(config.redis, client, who)
    except PreflightError as exc:
        fail(f"refusing to start: {exc}")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; Redis being away is a one-line error, not a traceback."""
    from redis.exceptions import RedisError

    try:
        return asyncio.run(coro)
    except (RedisError, OSError) as exc:
        fail(f"redis is not reachable: {exc}", 1)
        raise  # unreachable


def _listen(serve: Callable[[], None], host: str, port: int) -> None:
    try:
        serve()
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", default=None, metavar="PATH", help=_CONFIG_HELP)
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def main(ctx: click.Context, config_file: str | None, log_level: str) -> None:
    """Order-event relay: Ingram Micro webhooks in, re-signed deliveries out."""
    ctx.obj = {"config_file": config_file, "log_level": log_level}
    setup_logging(log_level)
    # The worker's Celery side reads it: an explicit level is kept as given (workers/app.py).
    os.environ["RELAY_LOG_LEVEL"] = log_level.upper()


def _log_level() -> str:
    return str(click.get_current_context().find_root().obj["log_level"])


@main.command("check-config")
@with_config
def check_config() -> None:
    """Validate the YAML and print the subscribers it routes to."""
    from relay.connections import describe

    config = get_config()
    click.echo(f"{config.source}: OK")
    click.echo(f"redis: {describe(config.redis)} (prefix {config.redis.prefix!r})")
    click.echo(f"ingress: {len(config.ingress.secrets)} secret(s), max body "
               f"{config.ingress.max_body_bytes} bytes, dedupe window "
               f"{config.ingress.dedupe_window:g}s")
    click.echo(f"admin: {config.admin.host}:{config.admin.port} "
               f"({'token set' if config.admin.token else 'no token: loopback only'})")
    click.echo(f"subscribers: {len(config.subscribers)}")
    for sub in config.subscribers:
        topics = ", ".join(sub.topics) or "*"
        types = ", ".join(sub.event_types) or "*"
        rate = f" rate_limit={sub.rate_limit:g}/s" if sub.rate_limit else ""
        ordered = (f" ordering=by {sub.ordering.by}, on_dead {sub.ordering.on_dead}"
                   if sub.ordering else "")
        click.echo(f"  - {sub.name}: {mask_url(sub.url)} [signature={sub.signature}] "
                   f"topics={topics} event_types={types} timeout={sub.timeout:g}s "
                   f"max_attempts={sub.max_attempts}{rate}{ordered}")
    for alert in config.alerts:
        click.echo(f"alert: {mask_url(alert.url)} [signature={alert.signature}]")
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)


@main.command()
@with_config
@click.option("--host", default=None, help="Address to bind (default: ingress.host).")
@click.option("--port", default=None, type=int, help="Port to bind (default: ingress.port).")
def ingress(host: str | None, port: int | None) -> None:
    """Run the HTTP ingress."""
    from relay.ingress.app import run_ingress

    config = get_config()
    preflight(config, "ingress")
    _listen(lambda: run_ingress(config, host, port), host or config.ingress.host,
            port or config.ingress.port)


@main.command()
@with_config
@click.option("--concurrency", "-c", type=int, default=None,
              help="Worker processes (default: worker.concurrency).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default=None,
              help="Celery pool (default: worker.pool).")
@click.option("--no-scheduler", is_flag=True, help="Do not move due retries in this worker.")
def worker(concurrency: int | None, pool: str | None, no_scheduler: bool) -> None:
    """Run the Celery worker, with the scheduler that moves due retries.

    It consumes the queue named by redis.prefix and worker.queue, the one the ingress and
    the scheduler write to (so there is no -Q: another queue would never be fed)."""
    config = get_config()
    preflight(config, "worker")
    from workers.app import run_worker

    run_worker(config, concurrency=concurrency, pool=pool, scheduler=not no_scheduler,
               log_level=_log_level())


@main.command()
@with_config
@click.option("--host", default=None, help="Address to bind (default: admin.host).")
@click.option("--port", default=None, type=int, help="Port to bind (default: admin.port).")
def admin(host: str | None, port: int | None) -> None:
    """Run the admin console, its JSON API and hub-wide metrics (own listener)."""
    from relay.admin.app import run_admin

    config = get_config()
    bind = host or config.admin.host
    if not config.admin.token and not is_loopback(bind):
        fail(f"admin.token is required to listen on {bind} (not a loopback address)")
    preflight(config, "admin")
    _listen(lambda: run_admin(config, host, port), bind, port or config.admin.port)


@main.command()
@with_config
@click.option("--host", default=None, help="Ingress address (default: ingress.host).")
@click.option("--port", default=None, type=int, help="Ingress port (default: ingress.port).")
@click.option("--admin-port", default=None, type=int,
              help="Admin port (default: admin.port).")
@click.option("--with-sink", is_flag=True,
              help="Also run the demo sink on 127.0.0.1 (relay.dev.yaml routes to port 9100).")
@click.option("--sink-port", default=9100, show_default=True, type=int,
              help="Port of the demo sink started by --with-sink.")
def up(host: str | None, port: int | None, admin_port: int | None, with_sink: bool,
       sink_port: int) -> None:
    """Run ingress, worker, scheduler and admin together (starts redis-server under ./var/
    if the Redis at REDIS_URL is not reachable or fails the preflight)."""
    config = get_config()
    from relay.ops.up import run_up

    sys.exit(run_up(config, host=host, port=port, admin_port=admin_port, with_sink=with_sink,
                    sink_port=sink_port, log_level=_log_level()))


@main.command()
@with_config
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", default=None,
              help="Where to post (default: this config's ingress, /webhooks/ingram).")
@click.option("--secret", default=None,
              help="Signing secret (default: the first of ingress.secrets).")
def send(file: Path, url: str | None, secret: str | None) -> None:
    """Sign FILE as Ingram Micro would and post it; print the answer."""
    from relay.ops.sender import send_payload

    if url is None or secret is None:
        config = get_config()
        url = url or f"http://{config.ingress.host}:{config.ingress.port}/webhooks/ingram"
        secret = secret or config.ingress.secrets[0]
    body = file.read_bytes().rstrip(b"\r\n")
    try:
        result = send_payload(body, url, secret)
    except EnvelopeError as exc:
        fail(f"{file}: {exc}")
    except OSError as exc:
        fail(f"could not post to {url}: {exc}", 1)
    click.echo(f"{result.status} {result.body}")
    sys.exit(0 if 200 <= result.status < 300 else 1)


@main.command()
@with_config
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9100, show_default=True, type=int)
@click.option("--secret", "secrets", multiple=True,
              help="Secret to verify with (repeatable; default: every subscriber's secret).")
def sink(host: str, port: int, secrets: tuple[str, ...]) -> None:
    """A demo subscriber: prints each delivery and whether its signature verifies."""
    from relay.ops.sink import run_sink

    if not secrets:
        try:
            secrets = tuple(s.secret for s in get_config().subscribers)
        except SystemExit:
            secrets = ()
    run_sink(host, port, list(secrets))


# -- operating it ----------------------------------------------------------------------------


def _client(config: Config) -> Any:
    from relay.connections import async_client

    return async_client(config.redis, socket_connect_timeout=3, socket_timeout=15)


def _filters(subscriber: str | None, event_id: str | None, since: str | None,
             until: str | None) -> Any:
    from relay.ops.deadletters import Filters
    from relay.timefmt import parse_time

    try:
        return Filters(subscriber=subscriber, event=event_id, since=parse_time(since),
                       until=parse_time(until))
    except ValueError as exc:
        fail(f"--since/--until: {exc}")


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
            click.option("--subscriber", default=None, help="Only this subscriber's."),
            click.option("--event", "event_id", default=None, help="Only this event's."),
            click.option("--since", default=None,
                         help="Dead-lettered at or after (ISO 8601 or unix seconds)."),
            click.option("--until", default=None, help="Dead-lettered at or before.")]):
        func = option(func)
    return func


@main.group()
@with_config
def dlq() -> None:
    """Dead letters: deliveries that used up their attempts (or could not be made)."""


@dlq.command("list")
@with_config
@_filter_options
@click.option("--limit", default=100, show_default=True, type=int)
def dlq_list(subscriber: str | None, event_id: str | None, since: str | None,
             until: str | None, limit: int) -> None:
    """A table: event, subscriber, attempts, last error, when, reason."""
    from relay.ops.deadletters import DeadLetters
    from relay.ops.tables import dead_letter_table

    config = get_config()
    filters = _filters(subscriber, event_id, since, until)

    async def listing() -> Any:
        async with _client(config) as client:
            return await DeadLetters(client, config).list(filters, limit=limit)

    letters = run(listing())
    if subscriber and config.subscriber(subscriber) is None:
        click.echo(f"note: subscriber {subscriber!r} is not configured"
                   + (" (these dead letters are from before it was removed)" if letters
                      else ""), err=True)
        if not letters:
            sys.exit(2)
    click.echo(dead_letter_table(letters))


@dlq.command("replay")
@with_config
@_filter_options
@click.option("--dry-run", is_flag=True, help="Only count what would be replayed.")
def dlq_replay(subscriber: str | None, event_id: str | None, since: str | None,
               until: str | None, dry_run: bool) -> None:
    """Queue dead letters again with fresh attempts; prints how many."""
    from relay.ops.deadletters import DeadLetters, UnknownSubscriber

    config = get_config()
    filters = _filters(subscriber, event_id, since, until)

    async def replay() -> dict[str, Any]:
        async with _client(config) as client:
            letters = DeadLetters(client, config)
            first = await letters.replay(filters, dry_run=True)
            if dry_run or not first["remaining"]:
                return first
            total, done = first["remaining"], {"replayed": 0, "failed": 0}
            # In chunks, with a progress bar on long replays (on stderr: stdout stays a count).
            # Each chunk starts where the last ended: letters that cannot be replayed are
            # passed once, not tried again by every chunk.
            after = None
            with click.progressbar(length=total, label="replaying", file=sys.stderr,
                                   hidden=total < PROGRESS_FROM) as bar:
                while True:
                    step = await letters.replay(filters, limit=REPLAY_CHUNK, after=after)
                    done["replayed"] += step["replayed"]
                    done["failed"] += step["failed"]
                    bar.update(step["replayed"] + step["failed"])
                    after = step["next"]
                    if not after:
                        break
            return {**first, **done}

    try:
        result = run(replay())
    except UnknownSubscriber as exc:
        fail(f"{exc}; nothing replayed (`relay dlq list --subscriber {subscriber}` shows its "
             f"letters, `relay dlq purge --subscriber {subscriber}` deletes them)")
    skipped = (f"; {result['skipped']} of subscribers no longer configured left as they are"
               if result["skipped"] else "")
    failed = (f"; {result['failed']} could not be (their event has expired)"
              if result["failed"] else "")
    if dry_run:
        click.echo(f"{result['remaining']} dead letter(s) would be replayed{skipped}")
    else:
        click.echo(f"replayed {result['replayed']} dead letter(s){failed}{skipped}")


#: Replays of more letters than this show a progress bar; each step replays a chunk.
PROGRESS_FROM = 200
REPLAY_CHUNK = 100


@dlq.command("purge")
@with_config
@_filter_options
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
def dlq_purge(subscriber: str | None, event_id: str | None, since: str | None,
              until: str | None, dry_run: bool) -> None:
    """Delete dead letters (they also expire with redis.retention)."""
    from relay.ops.deadletters import DeadLetters

    config = get_config()
    filters = _filters(subscriber, event_id, since, until)

    async def purge() -> dict[str, int]:
        async with _client(config) as client:
            return await DeadLetters(client, config).purge(filters, dry_run=dry_run)

    result = run(purge())
    if dry_run:
        click.echo(f"{result['matched']} dead letter(s) would be deleted")
    else:
        click.echo(f"deleted {result['deleted']} dead letter(s)")


@main.group()
@with_config
def events() -> None:
    """Events: one event's timeline, finding events, sending one again."""


@events.command("show")
@with_config
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="The admin API's JSON instead.")
def events_show(event_id: str, as_json: bool) -> None:
    """The timeline of one event: received, then every attempt per subscriber."""
    from relay.ops.tables import timeline

    width = shutil.get_terminal_size().columns
    _show(lambda events: events.detail(event_id), lambda found: timeline(found, width), as_json)


def _show(read: Callable[[Any], Coroutine[Any, Any, dict[str, Any]]],
          render: Callable[[dict[str, Any]], str], as_json: bool) -> None:
    """Print what ``read`` finds through the timeline read model (``Events``), as the admin
    API's JSON or as ``render`` lays it out; exit 1 with its message when it is not found."""
    import msgspec

    from relay.ops.timeline import Events, NotFound

    config = get_config()

    async def find() -> dict[str, Any]:
        async with _client(config) as client:
            return await read(Events(client, config))

    try:
        found = run(find())
    except NotFound as exc:
        fail(str(exc), 1)
    click.echo(msgspec.json.format(msgspec.json.encode(found)).decode() if as_json
               else render(found))


@events.command("list")
@with_config
@click.option("--subscriber", default=None)
@click.option("--state", type=click.Choice(["delivered", "pending", "retrying", "dead",
                                            "paused", "waiting"]), default=None)
@click.option("--order", default=None, help="An Ingram order number.")
@click.option("--since", default=None, help="Received at or after (ISO 8601 or unix seconds).")
@click.option("--until", default=None, help="Received at or before.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 500))
def events_list(subscriber: str | None, state: str | None, order: str | None,
                since: str | None, until: str | None, limit: int) -> None:
    """Events, newest first, with each subscriber's delivery state."""
    from relay.ops.tables import event_table
    from relay.ops.timeline import Events
    from relay.timefmt import parse_time

    config = get_config()
    try:
        low, high = parse_time(since), parse_time(until)
    except ValueError as exc:
        fail(f"--since/--until: {exc}")

    async def find() -> list[dict[str, Any]]:
        async with _client(config) as client:
            found, _ = await Events(client, config).find(
                subscriber=subscriber, state=state, order=order, since=low, until=high,
                limit=limit)
            return found

    click.echo(event_table(run(find())))


@events.command("resend")
@with_config
@click.argument("event_id")
@click.option("--subscriber", default=None, help="Only to this subscriber.")
def events_resend(event_id: str, subscriber: str | None) -> None:
    """Deliver a stored event again, even if it was delivered before."""
    from relay.ops.timeline import Events, NotFound

    config = get_config()

    async def resend() -> int:
        async with _client(config) as client:
            return await Events(client, config).resend(event_id, subscriber)

    try:
        queued = run(resend())
    except NotFound as exc:
        fail(str(exc))
    click.echo(f"queued {event_id} for {queued} subscriber(s)")


@main.group()
@with_config
def orders() -> None:
    """Orders: every event of an Ingram order number and where each subscriber stands."""


@orders.command("show")
@with_config
@click.argument("number")
@click.option("--json", "as_json", is_flag=True, help="The admin API's JSON instead.")
def orders_show(number: str, as_json: bool) -> None:
    """Every event of one order, oldest first, with each subscriber's state."""
    from relay.ops.tables import order_report

    _show(lambda events: events.order(number), order_report, as_json)


@main.command()
@with_config
def status() -> None:
    """The hub's health: overview, then one row per subscriber."""
    from relay.ops.status import Status
    from relay.ops.tables import status_report

    config = get_config()

    async def read() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with _client(config) as client:
            view = Status(client, config)
            return await view.overview(), await view.subscribers()

    overview, subscribers = run(read())
    click.echo(status_report(overview, subscribers))


@main.group()
@with_config
def subscribers() -> None:
    """Pause and resume subscribers."""


@subscribers.command("pause")
@with_config
@click.argument("name")
def subscribers_pause(name: str) -> None:
    """Stop posting to NAME; its attempts are held (not counted, not dead-lettered)."""
    _pause_or_resume(name, pause=True)


@subscribers.command("resume")
@with_config
@click.argument("name")
def subscribers_resume(name: str) -> None:
    """Post to NAME again (also re-enables a disabled one); what was held flows."""
    _pause_or_resume(name, pause=False)


def _pause_or_resume(name: str, pause: bool) -> None:

    from relay import health
    from relay.keys import Keys

    config = get_config()
    if config.subscriber(name) is None:
        fail(f"subscriber {name!r} is not configured")

    async def act() -> int:
        async with _client(config) as client:
            now = clock.now_ms()
            if pause:
                await health.pause(client, Keys.of(config), name, now)
                return 0
            return await health.resume(client, Keys.of(config), name, now)

    released = run(act())
    click.echo(f"paused {name}" if pause
               else f"resumed {name}; {released} held attempt(s) released")


if __name__ == "__main__":
    main()
