"""Isolation benchmark: one network's dead recording hosts against another network's calls.

    .venv/bin/python bench/isolation/run.py            # 2,000 dead calls, 20 healthy calls

What it does (see docs/benchmarks.md, "Isolation between networks"):

* uses the dev stack's servers (starting the ones not running, stopping those afterwards)
  and starts the five services as processes with ``make up`` defaults (retry delays
  5 s / 30 s / 2 min / 10 min, timeouts, in-flight bounds), its own topic prefix and
  database, the demo configuration plus network 3003 (``tests/system/isolation/flood-network.yaml``);
* **baseline**: network 1001 (B) submits ``--healthy`` calls with a 3 s stereo WAV served
  from loopback; each call's POST -> ``normalized`` time is the history entry's time
  minus the POST's start;
* **flood**: network 3003 (A) submits ``--dead`` calls (three in four name a closed
  loopback port: connection refused; one in four a loopback listener that accepts and
  never answers: black hole), then immediately B submits ``--healthy`` calls again;
* reports B's p50/p99/max in both phases, the ratio of the p99s (goal: flood p99 <= 30 s,
  ratio <= 3), what became of A's calls by then (status counts, calls with ``retrying``),
  the fetcher's circuit states and peak RSS, and the load average before and after.

``--wait-dead`` also waits for every dead call to end (its full retry schedule: about
13 minutes) and counts failed calls and CSM emails. All traffic is loopback. The JSON
result goes to ``bench/results/isolation/<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from bench.e2e.run import _at, percentile, scrape, vm_hwm_kib  # noqa: E402
from bench.stack import prepare, stack_settings  # noqa: E402
from callingest import mongo  # noqa: E402
from callingest.settings import Settings  # noqa: E402
from callingest.topics import Topics  # noqa: E402
from tests.audiogen import write_wav  # noqa: E402
from tests.conftest import Services, delete_topics, free_port  # noqa: E402
from tests.helpers import black_hole, serve_recordings  # noqa: E402
from tools import devstack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "isolation"
FLOOD_CONFIG = ROOT / "tests" / "system" / "isolation" / "flood-network.yaml"
SUBMIT_PATH = "/api/2022-03-01/calls.json"
HEALTHY_TOKEN = "demo-network-token"
DEAD_TOKEN = "flood-network-token"
SERVICE_NAMES = ("gateway", "validator", "fetcher", "normalizer", "notifier")


async def submit(http: aiohttp.ClientSession, gateway: str, token: str, external_id: str,
                 url: str) -> tuple[float, str | None]:
    """POST one call; (wall-clock start, cuid or None)."""
    call = {"external_call_unique_id": external_id, "start_time": "2016-02-03 09:30:00 AM",
            "destination_phone_number": 2165388265, "calling_phone_number": 8779257383,
            "advertiser_campaign_id_from_network": 85, "call_direction": "inbound",
            "recording_url": url}
    started = time.time()
    async with http.post(f"{gateway}{SUBMIT_PATH}", json={"call": call},
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.json(content_type=None)
        return started, str(body["cuid"]) if resp.status in (201, 202) else None


async def healthy_batch(http: aiohttp.ClientSession, gateway: str, db: Any, base: str,
                        run: str, phase: str, count: int, deadline: float) -> dict[str, Any]:
    """Submit ``count`` healthy calls at once; their POST -> normalized seconds."""
    posts = await asyncio.gather(*(submit(http, gateway, HEALTHY_TOKEN, f"{run}-{phase}-{i}",
                                          f"{base}/{run}-{phase}-{i}.wav") for i in range(count)))
    started = {cuid: t for t, cuid in posts if cuid}
    latencies: dict[str, float] = {}
    steps: dict[str, list[float]] = {"validated": [], "fetched": [], "normalized": []}
    failed: list[str] = []
    while len(latencies) + len(failed) < len(started) and time.time() < deadline:
        for cuid in set(started) - set(latencies) - set(failed):
            doc = await db.calls.find_one({"_id": cuid}, {"status": 1, "history": 1})
            if doc and doc.get("status") == "normalized":
                at = _at(doc["history"], "normalized")
                assert at is not None
                latencies[cuid] = at - started[cuid]
                previous = started[cuid]
                for status in steps:  # time spent reaching each status from the previous one
                    reached = _at(doc["history"], status)
                    if reached is not None:
                        steps[status].append(reached - previous)
                        previous = reached
            elif doc and doc.get("status") == "failed":
                failed.append(cuid)
        await asyncio.sleep(0.2)
    values = sorted(latencies.values())
    return {"submitted": count, "accepted": len(started), "normalized": len(values),
            "failed": len(failed), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": values[-1] if values else None, "seconds": [round(v, 2) for v in values],
            "step_p50_max": {status: [round(percentile(v, 50) or 0, 2), round(max(v, default=0), 2)]
                             for status, v in steps.items()}}


async def dead_state(db: Any, cuids: list[str]) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    retrying = 0
    for i in range(0, len(cuids), 500):
        async for doc in db.calls.find({"_id": {"$in": cuids[i:i + 500]}},
                                       {"status": 1, "retrying": 1}):
            statuses[doc.get("status", "?")] += 1
            retrying += bool(doc.get("retrying"))
    return {"statuses": dict(statuses), "with_retrying": retrying, "found": sum(statuses.values())}


def circuits(metrics_text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("callingest_fetch_circuits{"):
            state = line.split('state="')[1].split('"')[0]
            found[state] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("callingest_fetch_rejections_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            found[f"rejected_{reason}"] = float(line.rsplit(" ", 1)[1])
    return found


async def run(args: argparse.Namespace, settings: Settings, services: Services,
              wav: bytes) -> dict[str, Any]:
    async def recording(request: web.Request) -> web.Response:
        return web.Response(body=wav, content_type="audio/wav")

    runner, base = await serve_recordings(recording, shutdown_timeout=1.0)
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    gateway = services.running["gateway"].url
    fetcher = services.running["fetcher"]
    run_id = uuid.uuid4().hex[:8]
    result: dict[str, Any] = {"dead": args.dead, "healthy": args.healthy,
                              "load_before": os.getloadavg()}
    try:
        async with black_hole(hold=900.0) as hole, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=args.concurrency),
                timeout=aiohttp.ClientTimeout(total=120)) as http:
            result["baseline"] = await healthy_batch(http, gateway, db, base, run_id, "base",
                                                     args.healthy, time.time() + 300)
            print(f"baseline: {json.dumps(result['baseline'])}", flush=True)

            refused = f"http://127.0.0.1:{free_port()}"
            sem = asyncio.Semaphore(args.concurrency)

            async def dead_one(i: int) -> str | None:
                url = f"{hole.url if i % 4 == 3 else refused}/{run_id}-dead-{i}.wav"
                async with sem:
                    return (await submit(http, gateway, DEAD_TOKEN, f"{run_id}-dead-{i}", url))[1]

            flood_started = time.time()
            dead = [c for c in await asyncio.gather(*(dead_one(i) for i in range(args.dead))) if c]
            result["dead_submit_seconds"] = round(time.time() - flood_started, 1)
            print(f"{len(dead)} dead calls accepted in {result['dead_submit_seconds']} s",
                  flush=True)
            result["flood"] = await healthy_batch(http, gateway, db, base, run_id, "flood",
                                                  args.healthy, time.time() + 600)
            print(f"flood: {json.dumps(result['flood'])}", flush=True)
            base_p99, flood_p99 = result["baseline"]["p99"], result["flood"]["p99"]
            result["ratio_p99"] = (round(flood_p99 / base_p99, 2)
                                   if base_p99 and flood_p99 is not None else None)
            result["dead_when_healthy_done"] = await dead_state(db, dead)
            result["fetcher_circuits"] = circuits(scrape(f"{fetcher.url}/metrics"))
            result["black_hole_connections"] = hole.accepted
            if args.wait_dead:
                deadline = time.time() + 1200
                while time.time() < deadline:
                    state = await dead_state(db, dead)
                    if state["statuses"].get("failed", 0) == len(dead):
                        break
                    await asyncio.sleep(10)
                result["dead_final"] = await dead_state(db, dead)
            result["fetcher_peak_rss_mib"] = round((vm_hwm_kib(fetcher.proc.pid) or 0) / 1024, 1)
            result["load_after"] = os.getloadavg()
    finally:
        await runner.cleanup()
        await client.close()
    return result


async def cleanup(settings: Settings) -> None:
    client = mongo.open_client(settings)
    try:
        with contextlib.suppress(Exception):
            await client.drop_database(settings.mongodb_database)
    finally:
        await client.close()
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    with contextlib.suppress(Exception):
        await delete_topics(settings, topics.all())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dead", type=int, default=2000, help="dead-host calls of network A")
    parser.add_argument("--healthy", type=int, default=20, help="healthy calls of network B")
    parser.add_argument("--concurrency", type=int, default=32, help="submissions in flight")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="override a setting of the services (repeatable)")
    parser.add_argument("--wait-dead", action="store_true",
                        help="also wait (about 13 min) until every dead call has failed")
    args = parser.parse_args()
    ports = devstack.Ports()
    started = devstack.servers_up(ports)
    tag = uuid.uuid4().hex[:8]
    overrides = dict(item.split("=", 1) for item in args.set)
    settings = stack_settings(ports, "iso", tag, **overrides)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    log_dir = RESULTS / f"{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    services = Services(settings, log_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "call.wav"
        write_wav(path, seconds=3.0, rate=8000)
        wav = path.read_bytes()
    try:
        asyncio.run(prepare(settings, FLOOD_CONFIG))
        for name in SERVICE_NAMES:
            services.start(name)
        result = asyncio.run(run(args, settings, services, wav))
    finally:
        services.stop_all()
        asyncio.run(cleanup(settings))
        for component in reversed(started):
            devstack.stop(component)
    result["command"] = "python bench/isolation/run.py " + " ".join(sys.argv[1:])
    result["overrides"] = overrides
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k not in ("baseline", "flood")},
                     indent=2, default=str))
    print(f"B p99: baseline {result['baseline']['p99']} s, flood {result['flood']['p99']} s, "
          f"ratio {result['ratio_p99']}\nJSON: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
