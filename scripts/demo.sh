#!/usr/bin/env bash
# Set up, then pull a demo image the way a user would: starts a local registry on loopback,
# pushes a small synthetic Tart image to it, and runs `tartflow pull` into $TART_HOME
# (default ~/.tart). To pull a real image instead: .venv/bin/tartflow pull <reference>.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m tests.support.demo "$@"
