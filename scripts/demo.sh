#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo; arguments go to 'gateway.py demo'
# (default: --duration 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "$#" -eq 0 ] && set -- --duration 20
exec .venv/bin/python gateway.py demo "$@"
