"""docker-compose.yml and the Dockerfile, checked without Docker: parsed and cross-checked
against the CLI, the config and .env.example."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT, relay_cmd

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


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


def test_the_three_services_are_there(compose) -> None:
    assert {"redis", "ingress", "worker"} <= set(services(compose))


def test_redis_is_append_only_fsync_always_with_a_healthcheck_and_a_named_volume(compose) -> None:
    redis = services(compose)["redis"]
    assert str(redis["image"]).startswith("redis:7")
    args = " ".join(command(redis))
    assert args.startswith("redis-server")
    assert re.search(r"--appendonly\s+yes", args), args
    assert re.search(r"--appendfsync\s+always", args), args
    test = redis["healthcheck"]["test"]
    test = test if isinstance(test, str) else " ".join(test)
    assert "redis-cli" in test and "ping" in test
    data = [m for m in mounts(redis) if m["target"] == "/data"]
    assert data, "redis keeps its append-only file in /data"
    assert data[0]["source"] in (compose.get("volumes") or {}), "a named volume, declared"


@pytest.mark.parametrize("name", ["ingress", "worker"])
def test_relay_services_wait_for_a_healthy_redis_and_mount_the_config_read_only(
        compose, name: str) -> None:
    service = services(compose)[name]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    config = [m for m in mounts(service) if m["source"] in ("./config", "config")]
    assert config and config[0]["read_only"], mounts(service)
    env = environment(service)
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env.get("RELAY_CONFIG", "").startswith(config[0]["target"])
    env_files = service.get("env_file", [])
    env_files = [env_files] if isinstance(env_files, str) else env_files
    assert ".env" in [e if isinstance(e, str) else e["path"] for e in env_files]
    assert service.get("build") in (".", "./") or service["build"].get("context") in (".", "./")


def test_the_ingress_listens_on_all_interfaces_and_publishes_its_port(compose) -> None:
    ingress = services(compose)["ingress"]
    cmd = command(ingress)
    assert cmd[:2] == ["relay", "ingress"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    configured = yaml.safe_load(re.sub(r"\$\{[^}]*\}", "x", (ROOT / "config/relay.yaml")
                                       .read_text()))["ingress"]["port"]
    assert any(str(p).endswith(f":{configured}") for p in ingress["ports"])


def relay_commands(compose) -> list[list[str]]:
    cmds = [command(s) for s in services(compose).values()]
    return [c for c in cmds if c and c[0] == "relay"]


def test_every_relay_command_in_the_compose_file_exists_with_its_options(compose) -> None:
    cmds = relay_commands(compose)
    assert {c[1] for c in cmds} >= {"ingress", "worker"}
    for cmd in cmds:
        # The command as written, options included, then --help: an unknown command or
        # option fails (exit 2) before --help is reached.
        result = subprocess.run(relay_cmd(*cmd[1:], "--help"), cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, (cmd, result.stderr)
        assert "Usage:" in result.stdout


def test_env_example_names_every_variable_the_config_needs() -> None:
    lines = (ROOT / "config/relay.yaml").read_text(encoding="utf-8").splitlines()
    config = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in lines)  # not comments
    needed = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", config)}
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    given = {line.split("=", 1)[0].strip() for line in example.splitlines()
             if "=" in line and not line.lstrip().startswith("#")}
    assert needed <= given, needed - given
    assert needed, "config/relay.yaml takes its secrets from the environment"


def test_env_file_is_kept_out_of_git_and_of_the_image() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_dockerfile_builds_python_3_11_slim_and_installs_the_project() -> None:
    assert DOCKERFILE.exists()
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    for needed in ("pyproject.toml", "relay", "workers"):
        assert re.search(rf"^COPY .*\b{needed}\b", text, re.M), needed
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", text), "pip install . (the project)"


def test_docs_explain_the_compose_setup() -> None:
    doc = (ROOT / "docs/docker.md").read_text(encoding="utf-8")
    assert ".env.example" in doc and "docker compose up" in doc


@pytest.mark.parametrize("path", [COMPOSE, DOCKERFILE, ROOT / ".env.example"])
def test_no_secret_values_are_committed(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"whsec_[A-Za-z0-9+/]{32,}={0,2}", text)
