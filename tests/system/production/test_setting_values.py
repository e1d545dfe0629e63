"""Malformed and dev-only setting values: exit 2 with one line naming the variable, no traceback,
before connecting to anything (docs/deployment.md, "Configuration"); and the commands that
need few settings or none (``admin rotate-secrets``, ``admin generate-secret-key``).

Each run is ``callingest`` in a subprocess under the production profile (``bare_env``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from callingest.settings import Settings
from tests.system.production.test_settings import (  # noqa: F401 (clean_environ: a fixture)
    bare_env,
    clean_environ,
    missing_in,
    run,
)

MALFORMED = [
    ("HTTP_PORT", "70000"), ("HTTP_PORT", "-1"), ("HTTP_PORT", "0"), ("SMTP_PORT", "99999"),
    ("SMTP_PORT", "0"), ("LOG_LEVEL", "LOUD"),
    ("RETRY_DELAYS_SECONDS", "abc"), ("RETRY_DELAYS_SECONDS", "[]"),
    ("RETRY_DELAYS_SECONDS", "[-1]"), ("RETRY_DELAYS_SECONDS", "[5, 1e999]"),
    ("S3_ALLOWED_SOURCE_BUCKETS", "abc"),
    ("MONGODB_URI", "http://127.0.0.1:27017/"), ("MONGODB_URI", "notauri"),
    ("MONGODB_URI", "mongodb://127.0.0.1/?tls=maybe"),
    ("MONGODB_URI", "mongodb://127.0.0.1/?nosuchoption=1"),
    ("MONGODB_URI", "mongodb+srv://cluster0.example.net:27017/"),  # no port with SRV
    ("MONGODB_DATABASE", ""), ("MONGODB_DATABASE", "a/b"), ("MONGODB_DATABASE", "a.b"),
    ("MONGODB_DATABASE", "x" * 64),
    ("S3_ENDPOINT_URL", "notaurl"), ("S3_ENDPOINT_URL", "ftp://s3.example.com"),
    ("S3_REGION", "bad#region!"), ("HTTP_HOST", "999.1.1.1"), ("HTTP_HOST", "bad host"),
    ("SMTP_HOST", "-smtp-"), ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:abc"),
    ("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092,kafka2"), ("KAFKA_BOOTSTRAP_SERVERS", "kafka:70000"),
    ("PUBLIC_BASE_URL", "notaurl"),
    ("FETCH_READ_TIMEOUT_SECONDS", "inf"), ("AUTH_FAILURE_WINDOW_SECONDS", "inf"),
    ("AUTH_CACHE_SECONDS", "1e9"),
    ("FETCH_MIN_BYTES_PER_SECOND", "inf"), ("WEBHOOK_RETRY_FOR_SECONDS", "60"),
]


def assert_refused(stderr: str, returncode: int, name: str) -> None:
    """Exit 2, one line naming ``name``, no traceback."""
    assert returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"callingest: bad setting {name}:")]
    assert len(lines) == 1 and ": required (or " not in lines[0], stderr


@pytest.mark.parametrize(("name", "value"), MALFORMED)
def test_a_malformed_value_exits_2_naming_the_variable(name: str, value: str) -> None:
    # calls show reads only MongoDB: a malformed value of any setting stops every command.
    done, _ = run(["calls", "show", "x"], bare_env(**{name: value}))
    assert_refused(done.stderr, done.returncode, name)
    assert len(done.stderr.splitlines()) == 1, done.stderr  # not the missing ones: it stops first


DEV_ONLY = [("S3_ACCESS_KEY_ID", "callingest"), ("S3_SECRET_ACCESS_KEY", "callingest-dev-secret"),
            ("ALLOW_LOOPBACK_RECORDINGS", "true"), ("ALLOW_LOOPBACK_WEBHOOKS", "true")]


@pytest.mark.parametrize(("name", "value"), DEV_ONLY)
def test_a_dev_only_value_exits_2_outside_dev(name: str, value: str) -> None:
    done, _ = run(["serve", "fetcher"], bare_env(**{name: value}))
    assert_refused(done.stderr, done.returncode, name)
    assert "CALLINGEST_ENV=dev" in done.stderr
    if name.startswith("S3_"):  # a credential: not shown
        assert value not in done.stderr.partition(name)[2]


@pytest.mark.usefixtures("clean_environ")
def test_the_dev_profile_allows_its_own_values() -> None:
    dev = Settings(callingest_env="dev", allow_loopback_recordings=True,
                   allow_loopback_webhooks=True, webhook_retry_for_seconds=60)
    assert dev.s3_access_key_id.get_secret_value() == "callingest"
    assert dev.public_base_url == "http://127.0.0.1:8080"
    assert dev.smtp_from == "callingest@localhost"
    with pytest.raises(ValidationError, match="webhook_retry_for_seconds"):
        Settings(webhook_retry_for_seconds=86399)
    assert Settings(webhook_retry_for_seconds=86400).webhook_retry_for_seconds == 86400


@pytest.mark.usefixtures("clean_environ")
def test_well_formed_values_are_accepted_without_dns() -> None:
    settings = Settings(
        kafka_bootstrap_servers="b-1.kafka.example.com:9096, 10.0.0.7:9092,[fd00::1]:9092",
        mongodb_uri=SecretStr("mongodb+srv://app:p%40ss@cluster0.nonexistent.invalid/"
                              "?retryWrites=true&w=majority&authSource=admin"),
        mongodb_database="calls_prod-1", s3_endpoint_url="https://s3.eu-central-1.example.com:9000",
        s3_region="eu-central-1", http_host="::", smtp_host="smtp.mail.svc", smtp_port=587,
        public_base_url="https://calls.example.com", log_level="debug",
        retry_delays_seconds="[5, 30.5]", s3_allowed_source_buckets='["a", "b"]')
    assert settings.log_level == "DEBUG" and settings.retry_delays_seconds == [5.0, 30.5]
    assert settings.s3_allowed_source_buckets == ["a", "b"]


def test_a_mongodb_uri_error_never_shows_the_credentials() -> None:
    done, _ = run(["calls", "show", "x"],
                  bare_env(MONGODB_URI="mongodb://app:hunter2/x@db.example.com/?tls=maybe"))
    assert_refused(done.stderr, done.returncode, "MONGODB_URI")
    assert "hunter2" not in done.stderr
    done, _ = run(["calls", "show", "x"],
                  bare_env(MONGODB_URI="mongodb://app:hunter2@db.example.com/?tls=maybe"))
    assert_refused(done.stderr, done.returncode, "MONGODB_URI")
    assert "hunter2" not in done.stderr and "tls" in done.stderr


def test_generate_secret_key_needs_no_setting() -> None:
    done, _ = run(["admin", "generate-secret-key", "--kid", "2026-12"], bare_env())
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"2026-12:[A-Za-z0-9+/]{43}=\n", done.stdout), done.stdout
    assert done.stderr == ""


def test_rotate_secrets_requires_only_what_rotation_reads() -> None:
    done, _ = run(["admin", "rotate-secrets"], bare_env())
    assert done.returncode == 2
    assert missing_in(done.stderr) == {"MONGODB_URI", "SECRET_KEYS"}
    done, _ = run(["admin", "rotate-secrets"], bare_env(MONGODB_URI="mongodb://127.0.0.1:9/"))
    assert done.returncode == 2
    assert done.stderr.startswith("callingest: bad setting SECRET_KEYS: required "), done.stderr
    assert missing_in(done.stderr) == {"SECRET_KEYS"}


def test_the_smtp_login_is_both_or_neither_and_only_over_starttls(tmp_path: Path) -> None:
    secret = "relay-hunter2"
    (tmp_path / "smtp-password").write_text(secret + "\n")
    starttls = {"SMTP_STARTTLS": "true"}
    for given in ({"SMTP_USERNAME": "relay"}, {"SMTP_PASSWORD": secret, **starttls},
                  {"SMTP_PASSWORD_FILE": str(tmp_path / "smtp-password"), **starttls}):
        done, _ = run(["serve", "notifier"], bare_env(**given))
        assert_refused(done.stderr, done.returncode, "(SETTINGS)")
        assert "SMTP_USERNAME and SMTP_PASSWORD go together" in done.stderr
        assert secret not in done.stderr
    login = {"SMTP_USERNAME": "relay", "SMTP_PASSWORD_FILE": str(tmp_path / "smtp-password")}
    done, _ = run(["serve", "notifier"], bare_env(**login))  # no STARTTLS: a plain login
    assert_refused(done.stderr, done.returncode, "(SETTINGS)")
    assert "need SMTP_STARTTLS=true" in done.stderr and secret not in done.stderr
    done, _ = run(["serve", "notifier"], bare_env(**login, **starttls))
    assert done.returncode == 2 and "(SETTINGS)" not in done.stderr  # only the missing ones
    assert missing_in(done.stderr) >= {"MONGODB_URI", "SMTP_HOST"} and secret not in done.stderr
