"""Validator and notifier as real consumer processes on the real servers."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from callingest.settings import Settings
from callingest.topics import Topics
from tests.conftest import Services, wait_until
from tests.helpers import (
    apply_config,
    call_doc,
    committed_past,
    decoded,
    end_offsets,
    mails_about,
    read_topic,
    submit,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.smtp, pytest.mark.slow]


async def test_valid_call_is_validated_and_bad_campaign_fails_with_one_email(
    settings: Settings, db: Any, topics: Topics, services: Services, mail_dir: Path
) -> None:
    apply_config(settings)
    services.start("validator")
    services.start("notifier")
    good = await submit(settings, db, call_doc(campaign="85"))
    standard = await submit(settings, db, call_doc(campaign="91"))
    no_transcription = await submit(settings, db, call_doc(campaign="92"))

    async def status(cuid: str) -> str | None:
        doc = await db.calls.find_one({"_id": cuid})
        return doc["status"] if doc else None

    await wait_until(lambda: _is(status(good), "validated"), what="validated")
    await wait_until(lambda: _is(status(standard), "failed"), what="failed")
    await wait_until(lambda: _is(status(no_transcription), "failed"), what="failed")
    failed = await db.calls.find_one({"_id": standard})
    assert failed["failure"]["class"] == "call.advertiser_campaign_id_from_network"
    assert failed["failure"]["message"] == "campaign must be for external calls only"
    failed2 = await db.calls.find_one({"_id": no_transcription})
    assert failed2["failure"]["message"] == "campaign must have transcription enabled"

    validated = decoded(await read_topic(settings, topics.validated))
    assert [e["cuid"] for e in validated] == [good]
    failures = decoded(await read_topic(settings, topics.failed))
    assert sorted(e["cuid"] for e in failures) == sorted([standard, no_transcription])

    await wait_until(lambda: len(mails_about(mail_dir, standard)) == 1, what="email")
    msg = mails_about(mail_dir, standard)[0]
    body = msg.get_payload(decode=True).decode()
    assert msg["To"] == "csm@example.com"
    for needle in (standard, failed["external_call_unique_id"], "validator",
                   "campaign must be for external calls only",
                   f"callingest replay --cuid {standard} --stage validator"):
        assert needle in body
    await wait_until(lambda: _has_notified(db, standard), what="csm_notified_at")

    # Restarting the notifier redelivers nothing new: still one email. Positive signal first:
    # the new notifier mailed about a later failure and its group committed past everything.
    services.stop("notifier", signal.SIGKILL)
    services.start("notifier")
    later = await submit(settings, db, call_doc(campaign="91"))
    await wait_until(lambda: len(mails_about(mail_dir, later)) == 1, what="email after restart")
    ends = await end_offsets(settings, topics.failed)
    await wait_until(lambda: committed_past(settings, "notifier", ends),
                     what="the restarted notifier committed past every failure")
    assert len(mails_about(mail_dir, standard)) == 1


async def test_sigterm_stops_a_consumer_cleanly_within_the_drain(
    settings: Settings, topics: Topics, services: Services
) -> None:
    services.start("validator")
    started = time.monotonic()
    code = services.stop("validator", signal.SIGTERM)
    assert code == 0
    assert time.monotonic() - started < 12


async def _is(awaitable: Any, expected: str) -> bool:
    return bool(await awaitable == expected)


async def _has_notified(db: Any, cuid: str) -> bool:
    doc = await db.calls.find_one({"_id": cuid})
    return bool(doc and doc.get("csm_notified_at"))
