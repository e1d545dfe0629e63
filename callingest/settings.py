"""Settings from environment variables, validated once at start-up.

Two profiles. ``CALLINGEST_ENV=dev`` (set by ``make up``, the tests and the benchmarks)
fills every setting that has a dev default (:func:`required_outside_dev`,
:func:`dev_default`) with the local dev stack's value. Any other profile (production,
the default) has no such defaults: a required setting the service reads that is not
given stops the process with exit code 2 and one line per missing variable, before it
connects to anything (:func:`load_settings`).

Every setting may also come from a file: ``<NAME>_FILE=/path`` reads the value of
``<NAME>`` from that file (a Kubernetes Secret volume), trailing newline stripped.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from callingest.setting_types import (
    DAY,
    DatabaseName,
    Host,
    HostOrUnset,
    HostPorts,
    HttpUrlText,
    LogLevel,
    LongSeconds,
    MongoUri,
    Names,
    Port,
    Region,
    RetryDelays,
    Seconds,
    SecondsOrNone,
)
from callingest.settings_files import FileSettingsSource, SettingsFileError

DEV_PROFILE = "dev"
_DEV = "callingest_dev_default"
_REQUIRED = "callingest_required_outside_dev"
_UNLESS = "callingest_required_unless"
_REFUSED = "callingest_refused_outside_dev"
_AT_LEAST = "callingest_at_least_outside_dev"


PLAIN_SMTP_LOGIN = ("SMTP_USERNAME and SMTP_PASSWORD need SMTP_STARTTLS=true outside the dev "
                    "profile: no login over a plain connection")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_networks(text: str) -> tuple[IPNetwork, ...]:
    """The networks of a comma-separated list of addresses and CIDRs (``TRUSTED_PROXIES``)."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def required_outside_dev(dev: Any, unless: str | None = None, dev_only: bool = False) -> Any:
    """A setting that must be given outside the dev profile (dev profile: ``dev``).

    Unset is the empty value (``""``), so the field keeps its plain type. ``unless`` names a
    boolean setting that, when true, makes this one optional (S3 keys with an IAM role).
    ``dev_only``: the dev value itself is refused outside dev (the dev stack's credentials).
    A new required setting joins by declaring itself with this (see ``kafka_bootstrap_servers``).
    """
    empty: Any = SecretStr("") if isinstance(dev, SecretStr) else ""
    extra: dict[str, Any] = {_DEV: dev, _REQUIRED: True}
    if unless:
        extra[_UNLESS] = unless
    if dev_only:
        extra[_REFUSED] = dev
    return Field(empty, json_schema_extra=extra)


def dev_only(default: Any, refused: Any, **constraints: Any) -> Any:
    """An optional setting whose value ``refused`` is allowed only in the dev profile."""
    return Field(default, json_schema_extra={_REFUSED: refused}, **constraints)


def at_least_outside_dev(default: float, minimum: float, **constraints: Any) -> Any:
    """A number that outside the dev profile is at least ``minimum`` (the tests use less)."""
    return Field(default, json_schema_extra={_AT_LEAST: minimum}, **constraints)


def dev_default(dev: Any, default: Any) -> Any:
    """An optional setting whose default differs in the dev profile."""
    return Field(default, json_schema_extra={_DEV: dev})


