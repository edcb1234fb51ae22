"""Subscriber health with real workers and sinks: circuit breaker, rate limit, pause and
resume, disable, alerts, Retry-After on any status."""

from __future__ import annotations

import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from relay.keys import Keys
from relay.signatures import StandardWebhook
from tests.hub import (
    STANDARD_SECRET,
    Reply,
    Sink,
    attempt_log,
    dead_letters,
    delivered,
    enqueue_event,
    event_body,
    ingress,
    post,
    worker,
    write_config,
)
from tests.support import relay_cmd, wait_until

KEYS = Keys()


def relay(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(relay_cmd("--config", str(config), *args), capture_output=True,
                          text=True, timeout=30)


def alerts(sink: Sink) -> list[dict[str, Any]]:
    got = []
    for r in sink.on("/alerts"):
        StandardWebhook(STANDARD_SECRET).verify(r.body, r.headers)  # signed like a delivery
        got.append(msgspec.json.decode(r.body))
    return got


def test_open_breaker_lets_only_probes_through_keeps_others_fast_and_loses_nothing(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """The down subscriber answers 500 for 10 s. failures 3, cool_down 1 s: once the breaker
    opens, only probes reach it (one at a time, spaced by the cool-down); the healthy
    subscriber's latency is unaffected; after recovery every event is delivered and none is
    dead-lettered, although max_attempts (4) is far fewer than the outage would have used."""
    down_until = time.time() + 10
    sink.behave("/down", lambda n: Reply(500 if time.time() < down_until else 200))
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "down", "url": sink.url("/down"), "secret": "s"},
        {"name": "ok", "url": sink.url("/ok"), "secret": "s"},
    ], delivery={"timeout": "2s", "max_attempts": 4,
                 "backoff": {"initial": "200ms", "max": "500ms"},
                 "circuit_breaker": {"failures": 3, "cool_down": "1s", "max_cool_down": "2s"}})
    text = (tmp_path / "relay.yaml").read_text()
    (tmp_path / "relay.yaml").write_text(text + "alerts:\n  - url: " + sink.url("/alerts")
                                         + f"\n    secret: {STANDARD_SECRET}\n"
                                           "    signature: standard\n")
    events = [f"EVBRK{i:02d}" for i in range(20)]
    sent: dict[str, float] = {}
    with worker(config, tmp_path / "worker.log"), ingress(config, tmp_path / "in.log") as url:
        for i, event_id in enumerate(events):
            sent[event_id] = time.time()
            assert post(url, event_body(event_id))[0] == 202
            time.sleep(0.05 if i < 10 else 0.3)  # some arrive while the breaker is open
        wait_until(lambda: all(delivered(redis_client, e, s) for e in events
                               for s in ("down", "ok")), 30, what="every delivery")
        wait_until(lambda: any(a["type"] == "subscriber.recovered" for a in alerts(sink)), 10,
                   what="the recovered alert")
        log = (tmp_path / "worker.log").read_text()
    opened = [msgspec.json.decode(line) for line in log.splitlines()
              if "circuit breaker opened" in line]
    assert len(opened) == 1, opened
    opened_at = datetime.fromisoformat(opened[0]["ts"].replace("Z", "+00:00")).timestamp()
    hits = sink.on("/down")
    during = [r for r in hits if opened_at + 0.05 < r.arrived < down_until]
    probes = [a for e in events for a in attempt_log(redis_client, e, "down") if a.probe]
    # Only probes, one cool-down (1 s, then 2 s) apart: a 10 s outage allows at most ~6.
    assert 1 <= len(during) <= 6, [round(r.arrived - opened_at, 2) for r in during]
    gaps = [b.arrived - a.arrived for a, b in zip(during, during[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps
    assert len(probes) >= len(during)
    assert dead_letters(redis_client) == {}
    latency = [r.arrived - sent[r.event_id] for r in sink.on("/ok")]
    assert statistics.quantiles(latency, n=20)[18] < 0.25, sorted(latency)[-3:]
    kinds = [a["type"] for a in alerts(sink)]
    assert kinds.count("subscriber.circuit_opened") == 1
    assert kinds.count("subscriber.recovered") == 1
    assert all(a["subscriber"] == "down" for a in alerts(sink))
    print(f"\nHEALTH-FIGURES breaker: {len(hits)} requests to the down subscriber for "
          f"{len(events)} events ({len(during)} while open, all probes); 0 dead letters")


def test_rate_limit_holds_across_two_worker_processes(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "limited", "url": sink.url("/limited"), "secret": "s", "rate_limit": "5/s"},
    ])
    events = [f"EVRATE{i:02d}" for i in range(30)]
    with worker(config, tmp_path / "w1.log"), worker(config, tmp_path / "w2.log"):
        for event_id in events:
            enqueue_event(redis_client, event_body(event_id))
        got = sink.wait_for("/limited", len(events), timeout=20)
    times = sorted(r.arrived for r in got)
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 10, busiest  # 5/s with a burst of at most one second's worth
    assert sorted(r.event_id for r in got) == events
    assert times[-1] - times[0] >= (len(events) - 10) / 5 * 0.9


def test_pause_holds_everything_and_resume_delivers_it_all(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "s", "max_attempts": 1},
        {"name": "crm", "url": sink.url("/crm"), "secret": "s"},
    ])
    assert relay(config, "subscribers", "pause", "erp").returncode == 0
    events = [f"EVPAUSE{i}" for i in range(10)]
    with worker(config, tmp_path / "worker.log"):
        for event_id in events:
            enqueue_event(redis_client, event_body(event_id))
        sink.wait_for("/crm", len(events))  # the other subscriber is not held up
        time.sleep(1.5)
        assert sink.on("/erp") == []
        assert dead_letters(redis_client) == {}
        assert redis_client.zcard(KEYS.held("erp")) == len(events)
        status = relay(config, "status")
        assert "paused" in next(line for line in status.stdout.splitlines()
                                if line.startswith("erp"))
        resumed = relay(config, "subscribers", "resume", "erp")
        assert resumed.returncode == 0 and "released" in resumed.stdout, resumed
        got = sink.wait_for("/erp", len(events), timeout=15)
    assert sorted(r.event_id for r in got) == events
    # Held attempts were not counted: with max_attempts 1 each is attempt 1, delivered.
    assert all([a.attempt for a in attempt_log(redis_client, e, "erp")] == [1] for e in events)


