"""One network's dead recording hosts do not delay another network's calls (issue 10).

The whole pipeline runs as processes on the real servers. Network 3003 submits 300 calls
whose recording hosts are dead: three in four name a closed loopback port (connection
refused), one in four a loopback listener that accepts and never answers (black hole).
Right after, the demo network 1001 submits 5 calls with a sound recording.

Why 30 s holds on a loaded machine: nothing a healthy call does waits on a dead host.
Its events are read ahead and get a slot of every stage as soon as they are read (fair
scheduling per network, a quarter of the slots kept for other networks); the dead hosts
hold at most ``fetch_max_per_host`` downloads each, only for one first-byte timeout, and
after ``fetch_circuit_failure_threshold`` failures are refused without connecting. So a
healthy call takes about what it takes on an idle stack (1-3 s here); 30 s is ten times
that. Before the change the fetcher's 16 slots worked through the dead backlog first (four
in-place tries per call), and the healthy calls waited about a minute.

The dead calls lose nothing: each ends ``failed`` after its full retry schedule or, refused
by the open circuit (no attempt used), at its retry deadline after at least one try of its
own (one ``retrying`` history entry per failed try), with exactly one CSM email; none lost,
none duplicated (one CallSubmitted, one terminal state, one email).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, make_settings, used_secret, wait_until
from tests.helpers import apply_config, black_hole
from tests.system.fault.harness import Report, one_second_wav, open_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(400)]

FLOOD_CONFIG = Path(__file__).with_name("flood-network.yaml")
FLOOD_TOKEN = used_secret("flood-network-token")
DEAD_CALLS = 300
HEALTHY_CALLS = 5
HEALTHY_BOUND_SECONDS = 30.0
ATTEMPTS = 4
DEAD_CLASSES = {"RecordingConnectionError", "RecordingTimeout"}


async def test_dead_hosts_of_one_network_do_not_delay_another(servers: Any, mail_dir: Path,
                                                              tmp_path: Path) -> None:
    settings = make_settings(servers, retry_delays_seconds=[1.0, 2.0, 2.0],
                             max_processing_attempts=ATTEMPTS,
                             fetch_first_byte_timeout_seconds=5.0,
                             fetch_circuit_cooldown_seconds=5.0)
    wav = one_second_wav(tmp_path)
    async with black_hole() as hole, open_pipeline(settings, mail_dir, wav, "isolation-flood") as pipe:
        apply_config(settings, FLOOD_CONFIG)
        refused = f"http://127.0.0.1:{free_port()}"
        dead_urls = [f"{hole.url if i % 4 == 3 else refused}/dead-{i}.wav"
                     for i in range(DEAD_CALLS)]
        run = uuid.uuid4().hex[:8]  # cuids follow external ids: fresh ones for a fresh mail count
        dead = await asyncio.gather(*(pipe.submit(f"dead-{run}-{i}", url, token=FLOOD_TOKEN)
                                      for i, url in enumerate(dead_urls)))
        assert [a.status for a in dead] == [201] * DEAD_CALLS, dead[0].body

        posted: dict[str, float] = {}
        normalized_after: dict[str, float] = {}
        for i in range(HEALTHY_CALLS):
            started = time.monotonic()
            answer = await pipe.submit(f"healthy-{run}-{i}", f"ok-{i}.wav")
            assert answer.status == 201
            posted[str(answer.cuid)] = started

        async def all_normalized() -> bool:
            calls = await pipe.calls(posted)
            for cuid, call in calls.items():
                if call.get("status") == "normalized" and cuid not in normalized_after:
                    normalized_after[cuid] = time.monotonic() - posted[cuid]
                assert call.get("status") != "failed", call.get("failure")
            return len(normalized_after) == HEALTHY_CALLS

        await wait_until(all_normalized, timeout=120, interval=0.25, what="healthy calls")
        slowest = max(normalized_after.values())
        assert slowest <= HEALTHY_BOUND_SECONDS, normalized_after

        # Every dead call: tried, then failed with one email after its full retry schedule
        # or at its retry deadline.
        report = Report("isolation_flood", submitted=DEAD_CALLS + HEALTHY_CALLS)
        dead_cuids = {str(a.cuid) for a in dead}
        await pipe.wait_terminal(dead_cuids, timeout=240)
        await wait_until(lambda: _all_mailed(pipe.mails(), dead_cuids), timeout=60,
                         what="an email for every dead call")
        calls = await pipe.account(report, dead_cuids, timeout=10, expect_status="failed")
        for cuid in dead_cuids:
            call = calls[cuid]
            failure = call["failure"]
            assert failure["stage"] == "fetcher" and failure["retryable"] is True, failure
            assert failure["class"] in DEAD_CLASSES, failure
            retries = [h for h in call["history"] if h["status"] == "retrying"]
            if f"gave up after {ATTEMPTS} attempts" in failure["message"]:
                assert len(retries) == ATTEMPTS - 1, call["history"]
            else:
                assert f"gave up at the retry deadline after {len(retries)} attempt" in failure[
                    "message"], failure
                assert retries, call["history"]  # tried before it failed
            assert [h["attempt"] for h in retries] == list(range(1, len(retries) + 1))
            assert all(h["class"] in DEAD_CLASSES for h in retries)
            assert "retrying" not in call
        mails = pipe.mails()
        assert all(mails[c] == 1 for c in dead_cuids)
        report.extra.update(healthy_seconds=sorted(round(v, 2) for v in normalized_after.values()),
                            black_hole_connections=hole.accepted)
        report.emit()
    assert report.lost == 0 and report.duplicated == 0


def _all_mailed(mails: Counter[str], cuids: set[str]) -> bool:
    return all(mails[c] >= 1 for c in cuids)
