"""An operator flapping pause/resume while the circuit breaker opens and recovers, across two
worker processes with a parked backlog: every event is delivered or dead-lettered, none left
behind in any set (each process decides on a gate verdict it cached up to a second ago)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from relay import health
from tests.fault.helpers import KEYS, Load, account, bodies, wait_quiet
from tests.hub import Reply, dead_letters, ingress, worker, write_config
from tests.support import wait_until

pytestmark = pytest.mark.fault

EVENTS = 300
FAILING_FOR = 1.0
FLAP_FOR = 8.0


def flap(url: str, stop: threading.Event) -> int:
    """Pause and resume ``erp`` at random intervals of 5-50 ms until ``stop``; ends resumed."""
    async def run() -> int:
        client = aioredis.from_url(url)
        flips = 0
        try:
            while not stop.is_set():
                await health.pause(client, KEYS, "erp", int(time.time() * 1000))
                await asyncio.sleep(random.uniform(0.005, 0.05))
                await health.resume(client, KEYS, "erp", int(time.time() * 1000))
                await asyncio.sleep(random.uniform(0.005, 0.05))
                flips += 1
            return flips
        finally:
            await client.aclose()
    return asyncio.run(run())


def test_pause_resume_and_breaker_flapping_lose_no_parked_attempt(
        tmp_path: Path, redis_server, redis_client, sink, report) -> None:
    config = write_config(
        tmp_path / "relay.yaml", redis_server.url,
        [{"name": "erp", "url": sink.url("/erp"), "secret": "s-erp",
          "circuit_breaker": {"failures": 3, "cool_down": "300ms", "max_cool_down": "1s"}}],
        delivery={"timeout": "2s", "max_attempts": 30,
                  "backoff": {"initial": "100ms", "max": "500ms"}},
        worker={"concurrency": 1, "lease_grace": "2s", "visibility_timeout": "10s",
                "max_in_flight": 4, "max_connections": 2})
    started = time.monotonic()
    sink.behave("/erp", lambda n: Reply(503) if time.monotonic() - started < FAILING_FOR
                else Reply(200, delay=0.05))
    events = bodies("FLAP", EVENTS)
    stop = threading.Event()
    flips: list[int] = []

    with ingress(config, tmp_path / "ingress.log") as url, \
            worker(config, tmp_path / "worker-a.log"), \
            worker(config, tmp_path / "worker-b.log", "--no-scheduler"):
        flapper = threading.Thread(target=lambda: flips.append(flap(redis_server.url, stop)))
        flapper.start()
        try:
            # A steady stream faster than the slow subscriber takes it: lanes stay full and
            # new attempts are parked all along, so pulls happen under every verdict.
            load = Load(url, concurrency=4, rate=EVENTS / FLAP_FOR).start(events)
            assert load.join(60).accepted == set(events)
        finally:
            stop.set()
            flapper.join(10)

        def settled() -> bool:
            done = {e for (_, e) in account(sink, {("/erp", e) for e in events}).lost}
            return not (done - {e for e, _ in dead_letters(redis_client)})
        wait_until(settled, 120, 0.2, what="every event delivered or dead-lettered")
        left = wait_quiet(redis_client, timeout=30)

    erp = account(sink, {("/erp", e) for e in events})
    dead = {e for e, _ in dead_letters(redis_client)}
    report(fault="pause/resume flapping and breaker recovery, two workers, parked backlog",
           erp=erp.figures(), dead_letters=len(dead), flips=flips, backlog_left=left)
    assert not (set(e for _, e in erp.lost) - dead)
    assert not any(left.values())
    for key in (KEYS.held("erp"), KEYS.parked("erp"), KEYS.pending("erp")):
        assert redis_client.zcard(key) == 0, key
