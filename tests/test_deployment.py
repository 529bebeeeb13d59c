"""The documented production set-up (README "Deployment"): gunicorn with gunicorn.conf.py, configured from the
environment, behind exactly PROXY_HOPS reverse proxies."""
import os
import re
import sqlite3
import time

import pytest
from peewee import fn

from webapp import cli
from webapp.db import db, is_sqlite
from webapp.models import AuditEvent, User
from webapp.totp import new_secret

from .conftest import PASSWORD, Actor
from .live_app import ROOT, Browser, LiveServer


def _rejected_password_ip(app, server, forwarded_for):
    """Send a wrong password through `server` claiming X-Forwarded-For, return the IP the audit log recorded."""
    status, _, body = Browser(server).post("/login", {"email": "alice@example.com", "password": "wrong " + PASSWORD},
                                           headers={"X-Forwarded-For": forwarded_for})
    assert status == 200 and "Incorrect email address or password." in body
    with app.app_context():
        event = (AuditEvent.select().where(AuditEvent.kind == "password_rejected")
                 .order_by(AuditEvent.id.desc()).first())
    return event.ip


@pytest.mark.parametrize("hops, expected", [("1", "203.0.113.7"), ("0", "127.0.0.1")])
def test_proxy_hops_from_the_environment_decide_which_client_address_is_believed(app, actor, tmp_path, hops, expected):
    """security.md 41, 44: with PROXY_HOPS=1 (one proxy in front) the address the proxy appended is the client;
    with 0 (no proxy) a client's own X-Forwarded-For is ignored and the socket address counts."""
    actor.user()
    server = LiveServer(app, workers=2, log_dir=str(tmp_path), extra_env={"PROXY_HOPS": hops})
    try:
        assert _rejected_password_ip(app, server, "203.0.113.7") == expected
    finally:
        server.stop()
    assert "Traceback" not in server.read_log()


