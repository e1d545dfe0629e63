"""Benchmark of the gateway against a bare aiohttp handler, with wrk (see docs/benchmarks.md).

Runs against the dev stack's servers (``make up`` or ``python -m tools.devstack servers-up``)
with its own database and topic prefix, both removed afterwards:

    .venv/bin/python bench/gateway/run.py [--workers N [N ...]] [--duration S] [--tracing R]

For each target (bare handler; for each worker count the gateway with and without the
metrics middleware, each on an empty database of its own; the bare handler again) it
runs wrk at concurrency 64 and 4 with ``submit.lua`` (every request a new call) after
a 3 s warm-up, and prints a Markdown table (ratios against the mean of the two bare
runs, since the machine is shared and its load drifts) and the metrics middleware's
cost; raw wrk output goes to ``bench/results/``.

``--tracing R`` measures tracing instead of the metrics middleware: for each worker count,
two gateways run side by side, tracing off (``OTEL_SDK_DISABLED=true``) and on (every span
exported over OTLP/HTTP to ``otlp_sink.py`` on loopback), each on a database of its own,
and wrk drives one at a time, alternating R rounds (off/on, then on/off: neither always goes
first) of a c=64 and a c=4 run of ``--duration`` s each; it prints tracing's cost over all
rounds and per round (the spread shows the drift of a shared machine's load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.stack import prepare  # noqa: E402
from callingest import mongo  # noqa: E402
from callingest.settings import Settings  # noqa: E402
from callingest.topics import Topics  # noqa: E402
from tools.devstack import free_port  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = ROOT / "bench" / "results"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
TOKEN = "demo-network-token"
URL_PATH = "/api/2022-03-01/calls.json"


def wait_ready(url: str, timeout: float = 60.0, expect: int = 200) -> None:
    """Poll ``url`` with GET until it answers ``expect``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == expect:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == expect:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wrk(port: int, connections: int, duration: int, run_id: str, log: Path) -> dict[str, Any]:
    cmd = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "submit.lua"),
        f"http://127.0.0.1:{port}{URL_PATH}",
    ]
    out = subprocess.run(
        cmd,
        env={**os.environ, "BENCH_TOKEN": TOKEN, "BENCH_RUN": run_id},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    log.write_text(log.read_text() + " ".join(cmd) + "\n" + out + "\n" if log.exists() else out)
    result = json.loads(out.strip().splitlines()[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, port: int, duration: int, log: Path, pid: int | None = None,
            warm: bool = True) -> dict[str, Any]:
    """wrk at c=64 and c=4 (after a warm-up unless ``warm`` is false); with ``pid``, also the
    CPU time that process spent per request (``cpu_us``): unlike throughput, hardly moved by
    the load of other processes."""
    run_id = uuid.uuid4().hex[:8]
    if warm:
        wrk(port, 64, 3, f"warm{run_id}", log)
    result: dict[str, Any] = {"target": name}
    for key, connections in (("c64", 64), ("c4", 4)):
        before = cpu_seconds(pid) if pid is not None else 0.0
        result[key] = wrk(port, connections, duration, f"{key}{run_id}", log)
        if pid is not None:
            result[key]["cpu_us"] = (cpu_seconds(pid) - before) * 1e6 / result[key]["requests"]
    return result


async def cleanup(settings: Settings) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    client = mongo.open_client(settings)
    try:
        db = mongo.database(client, settings)
        accepted = await db.published_calls.count_documents({})
        await client.drop_database(settings.mongodb_database)
    finally:
        await client.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics(Topics(settings.topic_prefix).all())
    finally:
        await admin.close()
    return accepted


def row(result: dict[str, Any], bare_rps: float) -> str:
    c64, c4 = result["c64"], result["c4"]
    return (
        f"| {result['target']} | {c64['rps']:.0f} | {c64['rps'] / bare_rps:.2f} | "
        f"{c64['p50_us'] / 1000:.1f} | {c64['p99_us'] / 1000:.1f} | {c4['rps']:.0f} | "
        f"{c4['p50_us'] / 1000:.1f} | {c4['p99_us'] / 1000:.1f} | "
        f"{c64['non_2xx'] + c4['non_2xx']} / {c64['socket_errors'] + c4['socket_errors']} |"
    )


def measure_bare(label: str, duration: int, log: Path) -> dict[str, Any]:
    port = free_port()
    bare = start([PYTHON, str(HERE / "bare_server.py"), str(port)], {}, log.with_suffix(".bare.log"))
    try:
        wait_ready(f"http://127.0.0.1:{port}/api/2022-03-01/calls.json", expect=405)
        return measure(label, port, duration, log)
    finally:
        stop(bare)


def gateway_env(settings: Settings, workers: int, tracing: str | None,
                sink_port: int | None) -> dict[str, str]:
    """The environment of a gateway on ``settings``' database and topics.

    ``tracing``: None (the default set-up: spans made, none exported), "off" (no spans) or
    "on" (spans exported over OTLP/HTTP to the sink on ``sink_port``).
    """
    env = {
        "MONGODB_DATABASE": settings.mongodb_database,
        "TOPIC_PREFIX": settings.topic_prefix,
        "GATEWAY_WORKERS": str(workers),
    }
    if tracing == "off":
        env["OTEL_SDK_DISABLED"] = "true"
    elif tracing == "on":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink_port}"
    return env


def new_settings() -> Settings:
    """Settings for a gateway target on a database and topics of its own (prepared)."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings(callingest_env="dev", mongodb_database=f"bench_{tag}", topic_prefix=f"bench{tag}.")
    asyncio.run(prepare(settings))
    return settings


def start_sink(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The loopback OTLP/HTTP sink spans are exported to (``otlp_sink.py``), and its port."""
    port = free_port()
    return start([PYTHON, str(HERE / "otlp_sink.py"), str(port)], {}, log.with_suffix(".otlp.log")), port


def require_wrk(parser: argparse.ArgumentParser) -> None:
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed: it comes from Debian's packages (apt-get install wrk)")


def start_gateway(env: dict[str, str], metrics_on: bool, log: Path,
                  scans: bool = True) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = ([PYTHON, str(HERE / "serve_gateway.py")] + ([] if metrics_on else ["--no-metrics"])
           + ([] if scans else ["--no-scans"]))
    gateway = start(cmd, {**env, "HTTP_PORT": str(port)}, log.with_suffix(".gateway.log"))
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz")
    except RuntimeError:
        stop(gateway)
        raise
    return gateway, port


def measure_gateway(workers: int, metrics_on: bool, duration: int, log: Path) -> dict[str, Any]:
    """One gateway target (the default tracing set-up) on a database and topics of its own."""
    settings = new_settings()
    try:
        gateway, port = start_gateway(gateway_env(settings, workers, None, None), metrics_on, log)
        try:
            label = f"gateway, {workers} worker(s), metrics {'on' if metrics_on else 'off'}"
            result = measure(label, port, duration, log, gateway.pid if workers == 1 else None)
        finally:
            stop(gateway)
    finally:
        result_published = asyncio.run(cleanup(settings))
    result["published"] = result_published
    return result


def measure_tracing(workers: int, duration: int, rounds: int, log: Path) -> list[dict[str, Any]]:
    """Tracing off and on side by side (see the module's docstring): one result per target
    and round, in the order measured, each with ``round`` and ``tracing``; the last result of
    each target carries ``published`` (its calls in the database)."""
    sink, sink_port = start_sink(log)
    targets: dict[str, tuple[Settings, subprocess.Popen[bytes], int]] = {}
    results: list[dict[str, Any]] = []
    try:
        for tracing in ("off", "on"):
            settings = new_settings()
            targets[tracing] = (settings, *start_gateway(
                gateway_env(settings, workers, tracing, sink_port), True, log))
        for _, _, port in targets.values():
            wrk(port, 64, 3, f"warm{uuid.uuid4().hex[:8]}", log)
        for round_ in range(rounds):
            for tracing in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                _, gateway, port = targets[tracing]
                label = f"gateway, {workers} worker(s), metrics on, tracing {tracing}"
                result = measure(label, port, duration, log, gateway.pid if workers == 1 else None,
                                 warm=False)
                result["target"] += f" (round {round_ + 1})"
                results.append({**result, "round": round_ + 1, "tracing": tracing})
    finally:
        for tracing, (settings, gateway, _) in targets.items():
            stop(gateway)
            published = asyncio.run(cleanup(settings))
            mine = [r for r in results if r["tracing"] == tracing]
            if mine:
                mine[-1]["published"] = published
        stop(sink)
    return results


def tracing_summary(workers: int, results: list[dict[str, Any]]) -> list[str]:
    """Tracing's cost: over all rounds (sums of requests over sums of time), per round, and
    in gateway CPU per submission."""
    def throughput(c: str, tracing: str, round_: int | None = None) -> float:
        mine = [r[c] for r in results if r["tracing"] == tracing and round_ in (None, r["round"])]
        return sum(m["requests"] for m in mine) / (sum(m["duration_us"] for m in mine) / 1e6)

    lines = []
    for c in ("c64", "c4"):
        def rate(tracing: str, round_: int | None = None, c: str = c) -> float:
            return throughput(c, tracing, round_)

        rounds = sorted({r["round"] for r in results})
        per_round = [1 - rate("on", n) / rate("off", n) for n in rounds]
        lines.append(f"tracing cost ({workers} worker(s), {c}): {1 - rate('on') / rate('off'):+.1%} of "
                     f"throughput ({rate('on'):.0f} / {rate('off'):.0f} req/s on / off over "
                     f"{len(rounds)} rounds; median of the rounds {statistics.median(per_round):+.1%}; "
                     f"per round: {', '.join(f'{v:+.1%}' for v in per_round)})")
        cpu = {t: [r[c]["cpu_us"] for r in results if r["tracing"] == t and "cpu_us" in r[c]]
               for t in ("on", "off")}
        if cpu["on"] and cpu["off"]:
            mean_on, mean_off = (sum(cpu[t]) / len(cpu[t]) for t in ("on", "off"))
            lines.append(f"  gateway CPU per submission ({c}): on {mean_on:.0f} us, off "
                         f"{mean_off:.0f} us: tracing costs {mean_on / mean_off - 1:+.1%} "
                         f"(runs on: {', '.join(f'{v:.0f}' for v in cpu['on'])}; "
                         f"off: {', '.join(f'{v:.0f}' for v in cpu['off'])})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[int(os.environ.get("GATEWAY_WORKERS", 1))],
        help="gateway worker counts to measure (each with and without metrics)",
    )
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--tracing", type=int, default=0, metavar="ROUNDS",
                        help="measure tracing off/on (ROUNDS alternations) instead of metrics on/off")
    args = parser.parse_args()
    require_wrk(parser)
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"gateway-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.log"
    # The bare handler runs first and last: the machine is shared, its load drifts.
    results = [measure_bare("bare aiohttp handler (1 process), before", args.duration, log)]
    for workers in args.workers:
        if args.tracing:
            results.extend(measure_tracing(workers, args.duration, args.tracing, log))
        else:
            for metrics_on in (True, False):
                results.append(measure_gateway(workers, metrics_on, args.duration, log))
    results.append(measure_bare("bare aiohttp handler (1 process), after", args.duration, log))
    bare_rps = (results[0]["c64"]["rps"] + results[-1]["c64"]["rps"]) / 2
    lines = [
        f"ratio = c=64 req/s / mean c=64 req/s of the two bare runs ({bare_rps:.0f})",
        "",
        "| target | c=64 req/s | ratio to bare | c=64 p50 ms | c=64 p99 ms | c=4 req/s | "
        "c=4 p50 ms | c=4 p99 ms | non-2xx / socket errors |",
        "|---|---|---|---|---|---|---|---|---|",
        *(row(r, bare_rps) for r in results),
        "",
    ]
    gateways = [r for r in results if r["target"].startswith("gateway")]
    if args.tracing:
        for workers in args.workers:
            lines.extend(tracing_summary(workers, [r for r in gateways
                                                   if r["target"].startswith(f"gateway, {workers} worker")]))
    else:
        for on, off in zip(gateways[::2], gateways[1::2], strict=True):
            cost = 1 - on["c64"]["rps"] / off["c64"]["rps"]
            lines.append(f"metrics middleware cost ({on['target']}): {cost:+.1%} of c=64 throughput")
    requests = sum(r["c64"]["requests"] + r["c4"]["requests"] for r in gateways)
    published = sum(r.get("published", 0) for r in gateways)
    lines.append(f"gateway calls published (receipts) / measured requests: {published} / {requests} "
                 f"(the published count includes the warm-up runs)")
    print("\n".join(lines))
    print(f"raw output: {log}")
    (log.with_suffix(".json")).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
