"""A recording server that hangs, resets connections or trickles 1 byte/s.

Timeouts fire, retries are bounded (at most fetch_max_attempts downloads per
processing attempt, max_processing_attempts processing attempts), each such
call fails with a retryable failure and exactly one notification email, no
fetcher worker stays busy, and calls with a sound recording submitted at the
same time are normalized.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import pytest

from tests.conftest import make_settings, wait_until
from tests.system.fault.harness import Report, open_pipeline
from tests.system.fault.privatestack import PrivateServers

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(300)]

FETCH_ATTEMPTS = 2
PROCESSING_ATTEMPTS = 2
READ_TIMEOUT = 2.0
EXPECTED_CLASS = {"hang": "RecordingTimeout", "reset": "RecordingConnectionError",
                  "trickle": "RecordingTimeout"}


def in_flight(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    found = re.findall(r'^callingest_events_in_flight\{[^}]*\} (\S+)$', text, re.MULTILINE)
    return sum(float(v) for v in found)


async def test_hanging_resetting_and_trickling_recording_servers(faults: PrivateServers,
                                                                 wav: bytes) -> None:
    settings = make_settings(
        faults.ports, fetch_read_timeout_seconds=READ_TIMEOUT, fetch_connect_timeout_seconds=2.0,
        fetch_max_attempts=FETCH_ATTEMPTS, max_processing_attempts=PROCESSING_ATTEMPTS,
        retry_delays_seconds=[1.0, 1.0], max_in_flight=8,
        # Every fault here is served by one host, which the circuit breaker would rightly
        # open (tests/services/fetcher/test_host_isolation.py, tests/system/isolation): keep it closed so
        # each call's failure class is its own timeout or reset.
        fetch_circuit_failure_threshold=1000)
    async with open_pipeline(settings, faults.mail_dir, wav, "recording-faults") as pipeline:
        started = time.monotonic()
        names = [f"{kind}-{i}.wav" for kind in EXPECTED_CLASS for i in range(3)]
        names += [f"ok-{i}.wav" for i in range(6)]
        answers = await asyncio.gather(*(pipeline.submit(f"rec-{n}", n) for n in names))
        assert all(a.status == 201 for a in answers), [a.status for a in answers]
        cuid_of = {n: str(a.cuid) for n, a in zip(names, answers, strict=True)}

        report = Report("recording_server_faults", submitted=len(names))
        calls = await pipeline.account(report, set(cuid_of.values()), timeout=150,
                                       expect_status=None)
        elapsed = time.monotonic() - started
        for name, cuid in cuid_of.items():
            call = calls[cuid]
            kind = name.split("-")[0]
            if kind == "ok":
                assert call["status"] == "normalized", call.get("failure")
                continue
            assert call["status"] == "failed", (name, call["status"])
            failure = call["failure"]
            assert (failure["stage"], failure["class"], failure["retryable"]) == (
                "fetcher", EXPECTED_CLASS[kind], True), (name, failure)
            assert f"gave up after {PROCESSING_ATTEMPTS} attempts" in failure["message"]
            # Bounded: never more downloads than attempts allow. aiohttp resends a request
            # once when a reused keep-alive connection is closed under it, so a server that
            # resets every connection may see each download attempt twice.
            hits = pipeline.recordings.hits[name]
            per_attempt = 2 if kind == "reset" else 1
            assert 1 <= hits <= FETCH_ATTEMPTS * PROCESSING_ATTEMPTS * per_attempt, (name, hits)
        # Failures are reported: one email per failed call (checked by account()).
        await wait_until(lambda: all(pipeline.mails()[cuid_of[n]] == 1
                                     for n in names if not n.startswith("ok-")),
                         timeout=30, what="one email per failed call")
        # No worker stuck: the fetcher holds no event and no connection to the server.
        fetcher = pipeline.services.running["fetcher"].url
        await wait_until(lambda: in_flight(f"{fetcher}/metrics") == 0, timeout=20,
                         what="fetcher idle")
        await wait_until(lambda: pipeline.recordings.open_requests == 0, timeout=20,
                         what="connections to the recording server closed")
        # ... and it still works: a new call goes through promptly.
        probe = await pipeline.submit("rec-probe", "ok-probe.wav")
        assert probe.status == 201
        after = await pipeline.wait_terminal({str(probe.cuid)}, timeout=60)
        assert after[str(probe.cuid)]["status"] == "normalized"
        report.extra.update(
            seconds_to_settle=round(elapsed, 1),
            downloads_per_fault_call={n: pipeline.recordings.hits[n] for n in names
                                      if not n.startswith("ok-")})
        report.emit()
