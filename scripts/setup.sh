#!/usr/bin/env bash
# Set up tartflow on a fresh machine: a virtualenv with tartflow installed (pip install .),
# plus the CNCF distribution registry (docker-registry) the test suite and the demo use,
# xfsprogs for the copy-on-write tests, and with --test PostgreSQL (the database
# tests/test_scale.py and benchmarks/scale.py run Prefect on).
# Idempotent; prints what it does. Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TARTFLOW_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
echo "setup: pip install .$extra"
"$VENV/bin/pip" install -q --disable-pip-version-check ".$extra"

if ! command -v docker-registry >/dev/null 2>&1 && ! command -v registry >/dev/null 2>&1; then
  if [ "$(uname)" = "Darwin" ]; then
    echo "setup: install the distribution registry with 'brew install distribution' (binary 'registry')" >&2
  elif command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get install docker-registry"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-registry >/dev/null
    # Debian starts a system registry on :5000; tartflow's tests start their own.
  else
    echo "setup: no docker-registry found; install the CNCF distribution registry" >&2
  fi
fi

# xfsprogs: the copy-on-write tests and benchmark (issue 15) make an XFS file system with
# reflink on a loop device; without it they skip and say so. macOS has APFS clones built in.
if [ "$(uname)" != "Darwin" ] && ! command -v mkfs.xfs >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "setup: apt-get install xfsprogs"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq xfsprogs >/dev/null
fi

# PostgreSQL for the scale test and benchmark: they start their own cluster on loopback from
# these binaries (Debian: /usr/lib/postgresql/<major>/bin); a system cluster is left alone.
if [ -n "$extra" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(uname)" = "Darwin" ]; then
    echo "setup: install PostgreSQL with 'brew install postgresql@15' (tests/test_scale.py skips without it)" >&2
  elif command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get install postgresql"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup: no PostgreSQL found; tests/test_scale.py will skip (set TARTFLOW_POSTGRES_BIN)" >&2
  fi
fi
