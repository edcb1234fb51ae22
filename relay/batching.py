"""Group commit for Redis: many concurrent callers, one pipeline round trip at a time.

Callers that arrive while a round trip is in flight wait for the next one, which carries all of
their commands in a single pipeline; only one pipeline is in flight, so batches grow exactly as
fast as load does and a lone caller pays one round trip, as it would alone. On the 2-core
target machine one round trip per request held an aiohttp handler to ~3k req/s; batching the
writes of concurrent requests this way gave ~4-5k.

The pipeline is not a transaction: a caller that needs its commands to apply together uses a
Lua script (one command); otherwise it orders them so that any prefix is harmless.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

Command = Sequence[Any]
T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Items submitted while a batch is running wait for the next batch; one runs at a time.

    ``linger`` (seconds, 0 = off) is the shortest interval between the starts of two
    batches, like Kafka's ``linger.ms``: under a steady stream of lone items (an open-loop
    sender, one request at a time) a batch then gathers ``rate x linger`` items instead of
    one, so whatever a batch costs downstream (a worker's ~2 ms per Celery message) is
    shared. An item arriving after a quiet spell of ``linger`` or more goes at once, and a
    batch that already holds ``enough`` items does not wait: lingering never costs latency
    at low load or throughput at saturation, only up to ``linger`` under a steady stream.
    """

    def __init__(self, max_batch: int = 0, linger: float = 0.0, enough: int = 0) -> None:
        self._max_batch = max_batch  # 0: no limit
        self._linger = linger
        self._enough = enough or max_batch or sys.maxsize
        self._last_start = 0.0       # loop time the last batch started
        self._filled = asyncio.Event()
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def set_linger(self, linger: float) -> None:
        """A reload may change it; the next batch uses the new value."""
        self._linger = linger

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._enough:
            self._filled.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all())
        return await future

    async def _run(self, items: list[T]) -> list[R]:
        """One result per item, in order; raising fails every item of the batch."""
        raise NotImplementedError

    async def _gather(self) -> None:
        """Wait, at most until ``linger`` after the last batch started, for ``enough`` items."""
        loop = asyncio.get_running_loop()
        wait = self._last_start + self._linger - loop.time()
        if wait > 0 and len(self._pending) < self._enough:
            self._filled.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._filled.wait()
            except TimeoutError:
                pass
        self._last_start = loop.time()

    async def _flush_all(self) -> None:
        while self._pending:
            if self._linger:
                await self._gather()
            cut = self._max_batch or len(self._pending)
            batch, self._pending = self._pending[:cut], self._pending[cut:]
            try:
                results = await self._run([item for item, _ in batch])
            except Exception as exc:  # every waiter hears of it; none is left hanging
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class GroupCommit(Batcher[Sequence[Command], list[Any]]):
    def __init__(self, client: aioredis.Redis, timeout: float = 5.0) -> None:
        # One deadline per round trip, here, rather than the client's ``socket_timeout``:
        # redis-py wraps every socket send in ``asyncio.wait_for`` when that is set, a Task
        # and a timer per send on Python 3.11 (seen in the worker's profile). Give this
        # class a client made without ``socket_timeout``; a Redis that hangs still fails the
        # batch after ``timeout`` seconds (TimeoutError, an OSError).
        super().__init__()
        self._client = client
        self._timeout = timeout
        self._loading: dict[str, asyncio.Future[list[Any]]] = {}

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Run ``commands`` in the next round trip; their results, in order.

        A command that failed has its exception in place of a result (like
        ``execute(raise_on_error=False)``); a connection failure raises for the whole batch.
        """
        return await self.submit(commands)

    async def script(self, script: Script, keys: Sequence[Any], args: Sequence[Any],
                     then: Sequence[Command] = ()) -> Any:
        """Run a Lua script in the next round trip; its result (or the error it raised).

        EVALSHA, loading the script once when Redis answers NOSCRIPT (first use, or a Redis
        that restarted): a script that raised NOSCRIPT did not run, so running it again is safe.
        ``then``: commands sent right after it in the same round trip (e.g. ``WAIT``); with
        them, the result is ``(script result, [their results])``.
        """
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        result, *after = await self.execute([command, *then])
        if isinstance(result, NoScriptError):
            await self._load(script)
            result, *after = await self.execute([command, *then])
        return (result, after) if then else result

    async def call(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``script``'s result, raising the error it raised: for callers with no use for it."""
        result = await self.script(script, keys, args)
        if isinstance(result, Exception):
            raise result
        return result

    async def _load(self, script: Script) -> None:
        """SCRIPT LOAD once for every caller that met NOSCRIPT, inside a round trip.

        After a Redis restart or failover every caller of a batch hears NOSCRIPT at once;
        each loading on its own connection took one from the pool per caller (hundreds
        in a worker's burst), past the pool's limit: MaxConnectionsError failed the tasks,
        whose deliveries then waited for the scheduler's redelivery.
        """
        loading = self._loading.get(script.sha)
        if loading is None:
            loading = asyncio.ensure_future(self.execute([("SCRIPT", "LOAD", script.text)]))
            self._loading[script.sha] = loading
            loading.add_done_callback(lambda _: self._loading.pop(script.sha, None))
        (loaded,) = await asyncio.shield(loading)
        if isinstance(loaded, Exception):
            raise loaded

    async def _run(self, items: list[Sequence[Command]]) -> list[list[Any]]:
        async with asyncio.timeout(self._timeout), \
                self._client.pipeline(transaction=False) as pipe:
            for commands in items:
                for command in commands:
                    pipe.execute_command(*command)
            results = list(await pipe.execute(raise_on_error=False))
        out, start = [], 0
        for commands in items:
            out.append(results[start:start + len(commands)])
            start += len(commands)
        return out


#: Lua, prepended to scripts whose ARGV is a run of counted sections: ``local take =
#: argv_from(3)`` makes ``take()`` return ARGV[3], then ARGV[4], ... one per call.
ARGV_FROM_FN = """
local function argv_from(i)
  return function()
    local v = ARGV[i]
    i = i + 1
    return v
  end
end
"""


class Script:
    """A Lua script's text and SHA1, for ``GroupCommit.script``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
