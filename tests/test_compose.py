"""The container deployment, checked without Docker (no engine on the machines that run the
tests): docker-compose.yml (one machine), deploy/ha/ (three machines, Redis Sentinel), the
Dockerfile and the .env.example files are parsed and cross-checked against each other, the CLI
and the real config loader. ${VAR} interpolation and .env files are read as docker compose
reads them (see `interpolate` and `read_env_file`)."""

from __future__ import annotations

import base64
import fnmatch
import functools
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import load_config
from tests.support import ROOT, relay_cmd

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
CONFIG = ROOT / "config" / "relay.yaml"
DOCKERFILE = ROOT / "Dockerfile"
HA = ROOT / "deploy" / "ha"
HA_COMPOSE = HA / "docker-compose.yml"
HA_ENV_EXAMPLE = HA / ".env.example"
HA_CONFIG = HA / "relay.yaml"
SENTINEL_CONF = HA / "sentinel.conf"
NGINX_CONF = HA / "nginx.conf"
COMPOSE_FILES = [COMPOSE, HA_COMPOSE]
ENV_EXAMPLES = [ENV_EXAMPLE, HA_ENV_EXAMPLE]
MACHINES = {"machine-a", "machine-b", "machine-c"}


# ---- reading the files as docker compose does ---------------------------------------------

@functools.cache
def load_compose(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))  # resolves the <<: merge keys too
    assert isinstance(doc, dict)
    return doc


