#!/usr/bin/env bash
# Set up (scripts/setup.sh --test) and run every check: ruff, mypy, the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
status=0
echo "== ruff" >&2
.venv/bin/ruff check . || status=1
echo "== mypy" >&2
.venv/bin/mypy || status=1
echo "== import-linter (the floors)" >&2
.venv/bin/lint-imports || status=1
echo "== pytest" >&2
.venv/bin/python -m pytest "$@" || status=1
exit "$status"
