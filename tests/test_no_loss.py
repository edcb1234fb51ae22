"""Paths where an acknowledged delivery could vanish, each driven on a real engine (in this
process, on its own loop thread) against the private Redis: a stale gate verdict when parked
attempts are pulled, Redis refusing writes when full, and dead letters written last."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from relay import health
from relay.config import Config, load_config
from relay.keys import Keys
from relay.queue import deliver_message, read_deliver_message
from tests.hub import Sink, dead_letters, enqueue_event, event_body, write_config
from tests.support import RedisServer
from workers import attempts as attempts_module
from workers.engine import Engine


@pytest.fixture
def config(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
           sink: Sink) -> Config:
    return load_config(write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "erp-secret"}]))


@pytest.fixture
def engine(config: Config) -> Iterator[Engine]:
    e = Engine(config)
    yield e
    e.drain(5)


def on_loop(engine: Engine, coro: Any) -> Any:
    return engine._call(coro)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_client(url: str, fn: Any) -> Any:
    client = aioredis.from_url(url)
    try:
        return await fn(client)
    finally:
        await client.aclose()


def full(client: redis.Redis) -> None:
    """Redis refuses every write that could grow it (it still serves reads and deletes)."""
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)


def where(client: redis.Redis, keys: Keys, member: bytes) -> list[str]:
    """Every place a pending attempt can be: the schedule, held, parked, the queue."""
    found = []
    if client.zscore(keys.schedule, member) is not None:
        found.append("schedule")
    if client.zscore(keys.held("erp"), member) is not None:
        found.append("held")
    if client.zscore(keys.parked("erp"), member) is not None:
        found.append("parked")
    if member in client.lrange(keys.queue, 0, -1):
        found.append("queue")
    return found


def test_a_parked_attempt_pulled_under_a_stale_hold_verdict_stays_scheduled(
        engine: Engine, config: Config, redis_server: RedisServer,
        redis_client: redis.Redis) -> None:
    """The gate's cached verdict (kept a second) says "paused" but an operator just resumed:
    the pulled attempt is put back in the schedule due now, not deleted."""
    keys = Keys.of(config)
    event_id = enqueue_event(redis_client, event_body("EVSTALE1"))
    redis_client.delete(keys.queue, keys.unclaimed)  # this test drives the pull alone
    sub = config.subscriber("erp")
    assert sub is not None
    run(_with_client(redis_server.url,
                     lambda c: health.pause(c, keys, "erp", int(time.time() * 1000))))
    assert on_loop(engine, engine.gate.admit(sub)).hold  # the gate learns "paused"
    run(_with_client(redis_server.url,
                     lambda c: health.resume(c, keys, "erp", int(time.time() * 1000))))
    member = deliver_message(keys.queue, event_id, ["erp"], 1)
    redis_client.zadd(keys.parked("erp"), {member: int(time.time() * 1000)})
    engine.lanes["erp"].parked = True

    on_loop(engine, engine._pull("erp"))

    assert where(redis_client, keys, member) == ["schedule"]
    assert redis_client.zscore(keys.schedule, member) <= time.time() * 1000 + 1


def test_a_full_redis_keeps_the_task_noted_until_its_plan_is_written(
        engine: Engine, config: Config, redis_client: redis.Redis) -> None:
    """Redis refuses writes (maxmemory, noeviction) but still deletes: the task's note in
    ``unclaimed`` must not be removed while the leases it stands for were refused."""
    keys = Keys.of(config)
    enqueue_event(redis_client, event_body("EVOOM1"))
    (message,) = redis_client.zrange(keys.unclaimed, 0, -1)
    redis_client.rpop(keys.queue)  # a worker took it
    full(redis_client)
    try:
        with pytest.raises(redis.exceptions.RedisError):
            on_loop(engine, engine._start(*task_of(message)))
        still = redis_client.zrange(keys.unclaimed, 0, -1)
    finally:
        redis_client.config_set("maxmemory", 0)
    assert still == [message]
    assert redis_client.zcard(keys.schedule) == 0


def task_of(message: bytes) -> tuple[Any, ...]:
    """The arguments a worker's task gets from ``message``."""
    args = read_deliver_message(message)
    return args.event_id, args.subscribers, args.attempt, args.batch


def test_a_last_resort_dead_letter_is_written_before_the_task_is_forgotten(
        engine: Engine, config: Config, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An event whose record expired gets the dead letter "event expired". While Redis
    refuses that write, the task's note stays in ``unclaimed`` (it is queued again later),
    rather than being dropped first and the dead letter never written."""
    keys = Keys.of(config)
    event_id = enqueue_event(redis_client, event_body("EVGONE1"))
    (message,) = redis_client.zrange(keys.unclaimed, 0, -1)
    redis_client.rpop(keys.queue)
    redis_client.delete(keys.event(event_id))  # the record expired
    monkeypatch.setattr(attempts_module, "PERSIST_FOR", 0.3)
    full(redis_client)
    try:
        on_loop(engine, engine._start_until_done(*task_of(message)))
        noted = redis_client.zrange(keys.unclaimed, 0, -1)
    finally:
        redis_client.config_set("maxmemory", 0)
    assert noted == [message]
    # Redis has room again: the task runs again and the dead letter is written.
    on_loop(engine, engine._start_until_done(*task_of(message)))
    assert (event_id, "*") in dead_letters(redis_client)
    assert redis_client.zcard(keys.unclaimed) == 0
