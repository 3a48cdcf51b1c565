#!/usr/bin/env bash
# Make PostgreSQL's server programs (initdb, pg_ctl, postgres) available for the
# MLflow-on-PostgreSQL test (tests/test_mlflow_postgres.py). Prints their directory on
# success; exits non-zero with a reason on stderr otherwise. Idempotent: installs only
# when missing, from Debian's package (apt-get install postgresql), and keeps the package
# from creating and starting a system cluster on port 5432: the tests run their own
# server on a private data directory and a free port.
set -euo pipefail

find_bindir() {
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && best="$d"
  done
  if [ -n "$best" ]; then echo "$best"; return 0; fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"; return 0
  fi
  return 1
}

if dir=$(find_bindir); then echo "$dir"; exit 0; fi

. "$(dirname "$0")/apt_lib.sh"
apt_ready "PostgreSQL server" postgresql
# No default cluster: postgresql-common reads this before the server package's postinst.
$SUDO mkdir -p /etc/postgresql-common
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
  echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
fi
apt_install -o Dpkg::Options::=--force-confold postgresql || {
  echo "apt-get install postgresql failed" >&2; exit 3; }
find_bindir || { echo "postgresql installed but initdb/pg_ctl not found" >&2; exit 4; }
