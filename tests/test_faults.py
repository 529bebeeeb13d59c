"""Faults an operator will meet: the database going away and coming back, and a worker killed in the middle
of a request. A person sees a clear 503 page (never a traceback), the app recovers without a restart, and a
killed request leaves no half-written state behind (its transaction is rolled back as a whole)."""
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from datetime import timedelta

import pyotp
import pytest

from webapp.db import db
from webapp.models import AuditEvent, Device, PendingEnrolment, User
from webapp.security import hash_password
from webapp.totp import encrypt_secret, new_secret

from .conftest import PASSWORD, FakeClock, csrf_from, make_test_app
from .live_app import ROOT, Browser, LiveServer

PG_SH = os.path.join(ROOT, "scripts", "pg.sh")
PG_BIN = "/usr/lib/postgresql/15/bin"
UNAVAILABLE = "We cannot reach our database right now"


def signed_in_client(app, clock, secret):
    """A test client that went through both sign-in steps as alice."""
    with app.app_context():
        user = User.create(email="alice@example.com", password_hash=hash_password(PASSWORD))
        Device.create(user=user, name="Phone", secret_enc=encrypt_secret(secret))
    client = app.test_client()
    token = csrf_from(client.get("/login").get_data(as_text=True))
    r = client.post("/login", data={"csrf_token": token, "email": "alice@example.com", "password": PASSWORD})
    assert r.status_code == 302
    r = client.post("/login/verify", data={"csrf_token": token, "code": pyotp.TOTP(secret).at(clock.t)})
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
    return client


def assert_unavailable_page(response):
    """What a person sees while the database is down: a plain 503 page, no traceback or SQL. A browser that
    asked for a page (no HX-Request header on the request) gets a whole page, with the layout around the
    message: a bare fragment would show as unstyled text with no way around the site. Only htmx's own
    requests get the fragment, with HX-Refresh so that htmx reloads the page rather than swap nothing."""
    body = response.get_data(as_text=True)
    assert response.status_code == 503, (response.status_code, body[:500])
    assert UNAVAILABLE in body
    assert "Traceback" not in body and "psycopg" not in body and "sqlite" not in body.lower()
    if response.request.headers.get("HX-Request") is None:
        assert "<html" in body.lower() and "</html>" in body.lower(), body[:500]
        assert "HX-Refresh" not in response.headers
    else:
        assert "<html" not in body.lower() and response.headers.get("HX-Refresh") == "true"


@pytest.fixture
def own_postgres():
    """A private PostgreSQL cluster that the test may stop and start (scripts/pg.sh)."""
    if not os.path.exists(os.path.join(PG_BIN, "initdb")):
        pytest.skip("PostgreSQL 15 server binaries are not installed")
    # Not under pytest's tmp_path: the `postgres` user must be able to reach the folder.
    cluster = tempfile.mkdtemp(prefix="twostep-pg-")
    url = subprocess.run(["bash", PG_SH, "start", str(cluster)], check=True, capture_output=True,
                         text=True, timeout=120).stdout.strip().splitlines()[-1]
    port = url.rsplit(":", 1)[1].split("/")[0]

    def stop():
        subprocess.run(["bash", PG_SH, "stop", str(cluster)], check=True, capture_output=True, timeout=60)

    def start():
        subprocess.run(["bash", PG_SH, "start", str(cluster), port], check=True, capture_output=True, timeout=60)

    yield url, stop, start
    db.close()
    stop()
    shutil.rmtree(cluster, ignore_errors=True)


def test_postgresql_going_down_gives_a_503_page_and_the_app_recovers_without_restart(tmp_path, own_postgres):
    """The database stops: every page answers 503 with a clear message; it starts again: the same app
    process serves again, and the signed-in session (kept in the database) is still valid."""
    url, stop, start = own_postgres
    clock = FakeClock(time.time())
    app = make_test_app(tmp_path, url, clock)
    secret = new_secret()
    client = signed_in_client(app, clock, secret)
    assert client.get("/settings").status_code == 200

    stop()
    assert_unavailable_page(client.get("/settings"))
    assert_unavailable_page(app.test_client().get("/login"))
    assert_unavailable_page(app.test_client().post("/login", data={"email": "a@example.com", "password": "x"}))
    assert_unavailable_page(client.get("/settings", headers={"HX-Request": "true"}))

    start()
    assert client.get("/settings").status_code == 200
    assert app.test_client().get("/login").status_code == 200


@pytest.mark.parametrize("found_by", ["idle time", "socket poll"])
def test_postgresql_restart_costs_the_next_request_no_503(tmp_path, own_postgres, monkeypatch, found_by):
    """Connections are kept between requests. After the server restarts, the next request checks the kept
    connection, opens a new one and is served normally (no 503, no restart of the app). A worker that sat
    idle for 5 s checks by time; a busy one (its last request a moment ago) finds the server's goodbye to
    read on the socket: before that poll, every busy worker served one 503 after a restart."""
    import webapp.db as db_module

    url, stop, start = own_postgres
    clock = FakeClock(time.time())
    app = make_test_app(tmp_path, url, clock)
    client = signed_in_client(app, clock, new_secret())
    assert client.get("/settings").status_code == 200
    kept = db.obj._state.conn
    assert kept is not None  # the connection outlived the request

    stop()
    start()
    if found_by == "idle time":  # "idle long enough", without sleeping; the poll alone would not see it
        monkeypatch.setattr(db_module._ConnectionUpkeep, "IDLE_SECONDS", 0.0)
        monkeypatch.setattr(db_module, "_has_input", lambda connection: False)
    else:  # however long the restart took, the check by time is not what finds it
        monkeypatch.setattr(db_module._ConnectionUpkeep, "IDLE_SECONDS", 3600.0)
    r = client.get("/settings")
    assert r.status_code == 200 and "User Settings" in r.get_data(as_text=True)
    assert db.obj._state.conn is not kept
    again = db.obj._state.conn
    assert client.get("/settings").status_code == 200 and db.obj._state.conn is again  # a live one is kept


