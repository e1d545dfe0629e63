"""Correction of failed calls by resubmission and POST calls/{cuid}/retry.json, on the real
gateway, Kafka and FerretDB. A failed call is made the way the fetcher fails one (status,
failure, history); what the stages then do with the new attempt is shown end to end in
tests/system/clients/test_tour.py and tests/system/e2e/test_clients_e2e.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from callingest import events
from callingest.kafka import Producer
from callingest.replay import RESTART_CLAIMS, republish_unpublished_restarts, restart_failed_call
from callingest.settings import Settings
from callingest.topics import Topics
from services.gateway.calls import CallService
from services.gateway.publisher import CallPublisher, KafkaUnavailable
from tests.helpers import decoded, read_topic
from tests.services.gateway.conftest import ADVERTISER_TOKEN, NETWORK_TOKEN, OTHER_NETWORK_TOKEN
from tests.services.gateway.test_gateway_api import Client, assert_error, call_body, post

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

FIXED_URL = "http://127.0.0.1:9/recordings/fixed.wav"


async def fail(db: Any, cuid: str, stage: str = "fetcher", retryable: bool = False) -> dict[str, Any]:
    """Mark the call failed at ``stage`` as the pipeline does; the stored call."""
    at = datetime.now(UTC)
    await db.calls.update_one({"_id": cuid}, {
        "$set": {"status": "failed", "failure": {"stage": stage, "class": "RecordingUnavailable",
                                                 "message": "404", "retryable": retryable, "at": at}},
        "$push": {"history": {"stage": stage, "status": "failed", "at": at}}})
    return dict(await db.calls.find_one({"_id": cuid}))


async def retry(client: Client, cuid: str, token: str = NETWORK_TOKEN) -> tuple[int, Any]:
    resp = await client.post(f"/api/2022-03-01/calls/{cuid}/retry.json",
                             headers={"Authorization": f"Bearer {token}"})
    return resp.status, await resp.json(content_type=None)


async def events_of(settings: Settings, topic: str, cuid: str) -> list[dict[str, Any]]:
    return [e for e in decoded(await read_topic(settings, topic, timeout=2.0)) if e["cuid"] == cuid]


async def test_retry_resumes_from_the_failed_stage(
    gateway: Client, configured_db: Any, settings: Settings, topics: Topics
) -> None:
    status, body = await post(gateway, call_body("retry-1"))
    cuid = body["cuid"]
    assert_error(*(await retry(gateway, cuid)), 409, "Conflict")  # received, not failed
    await fail(configured_db, cuid, "fetcher")

    assert_error(*(await retry(gateway, "0" * 32)), 404, "NotFound")
    assert_error(*(await retry(gateway, cuid, OTHER_NETWORK_TOKEN)), 404, "NotFound")
    status, body = await retry(gateway, cuid, ADVERTISER_TOKEN)  # adv-1's own call
    assert (status, body) == (202, {"cuid": cuid, "status": "validated"})

    call = await configured_db.calls.find_one({"_id": cuid})
    assert (call["status"], call["attempt"]) == ("validated", 2)
    assert "failure" not in call and call["last_failure"]["stage"] == "fetcher"
    assert [(h["stage"], h["status"]) for h in call["history"]] == [
        ("gateway", "received"), ("fetcher", "failed"), ("retry", "validated")]
    validated = await events_of(settings, topics.validated, cuid)
    assert [(e["attempt"], e["recording_url"]) for e in validated] == [(2, call["recording_url"])]
    assert_error(*(await retry(gateway, cuid)), 409, "Conflict")  # no longer failed

    # The call view shows the retry in its history.
    resp = await gateway.get(f"/api/2022-03-01/calls/{cuid}.json",
                             headers={"Authorization": f"Bearer {NETWORK_TOKEN}"})
    view = await resp.json()
    assert view["status"] == "validated" and view["history"][-1]["stage"] == "retry"


async def _failed_in_the_normalizer(gateway: Client, db: Any, external_id: str,
                                    retryable: bool) -> str:
    _status, body = await post(gateway, call_body(external_id))
    cuid = str(body["cuid"])
    await db.calls.update_one({"_id": cuid}, {"$set": {"fetched": {
        "bucket": "b", "key": f"raw/{cuid}/1", "size_bytes": 10, "format": "wav"}}})
    await fail(db, cuid, "normalizer", retryable=retryable)
    return cuid


async def test_retry_of_a_normalizer_failure_resumes_at_the_normalizer(
    gateway: Client, configured_db: Any, settings: Settings, topics: Topics
) -> None:
    """Given up on transient errors: the normalizer runs again on the bytes already fetched."""
    cuid = await _failed_in_the_normalizer(gateway, configured_db, "retry-norm", retryable=True)
    assert await retry(gateway, cuid) == (202, {"cuid": cuid, "status": "fetched"})
    fetched = await events_of(settings, topics.fetched, cuid)
    assert [(e["attempt"], e["key"]) for e in fetched] == [(2, f"raw/{cuid}/1")]


async def test_retry_of_a_bad_recording_downloads_it_again(
    gateway: Client, configured_db: Any, settings: Settings, topics: Topics
) -> None:
    """A permanent normalizer failure (mono, corrupt, ...) was the bytes fetched: a retry (of a
    recording fixed at the same URL, the README's case) resumes at the fetcher, not at the
    normalizer with the same bytes."""
    cuid = await _failed_in_the_normalizer(gateway, configured_db, "retry-bad", retryable=False)
    assert await retry(gateway, cuid) == (202, {"cuid": cuid, "status": "validated"})
    validated = await events_of(settings, topics.validated, cuid)
    assert [e["attempt"] for e in validated] == [2]
    assert await events_of(settings, topics.fetched, cuid) == []


async def test_correction_replaces_content_and_restarts(
    gateway: Client, configured_db: Any, settings: Settings, topics: Topics
) -> None:
    status, body = await post(gateway, call_body("fix-1"))
    cuid = body["cuid"]
    # Not failed: other content is still a conflict.
    assert_error(*(await post(gateway, call_body("fix-1", recording_url=FIXED_URL))), 409, "Conflict")
    before = await fail(configured_db, cuid, "fetcher")

    # An identical resubmission of the failed call: 202, nothing changes.
    assert await post(gateway, call_body("fix-1")) == (202, {"cuid": cuid})
    assert await configured_db.calls.find_one({"_id": cuid}) == before

    status, body = await post(gateway, call_body("fix-1", recording_url=FIXED_URL,
                                                 signals=None, call_direction="outbound"))
    assert (status, body) == (201, {"cuid": cuid})
    call = await configured_db.calls.find_one({"_id": cuid})
    assert (call["status"], call["attempt"]) == ("received", 2)
    assert (call["recording_url"], call["call_direction"]) == (FIXED_URL, "outbound")
    assert call["content_hash"] != before["content_hash"]
    assert call["created_at"] == before["created_at"]
    assert [(h["stage"], h["status"]) for h in call["history"]] == [
        ("gateway", "received"), ("fetcher", "failed"), ("correction", "received")]
    submitted = await events_of(settings, topics.submitted, cuid)
    assert [(e["attempt"], e["recording_url"], e["call_direction"]) for e in submitted] == [
        (1, before["recording_url"], "inbound"), (2, FIXED_URL, "outbound")]

    # The corrected content is now the call's: the same again is 202, the old content 409.
    again = call_body("fix-1", recording_url=FIXED_URL, call_direction="outbound")
    assert await post(gateway, again) == (202, {"cuid": cuid})
    assert_error(*(await post(gateway, call_body("fix-1"))), 409, "Conflict")
    assert (await configured_db.calls.find_one({"_id": cuid}))["attempt"] == 2


@pytest.mark.slow
async def test_concurrent_corrections_and_retries_make_one_new_attempt(
    gateway: Client, configured_db: Any, settings: Settings, topics: Topics
) -> None:
    _status, body = await post(gateway, call_body("race-fix"))
    cuid = body["cuid"]
    for round_ in range(3):
        before = await fail(configured_db, cuid, "fetcher")
        attempt = before["attempt"]
        corrections = [call_body("race-fix", recording_url=f"{FIXED_URL}?r={round_}&v={i % 2}")
                       for i in range(6)]
        answers = await asyncio.gather(*(post(gateway, body) for body in corrections),
                                       *(retry(gateway, cuid) for _ in range(6)))
        statuses = sorted(status for status, _ in answers)
        assert statuses.count(201) + statuses.count(202) + statuses.count(409) == 12, answers
        winners = [a for a in answers if a[0] == 201 or (a[0] == 202 and "status" in a[1])]
        assert len(winners) == 1, answers
        call = await configured_db.calls.find_one({"_id": cuid})
        assert call["attempt"] == attempt + 1
        restarts = [h for h in call["history"] if h["stage"] in ("correction", "retry")]
        assert len(restarts) == round_ + 1
        new_events = [e for topic in (topics.submitted, topics.validated)
                      for e in await events_of(settings, topic, cuid) if e["attempt"] == attempt + 1]
        assert len(new_events) == 1, new_events


async def test_a_scoped_token_cannot_correct_another_advertisers_call(
    gateway: Client, configured_db: Any
) -> None:
    _status, body = await post(gateway, call_body("adv2-fix", advertiser_campaign_id_from_network=90))
    cuid = body["cuid"]
    before = await fail(configured_db, cuid, "fetcher")
    hijack = call_body("adv2-fix", recording_url=FIXED_URL)  # campaign 85: adv-1's
    hijack["oauth_token"] = ADVERTISER_TOKEN
    assert_error(*(await post(gateway, hijack)), 409, "Conflict")
    assert_error(*(await retry(gateway, cuid, ADVERTISER_TOKEN)), 404, "NotFound")
    assert await configured_db.calls.find_one({"_id": cuid}) == before


async def test_a_restart_whose_process_died_before_publishing_is_published_later(
    gateway: Client, configured_db: Any, settings: Settings, topics: Topics
) -> None:
    """The process dies between claiming the new attempt and Kafka's acknowledgement: the
    gateway's republisher pass publishes that attempt's event (once)."""
    _status, body = await post(gateway, call_body("crash-retry"))
    cuid = body["cuid"]
    call = await fail(configured_db, cuid, "fetcher")

    async def dies(stage: str, event: str, record: dict[str, Any]) -> None:
        raise asyncio.CancelledError  # the process is gone: nothing after the claim runs

    with pytest.raises(asyncio.CancelledError):
        await restart_failed_call(configured_db.calls, call, dies, source="retry")
    stuck = await configured_db.calls.find_one({"_id": cuid})
    assert (stuck["status"], stuck["attempt"]) == ("validated", 2)
    assert await events_of(settings, topics.validated, cuid) == []

    producer = Producer(settings.kafka_bootstrap_servers, "tests")
    await producer.start()
    try:
        async def send(stage: str, event: str, record: dict[str, Any]) -> None:
            await producer.send(events.input_topic(topics, stage), event, record, key=cuid)

        later = timedelta(seconds=60)
        assert await republish_unpublished_restarts(configured_db.calls, send, later) == 0
        assert await republish_unpublished_restarts(configured_db.calls, send, timedelta(0)) == 1
        assert await republish_unpublished_restarts(configured_db.calls, send, timedelta(0)) == 0
    finally:
        await producer.stop()
    validated = await events_of(settings, topics.validated, cuid)
    assert [e["attempt"] for e in validated] == [2]


GENERIC_CONFLICT = "The external_call_unique_id in the request has already been used for a different call."


async def _processed_again(gateway: Client, db: Any, external_id: str, **overrides: Any) -> str:
    """A call failed once and retried (attempt 2, validated): its cuid."""
    _status, body = await post(gateway, call_body(external_id, **overrides))
    cuid = str(body["cuid"])
    await fail(db, cuid, "fetcher")
    assert (await retry(gateway, cuid))[0] == 202
    return cuid


async def test_a_conflict_with_a_call_processed_again_says_why(
    gateway: Client, configured_db: Any
) -> None:
    """Other content for a call that failed and is being processed again: the 409 says that the
    call <cuid> is being processed again, its status, and that only a failed call can be
    corrected, to a token that may see the call (it was the generic 409, which told a client
    nothing); a call being processed for the first time keeps the spec's answer."""
    assert (await post(gateway, call_body("again-first")))[0] == 201
    first = assert_error(*(await post(gateway, call_body("again-first", recording_url=FIXED_URL))),
                         409, "Conflict")
    assert first == GENERIC_CONFLICT

    cuid = await _processed_again(gateway, configured_db, "again-1")
    text = assert_error(*(await post(gateway, call_body("again-1", recording_url=FIXED_URL))),
                        409, "Conflict")
    assert text.startswith(GENERIC_CONFLICT[:-1]), text
    assert f"call {cuid} is already being processed again (it is validated)" in text, text
    assert "only a failed call can be corrected" in text
    scoped = call_body("again-1", recording_url=FIXED_URL)  # campaign 85: adv-1's own call
    scoped["oauth_token"] = ADVERTISER_TOKEN
    assert assert_error(*(await post(gateway, scoped)), 409, "Conflict") == text

    # Processed to the end after its correction: normalized, still not correctable.
    await configured_db.calls.update_one({"_id": cuid}, {"$set": {"status": "normalized"}})
    text = assert_error(*(await post(gateway, call_body("again-1", recording_url=FIXED_URL))),
                        409, "Conflict")
    assert f"call {cuid} was processed again and is normalized" in text, text
    assert "only a failed call can be corrected" in text


async def test_a_conflict_tells_nothing_about_a_call_the_token_cannot_see(
    gateway: Client, configured_db: Any
) -> None:
    cuid = await _processed_again(gateway, configured_db, "again-adv2",
                                  advertiser_campaign_id_from_network=90)
    hijack = call_body("again-adv2", recording_url=FIXED_URL)  # campaign 85: adv-1's
    hijack["oauth_token"] = ADVERTISER_TOKEN
    text = assert_error(*(await post(gateway, hijack)), 409, "Conflict")
    assert text == GENERIC_CONFLICT and cuid not in text
    await fail(configured_db, cuid, "fetcher")  # failed again: still nothing, and not corrected
    assert assert_error(*(await post(gateway, hijack)), 409, "Conflict") == GENERIC_CONFLICT
    assert (await configured_db.calls.find_one({"_id": cuid}))["recording_url"] != FIXED_URL


class HeldSend:
    """Holds the gateway's first publication of a restarted call's event until released, then
    sends it (``fails=False``) or refuses it as Kafka would (``fails=True``); later ones pass."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.fails = fails
        original = CallPublisher.send_stage_input
        held = self

        async def send(publisher: CallPublisher, stage: str, event: str,
                       record: dict[str, Any]) -> None:
            if not held.entered.is_set():
                held.entered.set()
                await held.release.wait()
                if held.fails:
                    raise KafkaUnavailable("Kafka is unavailable")
            await original(publisher, stage, event, record)

        monkeypatch.setattr(CallPublisher, "send_stage_input", send)


async def test_a_correction_that_loses_to_a_retry_is_told_the_call_is_processed_again(
    gateway: Client, configured_db: Any, settings: Settings, topics: Topics,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A correction and a retry both read the call failed; the retry claims the new attempt
    first. The correction is answered, once the retry's event is acknowledged, that the call is
    already being processed again (it was the generic 409, at once); the retry's restart is
    the one processed."""
    _status, body = await post(gateway, call_body("lost-fix"))
    cuid = body["cuid"]
    before = await fail(configured_db, cuid, "fetcher")
    read, go = asyncio.Event(), asyncio.Event()
    restart = CallService._restart

    async def after_the_retry(service: CallService, call: dict[str, Any], source: str,
                              replace: dict[str, Any] | None = None) -> Any:
        if source == "correction" and not read.is_set():
            read.set()  # the correction read the call failed
            await go.wait()
        return await restart(service, call, source, replace)

    monkeypatch.setattr(CallService, "_restart", after_the_retry)
    held = HeldSend(monkeypatch, fails=False)
    correction = asyncio.create_task(post(gateway, call_body("lost-fix", recording_url=FIXED_URL)))
    await asyncio.wait_for(read.wait(), 10)
    retried = asyncio.create_task(retry(gateway, cuid))
    await asyncio.wait_for(held.entered.wait(), 10)  # the retry claimed attempt 2, publishing
    go.set()
    await asyncio.wait({correction}, timeout=1.0)
    held.release.set()
    assert await retried == (202, {"cuid": cuid, "status": "validated"})
    text = assert_error(*(await correction), 409, "Conflict")
    assert f"call {cuid} is already being processed again" in text, text

    call = await configured_db.calls.find_one({"_id": cuid})  # the retry's restart, unchanged
    assert (call["status"], call["attempt"], call["recording_url"]) == (
        "validated", 2, before["recording_url"])
    assert [e["attempt"] for e in await events_of(settings, topics.validated, cuid)] == [2]
    assert [e["attempt"] for e in await events_of(settings, topics.submitted, cuid)] == [1]

    # Resubmitted after the retry took the call: the same answer, with the call's status.
    text = assert_error(*(await post(gateway, call_body("lost-fix", recording_url=FIXED_URL))),
                        409, "Conflict")
    assert f"call {cuid} is already being processed again (it is validated)" in text, text


async def test_a_restart_refused_by_kafka_loses_no_concurrent_correction(
    gateway: Client, configured_db: Any, settings: Settings, topics: Topics,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two identical corrections at once; Kafka refuses the first one's event (503, undone).
    The second must not be answered 202 on the strength of the first's content (it was, and the
    correction was then lost with the undone one): it waits and makes the correction itself."""
    _status, body = await post(gateway, call_body("undone-fix"))
    cuid = body["cuid"]
    await fail(configured_db, cuid, "fetcher")
    held = HeldSend(monkeypatch, fails=True)
    corrected = call_body("undone-fix", recording_url=FIXED_URL)
    first = asyncio.create_task(post(gateway, corrected))
    await asyncio.wait_for(held.entered.wait(), 10)
    second = asyncio.create_task(post(gateway, corrected))
    await asyncio.wait({second}, timeout=1.0)
    held.release.set()
    assert (await first)[0] == 503
    assert await second == (201, {"cuid": cuid})

    call = await configured_db.calls.find_one({"_id": cuid})
    assert (call["status"], call["attempt"], call["recording_url"]) == ("received", 2, FIXED_URL)
    submitted = await events_of(settings, topics.submitted, cuid)
    assert [(e["attempt"], e["recording_url"]) for e in submitted][1:] == [(2, FIXED_URL)]


async def test_a_restart_whose_process_died_before_updating_the_call_does_not_block_it(
    gateway: Client, configured_db: Any
) -> None:
    """The process died between claiming attempt 2 and updating the call: the call is still
    failed at attempt 1. The republisher pass releases the orphaned claim, so the call can be
    retried (before, it marked the claim published and every retry answered 409 for good)."""
    _status, body = await post(gateway, call_body("orphan-claim"))
    cuid = body["cuid"]
    await fail(configured_db, cuid, "fetcher")
    await configured_db[RESTART_CLAIMS].insert_one({
        "_id": f"{cuid}:2", "cuid": cuid, "attempt": 2, "stage": "fetcher", "source": "retry",
        "at": datetime.now(UTC) - timedelta(minutes=5), "published": False})

    async def send(stage: str, event: str, record: dict[str, Any]) -> None:
        raise AssertionError("nothing to publish: the call was never restarted")

    assert await republish_unpublished_restarts(configured_db.calls, send, timedelta(0)) == 0
    assert await retry(gateway, cuid) == (202, {"cuid": cuid, "status": "validated"})
