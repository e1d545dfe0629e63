"""Accepting a call: permission checks, validation, idempotent storage, publication.

:meth:`CallService.submit` is the whole of POST/PUT calls.json after the body
was read and the token resolved. Its answer is ``(created, cuid)``; every
refusal is an :class:`~services.gateway.errors.ApiError`.

Idempotency (per network, keyed by external_call_unique_id): the cuid is
derived from that key, and the first submission inserts the call; the
unique keys (_id, and the index on network_id + external_call_unique_id)
make a concurrent second insert fail as a duplicate, after which the stored
call's content hash decides: same content -> 202 with the stored cuid, other
content -> 409, unless the stored call ``failed``: then the new content replaces
it and is processed from the start (a correction, 201 with the same cuid). A 409 for a
call that failed before and is being processed again says why (its cuid and status), to a
token that may see the call; otherwise it is the spec's, telling nothing about the call.
Of concurrent corrections and retries of one failed call one restarts it; the others wait
until its event is acknowledged (409: already being processed again; 202 for the same
correction), or try again if it was undone (Kafka did not take it).
A 201 or 202 is only given once the call is stored and its CallSubmitted event
is acknowledged by Kafka; a new call's receipt is written in the background
after that (awaited only where a resubmission publishes it).

The path of a new call only inserts (the call, then its receipt), batched by
the :class:`~services.gateway.writer.CallWriter` (why: docs/architecture.md,
"Publication").
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cachetools import TTLCache
from pymongo.asynchronous.database import AsyncDatabase

from callingest import metrics, rules, tracing
from callingest.config_file import NetworkSettings, StoredCampaign, load_campaign, load_network
from callingest.kafka import PublishError
from callingest.logging import get_logger
from callingest.mongo import storable
from callingest.replay import NotRestartable, Restart, restart_failed_call, restart_published
from services.gateway.domain import Principal
from services.gateway.errors import (
    CampaignError,
    Conflict,
    NotAuthorized,
    NotFound,
    RecordInvalid,
    ServiceUnavailable,
    UnauthorizedAdvertiser,
    UnauthorizedOperation,
)
from services.gateway.models import ValidationContext
from services.gateway.publisher import PUBLISH_WAIT_SECONDS, CallPublisher, KafkaUnavailable
from services.gateway.validation import NormalizedCall, validate_submission
from services.gateway.writer import CallWriter

log = get_logger(__name__)

Document = dict[str, Any]
RETRY_AFTER_SECONDS = 5
#: How long a correction or retry that another one beat to a failed call waits for the
#: winner's event to be acknowledged (the winner waits as long for Kafka) or undone.
RESTART_SETTLE_SECONDS = PUBLISH_WAIT_SECONDS + 1.0
#: How many times a correction or retry tries again when the restart it lost to was undone.
RESTART_ROUNDS = 3
#: Entries of each configuration cache (networks; campaigns).
CACHE_SIZE = 10_000

# Fields of a stored call that a correction keeps (everything else is the new content).
_KEPT_ON_CORRECTION = frozenset({"_id", "status", "attempt", "published", "created_at", "history"})


CUID_NAMESPACE = uuid.UUID("0b6f5a52-3c1e-4f4e-8a3d-5f3a9c1e7d21")


def cuid_for(network_id: str, external_call_unique_id: str) -> str:
    """The cuid of a call: derived from its idempotency key, so a duplicate is found by _id."""
    return uuid.uuid5(CUID_NAMESPACE, f"{network_id}\x00{external_call_unique_id}").hex


class ConfigCache:
    """Networks and campaigns read from MongoDB, each cached for ``ttl`` seconds.

    Both caches are bounded (``size`` entries, least recently used dropped):
    a flood of unknown campaign ids cannot grow the gateway's memory.
    """

    def __init__(self, db: AsyncDatabase[Document], ttl: float, size: int = CACHE_SIZE) -> None:
        self._db = db
        self._networks: TTLCache[str, NetworkSettings | None] = TTLCache(size, ttl)
        self._campaigns: TTLCache[tuple[str, str], StoredCampaign | None] = TTLCache(size, ttl)

    async def network(self, network_id: str) -> NetworkSettings | None:
        """The network ``network_id``, or None if it is not configured."""
        if network_id in self._networks:
            return self._networks[network_id]
        network = self._networks[network_id] = await load_network(self._db, network_id)
        return network

    async def campaign(self, network_id: str, id_from_network: str) -> StoredCampaign | None:
        """The network's campaign ``id_from_network``, or None if it is not configured."""
        key = (network_id, id_from_network)
        if key in self._campaigns:
            return self._campaigns[key]
        campaign = self._campaigns[key] = await load_campaign(self._db, network_id,
                                                              id_from_network)
        return campaign


