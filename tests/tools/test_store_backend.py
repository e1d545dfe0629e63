"""FerretDB on PostgreSQL, the default store (``STORE_BACKEND=sqlite`` is the option): devstack
runs a PostgreSQL cluster of its own under FerretDB, the platform's store operations work on
it, and ``devstack down`` stops both.

Runs private servers (own run directory and ports, as tests/fault/privatestack.py does) so
the session's shared store is never touched.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import DuplicateKeyError

from callingest import mongo
from callingest.replay import restart_failed_call
from services.gateway.claims import Claims
from services.gateway.domain import Principal
from services.gateway.listing import CallQuery, list_calls
from tests.conftest import ROOT
from tests.system.fault.privatestack import PrivateStore
from tests.system.lifecycle.test_lifecycle import _processes_mentioning
from tools import devstack

pytestmark = [pytest.mark.mongo]

PYTHON = str(ROOT / ".venv" / "bin" / "python")


def test_devstack_runs_ferretdb_on_its_own_postgresql(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = PrivateStore(run_dir)
    try:
        assert store.up() == "postgresql,mongodb"
        assert (run_dir / "postgresql" / "data" / "PG_VERSION").exists()

        database = f"store_{os.getpid()}"
        asyncio.run(_app_operations(store.uri, database))

        # What FerretDB stored is in the cluster: the database as a schema, the calls in a table.
        assert store.psql(f"SELECT count(*) FROM information_schema.tables "
                              f"WHERE table_schema = '{database}' AND table_name LIKE 'calls_%'") == "1"
        # deploy/ferretdb's upkeep gives each collection a GIN index on `_jsonb -> '_id'`, the
        # only kind of index FerretDB's `{_id: v}` filter (`_jsonb -> $1 @> $2`) can use, without
        # GIN's pending list (which every lookup would read whole until a vacuum merges it).
        gin = (f"SELECT count(*) FROM pg_indexes WHERE schemaname = '{database}' "
               "AND indexname LIKE 'calls\\_%\\_\\_id\\_gin' AND indexdef LIKE '%USING gin%' "
               "AND indexdef LIKE '%WITH (fastupdate=off)%'")
        deadline = time.monotonic() + 30
        while store.psql(gin) != "1" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert store.psql(gin) == "1"
        status = subprocess.run([PYTHON, "-m", "tools.devstack", "status"], cwd=ROOT, env=store.env,
                                capture_output=True, text=True, timeout=60)
        assert ("postgresql  pid=" in status.stdout
                and f"port={store.postgresql_port} listening" in status.stdout)
    finally:
        down = store.down()
    assert "stopped postgresql" in down and "stopped mongodb" in down
    for port in (store.postgresql_port, store.mongodb_port):
        assert not devstack.port_open(port)
    assert _processes_mentioning(str(run_dir)) == []
    # a clean (fast) shutdown, not a kill: the next start needs no crash recovery
    assert "database system is shut down" in (run_dir / "logs" / "postgresql.log").read_text()


def test_many_concurrent_updates_do_not_deadlock_ferretdb_on_postgresql(tmp_path: Path) -> None:
    """FerretDB 1.24 runs an update as a query that keeps one pooled PostgreSQL connection while
    the write takes a second: with its default pool of 50, as many concurrent updates (the
    fetcher alone has up to 256 calls in flight) each held one and waited for another, and
    FerretDB answered nothing more, not even a ping. devstack sizes the pool above what the
    stack's clients can issue at once (``devstack.PG_POOL_MAX_CONNS``)."""
    store = PrivateStore(tmp_path / "run")
    try:
        store.up()
        rounds = asyncio.run(_concurrent_updates(store.uri, 300))
        assert rounds == [300, 300, 300]
    finally:
        store.down()


