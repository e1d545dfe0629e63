"""Downloads from local aiohttp servers on 127.0.0.1 into the real S3 store."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from callingest import metrics
from callingest.config_file import RecordingAuthConfig
from callingest.errors import PermanentError, TransientError
from callingest.s3 import PART_SIZE
from callingest.ssrf import AddressPolicy, guarded_session
from services.fetcher.download import (
    StoredRecording,
    apply_auth,
    fetch_recording,
    parse_url,
    redact_origin,
    redact_url,
)
from tests.helpers import parts_count
from tests.services.fetcher.conftest import (
    LOOPBACK_OK,
    RecordingServer,
    Store,
    StubResolver,
    Tripwire,
    fast_policy,
    hang,
    reset_connection,
    sequence,
    serve,
    serve_chunked,
    trickle,
    wav_bytes,
)

pytestmark = pytest.mark.s3

TOKEN = "tok-5ecret-Zq81xv"
WAV = wav_bytes(20_000)


async def fetch(url: str, http: aiohttp.ClientSession, store: Store, key: str,
                auth: RecordingAuthConfig | None = None,
                address_policy: AddressPolicy = LOOPBACK_OK, **policy: Any) -> StoredRecording:
    return await fetch_recording(url, auth=auth, http=http, s3=store.client, bucket=store.bucket,
                                 key=key, policy=fast_policy(**policy),
                                 address_policy=address_policy)


def bytes_fetched() -> float:
    return metrics.BYTES_FETCHED._value.get()


# -- success -------------------------------------------------------------------------------

async def test_wav_stored(server: RecordingServer, http: aiohttp.ClientSession, store: Store,
                          key: str) -> None:
    before = bytes_fetched()
    url = server.route("/rec.mp3", serve(WAV, headers={"Content-Type": "text/html"}))
    stored = await fetch(url, http, store, key)
    assert stored == StoredRecording(store.bucket, key, len(WAV), "wav")
    assert await store.get(key) == WAV
    head = await store.client.head_object(Bucket=store.bucket, Key=key)
    assert head["Metadata"]["format"] == "wav"
    assert bytes_fetched() - before == len(WAV)


async def test_chunked_small_recording_single_put(server: RecordingServer,
                                                  http: aiohttp.ClientSession, store: Store,
                                                  key: str) -> None:
    url = server.route("/chunked", serve_chunked(WAV, chunk=1000))
    stored = await fetch(url, http, store, key)
    assert stored.size_bytes == len(WAV)
    assert await store.get(key) == WAV


@pytest.mark.slow
async def test_large_recording_multipart(server: RecordingServer, http: aiohttp.ClientSession,
                                         store: Store, key: str) -> None:
    body = wav_bytes(2 * PART_SIZE + 123_457)
    url = server.route("/big.wav", serve_chunked(body, chunk=256 * 1024))
    stored = await fetch(url, http, store, key)
    assert stored.size_bytes == len(body)
    head = await store.client.head_object(Bucket=store.bucket, Key=key)
    assert head["ContentLength"] == len(body)
    # three parts: 8 MiB, 8 MiB, remainder
    assert await parts_count(store.client, store.bucket, key) == 3
    data = await store.get(key)
    assert data is not None
    assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest()
    assert await store.open_uploads(key) == []


@pytest.mark.slow
async def test_multipart_aborted_when_source_breaks(server: RecordingServer,
                                                    http: aiohttp.ClientSession, store: Store,
                                                    key: str) -> None:
    body = wav_bytes(3 * PART_SIZE)

    async def breaks(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[: PART_SIZE + PART_SIZE // 2])
        assert request.transport is not None
        request.transport.abort()
        return resp

    url = server.route("/breaks.wav", breaks)
    with pytest.raises(TransientError) as info:
        await fetch(url, http, store, key, max_attempts=2)
    assert info.value.failure_class == "RecordingConnectionError"
    assert len(server.hits) == 2
    assert await store.get(key) is None
    assert await store.open_uploads(key) == []


async def test_redirect_followed(server: RecordingServer, http: aiohttp.ClientSession,
                                 store: Store, key: str) -> None:
    server.route("/final.wav", serve(WAV))
    url = server.route("/start", serve(b"", status=302, headers={"Location": "/final.wav"}))
    stored = await fetch(url, http, store, key)
    assert stored.size_bytes == len(WAV)
    assert [h.path for h in server.hits] == ["/start", "/final.wav"]


async def test_presigned_url_used_as_given(server: RecordingServer, http: aiohttp.ClientSession,
                                           store: Store, key: str) -> None:
    query = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101%2Fus-east-1"
             "&X-Amz-Signature=ab%2Bcd%3D%3D&empty=&X-Amz-Expires=300")
    server.route("/bucket/rec one.wav", serve(WAV))
    await fetch(server.url(f"/bucket/rec%20one.wav?{query}"), http, store, key)
    assert [h.raw_path for h in server.hits] == [f"/bucket/rec%20one.wav?{query}"]


# -- retries -------------------------------------------------------------------------------

async def test_500_500_200_succeeds(server: RecordingServer, http: aiohttp.ClientSession,
                                    store: Store, key: str) -> None:
    url = server.route("/flaky", sequence(serve(b"no", 500), serve(b"no", 502), serve(WAV)))
    stored = await fetch(url, http, store, key, max_attempts=3)
    assert stored.size_bytes == len(WAV)
    assert len(server.hits) == 3


async def test_5xx_exhausted_is_transient(server: RecordingServer, http: aiohttp.ClientSession,
                                          store: Store, key: str) -> None:
    url = server.route("/down", serve(b"no", 503))
    with pytest.raises(TransientError) as info:
        await fetch(url, http, store, key, max_attempts=3)
    assert info.value.failure_class == "RecordingServerError"
    assert "HTTP 503" in info.value.message and info.value.message.endswith("(after 3 attempts)")
    assert len(server.hits) == 3
    assert await store.get(key) is None
    with pytest.raises(TransientError) as info:
        await fetch(url, http, store, key, max_attempts=1)
    assert info.value.message.endswith("HTTP 503 from " + url)  # one try: no count to add


async def test_429_retry_after_honoured(server: RecordingServer, http: aiohttp.ClientSession,
                                        store: Store, key: str) -> None:
    url = server.route("/limited", sequence(
        serve(b"slow down", 429, headers={"Retry-After": "1"}), serve(WAV)))
    stored = await fetch(url, http, store, key, max_attempts=2)
    assert stored.size_bytes == len(WAV)
    first, second = server.hits
    assert second.at - first.at >= 1.0


async def test_long_retry_after_left_to_the_pipeline(server: RecordingServer,
                                                     http: aiohttp.ClientSession, store: Store,
                                                     key: str) -> None:
    url = server.route("/later", serve(b"", 429, headers={"Retry-After": "3600"}))
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        await fetch(url, http, store, key, max_attempts=4)
    assert time.monotonic() - started < 1.0
    assert info.value.failure_class == "RecordingRateLimited"
    assert info.value.retry_after == 3600  # for the pipeline's delayed retry to honour
    assert len(server.hits) == 1
    with pytest.raises(TransientError) as info:  # the default: one try, the rest is the pipeline's
        await fetch(url, http, store, key, max_attempts=1)
    assert info.value.retry_after == 3600


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451])
async def test_other_4xx_permanent_at_once(server: RecordingServer, http: aiohttp.ClientSession,
                                           store: Store, key: str, status: int) -> None:
    url = server.route("/gone", serve(b"", status))
    with pytest.raises(PermanentError) as info:
        await fetch(url, http, store, key, max_attempts=3)
    assert info.value.failure_class == "RecordingUnavailable"
    assert f"HTTP {status}" in info.value.message
    assert len(server.hits) == 1


async def test_hang_read_timeout(server: RecordingServer, http: aiohttp.ClientSession,
                                 store: Store, key: str) -> None:
    url = server.route("/hang", hang())
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        await fetch(url, http, store, key, read_timeout=0.3, max_attempts=2)
    assert info.value.failure_class == "RecordingTimeout"
    assert 0.6 <= time.monotonic() - started < 3.0
    assert len(server.hits) == 2


async def test_reset_connection_retried(server: RecordingServer, http: aiohttp.ClientSession,
                                        store: Store, key: str) -> None:
    url = server.route("/reset", sequence(reset_connection(), serve(WAV)))
    stored = await fetch(url, http, store, key, max_attempts=2)
    assert stored.size_bytes == len(WAV)
    assert len(server.hits) == 2


async def test_reset_connection_exhausted(server: RecordingServer, http: aiohttp.ClientSession,
                                          store: Store, key: str) -> None:
    url = server.route("/reset", reset_connection())
    with pytest.raises(TransientError) as info:
        await fetch(url, http, store, key, max_attempts=2)
    assert info.value.failure_class == "RecordingConnectionError"


async def test_connection_refused_is_transient(http: aiohttp.ClientSession, store: Store,
                                               key: str) -> None:
    from tests.conftest import free_port
    with pytest.raises(TransientError) as info:
        await fetch(f"http://127.0.0.1:{free_port()}/a.wav", http, store, key, max_attempts=2)
    assert info.value.failure_class == "RecordingConnectionError"


async def test_trickle_one_byte_per_second_times_out(server: RecordingServer,
                                                     http: aiohttp.ClientSession, store: Store,
                                                     key: str) -> None:
    url = server.route("/trickle", trickle(1.0))
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        await fetch(url, http, store, key, read_timeout=0.5, max_attempts=1)
    assert info.value.failure_class == "RecordingTimeout"
    assert time.monotonic() - started < 3.0


async def test_trickle_faster_than_read_timeout_still_times_out(
    server: RecordingServer, http: aiohttp.ClientSession, store: Store, key: str
) -> None:
    """A byte every 0.1 s never trips the per-read timeout; the throughput watchdog does."""
    url = server.route("/drip", trickle(0.1))
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        await fetch(url, http, store, key, read_timeout=0.5, max_attempts=1)
    assert info.value.failure_class == "RecordingTimeout"
    assert time.monotonic() - started < 3.0
    assert await store.get(key) is None


# -- auth configs --------------------------------------------------------------------------

def require(check: Any) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        if not check(request):
            return web.Response(status=401, text="credential required")
        return web.Response(body=WAV)
    return handler


AUTH_CASES = [
    (RecordingAuthConfig(id="7", method="bearer_header", token=TOKEN),
     lambda r: r.headers.get("Authorization") == f"Bearer {TOKEN}"),
    (RecordingAuthConfig(id="8", method="query_param", token=TOKEN, name="access_token"),
     lambda r: r.query.get("access_token") == TOKEN and r.query.get("v") == "1"),
    (RecordingAuthConfig(id="9", method="custom_header", token=TOKEN, name="X-Api-Key"),
     lambda r: r.headers.get("X-Api-Key") == TOKEN),
]


@pytest.mark.parametrize(("auth", "check"), AUTH_CASES, ids=lambda c: getattr(c, "method", ""))
async def test_auth_methods(server: RecordingServer, http: aiohttp.ClientSession, store: Store,
                            key: str, auth: RecordingAuthConfig, check: Any,
                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.route("/secure.wav", require(check))
    url = server.url("/secure.wav?v=1")
    with pytest.raises(PermanentError) as info:
        await fetch(url, http, store, key)
    assert info.value.failure_class == "RecordingUnavailable"
    assert "HTTP 401" in info.value.message
    wrong = auth.model_copy(update={"token": "wrong-token"})
    with pytest.raises(PermanentError):
        await fetch(url, http, store, key, auth=wrong)
    stored = await fetch(url, http, store, key, auth=auth)
    assert stored.size_bytes == len(WAV)
    assert TOKEN not in caplog.text
    assert TOKEN not in str(info.value)


async def test_secrets_not_logged_on_failures(server: RecordingServer,
                                              http: aiohttp.ClientSession, store: Store,
                                              key: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.route("/down", serve(b"", 500))
    auth = RecordingAuthConfig(id="8", method="query_param", token=TOKEN, name="access_token")
    presigned = server.url("/down?X-Amz-Signature=presigned5ecret")
    with pytest.raises(TransientError) as info:
        await fetch(presigned, http, store, key, auth=auth, max_attempts=3)
    assert "retrying" in caplog.text  # the retries were logged ...
    for secret in (TOKEN, "presigned5ecret", "X-Amz-Signature", "access_token"):
        assert secret not in caplog.text  # ... without the query string
        assert secret not in info.value.message
    header_auth = RecordingAuthConfig(id="7", method="bearer_header", token=TOKEN)
    with pytest.raises(TransientError) as info:
        await fetch(server.url("/down"), http, store, key, auth=header_auth, max_attempts=2)
    assert TOKEN not in caplog.text
    assert TOKEN not in info.value.message


async def test_credentials_not_sent_to_another_origin(
    server: RecordingServer, other_server: RecordingServer, http: aiohttp.ClientSession,
    store: Store, key: str
) -> None:
    other_server.route("/cdn.wav", serve(WAV))
    url = server.route("/rec", serve(b"", 307, headers={"Location": other_server.url("/cdn.wav")}))
    for auth in (RecordingAuthConfig(id="7", method="bearer_header", token=TOKEN),
                 RecordingAuthConfig(id="9", method="custom_header", token=TOKEN, name="X-Api-Key")):
        await fetch(url, http, store, key, auth=auth)
    assert server.hits[0].headers.get("Authorization") == f"Bearer {TOKEN}"
    assert server.hits[1].headers.get("X-Api-Key") == TOKEN
    for hit in other_server.hits:
        assert TOKEN not in str(hit.headers)


def test_apply_auth_query_param_keeps_existing_query() -> None:
    url = parse_url("https://h.example/a%2Fb.wav?sig=a%2Fb%3D&x=1#frag")
    auth = RecordingAuthConfig(id="8", method="query_param", token="t/k=n", name="access_token")
    new, headers = apply_auth(url, auth)
    assert headers == {}
    assert str(new) == "https://h.example/a%2Fb.wav?sig=a%2Fb%3D&x=1&access_token=t%2Fk%3Dn"


def test_auth_config_repr_hides_token() -> None:
    assert TOKEN not in repr(RecordingAuthConfig(id="7", method="bearer_header", token=TOKEN))


@pytest.mark.parametrize(
    "doc",
    [
        {"id": 1, "method": "basic", "token": TOKEN},
        {"id": 1, "method": "bearer_header", "token": ""},
        {"id": 1, "method": "query_param", "token": TOKEN},
        {"id": 1, "method": "custom_header", "name": "X-Key", "token": "a\r\nX-Injected: 1"},
    ],
)
def test_unusable_auth_configs_rejected(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        RecordingAuthConfig.model_validate(doc)
    assert TOKEN not in "; ".join(err["msg"] for err in info.value.errors())  # what is shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@h.example:8443/p/a.wav?token=x#f", "https://h.example:8443/p/a.wav"),
        ("http://h.example/a.wav?X-Amz-Signature=s", "http://h.example/a.wav"),
        ("http://[::1]:8080/a?b", "http://[::1]:8080/a"),
        ("s3://bucket/key.wav?versionId=3", "s3://bucket/key.wav"),
        ("https://h.example/rec;v=2/a.wav;jsessionid=s3cr3t?x=1", "https://h.example/rec/a.wav"),
        ("http://h.example:99999/", "<unparseable URL>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://[::1]:18102/a.wav?token=x", "http://[::1]:18102"),
        ("https://[2001:db8::7]/a.wav", "https://[2001:db8::7]:443"),
        ("https://H.example:8443/a.wav", "https://h.example:8443"),
    ],
)
def test_redact_origin_writes_ipv6_hosts_in_brackets(url: str, shown: str) -> None:
    """What the circuit breaker's log lines and refusals name: not "http://::1:18102"."""
    assert redact_origin(parse_url(url)) == shown


