"""Webhooks, the parts several places share: events, secrets, signatures, the retry schedule.

Webhooks follow the Standard Webhooks specification (standardwebhooks.com): each event is
``POST``ed as ``{"type", "timestamp", "data": <call view>}`` with the headers
``webhook-id`` (the event id, the same on every retry), ``webhook-timestamp`` (unix seconds
of this attempt) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256>`` of
``"<id>.<timestamp>.<body>"`` keyed with the base64-decoded part of the ``whsec_`` secret).

The configuration (``callingest config apply``) validates secrets with :func:`secret_key`;
they are stored sealed (:data:`callingest.secretbox.WEBHOOKS`) and only the deliverer opens
them, at the moment it signs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import random
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from callingest.settings import Settings

EventType = Literal["call.normalized", "call.failed", "call.retrying"]
EVENT_TYPES: Final[tuple[str, ...]] = ("call.normalized", "call.failed", "call.retrying")

SECRET_PREFIX: Final = "whsec_"
MIN_KEY_BYTES: Final = 16
MAX_KEY_BYTES: Final = 64


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ValueError (naming no secret material) if malformed."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part of a webhook secret after {SECRET_PREFIX!r} must be base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a webhook secret's key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes "
                         f"(base64 after {SECRET_PREFIX!r}); generate one with "
                         "\"whsec_$(openssl rand -base64 32)\"")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature per secret, space-separated (the current one first, then those being
    rotated out), so receivers on either secret verify the delivery."""
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def event_id(event_type: str, cuid: str, attempt: int, detail: str = "") -> str:
    """The event's ``webhook-id``: derived from what happened, so a redelivered Kafka event
    (or a restarted deliverer) yields the same id and receivers can deduplicate on it."""
    kind = event_type.removeprefix("call.")
    return f"evt_{cuid}_{kind}_{attempt}" + (f"_{detail}" if detail else "")


def retry_delay(retry: int, first: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before retry number ``retry`` (1-based): ``first`` doubled each time up to
    ``cap``, with +-25 % jitter so receivers coming back are not hit by every sender at once."""
    base = min(first * 2 ** (retry - 1), cap)
    return base * (rng or random).uniform(0.75, 1.25)


def next_retry_in(attempts_made: int, age: float, settings: Settings,
                  rng: random.Random | None = None) -> float | None:
    """Seconds until the next attempt after ``attempts_made`` failed ones, of a delivery
    queued ``age`` seconds ago; None once ``WEBHOOK_RETRY_FOR_SECONDS`` have passed (given up)."""
    if age >= settings.webhook_retry_for_seconds:
        return None
    return retry_delay(attempts_made, settings.webhook_retry_first_seconds,
                       settings.webhook_retry_max_delay_seconds, rng)


def check_webhook_url(url: str, allow_loopback: bool = True) -> str:
    """``url`` if a webhook may be sent there, else ValueError with the reason.

    Only ``http``/``https`` with a host and no credentials; a host written as an address is
    decided by the same guard as recording URLs (:mod:`callingest.ssrf`), loopback only when
    ``allow_loopback``. Host names are not resolved here: the deliverer's connector checks
    the addresses it connects to on every attempt.
    """
    from yarl import URL

    from callingest.ssrf import AddressPolicy, AddressRefused, check_url

    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise ValueError("not a valid URL") from None
    if not parsed.is_absolute():
        raise ValueError("must be an absolute http(s) URL")
    if parsed.raw_user or parsed.raw_password:
        raise ValueError("must not carry credentials (user:password@); receivers verify the signature")
    try:
        check_url(parsed, AddressPolicy(allow_loopback=allow_loopback))
    except AddressRefused as exc:
        raise ValueError(f"refused: {exc}") from None
    return url