class Settings(BaseSettings):
    """Every knob of every service. Field names are the environment variables, upper-cased."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore",
                                      allow_inf_nan=False)

    callingest_env: str = Field("production", description="dev: the local dev stack's defaults")

    kafka_bootstrap_servers: HostPorts = required_outside_dev("127.0.0.1:9092")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_cafile: str | None = None
    """CA bundle for the brokers' certificates (SSL, SASL_SSL); unset: the system's CAs."""
    topic_prefix: str = ""
    topic_partitions: int = Field(3, ge=1)
    topic_replication_factor: int = Field(1, ge=1)

    mongodb_uri: MongoUri = required_outside_dev(SecretStr("mongodb://127.0.0.1:27017/"))
    mongodb_database: DatabaseName = "callingest"
    mongodb_socket_timeout_seconds: Seconds = Field(
        30.0, description="longest wait for one MongoDB reply (socketTimeoutMS): a store that "
        "accepts connections but stops answering fails the operation instead of holding it for good")

    s3_endpoint_url: HttpUrlText | None = dev_default("http://127.0.0.1:9000", None)
    """Empty or unset outside dev: the provider's default endpoint (AWS S3 of ``S3_REGION``)."""
    s3_bucket: str = required_outside_dev("recordings")
    s3_region: Region = required_outside_dev("us-east-1")
    s3_use_iam_role: bool = False
    """True: no static keys; botocore's credential chain (IRSA web identity, instance role)."""
    s3_access_key_id: SecretStr = required_outside_dev(
        SecretStr("callingest"), unless="s3_use_iam_role", dev_only=True)
    s3_secret_access_key: SecretStr = required_outside_dev(
        SecretStr("callingest-dev-secret"), unless="s3_use_iam_role", dev_only=True)
    s3_allowed_source_buckets: Names = Field(default_factory=list)

    smtp_host: HostOrUnset = required_outside_dev("127.0.0.1")
    smtp_port: Port = dev_default(1025, 25)
    smtp_from: str = required_outside_dev("callingest@localhost")
    smtp_timeout_seconds: Seconds = 10.0
    smtp_starttls: bool = False
    """Upgrade the connection with STARTTLS before anything else (port 587); never falls back."""
    smtp_username: SecretStr = SecretStr("")
    smtp_password: SecretStr = SecretStr("")
    """With ``SMTP_USERNAME``: log in (both or neither); outside dev only after STARTTLS."""
    smtp_ca_file: str | None = None
    """CA bundle for the relay's certificate; unset: the system's CAs. Hostnames are verified."""

    http_host: Host = "127.0.0.1"
    http_port: Port | None = None
    gateway_workers: int = Field(1, ge=1)

    allow_loopback_recordings: bool = dev_only(False, True)
    fetch_max_bytes: int = Field(1536 * 1024 * 1024, gt=0)
    fetch_connect_timeout_seconds: Seconds = 5.0
    fetch_first_byte_timeout_seconds: Seconds = Field(
        30.0, description="request sent -> response headers; ends black-hole hosts")
    fetch_read_timeout_seconds: Seconds = Field(
        30.0, description="longest stall mid-body; also the window of the minimum rate")
    fetch_min_bytes_per_second: float = Field(
        1024.0, ge=0, description="a body slower than this over a read window is cut")
    fetch_max_attempts: int = Field(
        1, ge=1, description="downloads per processing attempt; more go through the retry tiers")
    fetch_max_redirects: int = Field(5, ge=0)
    fetch_max_per_host: int = Field(32, ge=1, description="concurrent downloads per host")
    fetch_host_wait_seconds: SecondsOrNone = Field(
        30.0, description="longest wait for a place at a busy host before deferring")
    fetch_circuit_failure_threshold: int = Field(
        5, ge=1, description="consecutive connection failures or timeouts that open a host")
    fetch_circuit_cooldown_seconds: Seconds = 30.0
    fetch_memory_budget_bytes: int = Field(
        96 * 1024 * 1024, gt=0, description="recording bodies buffered at once by the fetcher")
    fetcher_max_in_flight: int = Field(
        256, ge=1, description="the fetcher's calls in flight (I/O-bound: mostly waiting)")

    max_in_flight: int = Field(16, ge=1)
    consumer_read_ahead: int = Field(
        4096, ge=1, description="events a consumer holds (in flight + queued per network)")
    normalizer_workers: int = Field(0, ge=0, description="process pool size; 0 means one per core")
    retry_delays_seconds: RetryDelays = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0])
    max_processing_attempts: int = Field(5, ge=1)
    shutdown_grace_seconds: Seconds = 10.0

    republish_after_seconds: Seconds = 5.0
    auth_cache_seconds: SecondsOrNone = 30.0
    auth_failure_threshold: int = Field(20, ge=1)
    auth_failure_window_seconds: Seconds = 60.0
    trusted_proxies: str = Field(
        "", description="comma-separated addresses or CIDR networks of the proxies in front of the "
        "gateway (an ingress controller's pods): behind them X-Forwarded-For names the client")

    allow_loopback_webhooks: bool = dev_only(False, True)
    webhook_timeout_seconds: Seconds = Field(10.0, description="a 2xx within this is a delivery")
    webhook_retry_first_seconds: Seconds = Field(20.0, description="first retry (+-25 % jitter)")
    webhook_retry_max_delay_seconds: Seconds = 4 * 3600.0
    webhook_retry_for_seconds: LongSeconds = at_least_outside_dev(
        26 * 3600.0, DAY, description="keep retrying this long after the event (>= 24 h outside dev)")
    webhook_concurrency_per_endpoint: int = Field(4, ge=1)
    webhook_max_in_flight: int = Field(64, ge=1)
    webhook_max_in_flight_per_network: int = Field(
        16, ge=1, description="attempts in flight for one network's endpoints together, so one "
        "network's hanging endpoints cannot take all of WEBHOOK_MAX_IN_FLIGHT")
    webhook_poll_interval_seconds: Seconds = 1.0

    #: Data keys sealing stored credentials, ``kid:base64key,...`` newest first (callingest.secretbox).
    secret_keys: SecretStr = required_outside_dev(SecretStr(""))
    """Required outside dev; the dev profile's keys come from the run directory (secretbox)."""

    public_base_url: HttpUrlText = required_outside_dev("http://127.0.0.1:8080")
    log_level: LogLevel = "INFO"

    infra_retry_seconds: Seconds = 60.0
    """How long a consumer retries MongoDB/Kafka/S3 trouble in place before it exits non-zero."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, FileSettingsSource(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _dev_profile(cls, data: Any) -> Any:
        """Under ``CALLINGEST_ENV=dev``, unset settings take their dev default."""
        if not isinstance(data, dict) or not is_dev(str(data.get("callingest_env", ""))):
            return data
        filled = dict(data)
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra
            if not isinstance(extra, dict) or _DEV not in extra or not _unset(filled.get(name)):
                continue
            unless = extra.get(_UNLESS)
            if unless and str(filled.get(str(unless), "")).lower() in ("1", "true", "yes", "on"):
                continue
            filled[name] = extra[_DEV]
        return filled

    @field_validator("*")
    @classmethod
    def _dev_only_values(cls, value: Any, info: ValidationInfo) -> Any:
        """Outside the dev profile: no dev-only value (:func:`dev_only`, ``required_outside_dev(
        dev_only=True)``), no number below its production minimum (:func:`at_least_outside_dev`)."""
        extra = cls.model_fields[str(info.field_name)].json_schema_extra
        if not isinstance(extra, dict) or is_dev(str(info.data.get("callingest_env", ""))):
            return value
        if _REFUSED in extra and value == extra[_REFUSED]:
            shown = "the dev stack's value" if isinstance(value, SecretStr) else str(value).lower()
            raise ValueError(f"{shown} is for the dev profile only (CALLINGEST_ENV=dev)")
        minimum = extra.get(_AT_LEAST)
        if isinstance(minimum, int | float) and value < minimum:
            raise ValueError(f"at least {minimum:g} outside the dev profile")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        ip_networks(value)  # a ValueError names the entry
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _empty_endpoint_is_default(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _one_s3_credential_kind(self) -> Settings:
        if self.s3_use_iam_role and (self.s3_access_key_id.get_secret_value()
                                     or self.s3_secret_access_key.get_secret_value()):
            raise ValueError("S3_USE_IAM_ROLE=true and static S3 keys are both set; give one")
        return self

    @model_validator(mode="after")
    def _smtp_login(self) -> Settings:
        if bool(self.smtp_username.get_secret_value()) != bool(self.smtp_password.get_secret_value()):
            raise ValueError("SMTP_USERNAME and SMTP_PASSWORD go together; give both or neither")
        if self.smtp_plain_login:
            raise ValueError(PLAIN_SMTP_LOGIN)
        return self

    @property
    def smtp_plain_login(self) -> bool:
        """A login without STARTTLS outside the dev profile: the password would cross in clear."""
        return bool(self.smtp_username.get_secret_value()) and not self.smtp_starttls and not self.dev

    @property
    def dev(self) -> bool:
        return is_dev(self.callingest_env)

    def missing(self, reads: Iterable[str] | None = None) -> list[str]:
        """The required settings (of ``reads``, else all) not given, as variable names."""
        if self.dev:  # every required setting has its dev default (or a dev fallback)
            return []
        wanted = set(reads) if reads is not None else set(type(self).model_fields)
        out = []
        for name in sorted(wanted & set(REQUIRED_OUTSIDE_DEV)):
            unless = REQUIRED_OUTSIDE_DEV[name]
            if unless and getattr(self, unless):
                continue
            if _unset(getattr(self, name)):
                out.append(name.upper())
        return out


def is_dev(profile: str) -> bool:
    """``CALLINGEST_ENV`` names the dev profile."""
    return profile.lower() == DEV_PROFILE


def _unset(value: Any) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return value is None or value == ""


def _required_fields() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, info in Settings.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get(_REQUIRED):
            unless = extra.get(_UNLESS)
            out[name] = str(unless) if unless else None
    return out


REQUIRED_OUTSIDE_DEV: dict[str, str | None] = _required_fields()
"""Settings that must be given outside the dev profile -> the setting that waives it, if any."""


def dev_run_dir() -> Path:
    """The dev stack's run directory: ``CALLINGEST_RUN_DIR``, else ``.run`` of the checkout."""
    return Path(os.environ.get("CALLINGEST_RUN_DIR", Path(__file__).resolve().parent.parent / ".run"))


