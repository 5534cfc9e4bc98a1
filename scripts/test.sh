#!/usr/bin/env bash
# Set up (scripts/setup.sh --test) and run the whole test suite. .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
VENV=${TARTFLOW_VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m mypy tartflow flows tasks deployments
exec "$VENV/bin/python" -m pytest "$@"
