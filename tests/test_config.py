"""The YAML configuration: substitution, durations, validation errors, and `relay check-config`."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

from relay.config import config_path, load_config
from relay.errors import ConfigError
from tests.support import ROOT, relay_cmd

STANDARD_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()

FULL = """\
redis:
  url: ${REDIS_URL:-redis://127.0.0.1:6399/3}
ingress:
  secrets: [${INGRAM_WEBHOOK_SECRET}]     # more than one while rotating
  max_body_bytes: 1048576
  dedupe_window: 7d
delivery:
  timeout: 10s
  max_attempts: 8
  backoff: {initial: 5s, max: 1h}
subscribers:
  - name: erp
    url: https://erp.internal.example/hooks/ingram
    secret: ${ERP_WEBHOOK_SECRET}
    signature: ingram
    topics: [resellers/orders]
    event_types: ["im::order_shipped", "IM::ORDER_INVOICED"]
    headers: {Authorization: "Bearer ${ERP_TOKEN}"}
    timeout: 5s
    max_attempts: 12
  - name: warehouse
    url: http://wms.internal.example:8080/ingram
    secret: ${WMS_SECRET}
    signature: standard
"""

ENV = {
    "INGRAM_WEBHOOK_SECRET": "ingram-secret",
    "ERP_WEBHOOK_SECRET": "erp-secret",
    "ERP_TOKEN": "tok123",
    "WMS_SECRET": STANDARD_SECRET,
}

MINIMAL = "ingress:\n  secrets: [s3cret]\n"


def write(tmp_path: Path, text: str, name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ if environ is not None else {})
    message = str(info.value)
    assert str(path) in message, f"error does not name the file: {message}"
    return message


def with_subscriber(secret: str, signature: str = "standard") -> str:
    return (MINIMAL + "subscribers:\n  - name: wms\n    url: http://wms.example/hook\n"
            f"    secret: '{secret}'\n    signature: {signature}\n")


# --- substitution -------------------------------------------------------------------------


def test_spec_example_loads_with_env_values_substituted(tmp_path):
    config = load_config(write(tmp_path, FULL), ENV)
    assert config.redis.url == "redis://127.0.0.1:6399/3"  # default used: REDIS_URL unset
    assert config.ingress.secrets == ["ingram-secret"]
    erp, wms = config.subscribers
    assert erp.secret == "erp-secret"
    assert erp.headers == {"Authorization": "Bearer tok123"}
    assert erp.topics == ("resellers/orders",)
    assert erp.event_types == ("im::order_shipped", "im::order_invoiced")
    assert (erp.timeout, erp.max_attempts) == (5.0, 12)
    assert wms.signature == "standard" and wms.secret == STANDARD_SECRET
    # delivery defaults reach a subscriber that does not override them
    assert (wms.timeout, wms.max_attempts) == (10.0, 8)
    assert (wms.backoff.initial, wms.backoff.max) == (5.0, 3600.0)
    assert erp.signature == "ingram"


def test_env_value_overrides_default(tmp_path):
    config = load_config(write(tmp_path, FULL), {**ENV, "REDIS_URL": "redis://10.0.0.1:6380/1"})
    assert config.redis.url == "redis://10.0.0.1:6380/1"


def test_default_applies_to_non_string_fields(tmp_path):
    text = "ingress:\n  secrets: [x]\n  max_body_bytes: ${MAX_BODY:-2048}\n"
    assert load_config(write(tmp_path, text), {}).ingress.max_body_bytes == 2048
    assert load_config(write(tmp_path, text), {"MAX_BODY": "4096"}).ingress.max_body_bytes == 4096


@pytest.mark.parametrize("secret", [
    "a:b", "with # hash", "close]bracket", "all: of #them], {x}", "  padded  ", "[x, y]",
])
def test_secret_with_yaml_special_characters_is_taken_verbatim(tmp_path, secret):
    config = load_config(write(tmp_path, FULL), {**ENV, "INGRAM_WEBHOOK_SECRET": secret})
    assert config.ingress.secrets == [secret]
    config = load_config(write(tmp_path, FULL), {**ENV, "ERP_WEBHOOK_SECRET": secret})
    assert config.subscribers[0].secret == secret


def test_missing_env_var_error_names_variable_and_key_path(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "ERP_WEBHOOK_SECRET"}
    message = refused(tmp_path, FULL, env)
    assert "subscribers[0].secret" in message
    assert "ERP_WEBHOOK_SECRET" in message
    message = refused(tmp_path, FULL, {k: v for k, v in ENV.items() if k != "ERP_TOKEN"})
    assert "subscribers[0].headers.Authorization" in message and "ERP_TOKEN" in message
    message = refused(tmp_path, FULL, {})
    assert "ingress.secrets[0]" in message and "INGRAM_WEBHOOK_SECRET" in message


def test_commented_out_env_reference_needs_no_variable(tmp_path):
    text = MINIMAL + "# subscribers: [{name: old, url: 'http://x/', secret: ${RETIRED}}]\n"
    assert load_config(write(tmp_path, text), {}).subscribers == ()


def test_env_value_is_not_expanded_again(tmp_path):
    text = "ingress:\n  secrets: [${S}]\n"
    config = load_config(write(tmp_path, text), {"S": "${HOME}", "HOME": "/root"})
    assert config.ingress.secrets == ["${HOME}"]


def test_set_but_empty_env_var_takes_the_default(tmp_path):
    text = "ingress:\n  secrets: [${S:-fallback}]\n"
    assert load_config(write(tmp_path, text), {"S": ""}).ingress.secrets == ["fallback"]


def test_load_config_reads_process_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAY_TEST_SECRET", "from-the-environment")
    config = load_config(write(tmp_path, "ingress:\n  secrets: [${RELAY_TEST_SECRET}]\n"))
    assert config.ingress.secrets == ["from-the-environment"]


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "seconds"), [
    ("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0),
    ("1.5s", 1.5), ("30", 30.0),
])
def test_durations_are_read_as_seconds(tmp_path, written, seconds):
    text = (f"ingress:\n  secrets: [x]\n  read_timeout: {written}\n"
            f"delivery:\n  timeout: {written}\n  backoff: {{initial: {written}, max: 7d}}\n")
    config = load_config(write(tmp_path, text), {})
    assert config.ingress.read_timeout == pytest.approx(seconds)
    assert config.delivery.timeout == pytest.approx(seconds)
    assert config.delivery.backoff.initial == pytest.approx(seconds)


@pytest.mark.parametrize("written", ["10 minutes", "5x", "ms", "-5s", "tomorrow", "true"])
def test_bad_duration_is_refused_naming_the_key(tmp_path, written):
    message = refused(tmp_path, f"ingress:\n  secrets: [x]\n  dedupe_window: {written}\n")
    assert "ingress.dedupe_window" in message
    assert "duration" in message


# --- validation ---------------------------------------------------------------------------


def test_typo_max_attemps_is_refused_with_file_and_key_path(tmp_path):
    message = refused(tmp_path, MINIMAL + "delivery:\n  max_attemps: 3\n")
    assert "delivery.max_attemps" in message
    assert "unknown key" in message


def test_unknown_key_inside_a_subscriber_is_refused_with_its_index(tmp_path):
    text = (MINIMAL + "subscribers:\n  - name: a\n    url: http://a.example/\n"
            "    secret: x\n    retries: 3\n")
    assert "subscribers[0].retries: unknown key" in refused(tmp_path, text)


@pytest.mark.parametrize(("text", "path"), [
    (MINIMAL.replace("[s3cret]", "[s3cret]\n  max_body_bytes: lots"), "ingress.max_body_bytes"),
    (MINIMAL + "delivery:\n  max_attempts: [1, 2]\n", "delivery.max_attempts"),
    (MINIMAL + "subscribers: {name: a}\n", "subscribers"),
    (MINIMAL + "subscribers:\n  - {name: a, url: 'http://a/', secret: x, topics: orders}\n",
     "subscribers[0].topics"),
    (MINIMAL + "subscribers:\n  - {name: a, url: 'http://a/', secret: x, signature: hmac}\n",
     "subscribers[0].signature"),
    ("ingress:\n  secrets: s3cret\n", "ingress.secrets"),
])
def test_wrong_type_is_refused_naming_the_key(tmp_path, text, path):
    message = refused(tmp_path, text)
    assert f"{path}:" in message


def test_missing_required_key_is_named(tmp_path):
    assert "ingress.secrets: required key is missing" in refused(tmp_path, "ingress: {}\n")
    text = MINIMAL + "subscribers:\n  - {name: a, url: 'http://a/'}\n"
    assert "subscribers[0].secret: required key is missing" in refused(tmp_path, text)


def test_section_written_twice_is_refused_not_silently_merged(tmp_path):
    text = MINIMAL + "delivery:\n  max_attempts: 3\ndelivery:\n  timeout: 1s\n"
    message = refused(tmp_path, text)
    assert "duplicate key 'delivery'" in message and "line 5" in message


def test_key_written_twice_in_a_subscriber_is_refused(tmp_path):
    text = (MINIMAL + "subscribers:\n  - name: a\n    url: http://a.example/\n"
            "    secret: x\n    timeout: 5s\n    timeout: 50s\n")
    assert "duplicate key 'timeout'" in refused(tmp_path, text)


def test_yaml_merge_keys_still_work(tmp_path):
    text = (MINIMAL + "x-defaults: &d {url: 'http://a.example/', secret: x}\n"
            "subscribers:\n  - {<<: *d, name: a}\n")
    assert "x-defaults: unknown key" in refused(tmp_path, text)  # merged, then refused as unknown
    text = MINIMAL + "subscribers:\n  - &a {name: a, url: 'http://a.example/', secret: x}\n" \
        "  - {<<: *a, name: b, secret: y}\n"
    config = load_config(write(tmp_path, text), {})
    assert [(s.name, s.url, s.secret) for s in config.subscribers] == \
        [("a", "http://a.example/", "x"), ("b", "http://a.example/", "y")]


@pytest.mark.parametrize(("line", "path"), [
    ("read_timeout: 0s", "ingress.read_timeout"),
    ("dedupe_window: 0s", "ingress.dedupe_window"),
    ("dedupe_window: 500ms", "ingress.dedupe_window"),
    ("port: 70000", "ingress.port"),
    ("max_body_bytes: 10", "ingress.max_body_bytes"),
    ("linger: 2s", "ingress.linger"),
])
def test_ingress_setting_out_of_range_is_refused(tmp_path, line, path):
    assert f"{path}:" in refused(tmp_path, MINIMAL + f"  {line}\n")


def test_invalid_yaml_is_refused_with_its_line(tmp_path):
    message = refused(tmp_path, "ingress:\n  secrets: [a\n  port: 1\n")
    assert "not valid YAML" in message and "line" in message


def test_unreadable_file_is_refused_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing, {})


def test_empty_secret_list_is_refused(tmp_path):
    assert "ingress.secrets" in refused(tmp_path, "ingress:\n  secrets: []\n")


def test_duplicate_subscriber_names_are_refused(tmp_path):
    text = (MINIMAL + "subscribers:\n"
            "  - {name: erp, url: 'http://a.example/', secret: x}\n"
            "  - {name: crm, url: 'http://b.example/', secret: y}\n"
            "  - {name: erp, url: 'http://c.example/', secret: z}\n")
    message = refused(tmp_path, text)
    assert "subscribers[2].name" in message and "duplicate" in message and "erp" in message


def test_subscriber_url_must_be_http(tmp_path):
    text = MINIMAL + "subscribers:\n  - {name: a, url: 'ftp://a.example/', secret: x}\n"
    assert "subscribers[0].url" in refused(tmp_path, text)


@pytest.mark.parametrize("size", [24, 32, 64])
@pytest.mark.parametrize("signature", ["standard", "both"])
def test_standard_secret_of_24_to_64_bytes_is_accepted(tmp_path, size, signature):
    secret = "whsec_" + base64.b64encode(os.urandom(size)).decode()
    config = load_config(write(tmp_path, with_subscriber(secret, signature)), {})
    assert config.subscribers[0].secret == secret


@pytest.mark.parametrize(("secret", "why"), [
    ("whsec_" + base64.b64encode(bytes(23)).decode(), "got 23"),
    ("whsec_" + base64.b64encode(bytes(65)).decode(), "got 65"),
    (base64.b64encode(bytes(32)).decode(), "whsec_"),
    ("whsec_not*base64!", "base64"),
    ("plain-ingram-style-secret", "whsec_"),
])
@pytest.mark.parametrize("signature", ["standard", "both"])
def test_standard_secret_that_is_not_whsec_base64_of_24_to_64_bytes_is_refused(
        tmp_path, secret, why, signature):
    message = refused(tmp_path, with_subscriber(secret, signature))
    assert "subscribers[0].secret" in message
    assert why in message


def test_ingram_subscriber_secret_may_be_any_string(tmp_path):
    config = load_config(write(tmp_path, with_subscriber("whsec_not base64 :#]", "ingram")), {})
    assert config.subscribers[0].secret == "whsec_not base64 :#]"


def test_config_path_prefers_explicit_then_env_then_default(monkeypatch):
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    assert config_path() == "config/relay.yaml"
    monkeypatch.setenv("RELAY_CONFIG", "/etc/relay.yaml")
    assert config_path() == "/etc/relay.yaml"
    assert config_path("mine.yaml") == "mine.yaml"


@pytest.mark.parametrize("name", ["relay.yaml", "relay.dev.yaml"])
def test_shipped_example_configs_are_valid(name):
    config = load_config(ROOT / "config" / name, ENV)
    assert config.subscribers and config.ingress.secrets


# --- relay check-config (subprocess) ------------------------------------------------------


def run_relay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(relay_cmd(*args), env=full_env, cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


def test_check_config_lists_subscribers_and_their_filters(tmp_path):
    path = write(tmp_path, FULL)
    result = run_relay("--config", str(path), "check-config", env=ENV)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "OK" in out
    assert "subscribers: 2" in out
    erp = next(line for line in out.splitlines() if "erp:" in line)
    assert "https://erp.internal.example/hooks/ingram" in erp
    assert "topics=resellers/orders" in erp
    assert "event_types=im::order_shipped, im::order_invoiced" in erp
    assert "signature=ingram" in erp and "max_attempts=12" in erp
    wms = next(line for line in out.splitlines() if "warehouse:" in line)
    assert "signature=standard" in wms and "topics=*" in wms and "event_types=*" in wms
    # secrets never appear in the output
    for secret in ("ingram-secret", "erp-secret", "tok123", STANDARD_SECRET):
        assert secret not in out and secret not in result.stderr


def test_check_config_hides_the_redis_password(tmp_path):
    text = FULL.replace("${REDIS_URL:-redis://127.0.0.1:6399/3}",
                        "redis://relay:hunter2@10.0.0.5:6379/0")
    result = run_relay("check-config", "--config", str(write(tmp_path, text)), env=ENV)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "10.0.0.5:6379" in result.stdout


def test_check_config_accepts_config_after_the_command_name(tmp_path):
    result = run_relay("check-config", "--config", str(write(tmp_path, FULL)), env=ENV)
    assert result.returncode == 0, result.stderr
    assert "subscribers: 2" in result.stdout


def test_check_config_reads_relay_config_env_var(tmp_path):
    path = write(tmp_path, FULL)
    result = run_relay("check-config", env={**ENV, "RELAY_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout and "warehouse" in result.stdout


def test_check_config_option_wins_over_relay_config_env_var(tmp_path):
    bad = write(tmp_path, MINIMAL + "delivery:\n  max_attemps: 3\n", "bad.yaml")
    good = write(tmp_path, FULL, "good.yaml")
    result = run_relay("check-config", "--config", str(good),
                       env={**ENV, "RELAY_CONFIG": str(bad)})
    assert result.returncode == 0, result.stderr


def test_check_config_exits_2_on_bad_file_with_message_on_stderr(tmp_path):
    path = write(tmp_path, FULL.replace("max_attempts: 8", "max_attemps: 8"))
    result = run_relay("--config", str(path), "check-config", env=ENV)
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "delivery.max_attemps" in result.stderr
    assert "OK" not in result.stdout


def test_ingress_refuses_to_start_on_bad_config(tmp_path):
    path = write(tmp_path, FULL)
    env = {k: v for k, v in ENV.items() if k != "WMS_SECRET"}
    result = run_relay("ingress", "--config", str(path), "--port", "1", env=env)
    assert result.returncode == 2
    assert "subscribers[1].secret" in result.stderr and "WMS_SECRET" in result.stderr


# --- what the hub refuses since it can change safely -------------------------------------


def test_retention_shorter_than_a_retry_horizon_is_refused_naming_both(tmp_path):
    text = ("redis:\n  retention: 1h\ningress:\n  secrets: [s]\nsubscribers:\n"
            "  - {name: erp, url: 'http://e.example/h', secret: x, max_attempts: 12,\n"
            "     backoff: {initial: 5s, max: 1h}}\n")
    message = refused(tmp_path, text)
    assert "redis.retention" in message and "subscribers[0] (erp)" in message
    assert "max_attempts 12" in message and "backoff.max 1h" in message


@pytest.mark.parametrize("line,path", [
    ("  retention: 500ms", "redis.retention"),
    ("  prefix: 'has space'", "redis.prefix"),
    ("  min_replicas: -1", "redis.min_replicas"),
    ("  sentinel: {hosts: [nohostport], master: m}", "redis.sentinel.hosts[0]"),
    ("  sentinel: {hosts: ['h:26379'], master: ''}", "redis.sentinel.master"),
])
def test_bad_redis_settings_are_refused(tmp_path, line, path):
    assert path in refused(tmp_path, "redis:\n" + line + "\n" + MINIMAL)


@pytest.mark.parametrize("line,path", [
    ("  lease_grace: 50ms", "worker.lease_grace"),
    ("  visibility_timeout: 3m", "worker.visibility_timeout"),
    ("  visibility_timeout: 1s", "worker.visibility_timeout"),
    ("  queue: 'a queue'", "worker.queue"),
])
def test_worker_timings_that_break_recovery_are_refused(tmp_path, line, path):
    assert path in refused(tmp_path, MINIMAL + "worker:\n" + line + "\n")


def test_timeout_plus_lease_grace_over_two_minutes_is_a_warning_check_config_prints(tmp_path):
    path = write(tmp_path, MINIMAL + "worker:\n  lease_grace: 60s\nsubscribers:\n"
                 "  - {name: slow, url: 'http://s.example/h', secret: x, timeout: 90s}\n")
    config = load_config(path, {})
    assert any("subscribers[0] (slow)" in w and "lease_grace" in w for w in config.warnings)
    result = run_relay("--config", str(path), "check-config")
    assert result.returncode == 0 and "warning:" in result.stderr


def test_admin_off_loopback_needs_a_token(tmp_path):
    assert "admin.token" in refused(tmp_path, MINIMAL + "admin:\n  host: 0.0.0.0\n")
    config = load_config(write(tmp_path, MINIMAL + "admin:\n  host: 0.0.0.0\n  token: t\n"), {})
    assert config.admin.token == "t"


@pytest.mark.parametrize("written,per_second", [("50/s", 50.0), ("120/m", 2.0), ("0.5/s", 0.5)])
def test_rate_limits_are_read_per_second(tmp_path, written, per_second):
    config = load_config(write(tmp_path, MINIMAL + f"delivery:\n  rate_limit: {written}\n"
                               "subscribers:\n  - {name: a, url: 'http://a.example/', "
                               "secret: x}\n"), {})
    assert config.subscribers[0].rate_limit == pytest.approx(per_second)


def test_health_settings_are_inherited_and_overridden_per_subscriber(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + (
        "delivery:\n  circuit_breaker: {failures: 3, cool_down: 1s, max_cool_down: 4s}\n"
        "  disable_after: 1h\nsubscribers:\n"
        "  - {name: a, url: 'http://a.example/', secret: x}\n"
        "  - {name: b, url: 'http://b.example/', secret: x, disable_after: 0s,\n"
        "     circuit_breaker: {failures: 0}}\n")), {})
    a, b = config.subscribers
    breaker = a.circuit_breaker
    assert (breaker.failures, breaker.cool_down, a.disable_after) == (3, 1, 3600)
    assert (b.circuit_breaker.failures, b.disable_after) == (0, 0)
    assert "max_cool_down" in refused(tmp_path, MINIMAL + (
        "delivery:\n  circuit_breaker: {cool_down: 10s, max_cool_down: 1s}\n"))


def test_a_reload_keeps_restart_only_keys_and_names_them():
    from relay.config import live_part, parse_config, restart_required

    old = parse_config(MINIMAL + "worker:\n  concurrency: 2\n", "a.yaml", {})
    new = parse_config("redis:\n  url: redis://other:6379/0\n" + MINIMAL +
                       "worker:\n  concurrency: 4\n  max_in_flight: 50\n", "a.yaml", {})
    assert restart_required(old, new) == ["redis.url", "worker.concurrency"]
    applied = live_part(old, new)
    assert applied.redis.url == old.redis.url and applied.worker.concurrency == 2
    assert applied.worker.max_in_flight == 50


def test_the_redis_preflight_names_each_problem_and_its_fix():
    from relay.connections import problems

    fatal, unsafe = problems({"redis_version": "6.0.16", "aof_enabled": 0,
                              "maxmemory_policy": "allkeys-lru"})
    assert "Redis 6.0.16 is older than 6.2" in fatal[0]
    assert any("appendonly yes" in p for p in unsafe)
    assert any("maxmemory-policy is allkeys-lru" in p and "noeviction" in p for p in unsafe)
    assert problems({"redis_version": "7.0.15", "aof_enabled": 1,
                     "maxmemory_policy": "noeviction"}) == ([], [])


# --- patterns are anchored at the very end (issue 19) -------------------------------------


@pytest.mark.parametrize("text,path", [
    (MINIMAL + 'subscribers:\n  - {name: "erp\\n", url: "http://a.example/", secret: x}\n',
     "subscribers[0].name"),
    (MINIMAL + 'subscribers:\n  - {name: erp, url: "http://a.example/", secret: x,\n'
     '     headers: {"X-Token\\n": v}}\n', "subscribers[0].headers"),
    ('redis:\n  prefix: "relay:\\n"\n' + MINIMAL, "redis.prefix"),
    ('redis:\n  sentinel: {hosts: ["h1:26379\\n"], master: m}\n' + MINIMAL,
     "redis.sentinel.hosts[0]"),
    (MINIMAL + 'worker:\n  queue: "relay\\n"\n', "worker.queue"),
])
def test_a_trailing_newline_is_refused_in_names_headers_prefix_hosts_and_queue(tmp_path, text,
                                                                              path):
    """``$`` with ``re.match`` also matches before a final newline; a value read into
    ``${VAR}`` from a file often ends with one."""
    assert path in refused(tmp_path, text)


def test_a_trailing_newline_read_from_the_environment_is_refused(tmp_path):
    text = 'redis:\n  prefix: "${PREFIX}"\n' + MINIMAL
    assert "redis.prefix" in refused(tmp_path, text, {"PREFIX": "relay:\n"})
    assert load_config(write(tmp_path, text), {"PREFIX": "relay:"}).redis.prefix == "relay:"


# --- admin.allowed_hosts ------------------------------------------------------------------


def test_admin_allowed_hosts_take_names_as_browsers_send_them_in_host(tmp_path):
    names = ["relay-admin", "admin.example.com:9443", "10.0.0.5:8081", "[fd00::5]:8081"]
    config = load_config(write(tmp_path, MINIMAL + f"admin:\n  allowed_hosts: {names}\n"), {})
    assert config.admin.allowed_hosts == names
    assert load_config(write(tmp_path, MINIMAL), {}).admin.allowed_hosts == []
    for bad in ("https://admin.example", "admin.example/console", "*", "*.example.com",
                "admin.example:99999", "admin example", "admin.example\n"):
        message = refused(tmp_path, MINIMAL + f"admin:\n  allowed_hosts: [{json.dumps(bad)}]\n")
        assert "admin.allowed_hosts[0]" in message, bad


# --- reload checks what will run ----------------------------------------------------------


def test_a_reload_whose_retry_horizon_the_kept_retention_cannot_hold_is_refused(
        tmp_path, caplog):
    """``redis.retention`` needs a restart: a reload keeps the running one. New
    ``max_attempts`` / ``backoff`` must fit that one, not the file's new value."""
    from relay.reload import Reloader

    def text(retention: str, attempts: int) -> str:
        return ("redis:\n  retention: " + retention + "\n" + MINIMAL +
                "subscribers:\n  - {name: erp, url: 'http://a.example/', secret: x, "
                f"max_attempts: {attempts}, timeout: 1s, backoff: {{initial: 1m, max: 1h}}}}\n")

    path = write(tmp_path, text("2h", 2))
    running = load_config(path, {})
    applied: list = []
    reloader = Reloader(running, applied.append, "test")
    # Valid on its own (30 d holds 20 attempts an hour apart), but the running 2 h does not.
    path.write_text(text("30d", 20))
    load_config(path, {})
    with caplog.at_level("INFO", logger="relay.reload"):
        assert reloader.reload() is False
    assert applied == [] and reloader.current is running
    error = next(r for r in caplog.records if "reload refused" in r.getMessage())
    assert error.levelname == "ERROR"
    assert "redis.retention" in error.error and "2h" in error.error
    assert "subscribers[0] (erp)" in error.error and "restart" in error.error
    # What fits the running retention applies (and the new retention is "restart required").
    path.write_text(text("30d", 3))
    with caplog.at_level("INFO", logger="relay.reload"):
        assert reloader.reload() is True
    assert applied[-1].subscribers[0].max_attempts == 3
    assert applied[-1].redis.retention == 7200
    assert any(getattr(r, "keys", None) == ["redis.retention"] for r in caplog.records)


# --- Ingram's real traffic ----------------------------------------------------------------


def test_the_default_body_limit_admits_a_4000_sku_stock_update(tmp_path):
    from bench.events import stock_update

    body = stock_update("STOCK4000", skus=4000)
    assert len(body) > 1_600_000
    assert load_config(write(tmp_path, MINIMAL), {}).ingress.max_body_bytes == 4 * 1024 * 1024
    assert len(body) <= 4 * 1024 * 1024


def test_an_authorization_header_beside_credentials_in_the_url_is_refused(tmp_path) -> None:
    """aiohttp refuses a post that carries both (every attempt would fail): refused at start,
    naming the header and the URL, its password masked."""
    import pytest

    from relay.config import load_config
    from relay.errors import ConfigError

    path = tmp_path / "relay.yaml"
    path.write_text("ingress: {secrets: [s]}\nsubscribers:\n"
                    "  - name: erp\n    url: https://ops:hunter2@erp.example/hook\n"
                    "    secret: s\n    headers: {Authorization: Bearer t}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "subscribers[0].headers.Authorization" in str(err.value)
    assert "subscribers[0].url" in str(err.value) and "hunter2" not in str(err.value)
