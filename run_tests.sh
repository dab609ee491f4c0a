#!/usr/bin/env bash
# Sets up .venv (if missing) with the test requirements and gemma_jax itself (editable, so that
# `import gemma_jax` works from any directory), then runs the test suite.
# Usage: bash run_tests.sh [pytest args...]      e.g. bash run_tests.sh -m slow, or -n 0 for one process
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-test.txt
# Dependencies came from the line above, so --no-deps: nothing is resolved again. The filter hides
# setuptools' notice that the editable install works through an import hook.
PYTHONWARNINGS='ignore:Editable installation' .venv/bin/python -m pip install -q --no-deps -e .
# Two worker processes (pytest-xdist), whole test files per worker so that module fixtures are
# built once: most tests compile on one core, and CI has two. `-n 0` (or any -n) after it overrides.
# pytest exits 5 when it collected no tests; that is a failure here too.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
