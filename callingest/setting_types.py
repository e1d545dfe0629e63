"""The shapes a setting's value may take, checked without touching the network (no DNS).

Each is an annotated type used by :class:`callingest.settings.Settings`, so a malformed value
fails validation and :func:`callingest.settings.load_settings` names its variable (exit 2).
The empty string passes the checks of the settings that are required outside the dev profile:
there it means unset, which :meth:`~callingest.settings.Settings.missing` reports.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import warnings
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    HttpUrl,
    SecretStr,
    TypeAdapter,
    ValidationError,
)
from pydantic_settings import NoDecode

#: A TCP port; 0 (any free port) is not one: nothing could find the service there.
Port = Annotated[int, Field(ge=1, le=65535)]

#: Seconds of a timeout, delay or window: finite (Settings refuses inf and nan), at most a day.
DAY = 86400.0
Seconds = Annotated[float, Field(gt=0, le=DAY)]
#: As :data:`Seconds`, where none (0) is meaningful.
SecondsOrNone = Annotated[float, Field(ge=0, le=DAY)]
#: Seconds of a retry schedule spanning days (webhook deliveries), at most 30 days.
LongSeconds = Annotated[float, Field(gt=0, le=30 * DAY)]

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_host(host: str) -> str:
    """An IP literal or a hostname of RFC 1123 labels whose last label is not all digits."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if (not host or len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise ValueError(f"{host!r} is neither an IP address nor a hostname")
    return host


def _host_port(item: str) -> str:
    """``host:port`` (``[v6]:port`` for an IPv6 address), port 1-65535."""
    host, sep, port = item.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{item!r} is not host:port")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{item!r}: the port is not a number of 1-65535")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
    else:
        check_host(host)
    return item


def _servers(value: str) -> str:
    for item in value.split(","):
        _host_port(item.strip())
    return value


def unset_or(check: Callable[[str], Any]) -> AfterValidator:
    """``check`` the value unless it is empty (unset, for a setting required outside dev)."""
    def validate(value: str) -> str:
        if value:
            check(value)
        return value
    return AfterValidator(validate)


#: Comma-separated ``host:port`` entries (``KAFKA_BOOTSTRAP_SERVERS``).
HostPorts = Annotated[str, unset_or(_servers)]
Host = Annotated[str, AfterValidator(check_host)]
HostOrUnset = Annotated[str, unset_or(check_host)]

_HTTP_URL: TypeAdapter[HttpUrl] = TypeAdapter(HttpUrl)


def _http_url(value: str) -> None:
    try:
        _HTTP_URL.validate_python(value)
    except ValidationError as exc:
        raise ValueError(f"not an http(s) URL with a host: {exc.errors()[0]['msg']}") from None


#: An ``http://`` or ``https://`` URL with a host, kept as given; empty: unset.
HttpUrlText = Annotated[str, unset_or(_http_url)]


def _region(value: str) -> None:
    if not _LABEL.fullmatch(value):
        raise ValueError("an S3 region is letters, digits and inner hyphens (e.g. eu-west-1)")


#: An S3 region: one host label (what botocore accepts); empty: unset.
Region = Annotated[str, unset_or(_region)]


def _database_name(value: str) -> str:
    """MongoDB's rules for a database name: 1-63 bytes, none of ``/\\. "$*<>:|?`` or NUL."""
    if not value or len(value.encode()) > 63 or re.search(r'[/\\. "$*<>:|?\x00]', value):
        raise ValueError("a MongoDB database name is 1-63 bytes without any of / \\ . \" $ * < > : | ? "
                         "space or NUL")
    return value


DatabaseName = Annotated[str, AfterValidator(_database_name)]


def _mongodb_uri(secret: SecretStr) -> SecretStr:
    if secret.get_secret_value():
        check_mongodb_uri(secret.get_secret_value())
    return secret


def check_mongodb_uri(uri: str) -> None:
    """A ``mongodb://`` or ``mongodb+srv://`` URI the driver accepts, every option known and
    valid; no DNS lookup (the SRV records of ``mongodb+srv`` are resolved when connecting).

    The driver's checks run on a copy whose credentials are a placeholder, so that no message
    can quote them; the credentials are checked on their own (escaped as RFC 3986 wants).
    """
    from pymongo.uri_parser_shared import _validate_uri, parse_userinfo  # parse_uri: SRV lookup

    scheme, sep, rest = uri.partition("://")
    head, query, options = rest.partition("?")
    credentials, at, hosts = head.rpartition("@")
    try:
        if at:
            if "/" in credentials:
                raise ValueError("the user name and password must be percent-encoded (RFC 3986)")
            parse_userinfo(credentials)
            uri = f"{scheme}{sep}user:password@{hosts}{query}{options}"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an ignored or deprecated option is an error here
            _validate_uri(uri, warn=False)
    except Exception as exc:  # ValueError, InvalidURI, ConfigurationError, a warning
        raise ValueError(f"not a valid MongoDB URI: {str(exc).splitlines()[0]}") from None


#: ``MONGODB_URI`` (:func:`check_mongodb_uri`); empty: unset.
MongoUri = Annotated[SecretStr, AfterValidator(_mongodb_uri)]


def _json_list(value: Any) -> Any:
    """A JSON list from the environment (``[5, 30]``); other inputs go on to the type's checks."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("not a JSON list, e.g. [\"a\", \"b\"]") from None
    return value


# Lists come as JSON text, parsed here (NoDecode) rather than by pydantic-settings, whose
# error would not name the variable.
#: Delays of the retry tiers: at least one.
RetryDelays = Annotated[list[Seconds], NoDecode, BeforeValidator(_json_list), Field(min_length=1)]
Names = Annotated[list[str], NoDecode, BeforeValidator(_json_list)]

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in _LEVELS or not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"not a log level: one of {', '.join(_LEVELS)}")
    return level


LogLevel = Annotated[str, AfterValidator(_log_level)]
