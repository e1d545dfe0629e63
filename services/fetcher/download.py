"""Streaming a recording from its URL into the object store.

:func:`fetch_recording` is the whole download: http(s) through the SSRF-guarded aiohttp
session (:mod:`callingest.ssrf`), ``s3://`` through aiobotocore, redirects followed by
hand and checked hop by hop, the network's recording auth config applied, the format
sniffed from the first bytes, and the body streamed into S3 by
:func:`callingest.s3.upload` (one PUT up to its part size, a multipart upload aborted on
any failure above). Memory per download is bounded by about two parts (the buffer and the
part being sent), whatever the recording's length. ``callingest_fetched_bytes_total`` counts every byte
read from a source, failed attempts included.

Failures:

* :class:`~callingest.errors.PermanentError` at once: ``RecordingUnavailable`` (4xx other
  than 408/425/429, too many redirects, missing object), ``RecordingTooLarge`` (over
  ``fetch_max_bytes``, by Content-Length or while streaming), ``RecordingFormat`` (empty or
  not a recognized container), ``RecordingUrlRefused`` (SSRF guard, scheme, bucket not
  allowed).
* Timeouts, connection errors, 5xx, 408/425/429 are retried here with exponential backoff
  and full jitter (``Retry-After`` honoured) up to ``fetch_max_attempts`` (default 1: no
  in-place retry, the call goes straight to the consumer loop's delayed retry tiers and
  frees its slot), then raised as :class:`~callingest.errors.TransientError`, carrying the
  server's ``Retry-After`` so that the delayed retry waits at least that long (its tier).
  Object-store failures raise TransientError at once (botocore already retried).
* Timeouts that end hangs: ``connect_timeout`` to open the connection,
  ``first_byte_timeout`` from sending the request to the response headers (a black-hole
  host that accepts and never answers), ``read_timeout`` for a stall mid-body, and a
  minimum rate (``min_bytes_per_second`` over every ``read_timeout`` of waiting) that cuts
  a host trickling a byte a second.
* Per-host protection (:mod:`services.fetcher.hosts`), for http(s): a host whose circuit
  is open raises :class:`~callingest.errors.Refused` without connecting, with the class
  and message of the host's last real failure (``RecordingTimeout`` "timed out fetching
  http://host (host not contacted again: circuit open)"); a host at its concurrency cap
  raises :class:`~callingest.errors.Deferred` ``RecordingHostBusy``.

Secrets never reach a log line or an error message: URLs are shown through
:func:`redact_url`, headers are never logged, and third-party exception texts (which may
quote the full URL) are replaced by their type names.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError
from yarl import URL

from callingest import metrics
from callingest.audioformat import SNIFF_BYTES, sniff_format
from callingest.config_file import RecordingAuthConfig
from callingest.errors import PermanentError, TransientError
from callingest.logging import get_logger
from callingest.s3 import PART_SIZE
from callingest.s3 import upload as s3_upload
from callingest.settings import Settings
from callingest.ssrf import AddressPolicy, AddressRefused, check_url
from services.fetcher.budget import ByteBudget
from services.fetcher.hosts import HostGuard, Outcome, refusals_as_step_errors
from services.fetcher.pacing import backoff_delay, retry_after_seconds, watchdog
from services.fetcher.recording_auth import apply_auth
from services.fetcher.urls import origin, parse_url, redact_origin, redact_url

log = get_logger(__name__)

REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
RETRYABLE_4XX: Final = frozenset({408, 425, 429})
CONTENT_TYPES: Final = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "m4a": "audio/mp4",
}

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class FetchPolicy:
    """Limits of one download; :meth:`from_settings` for the service, smaller ones in tests."""

    max_bytes: int
    connect_timeout: float
    read_timeout: float
    max_attempts: int
    first_byte_timeout: float = 30.0
    min_bytes_per_second: float = 1024.0
    max_redirects: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 20.0
    #: A Retry-After longer than this is not waited for in-process: TransientError at once.
    max_retry_after: float = 60.0
    allowed_source_buckets: frozenset[str] = frozenset()
    #: Bodies in memory across all downloads of the process (None: unbounded).
    memory: ByteBudget | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> FetchPolicy:
        values: dict[str, Any] = {
            "max_bytes": settings.fetch_max_bytes,
            "connect_timeout": settings.fetch_connect_timeout_seconds,
            "read_timeout": settings.fetch_read_timeout_seconds,
            "first_byte_timeout": settings.fetch_first_byte_timeout_seconds,
            "min_bytes_per_second": settings.fetch_min_bytes_per_second,
            "max_attempts": settings.fetch_max_attempts,
            "max_redirects": settings.fetch_max_redirects,
            "allowed_source_buckets": frozenset(settings.s3_allowed_source_buckets),
        }
        values.update(overrides)
        return cls(**values)

    def client_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                     sock_read=self.read_timeout)


@dataclass(frozen=True)
class StoredRecording:
    """Where a recording was stored, its size in bytes and its sniffed container format."""

    bucket: str
    key: str
    size_bytes: int
    format: str

    def as_document(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key, "size_bytes": self.size_bytes,
                "format": self.format}


class _Retryable(Exception):
    """A failure worth another attempt; ``message`` is safe to log."""

    def __init__(self, failure_class: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.failure_class = failure_class
        self.message = message
        self.retry_after = retry_after


async def fetch_recording(
    recording_url: str,
    *,
    auth: RecordingAuthConfig | None,
    http: aiohttp.ClientSession,
    s3: Any,
    bucket: str,
    key: str,
    policy: FetchPolicy,
    address_policy: AddressPolicy,
    log_extra: Mapping[str, Any] | None = None,
    sleep: Sleep = asyncio.sleep,
    hosts: HostGuard | None = None,
    last_chance: bool = False,
) -> StoredRecording:
    """Download ``recording_url`` into ``s3://bucket/key``; see the module docstring.

    ``http`` must be a session from :func:`callingest.ssrf.guarded_session` built with
    the same ``address_policy`` (the connector makes the final address decision). Writes
    nothing under ``key`` unless the whole recording was read and recognized.
    ``last_chance``: see :meth:`HostGuard.admit`.
    """
    extra = {**(log_extra or {}), "url": redact_url(recording_url)}
    is_s3 = recording_url[:5].lower() == "s3://"
    for attempt in range(1, policy.max_attempts + 1):
        try:
            if is_s3:
                return await _fetch_s3_once(recording_url, s3=s3, bucket=bucket, key=key,
                                            policy=policy)
            if hosts is None:
                return await _fetch_http_once(recording_url, auth=auth, http=http, s3=s3,
                                              bucket=bucket, key=key, policy=policy,
                                              address_policy=address_policy)
            first = parse_url(recording_url)
            with refusals_as_step_errors():
                with hosts.admit(origin(first), redact_origin(first),
                                 last_chance) as outcome:
                    return await _fetch_http_once(recording_url, auth=auth, http=http, s3=s3,
                                                  bucket=bucket, key=key, policy=policy,
                                                  address_policy=address_policy,
                                                  outcome=outcome)
        except _Retryable as exc:
            if attempt >= policy.max_attempts:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""  # one: nothing to say
                raise TransientError(f"{exc.message}{tries}", exc.failure_class,
                                     exc.retry_after) from None
            if exc.retry_after is not None and exc.retry_after > policy.max_retry_after:
                raise TransientError(
                    f"{exc.message}; server asked to retry after {exc.retry_after:.0f} s",
                    exc.failure_class, exc.retry_after,
                ) from None
            delay = backoff_delay(attempt, policy.backoff_base, policy.backoff_cap)
            if exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
            log.warning("recording download failed, retrying",
                        extra={**extra, "attempt": attempt, "delay_seconds": round(delay, 3),
                               "failure_class": exc.failure_class, "reason": exc.message})
            await sleep(delay)
    raise AssertionError("unreachable: max_attempts >= 1")


async def _fetch_http_once(recording_url: str, *, auth: RecordingAuthConfig | None,
                           http: aiohttp.ClientSession, s3: Any, bucket: str, key: str,
                           policy: FetchPolicy, address_policy: AddressPolicy,
                           outcome: Outcome | None = None) -> StoredRecording:
    outcome = outcome or Outcome()
    first, auth_headers = apply_auth(parse_url(recording_url), auth)
    auth_origin = origin(first)
    url = first
    for _hop in range(policy.max_redirects + 1):
        shown = redact_url(url)
        try:
            check_url(url, address_policy)
        except AddressRefused as exc:
            raise PermanentError("RecordingUrlRefused",
                                 f"recording URL refused: {exc}") from None
        # Credentials go only to the origin they were configured for.
        headers = {"Accept-Encoding": "identity"}
        if origin(url) == auth_origin:
            headers.update(auth_headers)
        try:
            async with asyncio.timeout(policy.first_byte_timeout):
                response = await http.get(url, headers=headers, allow_redirects=False,
                                          timeout=policy.client_timeout())
            async with response as resp:
                outcome.alive()
                status = resp.status
                if status in REDIRECT_STATUSES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise PermanentError("RecordingUnavailable",
                                             f"HTTP {status} without Location from {shown}")
                    try:
                        url = url.join(parse_url(location))
                    except (PermanentError, ValueError):
                        raise PermanentError("RecordingUnavailable",
                                             f"HTTP {status} with an invalid Location from "
                                             f"{shown}") from None
                    continue
                _raise_for_status(status, resp.headers, shown)
                length = resp.content_length
                if length is not None and length > policy.max_bytes:
                    raise PermanentError(
                        "RecordingTooLarge",
                        f"recording is {length} bytes, over the {policy.max_bytes}-byte limit",
                    )
                chunks = watchdog(resp.content.iter_any(), policy.read_timeout,
                                   policy.min_bytes_per_second)
                if policy.memory is None:
                    return await _store(chunks, s3=s3, bucket=bucket, key=key, policy=policy,
                                        source=shown)
                # The buffer (with its growth), the copy sent with a single PUT and the
                # upload's own: about four times one part at most (measured, see
                # docs/benchmarks.md "End to end").
                async with policy.memory.reserve(4 * min(length or PART_SIZE, PART_SIZE)):
                    return await _store(chunks, s3=s3, bucket=bucket, key=key, policy=policy,
                                        source=shown)
        except AddressRefused as exc:
            raise PermanentError("RecordingUrlRefused", f"recording URL refused: {exc}") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise _dead(outcome, url, "RecordingTimeout", "timed out fetching {}") from None
        except aiohttp.InvalidURL:
            raise PermanentError("RecordingUrlRefused", f"invalid recording URL {shown}") from None
        except aiohttp.ClientConnectorDNSError:
            raise _dead(outcome, url, "RecordingConnectionError",
                        "could not resolve the host of {}") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise _dead(outcome, url, "RecordingConnectionError",
                        f"{type(exc).__name__} fetching {{}}") from None
    raise PermanentError("RecordingUnavailable",
                         f"more than {policy.max_redirects} redirects from {redact_url(first)}")


def _dead(outcome: Outcome, url: URL, failure_class: str, what: str) -> _Retryable:
    """The host did not answer: ``outcome`` told, with ``what`` naming the host only (the
    cause the calls its circuit refuses report: their URLs are not this one), and the
    failure to raise, naming the URL."""
    outcome.dead(failure_class, what.format(redact_origin(url)))
    return _Retryable(failure_class, what.format(redact_url(url)))


def _raise_for_status(status: int, headers: Mapping[str, str], shown: str) -> None:
    if 200 <= status < 300:
        return
    if status >= 500 or status in RETRYABLE_4XX:
        retry_after = retry_after_seconds(headers.get("Retry-After")) if status in (429, 503) else None
        failure = "RecordingRateLimited" if status == 429 else "RecordingServerError"
        raise _Retryable(failure, f"HTTP {status} from {shown}", retry_after)
    raise PermanentError("RecordingUnavailable", f"HTTP {status} from {shown}")


async def _fetch_s3_once(recording_url: str, *, s3: Any, bucket: str, key: str,
                         policy: FetchPolicy) -> StoredRecording:
    parts = urlsplit(recording_url)
    source_bucket = parts.netloc
    source_key = unquote(parts.path.lstrip("/"))
    shown = f"s3://{source_bucket}/{source_key}"
    if not source_bucket or not source_key:
        raise PermanentError("RecordingUrlRefused", "s3 recording URL needs a bucket and a key")
    if source_bucket not in policy.allowed_source_buckets:
        raise PermanentError("RecordingUrlRefused",
                             f"bucket {source_bucket!r} is not an allowed recording source")
    try:
        response = await s3.get_object(Bucket=source_bucket, Key=source_key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        http_status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if http_status >= 500 or http_status in RETRYABLE_4XX or code in (
            "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
            "ServiceUnavailable", "InternalError",
        ):
            raise _Retryable("RecordingServerError",
                             f"{code or http_status} from {shown}") from None
        raise PermanentError("RecordingUnavailable", f"{code or http_status} for {shown}") from None
    except (BotoCoreError, TimeoutError, aiohttp.ClientError) as exc:
        raise _Retryable("RecordingConnectionError",
                         f"{type(exc).__name__} fetching {shown}") from None
    body = response["Body"]
    try:
        length = response.get("ContentLength")
        if length is not None and length > policy.max_bytes:
            raise PermanentError(
                "RecordingTooLarge",
                f"recording is {length} bytes, over the {policy.max_bytes}-byte limit",
            )
        try:
            return await _store(body.iter_chunks(256 * 1024), s3=s3, bucket=bucket, key=key,
                                policy=policy, source=shown)
        except (BotoCoreError, TimeoutError, aiohttp.ClientError) as exc:
            raise _Retryable("RecordingConnectionError",
                             f"{type(exc).__name__} fetching {shown}") from None
    finally:
        body.close()


async def _store(chunks: AsyncIterator[bytes], *, s3: Any, bucket: str, key: str,
                 policy: FetchPolicy, source: str) -> StoredRecording:
    """Stream ``chunks`` into ``s3://bucket/key`` (:func:`callingest.s3.upload`), counting
    and limiting the bytes and sniffing the format from the first of them."""
    fmt: str | None = None

    def sniff(head: bytes, total: int) -> str:
        found = sniff_format(head[:SNIFF_BYTES])
        if found is None:
            what = "empty" if total == 0 else "not a recognized audio format"
            raise PermanentError("RecordingFormat", f"recording from {source} is {what} "
                                 "(supported: WAV, MP3, FLAC, OGG, M4A)")
        return found

    async def checked() -> AsyncIterator[bytes]:
        nonlocal fmt
        head = bytearray()
        total = 0
        async for chunk in chunks:
            total += len(chunk)
            metrics.BYTES_FETCHED.inc(len(chunk))
            if total > policy.max_bytes:
                raise PermanentError(
                    "RecordingTooLarge",
                    f"recording from {source} exceeds the {policy.max_bytes}-byte limit",
                )
            if fmt is None:
                head += chunk[:SNIFF_BYTES - len(head)]
                if len(head) >= SNIFF_BYTES:
                    fmt = sniff(bytes(head), total)
            yield chunk
        if fmt is None:
            fmt = sniff(bytes(head), total)

    def attributes() -> dict[str, Any]:
        assert fmt is not None
        return {"ContentType": CONTENT_TYPES[fmt], "Metadata": {"format": fmt}}

    size = await s3_upload(s3, bucket, key, checked(), attributes=attributes)
    assert fmt is not None
    return StoredRecording(bucket=bucket, key=key, size_bytes=size, format=fmt)
