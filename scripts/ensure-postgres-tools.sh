#!/usr/bin/env bash
# The test suite starts a private PostgreSQL server with initdb/pg_ctl; install Debian's
# packages when they are missing (unless a server is given in CB_TEST_POSTGRES_URL).
set -euo pipefail
[ -n "${CB_TEST_POSTGRES_URL:-}" ] && exit 0
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
echo "PostgreSQL server binaries not found; installing Debian's postgresql" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql
