"""tests/ mirrors the packages (issue 13 point 6): a module's tests are where the module is.

* ``tests/<path>`` outside ``tests/system`` is the tests of the package directory ``<path>``
  of the repository: ``tests/callingest`` of ``callingest/``, ``tests/services/<name>`` of
  ``services/<name>/``, ``tests/tools`` of ``tools/`` (and ``tests/bench`` would be of ``bench/``).
* ``tests/system/<suite>`` holds what crosses packages: end to end, isolation, faults, soak,
  the README tour, live observability, the operations files, production settings, security,
  the secrets leak sweep, the structure checks, and ``zz_final`` (marked ``last``).
* The top of tests/ holds only the shared fixtures and helpers, no test module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

TESTS = ROOT / "tests"
SYSTEM = TESTS / "system"
#: Modules at the top of tests/: fixtures and helpers every directory uses.
SHARED = {"__init__.py", "conftest.py", "helpers.py", "audiogen.py"}


def _dirs(root: Path = TESTS) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__")


def test_every_test_dir_outside_system_is_a_package_of_the_repo() -> None:
    unmapped = [
        d.relative_to(TESTS).as_posix() for d in _dirs()
        if not d.is_relative_to(SYSTEM) and not (ROOT / d.relative_to(TESTS) / "__init__.py").is_file()
    ]
    assert unmapped == [], "tests/<path> must test the package <path>/ (or live in tests/system)"


def test_every_service_and_the_shared_package_have_their_tests() -> None:
    services = (p for p in (ROOT / "services").iterdir() if (p / "__init__.py").is_file())
    packages = ["callingest", "tools", *sorted(f"services/{p.name}" for p in services)]
    missing = [p for p in packages if not any((TESTS / p).glob("test_*.py"))]
    assert missing == []


def test_no_test_module_at_the_top_of_tests() -> None:
    top = sorted(p.name for p in TESTS.glob("*.py"))
    assert set(top) <= SHARED, f"put {sorted(set(top) - SHARED)} where the module it tests is"


def test_zz_final_is_collected_last() -> None:
    """The leak check reads the whole run's logs, so it must come after every other test
    (the ``last`` marker, sorted by tests/conftest.py), wherever it lives."""
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    ids = [line for line in collected.splitlines() if "::" in line]
    assert len(ids) > 100
    assert ids[-1].startswith("tests/system/zz_final/"), ids[-3:]
