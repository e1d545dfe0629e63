"""`make up` starts every component and reports ready; `make down` leaves nothing behind.

Runs a second, private stack (own run directory, own ports) so that it never
disturbs the servers the rest of the session uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tools import devstack

pytestmark = [pytest.mark.stack, pytest.mark.slow]

COMPONENTS = (*devstack.SERVERS, devstack.DEMO, *devstack.SERVICES, devstack.PROMETHEUS)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if text in cmdline or text.encode() in environ:
            if int(proc.name) != os.getpid():
                found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def test_make_up_then_down(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ports = {
        "KAFKA_PORT": free_port(), "KAFKA_CONTROLLER_PORT": free_port(),
        "MONGODB_PORT": free_port(), "S3_PORT": free_port(), "SMTP_PORT": free_port(),
        "GATEWAY_PORT": free_port(), "VALIDATOR_PORT": free_port(), "FETCHER_PORT": free_port(),
        "NORMALIZER_PORT": free_port(), "NOTIFIER_PORT": free_port(), "WEBHOOKS_PORT": free_port(),
        "DEMO_RECORDINGS_PORT": free_port(),
        "PROMETHEUS_PORT": free_port(),
    }
    env = {**os.environ, "CALLINGEST_RUN_DIR": str(run_dir),
           **{k: str(v) for k, v in ports.items()}}
    env.pop("MAKEFLAGS", None)
    env.pop("BATCH_NICE", None)
    try:
        started = time.monotonic()
        up = subprocess.run(["make", "-s", "up"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=180)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert time.monotonic() - started < 120
        assert f"http://127.0.0.1:{ports['GATEWAY_PORT']}" in up.stdout
        assert "curl" in up.stdout
        for name in devstack.SERVICES:
            port = ports[f"{name.upper()}_PORT"]
            for path in ("/healthz", "/readyz", "/metrics"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                    assert resp.status == 200, (name, path)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
                assert json.loads(resp.read())["status"] == "ready"
        demo = f"http://127.0.0.1:{ports['DEMO_RECORDINGS_PORT']}"
        assert f"{demo}/call.wav" in up.stdout
        for path in ("/healthz", "/readyz", "/metrics"):  # the demo server's, as every service's
            with urllib.request.urlopen(f"{demo}{path}", timeout=5) as resp:
                assert resp.status == 200, ("demo recordings", path)
        for path, kind in (("/call.wav", b"RIFF"), ("/call.mp3", b"")):
            with urllib.request.urlopen(f"{demo}{path}", timeout=5) as resp:
                assert resp.status == 200 and resp.read().startswith(kind), path
        for component in COMPONENTS:
            assert (run_dir / "logs" / f"{component}.log").exists(), component
        _check_prometheus(ports)
        _check_operator_commands(run_dir)
        _check_cpu_priority(run_dir)
    finally:
        down = subprocess.run(["make", "-s", "down"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not (run_dir / "stack.env").exists()
    for name, port in ports.items():
        assert not devstack.port_open(port), f"{name} {port} still listening after make down"
    assert _processes_mentioning(str(run_dir)) == []


def _check_operator_commands(run_dir: Path) -> None:
    """`callingest calls show` and `config apply`, typed with no settings at all, reach the
    stack `make up` started (its settings file in the run directory), not 127.0.0.1 defaults."""
    bare = {"PATH": os.environ["PATH"], "CALLINGEST_RUN_DIR": str(run_dir)}
    callingest = str(ROOT / ".venv" / "bin" / "callingest")
    shown = subprocess.run([callingest, "calls", "show", "no-such-cuid"], env=bare,
                           capture_output=True, text=True, timeout=60)
    assert (shown.returncode, shown.stderr.strip()) == (1, "callingest calls show: no call no-such-cuid")
    applied = subprocess.run([callingest, "config", "apply", str(ROOT / "deploy/examples/demo-config.yaml")],
                             env=bare, capture_output=True, text=True, timeout=60)
    assert applied.returncode == 0, applied.stderr


def _check_cpu_priority(run_dir: Path) -> None:
    """The consumers and every process they started (the normalizer's transcoding pool) run
    niced, in autogroups niced too; the gateway and the servers it waits on do not."""
    def nice_of(pid: int) -> tuple[int, int | None]:
        autogroup = Path(f"/proc/{pid}/autogroup")
        group = int(autogroup.read_text().split()[-1]) if autogroup.exists() else None
        return os.getpriority(os.PRIO_PROCESS, pid), group

    def tree(pid: int) -> list[int]:
        kids = [int(k) for task in Path(f"/proc/{pid}/task").iterdir()
                for k in (task / "children").read_text().split()]
        return [pid, *(p for kid in kids for p in tree(kid))]

    for name in (*devstack.SERVERS, *devstack.SERVICES):
        pid = int((run_dir / "pids" / f"{name}.pid").read_text())
        expected = devstack.BATCH_NICE_DEFAULT if name in devstack.BATCH else 0
        processes = tree(pid)
        if name == "normalizer":
            assert len(processes) > 1, "the normalizer's pool workers"
        for process in processes:
            niceness, group = nice_of(process)
            assert niceness == expected, (name, process)
            assert group in (None, expected), (name, process)


def _prometheus_api(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def _check_prometheus(ports: dict[str, int]) -> None:
    """Prometheus of `make up` scrapes every service and has the project's rules loaded."""
    from tests.system.ops.prometheus import alert_names, record_names

    port = ports["PROMETHEUS_PORT"]
    expected = {f"callingest-{name}": f"http://127.0.0.1:{ports[name.upper() + '_PORT']}/metrics"
                for name in devstack.SERVICES}
    deadline = time.monotonic() + 60
    while True:
        targets = _prometheus_api(port, "targets")["activeTargets"]  # type: ignore[index]
        up = {t["labels"]["job"]: t["scrapeUrl"] for t in targets if t["health"] == "up"}
        if up == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert up == expected
    groups = _prometheus_api(port, "rules")["groups"]  # type: ignore[index]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert sorted(r["name"] for r in loaded if r["type"] == "alerting") == sorted(alert_names())
    assert {r["name"] for r in loaded if r["type"] == "recording"} == record_names()
    result = _prometheus_api(port, "query?query=" + urllib.parse.quote("sum by (job) (up)"))
    assert len(result["result"]) == len(expected)  # type: ignore[index]
