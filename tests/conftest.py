"""Session fixtures: the real servers, started once (or reused), and per-test isolation.

The servers (Kafka, FerretDB, versitygw, the SMTP sink) are started by
:mod:`tools.devstack` unless something already listens on their ports (a
stack from ``make up``); whatever this session started, it stops at the end.
Each test gets its own topic prefix and its own MongoDB database.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr

from callingest import mongo, s3
from callingest.secretbox import Keyring
from callingest.settings import Settings
from callingest.topics import Topics, ensure_topics
from tools import devstack

ROOT = Path(__file__).resolve().parent.parent
# This session's logs; other sessions (developers running tests side by side) use their own.
TEST_LOGS = devstack.RUN / "test-logs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"

# The tests run on the dev stack: its profile, for this process and every command it starts
# (a test of the production profile removes it from its subprocess's environment).
os.environ.setdefault("CALLINGEST_ENV", "dev")

# Secrets the tests hand to the platform; tests/system/zz_final checks none reached a log.
USED_SECRETS: set[str] = {
    "demo-network-token", "demo-advertiser-token", "disabled-network-token", "s3cr3t",
    devstack.S3_SECRET_KEY, devstack.DEMO_WEBHOOK_SECRET,
    devstack.dev_secret_keys().partition(":")[2],
}
#: The data keys of the dev stack (``SECRET_KEYS`` of every test's settings).
DEV_KEYRING = Keyring.parse(devstack.dev_secret_keys())


def used_secret(value: str) -> str:
    """Register ``value`` as a secret the logs of this run must never contain; returns it."""
    USED_SECRETS.add(value)
    return value


#: The backstop of pytest-timeout: a test still running this long after its timeout (at most
#: its timeout again) has its threads' stacks dumped and the run exits (see pytest_timeout_set_timer).
HARD_STOP_AFTER_TIMEOUT_SECONDS = 60.0
_hard_stop_stderr: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _hard_stop_stderr
    # The terminal's stderr (captured output would vanish with the process).
    _hard_stop_stderr = os.dup(sys.__stderr__.fileno() if sys.__stderr__ else 2)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """Arm a hard stop behind pytest-timeout's own timer (armed after this hook, as usual).

    pytest-timeout's signal method raises its failure in whatever the main thread runs when
    SIGALRM comes; in a busy event loop that is often a callback, whose exception asyncio logs
    and drops, or another task, which dies instead of the test: the test runs on, past the
    timeout, for good. So ``faulthandler`` (its own C thread, no GIL needed) dumps every
    thread's stack and exits the run if the test is still there ``min(timeout, 60 s)`` later.
    """
    if _hard_stop_stderr is not None and settings.timeout:
        faulthandler.dump_traceback_later(
            settings.timeout + min(settings.timeout, HARD_STOP_AFTER_TIMEOUT_SECONDS),
            exit=True, file=_hard_stop_stderr)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``last`` run after everything else (they inspect the whole run)."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.fixture(scope="session", autouse=True)
def session_log_file() -> Iterator[Path]:
    """Every in-process log record of the run, as JSON lines, in .run/test-logs/pytest.log."""
    import shutil

    from callingest.logging import JsonFormatter

    for old in TEST_LOGS.parent.glob("*"):
        if old != TEST_LOGS and old.stat().st_mtime < time.time() - 3600:
            shutil.rmtree(old, ignore_errors=True)
    TEST_LOGS.mkdir(parents=True, exist_ok=True)
    path = TEST_LOGS / "pytest.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter("pytest"))
    # INFO and up: a test that lowers the root level (caplog at DEBUG) must not let the
    # drivers' debug dumps of stored documents (pymongo.command) into the run's log.
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    yield path
    root.removeHandler(handler)
    handler.close()


free_port = devstack.free_port


@pytest.fixture(scope="session")
def ports() -> devstack.Ports:
    return devstack.Ports()


@pytest.fixture(scope="session")
def promql(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Prometheus server without targets, for its PromQL parser and evaluator
    (tests/system/ops/prometheus.py)."""
    from tests.system.ops.prometheus import PrometheusServer, require_prometheus

    require_prometheus()
    server = PrometheusServer(tmp_path_factory.mktemp("promql"), free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def servers(ports: devstack.Ports) -> Iterator[devstack.Ports]:
    """The four servers, running for the whole session."""
    started = devstack.servers_up(ports)
    yield ports
    for component in reversed(started):
        devstack.stop(component)


def make_settings(ports: devstack.Ports, **overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "callingest_env": "dev",
        "kafka_bootstrap_servers": f"127.0.0.1:{ports.kafka}",
        "topic_prefix": f"t{tag}.",
        "mongodb_uri": SecretStr(f"mongodb://127.0.0.1:{ports.mongodb}/"),
        "mongodb_database": f"test_{tag}",
        "s3_endpoint_url": f"http://127.0.0.1:{ports.s3}",
        "s3_access_key_id": SecretStr(devstack.S3_ACCESS_KEY),
        "s3_secret_access_key": SecretStr(devstack.S3_SECRET_KEY),
        "smtp_port": ports.smtp,
        "allow_loopback_recordings": True,
        "allow_loopback_webhooks": True,
        "retry_delays_seconds": [1.0, 2.0],
        "fetch_connect_timeout_seconds": 2.0,
        "fetch_read_timeout_seconds": 2.0,
        "shutdown_grace_seconds": 5.0,
        "republish_after_seconds": 1.0,
        "secret_keys": SecretStr(devstack.dev_secret_keys()),
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that make a service process use ``settings``."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, list):
            import json

            value = json.dumps(value)
        env[name.upper()] = str(value)
    return env


@pytest.fixture
def settings(servers: devstack.Ports) -> Settings:
    """Settings of this test: its own topic prefix and database on the session's servers."""
    return make_settings(servers)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Any]:
    """This test's MongoDB database, with indexes; dropped afterwards."""
    client = mongo.open_client(settings)
    database = mongo.database(client, settings)
    await mongo.ensure_indexes(database)
    yield database
    with contextlib.suppress(Exception):
        await client.drop_database(settings.mongodb_database)
    await client.close()


@pytest.fixture
async def topics(settings: Settings) -> AsyncIterator[Topics]:
    """This test's topics, created; deleted afterwards."""
    t = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    await ensure_topics(settings.kafka_bootstrap_servers, t.all(), 3, 1)
    yield t
    await delete_topics(settings, t.all())


async def delete_topics(settings: Settings, names: list[str], timeout: float = 60.0) -> None:
    """Delete those of ``names`` that exist: a clean-up, so bounded (a topic left behind
    harms no later test, a hang here would stop the run)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)

    async def delete() -> None:
        await admin.start()
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            await admin.delete_topics(doomed)

    try:
        await asyncio.wait_for(delete(), timeout)
    except Exception as exc:  # TimeoutError included
        logging.getLogger(__name__).warning("topics not deleted: %s %s", type(exc).__name__, exc)
    finally:
        await admin.close()


@pytest.fixture
async def s3_client(settings: Settings) -> AsyncIterator[Any]:
    """An S3 client on the session's store, with the bucket created."""
    async with s3.s3_client(settings) as client:
        await s3.ensure_bucket(client, settings.s3_bucket)
        yield client


@pytest.fixture(scope="session")
def mail_dir(servers: devstack.Ports) -> Path:
    """Where the SMTP sink stores messages (.run/mail of the checkout that started it)."""
    return devstack.smtp_sink_dir(servers.smtp)


# -- service processes -------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_process_ready(name: str, proc: subprocess.Popen[bytes], url: str,
                       log_text: Any, timeout: float) -> None:
    """Wait until ``url`` answers 200; RuntimeError with the log's tail if ``proc`` exits first
    or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{name} not ready after {timeout} s:\n{log_text()[-3000:]}")


@dataclass
class Services:
    """Starts ``callingest serve <name>`` processes for a test and stops them afterwards."""

    settings: Settings
    log_dir: Path
    running: dict[str, ServiceProcess] = field(default_factory=dict)
    initialized: bool = False
    """True once `callingest admin init` ran for these settings (the first start runs it;
    set it beforehand to start services on infrastructure the test prepares itself)."""

    def admin_init(self) -> None:
        """Create the topics, indexes and bucket of these settings (as the Job does)."""
        subprocess.run([str(ROOT / ".venv" / "bin" / "callingest"), "admin", "init"],
                       env={**os.environ, **settings_env(self.settings)}, cwd=ROOT, check=True,
                       capture_output=True, timeout=120)
        self.initialized = True

    def start(self, name: str, env: dict[str, str] | None = None, timeout: float = 60.0,
              port: int | None = None, wait: bool = True,
              instance: str | None = None) -> ServiceProcess:
        """Start ``name`` (after `admin init`, once) and wait until ready, unless ``wait=False``.

        ``instance``: the key of this process in :attr:`running` (default ``name``), to run
        several instances of one service.
        """
        if not self.initialized:
            self.admin_init()
        port = port or free_port()
        log = self.log_dir / f"{instance or name}.log"
        out = open(log, "ab")
        proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "callingest"), "serve", name],
            env={**os.environ, **settings_env(self.settings), "HTTP_PORT": str(port),
                 **(env or {})},
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            start_new_session=True,
        )
        out.close()
        service = ServiceProcess(name, port, proc, log)
        self.running[instance or name] = service
        if not wait:
            return service
        wait_process_ready(name, proc, f"{service.url}/readyz", service.log_text, timeout)
        return service

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        service = self.running.pop(name, None)
        if service is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.proc.pid, sig)
        try:
            return service.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(service.proc.pid, signal.SIGKILL)
            return service.proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


@pytest.fixture
def services(settings: Settings, request: pytest.FixtureRequest) -> Iterator[Services]:
    """Start service processes configured with this test's settings; all stopped afterwards.

    Their logs go to .run/test-logs/<test>/<service>.log (scanned for secrets at the end).
    """
    log_dir = TEST_LOGS / "".join(c if c.isalnum() or c in "-_." else "_"
                                  for c in request.node.nodeid)[-150:]
    log_dir.mkdir(parents=True, exist_ok=True)
    svc = Services(settings, log_dir)
    yield svc
    svc.stop_all()


async def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.2,
                     what: str = "condition") -> Any:
    """Poll the (async or sync) predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
