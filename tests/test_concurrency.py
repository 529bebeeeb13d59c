"""Races against a real multi-process server: gunicorn with 4 sync workers on the test database (SQLite in
WAL mode, or PostgreSQL under `make test-postgres`). A thread barrier releases the requests together.

The server reads the real clock, so codes come from the real time. Codes are made for the current step:
the server accepts T-1..T+1, so a step boundary during the test changes nothing about what must hold.
"""
import re
import threading

import pyotp
import pytest

from .conftest import PASSWORD
from .live_app import Browser, LiveServer
from webapp.models import AuditEvent, Device, PendingEnrolment, User
from webapp.totp import decrypt_secret, new_secret

TIMEOUT = 60


@pytest.fixture
def live_server(app, tmp_path):
    server = LiveServer(app, workers=4, log_dir=str(tmp_path))
    yield server
    server.stop()
    log = server.read_log()
    assert "Traceback" not in log, log


def fire(jobs):
    """Run every job (a no-argument callable) in its own thread, released at once by a barrier."""
    barrier = threading.Barrier(len(jobs), timeout=TIMEOUT)
    results = [None] * len(jobs)

    def run(i, job):
        barrier.wait()
        try:
            results[i] = job()
        except Exception as exc:  # a dropped connection is a result to assert on, not a crash of the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, job), daemon=True) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a request did not finish in time"
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    return results


def refusal_page(browser, result):
    """A refused code's answer followed as a browser without JavaScript follows it: a 303 to the code step,
    whose page says the refusal, with its status. That page's (status, headers, body)."""
    status, headers, _ = result
    assert status == 303 and headers["location"] == "/login/verify", (status, headers.get("location"))
    return browser.get("/login/verify")


def wrong_code_for(secret):
    """A six-digit code that is not valid for any step near now."""
    totp = pyotp.TOTP(secret)
    import time

    valid = {totp.at(time.time() + 30 * k) for k in range(-3, 4)}
    return next(c for c in (f"{n:06d}" for n in range(1000)) if c not in valid)


def test_one_valid_code_sent_from_twenty_pending_sign_ins_at_once_signs_in_exactly_once(app, actor, live_server):
    """security.md 16, 20 (test 1): 20 separate pending sign-ins of one person submit the same valid code at
    the same moment to a 4-worker server; exactly one is signed in, the others see the wrong-code answer."""
    secret = new_secret()
    user = actor.user(email="race@example.com", secret=secret)
    browsers = [Browser(live_server).password_step("race@example.com", PASSWORD) for _ in range(20)]
    tokens = [b.csrf("/login/verify") for b in browsers]
    code = pyotp.TOTP(secret).now()

    results = fire([lambda b=b, t=t: b.request("POST", "/login/verify", data={"csrf_token": t, "code": code})
                    for b, t in zip(browsers, tokens)])

    statuses = sorted(r[0] for r in results)
    winners = [b for b, r in zip(browsers, results) if r[0] == 302 and r[1]["location"].endswith("/settings")]
    assert len(winners) == 1, statuses
    losers = [refusal_page(b, r) for b, r in zip(browsers, results) if r[0] != 302]
    assert len(losers) == 19
    assert all(r[0] in (200, 429) for r in losers), sorted(r[0] for r in losers)
    assert all(any(words in r[2] for words in ("That code is not valid", "before entering another code",
                                                "Too many wrong codes")) for r in losers)
    # Only the winner reaches User Settings; the others are still at the code step.
    assert winners[0].get("/settings")[0] == 200
    assert sum(1 for b in browsers if b.get("/settings")[0] == 200) == 1
    with app.app_context():
        assert AuditEvent.select().where((AuditEvent.kind == "code_accepted")
                                         & (AuditEvent.user == user.id)).count() == 1
        assert AuditEvent.select().where((AuditEvent.kind == "signin") & (AuditEvent.user == user.id)).count() == 1
        assert Device.get(Device.user == user.id).last_step > 0


