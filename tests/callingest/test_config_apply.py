"""`callingest config apply`: stores the YAML format of interfaces.md, idempotently, all or nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from callingest.settings import Settings
from tests.conftest import ROOT, settings_env

pytestmark = pytest.mark.mongo

DEMO = ROOT / "deploy" / "examples" / "demo-config.yaml"


def apply(settings: Settings, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv/bin/callingest"), "config", "apply", str(path)],
                          env={**os.environ, **settings_env(settings)}, capture_output=True,
                          text=True, timeout=60)


async def test_demo_config_is_stored_and_reapplying_changes_nothing(settings: Settings,
                                                                    db: Any) -> None:
    first = apply(settings, DEMO)
    assert first.returncode == 0, first.stderr
    assert "created network 1001" in first.stdout
    network = await db.networks.find_one({"_id": "1001"})
    assert network["timezone"] == "America/Los_Angeles"
    assert network["signals"] == ["Sale", "Quote", "Free Trial"]
    assert network["csm_email"] == "csm@example.com"
    assert {c["method"] for c in network["recording_auth_configs"]} == {
        "bearer_header", "query_param", "custom_header"}
    token = await db.api_tokens.find_one(
        {"_id": hashlib.sha256(b"demo-advertiser-token").hexdigest()})
    assert token == {"_id": token["_id"], "network_id": "1001", "advertisers": ["adv-1"]}
    assert await db.api_tokens.find_one({"_id": "demo-network-token"}) is None
    campaign = await db.campaigns.find_one({"network_id": "1001", "id_from_network": "85"})
    assert campaign["type"] == "ExternalOnly" and campaign["advertiser_id"] == "adv-1"
    counts = {c: await db[c].count_documents({}) for c in ("networks", "api_tokens", "campaigns")}

    second = apply(settings, DEMO)
    assert second.returncode == 0, second.stderr
    assert "already up to date" in second.stdout
    assert {c: await db[c].count_documents({}) for c in counts} == counts


async def test_tokens_are_never_printed(settings: Settings, db: Any) -> None:
    result = apply(settings, DEMO)
    assert "demo-network-token" not in result.stdout + result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("networks:\n  - id: '1'\n    name: n\n    timezone: Mars/Olympus\n",
         "networks[1].timezone"),
        ("networks:\n  - id: '1'\n    name: n\n    recording_auth_configs:\n"
         "      - {id: 1, method: query_param, token: abc}\n",
         "networks[1].recording_auth_configs[0]"),
        ("networks:\n  - id: '1'\n    name: n\n    api_tokens: [{token: short}]\n",
         "networks[1].api_tokens[0].token"),
        ("networks:\n  - id: '1'\n    name: n\n    advertisers:\n      - id: a\n        campaigns:\n"
         "          - {id_from_network: 5, voice_signals: -1}\n",
         "networks[1].advertisers[0].campaigns[0].voice_signals"),
        ("networks:\n  - id: '1'\n    nmae: typo\n", "networks[1].nmae"),
        # text no store holds (YAML escapes: a NUL, an unpaired surrogate), named by path
        ('networks:\n  - id: \'1\'\n    name: "a\\0b"\n',
         "networks[1].name: must not contain NUL characters or unpaired surrogates"),
        ('networks:\n  - id: \'1\'\n    name: n\n    api_tokens: [{token: "tok-\\ud800-abcdef"}]\n',
         "networks[1].api_tokens[0].token: must not contain NUL"),
        ("networks: [\n", "not valid YAML"),
        ("- just\n- a list\n", "top level"),
    ],
)
async def test_bad_file_names_file_and_field_and_changes_nothing(
    settings: Settings, db: Any, tmp_path: Path, yaml_text: str, expected: str
) -> None:
    # A valid network first in the same file: nothing of it may be written either.
    path = tmp_path / "bad.yaml"
    valid = "networks:\n  - id: '77'\n    name: fine\n    api_tokens: [{token: fine-token-1}]\n"
    if yaml_text.startswith("networks:\n"):
        yaml_text = valid + yaml_text[len("networks:\n"):]
    path.write_text(yaml_text)
    result = apply(settings, path)
    assert result.returncode != 0
    assert str(path) in result.stderr
    assert expected in result.stderr
    assert await db.networks.count_documents({}) == 0
    assert await db.api_tokens.count_documents({}) == 0


def network_yaml(network_id: str, *tokens: str) -> str:
    return (f"  - id: '{network_id}'\n    name: N\n    api_tokens:\n"
            + "".join(f"      - token: {t}\n" for t in tokens))


async def test_a_token_no_longer_listed_for_its_network_is_revoked(
        settings: Settings, db: Any, tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("networks:\n" + network_yaml("9901", "old-token-9901", "kept-token-9901")
                    + network_yaml("9902", "other-token-9902"))
    assert apply(settings, path).returncode == 0
    # The old token replaced by a new one; network 9902 is not in the file: left alone.
    path.write_text("networks:\n" + network_yaml("9901", "new-token-9901", "kept-token-9901"))
    result = apply(settings, path)
    assert result.returncode == 0, result.stderr
    old = hashlib.sha256(b"old-token-9901").hexdigest()
    assert f"revoked api token of network 9901 (sha256 {old[:8]}...)" in result.stdout.splitlines()
    assert "old-token" not in result.stdout + result.stderr
    remaining = {d["_id"] for d in await db.api_tokens.find().to_list(None)}
    assert remaining == {hashlib.sha256(t).hexdigest()
                         for t in (b"new-token-9901", b"kept-token-9901", b"other-token-9902")}
    assert "already up to date" in apply(settings, path).stdout


async def test_campaigns_and_advertisers_no_longer_listed_are_removed(
        settings: Settings, db: Any, tmp_path: Path) -> None:
    path = tmp_path / "campaigns.yaml"
    advertisers = ("    advertisers:\n      - id: adv-a\n        campaigns: [{id_from_network: 1}, "
                   "{id_from_network: 2}]\n      - id: adv-b\n        campaigns: [{id_from_network: 3}]\n")
    path.write_text("networks:\n" + network_yaml("9901", "token-9901") + advertisers
                    + network_yaml("9902", "token-9902") + advertisers)
    assert apply(settings, path).returncode == 0
    # 9901: adv-a's campaigns emptied, adv-b gone; 9902 is not in the file: left alone.
    path.write_text("networks:\n" + network_yaml("9901", "token-9901")
                    + "    advertisers:\n      - id: adv-a\n        campaigns: []\n")
    result = apply(settings, path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for removed in ("1", "2", "3"):
        assert f"removed campaign {removed} of network 9901" in lines
    assert await db.campaigns.count_documents({"network_id": "9901"}) == 0
    assert await db.campaigns.count_documents({"network_id": "9902"}) == 3
    assert (await db.networks.find_one({"_id": "9901"}))["advertisers"] == ["adv-a"]
    assert "already up to date" in apply(settings, path).stdout


async def test_an_update_names_the_fields_and_entries_that_changed(
        settings: Settings, db: Any, tmp_path: Path) -> None:
    path = tmp_path / "fields.yaml"
    auth = ("    recording_auth_configs:\n      - {id: 7, method: bearer_header, token: s3cr3t-one}\n"
            "      - {id: 8, method: bearer_header, token: s3cr3t-two}\n")
    path.write_text("networks:\n" + network_yaml("9901", "token-9901")
                    + "    csm_email: a@example.com\n    signals: [Sale]\n" + auth)
    assert apply(settings, path).returncode == 0
    path.write_text("networks:\n" + network_yaml("9901", "token-9901")
                    + "    csm_email: b@example.com\n    signals: [Sale, Quote]\n"
                    + auth.replace("s3cr3t-two", "s3cr3t-new"))
    result = apply(settings, path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "updated network 9901: csm_email, signals, recording_auth_configs[8]")
    assert "s3cr3t" not in result.stdout + result.stderr and "example.com" not in result.stdout


def test_missing_file_is_reported(settings: Settings, tmp_path: Path) -> None:
    result = apply(settings, tmp_path / "absent.yaml")
    assert result.returncode != 0
    assert "absent.yaml" in result.stderr and "cannot read" in result.stderr
