"""The YAML configuration, loaded into msgspec Structs.

Loading does three things a plain ``yaml.safe_load`` cannot:

* ``${VAR}`` and ``${VAR:-default}`` are replaced from the environment. They are swapped for
  inert tokens *before* YAML parses the text and filled in *after*, so a secret containing
  ``:``, ``#`` or ``]`` cannot change the document's structure, and the documented
  ``secrets: [${INGRAM_WEBHOOK_SECRET}]`` (which YAML alone refuses: ``{`` is a flow indicator)
  parses.
* Durations are written ``500ms``, ``10s``, ``5m``, ``2h``, ``7d`` and become seconds.
* Every error names the file, the key path and what is wrong; unknown keys are errors, so a
  typo such as ``max_attemps`` never passes silently.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from relay.errors import ConfigError
from relay.hosts import split_host
from relay.masking import mask_url

DEFAULT_CONFIG_PATH = "config/relay.yaml"
#: When set, replaces ``redis.url`` (and turns Sentinel off): ``relay up`` uses it to point
#: the processes it starts at the Redis it started.
REDIS_URL_OVERRIDE = "RELAY_REDIS_URL"

SignatureScheme = Literal["ingram", "standard", "both"]


class Duration(float):
    """A number of seconds, written in YAML as ``500ms``, ``10s``, ``5m``, ``2h`` or ``7d``."""

    _UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    _PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*")

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool):
            raise ValueError(f"expected a duration such as 10s, got {value!r}")
        if isinstance(value, int | float):
            return cls(value)
        if isinstance(value, str):
            match = cls._PATTERN.fullmatch(value)
            if match:
                return cls(float(match.group(1)) * cls._UNITS[match.group(2)])
        raise ValueError(f"expected a duration such as 500ms, 10s, 5m, 2h or 7d, got {value!r}")


class Rate(float):
    """Attempts per second, written in YAML as ``50/s`` or ``120/m``."""

    _PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|m)\s*")

    @classmethod
    def parse(cls, value: object) -> Rate:
        if isinstance(value, str):
            match = cls._PATTERN.fullmatch(value)
            if match:
                per = 1.0 if match.group(2) == "s" else 60.0
                return cls(float(match.group(1)) / per)
        raise ValueError(f"expected a rate such as 50/s or 120/m, got {value!r}")

    def __str__(self) -> str:
        return f"{float(self):g}/s" if self >= 1 else f"{float(self) * 60:g}/m"


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every config Struct: unknown keys are errors."""


class Backoff(_Strict, frozen=True):
    initial: Duration = Duration(5)
    max: Duration = Duration(3600)


class CircuitBreaker(_Strict, frozen=True):
    #: Consecutive failed attempts that open the breaker; 0 turns it off.
    failures: int = 10
    cool_down: Duration = Duration(30)
    max_cool_down: Duration = Duration(600)


class Ordering(_Strict, frozen=True):
    """Per subscriber and key, events are posted in the order the ingress accepted them."""

    #: ``order``: each Ingram order number of the event; ``topic``: the event's topic.
    by: Literal["order", "topic"]
    #: When the key's first event is dead-lettered: ``skip`` lets the next one go; ``block``
    #: holds the key until an operator replays or purges that dead letter.
    on_dead: Literal["skip", "block"] = "skip"


class DeliveryDefaults(_Strict, frozen=True):
    timeout: Duration = Duration(10)
    max_attempts: int = 8
    backoff: Backoff = msgspec.field(default_factory=Backoff)
    circuit_breaker: CircuitBreaker = msgspec.field(default_factory=CircuitBreaker)
    #: Failing without a success for this long disables the subscriber; 0 = never.
    disable_after: Duration = Duration(5 * 86400)
    #: Most attempts started per second, all workers together; None = no limit.
    rate_limit: Rate | None = None
    #: Ordered delivery for every subscriber that does not say otherwise; None = off.
    ordering: Ordering | None = None
    #: With tracing on (OTEL_EXPORTER_OTLP_ENDPOINT, relay/tracing.py), each delivery carries
    #: a W3C ``traceparent`` naming its attempt's span; false sends none.
    propagate_trace: bool = True


