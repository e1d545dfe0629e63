"""End-to-end benchmark: N calls with one-minute recordings, submission to normalized.

    .venv/bin/python bench/e2e/run.py --calls 1000 --seconds 60

What it does (see docs/benchmarks.md, "End to end"):

* uses the dev stack's servers (Kafka, FerretDB, versitygw, SMTP sink), starting the ones
  that are not running with :func:`tools.devstack.servers_up` and stopping those afterwards;
* creates its own topic prefix and MongoDB database, applies
  ``deploy/examples/demo-config.yaml``, starts the five services as processes
  (``callingest serve <name>``) with that environment on free loopback ports and
  ``ALLOW_LOOPBACK_RECORDINGS=true``;
* serves ONE generated stereo WAV (two tones, ``--rate`` Hz, s16) and one MP3 of the same
  length from an aiohttp server on 127.0.0.1, each under a different URL per call;
* submits the calls through ``POST /api/2022-03-01/calls.json`` with ``--concurrency``
  requests in flight, recording each submission's wall-clock start;
* waits until every call's terminal event (``recordings.normalized`` or ``calls.failed``)
  is on the run's topics, bounded by ``--deadline`` seconds, then reads each call once from
  MongoDB by ``_id``; latency is the ``normalized`` history entry's timestamp minus the
  submission start (same host clock);
* first transcodes ``--transcode-baseline`` of the same recordings with nothing else
  running (one worker process per core): the transcode-only rate, the physical limit;
* measures the CPU time of every process of the stack (the services and their pool
  workers, Kafka, FerretDB, the S3 server, the SMTP sink: ``bench/e2e/cpu.py``) from the
  first POST to the last terminal event, per normalized call; ``--profile NAME`` records a
  py-spy profile of a service meanwhile (``bench/e2e/profile.py``);
* reports submission throughput, submission-to-normalized p50/p95/p99/max, total time,
  counts, per-stage time from the call history and from each service's
  ``callingest_stage_duration_seconds`` histogram, and each service process's peak RSS
  (``VmHWM`` from ``/proc/<pid>/status``; the normalizer's pool workers separately);
* removes its database, topics and S3 objects, stops the services.

All traffic is loopback. The JSON result goes to ``bench/results/e2e/<UTC time>.json``,
the service logs next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from aiokafka import AIOKafkaConsumer  # noqa: E402

from bench.e2e.cpu import (  # noqa: E402
    Cpu,
    CpuMeter,
    descendants,
    listener_pid,
    load_average,
    machine_busy,
    process_cpu,
)
from bench.e2e.profile import Profiles  # noqa: E402
from bench.stack import prepare, save_result, stack_settings  # noqa: E402
from callingest import avro, mongo, s3  # noqa: E402
from callingest.kafka import client_options  # noqa: E402
from callingest.settings import Settings  # noqa: E402
from callingest.topics import Topics  # noqa: E402
from services.normalizer.transcode import transcode_file  # noqa: E402
from tests.audiogen import write_encoded, write_wav  # noqa: E402
from tests.conftest import Services, delete_topics  # noqa: E402
from tests.helpers import demo_call, serve_recordings  # noqa: E402
from tools import devstack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "e2e"
TOKEN = "demo-network-token"
SUBMIT_PATH = "/api/2022-03-01/calls.json"
SERVICE_NAMES = ("gateway", "validator", "fetcher", "normalizer", "notifier")
#: The dev servers by ``tools.devstack.Ports`` attribute, as named in the CPU table.
SERVER_NAMES = {"kafka": "Kafka", "mongodb": "FerretDB", "postgresql": "PostgreSQL",
                "s3": "S3 (versitygw)", "smtp": "SMTP sink"}
TERMINAL = ("normalized", "failed")


# -- recordings ------------------------------------------------------------------------------


@dataclass
class RecordingServer:
    """Serves one WAV and one MP3 body under any name; counts requests."""

    wav: bytes
    mp3: bytes | None
    hits: int = 0
    bytes_sent: int = 0
    base: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        name = request.match_info["name"]
        body = self.mp3 if name.endswith(".mp3") and self.mp3 is not None else self.wav
        self.bytes_sent += len(body)
        return web.Response(body=body, content_type="application/octet-stream")


def make_recordings(seconds: float, rate: int, with_mp3: bool) -> tuple[bytes, bytes | None]:
    """One stereo s16 WAV and (optionally) one MP3 of the same tones, generated once."""
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "call.wav"
        write_wav(wav_path, seconds, rate, "s16")
        mp3: bytes | None = None
        if with_mp3:
            mp3_path = Path(tmp) / "call.mp3"
            write_encoded(mp3_path, "mp3", seconds, rate)
            mp3 = mp3_path.read_bytes()
        return wav_path.read_bytes(), mp3


def transcode_baseline(wav: bytes, mp3: bytes | None, mp3_every: int, count: int,
                       workers: int) -> dict[str, Any]:
    """Transcode-only rate: ``count`` of the run's recordings (the same mix of WAV and MP3
    and of directions) transcoded file to file by ``workers`` processes, as the normalizer's
    pool does, with nothing else of the pipeline. The physical limit of this work here."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"wav": Path(tmp) / "in.wav", "mp3": Path(tmp) / "in.mp3"}
        paths["wav"].write_bytes(wav)
        if mp3 is not None:
            paths["mp3"].write_bytes(mp3)
        jobs = []
        for i in range(count):
            kind = "mp3" if mp3 is not None and mp3_every and i % mp3_every == mp3_every - 1 \
                else "wav"
            jobs.append((str(paths[kind]), str(Path(tmp) / f"out-{i}.wav"),
                         "outbound" if i % 2 else "inbound"))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(transcode_file, *zip(*jobs[:workers], strict=True)))  # warm workers
            pids = list(pool._processes)
            cpu0 = sum(c.total for c in (process_cpu_or_zero(p) for p in pids))
            t0 = time.monotonic()
            list(pool.map(transcode_file, *zip(*jobs, strict=True)))
            wall = time.monotonic() - t0
            cpu = sum(c.total for c in (process_cpu_or_zero(p) for p in pids)) - cpu0
    return {"transcodes": count, "workers": workers, "wall_seconds": wall,
            "calls_per_second": count / wall, "cpu_ms_per_call": 1000 * cpu / count,
            "load_average": load_average()}


