"""A store that stops answering fails operations in bounded time; it never holds them for good.

Runs a FerretDB of its own on a PostgreSQL cluster of its own (``STORE_BACKEND=postgresql``,
where the hang was found; free ports, own run directory: the session's store is never
touched) and freezes it with SIGSTOP:

* the PostgreSQL under FerretDB: FerretDB still accepts connections and answers PyMongo's
  heartbeat (``hello``), but no query. The heartbeat sees nothing wrong, so only the client's
  reply timeout (``MONGODB_SOCKET_TIMEOUT_SECONDS``) ends the wait;
* FerretDB itself: the heartbeat times out and PyMongo interrupts the operations in flight.

Each wait is guarded (:data:`GUARD_SECONDS`) so that a hang fails the test instead of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from pymongo.errors import NetworkTimeout, PyMongoError

from callingest import mongo
from callingest.settings import Settings
from tests.conftest import make_settings
from tests.system.fault.privatestack import PrivateStore
from tools import devstack

pytestmark = [pytest.mark.mongo]

GUARD_SECONDS = 60.0
"""Longer than any bounded failure here (3 s reply timeout; heartbeat 10 s + 5 s): still
waiting then means the operation hangs."""


class FrozenStore(PrivateStore):
    """FerretDB on PostgreSQL under ``run_dir``, whose processes a test can SIGSTOP and SIGCONT."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.stopped: set[int] = set()

    def down(self) -> str:
        self.resume()
        return super().down()

    def pids(self, component: str) -> list[int]:
        """The component's process and its children (PostgreSQL: the postmaster and backends)."""
        pid = int((self.run_dir / "pids" / f"{component}.pid").read_text())
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *map(int, children)]

    @contextlib.contextmanager
    def frozen(self, component: str) -> Iterator[None]:
        """``component`` SIGSTOPped for the duration of the block (SIGCONT after, always)."""
        pids = self.pids(component)
        self.stopped.update(pids)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            self.resume()

    def resume(self) -> None:
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped.clear()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrozenStore]:
    server = FrozenStore(tmp_path_factory.mktemp("frozen-store") / "run")
    try:
        server.up()
        yield server
    finally:
        server.down()


def store_settings(store: FrozenStore, **overrides: Any) -> Settings:
    return make_settings(devstack.Ports(), mongodb_uri=SecretStr(store.uri), **overrides)


async def fails_in_time(operation: Awaitable[Any]) -> PyMongoError:
    """The PyMongoError ``operation`` raises; fails the test if it is still waiting after
    :data:`GUARD_SECONDS` (the operation would hang) or succeeds."""
    try:
        await asyncio.wait_for(operation, GUARD_SECONDS)
    except PyMongoError as exc:
        return exc
    except TimeoutError:
        pytest.fail(f"the operation still waits for the store after {GUARD_SECONDS:.0f} s: it hangs")
    pytest.fail("the operation succeeded on a store that does not answer")


async def test_the_default_reply_timeout_is_finite_and_reaches_the_client() -> None:
    default = Settings.model_fields["mongodb_socket_timeout_seconds"].default
    assert math.isfinite(default) and 10 <= default <= 120  # production: long queries still fit
    client = mongo.open_client(make_settings(devstack.Ports(), mongodb_socket_timeout_seconds=7.5))
    try:
        assert client.options.pool_options.socket_timeout == 7.5
    finally:
        await client.close()


async def test_a_store_that_answers_the_heartbeat_but_no_query_fails_operations(
        store: FrozenStore) -> None:
    settings = store_settings(store, mongodb_socket_timeout_seconds=3.0)
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    try:
        await db.calls.insert_one({"_id": "before"})
        with store.frozen(devstack.POSTGRESQL):
            for operation in (db.calls.insert_one({"_id": "during"}),
                              db.calls.find_one({"_id": "before"}),
                              client.drop_database(settings.mongodb_database)):  # the db fixture's teardown
                assert isinstance(await fails_in_time(operation), NetworkTimeout)
        # Answering again (the drop went through once it could): the same client carries on.
        await asyncio.wait_for(db.calls.insert_one({"_id": "after"}), GUARD_SECONDS)
        assert await db.calls.find_one({"_id": "after"}) == {"_id": "after"}
    finally:
        with contextlib.suppress(PyMongoError):
            await client.drop_database(settings.mongodb_database)
        await asyncio.wait_for(client.close(), GUARD_SECONDS)


async def test_a_stopped_ferretdb_fails_operations_and_the_client_recovers(store: FrozenStore) -> None:
    settings = store_settings(store)  # the default reply timeout: the heartbeat ends these waits
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    try:
        await db.calls.insert_one({"_id": "before"})
        with store.frozen("mongodb"):
            await fails_in_time(db.calls.insert_one({"_id": "during"}))
            await fails_in_time(db.calls.find_one({"_id": "before"}))
        assert await asyncio.wait_for(db.calls.find_one({"_id": "before"}), GUARD_SECONDS)
    finally:
        with contextlib.suppress(PyMongoError):
            await client.drop_database(settings.mongodb_database)
        await asyncio.wait_for(client.close(), GUARD_SECONDS)