# -- size, format --------------------------------------------------------------------------

async def test_oversize_by_content_length(server: RecordingServer, http: aiohttp.ClientSession,
                                          store: Store, key: str) -> None:
    before = bytes_fetched()
    url = server.route("/huge.wav", serve(wav_bytes(5000)))
    with pytest.raises(PermanentError) as info:
        await fetch(url, http, store, key, max_bytes=4096)
    assert info.value.failure_class == "RecordingTooLarge"
    assert bytes_fetched() == before  # refused on the header, before reading the body
    assert await store.get(key) is None


async def test_oversize_streamed_without_length(server: RecordingServer,
                                                http: aiohttp.ClientSession, store: Store,
                                                key: str) -> None:
    url = server.route("/huge", serve_chunked(wav_bytes(50_000), chunk=4096))
    with pytest.raises(PermanentError) as info:
        await fetch(url, http, store, key, max_bytes=20_000)
    assert info.value.failure_class == "RecordingTooLarge"
    assert len(server.hits) == 1
    assert await store.get(key) is None


@pytest.mark.slow
async def test_oversize_streamed_after_multipart_started(
    server: RecordingServer, http: aiohttp.ClientSession, store: Store, key: str
) -> None:
    url = server.route("/huger", serve_chunked(wav_bytes(PART_SIZE * 2), chunk=256 * 1024))
    with pytest.raises(PermanentError) as info:
        await fetch(url, http, store, key, max_bytes=PART_SIZE + PART_SIZE // 2)
    assert info.value.failure_class == "RecordingTooLarge"
    assert await store.get(key) is None
    assert await store.open_uploads(key) == []


@pytest.mark.parametrize(
    "body",
    [b"", b"<html><body>Access denied</body></html>" * 20, b"\0" * 10_000,
     b"RIFF\x10\x00\x00\x00AVI LIST"],
    ids=["empty", "html", "zeros", "avi"],
)
async def test_unrecognized_format(server: RecordingServer, http: aiohttp.ClientSession,
                                   store: Store, key: str, body: bytes) -> None:
    url = server.route("/rec.wav", serve(body, headers={"Content-Type": "audio/wav"}))
    with pytest.raises(PermanentError) as info:
        await fetch(url, http, store, key, max_attempts=3)
    assert info.value.failure_class == "RecordingFormat"
    assert len(server.hits) == 1
    assert await store.get(key) is None


async def test_format_sniffed_not_from_extension(server: RecordingServer,
                                                 http: aiohttp.ClientSession, store: Store,
                                                 key: str) -> None:
    mp3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" + b"\0" * 5000
    url = server.route("/rec.wav", serve(mp3, headers={"Content-Type": "audio/wav"}))
    stored = await fetch(url, http, store, key)
    assert stored.format == "mp3"


# -- SSRF in the download path -------------------------------------------------------------

@pytest.mark.parametrize(
    "location",
    ["http://169.254.169.254/latest/meta-data/iam/security-credentials/",
     "http://10.0.0.1/a.wav", "http://[fd00:ec2::254]/", "http://0xa9fea9fe/",
     "http://[::ffff:10.0.0.1]/", "http://evil.test/a.wav", "http://metadata.google.internal/",
     "file:///etc/passwd", "ftp://127.0.0.1/a.wav"],
)
async def test_redirect_to_refused_address(server: RecordingServer, store: Store, key: str,
                                           tripwire: Tripwire, location: str) -> None:
    stub = StubResolver({"evil.test": ["10.0.0.1"]})
    url = server.route("/r", serve(b"", 302, headers={"Location": location}))
    async with guarded_session(LOOPBACK_OK, resolver=stub) as http:
        with pytest.raises(PermanentError) as info:
            await fetch(url, http, store, key, max_attempts=3)
    assert info.value.failure_class == "RecordingUrlRefused"
    assert len(server.hits) == 1
    assert tripwire.attempted_except(store.port) == ["127.0.0.1"]
    assert await store.get(key) is None


async def test_name_resolving_to_private_refused_in_download(
    server: RecordingServer, store: Store, key: str, tripwire: Tripwire
) -> None:
    stub = StubResolver({"evil.test": ["192.168.0.10"]})
    async with guarded_session(LOOPBACK_OK, resolver=stub) as http:
        with pytest.raises(PermanentError) as info:
            await fetch(f"http://evil.test:{server.port}/a.wav", http, store, key)
    assert info.value.failure_class == "RecordingUrlRefused"
    assert "private" in info.value.message
    assert tripwire.attempted_except(store.port) == []


async def test_loopback_refused_outside_dev(server: RecordingServer, store: Store, key: str,
                                            tripwire: Tripwire) -> None:
    strict = AddressPolicy(allow_loopback=False)
    url = server.route("/a.wav", serve(WAV))
    async with guarded_session(strict) as http:
        for spelling in (url, url.replace("127.0.0.1", "2130706433"),
                         url.replace("127.0.0.1", "0177.0.0.1"),
                         url.replace("127.0.0.1", "0x7f.1")):
            with pytest.raises(PermanentError) as info:
                await fetch(spelling, http, store, key, address_policy=strict)
            assert info.value.failure_class == "RecordingUrlRefused"
    assert tripwire.attempted_except(store.port) == []
    assert server.hits == []


async def test_too_many_redirects(server: RecordingServer, http: aiohttp.ClientSession,
                                  store: Store, key: str) -> None:
    url = server.route("/loop", serve(b"", 302, headers={"Location": "/loop"}))
    with pytest.raises(PermanentError) as info:
        await fetch(url, http, store, key, max_redirects=3)
    assert info.value.failure_class == "RecordingUnavailable"
    assert len(server.hits) == 4


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/a.wav", "not a url", "file:///tmp/a.wav",
                                 "http://"])
