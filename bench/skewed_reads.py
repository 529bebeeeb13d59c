"""Reads on request paths against skewed data on PostgreSQL, prepared or not: whether a generic plan (the one
PostgreSQL may keep for a statement psycopg prepared, made for no value in particular) costs a heavy value
much more than a plan made for its values (docs/performance.md, "Generic plans on skewed data").

    PYTHONPATH=. .venv/bin/python bench/skewed_reads.py postgresql://.../DATABASE [NAME ...] [--explain [-v]]

NAME: only the reads whose name holds one of these words. --explain: instead of timing, each statement a read
runs, EXPLAIN ANALYZE'd with plan_cache_mode forced to a generic plan and to a custom one (ms, best of three,
planning included); the plans themselves where the generic one is more than twice as slow (-v: all).

The first run seeds the database (in SQL, about a minute; 1.2 GB): a year of a site's records with skew.
- 100,000 accounts, a device each; account 1 an admin, 2 a person under attack, 3 an ordinary person.
- 3.1 million audit records over 365 days: the person under attack has 125,000 (80,000 wrong passwords,
  60,000 of them from an intruder's address 203.0.113.66, which also sent the 25,000 contact requests in
  their name and has 85,000 records in all); the ordinary person 29; the admin is the actor of 60,000
  support actions; one record in 97 has no address, the others come from some 3 million more.
- 100,000 contact requests over 180 days (the handled ones' retention), a quarter in the attacked person's
  address; the newest 300 open (75 of them theirs).
- 50,000 sessions of others, 2,000 of the attacked person and 3 of the ordinary one, all live (their times
  are moved up to the clock at each run), 200,000 known browsers, 5,000 per-network counters (the intruder's
  address at its limit).

Each read is run 20 times on a new connection, for a heavy value and a light one: runs 1-5 unprepared (psycopg
prepares a statement at its sixth run on a connection), 6-10 prepared and planned for their values (PostgreSQL
makes five custom plans first), 11-20 on whichever plan PostgreSQL then keeps (a generic one when its estimate
is no worse than the custom ones'). Also 10 light runs followed by 10 heavy ones on one connection (the heavy
ones on the plan kept after the light ones), and 20 runs with psycopg's prepare_threshold None (each planned
for its values). Medians in ms; in parentheses, how many statement runs of the series PostgreSQL made on a
generic plan. A read that runs a statement several times is prepared within its first run.
"""
import datetime
import json
import os
import statistics
import sys
import time

# After PYTHONPATH: another checkout's webapp can be measured on the same data.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ADMIN, HEAVY, LIGHT = 1, 2, 3
PEOPLE = 100_000
RECORDS = 3_000_000
REQUESTS = 100_000
OPEN = 300
INTRUDER = "203.0.113.66"
PW_HASH = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$" + "x" * 22


def email_for(i):
    return f"user{i:07d}@example.com"


def make_app(url):
    from cryptography.fernet import Fernet

    from webapp import create_app

    return create_app({"DATABASE_URL": url, "SECRET_KEY": "bench-" + "x" * 40,
                       "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                       "INSTANCE_PATH": "/tmp/skewed_reads_instance", "PASSWORD_HASH_PROFILE": "cheapest",
                       "PURGE_INTERVAL": datetime.timedelta(0)})


def sql(statement, *args):
    from webapp.db import db

    return db.execute_sql(statement.replace("%", "%%") if not args else statement, args or None)


