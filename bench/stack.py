"""What the benchmarks set up on the dev stack before they drive it."""

from __future__ import annotations

from pathlib import Path

from callingest import config_file, mongo
from callingest.secretbox import Keyring
from callingest.service import prepare_infrastructure
from callingest.settings import Settings
from tools import devstack

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "deploy" / "examples" / "demo-config.yaml"


async def prepare(settings: Settings) -> None:
    """Topics, indexes and bucket (as every service creates them), then the demo config."""
    await prepare_infrastructure(settings)
    client = mongo.open_client(settings)
    try:
        await config_file.apply(mongo.database(client, settings), config_file.load(DEMO_CONFIG),
                                Keyring.parse(devstack.dev_secret_keys()))
    finally:
        await client.close()
