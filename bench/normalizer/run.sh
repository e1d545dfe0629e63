#!/usr/bin/env bash
# Normalizer benchmark: our transcoder vs the ffmpeg CLI, and peak RSS on a 2-hour recording.
# Usage: bash bench/normalizer/run.sh [--minutes 10] [--rounds 3] [--long-hours 2] [--files ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v ffmpeg >/dev/null 2>&1; then
    apt-get update && apt-get install -y ffmpeg
fi
exec .venv/bin/python -m bench.normalizer "$@"
