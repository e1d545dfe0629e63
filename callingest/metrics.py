"""Every Prometheus metric the platform exports, declared once.

Names follow Prometheus conventions: base units, ``_total`` for counters,
``_seconds`` and ``_bytes`` for quantities. Label values are bounded sets
(route templates, topic names, stage names, failure classes), never cuids.

When ``PROMETHEUS_MULTIPROC_DIR`` is set (the gateway with several worker
processes), prometheus-client writes per-process files there and
:func:`render_latest` aggregates them behind one endpoint.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Buckets for request latency: the gateway answers in milliseconds.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Buckets for a pipeline stage: fetching and transcoding take seconds to minutes.
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

# HTTP requests served, by service, method, route template and status code.
HTTP_REQUESTS = Counter(
    "callingest_http_requests_total",
    "HTTP requests served",
    ["service", "method", "route", "status"],
)
# HTTP request latency from first byte read to response written.
HTTP_REQUEST_DURATION = Histogram(
    "callingest_http_request_duration_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=_HTTP_BUCKETS,
)
# Call submissions answered by the gateway, by result (created, corrected: a failed call
# resubmitted with new content, duplicate, conflict, unavailable: Kafka did not acknowledge
# and the answer was 503).
CALLS_SUBMITTED = Counter(
    "callingest_calls_submitted_total",
    "Call submissions answered by the gateway, by result",
    ["result"],
)
# Events consumed from Kafka, by topic and outcome (ok, retry, deferred: sent back untried,
# failed, dead_letter, skipped, duplicate).
EVENTS_CONSUMED = Counter(
    "callingest_events_consumed_total",
    "Events consumed, by topic and outcome",
    ["service", "topic", "outcome"],
)
# Events produced to Kafka and acknowledged (outcome ok) or refused (outcome error).
EVENTS_PRODUCED = Counter(
    "callingest_events_produced_total",
    "Events produced, by topic and outcome",
    ["service", "topic", "outcome"],
)
# Time a stage spends on one event, by outcome.
STAGE_DURATION = Histogram(
    "callingest_stage_duration_seconds",
    "Processing time of one event in a pipeline stage",
    ["stage", "outcome"],
    buckets=_STAGE_BUCKETS,
)
# Messages between the consumer's committed offset and the partition's end.
CONSUMER_LAG = Gauge(
    "callingest_consumer_lag_messages",
    "Consumer lag per partition",
    ["service", "topic", "partition"],
    multiprocess_mode="max",
)
# Messages taken from Kafka whose processing has not finished.
EVENTS_IN_FLIGHT = Gauge(
    "callingest_events_in_flight",
    "Events being processed",
    ["service"],
    multiprocess_mode="livesum",
)
# Events read ahead and waiting (per network, fairly) for a slot.
EVENTS_QUEUED = Gauge(
    "callingest_events_queued",
    "Events read ahead and waiting for a slot",
    ["service"],
    multiprocess_mode="livesum",
)
# Events sent back to the first retry tier untried (a shared resource was busy), by stage.
DEFERRALS = Counter(
    "callingest_deferrals_total",
    "Events deferred untried because a shared resource (a recording host) was busy",
    ["stage"],
)
# Recording hosts the fetcher tracks, by circuit state (closed, open, half_open); never
# labelled by host, so the series count stays three whatever the number of hosts.
FETCH_CIRCUITS = Gauge(
    "callingest_fetch_circuits",
    "Recording hosts by circuit-breaker state",
    ["state"],
    multiprocess_mode="livesum",
)
# Circuit-breaker transitions, by the state entered.
FETCH_CIRCUIT_TRANSITIONS = Counter(
    "callingest_fetch_circuit_transitions_total",
    "Circuit-breaker state changes of recording hosts, by state entered",
    ["state"],
)
# Downloads not attempted: host circuit open, or host at its concurrency cap.
FETCH_REJECTIONS = Counter(
    "callingest_fetch_rejections_total",
    "Downloads not attempted, by reason (circuit_open, host_busy)",
    ["reason"],
)
# Transient failures scheduled for a delayed retry, by stage.
RETRIES = Counter(
    "callingest_retries_total",
    "Transient failures scheduled for retry",
    ["stage"],
)
# Permanent failures published to calls.failed, by stage and failure class.
FAILURES = Counter(
    "callingest_failures_total",
    "Calls failed, by stage and failure class",
    ["stage", "failure_class"],
)
# Messages sent to the dead-letter topic because they could not be decoded; every consumer
# exports its topics at 0 from start-up (callingest.dead_letters), so the first one alerts.
DEAD_LETTERS = Counter(
    "callingest_dead_letters_total",
    "Undecodable messages sent to the dead-letter topic",
    ["service", "topic"],
)
# Recording bytes downloaded and stored by the fetcher.
BYTES_FETCHED = Counter(
    "callingest_fetched_bytes_total",
    "Recording bytes fetched",
)
# Seconds of audio written by the normalizer.
AUDIO_NORMALIZED = Counter(
    "callingest_normalized_audio_seconds_total",
    "Seconds of audio normalized",
)
# Calls that reached a terminal status (normalized or failed).
CALLS_TERMINAL = Counter(
    "callingest_calls_terminal_total",
    "Calls that reached a terminal status",
    ["status"],
)
# Failure notifications, by outcome (sent, duplicate, error, no_recipient: the network has
# no csm_email).
NOTIFICATIONS = Counter(
    "callingest_notifications_total",
    "Failure notifications, by outcome",
    ["outcome"],
)
# Time from a call's acceptance by the gateway to its normalization (the freshness SLO:
# 95 % within 300 s; docs/runbook.md). Buckets around the 300 s objective.
_FRESHNESS_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 180.0, 240.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0)
CALL_FRESHNESS = Histogram(
    "callingest_call_acceptance_to_normalized_seconds",
    "Time from a call's acceptance by the gateway to its normalized recording",
    buckets=_FRESHNESS_BUCKETS,
)
# Accepted calls whose CallSubmitted event is not yet acknowledged by Kafka.
UNPUBLISHED_CALLS = Gauge(
    "callingest_unpublished_calls",
    "Accepted calls waiting to be published",
    multiprocess_mode="max",
)

# Webhook deliveries queued (one per event and subscribed endpoint), by event type; "skipped"
# counts events that could not be turned into deliveries (logged with their offset).
WEBHOOK_EVENTS = Counter(
    "callingest_webhook_events_total",
    "Webhook deliveries queued, by event type",
    ["event"],
)
# Webhook POST attempts, by event type and outcome (delivered, http_error, timeout,
# connection_error, refused).
WEBHOOK_ATTEMPTS = Counter(
    "callingest_webhook_attempts_total",
    "Webhook delivery attempts, by event type and outcome",
    ["event", "outcome"],
)
# Webhook deliveries that ended, by event type and outcome (delivered, abandoned after the
# retry period, cancelled because the webhook was removed); all exported at 0 from start-up
# (services.webhooks.dispatch), so the first one abandoned alerts.
WEBHOOK_DELIVERIES = Counter(
    "callingest_webhook_deliveries_total",
    "Webhook deliveries ended, by event type and outcome",
    ["event", "outcome"],
)
# From the event (call normalized, failed, retry scheduled) to the receiver's 2xx.
WEBHOOK_DELIVERY_LAG = Histogram(
    "callingest_webhook_delivery_lag_seconds",
    "Time from a call event to its webhook's successful delivery",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0),
)
# From a delivery being due (first attempt or retry) to its attempt starting: the
# deliverer's own backlog, independent of how receivers behave.
WEBHOOK_DISPATCH_DELAY = Histogram(
    "callingest_webhook_dispatch_delay_seconds",
    "Time a due webhook delivery waited for the dispatcher, not counting the time its own "
    "endpoint or network was at its in-flight cap",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0),
)
# Deliveries not yet delivered, given up or cancelled (waiting for a retry included).
WEBHOOK_PENDING = Gauge(
    "callingest_webhook_pending_deliveries",
    "Webhook deliveries pending",
    multiprocess_mode="max",
)
# Age of the oldest pending delivery.
WEBHOOK_OLDEST_PENDING = Gauge(
    "callingest_webhook_oldest_pending_age_seconds",
    "Age of the oldest pending webhook delivery",
    multiprocess_mode="max",
)


def observe_normalized(call: dict[str, Any]) -> None:
    """Record the freshness of a call just normalized: now minus its latest acceptance
    (the gateway's last ``received`` history entry, else its ``created_at``)."""
    accepted = [entry["at"] for entry in call.get("history", [])
                if entry.get("stage") == "gateway" and isinstance(entry.get("at"), datetime)]
    at = max(accepted, default=call.get("created_at"))
    if not isinstance(at, datetime):
        return
    if at.tzinfo is None:  # stored times are UTC
        at = at.replace(tzinfo=UTC)
    CALL_FRESHNESS.observe(max(0.0, (datetime.now(UTC) - at).total_seconds()))


def render_latest() -> tuple[bytes, str]:
    """The exposition text for this process, or for all workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
