#!/usr/bin/env bash
# Sets up .venv (if missing) with the test requirements, then runs the test suite.
# Usage: bash run_tests.sh [pytest args...]      e.g. bash run_tests.sh -m slow
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-test.txt
# pytest exits 5 when it collected no tests; that is a failure here too.
exec .venv/bin/python -m pytest -q "$@"
