#!/usr/bin/env bash
# Runs the suite; pytest's exit 5 (no tests collected) counts as failure so CI never passes on nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q -rfEs "$@"
rc=$?
if [[ $rc -eq 5 ]]; then echo "run-tests: no tests were collected" >&2; exit 1; fi
exit $rc
