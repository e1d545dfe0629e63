"""The counters behind the "any in the last hour" alerts (CallingestDeadLettersNotEmpty,
CallingestWebhookDeliveriesAbandoned) are exported at 0 by a freshly started service, before
any event: a labelled child created at its first increment starts at 1, and increase() over
a series that starts at 1 is 0, so the first dead letter or abandoned delivery never alerted."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from callingest.topics import Topics
from callingest.webhooks import EVENT_TYPES
from services.webhooks.dispatch import DELIVERY_OUTCOMES
from tests.conftest import Services

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.slow]


def _samples(url: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """``{labels: value}`` of the samples ``name`` that ``url``/metrics exports."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {frozenset(s.labels.items()): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


def test_a_consumer_exports_its_dead_letters_at_zero_before_the_first(
        services: Services, db: Any, topics: Topics) -> None:
    services.initialized = True  # the fixtures created this test's topics and indexes
    validator = services.start("validator")
    samples = _samples(validator.url, "callingest_dead_letters_total")
    consumed = [topics.submitted, *topics.retry_topics("validator")]
    assert {frozenset({("service", "validator"), ("topic", t)}): 0.0 for t in consumed} == samples


def test_the_webhooks_export_every_delivery_outcome_at_zero_before_the_first(
        services: Services, db: Any, topics: Topics) -> None:
    services.initialized = True
    webhooks = services.start("webhooks")
    samples = _samples(webhooks.url, "callingest_webhook_deliveries_total")
    assert "abandoned" in DELIVERY_OUTCOMES
    for event in EVENT_TYPES:
        for outcome in DELIVERY_OUTCOMES:
            assert samples.get(frozenset({("event", event), ("outcome", outcome)})) == 0.0, \
                (event, outcome, samples)