def services(path: Path) -> dict[str, dict[str, Any]]:
    return load_compose(path)["services"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


_ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines; blank lines and # comments skipped (the strict format that every
    compose version reads alike: test_env_examples_are_plain_name_equals_value_lines)."""
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        assert match, f"{rel(path)}: not NAME=value: {line!r}"
        env[match.group(1)] = match.group(2)
    return env


def documented_names(path: Path) -> set[str]:
    """Names set in an env file, and optional ones shown commented out ("# NAME=default")."""
    names = set(read_env_file(path))
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#\s*([A-Z_][A-Z0-9_]*)=", line)
        if match:
            names.add(match.group(1))
    return names


_INTERPOLATION = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation: $$ is a literal $; ${VAR}, $VAR, ${VAR:-default} (unset or
    empty), ${VAR-default} (unset), ${VAR:?error} and ${VAR?error} (refuse to run)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match[str]) -> str:
        if match.group("dollar"):
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg, current = match.group("op"), match.group("arg"), env.get(name)
        unset_or_empty = current is None or (current == "" and op and op.startswith(":"))
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _INTERPOLATION.sub(fill, value)


def interpolated_names(path: Path) -> set[str]:
    """Every variable the compose file itself reads (for ${...}), comments left out."""
    text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines()
                     if not line.lstrip().startswith("#"))
    return {m.group("name") or m.group("bare") for m in _INTERPOLATION.finditer(text)
            if not m.group("dollar")}


def config_variables(path: Path, with_default: bool = False) -> set[str]:
    """The ${VAR} a relay config file reads (comments left out); with_default: ${VAR:-x} too."""
    text = "\n".join(re.sub(r"(^|\s)#.*$", "", line)
                     for line in path.read_text(encoding="utf-8").splitlines())
    pattern = r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}"
    return {m.group(1) for m in re.finditer(pattern, text) if with_default or not m.group(2)}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def env_files(service: dict[str, Any]) -> list[str]:
    files = service.get("env_file", [])
    files = [files] if isinstance(files, str) else files
    return [f if isinstance(f, str) else f["path"] for f in files]


def container_env(path: Path, service: dict[str, Any], dotenv: dict[str, str]) -> dict[str, str]:
    """What a container gets when .env holds `dotenv`: its env_file lines, then `environment`
    (which wins) after interpolation, which compose also takes from .env."""
    env: dict[str, str] = {}
    for name in env_files(service):
        assert name == ".env", f"{rel(path)}: env_file {name}: only .env is documented"
        env.update(dotenv)
    env.update(interpolate(environment(service), dotenv))
    return env


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Volumes in the long syntax, whichever syntax the file uses."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append(volume)
            continue
        parts = volume.split(":")
        out.append({"source": parts[0], "target": parts[1],
                    "read_only": len(parts) > 2 and "ro" in parts[2].split(",")})
    return out


def is_one_shot(service: dict[str, Any]) -> bool:
    return str(service.get("restart", "no")) == "no"


def is_sentinel(service: dict[str, Any]) -> bool:
    return "--sentinel" in command(service) or "redis-sentinel" in command(service)


def is_redis_server(service: dict[str, Any]) -> bool:
    """A Redis that holds data (not a Sentinel)."""
    return str(service.get("image", "")).startswith("redis:") and not is_sentinel(service)


def relay_services(path: Path) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services(path).items() if command(s)[:1] == ["relay"]}


def by_command(path: Path, *words: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services(path).items() if command(s)[:len(words)] == list(words)}


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration))
    assert parts and "".join(a + b for a, b in parts) == str(duration), duration
    return sum(float(n) * units[u] for n, u in parts)


def machine(service: dict[str, Any]) -> str:
    found = MACHINES & set(service.get("profiles", []))
    assert len(found) == 1, f"one machine profile per service, got {service.get('profiles')}"
    return found.pop()


def yaml_with_placeholders(path: Path) -> dict[str, Any]:
    """A relay config parsed with every ${...} replaced by a word (structure only)."""
    return yaml.safe_load(re.sub(r"\$\{[^}]*\}", "placeholder", path.read_text("utf-8")))


def every_service(*paths: Path) -> list[Any]:
    return [pytest.param(p, n, id=f"{rel(p)}:{n}") for p in paths for n in services(p)]


def redis_servers(*paths: Path) -> list[Any]:
    return [pytest.param(p, n, id=f"{rel(p)}:{n}")
            for p in paths for n, s in services(p).items() if is_redis_server(s)]


# ---- the single-machine compose file ------------------------------------------------------

def test_the_single_machine_file_runs_redis_ingress_worker_and_admin() -> None:
    assert {"redis", "ingress", "worker", "admin"} <= set(services(COMPOSE))
    assert set(by_command(COMPOSE, "relay", "ingress")) == {"ingress"}
    assert set(by_command(COMPOSE, "relay", "worker")) == {"worker"}
    assert set(by_command(COMPOSE, "relay", "admin")) == {"admin"}


@pytest.mark.parametrize(("path", "name"), redis_servers(*COMPOSE_FILES))
def test_every_redis_appends_fsyncs_always_and_never_evicts(path: Path, name: str) -> None:
    redis = services(path)[name]
    assert str(redis["image"]).startswith("redis:7")
    args = " ".join(command(redis))
    assert args.startswith("redis-server"), args
    assert re.search(r"--appendonly\s+yes\b", args), args
    assert re.search(r"--appendfsync\s+always\b", args), args
    assert re.search(r"--maxmemory-policy\s+noeviction\b", args), args
    data = [m for m in mounts(redis) if m["target"] == "/data"]
    assert data, "redis keeps its append-only file in /data"
    assert data[0]["source"] in (load_compose(path).get("volumes") or {}), "a named volume"


@pytest.mark.parametrize(("path", "name"), every_service(*COMPOSE_FILES))
def test_every_long_running_service_has_a_healthcheck(path: Path, name: str) -> None:
    service = services(path)[name]
    if is_one_shot(service):
        # The only one-shot service is the config check, which the others wait for.
        assert command(service) == ["relay", "check-config"], name
        waiting = [n for n, s in services(path).items()
                   if isinstance(s.get("depends_on"), dict)
                   and s["depends_on"].get(name, {}).get("condition")
                   == "service_completed_successfully"]
        assert set(waiting) == set(relay_services(path)) - {name}
        return
    health = service.get("healthcheck") or {}
    assert not health.get("disable"), name
    test = health.get("test")
    assert test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (name, test)
    assert str(service.get("restart")) in ("unless-stopped", "always"), name


@pytest.mark.parametrize("name", ["ingress", "worker", "admin"])
def test_relay_services_wait_for_a_healthy_redis_and_a_valid_config(name: str) -> None:
    service = services(COMPOSE)[name]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["depends_on"]["check-config"]["condition"] == "service_completed_successfully"
    config = [m for m in mounts(service) if m["source"] in ("./config", "config")]
    assert config and config[0]["read_only"], mounts(service)
    assert environment(service).get("RELAY_CONFIG", "").startswith(config[0]["target"])
    assert env_files(service) == [".env"]
    assert service.get("build") in (".", "./") or service["build"].get("context") in (".", "./")


def test_redis_url_can_be_overridden_from_env_and_defaults_to_the_redis_service() -> None:
    for name, service in relay_services(COMPOSE).items():
        written = environment(service)["REDIS_URL"]
        assert "${REDIS_URL" in written, f"{name}: REDIS_URL hard-coded: {written}"
        assert container_env(COMPOSE, service, {})["REDIS_URL"] == "redis://redis:6379/0"
        other = {"REDIS_URL": "redis://:pw@redis.internal:6380/2"}
        assert container_env(COMPOSE, service, other)["REDIS_URL"] == other["REDIS_URL"], name
    assert "REDIS_URL" in documented_names(ENV_EXAMPLE)


@pytest.mark.parametrize("name", sorted(relay_services(COMPOSE)))
def test_each_relay_service_starts_with_the_env_example_copied_unedited(name: str) -> None:
    """`cp .env.example .env; docker compose up`: the environment each relay container then
    has loads config/relay.yaml with the real loader (a valid whsec_ secret included)."""
    service = services(COMPOSE)[name]
    env = container_env(COMPOSE, service, read_env_file(ENV_EXAMPLE))
    assert env["RELAY_CONFIG"] == "/app/config/relay.yaml"
    config = load_config(CONFIG, environ=env)
    assert config.redis.url == "redis://redis:6379/0"
    assert config.ingress.secrets == [env["INGRAM_WEBHOOK_SECRET"]]
    assert {s.name: s.secret for s in config.subscribers}["warehouse"] == env["WMS_SECRET"]


def test_env_example_names_every_variable_the_config_and_the_compose_file_read() -> None:
    needed = config_variables(CONFIG)  # ${VAR} without a default
    assert needed, "config/relay.yaml takes its secrets from the environment"
    given = set(read_env_file(ENV_EXAMPLE))
    assert needed <= given, needed - given
    optional = config_variables(CONFIG, with_default=True) | interpolated_names(COMPOSE)
    assert optional <= documented_names(ENV_EXAMPLE), optional - documented_names(ENV_EXAMPLE)
    assert "RELAY_ADMIN_TOKEN" in given and read_env_file(ENV_EXAMPLE)["RELAY_ADMIN_TOKEN"]


def test_config_relay_yaml_gives_the_admin_console_its_token_from_env() -> None:
    assert "RELAY_ADMIN_TOKEN" in config_variables(CONFIG, with_default=True)
    assert yaml_with_placeholders(CONFIG)["admin"]["token"] == "placeholder"


def test_the_admin_console_is_published_on_loopback_and_gets_its_token() -> None:
    admin = services(COMPOSE)["admin"]
    cmd = command(admin)
    assert cmd[:2] == ["relay", "admin"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert interpolate(admin["ports"], {}) == ["127.0.0.1:8081:8081"]
    assert interpolate(admin["ports"], {"RELAY_ADMIN_BIND": "0.0.0.0"}) == ["0.0.0.0:8081:8081"]
    env = container_env(COMPOSE, admin, read_env_file(ENV_EXAMPLE))
    assert env["RELAY_ADMIN_TOKEN"], "a token is required off loopback"
    assert "8081/healthz" in " ".join(admin["healthcheck"]["test"]), "/healthz needs no token"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=rel)
def test_the_admins_healthcheck_and_published_port_pass_its_host_check(
        path: Path, redis_server, tmp_path: Path) -> None:
    """The admin answers only its own names (421 otherwise): run it as the compose file does
    (``--host 0.0.0.0``, the token, the config's ``allowed_hosts``), then its healthcheck as
    written, a browser on the published loopback port, and the names the config lists."""
    import http.client

    from tests.hub import write_config
    from tests.support import free_port, process, wait_until

    admin = services(path)["admin"]
    (published,) = interpolate(admin["ports"], {})
    host_port, container_port = published.split(":")[-2:]
    assert host_port == container_port, "Host names the published port: it must be the same"
    config = HA_CONFIG if path == HA_COMPOSE else CONFIG
    allowed = yaml_with_placeholders(config)["admin"].get("allowed_hosts", [])
    port = free_port()
    cfg = write_config(tmp_path / "relay.yaml", redis_server.url, [],
                       admin={"token": "t0ken", "allowed_hosts": allowed})
    cmd = command(admin)
    with process(relay_cmd("--config", str(cfg), *cmd[1:], "--port", str(port))) as proc:
        check = [sys.executable if c == "python" else c for c in admin["healthcheck"]["test"][1:]]
        check = [c.replace(f":{container_port}/", f":{port}/") for c in check]

        def healthy() -> bool:
            assert proc.poll() is None
            return subprocess.run(check, capture_output=True, timeout=10).returncode == 0

        wait_until(healthy, 20, 0.2, what="the compose healthcheck")

        def get(host: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/api/overview",
                         headers={"Host": host, "Authorization": "Bearer t0ken"})
            status = conn.getresponse().status
            conn.close()
            return status

        for name in ["localhost", "127.0.0.1", *allowed]:
            assert get(f"{name}:{port}") == 200, name
        assert get(f"evil.example:{port}") == 421
def test_the_tracing_profile_runs_jaeger_and_points_the_hub_at_it_only_when_asked() -> None:
    """`OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318 docker compose --profile tracing up`:
    Jaeger all-in-one with OTLP/HTTP on 4318 and its UI on the host's loopback; without the
    variable every relay service runs untraced, and nothing of the hub waits for Jaeger."""
    from relay.tracing import requested

    jaeger = services(COMPOSE)["jaeger"]
    assert jaeger["profiles"] == ["tracing"]
    assert str(jaeger["image"]).startswith("jaegertracing/all-in-one:")
    assert str(jaeger["environment"]["COLLECTOR_OTLP_ENABLED"]) == "true"
    assert "127.0.0.1:16686:16686" in jaeger["ports"] and "127.0.0.1:4318:4318" in jaeger["ports"]
    asked = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}
    for name, service in services(COMPOSE).items():
        if name == "jaeger":
            continue
        assert "profiles" not in service, f"{name} runs with or without the tracing profile"
        assert "jaeger" not in (service.get("depends_on") or {}), name
    for name, service in relay_services(COMPOSE).items():
        off = container_env(COMPOSE, service, read_env_file(ENV_EXAMPLE))
        assert requested(off) is None, f"{name}: traced with .env.example as it is"
        on = container_env(COMPOSE, service, asked)
        assert requested(on) == "http://jaeger:4318", name
    header = COMPOSE.read_text().split("\nname:")[0]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318 docker compose --profile tracing up" \
        in header
    doc = (ROOT / "docs" / "docker.md").read_text(encoding="utf-8")
    assert "--profile tracing" in doc and "16686" in doc


def test_the_ingress_listens_on_all_interfaces_and_publishes_its_port() -> None:
    ingress = services(COMPOSE)["ingress"]
    cmd = command(ingress)
    assert cmd[:2] == ["relay", "ingress"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    configured = yaml_with_placeholders(CONFIG)["ingress"]["port"]
    assert any(str(p).endswith(f":{configured}") for p in ingress["ports"])


@pytest.mark.parametrize(("path", "name"), [
    pytest.param(p, n, id=f"{rel(p)}:{n}")
    for p in COMPOSE_FILES for n in by_command(p, "relay", "worker")])
def test_the_worker_healthcheck_fails_once_the_heartbeat_is_30_s_old(
        path: Path, name: str, tmp_path: Path) -> None:
    """The healthcheck as written, run here: fresh heartbeat 0, stale or missing not 0."""
    worker = services(path)[name]
    heartbeat = environment(worker)["RELAY_WORKER_HEARTBEAT"]
    assert heartbeat.startswith("/tmp/"), "writable by the image's unprivileged user"
    test = worker["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"], test
    local = tmp_path / "alive"
    env = {**os.environ, "RELAY_WORKER_HEARTBEAT": str(local)}

    def check() -> int:
        return subprocess.run([sys.executable, *test[2:]], env=env, timeout=30).returncode

    assert check() != 0, "missing heartbeat file"
    local.touch()
    assert check() == 0, "fresh heartbeat"
    os.utime(local, (time.time() - 25, time.time() - 25))
    assert check() == 0, "25 s old: still healthy"
    os.utime(local, (time.time() - 31, time.time() - 31))
    assert check() != 0, "31 s old"


@pytest.mark.parametrize(("path", "name"), [
    pytest.param(p, n, id=f"{rel(p)}:{n}") for p in COMPOSE_FILES for n in relay_services(p)])
def test_relay_runs_under_an_init_that_forwards_signals(path: Path, name: str) -> None:
    """SIGTERM (docker compose stop) and SIGHUP (kill -s HUP: reload) reach relay, which is
    not PID 1, and the worker's exited children are reaped."""
    assert services(path)[name].get("init") is True


@pytest.mark.parametrize(("path", "name"), [
    pytest.param(p, n, id=f"{rel(p)}:{n}") for p in COMPOSE_FILES for n in relay_services(p)
    if not is_one_shot(services(p)[n])])
def test_stop_grace_periods_cover_the_drains(path: Path, name: str) -> None:
    service = services(path)[name]
    grace = seconds(service.get("stop_grace_period", "10s"))
    if command(service)[1] == "worker":
        assert grace >= 35, "a worker drains up to 30 s"
    elif command(service)[1] == "ingress":
        assert grace >= 16, "the ingress allows itself 15 s"
    assert grace <= 60, "docker compose stop should not hang"


def _unique_relay_commands() -> list[Any]:
    seen: dict[tuple[str, ...], None] = {}
    for path in COMPOSE_FILES:
        for service in relay_services(path).values():
            seen.setdefault(tuple(command(service)))
    params = []
    for cmd in seen:
        params.append(pytest.param(list(cmd), id=" ".join(cmd)))
    return params


@pytest.mark.parametrize("cmd", _unique_relay_commands())
def test_every_relay_command_in_the_compose_files_exists_with_its_options(cmd: list[str]) -> None:
    # The command as written, options included, then --help: an unknown command or
    # option fails (exit 2) before --help is reached.
    result = subprocess.run(relay_cmd(*cmd[1:], "--help"), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, (cmd, result.stderr)
    assert "Usage:" in result.stdout


# ---- .env.example files --------------------------------------------------------------------

@pytest.mark.parametrize("path", ENV_EXAMPLES, ids=rel)
def test_env_examples_are_plain_name_equals_value_lines(path: Path) -> None:
    """No quotes, spaces or trailing comments: compose versions differ on those."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=[^\s\"'#]+", line), line


@pytest.mark.parametrize("path", ENV_EXAMPLES, ids=rel)
def test_env_example_values_say_they_are_examples(path: Path) -> None:
    for name, value in read_env_file(path).items():
        if name.startswith("COMPOSE_"):
            continue
        readable = value
        if value.startswith("whsec_"):
            readable = base64.b64decode(value[len("whsec_"):], validate=True).decode()
        assert "example" in readable and "replace" in readable, (name, readable)


@pytest.mark.parametrize("path", ENV_EXAMPLES, ids=rel)
def test_env_example_whsec_secrets_are_valid_standard_secrets(path: Path) -> None:
    secrets = {n: v for n, v in read_env_file(path).items() if v.startswith("whsec_")}
    assert secrets, "the standard-signature subscriber's secret"
    for name, value in secrets.items():
        key = base64.b64decode(value[len("whsec_"):], validate=True)
        assert 24 <= len(key) <= 64, name


@pytest.mark.parametrize("path", [COMPOSE, HA_COMPOSE, DOCKERFILE, ENV_EXAMPLE, HA_ENV_EXAMPLE,
                                  HA_CONFIG, SENTINEL_CONF], ids=rel)
def test_no_secret_values_are_committed(path: Path) -> None:
    """The only whsec_ values in the repository's deployment files are the marked example."""
    for match in re.finditer(r"whsec_([A-Za-z0-9+/]{32,}={0,2})", path.read_text("utf-8")):
        assert b"example" in base64.b64decode(match.group(1)), match.group(0)


def test_env_files_are_kept_out_of_git_and_of_the_image() -> None:
    for env in (".env", "deploy/ha/.env"):
        ignored = subprocess.run(["git", "check-ignore", "-q", env], cwd=ROOT)
        assert ignored.returncode == 0, f"{env} is not git-ignored"
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in dockerignore and "**/.env" in dockerignore


# ---- the image -----------------------------------------------------------------------------

def test_dockerfile_builds_python_3_11_slim_and_installs_the_project() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    for needed in ("pyproject.toml", "relay", "workers"):
        assert re.search(rf"^COPY .*\b{needed}\b", text, re.M), needed
    assert re.search(r"pip install (--\S+ )*[\"']?\.(\[[a-z,]+\])?[\"']?(\s|$)", text), \
        "pip install . (the project)"
    assert re.search(r"^EXPOSE .*\b8080\b.*\b8081\b", text, re.M)


def test_the_image_installs_the_tracing_extra() -> None:
    """The tracing profile needs OpenTelemetry in the image (it stays off without an
    endpoint)."""
    text = DOCKERFILE.read_text()
    extras = re.search(r"pip install (--\S+ )*[\"']?\.\[([a-z,]+)\]", text)
    assert extras and "tracing" in extras.group(2).split(",")


def test_the_image_installs_every_file_of_the_packages() -> None:
    """`pip install .` (not -e) copies only .py files unless package-data names the others:
    the admin console's static files, say, would be missing from the image."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_data = setuptools.get("package-data", {})
    tracked = subprocess.run(["git", "ls-files", "relay", "workers"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    for name in tracked:
        path = Path(name)
        if path.suffix in (".py", ".pyi") or not (ROOT / path).exists():
            continue
        package = next(p for p in path.parents if (ROOT / p / "__init__.py").exists())
        inside = path.relative_to(package).as_posix()
        patterns = package_data.get(".".join(package.parts), []) + package_data.get("*", [])
        assert any(fnmatch.fnmatch(inside, p) for p in patterns), (
            f"{name}: not in [tool.setuptools.package-data] of pyproject.toml, so not in the "
            "image")


# ---- the three-machine deployment (deploy/ha) ----------------------------------------------

def test_ha_runs_a_primary_a_replica_three_sentinels_two_ingress_two_workers_a_proxy_an_admin(
        ) -> None:
    ha = services(HA_COMPOSE)
    assert len([s for s in ha.values() if is_redis_server(s)]) == 2
    assert len([s for s in ha.values() if is_sentinel(s)]) == 3
    assert len(by_command(HA_COMPOSE, "relay", "ingress")) == 2
    assert len(by_command(HA_COMPOSE, "relay", "worker")) == 2
    assert len(by_command(HA_COMPOSE, "relay", "admin")) == 1
    assert [n for n, s in ha.items() if str(s.get("image", "")).startswith("nginx:")] == ["proxy"]


def test_ha_services_are_spread_so_that_any_one_machine_can_be_lost() -> None:
    placed: dict[str, list[str]] = {}
    for name, service in services(HA_COMPOSE).items():
        if is_one_shot(service):
            assert set(service["profiles"]) == MACHINES, "the config check runs on every machine"
            continue
        placed.setdefault(machine(service), []).append(name)
    assert set(placed) == MACHINES
    for kind in (is_sentinel, is_redis_server):
        where = [machine(s) for s in services(HA_COMPOSE).values() if kind(s)]
        assert len(where) == len(set(where)), f"two {kind.__name__} on one machine: {where}"
    for words in (("relay", "ingress"), ("relay", "worker")):
        where = [machine(s) for s in by_command(HA_COMPOSE, *words).values()]
        assert len(where) == len(set(where)), f"{words}: {where}"


def test_ha_redis_nodes_are_one_primary_and_its_replica_known_by_their_names() -> None:
    data = {n: s for n, s in services(HA_COMPOSE).items() if is_redis_server(s)}
    first = {n: environment(s).get("REDIS_FIRST_PRIMARY") for n, s in data.items()}
    primaries = [n for n, p in first.items() if not p]
    assert len(primaries) == 1, first
    assert all(p in (None, primaries[0]) for p in first.values()), first
    for name, service in data.items():
        cmd = command(service)
        # The role is not on the command line (it would undo a failover at every restart);
        # init-redis.sh writes it into the config file Sentinel rewrites.
        assert "--replicaof" not in cmd and "--slaveof" not in cmd, name
        assert cmd[1] == "/data/redis.conf", name
        assert cmd[cmd.index("--replica-announce-ip") + 1] == name == service["container_name"]
        assert service["entrypoint"] == ["sh", "/relay-ha/init-redis.sh"]
        assert {"source": "./init-redis.sh", "target": "/relay-ha/init-redis.sh",
                "read_only": True} in mounts(service)
        assert "REDIS_PASSWORD" in service["healthcheck"]["test"][1], "requirepass is set"


def sentinel_directives() -> list[list[str]]:
    return [line.split() for line in SENTINEL_CONF.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_sentinel_conf_monitors_the_first_primary_by_name_with_a_majority_quorum() -> None:
    directives = sentinel_directives()
    monitor = [d for d in directives if d[:2] == ["sentinel", "monitor"]]
    assert len(monitor) == 1
    _, _, master, host, port, quorum = monitor[0]
    at = directives.index(monitor[0])
    for needed in (["sentinel", "resolve-hostnames", "yes"],
                   ["sentinel", "announce-hostnames", "yes"]):
        assert needed in directives[:at], f"{' '.join(needed)} before sentinel monitor"
    data = {n: s for n, s in services(HA_COMPOSE).items() if is_redis_server(s)}
    assert host in data and not environment(data[host]).get("REDIS_FIRST_PRIMARY")
    assert port == "6379"
    count = len([s for s in services(HA_COMPOSE).values() if is_sentinel(s)])
    assert count // 2 < int(quorum) <= count, "a majority, and reachable"
    assert ["dir", "/data"] in directives and ["port", "26379"] in directives
    assert master == yaml_with_placeholders(HA_CONFIG)["redis"]["sentinel"]["master"]


def test_each_sentinel_announces_its_own_name_and_keeps_its_rewritten_file_in_a_volume() -> None:
    declared = load_compose(HA_COMPOSE).get("volumes") or {}
    for name, service in services(HA_COMPOSE).items():
        if not is_sentinel(service):
            continue
        assert environment(service)["SENTINEL_ANNOUNCE_HOSTNAME"] == name
        assert service["container_name"] == name
        assert command(service) == ["redis-server", "/data/sentinel.conf", "--sentinel"]
        assert service["entrypoint"] == ["sh", "/relay-ha/init-sentinel.sh"]
        volumes = {m["target"]: m for m in mounts(service)}
        assert volumes["/data"]["source"] in declared
        assert volumes["/relay-ha/sentinel.conf"]["source"] == "./sentinel.conf"
        assert volumes["/relay-ha/sentinel.conf"]["read_only"]


def run_init_script(script: str, tmp_path: Path, env: dict[str, str],
                    args: list[str]) -> subprocess.CompletedProcess[str]:
    """An init script as the container runs it, with /data and /relay-ha moved under tmp_path
    and the image's docker-entrypoint.sh replaced by one that prints its arguments."""
    data, mounted, bin_dir = tmp_path / "data", tmp_path / "relay-ha", tmp_path / "bin"
    for d in (data, mounted, bin_dir):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copy(SENTINEL_CONF, mounted / "sentinel.conf")
    text = (HA / script).read_text().replace("/relay-ha/", f"{mounted}/").replace(
        "/data/", f"{data}/")
    (bin_dir / "docker-entrypoint.sh").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "docker-entrypoint.sh").chmod(0o755)
    return subprocess.run(["sh", "-c", text, script, *args], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env}, timeout=30)


