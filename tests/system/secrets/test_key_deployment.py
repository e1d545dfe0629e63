"""Where the data keys go in Kubernetes: only the workload that opens secrets gets them."""

from __future__ import annotations

import base64

import pytest

from callingest.secretbox import Keyring
from tests.system.ops.manifests import OVERLAYS, of_kind, render_overlay

#: Workloads that open sealed secrets.
OPENERS = {"fetcher", "webhooks"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_fetcher_and_the_webhooks_deliverer_get_the_data_keys(overlay: str) -> None:
    holders = set()
    for kind in ("Deployment", "Job"):
        for name, workload in of_kind(render_overlay(overlay), kind).items():
            for container in workload["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env", []):
                    if env["name"] == "SECRET_KEYS":
                        ref = env["valueFrom"]["secretKeyRef"]
                        assert ref["name"].startswith("callingest-secrets")
                        assert ref["key"] == "SECRET_KEYS"
                        holders.add(name)
    assert holders == OPENERS


def test_the_dev_overlay_key_is_a_valid_keyring() -> None:
    (secret,) = of_kind(render_overlay("dev"), "Secret").values()
    ring = Keyring.parse(base64.b64decode(secret["data"]["SECRET_KEYS"]).decode())
    assert ring.primary == "dev1"
