"""The notifier's step called directly, on the real store and the real SMTP sink; STARTTLS and
the login on a real relay started here (:mod:`tests.services.notifier.relay`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from callingest import metrics
from callingest.errors import TransientError
from callingest.settings import PLAIN_SMTP_LOGIN, Settings
from callingest.steps import NoResources, StageContext
from callingest.topics import Topics
from services.notifier.step import step
from tests.conftest import free_port
from tests.helpers import call_doc, mails_about
from tests.services.notifier.relay import PASSWORD, USERNAME, Relay

pytestmark = [pytest.mark.mongo, pytest.mark.smtp]


def call_failed(call: dict[str, Any], network_id: str = "1001") -> dict[str, Any]:
    """A CallFailed record as the consumer loop publishes it."""
    return {"event_id": str(uuid.uuid4()), "cuid": call["_id"], "occurred_at": datetime.now(UTC),
            "schema_version": 1, "network_id": network_id, "attempt": 1, "stage": "validator",
            "failure_class": "call.advertiser_campaign_id_from_network",
            "message": "campaign not found", "retryable": False}


def context(settings: Settings, db: Any, topics: Topics, call: dict[str, Any]) -> StageContext:
    return StageContext(settings=settings, db=db, topics=topics, call=call, retry=0,
                        resources=NoResources())


@pytest.fixture
async def networks(db: Any) -> Any:
    await db.networks.insert_many([
        {"_id": "1001", "name": "With CSM", "csm_email": "csm@example.com"},
        {"_id": "1002", "name": "Without CSM"},
    ])
    return db


def sent(outcome: str) -> float:
    return metrics.NOTIFICATIONS.labels(outcome)._value.get()


async def test_one_email_per_failed_attempt(networks: Any, settings: Settings, topics: Topics,
                                            mail_dir: Path) -> None:
    call = call_doc()
    event = call_failed(call)
    result = await step(event, context(settings, networks, topics, call))
    assert set(result.call_update or {}) == {"csm_notified_at"}
    mails = mails_about(mail_dir, call["_id"])
    assert len(mails) == 1
    assert mails[0]["To"] == "csm@example.com"
    # One Message-ID per (cuid, attempt), so a copy sent again after a crash between sending
    # and recording is the same message to a mail client; and a Date, as RFC 5322 requires.
    domain = settings.smtp_from.rpartition("@")[2]
    assert mails[0]["Message-ID"] == f"<{call['_id']}.1@{domain}>"
    assert mails[0]["Date"]
    body = mails[0].get_payload(decode=True)
    assert isinstance(body, bytes)
    for needle in (call["external_call_unique_id"], "campaign not found",
                   f"callingest replay --cuid {call['_id']} --stage validator"):
        assert needle in body.decode()
    stored = await networks.notifications.find_one({"_id": f"{call['_id']}:1"})
    assert stored is not None and stored["to"] == "csm@example.com"

    duplicates = sent("duplicate")
    again = await step(call_failed(call), context(settings, networks, topics, call))
    assert not again.call_update
    assert sent("duplicate") == duplicates + 1
    assert len(mails_about(mail_dir, call["_id"])) == 1


async def test_network_without_csm_email_sends_nothing(networks: Any, settings: Settings,
                                                       topics: Topics, mail_dir: Path) -> None:
    call = call_doc(network_id="1002")
    before = sent("no_recipient")
    await step(call_failed(call, "1002"), context(settings, networks, topics, call))
    assert sent("no_recipient") == before + 1
    assert mails_about(mail_dir, call["_id"]) == []
    assert await networks.notifications.find_one({"_id": f"{call['_id']}:1"}) is None


async def test_smtp_unreachable_is_transient(networks: Any, settings: Settings, topics: Topics,
                                             mail_dir: Path) -> None:
    call = call_doc()
    closed = settings.model_copy(update={"smtp_port": free_port()})
    with pytest.raises(TransientError) as failed:
        await step(call_failed(call), context(closed, networks, topics, call))
    assert failed.value.failure_class == "SmtpUnavailable"
    assert await networks.notifications.find_one({"_id": f"{call['_id']}:1"}) is None


@pytest.fixture
def relay(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Relay]:
    """A relay requiring a login; ``@pytest.mark.parametrize("relay", [False], indirect=True)``:
    one that offers the login on the plain connection too."""
    server = Relay(tmp_path, login_needs_tls=getattr(request, "param", True))
    server.controller.start()
    yield server
    server.controller.stop()


def via(relay: Relay, settings: Settings, password: str = PASSWORD, **changes: Any) -> Settings:
    """``settings`` sending through ``relay`` with STARTTLS, trusting its CA, logging in."""
    return settings.model_copy(update={
        "smtp_host": "127.0.0.1", "smtp_port": relay.port, "smtp_starttls": True,
        "smtp_ca_file": str(relay.ca_file), "smtp_username": SecretStr(USERNAME),
        "smtp_password": SecretStr(password), **changes})


async def test_starttls_and_login_deliver(networks: Any, settings: Settings, topics: Topics,
                                          relay: Relay) -> None:
    call = call_doc()
    result = await step(call_failed(call), context(via(relay, settings), networks, topics, call))
    assert set(result.call_update or {}) == {"csm_notified_at"}
    assert relay.logins == [(USERNAME, PASSWORD, True)]  # after STARTTLS
    (message,) = relay.messages
    assert f"X-Callingest-Cuid: {call['_id']}".encode() in message


async def test_a_wrong_password_is_transient_and_not_quoted(
        networks: Any, settings: Settings, topics: Topics, relay: Relay) -> None:
    call = call_doc()
    wrong = "wrong-pw-0b6d2c"
    with pytest.raises(TransientError) as failed:
        await step(call_failed(call), context(via(relay, settings, wrong), networks, topics, call))
    assert failed.value.failure_class == "SmtpUnavailable"
    assert "SMTPAuthenticationError" in str(failed.value)
    assert relay.logins and all(login[1] == wrong and login[2] for login in relay.logins)
    for text in (str(failed.value), repr(failed.value), str(failed.value.__cause__)):
        assert wrong not in text and PASSWORD not in text
    assert relay.messages == []
    assert await networks.notifications.find_one({"_id": f"{call['_id']}:1"}) is None


async def test_an_untrusted_relay_gets_no_credentials(networks: Any, settings: Settings,
                                                      topics: Topics, relay: Relay) -> None:
    call = call_doc()
    system_cas = via(relay, settings, smtp_ca_file=None)  # the relay's CA is not among them
    with pytest.raises(TransientError) as failed:
        await step(call_failed(call), context(system_cas, networks, topics, call))
    assert "SSLCertVerificationError" in str(failed.value)
    assert relay.logins == [] and relay.messages == []


@pytest.mark.parametrize("relay", [False], indirect=True)
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # the point here
async def test_no_login_over_a_plain_connection_outside_dev(
        networks: Any, settings: Settings, topics: Topics, relay: Relay) -> None:
    call = call_doc()
    plain = via(relay, settings, smtp_starttls=False)
    await step(call_failed(call), context(plain, networks, topics, call))  # dev: allowed
    assert relay.logins == [(USERNAME, PASSWORD, False)]
    other = call_doc()
    production = plain.model_copy(update={"callingest_env": "production"})
    with pytest.raises(TransientError) as failed:
        await step(call_failed(other), context(production, networks, topics, other))
    assert str(failed.value.__cause__) == PLAIN_SMTP_LOGIN
    assert len(relay.logins) == 1 and len(relay.messages) == 1  # refused before connecting
