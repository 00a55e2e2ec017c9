#!/usr/bin/env bash
# Installs everything creditgate and its tests need on a fresh Debian/Ubuntu machine:
# redis-server, Chromium (dashboard browser test), setpriv, a C compiler and Python's headers,
# PostgreSQL when none answers, the Python package (its hot path compiled with mypyc).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v setpriv >/dev/null || missing+=(util-linux)  # Redis children die with their parent
# A C compiler and Python's headers: pip compiles the hot path with mypyc (admission/native.py).
command -v cc >/dev/null || missing+=(gcc)
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
  missing+=(python3-dev)

pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if [ -z "${CREDITGATE_TEST_PG_DSN:-}" ] && ! pg_up; then
  command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -z "${CREDITGATE_TEST_PG_DSN:-}" ] && ! pg_up; then
  version=$(ls /etc/postgresql | sort -n | tail -n 1)
  echo "bootstrap: starting PostgreSQL $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 100); do pg_up && break; sleep 0.1; done
  # Debian's default host auth wants a password: give the postgres role one for the tests.
  $SUDO su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
  export CREDITGATE_TEST_PG_DSN="postgresql://postgres:postgres@127.0.0.1:5432/postgres"
  echo "CREDITGATE_TEST_PG_DSN=$CREDITGATE_TEST_PG_DSN" > .pg-dsn.env
fi

python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
# pip -q hides the build's warnings: say which build the install made, and how to see why
# when compiling fell back to the (slower) Python source.
python3 -c 'import sys
from admission import native
choice = native.status()
print("bootstrap: hot path", choice.reason)
if not choice.compiled:
    print("bootstrap: WARNING: the hot path is not compiled; `pip install -v -e .` shows why",
          file=sys.stderr)'
