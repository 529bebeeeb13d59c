"""Lock order on PostgreSQL: every transaction that changes a person's 2FA, devices or sessions takes the
person's row (User.lock, SELECT ... FOR UPDATE) before any row of theirs in another table. Two that took
them in opposite orders deadlocked when they met, and PostgreSQL then rolled one back (a review drove
Support's disable against "Start over" in the wizard: 35 of 100 rounds; `users reset-2fa` against a code
step: 9 of 250) (security.md 20).

Each test holds the person's row from a connection of its own, starts the action in a thread, waits until
PostgreSQL reports the action blocked by that connection, and then checks that the action has touched none
of the person's other rows yet: each is still there, and NOWAIT can lock it (it could not if the action
had updated or deleted it without committing). A few hold another row instead (the wizard's pending key), or
pause the action inside its own transaction and send a second request meanwhile (a_wrong_code_counted_while).
On SQLite the whole database is one writer lock (BEGIN IMMEDIATE), so the order cannot deadlock there: these
run on PostgreSQL.
"""
import os
import threading
import time

import pytest

from webapp.models import Device, PendingEnrolment, User

from .conftest import csrf_from

pytestmark = pytest.mark.skipif(not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"),
                                reason="PostgreSQL only: SQLite has one lock for the whole database")


def wait_for_blocked_by(conn, pid, thread, timeout=20):
    """Whether some backend ends up waiting for a lock the backend `pid` holds while `thread` runs (`conn`, a
    connection of the test's own, asks PostgreSQL)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # pg_stat_activity is read once per transaction unless the snapshot is dropped
        conn.execute("SELECT pg_stat_clear_snapshot()")
        blocked = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                               (pid,)).fetchone()[0]
        if blocked:
            return True
        if not thread.is_alive():
            return False  # it finished without ever needing that lock
        time.sleep(0.02)
    return False


class PersonHeld:
    """The person's row (or another `table`'s row of that id), held FOR UPDATE from a separate connection until
    `release()`."""

    def __init__(self, user_id, table="user"):
        import psycopg

        self.conn = psycopg.connect(os.environ["TEST_DATABASE_URL"])
        self.conn.execute(f'SELECT id FROM "{table}" WHERE id = %s FOR UPDATE', (user_id,))
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]

    def wait_for_blocked(self, thread, timeout=20):
        """Whether some backend ends up waiting for this connection's lock while `thread` runs."""
        return wait_for_blocked_by(self.conn, self.pid, thread, timeout)

    def row_untouched(self, table, row_id):
        """Whether this row is still there and no other transaction holds it (none has updated or deleted it,
        committed or not)."""
        import psycopg

        self.conn.execute("SAVEPOINT probe")
        try:
            found = self.conn.execute(f'SELECT id FROM "{table}" WHERE id = %s FOR UPDATE NOWAIT',
                                      (row_id,)).fetchone()
        except psycopg.errors.LockNotAvailable:
            found = None
        self.conn.execute("ROLLBACK TO SAVEPOINT probe")  # and so lets the row go again
        return found is not None

    def release(self):
        self.conn.rollback()
        self.conn.close()


def look_while_person_held(user_id, action, look, table="user"):
    """Run `action` in a thread while the person's row (or `table`'s row of that id) is held; once it waits,
    `look(held)` reads what it has done so far. Returns (blocked first, what look found, the action's result)."""
    held = PersonHeld(user_id, table)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", action()), daemon=True)
    try:
        thread.start()
        blocked = held.wait_for_blocked(thread)
        found = look(held)
    finally:
        held.release()
    thread.join(30)
    assert not thread.is_alive(), "the action did not finish once the person's row was free"
    return blocked, found, result.get("value")


def run_while_person_held(user_id, action, rows):
    """As look_while_person_held, looking at whether each of `rows` (table, id) was untouched meanwhile."""
    return look_while_person_held(user_id, action, lambda held: {row: held.row_untouched(*row) for row in rows})


def committing(sql, *params):
    """A `look` for look_while_person_held that changes the person's row and commits, as another transaction
    holding it (the same command run at the same moment, say) does before the action gets the row."""
    def change(held):
        held.conn.execute(sql, params)
        held.conn.commit()
    return change


def a_device_activated(app, user_id, secret, clock):
    """A `look` for look_while_person_held: a new device activated for the person and committed, as Complete
    Activation does holding their row (it adds the device and closes support's window, if one is open)."""
    from webapp.totp import encrypt_secret

    from .test_support import utc

    with app.app_context():
        secret_enc = encrypt_secret(secret)
    return committing(
        'WITH added AS (INSERT INTO "device" (user_id, name, secret_enc, created_at, last_step)'
        ' VALUES (%s, %s, %s, %s, 0)) UPDATE "user" SET tfa_reset_until = NULL WHERE id = %s',
        user_id, "New phone", secret_enc, utc(clock.t), user_id)


def flask_users(app, *args):
    """`flask users ARGS`, run as the operator does."""
    return app.test_cli_runner().invoke(args=["users", *args])


def test_start_over_in_the_wizard_takes_the_person_before_the_pending_key(app, actor, secret):
    """settings.start deleted the session's pending key, then inserted a new one, without the person's row;
    Complete Activation and Support's disable take the person's row first, then those same rows (security.md 20)."""
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.client.post("/settings/2fa/start", data={"csrf_token": actor.csrf("/settings")})
    with app.app_context():
        [pending] = PendingEnrolment.select().where(PendingEnrolment.user == user.id)
    token = csrf_from(actor.client.get("/settings/2fa/qr").get_data(as_text=True))

    blocked, untouched, status = run_while_person_held(
        user.id, lambda: actor.client.post("/settings/2fa/start", data={"csrf_token": token}).status_code,
        [("pendingenrolment", pending.id)])

    assert blocked and untouched == {("pendingenrolment", pending.id): True}
    assert status == 303
    with app.app_context():
        [new] = PendingEnrolment.select().where(PendingEnrolment.user == user.id)
        assert new.id != pending.id


def test_users_reset_2fa_takes_the_person_before_the_devices(app, actor, secret):
    """cli reset-2fa deleted the devices, then updated the person: the code step takes the person, then
    writes the device's last step (security.md 20)."""
    user = actor.user(secret=secret)
    with app.app_context():
        [device] = Device.select().where(Device.user == user.id)

    def reset():
        return app.test_cli_runner().invoke(args=["users", "reset-2fa", user.email])

    blocked, untouched, outcome = run_while_person_held(user.id, reset, [("device", device.id)])

    assert blocked and untouched == {("device", device.id): True}
    assert outcome.exit_code == 0, outcome.output
    with app.app_context():
        assert not Device.select().where(Device.user == user.id).exists()
        assert not User.get_by_id(user.id).has_2fa


