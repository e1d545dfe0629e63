"""A recording auth config is modelled once (issue 13): ``config apply``, the read model and
the fetcher all use :class:`callingest.config_file.RecordingAuthConfig`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from callingest import config_apply, config_file
from callingest.config_file import RecordingAuthConfig
from callingest.errors import PermanentError
from services.fetcher.step import load_recording_auth_config
from tests.conftest import DEV_KEYRING, ROOT

TOKEN = "rec-5ecret-token-93"

CONFIG = """\
networks:
  - id: "4401"
    name: Auth Model Network
    recording_auth_configs:
      - id: 7
        method: custom_header
        name: X-Api-Key
        token: {token}
"""


def test_one_model_of_a_recording_auth_config() -> None:
    defined = [path.relative_to(ROOT).as_posix()
               for package in ("callingest", "services")
               for path in sorted((ROOT / package).rglob("*.py"))
               if re.search(r"^class RecordingAuthConfig\b", path.read_text(), re.M)]
    assert defined == ["callingest/config_file.py"]


@pytest.mark.mongo
async def test_the_fetcher_opens_the_applied_config_as_the_same_model(db: Any,
                                                                      tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(CONFIG.format(token=TOKEN))
    await config_apply.apply(db, config_file.load(path), DEV_KEYRING)

    auth = await load_recording_auth_config(db, "4401", "7", DEV_KEYRING)

    assert type(auth) is RecordingAuthConfig
    assert auth == RecordingAuthConfig(id="7", method="custom_header", name="X-Api-Key",
                                       token=TOKEN)
    assert TOKEN not in repr(auth)
    stored = await db.networks.find_one({"_id": "4401"})
    read_model = config_file.NetworkSettings.from_document(stored).recording_auth_config("7")
    assert read_model is not None and TOKEN not in read_model.token  # a placeholder


def test_config_apply_refuses_a_token_that_would_split_a_header(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(CONFIG.format(token='"abc\\r\\nX-Injected: 1"'))
    with pytest.raises(config_file.ConfigError) as info:
        config_file.load(path)
    assert "control characters" in str(info.value)
    assert "X-Injected" not in str(info.value)


@pytest.mark.mongo
async def test_a_stored_config_the_model_refuses_fails_without_showing_its_token(db: Any) -> None:
    await db.networks.insert_one({"_id": "4402", "recording_auth_configs": [
        {"id": "7", "method": "custom_header", "name": "X-Api-Key",
         "token": f"{TOKEN}\r\nX-Injected: 1"}]})  # stored before encryption, unchecked
    with pytest.raises(PermanentError) as info:
        await load_recording_auth_config(db, "4402", "7", DEV_KEYRING)
    assert info.value.failure_class == "RecordingAuthConfigInvalid"
    assert "control characters" in info.value.message
    assert TOKEN not in info.value.message and "X-Injected" not in info.value.message