async def _concurrent_updates(uri: str, count: int) -> list[int]:
    """``count`` updates of distinct documents at once, each on a connection of its own, three
    times; the number each round modified. A stuck store fails the test within a minute."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri, maxPoolSize=count, serverSelectionTimeoutMS=20000, socketTimeoutMS=60000)
    docs = client[f"updates_{os.getpid()}"].docs
    try:
        await docs.insert_many([{"_id": i, "n": 0} for i in range(count)])
        modified = []
        for _ in range(3):
            results = await asyncio.wait_for(asyncio.gather(
                *(docs.update_one({"_id": i}, {"$inc": {"n": 1}}) for i in range(count))), 60)
            modified.append(sum(r.modified_count for r in results))
        assert await asyncio.wait_for(client.admin.command("ping"), 10) == {"ok": 1.0}
        return modified
    finally:
        await client.close()


async def _app_operations(uri: str, name: str) -> None:
    """The platform's store operations whose correctness rests on the store: its indexes,
    unique refusals (calls, publish claims, restart claims) and the keyset-paged listing."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True,
                                                                serverSelectionTimeoutMS=20000)
    db = client[name]
    try:
        await mongo.ensure_indexes(db)
        assert await mongo.missing_indexes(db) == []

        start = datetime(2026, 1, 1, tzinfo=UTC)
        calls = [{"_id": f"c{i:03d}", "network_id": "n1", "external_call_unique_id": f"e{i}",
                  "status": "failed", "attempt": 1, "created_at": start + timedelta(seconds=i // 2),
                  "failure": {"stage": "fetcher", "class": "timeout"},
                  "recording_url": "http://127.0.0.1:9/r.wav", "call_direction": "inbound",
                  "history": [{"stage": "gateway", "status": "received", "at": start}]}
                 for i in range(25)]
        await db.calls.insert_many(calls)
        with pytest.raises(DuplicateKeyError):  # network + external id is unique
            await db.calls.insert_one({**calls[0], "_id": "other"})

        # Of concurrent publishers of one call, exactly one takes the claim.
        old = {**calls[0], "created_at": datetime.now(UTC) - timedelta(minutes=5)}
        taken = await asyncio.gather(*(Claims(db, f"w{i}").take(old) for i in range(8)))
        assert len([t for t in taken if t is not None]) == 1

        # Of concurrent restarts of one failed call, exactly one wins (call_restarts).
        sent: list[str] = []

        async def send(stage: str, event: str, record: dict[str, Any]) -> None:
            sent.append(stage)

        restarts = await asyncio.gather(*(restart_failed_call(db.calls, calls[1], send, source="replay")
                                          for _ in range(6)))
        assert len([r for r in restarts if r is not None]) == 1 and sent == ["fetcher"]
        stored = await db.calls.find_one({"_id": calls[1]["_id"]})
        assert stored is not None and stored["attempt"] == 2 and stored["status"] == "validated"

        # Newest first, every call once across pages (ties on created_at broken by _id).
        principal, seen, cursor = Principal("n1", None), [], None
        while True:
            params = {"limit": "7", **({"cursor": cursor} if cursor else {})}
            page, cursor = await list_calls(db.calls, principal, CallQuery.parse(_Params(params)))
            seen += [c["_id"] for c in page]
            if cursor is None:
                break
        assert seen == sorted((c["_id"] for c in calls), key=lambda i: (int(i[1:]) // 2, i),
                              reverse=True)
    finally:
        await client.close()  # the database stays for the test to find it in PostgreSQL


class _Params(dict[str, str]):
    """The request-query shape CallQuery.parse reads (a multidict's getall)."""

    def getall(self, name: str) -> list[str]:
        return [self[name]]


def test_store_backend_setting_is_checked() -> None:
    env = {**os.environ, "STORE_BACKEND": "mysql"}
    done = subprocess.run([PYTHON, "-c", "from tools import devstack as d; d.servers()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "STORE_BACKEND='mysql': expected one of sqlite, postgresql" in done.stderr


@pytest.mark.parametrize(("setting", "servers"), [
    (None, ("kafka", "postgresql", "mongodb", "s3", "smtp")),
    ("postgresql", ("kafka", "postgresql", "mongodb", "s3", "smtp")),
    ("sqlite", ("kafka", "mongodb", "s3", "smtp")),
])
def test_stack_runs_ferretdb_on_postgresql_unless_told_sqlite(setting: str | None,
                                                             servers: tuple[str, ...]) -> None:
    """PostgreSQL is the default store (its writers queue for row locks instead of polling
    SQLite's one write lock: docs/benchmarks.md, "Store backend"); SQLite stays an option."""
    env = {k: v for k, v in os.environ.items() if k != "STORE_BACKEND"}
    if setting is not None:
        env["STORE_BACKEND"] = setting
    done = subprocess.run([PYTHON, "-c", "from tools import devstack as d; print(','.join(d.servers()))"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert tuple(done.stdout.strip().split(",")) == servers