def test_init_sentinel_writes_the_config_once_with_its_own_name_and_the_password(
        tmp_path: Path) -> None:
    env = {"SENTINEL_ANNOUNCE_HOSTNAME": "sentinel-2", "REDIS_PASSWORD": "pw-1"}
    args = ["redis-server", "/data/sentinel.conf", "--sentinel"]
    result = run_init_script("init-sentinel.sh", tmp_path, env, args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == args, "runs the image's entrypoint with the command"
    written = (tmp_path / "data" / "sentinel.conf").read_text()
    assert written.startswith(SENTINEL_CONF.read_text())
    lines = written.splitlines()
    assert "sentinel announce-ip sentinel-2" in lines
    assert "sentinel auth-pass mymaster pw-1" in lines
    assert lines.index("sentinel auth-pass mymaster pw-1") > next(
        i for i, ln in enumerate(lines) if ln.startswith("sentinel monitor "))
    # Sentinel rewrote its file (a failover); a restart must keep what it learnt.
    (tmp_path / "data" / "sentinel.conf").write_text("sentinel monitor mymaster redis-2 6379 2\n")
    result = run_init_script("init-sentinel.sh", tmp_path, {**env, "REDIS_PASSWORD": "x"}, args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "sentinel.conf").read_text() == (
        "sentinel monitor mymaster redis-2 6379 2\n")


def test_init_redis_gives_the_replica_its_first_primary_once_and_requires_the_password(
        tmp_path: Path) -> None:
    args = ["redis-server", "/data/redis.conf", "--appendonly", "yes"]
    env = {"REDIS_PASSWORD": "pw-1", "REDIS_FIRST_PRIMARY": "redis-1"}
    result = run_init_script("init-redis.sh", tmp_path, env, args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [*args, "--requirepass", "pw-1", "--masterauth", "pw-1"]
    conf = tmp_path / "data" / "redis.conf"
    assert conf.read_text() == "replicaof redis-1 6379\n"
    conf.write_text("# rewritten by CONFIG REWRITE after a failover: now the primary\n")
    assert run_init_script("init-redis.sh", tmp_path, env, args).returncode == 0
    assert "replicaof" not in conf.read_text(), "the first role is written once only"

    primary = tmp_path / "primary"
    primary.mkdir()
    assert run_init_script("init-redis.sh", primary, {"REDIS_PASSWORD": "p"}, args).returncode == 0
    assert (primary / "data" / "redis.conf").read_text() == ""

    missing = run_init_script("init-redis.sh", tmp_path / "none", {}, args)
    assert missing.returncode != 0 and "REDIS_PASSWORD" in missing.stderr


def test_ha_relay_config_asks_the_compose_files_sentinels_and_waits_for_a_replica() -> None:
    redis = yaml_with_placeholders(HA_CONFIG)["redis"]
    sentinels = {n for n, s in services(HA_COMPOSE).items() if is_sentinel(s)}
    assert set(redis["sentinel"]["hosts"]) == {f"{n}:26379" for n in sentinels}
    assert redis["min_replicas"] >= 1
    assert config_variables(HA_CONFIG) >= {"REDIS_PASSWORD", "RELAY_ADMIN_TOKEN"}
    assert "${REDIS_PASSWORD}@" in HA_CONFIG.read_text(), "the password, in redis.url"
    for service in relay_services(HA_COMPOSE).values():
        assert {"source": "./relay.yaml", "target": "/app/config/relay.yaml",
                "read_only": True} in mounts(service)
        assert environment(service)["RELAY_CONFIG"] == "/app/config/relay.yaml"


def test_ha_relay_config_loads_with_the_ha_env_example() -> None:
    ingress = next(iter(by_command(HA_COMPOSE, "relay", "ingress").values()))
    env = container_env(HA_COMPOSE, ingress, read_env_file(HA_ENV_EXAMPLE))
    config = load_config(HA_CONFIG, environ=env)
    assert config.redis.min_replicas == 1  # type: ignore[attr-defined]


def test_ha_env_example_names_every_variable_relay_yaml_and_the_compose_file_read() -> None:
    given = set(read_env_file(HA_ENV_EXAMPLE))
    assert config_variables(HA_CONFIG) <= given, config_variables(HA_CONFIG) - given
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?",
                                                 HA_COMPOSE.read_text())}
    assert required and required <= given
    assert interpolated_names(HA_COMPOSE) <= documented_names(HA_ENV_EXAMPLE)
    profiles = set(read_env_file(HA_ENV_EXAMPLE)["COMPOSE_PROFILES"].split(","))
    assert profiles == MACHINES, "the example starts the whole rehearsal on one host"
    for name, service in services(HA_COMPOSE).items():
        interpolate(service, read_env_file(HA_ENV_EXAMPLE))  # no ${VAR:?} left unset
        if name in relay_services(HA_COMPOSE):
            assert env_files(service) == [".env"]


