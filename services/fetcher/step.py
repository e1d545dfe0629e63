"""The fetcher stage: CallValidated in, the recording stored in S3, RecordingFetched out.

Wiring: :class:`FetcherResources` (the type the stage graph names for the fetcher) holds
an SSRF-guarded aiohttp session, an aiobotocore S3 client, the address policy, the per-host
caps and circuit breakers (:mod:`services.fetcher.hosts`), the byte budget of recording
bodies and the keyring that opens sealed auth-config tokens; :func:`step` reads them from
``ctx.resources``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import ValidationError
from pymongo.asynchronous.database import AsyncDatabase

from callingest import s3 as s3io
from callingest.audioformat import FORMATS, SNIFF_BYTES, sniff_format
from callingest.config_file import NetworkSettings, RecordingAuthConfig
from callingest.errors import PermanentError, TransientError
from callingest.infra import Check, bucket_check
from callingest.logging import get_logger, register_secret
from callingest.s3 import s3_client
from callingest.secretbox import (
    RECORDING_AUTH_CONFIGS,
    SecretCodec,
    SecretInvalid,
    SecretUnavailable,
    load_keyring,
    open_item,
)
from callingest.settings import Settings
from callingest.ssrf import AddressPolicy, guarded_session
from callingest.steps import Resources, StageContext, StepResult
from services.fetcher.budget import ByteBudget
from services.fetcher.download import FetchPolicy, StoredRecording, fetch_recording
from services.fetcher.hosts import HostGuard, check_host
from services.fetcher.urls import redact_url

log = get_logger(__name__)

STAGE = "fetcher"


def raw_key(cuid: str, attempt: int) -> str:
    """The object key of a call's raw recording for one processing attempt."""
    return f"raw/{cuid}/{attempt}"


@dataclass
class FetcherResources(Resources):
    """What the fetcher's step uses, open for the life of the service."""

    http: aiohttp.ClientSession
    """SSRF-guarded: every connection goes through ``address_policy``."""
    s3: Any
    address_policy: AddressPolicy
    keyring: SecretCodec
    hosts: HostGuard | None = None
    memory: ByteBudget | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[FetcherResources]:
        keyring = load_keyring(settings)
        address_policy = AddressPolicy(allow_loopback=settings.allow_loopback_recordings)
        memory = ByteBudget(settings.fetch_memory_budget_bytes)
        hosts = HostGuard(settings.fetch_max_per_host, settings.fetch_circuit_failure_threshold,
                          settings.fetch_circuit_cooldown_seconds)
        # No pool-wide connection limit below the stage's own: a download waiting for a
        # pooled connection would hold its slot; per-host limits are the HostGuard's.
        async with s3_client(settings) as s3, guarded_session(
                address_policy, limit=settings.fetcher_max_in_flight) as http:
            yield cls(http=http, s3=s3, address_policy=address_policy, keyring=keyring,
                      hosts=hosts, memory=memory)

    def checks(self, settings: Settings) -> list[Check]:
        return [bucket_check(self.s3, settings.s3_bucket)]


