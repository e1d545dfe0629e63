"""Structured JSON logs, one object per line, with secrets scrubbed.

Every line that concerns a call carries ``cuid`` (and ``event_id`` when an
event is being handled): pass them in ``extra``. Lines written inside a trace
(a request, a stage's processing of an event) carry its ``trace_id``.
Scrubbing is a last line of
defence: code must not log secrets in the first place, but URL query strings,
path parameters, userinfo and Authorization values are removed from every rendered line, and
values registered with :func:`register_secret` are masked wherever they appear.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from typing import Any

from callingest import tracing

_URL_SECRETS = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)"  # scheme
    r"(?:[^/\s@\"']*@)?"  # userinfo (dropped)
    r"(?P<rest>[^\s?#\"']*)"  # host and path (kept)
    r"(?:\?[^\s#\"']*)?"  # query string (dropped)
    r"(?:#[^\s\"']*)?"  # fragment (dropped: it may carry a token too)
)
# A quote around a name or value may be JSON-escaped (``\"``): the scrubber reads JSON text.
_QUOTE = r"""(?:\\?["'])?"""
_VALUE = r"""[^\s"',&\\]+"""
_AUTH_VALUES = re.compile(
    r"(?i)(authorization|oauth_token|token|api[-_]?key|secret)"  # the credential's name
    rf"({_QUOTE}\s*[:=]\s*{_QUOTE})({_VALUE})"  # separator, then the value (redacted)
)
# Path parameters (RFC 3986 ";name=value" in a segment: ``/a.wav;jsessionid=...``) carry
# sessions as query strings do: dropped from every URL shown (and from fetcher.urls.redact_url).
PATH_PARAMETERS = re.compile(r";[^/]*")
_PATH_QUERY = re.compile(r"(?P<path>(?:^|(?<=[\s\"']))/[^\s?#\"']*)(?:\?[^\s\"']*|#[^\s\"']*)")
_BEARER = re.compile(rf"(?i)\b(bearer|token\s+token=)\s*{_QUOTE}{_VALUE}")
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Mask ``value`` in every log line from now on (values shorter than 4 characters are ignored)."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def scrub(text: str) -> str:
    """``text`` without URL query strings, fragments, path parameters and userinfo, credential
    values or registered secrets."""
    text = _URL_SECRETS.sub(lambda m: m.group("scheme") + PATH_PARAMETERS.sub("", m.group("rest")), text)
    text = _PATH_QUERY.sub(lambda m: m.group("path"), text)
    text = _BEARER.sub(lambda m: m.group(1) + " [redacted]", text)
    text = _AUTH_VALUES.sub(lambda m: m.group(1) + m.group(2) + "[redacted]", text)
    if _secrets:
        with _secrets_lock:
            secrets = sorted(_secrets, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, service, plus any ``extra`` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": self.service,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if "trace_id" not in entry:
            trace_id = tracing.current_trace_id()
            if trace_id is not None:
                entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, default=str))


def configure(service: str, level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines, and set up tracing
    (:func:`callingest.tracing.configure`); idempotent."""
    tracing.configure(service)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "botocore", "aiobotocore", "pymongo", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    """A stdlib logger; records are rendered by :class:`JsonFormatter` once :func:`configure` ran."""
    return logging.getLogger(name)
