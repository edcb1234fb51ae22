"""Redis connections for every part of the hub, plain or through Redis Sentinel, and the
preflight that refuses a Redis on which a 202 would not be durable.

One place builds clients from ``redis`` settings so the ingress, the workers (their Celery
broker too), the scheduler, the admin and the CLI all follow a Sentinel failover the same way:
redis-py's ``SentinelConnectionPool`` asks the Sentinels for the master on every new
connection and drops connections to a master that became a replica (``READONLY``), so a
failover costs the requests in flight, never a restart.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from relay.config import RedisSettings
from relay.errors import RelayError
from relay.masking import mask_url

log = logging.getLogger("relay.redis")

#: The scheduler's ``ZRANGE ... BYSCORE LIMIT`` and ``LPOS`` need Redis 6.2.
MIN_VERSION = (6, 2)
#: Connect and read timeout (s) towards a sentinel, unless the caller gives its own.
SENTINEL_TIMEOUT = 2.0


class PreflightError(RelayError):
    """The Redis fails a durability check; the message says which setting and how to fix it."""


def _url_params(url: str) -> dict[str, Any]:
    """Password, username, db and TLS from ``redis.url`` (its host is used only without
    Sentinel: with Sentinel the URL is ``redis://:pw@/0``)."""
    parts = urlsplit(url)
    params: dict[str, Any] = {}
    if parts.password:
        params["password"] = unquote(parts.password)
    if parts.username:
        params["username"] = unquote(parts.username)
    db = parts.path.lstrip("/")
    params["db"] = int(db) if db.isdigit() else 0
    if parts.scheme == "rediss":
        params["ssl"] = True
    return params


def _sentinel_hosts(settings: RedisSettings) -> list[tuple[str, int]]:
    assert settings.sentinel is not None
    hosts = []
    for entry in settings.sentinel.hosts:
        host, _, port = entry.rpartition(":")
        hosts.append((host, int(port)))
    return hosts


def _sentinel_kwargs(settings: RedisSettings, options: dict[str, Any],
                     retry: Retry | AsyncRetry) -> dict[str, Any]:
    """Options of the connections to the sentinels themselves.

    ``retry``: none. redis-py retries a connection 3 times with backoff by default, and asks
    the next sentinel only once one has failed for good: a sentinel that is down (its machine
    lost: the very case Sentinel is for) cost every discovery of the primary ~4 s when it
    refused connections and ~12 s when it did not answer at all, before the next sentinel was
    asked (tests/test_connections.py). The other sentinels are the retry.
    """
    assert settings.sentinel is not None
    kwargs: dict[str, Any] = {k: v for k, v in options.items()
                              if k in ("socket_connect_timeout", "socket_timeout")}
    kwargs.setdefault("socket_connect_timeout", SENTINEL_TIMEOUT)
    kwargs.setdefault("socket_timeout", SENTINEL_TIMEOUT)
    kwargs["retry"] = retry
    if settings.sentinel.password:
        kwargs["password"] = settings.sentinel.password
    return kwargs


def async_client(settings: RedisSettings, **options: Any) -> aioredis.Redis:
    """An asyncio client of the hub's Redis (the Sentinel master when Sentinel is set)."""
    if settings.sentinel is None:
        return aioredis.Redis.from_url(settings.url, **options)
    params = {**_url_params(settings.url), **options}
    sentinel = AsyncSentinel(_sentinel_hosts(settings), sentinel_kwargs=_sentinel_kwargs(
        settings, options, AsyncRetry(NoBackoff(), 0)), **params)
    return sentinel.master_for(settings.sentinel.master, **params)


def sync_client(settings: RedisSettings, **options: Any) -> redis.Redis:
    """A blocking client of the hub's Redis (the Sentinel master when Sentinel is set)."""
    if settings.sentinel is None:
        return redis.Redis.from_url(settings.url, **options)
    params = {**_url_params(settings.url), **options}
    sentinel = Sentinel(_sentinel_hosts(settings), sentinel_kwargs=_sentinel_kwargs(
        settings, options, Retry(NoBackoff(), 0)), **params)
    return sentinel.master_for(settings.sentinel.master, **params)


def celery_broker(settings: RedisSettings) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options it needs for these settings."""
    if settings.sentinel is None:
        return settings.url, {}
    parts = urlsplit(settings.url)
    auth = ""
    if parts.password:
        # Quoted afresh: kombu splits the broker URL at every ';' (one URL per sentinel)
        # *before* parsing each, so a ';' left as is in a password (which redis-py, reading
        # redis.url, accepts) cut the URL apart and the worker died on start ("Port could not
        # be cast to integer"). kombu unquotes what it parses; redis-py gets the same password.
        user = quote(unquote(parts.username or ""), safe="")
        auth = f"{user}:{quote(unquote(parts.password), safe='')}@"
    db = parts.path.lstrip("/") or "0"
    url = ";".join(f"sentinel://{auth}{host}/{db}" for host in settings.sentinel.hosts)
    # kombu hands sentinel_kwargs to redis-py's Sentinel as is (the same reasons as above).
    options: dict[str, Any] = {"master_name": settings.sentinel.master,
                               "sentinel_kwargs": _sentinel_kwargs(settings, {},
                                                                   Retry(NoBackoff(), 0))}
    return url, options


def describe(settings: RedisSettings) -> str:
    """Where the hub's Redis is, for logs and messages (credentials masked)."""
    if settings.sentinel is None:
        return mask_url(settings.url)
    return (f"sentinel master {settings.sentinel.master!r} via "
            f"{', '.join(settings.sentinel.hosts)}")


# -- preflight ------------------------------------------------------------------------------


def problems(info: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(fatal, unsafe)`` findings from ``INFO``: fatal ones always refuse; unsafe ones
    refuse unless ``redis.allow_unsafe``."""
    fatal, unsafe = [], []
    version = str(info.get("redis_version", "0"))
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if numbers < MIN_VERSION:
        fatal.append(f"Redis {version} is older than 6.2, which the hub needs (the retry "
                     f"scheduler uses ZRANGE BYSCORE LIMIT and LPOS): upgrade Redis")
    if int(info.get("aof_enabled", 0)) != 1:
        unsafe.append("appendonly is no: an accepted event would not survive a Redis restart; "
                      "set 'appendonly yes' in redis.conf (or CONFIG SET appendonly yes, then "
                      "CONFIG REWRITE)")
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        unsafe.append(f"maxmemory-policy is {policy}: Redis may evict queued events and "
                      f"retries when full; set 'maxmemory-policy noeviction'")
    return fatal, unsafe


def fsync_risk(appendfsync: str) -> str | None:
    """What a host crash (power, kernel panic) costs with this ``appendfsync``; None for
    ``always``. Not refused: many run ``everysec`` knowingly; the operator is told once."""
    if appendfsync == "always":
        return None
    if appendfsync == "everysec":
        lost = "up to about a second of events"
    else:
        lost = "every event the operating system had not yet written (often up to 30 s)"
    return (f"appendfsync is {appendfsync}: a crash of the Redis host loses {lost} that the "
            f"ingress already answered 202; set 'appendfsync always' for a 202 that survives "
            f"it (docs/reliability.md)")


def _appendfsync(client: redis.Redis) -> str | None:
    """Redis's ``appendfsync``, or None where ``CONFIG`` is not allowed (managed Redis)."""
    try:
        value = client.config_get("appendfsync").get("appendfsync")
    except (redis.RedisError, OSError):
        return None
    return text(value) if value is not None else None


def preflight(settings: RedisSettings, client: redis.Redis, who: str) -> None:
    """Refuse (PreflightError) a Redis on which the hub cannot keep its promises.

    A Redis that does not answer is not refused here: the process starts, answers 503 /
    waits, and recovers when Redis comes (the fault suite relies on it); it is checked the
    next time the process starts.
    """
    try:
        info = client.info()
    except (redis.RedisError, OSError) as exc:
        log.warning("redis preflight skipped: redis is not reachable",
                    extra={"who": who, "redis": describe(settings), "error": repr(exc)})
        return
    fatal, unsafe = problems(info)
    where = describe(settings)
    if fatal:
        raise PreflightError(f"{where}: {'; '.join(fatal)}")
    if unsafe and not settings.allow_unsafe:
        raise PreflightError(f"{where}: {'; '.join(unsafe)} (or set redis.allow_unsafe: true "
                             f"to start anyway, at your own risk)")
    for problem in unsafe:
        log.warning("unsafe redis (allowed by redis.allow_unsafe)",
                    extra={"who": who, "redis": where, "problem": problem})
    if int(info.get("aof_enabled", 0)) == 1:
        fsync = _appendfsync(client)
        risk = fsync_risk(fsync) if fsync is not None else None
        if risk:
            log.warning("redis fsyncs its append-only file lazily: a host crash loses "
                        "accepted events", extra={"who": who, "redis": where,
                                                  "appendfsync": fsync, "problem": risk})


def text(value: Any) -> str:
    """A reply as text. redis-py types replies as ``bytes | str`` whatever the client; ours
    never set ``decode_responses``, so they are bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def as_bytes(value: bytes | str) -> bytes:
    """A reply as bytes (see ``text``): what msgspec decoders take."""
    return value if isinstance(value, bytes) else value.encode()