def test_sign_out_everywhere_else_takes_the_person_before_the_sessions(app, actor, secret, clock):
    """end_user_sessions holds the person's row, like a session being renewed (re-authentication), so that
    renewal sees its old row gone instead of storing a new one the sign-out missed (security.md 20)."""
    from webapp.models import ServerSession

    from .test_sessions import browser

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    browser(app, clock, secret=secret, agent="Other/1")
    with app.app_context():
        rows = [("serversession", s.id) for s in ServerSession.select().where(ServerSession.user == user.id)]
    token = actor.csrf("/settings")

    blocked, untouched, status = run_while_person_held(
        user.id, lambda: actor.client.post("/settings/sessions/end-others", data={"csrf_token": token}).status_code,
        rows)

    assert blocked and all(untouched.values()), untouched
    assert status == 302
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 1



def test_renewing_a_signed_in_session_takes_the_person_before_the_old_session(app, actor, clock):
    """Re-authentication gives the session a new row and deletes the old one (sessions.DbSessionInterface._write),
    holding the person's row first, as end_user_sessions ("Sign out everywhere else", Support, 2FA changes)
    does before it deletes their sessions. Found by mutation testing: dropping that User.lock failed no test.
    Without it the renewal locked its old row, then waited for the person's row to insert the new one (whose
    foreign key needs it): a sign-out holding the person's row and deleting that old row deadlocks with it.
    While the person's row is held, the renewal waits and its old row is untouched (security.md 20)."""
    from webapp.models import ServerSession

    from .conftest import PASSWORD

    user = actor.user()  # without 2FA: the password is checked without any lock, so the renewal is what waits
    actor.sign_in()
    clock.advance(11 * 60)  # no longer a fresh sign-in: /reauth asks for the password
    with app.app_context():
        [old] = ServerSession.select().where(ServerSession.user == user.id)
    token = actor.csrf("/reauth?next=/settings")

    blocked, untouched, status = run_while_person_held(
        user.id, lambda: actor.client.post("/reauth?next=/settings",
                                           data={"csrf_token": token, "password": PASSWORD}).status_code,
        [("serversession", old.id)])

    assert blocked and untouched == {("serversession", old.id): True}
    assert status == 302
    with app.app_context():
        [new] = ServerSession.select().where(ServerSession.user == user.id)
        assert new.id != old.id


