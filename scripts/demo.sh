#!/usr/bin/env bash
# Sets up .venv (once) and runs the example app on the embedded dev broker with 2 children.
# It feeds itself orders and prints every total; Ctrl-C for a warm shutdown.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/shardsup start -A examples.orders --broker embedded:// -c 2 "$@"