#: Written by ``make up`` into the run directory: the settings of the stack it started
#: (``CALLINGEST_ENV=dev`` and the stack's addresses), removed by ``make down``.
DEV_STACK_ENV = "stack.env"


def use_dev_stack_env() -> None:
    """Let an operator command (``config apply``, ``calls show``, ``replay``, ``admin``; never
    ``serve``) reach the stack that ``make up`` started: the settings in its
    :data:`DEV_STACK_ENV` fill what the environment does not set. Where no dev stack runs
    (production) there is no such file and nothing changes; a service never reads it."""
    path = dev_run_dir() / DEV_STACK_ENV
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and name.strip():
            os.environ.setdefault(name.strip(), value)


def load_settings(reads: Iterable[str] | None = None) -> Settings:
    """Read and validate the environment; exit with code 2 naming each bad or missing variable.

    ``reads``: the settings the command reads (:mod:`callingest.settings_usage`); only those
    are required. ``None``: every required setting.
    """
    try:
        settings = Settings()
    except (SettingsFileError, SettingsError) as exc:  # a value that could not be read
        print(f"callingest: bad setting {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValidationError as exc:
        for err in exc.errors():
            name, *where = err["loc"] or ("(settings)",)
            item = f"entry {where[0]}: " if where else ""  # of a list
            message = err["msg"].removeprefix("Value error, ")
            print(f"callingest: bad setting {str(name).upper()}: {item}{message}", file=sys.stderr)
        raise SystemExit(2) from None
    missing = settings.missing(reads)
    if missing:
        for name in missing:
            print(f"callingest: bad setting {name}: required (or {name}_FILE)", file=sys.stderr)
        print(f"callingest: {len(missing)} required setting(s) missing: {', '.join(missing)}; "
              f"set them, or CALLINGEST_ENV=dev for the local dev stack's defaults",
              file=sys.stderr)
        raise SystemExit(2)
    return settings