def seed(app):
    from webapp.models import AuditEvent, User

    with app.app_context():
        if User.select().count() >= PEOPLE:
            return
        started = time.perf_counter()
        at = datetime.datetime.utcnow().replace(microsecond=0)
        sql(f"INSERT INTO \"user\" (id, email, password_hash, is_admin, created_at, password_failures, code_failures, "
            f"code_strikes) SELECT i, 'user' || lpad(i::text, 7, '0') || '@example.com', '{PW_HASH}', i = {ADMIN}, "
            f"TIMESTAMP '{at}' - INTERVAL '400 days', 0, 0, 0 FROM generate_series(1, {PEOPLE}) AS s(i)")
        sql("SELECT setval(pg_get_serial_sequence('\"user\"', 'id'), (SELECT max(id) FROM \"user\"))")
        sql(f"INSERT INTO device (user_id, name, secret_enc, created_at, last_used_at, last_step) SELECT i, 'Phone', "
            f"'x', TIMESTAMP '{at}' - INTERVAL '400 days', TIMESTAMP '{at}' - (i % 1000) * INTERVAL '1 hour', 0 "
            f"FROM generate_series(1, {PEOPLE}) AS s(i)")
        print(f"  accounts ({time.perf_counter() - started:.0f} s)", flush=True)
        # The log's own records, n = 1..RECORDS, evenly over the year before `at`.
        step = 365 * 86400 / RECORDS
        other = f"3 + (n * 7919) % {PEOPLE - 2}"
        heavy_kind = ("CASE WHEN (n / 30) % 20 < 16 THEN 'password_rejected' WHEN (n / 30) % 20 = 16 THEN "
                      "'code_rejected' WHEN (n / 30) % 20 = 17 THEN 'signin' WHEN (n / 30) % 20 = 18 THEN "
                      "'code_accepted' ELSE 'signout' END")
        columns = {
            "created_at": f"TIMESTAMP '{at}' - INTERVAL '365 days' + n * {step} * INTERVAL '1 second'",
            "kind": (f"CASE WHEN n % 10000 = 1 THEN 'support_tfa_disabled' WHEN n % 50 = 7 THEN "
                     f"'support_request_handled' WHEN n % 30 = 0 THEN {heavy_kind} WHEN n % 20 < 10 THEN 'signin' "
                     "WHEN n % 20 < 17 THEN 'password_rejected' WHEN n % 20 < 19 THEN 'code_accepted' "
                     "ELSE 'signout' END"),
            "user_id": f"CASE WHEN n % 30 = 0 THEN {HEAVY} ELSE {other} END",
            "actor_id": f"CASE WHEN n % 10000 = 1 OR n % 50 = 7 THEN {ADMIN} END",
            "ip": (f"CASE WHEN n % 97 = 0 THEN NULL WHEN n % 30 = 0 AND (n / 30) % 20 < 12 THEN '{INTRUDER}' "
                   "ELSE '10.' || (n % 250) || '.' || ((n / 250) % 250) || '.' || ((n / 62500) % 250) END"),
            "detail": "CASE WHEN n % 10000 = 1 THEN '{\"until\": \"2020-01-01T00:00:00\", \"duration\": \"24 hours\"}' "
                      "ELSE '{}' END",
        }
        names = ", ".join(columns)
        for lo in range(1, RECORDS + 1, 500_000):
            hi = min(lo + 499_999, RECORDS)
            sql(f"INSERT INTO auditevent ({names}) SELECT {', '.join(columns.values())} "
                f"FROM generate_series({lo}::bigint, {hi}::bigint) AS s(n)")
            print(f"  {hi:,} audit records ({time.perf_counter() - started:.0f} s)", flush=True)
        # Contact requests over the 180 days before `at`: a quarter in the attacked person's address, sent from the
        # intruder's; a third of the rest in addresses with no account; the newest OPEN open.
        step = 180 * 86400 / REQUESTS
        sql(f"INSERT INTO supportrequest (id, email, message, user_id, created_at, ip, handled_at, handled_by_id, "
            f"form_hash) SELECT n, CASE WHEN n % 4 = 0 THEN '{email_for(HEAVY)}' WHEN n % 3 = 0 THEN "
            f"'stranger' || n || '@example.net' ELSE 'user' || lpad(({other})::text, 7, '0') || '@example.com' END, "
            f"'I lost my phone', CASE WHEN n % 4 = 0 THEN {HEAVY} WHEN n % 3 = 0 THEN NULL ELSE {other} END, "
            f"TIMESTAMP '{at}' - INTERVAL '180 days' + n * {step} * INTERVAL '1 second', "
            f"CASE WHEN n % 4 = 0 THEN '{INTRUDER}' ELSE '10.9.' || (n % 250) || '.' || (n / 250 % 250) END, "
            f"CASE WHEN n <= {REQUESTS - OPEN} THEN TIMESTAMP '{at}' - INTERVAL '180 days' + n * {step} * "
            f"INTERVAL '1 second' + INTERVAL '1 hour' END, CASE WHEN n <= {REQUESTS - OPEN} THEN {ADMIN} END, "
            f"encode(sha256(n::text::bytea), 'hex') FROM generate_series(1, {REQUESTS}) AS s(n)")
        sql("SELECT setval(pg_get_serial_sequence('supportrequest', 'id'), (SELECT max(id) FROM supportrequest))")
        sql("INSERT INTO auditevent (created_at, kind, user_id, ip, detail) SELECT created_at, 'support_request', "
            "user_id, ip, '{\"request\": ' || id || ', \"after_password\": false}' FROM supportrequest")
        print(f"  contact requests ({time.perf_counter() - started:.0f} s)", flush=True)
        sql(f"INSERT INTO serversession (id, user_id, data, created_at, last_seen_at, ip, user_agent) "
            f"SELECT md5('s' || k) || md5('t' || k), CASE WHEN k <= 2000 THEN {HEAVY} WHEN k <= 2003 THEN {LIGHT} ELSE 3 + (k * 31) % "
            f"{PEOPLE - 2} END, '{{}}', TIMESTAMP '{at}', TIMESTAMP '{at}', '10.8.' || (k % 250) || '.1', "
            f"'Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0' "
            f"FROM generate_series(1, 52000) AS s(k)")
        sql(f"INSERT INTO knownbrowser (id, user_id, created_at, last_used_at, password_failures, forgotten_at) "
            f"SELECT md5('b' || k) || md5('c' || k), CASE WHEN k <= 20 THEN {HEAVY} WHEN k <= 22 THEN {LIGHT} ELSE 3 + (k * 13) % "
            f"{PEOPLE - 2} END, TIMESTAMP '{at}' - INTERVAL '170 days', TIMESTAMP '{at}' - (k % 170) * "
            f"INTERVAL '1 day', 0, CASE WHEN k <= 10 OR k % 3 = 0 THEN TIMESTAMP '{at}' - INTERVAL '1 day' END "
            f"FROM generate_series(1, 200000) AS s(k)")
        sql(f"INSERT INTO networkcounter (purpose, network, window_start, hits) SELECT CASE WHEN k % 2 = 0 THEN "
            f"'failed-sign-ins' ELSE 'sign-ups' END, CASE WHEN k = 1 THEN '{INTRUDER}' ELSE '10.7.' || (k % 250) "
            f"|| '.' || k / 250 END, TIMESTAMP '{at}', CASE WHEN k = 1 THEN 100 ELSE 1 END "
            f"FROM generate_series(1, 5000) AS s(k)")
        sql(f"INSERT INTO networkcounter (purpose, network, window_start, hits) VALUES ('failed-sign-ins', "
            f"'{INTRUDER}', TIMESTAMP '{at}', 100)")
        for table in ("user", "device", "auditevent", "supportrequest", "serversession", "knownbrowser",
                      "networkcounter"):
            sql(f'VACUUM ANALYZE "{table}"')
        print(f"  seeded ({time.perf_counter() - started:.0f} s): "
              f"{AuditEvent.select().count():,} audit records", flush=True)