def test_the_purge_skips_rows_a_persons_transaction_holds_instead_of_waiting(app, actor, clock):
    """models.purge_expired (the app's periodic purge and `flask purge-expired`) deleted expired sessions,
    then expired sign-in challenges, waiting for any row another transaction held; Support's disable deletes
    one person's challenges, then their sessions: the two deadlocked (4 of 160 rounds in a review). The
    purge now skips held rows (they go at the next purge) and never waits (security.md 20)."""
    import psycopg

    from webapp.clock import now
    from webapp.models import SignInChallenge, purge_expired

    user = actor.user()
    with app.app_context():
        old = now() - app.config["CHALLENGE_TTL"] * 3
        held_id, other_id = "a" * 64, "b" * 64
        for challenge_id in (held_id, other_id):
            SignInChallenge.create(id=challenge_id, user=user.id, created_at=old)
    holder = psycopg.connect(os.environ["TEST_DATABASE_URL"])
    try:
        holder.execute('SELECT id FROM "signinchallenge" WHERE id = %s FOR UPDATE', (held_id,))
        result = {}

        def purge():
            with app.app_context():
                result["counts"] = purge_expired(app.config, now())

        thread = threading.Thread(target=purge, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the purge waited for a row another transaction holds"
    finally:
        holder.rollback()
        holder.close()
    assert result["counts"][1] == 1
    with app.app_context():
        assert [c.id for c in SignInChallenge.select()] == [held_id]  # skipped now, purged next time
        purge_expired(app.config, now())
        assert SignInChallenge.select().count() == 0


def test_renaming_a_device_takes_the_person_before_the_device(app, actor, secret):
    """settings.rename_device checked for a duplicate name, then renamed, without the person's row: two
    renames at once left "Phone" beside "phone" and both recorded the same old name (a review: 4 and 10 of
    100 rounds). While the person's row is held, the rename waits and the device's row is untouched
    (security.md 20). Found by mutation testing: this test read the name meanwhile, and without User.lock it
    still passed: the rename updated the device, then waited at its audit record (whose foreign key needs the
    person's row), and a rename not yet committed still reads as the old name. Holding the device while
    waiting for the person is the order that deadlocks with a code step (the person, then the device's last
    step)."""
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    with app.app_context():
        [device] = Device.select().where(Device.user == user.id)
    token = actor.csrf("/settings")

    def rename():
        return actor.client.post(f"/settings/devices/{device.id}/rename",
                                 data={"csrf_token": token, f"rename-{device.id}-name": "Work phone"}).status_code

    blocked, untouched, status = run_while_person_held(user.id, rename, [("device", device.id)])
    assert blocked and untouched == {("device", device.id): True}
    assert status == 302
    with app.app_context():
        assert Device.get_by_id(device.id).name == "Work phone"


def test_a_wrong_password_in_a_known_browser_takes_the_person_before_the_browsers_counter(app, actor):
    """A wrong password typed in a browser the person signed in from counts on that browser's own row
    (auth._count_failure). Support's disable and a password change take the person's row, then forget the
    person's browsers; a count that locked the browser's row first and then needed the person's would
    deadlock with them (a 500, or a guess never counted). While the person's row is held, the count waits
    and the browser's row is untouched (security.md 20). Found by mutation testing: dropping the lock failed
    no test."""
    from webapp.models import KnownBrowser

    user = actor.user()
    actor.sign_in()
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    with app.app_context():
        [browser] = KnownBrowser.select().where(KnownBrowser.user == user.id)
    token = actor.csrf("/login")

    blocked, untouched, status = run_while_person_held(
        user.id, lambda: actor.client.post("/login", data={"csrf_token": token, "email": "alice@example.com",
                                                           "password": "wrong password"}).status_code,
        [("knownbrowser", browser.id)])

    assert blocked and untouched == {("knownbrowser", browser.id): True}
    assert status == 200
    with app.app_context():
        assert KnownBrowser.get_by_id(browser.id).password_failures == 1
        assert User.get_by_id(user.id).password_failures == 0  # counted on the browser, not the account


def a_wrong_password_in_a_known_browser(app, actor):
    """A person signed in from this browser, signed out, then typed a wrong password in it (counted on the
    browser's row): (the person, the browser's row, `users unlock` of them as a function to run)."""
    from webapp.models import KnownBrowser

    user = actor.user()
    actor.sign_in()
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    assert actor.password_step(password="wrong password").status_code == 200  # counted on the browser
    with app.app_context():
        [browser] = KnownBrowser.select().where(KnownBrowser.user == user.id)
    return user, browser, lambda: app.test_cli_runner().invoke(args=["users", "unlock", user.email])


def test_users_unlock_takes_the_person_before_the_browsers_counter(app, actor, clock):
    """`users unlock` clears the person's counters and those of their known browsers. A wrong password
    typed in such a browser takes the person's row, then the browser's (auth._count_failure): unlock must
    take them in that order too, so that while the person's row is held it waits, with the browser's row
    untouched (security.md 20). (Its own UPDATE of the person's row comes before the browsers' and waits
    as well: without User.lock this still passes; the next test is the one that needs the lock.)"""
    from webapp.models import KnownBrowser

    user, browser, unlock = a_wrong_password_in_a_known_browser(app, actor)

    blocked, untouched, outcome = run_while_person_held(user.id, unlock, [("knownbrowser", browser.id)])

    assert blocked and untouched == {("knownbrowser", browser.id): True}
    assert outcome.exit_code == 0 and "password entry in 1 known browser(s) (1 wrong password(s)" in outcome.output
    with app.app_context():
        assert KnownBrowser.get_by_id(browser.id).password_failures == 0


def test_users_unlock_reads_the_counters_it_clears_under_the_persons_row(app, actor, clock):
    """`users unlock` reads the counters (for its report and audit record) after it has the person's row,
    so that what it reports is what it clears. Found by mutation testing: without User.lock (or with it after
    the writes) unlock read them first and only then waited, at its UPDATE of the person's row; a wrong
    password counted meanwhile (auth._count_failure, which holds the person's row) was cleared too but left
    out of the operator's report and the audit record. Here one is counted while unlock waits: it reports
    and records both (security.md 20)."""
    from webapp.models import AuditEvent, KnownBrowser

    user, browser, unlock = a_wrong_password_in_a_known_browser(app, actor)

    def count_a_wrong_password(held):
        # as _count_failure does, holding the person's row; committing lets the person's row go
        held.conn.execute('UPDATE "knownbrowser" SET password_failures = password_failures + 1 WHERE id = %s',
                          (browser.id,))
        held.conn.commit()

    blocked, _, outcome = look_while_person_held(user.id, unlock, count_a_wrong_password)

    assert blocked
    assert outcome.exit_code == 0 and "password entry in 1 known browser(s) (2 wrong password(s)" in outcome.output
    with app.app_context():
        assert KnownBrowser.get_by_id(browser.id).password_failures == 0
        [event] = AuditEvent.select().where(AuditEvent.kind == "throttle_cleared")
        assert event.details["known_browser_failures"] == 2


def test_revoking_an_admin_waits_for_every_admins_row_before_counting_the_others(app, actor):
    """`users promote --revoke` refuses to demote the last admin. It counted the other admins holding only
    its own target's row: two revokes of the last two admins at once each still saw the other and left
    none (a review reproduced it). It now takes every admin's row, in id order, before it counts: while
    another admin's row is held, it waits, and the target is still an admin (security.md 41: someone must
    be left to answer support requests)."""
    first = actor.user("first-admin@example.com", admin=True)
    second = actor.user("second-admin@example.com", admin=True)

    blocked, still_admin, run = look_while_person_held(
        second.id, lambda: app.test_cli_runner().invoke(args=["users", "promote", "first-admin@example.com",
                                                              "--revoke"]),
        lambda held: held.conn.execute('SELECT is_admin FROM "user" WHERE id = %s', (first.id,)).fetchone()[0])
    assert blocked and still_admin
    assert run.exit_code == 0 and "first-admin@example.com is now an ordinary user" in run.output
    with app.app_context():
        assert [u.email for u in User.select().where(User.is_admin)] == ["second-admin@example.com"]


def test_disabling_an_admin_waits_for_every_admins_row_before_counting_the_others(app, actor):
    """`users disable` refuses to leave no admin whose account is in use, counting the other admins after it
    holds every admin's row (in id order, as promote --revoke takes them). Found by mutation testing: without
    that lock no test failed. It then held only its own target's row, so `users disable` of the last two
    admins at once each still saw the other one in use and left none: nobody could open the Support page
    (security.md 41). Here the other admin is disabled, holding their row, while the command waits: it is
    then refused, and the first admin stays in use (security.md 20)."""
    from webapp.models import AuditEvent

    first = actor.user("first-admin@example.com", admin=True)
    second = actor.user("second-admin@example.com", admin=True)

    blocked, _, outcome = look_while_person_held(
        second.id, lambda: flask_users(app, "disable", "first-admin@example.com"),
        committing("""UPDATE "user" SET disabled_at = (now() AT TIME ZONE 'UTC') WHERE id = %s""", second.id))

    assert blocked
    assert outcome.exit_code == 1, outcome.output
    assert "first-admin@example.com is the only admin whose account is not disabled" in outcome.output
    with app.app_context():
        assert User.get_by_id(first.id).disabled_at is None
        assert not AuditEvent.select().where(AuditEvent.kind == "account_disabled").exists()


def test_users_disable_takes_the_person_before_their_sessions_and_sign_ins(app, actor, secret, clock):
    """`users disable` ends the person's sessions, half-finished sign-ins and pending keys holding the
    person's row first, as the code step and every other change to them do (security.md 20)."""
    from webapp.models import ServerSession, SignInChallenge

    from .conftest import Actor

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    Actor(app, app.test_client(), clock).password_step()  # another browser at the code step
    with app.app_context():
        [session] = ServerSession.select().where(ServerSession.user == user.id)
        [challenge] = SignInChallenge.select().where(SignInChallenge.user == user.id)

    blocked, untouched, outcome = run_while_person_held(
        user.id, lambda: app.test_cli_runner().invoke(args=["users", "disable", user.email]),
        [("serversession", session.id), ("signinchallenge", challenge.id)])

    assert blocked and all(untouched.values()), untouched
    assert outcome.exit_code == 0 and "1 session(s), 1 half-finished sign-in(s)" in outcome.output
    with app.app_context():
        assert User.get_by_id(user.id).disabled_at is not None


@pytest.mark.parametrize("command, already, meanwhile, answer, kind", [
    ("promote", None, 'UPDATE "user" SET is_admin = true WHERE id = %s', "is already an admin; nothing changed",
     "role_changed"),
    ("disable", None, """UPDATE "user" SET disabled_at = (now() AT TIME ZONE 'UTC') WHERE id = %s""",
     "is already disabled", "account_disabled"),
    ("enable", "disable", 'UPDATE "user" SET disabled_at = NULL WHERE id = %s', "is not disabled; nothing changed",
     "account_enabled"),
])
def test_users_commands_read_the_account_under_the_persons_row(app, actor, command, already, meanwhile, answer,
                                                                kind):
    """`users promote`, `users disable` and `users enable` read the state they change (admin or not, disabled
    or not) after they have the person's row. Found by mutation testing: without User.lock each read first
    and waited only at its UPDATE of that row (for disable, before the sessions, so
    test_users_disable_takes_the_person_before_their_sessions_and_sign_ins still passed), so two of the same
    command at once both went through: two role changes each ending the person's sessions, a disable moving
    its date, each with a second audit record. Here the same change is committed while the command waits:
    it then says nothing changed and records nothing (security.md 20)."""
    from webapp.models import AuditEvent

    user = actor.user()
    if already:
        assert flask_users(app, already, user.email).exit_code == 0

    blocked, _, outcome = look_while_person_held(
        user.id, lambda: flask_users(app, command, user.email), committing(meanwhile, user.id))

    assert blocked
    assert outcome.exit_code == 0 and answer in outcome.output, outcome.output
    with app.app_context():
        assert not AuditEvent.select().where(AuditEvent.kind == kind).exists()


def code_checked_already(monkeypatch):
    """The code a change needs is checked in a transaction of its own that takes the person's row
    (totp.check_user_code), before the change's own: passed here, so what waits is the change itself."""
    from webapp import totp

    monkeypatch.setattr(totp, "check_user_code", lambda user, raw_code, matches=None: totp.CheckResult(True, "ok"))


def test_removing_a_device_takes_the_person_before_the_device(app, actor, secret, monkeypatch):
    """settings.remove_device counts the devices left and deletes one holding the person's row. Found by
    mutation testing: without User.lock no test failed. It then deleted the device and waited for the
    person's row only at its audit record (whose foreign key needs it), holding the device meanwhile: a
    code step takes the person's row, then updates that device's last step, so the two deadlock. While the
    person's row is held, the removal waits and the device's row is untouched (security.md 20)."""
    user = actor.user(secret=secret, devices={"Tablet": secret})
    actor.sign_in(secret=secret)
    with app.app_context():
        tablet = Device.get((Device.user == user.id) & (Device.name == "Tablet"))
    code_checked_already(monkeypatch)
    token = actor.csrf("/settings")

    blocked, untouched, status = run_while_person_held(
        user.id, lambda: actor.client.post(f"/settings/devices/{tablet.id}/remove", data={
            "csrf_token": token, f"remove-{tablet.id}-code": "123456"}).status_code, [("device", tablet.id)])

    assert blocked and untouched == {("device", tablet.id): True}
    assert status == 302
    with app.app_context():
        assert [d.name for d in Device.select().where(Device.user == user.id)] == ["Phone"]


def test_turning_2fa_off_takes_the_person_before_the_devices(app, actor, secret, monkeypatch):
    """settings.disable (Turn off) deletes the devices, pending keys and sign-ins at the code step holding
    the person's row. Found by mutation testing: without User.lock no test failed. It then deleted them and
    waited for the person's row only at its audit record, holding the devices meanwhile: the order that
    deadlocks with a code step (the person's row, then the device's last step). While the person's row is
    held, Turn off waits and the device's row is untouched (security.md 20)."""
    from .conftest import PASSWORD

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    with app.app_context():
        [device] = Device.select().where(Device.user == user.id)
    code_checked_already(monkeypatch)
    token = actor.csrf("/settings")

    blocked, untouched, status = run_while_person_held(
        user.id, lambda: actor.client.post("/settings/2fa/disable", data={
            "csrf_token": token, "off-password": PASSWORD, "off-code": "123456"}).status_code,
        [("device", device.id)])

    assert blocked and untouched == {("device", device.id): True}
    assert status == 302
    with app.app_context():
        assert not User.get_by_id(user.id).has_2fa


def test_signing_out_one_other_browser_takes_the_person_before_its_session(app, actor, secret, clock):
    """settings.end_one_session deletes one other session of the person holding the person's row, as
    end_user_sessions does. Found by mutation testing: without User.lock no test failed. A renewal of that
    session under way (re-authentication in that browser: DbSessionInterface._write) holds the person's
    row while it replaces the old row with a new one; a DELETE that does not wait for the person's row
    waits for the old row instead, then finds it gone and misses the new one: that browser stays signed in
    although this one was told it is signed out. While the person's row is held, the sign-out waits and
    that session's row is untouched (security.md 20)."""
    from webapp.models import ServerSession
    from webapp.settings import session_handle

    from .test_sessions import browser

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    browser(app, clock, secret=secret, agent="Other/1")
    with app.app_context():
        other = ServerSession.get((ServerSession.user == user.id) & (ServerSession.user_agent == "Other/1"))
    token = actor.csrf("/settings")

    blocked, untouched, status = run_while_person_held(
        user.id, lambda: actor.client.post(f"/settings/sessions/{session_handle(other.id)}/end",
                                           data={"csrf_token": token}).status_code,
        [("serversession", other.id)])

    assert blocked and untouched == {("serversession", other.id): True}
    assert status == 302
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 1


def test_supports_disable_reads_the_person_under_their_row(app, actor, secret):
    """Support's "Temporarily disable 2FA" re-reads the person holding their row (support._lock_target)
    and refuses when they have become an admin since the page was read (security.md 41). Found by mutation
    testing: with a plain read in its place no test failed; the read came before the person's row (taken
    only by revoke_second_factor), so a `users promote` committed meanwhile went unseen and the new admin's
    devices were revoked. Here the person is made an admin while the disable waits: it is refused and their
    device stays (security.md 20)."""
    from .test_support import disable, sign_in_admin

    sign_in_admin(actor, secret)
    target = actor.user("carol@example.com", secret=secret)

    blocked, _, response = look_while_person_held(
        target.id, lambda: disable(actor, target, close_requests=False),
        committing('UPDATE "user" SET is_admin = true WHERE id = %s', target.id))

    assert blocked
    assert response.status_code == 403
    with app.app_context():
        assert Device.select().where(Device.user == target.id).count() == 1


def test_ending_a_support_window_reads_the_person_under_their_row(app, actor, secret, clock):
    """Support's "End window" decides whether the person's window is still open after it has their row
    (support._lock_target). Found by mutation testing: with a plain read in its place no test failed; it then
    read first and waited only at its UPDATE, so a new device activated meanwhile (Complete Activation holds
    the person's row while it adds the device and closes the window) went unseen: the window was "ended"
    again, recorded, and the sessions of the person who had just set up their phone ended. Here that happens
    while End window waits: it answers that there is no open window and records nothing (security.md 20)."""
    from webapp.models import AuditEvent

    from .test_support import disable, end_window, sign_in_admin

    sign_in_admin(actor, secret)
    target = actor.user("carol@example.com", secret=secret)
    assert disable(actor, target, close_requests=False).status_code == 302  # the window is open, no device

    blocked, _, response = look_while_person_held(target.id, lambda: end_window(actor, target),
                                                  a_device_activated(app, target.id, secret, clock))

    assert blocked
    assert response.status_code == 400
    with app.app_context():
        assert not AuditEvent.select().where(AuditEvent.kind == "support_window_ended").exists()


def test_a_password_step_decides_under_the_persons_row_whether_a_code_is_needed(app, actor, secret, clock):
    """A correct password leads to the code step, a direct sign-in or a closed door: auth.after_password
    decides which after it has the person's row (security.md 20). Found by mutation testing: with a plain
    read in place of that lock no test failed. It then read the person and their devices first and waited
    only to write the session (whose row and audit record need the person's), so a device activated
    meanwhile (Complete Activation holds the person's row while it adds the device) went unseen: the password
    alone opened a session although 2FA was on, which the activation's ending of the person's other sessions
    may already have passed (security.md 28: every sign-in needs the code once there is a device). Here a
    device is activated while the password step waits: it goes to the code step, with no session."""
    from webapp.models import ServerSession

    user = actor.user()  # no device yet: the password alone signs in, until one is activated

    blocked, _, response = look_while_person_held(user.id, actor.password_step,
                                                  a_device_activated(app, user.id, secret, clock))

    assert blocked
    assert response.status_code == 302 and response.headers["Location"].endswith("/login/verify"), (
        response.status_code, response.headers.get("Location"))
    with app.app_context():
        assert not ServerSession.select().where(ServerSession.user == user.id).exists()


def test_changing_the_password_reads_the_current_one_under_the_persons_row(app, actor, clock):
    """security.replace_password checks that the password is still the one the person proved after it has
    their row (security.md 20). Found by mutation testing: with a plain read in place of that lock no test
    failed. It then read the password first and waited only at its UPDATE of the person's row, so a password
    set meanwhile (the operator's `users set-password`, or a change in another browser, both holding the
    person's row) went unseen and was overwritten by one proved with the password it replaced
    (security.md 35). Here the operator's password is committed while Change password waits: it is refused,
    changing nothing, and the operator's password stays."""
    from webapp.models import AuditEvent
    from webapp.security import hash_password

    from .test_password import URL, form

    user = actor.user()
    actor.sign_in()
    with app.app_context():
        operators = hash_password("the operator's choice")

    blocked, _, response = look_while_person_held(
        user.id, lambda: actor.post_form(URL, form()),
        committing('UPDATE "user" SET password_hash = %s WHERE id = %s', operators, user.id))

    assert blocked
    # Refused without JavaScript: 303 to the page, which says it with its 409 once (auth.refused_see_other).
    assert response.status_code == 303 and response.headers["Location"].endswith(URL), response.status_code
    shown = actor.client.get(URL)
    assert shown.status_code == 409 and "your password was changed somewhere else" in shown.get_data(as_text=True)
    with app.app_context():
        assert User.get_by_id(user.id).password_hash == operators
        assert not AuditEvent.select().where(AuditEvent.kind == "password_changed").exists()


def _at_the_name_step(app, actor):
    """A signed-in person whose wizard took the right code and asks for the device's name: (the person, the
    Wizard, their pending key's row)."""
    from .test_wizard import Wizard, signed_in, text

    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    assert 'data-step="name"' in text(w.submit_code())
    with app.app_context():
        [pending] = PendingEnrolment.select().where(PendingEnrolment.user == user.id)
    return user, w, pending


def test_complete_activation_reads_the_pending_key_under_its_row(app, actor, clock):
    """Complete Activation makes the device from the pending key as it is once it holds the key's row
    (settings.complete: FOR UPDATE after the person's row), last_step the newest step the wizard accepted.
    Found by mutation testing: with a plain read in its place no test failed. A code step does not take the
    person's row: it writes the key's verified_step alone, so a newer code accepted meanwhile (sent again from
    another tab of the same session) went unseen: Complete Activation, reading first and waiting only at its
    DELETE of the person's keys, stored the older step, and that newer code, shown by the wizard as accepted,
    then signed in once more (security.md 16: each code once). Here it is accepted while Complete Activation
    waits for the key's row: the device's last step is the newer one, and its code is refused at sign-in
    (security.md 20)."""
    from webapp.totp import step_at

    from .test_wizard import logout, text

    user, w, pending = _at_the_name_step(app, actor)
    newer = step_at(clock.t) + 1  # the next step's code, as verify_code keeps it (the newest step accepted)

    blocked, _, response = look_while_person_held(
        pending.id, w.complete,
        committing('UPDATE "pendingenrolment" SET verified_step = %s WHERE id = %s', newer, pending.id),
        table="pendingenrolment")

    assert blocked
    assert response.status_code == 200 and 'data-step="done"' in text(response)
    with app.app_context():
        [device] = Device.select().where(Device.user == user.id)
        assert device.last_step == newer
    logout(actor)
    actor.password_step()
    replay = actor.code_refused(w.code_now(offset_steps=1))
    assert replay.status_code == 200 and "That code is not valid" in text(replay)


def test_complete_activation_takes_its_session_before_the_pending_key(app, actor, clock):
    """Complete Activation writes its session's row in its own transaction (the note that the done step is due,
    kept even if the worker dies before answering: test_faults), so it takes that row after the person's and
    before the pending key's. A logout of the same session in another tab deletes the session first, and its
    pending key with it (ON DELETE CASCADE): taking the key first and the session last deadlocked with it."""
    from webapp.sessions import token_hash

    from .test_wizard import text

    _, w, pending = _at_the_name_step(app, actor)

    blocked, untouched, response = look_while_person_held(
        token_hash(actor.session_cookie()), w.complete,
        lambda held: held.row_untouched("pendingenrolment", pending.id), table="serversession")

    assert blocked and untouched
    assert response.status_code == 200 and 'data-step="done"' in text(response)


def a_wrong_wizard_code(wizard):
    """A code the wizard's key gives at no step near now."""
    near = {wizard.code_now(offset_steps=k) for k in range(-3, 4)}
    return next(c for c in ("123456", "654321", "111111") if c not in near)


def wizard_after_wrong_codes(actor, count):
    """(person, wizard, the wrong code): a signed-in person's wizard at the code step, `count` wrong codes
    already refused there."""
    from .test_wizard import Wizard, signed_in, text

    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    wrong = a_wrong_wizard_code(w)
    for _ in range(count):
        assert 'data-step="code"' in text(w.submit_code(wrong))
    return user, w, wrong


def a_wrong_code_counted_while(app, actor, wizard, monkeypatch, other):
    """Send a wrong code in the wizard. Once its count is written (verify_code's UPDATE), before it reads the
    count back, `other(tab)` runs in a thread from another tab of the same session (a test client with this
    one's cookie); the count goes on once `other` waits for a lock the count's transaction holds, or has
    finished. Returns (`other` waited for it, the wrong code's answer, what `other` returned)."""
    import psycopg

    from webapp.db import db

    read_back = PendingEnrolment.get_or_none.__func__
    tab = app.test_client()
    tab.set_cookie(app.session_interface.get_cookie_name(app), actor.session_cookie())
    seen = {}

    def counted_then_other(cls, *args, **kwargs):
        if "thread" not in seen:  # the wrong code's own read; `other`'s reads go straight on
            pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
            seen["thread"] = threading.Thread(target=lambda: seen.setdefault("result", other(tab)), daemon=True)
            seen["thread"].start()
            with psycopg.connect(os.environ["TEST_DATABASE_URL"]) as watcher:
                seen["blocked"] = wait_for_blocked_by(watcher, pid, seen["thread"])
        return read_back(cls, *args, **kwargs)

    monkeypatch.setattr(PendingEnrolment, "get_or_none", classmethod(counted_then_other))
    response = wizard.submit_code(a_wrong_wizard_code(wizard))
    seen["thread"].join(30)
    assert not seen["thread"].is_alive(), "the other tab's request did not finish once the count was committed"
    return seen["blocked"], response, seen.get("result")


def test_two_wrong_wizard_codes_at_once_are_each_counted_as_their_own(app, actor, monkeypatch):
    """verify_code counts a wrong code against the pending key (failures + 1), reads the count back and
    discards the key at the fifth, in one write transaction: its UPDATE holds the key's row until the count
    is read and acted on. Found by mutation testing: without that transaction no test failed. Each statement
    then committed alone, and a wrong code sent meanwhile from another tab counted on top before the first
    read its count back: the fourth wrong code was answered "Too many wrong codes" and recorded as the fifth,
    and the audit log said 5 twice. Here after three wrong codes a fourth is sent, and a fifth from another
    tab while the fourth is counted: the fifth waits; both are counted, each recorded with its own number,
    the fourth answered at the code step and the fifth discarding the key, once (security.md 18, 20)."""
    from webapp.models import AuditEvent

    from .test_wizard import HX, text

    user, w, wrong = wizard_after_wrong_codes(actor, 3)
    blocked, fourth, fifth = a_wrong_code_counted_while(
        app, actor, w, monkeypatch,
        lambda tab: tab.post("/settings/2fa/code", data={"csrf_token": w.csrf(), "code": wrong}, headers=HX))

    assert blocked
    assert 'data-step="code"' in text(fourth) and "That code does not match" in text(fourth)
    assert 'data-step="expired"' in text(fifth) and "Too many wrong codes" in text(fifth)
    with app.app_context():
        events = AuditEvent.select().where(AuditEvent.user == user.id)
        assert sorted(e.details["failures"] for e in events if e.kind == "tfa_enrolment_code_rejected") == [
            1, 2, 3, 4, 5]
        assert [e.kind for e in events].count("tfa_enrolment_discarded") == 1
        assert not PendingEnrolment.select().where(PendingEnrolment.user == user.id).exists()


def test_a_right_wizard_code_sent_while_the_fifth_wrong_one_is_counted_finds_the_key_discarded(app, actor,
                                                                                               monkeypatch):
    """The pending key takes five wrong codes, then is gone (security.md 18): the fifth's count and the
    discard are one write transaction in verify_code, holding the key's row. Found by mutation testing:
    without that transaction no test failed. The fifth's count then committed alone before the key was
    deleted, and the right code sent meanwhile from another tab was accepted against a key already at its
    limit, and Complete Activation made a device from it. Here the right code and Complete Activation are
    sent from another tab while the fifth wrong code is counted: the right code waits for that count, then
    finds the key discarded; no device, no accepted code, the discard recorded once (security.md 20)."""
    from webapp.models import AuditEvent

    from .test_wizard import HX, Wizard, signed_in, text

    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    for _ in range(4):
        assert 'data-step="code"' in text(w.submit_code(a_wrong_wizard_code(w)))

    def right_code_then_complete(tab):
        code = tab.post("/settings/2fa/code", data={"csrf_token": w.csrf(), "code": w.code_now()}, headers=HX)
        complete = tab.post("/settings/2fa/complete", data={"csrf_token": w.csrf(), "name": "Phone"}, headers=HX)
        return code, complete

    blocked, fifth, (code, complete) = a_wrong_code_counted_while(app, actor, w, monkeypatch,
                                                                  right_code_then_complete)

    assert blocked
    assert 'data-step="expired"' in text(fifth) and "Too many wrong codes" in text(fifth)
    assert 'data-step="expired"' in text(code) and 'data-step="expired"' in text(complete)
    with app.app_context():
        assert not Device.select().where(Device.user == user.id).exists()
        kinds = [e.kind for e in AuditEvent.select().where(AuditEvent.user == user.id)]
        assert "tfa_enrolment_code_accepted" not in kinds and kinds.count("tfa_enrolment_discarded") == 1


# ---------------------------------------------------------------- the audit record's reference to a person
#
# A new audit record refers to its person and its actor, and PostgreSQL takes FOR KEY SHARE on each row a new
# row refers to. With FOR UPDATE as the app's row lock, that waited for whoever held the person: a transaction
# holding another of the person's rows, then writing the record, deadlocked with one that held the person and
# went for that row (a race review found three; PostgreSQL rolled one side back: a 503). The app locks with
# FOR NO KEY UPDATE (db.for_update), which holders still take in turn but which lets the reference through.
# These hold the row with the app's own statement, and then do what the other transaction does next.

class AppHeld(PersonHeld):
    """Rows of "user" held from a separate connection with the statement the app itself locks a person
    with (User.lock, db.for_update): another request of the app that holds them."""

    def __init__(self, app, user_ids):
        import psycopg

        from webapp.db import for_update

        with app.app_context():
            sql, params = for_update(User.select(User.id).where(User.id.in_(list(user_ids)))
                                     .order_by(User.id)).sql()
        self.conn = psycopg.connect(os.environ["TEST_DATABASE_URL"])
        self.conn.execute(sql, params)
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def then_meanwhile(app, held, action, statement, params):
    """Run `action` in a thread while `held` holds its rows; once the action waits for them, or has finished,
    run `statement` on the holder's connection as its transaction would next, then let go. Returns whether
    the holder's statement met a deadlock, and the action's result."""
    import psycopg

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", action()), daemon=True)
    thread.start()
    held.wait_for_blocked(thread, timeout=3)  # with the app's own lock, the action does not wait at all
    deadlock = False
    try:
        held.conn.execute(statement, params)
    except psycopg.errors.DeadlockDetected:
        deadlock = True
    finally:
        held.release()
    thread.join(30)
    assert not thread.is_alive()
    return deadlock, result.get("value")


def test_logout_and_ending_the_persons_sessions_at_once_do_not_deadlock(app, actor, secret):
    """Logout deletes its session row, then writes its sign-out record about the person; Sign out everywhere
    else in another browser (or a 2FA change, support, `users disable`) holds the person and deletes their
    sessions. Both finish: the logout signs out, and its record is written."""
    from webapp.models import AuditEvent

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    token = actor.csrf("/settings")
    held = AppHeld(app, [user.id])
    deadlock, response = then_meanwhile(app, held, lambda: actor.client.post("/logout", data={"csrf_token": token}),
                                        'DELETE FROM "serversession" WHERE user_id = %s', (user.id,))
    assert not deadlock
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "signout").count() == 1


