"""relay.batching.Batcher: how items are grouped into batches, lingering or not."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from relay.batching import Batcher, GroupCommit, Script
from tests.support import RedisServer


class Recorder(Batcher[int, int]):
    """Doubles each item; records the batches it was given and when each started."""

    def __init__(self, **kwargs: float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.batches: list[list[int]] = []
        self.started: list[float] = []

    async def _run(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        self.started.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.001)  # a round trip
        return [2 * i for i in items]


async def stream(batcher: Recorder, count: int, every: float) -> list[int]:
    """Submit ``count`` items one at a time, ``every`` seconds apart, like an open-loop sender."""
    calls = []
    for i in range(count):
        calls.append(asyncio.create_task(batcher.submit(i)))
        await asyncio.sleep(every)
    return list(await asyncio.gather(*calls))


def test_without_linger_a_steady_stream_goes_one_item_per_batch() -> None:
    batcher = Recorder()
    assert asyncio.run(stream(batcher, 20, 0.003)) == [2 * i for i in range(20)]
    assert max(len(b) for b in batcher.batches) <= 2


def test_with_linger_a_steady_stream_is_gathered_into_fewer_batches() -> None:
    batcher = Recorder(linger=0.03)
    assert asyncio.run(stream(batcher, 40, 0.002)) == [2 * i for i in range(40)]
    assert sorted(i for b in batcher.batches for i in b) == list(range(40))
    assert len(batcher.batches) <= 8, [len(b) for b in batcher.batches]
    gaps = [b - a for a, b in zip(batcher.started, batcher.started[1:], strict=False)]
    assert min(gaps) >= 0.029  # no two batches closer than the linger


def test_a_lone_item_after_a_quiet_spell_is_not_held_back() -> None:
    async def scenario() -> float:
        batcher = Recorder(linger=0.5)
        await batcher.submit(1)
        await asyncio.sleep(0.6)  # quieter than the linger
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await batcher.submit(2)
        return loop.time() - t0

    assert asyncio.run(scenario()) < 0.2


def test_a_batch_with_enough_items_does_not_wait_out_the_linger() -> None:
    async def scenario() -> tuple[float, list[list[int]]]:
        batcher = Recorder(linger=5.0, enough=10)
        await batcher.submit(0)  # starts the linger clock
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.gather(*(batcher.submit(i) for i in range(1, 11)))
        return loop.time() - t0, batcher.batches

    waited, batches = asyncio.run(scenario())
    assert waited < 1.0
    assert batches[1] == list(range(1, 11))


def test_a_failing_batch_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    class Flaky(Recorder):
        async def _run(self, items: list[int]) -> list[int]:
            if 13 in items:
                raise OSError("redis went away")
            return await super()._run(items)

    async def scenario() -> tuple[list[object], int]:
        batcher = Flaky(linger=0.01)
        first = await asyncio.gather(batcher.submit(13), batcher.submit(14),
                                     return_exceptions=True)
        return list(first), await batcher.submit(15)

    first, later = asyncio.run(scenario())
    assert all(isinstance(r, OSError) for r in first)
    assert later == 30


def test_a_burst_meeting_noscript_loads_the_script_once_within_the_pool(
        redis_server: RedisServer) -> None:
    """After a Redis restart every caller of a batch hears NOSCRIPT at once; loading the script
    once per caller on connections of its own exhausted the worker's pool (MaxConnectionsError
    failed the tasks). Now one SCRIPT LOAD rides a round trip, and every caller gets its result."""
    script = Script("return tonumber(ARGV[1]) * 2")

    async def burst() -> tuple[list[Any], int]:
        client = aioredis.Redis.from_url(redis_server.url, max_connections=2)
        try:
            await client.script_flush()
            before = await loads(client)
            batch = GroupCommit(client)
            results = await asyncio.gather(*(batch.script(script, [], [n]) for n in range(300)))
            return list(results), await loads(client) - before
        finally:
            await client.aclose()

    async def loads(client: aioredis.Redis) -> int:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_script|load", {}).get("calls", 0))

    results, loaded = asyncio.run(burst())
    assert results == [2 * n for n in range(300)]
    assert loaded == 1
