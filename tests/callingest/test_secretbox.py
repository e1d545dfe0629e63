"""Stored credentials are sealed (AES-256-GCM, key id in each value), keys come from SECRET_KEYS,
``config apply`` seals, ``admin rotate-secrets`` re-seals with the newest key, idempotently and
resumably. Against the real MongoDB-protocol store and the real ``callingest`` command."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from callingest import config_apply, config_file, rotation, secretbox
from callingest.rotation import RotationReport, rotate
from callingest.secretbox import (
    RECORDING_AUTH_CONFIGS,
    Keyring,
    SecretInvalid,
    SecretItems,
    SecretUnavailable,
    generate_key_entry,
    open_item,
    seal_document,
)
from callingest.settings import Settings
from tests.conftest import ROOT, settings_env, used_secret

OLD = Keyring.parse(generate_key_entry("old1"))
NEW_ENTRY = generate_key_entry("new2")
BOTH = Keyring.parse(f"{NEW_ENTRY},old1:{base64.b64encode(OLD.keys['old1']).decode()}")
NEW = Keyring.parse(NEW_ENTRY)
CONTEXT = "networks/1001/recording_auth_configs/7/token"


def cli(settings: Settings, *args: str, keys: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **settings_env(settings), **(env or {})}
    if keys is not None:
        full["SECRET_KEYS"] = keys
    return subprocess.run([str(ROOT / ".venv/bin/callingest"), *args], env=full,
                          capture_output=True, text=True, timeout=120)


def keys_of(keyring: Keyring) -> str:
    return ",".join(f"{kid}:{base64.b64encode(key).decode()}" for kid, key in
                    sorted(keyring.keys.items(), key=lambda kv: kv[0] != keyring.primary))


def config_yaml(networks: int, token: str) -> str:
    out = ["networks:"]
    for n in range(networks):
        out += [f'  - id: "n{n:03d}"', "    name: N", "    recording_auth_configs:",
                f"      - {{id: 7, method: bearer_header, token: {token}-{n}-7}}",
                f"      - {{id: 8, method: query_param, name: access_token, token: {token}-{n}-8}}",
                f"      - {{id: 9, method: custom_header, name: X-Api-Key, token: {token}-{n}-9}}"]
    return "\n".join(out) + "\n"


# -- the cipher ---------------------------------------------------------------------------------


def test_sealed_value_carries_its_key_id_and_opens_only_in_its_place() -> None:
    sealed = OLD.seal("s3cr3t-value", CONTEXT)
    assert sealed["kid"] == "old1" and sealed["alg"] == "A256GCM"
    assert "s3cr3t-value" not in json.dumps(sealed)
    assert OLD.open(sealed, CONTEXT) == "s3cr3t-value"
    assert BOTH.open(sealed, CONTEXT) == "s3cr3t-value"  # any configured key opens
    assert BOTH.seal("x", CONTEXT)["kid"] == "new2"        # the first one seals
    assert OLD.seal("s3cr3t-value", CONTEXT) != sealed     # fresh nonce every time
    with pytest.raises(SecretInvalid):  # copied into another network's config
        OLD.open(sealed, "networks/666/recording_auth_configs/7/token")
    with pytest.raises(SecretInvalid):  # relabelled to another key id
        BOTH.open({**sealed, "kid": "new2"}, CONTEXT)
    tampered = bytearray(base64.b64decode(sealed["ct"]))
    tampered[0] ^= 1
    with pytest.raises(SecretInvalid):
        OLD.open({**sealed, "ct": base64.b64encode(bytes(tampered)).decode()}, CONTEXT)
    with pytest.raises(SecretUnavailable, match="old1"):
        NEW.open(sealed, CONTEXT)


@pytest.mark.parametrize(("value", "problem"), [
    ("", "no key given"),
    ("nokid", "kid:base64key"),
    ("k1:!!!", "not base64"),
    ("k1:" + base64.b64encode(b"short").decode(), "5 bytes"),
    (f"{NEW_ENTRY},{NEW_ENTRY}", "listed twice"),
])
def test_bad_keys_are_refused_without_echoing_them(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        Keyring.parse(value)
    material = value.partition(":")[2]
    assert not material or material not in str(info.value)


def test_url_safe_base64_keys_are_accepted() -> None:
    key = bytes(range(250, 256)) * 5 + b"\xfb\xff"
    ring = Keyring.parse("u1:" + base64.urlsafe_b64encode(key).decode().rstrip("="))
    assert ring.keys["u1"] == key


@pytest.mark.parametrize("service", ["fetcher", "webhooks"])
def test_fetcher_without_a_key_stops_naming_the_variable(settings: Settings, service: str,
                                                         tmp_path: Path) -> None:
    env = _production_without_keys(settings, tmp_path / "run")
    # No server is needed: the check comes before any connection (the Kafka address is unused).
    env["KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:9"
    result = subprocess.run([str(ROOT / ".venv/bin/callingest"), "serve", service], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "SECRET_KEYS" in result.stderr


def _production_without_keys(settings: Settings, run_dir: Path) -> dict[str, str]:
    """The environment of ``settings`` outside the dev profile, every setting given but
    ``SECRET_KEYS`` (the dev-only values replaced: they are refused there); ``run_dir`` (empty)
    as the run directory, so that an operator command does not take the dev stack's settings
    (``use_dev_stack_env``) when ``make up`` is running."""
    env = {k: v for k, v in {**os.environ, **settings_env(settings)}.items() if k != "SECRET_KEYS"}
    env.update(CALLINGEST_ENV="production", S3_ACCESS_KEY_ID="AKIAEXAMPLE",
               S3_SECRET_ACCESS_KEY="not-the-dev-secret", ALLOW_LOOPBACK_RECORDINGS="false",
               ALLOW_LOOPBACK_WEBHOOKS="false")
    env["CALLINGEST_RUN_DIR"] = str(run_dir)
    return env


def test_config_apply_and_rotate_without_a_key_stop_naming_the_variable(
        settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config_yaml(1, "k"))
    for args in (("config", "apply", str(path)), ("admin", "rotate-secrets")):
        result = subprocess.run([str(ROOT / ".venv/bin/callingest"), *args],
                                env=_production_without_keys(settings, tmp_path / "run"),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "SECRET_KEYS" in result.stderr


def test_the_dev_profile_without_a_key_uses_one_generated_into_the_run_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLINGEST_RUN_DIR", str(tmp_path))
    ring = secretbox.load_keyring(Settings(callingest_env="dev"))
    path = tmp_path / "secret-keys"
    assert path.stat().st_mode & 0o777 == 0o600
    assert ring.primary == "dev1"
    assert secretbox.load_keyring(Settings(callingest_env="dev", secret_keys=SecretStr(""))).keys == ring.keys
    with pytest.raises(SystemExit):  # outside the dev profile, no fallback
        secretbox.load_keyring(Settings(callingest_env="production"))


def test_generated_key_entries_parse() -> None:
    result = subprocess.run([str(ROOT / ".venv/bin/callingest"), "admin", "generate-secret-key",
                             "--kid", "2026-11"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SECRET_KEYS": NEW_ENTRY})
    assert result.returncode == 0, result.stderr
    ring = Keyring.parse(result.stdout.strip())
    assert ring.primary == "2026-11" and len(ring.keys["2026-11"]) == 32


# -- config apply ---------------------------------------------------------------------------


@pytest.mark.mongo
async def test_config_apply_stores_only_sealed_tokens_and_stays_idempotent(
        settings: Settings, db: Any, tmp_path: Path) -> None:
    token = used_secret(f"apply-{uuid.uuid4().hex}")
    path = tmp_path / "c.yaml"
    path.write_text(config_yaml(2, token))
    first = cli(settings, "config", "apply", str(path), keys=keys_of(OLD))
    assert first.returncode == 0, first.stderr
    assert token not in first.stdout + first.stderr
    docs = await db.networks.find().to_list(None)
    assert len(docs) == 2
    dump = json.dumps(docs, default=str)
    assert token not in dump
    for doc in docs:
        for item in doc["recording_auth_configs"]:
            assert item["token"]["kid"] == "old1"
            opened = open_item(OLD, RECORDING_AUTH_CONFIGS, doc["_id"], item)
            assert opened["token"] == f"{token}-{doc['_id'][1:].lstrip('0') or '0'}-{item['id']}"

    again = cli(settings, "config", "apply", str(path), keys=keys_of(BOTH))
    assert again.returncode == 0, again.stderr
    assert "already up to date" in again.stdout  # same secrets: nothing rewritten
    assert await db.networks.find().to_list(None) == docs

    path.write_text(config_yaml(2, token).replace(f"{token}-1-8", f"{token}-changed"))
    changed = cli(settings, "config", "apply", str(path), keys=keys_of(BOTH))
    assert changed.stdout.splitlines()[0] == "updated network n001: recording_auth_configs[8]", changed.stdout
    n001 = await db.networks.find_one({"_id": "n001"})
    assert [i["token"]["kid"] for i in n001["recording_auth_configs"]] == ["old1", "new2", "old1"]
    assert open_item(BOTH, RECORDING_AUTH_CONFIGS, "n001",
                     n001["recording_auth_configs"][1])["token"] == f"{token}-changed"


# -- rotation -------------------------------------------------------------------------------


async def _configure(db: Any, networks: int, token: str, codec: Any) -> None:
    cfg = config_file.ConfigFile.model_validate(
        {"networks": [{"id": f"n{n:03d}", "name": "N", "recording_auth_configs": [
            {"id": 7, "method": "bearer_header", "token": f"{token}-{n}-7"},
            {"id": 8, "method": "query_param", "name": "q", "token": f"{token}-{n}-8"},
            {"id": 9, "method": "custom_header", "name": "X-K", "token": f"{token}-{n}-9"},
        ]} for n in range(networks)]})
    await config_apply.apply(db, cfg, codec)


async def _kids(db: Any) -> list[str]:
    return [i["token"]["kid"] if isinstance(i["token"], dict) else "plain"
            for d in await db.networks.find().sort("_id", 1).to_list(None)
            for i in d["recording_auth_configs"]]


async def _plaintexts(db: Any, codec: Keyring) -> list[str]:
    return [open_item(codec, RECORDING_AUTH_CONFIGS, d["_id"], i)["token"]
            for d in await db.networks.find().sort("_id", 1).to_list(None)
            for i in d["recording_auth_configs"]]


@pytest.mark.mongo
async def test_rotate_reseals_everything_with_the_newest_key_and_is_idempotent(db: Any) -> None:
    await _configure(db, 5, "rot", OLD)
    before = await _plaintexts(db, OLD)
    report = await rotate(db, BOTH)
    assert (report.documents, report.resealed, report.current, report.unreadable) == (5, 15, 0, [])
    assert set(await _kids(db)) == {"new2"}
    assert await _plaintexts(db, NEW) == before  # the old key can now be dropped
    again = await rotate(db, BOTH)
    assert (again.documents, again.resealed, again.current) == (5, 0, 15)


@pytest.mark.mongo
async def test_an_interrupted_rotation_leaves_every_value_readable_and_resumes(db: Any) -> None:
    await _configure(db, 6, "res", OLD)
    before = await _plaintexts(db, OLD)
    seen: list[int] = []

    def crash_after_two(collection: str, done: int, total: int) -> None:
        seen.append(done)
        assert total == 6
        if done == 2:
            raise KeyboardInterrupt  # the operator's Ctrl-C, or a killed pod

    with pytest.raises(KeyboardInterrupt):
        await rotate(db, BOTH, progress=crash_after_two)
    assert await _kids(db) == ["new2"] * 6 + ["old1"] * 12
    assert await _plaintexts(db, BOTH) == before
    report = await rotate(db, BOTH)
    assert (report.resealed, report.current) == (12, 6)
    assert set(await _kids(db)) == {"new2"}


@pytest.mark.mongo
async def test_rotate_seals_values_stored_before_encryption(db: Any) -> None:
    await db.networks.insert_one({"_id": "legacy", "recording_auth_configs": [
        {"id": "7", "method": "bearer_header", "token": "plain-legacy-token"}, {"id": "8"}]})
    report = await rotate(db, NEW)
    assert (report.resealed, report.current) == (1, 0)
    doc = await db.networks.find_one({"_id": "legacy"})
    assert "plain-legacy-token" not in json.dumps(doc, default=str)
    assert open_item(NEW, RECORDING_AUTH_CONFIGS, "legacy",
                     doc["recording_auth_configs"][0])["token"] == "plain-legacy-token"
    assert doc["recording_auth_configs"][1] == {"id": "8"}


@pytest.mark.mongo
async def test_rotate_reports_values_no_configured_key_opens_and_keeps_them(db: Any) -> None:
    await _configure(db, 2, "lost", OLD)
    report = await rotate(db, NEW)  # the old key was dropped before rotating: an operator error
    assert report.resealed == 0 and len(report.unreadable) == 6
    assert "old1" in report.unreadable[0] and "lost" not in "".join(report.unreadable)
    assert await _kids(db) == ["old1"] * 6  # nothing destroyed: add the key back and rerun


@pytest.mark.mongo
async def test_rotate_does_not_overwrite_a_concurrent_config_change(
        db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    await _configure(db, 1, "race", OLD)
    original = rotation._rotate_document

    async def apply_in_between(coll: Any, specs: list[SecretItems], codec: Any,
                               doc: dict[str, Any], projection: dict[str, int],
                               report: RotationReport) -> None:
        if not report.retried:  # `config apply` lands between the rotation's read and its write
            await coll.update_one({"_id": doc["_id"]}, {"$set": {
                "recording_auth_configs.0.token": OLD.seal(
                    "race-new", RECORDING_AUTH_CONFIGS.context(doc["_id"], {"id": "7"}, "token"))}})
        await original(coll, specs, codec, doc, projection, report)

    monkeypatch.setattr(rotation, "_rotate_document", apply_in_between)
    report = await rotate(db, BOTH)
    assert report.retried == 1 and report.resealed == 3
    assert (await _plaintexts(db, NEW))[0] == "race-new"


@pytest.mark.mongo
async def test_rotate_secrets_command_reports_progress_and_counts(settings: Settings,
                                                                   db: Any) -> None:
    await _configure(db, 4, "cmd", OLD)
    first = cli(settings, "admin", "rotate-secrets", keys=keys_of(BOTH))
    assert first.returncode == 0, first.stderr
    assert "re-encrypting networks" in first.stderr
    assert "4/4" in first.stderr
    assert ("rotate-secrets (newest key new2): 4 document(s) checked, 12 secret(s) re-encrypted, "
            "0 already current, 0 unreadable") in first.stdout
    second = cli(settings, "admin", "rotate-secrets", keys=keys_of(BOTH))
    assert "0 secret(s) re-encrypted, 12 already current" in second.stdout
    assert set(await _kids(db)) == {"new2"}
    broken = cli(settings, "admin", "rotate-secrets", keys=keys_of(OLD))  # new2 not configured
    assert broken.returncode == 1 and "12 unreadable" in broken.stdout
    assert "unreadable networks n000 recording_auth_configs 7 token: sealed with key 'new2'" in broken.stderr


@pytest.mark.mongo
async def test_a_new_kind_of_secret_is_one_place_entry_lists_of_secrets_included(db: Any) -> None:
    """How webhook secrets join: one SecretItems entry; apply, open and rotate handle it."""
    webhooks = SecretItems("networks", "webhooks", ("secret", "previous_secrets"))
    doc = {"_id": "w1", "webhooks": [{"id": "wh-1", "url": "http://127.0.0.1:9/h",
                                      "secret": "whsec_current", "previous_secrets": ["whsec_a", "whsec_b"]},
                                     {"id": "wh-2", "url": "http://127.0.0.1:9/g", "secret": "whsec_2",
                                      "previous_secrets": []}]}
    sealed = seal_document(OLD, "networks", doc, None, places=(webhooks,))
    assert "whsec_" not in json.dumps(sealed["webhooks"])
    await db.networks.insert_one(sealed)
    assert seal_document(BOTH, "networks", doc, sealed, places=(webhooks,)) == sealed  # unchanged
    report = await rotate(db, BOTH, places=(webhooks,))
    assert (report.resealed, report.current) == (3, 1)  # the empty list counts as current
    stored = (await db.networks.find_one({"_id": "w1"}))["webhooks"]
    assert stored[0]["secret"]["kid"] == "new2"
    assert {s["kid"] for s in stored[0]["previous_secrets"]} == {"new2"}
    assert open_item(NEW, webhooks, "w1", stored[0]) == doc["webhooks"][0]
    with pytest.raises(SecretInvalid):  # a previous secret moved to another webhook does not open
        open_item(NEW, webhooks, "w1", {**stored[1], "previous_secrets": stored[0]["previous_secrets"]})


@pytest.mark.mongo
async def test_the_read_model_every_service_loads_holds_no_secret(db: Any) -> None:
    """Gateway, validator, notifier and fetcher read networks through load_network: it holds
    neither the token nor its sealed form, only which key sealed it."""
    await _configure(db, 1, "read", OLD)
    await db.networks.insert_one({"_id": "legacy", "name": "L", "call_ingestion_enabled": True,
                                  "recording_auth_configs": [
                                      {"id": "7", "method": "bearer_header", "token": "read-legacy"}]})
    stored = await db.networks.find_one({"_id": "n000"})
    network = await config_file.load_network(db, "n000")
    assert network is not None
    held = json.dumps(network.model_dump(), default=str)
    assert "read-0" not in held
    assert not any(c["token"]["ct"] in held for c in stored["recording_auth_configs"])
    assert {c.token for c in network.recording_auth_configs} == {"sealed:old1"}
    legacy = await config_file.load_network(db, "legacy")
    assert legacy is not None and legacy.recording_auth_configs[0].token == "unsealed"
