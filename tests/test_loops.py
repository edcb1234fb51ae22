"""The hub's event loop: uvloop when installed, asyncio's own with RELAY_UVLOOP=0."""

from __future__ import annotations

import asyncio

import pytest

from relay import loops


def test_uvloop_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv("RELAY_UVLOOP", raising=False)
    assert loops.name() == "uvloop"
    loop = loops.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert loops.run(_running_loop_type()) is uvloop.Loop

    monkeypatch.setenv("RELAY_UVLOOP", "0")
    assert loops.name() == "asyncio"
    assert not issubclass(loops.run(_running_loop_type()), uvloop.Loop)


async def _running_loop_type() -> type:
    return type(asyncio.get_running_loop())
