"""Accepting a call: permission checks, validation, idempotent storage, publication.

:meth:`CallService.submit` is the whole of POST/PUT calls.json after the body
was read and the token resolved. Its answer is ``(created, cuid)``; every
refusal is an :class:`~services.gateway.errors.ApiError`.

Idempotency (per network, keyed by external_call_unique_id): the cuid is
derived from that key, and the first submission inserts the call; the
unique keys (_id, and the index on network_id + external_call_unique_id)
make a concurrent second insert fail as a duplicate, after which the stored
call's content hash decides: same content -> 202 with the stored cuid, other
content -> 409. A 201 or 202 is only given once the call is stored and its
CallSubmitted event is acknowledged by Kafka (and its receipt recorded).

The path of a new call only inserts (the call, then its receipt), batched by
the :class:`~services.gateway.writer.CallWriter`: on the dev store every
read or update of ``calls`` costs a scan of the collection.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from callingest import metrics, rules, tracing
from callingest.logging import get_logger
from services.gateway.domain import Network, Principal, campaign_key
from services.gateway.errors import (
    CampaignError,
    Conflict,
    NotAuthorized,
    ServiceUnavailable,
    UnauthorizedAdvertiser,
    UnauthorizedOperation,
)
from services.gateway.models import NormalizedCall, ValidationContext, validate_submission
from services.gateway.publisher import CallPublisher, KafkaUnavailable
from services.gateway.writer import CallWriter

log = get_logger(__name__)

Document = dict[str, Any]
RETRY_AFTER_SECONDS = 5


CUID_NAMESPACE = uuid.UUID("0b6f5a52-3c1e-4f4e-8a3d-5f3a9c1e7d21")


def cuid_for(network_id: str, external_call_unique_id: str) -> str:
    """The cuid of a call: derived from its idempotency key, so a duplicate is found by _id."""
    return uuid.uuid5(CUID_NAMESPACE, f"{network_id}\x00{external_call_unique_id}").hex


class ConfigCache:
    """Networks and campaigns read from MongoDB, cached for ``ttl`` seconds."""

    def __init__(self, db: AsyncDatabase[Document], ttl: float) -> None:
        self._db = db
        self._ttl = ttl
        self._networks: dict[str, tuple[float, Network | None]] = {}
        self._campaigns: dict[str, tuple[float, Document | None]] = {}

    async def network(self, network_id: str) -> Network | None:
        """The network ``network_id``, or None if it is not configured."""
        now = time.monotonic()
        cached = self._networks.get(network_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        doc = await self._db.networks.find_one({"_id": network_id})
        network = Network.from_document(doc) if doc is not None else None
        self._networks[network_id] = (now + self._ttl, network)
        return network

    async def campaign(self, network_id: str, id_from_network: str) -> Document | None:
        """The ``campaigns`` document of the network's campaign ``id_from_network``."""
        key = campaign_key(network_id, id_from_network)
        now = time.monotonic()
        cached = self._campaigns.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        doc = await self._db.campaigns.find_one({"_id": key})
        if doc is None:  # tolerate campaigns keyed otherwise: the pair is unique per network
            doc = await self._db.campaigns.find_one(
                {"network_id": network_id, "id_from_network": id_from_network}
            )
        if len(self._campaigns) > 10_000:
            self._campaigns.clear()
        self._campaigns[key] = (now + self._ttl, doc)
        return doc


@dataclass(frozen=True)
class Submission:
    """The outcome of an accepted submission."""

    cuid: str
    created: bool


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

    async def network_of(self, principal: Principal) -> Network:
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
        campaign = await self._check_campaign(principal, network, body)
        call = validate_submission(body, ValidationContext(network, self._allowed_s3_buckets))
        try:
            return await self._store_and_publish(call, campaign)
        except KafkaUnavailable:
            metrics.CALLS_SUBMITTED.labels("unavailable").inc()
            raise ServiceUnavailable(
                "The call could not be queued for processing right now; retry the same request later.",
                retry_after=RETRY_AFTER_SECONDS,
            ) from None

    async def _check_campaign(
        self, principal: Principal, network: Network, body: Document
    ) -> Document | None:
        """403s of the campaign; None when the id is missing or malformed (validation names it).

        Order: unknown campaign, another advertiser's campaign (scoped token),
        then the campaign configuration rules shared with the validator.
        """
        call = body.get("call")
        raw = call.get("advertiser_campaign_id_from_network") if isinstance(call, dict) else None
        if isinstance(raw, bool) or not isinstance(raw, str | int) or not str(raw).strip():
            return None
        campaign = await self._config.campaign(network.id, str(raw).strip())
        if campaign is not None and not principal.may_use(str(campaign.get("advertiser_id"))):
            raise UnauthorizedAdvertiser()
        problems = rules.campaign_problems(campaign)
        if problems:
            error_class, message = problems[0]
            raise CampaignError(message, error_class=error_class)
        return campaign

    async def _store_and_publish(self, call: NormalizedCall, campaign: Document | None) -> Submission:
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
        if existing is None:  # the holder of the id vanished between insert and read
            return await self._store_and_publish(call, campaign)
        if existing.get("content_hash") != content_hash:
            metrics.CALLS_SUBMITTED.labels("conflict").inc()
            raise Conflict()
        await self._publisher.ensure_published(existing)
        metrics.CALLS_SUBMITTED.labels("duplicate").inc()
        return Submission(cuid=existing["_id"], created=False)

    def _document(self, call: NormalizedCall, content_hash: str, campaign: Document | None) -> Document:
        now = datetime.now(UTC)
        fields = call.canonical()
        return {
            "_id": cuid_for(call.network_id, call.external_call_unique_id),
            **fields,
            "start_time": call.start_time,
            "content_hash": content_hash,
            "advertiser_id": str(campaign["advertiser_id"]) if campaign is not None else None,
            "status": "received",
            "attempt": 1,
            "published": False,  # publication is recorded as a receipt (see publisher.py)
            "created_at": now,
            "history": [{"stage": "gateway", "status": "received", "at": now}],
            # the submission's trace: its event carries it even when published later
            "trace_context": tracing.current_carrier(),
        }

    async def find(self, principal: Principal, cuid: str) -> Document | None:
        """The call ``cuid`` if the principal may see it (its network, its advertisers)."""
        call = await self._calls.find_one({"_id": cuid})  # by _id alone (see writer.py)
        if call is None or call.get("network_id") != principal.network_id:
            return None
        if not principal.may_use(str(call.get("advertiser_id"))):
            return None
        return call
