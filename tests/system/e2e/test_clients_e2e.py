"""Retry and correction of failed calls through the whole pipeline (issue 12 point 3): the
gateway and the four consumers as processes, recordings from a local HTTP server."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from callingest import events
from tests.helpers import mails_about, publish
from tests.system.e2e.test_pipeline_e2e import TOKEN, Stack, _check_channels, _wav, stack

pytestmark = [pytest.mark.stack, pytest.mark.slow]

__all__ = ["stack"]  # the module's stack fixture, shared with test_pipeline_e2e


async def _post(stack: Stack, path: str, body: Any = None) -> tuple[int, Any]:
    async with stack.http.post(f"{stack.gateway}/api/2022-03-01/{path}", json=body,
                               headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        return resp.status, await resp.json()


async def test_retry_resumes_at_the_fetcher_and_late_events_are_ignored(
    stack: Stack, tmp_path: Path, mail_dir: Path
) -> None:
    name = f"{uuid.uuid4().hex}.wav"
    cuid = await stack.submit(name)  # nothing served yet: 404
    call = await stack.settled(cuid)
    assert (call["status"], call["failure"]["stage"]) == ("failed", "fetcher")
    stored = await stack.db.calls.find_one({"_id": cuid})

    stack.recordings.files[name] = _wav(tmp_path, name, seconds=1.0, rate=16000)
    fetches = stack.recordings.hits[name]
    assert await _post(stack, f"calls/{cuid}/retry.json") == (202, {"cuid": cuid, "status": "validated"})
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    assert [(h["stage"], h["status"]) for h in call["history"]] == [
        ("gateway", "received"), ("validator", "validated"), ("fetcher", "failed"),
        ("retry", "validated"), ("fetcher", "fetched"), ("normalizer", "normalized")]
    assert stack.recordings.hits[name] == fetches + 1
    _check_channels(await stack.recording(cuid), "inbound")

    # A late event of the first attempt (a redelivery) changes nothing.
    _suffix, event, record = events.stage_input(stored, "fetcher", 1)
    await publish(stack.settings, stack.topics.validated, event, record, cuid)
    await asyncio.sleep(3.0)
    after = await stack.status(cuid)
    assert (after["status"], after["history"]) == ("normalized", call["history"])
    assert stack.recordings.hits[name] == fetches + 1
    assert len(mails_about(mail_dir, cuid)) == 1  # the first failure's email only


async def test_correction_processes_the_new_content_from_the_start(
    stack: Stack, tmp_path: Path
) -> None:
    broken, fixed = f"{uuid.uuid4().hex}.wav", f"{uuid.uuid4().hex}.wav"
    stack.recordings.files[fixed] = _wav(tmp_path, fixed, seconds=1.0, rate=44100)
    external_id = uuid.uuid4().hex
    body = {"call": {
        "external_call_unique_id": external_id, "start_time": "2016-02-03 09:30:00 AM",
        "destination_phone_number": 2165388265, "calling_phone_number": 8779257383,
        "advertiser_campaign_id_from_network": 85, "call_direction": "inbound",
        "recording_url": f"{stack.recordings.base}/{broken}"}}
    status, answer = await _post(stack, "calls.json", body)
    assert status == 201
    cuid = answer["cuid"]
    assert (await stack.settled(cuid))["status"] == "failed"

    assert await _post(stack, "calls.json", body) == (202, {"cuid": cuid})  # identical: no change
    body["call"]["recording_url"] = f"{stack.recordings.base}/{fixed}"
    body["call"]["call_direction"] = "outbound"
    assert await _post(stack, "calls.json", body) == (201, {"cuid": cuid})
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    assert call["call_direction"] == "outbound"
    assert [(h["stage"], h["status"]) for h in call["history"]][3:] == [
        ("correction", "received"), ("validator", "validated"), ("fetcher", "fetched"),
        ("normalizer", "normalized")]
    _check_channels(await stack.recording(cuid), "outbound")
