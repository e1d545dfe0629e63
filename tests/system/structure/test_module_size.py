"""No product module grows past 400 lines (issue 13): one concern per module."""

from __future__ import annotations

from tests.conftest import ROOT

MAX_LINES = 400


def test_no_product_module_over_400_lines() -> None:
    over = {}
    for package in ("callingest", "services"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                over[name] = lines
    assert over == {}
