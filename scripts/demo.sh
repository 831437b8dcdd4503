#!/usr/bin/env bash
# The gateway's main job on loopback: 5 simulated GPU workers (one pool per worker
# protocol: friendli-container, openai-images, a1111) + the gateway, no Redis.
# Installs into .venv first. Extra arguments go to `gateway demo` (e.g. --port 0).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
ensure_venv ""
exec .venv/bin/gateway demo "$@"
