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
# one worker per core, at most 2 (each test file on one worker: a module's fixtures, such
# as the technician guide's run, are made once); SMARTCORR_TEST_WORKERS=1 runs serially
cores=$(nproc 2>/dev/null || echo 1)
workers=${SMARTCORR_TEST_WORKERS:-$(( cores >= 2 ? 2 : 1 ))}
parallel=()
if [ "$workers" -gt 1 ]; then
    parallel=(-n "$workers" --dist loadfile)
fi
.venv/bin/python -m pytest "${parallel[@]}" "$@" || status=1
exit "$status"