def test_thirty_parallel_wrong_codes_are_all_counted_and_lock_the_account(app, actor, live_server):
    """security.md 18, 20 (test 2): 30 parallel wrong codes from 30 pending sign-ins: the stored failure
    count is exactly 30 (no lost update), at most 5 were evaluated, and then a correct code is refused."""
    secret = new_secret()
    user = actor.user(email="guess@example.com", secret=secret)
    browsers = [Browser(live_server).password_step("guess@example.com", PASSWORD) for _ in range(31)]
    tokens = [b.csrf("/login/verify") for b in browsers]
    wrong = wrong_code_for(secret)

    results = fire([lambda b=b, t=t: b.request("POST", "/login/verify", data={"csrf_token": t, "code": wrong})
                    for b, t in zip(browsers[:30], tokens[:30])])

    pages = [refusal_page(b, r) for b, r in zip(browsers, results)]
    assert all(r[0] in (200, 429) for r in pages), sorted(r[0] for r in pages)
    with app.app_context():
        stored = User.get_by_id(user.id)
        assert stored.code_failures == 30
        assert stored.code_locked_until is not None
        kinds = [e.kind for e in AuditEvent.select().where(AuditEvent.user == user.id)]
    evaluated = kinds.count("code_rejected")
    assert 1 <= evaluated <= 5, kinds
    assert evaluated + kinds.count("code_throttled") == 30
    assert stored.code_strikes == evaluated  # only the codes checked make the wait longer

    # The right code from yet another pending sign-in is refused while the wait lasts (security.md 18): the
    # pause after the codes checked (a second or more), or the lock if five of them were.
    status, headers, body = refusal_page(browsers[30], browsers[30].request(
        "POST", "/login/verify", data={"csrf_token": tokens[30], "code": pyotp.TOTP(secret).now()}))
    assert status == 429 and ("Too many wrong codes" in body or "before entering another code" in body)
    assert browsers[30].get("/settings")[0] == 302
    with app.app_context():
        assert User.get_by_id(user.id).code_failures == 31
        assert Device.get(Device.user == user.id).last_step == 0


def _signed_in(server, email):
    """A browser signed in with just a password (the person has no device yet), so the wizard is fresh."""
    browser = Browser(server)
    status, headers, _ = browser.post("/login", {"email": email, "password": PASSWORD})
    assert status == 302 and headers["location"].endswith("/settings"), status
    return browser


def test_parallel_enrolments_of_one_person_leave_one_consistent_device(app, actor, live_server):
    """Six sessions of one person each run the wizard to the last step, then all press Complete Activation
    at once with the same device name: no server error, exactly one device, made from a secret that was
    confirmed with a code, and no pending secret left behind (security.md 8, 20)."""
    user = actor.user(email="enrol@example.com")
    browsers = [_signed_in(live_server, "enrol@example.com") for _ in range(6)]
    secrets_seen, tokens = [], []
    for b in browsers:
        status, page = b.start_wizard()
        assert status == 200, status
        secret = re.search(r"secret=([A-Z2-7]+)", page).group(1)
        secrets_seen.append(secret)
        status, page = b.submit_wizard_code(pyotp.TOTP(secret).now())
        assert status == 200 and "Device name" in page, page
        tokens.append(b.csrf("/settings"))

    results = fire([lambda b=b, t=t: b.request("POST", "/settings/2fa/complete",
                                               data={"csrf_token": t, "name": "Phone"})
                    for b, t in zip(browsers, tokens)])

    statuses = sorted(r[0] for r in results)
    assert all(s < 500 for s in statuses), statuses
    with app.app_context():
        devices = list(Device.select().where(Device.user == user.id))
        assert len(devices) == 1, [d.name for d in devices]
        assert decrypt_secret(devices[0].secret_enc) in secrets_seen
        assert devices[0].last_step > 0
        assert PendingEnrolment.select().where(PendingEnrolment.user == user.id).count() == 0
        assert AuditEvent.select().where((AuditEvent.user == user.id)
                                         & (AuditEvent.kind == "tfa_enabled")).count() == 1


def test_twenty_parallel_contact_requests_store_exactly_the_hourly_limit(app, live_server):
    """The contact form's limit (SUPPORT_REQUESTS_PER_HOUR, 3) holds under a burst: 20 browsers post for
    one address at the same moment to a 4-worker server; exactly 3 requests are stored and the others get
    the "wait an hour" answer (429). On PostgreSQL the count and the insert are serialised by an advisory
    lock per address and network (db.lock_keys); a plain transaction there let one extra through."""
    from webapp.models import SupportRequest

    browsers = [Browser(live_server) for _ in range(20)]
    tokens = [b.csrf("/support/contact") for b in browsers]
    # Each in its own words: the same words again are one request sent twice (stored once).
    data = [{"email": "lost.phone@example.com", "message": f"I lost my phone and cannot sign in ({i})."}
            for i in range(20)]
    results = fire([lambda b=b, t=t, d=d: b.request("POST", "/support/contact", data={"csrf_token": t, **d})
                    for b, t, d in zip(browsers, tokens, data)])

    statuses = sorted(r[0] for r in results)
    assert statuses == [302] * 3 + [429] * 17, statuses
    assert all("wait an hour" in r[2] for r in results if r[0] == 429)
    with app.app_context():
        assert SupportRequest.select().where(SupportRequest.email == "lost.phone@example.com").count() == 3


