"""The audit log page on a big log: the first page and a page deep in, for each filter, in-process (no HTTP
server), the median and the slowest of REPEAT requests after two uncounted ones.

    .venv/bin/python bench/audit_pages.py STATE_DIR [DATABASE_URL]

The first run seeds the database (SQLite in STATE_DIR/app.db when no URL is given) with AUDIT_RECORDS
records (3,000,000 unless set) over a year, in SQL, and keeps the keys in STATE_DIR so that later runs, of
this code or of another checkout (PYTHONPATH), measure the same data. A checkout whose audit log pages by
number (?page=N) is sent those; one that pages by keyset gets ?before= the last record of the page before
the same place, so both read the same 50 records. Seeded: 1,000 accounts; a person with 1 in 24 records; an
admin the actor of 1 in 150; an intruder's address with 1 in 40, an office's with 1 in 20, an IPv6 address
with five, the rest spread over some 15 million others; 1 in 97 with no address; two records per second of
the clock, so neighbours share a time.
"""
import json
import os
import secrets
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run  # noqa: E402  (bench/run.py: seeding and sessions)


def _bench_profile():
    """bench/profile.py, by its path: `import profile` may find the standard library's module of that name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_profile", os.path.join(BENCH, "profile.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

RECORDS = int(os.environ.get("AUDIT_RECORDS", "3000000"))
REPEAT = int(os.environ.get("REPEAT", "20"))
HEAVY, ADMIN_ID = 2, 1
INTRUDER, OFFICE, RARE_IP = "203.0.113.66", "198.51.100.10", "2001:db8::42"
START = "2025-12-01 00:00:00"
STEP = 365 * 86400 * 2 // RECORDS or 1  # seconds between two pairs of records: a year in all

# n from 1 to RECORDS; (n + 1) / 2 * STEP seconds after START, so records n and n + 1 share a time when n is odd.
_COLUMNS = {
    "kind": ("CASE WHEN n % 10000 = 1 THEN 'support_tfa_disabled' WHEN n % 20 < 10 THEN 'signin' "
             "WHEN n % 20 < 17 THEN 'password_rejected' WHEN n % 20 < 19 THEN 'code_accepted' ELSE 'signout' END"),
    "user_id": f"CASE WHEN n % 24 = 0 THEN {HEAVY} ELSE 3 + (n * 7919) % 998 END",
    "actor_id": f"CASE WHEN n % 150 = 7 THEN {ADMIN_ID} ELSE NULL END",
    "ip": (f"CASE WHEN n % 97 = 0 THEN NULL WHEN n % 40 = 13 THEN '{INTRUDER}' WHEN n % 20 = 5 THEN '{OFFICE}' "
           f"WHEN n % 600000 = 11 THEN '{RARE_IP}' "
           "ELSE '10.' || (n % 250) || '.' || ((n / 250) % 250) || '.' || ((n / 62500) % 250) END"),
    "detail": "'{}'",
}


def seed(seeder):
    from webapp.db import db
    from webapp.models import AuditEvent

    with seeder.ctx():
        if AuditEvent.select().count() > 100:
            return
    pw_hash = "$argon2id$v=19$m=8,t=1,p=1$" + "c2FsdHNhbHQ" + "$" + "x" * 22
    run.seed_people(seeder, 1, 1000, pw_hash, admin_ids={ADMIN_ID})
    cols = ", ".join(f'"{c}"' for c in ["created_at", *_COLUMNS])
    values = ", ".join(_COLUMNS.values())
    started = time.perf_counter()
    with seeder.ctx():
        for lo in range(1, RECORDS + 1, 500000):
            hi = min(lo + 499999, RECORDS)
            if seeder.url.startswith("sqlite"):
                db.execute_sql(
                    f"WITH RECURSIVE s(n) AS (SELECT {lo} UNION ALL SELECT n + 1 FROM s WHERE n < {hi}) "
                    f'INSERT INTO "auditevent" ({cols}) SELECT datetime(\'{START}\', \'+\' || ((n + 1) / 2 * {STEP}) || '
                    f"' seconds'), {values} FROM s")
            else:  # psycopg takes "%" for a placeholder
                db.execute_sql(
                    f'INSERT INTO "auditevent" ({cols}) SELECT TIMESTAMP \'{START}\' + ((n + 1) / 2 * {STEP}) * '
                    f"INTERVAL '1 second', {values.replace('%', '%%')} FROM generate_series({lo}::bigint, {hi}::bigint) AS s(n)")
            print(f"  seeded {hi:,} records ({time.perf_counter() - started:.0f} s)", flush=True)
        if not seeder.url.startswith("sqlite"):
            db.execute_sql('VACUUM ANALYZE "auditevent"')


def place(seeder, query, offset):
    """(time, id) of the record at `offset` (0 the newest) of `query`, newest first: where the page after
    `offset` records starts from."""
    from webapp.models import AuditEvent

    with seeder.ctx():
        row = (query.order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc()).offset(offset - 1).limit(1)
               .first())
        return f"{row.created_at.isoformat(timespec='microseconds')},{row.id}"


def main():
    state = sys.argv[1]
    os.makedirs(state, exist_ok=True)
    keys_file = os.path.join(state, "keys.json")
    if not os.path.exists(keys_file):
        from cryptography.fernet import Fernet

        with open(keys_file, "w") as f:
            json.dump({"secret_key": secrets.token_urlsafe(48), "fernet": Fernet.generate_key().decode()}, f)
    with open(keys_file) as f:
        keys = json.load(f)
    url = sys.argv[2] if len(sys.argv) > 2 else "sqlite:///" + os.path.join(state, "app.db")
    seeder = run.Seeder(url, keys["secret_key"], keys["fernet"], os.path.join(state, "inst"))
    seed(seeder)

    import logging

    logging.getLogger("twostep").setLevel(logging.WARNING)
    from webapp import support
    from webapp.models import AuditEvent

    keyset = hasattr(support, "audit_page")  # this checkout pages by keyset
    heavy = run.email_for(HEAVY)
    filters = [
        ("none", "", AuditEvent.select()),
        ("person (1 in 24 records)", f"email={heavy}",
         AuditEvent.select().where((AuditEvent.user == HEAVY) | (AuditEvent.actor == HEAVY))),
        ("event, common (signin)", "kind=signin", AuditEvent.select().where(AuditEvent.kind == "signin")),
        ("event, rare (300 records)", "kind=support_tfa_disabled",
         AuditEvent.select().where(AuditEvent.kind == "support_tfa_disabled")),
        ("IP address (1 in 40)", f"ip={INTRUDER}", AuditEvent.select().where(AuditEvent.ip == INTRUDER)),
        ("dates (one month)", "start=2026-03-01&end=2026-03-31",
         AuditEvent.select().where(AuditEvent.created_at >= run.datetime.datetime(2026, 3, 1),
                                   AuditEvent.created_at < run.datetime.datetime(2026, 4, 1))),
        ("person and event", f"email={heavy}&kind=password_rejected",
         AuditEvent.select().where((AuditEvent.user == HEAVY) | (AuditEvent.actor == HEAVY),
                                   AuditEvent.kind == "password_rejected")),
        ("IP address and event", f"ip={INTRUDER}&kind=password_rejected",
         AuditEvent.select().where(AuditEvent.ip == INTRUDER, AuditEvent.kind == "password_rejected")),
    ]
    pools, requests = run.Pools(seeder), _bench_profile()
    print(f"{'keyset' if keyset else 'numbered pages'}, {url.split(':')[0]}; ms, median / slowest of {REPEAT}")
    for name, query_string, query in filters:
        with seeder.ctx():
            total = query.count()
        # Deep: two thirds of the way in (at most page 100,000, the numbered pager's last).
        page = min(total * 2 // 3 // support.AUDIT_PER_PAGE, 99999) + 1
        urls = [("first page", f"/support/audit?{query_string}")]
        if page > 1:
            deep = (f"page={page}" if not keyset else
                    "before=" + place(seeder, query, (page - 1) * support.AUDIT_PER_PAGE))
            urls.append((f"page {page:,}", f"/support/audit?{query_string}&{deep}".replace("?&", "?")))
        for label, path in urls:
            lines = pools.signed_in([ADMIN_ID] * (REPEAT + 2), path)
            times = []
            for i, line in enumerate(lines):
                env, body = requests.environ_for(line)
                t = time.perf_counter()
                status = requests.call(seeder.app, env, body)
                if i >= 2:
                    times.append((time.perf_counter() - t) * 1000)
                assert status == 200, (path, status)
            print(f"| {name} ({total:,}), {label} | {statistics.median(times):.1f} / {max(times):.1f} |", flush=True)


if __name__ == "__main__":
    main()