@pytest.mark.parametrize("error_class", ["OperationalError", "InterfaceError"])
def test_a_session_that_cannot_be_read_gives_the_503_page_not_a_sign_out(app, actor, secret, monkeypatch, error_class):
    """The database fails at the very moment the session is read, before any view runs (peewee raises an
    OperationalError, or an InterfaceError for a connection already gone): the person gets the 503 page and
    keeps the cookie, rather than being treated as signed out and sent to sign in; the next request is
    signed in as before."""
    import peewee

    import webapp.sessions as sessions_module

    actor.user(secret=secret)
    actor.sign_in(secret=secret)

    class Failing:
        def first(self, **params):
            raise getattr(peewee, error_class)("server closed the connection unexpectedly")

    monkeypatch.setattr(sessions_module, "_BY_ID", Failing())
    r = actor.client.get("/settings")
    assert_unavailable_page(r)
    assert "Set-Cookie" not in r.headers
    monkeypatch.undo()
    r = actor.client.get("/settings")
    assert r.status_code == 200 and "<h1>User Settings</h1>" in r.get_data(as_text=True)


def test_sqlite_file_unreachable_gives_a_503_page_and_the_app_recovers(tmp_path):
    """The folder holding the SQLite file disappears (unmounted volume): 503 page; it is back: pages work."""
    folder = tmp_path / "data"
    folder.mkdir()
    clock = FakeClock(time.time())
    app = make_test_app(tmp_path, f"sqlite:///{folder / 'app.db'}", clock)
    client = signed_in_client(app, clock, new_secret())
    db.close()  # the test process's own connection (seeding) must not keep the file open

    moved = tmp_path / "moved"
    folder.rename(moved)
    try:
        assert_unavailable_page(client.get("/settings"))
        assert_unavailable_page(app.test_client().get("/login"))
        assert_unavailable_page(client.get("/settings", headers={"HX-Request": "true"}))
    finally:
        moved.rename(folder)
    assert client.get("/settings").status_code == 200
    db.close()



# ---------------------------------------------------------------- the health check (README "Deployment")

def test_the_health_check_says_ok_in_plain_text_and_makes_no_session(app):
    """GET /healthz, for a load balancer or a service monitor: "ok", never cached, and no session or cookie:
    a probe every few seconds from each proxy would otherwise leave a session row each time."""
    from webapp.models import ServerSession

    checker = app.test_client()
    for _ in range(3):
        r = checker.get("/healthz")
        assert r.status_code == 200 and r.get_data(as_text=True) == "ok\n"
        assert r.mimetype == "text/plain" and r.headers["Cache-Control"] == "no-store"
        assert "Set-Cookie" not in r.headers
    assert checker.head("/healthz").status_code == 200
    assert checker.post("/healthz").status_code in (400, 405)  # no form of ours posts here
    with app.app_context():
        assert ServerSession.select().count() == 0


def test_the_health_check_fails_while_the_sqlite_file_is_unreachable_and_logs_why(tmp_path, caplog):
    """The load balancer takes a host whose database is gone out of service (503), the log says why, and the
    same process is healthy again once the file is back."""
    import logging

    folder = tmp_path / "data"
    folder.mkdir()
    app = make_test_app(tmp_path, f"sqlite:///{folder / 'app.db'}", FakeClock(time.time()))
    checker = app.test_client()
    assert checker.get("/healthz").status_code == 200
    db.close()  # the connection kept by this thread would still read the moved file
    moved = tmp_path / "moved"
    folder.rename(moved)
    try:
        caplog.set_level(logging.ERROR)
        r = checker.get("/healthz")
        assert r.status_code == 503 and "ok" not in r.get_data(as_text=True).split()
        assert "database unavailable: OperationalError (unable to open database file)" in caplog.text
    finally:
        moved.rename(folder)
    assert checker.get("/healthz").status_code == 200
    db.close()


def test_the_health_check_fails_on_a_database_without_the_accounts_table(app, caplog):
    """A DATABASE_URL that names another database than the one the app set up, or a table a restore left
    out: reading the accounts fails, so the host is not healthy (on PostgreSQL a ProgrammingError, which no
    handler took: it was a 500)."""
    import logging

    caplog.set_level(logging.ERROR)
    with app.app_context():
        db.execute_sql('ALTER TABLE "user" RENAME TO "user_elsewhere"')
    try:
        assert_unavailable_page(app.test_client().get("/healthz"))
        assert "database unavailable: OperationalError" in caplog.text and "user" in caplog.text
    finally:
        with app.app_context():
            db.close()
            db.execute_sql('ALTER TABLE "user_elsewhere" RENAME TO "user"')
    assert app.test_client().get("/healthz").status_code == 200


@pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="PostgreSQL's read-only transactions")
def test_the_health_check_fails_while_postgresql_takes_no_writes(app, caplog):
    """A standby not yet promoted, or a database set read-only for maintenance, answers reads, so a check
    that only read would keep sending people to a host where every sign-in fails."""
    import logging

    caplog.set_level(logging.ERROR)
    _read_only_connection(app)
    assert_unavailable_page(app.test_client().get("/healthz"))
    assert "database unavailable: OperationalError (the database takes no writes" in caplog.text
    assert app.test_client().get("/healthz").status_code == 200  # the 503 page dropped that connection



ON_SQLITE = not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres")
PAGE = 4096


def _filled_sqlite_file(app):
    """The app's SQLite file holding 400 accounts and 600 audit records, all of it in the file itself (the WAL
    checkpointed, the connection closed): (its path, [the accounts' addresses in id order])."""
    from webapp.models import AuditEvent

    with app.app_context():
        password_hash = hash_password(PASSWORD)
        with db.atomic():
            users = [User.create(email=f"person{i}@example.com", password_hash=password_hash) for i in range(400)]
            for i in range(600):
                AuditEvent.create(kind="signin", user=users[i % 400], detail='{"method": "password"}')
        db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        path = db.obj.database
    db.close()
    return path, [u.email for u in users]


