#!/usr/bin/env bash
# The gateway's main job on loopback: 3 simulated GPU workers + the gateway, no Redis.
# Installs into .venv first. Extra arguments go to `gateway demo` (e.g. --port 0).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
ensure_venv ""
exec .venv/bin/gateway demo "$@"