def test_subscriber_failing_past_disable_after_is_disabled_alerted_and_resumable(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    broken = {"on": True}
    sink.behave("/flaky", lambda n: Reply(503 if broken["on"] else 200))
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "flaky", "url": sink.url("/flaky"), "secret": "s", "disable_after": "1s",
         "max_attempts": 50},
    ], delivery={"timeout": "1s", "max_attempts": 5,
                 "backoff": {"initial": "100ms", "max": "200ms"}})
    text = (tmp_path / "relay.yaml").read_text()
    (tmp_path / "relay.yaml").write_text(text + "alerts:\n  - url: " + sink.url("/alerts")
                                         + f"\n    secret: {STANDARD_SECRET}\n"
                                           "    signature: standard\n")
    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EVDISABLE"))
        wait_until(lambda: redis_client.hget(KEYS.health("flaky"), "state") == b"disabled", 10,
                   what="disabled")
        wait_until(lambda: any(a["type"] == "subscriber.disabled" for a in alerts(sink)), 10,
                   what="the disabled alert")
        time.sleep(0.5)
        posted = len(sink.on("/flaky"))
        time.sleep(1.0)
        assert len(sink.on("/flaky")) == posted  # nothing posted while disabled
        assert dead_letters(redis_client) == {}
        broken["on"] = False
        assert relay(config, "subscribers", "resume", "flaky").returncode == 0
        wait_until(lambda: delivered(redis_client, "EVDISABLE", "flaky"), 10,
                   what="delivered after resume")
    assert redis_client.hget(KEYS.health("flaky"), "state") == b"closed"


def test_retry_after_is_honoured_on_any_status(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    sink.behave("/busy", lambda n: Reply(500, {"Retry-After": "2"}) if n == 1 else Reply(200))
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "busy", "url": sink.url("/busy"), "secret": "s"},
    ], delivery={"timeout": "2s", "max_attempts": 3,
                 "backoff": {"initial": "50ms", "max": "10s"}})
    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EVRETRYAFTER"))
        got = sink.wait_for("/busy", 2, timeout=15)
    assert got[1].arrived - got[0].arrived >= 1.9
