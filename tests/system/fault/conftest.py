"""Fixtures of the fault tests: private servers (never the shared ones) and a recording."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.fault.harness import one_second_wav
from tests.system.fault.privatestack import SERVERS, PrivateServers
from tools import devstack


@pytest.fixture(scope="session")
def private_servers() -> Iterator[PrivateServers]:
    """Kafka, FerretDB, versitygw and the SMTP sink on free ports under a temporary run dir.

    Stopped (whatever state a test left them in) and deleted at the end of the session.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="callingest-fault-"))
    servers = PrivateServers(run_dir)
    try:
        servers.up()
        yield servers
    finally:
        servers.down()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def faults(private_servers: PrivateServers) -> Iterator[PrivateServers]:
    """The private servers, every one running at the start and again at the end of the test."""
    private_servers.up()
    yield private_servers
    for component in SERVERS:
        if not devstack.port_open(private_servers.ports.of(component)):
            private_servers.start(component)


@pytest.fixture(scope="session")
def wav(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return one_second_wav(tmp_path_factory.mktemp("wav"))
