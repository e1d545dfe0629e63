"""The notifier's step: one email to the network's customer success manager per failed attempt."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Any

from pymongo.errors import DuplicateKeyError

from callingest import metrics
from callingest.config_file import load_network
from callingest.errors import TransientError
from callingest.logging import get_logger
from callingest.settings import PLAIN_SMTP_LOGIN, Settings
from callingest.steps import NoResources, StageContext, StepResult

log = get_logger(__name__)


def compose(call: dict[str, Any], event: dict[str, Any], to: str, sender: str) -> EmailMessage:
    """The notification for ``event`` (a CallFailed record) about ``call``."""
    cuid = event["cuid"]
    stage = event["stage"]
    attempt = event.get("attempt", 1)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Call processing failed: {cuid} ({event['failure_class']} in {stage})"
    msg["Date"] = formatdate(usegmt=True)
    # One Message-ID per (cuid, attempt): if a notifier dies between sending and recording the
    # notification, the email sent again is the same message, which mail clients merge.
    domain = parseaddr(sender)[1].rpartition("@")[2] or "callingest"
    msg["Message-ID"] = f"<{cuid}.{attempt}@{domain}>"
    msg["X-Callingest-Cuid"] = cuid
    msg["X-Callingest-Attempt"] = str(attempt)
    msg.set_content(
        "A call submitted through the Call Ingestion API could not be processed.\n\n"
        f"cuid:                    {cuid}\n"
        f"external_call_unique_id: {call.get('external_call_unique_id', '(unknown)')}\n"
        f"network:                 {event['network_id']}\n"
        f"stage:                   {stage}\n"
        f"class:                   {event['failure_class']}\n"
        f"message:                 {event['message']}\n"
        f"attempt:                 {attempt}\n"
        f"retryable:               {'yes' if event.get('retryable') else 'no'}\n\n"
        "Once the recording is reachable again or the configuration is corrected, replay it:\n\n"
        f"    callingest replay --cuid {cuid} --stage {stage}\n"
    )
    return msg


def _send(settings: Settings, msg: EmailMessage) -> None:
    """Deliver ``msg``: STARTTLS first if configured (never a fall-back to plain), then the login
    if configured; outside the dev profile no login without STARTTLS (before connecting)."""
    if settings.smtp_plain_login:
        raise smtplib.SMTPNotSupportedError(PLAIN_SMTP_LOGIN)
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port,
                      timeout=settings.smtp_timeout_seconds) as smtp:
        if settings.smtp_starttls:
            smtp.starttls(context=ssl.create_default_context(cafile=settings.smtp_ca_file or None))
        if settings.smtp_username.get_secret_value():
            smtp.login(settings.smtp_username.get_secret_value(),
                       settings.smtp_password.get_secret_value())
        smtp.send_message(msg)


async def step(event: dict[str, Any], ctx: StageContext[NoResources]) -> StepResult:
    """Send the notification once per (cuid, attempt); SMTP trouble is transient (never dropped)."""
    cuid = event["cuid"]
    attempt = int(event.get("attempt", 1))
    key = f"{cuid}:{attempt}"
    if await ctx.db.notifications.find_one({"_id": key}) is not None:
        metrics.NOTIFICATIONS.labels("duplicate").inc()
        return StepResult()
    network = await load_network(ctx.db, event["network_id"])
    to = network.csm_email if network is not None else None
    if not to:
        log.warning("no csm_email configured; notification not sent",
                    extra={"cuid": cuid, "network_id": event["network_id"]})
        metrics.NOTIFICATIONS.labels("no_recipient").inc()
        return StepResult()
    msg = compose(ctx.call or {}, event, to, ctx.settings.smtp_from)
    try:
        await asyncio.to_thread(_send, ctx.settings, msg)
    except (OSError, smtplib.SMTPException) as exc:
        metrics.NOTIFICATIONS.labels("error").inc()
        raise TransientError(f"SMTP unavailable: {type(exc).__name__}", "SmtpUnavailable") from exc
    sent_at = datetime.now(UTC)
    try:
        await ctx.db.notifications.insert_one({"_id": key, "cuid": cuid, "attempt": attempt,
                                               "to": to, "sent_at": sent_at})
    except DuplicateKeyError:
        pass
    metrics.NOTIFICATIONS.labels("sent").inc()
    log.info("notification sent", extra={"cuid": cuid, "event_id": str(event["event_id"])})
    return StepResult(call_update={"csm_notified_at": sent_at})
