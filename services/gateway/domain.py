"""What the gateway reads from MongoDB: networks, campaigns, API tokens (read-only views)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_LANGUAGE_CODE = "en-US"


@dataclass(frozen=True)
class Network:
    """A network's configuration as the gateway needs it; names keyed by their casefold."""

    id: str
    timezone: ZoneInfo
    default_language_code: str
    multi_language_enabled: bool
    call_ingestion_enabled: bool
    signals: dict[str, str]
    custom_data_fields: dict[str, str]
    recording_auth_config_ids: frozenset[str]

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Network:
        """Build from a ``networks`` document; an unknown timezone falls back to UTC."""
        try:
            tz = ZoneInfo(doc.get("timezone") or "UTC")
        except (ZoneInfoNotFoundError, ValueError):
            tz = ZoneInfo("UTC")
        return cls(
            id=str(doc["_id"]),
            timezone=tz,
            default_language_code=doc.get("default_language_code") or DEFAULT_LANGUAGE_CODE,
            multi_language_enabled=bool(doc.get("multi_language_enabled", False)),
            call_ingestion_enabled=bool(doc.get("call_ingestion_enabled", False)),
            signals={str(n).casefold(): str(n) for n in doc.get("signals") or []},
            custom_data_fields={str(n).casefold(): str(n) for n in doc.get("custom_data_fields") or []},
            recording_auth_config_ids=frozenset(
                str(c["id"]) for c in doc.get("recording_auth_configs") or [] if "id" in c
            ),
        )


def campaign_key(network_id: str, id_from_network: str) -> str:
    """The ``campaigns`` document id of a campaign."""
    return f"{network_id}:{id_from_network}"


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for: a network, and optionally only some of its advertisers."""

    network_id: str
    advertisers: frozenset[str] | None

    def may_use(self, advertiser_id: str) -> bool:
        """True for a network-wide token or one scoped to ``advertiser_id``."""
        return self.advertisers is None or advertiser_id in self.advertisers