def refresh_sessions(app):
    """Every seeded session live now: last seen within the idle limit, signed in within the absolute one."""
    from webapp.clock import now

    with app.app_context():
        at = now()
        sql("UPDATE serversession SET created_at = %s - (length(id) %% 7 + 1) * INTERVAL '1 hour', "
            "last_seen_at = %s - (ascii(id) %% 20) * INTERVAL '1 minute'", at, at)
        sql("VACUUM ANALYZE serversession")


def reads(app):
    """{name: (function of a value, heavy value, light value)}: each the read(s) a request path runs."""
    from flask import g

    from webapp import security, settings, support
    from webapp.clock import now
    from webapp.models import KnownBrowser, NetworkCounter, ServerSession, SupportRequest, User
    from webapp.sessions import _BY_ID

    def person(i):
        return User.get_by_id(i)

    def rows(i):
        return list(User.select(*support.USER_COLUMNS).where(User.id == i))

    def recent(field, value, *where):
        return support._recent_requests(field, value, *where)

    def session_of(i):
        return ServerSession.select(ServerSession.id).where(ServerSession.user == i).first().id

    def browser_of(i):
        return KnownBrowser.select(KnownBrowser.id).where(KnownBrowser.user == i,
                                                          KnownBrowser.forgotten_at.is_null()).first().id

    heavy, light = person(HEAVY), person(LIGHT)
    client = app.test_client(use_cookies=False)
    cookies = {i: signed_in(i) for i in (ADMIN, HEAVY, LIGHT)}

    def page(who_path, htmx=False):
        who, path = who_path
        response = client.get(path, headers={"Cookie": f"{app.config['SESSION_COOKIE_NAME']}={cookies[who]}",
                                             **({"HX-Request": "true"} if htmx else {})})
        assert response.status_code == 200, (path, response.status_code)

    g._login_user = person(ADMIN)  # the Support rows' current_user
    light_ip = SupportRequest.select(SupportRequest.ip).where(SupportRequest.user == LIGHT).first()
    light_ip = light_ip.ip if light_ip else "10.9.1.1"
    since = now() - app.config["KNOWN_BROWSER_TTL"]
    hour = lambda: now() - NetworkCounter.WINDOW  # noqa: E731
    return {
        "GET /settings": (page, (HEAVY, "/settings"), (LIGHT, "/settings")),
        "GET /support?q= (25 rows, open requests' oldest page)": (
            page, (ADMIN, "/support?q=user0000"), (ADMIN, "/support?q=user0001")),
        "htmx search (25 rows)": (lambda a: page(a, htmx=True), (ADMIN, "/support?q=user0000"),
                                  (ADMIN, "/support?q=user0001")),
        "GET /support?user= (one row)": (page, (ADMIN, f"/support?user={HEAVY}"), (ADMIN, f"/support?user={LIGHT}")),
        "live sessions (25 people)": (lambda q: support.live_sessions([u.id for u in support.search_users(q, 1)[0]],
                                                                      now()), "user0000", "user0001"),
        "latest windows (25 people)": (
            lambda q: support._windows_opened_by([u.id for u in support.search_users(q, 1)[0]]),
            "user0000", "user0001"),
        "Support search, no term (page 1 / page 2,000)": (lambda p: support.search_users("", p), 2000, 1),
        "security activity (10)": (lambda u: support.security_activity(u, 10), heavy, light),
        "security activity, more (100)": (lambda u: support.security_activity(u, 100), heavy, light),
        "security activity, older page": (
            lambda u: support.security_activity(u, 10, support.page_position(
                support.security_activity(u, 10).older)), heavy, light),
        "User Settings' sessions": (lambda u: settings.active_sessions(u), heavy, light),
        "wizard: had a device, keys started": (
            lambda u: (settings._had_a_device(u), settings._keys_started_since_last_device(u)), heavy, light),
        "Support row (?user=)": (lambda i: support.build_rows(rows(i)), HEAVY, LIGHT),
        "Support search page (25 rows)": (
            lambda q: support.build_rows(support.search_users(q, 1)[0]), "user0000", "user0001"),
        "Support search alone": (lambda q: support.search_users(q, 1), "user000", "user0054321"),
        "a person's open requests (open_page)": (lambda i: support.open_page(i), HEAVY, LIGHT),
        "open requests, oldest / newest page": (lambda newest: support.open_page(newest=newest), True, False),
        "open requests, page after a request": (
            lambda i: support.open_page(after=i), REQUESTS - OPEN + 1, REQUESTS - OPEN + 150),
        "recently handled": (lambda _: support._recently_handled(), None, None),
        "contact: same form within the hour": (
            lambda h: SupportRequest.select().where((SupportRequest.created_at >= now() - datetime.timedelta(hours=1))
                                                    & (SupportRequest.form_hash == h)).exists(), "ab" * 32, "cd" * 32),
        "contact: requests of the network": (lambda ip: recent(SupportRequest.ip, ip), INTRUDER, light_ip),
        "contact: requests of the address": (
            lambda e: recent(SupportRequest.email, e, SupportRequest.known_browser.is_null()),
            email_for(HEAVY), email_for(LIGHT)),
        "sign-in: account with network limit": (
            lambda a: User.by_email(a[0], network_full_since=security.network_full_column("failed-sign-ins", a[1])),
            (email_for(HEAVY), INTRUDER), (email_for(LIGHT), "10.7.3.0")),
        "sign-in: network limit": (
            lambda n: security._NC_FULL.first(purpose="failed-sign-ins", network=n, since=hour(), limit=100),
            INTRUDER, "10.7.3.0"),
        "sign-in: known browser": (
            lambda a: security._KB_FIND.first(id=a[0], user=a[1], since=since),
            (browser_of(HEAVY), HEAVY), (browser_of(LIGHT), LIGHT)),
        "session read": (lambda token: _BY_ID.first(id=token), session_of(HEAVY), session_of(LIGHT)),
    }


