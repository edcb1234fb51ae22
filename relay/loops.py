"""The event loop every asyncio process of the hub runs on: uvloop when it is installed.

uvloop (libuv under asyncio's API) runs the same code with less CPU per callback, socket
read and write; measured in the bench's same-run A/B (docs/benchmarks.md) before it was
adopted. ``RELAY_UVLOOP=0`` falls back to asyncio's own loop (so does a machine without
uvloop: it is optional). The bench's ceilings (the bare handler, the raw egress client)
and its sinks and load generator use the same loop as the hub, so its ratios compare like
with like.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new event loop here: uvloop's, unless absent or RELAY_UVLOOP=0."""
    if os.environ.get("RELAY_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def name() -> str:
    """``uvloop`` or ``asyncio``: the loop this process's new loops are."""
    return "uvloop" if factory() is not asyncio.new_event_loop else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    return factory()()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the hub's loop."""
    with asyncio.Runner(loop_factory=factory()) as runner:
        return runner.run(coro)
