"""A hung test ends the run in bounded time, with every thread's stack, whatever it hangs in.

pytest-timeout (``timeout`` in pyproject.toml, signal method) raises its failure in whatever
the main thread runs when SIGALRM arrives. In a busy event loop that is mostly asyncio
callbacks, whose exceptions asyncio logs and drops: the test ran on past its timeout for good
(and a first SIGINT only cancels the running task). tests/conftest.py arms a hard stop behind
it (``pytest_timeout_set_timer``); this runs a pytest session of its own on a test that hangs
that way (``hung_sample.py``) with a 3 s timeout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SAMPLE = Path(__file__).with_name("hung_sample.py")
LIMIT_SECONDS = 120.0


def test_a_test_hung_in_a_busy_event_loop_ends_the_run_with_the_stacks() -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=3",
             str(SAMPLE.relative_to(ROOT))],
            cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the hung test still ran after {LIMIT_SECONDS:.0f} s (its timeout is 3 s):\n"
                    f"{(exc.stdout or b'')[-2000:]!r}")
    assert done.returncode != 0
    # faulthandler's dump, on the terminal's stderr, 3 s after the timeout: every thread's
    # stack, the main thread's in the test's event loop
    dump = done.stderr
    assert dump.startswith("Timeout (0:00:06)!"), dump[-3000:]
    assert "(most recent call first)" in dump, dump[-3000:]
    assert "in run_until_complete" in dump and "in pytest_runtest_call" in dump, dump[-3000:]
