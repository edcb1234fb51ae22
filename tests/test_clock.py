"""Workers on hosts whose clocks disagree: what one writes and another compares (leases,
``known`` notes) is on Redis's clock. A skewed host is made with libfaketime (Debian's
``faketime``; .ci/run installs it): the worker's own ``time.time()`` is 20 s behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relay import clock
from relay.config import load_config
from relay.keys import Keys
from tests.fault.helpers import account, wait_delivered, wait_quiet
from tests.hub import Reply, Sink, enqueue_event, event_body, write_config
from tests.support import ROOT, RedisServer, process, relay_cmd, wait_until
from workers.engine import Engine
from workers.scheduler import Scheduler

SKEW = "-20s"

pytestmark = pytest.mark.skipif(shutil.which("faketime") is None,
                                reason="faketime is missing (apt-get install -y faketime; "
                                       ".ci/run installs it)")


def skewed(cmd: list[str]) -> tuple[list[str], dict[str, str]]:
    """``cmd`` on a host whose wall clock is 20 s behind (its monotonic clock untouched)."""
    return ["faketime", "-f", SKEW, *cmd], {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@contextlib.contextmanager
def skewed_worker(config: Path, log: Path, *extra: str) -> Iterator[Any]:
    cmd, env = skewed(relay_cmd("--config", str(config), "worker", *extra))
    with process(cmd, env=env, log_path=log) as proc:
        wait_until(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 30,
                   what="skewed worker ready")
        assert proc.poll() is None, log.read_text()
        yield proc


def test_a_skewed_process_takes_its_times_from_redis(redis_server: RedisServer) -> None:
    script = ("import redis, time; from relay import clock; "
              f"c = redis.Redis(port={redis_server.port}); "
              "print(time.time(), clock.now()); clock.CLOCK.measure(c); print(clock.now())")
    cmd, env = skewed([sys.executable, "-c", script])
    out = subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    own, unmeasured, measured = (float(x) for x in out)
    real = time.time()
    assert real - own > 15          # the process's own clock is behind ...
    assert real - unmeasured > 15   # ... and so is the hub's time before it measures,
    assert abs(real - measured) < 1  # not after


def test_a_skewed_process_whose_first_round_trip_is_slow_measures_again(
        redis_server: RedisServer) -> None:
    """A process's first ``TIME`` is often slow (it opens the connection, on a busy host):
    such a sample says too little and was dropped, and the process went on 20 s behind until
    its next measure (a worker's first ``known`` note looked stale to its peers). Here Redis
    is paused for the first round trip; the measure tries again."""
    port = redis_server.port
    script = ("import redis; from relay import clock; "
              f"c = redis.Redis(port={port}); c.ping(); "
              f"redis.Redis(port={port}).execute_command('CLIENT', 'PAUSE', 400, 'ALL'); "
              "clock.CLOCK.measure(c); print(clock.now())")
    cmd, env = skewed([sys.executable, "-c", script])
    out = subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert abs(time.time() - float(out)) < 1


def test_a_worker_behind_in_time_is_still_known_to_its_peers(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
        sink: Sink) -> None:
    """A rolling deploy: a worker without ``erp`` in its config asks whether a live worker
    still has it. The one that has it writes its note with a clock 20 s behind; read on a
    correct clock that note looked stale (over 15 s), and erp's attempts were dead-lettered
    as "subscriber removed"."""
    erp = {"name": "erp", "url": sink.url("/erp"), "secret": "erp-secret"}
    crm = {"name": "crm", "url": sink.url("/crm"), "secret": "crm-secret"}
    with_erp = write_config(tmp_path / "with-erp.yaml", redis_server.url, [erp, crm])
    without = load_config(write_config(tmp_path / "without.yaml", redis_server.url, [crm]))
    with skewed_worker(with_erp, tmp_path / "worker.log", "--no-scheduler"):
        wait_until(lambda: redis_client.hget("relay:known", "erp") is not None, 20,
                   what="the skewed worker's note")
        engine = Engine(without)
        try:
            assert engine._call(engine._known_elsewhere(["erp"])) == {"erp": True}
        finally:
            engine.drain(5)


def test_a_worker_behind_in_time_writes_leases_that_do_not_fall_due_at_once(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
        sink: Sink) -> None:
    """Another worker's scheduler (here: in this process, on the correct clock) moves due
    leases into the queue. A lease written on a clock 20 s behind was due 5 s ago at once, and
    the attempt still in flight was posted a second time."""
    config = write_config(tmp_path / "relay.yaml", redis_server.url,
                          [{"name": "erp", "url": sink.url("/erp"), "secret": "erp-secret"}],
                          delivery={"timeout": "10s", "max_attempts": 5,
                                    "backoff": {"initial": "100ms", "max": "1s"}},
                          worker={"lease_grace": "5s"})
    sink.behave("/erp", lambda n: Reply(200, delay=3.0))
    events = [enqueue_event(redis_client, event_body(f"SKEW{i:02d}")) for i in range(4)]
    scheduler = Scheduler(redis_server.client(), Keys.of(load_config(config)),
                          redeliver_after=20)
    stop = threading.Event()

    def schedule() -> None:
        while not stop.is_set():
            scheduler.move_due()
            stop.wait(0.1)

    mover = threading.Thread(target=schedule, daemon=True)
    with skewed_worker(config, tmp_path / "worker.log", "--no-scheduler"):
        mover.start()
        try:
            wait_delivered(sink, {("/erp", e) for e in events}, timeout=60)
            time.sleep(4)  # a second post would have started by now
            left = wait_quiet(redis_client, timeout=20)
        finally:
            stop.set()
            mover.join(5)
    erp = account(sink, {("/erp", e) for e in events})
    assert not erp.lost
    assert erp.duplicates == 0
    assert not any(left.values())


def test_redis_time_offset_keeps_the_sample_with_the_shortest_round_trip() -> None:
    c = clock.Clock()
    c._sample(100.0, 100.2, 105, 100_000)   # rtt 200 ms: offset 5.0 s
    c._sample(200.0, 200.01, 203, 5_000)     # rtt 10 ms: offset 3.0 s (the better sample)
    c._sample(300.0, 300.1, 310, 50_000)     # rtt 100 ms: offset 9.9 s
    assert round(c.offset_ms) == 3000
    c._sample(400.0, 401.0, 0, 0)            # a round trip of a second says nothing
    assert round(c.offset_ms) == 3000


def test_a_slow_first_round_trip_is_kept_only_when_no_faster_one_comes() -> None:
    c = clock.Clock()
    assert c._sample(100.0, 100.4, 120, 200_000) is False   # rtt 400 ms: measure again
    assert c.offset_ms == 0.0
    c._sample(100.0, 100.4, 120, 200_000, last=True)          # none faster: kept, 20.0 s
    assert round(c.offset_ms) == 20_000
    assert c._sample(200.0, 200.01, 219, 905_000) is True    # rtt 10 ms: 19.9 s, and it wins
    assert round(c.offset_ms) == 19_900
    c._sample(300.0, 300.4, 0, 0, last=True)                  # slow, and a good one is at hand
    assert round(c.offset_ms) == 19_900


def test_an_offset_within_the_measuring_error_is_taken_as_none() -> None:
    c = clock.Clock()
    c._sample(100.0, 100.004, 100, 2_000)    # 0 ms off, give or take the 4 ms round trip
    assert c.offset_ms == 0.0
    c._sample(200.0, 200.004, 200, 62_000)   # 60 ms: still the same instant, for the hub
    assert c.offset_ms == 0.0
    c._sample(300.0, 300.002, 300, 501_000)  # half a second (and a shorter round trip)
    assert round(c.offset_ms) == 500