def test_gunicorn_opens_no_control_socket_that_another_instance_would_share(app, tmp_path):
    """gunicorn 27 opens a control socket at one path per user unless told not to: two instances on a host
    (or a test server next to the real one) replaced each other's. gunicorn.conf.py turns it off."""
    home, runtime = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    runtime.mkdir()
    server = LiveServer(app, workers=1, log_dir=str(tmp_path),
                        extra_env={"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)})
    try:
        assert Browser(server).get("/login")[0] in (200, 302)
        deadline = time.monotonic() + 3  # gunicorn opens it shortly after the workers start
        while time.monotonic() < deadline:
            assert not (runtime / "gunicorn.ctl").exists() and not (home / ".gunicorn").exists()
            assert "Control socket" not in server.read_log()
            time.sleep(0.1)
    finally:
        server.stop()


def test_a_function_made_for_one_request_is_not_kept_by_the_app(app):
    """The app keeps which hooks and views are plain functions (Flask asks on every request whether each is a
    coroutine function: webapp._Flask). A function made for one request (after_this_request, a class-based
    view's method) must go when the request is done, with whatever it holds: the first version kept up to
    512 of them for good (a review: about 50 MB with 100 kB each)."""
    import gc
    import weakref

    def made_for_one_request(response):
        return response

    watch = weakref.ref(made_for_one_request)
    assert app.ensure_sync(made_for_one_request) is made_for_one_request
    assert app.ensure_sync(made_for_one_request) is made_for_one_request  # asked again: known, the same
    del made_for_one_request
    gc.collect()
    assert watch() is None


def test_gunicorn_hides_the_preloaded_app_from_the_workers_garbage_collector():
    """gunicorn.conf.py freezes the master's objects before each fork: a worker's full garbage collection
    then walks only its own objects (~50 ms less per full collection, a pause a request would wait
    through)."""
    import gc
    import runpy

    conf = runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py"))
    before = gc.get_freeze_count()
    try:
        conf["pre_fork"](None, None)
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("raw_uri, path, query", [
    ("/support?q=alice%40example.com", "/support", "q=alice%40example.com"),
    ("/support/audit?email=alice%40example.com&kind=", "/support/audit", "email=alice%40example.com&kind="),
    # An admin whose session ended meanwhile: the search comes back in the sign-in page's next=.
    ("/login?next=%2Fsupport%3Fq%3Dalice%2540example.com", "/login", "next=%2Fsupport%3Fq%3Dalice%2540example.com"),
])
def test_the_access_log_holds_no_address_an_admin_searched_for(raw_uri, path, query):
    """The Support search and the audit log's filter take the person's email address in the query string, and
    gunicorn's access line (its %(r)s, the whole request line) wrote it to the server log, which outlives the
    database rows and is read by whoever reads the logs (a privacy review). With gunicorn.conf.py the line is
    gunicorn's usual one, without the query string."""
    line = _access_line(raw_uri, path, query)

    assert "alice" not in line
    assert line.startswith("127.0.0.1 - - [")
    assert line.endswith(f'"GET {path} HTTP/1.1" 200 1234 "-" "Firefox"')


def test_the_access_log_writes_the_path_as_the_client_sent_it():
    """Without its query string, the path is still the one sent (percent-encoded), not werkzeug's decoded
    PATH_INFO: a quote a visitor encodes in it cannot end the request line's field early."""
    line = _access_line('/x%22%20200%201%20%22-%22?q=1', '/x" 200 1 "-"', "q=1")

    assert '"GET /x%22%20200%201%20%22-%22 HTTP/1.1" 200 1234' in line


def _access_line(raw_uri, path, query):
    """The access line gunicorn, configured by gunicorn.conf.py, writes for a GET of `raw_uri`."""
    import datetime
    import runpy
    from types import SimpleNamespace

    from gunicorn.config import Config

    cfg = Config()
    for name, value in runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py")).items():
        if name in cfg.settings:  # what gunicorn itself takes from the file
            cfg.set(name, value)
    logger = cfg.logger_class(cfg)
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": raw_uri, "PATH_INFO": path, "QUERY_STRING": query,
               "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "HTTP_USER_AGENT": "Firefox"}
    response = SimpleNamespace(status="200 OK", headers=[], sent=1234)
    atoms = logger.atoms(response, SimpleNamespace(headers=[]), environ, datetime.timedelta(milliseconds=5))
    return cfg.access_log_format % logger.atoms_wrapper_class(atoms)


@pytest.mark.skipif(not os.environ.get("TEST_DATABASE_URL"),
                    reason="PostgreSQL only: on SQLite the database's own lock serialises table creation")
def test_hosts_starting_together_on_an_empty_postgresql_database_all_start(tmp_path):
    """README "Deployment": any number of hosts on one PostgreSQL. Each creates the tables it finds missing at
    start; PostgreSQL's CREATE TABLE IF NOT EXISTS fails when another session creates the same table at
    that moment (a duplicate row type), so the creators take turns (db.init_app). Six processes are
    started at one instant on a new, empty database, three times: every one must start."""
    import subprocess
    import sys
    import time
    import uuid

    import psycopg

    base = os.environ["TEST_DATABASE_URL"]
    server = base.rsplit("/", 1)[0]
    for _ in range(3):
        name = "twostep_start_" + uuid.uuid4().hex[:8]
        with psycopg.connect(server + "/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            start_at = time.time() + 4  # after every process has imported the app (the slow part)
            script = ("import time, webapp\n"
                      f"time.sleep(max(0.0, {start_at} - time.time()))\n"
                      "webapp.create_app({'DATABASE_URL': %r, 'SECRET_KEY': 'k' * 40, 'SETUP_CODE': 'x',\n"
                      "                   'TOTP_ENCRYPTION_KEYS': %r, 'INSTANCE_PATH': %r})\n")
            from cryptography.fernet import Fernet

            code = script % (f"{server}/{name}", Fernet.generate_key().decode(), str(tmp_path / name))
            procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(6)]
            errors = [p.communicate(timeout=120)[1] for p in procs]
            assert [p.returncode for p in procs] == [0] * 6, [e[-400:] for p, e in zip(procs, errors) if p.returncode]
        finally:
            with psycopg.connect(server + "/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.skipif(not os.environ.get("TEST_DATABASE_URL"),
                    reason="needs PostgreSQL (make test-postgres sets TEST_DATABASE_URL)")
def test_a_postgresql_role_that_may_not_create_tables_stops_the_start_with_what_to_do(tmp_path):
    """PostgreSQL 15 lets only the database's owner create tables in `public`. A role that was merely granted
    the database used to stop the start with a traceback (peewee.ProgrammingError); it is one line naming
    DATABASE_URL and the fix, and the fix the README gives (make the role the owner) works."""
    import uuid

    import psycopg
    from cryptography.fernet import Fernet

    from webapp import create_app
    from webapp.config import ConfigError

    server = os.environ["TEST_DATABASE_URL"].rsplit("/", 1)[0]
    name = "twostep_rights_" + uuid.uuid4().hex[:8]
    with psycopg.connect(server + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(f'GRANT ALL ON DATABASE "{name}" TO "{name}"')
    role_url = server.replace("postgres@", f"{name}@", 1) + f"/{name}"
    settings = {"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst"), "SECRET_KEY": "k" * 40,
                "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(), "DATABASE_URL": role_url}
    try:
        with pytest.raises(ConfigError) as refused:
            create_app(settings)
        message = str(refused.value)
        assert message.startswith("the database in DATABASE_URL cannot be used: permission denied for schema public")
        assert "OWNER" in message and "\n" not in message
        with psycopg.connect(server + "/postgres", autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" OWNER TO "{name}"')
        create_app(settings)
        with psycopg.connect(role_url) as conn:
            assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'user'"
                                ).fetchone()[0] == 1
    finally:
        db.close()
        with psycopg.connect(server + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            conn.execute(f'DROP ROLE "{name}"')


def _start_again(app, tmp_path, clock, capsys):
    """The app started once more on the same database, as after an upgrade: (the new app, what its start
    printed on the console)."""
    from .conftest import make_test_app

    db.close()
    capsys.readouterr()
    again = make_test_app(tmp_path, app.config["DATABASE_URL"], clock,
                          TOTP_ENCRYPTION_KEYS=app.config["TOTP_ENCRYPTION_KEYS"])
    return again, capsys.readouterr().err


def test_a_database_from_before_a_column_was_added_gets_it_at_start(app, actor, tmp_path, clock, secret, capsys):
    """README "Upgrades": a `user` table made before `code_strikes` existed (2026-12-05) gets the column at the
    next start, filled from the failures counted so far up to the strike that locks (an account locked at
    the upgrade stays locked, and codes it was sent during that lock do not lengthen the next), and the
    sign-in works; before, every code step failed on the missing column. The same for `user.disabled_at`
    (2026-12-06, empty: every sign-in reads it) and `supportrequest.form_hash`. Both databases (make
    test-postgres runs it on PostgreSQL)."""
    from webapp.models import User

    user = actor.user(secret=secret)
    locked = actor.user("locked@example.com")
    pausing = actor.user("pausing@example.com")
    with app.app_context():
        User.update(code_failures=3).where(User.id == pausing.id).execute()  # within the short pauses
        # Under the old rule 7 failures (5 wrong codes, 2 more sent during the lock) meant a lock of an hour
        # next; under the new one the codes sent during a lock do not count towards it.
        User.update(code_failures=7).where(User.id == locked.id).execute()
        db.execute_sql('ALTER TABLE "user" DROP COLUMN code_strikes')
        assert "code_strikes" not in {c.name for c in db.get_columns("user")}
        db.execute_sql('ALTER TABLE "supportrequest" DROP COLUMN form_hash')  # 2026-12-06
        db.execute_sql('ALTER TABLE "user" DROP COLUMN disabled_at')  # 2026-12-06
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count("upgraded the database: added user.code_strikes") == 1  # said, once
    assert said.count("upgraded the database: added supportrequest.form_hash") == 1
    assert said.count("upgraded the database: added user.disabled_at") == 1
    with again.app_context():
        assert User.get_by_id(user.id).code_strikes == 0
        assert User.select().where(User.disabled_at.is_null(False)).count() == 0  # nobody disabled by it
        # The strike that locks, no more: the lock holds, and its next wrong code doubles it (not 2**3 times)
        assert User.get_by_id(locked.id).code_strikes == 5
        assert User.get_by_id(pausing.id).code_strikes == 3
    after = type(actor)(again, again.test_client(), clock)
    after.password_step()
    assert after.code_refused("000000").status_code == 200  # a wrong code: counted as a strike
    assert after.code_refused(after.code(secret)).status_code == 429  # the 1-second pause
    clock.advance(1)
    assert after.code_step(after.code(secret)).headers["Location"] == "/settings"
    contact = after.post_form("/support/contact", {"email": "locked@example.com", "message": "Lost my phone today."})
    assert contact.status_code == 302  # the contact form stores its form's id in the added column
    # users disable writes the added column, and the password step and the session's person read it.
    assert again.test_cli_runner().invoke(args=["users", "disable", "pausing@example.com"]).exit_code == 0
    assert after.client.get("/settings").status_code == 200  # alice's session: the join reads the column too
    assert type(actor)(again, again.test_client(), clock).password_step("pausing@example.com").status_code == 403


def test_a_database_from_the_first_day_gets_its_two_missing_columns_at_start(app, actor, tmp_path, clock, secret,
                                                                            capsys):
    """README "Upgrades": databases made on 2026-11-28 lack `knownbrowser.last_used_at` (a known browser's
    lifetime, with its index) or `pendingenrolment.failures` (wrong codes per wizard set-up). They started
    without a word, and every code step (which marks the browser known) answered 503 "cannot reach our
    database" (an operator's upgrade of such a database). Both are added at start, the lifetime counted
    from when the browser became known; the code step and the wizard work. Both databases."""
    from webapp.models import Device, KnownBrowser, PendingEnrolment

    from .test_wizard import Wizard, text

    actor.user(secret=secret)
    actor.sign_in(secret=secret)  # this browser is known now
    with app.app_context():
        made = KnownBrowser.get().created_at
        db.execute_sql('DROP INDEX IF EXISTS "knownbrowser_last_used_at"')
        db.execute_sql('ALTER TABLE "knownbrowser" DROP COLUMN last_used_at')
        db.execute_sql('ALTER TABLE "pendingenrolment" DROP COLUMN failures')
        if is_sqlite():  # what every later version's start left there: an index on the column's name as a text
            db.execute_sql('CREATE INDEX "knownbrowser_last_used_at" ON "knownbrowser" ("last_used_at")')
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count("upgraded the database: added knownbrowser.last_used_at") == 1
    assert said.count("upgraded the database: added pendingenrolment.failures") == 1
    with again.app_context():
        assert KnownBrowser.get().last_used_at == made
        index = {i.name: i for i in db.get_indexes("knownbrowser")}["knownbrowser_last_used_at"]
        assert index.columns == ["last_used_at"]  # on the column, not on its name as a text
        assert re.search(r'\("?last_used_at"?\)$', index.sql.strip())
    clock.advance(30)
    after = type(actor)(again, again.test_client(), clock)
    after.password_step()
    assert after.code_step(after.code(secret)).headers["Location"] == "/settings"
    wizard = Wizard(after)
    assert wizard.open().status_code == 200 and wizard.start().status_code == 200
    assert wizard.code_step().status_code == 200
    wizard.submit_code("000000")  # a wrong code: counted on the set-up, in the added column
    with again.app_context():
        assert PendingEnrolment.get().failures == 1
    assert 'data-step="name"' in text(wizard.submit_code())
    wizard.complete("Second phone")
    with again.app_context():
        assert [d.name for d in Device.select().order_by(Device.id)] == ["Phone", "Second phone"]


def test_a_database_from_before_browsers_were_kept_forgotten_gets_the_columns_at_start(app, actor, tmp_path, clock,
                                                                                      capsys):
    """README "Upgrades": `knownbrowser.forgotten_at` (with its index, for the purge) and
    `supportrequest.known_browser` (2026-12-07) are added at start, empty: every browser there is known, and
    the requests already sent count against their address's shared limit. Then a browser forgotten by "Sign out
    everywhere else" is kept for the contact form, which counts on it. Both databases."""
    from webapp.models import KnownBrowser, SupportRequest

    from .conftest import Actor

    actor.user()
    assert actor.password_step().headers["Location"] == "/settings"  # this browser is known now
    assert actor.post_form("/support/contact", {"email": "alice@example.com", "message": "Sent before it."}
                           ).status_code == 302
    with app.app_context():
        db.execute_sql('DROP INDEX IF EXISTS "knownbrowser_forgotten_at_set"')
        db.execute_sql('ALTER TABLE "knownbrowser" DROP COLUMN forgotten_at')
        db.execute_sql('ALTER TABLE "supportrequest" DROP COLUMN known_browser')
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count("upgraded the database: added knownbrowser.forgotten_at") == 1
    assert said.count("upgraded the database: added supportrequest.known_browser") == 1
    with again.app_context():
        assert [(b.forgotten_at, b.user_id) for b in KnownBrowser.select()] == [(None, 1)]
        assert [r.known_browser for r in SupportRequest.select()] == [None]
        index = {i.name: i for i in db.get_indexes("knownbrowser")}["knownbrowser_forgotten_at_set"]
        assert index.columns == ["forgotten_at"] and "IS NOT NULL" in index.sql
    owner = Actor(again, again.test_client(), clock)  # the same browser: its known-browser cookie
    owner.client.set_cookie("twostep_known", actor.client.get_cookie("twostep_known").value)
    clock.advance(60)
    other = Actor(again, again.test_client(), clock)
    other.client.environ_base["REMOTE_ADDR"] = "198.51.100.8"
    assert other.password_step().headers["Location"] == "/settings"
    assert other.post_form("/settings/sessions/end-others", {}, form_url="/settings").status_code == 302
    stranger = Actor(again, again.test_client(), clock)
    for i in range(2):  # with the one before the upgrade, the address's limit
        assert stranger.post_form("/support/contact", {"email": "alice@example.com", "message": f"All good {i}."},
                                  environ_base={"REMOTE_ADDR": f"192.0.2.{i + 1}"}).status_code == 302
    assert stranger.post_form("/support/contact", {"email": "alice@example.com", "message": "All good again."},
                              environ_base={"REMOTE_ADDR": "192.0.2.9"}).status_code == 429
    r = owner.post_form("/support/contact", {"email": "alice@example.com", "message": "That was not me, help!"},
                        environ_base={"REMOTE_ADDR": "198.51.100.7"})
    assert r.status_code == 302
    with again.app_context():
        forgotten = KnownBrowser.get(KnownBrowser.forgotten_at.is_null(False))
        assert SupportRequest.get(SupportRequest.message == "That was not me, help!").known_browser == forgotten.id


def test_a_database_missing_a_column_no_upgrade_adds_stops_the_start_naming_it(app, tmp_path, clock):
    """README "Upgrades": a table without a column this version reads, which no upgrade step adds (a database
    of an unknown version, or changed by hand), stops the start with an error naming the column, instead of
    starting and answering 503 to every request that reads it. Every such column is named, whichever table
    and place it has (the last one of serversession here), and before any index on it is made."""
    from webapp.config import ConfigError

    from .conftest import make_test_app

    with app.app_context():
        db.execute_sql('DROP INDEX "auditevent_ip_created_at"')  # an index on it: the column cannot go before it
        db.execute_sql('ALTER TABLE "auditevent" DROP COLUMN ip')
        db.execute_sql('ALTER TABLE "serversession" DROP COLUMN user_agent')
    db.close()
    with pytest.raises(ConfigError, match=r"the database lacks serversession\.user_agent, auditevent\.ip: it was "
                                          r"made by a version this one cannot upgrade"):
        make_test_app(tmp_path, app.config["DATABASE_URL"], clock,
                      TOTP_ENCRYPTION_KEYS=app.config["TOTP_ENCRYPTION_KEYS"])
    # Found before the indexes are made: PostgreSQL refused the index on the missing column with a bare "column
    # "ip" does not exist", and SQLite made it on the text 'ip'.
    with app.app_context():
        assert "auditevent_ip_created_at" not in {index.name for index in db.get_indexes("auditevent")}


def _device_table_as_before(model=None):
    """Make the device table (or `model`'s) again as versions before 2026-12-07 made it on SQLite: without
    AUTOINCREMENT, so that a new row got the highest number left plus one."""
    from webapp.models import Device

    model = model or Device
    table = model._meta.table_name
    made = db.execute_sql("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    if "AUTOINCREMENT" not in made:
        return  # made so already (a version before the change)
    db.execute_sql("PRAGMA foreign_keys = OFF")
    with db.atomic():
        db.execute_sql(made.replace(f'"{table}"', f'"{table}_old"', 1).replace(" AUTOINCREMENT", ""))
        db.execute_sql(f'INSERT INTO "{table}_old" SELECT * FROM "{table}"')
        db.execute_sql(f'DROP TABLE "{table}"')
        db.execute_sql(f'ALTER TABLE "{table}_old" RENAME TO "{table}"')
        db.execute_sql("DELETE FROM sqlite_sequence WHERE name IN (?, ?)", (table, f"{table}_old"))  # never there
        for index in model._meta.fields_to_index():
            db.execute(model._schema._create_index(index))
    db.execute_sql("PRAGMA foreign_keys = ON")


@pytest.mark.skipif((os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="SQLite's AUTOINCREMENT: PostgreSQL's sequences never give a number twice")
def test_the_rebuild_reads_the_audit_log_before_the_writer_lock_and_what_came_since_under_it(
        app, actor, tmp_path, clock, secret, capsys, monkeypatch):
    """A diff review: the rebuild read every record naming a device (two million: 7 s) while holding SQLite's
    writer lock, and every other writer waited, past busy_timeout. It reads them first, then, under the lock,
    only the records written since, by their numbers: a device number recorded in between still counts."""
    import json

    from webapp import models
    from webapp.models import Device

    user = actor.user(secret=secret)
    with app.app_context():
        _device_table_as_before()
        AuditEvent.create(kind="device_removed", user=user.id, detail=json.dumps({"device_id": 40}))
    calls, real = [], models.USED_IDS[Device]

    def reading(after_id=None):
        found = real(after_id)
        calls.append((after_id, db.obj.in_transaction(), found))
        if after_id is None:  # another process records a higher number before this one takes the lock
            AuditEvent.create(kind="device_removed", user=user.id, detail=json.dumps({"device_id": 50}))
        return found

    monkeypatch.setitem(models.USED_IDS, Device, reading)
    ran, database_class = [], type(db.obj)  # the start makes a database of the same class
    execute_sql = database_class.execute_sql
    monkeypatch.setattr(database_class, "execute_sql", lambda self, sql, params=None: ran.append((sql, params)) or
                        execute_sql(self, sql, params))
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert "device numbers are never given twice; the next is 51" in said
    [(first, first_locked, (found, last)), (after, locked, (found_since, _))] = calls
    assert (first, first_locked, found) == (None, False, 40) and (after, locked, found_since) == (last, True, 50)
    [since_sql] = [(sql, params) for sql, params in ran if "json_extract" in sql and '".id > ?' in sql]
    with again.app_context():
        plan = " ".join(str(row) for row in db.execute_sql("EXPLAIN QUERY PLAN " + since_sql[0], since_sql[1]))
    assert "INTEGER PRIMARY KEY (rowid>?)" in plan and "SCAN" not in plan.replace("SCAN j", ""), plan


@pytest.mark.skipif((os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="SQLite's AUTOINCREMENT: PostgreSQL's sequences never give a number twice")
def test_contact_request_numbers_are_never_given_twice_after_the_upgrade(app, actor, tmp_path, clock, capsys):
    """README "Upgrades", security.md 43: the audit records and the Support page name contact requests by
    number. On SQLite a request erased (`users erase`) or purged while it was the newest gave its number to
    the next request, whose records then read as the first one's. At the next start the table is rebuilt with
    AUTOINCREMENT, its next number above every one the records name, and no number is given twice after."""
    import json

    from webapp.models import SupportRequest

    with app.app_context():
        kept = SupportRequest.create(email="carol@example.com", message="lost my phone, please help")
        _device_table_as_before(SupportRequest)
        for _ in range(2):
            gone = SupportRequest.create(email="eve@example.com", message="a request erased since then")
            assert gone.id == kept.id + 1  # what the old table did: the same number twice
            AuditEvent.create(kind="support_request", detail=json.dumps({"request": gone.id}))
            SupportRequest.delete().where(SupportRequest.id == gone.id).execute()
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count("rebuilding table supportrequest") == 1
    assert f"supportrequest numbers are never given twice; the next is {kept.id + 2}" in said
    with again.app_context():
        assert [(r.id, r.message) for r in SupportRequest.select()] == [(kept.id, "lost my phone, please help")]
        added = SupportRequest.create(email="dan@example.com", message="a new request after the upgrade")
        assert added.id == kept.id + 2
        SupportRequest.delete().where(SupportRequest.id == added.id).execute()
        assert SupportRequest.create(email="dan@example.com", message="and one more after it").id == added.id + 1


@pytest.mark.skipif((os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                    reason="SQLite's AUTOINCREMENT: PostgreSQL's sequences never give a number twice")
def test_a_device_table_from_before_numbers_were_kept_stops_giving_them_twice_at_start(app, actor, tmp_path, clock,
                                                                                  secret, capsys):
    """README "Upgrades", security.md 43: a device table made on SQLite before 2026-12-07 gave a new device
    the highest number left plus one, so the records of a removed device and of the one added after it could
    name the same number (a security review). At the next start the table is rebuilt with AUTOINCREMENT,
    once, saying so: every device keeps its number, its key and its indexes, and a table pointing at devices
    (none of the app's does; an operator's own) keeps its rows and its working foreign key. The next number
    is above every one the audit records name, also those of devices removed before the upgrade (by one
    removal, or by turning 2FA off), and from then on a number removed is not given again."""
    import json

    from peewee import IntegrityError

    from webapp.models import Device
    from webapp.totp import encrypt_secret

    user = actor.user(secret=secret)
    with app.app_context():
        backup = Device.create(user=user.id, name="Backup tablet", secret_enc=encrypt_secret(new_secret()))
        _device_table_as_before()
        db.execute_sql('CREATE TABLE "devicenote" (id INTEGER PRIMARY KEY, '
                       'device_id INTEGER REFERENCES "device" ("id") ON DELETE CASCADE, note TEXT)')
        db.execute_sql('INSERT INTO "devicenote" (device_id, note) VALUES (?, ?)', (backup.id, "in the safe"))
        # What the old table did: the highest number, given out and removed twice, and recorded each time.
        for name, records in (("temp", lambda n: {"device_removed": {"device": "temp", "device_id": n}}),
                              ("Old phone", lambda n: {"tfa_disabled": {"devices": ["Old phone"], "device_ids": [n]}})):
            gone = Device.create(user=user.id, name=name, secret_enc=backup.secret_enc)
            assert gone.id == backup.id + 1
            Device.delete().where(Device.id == gone.id).execute()
            for kind, detail in records(gone.id).items():
                AuditEvent.create(kind=kind, user=user.id, detail=json.dumps(detail))
        AuditEvent.create(kind="device_added", user=user.id, detail=json.dumps({"device": "x", "device_id": 1}))
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count("upgrading the database: rebuilding table device") == 1
    assert said.count(f"upgraded the database: device numbers are never given twice; the next is {backup.id + 2}") == 1
    with again.app_context():
        assert "AUTOINCREMENT" in db.execute_sql("SELECT sql FROM sqlite_master WHERE name = 'device'").fetchone()[0]
        assert [(d.id, d.name, d.secret_enc) for d in Device.select().order_by(Device.id)] == [
            (1, "Phone", Device.get_by_id(1).secret_enc), (backup.id, "Backup tablet", backup.secret_enc)]
        assert {i.name for i in db.get_indexes("device")} == {"device_user_id", "device_user_id_name"}
        with pytest.raises(IntegrityError):  # the unique index on (person, name) is there
            with db.atomic():
                Device.create(user=user.id, name="Backup tablet", secret_enc=backup.secret_enc)
        added = Device.create(user=user.id, name="temp", secret_enc=backup.secret_enc)
        assert added.id == backup.id + 2  # not the numbers the removed ones had
        Device.delete().where(Device.id == added.id).execute()
        assert Device.create(user=user.id, name="temp", secret_enc=backup.secret_enc).id == added.id + 1
        assert db.execute_sql('SELECT device_id, note FROM "devicenote"').fetchall() == [(backup.id, "in the safe")]
        assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
        Device.delete().where(Device.id == backup.id).execute()
        assert db.execute_sql('SELECT count(*) FROM "devicenote"').fetchone()[0] == 0  # its key still cascades
    after = type(actor)(again, again.test_client(), clock)
    assert after.sign_in(secret=secret).status_code == 302  # the key the device had
    third, said = _start_again(again, tmp_path, clock, capsys)
    assert "device" not in said


def test_addresses_stored_in_an_old_spelling_get_the_normal_one_at_start(app, actor, tmp_path, clock, capsys):
    """README "Upgrades", "One mailbox, one account": until 2026-12-05 an address was stored as typed, only
    trimmed and lower-cased. An upgrade review stored "zoë" with a decomposed accent and a full-width domain
    that way: after the upgrade nobody found those accounts in the usual spelling, and sign-up made a second
    account for each mailbox. At start they are stored in the normal spelling (each with an audit record), the
    usual spelling signs in and sign-up says the account exists; an address already normal is not touched.
    Left as they are, with a warning naming them (a security review): accounts of one mailbox (re-spelling one
    would hand the usual spelling, and its sign-ins, to the other), and an old punycode spelling that would
    read like another address once written in letters. Both databases."""
    from webapp.models import AuditEvent, User
    from webapp.security import hash_password

    from .conftest import make_test_app

    legacy = {"zoe\u0308@example.com": "zoë@example.com", "kim@ｅｘａｍｐｌｅ.org": "kim@example.org",
              "pat@xn--mnchen-3ya.de": "pat@münchen.de"}
    with app.app_context():
        password_hash = hash_password(PASSWORD)
        for stored in legacy:
            User.create(email=stored, password_hash=password_hash)
        User.create(email="anna@example.com", password_hash=password_hash, is_admin=True)
        User.create(email="lee@münchen.de", password_hash=password_hash)  # stored normal already
        # one mailbox twice: the old spelling and an account made later in the normal one
        twice = [User.create(email=e, password_hash=password_hash).id for e in ("ida@xn--mnchen-3ya.de",
                                                                               "ida@münchen.de")]
        # one mailbox in two old spellings: the one that signs in now (punycode) must stay the one that does
        both = [User.create(email=e, password_hash=hash_password(f"pw of {e}")).id
                for e in ("uma@ｍünchen.de", "uma@xn--mnchen-3ya.de")]
        spoof = User.create(email="alice@xn--pple-43d.com", password_hash=password_hash).id  # "аpple", Cyrillic а
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count("upgraded the database: stored 3 address(es) in their normal spelling") == 1
    assert (f"WARNING: accounts #{twice[1]} (ida@münchen.de), #{twice[0]} (ida@xn--mnchen-3ya.de) are one "
            "mailbox in several spellings, left as they are") in said
    assert (f"WARNING: accounts #{both[0]} (uma@ｍünchen.de), #{both[1]} (uma@xn--mnchen-3ya.de) are one mailbox "
            "in several spellings") in said
    assert f"WARNING: account #{spoof} keeps its old spelling alice@xn--pple-43d.com" in said
    with again.app_context():
        emails = {u.email for u in User.select()}
        assert set(legacy.values()) <= emails and not set(legacy) & emails
        assert {"lee@münchen.de", "ida@xn--mnchen-3ya.de", "ida@münchen.de", "uma@ｍünchen.de",
                "uma@xn--mnchen-3ya.de", "alice@xn--pple-43d.com"} <= emails
        records = {e.details["was"] for e in AuditEvent.select().where(AuditEvent.kind == "email_respelled")}
        assert records == set(legacy)
    for typed in ("Zoë@Example.com", "kim@example.org", "Pat@München.de"):
        browser = type(actor)(again, again.test_client(), clock)
        assert browser.password_step(email=typed).headers["Location"] == "/settings", typed
        r = type(actor)(again, again.test_client(), clock).post_form(
            "/signup", {"email": typed, "password": PASSWORD, "confirm": PASSWORD})
        assert "already exists" in r.get_data(as_text=True), typed
    # the operator can act on each of them by number, as the warning names them
    result = again.test_cli_runner().invoke(args=["users", "disable", f"#{both[0]}", "--reason", "duplicate"])
    assert result.exit_code == 0 and "uma@ｍünchen.de is disabled" in result.output, result.output
    with again.app_context():
        assert User.get_by_id(both[0]).disabled_at is not None and User.get_by_id(both[1]).disabled_at is None
    uma = type(actor)(again, again.test_client(), clock)  # the account the usual spelling reached before
    assert uma.password_step("uma@münchen.de", "pw of uma@xn--mnchen-3ya.de").headers["Location"] == "/settings"
    capsys.readouterr()
    make_test_app(tmp_path, app.config["DATABASE_URL"], clock, TOTP_ENCRYPTION_KEYS=app.config["TOTP_ENCRYPTION_KEYS"])
    assert "stored" not in capsys.readouterr().err  # once: the next start finds nothing to change


def test_an_index_built_at_start_on_a_database_in_use_is_announced(app, actor, tmp_path, clock, capsys):
    """README "Upgrades": on PostgreSQL the Support search's index (user_email_c) is built at start when it is
    missing, which takes a while on a big table: the console says so, as it does for columns (an upgrade
    review: the start waited in silence). A new, empty database gets it without a word."""
    if not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"):
        pytest.skip("PostgreSQL only: SQLite needs no index of its own for the search")
    from .conftest import make_test_app

    actor.user()
    with app.app_context():
        db.execute_sql("DROP INDEX user_email_c")
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert "upgrading the database: building index user_email_c" in said
    with again.app_context():
        assert db.execute_sql("SELECT to_regclass('user_email_c') IS NOT NULL").fetchone()[0]
    make_test_app(tmp_path, app.config["DATABASE_URL"], clock, TOTP_ENCRYPTION_KEYS=app.config["TOTP_ENCRYPTION_KEYS"])
    assert "building index" not in capsys.readouterr().err


def test_an_audit_log_from_before_its_ordered_indexes_gets_them_at_start(app, actor, tmp_path, clock, capsys):
    """README "Upgrades": the audit log had an index on kind, on user and on actor each, and every page that
    showed a person's or an event's newest records sorted all of them (ten million records: up to a second,
    a scale review). At start a database of that time gets the ordered indexes (by person only where there
    is one), saying so for each, and loses the three they start with; the next start does nothing. Both
    databases."""
    from webapp.models import OBSOLETE_INDEXES

    from .conftest import make_test_app

    ordered = {"auditevent_user_id_created_at": "user_id", "auditevent_user_id_kind_created_at": "user_id",
               "auditevent_actor_id_created_at": "actor_id", "auditevent_kind_created_at": None}
    actor.user()
    with app.app_context():
        for name in ordered:
            db.execute_sql(f'DROP INDEX "{name}"')
        for name, column in (("auditevent_kind", "kind"), ("auditevent_user_id", "user_id"),
                             ("auditevent_actor_id", "actor_id")):
            db.execute_sql(f'CREATE INDEX "{name}" ON "auditevent" ("{column}")')
        # 2026-12-07: one person's open contact requests, where the index on the person alone was.
        db.execute_sql('DROP INDEX "supportrequest_user_id_handled_at_created_at"')
        db.execute_sql('CREATE INDEX "supportrequest_user_id" ON "supportrequest" ("user_id")')
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count("upgrading the database: building index supportrequest_user_id_handled_at_created_at ") == 1
    for name in ordered:
        assert said.count(f"upgrading the database: building index {name} ") == 1, said
    made = ("auditevent_kind", "auditevent_user_id", "auditevent_actor_id", "supportrequest_user_id")
    assert set(made) <= set(OBSOLETE_INDEXES)
    for name in made:
        assert said.count(f"upgrading the database: dropping index {name},") == 1, said
    with again.app_context():
        indexes = {index.name: index for index in db.get_indexes("auditevent")}
        assert set(ordered) <= set(indexes) and not set(OBSOLETE_INDEXES) & set(indexes)
        assert {index.name for index in db.get_indexes("supportrequest")} >= {
            "supportrequest_user_id_handled_at_created_at"} and "supportrequest_user_id" not in {
            index.name for index in db.get_indexes("supportrequest")}
        for name, person in ordered.items():  # the records of nobody (most have no actor) are left out
            assert bool(re.search(rf'WHERE \(?"?{person}"? IS NOT NULL', indexes[name].sql)) == bool(person), \
                indexes[name].sql
    make_test_app(tmp_path, app.config["DATABASE_URL"], clock, TOTP_ENCRYPTION_KEYS=app.config["TOTP_ENCRYPTION_KEYS"])
    assert "index" not in capsys.readouterr().err


def test_the_index_for_the_purge_of_forgotten_browsers_holds_them_alone_and_the_purge_uses_it(
        app, actor, tmp_path, clock, capsys, monkeypatch):
    """The purge of forgotten browsers (`forgotten_at < ?`) had an index on forgotten_at for every known browser,
    most of which are not forgotten: an entry written for nothing at each sign-in from a new browser. It is
    partial now (forgotten_at IS NOT NULL), a database of before gets it at start in place of the full one
    (README "Upgrades"), and the purge's own statement still uses it: SQLite uses a partial index only when the
    query's WHERE implies the index's. Both databases."""
    from datetime import timedelta

    from webapp.clock import now
    from webapp.models import KnownBrowser, purge_expired

    from .conftest import make_test_app

    user = actor.user()
    with app.app_context():
        db.execute_sql('DROP INDEX "knownbrowser_forgotten_at_set"')
        db.execute_sql('CREATE INDEX "knownbrowser_forgotten_at" ON "knownbrowser" ("forgotten_at")')
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count("upgrading the database: building index knownbrowser_forgotten_at_set ") == 1, said
    assert said.count("upgrading the database: dropping index knownbrowser_forgotten_at,") == 1, said
    statements = []
    with again.app_context():
        indexes = {index.name: index for index in db.get_indexes("knownbrowser")}
        assert "knownbrowser_forgotten_at" not in indexes
        assert re.search(r'WHERE \(?"?forgotten_at"? IS NOT NULL\)?$', indexes["knownbrowser_forgotten_at_set"].sql)
        long_ago = now() - app.config["FORGOTTEN_BROWSER_TTL"] - timedelta(days=1)
        KnownBrowser.create(id="f" * 64, user=user.id, forgotten_at=long_ago, last_used_at=now())
        KnownBrowser.create(id="k" * 64, user=user.id, last_used_at=now())
        execute_sql = db.obj.execute_sql
        monkeypatch.setattr(db.obj, "execute_sql", lambda sql, params=None: statements.append((sql, params))
                            or execute_sql(sql, params))
        assert purge_expired(again.config, now())[3] == 1
        monkeypatch.undo()
        assert [b.id for b in KnownBrowser.select()] == ["k" * 64]
        [(sql, params)] = [(q, p) for q, p in statements if "forgotten_at" in q]
        if is_sqlite():
            plan = " ".join(str(row) for row in db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall())
        else:  # near-empty, the table is rightly read whole: forbidden, to see that the index can serve
            with db.atomic():
                db.execute_sql("SET LOCAL enable_seqscan = off")
                plan = " ".join(str(row) for row in db.execute_sql("EXPLAIN " + sql, params).fetchall())
        assert "knownbrowser_forgotten_at_set" in plan, plan
    make_test_app(tmp_path, app.config["DATABASE_URL"], clock, TOTP_ENCRYPTION_KEYS=app.config["TOTP_ENCRYPTION_KEYS"])
    assert "index" not in capsys.readouterr().err


def test_an_audit_log_from_before_the_ip_filter_gets_its_index_at_start(app, actor, tmp_path, clock, capsys):
    """README "Upgrades": the audit log's IP address filter reads the records of one address newest first on an
    index by address and time; a database from before it gets the index at the next start, saying so once (a
    big log takes a while), on the records that have an address only; the start after that does nothing.
    Both databases."""
    actor.user()
    with app.app_context():
        AuditEvent.create(kind="signout", ip="203.0.113.7")
        db.execute_sql('DROP INDEX "auditevent_ip_created_at"')
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count("upgrading the database: building index auditevent_ip_created_at ") == 1, said
    with again.app_context():
        index = {index.name: index for index in db.get_indexes("auditevent")}["auditevent_ip_created_at"]
        assert index.columns == ["ip", "created_at"] and re.search(r'WHERE \(?"?ip"? IS NOT NULL', index.sql), \
            index.sql
    assert "index" not in _start_again(again, tmp_path, clock, capsys)[1]


# Starting the app on a PostgreSQL database in use, as a host of a rolling restart does while the others serve.
_HOST_START = ("import webapp\n"
               "webapp.create_app({'DATABASE_URL': %r, 'SECRET_KEY': 'k' * 40, 'SETUP_CODE': 'x',\n"
               "                   'TOTP_ENCRYPTION_KEYS': %r, 'INSTANCE_PATH': %r})\n")


def _host_starting(app, tmp_path, name, **env):
    """Another host's start on the app's database, in a process of its own (stderr is its console)."""
    import subprocess
    import sys

    from cryptography.fernet import Fernet

    code = _HOST_START % (app.config["DATABASE_URL"], Fernet.generate_key().decode(), str(tmp_path / name))
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})


def _waiting_backend(watch, host, like, timeout=60):
    """The backend whose statement matches `like` and that waits for a lock another transaction holds (a
    host's start at an index of a table in use), once there is one; fails if `host` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = watch.execute("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                              (like,)).fetchone()
        if found:
            return found[0]
        assert host.poll() is None, host.communicate()[1][-600:]
        time.sleep(0.05)
    raise AssertionError(f"no statement like {like} waited")


def _audit_index_valid(watch, name):
    """None when the audit log has no index `name`, else whether it is valid (INVALID: left by a build cut short)."""
    found = watch.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)).fetchone()
    return None if found is None else found[0]


@pytest.mark.parametrize("change", ["building", "dropping"])
def test_sign_ins_go_on_while_a_starting_host_changes_the_audit_logs_indexes(app, actor, secret, tmp_path, change):
    """README "Upgrades": during a rolling restart onto a version with a new index on the audit log, the starting
    host built it with CREATE INDEX, which holds off every write to the table until it is done (2 to 4 s with three
    million records, 18 s with ten million: bench/index_build.py): every sign-in on the hosts still serving waited,
    or failed at the lock_timeout. Dropping an index the new one replaces (DROP INDEX) waited for every transaction
    on the table with each request queued behind it. Both are done CONCURRENTLY now: here a sign-in on another host
    is under way when the start reaches the index, which holds the build (or the drop) open, and a second sign-in
    goes through meanwhile. A third host started then waits for its turn and starts too (waiting, it held a snapshot
    the build waits for, and PostgreSQL ended its start: "deadlock detected")."""
    _postgresql_only()
    import threading

    import psycopg

    actor.user(secret=secret)
    name = "auditevent_ip_created_at" if change == "building" else "auditevent_kind"
    with app.app_context():
        if change == "building":
            db.execute_sql(f'DROP INDEX "{name}"')  # a database from before 2026-12-07
        else:
            db.execute_sql(f'CREATE INDEX "{name}" ON "auditevent" ("kind")')  # one from before 2026-12-06
    db.close()
    watch = psycopg.connect(app.config["DATABASE_URL"], autocommit=True)
    under_way = psycopg.connect(app.config["DATABASE_URL"])  # a sign-in on a host still serving, not committed yet
    under_way.execute("INSERT INTO auditevent (created_at, kind, detail) VALUES (now(), 'signin', '{}')")
    hosts, signed_in = [_host_starting(app, tmp_path, "host1")], {}
    signing_in = threading.Thread(target=lambda: signed_in.setdefault("response", actor.sign_in(secret=secret)),
                                  daemon=True)
    try:
        builder = _waiting_backend(watch, hosts[0], f"%INDEX%{name}%")
        hosts.append(_host_starting(app, tmp_path, "host2"))
        deadline = time.monotonic() + 60
        while not watch.execute("SELECT 1 FROM pg_stat_activity WHERE query LIKE '%%advisory_lock(%%' "
                                "AND pid NOT IN (%s, pg_backend_pid())", (builder,)).fetchone():
            # the second host is waiting for its turn
            assert hosts[1].poll() is None and time.monotonic() < deadline, hosts[1].communicate()[1][-600:]
            time.sleep(0.05)
        signing_in.start()
        signing_in.join(5)
        assert not signing_in.is_alive(), f"the sign-in waited for the start {change} index {name}"
        assert hosts[0].poll() is None and _waiting_backend(watch, hosts[0], f"%INDEX%{name}%") == builder
        response = signed_in["response"]
        assert response.status_code == 302 and response.headers["Location"] == "/settings"
        assert watch.execute("SELECT count(*) FROM auditevent WHERE kind = 'signin' AND user_id IS NOT NULL"
                             ).fetchone()[0] == 1  # its record is stored
    finally:
        under_way.commit()
        under_way.close()
        if signing_in.ident:
            signing_in.join(30)
        said = [host.communicate(timeout=120)[1] for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0], said
    verb = "building index" if change == "building" else "dropping index"
    assert "".join(said).count(f"upgrading the database: {verb} {name}") == 1, said
    assert _audit_index_valid(watch, name) is (True if change == "building" else None)
    watch.close()


@pytest.mark.parametrize("cut_short", ["lock timeout", "host killed"])
def test_an_index_build_cut_short_is_built_again_at_the_next_start(app, actor, tmp_path, clock, capsys, cut_short):
    """README "Upgrades": CREATE INDEX CONCURRENTLY that stops half-way (the start gave up at the lock_timeout
    behind a transaction left open, or the host was killed) leaves the index there but INVALID: no query uses
    it, and every insert still writes it. The next start drops it and builds it again, saying so, and the one
    after that finds nothing to do."""
    _postgresql_only()
    import psycopg

    actor.user()
    name = "auditevent_ip_created_at"
    with app.app_context():
        db.execute_sql(f'DROP INDEX "{name}"')
    db.close()
    watch = psycopg.connect(app.config["DATABASE_URL"], autocommit=True)
    under_way = psycopg.connect(app.config["DATABASE_URL"])  # a transaction left open on the audit log
    under_way.execute("INSERT INTO auditevent (created_at, kind, detail) VALUES (now(), 'signin', '{}')")
    try:
        if cut_short == "lock timeout":
            host = _host_starting(app, tmp_path, "host1", PGOPTIONS="-c lock_timeout=1s")
            said = host.communicate(timeout=60)[1]
            assert host.returncode == 1 and "canceling statement due to lock timeout" in said, said
            assert f"upgrading the database: building index {name} " in said
        else:
            host = _host_starting(app, tmp_path, "host1")
            builder = _waiting_backend(watch, host, f"%INDEX%{name}%")
            host.kill()
            host.communicate()
            watch.execute("SELECT pg_terminate_backend(%s)", (builder,))  # as the server does once it notices
            while watch.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (builder,)).fetchone():
                time.sleep(0.05)
    finally:
        under_way.commit()
        under_way.close()
    assert _audit_index_valid(watch, name) is False
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert said.count(f"upgrading the database: rebuilding index {name}, which an interrupted start left "
                      "unfinished") == 1, said
    assert " building index" not in said
    assert _audit_index_valid(watch, name) is True
    watch.close()
    assert "index" not in _start_again(again, tmp_path, clock, capsys)[1]


# The tables whose ids are 64-bit on PostgreSQL (models.BaseModel says why), and where an id passes 32 bits.
_WIDE_ID_TABLES = ("device", "pendingenrolment", "supportrequest", "networkcounter", "auditevent")
_PAST_32_BITS = 2 ** 31 - 1


def _postgresql_only():
    if not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"):
        pytest.skip("PostgreSQL only: SQLite's ids are INTEGER PRIMARY KEY, 64 bits already")


def _id_types():
    """{table: (its id column's type, its sequence's type)} for _WIDE_ID_TABLES, read from PostgreSQL."""
    return {table: tuple(db.execute_sql(
        "SELECT format_type(a.atttypid, NULL), format_type(s.seqtypid, NULL) FROM pg_attribute a, pg_sequence s "
        "WHERE a.attrelid = %s::regclass AND a.attname = 'id' AND s.seqrelid = pg_get_serial_sequence(%s, 'id')"
        "::regclass", (table, table)).fetchone()) for table in _WIDE_ID_TABLES}


def _as_before_64_bit_ids(app):
    """Turn the app's PostgreSQL tables into what a version before 2026-12-07 made: `serial` ids (an integer
    column, a sequence AS integer), each sequence a few numbers short of its end."""
    with app.app_context():
        for table in _WIDE_ID_TABLES:
            db.execute_sql(f'ALTER TABLE "{table}" ALTER COLUMN id TYPE integer')
            db.execute_sql(f"ALTER SEQUENCE {table}_id_seq AS integer")
            db.execute_sql(f"SELECT setval('{table}_id_seq', {_PAST_32_BITS - 3})")
        assert set(_id_types().values()) == {("integer", "integer")}
    db.close()


def _wrong_passwords_past_a_lock(actor, clock, rounds):
    """`rounds` times: a wrong password after the account's wait (200), then one during the wait it set (429,
    counted on the network). A 500, or an error the test client passes on, fails the test."""
    from .test_auth import user_row
    from .test_support import utc

    for _ in range(rounds):
        locked_until = user_row(actor.app).password_locked_until
        if locked_until is not None:
            clock.advance(max(0.0, (locked_until - utc(clock.t)).total_seconds()))
        assert actor.password_step(password="guess").status_code == 200
        assert actor.password_step(password="guess").status_code == 429


def test_wrong_passwords_are_counted_past_two_billion_counted_events(app, actor, clock):
    """security.md 18: on PostgreSQL the per-network counter's upsert takes a number of its id's sequence at
    every event it counts (it updates its one row), and the audit log grows without end. With 32-bit ids
    (`serial`), once a sequence reached 2**31 - 1 every wrong password answered 500 and, worse, its count on
    the account rolled back with it: the throttle stopped counting. Their ids are 64-bit (bigserial)."""
    _postgresql_only()
    from webapp.models import NetworkCounter

    from .test_auth import user_row

    actor.user()
    with app.app_context():
        for table in ("networkcounter", "auditevent"):
            db.execute_sql(f"SELECT setval('{table}_id_seq', {_PAST_32_BITS - 1})")
    _wrong_passwords_past_a_lock(actor, clock, 3)
    assert user_row(app).password_failures == 3  # each wrong password counted on the account
    with app.app_context():
        assert NetworkCounter.get().hits == 6  # and every attempt on the network
        assert AuditEvent.select().where(AuditEvent.kind == "password_rejected").count() == 3
        assert AuditEvent.select(fn.MAX(AuditEvent.id)).scalar() > _PAST_32_BITS


def test_a_postgresql_database_with_32_bit_ids_gets_64_bit_ones_at_start(app, actor, tmp_path, clock, capsys):
    """README "Upgrades", security.md 18: a database made before 2026-12-07 has 32-bit ids (`serial`) where
    anyone can move a sequence on (the per-network counter, the audit log, contact requests, wizards, devices).
    At start they become 64-bit, columns and sequences, each announced before the table is rewritten; the
    rows stay, and the throttle then counts past 2**31."""
    _postgresql_only()
    from .test_auth import user_row

    actor.user()
    _wrong_passwords_past_a_lock(actor, clock, 1)
    with app.app_context():
        events = AuditEvent.select().count()
    _as_before_64_bit_ids(app)
    again, said = _start_again(app, tmp_path, clock, capsys)
    for table in _WIDE_ID_TABLES:
        assert said.count(f"upgrading the database: {table}.id to 64 bits, which rewrites {table} (") == 1, said
    assert "rewrites auditevent (" in said and "under an exclusive lock" in said
    with again.app_context():
        assert set(_id_types().values()) == {("bigint", "bigint")}
        assert AuditEvent.select().count() == events  # the rows are kept
    after = type(actor)(again, again.test_client(), clock)
    _wrong_passwords_past_a_lock(after, clock, 3)  # six events each for the counter, three records
    assert user_row(again).password_failures == 4
    with again.app_context():
        assert AuditEvent.select(fn.MAX(AuditEvent.id)).scalar() > _PAST_32_BITS


def test_hosts_starting_together_widen_the_ids_once_and_the_next_start_changes_nothing(app, actor, tmp_path, clock,
                                                                                       capsys):
    """README "Upgrades": two hosts started at the same moment on a database with 32-bit ids both start, and
    one of them widens each table (they take turns on the schema lock, and the second finds nothing left to
    do); a start after that says nothing and rewrites no table (an ALTER TYPE would give it a new file)."""
    _postgresql_only()
    import subprocess
    import sys

    from cryptography.fernet import Fernet

    actor.user()
    _as_before_64_bit_ids(app)
    start_at = time.time() + 4  # after both processes have imported the app (the slow part)
    script = ("import time, webapp\n"
              f"time.sleep(max(0.0, {start_at} - time.time()))\n"
              "webapp.create_app({'DATABASE_URL': %r, 'SECRET_KEY': 'k' * 40, 'SETUP_CODE': 'x',\n"
              "                   'TOTP_ENCRYPTION_KEYS': %r, 'INSTANCE_PATH': %r})\n")
    codes = [script % (app.config["DATABASE_URL"], Fernet.generate_key().decode(), str(tmp_path / f"host{n}"))
             for n in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for code in codes]
    said = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], said
    for table in _WIDE_ID_TABLES:
        assert "".join(said).count(f"upgrading the database: {table}.id to 64 bits") == 1, said
    with app.app_context():
        assert set(_id_types().values()) == {("bigint", "bigint")}
        files = {t: db.execute_sql("SELECT pg_relation_filenode(%s::regclass)", (t,)).fetchone()[0]
                 for t in _WIDE_ID_TABLES}
    again, said = _start_again(app, tmp_path, clock, capsys)
    assert "upgrading the database" not in said
    with again.app_context():
        assert {t: db.execute_sql("SELECT pg_relation_filenode(%s::regclass)", (t,)).fetchone()[0]
                for t in _WIDE_ID_TABLES} == files


def test_a_process_that_builds_many_apps_keeps_one_writer_queue_file_open(tmp_path, clock):
    """An infrastructure review: each app built in one process (the test suite builds one per test, the
    benchmark several) left the writer queue file of its SQLite database open, towards the limit of open
    files, after its folder was gone. Building the next app closes the previous database's."""
    import webapp.db as db_module
    from webapp.models import User

    from .conftest import make_test_app

    for n in range(3):
        made = make_test_app(tmp_path / f"app{n}", f"sqlite:///{tmp_path / f'db{n}.sqlite'}", clock)
        with made.app_context(), db_module.write_transaction():
            User.create(email=f"p{n}@example.com", password_hash="x")
        mine = [path for pid, path in db_module._QUEUE_FILES if pid == os.getpid()]
        assert mine == [str(tmp_path / f"db{n}.sqlite")], mine


@pytest.mark.parametrize("signed_in", [False, True])
def test_a_form_from_a_host_with_another_secret_key_is_refused_and_the_log_says_why(app, actor, secret, caplog,
                                                                                   signed_in):
    """Two hosts behind one load balancer with different SECRET_KEYs by mistake: a form shown by one and sent
    to the other is refused ("Form expired") whichever way round, and the log said only "The CSRF token is
    invalid.", as for a forged token. It names SECRET_KEY: the token is well formed, and (for a session with a
    row) it is this very session's, so most likely another key signed it."""
    actor.user(secret=secret)
    if signed_in:
        actor.sign_in(secret=secret)
    url = "/settings" if signed_in else "/login"
    token = actor.csrf(url)
    app.config["SECRET_KEY"] = "another-hosts-secret-key-" + "y" * 32  # the load balancer picks the other host
    target = "/logout" if signed_in else "/login"
    r = actor.client.post(target, data={"csrf_token": token, "email": "alice@example.com", "password": "x" * 10})
    assert r.status_code == 400 and "Form expired" in r.get_data(as_text=True)
    [line] = [rec.getMessage() for rec in caplog.records if "csrf refused" in rec.getMessage()]
    assert "SECRET_KEY" in line and "every host" in line
    if signed_in:
        assert "made for this session" in line


def test_a_made_up_csrf_token_does_not_blame_the_secret_key(app, actor, caplog):
    actor.user()
    actor.csrf("/login")
    r = actor.client.post("/login", data={"csrf_token": "not-a-token", "email": "a@example.com", "password": "x" * 10})
    assert r.status_code == 400
    [line] = [rec.getMessage() for rec in caplog.records if "csrf refused" in rec.getMessage()]
    assert line == "csrf refused: POST /login (The CSRF token is invalid.)"


def test_a_compressed_csrf_token_is_not_inflated_for_the_log_line(app, actor, caplog, monkeypatch):
    """Flask-WTF's tokens are never compressed, and itsdangerous inflates a compressed payload before any
    signature is checked: a 60 kB form field of zlib made the log helper build a 45 MB string (0.35 s and
    90 MB for one anonymous POST). Such a token is simply invalid, and the line does not blame SECRET_KEY."""
    import base64
    import zlib

    import itsdangerous.url_safe

    inflated = []
    real = itsdangerous.url_safe.zlib.decompress
    monkeypatch.setattr(itsdangerous.url_safe.zlib, "decompress", lambda data: inflated.append(1) or real(data))
    bomb = zlib.compress(b'"' + b"a" * 5_000_000 + b'"', 9)
    token = "." + base64.urlsafe_b64encode(bomb).decode().rstrip("=") + ".AAAAAA.c2lnbmF0dXJl"
    actor.user()
    actor.csrf("/login")
    r = actor.client.post("/login", data={"csrf_token": token, "email": "a@example.com", "password": "x" * 10})
    assert r.status_code == 400 and not inflated
    [line] = [rec.getMessage() for rec in caplog.records if "csrf refused" in rec.getMessage()]
    assert line == "csrf refused: POST /login (The CSRF token is invalid.)"


@pytest.mark.parametrize("hops, forwarded, seen", [(0, "203.0.113.7", "PROXY_HOPS is 0"),
                                                   (2, "203.0.113.7", "fewer than PROXY_HOPS=2"),
                                                   (1, None, "carries no X-Forwarded-For, but PROXY_HOPS=1")])
def test_a_proxy_hops_that_does_not_match_the_proxies_is_said_once_in_the_log(tmp_path, clock, caplog, hops,
                                                                             forwarded, seen):
    """A host whose PROXY_HOPS differs from the others' (forgotten, or one too many) sees every visitor as the
    proxy: one client for the per-network limits, so a stranger's wrong passwords refuse everyone's new
    browsers there ("Too many failed sign-ins from your network"), and nothing in its log said why. So does a
    proxy that adds no X-Forwarded-For at all (None here), which was not said either (an operator's review)."""
    from .conftest import make_test_app

    app = make_test_app(tmp_path, f"sqlite:///{tmp_path / 'test.db'}", clock, PROXY_HOPS=hops)
    client = app.test_client()
    for _ in range(2):
        client.get("/login", headers={"X-Forwarded-For": forwarded} if forwarded else {},
                   environ_base={"REMOTE_ADDR": "127.0.0.1"})
    lines = [rec.getMessage() for rec in caplog.records if "X-Forwarded-For" in rec.getMessage()]
    assert len(lines) == 1 and seen in lines[0] and "127.0.0.1" in lines[0]


def test_a_request_past_the_proxy_does_not_hide_a_short_x_forwarded_for_and_probes_are_not_warned_about(
        tmp_path, clock, caplog):
    """The warnings about a missing and a short X-Forwarded-For are separate: an operator's request on the host
    past the proxy (no header) must not keep the log from saying, later, that the real traffic carries one
    address fewer than PROXY_HOPS (a review). A load balancer's probe of /healthz through the proxy carries
    one fewer, or none: not warned about."""
    from .conftest import make_test_app

    app = make_test_app(tmp_path, f"sqlite:///{tmp_path / 'test.db'}", clock, PROXY_HOPS=2)
    client = app.test_client()
    lines = lambda: [rec.getMessage() for rec in caplog.records if "X-Forwarded-For" in rec.getMessage()]
    for probe in ({}, {"X-Forwarded-For": "10.0.0.9"}):
        assert client.get("/healthz", headers=probe, environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 200
    assert lines() == []
    client.get("/login", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    client.get("/login", headers={"X-Forwarded-For": "203.0.113.7"}, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    client.get("/login", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert len(lines()) == 2 and "carries no X-Forwarded-For" in lines()[0] and "fewer than PROXY_HOPS=2" in lines()[1]


def test_the_right_proxy_hops_logs_nothing_about_x_forwarded_for(tmp_path, clock, caplog):
    from .conftest import make_test_app

    app = make_test_app(tmp_path, f"sqlite:///{tmp_path / 'test.db'}", clock, PROXY_HOPS=1)
    app.test_client().get("/login", headers={"X-Forwarded-For": "203.0.113.7"}, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    r = app.test_client().get("/healthz")  # the load balancer's probe, without the header
    assert r.status_code == 200
    assert not [rec for rec in caplog.records if "X-Forwarded-For" in rec.getMessage()]


# ------------------------------------------------------------------ backup (README "Backups")

ON_POSTGRES = (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres")

def _backup(app, *args):
    return app.test_cli_runner().invoke(args=["backup", *map(str, args)])


@pytest.mark.skipif(ON_POSTGRES, reason="the SQLite backup; PostgreSQL is backed up with pg_dump")
def test_backup_copies_the_live_database_privately_and_checked(app, actor, tmp_path):
    """A copy taken while the app runs holds what was just written (still in the -wal file, which `cp` would
    miss), is private to the operator (mode 600), passes SQLite's quick check and leaves no partial file."""
    actor.user(email="alice@example.com")
    folder = tmp_path / "backups"
    folder.mkdir()
    result = _backup(app, folder / "twostep.db")
    assert result.exit_code == 0, result.output
    assert "quick check ok" in result.output and "keys are not in it" in result.output
    assert os.listdir(folder) == ["twostep.db"]
    assert os.stat(folder / "twostep.db").st_mode & 0o777 == 0o600
    copy = sqlite3.connect(folder / "twostep.db")
    try:
        assert copy.execute('SELECT email FROM "user"').fetchall() == [("alice@example.com",)]
    finally:
        copy.close()


@pytest.mark.skipif(ON_POSTGRES, reason="the SQLite backup; PostgreSQL is backed up with pg_dump")
@pytest.mark.parametrize("where", ["missing folder", "existing file", "the database", "its wal"])
def test_backup_refuses_with_one_line_and_writes_nothing(app, actor, tmp_path, where):
    """A path that cannot be a new backup is one `Error:` line (not a traceback) and nothing is written: a
    folder that does not exist, a file that exists (an earlier backup is never replaced), or the database
    itself (a copy renamed over the live file would destroy it)."""
    actor.user(email="alice@example.com")
    with app.app_context():
        database = db.obj.database
    existing = tmp_path / "old.db"
    existing.write_bytes(b"an earlier backup")
    target = {"missing folder": tmp_path / "nowhere" / "twostep.db", "existing file": existing,
              "the database": database, "its wal": database + "-wal"}[where]
    before = sorted(os.listdir(tmp_path))
    result = _backup(app, target)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1 and "Traceback" not in result.output
    # Each for its own reason: the database and its -wal exist too, and "already exists" alone let the check
    # that PATH is not the database go unseen (removed, this test still passed).
    assert {"missing folder": "there is no folder", "existing file": "already exists",
            "the database": "is the database itself", "its wal": "is the database itself"}[where] in result.output
    assert sorted(os.listdir(tmp_path)) == before and existing.read_bytes() == b"an earlier backup"
    with app.app_context():
        assert [u.email for u in User.select()] == ["alice@example.com"]


@pytest.mark.skipif(not ON_POSTGRES, reason="PostgreSQL only")
def test_backup_on_postgresql_points_to_pg_dump(app, tmp_path):
    folder = tmp_path / "backups"
    folder.mkdir()
    result = _backup(app, folder / "twostep.db")
    assert result.exit_code == 1 and "pg_dump" in result.output and os.listdir(folder) == []


@pytest.mark.skipif(ON_POSTGRES, reason="the SQLite backup; PostgreSQL is backed up with pg_dump")
def test_backup_of_a_damaged_database_says_so_and_keeps_nothing(app, tmp_path, monkeypatch):
    """A database file with a damaged page (a disk fault, an old -wal kept at a restore) gives no backup that
    looks good: one `Error:` line and no file."""
    damaged = tmp_path / "damaged.db"
    scratch = sqlite3.connect(damaged)
    scratch.execute("CREATE TABLE t (x)")
    scratch.executemany("INSERT INTO t VALUES (?)", [("x" * 100,)] * 2000)
    scratch.commit()
    scratch.close()
    data = bytearray(damaged.read_bytes())
    data[3 * 4096:3 * 4096 + 200] = b"\xab" * 200  # inside the table's pages
    damaged.write_bytes(bytes(data))
    with app.app_context():
        monkeypatch.setattr(db.obj, "database", str(damaged))
    folder = tmp_path / "backups"
    folder.mkdir()
    result = _backup(app, folder / "twostep.db")
    assert result.exit_code == 1 and "malformed" in result.output and "nothing was kept" in result.output
    assert os.listdir(folder) == []


@pytest.mark.skipif(ON_POSTGRES, reason="the SQLite backup; PostgreSQL is backed up with pg_dump")
def test_backup_of_a_database_without_accounts_says_so_and_keeps_nothing(app, tmp_path):
    """A mistyped DATABASE_URL names a file that is not there, and the command's own start (the app's, which
    makes its tables) creates it, new and empty: opening it read-only then finds it, and the backup said
    "quick check ok" every night for a copy of nothing. A copy without any account is refused."""
    folder = tmp_path / "backups"
    folder.mkdir()
    result = _backup(app, folder / "twostep.db")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "no account" in result.output and "DATABASE_URL" in result.output and "nothing was kept" in result.output
    assert os.listdir(folder) == []


@pytest.mark.skipif(ON_POSTGRES, reason="the SQLite backup; PostgreSQL is backed up with pg_dump")
def test_a_backup_is_one_file_that_reads_without_writing_beside_it(app, actor, tmp_path):
    """SQLite's backup copies the live database's header, WAL mode included: reading the copy made a -wal and a
    -shm file beside it, and a reader who may not write in the backup folder (a restore drill, another
    account, read-only media) got "attempt to write a readonly database". The copy is in rollback-journal
    mode (the app puts a restored database back in WAL mode at its start)."""
    actor.user(email="alice@example.com")
    folder = tmp_path / "backups"
    folder.mkdir()
    assert _backup(app, folder / "twostep.db").exit_code == 0
    reader = sqlite3.connect(f"file:{folder / 'twostep.db'}?mode=ro", uri=True)
    try:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert reader.execute('SELECT email FROM "user"').fetchall() == [("alice@example.com",)]
        assert os.listdir(folder) == ["twostep.db"]
    finally:
        reader.close()


@pytest.mark.skipif(ON_POSTGRES, reason="the SQLite backup; PostgreSQL is backed up with pg_dump")
def test_backup_does_not_write_through_a_symlink_at_its_path(app, actor, tmp_path):
    """PATH must not exist yet, a symlink included (os.path.lexists): but the argument was resolved first
    (click's resolve_path), so a symlink to a missing file sent the copy to wherever it pointed, in a folder
    the operator never named. It is refused like any other existing file."""
    actor.user(email="alice@example.com")
    folder, elsewhere = tmp_path / "backups", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "twostep.db").symlink_to(elsewhere / "copy.db")
    result = _backup(app, folder / "twostep.db")
    assert result.exit_code == 1 and "already exists" in result.output
    assert os.listdir(elsewhere) == [] and os.listdir(folder) == ["twostep.db"]


@pytest.mark.skipif(ON_POSTGRES, reason="the SQLite backup; PostgreSQL is backed up with pg_dump")
def test_backup_never_replaces_a_file_made_while_it_ran(app, actor, tmp_path, monkeypatch):
    """A file that takes the name PATH after the backup's last look (another backup started by cron and by
    hand at once) is kept, and the copy is not: the name is taken with a hard link, which fails if it exists,
    instead of a look and then a rename, which replaced the file made in between."""
    actor.user(email="alice@example.com")
    folder = tmp_path / "backups"
    folder.mkdir()
    target = folder / "twostep.db"
    real_copy = cli._copy_checked

    def copy_then_another_backup_writes(source, partial):
        real_copy(source, partial)
        target.write_bytes(b"the other backup")  # after every look the command takes before the copy

    monkeypatch.setattr(cli, "_copy_checked", copy_then_another_backup_writes)
    monkeypatch.setattr(cli.os.path, "lexists", lambda _p: False)  # and after any look it takes once copied
    result = _backup(app, target)
    assert result.exit_code == 1 and "appeared while the backup ran" in result.output
    assert target.read_bytes() == b"the other backup" and os.listdir(folder) == ["twostep.db"]


@pytest.mark.skipif(ON_POSTGRES, reason="the SQLite backup; PostgreSQL is backed up with pg_dump")
@pytest.mark.parametrize("error", ["no hard links", "disk full"])
def test_backup_where_the_name_cannot_be_linked(app, actor, tmp_path, monkeypatch, error):
    """On a file system without hard links (FAT, some network ones: EPERM or ENOTSUP) the copy still takes its
    name, by a look and a rename; any other failure of the link is one `Error:` line and no file kept."""
    import errno

    actor.user(email="alice@example.com")
    folder = tmp_path / "backups"
    folder.mkdir()

    def refuse(_src, _dst):
        raise OSError(errno.EPERM if error == "no hard links" else errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cli.os, "link", refuse)
    result = _backup(app, folder / "twostep.db")
    if error == "no hard links":
        assert result.exit_code == 0 and "quick check ok" in result.output
        assert os.listdir(folder) == ["twostep.db"] and os.stat(folder / "twostep.db").st_mode & 0o777 == 0o600
    else:
        assert result.exit_code == 1 and result.output.startswith("Error: cannot name the copy")
        assert "nothing was kept" in result.output and os.listdir(folder) == []


def test_prepared_reads_give_the_values_peewee_gives(app, actor, secret):
    """db.Prepared builds model instances itself (db._build) and keeps an integer or a string as the driver
    returned it where peewee's own conversion would give it back unchanged (db._native_type): every table's
    rows, alone and joined with their person, read that way and through peewee, hold the same values of the
    same types (None, datetimes and booleans included). On PostgreSQL too (make test-postgres)."""
    from webapp.db import Prepared
    from webapp.models import ALL_MODELS

    actor.user("admin@example.com", admin=True, secret=new_secret())
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.client.get("/settings")
    Actor(app, app.test_client(), actor.clock).password_step("admin@example.com")  # a sign-in under way elsewhere
    with app.app_context():
        compared = 0
        for model in ALL_MODELS:
            key = model._meta.primary_key
            joined = "user" in model._meta.fields and model is not User
            peewee_query = (model.select(model, User).join(User) if joined else model.select()).order_by(key)
            ours = Prepared(lambda q=peewee_query: q).rows()
            theirs = list(peewee_query)
            assert len(ours) == len(theirs)
            for mine, peewees in zip(ours, theirs):
                assert mine.__data__ == peewees.__data__, model.__name__
                assert [type(v) for v in mine.__data__.values()] == [type(v) for v in peewees.__data__.values()]
                if joined:
                    assert mine.user.__data__ == peewees.user.__data__
                compared += 1
        assert compared >= 10


def test_the_clock_gives_the_datetime_that_fromtimestamp_gives(app):
    """clock.now adds the seconds to the epoch (half the cost of datetime.fromtimestamp with UTC and dropping
    the zone after it); every stored time comes from it, so both must agree to the microsecond: whole
    seconds, fractions, halves of a microsecond (rounded half to even by both), before and after 2038."""
    import random
    from datetime import datetime, timezone

    from webapp import clock

    rng = random.Random(7)
    seconds = [0.0, 1.0, 1e-6, 5e-7, 1.5e-6, 2.5e-6, 1_700_000_000.0000005, 1_733_580_000.123456,
               2**31 + 0.5, 4_102_444_800.9999995, 253_402_300_799.0]
    seconds += [rng.uniform(0, 4e9) for _ in range(20000)]
    seconds += [round(rng.uniform(1.6e9, 1.9e9), 6) + 5e-7 for _ in range(20000)]
    with app.app_context():
        for value in seconds:
            app.config["CLOCK"] = lambda value=value: value
            assert clock.now() == datetime.fromtimestamp(value, tz=timezone.utc).replace(tzinfo=None), value