class SentinelSettings(_Strict, frozen=True):
    hosts: list[str]
    master: str
    #: The Sentinels' own password, if they have one (the master's is in ``redis.url``).
    password: str | None = None


class RedisSettings(_Strict, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    #: How long event bodies, attempt logs, delivery records and dead letters are kept.
    retention: Duration = Duration(14 * 86400)
    #: Every key starts with this, so hubs with different prefixes share one Redis.
    prefix: str = "relay:"
    #: Start even on a Redis that fails the preflight (no AOF, an evicting policy); warns.
    allow_unsafe: bool = False
    sentinel: SentinelSettings | None = None
    #: The ingress answers 2xx only once this many replicas hold the write (Redis WAIT).
    min_replicas: int = 0
    min_replicas_timeout: Duration = Duration(1)


class IngressSettings(_Strict, frozen=True):
    secrets: list[str]
    #: Ingram splits stock updates at 4,000 SKUs per event: up to ~1.7 MB indented.
    max_body_bytes: int = 4_194_304
    dedupe_window: Duration = Duration(7 * 86400)
    #: A body must arrive within this long (bounds slow-drip senders).
    read_timeout: Duration = Duration(10)
    #: Under a steady stream, writes to Redis start at most this often, so lone requests
    #: are stored (and fanned out, one Celery message per write) together; 0 writes each
    #: at once. Adds at most this much to a 202 and only while events keep arriving.
    linger: Duration = Duration(0.01)
    host: str = "127.0.0.1"
    port: int = 8080


class WorkerSettings(_Strict, frozen=True):
    #: The Celery queue, a Redis list named ``{redis.prefix}{queue}``.
    queue: str = "queue"
    pool: Literal["prefork", "solo", "threads"] = "prefork"
    concurrency: int = 2
    #: Deliveries one worker process holds at once (in memory, each leased in Redis: ~1-2 KB
    #: each), shared equally among subscribers; past its share, a subscriber's attempts are
    #: parked in Redis and pulled back as it has room. Large enough that a burst's batches
    #: fit without parking (4000: p99 202 -> sink at half load 26-33 ms against 158-172 ms
    #: with 1000 in the same bench session, docs/benchmarks.md).
    max_in_flight: int = 4000
    #: Posts *open* at once per worker process, shared equally among subscribers (at least 2
    #: each); a subscriber's other attempts in flight wait their turn in the process. Many
    #: more open posts than this cost every post more CPU (docs/benchmarks.md) and flood
    #: subscribers, without delivering faster.
    max_connections: int = 128
    #: Broker visibility timeout: a task fetched by a worker that died is handed out again
    #: after this long. Kept short so a SIGKILLed worker's tasks come back within two
    #: minutes; tasks here finish in milliseconds, so it is never hit by a live one.
    visibility_timeout: Duration = Duration(60)
    #: Extra time, past a subscriber's timeout, before an unanswered attempt is presumed lost
    #: (its worker died) and scheduled again.
    lease_grace: Duration = Duration(30)


class AdminSettings(_Strict, frozen=True):
    host: str = "127.0.0.1"
    port: int = 8081
    #: Bearer token for every admin route but /healthz; required unless host is loopback.
    token: str = ""
    #: Host names (``name`` for any port, or ``name:port``) the admin answers besides the
    #: loopback names on its own port: the names it is reached by when not on loopback (a
    #: DNS name, a proxy's name, a container's name). Any other ``Host`` gets 421, so a web
    #: page whose name was re-pointed at the admin (DNS rebinding) cannot read it.
    allowed_hosts: list[str] = []


class AlertTarget(_Strict, frozen=True):
    """An operator notification endpoint: receives alerts signed like a delivery."""

    url: str
    secret: str
    signature: SignatureScheme = "ingram"
    headers: dict[str, str] = {}
    timeout: Duration = Duration(10)


class SubscriberSpec(_Strict, frozen=True):
    """A subscriber as written in YAML: delivery settings are optional overrides."""

    name: str
    url: str
    secret: str
    signature: SignatureScheme = "ingram"
    topics: list[str] = []
    event_types: list[str] = []
    headers: dict[str, str] = {}
    timeout: Duration | None = None
    max_attempts: int | None = None
    backoff: Backoff | None = None
    circuit_breaker: CircuitBreaker | None = None
    disable_after: Duration | None = None
    rate_limit: Rate | None = None
    #: ``false`` (or ``off``) turns off an ordering set under ``delivery:`` for this one.
    ordering: Ordering | bool | None = None
    propagate_trace: bool | None = None


class Subscriber(msgspec.Struct, frozen=True, kw_only=True):
    """A subscriber with every delivery setting resolved against the defaults."""

    name: str
    url: str
    secret: str
    signature: SignatureScheme
    topics: tuple[str, ...]
    event_types: tuple[str, ...]
    headers: dict[str, str]
    timeout: float
    max_attempts: int
    backoff: Backoff
    circuit_breaker: CircuitBreaker = msgspec.field(default_factory=CircuitBreaker)
    disable_after: float = 0.0
    rate_limit: float | None = None
    ordering: Ordering | None = None
    propagate_trace: bool = True


class _RawConfig(_Strict, frozen=True):
    ingress: IngressSettings
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    delivery: DeliveryDefaults = msgspec.field(default_factory=DeliveryDefaults)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    alerts: list[AlertTarget] = []
    subscribers: list[SubscriberSpec] = []


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """The whole validated configuration; ``source`` is the file it came from."""

    source: str
    redis: RedisSettings
    ingress: IngressSettings
    delivery: DeliveryDefaults
    worker: WorkerSettings
    subscribers: tuple[Subscriber, ...]
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    alerts: tuple[AlertTarget, ...] = ()
    #: Things that are allowed but unwise (printed by check-config, logged at start).
    warnings: tuple[str, ...] = ()

    def subscriber(self, name: str) -> Subscriber | None:
        for sub in self.subscribers:
            if sub.name == name:
                return sub
        return None


def config_path(explicit: str | None = None) -> str:
    """The file to read: ``--config``, else ``RELAY_CONFIG``, else ``config/relay.yaml``."""
    return explicit or os.environ.get("RELAY_CONFIG") or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Config:
    """Read, substitute, validate. Raises ConfigError naming file, key path and reason."""
    source = str(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    config = parse_config(text, source, os.environ if environ is None else environ)
    override = (os.environ if environ is None else environ).get(REDIS_URL_OVERRIDE)
    if override:
        # ``relay up`` points its processes at the Redis it started (relay/ops/up.py).
        redis = msgspec.structs.replace(config.redis, url=override, sentinel=None)
        config = msgspec.structs.replace(config, redis=redis)
    return config


def parse_config(text: str, source: str, environ: Any) -> Config:
    tokens: dict[str, tuple[str, str | None]] = {}

    def to_token(match: re.Match[str]) -> str:
        token = f"__relay_env_{len(tokens)}__"
        tokens[token] = (match.group(1), match.group(3))
        return token

    tokenised = _ENV_PATTERN.sub(to_token, text)
    try:
        data = yaml.load(tokenised, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}{where}: not valid YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    data = _substitute(data, tokens, environ, source, "")
    try:
        raw = msgspec.convert(data, _RawConfig, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(str(exc))}") from exc
    return _resolve(raw, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (YAML says keys are unique;
    PyYAML would silently keep the last one, dropping e.g. a whole ``delivery:`` section)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # an unhashable key: the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")
_TOKEN_PATTERN = re.compile(r"__relay_env_\d+__")


def _substitute(node: Any, tokens: dict[str, tuple[str, str | None]], environ: Any,
                source: str, path: str) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, tokens, environ, source, f"{path}.{k}" if path else str(k))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, tokens, environ, source, f"{path}[{i}]")
                for i, v in enumerate(node)]
    if isinstance(node, str) and "__relay_env_" in node:

        def fill(match: re.Match[str]) -> str:
            name, default = tokens[match.group(0)]
            value = environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    raise ConfigError(
                        f"{source}: {path}: environment variable {name} is not set "
                        f"(write ${{{name}:-default}} to give a default)")
                return default
            return str(value)

        return _TOKEN_PATTERN.sub(fill, node)
    return node


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return Duration.parse(obj)
    if type_ is Rate:
        return Rate.parse(obj)
    raise NotImplementedError


