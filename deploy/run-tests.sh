#!/usr/bin/env bash
# README command 2 (and what .ci/run calls): set up, lint, type-check, run the test suite.
# Slow checks are marked `slow` and run in benchmarks, not here.
set -uo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh || exit 1
.venv/bin/ruff check server client shared tests deploy || exit 1
.venv/bin/mypy || exit 1  # files and settings: [tool.mypy] in pyproject.toml
.venv/bin/python -m pytest -p no:cacheprovider -q "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests (exit 5); treating as failure so CI cannot pass empty." >&2
  exit 1
fi
exit $rc