@dataclass(frozen=True)
class Submission:
    """The outcome of an accepted submission."""

    cuid: str
    created: bool


@dataclass(frozen=True)
class Lost:
    """Another correction or retry restarted the failed call first: the call as stored once
    that restart's event was acknowledged (``published``), or when the wait for it ended."""

    call: Document | None
    published: bool


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The call could not be queued for processing right now; retry the same request later.",
        retry_after=RETRY_AFTER_SECONDS,
    )


class CallService:
    """Submission and lookup of calls for authenticated principals."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        writer: CallWriter,
        config: ConfigCache,
        publisher: CallPublisher,
        allowed_s3_buckets: frozenset[str],
    ) -> None:
        self._calls = db.calls
        self._writer = writer
        self._config = config
        self._publisher = publisher
        self._allowed_s3_buckets = allowed_s3_buckets

    async def network_of(self, principal: Principal) -> NetworkSettings:
        """The principal's network; 401 if it vanished, 403 if call ingestion is disabled."""
        network = await self._config.network(principal.network_id)
        if network is None:
            raise NotAuthorized("Invalid or missing oauth token.")
        if not network.call_ingestion_enabled:
            raise UnauthorizedOperation()
        return network

    async def submit(self, principal: Principal, body: Document) -> Submission:
        """Check, validate, store and publish one call (see the module docstring)."""
        network = await self.network_of(principal)
        campaign, problem = await self._check_campaign(principal, network, body)
        try:
            call = validate_submission(body, ValidationContext(network, self._allowed_s3_buckets))
        except RecordInvalid as exc:
            if problem is None:
                raise
            # "package all of the issues together": the campaign's problem and the fields' in one 403
            raise RecordInvalid([f"'{CampaignError.error_class}' {problem}", *exc.problems]) from None
        if problem is not None:
            raise CampaignError(problem)
        try:
            return await self._store_and_publish(call, campaign, principal)
        except KafkaUnavailable:
            metrics.CALLS_SUBMITTED.labels("unavailable").inc()
            raise _unavailable() from None

    async def _check_campaign(
        self, principal: Principal, network: NetworkSettings, body: Document
    ) -> tuple[StoredCampaign | None, str | None]:
        """The campaign and its configuration problem (shared with the validator), if any;
        ``(None, None)`` when the id is missing or malformed (validation names it), unlooked-up.

        Another advertiser's campaign, or an unknown one, for a scoped token is refused here at
        once (403 UnauthorizedAdvertiser); a configuration problem is reported by :meth:`submit`
        together with the fields' problems.
        """
        call = body.get("call")
        raw = call.get("advertiser_campaign_id_from_network") if isinstance(call, dict) else None
        if (isinstance(raw, bool) or not isinstance(raw, str | int) or not str(raw).strip()
                or not storable(str(raw))):
            return None, None
        campaign = await self._config.campaign(network.id, str(raw).strip())
        # For a scoped token an unknown campaign is one it has no access to as well: answered
        # alike, so it cannot tell which campaign ids the network's other advertisers have.
        if (principal.advertisers is not None if campaign is None
                else not principal.may_use(campaign.advertiser_id)):
            raise UnauthorizedAdvertiser()
        return campaign, rules.campaign_problem(campaign)

    async def _store_and_publish(self, call: NormalizedCall, campaign: StoredCampaign | None,
                                 principal: Principal) -> Submission:
        content_hash = call.content_hash
        doc = self._document(call, content_hash, campaign)
        tracing.set_cuid(doc["_id"])
        if await self._writer.insert("calls", doc):
            await self._publisher.publish_new(doc)
            metrics.CALLS_SUBMITTED.labels("created").inc()
            log.info("call accepted", extra={"cuid": doc["_id"], "network_id": call.network_id})
            return Submission(cuid=doc["_id"], created=True)
        # A resubmission (rare): reads of ``calls`` scan the collection on the dev store.
        existing = await self._calls.find_one({"_id": doc["_id"]}) or await self._calls.find_one(
            {"network_id": call.network_id, "external_call_unique_id": call.external_call_unique_id}
        )
        for _ in range(RESTART_ROUNDS):
            if existing is None:  # the holder of the id vanished between insert and read
                return await self._store_and_publish(call, campaign, principal)
            if existing.get("content_hash") != content_hash:
                return await self._resubmitted(existing, doc, principal)
            settled = await self._settled(existing)
            if settled is existing:
                break
            existing = settled
        else:
            raise _unavailable()
        await self._publisher.ensure_published(existing)
        metrics.CALLS_SUBMITTED.labels("duplicate").inc()
        return Submission(cuid=existing["_id"], created=False)

    async def _settled(self, call: Document) -> Document | None:
        """``call`` itself once the restart that made its attempt (a correction may have stored
        the content a resubmission repeats) has its event acknowledged, or if it was never
        restarted; if that restart was undone, the call as stored now. 503 while the
        restart's publication is still under way after :data:`RESTART_SETTLE_SECONDS`."""
        attempt = int(call.get("attempt") or 1)
        if attempt == 1:
            return call
        published = await restart_published(self._calls, call["_id"], attempt,
                                            RESTART_SETTLE_SECONDS)
        if published is None:
            raise _unavailable()
        if published:
            return call
        current = await self._calls.find_one({"_id": call["_id"]})
        if current is not None and int(current.get("attempt") or 1) == attempt:
            return call  # no claim, yet the call is at that attempt: nothing to wait for
        return current

    async def _resubmitted(self, existing: Document, doc: Document,
                           principal: Principal) -> Submission:
        """Other content for a stored call: a correction if the call failed and the token may
        see it (same network; a scoped token: its advertisers'), else 409."""
        visible = (existing.get("network_id") == principal.network_id
                   and principal.may_use(str(existing.get("advertiser_id"))))
        if visible and existing.get("status") == "failed":
            return await self._correct(existing, doc)
        metrics.CALLS_SUBMITTED.labels("conflict").inc()
        if visible and int(existing.get("attempt") or 1) > 1:
            raise Conflict.not_correctable(existing["_id"], str(existing.get("status")))
        raise Conflict()  # the spec's answer: nothing about the call

    async def _correct(self, existing: Document, doc: Document) -> Submission:
        """Replace a failed call's content with ``doc``'s and process it from the start (201).

        If another correction or retry took the call first: 202 once the call has ``doc``'s
        content (a concurrent identical correction) and its event is acknowledged, else 409.
        """
        replace = {k: v for k, v in doc.items() if k not in _KEPT_ON_CORRECTION}
        outcome = await self._restart_first(existing, "correction", replace)
        if isinstance(outcome, Restart):
            metrics.CALLS_SUBMITTED.labels("corrected").inc()
            log.info("failed call corrected", extra={"cuid": existing["_id"],
                                                    "network_id": existing.get("network_id")})
            return Submission(cuid=existing["_id"], created=True)
        current = outcome.call
        if current is not None and current.get("content_hash") == doc["content_hash"]:
            if not outcome.published:
                raise _unavailable()
            metrics.CALLS_SUBMITTED.labels("duplicate").inc()
            return Submission(cuid=existing["_id"], created=False)
        metrics.CALLS_SUBMITTED.labels("conflict").inc()
        raise Conflict.restarted_first(existing["_id"])

    async def _restart_first(self, call: Document, source: str,
                             replace: Document | None = None) -> Restart | Lost:
        """Restart the failed ``call`` (:meth:`_restart`); if another correction or retry
        restarted it first, wait for that one's event to be acknowledged
        (:data:`RESTART_SETTLE_SECONDS` at most) and return the call as stored then. If that
        restart was undone (Kafka did not take its event), or the call read was stale (it
        has failed again since), the call is failed now: try again, a few times."""
        current: Document | None = call
        for _ in range(RESTART_ROUNDS):
            restarted = await self._restart(call, source, replace)
            if restarted is not None:
                return restarted
            attempt = int(call.get("attempt") or 1)
            published = await restart_published(self._calls, call["_id"], attempt + 1,
                                                RESTART_SETTLE_SECONDS)
            current = await self._calls.find_one({"_id": call["_id"]})
            if (current is None or current.get("status") != "failed"
                    or (published is not False and int(current.get("attempt") or 1) == attempt)):
                return Lost(current, published is True)
            call = current
        return Lost(current, False)

    async def _restart(self, call: Document, source: str,
                       replace: Document | None = None) -> Restart | None:
        """The shared restart of a failed call (callingest/replay.py); 503 if Kafka is down."""
        try:
            return await restart_failed_call(self._calls, call, self._publisher.send_stage_input,
                                             source=source, replace=replace)
        except (KafkaUnavailable, PublishError):
            raise _unavailable() from None

    async def retry(self, principal: Principal, cuid: str) -> Restart:
        """POST calls/{cuid}/retry.json: a failed call resumes from the stage that failed.

        404 for a call the principal cannot see, 409 for one that is not (or no longer) failed
        or that another retry or correction restarted first (answered once that one's event
        is acknowledged).
        """
        call = await self.find(principal, cuid)
        if call is None:
            raise NotFound("No such call.")
        if call.get("status") != "failed":
            raise Conflict(f"The call is {call.get('status')}, not failed; only a failed call "
                           "can be retried.")
        try:
            restarted = await self._restart_first(call, "retry")
        except NotRestartable as exc:
            raise Conflict(f"The call cannot be retried: {exc}.") from None
        if isinstance(restarted, Lost):
            raise Conflict.restarted_first()
        log.info("failed call retried", extra={"cuid": cuid, "stage": restarted.stage})
        return restarted

    def _document(self, call: NormalizedCall, content_hash: str,
                  campaign: StoredCampaign | None) -> Document:
        now = datetime.now(UTC)
        fields = call.canonical()
        return {
            "_id": cuid_for(call.network_id, call.external_call_unique_id),
            **fields,
            "start_time": call.start_time,
            "content_hash": content_hash,
            "advertiser_id": campaign.advertiser_id if campaign is not None else None,
            "status": "received",
            "attempt": 1,
            "published": False,  # publication is recorded as a receipt (see receipts.py)
            "created_at": now,
            "history": [{"stage": "gateway", "status": "received", "at": now}],
            # the submission's trace: its event carries it even when published later
            "trace_context": tracing.current_carrier(),
        }

    async def find(self, principal: Principal, cuid: str) -> Document | None:
        """The call ``cuid`` if the principal may see it (its network, its advertisers)."""
        if not storable(cuid):  # no call has such an id, and the store would refuse the query
            return None
        call = await self._calls.find_one({"_id": cuid})  # by _id alone (see writer.py)
        if call is None or call.get("network_id") != principal.network_id:
            return None
        if not principal.may_use(str(call.get("advertiser_id"))):
            return None
        return call
