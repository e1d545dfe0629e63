"""The gateway as `callingest serve gateway` runs it, with the metrics middleware optional.

Usage: python bench/gateway/serve_gateway.py [--no-metrics] [--no-scans]   (settings from the
environment)

``--no-scans``: no process scans for unpublished calls (the republisher's minute scan, which
FerretDB answers by reading the whole collection: docs/benchmarks.md, "Fresh machine,
2026-12-01"); for measurements only.
"""

from __future__ import annotations

import asyncio
import sys

from callingest.settings import load_settings
from services.gateway.main import serve

if __name__ == "__main__":
    asyncio.run(serve(load_settings(), with_metrics="--no-metrics" not in sys.argv[1:],
                      scans_unpublished="--no-scans" not in sys.argv[1:]))
