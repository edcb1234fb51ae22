"""Fixtures of the fault suite: the per-test figures report (``sink`` is tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fault.helpers import FigureReport


@pytest.fixture
def report(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """``report(**figures)``: print the figures and write them as a JSON line (see helpers)."""
    return FigureReport(request.node.nodeid, tmp_path).record
