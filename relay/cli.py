"""The ``relay`` command line. ``--config PATH`` goes before or after the command name.

This module is the composition root: it may start worker-side code, which the ingress modules
never import (data flows HTTP -> Redis -> worker -> HTTP).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from relay.config import Config, config_path, load_config
from relay.errors import ConfigError, EnvelopeError
from relay.logs import setup_logging

_CONFIG_HELP = "YAML config file (default: $RELAY_CONFIG or config/relay.yaml)."


def with_config(func: Callable[..., Any]) -> Callable[..., Any]:
    """Accept ``--config`` after the command name too; it wins over one given before it."""

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


def get_config() -> Config:
    """Load the config chosen on the command line; a bad one ends the command with exit 2."""
    ctx = click.get_current_context()
    path = config_path(ctx.find_root().obj.get("config_file"))
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"error: invalid config: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", default=None, metavar="PATH", help=_CONFIG_HELP)
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def main(ctx: click.Context, config_file: str | None, log_level: str) -> None:
    """Order-event relay: Ingram Micro webhooks in, re-signed deliveries out."""
    ctx.obj = {"config_file": config_file, "log_level": log_level}
    setup_logging(log_level)


@main.command("check-config")
@with_config
def check_config() -> None:
    """Validate the YAML and print the subscribers it routes to."""
    config = get_config()
    click.echo(f"{config.source}: OK")
    click.echo(f"redis: {_redact_url(config.redis.url)}")
    click.echo(f"ingress: {len(config.ingress.secrets)} secret(s), max body "
               f"{config.ingress.max_body_bytes} bytes, dedupe window "
               f"{config.ingress.dedupe_window:g}s")
    click.echo(f"subscribers: {len(config.subscribers)}")
    for sub in config.subscribers:
        topics = ", ".join(sub.topics) or "*"
        types = ", ".join(sub.event_types) or "*"
        click.echo(f"  - {sub.name}: {sub.url} [signature={sub.signature}] topics={topics} "
                   f"event_types={types} timeout={sub.timeout:g}s "
                   f"max_attempts={sub.max_attempts}")


def _redact_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


@main.command()
@with_config
@click.option("--host", default=None, help="Address to bind (default: ingress.host).")
@click.option("--port", default=None, type=int, help="Port to bind (default: ingress.port).")
def ingress(host: str | None, port: int | None) -> None:
    """Run the HTTP ingress."""
    from relay.ingress.app import run_ingress

    run_ingress(get_config(), host, port)


@main.command()
@with_config
@click.option("--concurrency", "-c", type=int, default=None,
              help="Worker processes (default: worker.concurrency).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default=None,
              help="Celery pool (default: worker.pool).")
@click.option("--queues", "-Q", default=None, help="Queue to consume (default: worker.queue).")
@click.option("--no-scheduler", is_flag=True, help="Do not move due retries in this worker.")
def worker(concurrency: int | None, pool: str | None, queues: str | None,
           no_scheduler: bool) -> None:
    """Run the Celery worker, with the scheduler that moves due retries."""
    config = get_config()
    from workers.app import run_worker

    run_worker(config, concurrency=concurrency, pool=pool, queue=queues,
               scheduler=not no_scheduler, log_level=click.get_current_context()
               .find_root().obj["log_level"])


@main.command()
@with_config
@click.option("--host", default=None, help="Ingress address (default: ingress.host).")
@click.option("--port", default=None, type=int, help="Ingress port (default: ingress.port).")
@click.option("--with-sink", is_flag=True,
              help="Also run the demo sink on 127.0.0.1 (relay.dev.yaml routes to port 9100).")
@click.option("--sink-port", default=9100, show_default=True, type=int,
              help="Port of the demo sink started by --with-sink.")
def up(host: str | None, port: int | None, with_sink: bool, sink_port: int) -> None:
    """Run ingress, worker and scheduler together (starts redis-server under ./var/ if needed)."""
    config = get_config()
    from relay.up import run_up

    sys.exit(run_up(config, host=host, port=port, with_sink=with_sink, sink_port=sink_port,
                    log_level=click.get_current_context().find_root().obj["log_level"]))


@main.command()
@with_config
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", default=None,
              help="Where to post (default: this config's ingress, /webhooks/ingram).")
@click.option("--secret", default=None,
              help="Signing secret (default: the first of ingress.secrets).")
def send(file: Path, url: str | None, secret: str | None) -> None:
    """Sign FILE as Ingram Micro would and post it; print the answer."""
    from relay.sender import send_payload

    if url is None or secret is None:
        config = get_config()
        url = url or f"http://{config.ingress.host}:{config.ingress.port}/webhooks/ingram"
        secret = secret or config.ingress.secrets[0]
    body = file.read_bytes().rstrip(b"\r\n")
    try:
        result = send_payload(body, url, secret)
    except EnvelopeError as exc:
        click.echo(f"error: {file}: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"error: could not post to {url}: {exc}", err=True)
        sys.exit(1)
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
    from relay.sink import run_sink

    if not secrets:
        try:
            secrets = tuple(s.secret for s in get_config().subscribers)
        except SystemExit:
            secrets = ()
    run_sink(host, port, list(secrets))


@main.group()
def dlq() -> None:
    """Dead letters: deliveries that used up their attempts."""


@dlq.command("list")
@with_config
@click.option("--subscriber", default=None, help="Only this subscriber's.")
@click.option("--limit", default=100, show_default=True, type=int)
def dlq_list(subscriber: str | None, limit: int) -> None:
    """A table: event, subscriber, attempts, last error, when."""
    config = get_config()
    from workers.dlq import format_table, list_dead_letters

    click.echo(format_table(list_dead_letters(config, subscriber=subscriber, limit=limit)))


@dlq.command("replay")
@with_config
@click.option("--subscriber", default=None, help="Only this subscriber's dead letters.")
@click.option("--event", "event_id", default=None, help="Only this event's dead letters.")
def dlq_replay(subscriber: str | None, event_id: str | None) -> None:
    """Queue dead letters again with fresh attempts; prints how many."""
    config = get_config()
    from workers.dlq import replay_dead_letters

    count = replay_dead_letters(config, subscriber=subscriber, event_id=event_id)
    click.echo(f"replayed {count} dead letter(s)")


if __name__ == "__main__":
    main()
