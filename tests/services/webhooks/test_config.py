"""Webhooks in `callingest config apply`: stored per network, validated with clear errors that
never echo the secret; webhook URLs on refused addresses are refused like recording URLs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from callingest import config_file
from callingest.secretbox import WEBHOOKS, open_item
from callingest.settings import Settings
from tests.conftest import DEV_KEYRING, ROOT, settings_env
from tests.services.webhooks.conftest import network, new_secret, write_config

DEMO = ROOT / "deploy" / "examples" / "demo-config.yaml"


def _apply(settings: Settings, path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv/bin/callingest"), "config", "apply", str(path)],
                          env={**os.environ, **settings_env(settings), **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.mongo
async def test_webhooks_are_stored_per_network_and_reapplying_changes_nothing(
        settings: Settings, db: Any, tmp_path: Path) -> None:
    secret = new_secret()
    hooks = [{"id": "wh-1", "url": "https://hooks.example.com/callingest", "secret": secret,
              "events": ["call.normalized", "call.failed"]}]
    path = write_config(tmp_path, [network("5005", hooks)])
    first = _apply(settings, path)
    assert first.returncode == 0, first.stderr
    assert secret not in first.stdout + first.stderr
    stored = (await db.networks.find_one({"_id": "5005"}))["webhooks"]
    assert secret not in str(stored)
    assert open_item(DEV_KEYRING, WEBHOOKS, "5005", stored[0]) == {
        "id": "wh-1", "url": "https://hooks.example.com/callingest",
        "events": ["call.normalized", "call.failed"], "secret": secret, "previous_secrets": []}
    again = _apply(settings, path)
    assert "already up to date" in again.stdout


@pytest.mark.mongo
async def test_the_demo_config_has_a_webhook_to_the_demo_receiver(settings: Settings, db: Any) -> None:
    result = _apply(settings, DEMO)
    assert result.returncode == 0, result.stderr
    (hook,) = (await db.networks.find_one({"_id": "1001"}))["webhooks"]
    assert hook["url"] == "http://127.0.0.1:8000/webhooks"
    assert set(hook["events"]) == {"call.normalized", "call.failed", "call.retrying"}


@pytest.mark.parametrize(("hook", "expected"), [
    ({"url": "ftp://hooks.example.com/x"}, "scheme 'ftp' is not allowed"),
    ({"url": "/relative"}, "must be an absolute http(s) URL"),
    ({"url": "https://user:pw@hooks.example.com/"}, "must not carry credentials"),
    ({"url": "http://10.1.2.3/hook"}, "10.1.2.3: private address"),
    ({"url": "http://169.254.169.254/latest"}, "cloud metadata address"),
    ({"url": "http://[::ffff:192.168.0.1]/"}, "private address"),
    ({"url": "http://metadata.google.internal/"}, "cloud metadata host name"),
    ({"events": ["call.exploded"]}, "webhooks[0].events[0]"),
    ({"events": []}, "webhooks[0].events"),
    ({"secret": "whsec_c2hvcnQ="}, "16 to 64 bytes"),
    ({"secret": "hunter2-plain-password"}, "must start with 'whsec_'"),
    ({"previous_secrets": ["whsec_c2hvcnQ="]}, "webhooks[0].previous_secrets"),
])
def test_bad_webhooks_are_refused_with_the_field_path_and_no_secret(
        tmp_path: Path, hook: dict[str, Any], expected: str) -> None:
    entry = {"id": "wh-1", "url": "https://hooks.example.com/x", "secret": new_secret(),
             "events": ["call.failed"], **hook}
    path = write_config(tmp_path, [network("5005", [entry])])
    with pytest.raises(config_file.ConfigError) as info:
        config_file.load(path)
    message = str(info.value)
    assert expected in message
    assert "networks[0].webhooks[0]" in message
    assert entry["secret"] not in message
    assert all(p not in message for p in entry.get("previous_secrets", []))


@pytest.mark.mongo
async def test_a_loopback_webhook_is_stored_with_a_warning_where_loopback_is_refused(
        settings: Settings, db: Any, tmp_path: Path) -> None:
    entry = {"id": "wh-1", "url": "http://127.0.0.1:8000/webhooks", "secret": new_secret(),
             "events": ["call.failed"]}
    path = write_config(tmp_path, [network("5005", [entry])])
    dev = _apply(settings, path, ALLOW_LOOPBACK_WEBHOOKS="true")
    assert dev.returncode == 0 and "warning" not in dev.stderr
    prod = _apply(settings, write_config(tmp_path, [network("5006", [entry])]),
                  ALLOW_LOOPBACK_WEBHOOKS="false")
    assert prod.returncode == 0
    assert "webhook wh-1 of network 5006: refused: 127.0.0.1: loopback address" in prod.stderr


def test_the_dev_stack_allows_loopback_webhooks_and_the_default_refuses_them() -> None:
    from tools import devstack

    assert devstack.service_env(devstack.Ports())["ALLOW_LOOPBACK_WEBHOOKS"] == "true"
    assert Settings().allow_loopback_webhooks is False


def test_duplicate_webhook_ids_are_refused(tmp_path: Path) -> None:
    entry = {"id": "wh-1", "url": "https://hooks.example.com/x", "secret": new_secret(),
             "events": ["call.failed"]}
    path = write_config(tmp_path, [network("5005", [entry, {**entry}])])
    with pytest.raises(config_file.ConfigError, match="duplicate webhooks: wh-1"):
        config_file.load(path)
