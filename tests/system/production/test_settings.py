"""Issue 11 point 1: settings outside the dev profile.

Every test here runs ``callingest`` as a subprocess with an environment from which every
setting, every ``<NAME>_FILE`` and ``CALLINGEST_ENV`` were removed, then adds back only
what the test gives: what a pod whose Secret or ConfigMap is missing would see.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from callingest import s3
from callingest.settings import REQUIRED_OUTSIDE_DEV, Settings, ip_networks
from callingest.settings_usage import reads
from tests.conftest import ROOT, Services, free_port, settings_env, used_secret
from tools import devstack

CALLINGEST = str(ROOT / ".venv" / "bin" / "callingest")
SERVICES = ("gateway", "validator", "fetcher", "normalizer", "notifier", "webhooks")
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def bare_env(**given: str) -> dict[str, str]:
    """os.environ without any setting, ``<NAME>_FILE`` or profile, plus ``given``; the run
    directory is one without a dev stack, so that an operator command does not take the settings
    of a running ``make up`` (``use_dev_stack_env``)."""
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in SETTING_NAMES and k.upper().removesuffix("_FILE") not in SETTING_NAMES}
    env.pop("MAKEFLAGS", None)
    env["CALLINGEST_RUN_DIR"] = str(Path(tempfile.gettempdir()) / "callingest-no-dev-stack")
    return {**env, **given}


def run(args: list[str], env: dict[str, str],
        timeout: float = 30.0) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``callingest args``; (the result, the CPU seconds it used).

    CPU time, not wall time: on a loaded machine (2 cores shared by many test runs) the
    wall time mostly measures the wait for a core. The child's own usage (``os.wait4``), not
    RUSAGE_CHILDREN, which also counts any other child this process reaps meanwhile. The
    outputs are a few lines, so the child never blocks on a full pipe before it is reaped.
    """
    proc = subprocess.Popen([CALLINGEST, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    assert proc.stdout is not None and proc.stderr is not None
    done = subprocess.CompletedProcess(proc.args, os.waitstatus_to_exitcode(status),
                                       proc.stdout.read(), proc.stderr.read())
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = done.returncode  # reaped here; keeps Popen from waiting again
    return done, usage.ru_utime + usage.ru_stime


class Listener:
    """A loopback TCP port that counts the connections made to it (and answers none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's environment without settings or profile (for in-process Settings())."""
    for key in list(os.environ):
        if key.upper() in SETTING_NAMES or key.upper().removesuffix("_FILE") in SETTING_NAMES:
            monkeypatch.delenv(key)


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def expected_missing(command: str, given: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
    """The required settings ``command`` reads, minus the ones given."""
    return {n.upper() for n in REQUIRED_OUTSIDE_DEV if n in reads(command)} - given


def missing_in(stderr: str) -> set[str]:
    """The variables of the lines ``callingest: bad setting NAME: required (or NAME_FILE)``."""
    prefix = "callingest: bad setting "
    return {line[len(prefix):].partition(":")[0] for line in stderr.splitlines()
            if line.startswith(prefix) and ": required (or " in line}


def test_each_service_reads_the_required_settings_it_needs_and_no_others() -> None:
    # What the code reads decides what is required: the gateway sends no mail, the validator
    # and the notifier never touch S3, the notifier is the only one that needs SMTP.
    everything = {n.upper() for n in REQUIRED_OUTSIDE_DEV}
    smtp, keys = {"SMTP_HOST", "SMTP_FROM"}, {"SECRET_KEYS"}  # keys: who opens sealed secrets
    s3_all = {"S3_BUCKET", "S3_REGION", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"}
    url = {"PUBLIC_BASE_URL"}  # the gateway's OpenAPI document
    assert expected_missing("gateway") == everything - smtp - keys
    assert expected_missing("validator") == everything - smtp - s3_all - keys - url
    assert expected_missing("fetcher") == everything - smtp - url
    assert expected_missing("normalizer") == everything - smtp - keys - url
    assert expected_missing("notifier") == everything - s3_all - keys - url
    assert expected_missing("webhooks") == everything - smtp - s3_all - url
    assert expected_missing("admin-init") == everything - smtp - keys - url
    # Rotation reads MongoDB and the keys only; a new key needs no setting at all.
    assert expected_missing("admin-rotate-secrets") == {"MONGODB_URI", "SECRET_KEYS"}
    assert reads("admin-generate-secret-key") == frozenset()


@pytest.mark.parametrize("service", SERVICES)
def test_service_without_settings_exits_2_naming_every_missing_variable(
    service: str, listener: Listener
) -> None:
    # Kafka and the S3 endpoint given (a port that counts connections), MongoDB not.
    given = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{listener.port}",
             "S3_ENDPOINT_URL": f"http://127.0.0.1:{listener.port}"}
    started = time.monotonic()
    done, cpu_seconds = run(["serve", service], bare_env(**given))
    wall_seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert missing_in(done.stderr) == expected_missing(service, set(given))
    assert missing_in(done.stderr), "some required setting must be missing here"
    time.sleep(0.5)
    assert listener.connections == 0, "the service connected before checking its settings"
    # No busy retrying and no waiting on any network timeout. Not a speed check: a start-up
    # (imports, and the settings each command reads, derived from the source) costs 0.6-1.1 s
    # of CPU on a 2-core machine, and a bound of 1.0 failed on a quiet one (2026-12-01).
    assert cpu_seconds < 3.0, (cpu_seconds, wall_seconds)
    assert wall_seconds < 30.0, (wall_seconds, cpu_seconds)
    # With nothing at all, every required setting it reads is named.
    done, _ = run(["serve", service], bare_env())
    assert done.returncode == 2
    assert missing_in(done.stderr) == expected_missing(service)
    assert "CALLINGEST_ENV=dev" in done.stderr  # says how to get the dev defaults


def test_admin_init_without_settings_exits_2(listener: Listener) -> None:
    done, _ = run(["admin", "init"], bare_env(S3_BUCKET="b"))
    assert done.returncode == 2
    assert missing_in(done.stderr) == expected_missing("admin-init", {"S3_BUCKET"})


@pytest.mark.usefixtures("clean_environ")
def test_dev_profile_has_the_dev_defaults() -> None:
    dev = Settings(callingest_env="dev")
    assert dev.missing() == []
    assert dev.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert dev.s3_endpoint_url == "http://127.0.0.1:9000"
    assert dev.smtp_port == 1025
    production = Settings()
    assert set(production.missing()) == {n.upper() for n in REQUIRED_OUTSIDE_DEV}
    assert production.mongodb_uri.get_secret_value() == ""
    assert production.s3_access_key_id.get_secret_value() == ""
    assert production.s3_endpoint_url is None
    assert production.smtp_port == 25


@pytest.mark.usefixtures("clean_environ")
def test_iam_role_replaces_the_static_keys() -> None:
    role = Settings(s3_use_iam_role=True)
    assert "S3_ACCESS_KEY_ID" not in role.missing() and "S3_SECRET_ACCESS_KEY" not in role.missing()
    done, _ = run(["serve", "fetcher"], bare_env(S3_USE_IAM_ROLE="true"))
    assert done.returncode == 2
    assert missing_in(done.stderr) == expected_missing("fetcher") - {"S3_ACCESS_KEY_ID",
                                                                     "S3_SECRET_ACCESS_KEY"}
    both, _ = run(["serve", "fetcher"], bare_env(S3_USE_IAM_ROLE="true", S3_ACCESS_KEY_ID="AKIA1",
                                                 S3_SECRET_ACCESS_KEY="x"))
    assert both.returncode == 2 and "S3_USE_IAM_ROLE" in both.stderr


@pytest.mark.usefixtures("clean_environ")
async def test_empty_s3_endpoint_means_the_providers_default() -> None:
    # No request is made: the client is built and its endpoint read.
    settings = Settings(s3_endpoint_url="", s3_region="eu-west-1", s3_bucket="b",
                        s3_access_key_id="AKIAEXAMPLE", s3_secret_access_key="example")
    assert settings.s3_endpoint_url is None
    async with s3.s3_client(settings) as client:
        assert client.meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    role = Settings(s3_endpoint_url="", s3_region="us-east-1", s3_bucket="b",
                    s3_use_iam_role=True)
    async with s3.s3_client(role) as client:
        assert client.meta.endpoint_url == "https://s3.amazonaws.com" or \
            client.meta.endpoint_url == "https://s3.us-east-1.amazonaws.com"


@dataclass
class S3Store:
    """An S3 server of this test whose keys are not the dev stack's (refused in production)."""

    endpoint: str
    access_key: str
    secret_key: str


@pytest.fixture
def production_s3(tmp_path: Path) -> Iterator[S3Store]:
    port = free_port()
    store = S3Store(f"http://127.0.0.1:{port}", "production-test",
                    used_secret(f"production-{uuid.uuid4().hex}"))
    (tmp_path / "s3").mkdir()
    with (tmp_path / "s3.log").open("ab") as log:
        proc = subprocess.Popen(
            [str(devstack.TOOLS / "bin" / "versitygw"), "--port", f"127.0.0.1:{port}", "--quiet",
             "posix", str(tmp_path / "s3")], stdout=log, stderr=subprocess.STDOUT,
            env={"ROOT_ACCESS_KEY": store.access_key, "ROOT_SECRET_KEY": store.secret_key})
    try:
        devstack.wait_for(lambda: devstack.port_open(port), "versitygw", 30)
        yield store
    finally:
        proc.terminate()
        proc.wait(10)


def production_env(settings: Settings, secrets_dir: Path, store: S3Store,
                   **extra: str) -> dict[str, str]:
    """The production profile with ``settings``'s values but ``store`` for S3 and loopback
    refused (dev-only values are refused there); secrets as ``<NAME>_FILE`` files."""
    env = {k: v for k, v in settings_env(settings).items() if k != "CALLINGEST_ENV"}
    env.update(S3_ENDPOINT_URL=store.endpoint, S3_ACCESS_KEY_ID=store.access_key,
               S3_SECRET_ACCESS_KEY=store.secret_key, ALLOW_LOOPBACK_RECORDINGS="false",
               ALLOW_LOOPBACK_WEBHOOKS="false")
    for name in ("MONGODB_URI", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"):
        path = secrets_dir / name.lower()
        path.write_text(env.pop(name) + "\n")  # a Secret volume's file may end in a newline
        env[f"{name}_FILE"] = str(path)
    return bare_env(**env, **extra)


def test_secrets_from_files_in_production(settings: Settings, tmp_path: Path,
                                          services: Services, production_s3: S3Store) -> None:
    env = production_env(settings, tmp_path, production_s3)
    assert "CALLINGEST_ENV" not in env and "MONGODB_URI" not in env
    init, _ = run(["admin", "init"], env, timeout=120)  # topics, indexes, bucket: production too
    assert init.returncode == 0, init.stderr
    shown, _ = run(["calls", "show", "no-such-call"], env)
    assert shown.returncode == 1 and "no call no-such-call" in shown.stderr  # reached MongoDB
    # A whole service in the production profile, its secrets from files: it gets ready.
    port = free_port()
    log_path = services.log_dir / "fetcher-production.log"
    log = log_path.open("ab")
    proc = subprocess.Popen([CALLINGEST, "serve", "fetcher"], env={**env, "HTTP_PORT": str(port)},
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    ready = r.status == 200
            except OSError:
                time.sleep(0.3)
        assert ready, log_path.read_text()[-3000:]
    finally:
        proc.terminate()
        proc.wait(20)


def test_bad_secret_files_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done, _ = run(["calls", "show", "x"], bare_env(MONGODB_URI_FILE=str(missing)))
    assert done.returncode == 2
    assert "MONGODB_URI_FILE" in done.stderr and str(missing) in done.stderr
    (tmp_path / "uri").write_text("mongodb://127.0.0.1:1/")
    done, _ = run(["calls", "show", "x"], bare_env(MONGODB_URI="mongodb://127.0.0.1:1/",
                                                   MONGODB_URI_FILE=str(tmp_path / "uri")))
    assert done.returncode == 2 and "both set" in done.stderr


@pytest.mark.usefixtures("clean_environ")
def test_trusted_proxies_are_addresses_or_networks() -> None:
    assert [str(n) for n in ip_networks(" 10.0.0.0/8, 192.0.2.1 ,fd00::/8,")] == [
        "10.0.0.0/8", "192.0.2.1/32", "fd00::/8"]
    assert ip_networks("") == ()
    done, _ = run(["serve", "gateway"], bare_env(TRUSTED_PROXIES="10.0.0.0/8, ingress"))
    assert done.returncode == 2
    assert "TRUSTED_PROXIES" in done.stderr and "'ingress' is not an IP address" in done.stderr