async def load_recording_auth_config(db: AsyncDatabase[dict[str, Any]], network_id: str,
                                     config_id: str | None,
                                     keyring: SecretCodec) -> RecordingAuthConfig | None:
    """The network's recording auth config ``config_id`` (None when the call names none), its
    token opened with ``keyring`` for this download only.

    Raises PermanentError ``RecordingAuthConfigNotFound`` if the network no longer has it
    (the fix is to restore the config and replay), TransientError ``SecretKeyUnavailable``
    if it is sealed with a key not configured (the fix is to configure the key).
    """
    if config_id is None or config_id == "":
        return None
    doc = await db.networks.find_one({"_id": network_id})
    try:
        network = NetworkSettings.from_document(doc) if doc is not None else None
    except ValidationError:  # its text may quote a value
        raise PermanentError("RecordingAuthConfigInvalid",
                             f"the configuration of network {network_id} is invalid") from None
    config = network.recording_auth_config(str(config_id)) if network is not None else None
    if config is not None and doc is not None:
        stored = next(c for c in doc["recording_auth_configs"] if str(c.get("id")) == config.id)
        try:  # the read model holds no token: it is opened from the stored item, for this use
            opened = open_item(keyring, RECORDING_AUTH_CONFIGS, network_id, stored)
            auth = RecordingAuthConfig.model_validate({**config.model_dump(),
                                                       "token": opened["token"]})
        except ValidationError as exc:  # its text quotes the input: only the problems
            problems = "; ".join(str(err["msg"]) for err in exc.errors())
            raise PermanentError("RecordingAuthConfigInvalid",
                                 f"recording auth config {config_id}: {problems}") from None
        except SecretUnavailable as exc:
            raise TransientError(f"recording auth config {config_id}: {exc}",
                                 "SecretKeyUnavailable") from None
        except (ValueError, SecretInvalid) as exc:
            raise PermanentError("RecordingAuthConfigInvalid",
                                 f"recording auth config {config_id}: {exc}") from None
        register_secret(auth.token)
        return auth
    raise PermanentError(
        "RecordingAuthConfigNotFound",
        f"network {network_id} has no recording auth config {config_id}",
    )


async def _already_stored(s3: Any, bucket: str, key: str) -> StoredRecording | None:
    """The recording stored by an earlier run of this (cuid, attempt), if any."""
    head = await s3io.head(s3, bucket, key)
    if head is None:
        return None
    fmt = (head.get("Metadata") or {}).get("format")
    if fmt not in FORMATS:
        fmt = sniff_format(await s3io.read_range(s3, bucket, key, 0, SNIFF_BYTES - 1))
    if fmt is None:
        return None  # not something this stage wrote: download again over it
    return StoredRecording(bucket=bucket, key=key, size_bytes=int(head["ContentLength"]),
                           format=fmt)


async def step(event: dict[str, Any], ctx: StageContext[FetcherResources]) -> StepResult:
    """Store the call's recording at ``raw/<cuid>/<attempt>`` and describe it.

    Idempotent per (cuid, attempt): an object already at that key is reused without a
    second download. Raises PermanentError / TransientError as :mod:`.download` describes.
    """
    settings = ctx.settings
    cuid = str(event["cuid"])
    attempt = int(event.get("attempt", 1))
    network_id = str(event["network_id"])
    bucket = settings.s3_bucket
    key = raw_key(cuid, attempt)
    resources = ctx.resources
    s3 = resources.s3
    extra = {"cuid": cuid, "event_id": str(event.get("event_id")), "stage": STAGE}

    # A host that is refused now (circuit open, at its cap) costs no object-store or
    # database read: the call leaves its slot at once. A call never tried whose retry
    # deadline has passed gets one try whatever the circuit: none fails untried.
    last_chance = ctx.past_deadline and ctx.retry == 0
    await check_host(event["recording_url"], resources.hosts,
                     settings.fetch_host_wait_seconds, last_chance)
    stored = await _already_stored(s3, bucket, key)
    if stored is not None:
        log.info("recording already stored, reused", extra={**extra, "key": key})
    else:
        auth = await load_recording_auth_config(ctx.db, network_id,
                                                event.get("recording_auth_config_id"),
                                                resources.keyring)
        stored = await fetch_recording(
            event["recording_url"],
            auth=auth,
            http=resources.http,
            s3=s3,
            bucket=bucket,
            key=key,
            policy=FetchPolicy.from_settings(settings, memory=resources.memory),
            address_policy=resources.address_policy,
            log_extra=extra,
            hosts=resources.hosts,
            last_chance=last_chance,
        )
        log.info("recording fetched",
                 extra={**extra, "url": redact_url(event["recording_url"]), "key": key,
                        "size_bytes": stored.size_bytes, "format": stored.format})
    return StepResult(
        next_event={
            "bucket": stored.bucket,
            "key": stored.key,
            "size_bytes": stored.size_bytes,
            "format": stored.format,
            "call_direction": event["call_direction"],
        },
        call_update={"fetched": stored.as_document()},
    )
