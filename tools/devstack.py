"""Start, check and stop the dev/test stack without Docker.

Components: Apache Kafka (KRaft, from the Maven jars under .tools/kafka),
FerretDB (.tools/bin/ferretdb) on a PostgreSQL cluster of its own (Debian's server, data in
.run/postgresql; ``STORE_BACKEND=sqlite``: on SQLite files instead), versitygw as the S3 store
(.tools/bin/versitygw, posix backend), an aiosmtpd sink, the demo server
(tools/demo_server.py: sample recordings and a webhook receiver), the six
services, and Prometheus scraping them (.tools/bin/prometheus; tools/prometheus.py).
Every process runs in its own session (process group) with its pid
in ``.run/pids/<component>.pid`` and its output in ``.run/logs/<component>.log``.
The pipeline's consumers (:data:`BATCH`) run at a lower CPU priority (``BATCH_NICE``,
default 10) than the gateway and the servers it waits on, so that a busy pipeline does not
slow submissions down (docs/benchmarks.md, "Gateway under a saturated pipeline").

Usage: ``python -m tools.devstack up|down|status|servers-up|servers-down``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from callingest import stages

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("CALLINGEST_RUN_DIR", ROOT / ".run"))
TOOLS = ROOT / ".tools"
VENV_BIN = ROOT / ".venv" / "bin"

S3_ACCESS_KEY = "callingest"
S3_SECRET_KEY = "callingest-dev-secret"  # dev-only credential of the local store
# The demo network's webhook secret (deploy/examples/demo-config.yaml; the demo receiver
# on :8000 verifies deliveries with it).
DEMO_WEBHOOK_SECRET = "whsec_PIvvg3U/lvFqLDLyXUiQwgSPvwcyPr2p"

SERVERS = ("kafka", "mongodb", "s3", "smtp")
POSTGRESQL = "postgresql"  # FerretDB's store unless STORE_BACKEND=sqlite (started before mongodb)
STORE_BACKENDS = ("sqlite", "postgresql")
DEFAULT_STORE_BACKEND = "postgresql"
SERVICES = stages.SERVICES  # the gateway, every stage of the stage graph, webhooks
DEMO = "demo"  # tools/demo_server.py: sample recordings and a webhook receiver (make up only)
PROMETHEUS = "prometheus"  # scrapes every service (tools/prometheus.py; make up only)
# Work nobody waits for on the line: every service but the gateway (the stages and webhooks).
# The gateway, and the servers a submission waits on (Kafka, FerretDB), keep the normal priority.
BATCH = tuple(name for name in SERVICES if name != "gateway")
BATCH_NICE_DEFAULT = 10


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass
class Ports:
    kafka: int = field(default_factory=lambda: _port("KAFKA_PORT", 9092))
    kafka_controller: int = field(default_factory=lambda: _port("KAFKA_CONTROLLER_PORT", 9093))
    mongodb: int = field(default_factory=lambda: _port("MONGODB_PORT", 27017))
    s3: int = field(default_factory=lambda: _port("S3_PORT", 9000))
    smtp: int = field(default_factory=lambda: _port("SMTP_PORT", 1025))
    gateway: int = field(default_factory=lambda: _port("GATEWAY_PORT", 8080))
    demo: int = field(default_factory=lambda: _port("DEMO_RECORDINGS_PORT", 8000))
    prometheus: int = field(default_factory=lambda: _port("PROMETHEUS_PORT", 9090))
    postgresql: int = field(default_factory=lambda: _port("POSTGRESQL_PORT", 55432))

    def of(self, component: str) -> int:
        if component in SERVICES and not hasattr(self, component):  # the gateway has a field
            return _port(f"{component.upper()}_PORT", stages.SERVICE_PORTS[component])
        return int(getattr(self, component))


def store_backend() -> str:
    """FerretDB's store in this stack: ``STORE_BACKEND`` (postgresql, the default, or sqlite).

    PostgreSQL because its writers queue for row locks: on SQLite, one writer at a time, a
    submission's insert waited out SQLite's busy-handler sleeps behind the pipeline's updates
    (docs/benchmarks.md, "Store backend"). FerretDB's pool there: :data:`PG_POOL_MAX_CONNS`."""
    backend = os.environ.get("STORE_BACKEND", "").strip().lower() or DEFAULT_STORE_BACKEND
    if backend not in STORE_BACKENDS:
        raise SystemExit(f"STORE_BACKEND={backend!r}: expected one of {', '.join(STORE_BACKENDS)}")
    return backend


