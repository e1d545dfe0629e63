"""Where a waiting call stands: ``retrying`` and the retry history entries, in the status
API (GET calls/{cuid}.json) and in ``callingest calls show``, written by the real consumer
loop's retry path; no query string or secret in either."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callingest import mongo
from callingest.errors import TransientError
from callingest.kafka import Producer
from callingest.pipeline import StageRunner
from callingest.settings import Settings
from callingest.stages import stage
from callingest.steps import NoResources, Stage, StageContext, StepResult
from callingest.topics import Topics
from tests.conftest import ROOT, settings_env, wait_until
from tests.services.gateway.test_gateway_api import call_body, get_call, post

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

Client = TestClient[Any, Any]
SECRET = "tok3n-in-the-query"


async def always_times_out(event: dict[str, Any], ctx: StageContext) -> StepResult:
    raise TransientError(f"timed out fetching http://rec.example/a.wav?sig={SECRET}",
                         "RecordingTimeout")


def calls_show(settings: Settings, cuid: str) -> dict[str, Any]:
    done = subprocess.run([str(ROOT / ".venv/bin/callingest"), "calls", "show", cuid],
                          env={**os.environ, **settings_env(settings)}, capture_output=True,
                          text=True, timeout=60, check=True)
    shown: dict[str, Any] = json.loads(done.stdout)
    return shown


async def test_status_api_and_calls_show_say_where_a_waiting_call_stands(
        gateway: Client, settings: Settings, topics: Topics) -> None:
    status, body = await post(gateway, call_body("retrying-1"))
    assert status == 201
    cuid = body["cuid"]
    _, view = await get_call(gateway, cuid)
    assert view["retrying"] is None

    tuned = settings.model_copy(update={"retry_delays_seconds": [60.0, 60.0]})
    client = mongo.open_client(tuned)
    producer = Producer(tuned.kafka_bootstrap_servers, "test")
    await producer.start()
    runner = StageRunner(Stage(stage("validator"), always_times_out, NoResources()), tuned,
                         mongo.database(client, tuned), producer)
    task = asyncio.create_task(runner.run())
    try:
        async def waiting() -> Any:
            _, answer = await get_call(gateway, cuid)
            return answer if answer["retrying"] else None

        view = await wait_until(waiting, timeout=30, what="retrying in the call view")
    finally:
        runner.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)
        await producer.stop()
        await client.close()

    retrying = view["retrying"]
    assert set(retrying) == {"stage", "attempt", "next_attempt_at", "last_error"}
    assert (retrying["stage"], retrying["attempt"]) == ("validator", 2)
    assert retrying["next_attempt_at"].endswith("Z")
    assert retrying["last_error"] == {"class": "RecordingTimeout",
                                      "message": "timed out fetching http://rec.example/a.wav"}
    assert view["status"] == "received"
    entry = view["history"][-1]
    assert entry["stage"] == "validator" and entry["status"] == "retrying"
    assert entry["attempt"] == 1 and entry["class"] == "RecordingTimeout"
    assert entry["next_attempt_at"] == retrying["next_attempt_at"]
    assert set(view["history"][0]) == {"stage", "status", "at"}  # other entries unchanged

    shown = await asyncio.to_thread(calls_show, settings, cuid)
    assert shown["retrying"]["stage"] == "validator"
    assert shown["retrying"]["last_error"]["class"] == "RecordingTimeout"
    assert [h["status"] for h in shown["history"]] == ["received", "retrying"]
    assert shown["history"][-1]["class"] == "RecordingTimeout"
    assert SECRET not in json.dumps(view) + json.dumps(shown)
