"""Recording URLs: parsed exactly as given, and shown without secrets (userinfo, path
parameters, query string, fragment) wherever they are logged or stored."""

from __future__ import annotations

from urllib.parse import urlsplit

from yarl import URL

from callingest.errors import PermanentError
from callingest.logging import PATH_PARAMETERS
from callingest.ssrf import show_host, url_as_given


def redact_url(url: str | URL) -> str:
    """``url`` without userinfo, path parameters (``;jsessionid=...``, a session's carrier like a
    query string), query string and fragment: safe to log. Never raises."""
    try:
        parts = urlsplit(str(url))
        host = show_host(parts.hostname or "")
        port = f":{parts.port}" if parts.port is not None else ""
        scheme = f"{parts.scheme}://" if parts.scheme else ""
        return f"{scheme}{host}{port}{PATH_PARAMETERS.sub('', parts.path)}"
    except ValueError:
        return "<unparseable URL>"


def parse_url(raw: str) -> URL:
    """The URL exactly as given (a presigned URL's encoding is kept byte for byte)."""
    try:
        return url_as_given(raw)
    except (ValueError, TypeError):
        raise PermanentError("RecordingUrlRefused", "recording_url is not a valid URL") from None


def origin(url: URL) -> tuple[str, str, int | None]:
    return ((url.scheme or "").lower(), (url.raw_host or "").lower(), url.port)


def redact_origin(url: URL) -> str:
    """``scheme://host:port`` of ``url`` (an IPv6 host in brackets): safe to log and store."""
    scheme, host, port = origin(url)
    return f"{scheme}://{show_host(host)}" + (f":{port}" if port is not None else "")
