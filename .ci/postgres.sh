#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the record's contract tests.
#
# Usage: bash .ci/postgres.sh ENV_FILE
# Installs Debian's postgresql package if no server binaries are present,
# creates a cluster in a fresh temporary directory (as the `postgres` user
# when run as root), starts it on 127.0.0.1 on a free port with password
# (scram-sha-256) authentication, and writes
#   FEDSEAL_TEST_PG_URL=postgresql+psycopg://fedseal:PASSWORD@127.0.0.1:PORT/postgres
#   FEDSEAL_TEST_PG_DATA=DIR   (stop with: pg_ctl -D DIR stop)
#   FEDSEAL_TEST_PG_CTL=PATH   (that pg_ctl)
#   FEDSEAL_TEST_PG_OWNER=postgres when run as root (pg_ctl must run as it), else empty
# to ENV_FILE for the caller to source. Exits non-zero if anything fails.
set -euo pipefail

env_file="${1:?usage: postgres.sh ENV_FILE}"

find_bindir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
    echo "$d"
  fi
}

bindir="$(find_bindir)"
if [ -z "$bindir" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "postgres.sh: PostgreSQL is not installed and we are not root to install it" >&2
    exit 1
  fi
  echo "postgres.sh: installing PostgreSQL from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  bindir="$(find_bindir)"
  [ -n "$bindir" ] || { echo "postgres.sh: initdb not found after install" >&2; exit 1; }
fi

# A non-root account to own the cluster (PostgreSQL refuses to run as root).
run_as=()
if [ "$(id -u)" -eq 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres
  fi
  run_as=(runuser -u postgres --)
fi

base="$(mktemp -d -t fedseal-pg.XXXXXX)"
chmod 700 "$base"
password="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$password" >"$base/pwfile"
if [ "${#run_as[@]}" -gt 0 ]; then
  chown -R postgres "$base"
fi

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"

"${run_as[@]}" "$bindir/initdb" -D "$base/data" -U fedseal --pwfile="$base/pwfile" \
  --auth=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >"$base/initdb.log" 2>&1 || {
  cat "$base/initdb.log" >&2
  exit 1
}
rm -f "$base/pwfile"

"${run_as[@]}" "$bindir/pg_ctl" -D "$base/data" -l "$base/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $base -c fsync=off -c full_page_writes=off" \
  start >/dev/null || {
  cat "$base/server.log" >&2
  exit 1
}

url="postgresql+psycopg://fedseal:${password}@127.0.0.1:${port}/postgres"
umask 077
{
  echo "FEDSEAL_TEST_PG_URL=$url"
  echo "FEDSEAL_TEST_PG_DATA=$base/data"
  echo "FEDSEAL_TEST_PG_CTL=$bindir/pg_ctl"
  echo "FEDSEAL_TEST_PG_OWNER=${run_as[*]:+postgres}"
} >"$env_file"
echo "postgres.sh: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $base/data)" >&2
