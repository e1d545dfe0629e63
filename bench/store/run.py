"""The pipeline's concurrent store writes on FerretDB/SQLite and FerretDB/PostgreSQL, side by side.

    .venv/bin/python bench/store/run.py --concurrency 4 16 64 --seconds 20 --rounds 2

What it does (see docs/benchmarks.md, "Store backend"):

* starts, in a private run directory (``CALLINGEST_RUN_DIR``) on free loopback ports, a
  PostgreSQL cluster (``tools.devstack.start_postgresql``) and two FerretDB processes built
  from ``deploy/ferretdb``: one on SQLite, one on that cluster; stops and removes them at the end;
* for each round, each concurrency and each backend in turn (alternating, so the machine's
  load drifts over both alike), a fresh database with the platform's indexes
  (``callingest.mongo.ensure_indexes``), then ``--concurrency`` workers for ``--seconds``,
  each repeating the store writes of one call through the pipeline:

  1. gateway: ``insert_one`` of the call document (the shape ``services/gateway/calls.py``
     stores), a second insert of the same network + external id refused by the unique index
     (a resubmission), the publish claim (``publish_claims`` insert by unique ``_id``, then a
     second taker refused), the receipt, and the claims dropped by ``cuid``;
  2. validator, fetcher, normalizer: each reads the call by ``_id`` and updates it as
     ``callingest.pipeline.StageRunner._succeed`` does (``$set`` status and outputs,
     ``$unset`` retrying, ``$push`` a history entry);

  "database is locked" refusals are retried as the services do (and counted);
* reports calls/s, per-operation latency (p50/p99), the CPU time of the store's processes
  per call (FerretDB; PostgreSQL's postmaster and backends), the load average, and the
  PostgreSQL / SQLite ratio of each same-round pair.

All traffic is loopback. JSON: ``bench/results/store/<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RUN_DIR = Path(tempfile.mkdtemp(prefix="bench-store-"))
os.environ["CALLINGEST_RUN_DIR"] = str(RUN_DIR)  # before tools.devstack reads it

from pymongo import AsyncMongoClient  # noqa: E402
from pymongo.errors import DuplicateKeyError, OperationFailure  # noqa: E402

from bench.stack import save_result  # noqa: E402
from callingest import mongo  # noqa: E402
from services.gateway.writer import is_busy  # noqa: E402
from tools import devstack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "store"
BACKENDS = ("sqlite", "postgresql")
STAGES = (("validator", "validated"), ("fetcher", "fetched"), ("normalizer", "normalized"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the store's processes -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its reaped children, plus those of its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo, first = [pid], True
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[11..14] = utime stime cutime cstime (after the state field at index 0)
        total += sum(int(x) for x in fields[11:13]) / tick
        if first:
            total += sum(int(x) for x in fields[13:15]) / tick
            first = False
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(x) for x in (task / "children").read_text().split())
            except OSError:
                pass
    return total


@dataclass
class Store:
    backend: str
    port: int
    pids: dict[str, int]

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}


def start_stores(ferretdb: Path) -> tuple[dict[str, Store], list[str]]:
    """The PostgreSQL cluster and both FerretDBs; returns them and the components to stop."""
    ports = devstack.Ports(postgresql=free_port())
    devstack.start_server(devstack.POSTGRESQL, ports)
    started = [devstack.POSTGRESQL]
    stores: dict[str, Store] = {}
    for backend in BACKENDS:
        port = free_port()
        name = f"ferretdb-{backend}"
        store_args = (["--postgresql-url", devstack.postgresql_url(ports)] if backend == "postgresql"
                      else ["--sqlite-dir", str(RUN_DIR / "ferretdb")])
        devstack.spawn(name, [str(ferretdb), "--listen-addr", f"127.0.0.1:{port}", *store_args])
        started.append(name)
        devstack.wait_for(lambda port=port: devstack.port_open(port), name, 30.0, name)
        pids = {"ferretdb": devstack.running_pid(name) or 0}
        if backend == "postgresql":
            pids["postgres"] = devstack.running_pid(devstack.POSTGRESQL) or 0
        stores[backend] = Store(backend, port, pids)
    return stores, started


# -- the workload ----------------------------------------------------------------------------


def call_document(cuid: str, network: str, external_id: str) -> dict[str, Any]:
    """A call as the gateway stores it (services/gateway/calls.py, ``_document``)."""
    now = datetime.now(UTC)
    return {
        "_id": cuid,
        "network_id": network,
        "external_call_unique_id": external_id,
        "start_time": now,
        "destination_phone_number": "+12165388265",
        "calling_phone_number": "+18779257383",
        "advertiser_campaign_id_from_network": "85",
        "call_direction": "inbound",
        "recording_url": f"https://recordings.example.invalid/{cuid}.wav",
        "duration_seconds": 60,
        "signals": {"sale": True, "qualified": "yes"},
        "custom_data": {"agent": "a-17", "queue": "billing", "score": 0.82},
        "content_hash": uuid.uuid4().hex * 2,
        "advertiser_id": "adv-1",
        "status": "received",
        "attempt": 1,
        "published": False,
        "created_at": now,
        "history": [{"stage": "gateway", "status": "received", "at": now}],
        "trace_context": {},
    }


@dataclass
class Tally:
    calls: int = 0
    busy_retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: dict[str, list[float]] = field(default_factory=dict)

    def timed(self, op: str, seconds: float) -> None:
        self.latency.setdefault(op, []).append(seconds)


async def _op(tally: Tally, name: str, operation: Any) -> Any:
    """One store operation, retried while the store answers "database is locked"."""
    started = time.perf_counter()
    delay = 0.01
    while True:
        try:
            result = await operation()
            break
        except OperationFailure as exc:
            if not is_busy(exc):
                raise
            tally.busy_retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.4)
    tally.timed(name, time.perf_counter() - started)
    return result


async def one_call(db: Any, tally: Tally, worker: int, n: int) -> None:
    network = f"net-{worker % 4}"
    external_id = f"w{worker}-{n}-{uuid.uuid4().hex[:8]}"
    cuid = uuid.uuid4().hex
    doc = call_document(cuid, network, external_id)
    await _op(tally, "gateway insert call", lambda: db.calls.insert_one(doc))
    duplicate = {**doc, "_id": uuid.uuid4().hex}
    try:
        await _op(tally, "gateway duplicate refused", lambda: db.calls.insert_one(duplicate))
        tally.errors["duplicate call accepted"] += 1
    except DuplicateKeyError:
        pass
    claim = {"_id": f"{cuid}:1", "cuid": cuid, "owner": f"w{worker}",
             "until": datetime.now(UTC)}
    await _op(tally, "claim insert", lambda: db.publish_claims.insert_one(claim))
    try:
        await _op(tally, "claim taken twice refused", lambda: db.publish_claims.insert_one(claim))
        tally.errors["claim taken twice"] += 1
    except DuplicateKeyError:
        pass
    await _op(tally, "receipt insert",
              lambda: db.published_calls.insert_one({"_id": cuid, "at": datetime.now(UTC)}))
    await _op(tally, "claims drop by cuid", lambda: db.publish_claims.delete_many({"cuid": cuid}))
    for stage, status in STAGES:
        await _op(tally, "stage read call", lambda: db.calls.find_one({"_id": cuid}))
        update = {"$set": {"status": status,
                           f"outputs.{stage}": {"attempt": 1, "topic": f"calls.{status}"}},
                  "$unset": {"retrying": ""},
                  "$push": {"history": {"stage": stage, "status": status,
                                        "at": datetime.now(UTC)}}}
        await _op(tally, "stage update", lambda update=update: db.calls.update_one(
            {"_id": cuid}, update))
    tally.calls += 1


async def measure(store: Store, concurrency: int, seconds: float) -> dict[str, Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        store.uri, maxPoolSize=concurrency + 4, serverSelectionTimeoutMS=10000, tz_aware=True)
    name = f"bench_store_{uuid.uuid4().hex[:8]}"
    db = client[name]
    tally = Tally()
    try:
        await mongo.ensure_indexes(db)
        await db.publish_claims.create_index("cuid", name="cuid")
        stop_at = 0.0

        async def worker(w: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                try:
                    await one_call(db, tally, w, n)
                except Exception as exc:  # an error is a result
                    tally.errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                n += 1

        # warm-up (connections, caches) outside the measurement
        stop_at = time.monotonic() + 2.0
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        tally = Tally()
        cpu_before, load_before = store.cpu(), os.getloadavg()
        started = time.monotonic()
        stop_at = started + seconds
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.monotonic() - started
        cpu_after = store.cpu()
    finally:
        await client.drop_database(name)
        await client.close()
    cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
    return {
        "backend": store.backend,
        "concurrency": concurrency,
        "seconds": elapsed,
        "calls": tally.calls,
        "calls_per_second": tally.calls / elapsed,
        "busy_retries": tally.busy_retries,
        "errors": dict(tally.errors),
        "latency_ms": {op: {"n": len(v), "p50": _pct(v, 50) * 1000, "p99": _pct(v, 99) * 1000}
                       for op, v in tally.latency.items()},
        "store_cpu_ms_per_call": {k: 1000 * v / max(1, tally.calls) for k, v in cpu.items()},
        "store_cpu_share_of_wall": sum(cpu.values()) / elapsed,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def markdown(results: list[dict[str, Any]]) -> str:
    rows = ["| round | concurrency | backend | calls/s | PG / SQLite | stage update p50 / p99 ms "
            "| call insert p50 / p99 ms | busy retries | store CPU ms per call | load (1 min) "
            "before / after |",
            "|---:|---:|---|---:|---:|---|---|---:|---|---|"]
    by_key = {(r["round"], r["concurrency"], r["backend"]): r for r in results}
    for r in results:
        base = by_key.get((r["round"], r["concurrency"], "sqlite"))
        ratio = (f"{r['calls_per_second'] / base['calls_per_second']:.2f}"
                 if base and r["backend"] != "sqlite" and base["calls_per_second"] else "")
        lat = r["latency_ms"]
        up, ins = lat.get("stage update", {}), lat.get("gateway insert call", {})
        cpu = " + ".join(f"{k} {v:.2f}" for k, v in r["store_cpu_ms_per_call"].items())
        rows.append(
            f"| {r['round']} | {r['concurrency']} | {r['backend']} | {r['calls_per_second']:.1f} | "
            f"{ratio} | {up.get('p50', 0):.1f} / {up.get('p99', 0):.1f} | "
            f"{ins.get('p50', 0):.1f} / {ins.get('p99', 0):.1f} | {r['busy_retries']} | {cpu} | "
            f"{r['load_average_before'][0]:.1f} / {r['load_average_after'][0]:.1f} |")
    errors = [(r["round"], r["concurrency"], r["backend"], r["errors"]) for r in results if r["errors"]]
    if errors:
        rows += ["", "errors: " + "; ".join(f"{b} c={c} round {n}: {e}" for n, c, b, e in errors)]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ferretdb", type=Path, default=devstack.TOOLS / "bin" / "ferretdb")
    parser.add_argument("--report", type=Path, help="print the table of a saved JSON result")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(args.report.read_text())["results"]))
        return 0
    if not 0 < args.seconds <= 300 or not 1 <= args.rounds <= 10:
        parser.error("--seconds 0..300, --rounds 1..10")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results: list[dict[str, Any]] = []
    started: list[str] = []
    try:
        stores, started = start_stores(args.ferretdb)
        for n in range(1, args.rounds + 1):
            for concurrency in args.concurrency:
                order = BACKENDS if n % 2 else tuple(reversed(BACKENDS))
                for backend in order:
                    result = asyncio.run(measure(stores[backend], concurrency, args.seconds))
                    result["round"] = n
                    results.append(result)
                    print(f"round {n} c={concurrency} {backend}: "
                          f"{result['calls_per_second']:.1f} calls/s", flush=True)
    finally:
        for component in reversed(started):
            devstack.stop(component)
        shutil.rmtree(RUN_DIR, ignore_errors=True)
    results.sort(key=lambda r: (r["round"], r["concurrency"], r["backend"] != "sqlite"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{stamp}.json"
    version = subprocess.run([str(devstack.postgresql_bin() / "postgres"), "--version"],
                             capture_output=True, text=True).stdout.strip()
    save_result(out, {"utc": stamp, "args": {k: str(v) for k, v in vars(args).items()},
                      "postgresql": version, "results": results}, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
