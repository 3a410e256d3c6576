"""Prometheus metrics of the bridge, correct under Celery's prefork pool.

In a worker, ``bridge worker`` points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before anything imports prometheus_client, so every pool child writes
its samples there and one HTTP endpoint in the main process sums them. Label
values are closed sets (sources, decisions, reasons, operations), never keys or
ids, and known series start at zero.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

# Intake messages decided together (workers/intake_batch.py): up to worker.intake_batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SOURCES = ("alertmanager", "grafana", "pagerduty", "generic", "canonical")
DECISIONS = (
    "create",
    "takeover",
    "new_after_window",
    "wait_for_creator",
    "pending_resolve",
    "count_only",
    "skip_unchanged",
    "coalesced_update",
    "resolve",
    "hold_resolve",
    "reopen",
    "flapping",
    "ignore_orphan",
    "ignore_duplicate",
)
EFFECTS = ("created", "adopted", "updated", "resolved", "reopened")
DLQ_REASONS = (
    "invalid_payload",
    "itsm_rejected",
    "itsm_auth",
    "retries_exhausted",
    "ambiguous_create",
    "poison",
    "internal_error",
)
OPERATIONS = ("token", "create", "get", "update", "search", "note", "delete")


class Metrics:
    """The bridge's metrics; ``observe`` is the pipeline's observer hook."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.decisions = Counter(
            "bridge_decisions_total", "Alerts by dedup decision.", ["decision"], **kw
        )
        self.rejected = Counter(
            "bridge_alerts_rejected_total",
            "Messages rejected before any decision, by source and reason.",
            ["source", "reason"],
            **kw,
        )
        self.effects = Counter(
            "bridge_itsm_effects_total", "Incident effects in the ITSM.", ["effect"], **kw
        )
        self.itsm_requests = Counter(
            "bridge_itsm_requests_total",
            "ITSM HTTP requests by operation and status code.",
            ["operation", "status"],
            **kw,
        )
        self.itsm_seconds = Histogram(
            "bridge_itsm_request_seconds", "ITSM request latency.", ["operation"], **kw
        )
        self.token_requests = Counter(
            "bridge_token_requests_total", "Token requests by grant.", ["grant"], **kw
        )
        self.retries = Counter(
            "bridge_retries_total", "Actions rescheduled, by reason.", ["reason"], **kw
        )
        self.itsm_failures = Counter(
            "bridge_itsm_failures_total", "Failed ITSM actions, by class.", ["reason"], **kw
        )
        self.dead_letters = Counter(
            "bridge_dead_letters_total",
            "Entries written to the dead-letter store.",
            ["reason"],
            **kw,
        )
        self.anomalies = Counter(
            "bridge_anomalies_total", "Key anomalies seen in ITSM records.", ["kind"], **kw
        )
        self.intake_batches = Histogram(
            "bridge_intake_batch_messages",
            "Intake messages decided together, in one Redis round trip.",
            buckets=BATCH_BUCKETS,
            **kw,
        )
        self.latency = Histogram(
            "bridge_alert_to_itsm_seconds",
            "Time from acceptance of an alert to its effect in the ITSM.",
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        for d in DECISIONS:
            self.decisions.labels(d)
        for e in EFFECTS:
            self.effects.labels(e)
        for r in DLQ_REASONS:
            self.dead_letters.labels(r)
        for grant in ("password", "refresh", "any"):
            self.token_requests.labels(grant)

    def observe(self, name: str, **labels: Any) -> None:
        if name == "decision":
            self.decisions.labels(labels["decision"]).inc(labels.get("count", 1))
        elif name == "rejected":
            self.rejected.labels(labels.get("source", "unknown"), labels["reason"]).inc()
        elif name == "effect":
            self.effects.labels(labels["effect"]).inc()
        elif name == "retry":
            self.retries.labels(labels["reason"]).inc()
        elif name == "itsm_failure":
            self.itsm_failures.labels(labels["reason"]).inc()
        elif name == "dead_letter":
            self.dead_letters.labels(labels["reason"]).inc()
        elif name == "anomaly":
            self.anomalies.labels(labels["kind"]).inc()
        elif name == "latency":
            self.latency.observe(labels["seconds"])
        elif name == "intake_batch":
            self.intake_batches.observe(labels["messages"])

    def on_request(self, operation: str, status: int | str | None, seconds: float) -> None:
        """The ITSM client's request hook (status None: no answer, a network error)."""
        self.itsm_requests.labels(operation, str(status or "none")).inc()
        self.itsm_seconds.labels(operation).observe(seconds)
        if operation.startswith("token"):
            grant = operation.partition("_")[2] or "any"
            self.token_requests.labels(grant).inc()


class DeadLetterGauge:
    """Collector reading the dead-letter store's size at scrape time."""

    def __init__(self, dlq: Any) -> None:
        self._dlq = dlq

    def collect(self) -> Any:
        gauge = GaugeMetricFamily(
            "bridge_dead_letters_current", "Entries in the dead-letter store now."
        )
        try:
            gauge.add_metric([], float(self._dlq.count()))
        except Exception:  # Redis down: no sample rather than a failed scrape
            return
        yield gauge


def exposition_registry(dlq: Any = None) -> CollectorRegistry:
    """A registry for /metrics: summed over processes in multiprocess mode."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    if dlq is not None:
        registry.register(DeadLetterGauge(dlq))
    return registry
