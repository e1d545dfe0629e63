"""What the benchmarks set up on the dev stack before they drive it."""

from __future__ import annotations

import os
from pathlib import Path

from callingest import config_file, mongo
from callingest.infra import prepare_infrastructure
from callingest.secretbox import Keyring
from callingest.settings import Settings
from tools import devstack

# The benchmarks run on the dev stack: its defaults, in this process and the services it starts.
os.environ.setdefault("CALLINGEST_ENV", "dev")

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "deploy" / "examples" / "demo-config.yaml"


async def prepare(settings: Settings) -> None:
    """Topics, indexes and bucket (what `callingest admin init` creates), then the demo config."""
    await prepare_infrastructure(settings)
    client = mongo.open_client(settings)
    try:
        await config_file.apply(mongo.database(client, settings), config_file.load(DEMO_CONFIG),
                                Keyring.parse(devstack.dev_secret_keys()))
    finally:
        await client.close()
