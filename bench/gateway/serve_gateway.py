"""The gateway as `callingest serve gateway` runs it, with the metrics middleware optional.

Usage: python bench/gateway/serve_gateway.py [--no-metrics]   (settings from the environment)
"""

from __future__ import annotations

import asyncio
import sys

from callingest.settings import load_settings
from services.gateway.main import serve

if __name__ == "__main__":
    asyncio.run(serve(load_settings(), with_metrics="--no-metrics" not in sys.argv[1:]))
