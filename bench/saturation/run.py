"""Submission latency while the pipeline is saturated, against the same stack idle, in one run.

    .venv/bin/python bench/saturation/run.py            # 1,000 60 s calls of backlog, c=4 probes
    # options: --calls 1000 --seconds 60 --probes 1000 --concurrency 4 --port-base 24300
    #          --batch-nice 10 (the dev stack's default; 0 = every process at the same priority)
    #          --steps (time the gateway's store insert and Kafka publication per call)
    #          --alternate N (then N pairs of saturated phases, batch reniced 0 / --batch-nice)

What it does (see docs/benchmarks.md, "Gateway under a saturated pipeline"):

* starts a whole stack of its own as ``make up`` does (``python -m tools.devstack up``: Kafka,
  FerretDB, versitygw, SMTP sink, demo server, the six services, Prometheus) on ports
  ``--port-base`` + 0..99, with a run directory, topic prefix and database of its own, so
  it shares no server with anyone; stops it and removes the run directory at the end;
* serves the recordings from this process on 127.0.0.1: ONE 60 s stereo s16 16 kHz WAV and
  an MP3 of it for the backlog, a 1 s WAV for the probes;
* **idle**: ``--probes`` submissions through ``wrk -t1 -c{--concurrency}`` (``submit.lua``,
  every request a new call, each a real call with the 1 s recording) while nothing else is
  submitted; then waits until the pipeline has finished the probes' calls;
* **saturated**: submits ``--calls`` calls (every ``--mp3-every``th an MP3) with 32 POSTs in
  flight, waits ``--settle`` seconds so that every stage has work, then the same probes;
* ``--alternate N``: then, on the same backlog, N pairs of the same probes with the batch
  services (:data:`tools.devstack.BATCH`) reniced in place to 0, then to ``--batch-nice``:
  CPU priority on and off in the same minute, on the same machine load;
* for each phase: wrk's p50/p90/p99 and rate, the CPU seconds each component of the stack
  used during the probes (``/proc/<pid>/stat`` of each process and its children: shows which
  stage was busy), and the calls per status in the database before and after (shows the
  backlog was there for the whole phase); the machine's load average around the run.

Bounded: at most ``--probes`` requests and ``--probe-seconds`` per phase, ``--drain-seconds``
waiting for the idle phase's calls. All traffic is loopback. Result JSON:
``bench/results/saturation/<UTC time>.json``, the stack's logs next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from pymongo import AsyncMongoClient  # noqa: E402

from bench.e2e.cpu import descendants, process_cpu  # noqa: E402
from bench.stack import save_result  # noqa: E402
from tests.audiogen import write_encoded, write_wav  # noqa: E402
from tests.helpers import demo_call, serve_recordings  # noqa: E402
from tools.devstack import BATCH, BATCH_NICE_DEFAULT, set_autogroup_nice  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "saturation"
LUA = ROOT / "bench" / "gateway" / "submit.lua"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
TOKEN = "demo-network-token"
SUBMIT_PATH = "/api/2022-03-01/calls.json"
STATUSES = ("received", "validated", "fetched", "normalized", "failed")
COMPONENTS = ("gateway", "validator", "fetcher", "normalizer", "notifier", "webhooks",
              "kafka", "postgresql", "mongodb", "s3", "smtp", "demo", "prometheus")


def stack_env(base: int, run_dir: Path, batch_nice: int | None) -> dict[str, str]:
    """``make up``'s environment for a stack of its own on ports ``base`` .. ``base`` + 99."""
    env = {
        "CALLINGEST_RUN_DIR": str(run_dir),
        "KAFKA_PORT": str(base), "KAFKA_CONTROLLER_PORT": str(base + 1),
        "MONGODB_PORT": str(base + 2), "S3_PORT": str(base + 3), "SMTP_PORT": str(base + 4),
        "DEMO_RECORDINGS_PORT": str(base + 5), "PROMETHEUS_PORT": str(base + 6),
        "GATEWAY_PORT": str(base + 80), "VALIDATOR_PORT": str(base + 81),
        "FETCHER_PORT": str(base + 82), "NORMALIZER_PORT": str(base + 83),
        "NOTIFIER_PORT": str(base + 84), "WEBHOOKS_PORT": str(base + 85),
        "TOPIC_PREFIX": "sat.", "MONGODB_DATABASE": "saturation",
    }
    if batch_nice is not None:
        env["BATCH_NICE"] = str(batch_nice)
    return env


