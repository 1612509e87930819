"""Prometheus metrics, named as the contract's /metrics section says; counted at the edges."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

INGEST_TOTAL = Counter(
    "vigil_ingest_total",
    "Device messages accepted into the durable log",
    ["transport", "kind"],
    registry=REGISTRY,
)
DEADLETTER_TOTAL = Counter(
    "vigil_deadletter_total", "Messages or items refused, by reason code", ["reason"], registry=REGISTRY
)
DUPLICATES_TOTAL = Counter(
    "vigil_duplicates_total", "Repeated messages skipped by deduplication", registry=REGISTRY
)
LATE_TOTAL = Counter(
    "vigil_late_total", "Messages with an unseen lower seq (late data)", ["kind"], registry=REGISTRY
)
BACKFILL_TOTAL = Counter(
    "vigil_backfill_total", "Messages received long after their device time (backfill)", registry=REGISTRY
)
ALERT_TRANSITIONS = Counter(
    "vigil_alert_transitions_total",
    "Alert versions the clinical stage produced, by priority and reason",
    ["priority", "reason"],
    registry=REGISTRY,
)
PAGES_TOTAL = Counter(
    "vigil_pages_total", "Escalation steps: paged, or skipped with a reason", ["outcome"], registry=REGISTRY
)
INGEST_LATENCY = Histogram(
    "vigil_ingest_latency_seconds",
    "Gateway receipt to durable vitals storage",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
ALERT_DELIVERY = Histogram(
    "vigil_alert_delivery_seconds",
    "Alert raised to pushed to a websocket client",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
WS_CONNECTIONS = Gauge("vigil_ws_connections", "Open websocket connections", registry=REGISTRY)
WS_OPS_FAILED = Counter(
    "vigil_ws_ops_failed_total",
    "Websocket operations answered unavailable (a store did not answer)",
    registry=REGISTRY,
)
LOG_APPENDED = Counter(
    "vigil_log_appended_total", "Records appended to the event log", ["topic"], registry=REGISTRY
)
PROCESSOR_ERRORS = Counter(
    "vigil_processor_errors_total", "Batches a processor had to retry", ["processor"], registry=REGISTRY
)
VITALS_BACKLOG = Gauge(
    "vigil_vitals_backlog", "Vitals points buffered on disk for the store", registry=REGISTRY
)
MQTT_HELD = Counter(
    "vigil_gateway_held_total",
    "MQTT messages whose PUBACK was withheld while the log or bus could not take them (retried)",
    registry=REGISTRY,
)
BROKER_DROPS = Counter(
    "vigil_broker_dropped_total",
    "Messages the MQTT broker reports it dropped for Vigil's session",
    registry=REGISTRY,
)

_COUNTERS: dict[str, Counter] = {
    "vigil_duplicates_total": DUPLICATES_TOTAL,
    "vigil_late_total": LATE_TOTAL,
    "vigil_deadletter_total": DEADLETTER_TOTAL,
    "vigil_backfill_total": BACKFILL_TOTAL,
    "vigil_alert_transitions_total": ALERT_TRANSITIONS,
    "vigil_pages_total": PAGES_TOTAL,
}


def count(metric: str, labels: tuple[tuple[str, str], ...], value: float) -> None:
    """Apply a `Count` effect to its counter."""
    counter = _COUNTERS[metric]
    (counter.labels(**dict(labels)) if labels else counter).inc(value)
