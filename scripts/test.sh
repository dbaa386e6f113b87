#!/usr/bin/env bash
# One command for the whole test suite: install everything, lint, type-check, then every test — unit,
# property, in-memory groups and the integration tests with real Prosody, namespaces, TAP devices and ping.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export IPOP_REQUIRE_INTEGRATION=1  # a missing prerequisite fails the run instead of skipping its tests
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The slowest tests with their times: what to look at when the suite nears its 20-minute budget.
exec .venv/bin/python -m pytest -p no:cacheprovider -q --durations=20 "$@"
