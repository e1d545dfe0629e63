"""GET /api/2022-03-01/calls.json: the token's calls, newest first, in pages.

Order: received time (``created_at``) descending, then ``_id`` descending, a total
order. A page ends with an opaque cursor holding the (created_at, _id) of its last
call; the next page continues strictly after that key (keyset pagination), so calls
inserted meanwhile (which sort before the first page) never shift a page: no call
that existed when the listing began is skipped or repeated.

Every query is bounded by ``network_id`` and served by an index created in
:func:`callingest.mongo.ensure_indexes` (docs/architecture.md lists which serves what).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import DESCENDING
from pymongo.asynchronous.collection import AsyncCollection

from services.gateway.domain import Principal
from services.gateway.errors import ApiError

Document = dict[str, Any]

STATUSES = ("received", "validated", "fetched", "normalized", "failed")
DEFAULT_LIMIT = 50
MAX_LIMIT = 100
MAX_ID_LENGTH = 255
PARAMETERS = frozenset({"status", "since", "until", "external_call_unique_id", "limit", "cursor",
                        "oauth_token"})
ORDER = [("created_at", DESCENDING), ("_id", DESCENDING)]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PLUS_AS_SPACE = re.compile(r"\d \d{2}:?\d{2}$")


class InvalidParameter(ApiError):
    """400: a query parameter of the call list that cannot be used."""

    status = 400
    error_class = "InvalidParameter"


@dataclass(frozen=True)
class CallQuery:
    """The call list's parameters, checked."""

    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    external_call_unique_id: str | None = None
    limit: int = DEFAULT_LIMIT
    after: tuple[datetime, str] | None = None  # the cursor: the last (created_at, cuid) seen

    @classmethod
    def parse(cls, params: Any) -> CallQuery:
        """From the request's query (a multidict); :class:`InvalidParameter` names what is wrong."""
        unknown = sorted(set(params) - PARAMETERS)
        if unknown:
            raise InvalidParameter(f"Unknown parameter {unknown[0]!r}; use one of "
                                   + ", ".join(sorted(PARAMETERS - {'oauth_token'})) + ".")
        for name in set(params):
            if len(params.getall(name)) > 1:
                raise InvalidParameter(f"Parameter {name!r} is given more than once.")
        status = params.get("status")
        if status is not None and status not in STATUSES:
            raise InvalidParameter(f"'status' must be one of {', '.join(STATUSES)}.")
        ext = params.get("external_call_unique_id")
        if ext is not None and not (0 < len(ext.strip()) <= MAX_ID_LENGTH):
            raise InvalidParameter(f"'external_call_unique_id' must be 1 to {MAX_ID_LENGTH} characters.")
        since, until = _moment(params, "since"), _moment(params, "until")
        if since is not None and until is not None and since > until:
            raise InvalidParameter("'since' must not be after 'until'.")
        return cls(status=status, since=since, until=until,
                   external_call_unique_id=ext.strip() if ext is not None else None,
                   limit=_limit(params.get("limit")), after=_decode_cursor(params.get("cursor")))

    def filter(self, principal: Principal) -> Document:
        """The MongoDB filter: the principal's network (and advertisers), the parameters,
        and the position after the cursor."""
        clauses: list[Document] = [{"network_id": principal.network_id}]
        if principal.advertisers is not None:
            clauses.append({"advertiser_id": {"$in": sorted(principal.advertisers)}})
        if self.status is not None:
            clauses.append({"status": self.status})
        if self.external_call_unique_id is not None:
            clauses.append({"external_call_unique_id": self.external_call_unique_id})
        if self.since is not None:
            clauses.append({"created_at": {"$gte": self.since}})
        if self.until is not None:
            clauses.append({"created_at": {"$lte": self.until}})
        if self.after is not None:
            at, cuid = self.after
            clauses.append({"$or": [{"created_at": {"$lt": at}},
                                    {"created_at": at, "_id": {"$lt": cuid}}]})
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _moment(params: Any, name: str) -> datetime | None:
    raw = params.get(name)
    if raw is None:
        return None
    text = raw.strip()
    if match := _PLUS_AS_SPACE.search(text):  # an unencoded "+hh:mm" arrives as " hh:mm"
        space = match.start() + 1
        text = f"{text[:space]}+{text[space + 1:]}"
    try:
        if not text.isascii():
            raise ValueError(text)
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ" and text else text)
    except (ValueError, IndexError):
        raise InvalidParameter(f"'{name}' must be an ISO 8601 time such as 2026-11-30T12:00:00Z.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00, 9999-12-31T23:59-14:00
        raise InvalidParameter(f"'{name}' must fall between the years 1 and 9999 in UTC.") from None


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidParameter(f"'limit' must be an integer from 1 to {MAX_LIMIT}.")
    return int(text)


def encode_cursor(call: Document) -> str:
    """The opaque cursor after ``call``: its created_at (ms) and cuid, base64url."""
    at = call["created_at"]
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    millis = (at - EPOCH) // timedelta(milliseconds=1)
    raw = json.dumps([millis, call["_id"]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(raw: str | None) -> tuple[datetime, str] | None:
    if raw is None:
        return None
    try:
        text = base64.urlsafe_b64decode(raw.strip() + "=" * (-len(raw.strip()) % 4))
        millis, cuid = json.loads(text)
        if isinstance(millis, bool) or not isinstance(millis, int) or not isinstance(cuid, str):
            raise ValueError(raw)
        return EPOCH + timedelta(milliseconds=millis), cuid
    except (ValueError, TypeError, binascii.Error, OverflowError, OSError):
        raise InvalidParameter("'cursor' is not a cursor this API returned.") from None


async def list_calls(calls: AsyncCollection[Document], principal: Principal,
                     query: CallQuery) -> tuple[list[Document], str | None]:
    """One page of the principal's calls and the cursor of the next page (None at the end)."""
    found = await calls.find(query.filter(principal)).sort(ORDER).limit(query.limit + 1).to_list(None)
    page = found[: query.limit]
    more = len(found) > query.limit
    return page, (encode_cursor(page[-1]) if more and page else None)
