"""Keep the garbage collector's full passes short in long-running hub processes.

Python's cyclic GC runs a full (generation 2) pass every so many allocations, and each pass
walks every tracked object: in a worker, ~73,000 of them are the modules, classes and
functions of Celery, kombu, aiohttp and redis-py, loaded at start and never freed. At a
steady event rate those passes came round every ~0.9 s and stalled the process for tens of
milliseconds each: they were the whole latency tail of the benchmark (p99 202 -> sink at
fan-out 10: 50 ms before, 9 ms after; docs/benchmarks.md). ``gc.freeze()`` (Python 3.7+)
moves everything alive at that moment into a permanent generation the collector skips;
objects made later are collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect once, then exempt every object alive now from later passes; how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
