"""The YAML configuration, loaded into msgspec Structs.

Loading does three things a plain ``yaml.safe_load`` cannot:

* ``${VAR}`` and ``${VAR:-default}`` are replaced from the environment. They are swapped for
  inert tokens *before* YAML parses the text and filled in *after*, so a secret containing
  ``:``, ``#`` or ``]`` cannot change the document's structure, and the SPEC's
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

import msgspec
import yaml

from relay.errors import ConfigError

DEFAULT_CONFIG_PATH = "config/relay.yaml"

SignatureScheme = Literal["ingram", "standard", "both"]


class Duration(float):
    """A number of seconds, written in YAML as ``500ms``, ``10s``, ``5m``, ``2h`` or ``7d``."""

    _UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    _PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool):
            raise ValueError(f"expected a duration such as 10s, got {value!r}")
        if isinstance(value, int | float):
            return cls(value)
        if isinstance(value, str):
            match = cls._PATTERN.match(value)
            if match:
                return cls(float(match.group(1)) * cls._UNITS[match.group(2)])
        raise ValueError(f"expected a duration such as 500ms, 10s, 5m, 2h or 7d, got {value!r}")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every config Struct: unknown keys are errors."""


class Backoff(_Strict, frozen=True):
    initial: Duration = Duration(5)
    max: Duration = Duration(3600)


class DeliveryDefaults(_Strict, frozen=True):
    timeout: Duration = Duration(10)
    max_attempts: int = 8
    backoff: Backoff = msgspec.field(default_factory=Backoff)


class RedisSettings(_Strict, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    #: How long event bodies, attempt logs and done markers are kept (dead letters keep
    #: their own copy of the body until replayed or purged).
    retention: Duration = Duration(14 * 86400)


class IngressSettings(_Strict, frozen=True):
    secrets: list[str]
    max_body_bytes: int = 1_048_576
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
    queue: str = "relay"
    pool: Literal["prefork", "solo", "threads"] = "prefork"
    concurrency: int = 2
    #: Deliveries one worker process keeps in flight at once, shared equally among subscribers;
    #: past its share, a subscriber's attempts wait in the Redis schedule.
    max_in_flight: int = 1000
    #: Posts *open* at once per worker process, shared equally among subscribers (at least 2
    #: each); a subscriber's other attempts in flight wait their turn in the process. Many
    #: more open posts than this cost every post more CPU (docs/benchmarks.md) and flood
    #: subscribers, without delivering faster.
    max_connections: int = 128
    #: Broker visibility timeout: a task fetched by a worker that died is handed out again
    #: after this long. Kept short so a SIGKILLed worker's tasks come back within the
    #: SPEC's two minutes; tasks here finish in milliseconds, so it is never hit by a live one.
    visibility_timeout: Duration = Duration(60)
    #: Extra time, past a subscriber's timeout, before an unanswered attempt is presumed lost
    #: (its worker died) and scheduled again.
    lease_grace: Duration = Duration(30)


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


class _RawConfig(_Strict, frozen=True):
    ingress: IngressSettings
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    delivery: DeliveryDefaults = msgspec.field(default_factory=DeliveryDefaults)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    subscribers: list[SubscriberSpec] = []


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """The whole validated configuration; ``source`` is the file it came from."""

    source: str
    redis: RedisSettings
    ingress: IngressSettings
    delivery: DeliveryDefaults
    worker: WorkerSettings
    subscribers: tuple[Subscriber, ...]

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
    return parse_config(text, source, os.environ if environ is None else environ)


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


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _resolve(raw: _RawConfig, source: str) -> Config:
    def fail(path: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {path}: {why}")

    if not raw.ingress.secrets or any(not s for s in raw.ingress.secrets):
        raise fail("ingress.secrets", "at least one non-empty secret is required")
    if raw.ingress.max_body_bytes < 1024:
        raise fail("ingress.max_body_bytes", "must be at least 1024")
    if raw.ingress.dedupe_window < 1:
        raise fail("ingress.dedupe_window", "must be at least 1s")
    if not 0 <= raw.ingress.linger <= 1:
        raise fail("ingress.linger", "must be between 0 and 1s")
    if raw.ingress.read_timeout <= 0:
        raise fail("ingress.read_timeout", "must be greater than 0")
    if not 1 <= raw.ingress.port <= 65535:
        raise fail("ingress.port", "must be between 1 and 65535")
    if not raw.redis.url.startswith(("redis://", "rediss://", "unix://")):
        raise fail("redis.url", f"expected redis://, rediss:// or unix://, got {raw.redis.url!r}")
    _check_delivery(raw.delivery.timeout, raw.delivery.max_attempts, raw.delivery.backoff,
                    "delivery", fail)
    if raw.worker.concurrency < 1:
        raise fail("worker.concurrency", "must be at least 1")
    if raw.worker.max_in_flight < 1:
        raise fail("worker.max_in_flight", "must be at least 1")
    if raw.worker.max_connections < 1:
        raise fail("worker.max_connections", "must be at least 1")

    seen: set[str] = set()
    subscribers = []
    for i, spec in enumerate(raw.subscribers):
        where = f"subscribers[{i}]"
        if not _NAME.match(spec.name):
            raise fail(f"{where}.name", "use 1-64 letters, digits, '.', '_' or '-'")
        if spec.name in seen:
            raise fail(f"{where}.name", f"duplicate subscriber name {spec.name!r}")
        seen.add(spec.name)
        if not spec.url.startswith(("http://", "https://")):
            raise fail(f"{where}.url", f"expected an http:// or https:// URL, got {spec.url!r}")
        if not spec.secret:
            raise fail(f"{where}.secret", "must not be empty")
        if spec.signature in ("standard", "both"):
            _check_standard_secret(spec.secret, f"{where}.secret", fail)
        sub = Subscriber(
            name=spec.name, url=spec.url, secret=spec.secret, signature=spec.signature,
            topics=tuple(spec.topics), event_types=tuple(t.lower() for t in spec.event_types),
            headers=dict(spec.headers),
            timeout=spec.timeout if spec.timeout is not None else raw.delivery.timeout,
            max_attempts=(spec.max_attempts if spec.max_attempts is not None
                          else raw.delivery.max_attempts),
            backoff=spec.backoff or raw.delivery.backoff,
        )
        _check_delivery(sub.timeout, sub.max_attempts, sub.backoff, where, fail)
        subscribers.append(sub)
    return Config(source=source, redis=raw.redis, ingress=raw.ingress, delivery=raw.delivery,
                  worker=raw.worker, subscribers=tuple(subscribers))


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


def _check_standard_secret(secret: str, where: str, fail: Any) -> None:
    if not secret.startswith("whsec_"):
        raise fail(where, "a 'standard' signature needs a secret of the form whsec_<base64>")
    try:
        key = base64.b64decode(secret[len("whsec_"):], validate=True)
    except ValueError as exc:
        raise fail(where, "the part after whsec_ is not valid base64") from exc
    if not 24 <= len(key) <= 64:
        raise fail(where, f"the key after whsec_ must be 24-64 bytes, got {len(key)}")