def test_mark_as_handled_and_supports_disable_closing_the_request_do_not_deadlock(app, actor, secret):
    """Mark as handled updates the request, then writes its record about the person; another admin's disable
    holds the person and closes the same request. Both finish, and the request is handled."""
    from webapp.models import SupportRequest

    from .test_support import sign_in_admin

    sign_in_admin(actor, secret)
    carol = actor.user("carol@example.com", secret=secret)
    with app.app_context():
        req = SupportRequest.create(email=carol.email, message="I lost my phone", user=carol.id)
    token = actor.csrf("/support")
    held = AppHeld(app, [carol.id])
    deadlock, response = then_meanwhile(
        app, held, lambda: actor.client.post(f"/support/requests/{req.id}/handled", data={"csrf_token": token}),
        "UPDATE supportrequest SET handled_at = (now() AT TIME ZONE 'UTC') WHERE id = %s", (req.id,))
    assert not deadlock
    assert response.status_code == 302
    with app.app_context():
        assert SupportRequest.get_by_id(req.id).handled_at is not None


def test_a_support_disable_and_users_disable_of_its_admin_at_once_do_not_deadlock(app, actor, secret):
    """A support disable holds its target, then writes its record naming the acting admin; `users disable`
    (and `promote --revoke`) hold every admin's row, then the target's. Both finish."""
    from .test_support import disable, sign_in_admin

    admin = sign_in_admin(actor, secret)
    carol = actor.user("carol@example.com", secret=secret)
    held = AppHeld(app, [admin.id])
    with app.app_context():
        from webapp.db import for_update

        sql, params = for_update(User.select(User.id).where(User.id == carol.id)).sql()
    deadlock, response = then_meanwhile(app, held, lambda: disable(actor, carol, close_requests=False), sql, params)
    assert not deadlock
    assert response.status_code == 302
    with app.app_context():
        assert not Device.select().where(Device.user == carol.id).exists()


