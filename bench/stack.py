"""What the benchmarks set up on the dev stack before they drive it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from callingest import config_apply, config_file, mongo
from callingest.infra import prepare_infrastructure
from callingest.secretbox import Keyring
from callingest.settings import Settings
from tools import devstack

# The benchmarks run on the dev stack: its defaults, in this process and the services it starts.
os.environ.setdefault("CALLINGEST_ENV", "dev")

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "deploy" / "examples" / "demo-config.yaml"


async def prepare(settings: Settings, *configs: Path) -> None:
    """Topics, indexes and bucket (what `callingest admin init` creates), then the demo config
    and ``configs``, applied as `callingest config apply` does (secrets sealed with the dev key)."""
    await prepare_infrastructure(settings)
    keyring = Keyring.parse(devstack.dev_secret_keys())
    client = mongo.open_client(settings)
    try:
        for path in (DEMO_CONFIG, *configs):
            await config_apply.apply(mongo.database(client, settings), config_file.load(path), keyring)
    finally:
        await client.close()


def stack_settings(ports: devstack.Ports, name: str, tag: str, **overrides: Any) -> Settings:
    """``make up`` defaults (retry delays, timeouts, in-flight bounds) on the dev servers at
    ``ports``, with a topic prefix and database of this run (``bench-<name>-<tag>``), and
    ``overrides`` (to measure an alternative)."""
    return Settings(**{
        "callingest_env": "dev",
        "kafka_bootstrap_servers": f"127.0.0.1:{ports.kafka}",
        "topic_prefix": f"bench-{name}-{tag}.",
        "mongodb_uri": SecretStr(f"mongodb://127.0.0.1:{ports.mongodb}/"),
        "mongodb_database": f"bench_{name}_{tag}",
        "s3_endpoint_url": f"http://127.0.0.1:{ports.s3}",
        "s3_access_key_id": SecretStr(devstack.S3_ACCESS_KEY),
        "s3_secret_access_key": SecretStr(devstack.S3_SECRET_KEY),
        "smtp_port": ports.smtp,
        "allow_loopback_recordings": True,
        "secret_keys": SecretStr(devstack.dev_secret_keys()),
        **overrides,
    })


def save_result(out: Path, result: Any, table: str) -> None:
    """Write a run's ``result`` as JSON to ``out``, then print its Markdown ``table`` and where
    the JSON went (the last lines of every benchmark's output)."""
    out.write_text(json.dumps(result, indent=2, default=str))
    print()
    print(table)
    print(f"\nJSON: {out.relative_to(ROOT)}")
