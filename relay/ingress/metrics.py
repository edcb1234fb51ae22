"""Prometheus metrics of the ingress (served on ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class IngressMetrics:
    """One registry per app, so tests can build several apps in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter("relay_ingress_accepted_total",
                                "Events stored and queued for fan-out", registry=self.registry)
        self.duplicates = Counter("relay_ingress_duplicates_total",
                                  "Events seen before, within the dedupe window",
                                  registry=self.registry)
        self.rejected = Counter("relay_ingress_rejected_total", "Requests refused, by reason",
                                ["reason"], registry=self.registry)
        self.latency = Histogram(
            "relay_ingress_request_seconds", "Time from request to answer on webhook routes",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry)
