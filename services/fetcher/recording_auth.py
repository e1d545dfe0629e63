"""A network's recording auth config as the fetcher uses it, and how it changes a request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from yarl import URL

from callingest.logging import register_secret

AUTH_METHODS: Final = frozenset({"bearer_header", "query_param", "custom_header"})


@dataclass(frozen=True)
class RecordingAuthConfig:
    """A network's recording auth config; ``token`` is a secret and never shown."""

    id: str
    method: str
    token: str
    name: str | None = None

    def __repr__(self) -> str:
        return f"RecordingAuthConfig(id={self.id!r}, method={self.method!r}, name={self.name!r})"

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> RecordingAuthConfig:
        """From an entry of ``networks.recording_auth_configs``; ValueError if unusable."""
        method = str(doc.get("method", ""))
        token = doc.get("token")
        name = doc.get("name")
        if method not in AUTH_METHODS:
            raise ValueError(f"unknown recording auth method {method!r}")
        if not isinstance(token, str) or not token:
            raise ValueError("recording auth config has no token")
        if method != "bearer_header" and not name:
            raise ValueError(f"recording auth method {method} needs a name")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in token + str(name or "")):
            raise ValueError("recording auth config contains control characters")
        register_secret(token)
        return cls(id=str(doc.get("id")), method=method, token=token,
                   name=str(name) if name else None)


def apply_auth(url: URL, auth: RecordingAuthConfig | None) -> tuple[URL, dict[str, str]]:
    """The URL and headers of the first request for ``auth`` (None: the URL as given).

    ``query_param`` appends ``<name>=<token>`` to the query string (after any existing
    parameters, leaving them untouched); the header methods return the header to send.
    """
    if auth is None:
        return url, {}
    if auth.method == "bearer_header":
        return url, {"Authorization": f"Bearer {auth.token}"}
    assert auth.name is not None
    if auth.method == "custom_header":
        return url, {auth.name: auth.token}
    param = f"{quote(auth.name, safe='')}={quote(auth.token, safe='')}"
    query = url.raw_query_string
    joined = f"{query}&{param}" if query else param
    base = str(url.with_query(None).with_fragment(None))
    return URL(f"{base}?{joined}", encoded=True), {}
