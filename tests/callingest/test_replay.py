"""`callingest replay`: failed calls go back to the stage that failed and finish once."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from callingest.settings import Settings
from callingest.topics import Topics
from tests.conftest import ROOT, Services, settings_env, wait_until
from tests.helpers import apply_config, call_doc, decoded, mails_about, read_topic, submit

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.smtp, pytest.mark.slow]


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv/bin/callingest"), *args],
                          env={**os.environ, **settings_env(settings)}, capture_output=True,
                          text=True, timeout=60)


async def status(db: Any, cuid: str) -> str | None:
    doc = await db.calls.find_one({"_id": cuid})
    return doc and doc["status"]


async def test_replay_after_correcting_the_configuration(
    settings: Settings, db: Any, topics: Topics, services: Services, mail_dir: Path,
    tmp_path: Path
) -> None:
    apply_config(settings)
    services.start("validator")
    services.start("notifier")
    cuid = await submit(settings, db, call_doc(campaign="91"))  # type Standard: fails
    other = await submit(settings, db, call_doc(campaign="92"))  # no transcription: fails
    await wait_until(lambda: _is(status(db, cuid), "failed"), what="failed")
    await wait_until(lambda: _is(status(db, other), "failed"), what="failed")
    await wait_until(lambda: len(mails_about(mail_dir, cuid)) == 1, what="email")

    dry = cli(settings, "replay", "--failure-class", "call.advertiser_campaign_id_from_network",
              "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would replay {cuid} at stage validator" in dry.stdout
    assert "2 failed call(s) matched" in dry.stdout
    assert await status(db, cuid) == "failed"

    # Correct the campaign, then replay just that call.
    fixed = (ROOT / "deploy/examples/demo-config.yaml").read_text().replace(
        "type: Standard", "type: ExternalOnly")
    (tmp_path / "fixed.yaml").write_text(fixed)
    apply_config(settings, tmp_path / "fixed.yaml")
    result = cli(settings, "replay", "--cuid", cuid, "--stage", "validator")
    assert result.returncode == 0, result.stderr
    assert "replayed 1" in result.stdout
    await wait_until(lambda: _is(status(db, cuid), "validated"), what="validated after replay")
    doc = await db.calls.find_one({"_id": cuid})
    assert doc["attempt"] == 2
    assert "failure" not in doc
    assert [h["status"] for h in doc["history"]] == ["received", "failed", "received", "validated"]
    assert await status(db, other) == "failed"
    validated = [e for e in decoded(await read_topic(settings, topics.validated))
                 if e["cuid"] == cuid]
    assert [e["attempt"] for e in validated] == [2]

    again = cli(settings, "replay", "--cuid", cuid)
    assert "no failed call with this cuid" in again.stdout
    assert len(mails_about(mail_dir, cuid)) == 1


async def _is(awaitable: Any, expected: str) -> bool:
    return bool(await awaitable == expected)


async def test_a_dry_run_names_the_stage_the_replay_restarts_from(settings: Settings, db: Any) -> None:
    """A permanent normalizer failure (the recording's bytes) restarts at the fetcher; the
    dry run says so, as the replay does it."""
    now = datetime.now(UTC)
    await db.calls.insert_one({
        "_id": "dry-mono", "status": "failed", "attempt": 1, "fetched": {"key": "k"},
        "failure": {"stage": "normalizer", "class": "RecordingFormat", "message": "mono",
                    "retryable": False, "at": now}})
    dry = cli(settings, "replay", "--cuid", "dry-mono", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert ("would replay dry-mono at stage fetcher (failed in normalizer: RecordingFormat: mono)"
            in dry.stdout)
    narrowed = cli(settings, "replay", "--cuid", "dry-mono", "--stage", "fetcher", "--dry-run")
    assert "dry-mono: no failed call with this cuid matching the other filters" in narrowed.stdout


@pytest.mark.parametrize("command", [["calls", "show", "c0ffee"], ["replay", "--dry-run"],
                                     ["config", "apply", "deploy/examples/demo-config.yaml"]])
def test_an_unreachable_store_is_one_line_and_exit_1(settings: Settings, command: list[str]) -> None:
    """MongoDB out of reach: the operator gets one line naming the command and the error, no
    traceback, and no password of the URI."""
    from tests.conftest import free_port

    dead = settings.model_copy(update={"mongodb_uri": SecretStr(
        f"mongodb://operator:hunter2-secret@127.0.0.1:{free_port()}/")})
    done = cli(dead, *command)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "hunter2-secret" not in done.stderr, done.stderr
    name = " ".join(command[:1] if command[0] == "replay" else command[:2])
    assert done.stderr.startswith(f"callingest {name}: "), done.stderr
