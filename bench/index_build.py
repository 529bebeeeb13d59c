"""What writers go through while a start builds a new index on a big audit log (not part of `make bench`;
README "Upgrades"). On PostgreSQL only: SQLite has one writer, and its start holds it for the whole build.

    PYTHONPATH=. .venv/bin/python bench/index_build.py postgresql://postgres@127.0.0.1:7064/twostep_test 3000000 [ROOT]

Makes the database `twostep_index_build` next to the one in the URL (once: the records are kept for the next
run) with RECORDS audit records as a site of a year has them, drops the audit log's index by address
(auditevent_ip_created_at) as a database from before 2026-12-07 lacks it, then starts the app of ROOT (this
checkout by default; another one, an older commit, to compare) in a process of its own while a writer, as the
hosts still serving do at each sign-in, adds an audit record in a transaction of its own as fast as it can.
Prints how long the start took, what it said, and how long the writes it overlapped took (the longest, the
99th percentile, how many waited over a second, how many failed at the lock_timeout of 10 s)."""
import os
import subprocess
import sys
import threading
import time

import psycopg
from cryptography.fernet import Fernet

URL, RECORDS = sys.argv[1], int(sys.argv[2])
ROOT = os.path.abspath(sys.argv[3] if len(sys.argv) > 3 else os.path.dirname(os.path.dirname(__file__)))
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "twostep_index_build"
TARGET = URL.rsplit("/", 1)[0] + "/" + NAME
START = ("import webapp\n"
         "webapp.create_app({'DATABASE_URL': %r, 'SECRET_KEY': 'k' * 40, 'SETUP_CODE': 'x',\n"
         "                   'TOTP_ENCRYPTION_KEYS': %r, 'INSTANCE_PATH': '/tmp/twostep-index-build'})\n")


def log(text):
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def start_app(root):
    """The app of `root` started once on TARGET: (seconds, what it printed)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", START % (TARGET, Fernet.generate_key().decode())],
                          cwd=root, env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr)
    return time.monotonic() - started, done.stderr


def seed():
    with psycopg.connect(URL.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (NAME,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{NAME}"')
    start_app(HERE)  # the tables, as this version makes them
    with psycopg.connect(TARGET, autocommit=True) as conn:
        have = conn.execute("SELECT count(*) FROM auditevent").fetchone()[0]
        if have < RECORDS:
            log(f"seeding {RECORDS - have} audit records")
            # A year of records: nine in ten from a client address (the operator's commands have none), a few
            # thousand addresses, a handful of kinds, details as a sign-in writes them.
            conn.execute(
                "INSERT INTO auditevent (created_at, kind, ip, detail) "
                "SELECT now() - (n || ' seconds')::interval * (31536000.0 / %s), "
                "(ARRAY['signin', 'password_rejected', 'code_rejected', 'signout', 'session_ended'])[1 + n %% 5], "
                "CASE WHEN n %% 10 = 0 THEN NULL ELSE '198.51.' || (n %% 251) || '.' || (n %% 241) END, "
                "'{\"browser\": \"known\", \"method\": \"totp\"}' FROM generate_series(1, %s) AS n",
                (RECORDS, RECORDS - have))
            conn.execute("VACUUM ANALYZE auditevent")
        size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('auditevent'))").fetchone()[0]
        log(f"{conn.execute('SELECT count(*) FROM auditevent').fetchone()[0]} audit records, {size} with indexes")
        conn.execute('DROP INDEX IF EXISTS "auditevent_ip_created_at"')  # as a database of before has it


class Writer(threading.Thread):
    """Audit records, one a transaction, as sign-ins write them, each timed: [(started, seconds, failed)]."""

    def __init__(self):
        super().__init__(daemon=True)
        self.times, self.stop = [], threading.Event()

    def run(self):
        with psycopg.connect(TARGET, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")  # as the app's connections
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    with conn.transaction():
                        conn.execute("INSERT INTO auditevent (created_at, kind, ip, detail) "
                                     "VALUES (now(), 'signin', '203.0.113.7', '{}')")
                    failed = False
                except psycopg.errors.LockNotAvailable:
                    failed = True
                self.times.append((started, time.monotonic() - started, failed))
                time.sleep(0.005)


def main():
    seed()
    writer = Writer()
    writer.start()
    time.sleep(2)
    log(f"starting the app of {ROOT}")
    began = time.monotonic()
    seconds, said = start_app(ROOT)
    ended = time.monotonic()
    time.sleep(1)
    writer.stop.set()
    writer.join()
    print(said.strip())
    during = sorted(t for s, t, _ in writer.times if s < ended and s + t > began)
    before = sorted(t for s, t, _ in writer.times if s + t <= began)
    failed = sum(1 for s, t, f in writer.times if f and began < s < ended)
    with psycopg.connect(TARGET) as conn:
        valid = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('auditevent_ip_created_at')"
                             ).fetchone()
    log(f"start: {seconds:.1f} s; index auditevent_ip_created_at valid: {valid and valid[0]}")
    log(f"writes before the start: {len(before)}, longest {1000 * before[-1]:.1f} ms")
    log(f"writes during the start: {len(during)}, longest {1000 * during[-1]:.0f} ms, "
        f"p99 {1000 * during[int(len(during) * 0.99)]:.1f} ms, over 1 s: {sum(t > 1 for t in during)}, "
        f"failed at lock_timeout: {failed}")


if __name__ == "__main__":
    main()