def servers() -> tuple[str, ...]:
    """The servers of this stack, in start order (PostgreSQL before the FerretDB on it)."""
    if store_backend() == "postgresql":
        return ("kafka", POSTGRESQL, "mongodb", "s3", "smtp")
    return SERVERS


def dev_secret_keys() -> str:
    """``SECRET_KEYS`` of the dev stack, the tests and the benchmarks (generated into .run/ once)."""
    from callingest.secretbox import dev_keys

    return dev_keys(RUN)


def service_env(ports: Ports) -> dict[str, str]:
    """Environment for the services so they reach the dev stack's servers (dev profile)."""
    return {
        "CALLINGEST_ENV": "dev",
        "SECRET_KEYS": dev_secret_keys(),
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{ports.kafka}",
        "MONGODB_URI": f"mongodb://127.0.0.1:{ports.mongodb}/",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{ports.s3}",
        "S3_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "S3_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(ports.smtp),
        "ALLOW_LOOPBACK_RECORDINGS": "true",
        "ALLOW_LOOPBACK_WEBHOOKS": "true",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{ports.gateway}",
    }


# -- processes ---------------------------------------------------------------------------------


def pid_file(component: str) -> Path:
    return RUN / "pids" / f"{component}.pid"


def log_file(component: str) -> Path:
    return RUN / "logs" / f"{component}.log"


def running_pid(component: str) -> int | None:
    path = pid_file(component)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return None
    except PermissionError:
        return pid
    return pid


def batch_nice() -> int:
    """The niceness of the :data:`BATCH` services (``BATCH_NICE``; 0 = normal priority)."""
    value = int(os.environ.get("BATCH_NICE", BATCH_NICE_DEFAULT))
    if not 0 <= value <= 19:
        raise SystemExit(f"BATCH_NICE={value}: must be 0..19")
    return value


