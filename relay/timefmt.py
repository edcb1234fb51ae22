"""Times as the admin API and CLI show and accept them: ISO 8601 UTC, or unix seconds."""

from __future__ import annotations

import datetime as dt


def iso(seconds: float | None) -> str | None:
    """``2026-12-02T16:24:59.123Z`` (None stays None)."""
    if seconds is None:
        return None
    moment = dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def iso_ms(ms: int | float | None) -> str | None:
    return None if ms is None else iso(ms / 1000)


def parse_time(text: str | None) -> float | None:
    """Unix seconds from ``1796228640``, ``2026-12-02T16:24:59Z``, ``2026-12-02 16:24`` or
    ``2026-12-02`` (UTC unless an offset is given). ValueError names what was expected."""
    if text is None or str(text).strip() == "":
        return None
    value = str(text).strip()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        raise ValueError(f"expected ISO 8601 (2026-12-02T16:24:59Z) or unix seconds, "
                         f"got {value[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()
