"""`callingest serve gateway` as a process: one worker, and several SO_REUSEPORT workers."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest

from tests.conftest import Services
from tests.services.gateway.conftest import NETWORK_TOKEN
from tests.services.gateway.test_gateway_api import call_body

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.slow]


def submit(base_url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{base_url}/api/2022-03-01/calls.json",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def metrics_text(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_gateway(
    services: Services, configured_db: Any, topics: Any, workers: int
) -> None:
    gateway = services.start("gateway", env={"GATEWAY_WORKERS": str(workers)})
    statuses = [
        (await asyncio.to_thread(submit, gateway.url, call_body(f"proc-{i % 3}")))[0]
        for i in range(12)
    ]
    assert sorted(statuses) == [201] * 3 + [202] * 9
    text = await asyncio.to_thread(metrics_text, gateway.url)
    assert 'route="/api/2022-03-01/calls.json"' in text
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("callingest_http_requests_total{")
        and 'route="/api/2022-03-01/calls.json"' in line
    )
    assert counted == 12  # every worker's requests, aggregated behind one endpoint
    assert services.stop("gateway") == 0
    assert NETWORK_TOKEN not in gateway.log_text()
