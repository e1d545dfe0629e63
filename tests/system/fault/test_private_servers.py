"""The fault tests' servers are their own: no port, and no store under FerretDB, shared with
the dev stack (which other sessions' tests use, and which a fault test must never stop)."""

from __future__ import annotations

from pathlib import Path

from tests.system.fault.privatestack import SERVERS, PrivateServers
from tools import devstack


def test_private_servers_share_no_server_with_the_dev_stack(faults: PrivateServers) -> None:
    shared = devstack.Ports()
    for component in (*SERVERS, "kafka_controller"):
        assert faults.ports.of(component) != shared.of(component), component
        assert devstack.port_open(faults.ports.of(component)), component
    if devstack.store_backend() == "postgresql":
        # FerretDB's PostgreSQL is the private run's cluster (it was the dev stack's on 55432).
        assert "postgresql" in SERVERS
        assert (faults.run_dir / "postgresql" / "data" / "PG_VERSION").exists()
        ferretdb = int((faults.run_dir / "pids" / "mongodb.pid").read_text())
        argv = Path(f"/proc/{ferretdb}/cmdline").read_text().split("\0")
        url = argv[argv.index("--postgresql-url") + 1]
        assert url.startswith(f"postgres://postgres@127.0.0.1:{faults.ports.postgresql}/"), url
