#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster for tests and the benchmark (never for production data).
#
#   scripts/pg.sh start DIR [PORT]   initdb DIR (once) and start it on 127.0.0.1:PORT (a free port if left
#                                    out); creates the database twostep_test (ICU en-US collation, as a
#                                    production database usually sorts); prints the postgresql:// URL
#   scripts/pg.sh stop DIR           stop the cluster (fast shutdown); DIR stays
#   scripts/pg.sh run CMD [ARGS...]  a fresh cluster in a temp dir, CMD run with TEST_DATABASE_URL set,
#                                    then stopped and deleted whatever happens (trap on exit)
#
# initdb and pg_ctl refuse to run as root: as root they run as the OS user `postgres` (created here
# if missing, as on a fresh machine), and DIR is owned by it. Settings favour speed over durability
# (fsync=off): a crash may lose the cluster, which is fine for a test database.
set -euo pipefail

PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
DBNAME="${PG_TEST_DBNAME:-twostep_test}"

die() { echo "pg.sh: $*" >&2; exit 1; }

ensure_binaries() {
  if [ -x "$PGBIN/initdb" ]; then return; fi
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "pg.sh: installing postgresql-15 (server binaries missing)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql-15 >/dev/null
  fi
  [ -x "$PGBIN/initdb" ] || die "PostgreSQL 15 server binaries not found in $PGBIN (apt-get install postgresql-15)"
}

ensure_user() {
  if [ "$(id -u)" -ne 0 ]; then return; fi
  if ! id postgres >/dev/null 2>&1; then
    echo "pg.sh: creating the system user postgres" >&2
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres \
      || adduser --system --group --no-create-home postgres
  fi
}

# Run a server-side command as postgres when we are root, as ourselves otherwise.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    if command -v runuser >/dev/null; then runuser -u postgres -- "$@"; else su -s /bin/sh postgres -c "$(printf '%q ' "$@")"; fi
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

cmd_start() {
  local dir="${1:?usage: pg.sh start DIR [PORT]}" port="${2:-}"
  ensure_binaries
  ensure_user
  [ -n "$port" ] || port="$(free_port)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; chmod 700 "$dir"; fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$PGBIN/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  fi
  echo "$port" >"$dir/port.txt" 2>/dev/null || as_pg sh -c "echo $port >'$dir/port.txt'"
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w -t 30 \
    -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='$dir/data' -c fsync=off \
        -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" start >/dev/null \
    || { cat "$dir/data/server.log" >&2; die "pg_ctl start failed"; }
  if ! "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atq \
        -c "SELECT 1 FROM pg_database WHERE datname = '$DBNAME'" | grep -q 1; then
    # Sorted like a usual production database (en_US), not by code point as the cluster's C.UTF-8 would:
    # queries that need code point order must say so (COLLATE "C"), and the tests see when one does not.
    "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -q -c "CREATE DATABASE $DBNAME TEMPLATE template0 \
      LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'" >/dev/null
  elif [ "$("$PGBIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atq \
        -c "SELECT datlocprovider FROM pg_database WHERE datname = '$DBNAME'")" != "i" ]; then
    echo "pg.sh: $DBNAME in $dir was made before it used ICU's en-US collation; delete $dir for a new one" >&2
  fi
  echo "postgresql://postgres@127.0.0.1:$port/$DBNAME"
}

cmd_stop() {
  local dir="${1:?usage: pg.sh stop DIR}"
  [ -f "$dir/data/postmaster.pid" ] || return 0
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null
}

cmd_run() {
  [ "$#" -gt 0 ] || die "usage: pg.sh run CMD [ARGS...]"
  local dir
  dir="$(mktemp -d "${TMPDIR:-/tmp}/twostep-pg.XXXXXX")"
  # shellcheck disable=SC2064
  trap "cmd_stop '$dir' || true; rm -rf '$dir'" EXIT
  trap 'exit 130' INT TERM
  TEST_DATABASE_URL="$(cmd_start "$dir")"
  export TEST_DATABASE_URL
  echo "pg.sh: running against $TEST_DATABASE_URL" >&2
  set +e
  "$@"
  local rc=$?
  set -e
  return "$rc"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  run) shift; cmd_run "$@" ;;
  *) die "usage: pg.sh start DIR [PORT] | stop DIR | run CMD [ARGS...]" ;;
esac
