"""Hub-wide Prometheus metrics, built at scrape time from what Redis holds.

Whichever worker made a delivery, its counts are in Redis (relay/counters.py), so any admin
process exports the whole hub. prometheus-client's collectors are synchronous; the admin
reads Redis first (async) and hands this collector a snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from relay.counters import LATENCY_BUCKETS_MS, OUTCOMES
from relay.health import STATES


class Snapshot:
    def __init__(self, totals: dict[str, float], subscribers: list[dict[str, Any]],
                 overview: dict[str, Any]) -> None:
        self.totals = totals
        self.subscribers = subscribers
        self.overview = overview

    def collect(self) -> Iterator[Metric]:
        names = [s["name"] for s in self.subscribers]
        t = self.totals
        deliveries = CounterMetricFamily("relay_deliveries", "Delivery outcomes, hub-wide",
                                         labels=["subscriber", "outcome"])
        for name in names:
            for outcome, suffix in OUTCOMES.items():
                deliveries.add_metric([name, outcome], t.get(f"{name}|{suffix}", 0.0))
        yield deliveries

        duration = HistogramMetricFamily("relay_delivery_duration_seconds",
                                         "Time from a post to its answer (or failure)",
                                         labels=["subscriber"])
        for name in names:
            cumulative, buckets = 0.0, []
            for i, bound in enumerate(LATENCY_BUCKETS_MS):
                cumulative += t.get(f"{name}|l{i}", 0.0)
                buckets.append((f"{bound / 1000:g}", cumulative))
            cumulative += t.get(f"{name}|l{len(LATENCY_BUCKETS_MS)}", 0.0)
            buckets.append(("+Inf", cumulative))
            duration.add_metric([name], buckets, t.get(f"{name}|ls", 0.0) / 1000)
        yield duration

        accepted = CounterMetricFamily("relay_events_accepted", "Events accepted (202)")
        accepted.add_metric([], t.get("accepted", 0.0))
        yield accepted

        o = self.overview
        for metric, key, help_ in (
                ("relay_queue_messages", "queueMessages", "Celery messages waiting in the queue"),
                ("relay_retries_scheduled", "retriesScheduled",
                 "Attempts waiting in the schedule (retries, parked, leases)"),
                ("relay_backlog_oldest_seconds", "backlogOldestSeconds",
                 "Age of the oldest work no worker has taken")):
            gauge = GaugeMetricFamily(metric, help_)
            gauge.add_metric([], float(o.get(key) or 0))
            yield gauge
        workers = GaugeMetricFamily("relay_workers_seen", "Workers seen in the last minute")
        workers.add_metric([], float(len(o.get("workers") or [])))
        yield workers

        dead = GaugeMetricFamily("relay_dead_letters", "Dead letters held now",
                                 labels=["subscriber"])
        state = GaugeMetricFamily("relay_subscriber_state",
                                  "1 for the subscriber's current state",
                                  labels=["subscriber", "state"])
        for sub in self.subscribers:
            dead.add_metric([sub["name"]], float(sub["deadLetters"]))
            if sub["configured"]:
                for name in STATES:
                    state.add_metric([sub["name"], name], 1.0 if sub["state"] == name else 0.0)
        yield dead
        yield state

        waiting = GaugeMetricFamily("relay_ordering_waiting",
                                    "Ordered events waiting behind another event of their key",
                                    labels=["subscriber"])
        blocked = GaugeMetricFamily("relay_ordering_blocked_keys",
                                    "Ordered keys blocked by a dead letter (on_dead: block)",
                                    labels=["subscriber"])
        for sub in self.subscribers:
            if sub.get("ordering"):
                waiting.add_metric([sub["name"]], float(sub["ordering"]["waiting"]))
                blocked.add_metric([sub["name"]], float(sub["ordering"]["blockedKeys"]))
        yield waiting
        yield blocked


def render(snapshot: Snapshot) -> bytes:
    registry = CollectorRegistry()
    registry.register(snapshot)  # type: ignore[arg-type]
    return generate_latest(registry)
