#!/usr/bin/env bash
# Sets up .venv (once) and runs the example app on the embedded dev broker with 2 children.
# It feeds itself orders and prints every total; Ctrl-C for a warm shutdown.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
cat <<'EOF'
shardsup demo: orders re-keyed by user, counted in tables and a window, joined with a
global table; two children on the embedded broker. In a second terminal, while it runs:

    .venv/bin/shardsup status -A examples.orders
    .venv/bin/shardsup table -A examples.orders spent
    .venv/bin/shardsup table -A examples.orders per_minute

EOF
exec .venv/bin/shardsup start -A examples.orders --broker embedded:// -c 2 "$@"