async def test_bad_urls_refused(http: aiohttp.ClientSession, store: Store, key: str,
                                url: str) -> None:
    with pytest.raises(PermanentError) as info:
        await fetch(url, http, store, key)
    assert info.value.failure_class == "RecordingUrlRefused"


# -- s3:// sources -------------------------------------------------------------------------

@pytest.fixture
async def source_bucket(store: Store) -> AsyncIterator[str]:
    bucket = f"fetcher-src-{uuid.uuid4().hex[:12]}"
    await store.client.create_bucket(Bucket=bucket)
    yield bucket
    listing = await store.client.list_objects_v2(Bucket=bucket)
    for obj in listing.get("Contents", []):
        await store.client.delete_object(Bucket=bucket, Key=obj["Key"])
    await store.client.delete_bucket(Bucket=bucket)


async def test_s3_source(http: aiohttp.ClientSession, store: Store, key: str,
                         source_bucket: str) -> None:
    await store.client.put_object(Bucket=source_bucket, Key="calls/one two.wav", Body=WAV)
    allowed = frozenset({source_bucket})
    stored = await fetch(f"s3://{source_bucket}/calls/one%20two.wav", http, store, key,
                         allowed_source_buckets=allowed)
    assert stored == StoredRecording(store.bucket, key, len(WAV), "wav")
    assert await store.get(key) == WAV
    with pytest.raises(PermanentError) as info:
        await fetch(f"s3://{source_bucket}/calls/missing.wav", http, store, key,
                    allowed_source_buckets=allowed)
    assert info.value.failure_class == "RecordingUnavailable"
    with pytest.raises(PermanentError) as info:
        await fetch(f"s3://{source_bucket}/calls/one%20two.wav", http, store, key,
                    allowed_source_buckets=frozenset())
    assert info.value.failure_class == "RecordingUrlRefused"
    await store.client.put_object(Bucket=source_bucket, Key="big.wav", Body=wav_bytes(9000))
    with pytest.raises(PermanentError) as info:
        await fetch(f"s3://{source_bucket}/big.wav", http, store, key,
                    allowed_source_buckets=allowed, max_bytes=5000)
    assert info.value.failure_class == "RecordingTooLarge"


async def test_watchdog_ignores_upload_time() -> None:
    """Time spent by the consumer (uploading a part) does not count against the source."""
    from services.fetcher.pacing import watchdog

    async def source() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 10

    received = []
    async for chunk in watchdog(source(), window=0.05, min_bytes_per_second=1024 / 0.05):
        await asyncio.sleep(0.1)
        received.append(chunk)
    assert len(received) == 3
