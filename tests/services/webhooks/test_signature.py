"""Signatures: what the deliverer signs verifies with docs/webhooks.md's example and with the
reference library (PyPI standardwebhooks); tampering, another secret or an old timestamp fail."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from callingest.webhooks import secret_key, sign
from tests.services.webhooks.conftest import doc_snippets, doc_verify, new_secret


def _signed(secret: str, body: bytes, stamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if stamp is None else stamp
    return {"Content-Type": "application/json", "webhook-id": "evt_abc_failed_1",
            "webhook-timestamp": str(stamp), "webhook-signature": sign(secret, "evt_abc_failed_1",
                                                                       stamp, body)}


def test_the_contract_example_secret_signs_like_the_reference_library() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"type":"call.failed"}'
    from datetime import UTC, datetime

    expected = Webhook(secret).sign("msg_1", datetime.fromtimestamp(1700000000, UTC), body.decode())
    assert sign(secret, "msg_1", 1700000000, body) == expected


def test_docs_example_and_reference_library_accept_our_signature_and_refuse_forgeries() -> None:
    verify = doc_verify()
    secret = new_secret()
    body = json.dumps({"type": "call.failed", "timestamp": "2026-11-30T12:00:00.000Z",
                       "data": {"cuid": "abc", "status": "failed"}}).encode()
    headers = _signed(secret, body)
    assert verify(secret, headers, body)
    assert Webhook(secret).verify(body, headers)["type"] == "call.failed"

    tampered = body.replace(b"failed", b"normalized")
    assert not verify(secret, headers, tampered)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, headers)
    other = new_secret()
    assert not verify(other, headers, body)
    stale = _signed(secret, body, stamp=int(time.time()) - 3600)
    assert not verify(secret, stale, body)
    # A rotation header with several signatures passes when one of them matches.
    rotating = {**headers, "webhook-signature": f"v1,AAAA {headers['webhook-signature']}"}
    assert verify(secret, rotating, body)
    assert Webhook(secret).verify(body, rotating)


def test_the_reference_library_snippet_in_the_docs_runs() -> None:
    secret = new_secret()
    body = b'{"type":"call.normalized","timestamp":"2026-11-30T12:00:00.000Z","data":{}}'
    namespace: dict[str, Any] = {"secret": secret, "body": body, "headers": _signed(secret, body)}
    exec(doc_snippets()[1], namespace)
    assert namespace["payload"]["type"] == "call.normalized"


@pytest.mark.parametrize(("secret", "problem"), [
    ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
    ("whsec_not*base64*at*all", "must be base64"),
    ("whsec_c2hvcnQ=", "16 to 64 bytes"),
])
def test_malformed_secrets_are_refused_without_echoing_them(secret: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        secret_key(secret)
    assert problem in str(info.value)
    assert secret not in str(info.value)
