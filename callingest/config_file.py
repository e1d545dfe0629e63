"""The configuration file of ``callingest config apply``: parsed and validated (written to
the store by :mod:`callingest.config_apply`).

The whole file is validated before anything is written, so a bad file
changes nothing. Errors name the file, the path of the field and the problem.
API tokens are stored as SHA-256 hashes, recording auth-config tokens and webhook secrets
sealed with the data key (:mod:`callingest.secretbox`); none is stored or printed in clear.

The same models are the read model of the stored configuration: every service reads a
network with :func:`load_network` (a :class:`NetworkSettings`) and a campaign with
:func:`load_campaign` (a :class:`StoredCampaign`, by ``_id``); the rules a call must
satisfy are in :mod:`callingest.rules`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pymongo.asynchronous.database import AsyncDatabase

from callingest import mongo, webhooks
from callingest.secretbox import without_secrets

#: The language codes the platform transcribes (the spec's list).
LanguageCode = Literal["en-US", "en-GB", "es-ES", "fr-FR"]
LANGUAGE_CODES: tuple[str, ...] = get_args(LanguageCode)
DEFAULT_LANGUAGE_CODE: LanguageCode = "en-US"


def _to_str(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    return value


IdStr = Annotated[str, BeforeValidator(_to_str), Field(min_length=1, max_length=128)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ApiToken(_Strict):
    token: str = Field(min_length=8, max_length=256)
    advertisers: list[IdStr] | None = None


class RecordingAuthConfig(_Strict):
    """The one model of a recording auth config: config apply, the read model, the fetcher."""

    id: IdStr
    method: Literal["bearer_header", "query_param", "custom_header"]
    token: str = Field(min_length=1, max_length=4096, repr=False)
    name: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.~-]+$")

    @model_validator(mode="after")
    def _usable(self) -> RecordingAuthConfig:
        if self.method in ("query_param", "custom_header") and not self.name:
            raise ValueError(f"'name' is required for method {self.method}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in self.token):  # would split a header
            raise ValueError("the token contains control characters")
        return self


class Webhook(_Strict):
    """A client's endpoint for call outcomes (Standard Webhooks)."""

    id: IdStr
    url: str = Field(min_length=1, max_length=2048)
    secret: str = Field(min_length=1, max_length=512, repr=False)
    previous_secrets: list[str] = Field(default_factory=list, max_length=3, repr=False)
    """Secrets being rotated out: deliveries carry a signature for each as well."""
    events: list[Literal["call.normalized", "call.failed", "call.retrying"]] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _deliverable_url(cls, value: str) -> str:
        # Loopback is decided by the deliverer on every attempt (ALLOW_LOOPBACK_WEBHOOKS);
        # every other refused address is refused here already.
        return webhooks.check_webhook_url(value, allow_loopback=True)

    @field_validator("secret")
    @classmethod
    def _standard_secret(cls, value: str) -> str:
        webhooks.secret_key(value)
        return value

    @field_validator("previous_secrets")
    @classmethod
    def _standard_previous_secrets(cls, value: list[str]) -> list[str]:
        for secret in value:
            webhooks.secret_key(secret)
        return value

    @field_validator("events")
    @classmethod
    def _unique_events(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("an event is listed more than once")
        return value


class Campaign(_Strict):
    id_from_network: IdStr
    type: str = "ExternalOnly"
    signal_ai_enabled: bool = False
    voice_signals: int = Field(0, ge=0)

    @property
    def transcription_enabled(self) -> bool:
        """Transcription runs when Signal AI is on or at least one voice signal is configured."""
        return self.signal_ai_enabled or self.voice_signals > 0


class StoredCampaign(Campaign):
    """A ``campaigns`` document: a campaign with the network and advertiser it belongs to."""

    model_config = ConfigDict(extra="ignore")

    network_id: IdStr
    advertiser_id: IdStr

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> StoredCampaign:
        return cls.model_validate(doc)


class Advertiser(_Strict):
    id: IdStr
    name: str | None = None
    campaigns: list[Campaign] = Field(default_factory=list)


class NetworkSettings(_Strict):
    """A network's configuration as its ``networks`` document stores it (the read model).

    Signal and custom data names are matched case-insensitively (``casefold``) by
    :meth:`signal` and :meth:`custom_data_field`, which give the configured spelling.
    """

    id: IdStr
    name: str | None = None
    timezone: str = "America/Los_Angeles"
    default_language_code: LanguageCode = DEFAULT_LANGUAGE_CODE
    multi_language_enabled: bool = False
    call_ingestion_enabled: bool = True
    csm_email: str | None = Field(None, pattern=r"^[^@\s]+@[^@\s]+$")
    signals: list[str] = Field(default_factory=list)
    custom_data_fields: list[str] = Field(default_factory=list)
    recording_auth_configs: list[RecordingAuthConfig] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA timezone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> NetworkSettings:
        for label, ids in (
            ("recording_auth_configs", [c.id for c in self.recording_auth_configs]),
            ("signals", [s.casefold() for s in self.signals]),
            ("custom_data_fields", [c.casefold() for c in self.custom_data_fields]),
        ):
            _refuse_duplicates(label, ids)
        return self

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> NetworkSettings:
        """The network of a ``networks`` document; fields it does not store take their
        defaults, except call ingestion, which is off unless the document enables it."""
        doc = without_secrets("networks", doc)  # the read model never holds a secret
        fields = {k: v for k, v in doc.items() if k in cls.model_fields and k != "id"}
        fields["id"] = doc["_id"]
        fields.setdefault("call_ingestion_enabled", False)
        return cls.model_validate(fields)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def signal(self, name: str) -> str | None:
        """The configured spelling of signal ``name``, or None."""
        return _configured(self.signals, name)

    def custom_data_field(self, name: str) -> str | None:
        """The configured spelling of custom data field ``name``, or None."""
        return _configured(self.custom_data_fields, name)

    def recording_auth_config(self, config_id: str) -> RecordingAuthConfig | None:
        """The recording auth config ``config_id``, or None."""
        return next((c for c in self.recording_auth_configs if c.id == config_id), None)


def _configured(names: list[str], name: str) -> str | None:
    folded = name.strip().casefold()
    return next((n for n in names if n.casefold() == folded), None)


def _refuse_duplicates(label: str, ids: list[str]) -> None:
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate {label}: {', '.join(dupes)}")


class Network(NetworkSettings):
    """A network of the configuration file: its settings, API tokens and advertisers."""

    name: str
    api_tokens: list[ApiToken] = Field(default_factory=list)
    advertisers: list[Advertiser] = Field(default_factory=list)
    webhooks: list[Webhook] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> Network:
        for label, ids in (
            ("advertisers", [a.id for a in self.advertisers]),
            ("campaigns", [c.id_from_network for a in self.advertisers for c in a.campaigns]),
            ("webhooks", [w.id for w in self.webhooks]),
        ):
            _refuse_duplicates(label, ids)
        known = {a.id for a in self.advertisers}
        for i, token in enumerate(self.api_tokens):
            unknown = sorted(set(token.advertisers or []) - known)
            if unknown:
                raise ValueError(f"api_tokens[{i}] names unknown advertisers: {', '.join(unknown)}")
        return self


class ConfigFile(_Strict):
    networks: list[Network] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_networks(self) -> ConfigFile:
        ids = [n.id for n in self.networks]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate network ids: {', '.join(dupes)}")
        tokens = [t.token for n in self.networks for t in n.api_tokens]
        if len(tokens) != len(set(tokens)):
            raise ValueError("an api token is listed more than once")
        return self


class ConfigError(Exception):
    """The file cannot be applied; the message names the file, field path and problem."""


def hash_token(token: str) -> str:
    """How API tokens are stored and looked up: SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def campaign_id(network_id: str, id_from_network: str) -> str:
    """The ``_id`` of a campaign's document."""
    return f"{network_id}:{id_from_network}"


async def load_network(db: AsyncDatabase[dict[str, Any]], network_id: str) -> NetworkSettings | None:
    """The configuration of network ``network_id``, or None if it is not configured."""
    doc = await db.networks.find_one({"_id": network_id})
    return NetworkSettings.from_document(doc) if doc is not None else None


async def load_campaign(db: AsyncDatabase[dict[str, Any]], network_id: str,
                        id_from_network: str) -> StoredCampaign | None:
    """The network's campaign ``id_from_network``, or None if it is not configured."""
    doc = await db.campaigns.find_one({"_id": campaign_id(network_id, id_from_network)})
    return StoredCampaign.from_document(doc) if doc is not None else None


def load(path: Path) -> ConfigFile:
    """Parse and validate ``path``; raises :class:`ConfigError` listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with a 'networks' list")
    if unstorable := mongo.unstorable_locations(data):
        raise ConfigError("\n".join(f"{path}: {_path(loc)}: {mongo.UNSTORABLE_TEXT}" for loc in unstorable))
    try:
        return ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{path}: {_path(err['loc'])}: {err['msg']}"
                                    for err in exc.errors())) from None


def _path(loc: tuple[Any, ...]) -> str:
    """``networks[0].name`` for the location ``("networks", 0, "name")``."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return text or "(top level)"
