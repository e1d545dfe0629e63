"""How a network's recording auth config (:class:`callingest.config_file.RecordingAuthConfig`,
its token opened) changes the request for a recording."""

from __future__ import annotations

from urllib.parse import quote

from yarl import URL

from callingest.config_file import RecordingAuthConfig


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