def process_cpu_or_zero(pid: int) -> Cpu:
    return process_cpu(pid) or Cpu()


# -- submissions -----------------------------------------------------------------------------


@dataclass
class Submission:
    index: int
    kind: str  # "wav" | "mp3"
    direction: str
    started: float = 0.0  # time.time() when the request was sent
    answered: float = 0.0
    status: int | None = None
    error: str | None = None
    cuid: str | None = None


@dataclass
class Outcome:
    status: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    failure: dict[str, Any] | None = None


async def submit_all(gateway: str, rec: RecordingServer, subs: list[Submission], run_id: str,
                     concurrency: int) -> None:
    """POST every call, at most ``concurrency`` at a time; fills in times, status and cuid."""
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

        async def one(sub: Submission) -> None:
            call = demo_call(f"bench-e2e-{run_id}-{sub.index:06d}",
                             f"{rec.base}/{run_id}-{sub.index:06d}.{sub.kind}",
                             call_direction=sub.direction)
            async with sem:
                sub.started = time.time()
                try:
                    async with http.post(f"{gateway}{SUBMIT_PATH}", json={"call": call},
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                        sub.status = resp.status
                        body = await resp.json(content_type=None)
                        if resp.status in (201, 202):  # 202: "already received", same cuid
                            sub.cuid = str(body["cuid"])
                        else:
                            sub.error = json.dumps(body)[:300]
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    sub.error = f"{type(exc).__name__}: {exc}"[:300]
                sub.answered = time.time()

        await asyncio.gather(*(one(s) for s in subs))


# -- polling ---------------------------------------------------------------------------------


async def poll_until_settled(db: Any, subs: list[Submission], outcomes: dict[str, Outcome],
                             deadline: float, batch: int, interval: float,
                             on_round: Any) -> None:
    """Read pending calls by ``_id`` (oldest first, ``batch`` per round) until all are terminal.

    Completion order is roughly submission order, so checking the oldest pending calls each
    round finds the finished ones without scanning everything every round.
    """
    pending = [s.cuid for s in subs if s.cuid]
    projection = {"status": 1, "history": 1, "failure": 1}
    sem = asyncio.Semaphore(4)

    async def read(cuid: str) -> None:
        async with sem:
            try:
                doc = await db.calls.find_one({"_id": cuid}, projection)
            except Exception as exc:  # a slow store is a result, not a crash
                print(f"  read {cuid}: {type(exc).__name__}", file=sys.stderr)
                return
        out = outcomes.setdefault(cuid, Outcome())
        if doc is not None:
            out.status = doc.get("status")
            out.history = list(doc.get("history") or [])
            out.failure = doc.get("failure")

    last_report = 0.0
    while pending and time.time() < deadline:
        await asyncio.gather(*(read(c) for c in pending[:batch]))
        pending = [c for c in pending if outcomes.get(c, Outcome()).status not in TERMINAL]
        on_round()
        if time.time() - last_report > 15:
            last_report = time.time()
            done = sum(1 for o in outcomes.values() if o.status in TERMINAL)
            print(f"  {time.strftime('%H:%M:%S')} terminal {done}, pending {len(pending)}",
                  flush=True)
        if pending:
            await asyncio.sleep(interval)
    # a last full pass so the counts of calls still pending at the deadline are current
    await asyncio.gather(*(read(c) for c in pending))


async def watch_terminal(settings: Settings, subs: list[Submission], deadline: float,
                         on_round: Any) -> set[str]:
    """Wait until every accepted call's terminal event (RecordingNormalized or CallFailed)
    is on its topic, or the deadline passes; returns the call ids seen.

    Reading the run's own terminal topics costs the store nothing: polling each call in
    MongoDB until it is done (the earlier way) added about ten reads per call to FerretDB's
    load, which the CPU table would have charged to the pipeline."""
    topics = Topics(settings.topic_prefix)
    wanted = {s.cuid for s in subs if s.cuid}
    seen: set[str] = set()
    consumer = AIOKafkaConsumer(topics.normalized, topics.failed,
                                bootstrap_servers=settings.kafka_bootstrap_servers,
                                **client_options(settings), group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    last_report = time.time()
    try:
        while wanted - seen and time.time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    with contextlib.suppress(avro.UndecodableMessage):
                        seen.add(str(avro.decode(record.value)[1]["cuid"]))
            on_round()
            if time.time() - last_report > 15:
                last_report = time.time()
                print(f"  {time.strftime('%H:%M:%S')} terminal {len(seen & wanted)}, "
                      f"pending {len(wanted - seen)}", flush=True)
    finally:
        await consumer.stop()
    return seen & wanted


# -- measurements ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": statistics.fmean(values) if values else None,
    }


def _at(history: list[dict[str, Any]], status: str) -> float | None:
    for entry in history:
        if entry.get("status") == status and isinstance(entry.get("at"), datetime):
            at: datetime = entry["at"]
            return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
    return None


def vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(match.group(1)) if match else None


@dataclass
class RssTracker:
    """Peak VmHWM per service process and per child (pool workers), sampled while running."""

    pids: dict[str, int]
    main_kib: dict[str, int] = field(default_factory=dict)
    child_kib: dict[str, dict[int, int]] = field(default_factory=dict)
    last: float = 0.0

    def sample(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < 5.0:
            return
        self.last = time.monotonic()
        for name, pid in self.pids.items():
            kib = vm_hwm_kib(pid)
            if kib is not None:
                self.main_kib[name] = max(kib, self.main_kib.get(name, 0))
            for child in descendants(pid):
                kib = vm_hwm_kib(child)
                if kib is not None:
                    per = self.child_kib.setdefault(name, {})
                    per[child] = max(kib, per.get(child, 0))

    def report(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in self.pids:
            kids = self.child_kib.get(name, {})
            out[name] = {
                "main_mib": round(self.main_kib.get(name, 0) / 1024, 1),
                "children": len(kids),
                "max_child_mib": round(max(kids.values()) / 1024, 1) if kids else None,
            }
        return out


_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\}\s+(\S+)$')


def scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())
    except OSError as exc:
        return f"# scrape failed: {exc}"


def histograms(text: str, family: str) -> dict[str, dict[str, Any]]:
    """``family`` histogram series by label set: count, sum, mean, p50/p99 from the buckets."""
    series: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or not match.group(1).startswith(family):
            continue
        name, labels, value = match.groups()
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        le = pairs.pop("le", None)
        key = ",".join(f"{k}={v}" for k, v in sorted(pairs.items()))
        entry = series.setdefault(key, {"buckets": []})
        if name == f"{family}_bucket" and le is not None:
            entry["buckets"].append((math.inf if le == "+Inf" else float(le), float(value)))
        elif name == f"{family}_count":
            entry["count"] = float(value)
        elif name == f"{family}_sum":
            entry["sum"] = float(value)
    for entry in series.values():
        count = entry.get("count", 0.0)
        entry["mean"] = entry.get("sum", 0.0) / count if count else None
        buckets = sorted(entry.pop("buckets"))
        for q in (50, 99):
            bound = next((le for le, c in buckets if count and c >= q / 100 * count), None)
            entry[f"p{q}_le"] = bound
    return {k: v for k, v in series.items() if v.get("count")}


# -- set-up and tear-down --------------------------------------------------------------------


async def cleanup(settings: Settings, topics: Topics, cuids: list[str]) -> dict[str, int]:
    """Delete this run's S3 objects (deterministic keys), database and topics."""
    deleted = 0
    keys = [k for c in cuids for k in (f"raw/{c}/1", f"normalized/{c}.wav")]
    with contextlib.suppress(Exception):
        async with s3.s3_client(settings) as client:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                await client.delete_objects(
                    Bucket=settings.s3_bucket,
                    Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
                deleted += len(chunk)
    client = mongo.open_client(settings)
    try:
        await client.drop_database(settings.mongodb_database)
    finally:
        await client.close()
    await delete_topics(settings, topics.all())
    return {"s3_keys_deleted": deleted}


# -- main ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, settings: Settings, services: Services,
              log_dir: Path, servers: dict[str, int]) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    wav, mp3 = make_recordings(args.seconds, args.rate, args.mp3_every > 0)
    gen_s = time.monotonic() - t0
    print(f"recordings: WAV {len(wav) / 1e6:.2f} MB"
          + (f", MP3 {len(mp3) / 1e6:.2f} MB" if mp3 else "") + f" ({gen_s:.1f} s)", flush=True)
    baseline: dict[str, Any] | None = None
    if args.transcode_baseline:
        baseline = await asyncio.to_thread(transcode_baseline, wav, mp3, args.mp3_every,
                                           args.transcode_baseline, os.cpu_count() or 1)
        print(f"transcode only: {baseline['calls_per_second']:.1f} calls/s "
              f"({baseline['cpu_ms_per_call']:.1f} ms CPU per call)", flush=True)
    rec = RecordingServer(wav, mp3)
    runner, rec.base = await serve_recordings(rec.handle)
    client = mongo.open_client(settings, timeout_ms=30000)
    db = mongo.database(client, settings)
    try:
        subs = [
            Submission(i, "mp3" if args.mp3_every and i % args.mp3_every == args.mp3_every - 1
                       else "wav", "outbound" if i % 2 else "inbound")
            for i in range(args.calls)
        ]
        tracker = RssTracker({n: s.proc.pid for n, s in services.running.items()})
        tracker.sample(force=True)
        print(f"submitting {args.calls} calls, concurrency {args.concurrency}", flush=True)
        deadline = time.time() + args.deadline
        sampler = asyncio.create_task(_sample_forever(tracker))
        meter = CpuMeter({**{n: s.proc.pid for n, s in services.running.items()}, **servers})
        profiles = Profiles(log_dir / "py-spy") if args.profile else None
        for name in args.profile:
            assert profiles is not None
            profiles.start(name, services.running[name].proc.pid)
        load_start = load_average()
        machine0 = machine_busy()
        cpu0 = meter.snapshot()
        first = time.time()
        await submit_all(services.running["gateway"].url, rec, subs, run_id, args.concurrency)
        submitted = time.time()
        accepted = [s for s in subs if s.cuid]
        print(f"submitted in {submitted - first:.1f} s: {len(accepted)} accepted", flush=True)
        await watch_terminal(settings, subs, deadline, tracker.sample)
        cpu1 = meter.snapshot()
        machine1 = machine_busy()
        load_end = load_average()
        outcomes: dict[str, Outcome] = {}
        await poll_until_settled(db, subs, outcomes, deadline, len(subs), args.poll_interval,
                                 tracker.sample)
        profile_summaries = profiles.stop() if profiles else {}
        sampler.cancel()
        tracker.sample(force=True)
        metrics = {n: scrape(f"{s.url}/metrics") for n, s in services.running.items()}
    finally:
        await client.close()
        await runner.cleanup()

    latencies: list[float] = []
    stage_times: dict[str, list[float]] = {k: [] for k in
                                           ("submit_to_received", "received_to_validated",
                                            "validated_to_fetched", "fetched_to_normalized")}
    last_terminal = first
    statuses: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for sub in accepted:
        out = outcomes.get(sub.cuid or "", Outcome())
        statuses[out.status or "missing"] += 1
        if out.status == "failed" and out.failure:
            failures[f"{out.failure.get('stage')}/{out.failure.get('class')}"] += 1
        marks = {s: _at(out.history, s) for s in ("received", "validated", "fetched",
                                                   "normalized", "failed")}
        end = marks["normalized"] or marks["failed"]
        if end and out.status in TERMINAL:
            last_terminal = max(last_terminal, end)
        if out.status == "normalized" and marks["normalized"]:
            latencies.append(marks["normalized"] - sub.started)
        chain = [sub.started, marks["received"], marks["validated"], marks["fetched"],
                 marks["normalized"]]
        for (key, a, b) in zip(stage_times, chain, chain[1:], strict=False):
            if a is not None and b is not None:
                stage_times[key].append(b - a)
    submit_latency = [s.answered - s.started for s in subs if s.status is not None]
    stage_metrics = {}
    for name, text in metrics.items():
        stage_metrics.update({f"{name}:{k}": v for k, v in
                              histograms(text, "callingest_stage_duration_seconds").items()})
    http_metrics = {k: v for k, v in
                    histograms(metrics.get("gateway", ""),
                               "callingest_http_request_duration_seconds").items()}
    result = {
        "run_id": run_id,
        "utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "args": vars(args),
        "load_average_at_end": os.getloadavg(),
        "recording": {"seconds": args.seconds, "rate": args.rate, "wav_bytes": len(wav),
                      "mp3_bytes": len(mp3) if mp3 else None,
                      "mp3_calls": sum(1 for s in subs if s.kind == "mp3")},
        "submission": {
            "calls": len(subs),
            "accepted": len(accepted),
            "http_status": dict(Counter(str(s.status) for s in subs)),
            "errors": [s.error for s in subs if s.error][:10],
            "seconds": submitted - first,
            "calls_per_second": len(subs) / (submitted - first) if submitted > first else None,
            "latency_seconds": summary(submit_latency),
        },
        "counts": {"accepted": len(accepted),
                   "submit_errors": len(subs) - len(accepted),
                   "normalized": statuses.get("normalized", 0),
                   "failed": statuses.get("failed", 0),
                   "missing": len(accepted) - statuses.get("normalized", 0)
                   - statuses.get("failed", 0),
                   "by_status": dict(statuses), "failures": dict(failures)},
        "submission_to_normalized_seconds": summary(latencies),
        "total_seconds": last_terminal - first,
        "stage_seconds_from_history": {k: summary(v) for k, v in stage_times.items()},
        "stage_duration_metric": stage_metrics,
        "gateway_http_duration_metric": http_metrics,
        "peak_rss": tracker.report(),
        "normalized_per_second": (statuses.get("normalized", 0) / (last_terminal - first)
                                  if last_terminal > first else None),
        "transcode_baseline": baseline,
        "cpu": cpu_table(CpuMeter.delta(cpu0, cpu1), statuses.get("normalized", 0),
                         machine1[0] - machine0[0], machine1[1] - machine0[1]),
        "load_average": {"start": load_start, "end": load_end},
        "servers": servers,
        "profiles": profile_summaries,
        "recording_server": {"requests": rec.hits, "bytes": rec.bytes_sent},
        "logs": str(log_dir),
    }
    return result


def cpu_table(delta: dict[str, Cpu], calls: int, machine_busy_s: float,
              machine_total_s: float) -> dict[str, Any]:
    """CPU milliseconds per normalized call of each process (children apart), the sum of the
    stack, and the machine's busy time over the same interval (other sessions' work too)."""
    per = max(calls, 1)
    rows: dict[str, dict[str, float]] = {}
    for name, cpu in delta.items():
        rows[name] = {"own_ms": 1000 * cpu.own / per, "children_ms": 1000 * cpu.children / per,
                      "total_ms": 1000 * cpu.total / per, "seconds": cpu.total}
    stack = sum(r["seconds"] for r in rows.values())
    return {"calls": calls, "processes": rows, "stack_ms": 1000 * stack / per,
            "stack_seconds": stack, "machine_busy_seconds": machine_busy_s,
            "machine_total_seconds": machine_total_s,
            "machine_busy_ms": 1000 * machine_busy_s / per}


async def _sample_forever(tracker: RssTracker) -> None:
    while True:
        tracker.sample()
        await asyncio.sleep(5)


def markdown(result: dict[str, Any]) -> str:
    def f(v: Any, nd: int = 1) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    sub, lat, cnt = (result["submission"], result["submission_to_normalized_seconds"],
                     result["counts"])
    rows = [
        "| calls | recording | submit calls/s | submit answer p50 / p99 s | answered 2xx "
        "| submit errors | normalized | failed | missing | sub→normalized p50 s | p95 s | p99 s "
        "| max s | total s |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {sub['calls']} | {result['recording']['seconds']:g} s stereo s16 "
        f"{result['recording']['rate'] // 1000} kHz WAV ({result['recording']['mp3_calls']} of "
        f"them MP3) | {f(sub['calls_per_second'])} | {f(sub['latency_seconds']['p50'], 2)} / "
        f"{f(sub['latency_seconds']['p99'], 2)} | {sub['accepted']} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(sub['http_status'].items()))}) | "
        f"{sub['calls'] - sub['accepted']} | {cnt['normalized']} | {cnt['failed']} | "
        f"{cnt['missing']} | {f(lat['p50'])} | {f(lat['p95'])} | {f(lat['p99'])} | "
        f"{f(lat['max'])} | {f(result['total_seconds'])} |",
        "",
        "| step (call history) | p50 s | p99 s | max s |",
        "|---|---:|---:|---:|",
    ]
    for key, s in result["stage_seconds_from_history"].items():
        rows.append(f"| {key.replace('_', ' ')} | {f(s['p50'], 2)} | {f(s['p99'], 2)} | "
                    f"{f(s['max'], 2)} |")
    rows += ["", "| stage metric (service:labels) | count | mean s | p50 ≤ s | p99 ≤ s |",
             "|---|---:|---:|---:|---:|"]
    for key, m in result["stage_duration_metric"].items():
        rows.append(f"| {key} | {m['count']:.0f} | {f(m['mean'], 3)} | {m['p50_le']} | "
                    f"{m['p99_le']} |")
    rows += ["", "| service | peak RSS MiB (VmHWM) | pool workers: max MiB |", "|---|---:|---:|"]
    for name, r in result["peak_rss"].items():
        kids = f"{r['max_child_mib']} (x{r['children']})" if r["children"] else "-"
        rows.append(f"| {name} | {r['main_mib']} | {kids} |")
    rows += ["", *rate_lines(result), "", *cpu_lines(result.get("cpu"))]
    for name, prof in (result.get("profiles") or {}).items():
        rows += ["", f"py-spy {name} ({prof['samples']} samples; {prof['file']}), self:"]
        rows += [f"  {pct:5.1f} %  {frame}" for frame, _n, pct in prof["self"][:15]]
    return "\n".join(rows)


def rate_lines(result: dict[str, Any]) -> list[str]:
    rate, base = result.get("normalized_per_second"), result.get("transcode_baseline")
    load = result.get("load_average") or {}
    lines = [f"normalized: {rate:.1f} calls/s (first POST to last normalized)"
             if rate else "normalized: -"]
    if base:
        lines.append(f"transcode only, same run: {base['calls_per_second']:.1f} calls/s "
                     f"({base['workers']} workers, {base['cpu_ms_per_call']:.1f} ms CPU per call); "
                     f"ratio {rate / base['calls_per_second']:.2f}" if rate else "")
    if load:
        lines.append("load average (1/5/15 min) at the first POST "
                     + " / ".join(f"{x:.1f}" for x in load["start"]) + ", at the last "
                     + " / ".join(f"{x:.1f}" for x in load["end"]))
    return lines


def cpu_lines(cpu: dict[str, Any] | None) -> list[str]:
    if not cpu:
        return []
    rows = [f"CPU per normalized call ({cpu['calls']} calls), first POST to last terminal:", "",
            "| process | own ms | children ms | total ms | share |", "|---|---:|---:|---:|---:|"]
    stack = cpu["stack_ms"] or 1.0
    for name, r in sorted(cpu["processes"].items(), key=lambda kv: -kv[1]["total_ms"]):
        rows.append(f"| {name} | {r['own_ms']:.1f} | {r['children_ms']:.1f} | "
                    f"{r['total_ms']:.1f} | {100 * r['total_ms'] / stack:.0f} % |")
    rows.append(f"| **all of the above** | | | **{cpu['stack_ms']:.1f}** | 100 % |")
    rows.append(f"| machine busy (every process, other sessions too) | | | "
                f"{cpu['machine_busy_ms']:.1f} | |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="recording length")
    parser.add_argument("--rate", type=int, default=16000, choices=(8000, 16000))
    parser.add_argument("--mp3-every", type=int, default=10,
                        help="every Nth call gets the MP3 variant (0: none)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=1500.0,
                        help="seconds from the first submission until the run stops waiting")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--transcode-baseline", type=int, default=100, metavar="N",
                        help="first transcode N of the run's recordings with nothing else "
                             "(the transcode-only rate; 0: skip)")
    parser.add_argument("--profile", action="append", default=[], choices=SERVICE_NAMES,
                        help="py-spy profile of this service (and its pool workers) during "
                             "the run (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="override a setting of the services (repeatable)")
    parser.add_argument("--report", type=Path, help="print the tables of a saved JSON result")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(args.report.read_text())))
        return 0
    if not 1 <= args.calls <= 10000:
        parser.error("--calls must be 1..10000")

    ports = devstack.Ports()
    started = devstack.servers_up(ports)
    tag = uuid.uuid4().hex[:8]
    overrides = dict(item.split("=", 1) for item in args.set)
    settings = stack_settings(ports, "e2e", tag, **overrides)
    servers = {SERVER_NAMES[c]: pid for c in SERVER_NAMES
               if (pid := listener_pid(ports.of(c))) is not None}
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    log_dir = RESULTS / f"{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    services = Services(settings, log_dir)
    result: dict[str, Any] | None = None
    cuids: list[str] = []
    try:
        asyncio.run(prepare(settings))
        for name in SERVICE_NAMES:
            services.start(name)
        print("services up: " + ", ".join(f"{n}={s.port}" for n, s in services.running.items()),
              flush=True)
        result = asyncio.run(run(args, settings, services, log_dir, servers))
    finally:
        services.stop_all()
        with contextlib.suppress(Exception):
            cuids = asyncio.run(_all_cuids(settings))
        cleaned = asyncio.run(cleanup(settings, topics, cuids))
        for component in reversed(started):
            devstack.stop(component)
    assert result is not None
    result["cleanup"] = cleaned
    result["overrides"] = overrides
    result["servers_started_by_run"] = started
    out = RESULTS / f"{stamp}.json"
    save_result(out, result, markdown(result))
    return 0


async def _all_cuids(settings: Settings) -> list[str]:
    """Every call id in this run's database (its own database: a full read is fine once)."""
    client = mongo.open_client(settings)
    try:
        db = mongo.database(client, settings)
        return [str(d["_id"]) async for d in db.calls.find({}, {"_id": 1})]
    finally:
        await client.close()


if __name__ == "__main__":
    sys.exit(main())
