"""Webhooks through the real pipeline: validator, fetcher, normalizer and the webhooks deliverer
as processes on the real servers, a loopback receiver that refuses each event once."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks import Webhook

from callingest import tracing
from callingest.callview import call_view
from callingest.settings import Settings
from callingest.topics import Topics
from tests.conftest import ROOT, Services, make_settings, settings_env, wait_until
from tests.helpers import call_doc, serve_recordings, submit
from tests.services.fetcher.conftest import wav_bytes
from tests.services.webhooks.conftest import Receiver, apply, doc_verify, network, new_secret

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.s3, pytest.mark.slow]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def settings(servers: Any) -> Settings:
    return make_settings(servers, webhook_retry_first_seconds=0.5,
                         webhook_retry_max_delay_seconds=2.0, webhook_poll_interval_seconds=0.2)


async def test_outcomes_are_signed_retried_with_the_same_id_and_listed_by_calls_show(
        settings: Settings, db: Any, topics: Topics, s3_client: Any, services: Services,
        receivers: Any, tmp_path: Path) -> None:
    # Every event is refused once (500) and accepted on its retry.
    receiver: Receiver = await receivers(answer=lambda _req, nth: 500 if nth == 1 else 204)
    secret = new_secret()
    await apply(db, tmp_path, [network("1001", [
        {"id": "wh-1", "url": receiver.url, "secret": secret,
         "events": ["call.normalized", "call.failed", "call.retrying"]}])])

    served: dict[str, int] = {}

    async def recording(request: web.Request) -> web.Response:
        served[request.match_info["name"]] = served.get(request.match_info["name"], 0) + 1
        if served[request.match_info["name"]] == 1:
            return web.Response(status=503)  # a transient outage: the fetcher retries later
        return web.Response(body=wav_bytes(16000), content_type="audio/wav")

    runner, base = await serve_recordings(recording)
    try:
        for name in ("validator", "normalizer", "webhooks"):
            services.start(name)
        services.start("fetcher", env={"FETCH_MAX_ATTEMPTS": "1"})
        with tracing.attached({"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}):
            flaky = await submit(settings, db, call_doc(recording_url=f"{base}/flaky.wav"))
        failing = await submit(settings, db, call_doc(campaign="91"))

        def delivered_types() -> set[tuple[str, str]]:
            return {(json.loads(r.body)["data"]["cuid"], json.loads(r.body)["type"])
                    for r in receiver.requests if receiver.ids().count(r.headers["webhook-id"]) >= 2}

        expected = {(flaky, "call.retrying"), (flaky, "call.normalized"), (failing, "call.failed")}
        await wait_until(lambda: expected <= delivered_types(), timeout=90, what="three events twice")
    finally:
        await runner.cleanup()

    verify = doc_verify()
    by_id: dict[str, list[Any]] = {}
    for request in receiver.requests:
        assert request.headers["Content-Type"] == "application/json"
        assert verify(secret, request.headers, request.body)
        Webhook(secret).verify(request.body, request.headers)  # the reference library agrees
        by_id.setdefault(request.headers["webhook-id"], []).append(request)
    # The submission's trace continues into every delivery about the call (W3C traceparent).
    for request in receiver.requests:
        if json.loads(request.body)["data"]["cuid"] == flaky:
            assert request.headers["traceparent"].split("-")[1] == TRACE_ID
    for attempts in by_id.values():
        # A retry carries the same event id and the same body (a new timestamp and signature).
        assert len({a.body for a in attempts}) == 1

    normalized = next(json.loads(r.body) for r in receiver.requests
                      if json.loads(r.body)["type"] == "call.normalized")
    assert normalized["data"] == call_view(await db.calls.find_one({"_id": flaky}))
    assert normalized["data"]["recording"]["sample_rate"] == 8000
    assert normalized["timestamp"].endswith("Z")
    failed = next(json.loads(r.body) for r in receiver.requests
                  if json.loads(r.body)["type"] == "call.failed")
    assert failed["data"]["status"] == "failed"
    assert failed["data"]["failure"]["message"] == "campaign must be for external calls only"
    retrying = next(json.loads(r.body) for r in receiver.requests
                    if json.loads(r.body)["type"] == "call.retrying")
    assert retrying["data"]["cuid"] == flaky

    # `callingest calls show` lists each attempt: event, attempt, answer code, time.
    await wait_until(lambda: _shown_codes(settings, failing) == [500, 204], what="two attempts stored")
    shown = _show(settings, failing)["webhook_deliveries"]
    assert [(d["event"], d["attempt"], d["status_code"]) for d in shown] == [
        ("call.failed", 1, 500), ("call.failed", 2, 204)]
    assert all(d["at"].endswith("Z") and d["webhook_id"] == "wh-1" for d in shown)

    metrics = urllib.request.urlopen(f"{services.running['webhooks'].url}/metrics").read().decode()
    assert 'callingest_webhook_attempts_total{event="call.failed",outcome="http_error"} 1.0' in metrics
    assert 'callingest_webhook_deliveries_total{event="call.failed",outcome="delivered"} 1.0' in metrics
    assert "callingest_webhook_delivery_lag_seconds_count 3.0" in metrics
    assert 'callingest_consumer_lag_messages{partition="0",service="webhooks"' in metrics
    log = services.running["webhooks"].log_text()
    assert secret not in log
    assert services.stop("webhooks") == 0  # SIGTERM: drains and exits cleanly


def _show(settings: Settings, cuid: str) -> dict[str, Any]:
    out = subprocess.run([str(ROOT / ".venv/bin/callingest"), "calls", "show", cuid],
                         env={**os.environ, **settings_env(settings)}, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _shown_codes(settings: Settings, cuid: str) -> list[int | None]:
    time.sleep(0.2)
    return [d["status_code"] for d in _show(settings, cuid)["webhook_deliveries"]
            if d["outcome"] != "scheduled"]
