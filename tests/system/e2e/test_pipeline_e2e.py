"""End to end on the real stack: the gateway and the four consumers as processes, recordings
served by a local HTTP server, normalized files checked channel by channel."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from callingest import mongo
from callingest.settings import Settings
from callingest.topics import Topics, ensure_topics
from tests.audiogen import (
    LEFT_HZ,
    RIGHT_HZ,
    dominant_hz,
    read_wav,
    write_encoded,
    write_wav,
)
from tests.conftest import ROOT, Services, delete_topics, make_settings, settings_env, wait_until
from tests.helpers import (
    apply_config,
    committed_past,
    demo_call,
    end_offsets,
    mails_about,
    serve_recordings,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]

TOKEN = "demo-network-token"
AUTH_SECRET = "s3cr3t"  # the demo config's recording auth-config token
MAX_BYTES = 4_000_000


@dataclass
class RecordingServer:
    """A loopback HTTP server with scripted recordings."""

    files: dict[str, bytes] = field(default_factory=dict)
    scripted: dict[str, list[int]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    base: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        if name == "redirect-to-metadata":
            raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
        if name.startswith("bearer-") and request.headers.get("Authorization") != f"Bearer {AUTH_SECRET}":
            return web.Response(status=401)
        if name.startswith("query-") and request.query.get("access_token") != AUTH_SECRET:
            return web.Response(status=401)
        if name.startswith("header-") and request.headers.get("X-Api-Key") != AUTH_SECRET:
            return web.Response(status=401)
        script = self.scripted.get(name)
        if script:
            status = script.pop(0)
            if status != 200:
                return web.Response(status=status)
        body = self.files.get(name)
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="application/octet-stream")


@dataclass
class Stack:
    settings: Settings
    db: Any
    topics: Topics
    services: Services
    recordings: RecordingServer
    http: aiohttp.ClientSession

    @property
    def gateway(self) -> str:
        return self.services.running["gateway"].url

    async def submit(self, recording: str, direction: str = "inbound",
                     auth_config: int | None = None, query: str = "") -> str:
        call = demo_call(uuid.uuid4().hex, f"{self.recordings.base}/{recording}{query}",
                         call_direction=direction)
        if auth_config is not None:
            call["recording_auth_config_id"] = auth_config
        async with self.http.post(f"{self.gateway}/api/2022-03-01/calls.json",
                                  json={"call": call, "oauth_token": TOKEN}) as resp:
            body = await resp.json()
            assert resp.status == 201, body
            return str(body["cuid"])

    async def status(self, cuid: str) -> dict[str, Any]:
        async with self.http.get(f"{self.gateway}/api/2022-03-01/calls/{cuid}.json",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            return dict(await resp.json())

    async def settled(self, cuid: str, timeout: float = 90.0) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            call = await self.status(cuid)
            return call if call["status"] in ("normalized", "failed") else None

        return dict(await wait_until(done, timeout=timeout, interval=0.3, what=f"{cuid} settled"))

    async def recording(self, cuid: str) -> tuple[dict[str, int], np.ndarray]:
        async with self.http.get(f"{self.gateway}/api/2022-03-01/calls/{cuid}/recording.wav",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            data = await resp.read()
        path = Path(self.services.log_dir) / f"{cuid}.wav"
        path.write_bytes(data)
        return read_wav(path)


@pytest.fixture(scope="module")
async def stack(servers: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    settings = make_settings(servers, fetch_max_bytes=MAX_BYTES, retry_delays_seconds=[1.0, 2.0],
                             max_processing_attempts=4)
    topics = Topics(settings.topic_prefix, retry_tiers=2)
    await ensure_topics(settings.kafka_bootstrap_servers, topics.all(), 3, 1)
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    await mongo.ensure_indexes(db)
    apply_config(settings)
    recordings = RecordingServer()
    runner, recordings.base = await serve_recordings(recordings.handle)
    from tests.conftest import TEST_LOGS

    log_dir = TEST_LOGS / "e2e"
    log_dir.mkdir(parents=True, exist_ok=True)
    services = Services(settings, log_dir)
    for name in ("gateway", "validator", "fetcher", "normalizer", "notifier"):
        services.start(name)
    http = aiohttp.ClientSession()
    try:
        yield Stack(settings, db, topics, services, recordings, http)
    finally:
        await http.close()
        services.stop_all()
        await runner.cleanup()
        await client.drop_database(settings.mongodb_database)
        await client.close()
        await delete_topics(settings, topics.all())


def _wav(tmp: Path, name: str, **kwargs: Any) -> bytes:
    path = tmp / name
    write_wav(path, **kwargs)
    return path.read_bytes()


def _check_channels(recording: tuple[dict[str, int], np.ndarray], direction: str) -> None:
    fields, samples = recording
    assert fields["sample_rate"] == 8000
    assert fields["channels"] == 2
    assert fields["bits"] == 16
    caller, agent = (LEFT_HZ, RIGHT_HZ) if direction == "inbound" else (RIGHT_HZ, LEFT_HZ)
    assert abs(dominant_hz(samples[:, 0], 8000) - caller) < 15
    assert abs(dominant_hz(samples[:, 1], 8000) - agent) < 15


@pytest.mark.parametrize(
    ("rate", "sample_format", "direction"),
    [(44100, "s16", "inbound"), (48000, "f32", "outbound"), (16000, "s16", "outbound"),
     (44100, "f32", "inbound"), (48000, "s16", "inbound"), (16000, "f32", "inbound")],
)
async def test_wav_is_normalized_with_channels_in_order(
    stack: Stack, tmp_path: Path, rate: int, sample_format: str, direction: str
) -> None:
    name = f"{uuid.uuid4().hex}.wav"
    stack.recordings.files[name] = _wav(tmp_path, name, seconds=2.0, rate=rate,
                                        sample_format=sample_format)
    cuid = await stack.submit(name, direction)
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    assert call["recording"]["sample_rate"] == 8000
    assert call["recording"]["channels"] == 2
    assert abs(call["recording"]["duration_seconds"] - 2.0) < 0.05
    assert [h["status"] for h in call["history"]][-3:] == ["validated", "fetched", "normalized"]
    _check_channels(await stack.recording(cuid), direction)


async def test_mp3_is_normalized(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "call.mp3"
    write_encoded(path, "mp3", seconds=2.0, rate=44100)
    name = f"{uuid.uuid4().hex}.mp3"
    stack.recordings.files[name] = path.read_bytes()
    cuid = await stack.submit(name, "outbound")
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    _check_channels(await stack.recording(cuid), "outbound")


async def _failed_with_one_email(stack: Stack, cuid: str, stage: str, failure_class: str,
                                 mail_dir: Path) -> dict[str, Any]:
    call = await stack.settled(cuid)
    assert call["status"] == "failed"
    assert call["failure"]["stage"] == stage
    assert call["failure"]["class"] == failure_class
    await wait_until(lambda: len(mails_about(mail_dir, cuid)) >= 1, what="notification email")
    ends = await end_offsets(stack.settings, stack.topics.failed)
    await wait_until(lambda: committed_past(stack.settings, "notifier", ends),
                     what="the notifier committed past the failure")
    assert len(mails_about(mail_dir, cuid)) == 1
    await wait_until(lambda: _notified(stack, cuid), what="csm_notified_at")
    async with stack.http.get(f"{stack.gateway}/api/2022-03-01/calls/{cuid}/recording.wav",
                              headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 404
    return call


async def _notified(stack: Stack, cuid: str) -> bool:
    return bool((await stack.status(cuid)).get("csm_notified_at"))


async def test_mono_fails_with_one_email(stack: Stack, tmp_path: Path, mail_dir: Path) -> None:
    name = f"{uuid.uuid4().hex}.wav"
    stack.recordings.files[name] = _wav(tmp_path, name, seconds=1.0, rate=8000,
                                        freqs=(LEFT_HZ,))
    cuid = await stack.submit(name)
    await _failed_with_one_email(stack, cuid, "normalizer", "RecordingFormat", mail_dir)


async def test_404_fails_with_one_email_and_replay_after_restoring_normalizes(
    stack: Stack, tmp_path: Path, mail_dir: Path
) -> None:
    name = f"{uuid.uuid4().hex}.wav"
    cuid = await stack.submit(name)
    call = await _failed_with_one_email(stack, cuid, "fetcher", "RecordingUnavailable", mail_dir)
    assert "404" in call["failure"]["message"]

    stack.recordings.files[name] = _wav(tmp_path, name, seconds=1.0, rate=16000)
    replay = subprocess.run(
        [str(ROOT / ".venv/bin/callingest"), "replay", "--cuid", cuid],
        env={**os.environ, **settings_env(stack.settings)}, capture_output=True, text=True,
        timeout=60)
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1" in replay.stdout
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    _check_channels(await stack.recording(cuid), "inbound")
    assert len(mails_about(mail_dir, cuid)) == 1


async def test_500_500_200_is_retried_to_normalized(stack: Stack, tmp_path: Path) -> None:
    name = f"{uuid.uuid4().hex}.wav"
    stack.recordings.files[name] = _wav(tmp_path, name, seconds=1.0, rate=16000)
    stack.recordings.scripted[name] = [500, 500, 200]
    cuid = await stack.submit(name)
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    assert stack.recordings.hits[name] == 3


async def test_outage_longer_than_in_process_retries_goes_through_the_retry_topic(
    stack: Stack, tmp_path: Path
) -> None:
    name = f"{uuid.uuid4().hex}.wav"
    stack.recordings.files[name] = _wav(tmp_path, name, seconds=1.0, rate=16000)
    attempts = stack.settings.fetch_max_attempts
    stack.recordings.scripted[name] = [503] * (attempts + 1) + [200]
    cuid = await stack.submit(name)
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    assert stack.recordings.hits[name] == attempts + 2


@pytest.mark.parametrize(("prefix", "config_id"), [("bearer-", 7), ("query-", 8),
                                                    ("header-", 9)])
async def test_each_auth_config_method(stack: Stack, tmp_path: Path, prefix: str,
                                       config_id: int) -> None:
    name = f"{prefix}{uuid.uuid4().hex}.wav"
    stack.recordings.files[name] = _wav(tmp_path, name, seconds=1.0, rate=16000)
    refused = await stack.submit(name)  # without the auth config: the server answers 401
    call = await stack.settled(refused)
    assert call["status"] == "failed" and call["failure"]["class"] == "RecordingUnavailable"
    cuid = await stack.submit(name, auth_config=config_id)
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")


async def test_redirect_to_a_refused_address_fails(stack: Stack, mail_dir: Path) -> None:
    cuid = await stack.submit("redirect-to-metadata")
    await _failed_with_one_email(stack, cuid, "fetcher", "RecordingUrlRefused", mail_dir)


async def test_oversize_recording_fails(stack: Stack, tmp_path: Path, mail_dir: Path) -> None:
    name = f"{uuid.uuid4().hex}.wav"
    stack.recordings.files[name] = _wav(tmp_path, name, seconds=30.0, rate=48000,
                                        sample_format="f32")
    assert len(stack.recordings.files[name]) > MAX_BYTES
    cuid = await stack.submit(name)
    await _failed_with_one_email(stack, cuid, "fetcher", "RecordingTooLarge", mail_dir)


async def test_presigned_style_query_string_never_reaches_logs(stack: Stack, tmp_path: Path) -> None:
    from tests.conftest import used_secret

    signature = used_secret(f"sig{uuid.uuid4().hex}")
    name = f"{uuid.uuid4().hex}.wav"
    stack.recordings.files[name] = _wav(tmp_path, name, seconds=1.0, rate=16000)
    cuid = await stack.submit(name, query=f"?X-Amz-Signature={signature}&X-Amz-Expires=60")
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    assert signature not in str(call)
    shown = subprocess.run([str(ROOT / ".venv/bin/callingest"), "calls", "show", cuid],
                           env={**os.environ, **settings_env(stack.settings)},
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["cuid"] == cuid and record["status"] == "normalized"
    assert [h["status"] for h in record["history"]] == ["received", "validated", "fetched",
                                                        "normalized"]
    assert signature not in shown.stdout
    assert record["recording_url"].endswith(f"/{name}")


async def test_every_metric_the_alerts_and_dashboards_use_is_exported(stack: Stack, promql: Any) -> None:
    """Scrape every service after the run above; alert and dashboard queries name real series."""
    from tests.system.ops.prometheus import SCRAPE_SERIES, metric_names_used, record_names

    declared: set[str] = set()
    sampled: dict[str, float] = {}
    for name, service in stack.services.running.items():
        async with stack.http.get(f"{service.url}/metrics") as resp:
            assert resp.status == 200, name
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                family, kind = line.split()[2:4]
                declared.add(family)
                if kind == "counter":
                    declared.add(f"{family}_total")
                if kind == "histogram":
                    declared.update(f"{family}_{s}" for s in ("bucket", "sum", "count"))
            elif line and not line.startswith("#"):
                series = line.split("{")[0].split(" ")[0]
                sampled[series] = sampled.get(series, 0.0) + float(line.rsplit(" ", 1)[1])
    missing = sorted(n for n in metric_names_used(promql) - record_names() - SCRAPE_SERIES
                     if n not in declared and n not in sampled)
    assert missing == []
    for series in ("callingest_http_requests_total", "callingest_http_request_duration_seconds_bucket",
                   "callingest_calls_submitted_total", "callingest_events_consumed_total",
                   "callingest_events_produced_total", "callingest_stage_duration_seconds_count",
                   "callingest_fetched_bytes_total", "callingest_normalized_audio_seconds_total",
                   "callingest_calls_terminal_total", "callingest_failures_total",
                   "callingest_notifications_total", "callingest_retries_total"):
        assert sampled.get(series, 0) > 0, f"{series} has no samples after the end-to-end run"
