"""A private set of servers (Kafka, FerretDB and its PostgreSQL, versitygw, the SMTP sink)
for fault tests.

Fault tests stop and kill servers. Other developers run tests on the same
machine against the shared servers on the default ports, so a fault test
never touches those: :class:`PrivateServers` runs its own copies on free
loopback ports with their own ``CALLINGEST_RUN_DIR``. :mod:`tools.devstack`
reads the run directory at import, so every start/stop/kill goes through a
short ``python -c`` subprocess with that environment; pid files, logs and
data live under the private run directory, and ``stop``/``kill9`` only ever
signal the process groups recorded there.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ROOT, free_port
from tools import devstack

SERVERS = devstack.servers()  # in start order: PostgreSQL, if FerretDB runs on it, before FerretDB
_PORT_VARS = {"kafka": "KAFKA_PORT", "kafka_controller": "KAFKA_CONTROLLER_PORT",
              "mongodb": "MONGODB_PORT", "s3": "S3_PORT", "smtp": "SMTP_PORT",
              "gateway": "GATEWAY_PORT", "postgresql": "POSTGRESQL_PORT"}


def private_env(run_dir: Path, **variables: str | int) -> dict[str, str]:
    """This process's environment for devstack (or a stack) acting under ``run_dir`` only,
    with ``variables`` (ports, ``STORE_BACKEND``) set; without ``MAKEFLAGS``, so a ``make`` the
    subprocess runs does not join the jobserver of the ``make test`` around this session."""
    env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
    env["CALLINGEST_RUN_DIR"] = str(run_dir)
    env.update({name: str(value) for name, value in variables.items()})
    return env


def run_python(env: dict[str, str], *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The project's Python with ``args``, in the repository, under ``env``; raises
    :class:`RuntimeError` with its output if it fails."""
    done = subprocess.run([str(ROOT / ".venv/bin/python"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)[:200]!r} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done


@dataclass
class PrivateServers:
    """Servers of one fault test module, on their own ports under ``run_dir``."""

    run_dir: Path
    ports: devstack.Ports = field(default_factory=lambda: devstack.Ports(
        kafka=free_port(), kafka_controller=free_port(), mongodb=free_port(), s3=free_port(),
        smtp=free_port(), gateway=free_port(), postgresql=free_port()))

    @property
    def env(self) -> dict[str, str]:
        """The environment under which devstack acts on these servers only."""
        return private_env(self.run_dir, **{var: getattr(self.ports, attr)
                                            for attr, var in _PORT_VARS.items()})

    @property
    def mail_dir(self) -> Path:
        return self.run_dir / "mail"

    def _devstack(self, code: str, timeout: float = 120.0) -> None:
        script = ("import sys\nfrom tools import devstack as d\n"
                  f"assert str(d.RUN) == {str(self.run_dir)!r}\np = d.Ports()\n{code}\n")
        run_python(self.env, "-c", script, timeout=timeout)

    def start(self, component: str) -> float:
        """Start ``component`` (a no-op if it listens) and wait until ready; returns seconds."""
        started = time.monotonic()
        self._devstack(f"d.start_server({component!r}, p)")
        return time.monotonic() - started

    def stop(self, component: str) -> None:
        """SIGTERM ``component`` (SIGKILL after 15 s); waits until it is gone."""
        self._devstack(f"d.stop({component!r})")
        self._wait_closed(component)

    def kill9(self, component: str) -> None:
        """SIGKILL ``component`` at once; waits until it is gone."""
        self._devstack(f"d.kill9({component!r})")
        self._wait_closed(component)

    def _wait_closed(self, component: str) -> None:
        port = self.ports.of(component)
        deadline = time.monotonic() + 20
        while devstack.port_open(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not devstack.port_open(port), f"{component} still listens on {port}"

    def up(self) -> None:
        for component in SERVERS:
            self.start(component)

    def down(self) -> None:
        """Stop every private server (whatever state a failed test left them in)."""
        for component in reversed(SERVERS):
            try:
                self.stop(component)
            except (RuntimeError, AssertionError, subprocess.TimeoutExpired):
                self._devstack(f"d.kill9({component!r})")


@dataclass
class PrivateStore:
    """The store alone (FerretDB on a PostgreSQL cluster of its own) on free ports under
    ``run_dir``: tests of the store's behaviour that must not touch the session's."""

    run_dir: Path
    postgresql_port: int = field(default_factory=free_port)
    mongodb_port: int = field(default_factory=free_port)

    @property
    def env(self) -> dict[str, str]:
        return private_env(self.run_dir, STORE_BACKEND="postgresql",
                           POSTGRESQL_PORT=self.postgresql_port, MONGODB_PORT=self.mongodb_port)

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongodb_port}/"

    def up(self) -> str:
        """Start PostgreSQL and FerretDB; the servers started, in order, comma-separated."""
        return run_python(self.env, "-c", "from tools import devstack as d\n"
                          "print(','.join(d.servers_up(d.Ports(), ['mongodb'])))").stdout.strip()

    def down(self) -> str:
        """``devstack down`` under this run directory; its output."""
        return run_python(self.env, "-m", "tools.devstack", "down").stdout

    def psql(self, sql: str) -> str:
        return devstack.psql(self.postgresql_port, sql)