def _pages(path, name, leaf_only=True):
    """The pages of table or index `name` in key order (its leaves only, by default), as (page, cells)."""
    import sqlite3

    reader = sqlite3.connect(path)
    try:
        return reader.execute("SELECT pageno, ncell FROM dbstat WHERE name = ? AND (pagetype = 'leaf' OR ?) "
                              "ORDER BY path", (name, not leaf_only)).fetchall()
    finally:
        reader.close()


def _overwrite(path, page, data=None):
    """Replace one page of the file (zeros by default), as a disk fault would; returns what was there. The kept
    connection is closed: its cache may hold the page as it was (a worker started since reads the file)."""
    with open(path, "r+b") as f:
        f.seek((page - 1) * PAGE)
        before = f.read(PAGE)
        f.seek((page - 1) * PAGE)
        f.write(data if data is not None else bytes(PAGE))
    db.close()
    return before


def _sign_in(app, email):
    client = app.test_client()
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"csrf_token": token, "email": email, "password": PASSWORD})


@pytest.mark.skipif(not ON_SQLITE, reason="SQLite's file")
def test_the_health_check_fails_on_a_damaged_accounts_table_and_so_does_the_sign_in_it_breaks(app, caplog,
                                                                                               monkeypatch):
    """A page of the accounts table damaged (a disk fault, a copy taken while it was written): the health check
    read one row and said "ok" while the sign-ins of the people on that page answered 500 with a traceback.
    It now runs SQLite's quick_check of every table but the audit log, once a minute per process, after a
    probe's answer has gone out (a whole quick_check takes about a second for each 700 MB: README "Health
    check"); the next probe answers what it found. A sign-in that meets the damage gets the 503 page, the log
    saying why. A check that failed is not kept: the file put right, the next probe is healthy."""
    import logging

    import webapp.db as db_module

    path, emails = _filled_sqlite_file(app)
    checker = app.test_client()

    def probe():
        response = checker.get("/healthz")
        response.close()  # what a server does once the answer has gone out: the whole check, when due, follows
        return response

    assert probe().status_code == 200  # checked whole after the answer: trusted for a minute
    leaves = _pages(path, "user")
    middle = len(leaves) // 2
    first_row = sum(cells for _, cells in leaves[:middle])
    on_it = emails[first_row:first_row + leaves[middle][1]]
    before = _overwrite(path, leaves[middle][0])
    caplog.set_level(logging.ERROR)
    assert probe().status_code == 200  # within the minute: only the ends are read
    later = db_module._monotonic() + db_module._FileCheck.SECONDS
    monkeypatch.setattr(db_module, "_monotonic", lambda: later)
    # A minute on: the probe answers at once, as a balancer expects, and the whole check runs after it; the
    # next probe says what it found.
    assert probe().status_code == 200
    assert_unavailable_page(probe())
    assert "database unavailable: OperationalError (PRAGMA quick_check of table user: " in caplog.text
    caplog.clear()
    assert_unavailable_page(_sign_in(app, on_it[0]))
    assert "database unavailable: DatabaseError (database disk image is malformed)" in caplog.text
    assert _sign_in(app, emails[0]).status_code == 302  # the others' pages are sound
    assert_unavailable_page(probe())  # checked again before it answers: still there
    _overwrite(path, leaves[middle][0], before)
    assert probe().status_code == 200  # put right: healthy at once
    assert _sign_in(app, on_it[0]).status_code == 302