def signed_in(user_id):
    """A fresh signed-in session of this person: its cookie's token."""
    import secrets

    from webapp.clock import now
    from webapp.models import ServerSession
    from webapp.sessions import token_hash

    token = secrets.token_urlsafe(32)
    data = {"csrf_token": secrets.token_hex(20), "_user_id": str(user_id), "_fresh": True,
            "_id": secrets.token_hex(32), "auth_at": time.time()}
    ServerSession.create(id=token_hash(token), user=user_id, data=json.dumps(data), created_at=now(),
                         last_seen_at=now(), ip="127.0.0.1", user_agent="bench")
    return token


def series(function, values, threshold=5):
    """Times in ms of function(value) for each value, on a new connection; and how many runs of prepared
    statements PostgreSQL ran on a generic plan."""
    from webapp.db import db

    db.close()
    db.connect()
    db.connection().prepare_threshold = threshold
    times = []
    for value in values:
        started = time.perf_counter()
        function(value)
        times.append((time.perf_counter() - started) * 1000)
    generic = sql("SELECT COALESCE(SUM(generic_plans), 0) FROM pg_prepared_statements").fetchone()[0]
    return times, generic


def statements(function, value):
    """The (SQL, parameters) function(value) runs."""
    from webapp.db import db

    ran, original = [], db.obj.execute_sql

    def execute_sql(statement, params=None):
        ran.append((statement, tuple(params or ())))
        return original(statement, params)

    db.obj.execute_sql = execute_sql
    try:
        function(value)
    finally:
        del db.obj.execute_sql
    return ran


