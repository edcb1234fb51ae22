"""Fixtures of the fault suite: recording sinks and the per-test figures report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault.helpers import EventSink, FigureReport


@pytest.fixture
def sink() -> Iterator[EventSink]:
    s = EventSink().start()
    yield s
    s.stop()


@pytest.fixture
def report(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """``report(**figures)``: print the figures and write them as a JSON line (see helpers)."""
    return FigureReport(request.node.nodeid, tmp_path).record