def test_ha_publishes_only_the_proxy_and_the_admin_console_on_loopback() -> None:
    published = {n: s["ports"] for n, s in services(HA_COMPOSE).items() if s.get("ports")}
    assert set(published) == {"proxy", "admin"}
    assert [str(p) for p in published["admin"]] == ["127.0.0.1:8081:8081"]
    network = load_compose(HA_COMPOSE)["networks"]["default"]
    assert network == {"name": "relay-ha", "external": True}


def nginx_blocks(text: str, kind: str) -> dict[str, str]:
    """The innermost `kind name { ... }` blocks (comments and quoted strings left out)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "''", re.sub(r"#.*", "", text))
    return {m.group(1): m.group(2) for m in re.finditer(
        rf"\b{kind}\s+(\S+)\s*\{{([^{{}}]*)\}}", text)}


def test_nginx_sends_to_both_ingress_services() -> None:
    text = NGINX_CONF.read_text()
    upstreams = nginx_blocks(text, "upstream")
    assert len(upstreams) == 1
    (name, body), = upstreams.items()
    servers = re.findall(r"^\s*server\s+([^\s;]+)([^;]*);", body, re.M)
    ingress = by_command(HA_COMPOSE, "relay", "ingress")
    port = yaml_with_placeholders(HA_CONFIG)["ingress"]["port"]
    assert {addr for addr, _ in servers} == {f"{n}:{port}" for n in ingress}
    for name_, service in ingress.items():
        assert service["container_name"] == name_
    assert all("resolve" in options.split() for _, options in servers), "re-resolved names"
    assert re.search(r"^\s*zone\s+\S+\s+\S+;", body, re.M), "resolve needs a zone"
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\b", re.sub(r"#.*", "", text), re.M)
    assert re.search(rf"^\s*proxy_pass\s+http://{name};", text, re.M)
    proxy = services(HA_COMPOSE)["proxy"]
    assert {"source": "./nginx.conf", "target": "/etc/nginx/nginx.conf",
            "read_only": True} in mounts(proxy)
    version = tuple(int(x) for x in re.match(r"nginx:(\d+)\.(\d+)", proxy["image"]).groups())
    assert version >= (1, 28), "`resolve` in an upstream needs nginx 1.27.3 or later"


def test_nginx_answers_503_with_retry_after_when_no_ingress_answers() -> None:
    text = re.sub(r"#.*", "", NGINX_CONF.read_text())
    page = re.search(r"error_page\s+502\s+504\s+=\s*(@\S+);", text)
    assert page, "nginx's own 502/504 become the ingress's 'cannot store' answer"
    fallback = nginx_blocks(text, "location")[page.group(1)]
    assert re.search(r"add_header\s+Retry-After\s+\d+\s+always;", fallback)
    assert re.search(r"return\s+503\s", fallback)
    assert "proxy_intercept_errors on" not in text, "the ingress's own answers pass untouched"


def test_nginx_body_limit_lets_the_ingress_answer_413_itself() -> None:
    limit = re.search(r"client_max_body_size\s+(\d+)([km]?);", NGINX_CONF.read_text())
    assert limit
    size = int(limit.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[limit.group(2)]
    assert size > yaml_with_placeholders(HA_CONFIG)["ingress"]["max_body_bytes"]


# ---- docs ----------------------------------------------------------------------------------

DOCS = [ROOT / "docs" / "docker.md", ROOT / "docs" / "scaling.md", HA / "README.md"]


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_deployment_docs_link_only_to_files_in_the_repository(path: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        assert not re.match(r"[a-z]+:", target), f"link outside the repository: {target}"
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), target


def test_docs_explain_the_compose_setup() -> None:
    doc = (ROOT / "docs" / "docker.md").read_text(encoding="utf-8")
    for needed in (".env.example", "docker compose up", "RELAY_ADMIN_TOKEN",
                   "docker compose kill -s HUP", "--scale worker=", "REDIS_URL"):
        assert needed in doc, needed


def test_scaling_doc_keeps_a_capacity_model_section_for_measured_figures() -> None:
    doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert re.search(r"^## Capacity model$", doc, re.M)
    assert "deploy/ha/docker-compose.yml" in doc and "min_replicas" in doc