def explain(statement, params):
    """(generic plan's ms, custom plan's ms, the two plans) of a statement with these values: EXPLAIN ANALYZE of
    EXECUTE with plan_cache_mode forced each way."""
    import re

    from psycopg import sql as psql

    from webapp.db import db

    conn = db.connection()
    count = iter(range(1, 1000))
    text = re.sub(r"%s", lambda _: f"${next(count)}", statement).replace("%%", "%")
    values = ", ".join(psql.Literal(v).as_string(conn) for v in params)
    found = []
    with conn.cursor() as cursor:
        cursor.execute(f"PREPARE probe AS {text}".replace("%", "%%"))
        for mode in ("force_generic_plan", "force_custom_plan"):
            cursor.execute(f"SET plan_cache_mode = {mode}")
            plans = []
            for _ in range(3):
                cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE probe{f'({values})' if params else ''}"
                               .replace("%", "%%"))
                plans.append([row[0] for row in cursor.fetchall()])
            ms = min(float(re.search(r"Execution Time: ([\d.]+)", p[-1]).group(1))
                     + float((re.search(r"Planning Time: ([\d.]+)", "\n".join(p)) or [0, 0])[1]) for p in plans)
            found.append((ms, plans[-1]))
        cursor.execute("SET plan_cache_mode = auto")
        cursor.execute("DEALLOCATE probe")
    return found[0][0], found[1][0], found[0][1], found[1][1]


def fmt(values):
    m = statistics.median(values)
    return f"{m:.2f}" if m < 10 else f"{m:.0f}"


def main():
    app = make_app(sys.argv[1])
    seed(app)
    refresh_sessions(app)
    wanted = [w for w in sys.argv[2:] if not w.startswith("-")]
    plans = "--explain" in sys.argv
    print("ms, medians | runs 1-5 | 6-10 | 11-20 (generic runs) | 11-20 after 10 light | unprepared")
    with app.test_request_context():
        for name, (function, heavy, light) in reads(app).items():
            if wanted and not any(w in name for w in wanted):
                continue
            if plans:
                for label, value in (("heavy", heavy), ("light", light)):
                    for statement, params in statements(function, value):
                        generic, custom, generic_plan, custom_plan = explain(statement, params)
                        print(f"{name}, {label}: generic {generic:.2f} ms, custom {custom:.2f} ms: {statement[:300]}")
                        if generic > 2 * custom + 0.5 or "-v" in sys.argv:
                            print("  generic:\n    " + "\n    ".join(generic_plan))
                            print("  custom:\n    " + "\n    ".join(custom_plan))
                continue
            out = []
            for label, value in (("heavy", heavy), ("light", light)):
                times, generic = series(function, [value] * 20)
                line = f"{fmt(times[:5])} | {fmt(times[5:10])} | {fmt(times[10:])} ({generic})"
                if label == "heavy":
                    mixed, mixed_generic = series(function, [light] * 10 + [heavy] * 10)
                    line += f" | {fmt(mixed[10:])} ({mixed_generic})"
                else:
                    line += " | "
                unprepared, _ = series(function, [value] * 20, threshold=None)
                out.append(f"| {name}, {label} | {line} | {fmt(unprepared)} |")
            print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()
