"""Latency over time of `{_id: v}` lookups on FerretDB on PostgreSQL under a steady insert flow.

    .venv/bin/python bench/store/gin_pending.py MONGODB_URI POSTGRESQL_PORT SECONDS

Against a running FerretDB on PostgreSQL (``make up``, or ``tools.devstack`` with private
ports): four workers each insert a call-sized document and update it by ``_id`` (the
gateway's insert, then a stage's update) for SECONDS; per 5 s window it prints the pairs
done, p50 / p99 / max latency and any autovacuum seen running (``pg_stat_activity``, polled
each second), and first the options of the collection's `_id` GIN index (deploy/ferretdb
creates it, and keeps it, without GIN's pending list: ``{fastupdate=off}``). Its database is
dropped at the end. All traffic is loopback. See docs/benchmarks.md, "Store backend".
"""

import asyncio
import sys
import time
import uuid
from pathlib import Path

from pymongo import AsyncMongoClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools import devstack

URI, PGPORT, SECONDS = sys.argv[1], sys.argv[2], float(sys.argv[3])
WINDOW = 5


def psql(sql: str) -> str:
    return devstack.psql(int(PGPORT), sql, timeout=10)


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] * 1000


async def main() -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(URI, maxPoolSize=8)
    name = f"gin_pending_{uuid.uuid4().hex[:6]}"
    calls = client[name].calls
    await calls.insert_one({"_id": "first"})
    gin = f"SELECT indexname FROM pg_indexes WHERE schemaname = '{name}' AND indexname LIKE '%\\_\\_id\\_gin'"
    for _ in range(60):  # deploy/ferretdb's upkeep adds it within a second or so
        if index := psql(gin):
            break
        await asyncio.sleep(0.5)
    print(index, psql(f"SELECT reloptions FROM pg_class WHERE relname = '{index}'") or "{}")
    latencies: list[tuple[float, float]] = []
    vacuums: dict[int, str] = {}
    start = time.monotonic()
    end = start + SECONDS

    async def worker() -> None:
        while time.monotonic() < end:
            cuid = uuid.uuid4().hex
            began = time.monotonic()
            await calls.insert_one({"_id": cuid, "network_id": "n1", "status": "received",
                                    "pad": "p" * 800, "history": [{"stage": "gateway"}]})
            await calls.update_one({"_id": cuid}, {"$set": {"status": "validated"}})
            latencies.append((began - start, time.monotonic() - began))

    async def monitor() -> None:
        while time.monotonic() < end:
            running = await asyncio.to_thread(
                psql, "SELECT string_agg(left(query, 60), ' | ') FROM pg_stat_activity "
                      "WHERE backend_type = 'autovacuum worker'")
            if running:
                vacuums.setdefault(int((time.monotonic() - start) // WINDOW), running)
            await asyncio.sleep(1)

    await asyncio.gather(*(worker() for _ in range(4)), monitor())
    windows: dict[int, list[float]] = {}
    for at, latency in latencies:
        windows.setdefault(int(at // WINDOW), []).append(latency)
    for w, values in sorted(windows.items()):
        values.sort()
        print(f"{w * WINDOW:4d}s n={len(values):5d} p50={quantile(values, 0.5):6.1f} "
              f"p99={quantile(values, 0.99):7.1f} max={values[-1] * 1000:7.1f} {vacuums.get(w, '')[:90]}")
    values = sorted(latency for _, latency in latencies)
    print(f"all: {len(values)} pairs, {len(values) / SECONDS:.0f}/s, p50 {quantile(values, 0.5):.1f} ms, "
          f"p99 {quantile(values, 0.99):.1f} ms, max {values[-1] * 1000:.1f} ms")
    await client.drop_database(name)
    await client.close()


asyncio.run(main())
