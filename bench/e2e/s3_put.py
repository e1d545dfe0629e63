"""CPU of storing one recording in S3 with the body signed (SHA-256 in the signature) and
unsigned (UNSIGNED-PAYLOAD), alternating, on the dev stack's S3 server:

    .venv/bin/python bench/e2e/s3_put.py --puts 200 --rounds 3

Per PUT of a ``--mib`` body (3.84 MB, the e2e benchmark's 60 s 16 kHz stereo WAV): this
process's CPU (botocore's hashing and signing, aiohttp's send) and the S3 server's
(found by its port), as ``bench/e2e/run.py`` measures them. Objects are deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.e2e.cpu import listener_pid, load_average, process_cpu  # noqa: E402
from bench.stack import stack_settings  # noqa: E402
from callingest import s3  # noqa: E402
from tools import devstack  # noqa: E402


async def measure(signed: bool, body: bytes, puts: int, server_pid: int) -> dict[str, float]:
    settings = stack_settings(devstack.Ports(), "s3put", "x")
    async with s3.s3_client(settings, signed_payload=signed) as client:
        await s3.ensure_bucket(client, settings.s3_bucket)
        keys = [f"bench-s3put/{uuid.uuid4().hex}" for _ in range(puts)]

        async def chunks() -> object:
            yield body

        own0, srv0, t0 = os.times(), process_cpu(server_pid), time.monotonic()
        for key in keys:
            await s3.upload(client, settings.s3_bucket, key, chunks(),  # type: ignore[arg-type]
                            attributes=lambda: {"ContentType": "audio/wav"})
        own1, srv1, wall = os.times(), process_cpu(server_pid), time.monotonic() - t0
        for i in range(0, len(keys), 500):
            await client.delete_objects(Bucket=settings.s3_bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 500]], "Quiet": True})
    assert srv0 is not None and srv1 is not None
    return {"client_ms": 1000 * ((own1.user + own1.system) - (own0.user + own0.system)) / puts,
            "server_ms": 1000 * (srv1.total - srv0.total) / puts, "wall_ms": 1000 * wall / puts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--puts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=3_840_044)
    args = parser.parse_args()
    ports = devstack.Ports()
    pid = listener_pid(ports.s3)
    if pid is None:
        parser.error(f"no S3 server on port {ports.s3}")
    body = os.urandom(args.bytes)
    print(f"load average {load_average()}; {args.puts} PUTs of {args.bytes} bytes per round")
    print("| round | payload | client CPU ms/PUT | S3 server CPU ms/PUT | wall ms/PUT |")
    print("|---|---|---:|---:|---:|")
    for r in range(1, args.rounds + 1):
        for signed in (True, False):
            m = asyncio.run(measure(signed, body, args.puts, pid))
            print(f"| {r} | {'signed (SHA-256)' if signed else 'UNSIGNED-PAYLOAD'} | "
                  f"{m['client_ms']:.2f} | {m['server_ms']:.2f} | {m['wall_ms']:.1f} |", flush=True)
    print(f"load average {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
