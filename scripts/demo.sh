#!/usr/bin/env bash
# One command for a newcomer: install everything, then show the main job (Prosody and five nodes in network
# namespaces passing traffic across overlay hops). Removes everything it started when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
