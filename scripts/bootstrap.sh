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

# The build's output goes to a log (pip -q would hide the build hook's warning). A compile that
# fell back to the Python source is retried once. (A fresh machine's first build once fell back
# because mypyc's type check, run before the runtime dependencies were installed, failed where they
# were missing; tests/test_build.py now checks that case.) (CI sets CREDITGATE_REQUIRE_COMPILED:
# there a failed compile fails the install at once.)
build_log=$(mktemp "${TMPDIR:-/tmp}/creditgate-build.XXXXXX")
# Whether the build compiled, whatever CREDITGATE_PURE_PYTHON says about which one runs.
compiled() { CREDITGATE_PURE_PYTHON= python3 -c 'from admission import native
raise SystemExit(not native.status().compiled)'; }
install() { python3 -m pip install -v --disable-pip-version-check -e ".[dev]" >"$build_log" 2>&1 ||
  { tail -n 30 "$build_log" >&2; echo "bootstrap: pip install failed; full log: $build_log" >&2; exit 1; }; }
install
if ! compiled; then
  grep -h "creditgate: compiling" "$build_log" >&2 || true
  echo "bootstrap: the hot path did not compile; building once more" >&2
  install
fi
if compiled; then
  echo "bootstrap: hot path compiled (mypyc)"
  rm -f "$build_log"
else
  grep -h "creditgate: compiling" "$build_log" >&2 || true
  CREDITGATE_PURE_PYTHON= python3 -c 'from admission import native
print("bootstrap: hot path:", native.status().reason)' >&2
  echo "bootstrap: WARNING: the hot path is not compiled and runs as Python (slower); build log: $build_log" >&2
fi
