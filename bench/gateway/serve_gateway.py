"""The gateway as `callingest serve gateway` runs it, with the metrics middleware optional.

Usage: python bench/gateway/serve_gateway.py [--no-metrics] [--no-scans]   (settings from the
environment)

``--no-scans``: one process that does not scan for unpublished calls (the republisher's minute
scan, which FerretDB answers by reading the whole collection: docs/benchmarks.md, "Fresh
machine, 2026-12-01"); for measurements only, with ``GATEWAY_WORKERS=1``.
"""

from __future__ import annotations

import asyncio
import sys

from callingest.logging import configure
from callingest.settings import load_settings
from services.gateway.main import serve, serve_one

if __name__ == "__main__":
    settings = load_settings()
    metrics = "--no-metrics" not in sys.argv[1:]
    if "--no-scans" in sys.argv[1:]:
        if settings.gateway_workers != 1:
            raise SystemExit("--no-scans runs one gateway process: set GATEWAY_WORKERS=1")
        configure("gateway", settings.log_level)
        asyncio.run(serve_one(settings, with_metrics=metrics, scans_unpublished=False))
    else:
        asyncio.run(serve(settings, with_metrics=metrics))