_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _describe(message: str) -> str:
    """Turn msgspec's 'what - at `$.a.b`' into 'a.b: what'."""
    match = _MSGSPEC_PATH.match(message)
    assert match is not None
    what, path = match.group("what"), (match.group("path") or "").lstrip(".")
    unknown = re.match(r"Object contains unknown field `([^`]+)`", what)
    if unknown:
        key = unknown.group(1)
        return f"{path + '.' if path else ''}{key}: unknown key"
    missing = re.match(r"Object missing required field `([^`]+)`", what)
    if missing:
        key = missing.group(1)
        return f"{path + '.' if path else ''}{key}: required key is missing"
    return f"{path or '(top level)'}: {what}"


# Every pattern below is applied with ``fullmatch``: with ``match``, ``$`` also matches before a
# trailing newline, so ``"erp\n"`` (a value read into ${VAR} from a file) would pass.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_PREFIX = re.compile(r"[^\s]{1,64}")
_SENTINEL_HOST = re.compile(r"[^\s:]+:\d{1,5}")
_QUEUE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")           # HTAB is allowed in values
#: Headers the HTTP client must own: a subscriber setting them would corrupt the request.
_FORBIDDEN_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
#: The hub promises that a killed worker's work is delivered again within two minutes
#: (docs/contract.md).
RECOVERY_PROMISE = 120.0


