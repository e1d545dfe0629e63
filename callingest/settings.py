"""Settings from environment variables, validated once at start-up.

A missing or malformed value stops the process with a message naming the
variable (see :func:`load_settings`).
"""

from __future__ import annotations

import sys

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of every service. Field names are the environment variables, upper-cased."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    topic_partitions: int = Field(3, ge=1)
    topic_replication_factor: int = Field(1, ge=1)

    mongodb_uri: SecretStr = SecretStr("mongodb://127.0.0.1:27017/")
    mongodb_database: str = "callingest"

    s3_endpoint_url: str | None = "http://127.0.0.1:9000"
    s3_bucket: str = "recordings"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr = SecretStr("callingest")
    s3_secret_access_key: SecretStr = SecretStr("callingest-dev-secret")
    s3_allowed_source_buckets: list[str] = Field(default_factory=list)

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_from: str = "callingest@localhost"
    smtp_timeout_seconds: float = 10.0

    http_host: str = "127.0.0.1"
    http_port: int | None = None
    gateway_workers: int = Field(1, ge=1)

    allow_loopback_recordings: bool = False
    fetch_max_bytes: int = Field(1536 * 1024 * 1024, gt=0)
    fetch_connect_timeout_seconds: float = Field(5.0, gt=0)
    fetch_first_byte_timeout_seconds: float = Field(
        30.0, gt=0, description="request sent -> response headers; ends black-hole hosts")
    fetch_read_timeout_seconds: float = Field(
        30.0, gt=0, description="longest stall mid-body; also the window of the minimum rate")
    fetch_min_bytes_per_second: float = Field(
        1024.0, ge=0, description="a body slower than this over a read window is cut")
    fetch_max_attempts: int = Field(
        1, ge=1, description="downloads per processing attempt; more go through the retry tiers")
    fetch_max_redirects: int = Field(5, ge=0)
    fetch_max_per_host: int = Field(32, ge=1, description="concurrent downloads per host")
    fetch_host_wait_seconds: float = Field(
        2.0, ge=0, description="longest wait for a place at a busy host before deferring")
    fetch_circuit_failure_threshold: int = Field(
        5, ge=1, description="consecutive connection failures or timeouts that open a host")
    fetch_circuit_cooldown_seconds: float = Field(30.0, gt=0)
    fetch_memory_budget_bytes: int = Field(
        96 * 1024 * 1024, gt=0, description="recording bodies buffered at once by the fetcher")
    fetcher_max_in_flight: int = Field(
        256, ge=1, description="the fetcher's calls in flight (I/O-bound: mostly waiting)")

    max_in_flight: int = Field(16, ge=1)
    consumer_read_ahead: int = Field(
        4096, ge=1, description="events a consumer holds (in flight + queued per network)")
    normalizer_workers: int = Field(0, ge=0, description="process pool size; 0 means one per core")
    retry_delays_seconds: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0])
    max_processing_attempts: int = Field(5, ge=1)
    shutdown_grace_seconds: float = Field(10.0, gt=0)

    republish_after_seconds: float = Field(5.0, gt=0)
    auth_cache_seconds: float = Field(30.0, ge=0)
    auth_failure_threshold: int = Field(20, ge=1)
    auth_failure_window_seconds: float = Field(60.0, gt=0)

    allow_loopback_webhooks: bool = False
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="a 2xx within this is a delivery")
    webhook_retry_first_seconds: float = Field(20.0, gt=0, description="first retry (+-25 % jitter)")
    webhook_retry_max_delay_seconds: float = Field(4 * 3600.0, gt=0)
    webhook_retry_for_seconds: float = Field(
        26 * 3600.0, gt=0, description="keep retrying this long after the event (>= 24 h in production)")
    webhook_concurrency_per_endpoint: int = Field(4, ge=1)
    webhook_max_in_flight: int = Field(64, ge=1)
    webhook_poll_interval_seconds: float = Field(1.0, gt=0)

    #: Data keys sealing stored credentials, ``kid:base64key,...`` newest first (callingest.secretbox).
    secret_keys: SecretStr | None = None

    public_base_url: str = "http://127.0.0.1:8080"
    log_level: str = "INFO"


DEFAULT_PORTS = {
    "gateway": 8080,
    "validator": 8081,
    "fetcher": 8082,
    "normalizer": 8083,
    "notifier": 8084,
    "webhooks": 8085,
}


def load_settings() -> Settings:
    """Read and validate the environment; exit with code 2 naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]).upper()
            print(f"callingest: bad setting {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None