def test_a_disable_closing_requests_waits_for_one_another_admin_is_marking_handled(app, actor, secret):
    """security.md 42: the disable's "mark as handled" holds the requests it closes. Another admin's Mark as
    handled of one of them, under way, is waited for; the request then keeps that admin's name, and the
    disable's record does not claim it (Recently handled reads how a request was closed from that record)."""
    from webapp.models import AuditEvent, SupportRequest

    from .test_support import disable, sign_in_admin

    sign_in_admin(actor, secret)
    other_admin = actor.user("second-admin@example.com", admin=True)
    carol = actor.user("carol@example.com", secret=secret)
    with app.app_context():
        req = SupportRequest.create(email=carol.email, message="I lost my phone", user=carol.id)
    blocked, _, response = look_while_person_held(
        req.id, lambda: disable(actor, carol, close_requests=True),
        committing("UPDATE supportrequest SET handled_at = (now() AT TIME ZONE 'UTC'), handled_by_id = %s "
                   "WHERE id = %s", other_admin.id, req.id), table="supportrequest")
    assert blocked and response.status_code == 302
    with app.app_context():
        assert SupportRequest.get_by_id(req.id).handled_by_id == other_admin.id
        event = AuditEvent.get(AuditEvent.kind == "support_tfa_disabled")
        assert event.details["requests_closed"] == 0 and event.details["requests"] is None


