"""After the whole run: no secret the tests used appears in any log the run produced."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TEST_LOGS, USED_SECRETS
from tools import devstack

pytestmark = pytest.mark.last


def _logs() -> list[Path]:
    paths = [p for p in TEST_LOGS.rglob("*.log")]
    paths += [p for p in (devstack.RUN / "logs").glob("*.log")
              if p.stem in devstack.SERVICES]
    return paths


def test_no_secret_reaches_a_log_line() -> None:
    logs = _logs()
    assert any(p.name == "pytest.log" for p in logs)
    assert sum(p.stat().st_size for p in logs) > 0, "the run produced no logs to scan"
    leaks = []
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in USED_SECRETS:
            if secret in text:
                line = next(line for line in text.splitlines() if secret in line)
                leaks.append(f"{path}: {secret!r} in {line[:200]}")
    assert leaks == []
