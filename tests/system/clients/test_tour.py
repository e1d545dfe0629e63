"""The README's tour, command by command, against a private `make up` stack.

The stack runs from this checkout with its own run directory, ports, topic prefix and
database (on the session's servers, which `make up` reuses); `make down` stops it. The
README's addresses and `.run/` paths are rewritten to that stack's, nothing else.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port
from tools import devstack

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(420)]

STEP_TIMEOUT = 120


def tour_blocks(readme: str) -> list[str]:
    """The ```bash blocks of the README's "Tour" section, in order."""
    section = readme.split("\n## Tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


def test_the_tour_section_exists_and_covers_every_step() -> None:
    blocks = tour_blocks((ROOT / "README.md").read_text())
    text = "\n".join(blocks)
    for needed in ("/call.mp3", "/recording.wav", "/missing.wav", ".run/mail", ".run/webhooks",
                   "calls.json?status=failed", "/retry.json"):
        assert needed in text, needed


@pytest.fixture
def stack(servers: devstack.Ports, tmp_path: Path) -> Iterator[dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    gateway, demo = free_port(), free_port()
    env = {
        **os.environ,
        "CALLINGEST_RUN_DIR": str(tmp_path / "run"),
        "KAFKA_PORT": str(servers.kafka), "MONGODB_PORT": str(servers.mongodb),
        "S3_PORT": str(servers.s3), "SMTP_PORT": str(servers.smtp),
        "GATEWAY_PORT": str(gateway), "DEMO_RECORDINGS_PORT": str(demo),
        **{f"{name.upper()}_PORT": str(free_port())
           for name in ("validator", "fetcher", "normalizer", "notifier", "webhooks")},
        "TOPIC_PREFIX": f"tour{tag}.", "MONGODB_DATABASE": f"tour_{tag}",
    }
    up = subprocess.run(["make", "up"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=180)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"http://127.0.0.1:{demo}/call.wav" in up.stdout
        yield {"env": env, "gateway": gateway, "demo": demo, "run": tmp_path / "run",
               "up": up.stdout}
    finally:
        down = subprocess.run(["make", "down"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert not list((tmp_path / "run" / "pids").glob("*.pid")), "make down left processes"


def localize(block: str, stack: dict[str, Any], mail_dir: Path) -> str:
    return (block.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{stack['gateway']}")
            .replace("http://127.0.0.1:8000", f"http://127.0.0.1:{stack['demo']}")
            .replace(".run/mail/", f"{mail_dir}/")
            .replace(".run/webhooks/", f"{stack['run'] / 'webhooks'}/"))


def test_readme_tour(stack: dict[str, Any], mail_dir: Path, tmp_path: Path) -> None:
    blocks = tour_blocks((ROOT / "README.md").read_text())
    # The printed curl example of `make up` reaches the demo server too.
    printed = stack["up"].split("try it:", 1)[1]
    assert f"http://127.0.0.1:{stack['demo']}/call.wav" in printed

    script = "set -euo pipefail\n" + "\n".join(
        f"echo '=== step {i}'\n{localize(block, stack, mail_dir)}" for i, block in enumerate(blocks))
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=stack["env"],
                         capture_output=True, text=True, timeout=STEP_TIMEOUT * len(blocks))
    out = run.stdout
    assert run.returncode == 0, out[-4000:] + run.stderr[-4000:]
    steps = {int(m.group(1)): m.group(2) for m in
             re.finditer(r"=== step (\d+)\n(.*?)(?==== step|\Z)", out, flags=re.DOTALL)}
    cuid = steps[1].strip()
    assert re.fullmatch(r"[0-9a-f]{32}", cuid), steps[1]
    assert '"status": "normalized"' in steps[2] and f'"cuid": "{cuid}"' in steps[2]
    assert "8000 Hz 2 channels 16 bit" in steps[3]
    with wave.open(str(tmp_path / "normalized.wav")) as downloaded:
        assert (downloaded.getframerate(), downloaded.getnchannels()) == (8000, 2)
    assert '"class": "RecordingUnavailable"' in steps[4] and '"stage": "fetcher"' in steps[4]
    assert "Subject: Call processing failed:" in steps[4] and "To: csm@example.com" in steps[4]
    fix = steps[len(blocks) - 1]
    broken = re.search(r"Subject: Call processing failed: ([0-9a-f]{32})", steps[4]).group(1)  # type: ignore[union-attr]
    assert f'{{"cuid": "{broken}"}} HTTP 201' in fix
    assert "('fetcher', 'failed'), ('correction', 'received')" in fix
    assert fix.rstrip().endswith("HTTP 409") and '"class": "Conflict"' in fix
    hook = steps[5].lower()
    assert '"webhook-id":' in hook and '"webhook-signature": "v1,' in hook
    assert '"webhook-timestamp":' in hook


def test_make_up_points_the_demo_config_at_the_demo_port(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo configuration's webhook URL (http://127.0.0.1:8000/webhooks once the webhooks
    branch adds it) follows DEMO_RECORDINGS_PORT, so a stack on other ports gets its deliveries."""
    source = ROOT / "deploy" / "examples" / "demo-config.yaml"
    monkeypatch.setattr(devstack, "RUN", tmp_path)
    assert devstack.demo_config(devstack.Ports(demo=8000)) == source
    moved = devstack.demo_config(devstack.Ports(demo=21999))
    text = source.read_text()
    assert moved.read_text() == text.replace("http://127.0.0.1:8000/", "http://127.0.0.1:21999/")
    if "http://127.0.0.1:8000/webhooks" in text:
        assert "http://127.0.0.1:21999/webhooks" in moved.read_text()