def test_users_disable_of_the_acting_admin_waits_for_a_support_action_under_way(app, actor, secret, monkeypatch):
    """security.md 41, 42: a support action holds its admin's row first (then the person's, the order `users
    disable` takes them). The operator's `users disable` of that admin, sent while the action is under way,
    waits for it; it then says the account is disabled, and the records come in the order things happened.
    With only a read of the admin's row, the command finished first and the disabled admin's action still
    went through after it (a security review)."""
    from webapp import support
    from webapp.models import AuditEvent

    from .test_support import ADMIN, disable, sign_in_admin

    admin = sign_in_admin(actor, secret)
    actor.user("admin2@example.com", admin=True, secret=secret)
    carol = actor.user("carol@example.com", secret=secret)
    real = support._recheck_actor
    seen = {}

    def and_the_operator_meanwhile(acting):
        real(acting)
        command = threading.Thread(target=lambda: seen.setdefault("cli", flask_users(app, "disable", ADMIN)),
                                   daemon=True)
        command.start()
        command.join(3)
        seen["waited"], seen["thread"] = command.is_alive(), command

    monkeypatch.setattr(support, "_recheck_actor", and_the_operator_meanwhile)
    assert disable(actor, carol, close_requests=False).status_code == 302
    seen["thread"].join(30)
    assert seen["waited"] and seen["cli"].exit_code == 0 and "is disabled" in seen["cli"].output
    with app.app_context():
        kinds = [e.kind for e in AuditEvent.select().where(AuditEvent.kind.in_(
            ["account_disabled", "support_tfa_disabled"])).order_by(AuditEvent.id)]
        assert User.get_by_id(admin.id).disabled_at is not None
    assert kinds == ["support_tfa_disabled", "account_disabled"]