def test_sign_ups_sent_at_once_from_one_network_make_no_more_accounts_than_its_limit(app, actor, live_server):
    """SIGNUPS_PER_HOUR (10) holds under a burst: 16 browsers at one address sign up at the same moment on a
    4-worker server; exactly 10 accounts are made and the others get 429 and leave nothing. Each is counted
    again holding the network (db.lock_keys) before its account is made: all 16 pass the read before the
    hash. The counter says 10, and one audit record says the limit was reached."""
    from webapp.models import NetworkCounter

    actor.user()  # before the first account, /signup leads to the first-run page
    browsers = [Browser(live_server) for _ in range(16)]
    tokens = [b.csrf("/signup") for b in browsers]
    results = fire([lambda b=b, t=t, i=i: b.request("POST", "/signup", data={
        "csrf_token": t, "email": f"rush{i}@example.com", "password": PASSWORD, "confirm": PASSWORD})
        for i, (b, t) in enumerate(zip(browsers, tokens))])

    statuses = sorted(r[0] for r in results)
    assert statuses == [302] * 10 + [429] * 6, statuses
    assert all("Too many sign-ups from your network" in r[2] for r in results if r[0] == 429)
    with app.app_context():
        assert User.select().where(User.email.startswith("rush")).count() == 10
        assert NetworkCounter.get(NetworkCounter.purpose == "sign-ups").hits == 10
        assert AuditEvent.select().where(AuditEvent.kind == "network_limit_reached").count() == 1


def test_wrong_passwords_sent_at_once_are_each_counted_against_the_network(app, actor, live_server):
    """security.md 18, 20: 24 wrong passwords (for addresses without an account) from one address at the same
    moment, its network at 90 of its 100 failures an hour: each one let through is counted exactly once (one
    upsert each, no lost update), and exactly one audit record says the network reached its limit, however
    they interleave. The ones that read the count after the hundredth get 429."""
    from datetime import datetime, timezone

    from webapp.models import NetworkCounter

    actor.user()  # before the first account, /login leads to the first-run page
    with app.app_context():
        NetworkCounter.create(purpose="failed-sign-ins", network="127.0.0.1", hits=90,
                              window_start=datetime.now(timezone.utc).replace(tzinfo=None))  # the server's clock
    browsers = [Browser(live_server) for _ in range(24)]
    tokens = [b.csrf("/login") for b in browsers]
    results = fire([lambda b=b, t=t, i=i: b.request("POST", "/login", data={
        "csrf_token": t, "email": f"nobody{i}@example.com", "password": "Winter2026!"})
        for i, (b, t) in enumerate(zip(browsers, tokens))])

    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 10, statuses
    with app.app_context():
        assert NetworkCounter.get(NetworkCounter.purpose == "failed-sign-ins").hits == 90 + statuses.count(200)
        assert AuditEvent.select().where(AuditEvent.kind == "network_limit_reached").count() == 1


def test_a_sqlite_write_transaction_holds_the_write_lock_from_its_first_statement(app):
    """security.md 20: on SQLite, write_transaction is BEGIN IMMEDIATE: the write lock is taken when it begins,
    so a read at its start (the lock check, the replay state) cannot be overtaken by another writer before
    its own write. A plain BEGIN takes the lock only at the first write; the writers' queue (an flock around
    every write_transaction) hid the difference from every other test. Found by mutation testing."""
    import sqlite3

    from webapp.db import is_sqlite, write_transaction

    with app.app_context():
        if not is_sqlite():
            pytest.skip("SQLite only: PostgreSQL takes row locks (FOR UPDATE)")
        path = app.config["DATABASE_URL"][len("sqlite:///"):]
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            with write_transaction():
                User.select().count()  # only a read so far
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")  # another writer, outside the queue, cannot start
            other.execute("BEGIN IMMEDIATE")  # and can once it has committed
            other.execute("ROLLBACK")
        finally:
            other.close()


def test_sqlite_writers_queue_on_an_exclusive_lock_of_the_writers_file(app):
    """README "Deployment" (Database): writers wait for each other in a kernel queue, an exclusive flock on
    `<database>-writers` held for the whole write transaction, rather than in SQLite's polling busy handler
    (p99 over 400 ms under parallel sign-ins). Another process's writer (here: another open file of the same
    name) can take that lock, shared or exclusive, only once the transaction has ended."""
    import fcntl

    from webapp.db import is_sqlite, write_transaction

    with app.app_context():
        if not is_sqlite():
            pytest.skip("SQLite only: PostgreSQL queues writers on row locks")
        path = app.config["DATABASE_URL"][len("sqlite:///"):] + "-writers"
        with write_transaction():
            User.select().count()
            with open(path, "rb") as other:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # not even a reader of the queue
        with open(path, "rb") as other:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once it has committed
            fcntl.flock(other, fcntl.LOCK_UN)