def _resolve(raw: _RawConfig, source: str) -> Config:
    def fail(path: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {path}: {why}")

    warnings: list[str] = []
    _check_ingress(raw.ingress, fail)
    _check_redis(raw.redis, fail)
    _check_delivery(raw.delivery.timeout, raw.delivery.max_attempts, raw.delivery.backoff,
                    "delivery", fail)
    _check_health(raw.delivery.circuit_breaker, raw.delivery.disable_after,
                  raw.delivery.rate_limit, "delivery", fail)
    _check_worker(raw.worker, fail)
    _check_admin(raw.admin, fail)
    for i, alert in enumerate(raw.alerts):
        _check_endpoint(alert.url, alert.secret, alert.signature, alert.headers, f"alerts[{i}]",
                        fail)
        if alert.timeout <= 0:
            raise fail(f"alerts[{i}].timeout", "must be greater than 0")

    seen: set[str] = set()
    subscribers = []
    for i, spec in enumerate(raw.subscribers):
        where = f"subscribers[{i}]"
        if not _NAME.fullmatch(spec.name):
            raise fail(f"{where}.name", "use 1-64 letters, digits, '.', '_' or '-'")
        if spec.name in seen:
            raise fail(f"{where}.name", f"duplicate subscriber name {spec.name!r}")
        seen.add(spec.name)
        _check_endpoint(spec.url, spec.secret, spec.signature, spec.headers, where, fail)
        d = raw.delivery
        sub = Subscriber(
            name=spec.name, url=spec.url, secret=spec.secret, signature=spec.signature,
            topics=tuple(spec.topics), event_types=tuple(t.lower() for t in spec.event_types),
            headers=dict(spec.headers),
            timeout=spec.timeout if spec.timeout is not None else d.timeout,
            max_attempts=spec.max_attempts if spec.max_attempts is not None else d.max_attempts,
            backoff=spec.backoff or d.backoff,
            circuit_breaker=spec.circuit_breaker or d.circuit_breaker,
            disable_after=(spec.disable_after if spec.disable_after is not None
                           else d.disable_after),
            rate_limit=spec.rate_limit if spec.rate_limit is not None else d.rate_limit,
            ordering=(spec.ordering if isinstance(spec.ordering, Ordering)
                      else None if spec.ordering is False else d.ordering),
            propagate_trace=(spec.propagate_trace if spec.propagate_trace is not None
                             else d.propagate_trace),
        )
        if spec.ordering is True:
            raise fail(f"{where}.ordering", "expected {by: order} or {by: topic} (with on_dead: "
                       "skip or block), or false to turn it off")
        _check_delivery(sub.timeout, sub.max_attempts, sub.backoff, where, fail)
        _check_health(sub.circuit_breaker, sub.disable_after, sub.rate_limit, where, fail)
        _check_trace_headers(sub, where, fail)
        problem = _horizon_problem(raw.redis.retention, sub, where)
        if problem:
            raise fail("redis.retention", problem)
        if sub.timeout + raw.worker.lease_grace > RECOVERY_PROMISE:
            warnings.append(
                f"{where} ({sub.name}): timeout {_fmt(sub.timeout)} + worker.lease_grace "
                f"{_fmt(raw.worker.lease_grace)} is over {_fmt(RECOVERY_PROMISE)}: an attempt "
                f"held by a worker that dies is retried only after that long")
        subscribers.append(sub)
    if raw.redis.allow_unsafe:
        warnings.append("redis.allow_unsafe is true: the Redis preflight only warns")
    return Config(source=source, redis=raw.redis, ingress=raw.ingress, delivery=raw.delivery,
                  worker=raw.worker, admin=raw.admin, alerts=tuple(raw.alerts),
                  subscribers=tuple(subscribers), warnings=tuple(warnings))


def _check_ingress(ingress: IngressSettings, fail: Any) -> None:
    if not ingress.secrets or any(not s for s in ingress.secrets):
        raise fail("ingress.secrets", "at least one non-empty secret is required")
    if ingress.max_body_bytes < 1024:
        raise fail("ingress.max_body_bytes", "must be at least 1024")
    if ingress.dedupe_window < 1:
        raise fail("ingress.dedupe_window", "must be at least 1s")
    if not 0 <= ingress.linger <= 1:
        raise fail("ingress.linger", "must be between 0 and 1s")
    if ingress.read_timeout <= 0:
        raise fail("ingress.read_timeout", "must be greater than 0")
    if not 1 <= ingress.port <= 65535:
        raise fail("ingress.port", "must be between 1 and 65535")


def _check_redis(settings: RedisSettings, fail: Any) -> None:
    if not settings.url.startswith(("redis://", "rediss://", "unix://")):
        raise fail("redis.url", f"expected redis://, rediss:// or unix://, got "
                   f"{mask_url(settings.url)!r}")
    if settings.retention < 1:
        raise fail("redis.retention", "must be at least 1s")
    if not _PREFIX.fullmatch(settings.prefix):
        raise fail("redis.prefix", "use 1-64 characters without spaces")
    if settings.min_replicas < 0:
        raise fail("redis.min_replicas", "must be 0 or more")
    if settings.min_replicas_timeout <= 0:
        raise fail("redis.min_replicas_timeout", "must be greater than 0")
    if settings.sentinel is not None:
        if not settings.sentinel.hosts:
            raise fail("redis.sentinel.hosts", "at least one host:port is required")
        for j, host in enumerate(settings.sentinel.hosts):
            if not _SENTINEL_HOST.fullmatch(host):
                raise fail(f"redis.sentinel.hosts[{j}]", f"expected host:port, got {host!r}")
        if not settings.sentinel.master:
            raise fail("redis.sentinel.master", "must not be empty")


def _check_worker(worker: WorkerSettings, fail: Any) -> None:
    if not _QUEUE.fullmatch(worker.queue):
        raise fail("worker.queue", "use 1-64 letters, digits, '.', ':', '_' or '-'")
    if worker.concurrency < 1:
        raise fail("worker.concurrency", "must be at least 1")
    if worker.max_in_flight < 1:
        raise fail("worker.max_in_flight", "must be at least 1")
    if worker.max_connections < 1:
        raise fail("worker.max_connections", "must be at least 1")
    if not 0.1 <= worker.lease_grace <= 600:
        raise fail("worker.lease_grace", "must be between 100ms and 10m")
    # kombu hands a dead worker's unacknowledged task out again after this; past two minutes
    # the recovery promise cannot hold, and under a few seconds a live worker's prefetched
    # tasks would be handed out twice.
    if not 5 <= worker.visibility_timeout <= RECOVERY_PROMISE:
        raise fail("worker.visibility_timeout", f"must be between 5s and "
                   f"{_fmt(RECOVERY_PROMISE)} (a dead worker's tasks come back after it)")


def _check_admin(admin: AdminSettings, fail: Any) -> None:
    if not 1 <= admin.port <= 65535:
        raise fail("admin.port", "must be between 1 and 65535")
    if not admin.token and not is_loopback(admin.host):
        raise fail("admin.token", f"required when admin.host ({admin.host}) is not a loopback "
                   f"address: set it, e.g. token: ${{RELAY_ADMIN_TOKEN}}")
    for i, entry in enumerate(admin.allowed_hosts):
        if split_host(entry) is None:
            raise fail(f"admin.allowed_hosts[{i}]", f"expected a host name or name:port as "
                       f"browsers send it in Host (no scheme, path or '*'), got {entry[:100]!r}")


def is_loopback(host: str) -> bool:
    return host in _LOOPBACK or host.startswith("127.")


def _check_endpoint(url: str, secret: str, signature: str, headers: dict[str, str],
                    where: str, fail: Any) -> None:
    if not url.startswith(("http://", "https://")):
        raise fail(f"{where}.url", f"expected an http:// or https:// URL, got {mask_url(url)!r}")
    if not secret:
        raise fail(f"{where}.secret", "must not be empty")
    if signature in ("standard", "both"):
        _check_standard_secret(secret, f"{where}.secret", fail)
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise fail(f"{where}.headers", f"{name!r} is not a valid header name")
        if name.lower() in _FORBIDDEN_HEADERS:
            raise fail(f"{where}.headers.{name}", "set by the hub's HTTP client; remove it")
        if _CONTROL.search(value):
            raise fail(f"{where}.headers.{name}", "the value contains a control character "
                       "(a line break from a file read into ${VAR}?)")
        if name.lower() == "authorization" and urlsplit(url).password is not None:
            # The HTTP client would refuse every post: both would set Authorization.
            raise fail(f"{where}.headers.{name}", f"cannot be combined with the credentials "
                       f"in {where}.url ({mask_url(url)}); keep one of them")


#: The W3C trace context headers a traced delivery carries (relay/tracing.py).
_TRACE_HEADERS = {"traceparent", "tracestate"}


def _check_trace_headers(sub: Subscriber, where: str, fail: Any) -> None:
    """A configured ``traceparent`` would be replaced on every traced delivery (and sent as
    configured otherwise): refused unless the subscriber turns propagation off."""
    if not sub.propagate_trace:
        return
    for name in sub.headers:
        if name.lower() in _TRACE_HEADERS:
            raise fail(f"{where}.headers.{name}", "set by the hub per attempt when tracing is "
                       "on; remove it, or set propagate_trace: false to send your own")


def _check_delivery(timeout: float, max_attempts: int, backoff: Backoff, where: str,
                    fail: Any) -> None:
    if timeout <= 0:
        raise fail(f"{where}.timeout", "must be greater than 0")
    if max_attempts < 1:
        raise fail(f"{where}.max_attempts", "must be at least 1")
    if backoff.initial <= 0:
        raise fail(f"{where}.backoff.initial", "must be greater than 0")
    if backoff.max < backoff.initial:
        raise fail(f"{where}.backoff.max", "must not be less than backoff.initial")


def _check_health(breaker: CircuitBreaker, disable_after: float, rate: float | None,
                  where: str, fail: Any) -> None:
    if breaker.failures < 0:
        raise fail(f"{where}.circuit_breaker.failures", "must be 0 (off) or more")
    if breaker.cool_down <= 0:
        raise fail(f"{where}.circuit_breaker.cool_down", "must be greater than 0")
    if breaker.max_cool_down < breaker.cool_down:
        raise fail(f"{where}.circuit_breaker.max_cool_down", "must not be less than cool_down")
    if disable_after < 0:
        raise fail(f"{where}.disable_after", "must be 0 (never) or more")
    if rate is not None and rate <= 0:
        raise fail(f"{where}.rate_limit", "must be greater than 0")


def _check_standard_secret(secret: str, where: str, fail: Any) -> None:
    if not secret.startswith("whsec_"):
        raise fail(where, "a 'standard' signature needs a secret of the form whsec_<base64>")
    try:
        key = base64.b64decode(secret[len("whsec_"):], validate=True)
    except ValueError as exc:
        raise fail(where, "the part after whsec_ is not valid base64") from exc
    if not 24 <= len(key) <= 64:
        raise fail(where, f"the key after whsec_ must be 24-64 bytes, got {len(key)}")


def _horizon_problem(retention: float, sub: Subscriber, where: str) -> str | None:
    """Why ``retention`` cannot hold ``sub``'s records for as long as it may retry, if so."""
    horizon = retry_horizon(sub)
    if retention >= horizon:
        return None
    return (f"{_fmt(retention)} is shorter than the retry horizon of {where} ({sub.name}): "
            f"{_fmt(horizon)} for its max_attempts {sub.max_attempts} with backoff.max "
            f"{_fmt(sub.backoff.max)} and timeout {_fmt(sub.timeout)}; raise redis.retention "
            f"or lower {where}.max_attempts / backoff.max")


def retry_horizon(sub: Subscriber) -> float:
    """The longest a delivery can keep retrying: every attempt timing out, every backoff
    at its ceiling. Records must outlive it (``redis.retention``)."""
    waits = sum(min(sub.backoff.max, sub.backoff.initial * 2 ** min(n - 1, 62))
                for n in range(1, sub.max_attempts))
    return sub.max_attempts * sub.timeout + waits


def _fmt(seconds: float) -> str:
    """``5400`` -> ``1h30m``; ``0.5`` -> ``500ms``."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    parts, left = [], int(round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts) or "0s"


# -- reload -------------------------------------------------------------------------------

#: Settings a running process cannot change: a reload that changes them logs "restart
#: required" and keeps the running value; everything else applies.
RESTART_KEYS = ("redis", "ingress.host", "ingress.port", "admin.host", "admin.port",
                "worker.pool", "worker.concurrency", "worker.queue",
                "worker.visibility_timeout")


def restart_required(old: Config, new: Config) -> list[str]:
    """The restart-only keys whose value differs between ``old`` and ``new``."""
    changed = []
    for key in RESTART_KEYS:
        if _get(old, key) != _get(new, key):
            if key == "redis":
                changed += [f"redis.{f}" for f in RedisSettings.__struct_fields__
                            if getattr(old.redis, f) != getattr(new.redis, f)]
            else:
                changed.append(key)
    return changed


def live_part(old: Config, new: Config) -> Config:
    """``new`` with every restart-only key kept as in ``old``: what a running process applies."""
    return msgspec.structs.replace(
        new, redis=old.redis,
        ingress=msgspec.structs.replace(new.ingress, host=old.ingress.host,
                                        port=old.ingress.port),
        admin=msgspec.structs.replace(new.admin, host=old.admin.host, port=old.admin.port),
        worker=msgspec.structs.replace(
            new.worker, pool=old.worker.pool, concurrency=old.worker.concurrency,
            queue=old.worker.queue, visibility_timeout=old.worker.visibility_timeout))


def check_running(config: Config, admin_bound: str | None = None) -> None:
    """Refuse (ConfigError) what a reload would run but a start would refuse.

    ``config`` is what the process would actually run: the new file with every restart-only
    key kept at its running value (``live_part``). A file is checked on its own values, so
    rules that tie a reloadable key to a restart-only one are checked again here:

    * every subscriber's retry horizon against the ``redis.retention`` that stays in force;
    * ``admin.token`` against the address the admin is actually bound to (``admin_bound``,
      e.g. ``--host 0.0.0.0``), not the file's ``admin.host``.
    """

    def fail(path: str, why: str) -> ConfigError:
        return ConfigError(f"{config.source}: {path}: {why}")

    for i, sub in enumerate(config.subscribers):
        problem = _horizon_problem(config.redis.retention, sub, f"subscribers[{i}]")
        if problem:
            raise fail("redis.retention", f"the running value (it changes only with a "
                       f"restart): {problem}")
    if admin_bound is not None and not config.admin.token and not is_loopback(admin_bound):
        raise fail("admin.token", f"required: this admin listens on {admin_bound}, not a "
                   f"loopback address; a reload cannot remove the token")


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