def test_a_device_activated_while_the_keys_are_rotated_is_re_encrypted_too(app, actor, monkeypatch):
    """`keys rotate` while the hosts serve (README "Rotating the encryption key"): a person completes the
    wizard with a key that waited under the old encryption key, at the moment the rotation has read the
    waiting keys but not yet re-encrypted theirs. Activation copies the waiting key's ciphertext into the
    new device, and the rotation's update of the waiting key then finds it gone. The device must still be
    re-encrypted: rotated first, the devices were read before it existed, and it kept the old key's
    ciphertext, so once the old key was removed as the README says, every sign-in of that person was a 503."""
    from cryptography.fernet import Fernet

    from webapp import cli
    from webapp.totp import SecretError, decrypt_secret

    from .test_wizard import Wizard, signed_in

    signed_in(actor)
    wizard = Wizard(actor)
    wizard.open()
    wizard.start()
    assert 'data-step="name"' in wizard.submit_code().get_data(as_text=True)  # the key waits, confirmed
    old = app.config["TOTP_ENCRYPTION_KEYS"]
    new = Fernet.generate_key().decode()
    app.config["TOTP_ENCRYPTION_KEYS"] = f"{new},{old}"  # every host and the command: new first
    original, seen = cli.reencrypt_secret, {}

    def reencrypt_while_activated(token):
        if "activated" not in seen:  # the first waiting key the rotation handles: Complete Activation now
            thread = threading.Thread(target=lambda: seen.setdefault("activated", wizard.complete("Phone")),
                                      daemon=True)
            thread.start()
            thread.join(30)
            assert not thread.is_alive(), "the activation waited for the rotation"
        return original(token)

    monkeypatch.setattr(cli, "reencrypt_secret", reencrypt_while_activated)
    result = app.test_cli_runner().invoke(args=["keys", "rotate"])
    assert result.exit_code == 0, result.output
    assert seen["activated"].status_code == 200
    app.config["TOTP_ENCRYPTION_KEYS"] = new  # the old key removed
    with app.app_context():
        [device] = Device.select()
        try:
            decrypt_secret(device.secret_enc)
        except SecretError:
            pytest.fail("the device activated during the rotation kept the old key's ciphertext")