def spawn(component: str, argv: list[str], env: dict[str, str] | None = None,
          cwd: Path = ROOT, nice: int = 0) -> int:
    """Start ``argv`` detached in its own session; returns its pid.

    ``nice`` > 0 lowers its CPU priority and that of every process it starts (pool workers):
    the process's niceness, and its session's autogroup's, where the kernel groups sessions
    (``kernel.sched_autogroup_enabled``: the CPU is then shared between sessions first, and a
    process's own niceness only counts within its session)."""
    (RUN / "pids").mkdir(parents=True, exist_ok=True)
    (RUN / "logs").mkdir(parents=True, exist_ok=True)
    prefix = ["nice", "-n", str(nice)] if nice else []
    with open(log_file(component), "ab") as log:
        proc = subprocess.Popen(
            [*prefix, *argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env={**os.environ, **(env or {})}, start_new_session=True,
        )
    if nice:
        set_autogroup_nice(proc.pid, nice)
    pid_file(component).write_text(str(proc.pid))
    return proc.pid


def set_autogroup_nice(pid: int, nice: int) -> None:
    """Set the niceness of ``pid``'s autogroup (its session), where the kernel has them."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
    except FileNotFoundError:  # no autogroups (kernel without them): the process's niceness rules
        pass


def stop(component: str, timeout: float = 15.0) -> bool:
    """SIGTERM the component's process group (PostgreSQL: SIGINT to the postmaster, its fast
    shutdown), SIGKILL after ``timeout``; True if it was running."""
    pid = running_pid(component)
    if pid is None:
        return False
    if component == POSTGRESQL:
        os.kill(pid, signal.SIGINT)
    else:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        _signal_group(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)
    pid_file(component).unlink(missing_ok=True)
    return True


def kill9(component: str) -> None:
    """SIGKILL the component at once (fault tests)."""
    pid = running_pid(component)
    if pid is not None:
        _signal_group(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)
        pid_file(component).unlink(missing_ok=True)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        waited, _status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


# Ports :func:`free_port` hands out: below Linux's default ephemeral range (32768-60999), so
# that no outgoing connection's local port takes one between the pick and the bind, and
# above the dev stack's defaults (27017 the highest there).
FREE_PORTS = range(28000, 32768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on now, and not handed out before by this process.

    Not the kernel's ``bind(0)``: that picks from the ephemeral range, where a port can go to
    an outgoing connection before the server binds it, and can repeat within one test (the
    likely cause of a CI failure of 2026-12-01: a private stack's S3 client got closed
    connections, as from a port another of its servers held)."""
    candidates = [p for p in FREE_PORTS if p not in _handed_out]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {FREE_PORTS.start}-{FREE_PORTS.stop - 1}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def wait_for(check: object, what: str, timeout: float, component: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        if component is not None and running_pid(component) is None:
            raise RuntimeError(f"{component} exited during start-up; see {log_file(component)}:\n"
                               + _tail(log_file(component)))
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s; see logs under {RUN / 'logs'}"
                       + (f":\n{_tail(log_file(component))}" if component else ""))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def smtp_sink_dir(port: int) -> Path:
    """Where the SMTP sink listening on ``port`` stores messages (it may belong to another checkout)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "tools.smtp_sink" in argv and "--port" in argv and "--dir" in argv:
            if argv[argv.index("--port") + 1] == str(port):
                directory = Path(argv[argv.index("--dir") + 1])
                return directory if directory.is_absolute() else Path(
                    os.readlink(proc / "cwd")) / directory
    return RUN / "mail"


# -- servers -----------------------------------------------------------------------------------


def _require(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make setup` first")
    return path


def start_kafka(ports: Ports) -> None:
    libs = _require(TOOLS / "kafka" / "libs")
    java = shutil.which("java") or "java"
    data = RUN / "kafka" / "data"
    data.mkdir(parents=True, exist_ok=True)
    conf = RUN / "kafka" / "server.properties"
    template = (ROOT / "deploy" / "kafka" / "server.properties.in").read_text()
    conf.write_text(template.replace("@KAFKA_PORT@", str(ports.kafka))
                    .replace("@CONTROLLER_PORT@", str(ports.kafka_controller))
                    .replace("@DATA_DIR@", str(data)))
    jvm = [java, "-Xmx512m", "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
           "-XX:TieredStopAtLevel=1", "-Xshare:auto", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={ROOT / 'deploy' / 'kafka' / 'log4j2.yaml'}",
           "-cp", f"{libs}/*"]
    if not (data / "meta.properties").exists():
        cluster_id = subprocess.run([*jvm, "kafka.tools.StorageTool", "random-uuid"],
                                    check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run([*jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                        "-c", str(conf), "--standalone", "--ignore-formatted"],
                       check=True, capture_output=True, text=True)
    spawn("kafka", [*jvm, "kafka.Kafka", str(conf)])


def start_mongodb(ports: Ports) -> None:
    binary = _require(TOOLS / "bin" / "ferretdb")
    store = (["--postgresql-url", postgresql_url(ports)] if store_backend() == "postgresql"
             else ["--sqlite-dir", str(RUN / "ferretdb")])
    spawn("mongodb", [str(binary), "--listen-addr", f"127.0.0.1:{ports.mongodb}", *store])


# PostgreSQL refuses to run as root, and a data directory under a root-only path (pytest's
# tmp_path) is out of reach of another user. As root, initdb and postgres therefore run in a
# user namespace that maps root to the ``postgres`` account (the Debian package creates it):
# inside they are not root, outside their files stay root's. Otherwise they run as the caller.
PG_USER = "postgres"
PG_DATABASE = "postgres"  # FerretDB keeps each MongoDB database as a schema of it
# FerretDB's pool of PostgreSQL connections. FerretDB 1.24 runs an update (update,
# findAndModify) as a query whose result keeps one pooled connection open while the write takes
# a second: as many concurrent updates as the pool holds (its default is 50) each hold one and
# wait for another, for good (tests/tools/test_store_backend.py). The pool is therefore sized
# above the concurrent operations the stack's clients can issue; idle connections close after
# a minute (pgx's default is 30), so a flood's backends do not stay.
PG_POOL_MAX_CONNS = 500
# The dev cluster's settings beyond the defaults: loopback TCP only, no Unix socket (no
# /var/run/postgresql needed), room for FerretDB's pool and a few other sessions (deploy/ferretdb's
# index upkeep, psql).
PG_SETTINGS = {"listen_addresses": "127.0.0.1", "unix_socket_directories": "",
               "max_connections": str(PG_POOL_MAX_CONNS + 20), "shared_buffers": "128MB",
               # FerretDB filters {_id: v} as `_jsonb -> $1 @> $2`: planned with the key as a
               # constant, that matches the GIN index deploy/ferretdb adds on `_jsonb -> '_id'`.
               "plan_cache_mode": "force_custom_plan",
               # on (the default): a commit is on disk when FerretDB answers. off lets a crash
               # of PostgreSQL lose the last ~0.6 s of answered writes (measurements only).
               "synchronous_commit": os.environ.get("POSTGRESQL_SYNCHRONOUS_COMMIT", "on")}


def postgresql_bin() -> Path:
    """The bin directory of the newest PostgreSQL server installed from Debian's packages."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        raise SystemExit("PostgreSQL is not installed: run `make setup` (or `make postgresql`)")
    return found[-1].parent


