"""Every service, once started, freezes what start-up built and collects young objects less
often (callingest.service.settle_heap; its cost measured in docs/benchmarks.md, cost of tracing)."""

from __future__ import annotations

import json

import pytest

from callingest import stages
from callingest.service import GC_THRESHOLDS
from tests.conftest import Services

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.s3, pytest.mark.smtp, pytest.mark.slow]


def test_every_service_freezes_its_start_up_heap(services: Services) -> None:
    for name in stages.SERVICES:
        service = services.start(name)
        lines = [json.loads(line) for line in service.log_text().splitlines() if line.startswith("{")]
        (frozen,) = [line for line in lines if line.get("msg") == "start-up heap frozen"]
        assert frozen["service"] == name
        # the modules and the app at least: tens of thousands of objects, none of them collected again
        assert frozen["frozen_objects"] > 10_000
        assert frozen["gc_thresholds"] == list(GC_THRESHOLDS)
        assert GC_THRESHOLDS[0] > 700  # CPython's default, collected several times a submission
        assert services.stop(name) == 0
