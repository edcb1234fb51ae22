"""The counters the ingress and workers keep in Redis for the admin, the CLI and /metrics.

``stats:{minute}`` (a hash per minute, expiring) and ``totals`` (running since the start)
hold the same fields, incremented by the ingress's store script (``accepted``) and by each
worker process, which counts its outcomes and writes them once a second (workers/tally.py:
right within a second), so any admin process sees the whole hub:

==================  =======================================================================
field               counts
==================  =======================================================================
accepted            events accepted (202)
{sub}|d             deliveries that succeeded
{sub}|f             attempts that failed
{sub}|x             deliveries dead-lettered
{sub}|l{i}          attempts whose latency fell in bucket ``i`` (``LATENCY_BUCKETS_MS``)
{sub}|ls            (totals only) the sum of those latencies, ms
backlog             (stats only) the oldest backlog seen in that minute, ms
==================  =======================================================================
"""

from __future__ import annotations

#: Per-minute counters are kept this long at most (the console charts a day at most).
STATS_TTL = 8 * 86400
#: Upper bounds (ms) of the latency buckets; a last, open bucket follows.
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
#: Metric outcome label -> field suffix.
OUTCOMES = {"delivered": "d", "failed": "f", "dead_lettered": "x"}


def latency_bucket(latency_ms: float) -> int:
    for i, bound in enumerate(LATENCY_BUCKETS_MS):
        if latency_ms <= bound:
            return i
    return len(LATENCY_BUCKETS_MS)


def quantile(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile (ms) of bucketed latencies, interpolated within its bucket."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            low = LATENCY_BUCKETS_MS[i - 1] if i > 0 else 0
            if i >= len(LATENCY_BUCKETS_MS):
                return float(low)
            high = LATENCY_BUCKETS_MS[i]
            return round(low + (high - low) * (rank - seen) / count, 1)
        seen += count
    return float(LATENCY_BUCKETS_MS[-1])