def test_a_start_on_an_existing_database_does_not_queue_the_other_hosts_writers(app, actor, secret, tmp_path, clock):
    """A rolling restart (README "Several processes, several machines"): host A starts while host B serves. At
    every start, CREATE INDEX IF NOT EXISTS for each index (the models' and user_email_c) took a SHARE lock on
    its table even when the index was there, so it waited for any write transaction open on the table, and
    every writer that came after (each sign-in on B) queued behind it until that transaction ended: a start
    turned one slow transaction (a long command, a stalled worker, up to gunicorn's timeout) into a stall of
    every sign-in. A start on a database that has its tables and indexes creates nothing and takes no lock."""
    import psycopg

    from .conftest import make_test_app

    user = actor.user(secret=secret)
    writer = psycopg.connect(os.environ["TEST_DATABASE_URL"])  # a write transaction open on B meanwhile
    writer.execute('UPDATE "user" SET last_login_at = last_login_at WHERE id = %s', (user.id,))
    writer.execute('UPDATE "device" SET name = name WHERE user_id = %s', (user.id,))
    pid = writer.execute("SELECT pg_backend_pid()").fetchone()[0]
    started, seen = threading.Event(), {}

    def watch():  # until the start is over: does it wait for the writer? Then let it go on.
        with psycopg.connect(os.environ["TEST_DATABASE_URL"], autocommit=True) as observer:
            deadline = time.monotonic() + 10
            while not started.is_set() and time.monotonic() < deadline:
                observer.execute("SELECT pg_stat_clear_snapshot()")
                if observer.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                                    (pid,)).fetchone()[0]:
                    seen["blocked"] = True
                    break
                time.sleep(0.02)
        writer.rollback()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        make_test_app(tmp_path / "host-a", app.config["DATABASE_URL"], clock)  # host A starts
    finally:
        started.set()
        watcher.join(30)
        writer.close()
    assert "blocked" not in seen, "the start waited for a write transaction of another host (and queued its writers)"


def test_users_erase_waits_for_a_contact_request_in_the_persons_address_under_way(app, actor):
    """An erasure deletes every contact request sent in the person's address. One being stored at that moment
    (the contact form holds the address's name, db.lock_keys, from its count to its commit) was not seen by
    the erase's DELETE, committed after it, and stayed, with the address and the message, beside the erased
    account. The erase now takes the address's name too: it waits for that request, then deletes it."""
    import hashlib

    import psycopg

    from webapp.models import SupportRequest

    user = actor.user()
    conn = psycopg.connect(os.environ["TEST_DATABASE_URL"])
    name = int.from_bytes(hashlib.sha256(b"contact-email:alice@example.com").digest()[:8], "big", signed=True)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (name,))
    conn.execute("INSERT INTO supportrequest (email, message, user_id, created_at) "
                 "VALUES ('alice@example.com', 'Please delete my account', %s, now() AT TIME ZONE 'UTC')", (user.id,))
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "erase", flask_users(app, "erase", "alice@example.com", "--yes")), daemon=True)
    try:
        thread.start()
        blocked = wait_for_blocked_by(conn, pid, thread)
        conn.commit()  # the contact form's transaction ends
    finally:
        conn.close()
    thread.join(30)
    assert blocked and result["erase"].exit_code == 0, result["erase"].output
    assert "1 contact request(s)" in result["erase"].output
    with app.app_context():
        assert not SupportRequest.select().exists()