def psql(port: int, sql: str, timeout: float = 30.0) -> str:
    """``sql`` run by psql on the cluster at ``port`` (tests, benchmarks); its unaligned output.
    Raises :class:`subprocess.CalledProcessError` (with psql's stderr) if psql fails."""
    done = subprocess.run([str(postgresql_bin() / "psql"), "-h", "127.0.0.1", "-p", str(port),
                           "-U", PG_USER, "-d", PG_DATABASE, "-XAtc", sql],
                          capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout.strip()


def postgresql_url(ports: Ports) -> str:
    """FerretDB's connection string for this stack's cluster, with its pool's size."""
    return (f"postgres://{PG_USER}@127.0.0.1:{ports.postgresql}/{PG_DATABASE}"
            f"?pool_max_conns={PG_POOL_MAX_CONNS}&pool_max_conn_idle_time=1m")


def _as_pg_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["unshare", "--user", f"--map-user={PG_USER}", f"--map-group={PG_USER}", *argv]


def start_postgresql(ports: Ports) -> None:
    """A cluster of this stack's own in ``.run/postgresql/data`` (initdb on first start)."""
    bindir = postgresql_bin()
    data = RUN / "postgresql" / "data"
    if not (data / "PG_VERSION").exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(data, ignore_errors=True)
        # FerretDB accepts only UTF8 and the C/POSIX/en_US.UTF8 collations; trust on loopback
        # only (the dev stack's other servers take their dev credentials the same way).
        subprocess.run(_as_pg_user([str(bindir / "initdb"), "-D", str(data), "-E", "UTF8",
                                    "--locale=C", "-U", PG_USER, "--auth=trust", "--no-sync"]),
                       check=True, capture_output=True, text=True)
    settings = [arg for name, value in PG_SETTINGS.items() for arg in ("-c", f"{name}={value}")]
    spawn(POSTGRESQL, _as_pg_user([str(bindir / "postgres"), "-D", str(data),
                                   "-p", str(ports.postgresql), *settings]))


def postgresql_ready(ports: Ports) -> bool:
    """True once the cluster accepts connections (not while it starts up or recovers)."""
    probe = subprocess.run([str(postgresql_bin() / "pg_isready"), "-q", "-h", "127.0.0.1",
                            "-p", str(ports.postgresql), "-U", PG_USER, "-d", PG_DATABASE],
                           capture_output=True, timeout=10)
    return probe.returncode == 0


def start_s3(ports: Ports) -> None:
    binary = _require(TOOLS / "bin" / "versitygw")
    root = RUN / "s3"
    root.mkdir(parents=True, exist_ok=True)
    # --keep-alive: versitygw closes every connection after one request without it, so each
    # S3 call of the services paid a TCP connect and accept (docs/benchmarks.md, issue 15)
    # --data-integrity-etag: ETags from the CRC64 it computes of every object anyway,
    # instead of a second pass for MD5 (4.5 ms of CPU per 3.84 MB here)
    spawn("s3", [str(binary), "--port", f"127.0.0.1:{ports.s3}", "--quiet", "--keep-alive",
                 "posix", "--data-integrity-etag", str(root)],
          env={"ROOT_ACCESS_KEY": S3_ACCESS_KEY, "ROOT_SECRET_KEY": S3_SECRET_KEY})


def start_smtp(ports: Ports) -> None:
    spawn("smtp", [str(VENV_BIN / "python"), "-m", "tools.smtp_sink", "--port", str(ports.smtp),
                   "--dir", str(RUN / "mail")])


STARTERS = {"kafka": start_kafka, "mongodb": start_mongodb, "s3": start_s3, "smtp": start_smtp,
            POSTGRESQL: start_postgresql}


def demo_url(ports: Ports) -> str:
    return f"http://127.0.0.1:{ports.demo}"


def demo_config(ports: Ports) -> Path:
    """deploy/examples/demo-config.yaml with the demo server's address (its webhook receiver)
    moved to ``DEMO_RECORDINGS_PORT``."""
    source = ROOT / "deploy" / "examples" / "demo-config.yaml"
    if ports.demo == 8000:
        return source
    RUN.mkdir(parents=True, exist_ok=True)
    moved = RUN / "demo-config.yaml"
    moved.write_text(source.read_text().replace("http://127.0.0.1:8000/", f"{demo_url(ports)}/"))
    return moved


def start_demo(ports: Ports) -> None:
    """The demo server (``/call.wav``, ``/call.mp3``, ``POST /webhooks`` into .run/webhooks/)."""
    if running_pid(DEMO) is None and port_open(ports.demo):
        print(f"demo server: port {ports.demo} is taken by another process; using it")
        return
    if running_pid(DEMO) is None:
        spawn(DEMO, [str(VENV_BIN / "python"), "-m", "tools.demo_server", "--port", str(ports.demo),
                     "--dir", str(RUN / "webhooks")])
    wait_for(lambda: _http_ok(f"{demo_url(ports)}/healthz"), DEMO, 20.0, DEMO)


def kafka_ready(ports: Ports) -> bool:
    """True once the broker answers metadata requests (not just accepts TCP)."""
    if not port_open(ports.kafka):
        return False
    probe = subprocess.run(
        [str(VENV_BIN / "python"), "-c",
         "import asyncio,sys\n"
         "from aiokafka.admin import AIOKafkaAdminClient\n"
         "async def m():\n"
         f"  a=AIOKafkaAdminClient(bootstrap_servers='127.0.0.1:{ports.kafka}',request_timeout_ms=3000)\n"
         "  await a.start(); await a.list_topics(); await a.close()\n"
         "asyncio.run(m())\n"],
        capture_output=True, timeout=20,
    )
    return probe.returncode == 0


def start_server(component: str, ports: Ports, timeout: float = 60.0) -> bool:
    """Start one server unless it already listens; wait until it is ready. True if started."""
    port = ports.of("kafka" if component == "kafka" else component)
    if port_open(port):
        return False
    STARTERS[component](ports)
    if component == "kafka":
        wait_for(lambda: kafka_ready(ports), "kafka", timeout, "kafka")
    elif component == POSTGRESQL:
        wait_for(lambda: postgresql_ready(ports), POSTGRESQL, timeout, POSTGRESQL)
    else:
        wait_for(lambda: port_open(port), component, timeout, component)
    return True


def servers_up(ports: Ports, components: Iterable[str] | None = None) -> list[str]:
    """Start the servers that are not running (default: :func:`servers`; the store FerretDB
    needs comes with ``mongodb``); returns the ones started here, in start order."""
    wanted = list(servers() if components is None else components)
    if "mongodb" in wanted and POSTGRESQL not in wanted and store_backend() == "postgresql":
        wanted.insert(wanted.index("mongodb"), POSTGRESQL)
    return [c for c in wanted if start_server(c, ports)]


# -- services ----------------------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start_service(name: str, ports: Ports, env: dict[str, str] | None = None) -> None:
    port = ports.of(name)
    spawn(name, [str(VENV_BIN / "callingest"), "serve", name],
          env={**service_env(ports), "HTTP_PORT": str(port), **(env or {})},
          nice=batch_nice() if name in BATCH else 0)


def wait_services(names: Iterable[str], ports: Ports, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for name in names:
        url = f"http://127.0.0.1:{ports.of(name)}/readyz"
        wait_for(lambda url=url: _http_ok(url), name, max(1.0, deadline - time.monotonic()), name)


def admin_init(ports: Ports) -> None:
    subprocess.run([str(VENV_BIN / "callingest"), "admin", "init"], check=True,
                   env={**os.environ, **service_env(ports)})


def apply_config(ports: Ports, path: Path) -> None:
    subprocess.run([str(VENV_BIN / "callingest"), "config", "apply", str(path)], check=True,
                   env={**os.environ, **service_env(ports)})


def start_prometheus(ports: Ports, timeout: float = 30.0) -> None:
    """Prometheus on ``ports.prometheus`` scraping every service, with the project's rules."""
    from tools import prometheus

    directory = RUN / "prometheus"
    config = prometheus.write_config(directory, {name: ports.of(name) for name in SERVICES})
    spawn(PROMETHEUS, prometheus.server_argv(config, directory / "data", ports.prometheus))
    wait_for(lambda: _http_ok(f"http://127.0.0.1:{ports.prometheus}/-/ready"), "prometheus",
             timeout, "prometheus")


def up(ports: Ports) -> None:
    started = time.monotonic()
    servers_up(ports)
    admin_init(ports)
    apply_config(ports, demo_config(ports))
    start_demo(ports)
    for name in SERVICES:
        if running_pid(name) is None:
            start_service(name, ports)
    # The 60 s budget covers the whole stack; on a loaded machine the servers may eat most of
    # it, so the services always get at least 40 s of their own (the batch services start at
    # a lower CPU priority: on a busy machine they are the last to get the CPU).
    wait_services(SERVICES, ports, max(40.0, 60.0 - (time.monotonic() - started)))
    if running_pid(PROMETHEUS) is None:
        start_prometheus(ports, max(10.0, 60.0 - (time.monotonic() - started)))
    write_stack_env(ports)
    base = f"http://127.0.0.1:{ports.gateway}"
    print(f"\nstack ready in {time.monotonic() - started:.1f} s; logs in {RUN / 'logs'}")
    print(f"gateway: {base}")
    print(f"demo recordings: {demo_url(ports)}/call.wav, {demo_url(ports)}/call.mp3; "
          f"webhook receiver: {demo_url(ports)}/webhooks (deliveries in {RUN / 'webhooks'})")
    print(f"prometheus: http://127.0.0.1:{ports.prometheus}/api/v1/targets\n")
    print("try it:")
    print(f"""  curl -s -X POST '{base}/api/2022-03-01/calls.json' \\
    -H 'Content-Type: application/json' -H 'Authorization: Bearer demo-network-token' \\
    -d '{{"call": {{"external_call_unique_id": "demo-'$RANDOM'", "start_time": "2016-02-03 09:30:00 AM",
         "destination_phone_number": 2165388265, "calling_phone_number": 8779257383,
         "advertiser_campaign_id_from_network": 85, "call_direction": "inbound",
         "recording_url": "{demo_url(ports)}/call.wav"}}}}'""")


def stack_env_file() -> Path:
    from callingest.settings import DEV_STACK_ENV

    return RUN / DEV_STACK_ENV


def write_stack_env(ports: Ports) -> None:
    """The stack's settings (what its services get: the settings in the environment of
    ``make up`` and :func:`service_env`) for the operator commands (``callingest calls show``
    ...) typed in this checkout: :func:`callingest.settings.use_dev_stack_env` reads them.
    Mode 0600 (it holds the dev credentials)."""
    from callingest.settings import Settings

    names = {name.upper() for name in Settings.model_fields}
    values = {k: v for k, v in os.environ.items() if k in names} | service_env(ports)
    path = stack_env_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(f"{name}={value}\n" for name, value in values.items())


def down() -> None:
    stack_env_file().unlink(missing_ok=True)
    for component in (PROMETHEUS, *SERVICES, DEMO, *reversed(SERVERS), POSTGRESQL):
        if stop(component):
            print(f"stopped {component}")


def status(ports: Ports) -> int:
    bad = 0
    for component in (*servers(), DEMO, *SERVICES, PROMETHEUS):
        pid = running_pid(component)
        listening = port_open(ports.of(component))
        print(f"{component:11s} pid={pid or '-':<8} port={ports.of(component)} "
              f"{'listening' if listening else 'closed'}")
        bad += not listening
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devstack", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status", "servers-up", "servers-down"])
    args = parser.parse_args(argv)
    ports = Ports()
    try:
        if args.action == "up":
            up(ports)
        elif args.action == "down":
            down()
        elif args.action == "status":
            return status(ports)
        elif args.action == "servers-up":
            servers_up(ports)
        elif args.action == "servers-down":
            for component in (*reversed(SERVERS), POSTGRESQL):
                stop(component)
    except RuntimeError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
