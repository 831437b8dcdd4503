#!/usr/bin/env bash
# Installs what the tests need and runs them: redis-server (and Prometheus, for the
# real-scrape test) from Debian when missing, the package with its dev extras in .venv;
# then ruff, mypy --strict and pytest. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v prometheus >/dev/null || missing+=(prometheus)  # also gives promtool
command -v openssl >/dev/null || missing+=(openssl)  # a certificate for the rediss:// test
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
ensure_venv "[dev]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"