def devstack(action: str, env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as out:
        subprocess.run([PYTHON, "-m", "tools.devstack", action], cwd=ROOT, check=True,
                       env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)


def time_gateway_steps(env: dict[str, str], log: Path) -> None:
    """Replace the stack's gateway by ``timed_gateway.py`` (same settings, same pid file)."""
    code = ("from tools import devstack as d\n"
            "p = d.Ports()\n"
            "d.stop('gateway')\n"
            "d.spawn('gateway', [str(d.VENV_BIN / 'python'), 'bench/saturation/timed_gateway.py'],"
            " env={**d.service_env(p), 'HTTP_PORT': str(p.gateway)})\n"
            "d.wait_services(['gateway'], p, 60.0)\n")
    with open(log, "ab") as out:
        subprocess.run([PYTHON, "-c", code], cwd=ROOT, check=True, env={**os.environ, **env},
                       stdout=out, stderr=subprocess.STDOUT)


def step_times(gateway_log: Path, window: list[float]) -> dict[str, dict[str, float]]:
    """p50/p90/p99 ms of the store insert and the Kafka publication of the new calls
    accepted in ``window`` (``STEPTIME`` lines of ``timed_gateway.py``)."""
    rows = []
    with contextlib.suppress(OSError):
        for line in gateway_log.read_text(errors="replace").splitlines():
            if line.startswith("STEPTIME "):
                at, insert, publish = (float(x) for x in line.split()[1:4])
                if window[0] <= at <= window[1]:
                    rows.append((insert, publish))
    out = {}
    for index, name in ((0, "store_insert"), (1, "kafka_publish")):
        values = sorted(row[index] * 1000 for row in rows)
        if values:
            out[name] = {f"p{q}_ms": round(values[min(len(values) - 1, int(len(values) * q / 100))], 1)
                         for q in (50, 90, 99)} | {"n": len(values)}
    return out


# -- CPU per component -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its descendants, live ones and reaped ones."""
    cpu = process_cpu(pid)
    return cpu.total if cpu is not None else 0.0


def component_pids(run_dir: Path) -> dict[str, int]:
    pids = {}
    for name in COMPONENTS:
        with contextlib.suppress(OSError, ValueError):
            pids[name] = int((run_dir / "pids" / f"{name}.pid").read_text().strip())
    return pids


def renice_batch(pids: dict[str, int], nice: int) -> None:
    """Set the niceness of the batch services, their children and their autogroups, in place."""
    for name in BATCH:
        if name in pids:
            set_autogroup_nice(pids[name], nice)
            for pid in (pids[name], *descendants(pids[name])):
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, pid, nice)


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


# -- store -----------------------------------------------------------------------------------


async def status_counts(db: Any) -> dict[str, int]:
    return {s: await db.calls.count_documents({"status": s}) for s in STATUSES}


# -- recordings and submissions --------------------------------------------------------------


def make_recordings(seconds: float) -> dict[str, bytes]:
    """The backlog's WAV and MP3 (``seconds`` long, 16 kHz stereo) and the probes' 1 s WAV."""
    with tempfile.TemporaryDirectory() as tmp:
        write_wav(Path(tmp, "call.wav"), seconds, 16000, "s16")
        write_encoded(Path(tmp, "call.mp3"), "mp3", seconds, 16000)
        write_wav(Path(tmp, "probe.wav"), 1.0, 16000, "s16")
        return {name: Path(tmp, name).read_bytes() for name in ("call.wav", "call.mp3", "probe.wav")}