@pytest.mark.skipif(not ON_SQLITE, reason="SQLite's file")
@pytest.mark.parametrize("damage", ["audit-log-end", "truncated"])
def test_the_health_check_fails_at_once_where_every_sign_in_would_meet_the_damage(app, caplog, damage):
    """Damage every sign-in meets, found at the next probe even within the minute a full check is trusted:
    the last page of an audit log index (where each sign-in's record goes: the audit log is too big to
    check whole), read at every probe with the ends of every table and index (under a millisecond in all);
    or a file cut short (a restore from an unfinished copy), which answered 500 even to /healthz when a new
    connection met it."""
    import logging

    path, emails = _filled_sqlite_file(app)
    checker = app.test_client()
    assert checker.get("/healthz").status_code == 200
    if damage == "audit-log-end":
        _overwrite(path, _pages(path, "auditevent_created_at")[-1][0])
        said = ("database unavailable: OperationalError (reading the last entry of index auditevent_created_at: "
                "database disk image is malformed)")
    else:
        os.truncate(path, os.path.getsize(path) // 2)
        db.close()
        said = "database unavailable: DatabaseError (database disk image is malformed)"
    caplog.set_level(logging.ERROR)
    assert_unavailable_page(checker.get("/healthz"))
    assert said in caplog.text
    caplog.clear()
    r = app.test_client().get("/login") if damage == "truncated" else _sign_in(app, emails[0])
    assert_unavailable_page(r)
    assert "database unavailable: DatabaseError (database disk image is malformed)" in caplog.text
    db.close()


CONFLICT = "Another change was being made at the same moment, so this one could not finish."


def _start_wizard(client, token=None):
    token = token or csrf_from(client.get("/settings").get_data(as_text=True))
    return client.post("/settings/2fa/start", data={"csrf_token": token})


def _signed_in_on_sqlite_waiting_briefly(tmp_path, monkeypatch):
    """An app on its own SQLite file whose writers wait 200 ms for a lock (not busy_timeout's 10 s), and a
    signed-in client on it with a CSRF token: (path, clock, app, client, token)."""
    import webapp.db as db_module

    monkeypatch.setitem(db_module.SQLITE_PRAGMAS, "busy_timeout", 200)
    path = tmp_path / "app.db"
    clock = FakeClock(time.time())
    app = make_test_app(tmp_path, f"sqlite:///{path}", clock)
    client = signed_in_client(app, clock, new_secret())
    return path, clock, app, client, csrf_from(client.get("/settings").get_data(as_text=True))


@pytest.mark.skipif((os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"), reason="SQLite's writer lock")
def test_sqlite_writer_lock_held_too_long_says_try_again_and_changes_nothing(tmp_path, monkeypatch):
    """Another program holds SQLite's writer lock past busy_timeout (a long `keys rotate`, a backup tool): the
    request that needed it is rolled back and says so, not that the database cannot be reached; it works
    once the lock is free. A page whose only write is the session's last-seen time is still shown: that
    write failed after the page was made, and Flask turned it into a 500 outside the error handlers."""
    import sqlite3

    path, clock, app, client, token = _signed_in_on_sqlite_waiting_briefly(tmp_path, monkeypatch)
    holder = sqlite3.connect(path, timeout=0, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        clock.advance(61)  # the session's last-seen time is due to be written (sessions.TOUCH_INTERVAL)
        r = client.get("/settings")
        assert r.status_code == 200 and "<h1>User Settings</h1>" in r.get_data(as_text=True)
        r = _start_wizard(client, token)
        body = r.get_data(as_text=True)
        assert r.status_code == 503 and CONFLICT in body and UNAVAILABLE not in body
        assert "Traceback" not in body and "sqlite" not in body.lower()
    finally:
        holder.rollback()
        holder.close()
    with app.app_context():
        assert PendingEnrolment.select().count() == 0
    assert _start_wizard(client, token).status_code == 303
    with app.app_context():
        assert PendingEnrolment.select().count() == 1
    db.close()


@pytest.mark.skipif((os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"), reason="SQLite's writers' queue")
def test_a_writer_of_the_app_holding_the_queue_too_long_says_try_again_after_busy_timeout(tmp_path, monkeypatch):
    """A fault-injection review: the app's own writers wait for each other on an flock (db._writer_queue), and
    that wait had no end. One that held it (a worker stopped or stalled mid-transaction, `keys rotate` over many
    devices, a command suspended with Ctrl-Z) made every other write wait until gunicorn's timeout killed the
    worker: the person got gunicorn's bare "Internal Server Error" after 30 s, and with every worker waiting no
    page was served at all. Now the queue is waited for as long as SQLite's busy_timeout, like another
    program's writer lock (the test above): "Please try again", nothing stored, and it works once it is free."""
    import fcntl
    import threading

    path, _, app, client, token = _signed_in_on_sqlite_waiting_briefly(tmp_path, monkeypatch)
    holder = open(f"{path}-writers", "a+b")  # noqa: SIM115 (another writer of the app: its own open file)
    fcntl.flock(holder, fcntl.LOCK_EX)
    release = threading.Timer(3.0, holder.close)  # without the limit, the request waited until this
    release.start()
    try:
        started = time.monotonic()
        r = _start_wizard(client, token)
        waited = time.monotonic() - started
        body = r.get_data(as_text=True)
        assert r.status_code == 503 and CONFLICT in body and UNAVAILABLE not in body, (r.status_code, waited)
        assert 0.2 <= waited < 2
        with app.app_context():
            assert PendingEnrolment.select().count() == 0
    finally:
        release.join()
    assert _start_wizard(client, token).status_code == 303
    with app.app_context():
        assert PendingEnrolment.select().count() == 1
    db.close()


def test_a_writers_queue_file_the_server_cannot_open_gives_the_503_page_naming_it_in_the_log(app, actor, secret,
                                                                                               monkeypatch, caplog):
    """A fault-injection review: the writers' queue file next to the SQLite database (`<database>-writers`)
    that the server cannot open (left by a command run as root, README "Operator commands"; a volume gone
    read-only; a worker started after the database file was made read-only) gave "Something went wrong" (500)
    at every sign-in, change and logout, with a traceback in the log. Now it is the 503 page, the log names
    the file, nothing is stored, and it works again as soon as the file can be opened, without a restart."""
    import builtins
    import logging

    import webapp.db as db_module

    if not app.config["DATABASE_URL"].startswith("sqlite"):
        pytest.skip("SQLite only: PostgreSQL queues writers on row locks")
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    token = csrf_from(actor.client.get("/settings").get_data(as_text=True))
    database = app.config["DATABASE_URL"][len("sqlite:///"):]
    db_module._QUEUE_FILES.pop((os.getpid(), database)).close()  # opened by the sign-in: a new worker has none

    def refusing(file, *args, **kwargs):
        if str(file) == database + "-writers":
            raise PermissionError(13, "Permission denied", file)
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(db_module, "open", refusing, raising=False)
    caplog.set_level(logging.ERROR)
    assert_unavailable_page(_start_wizard(actor.client, token))
    assert f"{database}-writers" in caplog.text and "Permission denied" in caplog.text
    with app.app_context():
        assert PendingEnrolment.select().count() == 0
    monkeypatch.undo()
    assert _start_wizard(actor.client, token).status_code == 303
    with app.app_context():
        assert PendingEnrolment.select().count() == 1


def test_sqlite_waits_ten_seconds_for_another_programs_writer_lock(app):
    """README "Deployment" (Database): SQLite in WAL mode with a 10 s busy timeout. A program that holds the
    writer lock for a moment (a backup, `sqlite3` at the console) makes requests wait up to 10 s for it
    before they answer "Please try again" (the test above shortens the wait to stay quick)."""
    import sqlite3

    if not app.config["DATABASE_URL"].startswith("sqlite"):
        pytest.skip("SQLite only")
    with app.app_context():
        assert db.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 10000
    outside = sqlite3.connect(app.config["DATABASE_URL"][len("sqlite:///"):])
    try:
        assert outside.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # kept in the file itself
    finally:
        outside.close()


@pytest.mark.skipif((os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"), reason="SQLite's WAL file")
def test_a_wal_grown_by_one_big_transaction_is_cut_back_once_the_log_starts_over(tmp_path, clock, monkeypatch):
    """A soak test: the WAL file keeps the largest size it ever reached (one purge of a million rows left
    506 MB for good). With journal_size_limit (64 MiB; 64 KiB here, to stay quick) SQLite cuts it back when it
    starts the log over after a complete checkpoint."""
    import webapp.db as db_module
    from webapp.db import write_transaction

    assert db_module.SQLITE_PRAGMAS["journal_size_limit"] == 64 * 1024 * 1024
    monkeypatch.setitem(db_module.SQLITE_PRAGMAS, "journal_size_limit", 65536)
    path = tmp_path / "app.db"
    app = make_test_app(tmp_path, f"sqlite:///{path}", clock, PURGE_INTERVAL=timedelta(0))
    with app.app_context():
        with write_transaction():
            User.insert_many([{"email": f"u{k}@example.com", "password_hash": "x" * 2000}
                              for k in range(1000)]).execute()
        assert os.path.getsize(f"{path}-wal") > 1_000_000
        db.execute_sql("PRAGMA wal_checkpoint(PASSIVE)")  # as the requests do after their response
        with write_transaction():
            User.create(email="one-more@example.com", password_hash="x")
        assert os.path.getsize(f"{path}-wal") <= 65536
    db.close()


@pytest.mark.parametrize("error_class", ["DeadlockDetected", "SerializationFailure", "LockNotAvailable"])
def test_a_transaction_postgresql_undid_says_try_again_not_unreachable(app, actor, secret, monkeypatch, error_class):
    """PostgreSQL breaks a deadlock by rolling one transaction back (SQLSTATE 40P01; a serialization failure
    is 40001, a lock timeout 55P03); peewee raises it as an OperationalError around psycopg's error. The
    person is told to try again, not that the database is unreachable, and nothing of the request is stored."""
    import psycopg
    from peewee import OperationalError

    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    original = User.lock

    def deadlocked(user_id):
        original(user_id)
        driver_error = getattr(psycopg.errors, error_class)("the database undid the transaction")
        raise OperationalError(driver_error, *driver_error.args)  # what peewee's exception wrapper raises

    monkeypatch.setattr(User, "lock", staticmethod(deadlocked))
    r = _start_wizard(actor.client)
    body = r.get_data(as_text=True)
    assert r.status_code == 503 and CONFLICT in body and UNAVAILABLE not in body
    with app.app_context():
        assert PendingEnrolment.select().count() == 0
    monkeypatch.setattr(User, "lock", original)
    assert _start_wizard(actor.client).status_code == 303


CANCELLED = "This took the database too long, so it was stopped before it could finish."


@pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="PostgreSQL's statement_timeout (SQLite has none: its writer lock is the test above)")
def test_a_statement_postgresql_cancelled_after_statement_timeout_says_try_again_not_unreachable(app, actor, secret,
                                                                                                 caplog):
    """A database with a statement_timeout cancels a statement that waits for another transaction's row past
    it (SQLSTATE 57014). The person was told that the database could not be reached, and the log said
    "database unavailable", while a lock_timeout (55P03) got "Please try again". The database is up: the page
    says the request took it too long and to reload and try again, the log says the statement was cancelled,
    nothing of the request is stored, and it works once the row is free."""
    import logging

    from .test_lock_order import PersonHeld

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    token = csrf_from(actor.client.get("/settings").get_data(as_text=True))
    with app.app_context():  # the connection the app keeps for its requests (db.init_app)
        db.connect(reuse_if_open=True)
        db.execute_sql("SET statement_timeout = '300ms'")
    held = PersonHeld(user.id)  # as another request taking the person's row (User.lock) holds it
    try:
        caplog.set_level(logging.ERROR)
        r = _start_wizard(actor.client, token)
        body = r.get_data(as_text=True)
        assert r.status_code == 503 and "Please try again" in body and CANCELLED in body
        assert UNAVAILABLE not in body and CONFLICT not in body and "Traceback" not in body
        assert "database statement cancelled" in caplog.text and "database unavailable" not in caplog.text
        with app.app_context():
            assert PendingEnrolment.select().count() == 0
    finally:
        held.release()
    assert _start_wizard(actor.client, token).status_code == 303  # the error page closed that connection
    with app.app_context():
        assert PendingEnrolment.select().count() == 1


@pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="PostgreSQL's lock_timeout (SQLite's writers wait busy_timeout: the tests above)")
def test_postgresql_connections_wait_ten_seconds_for_a_row_unless_the_database_sets_its_own(app):
    """PostgreSQL waits for a held row for ever by default: the app's connections wait at most 10 s, as
    SQLite's writers do, but a lock_timeout the operator set on the role or the database stays theirs."""
    with app.app_context():
        db.close()
        db.connect()
        assert db.execute_sql("SHOW lock_timeout").fetchone()[0] == "10s"
        db.execute_sql("ALTER ROLE CURRENT_USER SET lock_timeout = '3s'")
        try:
            db.close()
            db.connect()
            assert db.execute_sql("SHOW lock_timeout").fetchone()[0] == "3s"
        finally:
            db.execute_sql("ALTER ROLE CURRENT_USER RESET lock_timeout")
            db.close()


@pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="PostgreSQL's lock_timeout and the schema lock")
def test_a_start_waits_for_another_hosts_start_longer_than_the_lock_timeout(app, tmp_path, monkeypatch):
    """Hosts started together take turns on the schema lock (db._create_tables), and the first may build an
    index on a big table meanwhile: the others wait for it. Under the connections' lock_timeout (shortened
    here) their start failed with "the database in DATABASE_URL cannot be used: canceling statement due to
    lock timeout"."""
    import psycopg

    from webapp.db import _SCHEMA_LOCK, _Postgresql

    monkeypatch.setattr(_Postgresql, "LOCK_TIMEOUT", "300ms")
    other_host = psycopg.connect(app.config["DATABASE_URL"], autocommit=True)
    other_host.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
    done = threading.Timer(1.5, other_host.close)  # its start ends: the lock goes with its connection
    done.start()
    try:
        started = time.monotonic()
        make_test_app(tmp_path, app.config["DATABASE_URL"], FakeClock())
        assert time.monotonic() - started >= 1.0
    finally:
        done.cancel()
        done.join()
        other_host.close()
        db.close()


@pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="PostgreSQL's lock_timeout")
def test_a_persons_row_held_past_the_lock_timeout_says_try_again_and_changes_nothing(app, actor, secret,
                                                                                     monkeypatch):
    """Another transaction keeps a person's row (a command suspended with Ctrl-Z, a console left in a
    transaction): their next change waited until gunicorn's timeout killed the worker, which answered no
    page at all. Now it waits the lock timeout (shortened here), says "Please try again", stores nothing,
    and works once the row is free. (Without a limit the holder lets go after 5 s, and the change goes
    through: the test fails rather than hang.)"""
    from webapp.db import _Postgresql

    from .test_lock_order import PersonHeld

    monkeypatch.setattr(_Postgresql, "LOCK_TIMEOUT", "300ms")
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    token = csrf_from(actor.client.get("/settings").get_data(as_text=True))
    with app.app_context():
        db.close()  # the next request opens a connection with the shortened limit
    held = PersonHeld(user.id)
    backstop = threading.Timer(5, held.release)
    backstop.start()
    try:
        r = _start_wizard(actor.client, token)
        body = r.get_data(as_text=True)
        assert r.status_code == 503 and CONFLICT in body and UNAVAILABLE not in body
        with app.app_context():
            assert PendingEnrolment.select().count() == 0
    finally:
        backstop.cancel()
        backstop.join()
        if not held.conn.closed:
            held.release()
    assert _start_wizard(actor.client, token).status_code == 303
    with app.app_context():
        assert PendingEnrolment.select().count() == 1


def _read_only_connection(app):
    """The connection the app keeps for its requests refuses writes from now on, as one opened while the
    database was read-only does (ALTER DATABASE ... SET default_transaction_read_only = on for maintenance, or
    a standby not yet promoted): PostgreSQL answers every write with SQLSTATE 25006."""
    with app.app_context():
        db.connect(reuse_if_open=True)
        db.execute_sql("SET default_transaction_read_only = on")


@pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="PostgreSQL's read-only transactions (a read-only SQLite file is an OperationalError)")
def test_a_read_only_postgresql_gives_the_503_page_and_the_app_recovers_without_restart(app, actor, secret, clock):
    """A fault-injection review: a database that refuses writes (read_only_sql_transaction, which psycopg
    raises as an InternalError) gave "Something went wrong" (500) at every sign-in and every change, and at
    the page view of a signed-in person every minute (the session's last-seen time), and nothing dropped the
    kept connection: once the database took writes again, the workers went on answering 500 until restarted.
    Now it is the outage it is: the 503 page, nothing stored, a page whose only write is the session's
    last-seen time still shown, and the next request, on a new connection, works."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    token = csrf_from(actor.client.get("/settings").get_data(as_text=True))
    _read_only_connection(app)
    assert_unavailable_page(_start_wizard(actor.client, token))
    other = app.test_client()
    other_token = csrf_from(other.get("/login").get_data(as_text=True))
    _read_only_connection(app)  # the 503 page dropped the connection: the next request has a new one
    assert_unavailable_page(other.post("/login", data={"csrf_token": other_token, "email": "alice@example.com",
                                                       "password": PASSWORD}))
    _read_only_connection(app)
    clock.advance(61)  # the session's last-seen time is due to be written (sessions.TOUCH_INTERVAL)
    r = actor.client.get("/settings")
    assert r.status_code == 200 and "<h1>User Settings</h1>" in r.get_data(as_text=True)
    with app.app_context():
        assert PendingEnrolment.select().count() == 0
    assert _start_wizard(actor.client, token).status_code == 303  # a new connection, which takes writes
    with app.app_context():
        assert PendingEnrolment.select().count() == 1


# ---------------------------------------------------------------- a worker killed mid-transaction

def _read(path):
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return ""


def kill_mid_transaction(app, tmp_path, statement, send, params="", outside=False):
    """Start gunicorn with a fault injected before `statement` (inside a transaction, or with `outside` outside
    any; its parameters matching `params`), run `send` in a thread, SIGKILL the worker once it reached that
    point, and return the server (still running, worker respawned)."""
    marker = str(tmp_path / "stalled.pid")
    server = LiveServer(app, workers=2, log_dir=str(tmp_path),
                        extra_env={"TWOSTEP_STALL_SQL": statement, "TWOSTEP_STALL_MARKER": marker,
                                   "TWOSTEP_STALL_PARAMS": params, "TWOSTEP_STALL_OUTSIDE": "1" if outside else "0"})
    outcome = {}

    def run():
        try:
            outcome["response"] = send(server)
        except OSError as exc:  # the connection dies with the worker
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (pid := _read(marker)):
        assert time.monotonic() < deadline, "the request never reached the statement\n" + server.read_log()
        time.sleep(0.05)
    time.sleep(0.2)  # let the worker enter its sleep
    os.kill(int(pid), signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive()
    assert "response" not in outcome or outcome["response"][0] >= 500
    return server


@pytest.fixture
def seeded_app(app):
    """The test database's app (SQLite file, or PostgreSQL under make test-postgres)."""
    return app


def test_worker_killed_while_accepting_a_code_leaves_nothing_half_done(seeded_app, actor, tmp_path):
    """SIGKILL in the code step's transaction, after the device's last step was moved but before the audit
    record: the whole step is rolled back (the code is still unused, no sign-in) and the next request, served
    by a fresh worker, signs the person in with that same code (security.md 16, 20)."""
    app = seeded_app
    secret = new_secret()
    user = actor.user(email="kill@example.com", secret=secret)
    state = {}

    def send(server):
        browser = Browser(server).password_step("kill@example.com", PASSWORD)
        state["browser"], state["token"] = browser, browser.csrf("/login/verify")
        state["code"] = pyotp.TOTP(secret).now()
        return browser.request("POST", "/login/verify", data={"csrf_token": state["token"], "code": state["code"]})

    # The code step's record (the password step writes one of its own, in a transaction too).
    server = kill_mid_transaction(app, tmp_path, r'^INSERT INTO "auditevent"', send, params="code_accepted")
    try:
        with app.app_context():
            assert Device.get(Device.user == user.id).last_step == 0
            assert AuditEvent.select().where(AuditEvent.kind.in_(["code_accepted", "signin"])).count() == 0
            assert User.get_by_id(user.id).code_failures == 0
        status, headers, _ = state["browser"].request(
            "POST", "/login/verify", data={"csrf_token": state["token"], "code": pyotp.TOTP(secret).now()})
        assert status == 302 and headers["location"].endswith("/settings"), status
        with app.app_context():
            assert Device.get(Device.user == user.id).last_step > 0
    finally:
        server.stop()
    assert "Traceback" not in server.read_log()


def _complete_activation_of(email, state, headers=None):
    """A `send` for kill_mid_transaction: sign in as `email` (no 2FA yet), go through the wizard with the key it
    shows and press Complete Activation for "Phone"; `state` keeps the browser and its CSRF token, to press
    it again afterwards."""
    def send(server):
        import re

        browser = Browser(server)
        status, _, _ = browser.post("/login", {"email": email, "password": PASSWORD})
        assert status == 302
        _, page = browser.start_wizard()
        secret = re.search(r"secret=([A-Z2-7]+)", page).group(1)
        status, page = browser.submit_wizard_code(pyotp.TOTP(secret).now())
        assert "Device name" in page
        state["browser"], state["token"] = browser, browser.csrf("/settings")
        return browser.request("POST", "/settings/2fa/complete", data={"csrf_token": state["token"], "name": "Phone"},
                               headers=headers)

    return send


def test_worker_killed_while_activating_a_device_leaves_no_device_and_the_retry_works(seeded_app, actor, tmp_path):
    """SIGKILL in Complete Activation's transaction, after the Device row was inserted and the pending secret
    deleted: no device exists
    afterwards, the confirmed pending secret is intact, and pressing Complete Activation again activates
    exactly one device (security.md 8)."""
    app = seeded_app
    if "settings.complete" not in app.view_functions:
        pytest.skip("the enrolment wizard (settings.complete) has not landed yet")
    user = actor.user(email="enrol@example.com")
    state = {}
    send = _complete_activation_of("enrol@example.com", state)

    # The transaction's last statement: the Device row is inserted and the pending secret deleted by then.
    server = kill_mid_transaction(app, tmp_path, r'^UPDATE "user" SET "tfa_reset_until"', send)
    try:
        with app.app_context():
            assert Device.select().where(Device.user == user.id).count() == 0
            pending = PendingEnrolment.get(PendingEnrolment.user == user.id)
            assert pending.verified_step is not None
        status, headers, page = state["browser"].request(
            "POST", "/settings/2fa/complete", data={"csrf_token": state["token"], "name": "Phone"})
        assert status == 303 and headers["location"] == "/settings/2fa/done", status
        with app.app_context():
            assert [d.name for d in Device.select().where(Device.user == user.id)] == ["Phone"]
            assert PendingEnrolment.select().where(PendingEnrolment.user == user.id).count() == 0
    finally:
        server.stop()
    assert "Traceback" not in server.read_log()


def test_worker_killed_after_activating_a_device_does_not_say_the_setup_expired(seeded_app, actor, tmp_path):
    """A fault-injection review: SIGKILL after Complete Activation's transaction committed, before its answer
    went out (and with it the session's note of the activation): pressing Complete Activation again said "This
    setup has expired ... Nothing was changed on your account ... remove the old entry from your app", over a
    device that was active, whose entry that was. A person who did so could no longer sign in. The note is
    stored in the activation's own transaction now: pressed again, the done step says that 2FA is active."""
    app = seeded_app
    user = actor.user(email="enrol@example.com")
    state = {}
    send = _complete_activation_of("enrol@example.com", state, headers={"HX-Request": "true"})

    # After the commit: the done step reads the person again to show their row.
    done_reads_the_person = (r'^SELECT "t1"\."id", "t1"\."email", .* FROM "user" AS "t1" '
                             r'WHERE \("t1"\."id" = (\?|%s)\) LIMIT')
    server = kill_mid_transaction(app, tmp_path, done_reads_the_person, send, outside=True)
    try:
        with app.app_context():
            assert [d.name for d in Device.select().where(Device.user == user.id)] == ["Phone"]
        status, _, page = state["browser"].request(
            "POST", "/settings/2fa/complete", data={"csrf_token": state["token"], "name": "Phone"})
        assert status == 200 and "Two-factor authentication is active" in page
        assert "This setup has expired" not in page and "Nothing was changed" not in page
    finally:
        server.stop()
    assert "Traceback" not in server.read_log()


@pytest.mark.parametrize("due", [True, False])
def test_sqlite_wal_is_checkpointed_after_the_response_not_by_the_writer(app, actor, monkeypatch, due):
    """The pages a request wrote reach the database file through a checkpoint run after its response went
    out (db._Checkpoints), not inside the write transaction, where SQLite's own checkpoint made every other
    writer wait for two fsyncs."""
    from webapp import db as db_module

    if not app.config["DATABASE_URL"].startswith("sqlite"):
        pytest.skip("SQLite only")
    path = app.config["DATABASE_URL"].split("sqlite:///", 1)[1]
    monkeypatch.setattr(db_module._Checkpoints, "COMMITS", 1 if due else 10**6)
    monkeypatch.setattr(db_module._Checkpoints, "SECONDS", 0 if due else 10**6)
    actor.user("dora@example.com")
    with app.app_context():
        db_module.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")  # start from an empty WAL
    token = actor.csrf("/login")
    response = actor.client.post("/login", data={"csrf_token": token, "email": "dora@example.com",
                                                 "password": PASSWORD})
    assert response.status_code == 302 and response.headers["Location"].endswith("/settings")
    assert _count_in_main_file(path, "auditevent", "kind = 'signin'") == 0  # the body is not sent yet: nobody waits for the disk meanwhile
    response.close()  # what a WSGI server does once the body is sent
    assert _count_in_main_file(path, "auditevent", "kind = 'signin'") == (1 if due else 0)
    with app.app_context():  # either way the committed record is there for every connection
        assert AuditEvent.select().where(AuditEvent.kind == "signin").count() == 1


def _count_in_main_file(path, table, where="1 = 1"):
    """Rows in the SQLite database file itself: read with immutable=1, SQLite sees the main file only, not the WAL."""
    import sqlite3

    main_file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return main_file.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0]
    finally:
        main_file.close()


def test_sqlite_wal_is_checkpointed_after_32_write_transactions_or_10_seconds(tmp_path, clock, monkeypatch):
    """The checkpoint cadence (db._Checkpoints, docs/performance.md): a thread's connection checkpoints after the
    response that follows its 32nd write transaction, or its first one 10 s or more after its last
    checkpoint; not before, and each checkpoint starts both counts again. Sooner would make requests wait for
    two fsyncs each; later would let the WAL grow past the 5,000-page backstop."""
    import time

    from webapp.db import write_transaction

    if os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("SQLite only")
    path = tmp_path / "app.db"
    app = make_test_app(tmp_path, f"sqlite:///{path}", clock, PURGE_INTERVAL=timedelta(0))  # no writes of its own
    client = app.test_client()
    moment = [float(int(time.monotonic()) + 1)]  # whole seconds: the steps below add up exactly
    monkeypatch.setattr(time, "monotonic", lambda: moment[0])
    made = []

    def write(count):
        with app.app_context():
            for _ in range(count):
                with write_transaction():
                    User.create(email=f"u{len(made)}@example.com", password_hash="x")
                made.append(1)

    def request_then_in_file():
        client.get("/login").close()  # a request that writes nothing; its response sent
        return _count_in_main_file(path, '"user"')

    write(1)
    moment[0] += 3600
    assert request_then_in_file() == 1  # a checkpoint: the counts start from here
    write(31)
    assert request_then_in_file() == 1  # 31 write transactions within 10 s: not yet
    write(1)
    assert request_then_in_file() == 33  # the 32nd
    write(1)
    moment[0] += 9.5
    assert request_then_in_file() == 33  # one write, 9.5 s after the last checkpoint: not yet
    moment[0] += 0.5
    assert request_then_in_file() == 34  # 10 s
    db.close()



def test_a_kept_connection_that_cannot_be_polled_is_replaced_before_the_request(app, monkeypatch):
    """A kept PostgreSQL connection closed under the app (its socket gone, so the poll before each request
    cannot even look at it) is checked with a query, found dead and replaced: the person gets the page, not
    a 503. Nothing is stubbed but the idle time, which would otherwise check it by itself."""
    import webapp.db as db_module

    if not app.config["DATABASE_URL"].startswith("postgres"):
        pytest.skip("PostgreSQL only (TEST_DATABASE_URL): SQLite keeps no connection to check")
    monkeypatch.setattr(db_module._ConnectionUpkeep, "IDLE_SECONDS", 3600.0)
    with app.app_context():
        User.create(email="alice@example.com", password_hash=hash_password(PASSWORD))
    client = app.test_client()
    assert client.get("/login").status_code == 200
    kept = db.obj._state.conn
    assert kept is not None  # the connection outlived the request
    kept.close()  # at the driver level: peewee still believes it open
    r = client.get("/login")
    assert r.status_code == 200 and "<h1>Log in</h1>" in r.get_data(as_text=True)
    assert db.obj._state.conn is not kept and not db.obj.is_closed()


def _database_down_from_now(monkeypatch):
    """From the call on, every statement fails as if the database had gone (its server stopped)."""
    from peewee import Database

    from .conftest import database_error

    def failing(self, *args, **kwargs):
        raise database_error("unable to open database file")

    monkeypatch.setattr(Database, "execute_sql", failing)


def test_the_503_page_reaches_a_person_in_a_support_window(app, actor, monkeypatch):
    """An infrastructure review: the database going away in the middle of a page of a person signed in with
    the password alone (support's window open) gave a bare 500 from the server: the layout's "set up a new
    device" banner queried the database again while the 503 page was drawn. Now that page is shown."""
    import webapp.settings as settings_module
    from webapp.clock import now

    carol = actor.user("carol@example.com")
    with app.app_context():
        User.update(tfa_reset_until=now() + timedelta(hours=24)).where(User.id == carol.id).execute()
    assert actor.password_step("carol@example.com").headers["Location"] == "/settings"
    real_context = settings_module._row_context

    def then_the_database_goes(user, **kwargs):
        _database_down_from_now(monkeypatch)
        return real_context(user, **kwargs)

    monkeypatch.setattr(settings_module, "_row_context", then_the_database_goes)
    assert_unavailable_page(actor.client.get("/settings"))
    monkeypatch.undo()  # the database back before the app fixture's teardown, which uses it on PostgreSQL


def test_an_expired_session_whose_row_cannot_be_deleted_is_still_signed_out(app, actor, secret, clock, monkeypatch):
    """security.md 28: a session past its idle timeout is refused even when deleting its row fails (the
    writer lock held by another program, a connection lost at that moment): the browser goes to sign in and
    the purge deletes the row later. The failure, outside the error handlers, gave a bare 500 from the
    server instead."""
    import webapp.sessions as sessions_module

    from .conftest import database_error

    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    clock.advance(31 * 60)

    class Failing:
        def execute(self, **params):
            raise database_error("database is locked")

    monkeypatch.setattr(sessions_module, "_DELETE", Failing())
    r = actor.client.get("/settings")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")