async def submit_backlog(gateway: str, base: str, calls: int, mp3_every: int,
                         run_id: str) -> dict[str, Any]:
    sem = asyncio.Semaphore(32)
    statuses: dict[str, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def one(i: int) -> None:
            kind = "mp3" if mp3_every and i % mp3_every == mp3_every - 1 else "wav"
            call = demo_call(f"sat-{run_id}-{i:06d}", f"{base}/backlog/{i}.{kind}",
                             call_direction="outbound" if i % 2 else "inbound")
            async with sem:
                try:
                    async with http.post(f"{gateway}{SUBMIT_PATH}", json={"call": call},
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                        await resp.read()
                        key = str(resp.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    key = type(exc).__name__
                statuses[key] = statuses.get(key, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(calls)))
    return {"statuses": statuses, "seconds": time.monotonic() - started}


def probe(port: int, concurrency: int, count: int, seconds: int, base: str,
          run_id: str) -> dict[str, Any]:
    """wrk -t1 -c``concurrency``: ``count`` submissions at most, ``seconds`` at most."""
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(LUA),
           f"http://127.0.0.1:{port}{SUBMIT_PATH}"]
    env = {**os.environ, "BENCH_TOKEN": TOKEN, "BENCH_RUN": run_id,
           "BENCH_RECORDINGS": f"{base}/probe", "BENCH_MAX_REQUESTS": str(count)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["wrk"] = out
    return result


async def measured_phase(name: str, args: argparse.Namespace, port: int, base: str,
                         pids: dict[str, int], db: Any) -> dict[str, Any]:
    before_counts = await status_counts(db)
    before_cpu = cpu_snapshot(pids)
    load_before = os.getloadavg()
    started, started_unix = time.monotonic(), time.time()
    result = await asyncio.to_thread(probe, port, args.concurrency, args.probes,
                                     args.probe_seconds, base, f"{name}{uuid.uuid4().hex[:6]}")
    wall = time.monotonic() - started
    after_cpu = cpu_snapshot(pids)
    after_counts = await status_counts(db)
    cpu = {n: round(after_cpu[n] - before_cpu.get(n, 0.0), 2) for n in after_cpu}
    print(f"{name}: {result['requests']} probes in {wall:.1f} s, p50 {result['p50_us'] / 1000:.1f} "
          f"ms, p99 {result['p99_us'] / 1000:.1f} ms; CPU s {cpu}; calls {before_counts} -> "
          f"{after_counts}", flush=True)
    return {"phase": name, "wall_seconds": wall, "unix_window": [started_unix, time.time()],
            "probe": result, "cpu_seconds": cpu,
            "cpu_share_of_two_cores": {n: round(v / wall / 2, 3) for n, v in cpu.items()},
            "calls_before": before_counts, "calls_after": after_counts,
            "load_average": [load_before, os.getloadavg()]}


async def wait_drained(db: Any, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = await status_counts(db)
        if counts["received"] + counts["validated"] + counts["fetched"] == 0:
            return counts
        if time.monotonic() > deadline:
            print(f"  not drained after {timeout:.0f} s: {counts}", flush=True)
            return counts
        await asyncio.sleep(3)


async def run(args: argparse.Namespace, env: dict[str, str], run_dir: Path) -> dict[str, Any]:
    recordings = make_recordings(args.seconds)

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = (recordings["probe.wav"] if name.startswith("probe/") else
                recordings["call.mp3"] if name.endswith(".mp3") else recordings["call.wav"])
        return web.Response(body=body, content_type="application/octet-stream")

    runner, base = await serve_recordings(serve)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        f"mongodb://127.0.0.1:{env['MONGODB_PORT']}/", serverSelectionTimeoutMS=30000)
    db = client[env["MONGODB_DATABASE"]]
    port = int(env["GATEWAY_PORT"])
    gateway = f"http://127.0.0.1:{port}"
    pids = component_pids(run_dir)
    try:
        # The first calls pay for the services' warm-up (connections, caches): not measured.
        warm = await asyncio.to_thread(probe, port, args.concurrency, 200, 30, base,
                                       f"warm{uuid.uuid4().hex[:6]}")
        print(f"warm-up: {warm['requests']} probes", flush=True)
        await wait_drained(db, args.drain_seconds)
        idle = await measured_phase("idle", args, port, base, pids, db)
        drained = await wait_drained(db, args.drain_seconds)
        print(f"idle phase's calls drained: {drained}", flush=True)
        backlog = await submit_backlog(gateway, base, args.calls, args.mp3_every,
                                       uuid.uuid4().hex[:6])
        print(f"backlog: {backlog}", flush=True)
        settle_cpu = cpu_snapshot(pids)
        await asyncio.sleep(args.settle)
        settle = {n: round((v - settle_cpu.get(n, 0.0)) / args.settle / 2, 3)
                  for n, v in cpu_snapshot(pids).items()}
        print(f"settle ({args.settle:.0f} s), CPU share of two cores: {settle}", flush=True)
        saturated = await measured_phase("saturated", args, port, base, pids, db)
        alternation = []
        nice = BATCH_NICE_DEFAULT if args.batch_nice is None else args.batch_nice
        for _ in range(args.alternate):
            for value in (0, nice):
                renice_batch(pids, value)
                phase = await measured_phase(f"saturated, batch nice {value}", args, port, base,
                                             pids, db)
                alternation.append(phase | {"batch_nice": value})
    finally:
        await client.close()
        await runner.cleanup()
    return {"idle": idle, "saturated": saturated, "alternation": alternation, "backlog": backlog,
            "settle_cpu_share_of_two_cores": settle}


def markdown(result: dict[str, Any]) -> str:
    idle, sat = result["idle"]["probe"], result["saturated"]["probe"]
    lines = [
        f"c={result['args']['concurrency']}, {result['args']['probes']} probes per phase, "
        f"backlog {result['args']['calls']} x {result['args']['seconds']:g} s, "
        f"BATCH_NICE={result['args']['batch_nice']}, load average {result['load_start']} -> "
        f"{result['load_end']}",
        "",
        "| phase | probes | req/s | p50 ms | p90 ms | p99 ms | non-2xx / socket errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in (("idle", idle), ("saturated", sat)):
        lines.append(f"| {name} | {p['requests']} | {p['rps']:.0f} | {p['p50_us'] / 1000:.1f} | "
                     f"{p['p90_us'] / 1000:.1f} | {p['p99_us'] / 1000:.1f} | "
                     f"{p['non_2xx']} / {p['socket_errors']} |")
    lines.append(f"| **saturated / idle** | | {sat['rps'] / idle['rps']:.2f} | "
                 f"{sat['p50_us'] / idle['p50_us']:.2f} | {sat['p90_us'] / idle['p90_us']:.2f} | "
                 f"{sat['p99_us'] / idle['p99_us']:.2f} | |")
    for phase in result.get("alternation", []):
        p = phase["probe"]
        done = phase["calls_after"]["normalized"] - phase["calls_before"]["normalized"]
        batch = sum(v for n, v in phase["cpu_share_of_two_cores"].items() if n in BATCH)
        lines.append(f"| {phase['phase']} (normalized {done / phase['wall_seconds']:.1f}/s, batch "
                     f"CPU {batch:.2f} of 2 cores) | {p['requests']} | {p['rps']:.0f} | "
                     f"{p['p50_us'] / 1000:.1f} | {p['p90_us'] / 1000:.1f} | "
                     f"{p['p99_us'] / 1000:.1f} | {p['non_2xx']} / {p['socket_errors']} |")
    steps = [(phase["phase"], phase.get("steps")) for phase in
             (result["idle"], result["saturated"], *result.get("alternation", []))]
    if all(st for _, st in steps):
        lines += ["", "| phase | store insert p50 / p90 / p99 ms | Kafka publication p50 / p90 / p99 ms |",
                  "|---|---|---|"]
        for name, st in steps:
            assert st is not None
            lines.append(f"| {name} | " + " | ".join(
                f"{st[k]['p50_ms']} / {st[k]['p90_ms']} / {st[k]['p99_ms']}"
                for k in ("store_insert", "kafka_publish")) + " |")
    lines += ["", "| component | CPU share of 2 cores, idle phase | saturated phase |",
              "|---|---:|---:|"]
    for name in result["saturated"]["cpu_share_of_two_cores"]:
        lines.append(f"| {name} | {result['idle']['cpu_share_of_two_cores'].get(name, 0):.3f} | "
                     f"{result['saturated']['cpu_share_of_two_cores'][name]:.3f} |")
    for name in ("idle", "saturated"):
        phase = result[name]
        done = phase["calls_after"]["normalized"] - phase["calls_before"]["normalized"]
        lines += ["", f"{name} phase: calls per status {phase['calls_before']} -> "
                  f"{phase['calls_after']}; pipeline progress {done} normalized "
                  f"({done / phase['wall_seconds']:.1f}/s)"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="backlog of real calls")
    parser.add_argument("--seconds", type=float, default=60.0, help="backlog recording length")
    parser.add_argument("--mp3-every", type=int, default=10)
    parser.add_argument("--probes", type=int, default=1000, help="probe submissions per phase")
    parser.add_argument("--probe-seconds", type=int, default=60, help="time bound per phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds between the backlog's last POST and the probes")
    parser.add_argument("--drain-seconds", type=float, default=240.0)
    parser.add_argument("--port-base", type=int, default=24300)
    parser.add_argument("--batch-nice", type=int, default=None,
                        help="BATCH_NICE for the stack (default: the dev stack's own)")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="after the saturated phase, N more pairs of probes with the batch "
                             "services reniced in place to 0 and to --batch-nice (same backlog)")
    parser.add_argument("--steps", action="store_true",
                        help="run the gateway with timers around the store insert and the Kafka "
                             "publication (bench/saturation/timed_gateway.py)")
    parser.add_argument("--report", type=Path, help="print the tables of a saved JSON result")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(args.report.read_text())))
        return 0
    if not (1 <= args.calls <= 5000 and 1 <= args.probes <= 20000):
        parser.error("--calls must be 1..5000, --probes 1..20000")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir = Path(tempfile.mkdtemp(prefix="saturation-", dir=RESULTS))
    env = stack_env(args.port_base, run_dir, args.batch_nice)
    log = RESULTS / f"{stamp}-devstack.log"
    load_start = os.getloadavg()
    result: dict[str, Any] = {}
    try:
        devstack("up", env, log)
        if args.steps:
            time_gateway_steps(env, log)
        result = asyncio.run(run(args, env, run_dir))
    finally:
        devstack("down", env, log)
        with contextlib.suppress(OSError):
            shutil.copytree(run_dir / "logs", RESULTS / f"{stamp}-logs")
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.steps:
        for phase in (result["idle"], result["saturated"], *result["alternation"]):
            phase["steps"] = step_times(RESULTS / f"{stamp}-logs" / "gateway.log",
                                        phase["unix_window"])
    result.update({"utc": stamp, "args": vars(args) | {"report": None},
                   "load_start": [round(x, 2) for x in load_start],
                   "load_end": [round(x, 2) for x in os.getloadavg()]})
    out = RESULTS / f"{stamp}.json"
    save_result(out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
