"""Accounts: the operator CLI, the first-run admin page, sign-up, and start-up configuration checks."""
import os
from datetime import datetime, timedelta

import pytest
from cryptography.fernet import Fernet

from webapp import create_app
from webapp.config import ConfigError
from webapp.models import ALL_MODELS, AuditEvent, Device, ServerSession, User, normalise_email
from webapp.security import hash_password
from webapp.totp import decrypt_secret, encrypt_secret, new_secret

from .conftest import PASSWORD, Actor, csrf_from, record_statements
from .test_support import utc


def run(app, *args, input=None):
    return app.test_cli_runner().invoke(args=list(args), input=input)


# ------------------------------------------------------------------ CLI


def test_cli_creates_a_user_who_can_sign_in(app, actor):
    result = run(app, "users", "create", "Bob@Example.com", "--password", "long enough pw")
    assert result.exit_code == 0 and "created bob@example.com" in result.output
    r = actor.password_step(email="bob@example.com", password="long enough pw")
    assert r.status_code == 302 and r.headers["Location"] == "/settings"


MISMATCH = "Error: The two entered values do not match."  # click's words when the confirmation differs


def test_cli_says_an_address_is_wrong_before_asking_for_a_password(app, actor):
    """An operator's sweep: `users set-password` of an address with no account, and `users create` of one
    that has an account, asked for the new password twice and only then said so. They say it first, exit 1,
    and ask nothing."""
    actor.user("carol@example.com")
    for args, message in ((("set-password", "nobody@example.com"), "no account with email nobody@example.com"),
                          (("create", "Carol@Example.com"), "an account with email carol@example.com already exists")):
        result = run(app, "users", *args, input="")
        assert result.exit_code == 1 and message in result.output, result.output
        assert "password" not in result.output.lower().replace("set-password", "")


def test_cli_prompts_for_the_password(app, actor):
    """Left out of the command line (where the shell's history would keep it), the password is asked for
    twice, never shown on the terminal. A confirmation that differs makes nothing: the operator who gives up
    there has no account with a password they never confirmed; one who types it again gets the account with
    the confirmed password, and the mistyped ones open nothing."""
    result = run(app, "users", "create", "carol@example.com", "--admin", input="first try pass\nfirst try pas5\n")
    assert result.exit_code != 0 and MISMATCH in result.output
    assert "first try pas" not in result.output
    with app.app_context():
        assert User.select().count() == 0 and AuditEvent.select().count() == 0

    result = run(app, "users", "create", "carol@example.com", "--admin",
                 input="typed wrong one\ntyped wrong two\ns3cret pass\ns3cret pass\n")
    assert result.exit_code == 0, result.output
    assert MISMATCH in result.output and "created admin carol@example.com" in result.output
    for typed in ("typed wrong one", "typed wrong two", "s3cret pass"):
        assert typed not in result.output
    with app.app_context():
        assert User.by_email("carol@example.com").is_admin
    for typed in ("typed wrong one", "typed wrong two"):
        r = actor.password_step(email="carol@example.com", password=typed)
        assert r.status_code == 200 and "Location" not in r.headers
        actor.clock.advance(30)  # past the back-off a wrong password starts
    r = actor.password_step(email="carol@example.com", password="s3cret pass")
    assert r.status_code == 302 and r.headers["Location"] == "/settings"


@pytest.mark.parametrize("args,message", [
    (["users", "create", "not-an-email", "--password", "long enough pw"], "invalid email"),
    (["users", "create", "d@example.com", "--password", "short"], "at least 8"),
    # Eight characters typed, four as the password is hashed (NFKC): the forms refuse it too.
    (["users", "create", "d@example.com", "--password", "e\u0301" * 4], "at least 8"),
    # Eight spaces: the sign-in form refuses a blank password, so this account could never sign in.
    (["users", "create", "d@example.com", "--password", " " * 8], "only spaces"),
    (["users", "create", "d@example.com", "--password", "x" * 1025], "at most 1024"),
    # The app answers any request holding a NUL with a 400 (security.md 35): such a password could never be
    # typed into the sign-in form, and `users create` said "created" (a Unicode review).
    (["users", "create", "d@example.com", "--password", "abc\x00defghi"], "cannot hold a NUL"),
    # Digits that are not ASCII pass str.isdigit (superscripts, circled): int() then stopped in a traceback.
    (["users", "activity", "#\u00b2"], "no account with email #\u00b2"),
    (["users", "export", "#\u2460"], "no account and no contact request with email #\u2460"),
])
def test_cli_refuses_bad_input(app, args, message):
    result = run(app, *args)
    assert result.exit_code != 0 and message in result.output
    with app.app_context():
        assert User.select().count() == 0


def test_cli_refuses_duplicates(app, actor):
    actor.user()
    result = run(app, "users", "create", "ALICE@example.com", "--password", "long enough pw")
    assert result.exit_code != 0 and "already exists" in result.output
    with app.app_context():
        assert User.select().count() == 1


def test_cli_list_and_promote(app, actor, secret):
    actor.user(secret=secret)
    actor.user(email="bob@example.com")
    actor.user(email="root@example.com", admin=True)
    out = run(app, "users", "list").output
    assert "alice@example.com\tuser\t2FA active (1 device)" in out
    assert "bob@example.com\tuser\t2FA off" in out
    assert run(app, "users", "promote", "bob@example.com").exit_code == 0
    out = run(app, "users", "list").output
    assert "bob@example.com\tadmin" in out and "alice@example.com\tuser" in out  # the named account only
    assert run(app, "users", "promote", "bob@example.com", "--revoke").exit_code == 0
    out = run(app, "users", "list").output
    assert "bob@example.com\tuser" in out and "root@example.com\tadmin" in out
    assert run(app, "users", "promote", "nobody@example.com").exit_code != 0


def user_row(app, email):
    with app.app_context():
        return User.by_email(email)


def test_cli_promote_says_what_it_ended_and_keeps_one_admin(app, actor):
    """A changed role applies from the next sign-in, so promote ends the person's sessions: the command says
    so (it said only "is now an admin"). Revoking the last admin is refused: nobody could open the Support
    page any more, and the first-run page does not come back while accounts exist."""
    actor.user(email="root@example.com", admin=True)
    actor.sign_in(email="root@example.com")
    result = run(app, "users", "promote", "root@example.com", "--revoke")
    assert result.exit_code == 1
    assert "root@example.com is the only admin: promote another account first. Nothing changed." in result.output
    assert user_row(app, "root@example.com").is_admin and actor.client.get("/settings").status_code == 200
    actor.user(email="bob@example.com")
    result = run(app, "users", "promote", "  Bob@Example.com ")
    assert result.exit_code == 0 and "bob@example.com is now an admin; 0 session(s) ended" in result.output
    result = run(app, "users", "promote", "root@example.com", "--revoke")
    assert result.exit_code == 0
    assert result.output == ("root@example.com is now an ordinary user; 1 session(s) ended (the new role applies "
                             "from the next sign-in)\n")  # no word of the Support page, though root has no device
    assert actor.client.get("/settings").status_code == 302


def test_cli_promote_of_an_account_without_2fa_says_the_support_page_stays_closed(app, actor, secret, clock):
    """Promoting an account without an authenticator device succeeded without a word, yet the new admin is
    refused on the Support page until they set one up (security.md 37): a second line says so. An account
    with 2FA gets the one line."""
    actor.user(email="bob@example.com")
    result = run(app, "users", "promote", "bob@example.com")
    assert result.exit_code == 0
    assert result.output == ("bob@example.com is now an admin; 0 session(s) ended (the new role applies from the "
                             "next sign-in)\n"
                             "bob@example.com has no authenticator device: the Support page stays closed to them "
                             "until they set up two-factor authentication in User Settings\n")
    assert actor.sign_in(email="bob@example.com").headers["Location"] == "/settings"
    r = actor.client.get("/support")
    assert r.status_code == 403 and "Set up two-factor authentication first" in r.get_data(as_text=True)
    with app.app_context():
        assert User.by_email("bob@example.com").is_admin

    actor.user(email="carol@example.com", secret=secret)
    result = run(app, "users", "promote", "carol@example.com")
    assert result.exit_code == 0
    assert result.output == ("carol@example.com is now an admin; 0 session(s) ended (the new role applies from the "
                             "next sign-in)\n")
    carol = Actor(app, app.test_client(), clock)
    carol.sign_in(email="carol@example.com", secret=secret)
    assert carol.client.get("/support").status_code == 200


def test_cli_create_trims_the_address_as_the_other_commands_do(app):
    result = run(app, "users", "create", " Carol@Example.com ", "--password", "long enough pw")
    assert result.exit_code == 0 and "created carol@example.com" in result.output
    assert user_row(app, "carol@example.com") is not None


@pytest.mark.parametrize("length, taken", [(7, False), (8, True), (1024, True), (1025, False)])
def test_cli_takes_a_password_of_exactly_the_lengths_the_sign_in_form_takes(app, actor, length, taken):
    """8 to 1024 characters, as the forms: at each edge `users create` and `users set-password` agree, and
    a password they take signs in."""
    password = "p" * length
    created = run(app, "users", "create", "dora@example.com", "--password", password)
    actor.user()
    changed = run(app, "users", "set-password", "alice@example.com", "--password", password)
    assert (created.exit_code, changed.exit_code) == ((0, 0) if taken else (1, 1)), created.output
    if taken:
        for email in ("dora@example.com", "alice@example.com"):
            assert other_browser(actor).password_step(email, password).headers["Location"] == "/settings"
    else:
        assert "at least 8" in created.output if length < 8 else "at most 1024" in created.output
        assert user_row(app, "dora@example.com") is None


def test_cli_create_is_audited_and_says_when_it_made_an_admin(app):
    """security.md 42: an account the operator makes (an admin above all) leaves an audit record saying so, and
    the command's line says "admin" when it made one."""
    result = run(app, "users", "create", "carol@example.com", "--admin", "--password", "long enough pw")
    assert result.exit_code == 0 and result.output == "created admin carol@example.com\n"
    result = run(app, "users", "create", "dave@example.com", "--password", "long enough pw")
    assert result.exit_code == 0 and result.output == "created dave@example.com\n"
    with app.app_context():
        assert [(e.user.email, e.actor_id, e.details) for e in AuditEvent.select().where(
            AuditEvent.kind == "account_created").order_by(AuditEvent.id)] == [
            ("carol@example.com", None, {"via": "cli", "admin": True}),
            ("dave@example.com", None, {"via": "cli", "admin": False})]


def test_cli_list_is_in_address_order_and_counts_devices(app, actor, secret):
    """One line an account, by address whatever the order they were made in; several devices are counted."""
    actor.user(email="zoe@example.com")
    actor.user(email="bob@example.com", secret=secret, devices={"Tablet": new_secret()})
    actor.user(email="amy@example.com", secret=secret)
    assert run(app, "users", "list").output.splitlines() == [
        "amy@example.com\tuser\t2FA active (1 device)", "bob@example.com\tuser\t2FA active (2 devices)",
        "zoe@example.com\tuser\t2FA off"]


def test_cli_list_reads_the_devices_of_all_accounts_in_one_statement(app, actor, secret, monkeypatch):
    """`users list` counted each account's devices with a statement of its own: 100,000 accounts took 13 s on
    SQLite and 23 s on PostgreSQL (a scale review). The statements it runs do not grow with the accounts."""
    from webapp.db import db

    def statements():
        ran, execute_sql = [], db.obj.execute_sql
        with monkeypatch.context() as patch:
            patch.setattr(db.obj, "execute_sql", lambda sql, params=None: ran.append(sql) or execute_sql(sql, params))
            output = run(app, "users", "list").output
        return len(ran), output

    actor.user(email="amy@example.com", secret=secret)
    few, _ = statements()
    for n in range(5):
        actor.user(email=f"user{n}@example.com", secret=secret, devices={"Tablet": new_secret()} if n % 2 else None)
    many, output = statements()
    assert many == few and "user1@example.com\tuser\t2FA active (2 devices)" in output.splitlines()


def test_cli_list_sorts_addresses_by_code_point_as_the_support_page_does_on_either_database(app, actor):
    """`users list` sorted by the database's collation: on PostgreSQL (ICU en-US) "a.b" came before "a+tag",
    "bob_1" before "bob" and "émile" before "zed", another order than on SQLite and than the Support page's.
    Now it is code point order on both, the Support page's."""
    from webapp.support import user_search_query

    typed = ["zed", "émile", "bob-3", "böb", "a.b", "bob_1", "a+tag", "bob"]
    for name in typed:
        actor.user(email=f"{name}@example.com")
    listed = [line.split("\t")[0] for line in run(app, "users", "list").output.splitlines()]
    assert listed == sorted(f"{name}@example.com" for name in typed) == [
        "a+tag@example.com", "a.b@example.com", "bob-3@example.com", "bob@example.com", "bob_1@example.com",
        "böb@example.com", "zed@example.com", "émile@example.com"]
    with app.test_request_context():
        assert listed == [user.email for user in user_search_query("")]  # the Support page's list


def test_cli_commands_that_would_change_nothing_say_so_and_leave_sessions_and_the_log_alone(app, actor, secret):
    """Promoting an admin, revoking an ordinary user, resetting the 2FA of an account without any: each used
    to sign the person out everywhere and record a change that did not happen."""
    actor.user(email="admin@example.com", admin=True)
    actor.user(secret=None)
    actor.user(email="bob@example.com", secret=secret)  # someone else's device does not count
    actor.sign_in()
    with app.app_context():
        before = AuditEvent.select().count()
    for args, said in ((["promote", "admin@example.com"], "admin@example.com is already an admin; nothing changed"),
                       (["promote", "alice@example.com", "--revoke"],
                        "alice@example.com is already an ordinary user; nothing changed"),
                       (["reset-2fa", "alice@example.com"],
                        "alice@example.com has no authenticator device; nothing changed")):
        result = run(app, "users", *args)
        assert result.exit_code == 0 and said in result.output, result.output
    with app.app_context():
        assert AuditEvent.select().count() == before
        assert User.by_email("admin@example.com").is_admin and not User.by_email("alice@example.com").is_admin
    assert actor.client.get("/settings").status_code == 200  # still signed in


def test_cli_list_of_an_empty_database_names_the_database(app, monkeypatch):
    """Pointed at the wrong database (no DATABASE_URL: the development instance), `users list` printed
    nothing at all; now it says there are no accounts there, on stderr, without the password."""
    from webapp import cli

    result = run(app, "users", "list")
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr == f"no accounts in {app.config['DATABASE_URL']}\n"
    with app.app_context():
        for url, shown in (("postgresql://twostep:s3cr3t@db.internal:5432/twostep",
                            "postgresql://twostep:***@db.internal:5432/twostep"),
                           ("postgresql://twostep:s3cr3t@/twostep?host=/run/postgresql",  # a Unix socket: no host
                            "postgresql://twostep:***@/twostep?host=/run/postgresql"),
                           ("postgresql://twostep:p@ss:word@[2001:db8::5]:5432/twostep",
                            "postgresql://twostep:***@[2001:db8::5]:5432/twostep"),
                           ("postgresql://twostep@db.internal/twostep", "postgresql://twostep@db.internal/twostep"),
                           ("postgresql:///twostep?user=twostep&password=s3cr3t&sslmode=require",
                            "postgresql:///twostep?user=twostep&password=***&sslmode=require")):
            monkeypatch.setitem(app.config, "DATABASE_URL", url)
            assert cli._database_name() == shown


def test_cli_set_password_replaces_it_and_ends_every_session(app, actor, secret, clock):
    """The operator's answer to a forgotten or leaked password: the old one stops working, every session of
    the account ends, the password throttle starts over, the 2FA device stays, and it is audited."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    with app.app_context():
        User.update(password_failures=4, password_locked_until=None).where(User.email == "alice@example.com").execute()
    # A confirmation that differs (the operator gives up there) changes nothing and ends nothing, and neither
    # typing shows on the terminal.
    result = run(app, "users", "set-password", "alice@example.com", input="half typed pass\nhalf typed pa55\n")
    assert result.exit_code != 0 and MISMATCH in result.output and "half typed pa" not in result.output
    assert actor.client.get("/settings").status_code == 200
    with app.app_context():
        assert User.by_email("alice@example.com").password_failures == 4
        assert AuditEvent.select().where(AuditEvent.kind == "password_changed").count() == 0
    # Mistyped once, then confirmed: the confirmed one is set; the mistyped one, shown nowhere, opens nothing.
    result = run(app, "users", "set-password", "alice@example.com",
                 input="brand new typo\nbrand new pass\nbrand new pass\nbrand new pass\n")
    assert result.exit_code == 0 and "new password set for alice@example.com; 1 session(s) ended" in result.output
    assert MISMATCH in result.output and "brand new" not in result.output
    assert actor.client.get("/settings").status_code == 302
    with app.app_context():
        user = User.by_email("alice@example.com")
        assert user.password_failures == 0 and Device.select().where(Device.user == user.id).count() == 1
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 0
        [event] = AuditEvent.select().where(AuditEvent.kind == "password_changed")
        assert event.details == {"via": "cli", "sessions_ended": 1}
    other = Actor(app, app.test_client(), clock)
    for wrong in (PASSWORD, "brand new typo"):
        r = other.password_step(password=wrong)
        assert r.status_code == 200 and "/login/verify" not in r.headers.get("Location", "")
        clock.advance(30)
    r = other.password_step(password="brand new pass")
    assert r.status_code == 302 and r.headers["Location"] == "/login/verify"
    for bad, message in (("short", "at least 8"), (" " * 9, "only spaces")):
        result = run(app, "users", "set-password", "alice@example.com", "--password", bad)
        assert result.exit_code != 0 and message in result.output
    assert run(app, "users", "set-password", "nobody@example.com", "--password", "long enough").exit_code != 0


def test_cli_list_shows_supports_window_and_the_block_after_it(app, actor, clock):
    """An operator can tell who signs in with the password alone for now and who cannot sign in at all, as the
    Support page can ("Temporarily off", "Blocked"): both have no device, like an account without 2FA."""
    from datetime import timedelta

    from webapp.clock import now

    for email in ("bob@example.com", "carol@example.com", "dave@example.com"):
        actor.user(email=email)
    with app.app_context():
        User.update(tfa_reset_until=now() + timedelta(hours=24)).where(User.email == "bob@example.com").execute()
        User.update(tfa_reset_until=now() - timedelta(hours=1)).where(User.email == "carol@example.com").execute()
        soon, past = now() + timedelta(hours=24), now() - timedelta(hours=1)
    out = run(app, "users", "list").output
    assert f"bob@example.com\tuser\t2FA temporarily off: password alone until {soon:%Y-%m-%d %H:%M} UTC (support)" in out
    assert (f"carol@example.com\tuser\tblocked: support's window ended {past:%Y-%m-%d %H:%M} UTC without a new device"
            in out)
    assert "dave@example.com\tuser\t2FA off\n" in out


def test_cli_reset_2fa_removes_devices_and_sessions(app, actor, secret):
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    with app.app_context():  # a lock under way ends with the reset, counters and all
        User.update(code_failures=7, code_strikes=6, code_locked_until=datetime(2100, 1, 1)).where(
            User.id == user.id).execute()
        device_id = Device.get().id
    result = run(app, "users", "reset-2fa", "alice@example.com")
    assert result.exit_code == 0 and "removed 1 device(s) of alice@example.com; 2FA is off; 1 session(s) ended" in result.output
    with app.app_context():
        assert Device.select().count() == 0
        assert ServerSession.select().where(ServerSession.user.is_null(False)).count() == 0
        [event] = AuditEvent.select().where(AuditEvent.kind == "tfa_reset")  # security.md 42, 43
        # What the reset lifted, for an investigation: the refused codes and the lock still running; and the
        # devices it removed by name and number, as support's disable names them (names repeat and change).
        assert (event.user_id, event.details) == (user.id, {"via": "cli", "devices_removed": 1, "code_failures": 7,
                                                            "code_locked_until": "2100-01-01T00:00:00Z",
                                                            "devices": "Phone", "device_ids": [device_id]})
        row = User.get_by_id(user.id)
        assert (row.code_failures, row.code_strikes, row.code_locked_until) == (0, 0, None)
    assert actor.client.get("/settings").status_code == 302


def test_cli_key_rotation_reencrypts_every_secret(app, actor, secret):
    """security.md 4: after rotation the old key can go; each secret still decrypts, to its own value, with the
    new one."""
    tablet = new_secret()
    actor.user(secret=secret, devices={"Tablet": tablet})
    old = app.config["TOTP_ENCRYPTION_KEYS"]
    new = Fernet.generate_key().decode()
    app.config["TOTP_ENCRYPTION_KEYS"] = f"{new},{old}"
    result = run(app, "keys", "rotate")
    assert result.exit_code == 0 and "re-encrypted 2 secret" in result.output
    app.config["TOTP_ENCRYPTION_KEYS"] = new
    with app.app_context():
        assert {d.name: decrypt_secret(d.secret_enc) for d in Device.select()} == {"Phone": secret, "Tablet": tablet}


def test_cli_key_rotation_is_audited(app, actor, secret):
    """security.md 42: the rotation rewrites every stored secret, and wrote no audit record: now one, for
    nobody in particular, through the command line, with how many secrets it re-encrypted (a device and a
    key waiting in the wizard here)."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.client.post("/settings/2fa/start", data={"csrf_token": actor.csrf("/settings")})  # a pending key
    app.config["TOTP_ENCRYPTION_KEYS"] = f"{Fernet.generate_key().decode()},{app.config['TOTP_ENCRYPTION_KEYS']}"
    result = run(app, "keys", "rotate")
    assert result.exit_code == 0 and result.output == "re-encrypted 2 secret(s) with the newest key\n"
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "totp_keys_rotated")
        assert (event.user_id, event.actor_id, event.details) == (None, None, {"via": "cli", "count": 2})


def test_cli_key_rotation_without_the_old_key_says_so_and_changes_nothing(app, actor, secret):
    """A secret that none of the configured keys opens: a message naming the row and the fix, exit 1, no
    traceback, and every secret left as it was (the rotation is one transaction)."""
    actor.user(secret=secret, devices={"Tablet": new_secret()})
    with app.app_context():
        before = [d.secret_enc for d in Device.select().order_by(Device.id)]
    app.config["TOTP_ENCRYPTION_KEYS"] = Fernet.generate_key().decode()
    result = run(app, "keys", "rotate")
    assert result.exit_code == 1
    assert "device 1 (alice@example.com's): its secret opens with none of the keys in TOTP_ENCRYPTION_KEYS" in result.output
    assert "Nothing was changed" in result.output and "Traceback" not in result.output
    with app.app_context():
        assert [d.secret_enc for d in Device.select().order_by(Device.id)] == before
        assert not AuditEvent.select().where(AuditEvent.kind == "totp_keys_rotated").exists()  # nothing rotated


@pytest.mark.parametrize("limit", ["0", "99999999999999999999"])
def test_cli_activity_refuses_a_limit_out_of_range(app, actor, limit):
    actor.user()
    result = run(app, "users", "activity", "alice@example.com", "--limit", limit)
    assert result.exit_code == 2 and "1<=x<=10000" in result.output


def test_cli_activity_shows_the_newest_events_first_up_to_the_limit_with_their_address(app, actor, clock):
    """`users activity` reads newest first (events of one second in the order they were written), stops at
    --limit, and ends each line with the client address the event came from."""
    user = actor.user()
    at = utc(clock.t)
    with app.app_context():
        for kind, seconds, ip in (("signin", 0, "198.51.100.7"), ("signout", 1, None), ("tfa_enabled", 1, None)):
            AuditEvent.create(kind=kind, user=user.id, created_at=at + timedelta(seconds=seconds), ip=ip,
                              detail="{}")
    result = run(app, "users", "activity", "alice@example.com", "--limit", "2")
    assert result.exit_code == 0 and result.output == (f"{at + timedelta(seconds=1):%Y-%m-%d %H:%M:%S} UTC  "
                                                       "Two-factor authentication turned on\n"
                                                       f"{at + timedelta(seconds=1):%Y-%m-%d %H:%M:%S} UTC  "
                                                       "Signed out\n")
    lines = run(app, "users", "activity", "alice@example.com").output.splitlines()
    assert len(lines) == 3
    assert lines[2] == f"{at:%Y-%m-%d %H:%M:%S} UTC  Signed in with password only  from 198.51.100.7"


def test_cli_activity_prints_each_event_on_one_line_whatever_a_reason_holds(app, actor, clock):
    """Support's reasons may hold line breaks (the form keeps them): `users activity` printed them as they are,
    so a reason could add lines that read as events of their own, "Account enabled again by the server
    operator" included (a Unicode review). Each event is one line; what was typed stays readable, escaped."""
    import json

    user = actor.user()
    root = actor.user(email="root@example.com", admin=True)
    forged = "Identity checked by video call\n2009-02-13 23:31:30 UTC  Account enabled again by the server operator"
    with app.app_context():
        AuditEvent.create(kind="support_tfa_disabled", user=user.id, actor=root.id, created_at=utc(clock.t),
                          detail=json.dumps({"reason": forged, "hours": 24}))
    result = run(app, "users", "activity", "alice@example.com")
    assert result.exit_code == 0, result.output
    [line] = result.output.splitlines()
    assert "Support turned off 2FA" in line and "by root@example.com" in line
    assert "Identity checked by video call\\n2009-02-13 23:31:30 UTC  Account enabled again" in line


ONLY_VISIBLE = "may hold letters, digits, spaces, punctuation and line breaks only"


@pytest.mark.parametrize("reason,said", [
    ("x" * 501, "can have at most 500 characters"),
    ("left the company \u202eeno rehtona", ONLY_VISIBLE),
    ("left\x1b[31m in red", ONLY_VISIBLE),
])
def test_cli_disable_takes_a_reason_as_supports_form_does(app, actor, reason, said):
    """`users disable --reason` stored anything: 100,000 characters, a right-to-left override (shown reversed
    on the audit log page), an escape sequence (printed to the terminal of whoever runs `users activity`).
    It takes what support's form takes (500 characters, no characters that hide or reorder text): anything
    else is one `Error:` line and the account stays in use."""
    actor.user()
    result = run(app, "users", "disable", "alice@example.com", "--reason", reason)
    assert result.exit_code == 1 and result.output == f"Error: --reason {said}. Nothing changed.\n"
    with app.app_context():
        assert User.get().disabled_at is None and AuditEvent.select().count() == 0
    result = run(app, "users", "disable", "alice@example.com", "--reason", "  left the company\r\nticket T-9  ")
    assert result.exit_code == 0, result.output
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "account_disabled")
        assert event.details["reason"] == "left the company\nticket T-9"


def wrong_code(actor, secret):
    """A six-digit code that no step near the clock's time accepts."""
    valid = {actor.code(secret, k) for k in range(-2, 3)}
    return next(c for c in (f"{n:06d}" for n in range(1000)) if c not in valid)


def lock_code_entry(actor, secret):
    """Five wrong codes, each after the previous one's wait (1, 2, 4, 8 s): the fifth locks the account's code
    entry for 15 minutes (security.backoff). Returns when the lock ends."""
    assert actor.password_step().headers["Location"] == "/login/verify"
    for wait in (0, 1, 2, 4, 8):
        actor.clock.advance(wait)
        actor.code_step(wrong_code(actor, secret))
    return utc(actor.clock.t) + timedelta(minutes=15)


def lock_password_entry(actor, email="alice@example.com", times=5):
    """`times` wrong passwords in this browser, each after the previous one's wait; with five, the password
    entry this browser meets (its own counter if it is known for the account, else the account's) locks for
    15 minutes. Returns when the last wait ends."""
    for wait in (0, 1, 2, 4, 8)[:times]:
        actor.clock.advance(wait)
        assert actor.password_step(email=email, password="wrong password").status_code == 200
    return utc(actor.clock.t) + (timedelta(minutes=15) if times == 5 else timedelta(seconds=2 ** (times - 1)))


def other_browser(actor):
    return Actor(actor.app, actor.app.test_client(), actor.clock)


def test_cli_list_shows_when_code_or_password_entry_waits(app, actor, secret, clock):
    """`users list` said "2FA active" of an account whose code entry was locked: the operator asked why the
    person could not sign in had nothing to go on. Now each wait that failed attempts put on the account
    follows its 2FA status: the code entry's, the password entry's, and that of the person's own browsers
    (wrong passwords typed in a browser known for them count there, not on the account); a short pause
    after the first failures is called one. Once the wait is over, the line is as before."""
    actor.user(secret=secret)
    for email in ("bob@example.com", "carol@example.com", "dave@example.com"):
        actor.user(email=email)
    code_lock = lock_code_entry(actor, secret)
    bob_lock = lock_password_entry(other_browser(actor), "bob@example.com")
    carols = other_browser(actor)
    assert carols.password_step(email="carol@example.com").headers["Location"] == "/settings"
    carols.client.post("/logout", data={"csrf_token": carols.csrf("/settings")})
    carol_lock = lock_password_entry(carols, "carol@example.com")
    dave_pause = lock_password_entry(other_browser(actor), "dave@example.com", times=1)

    result = run(app, "users", "list")
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        f"alice@example.com\tuser\t2FA active (1 device); code entry locked until {code_lock:%Y-%m-%d %H:%M:%S} UTC",
        f"bob@example.com\tuser\t2FA off; password entry locked until {bob_lock:%Y-%m-%d %H:%M:%S} UTC",
        f"carol@example.com\tuser\t2FA off; password entry in 1 known browser(s) locked until "
        f"{carol_lock:%Y-%m-%d %H:%M:%S} UTC",
        f"dave@example.com\tuser\t2FA off; password entry paused until {dave_pause:%Y-%m-%d %H:%M:%S} UTC"]
    clock.advance(15 * 60)
    assert run(app, "users", "list").output.splitlines() == [
        "alice@example.com\tuser\t2FA active (1 device)", "bob@example.com\tuser\t2FA off",
        "carol@example.com\tuser\t2FA off", "dave@example.com\tuser\t2FA off"]


def test_cli_unlock_clears_a_code_lock_and_nothing_else(app, actor, secret, clock):
    """security.md 42, 43: the operator lets someone whose code entry is locked sign in again without
    `users reset-2fa`, which took their devices. `users unlock` clears the refused codes, the strikes and the
    lock; the person's device, their session in another browser and their half-finished sign-in stay. It
    writes one audit record saying what it cleared, shown in `users activity`; run again, it says there is
    nothing to clear and writes none."""
    user = actor.user(secret=secret)
    signed_in = other_browser(actor)
    signed_in.sign_in(secret=secret)
    clock.advance(30)  # the next step's code: the one just used would be a replay
    until = lock_code_entry(actor, secret)
    clock.advance(60)
    assert actor.password_step().headers["Location"] == "/login/verify"
    r = actor.code_refused(actor.code(secret))
    assert r.status_code == 429 and "Too many wrong codes. Wait 14 minutes" in r.get_data(as_text=True)

    result = run(app, "users", "unlock", "  Alice@Example.com ")
    assert result.exit_code == 0, result.output
    assert result.output == (f"cleared for alice@example.com: code entry (6 refused code(s), locked until "
                             f"{until:%Y-%m-%d %H:%M:%S} UTC); nothing else changed\n")
    with app.app_context():
        row = User.get_by_id(user.id)
        assert (row.code_failures, row.code_strikes, row.code_locked_until) == (0, 0, None)
        assert Device.select().where(Device.user == user.id).count() == 1
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 1
        [event] = AuditEvent.select().where(AuditEvent.kind == "throttle_cleared")
        assert (event.user_id, event.actor_id, event.ip) == (user.id, None, None)
        assert event.details == {"via": "cli", "code_failures": 6, "code_locked_until": until.isoformat() + "Z"}
    assert signed_in.client.get("/settings").status_code == 200
    clock.advance(30)
    r = actor.code_step(actor.code(secret))  # the same code step, at once: the lock is gone
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    activity = run(app, "users", "activity", "alice@example.com").output
    assert ("Failed sign-in attempts cleared by the server operator  [Through: command line; Refused codes "
            f"cleared: 6; Code entry was locked until: {until:%Y-%m-%d %H:%M:%S} UTC]") in activity

    assert_unlock_finds_nothing(app)
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "throttle_cleared").count() == 1


def assert_unlock_finds_nothing(app, email="alice@example.com"):
    """`users unlock` on an account with nothing counted: it says so, succeeds, and changes nothing."""
    result = run(app, "users", "unlock", email)
    assert result.exit_code == 0
    assert result.output == f"{email} has no failed sign-in attempts counted; nothing to clear; nothing changed\n"


def test_cli_unlock_clears_the_password_lock_of_the_account_and_of_the_persons_browsers(app, actor, clock):
    """security.md 42: wrong passwords typed in a browser the person signed in from lock that browser alone;
    elsewhere they lock the account. Either can be what keeps the owner out (their own browser, after their
    own typos; a new one, after a stranger's guesses), so `users unlock` clears both, and keeps the browser
    known (its row and cookie stay: deleting it would end more than the lock)."""
    from webapp.models import KnownBrowser

    user = actor.user()
    assert actor.password_step().headers["Location"] == "/settings"
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    browser_lock = lock_password_entry(actor)  # the owner's own browser: counted there
    elsewhere = other_browser(actor)
    account_lock = lock_password_entry(elsewhere)  # a browser not known for the account: counted on it
    for person in (actor, elsewhere):
        assert person.password_step().status_code == 429  # the right password, refused (not counted)

    result = run(app, "users", "unlock", "alice@example.com")
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"cleared for alice@example.com: password entry (5 wrong password(s), locked until "
        f"{account_lock:%Y-%m-%d %H:%M:%S} UTC); password entry in 1 known browser(s) (5 wrong password(s), "
        f"1 of them locked until {browser_lock:%Y-%m-%d %H:%M:%S} UTC); nothing else changed\n")
    with app.app_context():
        row = User.get_by_id(user.id)
        assert (row.password_failures, row.password_locked_until) == (0, None)
        [browser] = KnownBrowser.select().where(KnownBrowser.user == user.id)
        assert (browser.password_failures, browser.password_locked_until) == (0, None)
        [event] = AuditEvent.select().where(AuditEvent.kind == "throttle_cleared")
        assert event.details == {"via": "cli", "password_failures": 5,
                                 "password_locked_until": account_lock.isoformat() + "Z", "known_browsers": 1,
                                 "known_browser_failures": 5}
    for person in (actor, elsewhere):
        r = person.password_step()
        assert r.status_code == 302 and r.headers["Location"] == "/settings"


def known_browser_of(actor, email):
    """A browser that completed a sign-in (password only) for `email` and signed out: known for that account."""
    browser = other_browser(actor)
    assert browser.password_step(email=email).headers["Location"] == "/settings"
    browser.client.post("/logout", data={"csrf_token": browser.csrf("/settings")})
    return browser


def list_line(app, email):
    [line] = [line for line in run(app, "users", "list").output.splitlines() if line.startswith(email + "\t")]
    return line


def test_cli_unlock_leaves_other_accounts_known_browsers_alone(app, actor, clock):
    """security.md 18, 42: `users unlock` clears the wrong passwords counted in the named person's own known
    browsers, not those of everyone: Bob's browser, locked by wrong passwords typed in it, stays locked (its
    count, its wait, its line in `users list`) after the operator unlocks Alice."""
    from webapp.models import KnownBrowser

    alice, bob = actor.user(), actor.user(email="bob@example.com")
    alices = known_browser_of(actor, "alice@example.com")
    bobs = known_browser_of(actor, "bob@example.com")
    bob_lock = lock_password_entry(bobs, "bob@example.com")  # five: Bob's browser locks for 15 minutes
    alice_pause = lock_password_entry(alices, times=2)  # two: Alice's browser pauses for 2 seconds
    bob_line = list_line(app, "bob@example.com")
    assert bob_line == (f"bob@example.com\tuser\t2FA off; password entry in 1 known browser(s) locked until "
                        f"{bob_lock:%Y-%m-%d %H:%M:%S} UTC")

    result = run(app, "users", "unlock", "alice@example.com")
    assert result.exit_code == 0, result.output
    assert result.output == (f"cleared for alice@example.com: password entry in 1 known browser(s) (2 wrong "
                             f"password(s), 1 of them paused until {alice_pause:%Y-%m-%d %H:%M:%S} UTC); nothing "
                             "else changed\n")
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "throttle_cleared")
        assert event.details == {"via": "cli", "known_browsers": 1, "known_browser_failures": 2}
        [bobs_row] = KnownBrowser.select().where(KnownBrowser.user == bob.id)
        assert (bobs_row.password_failures, bobs_row.password_locked_until) == (5, bob_lock)
        [alices_row] = KnownBrowser.select().where(KnownBrowser.user == alice.id)
        assert (alices_row.password_failures, alices_row.password_locked_until) == (0, None)
    assert list_line(app, "bob@example.com") == bob_line
    assert list_line(app, "alice@example.com") == "alice@example.com\tuser\t2FA off"
    assert bobs.password_step(email="bob@example.com").status_code == 429  # Bob's browser still waits
    assert alices.password_step().headers["Location"] == "/settings"  # Alice's does not


def test_cli_list_and_unlock_count_each_of_the_persons_browsers(app, actor, clock):
    """security.md 18, 42: with several of the person's browsers counting wrong passwords, `users list` names
    the ones that wait now and the latest end of their waits; `users unlock` clears every one that counted
    any (a browser whose pause is over too), says how many of them were waiting, and records them all.
    A browser that only counted, its pause over, is cleared without a word of a wait."""
    from webapp.models import KnownBrowser

    actor.user()
    first, second, third = (known_browser_of(actor, "alice@example.com") for _ in range(3))
    lock_password_entry(first, times=1)  # a pause of one second
    clock.advance(1)
    result = run(app, "users", "unlock", "alice@example.com")
    assert result.output == ("cleared for alice@example.com: password entry in 1 known browser(s) (1 wrong "
                             "password(s)); nothing else changed\n")

    lock_password_entry(first, times=1)
    clock.advance(1)  # the first browser's pause is over; it still counts its wrong password
    earlier = lock_password_entry(second)
    later = lock_password_entry(third)
    assert earlier < later
    assert list_line(app, "alice@example.com") == (f"alice@example.com\tuser\t2FA off; password entry in 2 known "
                                                   f"browser(s) locked until {later:%Y-%m-%d %H:%M:%S} UTC")
    result = run(app, "users", "unlock", "alice@example.com")
    assert result.output == (f"cleared for alice@example.com: password entry in 3 known browser(s) (11 wrong "
                             f"password(s), 2 of them locked until {later:%Y-%m-%d %H:%M:%S} UTC); nothing else "
                             "changed\n")
    with app.app_context():
        event = AuditEvent.select().where(AuditEvent.kind == "throttle_cleared").order_by(AuditEvent.id.desc()).get()
        assert event.details == {"via": "cli", "known_browsers": 3, "known_browser_failures": 11}
        assert KnownBrowser.select().where(KnownBrowser.password_failures > 0).count() == 0


def test_a_browser_past_its_lifetime_is_neither_listed_nor_cleared(app, actor, clock):
    """security.md 18: a browser not used to sign in for KNOWN_BROWSER_TTL is no longer known: a sign-in there
    counts on the account, whatever the browser counted. Its count can outlive that (wrong passwords do not
    make it live longer): `users list` does not name its wait, which keeps nobody out, and `users unlock` has
    nothing of it to clear (nor says it cleared anything). From that browser the right password signs in."""
    from webapp.models import KnownBrowser

    user = actor.user()
    alices = known_browser_of(actor, "alice@example.com")
    ends = clock.t + app.config["KNOWN_BROWSER_TTL"].total_seconds()
    clock.advance(ends - clock.t - 10 * 60)  # ten minutes of the browser's lifetime left
    lock = lock_password_entry(alices)  # locked for 15 minutes, counted in the browser
    assert list_line(app, "alice@example.com") == (f"alice@example.com\tuser\t2FA off; password entry in 1 known "
                                                   f"browser(s) locked until {lock:%Y-%m-%d %H:%M:%S} UTC")
    clock.advance(ends - clock.t)  # the browser's lifetime ends this instant; the lock it counted still runs
    assert utc(clock.t) < lock
    assert list_line(app, "alice@example.com") == "alice@example.com\tuser\t2FA off"
    assert_unlock_finds_nothing(app)
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "throttle_cleared").count() == 0
        [row] = KnownBrowser.select().where(KnownBrowser.user == user.id)
        assert (row.password_failures, row.password_locked_until) == (5, lock)
    assert alices.password_step().headers["Location"] == "/settings"


def test_cli_list_shows_no_wait_from_the_instant_it_ends(app, actor, secret, clock):
    """security.md 18: a wait ends at its `until`, where the code step takes a code again: `users list`, asked
    at that very instant, no longer names it (a second before, it does)."""
    actor.user(secret=secret)
    actor.user(email="bob@example.com")
    code_lock = lock_code_entry(actor, secret)  # the fifth wrong code was sent now
    clock.advance(15 * 60 - 1)
    assert list_line(app, "alice@example.com") == (f"alice@example.com\tuser\t2FA active (1 device); code entry "
                                                   f"locked until {code_lock:%Y-%m-%d %H:%M:%S} UTC")
    bob_pause = lock_password_entry(other_browser(actor), "bob@example.com", times=1)  # a pause of 1 second
    clock.advance(1)
    assert utc(clock.t) == code_lock == bob_pause
    assert run(app, "users", "list").output.splitlines() == [
        "alice@example.com\tuser\t2FA active (1 device)", "bob@example.com\tuser\t2FA off"]
    assert actor.password_step().headers["Location"] == "/login/verify"
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"  # taken at that instant


def test_four_wrong_codes_pause_the_code_entry_and_the_list_says_paused(app, actor, secret, clock):
    """security.md 18: THROTTLE_FREE_FAILURES (4) wrong codes checked set the short pauses (1, 2, 4, 8 s), not
    the lock, whatever else was refused meanwhile: the next code step says "Wait 8 seconds before entering
    another code" (not "Too many wrong codes") and `users list` says "paused", also once codes sent during
    the pause have made the refused codes 6 (only the 4 checked codes, the strikes, set the wait)."""
    user = actor.user(secret=secret)
    assert app.config["THROTTLE_FREE_FAILURES"] == 4
    assert actor.password_step().headers["Location"] == "/login/verify"
    for wait in (0, 1, 2, 4):
        clock.advance(wait)
        assert "That code is not valid" in actor.code_refused(wrong_code(actor, secret)).get_data(as_text=True)
    pause = utc(clock.t) + timedelta(seconds=8)
    assert actor.password_step().headers["Location"] == "/login/verify"  # a new code step (the old one had 4)
    page = actor.client.get("/login/verify").get_data(as_text=True)
    assert "Too many" not in page and "Wait" not in page
    for code in (actor.code(secret), wrong_code(actor, secret)):  # refused during the pause, counted
        r = actor.code_refused(code)
        assert r.status_code == 429 and "Wait 8 seconds before entering another code." in r.get_data(as_text=True)
        assert "Too many" not in r.get_data(as_text=True)
    with app.app_context():
        row = User.get_by_id(user.id)
        assert (row.code_failures, row.code_strikes, row.code_locked_until) == (6, 4, pause)
    assert list_line(app, "alice@example.com") == (f"alice@example.com\tuser\t2FA active (1 device); code entry "
                                                   f"paused until {pause:%Y-%m-%d %H:%M:%S} UTC")


def test_cli_unlock_after_the_wait_ended_records_no_wait_it_lifted(app, actor, secret, clock):
    """security.md 42, 43: the audit record of `users unlock` names a lock it lifted only when one still ran:
    once the 15 minutes are over it keeps the counts cleared, not a "locked until" in the past that reads as
    if the operator had cut a lock short. The command's words say no wait either. Run at the very instant
    the later lock ends (when the sign-in takes the password again), it names neither."""
    user = actor.user(secret=secret)
    code_lock = lock_code_entry(actor, secret)
    password_lock = lock_password_entry(other_browser(actor))
    assert password_lock > code_lock
    clock.advance((password_lock - utc(clock.t)).total_seconds())
    assert utc(clock.t) == password_lock
    result = run(app, "users", "unlock", "alice@example.com")
    assert result.exit_code == 0, result.output
    assert result.output == ("cleared for alice@example.com: code entry (5 refused code(s)); password entry (5 wrong "
                             "password(s)); nothing else changed\n")
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "throttle_cleared")
        assert event.details == {"via": "cli", "code_failures": 5, "password_failures": 5}
        row = User.get_by_id(user.id)
        assert (row.code_failures, row.code_strikes, row.code_locked_until) == (0, 0, None)
        assert (row.password_failures, row.password_locked_until) == (0, None)
    assert "locked until" not in run(app, "users", "activity", "alice@example.com").output


def test_cli_unlock_of_an_unknown_address_fails_and_writes_nothing(app, actor):
    """The address the command looked for is named as it would be stored (trimmed, lower-case)."""
    actor.user()
    result = run(app, "users", "unlock", " Nobody@Example.com ")
    assert result.exit_code == 1
    assert result.output == "Error: no account with email nobody@example.com\n"
    with app.app_context():
        assert AuditEvent.select().count() == 0


@pytest.mark.parametrize("args,refused", [
    # "\udcff" is what Python makes of the byte 0xff on the command line ($'\xff' in the shell), "\udce9" of 0xe9
    # ("é" in Latin-1), "\udcfb" of 0xfb ("û").
    (["users", "activity", "\udcff@example.com"], "EMAIL \\xff@example.com"),
    (["users", "create", "b\udce9b@example.com"], "EMAIL b\\xe9b@example.com"),
    (["users", "set-password", "\udcff@example.com"], "EMAIL \\xff@example.com"),
    (["users", "promote", "#\udcff"], "EMAIL #\\xff"),
    (["users", "reset-2fa", "\udcff@example.com"], "EMAIL \\xff@example.com"),
    (["users", "unlock", "\udcff@example.com"], "EMAIL \\xff@example.com"),
    (["users", "disable", "\udcff@example.com"], "EMAIL \\xff@example.com"),
    (["users", "enable", "\udcff@example.com"], "EMAIL \\xff@example.com"),
    (["networks", "clear", "\udcff"], "ADDRESS \\xff"),
    (["networks", "clear", "203.0.113.\udcff", "--limit", "sign-ups"], "ADDRESS 203.0.113.\\xff"),
    # Stored in the audit record, it made `users activity` of that account end in the same traceback.
    (["users", "disable", "alice@example.com", "--reason", "left in ao\udcfbt"], "--reason left in ao\\xfbt"),
    (["users", "create", "d@example.com", "--password", "long enough \udcff"], "the password"),  # not shown
    (["users", "set-password", "alice@example.com", "--password", "long enough \udcff"], "the password"),
])
def test_cli_says_in_one_line_that_an_argument_is_not_utf8(app, actor, args, refused):
    """An operator's argument with bytes that are not UTF-8 (`users activity $'\\xff@example.com'`, a script
    saved in Latin-1) ended in a UnicodeEncodeError traceback from the database driver. Each command that
    takes an address, an account or a network says it in one `Error:` line as the bytes were typed (and so
    for a reason or a password given with it, the password not shown), exits 1 like any other bad argument,
    asks for no password and changes nothing."""
    actor.user()
    result = run(app, *args, input="")
    assert result.exit_code == 1, result.output
    assert result.output == (f"Error: {refused} is not UTF-8 text (a terminal or a script in another "
                             "character encoding?)\n")
    with app.app_context():
        assert User.select().count() == 1 and AuditEvent.select().count() == 0
        assert User.get().disabled_at is None


def test_raw_device_row_reveals_no_secret(app, actor, secret):
    """security.md 4: the DB row holds neither the Base32 secret nor its bytes; a wrong key cannot read it."""
    import base64

    from webapp.db import db
    from webapp.totp import SecretError

    actor.user(secret=secret)
    with app.app_context():
        raw = db.execute_sql("SELECT * FROM device").fetchall()
        flat = repr(raw)
        assert secret not in flat and repr(base64.b32decode(secret))[2:-1] not in flat
        app.config["TOTP_ENCRYPTION_KEYS"] = Fernet.generate_key().decode()
        with pytest.raises(SecretError):
            decrypt_secret(Device.get().secret_enc)


# ------------------------------------------------------------------ first run


def test_first_run_needs_the_console_code(app, client):
    assert client.get("/").headers["Location"] == "/setup"
    assert client.get("/login").headers["Location"] == "/setup"
    page = client.get("/setup").get_data(as_text=True)
    assert "Setup code" in page
    data = {"csrf_token": csrf_from(page), "email": "admin@example.com", "password": PASSWORD, "confirm": PASSWORD}
    r = client.post("/setup", data={**data, "setup_code": "wrong"})
    assert r.status_code == 403 and "not right" in r.get_data(as_text=True)
    with app.app_context():
        assert User.select().count() == 0
    r = client.post("/setup", data={**data, "setup_code": "setup-code-123"})
    assert r.status_code == 302
    with app.app_context():
        admin = User.get()
        assert admin.email == "admin@example.com" and admin.is_admin
    settings = client.get("/settings")
    assert settings.status_code == 200
    assert "Your admin account is ready" in settings.get_data(as_text=True)  # the message survives the new session
    assert app.test_client().get("/setup").status_code == 404


def test_nobody_can_sign_up_before_the_first_admin_exists(app, client):
    """Brief "Operator contract": the first-run page keeps the instance for whoever has the console's code. A
    stranger's sign-up on an empty instance made /setup disappear, leaving an instance without an admin:
    sign-up now leads to /setup until the first account exists, and creates nothing."""
    token = csrf_from(client.get("/setup").get_data(as_text=True))
    r = client.post("/signup", data={"csrf_token": token, "email": "stranger@example.com", "password": PASSWORD,
                                     "confirm": PASSWORD})
    assert r.status_code == 302 and r.headers["Location"] == "/setup"
    assert client.get("/signup").headers["Location"] == "/setup"
    with app.app_context():
        assert User.select().count() == 0
    assert client.get("/setup").status_code == 200
    r = client.post("/setup", data={"csrf_token": token, "email": "admin@example.com", "password": PASSWORD,
                                    "confirm": PASSWORD, "setup_code": "setup-code-123"})
    assert r.status_code == 302
    other = app.test_client()
    page = other.get("/signup").get_data(as_text=True)
    r = other.post("/signup", data={"csrf_token": csrf_from(page), "email": "person@example.com",
                                    "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 302 and r.headers["Location"] != "/setup"
    with app.app_context():
        assert [u.email for u in User.select().order_by(User.id)] == ["admin@example.com", "person@example.com"]


def test_first_run_code_is_the_same_on_every_host_of_a_deployment(tmp_path, capsys):
    """Several hosts (their own instance folders, one SECRET_KEY) print the same code, so the form works
    whichever host the load balancer sends it to; another deployment's key gives another code; nothing is
    written for it (a read-only instance folder is fine in production)."""
    import re

    def host(name, secret_key):
        config = {"TESTING": True, "INSTANCE_PATH": str(tmp_path / name), "SECRET_KEY": secret_key,
                  "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                  "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}", "PASSWORD_HASH_PROFILE": "cheapest"}
        made = create_app(config)
        return made, re.search(r"one-time code: (\S+)", capsys.readouterr().err).group(1)

    _, code = host("a", "k" * 40)
    assert re.fullmatch(r"[0-9a-f]{6}-[0-9a-f]{6}-[0-9a-f]{6}", code)
    other_host, other_code = host("b", "k" * 40)
    assert other_code == code
    assert host("c", "j" * 40)[1] != code
    assert not (tmp_path / "a" / "setup_code").exists()
    browser = other_host.test_client()  # host a printed the code; the form lands on host b
    page = browser.get("/setup").get_data(as_text=True)
    r = browser.post("/setup", data={"csrf_token": csrf_from(page), "setup_code": code, "email": "a@example.com",
                                     "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 302


def made_meanwhile(app, monkeypatch, module, email="other@example.com", admin=True):
    """While `module`'s password hash runs (the slow part, done before its transaction), another request or
    command makes the account `email`, as a second /setup form or a sign-up sent a moment apart would."""
    import importlib

    target = importlib.import_module(module)
    real = target.hash_password

    def hash_and_meanwhile(password):
        with app.app_context():
            User.create(email=email, password_hash=real(password), is_admin=admin)
        return real(password)

    monkeypatch.setattr(target, "hash_password", hash_and_meanwhile)


def test_two_first_run_forms_sent_at_once_make_one_admin(app, client, monkeypatch):
    """A code reader's review: /setup checked "no account yet" and created the admin in a plain transaction.
    Two forms sent at once made two admins on PostgreSQL (different addresses), or a 500 (the same address,
    a double click). The check is made again under the page's own lock: the later form makes nothing, writes
    no record, and says what happened."""
    page = client.get("/setup").get_data(as_text=True)
    made_meanwhile(app, monkeypatch, "webapp.auth")
    r = client.post("/setup", data={"csrf_token": csrf_from(page), "setup_code": "setup-code-123",
                                    "email": "a@example.com", "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 302 and r.headers["Location"] == "/login"
    with app.app_context():
        assert [(u.email, u.is_admin) for u in User.select()] == [("other@example.com", True)]
        assert AuditEvent.select().count() == 0
    assert "created a moment ago by another request" in client.get("/login").get_data(as_text=True)
    assert client.get("/settings").headers["Location"].startswith("/login")  # not signed in as anyone


def test_two_first_run_forms_sent_at_once_take_turns_on_postgresql(app, client):
    """The same on PostgreSQL, where reading that no account exists locks nothing: the form waits for the
    page's lock while another transaction holds it, and then finds the account that one made."""
    if not (os.environ.get("TEST_DATABASE_URL") or "").startswith("postgres"):
        pytest.skip("PostgreSQL only: on SQLite the write transaction excludes every other writer")
    import hashlib
    import threading

    import psycopg

    from .test_lock_order import wait_for_blocked_by

    page = client.get("/setup").get_data(as_text=True)
    with app.app_context():  # the other request's insert, every column as the app fills it
        insert_sql, insert_params = User.insert(email="other@example.com", password_hash=hash_password(PASSWORD),
                                                is_admin=True).sql()
    other = psycopg.connect(os.environ["TEST_DATABASE_URL"])
    key = int.from_bytes(hashlib.sha256(b"first-run").digest()[:8], "big", signed=True)
    other.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
    pid = other.execute("SELECT pg_backend_pid()").fetchone()[0]
    answers = []

    def send():
        answers.append(client.post("/setup", data={"csrf_token": csrf_from(page), "setup_code": "setup-code-123",
                                                   "email": "a@example.com", "password": PASSWORD,
                                                   "confirm": PASSWORD}))

    thread = threading.Thread(target=send)
    thread.start()
    try:
        assert wait_for_blocked_by(other, pid, thread)
        other.execute(insert_sql, insert_params)
        other.commit()
    finally:
        other.rollback()
        other.close()
        thread.join(30)
    assert answers[0].status_code == 302 and answers[0].headers["Location"] == "/login"
    with app.app_context():
        assert [u.email for u in User.select()] == ["other@example.com"]


def test_cli_create_of_an_address_made_meanwhile_says_it_exists(app, monkeypatch):
    """`users create` checked the address, hashed, then inserted: an account made meanwhile (a sign-up) gave
    a traceback. It says the account exists, and makes and records nothing."""
    made_meanwhile(app, monkeypatch, "webapp.cli", email="carol@example.com", admin=False)
    result = run(app, "users", "create", "carol@example.com", "--password", PASSWORD)
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert "an account with email carol@example.com already exists" in result.output
    with app.app_context():
        assert User.select().count() == 1 and AuditEvent.select().count() == 0


def test_first_run_mismatched_passwords(client):
    page = client.get("/setup").get_data(as_text=True)
    r = client.post("/setup", data={"csrf_token": csrf_from(page), "setup_code": "setup-code-123",
                                    "email": "a@example.com", "password": PASSWORD, "confirm": "other"})
    assert r.status_code == 400 and "The two passwords differ." in r.get_data(as_text=True)


# ------------------------------------------------------------------ sign-up


def test_signup_creates_an_account(app, actor):
    actor.user(email="admin@example.com", admin=True)
    r = actor.post_form("/signup", {"email": "New@Example.com", "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 302
    with app.app_context():
        assert User.by_email("new@example.com") is not None
    page = actor.client.get("/settings").get_data(as_text=True)
    assert "new@example.com" in page
    # it says so, and what comes next (the page used to appear with no word of the new account)
    assert ("Your account is ready. To protect it with a code from your phone, press the gear next to "
            "Two-Factor Authentication.") in page


@pytest.mark.parametrize("email, said", [
    ("ａｌｉｃｅ@example.com", "Type the address in ordinary letters"),  # full-width letters
    ("\u0430lice@example.com", "mixes letters of different alphabets"),  # Cyrillic а
    ("alice@ex\u0430mple.com", "mixes letters of different alphabets"),
    ("p\u03b1ypal@example.com", "mixes letters of different alphabets"),  # Greek α
    # the other alphabets with letters that pass for Latin ones: Armenian օ, Cherokee Ꭺ, Coptic ⲁ
    ("b\u0585b@example.com", "mixes letters of different alphabets"),
    ("\u13aalice@example.com", "mixes letters of different alphabets"),
    ("p\u2c81ypal@example.com", "mixes letters of different alphabets"),
    ("alice@xn--xample-2of.com", "mixes letters of different alphabets"),  # stored as "alice@еxample.com"
    ("\u0430\u04cf\u0456\u0441\u0435@example.com", "letters that look like Latin ones"),  # all Cyrillic "аӏісе"
    ("\u0430\u04cf\u0456\u0441\u0435.smith@example.com", "letters that look like Latin ones"),
    ("\u0410\u04c0\u0406\u0421\u0415@example.com", "letters that look like Latin ones"),  # in capitals: "АӀІСЕ"
    # characters that show nothing (a security review: "vi\u034fctim" was taken, and Support showed two
    # accounts that both read victim@example.com)
    ("al\u034fice@example.com", "characters that do not show"),  # the combining grapheme joiner
    ("alice\ufe0f@example.com", "characters that do not show"),  # variation selectors
    ("al\U000e0100ice@example.com", "characters that do not show"),
    ("al\u180bice@example.com", "characters that do not show"),  # Mongolian's
    ("al\u17b4ice@example.com", "characters that do not show"),  # a Khmer inherent vowel
    ("\u115falice@example.com", "characters that do not show"),  # a Hangul filler
    ("al\u0307ice@example.com", "accents that do not belong to a letter"),  # a second dot over the i
    # A capital whose small letter is two characters: "İ" lower-cased is "i" and a dot above, stored as an
    # address that reads "inci@" beside Inci's own (a Unicode review).
    ("\u0130nci@example.com", "accents that do not belong to a letter"),
    # marks piled on a letter of another script paint over the Support page's own hints beside the address,
    # as they did from a message (a security review: "中" with 40 accents on it was taken)
    ("\u4e2d" + "\u0301" * 40 + "@example.com", "more accents on one letter"),
    ("\u0e01" + "\u0e49" * 7 + "@example.co.th", "more accents on one letter"),  # one more than writing needs
])
def test_signup_refuses_an_address_that_passes_for_another(app, actor, email, said):
    """Support goes by what an address looks like (the contact form, the Support search): an account
    "ａｌｉｃｅ@example.com" or "аlice@example.com" beside Alice's could pass for hers (a fuzzing review).
    New accounts refuse them, on the sign-up page and in `users create`; nothing is created."""
    actor.user(email="admin@example.com", admin=True)
    actor.user()
    r = actor.post_form("/signup", {"email": email, "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 400 and said in r.get_data(as_text=True)
    result = run(app, "users", "create", email, "--password", "long enough pw")
    assert result.exit_code == 1 and said in result.output
    with app.app_context():
        assert User.select().count() == 2


@pytest.mark.parametrize("email", ["иван@пример.рф", "zoë@example.com", "zoe\u0308@example.com",  # ë typed in two
                                   "たなか太郎@example.jp", "ivan.иванов@example.com", "müller+news@example.de",
                                   "δοκιμή@example.gr", "नमस्ते@example.in",
                                   # each word in one alphabet: after _ or +, and each part of the domain
                                   "ivan_иванов+news@example.com", "ivan@пример.com",
                                   "राम.१२३@example.in"])  # a word of digits only: no letters to look like Latin ones
def test_signup_takes_addresses_in_one_alphabet_whatever_it_is(app, actor, clock, email):
    """Someone whose address is written in one alphabet, whichever it is, signs up, lands signed in on the
    settings, and the account is stored under the one spelling every lookup uses (normalise_email): from
    another browser, the address as they type it signs them in (an address stored in another spelling, or
    with its letters lost, would make an account nobody can open)."""
    actor.user(email="admin@example.com", admin=True)
    r = actor.post_form("/signup", {"email": email, "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 302, r.get_data(as_text=True)[-600:]
    assert r.headers["Location"] == "/settings"
    with app.app_context():
        assert User.select().where(User.email == normalise_email(email)).count() == 1
    elsewhere = Actor(app, app.test_client(), clock)
    r = elsewhere.password_step(email=email)
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    assert "User Settings" in elsewhere.client.get("/settings").get_data(as_text=True)


def test_signup_refuses_duplicates_and_short_passwords(app, actor):
    actor.user()
    r = actor.post_form("/signup", {"email": "alice@example.com", "password": PASSWORD, "confirm": PASSWORD})
    assert "already exists" in r.get_data(as_text=True)
    r = actor.post_form("/signup", {"email": "b@example.com", "password": "short", "confirm": "short"})
    assert r.status_code == 400 and "at least 8 characters" in r.get_data(as_text=True)
    # spaces only: the sign-in form would refuse it, so the account could never be used (same rule as the CLI)
    r = actor.post_form("/signup", {"email": "b@example.com", "password": " " * 9, "confirm": " " * 9})
    assert r.status_code == 400 and "A password of spaces only cannot be used to sign in" in r.get_data(as_text=True)
    # one of the most common passwords (NIST SP 800-63B 5.1.1.2), as Change password and the CLI refuse it
    r = actor.post_form("/signup", {"email": "b@example.com", "password": "Baseball1", "confirm": "Baseball1"})
    assert r.status_code == 400 and "one of the most common ones" in r.get_data(as_text=True)
    with app.app_context():
        assert User.select().count() == 1


def test_cli_refuses_one_of_the_most_common_passwords_as_the_forms_do(app, actor):
    """NIST SP 800-63B 5.1.1.2: `users create` and `users set-password` refuse what the forms refuse."""
    actor.user()
    before = user_row(app, "alice@example.com").password_hash
    for args in (("create", "dora@example.com"), ("set-password", "alice@example.com")):
        result = run(app, "users", *args, "--password", "Sunshine")
        assert result.exit_code == 1 and "one of the most common ones" in result.output, result.output
    assert user_row(app, "dora@example.com") is None
    assert user_row(app, "alice@example.com").password_hash == before


# Spellings of one mailbox that used to make separate accounts: the domain in punycode or in Unicode (browsers
# send either), full-width letters and dot, a ligature in the domain, an accent typed as "e" + combining mark.
SAME_MAILBOX = [("bob@münchen.de", "Bob@xn--mnchen-3ya.de"), ("carol@example.com", "carol@ｅｘａｍｐｌｅ．com"),
                ("dora@office.com", "dora@oﬀice.com"), ("josé@example.com", "jose\u0301@example.com")]


@pytest.mark.parametrize("first, second", SAME_MAILBOX)
def test_one_mailbox_is_one_account_however_its_address_is_spelled(app, actor, first, second):
    """An address is stored as email-validator's normal form, lower-cased: sign-up, sign-in, the operator
    commands and the contact form all see the same account for every spelling of the same mailbox."""
    actor.user(email="admin@example.com", admin=True)
    assert actor.post_form("/signup", {"email": first, "password": PASSWORD, "confirm": PASSWORD}).status_code == 302
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    r = actor.post_form("/signup", {"email": second, "password": PASSWORD, "confirm": PASSWORD})
    assert "already exists" in r.get_data(as_text=True)
    with app.app_context():
        assert User.select().count() == 2
        stored = User.get(User.email != "admin@example.com").email
    assert actor.password_step(email=second).headers["Location"] == "/settings"  # signs in with either spelling
    assert run(app, "users", "activity", second).exit_code == 0
    assert stored in run(app, "users", "list").output


@pytest.mark.parametrize("first, second", SAME_MAILBOX)
def test_cli_create_stores_the_one_spelling_sign_up_stores(app, first, second):
    """`users create` stores an address in its normal form, as sign-up does (the first of each pair): the
    command says which, and the other spelling is then taken for the same mailbox."""
    result = run(app, "users", "create", second, "--password", "long enough pw")
    assert result.exit_code == 0 and result.output == f"created {first}\n"
    assert run(app, "users", "list").output == f"{first}\tuser\t2FA off\n"
    result = run(app, "users", "create", first, "--password", "long enough pw")
    assert result.exit_code == 1 and f"an account with email {first} already exists" in result.output


def test_an_address_stored_in_the_old_spelling_stays_reachable(app, actor):
    """Until 2026-12-05 an address was stored only stripped and lower-cased (a punycode domain as typed).
    Such a row is found by either spelling: sign-in, the operator commands and sign-up (no second account)."""
    with app.app_context():
        User.create(email="bob@xn--mnchen-3ya.de", password_hash=hash_password(PASSWORD))
        User.create(email="admin@example.com", password_hash="x", is_admin=True)
    for spelling in ("bob@xn--mnchen-3ya.de", "Bob@münchen.de"):
        assert actor.password_step(email=spelling).headers["Location"] == "/settings", spelling
        actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
        assert run(app, "users", "activity", spelling).exit_code == 0
    r = actor.post_form("/signup", {"email": "bob@münchen.de", "password": PASSWORD, "confirm": PASSWORD})
    assert "already exists" in r.get_data(as_text=True)
    with app.app_context():
        assert User.select().count() == 2
        assert User.by_email("BOB@MÜNCHEN.DE").email == "bob@xn--mnchen-3ya.de"


def test_of_two_accounts_stored_for_one_mailbox_the_normal_spelling_is_found(app, actor):
    """Before 2026-12-05 "bob@münchen.de" and "bob@xn--mnchen-3ya.de" could become two accounts. Either spelling
    now finds the one stored in the normal form, for sign-in and the operator commands alike: the operator
    who promotes "bob@xn--mnchen-3ya.de" promotes the account the command names, and the other is left as it was."""
    with app.app_context():
        User.create(email="bob@xn--mnchen-3ya.de", password_hash=hash_password("old account pw"))
        User.create(email="bob@münchen.de", password_hash=hash_password(PASSWORD))
    for spelling in ("bob@xn--mnchen-3ya.de", "Bob@münchen.de"):
        result = run(app, "users", "promote", spelling)
        assert result.exit_code == 0 and result.output.startswith("bob@münchen.de "), (spelling, result.output)
        assert other_browser(actor).password_step(email=spelling).headers["Location"] == "/settings", spelling
    with app.app_context():
        assert not User.get(User.email == "bob@xn--mnchen-3ya.de").is_admin


def test_normal_form_is_stable():
    """Normalising twice gives the same spelling, and it is in NFC (lower-casing can undo NFC: it comes first)."""
    from webapp.models import normalise_email

    import unicodedata

    for raw in ["Bob@Xn--Mnchen-3ya.DE", "JOSE\u0301@example.com", "Ώͅ", "al", "ǅ@example.com", " x@ｅｘａｍｐｌｅ．com "]:
        once = normalise_email(raw)
        assert normalise_email(once) == once and unicodedata.is_normalized("NFC", once), raw


def test_signup_sent_twice_at_once_makes_one_account_and_no_error(app, actor, monkeypatch):
    """A double-submitted sign-up: both requests looked the address up before either created it. The second
    insert meets the unique email and gets the "already exists" message, not a 500."""
    actor.user(email="admin@example.com", admin=True)
    r = actor.post_form("/signup", {"email": "twice@example.com", "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 302
    other = type(actor)(app, app.test_client(), actor.clock)
    monkeypatch.setattr(User, "by_email", classmethod(lambda cls, email: None))  # looked up too early
    r = other.post_form("/signup", {"email": "twice@example.com", "password": PASSWORD, "confirm": PASSWORD})
    assert r.status_code == 200 and "already exists" in r.get_data(as_text=True)
    monkeypatch.undo()
    with app.app_context():
        assert User.select().where(User.email == "twice@example.com").count() == 1
        assert AuditEvent.select().where(AuditEvent.kind == "account_created").count() == 1
    r = other.client.get("/settings")
    assert r.status_code == 302 and "/login" in r.headers["Location"]  # the second browser is not signed in


def test_signup_can_be_switched_off(app, actor):
    actor.user()
    app.config["SIGNUP_ENABLED"] = False
    assert actor.client.get("/signup").status_code == 404
    assert "Create one" not in actor.client.get("/login").get_data(as_text=True)


# ------------------------------------------------------------------ configuration

def _environment_lookups_in_config_load():
    """The names config.load's source looks up in `env` (os.environ): env.get("X"), env["X"], _env_bool(env,
    "X", ...), _env_count(env, "X", ...), and the names of a `for key in ("X", "Y")` loop that looks up `key`."""
    import ast
    import inspect

    from webapp import config as config_module

    def is_env(node):
        return isinstance(node, ast.Name) and node.id == "env"

    def looked_up(node):  # the expression whose value is looked up in env, or None
        if isinstance(node, ast.Subscript) and is_env(node.value):
            return node.slice
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and is_env(node.func.value):
                return node.args[0]
            if node.args and is_env(node.args[0]) and len(node.args) > 1:
                return node.args[1]
        return None

    names = set()
    tree = ast.parse(inspect.getsource(config_module.load))
    for node in ast.walk(tree):
        key = looked_up(node)
        if isinstance(key, ast.Constant):
            names.add(key.value)
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            if any(isinstance(looked_up(inner), ast.Name) and looked_up(inner).id == node.target.id
                   for inner in ast.walk(node)):
                names.update(element.value for element in node.iter.elts)
    return names


def test_the_suite_clears_every_variable_config_reads(tmp_path, clock, monkeypatch):
    """A shell that exports SIGNUP_ENABLED=false or PROXY_HOPS=2 (an operator's, a CI job's) must not change
    what the tests see: the suite removes every variable config.load reads before each test (conftest). Its
    list comes from running config.load; read from the source too, a variable read only on some path (in
    production, say) would be missed by the run and is not. With all of them set to nonsense and then
    cleared, an app starts with the defaults."""
    from .conftest import clear_configuration_environment, config_environment_names, make_test_app

    in_source = _environment_lookups_in_config_load()
    assert {"SIGNUP_ENABLED", "PROXY_HOPS", "FORWARDED_ALLOW_IPS", "TOTP_ISSUER", "PURGE_INTERVAL_SECONDS",
            "TWOSTEP_PRODUCTION", "DATABASE_URL"} <= in_source  # the scan finds what it should
    assert in_source <= config_environment_names()
    assert "TEST_DATABASE_URL" not in config_environment_names()  # how `make test-postgres` picks its database
    for name in config_environment_names():
        monkeypatch.setenv(name, "not a value!")
    clear_configuration_environment(monkeypatch)
    app = make_test_app(tmp_path, f"sqlite:///{tmp_path / 'db'}", clock)
    assert (app.config["SIGNUP_ENABLED"], app.config["PROXY_HOPS"], app.config["TOTP_ISSUER"]) == (True, 0, "twostep")
    assert not app.config["PRODUCTION"] and not app.config["SECURE_COOKIES"] and not app.debug

def _prod(tmp_path, monkeypatch, **env):
    for key in ("SECRET_KEY", "TOTP_ENCRYPTION_KEYS", "DATABASE_URL", "TOTP_ISSUER"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TWOSTEP_PRODUCTION", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return create_app({"INSTANCE_PATH": str(tmp_path / "inst")})


def test_production_refuses_missing_secrets(tmp_path, monkeypatch):
    """security.md 44: no silent defaults in production."""
    with pytest.raises(ConfigError, match="missing configuration"):
        _prod(tmp_path, monkeypatch)
    assert not os.path.exists(tmp_path / "inst" / "secret_key")


@pytest.mark.parametrize("key", ["short", "k" * 48, "changeme" * 4, "0" * 32 + "123456"])
def test_production_refuses_a_short_or_placeholder_secret_key(tmp_path, monkeypatch, key):
    """security.md 44: at least 32 random bytes; a long placeholder is refused as well as a short key."""
    with pytest.raises(ConfigError, match="SECRET_KEY must be at least 32 random bytes"):
        _prod(tmp_path, monkeypatch, SECRET_KEY=key, TOTP_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
              DATABASE_URL=f"sqlite:///{tmp_path / 'db'}")


@pytest.mark.parametrize("key, accepted", [
    ("hP3x-K8d0qLz_7VwYb2nRt5s9uJcMf4", False),   # 31 bytes, however random they look
    ("hP3x-K8d0qLz_7VwYb2nRt5s9uJcMf4a", True),   # 32 bytes: the shortest taken
    ("abcdefgh" * 4, True),                        # 8 different symbols: the fewest taken
    ("abcdefga" * 4, False),                       # 7
])
def test_the_secret_key_limits_hold_at_their_edges(tmp_path, monkeypatch, key, accepted):
    """security.md 44, README "Configuration": SECRET_KEY takes 32 bytes or more, with 8 different symbols or more;
    one short of either stops a production start."""
    settings = {"SECRET_KEY": key, "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"}
    if accepted:
        assert _prod(tmp_path, monkeypatch, **settings).config["SECRET_KEY"] == key
    else:
        with pytest.raises(ConfigError, match="SECRET_KEY must be at least 32 random bytes"):
            _prod(tmp_path, monkeypatch, **settings)


@pytest.mark.parametrize("missing", ["SECRET_KEY", "TOTP_ENCRYPTION_KEYS", "DATABASE_URL"])
def test_production_names_the_setting_it_misses(tmp_path, monkeypatch, missing):
    """security.md 44: each of the three has no default in production (DATABASE_URL neither: no database in the
    instance folder), and the message names the one missing and where to set it."""
    settings = {"SECRET_KEY": "hP3x-K8d0qLz_7VwYb2nRt5s9uJcMf4aGe6iOk1yXh0",
                "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(), "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"}
    del settings[missing]
    with pytest.raises(ConfigError) as refused:
        _prod(tmp_path, monkeypatch, **settings)
    assert str(refused.value) == (f"missing configuration: {missing} (set them in the environment; "
                                  "see README 'Configuration')")
    assert not os.path.exists(tmp_path / "inst" / "twostep.db")


def test_production_accepts_random_keys_written_in_hex_or_base64():
    """The usual ways to make a key of 32 random bytes all pass, whatever the draw (hex has only 16 symbols)."""
    import secrets

    from webapp.config import validate

    for key in [secrets.token_hex(32) for _ in range(200)] + [secrets.token_urlsafe(32) for _ in range(200)]:
        validate({"PRODUCTION": True, "SECRET_KEY": key, "DATABASE_URL": "sqlite:///x", "TOTP_ISSUER": "x",
                  "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode()})


def test_production_refuses_debug(tmp_path, monkeypatch):
    """security.md 44: FLASK_DEBUG=1 (what flask --debug sets too) stops a production start, and the message
    names what to remove (it said "DEBUG", which is not the variable an operator sets)."""
    with pytest.raises(ConfigError, match="debugging must be off in production: remove FLASK_DEBUG=1 or --debug"):
        _prod(tmp_path, monkeypatch, FLASK_DEBUG="1", SECRET_KEY="hP3x-K8d0qLz_7VwYb2nRt5s9uJcMf4aGe6iOk1yXh0",
              TOTP_ENCRYPTION_KEYS=Fernet.generate_key().decode(), DATABASE_URL=f"sqlite:///{tmp_path / 'db'}")


def test_production_starts_with_proper_secrets(tmp_path, monkeypatch):
    app = _prod(tmp_path, monkeypatch, SECRET_KEY="hP3x-K8d0qLz_7VwYb2nRt5s9uJcMf4aGe6iOk1yXh0",
                TOTP_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
                DATABASE_URL=f"sqlite:///{tmp_path / 'db'}")
    assert app.config["SECURE_COOKIES"] and not app.debug
    r = app.test_client().get("/setup", base_url="https://example.com")
    assert "Strict-Transport-Security" in r.headers


def test_bad_encryption_key_is_a_startup_error(tmp_path):
    with pytest.raises(ConfigError, match="Fernet"):
        create_app({"INSTANCE_PATH": str(tmp_path), "SECRET_KEY": "k" * 40, "TOTP_ENCRYPTION_KEYS": "nope",
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"})


def test_development_keys_are_created_once_in_the_instance_folder(tmp_path, monkeypatch):
    for key in ("SECRET_KEY", "TOTP_ENCRYPTION_KEYS", "DATABASE_URL", "TWOSTEP_PRODUCTION"):
        monkeypatch.delenv(key, raising=False)
    first = create_app({"INSTANCE_PATH": str(tmp_path)})
    second = create_app({"INSTANCE_PATH": str(tmp_path)})
    assert first.config["SECRET_KEY"] == second.config["SECRET_KEY"] and len(first.config["SECRET_KEY"]) >= 48
    assert first.config["TOTP_ENCRYPTION_KEYS"] == second.config["TOTP_ENCRYPTION_KEYS"]
    assert oct(os.stat(tmp_path / "secret_key").st_mode)[-3:] == "600"
    assert first.config["DATABASE_URL"].endswith("twostep.db")
    with first.app_context():
        assert decrypt_secret(encrypt_secret("ABC")) == "ABC"


def test_twostep_production_set_empty_is_development(tmp_path, monkeypatch):
    """`TWOSTEP_PRODUCTION=` (set, empty: an env file with the value left out) is "no", the documented default:
    the start goes on with generated development secrets rather than stopping."""
    for key in ("SECRET_KEY", "TOTP_ENCRYPTION_KEYS", "DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TWOSTEP_PRODUCTION", "")
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst")})
    assert not app.config["PRODUCTION"] and not app.config["SECURE_COOKIES"]
    assert (tmp_path / "inst" / "secret_key").exists()


@pytest.mark.parametrize("name", ["secret_key", "totp_keys"])
def test_an_emptied_secret_file_stops_the_start_saying_what_to_do(tmp_path, monkeypatch, name):
    """A generated secret file emptied by accident (a full disk, an editor) is not taken as a key, nor silently
    replaced (that would lock everyone out of their TOTP devices): the start stops naming the file and the fix,
    and the fix works."""
    for key in ("TWOSTEP_PRODUCTION", "SECRET_KEY", "TOTP_ENCRYPTION_KEYS", "DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / name).write_text("\n")
    with pytest.raises(ConfigError) as refused:
        create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path)})
    assert str(refused.value) == f"{tmp_path / name} is empty; delete it to have a new secret generated"
    (tmp_path / name).unlink()
    create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path)})
    assert (tmp_path / name).read_text().strip()


def test_the_issuer_comes_from_the_environment(tmp_path, monkeypatch):
    """security.md 7: TOTP_ISSUER is read from the environment (README "Configuration"), and checked there: one
    with ':' stops the start with the rule."""
    monkeypatch.delenv("TWOSTEP_PRODUCTION", raising=False)
    settings = {"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst"), "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"}
    monkeypatch.setenv("TOTP_ISSUER", "Acme Co")
    assert create_app(settings).config["TOTP_ISSUER"] == "Acme Co"
    monkeypatch.setenv("TOTP_ISSUER", "Acme: Login")
    with pytest.raises(ConfigError, match="^TOTP_ISSUER must be 1-64 characters and contain no ':'$"):
        create_app(settings)


def test_purge_expired_removes_only_dead_state(app, actor, secret, clock):
    """Abandoned sign-ins leave rows; the purge deletes the expired ones only. Contact requests handled more
    than 180 days ago go too (their message is free text about a person); open ones, however old, and those
    handled since stay."""
    from webapp.models import NetworkCounter, SignInChallenge, SupportRequest

    user = actor.user(secret=secret)
    actor.password_step()                      # a session row and a challenge, both soon expired
    clock.advance(31 * 60)
    live = Actor(app, app.test_client(), clock)
    live.password_step()                       # a sign-in in progress now: its row and challenge stay
    with app.app_context():                    # a per-network count whose hour is over
        NetworkCounter.create(purpose="sign-ups", network="198.51.100.9", hits=2,
                              window_start=utc(clock.t) - timedelta(hours=1))
        long_ago = utc(clock.t) - timedelta(days=400)
        for message, handled in [("handled long ago", timedelta(days=181)), ("handled lately", timedelta(days=179)),
                                 ("still open", None)]:
            SupportRequest.create(email="alice@example.com", message=message, user=user.id, created_at=long_ago,
                                  handled_at=handled and utc(clock.t) - handled)
    result = run(app, "purge-expired")
    assert result.exit_code == 0
    assert result.output == ("deleted 1 session(s), 1 sign-in challenge(s), 0 pending enrolment(s), 0 known "
                             "browser(s), 1 per-network counter(s), 1 handled contact request(s)\n")
    with app.app_context():
        assert ServerSession.select().count() == 1 and SignInChallenge.select().count() == 1
        assert sorted(r.message for r in SupportRequest.select()) == ["handled lately", "still open"]
    assert "Verification code" in live.client.get("/login/verify").get_data(as_text=True)


def test_handled_requests_keep_days_from_the_environment(tmp_path, monkeypatch):
    """HANDLED_REQUESTS_KEEP_DAYS sets how long handled contact requests stay; 0 keeps them for good (nothing
    to purge); anything but a whole number is a clear start-up error."""
    from webapp.models import SupportRequest, purge_expired

    settings = {"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'keep.db'}"}
    monkeypatch.setenv("HANDLED_REQUESTS_KEEP_DAYS", "30")
    assert create_app(settings).config["HANDLED_REQUEST_RETENTION"] == timedelta(days=30)
    monkeypatch.setenv("HANDLED_REQUESTS_KEEP_DAYS", "0")
    app = create_app(settings)
    with app.app_context():
        SupportRequest.create(email="a@example.com", message="m", handled_at=datetime(2000, 1, 1))
        assert purge_expired(app.config, datetime(2030, 1, 1))[5] == 0 and SupportRequest.select().count() == 1
    monkeypatch.setenv("HANDLED_REQUESTS_KEEP_DAYS", "half a year")
    with pytest.raises(ConfigError, match="HANDLED_REQUESTS_KEEP_DAYS"):
        create_app(settings)


@pytest.mark.parametrize("days", ["1000000", "1000000000", "36501", "half a year", "-1"])
def test_a_keep_days_the_purge_cannot_count_back_stops_the_start_in_one_line(tmp_path, monkeypatch, days):
    """HANDLED_REQUESTS_KEEP_DAYS took any whole number up to 10**9: a billion days stopped the start with a
    timedelta traceback, and a million (someone's "for ever") started, then failed every purge, the app's
    own after a response and `purge-expired` alike, with "date value out of range" (today less a million
    days is before year 1). Past a century the start says what it takes; a century works. Every wrong value
    is told the same ceiling: "half a year" was told "at most 1,000,000,000" (an operator's review)."""
    from webapp.models import purge_expired

    settings = {"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'keep.db'}"}
    monkeypatch.setenv("HANDLED_REQUESTS_KEEP_DAYS", days)
    with pytest.raises(ConfigError) as refused:
        create_app(settings)
    assert str(refused.value) == ("HANDLED_REQUESTS_KEEP_DAYS must be a whole number of days (0 keeps them), at "
                                  "most 36,500")
    monkeypatch.setenv("HANDLED_REQUESTS_KEEP_DAYS", "36500")
    app = create_app(settings)
    with app.app_context():
        assert purge_expired(app.config, datetime(2026, 12, 6)) == (0, 0, 0, 0, 0, 0)


def test_the_app_purges_expired_rows_by_itself_after_a_response(tmp_path, clock, monkeypatch):
    """No cron job needed: once PURGE_INTERVAL has passed, a request's response is followed by the purge of
    expired sessions (their IP addresses and browser names go with them), challenges and enrolments;
    a live session stays, and with PURGE_INTERVAL 0 nothing is purged."""
    import time

    from webapp.db import db
    from webapp.models import SignInChallenge

    from .conftest import make_test_app

    for interval in (timedelta(seconds=5), timedelta(0)):
        url = os.environ.get("TEST_DATABASE_URL") or f"sqlite:///{tmp_path / f'purge-{interval.seconds}.db'}"
        app = make_test_app(tmp_path, url, clock, PURGE_INTERVAL=interval)
        try:
            actor = Actor(app, app.test_client(), clock)
            actor.user(secret=new_secret())
            actor.password_step()                 # a session row and a challenge, both soon expired
            clock.advance(31 * 60)
            live = Actor(app, app.test_client(), clock)
            live.password_step()                  # a sign-in in progress now: its row and challenge stay
            moment = time.monotonic()
            monkeypatch.setattr(time, "monotonic", lambda: moment + 3600)  # the interval has passed
            live.client.get("/login/verify").close()  # the purge follows this response
            monkeypatch.undo()
            with app.app_context():
                expected = (1, 1) if interval else (2, 2)
                assert (ServerSession.select().count(), SignInChallenge.select().count()) == expected
            assert "Verification code" in live.client.get("/login/verify").get_data(as_text=True)
        finally:
            if url.startswith("postgres"):
                with db.connection_context():
                    db.drop_tables(ALL_MODELS, cascade=True)
            db.close()


@pytest.mark.parametrize("setting, interval", [(None, 600), ("7200", 7200), ("0", None)])
def test_each_process_purges_once_per_interval_from_the_environment(tmp_path, clock, monkeypatch, setting, interval):
    """PURGE_INTERVAL_SECONDS (README "Configuration"; 600 when unset, 0 never): the first deadline falls at
    random within the first interval after the process's first response; the first response at or past a
    deadline is followed by the purge, and the next deadline is one interval later, not sooner."""
    import random
    import time

    from webapp.db import db

    from .conftest import make_test_app

    for key in ("TWOSTEP_PRODUCTION", "PURGE_INTERVAL_SECONDS"):
        monkeypatch.delenv(key, raising=False)
    if setting is not None:
        monkeypatch.setenv("PURGE_INTERVAL_SECONDS", setting)
    url = os.environ.get("TEST_DATABASE_URL") or f"sqlite:///{tmp_path / 'purge.db'}"
    app = make_test_app(tmp_path, url, clock)
    moment = [float(int(time.monotonic()) + 1)]
    monkeypatch.setattr(time, "monotonic", lambda: moment[0])
    monkeypatch.setattr(random, "random", lambda: 0.5)  # the first deadline: half an interval after the first response

    def stale_sign_in():
        """A sign-in left at the code step, expired half an hour later (its session row remains until purged)."""
        Actor(app, app.test_client(), clock).password_step()
        clock.advance(31 * 60)

    def sessions_after_a_response_at(seconds):
        moment[0] = start + seconds
        app.test_client().get("/login").close()  # a visitor who stores nothing; the purge follows its response
        with app.app_context():
            return ServerSession.select().count()

    try:
        Actor(app, app.test_client(), clock).user(secret=new_secret())
        start = moment[0]
        stale_sign_in()  # the process's first response: the first deadline is set
        if interval is None:
            assert sessions_after_a_response_at(10**7) == 1  # never purged
            return
        assert sessions_after_a_response_at(interval / 2 - 1) == 1
        assert sessions_after_a_response_at(interval / 2) == 0  # the deadline
        stale_sign_in()
        assert sessions_after_a_response_at(interval / 2 + 1) == 1  # the next deadline is an interval later
        assert sessions_after_a_response_at(interval * 1.5 - 1) == 1
        assert sessions_after_a_response_at(interval * 1.5) == 0
    finally:
        if url.startswith("postgres"):
            with db.connection_context():
                db.drop_tables(ALL_MODELS, cascade=True)
        db.close()


def test_a_purge_that_fails_is_logged_and_the_app_serves_on(app, actor, monkeypatch, caplog):
    """The purge runs after the response has gone out: a database error there (the file busy, the server
    gone) cannot reach the person, and becomes one warning in the log; the app serves on."""
    import random

    from peewee import OperationalError

    import webapp

    def failing(config, current, seconds=None):
        raise OperationalError("database is locked")

    actor.user()
    monkeypatch.setattr(webapp, "purge_expired", failing)
    monkeypatch.setattr(random, "random", lambda: 0.0)  # the first deadline: the first response
    actor.client.get("/login").close()
    response = actor.client.get("/login")
    response.close()  # the purge runs here, and fails
    assert response.status_code == 200
    assert [r.getMessage() for r in caplog.records if "purging" in r.getMessage()] == [
        "purging expired rows failed: database is locked"]
    assert actor.client.get("/login").status_code == 200


@pytest.mark.parametrize("hops", ["two", "-1", "1.5"])
def test_a_proxy_hop_count_that_is_not_a_count_is_named_in_the_error(tmp_path, monkeypatch, hops):
    """A typo in PROXY_HOPS stops the start with a message naming the setting, not a bare ValueError."""
    with pytest.raises(ConfigError, match="PROXY_HOPS must be the number of reverse proxies"):
        _prod(tmp_path, monkeypatch, SECRET_KEY="k" * 48, TOTP_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
              DATABASE_URL=f"sqlite:///{tmp_path / 'db'}", PROXY_HOPS=hops)


@pytest.mark.parametrize("name, value", [("TWOSTEP_PRODUCTION", "y"), ("TWOSTEP_PRODUCTION", "production"),
                                         ("SIGNUP_ENABLED", "nope"), ("SECURE_COOKIES", "2"),
                                         ("PURGE_INTERVAL_SECONDS", "-5"), ("PURGE_INTERVAL_SECONDS", "10m"),
                                         ("FAILED_SIGNINS_PER_HOUR", "-1"), ("SIGNUPS_PER_HOUR", "ten"),
                                         ("FAILED_SIGNINS_PER_HOUR", "9223372036854775808"),
                                         ("SIGNUPS_PER_HOUR", "99999999999999999999"),
                                         ("PURGE_INTERVAL_SECONDS", "100000000000000")])
def test_a_setting_that_is_not_one_of_its_values_stops_the_start_naming_it(tmp_path, monkeypatch, name, value):
    """security.md 44: TWOSTEP_PRODUCTION=y used to be read as "no", running production with generated secrets
    and insecure cookies; a negative purge interval silently meant "never". Each stops the start instead. So
    does a number too big to mean anything (an infrastructure review: a huge limit broke every sign-in on
    SQLite, which cannot store it, and a huge purge interval stopped the start with a traceback)."""
    monkeypatch.delenv("TWOSTEP_PRODUCTION", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst"),
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"})


@pytest.mark.parametrize("value, expected", [("off", False), ("No", False), ("0", False), ("false", False),
                                             (" true ", True), ("on", True), ("YES", True), ("1", True)])
def test_yes_no_settings_take_the_usual_words(tmp_path, monkeypatch, value, expected):
    monkeypatch.delenv("TWOSTEP_PRODUCTION", raising=False)
    monkeypatch.setenv("SIGNUP_ENABLED", value)
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst"),
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"})
    assert app.config["SIGNUP_ENABLED"] is expected


@pytest.mark.parametrize("name", ["FAILED_SIGNINS_PER_HOUR", "SIGNUPS_PER_HOUR"])
def test_the_per_network_limits_come_from_the_environment(tmp_path, monkeypatch, name):
    """An operator whose people share one address (an office's or a carrier's NAT) moves a per-network limit,
    or turns it off with 0, without editing the code (security.md 18)."""
    monkeypatch.delenv("TWOSTEP_PRODUCTION", raising=False)
    for value in ("250", "0"):
        monkeypatch.setenv(name, value)
        app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst"),
                          "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"})
        assert app.config[name] == int(value)


def test_unreadable_secrets_name_the_key_file_when_the_keys_come_from_the_instance_folder(tmp_path, monkeypatch,
                                                                                          capsys, clock):
    """Under `make run` the keys are the file instance/totp_keys: the warning and `keys rotate` name that file,
    which is what the operator must edit (they named TOTP_ENCRYPTION_KEYS, which is not set there)."""
    for key in ("TWOSTEP_PRODUCTION", "SECRET_KEY", "TOTP_ENCRYPTION_KEYS", "DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    settings = {"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst")}
    app = create_app(settings)
    Actor(app, app.test_client(), clock).user(secret=new_secret())
    keys_file = tmp_path / "inst" / "totp_keys"
    keys_file.write_text(Fernet.generate_key().decode() + "\n")  # the key that encrypted it is lost
    capsys.readouterr()
    app = create_app(settings)
    assert (f"the keys in {keys_file} cannot decrypt the stored TOTP secret of device 1 (alice@example.com's)"
            in capsys.readouterr().err)
    result = run(app, "keys", "rotate")
    assert result.exit_code == 1 and f"opens with none of the keys in {keys_file}." in result.output


def test_a_new_sqlite_database_is_readable_by_its_owner_alone(tmp_path, actor, app):
    """It holds the password hashes and the encrypted TOTP secrets: 0600 like the key files, the WAL too (the
    development database was created 0644, readable by every account on the host)."""
    import stat

    if not app.config["DATABASE_URL"].startswith("sqlite:"):
        pytest.skip("SQLite only: PostgreSQL keeps its files itself")
    actor.user()  # a write: the WAL and its index exist now
    path = app.config["DATABASE_URL"][len("sqlite:///"):]
    for name in (path, path + "-wal", path + "-shm"):
        assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name


def test_a_relative_instance_folder_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    """TWOSTEP_INSTANCE=relinst stopped every command with Flask's ValueError traceback."""
    for key in ("TWOSTEP_PRODUCTION", "SECRET_KEY", "TOTP_ENCRYPTION_KEYS", "DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TWOSTEP_INSTANCE", "relinst")
    app = create_app({"TESTING": True})
    assert app.instance_path == str(tmp_path / "relinst")
    assert (tmp_path / "relinst" / "twostep.db").exists() and (tmp_path / "relinst" / "totp_keys").exists()


@pytest.mark.parametrize("url, message", [
    ("sqlite://app.db", "DATABASE_URL for SQLite is sqlite:/// and a path"),  # would be a database in memory
    ("sqlite://", "DATABASE_URL for SQLite is sqlite:/// and a path"),  # one empty database per worker
    ("sqlite:///:memory:", "DATABASE_URL for SQLite is sqlite:/// and a path"),
    ("mysql://u@host/db", "DATABASE_URL must start with sqlite:/// or postgresql://"),
    ("postgresql://u:p@host:notaport/db", "DATABASE_URL is not a valid postgresql:// address"),
    ("postgresql://", "DATABASE_URL names no database"),
    # The short scheme (Heroku's and many hosts' DATABASE_URL) is PostgreSQL too: tried, not refused as unknown.
    ("postgres://nobody@127.0.0.1:1/x", "the database in DATABASE_URL cannot be used: connection failed"),
    ("postgresql://nobody@127.0.0.1:1/x", "the database in DATABASE_URL cannot be used: connection failed"),
    ("sqlite:////no/such/folder/app.db", "the database in DATABASE_URL cannot be used: unable to open"),
])
def test_a_database_url_that_cannot_work_stops_the_start_with_a_message(tmp_path, url, message):
    with pytest.raises(ConfigError, match=message):
        create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst"), "SECRET_KEY": "k" * 40,
                    "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(), "DATABASE_URL": url})


def test_the_flask_commands_report_a_bad_setting_without_a_traceback(tmp_path):
    """`flask --app wsgi ...` (and gunicorn) load wsgi.py: a setting to fix is one line naming it, exit 1."""
    import subprocess
    import sys

    from .live_app import ROOT

    env = {**os.environ, "DATABASE_URL": "mysql://u@host/db", "TWOSTEP_INSTANCE": str(tmp_path / "inst")}
    env.pop("TWOSTEP_PRODUCTION", None)
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "users", "list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: DATABASE_URL must start with sqlite:/// or postgresql://"


@pytest.mark.parametrize("error", ["OperationalError", "InterfaceError"])
def test_a_database_that_stops_answering_during_a_command_is_one_error_line_and_changes_nothing(app, actor,
                                                                                               monkeypatch, error):
    """A fault-injection review: the database going away while a command ran (PostgreSQL restarted, the
    connection ended, SQLite's writers busy beyond the busy timeout) ended the command in the driver's
    traceback. Now it is one `Error:` line and exit 1, and what the command had written is rolled back."""
    import peewee

    import webapp.cli as cli

    actor.user("carol@example.com")

    def gone(*args, **kwargs):
        raise getattr(peewee, error)("server closed the connection unexpectedly")

    monkeypatch.setattr(cli, "end_user_sessions", gone)  # after the account's row was marked disabled
    result = run(app, "users", "disable", "carol@example.com")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "Error: the database stopped answering (server closed the connection unexpectedly). Nothing was changed: "
        "a command stores all its changes at once or none. Run it again once the database answers."]
    with app.app_context():
        assert User.get(User.email == "carol@example.com").disabled_at is None
        assert not AuditEvent.select().where(AuditEvent.kind == "account_disabled").exists()
    monkeypatch.setattr(cli, "purge", gone)  # the command outside the groups
    purged = run(app, "purge-expired")
    assert purged.exit_code == 1 and purged.output.startswith("Error: the database stopped answering (")
    monkeypatch.undo()
    assert run(app, "users", "disable", "carol@example.com").exit_code == 0


def test_a_database_that_stops_answering_after_a_commands_change_says_it_was_stored(app, actor, monkeypatch):
    """A review of the test above: `users promote` commits, says so, then reads whether the account has a
    device; a database going away at that read ended in "Nothing was changed", over a promotion that was
    stored. A failure after a command's transaction says the change was stored."""
    import peewee

    from webapp.models import User as Model

    actor.user("carol@example.com")

    def gone(self):
        raise peewee.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(Model, "has_2fa", property(gone))
    result = run(app, "users", "promote", "carol@example.com")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("carol@example.com is now an admin")
    assert lines[-1] == ("Error: the database stopped answering (server closed the connection unexpectedly) after "
                         "the command had stored its change: check the account (users list, users activity) before "
                         "running it again.")
    assert "Nothing was changed" not in result.output
    monkeypatch.undo()
    with app.app_context():
        assert User.get(User.email == "carol@example.com").is_admin


def test_cli_reset_2fa_also_ends_half_finished_sign_ins(app, actor, secret, clock):
    """Like support's disable: someone left at the code step (with a phone that no longer counts) is sent
    back to sign in, instead of being told, code after code, that the code is wrong."""
    from webapp.models import SignInChallenge

    actor.user(secret=secret)
    waiting = Actor(app, app.test_client(), clock)
    assert waiting.password_step().headers["Location"].endswith("/login/verify")
    token = waiting.csrf("/login/verify")  # the code page is open in that browser
    assert run(app, "users", "reset-2fa", "alice@example.com").exit_code == 0
    with app.app_context():
        assert SignInChallenge.select().count() == 0
    r = waiting.client.post("/login/verify", data={"csrf_token": token, "code": waiting.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"


def test_keys_that_open_the_oldest_secret_but_not_the_newest_are_warned_about_at_start(tmp_path, clock, capsys):
    """The start-up check reads the oldest and the newest stored secret: keys that still open the first
    devices but not those enrolled since a rotation (the new key lost, an old key list deployed again) are
    reported too, naming the newest device, before its owner's sign-ins fail."""
    from webapp.db import db

    from .conftest import make_test_app

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    first = make_test_app(tmp_path / "a", url, clock, TOTP_ENCRYPTION_KEYS=old)
    Actor(first, first.test_client(), clock).user(secret=new_secret())
    rotated = make_test_app(tmp_path / "b", url, clock, TOTP_ENCRYPTION_KEYS=f"{new},{old}")  # the new key encrypts
    Actor(rotated, rotated.test_client(), clock).user("bob@example.com", secret=new_secret())
    capsys.readouterr()
    make_test_app(tmp_path / "c", url, clock, TOTP_ENCRYPTION_KEYS=old)
    assert ("the keys in TOTP_ENCRYPTION_KEYS cannot decrypt the stored TOTP secret of device 2 "
            "(bob@example.com's)") in capsys.readouterr().err
    db.close()


def test_keys_that_cannot_open_the_stored_secrets_give_a_warning_at_start_and_a_503_not_a_500(
        tmp_path, clock, capsys):
    """An operator dropped the key too early (or the instance folder's key was used instead of the
    environment's): start-up says so, naming the device, and a sign-in's code step answers 503 with a plain
    message, writes nothing and leaves the challenge for a retry once the key is back."""
    from webapp.models import SignInChallenge

    from .conftest import make_test_app

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    first = make_test_app(tmp_path / "a", url, clock)
    secret = new_secret()
    Actor(first, first.test_client(), clock).user(secret=secret)
    capsys.readouterr()
    app = make_test_app(tmp_path / "b", url, clock, TOTP_ENCRYPTION_KEYS=Fernet.generate_key().decode())
    assert ("the keys in TOTP_ENCRYPTION_KEYS cannot decrypt the stored TOTP secret of device 1 "
            "(alice@example.com's)") in capsys.readouterr().err
    a = Actor(app, app.test_client(), clock)
    a.password_step()
    with app.app_context():
        events, last_step = AuditEvent.select().count(), Device.get().last_step
    r = a.code_step(a.code(secret))
    body = r.get_data(as_text=True)
    assert r.status_code == 503 and "cannot be checked right now" in body and "Traceback" not in body
    with app.app_context():
        assert AuditEvent.select().count() == events and SignInChallenge.select().count() == 1
        assert Device.get().last_step == last_step  # the code was not spent


def test_with_htmx_the_unreadable_key_message_comes_with_the_reloaded_page(tmp_path, clock):
    """htmx shows no 5xx answer: the page reloads (HX-Refresh) and, the database being fine, carries the
    message (in a database outage it could not be stored); Turn off changed nothing."""
    from .conftest import make_test_app

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    first = make_test_app(tmp_path / "a", url, clock)
    secret = new_secret()
    alice = Actor(first, first.test_client(), clock)
    alice.user(secret=secret)
    alice.sign_in(secret=secret)
    clock.advance(30)
    cookie = alice.session_cookie()
    app = make_test_app(tmp_path / "b", url, clock, TOTP_ENCRYPTION_KEYS=Fernet.generate_key().decode())
    client = app.test_client()
    client.set_cookie("twostep_session", cookie)
    token = csrf_from(client.get("/settings").get_data(as_text=True))
    r = client.post("/settings/2fa/disable", headers={"HX-Request": "true"},
                    data={"csrf_token": token, "off-password": PASSWORD, "off-code": alice.code(secret)})
    assert r.status_code == 503 and r.headers["HX-Refresh"] == "true"
    page = client.get("/settings").get_data(as_text=True)
    assert "Two-factor authentication cannot be checked right now. Nothing was changed." in page
    with app.app_context():
        assert Device.select().count() == 1


def test_operator_commands_on_an_empty_instance_do_not_print_the_setup_code(tmp_path):
    """The setup code belongs on the server's console: `flask ... users list` (or a cron job's
    purge-expired) on an empty database printed the invitation to /setup, and `users create --admin` printed
    it just before making the admin."""
    import subprocess
    import sys

    from .live_app import ROOT

    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}", "SECRET_KEY": "k" * 40,
           "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(), "TWOSTEP_INSTANCE": str(tmp_path / "inst")}
    env.pop("TWOSTEP_PRODUCTION", None)
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "users", "list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "one-time code" not in done.stdout + done.stderr
    served = subprocess.run([sys.executable, "-c", "import wsgi"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)  # what gunicorn does: the server's console shows it
    assert served.returncode == 0 and "one-time code" in served.stderr


@pytest.mark.parametrize("command, shown", [("run", True), ("purge-expired", False)])
def test_flask_run_on_an_empty_instance_prints_the_setup_code(tmp_path, capsys, command, shown):
    """`flask run` (the development server; `make run`) serves pages, so its console gets the one-time setup
    code like gunicorn's; another command loading the app in the same way does not."""
    import click

    settings = {"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst"), "SECRET_KEY": "k" * 40,
                "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(), "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"}
    with click.Context(click.Command(command), info_name=command):  # what `flask COMMAND` has while loading the app
        create_app(settings)
    assert ("Create the first admin at /setup with the one-time code: " in capsys.readouterr().err) is shown


def test_purge_removes_a_session_past_the_absolute_limit_even_if_just_used(app, actor, clock):
    """security.md 30: a session more than 12 h old is over however active it is; the purge deletes its row
    (with its IP address and browser name) rather than keeping it until it has also been idle 30 minutes."""
    from webapp.clock import now
    from webapp.models import purge_expired

    actor.user()
    actor.sign_in()
    with app.app_context():
        ServerSession.update(created_at=now() - timedelta(hours=12, minutes=1), last_seen_at=now()).execute()
        assert purge_expired(app.config, now()) == (1, 0, 0, 0, 0, 0)
        assert ServerSession.select().count() == 0
    assert actor.client.get("/settings").status_code == 302  # signed out


def test_the_purge_deletes_a_backlog_in_transactions_of_a_batch_each(app, actor, clock, monkeypatch):
    """A soak test: the purge deleted every expired row in one write transaction, which on SQLite holds the
    writer lock for the whole backlog. 1.09 million expired sessions took 17.5 s, and every sign-in
    meanwhile waited out the 10 s busy timeout ("Please try again"); under gunicorn, a purge longer than its
    30 s timeout was killed and rolled back each time, so the table was never purged again. Now each
    transaction deletes at most PURGE_BATCH rows, and the rows of the batches done stay deleted."""
    import contextlib

    import webapp.db
    import webapp.models
    from webapp.clock import now
    from webapp.models import SignInChallenge, purge_expired

    user = actor.user()
    monkeypatch.setattr(webapp.models, "PURGE_BATCH", 3, raising=False)
    with app.app_context():
        current = now()
        old = current - app.config["SESSION_IDLE_TIMEOUT"] - timedelta(minutes=1)
        ServerSession.insert_many([{"id": f"{k:064x}", "user": user.id, "data": "{}", "created_at": old,
                                    "last_seen_at": old if k < 7 else current} for k in range(9)]).execute()
        SignInChallenge.insert_many([{"id": f"c{k:063x}", "user": user.id, "failures": 0,
                                      "created_at": current - app.config["CHALLENGE_TTL"] * 2}
                                     for k in range(4)]).execute()
        deleted_per_transaction = []
        real = webapp.db.write_transaction

        @contextlib.contextmanager
        def counting():
            before = ServerSession.select().count() + SignInChallenge.select().count()
            with real() as txn:
                yield txn
            deleted_per_transaction.append(before - ServerSession.select().count() - SignInChallenge.select().count())

        monkeypatch.setattr(webapp.db, "write_transaction", counting)
        assert purge_expired(app.config, current) == (7, 4, 0, 0, 0, 0)
        assert max(deleted_per_transaction) == 3 and sum(deleted_per_transaction) == 11
        assert ServerSession.select().count() == 2 and SignInChallenge.select().count() == 0


def test_the_apps_own_purge_stops_starting_batches_after_its_seconds_and_the_next_one_goes_on(app, actor,
                                                                                               monkeypatch):
    """The purge a worker runs after a response serves nobody meanwhile, and gunicorn kills a worker silent
    for its 30 s timeout: a backlog of a million rows took about that long in batches. With its seconds
    over, each table gets one batch more and the rest waits for the next purge; the command has no limit."""
    import webapp.models
    from webapp.clock import now
    from webapp.models import purge_expired

    user = actor.user()
    monkeypatch.setattr(webapp.models, "PURGE_BATCH", 3)
    with app.app_context():
        current = now()
        old = current - app.config["SESSION_IDLE_TIMEOUT"] - timedelta(minutes=1)
        ServerSession.insert_many([{"id": f"{k:064x}", "user": user.id, "data": "{}", "created_at": old,
                                    "last_seen_at": old} for k in range(8)]).execute()
        assert purge_expired(app.config, current, seconds=0)[0] == 3
        assert purge_expired(app.config, current, seconds=0)[0] == 3
        assert ServerSession.select().count() == 2
        assert purge_expired(app.config, current)[0] == 2
        assert ServerSession.select().count() == 0


def test_the_app_purges_with_a_time_limit_well_under_gunicorns_timeout(app, actor, monkeypatch):
    """The periodic purge is given seconds of its own (the test above says what they do), well below the
    30 s after which gunicorn kills a worker that is silent."""
    import random

    import webapp

    given = []
    monkeypatch.setattr(webapp, "purge_expired", lambda config, current, seconds=None: given.append(seconds)
                        or (0, 0, 0, 0, 0))
    monkeypatch.setattr(random, "random", lambda: 0.0)  # the first deadline: the first response
    actor.user()
    client = app.test_client()
    client.get("/login").close()
    client.get("/login").close()  # the purge runs here
    assert len(given) == 1 and given[0] is not None and 0 < given[0] <= 5


def test_the_purge_keeps_each_row_up_to_the_instant_it_expires(app, actor, secret, clock):
    """security.md 24, 30: a session, a sign-in waiting at the code step and an authenticator set-up are
    refused only once more than their time has passed (30 minutes idle, 12 hours in all, 5 and 15 minutes);
    at that very instant they still work, and the purge keeps them. A second later it deletes each of them,
    by its own limit."""
    from webapp.clock import now
    from webapp.models import PendingEnrolment, SignInChallenge, purge_expired

    cfg = app.config
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.client.post("/settings/2fa/start", data={"csrf_token": actor.csrf("/settings")})  # a set-up under way
    clock.advance(30)
    halfway = other_browser(actor)
    assert halfway.password_step().headers["Location"] == "/login/verify"

    def age(past, sessions=True):
        """These rows exactly at their limit, or `past` beyond it."""
        current = now()
        SignInChallenge.update(created_at=current - cfg["CHALLENGE_TTL"] - past).execute()
        PendingEnrolment.update(created_at=current - cfg["PENDING_ENROLMENT_TTL"] - past).execute()
        if sessions:
            ServerSession.update(last_seen_at=current - cfg["SESSION_IDLE_TIMEOUT"] - past,
                                 created_at=current - cfg["SESSION_ABSOLUTE_TIMEOUT"] - past).where(
                ServerSession.user == user.id).execute()

    with app.app_context():
        age(timedelta(0))
        assert purge_expired(cfg, now()) == (0, 0, 0, 0, 0, 0)
        assert PendingEnrolment.select().count() == 1
    assert actor.client.get("/settings").status_code == 200
    assert halfway.code_step(halfway.code(secret)).headers["Location"] == "/settings"
    other = other_browser(actor)
    assert other.password_step().headers["Location"] == "/login/verify"  # another code step under way
    token = other.csrf("/login/verify")  # its page is open
    with app.app_context():
        age(timedelta(seconds=1), sessions=False)
        assert purge_expired(cfg, now()) == (0, 1, 1, 0, 0, 0)
        age(timedelta(seconds=1))
        assert purge_expired(cfg, now()) == (2, 0, 0, 0, 0, 0)  # both signed-in sessions
    assert actor.client.get("/settings").status_code == 302
    r = other.client.post("/login/verify", data={"csrf_token": token, "code": other.code(secret)})
    assert r.headers["Location"] == "/login?notice=sign-in-expired"


def test_an_address_stored_only_lower_cased_with_full_width_letters_can_sign_in(app, actor):
    """Until 2026-12-05 an address was stored only stripped and lower-cased: one typed with full-width letters
    in the domain kept them. Its owner, typing it as before (in any case), still finds the account: the
    sign-in and the operator commands look under that old spelling too."""
    stored = "carol@ｅｘａｍｐｌｅ．com"
    with app.app_context():
        User.create(email=stored, password_hash=hash_password(PASSWORD))
        User.create(email="admin@example.com", password_hash="x", is_admin=True)
        assert User.by_email("Carol@ＥＸＡＭＰＬＥ．com").email == stored
    for spelling in (stored, "Carol@ＥＸＡＭＰＬＥ．com"):
        assert actor.password_step(email=spelling).headers["Location"] == "/settings", spelling
        actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    result = run(app, "users", "reset-2fa", stored)
    assert result.exit_code == 0 and "has no authenticator device; nothing changed" in result.output


def test_cli_reset_2fa_lifts_the_block_after_supports_window_ended(app, actor, clock):
    """An account whose support window ended without a new device cannot sign in ("blocked"). The operator's
    `users reset-2fa` is the way out: it clears the window (it used to say "nothing changed", the account
    having no device), and the person signs in with the password alone again."""
    from webapp.clock import now

    actor.user()
    with app.app_context():
        User.update(tfa_reset_until=now() - timedelta(hours=1)).execute()
    assert actor.password_step().status_code == 403  # the right password, and still no way in
    result = run(app, "users", "reset-2fa", "alice@example.com")
    assert result.exit_code == 0 and "removed 0 device(s) of alice@example.com; 2FA is off" in result.output
    with app.app_context():
        assert User.by_email("alice@example.com").tfa_reset_until is None
        assert AuditEvent.select().where(AuditEvent.kind == "tfa_reset").count() == 1
    clock.advance(3600)
    r = actor.password_step()
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    assert actor.client.get("/settings").status_code == 200


@pytest.mark.parametrize("keys", [" , ", ",", "  "])
def test_encryption_keys_that_are_only_commas_and_spaces_stop_the_start(tmp_path, keys):
    """TOTP_ENCRYPTION_KEYS set but naming no key: the start stops with a message, rather than an app that
    fails on the first enrolment or sign-in with a code."""
    with pytest.raises(ConfigError, match="TOTP_ENCRYPTION_KEYS is empty"):
        create_app({"INSTANCE_PATH": str(tmp_path), "SECRET_KEY": "k" * 40, "TOTP_ENCRYPTION_KEYS": keys,
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"})


def test_a_malformed_encryption_key_is_named_by_its_place_not_by_its_value(tmp_path):
    """An operator's walk: "must be comma-separated Fernet keys" did not say which of `new,old` was wrong. The
    message names the key's place in the list, and never the key (it goes to logs and consoles)."""
    from cryptography.fernet import Fernet

    good = Fernet.generate_key().decode()
    with pytest.raises(ConfigError) as raised:
        create_app({"INSTANCE_PATH": str(tmp_path), "SECRET_KEY": "k" * 40,
                    "TOTP_ENCRYPTION_KEYS": f"{good},not-a-key-at-all",
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"})
    message = str(raised.value)
    assert message == ("TOTP_ENCRYPTION_KEYS must be comma-separated Fernet keys: key 2 of 2 is not one "
                       "(44 characters of URL-safe Base64)")
    assert good not in message and "not-a-key" not in message


# ------------------------------------------------------------------ users disable / enable


def test_cli_disable_takes_the_account_out_of_use_at_once_and_enable_brings_it_back(app, actor, secret, clock):
    """`users disable` (someone who left, an account in other hands): the person's live session, a sign-in
    waiting at the code step and an unfinished set-up of another authenticator all end at once, and the
    command says so; devices and password stay. One audit record with the reason (security.md 40, 42).
    `users enable` undoes it, and the person signs in as before, with the same device. Each command run a
    second time says that nothing changed and records nothing."""
    from webapp.models import PendingEnrolment, SignInChallenge

    user = actor.user(secret=secret)
    before = user_row(app, "alice@example.com").password_hash
    actor.sign_in(secret=secret)
    actor.client.post("/settings/2fa/start", data={"csrf_token": actor.csrf("/settings")})  # a pending key
    halfway = Actor(app, app.test_client(), clock)
    assert halfway.password_step().headers["Location"] == "/login/verify"

    result = run(app, "users", "disable", "Alice@Example.com", "--reason", "left the company")
    assert result.exit_code == 0, result.output
    assert result.output == ("alice@example.com is disabled: 1 session(s), 1 half-finished sign-in(s) and 1 "
                             "unfinished authenticator set-up(s) ended; devices and password unchanged "
                             "(`users enable` undoes it)\n")
    assert actor.client.get("/settings").status_code == 302  # the live session, on its next request
    assert halfway.client.get("/login/verify").headers["Location"] == "/login?notice=sign-in-expired"
    with app.app_context():
        row = User.get_by_id(user.id)
        assert row.disabled_at == utc(clock.t) and row.password_hash == before
        assert Device.select().where(Device.user == user.id).count() == 1
        for model in (ServerSession, SignInChallenge, PendingEnrolment):
            assert model.select().where(model.user == user.id).count() == 0, model
        [event] = AuditEvent.select().where(AuditEvent.kind == "account_disabled")
        assert event.user_id == user.id and event.details == {
            "via": "cli", "reason": "left the company", "sessions_ended": 1, "sign_ins_ended": 1, "set_ups_ended": 1}
    assert "alice@example.com\tuser\tdisabled since 2009-02-13 23:31 UTC; 2FA active (1 device)\n" in \
        run(app, "users", "list").output
    assert "Account disabled by the server operator" in run(app, "users", "activity", "alice@example.com").output

    clock.advance(60)
    again = run(app, "users", "disable", "alice@example.com")
    assert again.exit_code == 0
    assert again.output == "alice@example.com is already disabled (since 2009-02-13 23:31 UTC); nothing changed\n"
    assert user_row(app, "alice@example.com").disabled_at == utc(clock.t - 60)

    result = run(app, "users", "enable", "alice@example.com")
    assert result.exit_code == 0
    assert result.output == ("alice@example.com is enabled again: it signs in with its current password and a "
                             "code from 1 authenticator device(s)\n")
    again = run(app, "users", "enable", "alice@example.com")
    assert again.exit_code == 0 and again.output == "alice@example.com is not disabled; nothing changed\n"
    with app.app_context():
        assert User.get_by_id(user.id).disabled_at is None
        assert [(e.kind, e.details) for e in AuditEvent.select().where(AuditEvent.kind.startswith("account_"))
                .order_by(AuditEvent.id)][1:] == [("account_enabled", {"via": "cli",
                                                                      "disabled_since": "2009-02-13T23:31:30Z"})]
    assert "alice@example.com\tuser\t2FA active (1 device)\n" in run(app, "users", "list").output
    assert actor.sign_in(secret=secret).headers["Location"] == "/settings"  # the same device and password

    for command in ("disable", "enable"):
        result = run(app, "users", command, "nobody@example.com")
        assert result.exit_code == 1 and "no account with email nobody@example.com" in result.output


def test_cli_enable_ends_and_reports_a_session_left_from_before_the_disable(app, actor):
    """`users enable` ends any session row of the account still there from before the disable (a session
    renewed just as the disable committed, or a row restored from a backup) and says so, as every command
    reports the sessions it ended; the audit record counts it (security.md 42)."""
    user = actor.user()
    assert run(app, "users", "disable", "alice@example.com").exit_code == 0
    with app.app_context():
        ServerSession.create(id="s" * 64, user=user.id)

    result = run(app, "users", "enable", "alice@example.com")

    assert result.exit_code == 0
    assert result.output == ("alice@example.com is enabled again: it signs in with its current password and no "
                             "code (no authenticator device); 1 session(s) left from before ended\n")
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 0
        [event] = AuditEvent.select().where(AuditEvent.kind == "account_enabled")
        assert event.details["sessions_ended"] == 1


def test_cli_disable_leaves_an_admin_who_can_sign_in(app, actor):
    """As `promote --revoke` (security.md 41: someone must be left to answer support requests), `users
    disable` refuses to leave no admin whose account is in use: nobody could open the Support page, and the
    first-run page does not come back while accounts exist. A disabled admin does not count as the other
    admin, for either command."""
    actor.user(email="root@example.com", admin=True)
    actor.sign_in(email="root@example.com")
    result = run(app, "users", "disable", "root@example.com")
    assert result.exit_code == 1
    assert "root@example.com is the only admin: promote another account first. Nothing changed." in result.output
    assert actor.client.get("/settings").status_code == 200
    actor.user(email="bob@example.com", admin=True)
    assert run(app, "users", "disable", "bob@example.com").exit_code == 0
    for args in (["disable", "root@example.com"], ["promote", "root@example.com", "--revoke"]):
        result = run(app, "users", *args)
        assert result.exit_code == 1, args
        assert ("root@example.com is the only admin whose account is not disabled: promote another account first. "
                "Nothing changed.") in result.output
    with app.app_context():
        root = User.by_email("root@example.com")
        assert root.is_admin and root.disabled_at is None
        assert AuditEvent.select().where(AuditEvent.kind == "account_disabled").count() == 1  # bob's
    assert run(app, "users", "enable", "bob@example.com").exit_code == 0
    result = run(app, "users", "disable", "root@example.com")
    assert result.exit_code == 0 and "root@example.com is disabled: 1 session(s)" in result.output
    assert actor.client.get("/settings").status_code == 302


def test_cli_revoking_a_disabled_admin_is_not_refused_as_the_last_admin(app, actor):
    """The last-admin refusal keeps an admin who can sign in. A disabled admin is not one: taking their rights
    leaves no fewer, so it is done even when no other admin is left (an instance whose accounts were all made
    by `users create` without --admin)."""
    actor.user(email="bob@example.com")
    for args in (["disable", "bob@example.com"], ["promote", "bob@example.com"]):
        assert run(app, "users", *args).exit_code == 0, args
    result = run(app, "users", "promote", "bob@example.com", "--revoke")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("bob@example.com is now an ordinary user; 0 session(s) ended")
    assert not user_row(app, "bob@example.com").is_admin


def test_cli_commands_change_the_named_account_only(app, actor, clock):
    """security.md 18, 40: `users disable`, `users enable` and `users unlock` act on one account: another
    person's unfinished authenticator set-up and session outlive Alice's disable, Bob stays disabled when
    Alice is enabled, and the lock that Bob's wrong passwords put on his account stays when Alice's is
    cleared."""
    from webapp.models import PendingEnrolment

    actor.user(email="root@example.com", admin=True)
    alice, bob = actor.user(), actor.user(email="bob@example.com")
    bobs = other_browser(actor)
    assert bobs.password_step("bob@example.com").headers["Location"] == "/settings"
    bobs.client.post("/settings/2fa/start", data={"csrf_token": bobs.csrf("/settings")})  # Bob's set-up
    lock_password_entry(other_browser(actor))  # Alice's account locked from a browser not known for her
    bob_lock = lock_password_entry(other_browser(actor), "bob@example.com")

    assert run(app, "users", "unlock", "alice@example.com").exit_code == 0
    with app.app_context():
        row = User.get_by_id(bob.id)
        assert (row.password_failures, row.password_locked_until) == (5, bob_lock)
    assert list_line(app, "bob@example.com") == (f"bob@example.com\tuser\t2FA off; password entry locked until "
                                                 f"{bob_lock:%Y-%m-%d %H:%M:%S} UTC")
    assert other_browser(actor).password_step("bob@example.com").status_code == 429

    assert run(app, "users", "disable", "alice@example.com").exit_code == 0
    with app.app_context():
        assert PendingEnrolment.select().where(PendingEnrolment.user == bob.id).count() == 1
        assert PendingEnrolment.select().where(PendingEnrolment.user == alice.id).count() == 0
    assert bobs.client.get("/settings").status_code == 200

    assert run(app, "users", "disable", "bob@example.com").exit_code == 0
    assert run(app, "users", "enable", "alice@example.com").exit_code == 0
    assert user_row(app, "alice@example.com").disabled_at is None
    assert user_row(app, "bob@example.com").disabled_at == utc(clock.t)
    assert list_line(app, "bob@example.com").startswith("bob@example.com\tuser\tdisabled since ")


def test_a_sign_up_whose_record_cannot_be_written_makes_no_account(app, actor, monkeypatch):
    """security.md 42, 43: the account and its account_created record commit together. A database error in
    between left an account without a record, and the form sent again said it already existed (a race
    review). Now the person sees the 503 page, no account is made, and the form can be sent again."""
    from .conftest import failing_audit

    actor.user("admin@example.com", admin=True)  # sign-up needs the first admin
    with monkeypatch.context() as patch:
        failing_audit(patch, "webapp.auth", "account_created")
        data = {"email": "dave@example.com", "password": PASSWORD, "confirm": PASSWORD}
        assert actor.post_form("/signup", data).status_code == 503
    with app.app_context():
        assert not User.select().where(User.email == "dave@example.com").exists()
    assert actor.post_form("/signup", data).headers["Location"] == "/settings"
    with app.app_context():
        [record] = AuditEvent.select().where(AuditEvent.kind == "account_created")
        assert record.user_id == User.get(User.email == "dave@example.com").id


# ------------------------------------------------------------------ users erase (README "Personal data")


def test_cli_erase_deletes_a_persons_data_and_keeps_the_number_and_the_audit_records(app, actor, secret, clock):
    """An erasure request: `users erase` deletes the person's devices, sessions, known browsers, contact
    requests (from the account, and sent in its address's name without one) and half-finished sign-ins; the
    live session ends at once. The row stays, renamed and disabled, so its number is never another account's
    (a new account with the same address gets a new one and none of the old audit records), and the audit
    records stay, with one more that names no address (security.md 42, 43). Other people keep theirs."""
    from webapp.models import KnownBrowser, SupportRequest

    user = actor.user(secret=secret)
    bob = actor.user(email="bob@example.com")
    actor.sign_in(secret=secret)
    with app.app_context():
        SupportRequest.create(email="alice@example.com", message="lost my phone", user=user.id)
        SupportRequest.create(email="Alice@example.com".lower(), message="in her name", user=None)
        SupportRequest.create(email="bob@example.com", message="mine", user=bob.id)
        assert KnownBrowser.select().where(KnownBrowser.user == user.id).count() == 1
        records = AuditEvent.select().where(AuditEvent.user == user.id).count()
        [device] = user.devices

    result = run(app, "users", "erase", "alice@example.com", "--yes")

    assert result.exit_code == 0, result.output
    assert result.output == (
        f"erased alice@example.com: it is now erased-{user.id}@erased.invalid, disabled; deleted 1 device(s), "
        f"1 session(s), 1 known browser(s), 0 half-finished sign-in(s) and set-up(s), 2 contact request(s). "
        f"Its {records + 1} audit record(s) stay (README \"Personal data\")\n")
    assert actor.client.get("/settings").status_code == 302
    fresh = Actor(app, app.test_client(), clock)
    r = fresh.password_step("alice@example.com")
    assert r.status_code == 200 and "Incorrect email address or password." in r.get_data(as_text=True)
    with app.app_context():
        row = User.get_by_id(user.id)
        assert row.email == f"erased-{user.id}@erased.invalid" and row.disabled_at == utc(clock.t)
        assert not row.is_admin and row.password_hash != user.password_hash and row.last_login_at is None
        for model in (Device, ServerSession, KnownBrowser, SupportRequest):
            assert model.select().where(model.user == user.id).count() == 0, model
        assert [r.message for r in SupportRequest.select()] == ["mine"]
        assert AuditEvent.select().where(AuditEvent.user == user.id).count() == records + 1
        [event] = AuditEvent.select().where(AuditEvent.kind == "account_erased")
        assert event.details == {"via": "cli", "devices_removed": 1, "device_ids": [device.id], "sessions_ended": 1,
                                 "requests_deleted": 2}
        assert "alice" not in event.detail
    assert "Account erased by the server operator" in run(app, "users", "activity", f"#{user.id}").output

    result = run(app, "users", "create", "alice@example.com", "--password", "long enough pw")
    assert result.exit_code == 0
    with app.app_context():
        again = User.by_email("alice@example.com")
        assert again.id != user.id and AuditEvent.select().where(AuditEvent.user == again.id).count() == 1


def test_cli_erase_records_the_numbers_of_the_devices_it_removed(app, actor, secret):
    """A security review: the erasure's record said how many devices went, not which, where every other removal
    names them by number (device_ids: security.revoke_second_factor), the number the records of each device's
    sign-ins give. It does now, not by name (what the person typed is not copied into a new record); `users
    activity` shows them (security.md 43)."""
    import json

    user = actor.user(secret=secret, devices={"Alice's iPhone": new_secret()})
    actor.user("bob@example.com")
    with app.app_context():
        numbers = sorted(d.id for d in user.devices)

    for email in ("alice@example.com", "bob@example.com"):
        assert run(app, "users", "erase", email, "--yes").exit_code == 0

    with app.app_context():
        alice, bob = (e.details for e in AuditEvent.select().where(AuditEvent.kind == "account_erased")
                      .order_by(AuditEvent.id))
    assert (alice["devices_removed"], alice["device_ids"]) == (2, numbers) and "iPhone" not in json.dumps(alice)
    assert (bob["devices_removed"], bob["device_ids"]) == (0, None)
    assert (f"Sessions ended: 0; Device numbers: {numbers[0]}, {numbers[1]}]"
            in run(app, "users", "activity", f"#{user.id}").output)


def test_forgotten_browsers_are_exported_with_when_and_erased_with_the_requests_counted_on_them(app, actor, clock):
    """README "Personal data": a browser forgotten by "Sign out everywhere else" (or a new password, support's
    disable, `users reset-2fa`) stays stored for a while, for the contact form's allowance alone: `users
    export` lists it with the time it was forgotten, and `users erase` deletes it with the known ones and with
    the contact requests counted on it (it only forgot them before, leaving a row that names the person)."""
    import json

    from webapp.models import KnownBrowser, SupportRequest

    user = actor.user()
    assert actor.password_step().headers["Location"] == "/settings"
    clock.advance(60)
    other = Actor(app, app.test_client(), clock)
    other.client.environ_base["REMOTE_ADDR"] = "198.51.100.8"
    assert other.password_step().headers["Location"] == "/settings"
    assert other.post_form("/settings/sessions/end-others", {}, form_url="/settings").status_code == 302
    forgotten_at = utc(clock.t)
    clock.advance(60)
    r = actor.post_form("/support/contact", {"email": "alice@example.com", "message": "Not my password change!"})
    assert r.status_code == 302

    data = json.loads(run(app, "users", "export", "alice@example.com").output)
    browsers = sorted(data["known_browsers"], key=lambda b: b["first_sign_in"])
    assert [b["forgotten"] for b in browsers] == [f"{forgotten_at:%Y-%m-%dT%H:%M:%SZ}", None]
    with app.app_context():
        [request] = SupportRequest.select()
        assert request.known_browser == KnownBrowser.get(KnownBrowser.forgotten_at.is_null(False)).id
        assert request.known_browser not in json.dumps(data)  # a browser's key is no personal data to give out

    result = run(app, "users", "erase", "alice@example.com", "--yes")
    assert result.exit_code == 0 and "2 known browser(s)" in result.output and "1 contact request(s)" in result.output
    with app.app_context():
        assert KnownBrowser.select().where(KnownBrowser.user == user.id).count() == 0
        assert SupportRequest.select().count() == 0


def test_cli_an_erased_account_cannot_be_put_back_in_use(app, actor):
    """Nothing gives an erased account back: enable, set-password and promote refuse it in one line and
    change nothing; erase again says there is nothing to do."""
    user = actor.user()
    assert run(app, "users", "erase", "alice@example.com", "--yes").exit_code == 0
    for args in (["enable", f"#{user.id}"], ["set-password", f"erased-{user.id}@erased.invalid", "--password",
                                             "long enough pw"], ["promote", f"#{user.id}"]):
        result = run(app, "users", *args)
        assert result.exit_code == 1, args
        assert result.output == (f"Error: account #{user.id} was erased (users erase): it cannot be used again. "
                                 "Nothing changed.\n")
    again = run(app, "users", "erase", f"#{user.id}", "--yes")
    assert again.exit_code == 0 and again.output == f"account #{user.id} is already erased; nothing changed\n"
    with app.app_context():
        row = User.get_by_id(user.id)
        assert row.disabled_at is not None and not row.is_admin
        assert AuditEvent.select().where(AuditEvent.kind == "account_erased").count() == 1


def test_cli_erase_asks_first_and_refuses_the_last_admin(app, actor):
    """Erasing cannot be undone: without --yes it asks, and anything but yes changes nothing. The last admin
    in use is refused, as by disable (security.md 41)."""
    actor.user()
    actor.user(email="root@example.com", admin=True)
    result = run(app, "users", "erase", "alice@example.com", input="n\n")
    assert result.exit_code == 1 and "for good? This cannot be undone" in result.output
    result = run(app, "users", "erase", "root@example.com", "--yes")
    assert result.exit_code == 1
    assert "root@example.com is the only admin: promote another account first. Nothing changed." in result.output
    with app.app_context():
        assert sorted(u.email for u in User.select()) == ["alice@example.com", "root@example.com"]
        assert AuditEvent.select().where(AuditEvent.kind == "account_erased").count() == 0
    result = run(app, "users", "erase", "alice@example.com", input="y\n")
    assert result.exit_code == 0 and "erased alice@example.com" in result.output


@pytest.mark.parametrize("command", [["enable"], ["promote"], ["set-password", "--password", "long enough pw"],
                                     ["erase", "--yes"]])
def test_cli_an_account_erased_while_a_command_waits_for_it_is_not_put_back_in_use(app, actor, monkeypatch,
                                                                                  command):
    """`enable`, `promote` and `set-password` refused an erased account only when they looked it up, before
    their transaction: one erased meanwhile (`users erase` in another shell, committed while the command
    waited for the person's row or asked for the password) was enabled, made an admin or given a known
    password all the same, and a second `erase` erased it again, with a second record. Each decides again
    holding the row."""
    from webapp import cli
    from webapp.clock import now

    user = actor.user()
    assert run(app, "users", "disable", "alice@example.com").exit_code == 0
    real = cli._get_user

    def read_then_erased(email, *args, **kwargs):
        found = real(email, *args, **kwargs)
        User.update(email=cli.erased_email(found.id), disabled_at=now(), is_admin=False,
                    password_hash="x").where(User.id == found.id).execute()
        return found

    monkeypatch.setattr(cli, "_get_user", read_then_erased)
    result = run(app, "users", command[0], "alice@example.com", *command[1:])
    with app.app_context():
        row = User.get_by_id(user.id)
        assert row.disabled_at is not None and not row.is_admin and row.password_hash == "x"
        assert not AuditEvent.select().where(AuditEvent.kind.in_(
            ["account_enabled", "role_changed", "password_changed", "account_erased"])).exists()
    if command[0] == "erase":
        assert result.exit_code == 0 and result.output == f"account #{user.id} is already erased; nothing changed\n"
    else:
        assert result.exit_code == 1 and result.output == (
            f"Error: account #{user.id} was erased (users erase): it cannot be used again. Nothing changed.\n")


def test_cli_export_writes_what_is_stored_about_one_person_and_nothing_else(app, actor, secret, clock):
    """An access request: `users export` gives the person's account, devices (never the secret), live
    sessions, known browsers, contact requests and the audit records about them as JSON. What an admin did
    to them says so without the admin's address or IP; what they did to another account shows no details of
    it; nobody else's data is in it (security.md 10: no secret leaves the server)."""
    import json

    from webapp.models import SupportRequest

    user = actor.user(secret=secret)
    root = actor.user(email="root@example.com", admin=True)
    bob = actor.user(email="bob@example.com")
    actor.client.environ_base.update({"REMOTE_ADDR": "198.51.100.7", "HTTP_USER_AGENT": "AliceLaptop/2.0"})
    actor.sign_in(secret=secret)
    with app.app_context():
        SupportRequest.create(email="alice@example.com", message="lost my phone", user=user.id)
        SupportRequest.create(email="bob@example.com", message="bob's own words", user=bob.id)
        AuditEvent.create(kind="support_tfa_disabled", user=user.id, actor=root.id, ip="203.0.113.99",
                          detail=json.dumps({"reason": "phone lost", "ticket": "T-1"}))
        AuditEvent.create(kind="support_tfa_disabled", user=bob.id, actor=user.id, ip="198.51.100.7",
                          detail=json.dumps({"reason": "bob's private reason", "ticket": "T-2"}))

    result = run(app, "users", "export", "alice@example.com")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["account"]["email"] == "alice@example.com" and data["account"]["number"] == user.id
    with app.app_context():  # by number too, as the audit records about a device name it
        assert [(d["number"], d["name"]) for d in data["devices"]] == [(Device.get().id, "Phone")]
    assert [(s["ip"], s["browser"]) for s in data["sessions"]] == [("198.51.100.7", "AliceLaptop/2.0")]
    assert len(data["known_browsers"]) == 1
    assert [r["message"] for r in data["contact_requests"]] == ["lost my phone"]
    kinds = [r["kind"] for r in data["audit_records"]]
    assert kinds[:3] == ["password_accepted", "code_accepted", "signin"] and kinds[-2:] == ["support_tfa_disabled"] * 2
    by_admin, to_bob = data["audit_records"][-2:]
    assert by_admin["by_an_admin"] and by_admin["ip"] is None and by_admin["details"]["reason"] == "phone lost"
    assert to_bob == {"id": to_bob["id"], "time": to_bob["time"], "kind": "support_tfa_disabled",
                      "event": to_bob["event"], "about_this_account": False}
    for foreign in (secret, "root@example.com", "203.0.113.99", "bob", "secret_enc"):
        assert foreign not in result.output, foreign


def test_cli_export_gives_what_is_stored_though_no_longer_in_use(app, actor, secret, clock):
    """A review against the models: `users export` left out what is stored about the person but not in use:
    sessions past their timeout that the purge has not deleted yet (with IP address and browser), the IP
    address each contact request was sent from, the account's and each known browser's count of wrong
    passwords and codes with their locks, and half-finished sign-ins and set-ups. An access request is for
    what is stored, not for what is in use; secrets stay out."""
    import json
    from datetime import timedelta

    from webapp.clock import now
    from webapp.models import KnownBrowser, PendingEnrolment, SignInChallenge, SupportRequest

    user = actor.user(secret=secret)
    with app.app_context():
        current = now()
        ServerSession.create(id="s" * 64, user=user.id, ip="198.51.100.20", user_agent="OldLaptop/1.0",
                             created_at=current - timedelta(hours=3), last_seen_at=current - timedelta(hours=2))
        SupportRequest.create(email="alice@example.com", message="lost my phone", user=user.id, ip="198.51.100.21")
        User.update(password_failures=4, password_locked_until=current + timedelta(minutes=5), code_failures=2,
                    code_locked_until=current + timedelta(minutes=1)).where(User.id == user.id).execute()
        KnownBrowser.create(id="k" * 64, user=user.id, password_failures=3,
                            password_locked_until=current + timedelta(minutes=2))
        SignInChallenge.create(id="c" * 64, user=user.id, failures=1, next_url="/settings/devices")
        session = ServerSession.create(id="p" * 64, user=user.id, ip="198.51.100.22", user_agent="Phone/1.0")
        PendingEnrolment.create(session=session.id, user=user.id, secret_enc="never-shown", failures=2)

    result = run(app, "users", "export", "alice@example.com")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    sessions = {s["browser"]: s for s in data["sessions"]}
    assert sessions["OldLaptop/1.0"]["ip"] == "198.51.100.20" and sessions["OldLaptop/1.0"]["expired"]
    assert sessions["Phone/1.0"]["expired"] is False
    assert [r["ip"] for r in data["contact_requests"]] == ["198.51.100.21"]
    stamp = lambda delta: f"{current + delta:%Y-%m-%dT%H:%M:%SZ}"
    account = data["account"]
    assert (account["wrong_passwords"], account["passwords_refused_until"]) == (4, stamp(timedelta(minutes=5)))
    assert (account["wrong_codes"], account["codes_refused_until"]) == (2, stamp(timedelta(minutes=1)))
    [browser] = data["known_browsers"]
    assert (browser["wrong_passwords"], browser["passwords_refused_until"]) == (3, stamp(timedelta(minutes=2)))
    [sign_in] = data["sign_ins_waiting_for_a_code"]
    assert sign_in["wrong_codes"] == 1 and sign_in["going_to"] == "/settings/devices"
    [set_up] = data["devices_being_set_up"]
    assert set_up["wrong_codes"] == 2
    for secret_text in (secret, "never-shown", "s" * 64, "k" * 64, "c" * 64, "p" * 64):
        assert secret_text not in result.output, secret_text


def test_cli_export_reads_the_audit_records_in_batches(app, actor, clock, monkeypatch):
    """A scale review: `users export` read every audit record about or by the person in one query and held
    them, and the whole JSON, in memory before writing a byte: 100,000 records took 360 MB (an admin's or a
    person's under attack, README "Personal data": a million would take gigabytes). It now reads each side
    (about the person, done by them) EXPORT_BATCH at a time in time order on its own index and writes each
    record as it goes; the document is the same: each record once, oldest first, ties by id."""
    import json
    from datetime import timedelta

    from webapp import cli
    from webapp.clock import now

    user = actor.user(admin=True)
    bob = actor.user(email="bob@example.com")
    with app.app_context():
        start = now() - timedelta(days=1)
        rows = []
        for n in range(20):  # about her, by her to bob, both, nobody's and bob's own; some at the same second
            at = start + timedelta(seconds=n // 3)
            person, by = [(user.id, None), (bob.id, user.id), (user.id, user.id), (None, None), (bob.id, None)][n % 5]
            rows.append({"kind": "signin", "user": person, "actor": by, "created_at": at,
                         "detail": json.dumps({"n": n})})
        AuditEvent.insert_many(rows).execute()
        mine = (AuditEvent.user == user.id) | (AuditEvent.actor == user.id)
        expected = [e.id for e in AuditEvent.select().where(mine).order_by(AuditEvent.created_at, AuditEvent.id)]
    monkeypatch.setattr(cli, "EXPORT_BATCH", 3)
    statements = record_statements(monkeypatch)
    result = run(app, "users", "export", "alice@example.com")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["id"] for r in data["audit_records"]] == expected and len(expected) == 12
    assert result.output == json.dumps(data, indent=2, ensure_ascii=False) + "\n"  # the same document as before
    reads = [sql for sql in statements if 'FROM "auditevent"' in sql]
    assert len(reads) >= len(expected) // 3 + 1, reads  # no read of all of them at once


def test_cli_erase_ends_the_sessions_at_the_code_step_that_hold_the_address(app, actor, secret, clock):
    """A browser at the code step has a session of its own, not yet the account's, holding the address typed at
    the password step: an erasure left it, with the address, until it timed out. It goes with the rest (and
    is counted); another person's code step stays."""
    from webapp.sessions import token_hash

    user = actor.user(secret=secret)
    actor.user(email="bob@example.com", secret=secret)
    halfway, other = Actor(app, app.test_client(), clock), Actor(app, app.test_client(), clock)
    assert halfway.password_step("alice@example.com").headers["Location"] == "/login/verify"
    assert other.password_step("bob@example.com").headers["Location"] == "/login/verify"

    result = run(app, "users", "erase", "alice@example.com", "--yes")

    assert result.exit_code == 0, result.output
    assert "deleted 1 device(s), 1 session(s), 0 known browser(s), 1 half-finished sign-in(s)" in result.output
    with app.app_context():
        assert ServerSession.get_or_none(ServerSession.id == token_hash(halfway.session_cookie())) is None
        kept = ServerSession.get(ServerSession.id == token_hash(other.session_cookie()))
        assert "bob@example.com" in kept.data and "alice" not in "".join(s.data for s in ServerSession.select())
        [event] = AuditEvent.select().where(AuditEvent.kind == "account_erased")
        assert event.details["sessions_ended"] == 1 and event.user_id == user.id
    assert other.code_step(other.code(secret)).headers["Location"] == "/settings"


def test_cli_export_lists_the_browsers_at_the_code_step_that_hold_the_address(app, actor, secret, clock):
    """A browser between the password and the code has a session of its own that names the person (the
    address typed, its IP address and browser): `users erase` deleted it, but `users export` did not list it,
    so an access request missed stored data that an erasure deletes. It is listed apart from the sessions
    that were signed in; another person's is not."""
    import json

    actor.user(secret=secret)
    actor.user(email="bob@example.com", secret=secret)
    halfway, other = Actor(app, app.test_client(), clock), Actor(app, app.test_client(), clock)
    halfway.client.environ_base.update({"REMOTE_ADDR": "198.51.100.30", "HTTP_USER_AGENT": "Stranger/1.0"})
    other.client.environ_base.update({"REMOTE_ADDR": "198.51.100.31", "HTTP_USER_AGENT": "BobPhone/1.0"})
    assert halfway.password_step("alice@example.com").headers["Location"] == "/login/verify"
    assert other.password_step("bob@example.com").headers["Location"] == "/login/verify"

    result = run(app, "users", "export", "alice@example.com")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["sessions"] == []
    [waiting] = data["browsers_not_signed_in"]
    assert (waiting["ip"], waiting["browser"], waiting["expired"]) == ("198.51.100.30", "Stranger/1.0", False)
    assert "BobPhone" not in result.output and "198.51.100.31" not in result.output


def test_cli_export_writes_characters_that_act_on_a_terminal_as_escapes(app, actor, secret, clock):
    """A security review: `users export` printed stored text as it is, and what a sign-in under way was going
    to (stored before safe_next refused such targets), a contact message or an audit record's detail can hold
    a C1 control (U+009B starts an escape sequence on the operator's terminal), DEL, a bidirectional override
    or a line separator. Each is written as a \\u escape, which a JSON reader turns back into what is stored;
    letters of any alphabet stay readable, and a document without such characters is written as before."""
    import json

    from webapp.models import SignInChallenge, SupportRequest

    target = "/settings\u009b2J\u009d0;pwned\x07\x7f\u202egnp.exe"
    message = "call me\u2028\u2029\u200b\u2066back\u2069 \U000e0041"
    user = actor.user(email="zo\u00eb@example.com", devices={"Телефон Маши": secret})
    with app.app_context():
        SignInChallenge.create(id="c" * 64, user=user.id, next_url=target)
        SupportRequest.create(email="zo\u00eb@example.com", message=message, user=user.id)
        SupportRequest.create(email="carol@example.com", message=message)
        AuditEvent.create(kind="support_tfa_disabled", user=user.id, detail=json.dumps({"reason": message}))

    for address in ("zo\u00eb@example.com", "carol@example.com"):  # an account, and an address without one
        result = run(app, "users", "export", address)

        assert result.exit_code == 0, result.output
        for c in "\u009b\u009d\x7f\u202e\u2028\u2029\u200b\u2066\u2069\U000e0041":
            assert c not in result.output, repr(c)
        data = json.loads(result.output)
        assert [r["message"] for r in data["contact_requests"]] == [message]
        if address == "carol@example.com":
            continue
        assert "\\u009b2J\\u009d0;pwned\\u0007\\u007f\\u202egnp.exe" in result.output
        assert data["sign_ins_waiting_for_a_code"][0]["going_to"] == target
        assert data["audit_records"][-1]["details"]["reason"] == message
        assert '"name": "Телефон Маши"' in result.output and '"email": "zo\u00eb@example.com"' in result.output


def test_cli_export_and_erase_reach_contact_requests_of_an_address_without_an_account(app, actor, clock):
    """Someone without an account who wrote to support (the contact form takes any address) can ask what is
    kept and to have it erased: both commands said "no account with email" and reached nothing. Export now
    gives the requests sent in that address with each one's audit record (the exact IP address); erase, after
    asking, deletes them, audited without the address. Requests in other addresses stay, and an address
    with neither account nor request is still an error that changes nothing."""
    import json

    from webapp.models import SupportRequest

    bob = actor.user(email="bob@example.com")
    for who, ip in (("Carol@Example.com", "198.51.100.40"), ("bob@example.com", "198.51.100.41")):
        sender = Actor(app, app.test_client(), clock)
        sender.client.environ_base["REMOTE_ADDR"] = ip
        r = sender.post_form("/support/contact", {"email": who, "message": f"a message from {who}"})
        assert r.status_code == 302, r.get_data(as_text=True)

    result = run(app, "users", "export", "carol@example.com")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["account"] is None
    assert [(r["email"], r["message"]) for r in data["contact_requests"]] == [
        ("carol@example.com", "a message from Carol@Example.com")]
    [record] = data["audit_records"]
    assert (record["kind"], record["ip"], record["details"]["after_password"]) == ("support_request", "198.51.100.40",
                                                                                  False)
    assert "bob" not in result.output and "198.51.100.41" not in result.output

    assert run(app, "users", "erase", "carol@example.com", input="n\n").exit_code == 1  # asked, and refused
    with app.app_context():
        assert SupportRequest.select().count() == 2
    result = run(app, "users", "erase", "carol@example.com", "--yes")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("deleted 1 contact request(s) sent in carol@example.com, which no account has")
    with app.app_context():
        assert [(r.email, r.user_id) for r in SupportRequest.select()] == [("bob@example.com", bob.id)]
        [event] = AuditEvent.select().where(AuditEvent.kind == "contact_requests_erased")
        assert event.details == {"via": "cli", "requests_deleted": 1} and event.user_id is None
        assert "carol" not in event.detail

    for command in ("export", "erase"):
        result = run(app, "users", command, "carol@example.com", *(["--yes"] if command == "erase" else []))
        assert result.exit_code == 1
        assert result.output == "Error: no account and no contact request with email carol@example.com\n"
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "contact_requests_erased").count() == 1


# How a version before 2026-12-05 stored an address: as typed, only trimmed and lower-cased (README "One mailbox,
# one account"). "Zoë" typed with a decomposed ë, from a browser that sends the domain in punycode.
ZOE_OLD = "zoe\u0308@xn--mnchen-3ya.de"


def test_cli_export_and_erase_reach_what_is_stored_under_an_older_spelling_of_the_address(app, actor, secret, clock):
    """README "Personal data": a review found that `users export` and `users erase` matched contact requests and
    the sessions at the code step by the address exactly as the account holds it now. What an earlier version
    stored in another spelling of the same mailbox (a full-width or punycode domain, a decomposed accent), or
    what was stored before an upgrade re-spelled the account (`email_respelled`), was left out of the export
    and left behind by the erasure. Both now go by the address's normal form: every spelling of the mailbox,
    and not look-alike addresses (full-width letters before the @, a Cyrillic letter, a missing accent),
    which are other mailboxes; what was sent in the exact address of another account (one mailbox in several
    spellings) stays that account's."""
    import json

    from webapp.db import write_transaction
    from webapp.models import SupportRequest, respell_stored_emails
    from webapp.sessions import token_hash

    with app.app_context():
        user = User.create(email=ZOE_OLD, password_hash=hash_password(PASSWORD))  # as the old version stored it
        Device.create(user=user, name="Phone", secret_enc=encrypt_secret(secret))
        # One mailbox in two accounts, left in their spellings by the upgrade (its start-up warning names both;
        # the operator acts on each by number): what came in one's exact spelling is that account's.
        ida = User.create(email="ida@münchen.de", password_hash=hash_password(PASSWORD))
        ida_old = User.create(email="ida@xn--mnchen-3ya.de", password_hash=hash_password(PASSWORD))
    halfway = Actor(app, app.test_client(), clock)
    halfway.client.environ_base.update({"REMOTE_ADDR": "198.51.100.50", "HTTP_USER_AGENT": "Halfway/1.0"})
    assert halfway.password_step("Zoe\u0308@XN--MNCHEN-3YA.DE").headers["Location"] == "/login/verify"
    with app.app_context():
        # Contact requests as the old version stored them: linked to the account only in its exact spelling.
        SupportRequest.create(email=ZOE_OLD, message="linked, old spelling", user=user.id)
        fullwidth = SupportRequest.create(email="ZOË@ＭÜＮＣＨＥＮ.DE".lower(), message="full-width domain",
                                          ip="198.51.100.0")
        AuditEvent.create(kind="support_request", ip="198.51.100.51", created_at=fullwidth.created_at,
                          detail=json.dumps({"request": fullwidth.id, "after_password": False}))
        SupportRequest.create(email="zoë@münchen.de", message="normal spelling, before the account")
        SupportRequest.create(email=ida_old.email, message="ida's old account's own spelling")
        SupportRequest.create(email="ida@ｍünchen.de", message="ida in a third spelling")
        for lookalike in ("ｚｏë@münchen.de", "z\u043eë@münchen.de", "zoe@münchen.de", "zoë@münchen.com"):
            SupportRequest.create(email=lookalike, message=f"another mailbox: {lookalike}")
        with write_transaction():
            respell_stored_emails()  # the upgrade's start
        assert User.get_by_id(user.id).email == "zoë@münchen.de"

    result = run(app, "users", "export", "Zoë@München.de")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["account"]["number"] == user.id
    assert sorted(r["message"] for r in data["contact_requests"]) == [
        "full-width domain", "linked, old spelling", "normal spelling, before the account"]
    [waiting] = data["browsers_not_signed_in"]
    assert (waiting["ip"], waiting["browser"]) == ("198.51.100.50", "Halfway/1.0")
    # the request's audit record (the sender's exact IP address) comes with it, as for an address without account
    [record] = [r for r in data["audit_records"] if r["kind"] == "support_request"]
    assert (record["ip"], record["details"]["request"]) == ("198.51.100.51", fullwidth.id)
    assert "another mailbox" not in result.output and "ida" not in result.output

    result = run(app, "users", "erase", "Zoë@München.de", "--yes")

    assert result.exit_code == 0, result.output
    assert "1 session(s)" in result.output and "3 contact request(s)" in result.output
    with app.app_context():
        assert ServerSession.get_or_none(ServerSession.id == token_hash(halfway.session_cookie())) is None
        assert sorted(r.message for r in SupportRequest.select()) == sorted(
            ["ida's old account's own spelling", "ida in a third spelling"] + [f"another mailbox: {e}" for e in (
                "ｚｏë@münchen.de", "z\u043eë@münchen.de", "zoe@münchen.de", "zoë@münchen.com")])
        assert AuditEvent.get(AuditEvent.kind == "account_erased").details["requests_deleted"] == 3

    result = run(app, "users", "erase", f"#{ida.id}", "--yes")
    assert result.exit_code == 0 and "1 contact request(s)" in result.output, result.output
    with app.app_context():
        assert "ida in a third spelling" not in [r.message for r in SupportRequest.select()]
    result = run(app, "users", "erase", f"#{ida_old.id}", "--yes")
    assert result.exit_code == 0 and "1 contact request(s)" in result.output, result.output
    with app.app_context():
        assert not SupportRequest.select().where(SupportRequest.email.startswith("ida")).exists()


def test_cli_export_and_erase_reach_requests_in_an_older_spelling_of_an_address_without_an_account(app, actor):
    """The same for someone without an account: the contact requests an earlier version stored in another
    spelling of the address (a full-width or punycode domain) are exported and erased with those in its
    normal spelling; an address with only such requests was "no account and no contact request". Look-alike
    addresses (full-width letters before the @, a Cyrillic а) are other mailboxes and stay."""
    import json

    from webapp.models import SupportRequest

    with app.app_context():
        SupportRequest.create(email="carol@example.com", message="normal spelling")
        SupportRequest.create(email="Carol@ＥＸＡＭＰＬＥ.com".lower(), message="full-width domain")
        SupportRequest.create(email="dave@xn--mnchen-3ya.de", message="punycode only")
        for lookalike in ("ｃａｒｏｌ@example.com", "c\u0430rol@example.com", "dave@munchen.de"):
            SupportRequest.create(email=lookalike, message=f"another mailbox: {lookalike}")

    result = run(app, "users", "export", "carol@example.com")
    assert result.exit_code == 0, result.output
    assert sorted(r["message"] for r in json.loads(result.output)["contact_requests"]) == [
        "full-width domain", "normal spelling"]
    result = run(app, "users", "export", "Dave@München.de")
    assert result.exit_code == 0, result.output
    assert [r["email"] for r in json.loads(result.output)["contact_requests"]] == ["dave@xn--mnchen-3ya.de"]

    result = run(app, "users", "erase", "carol@example.com", "--yes")
    assert result.output.startswith("deleted 2 contact request(s) sent in carol@example.com, which no account has")
    result = run(app, "users", "erase", "dave@münchen.de", "--yes")
    assert result.output.startswith("deleted 1 contact request(s) sent in dave@münchen.de, which no account has")
    with app.app_context():
        assert sorted(r.message for r in SupportRequest.select()) == sorted(
            f"another mailbox: {e}" for e in ("ｃａｒｏｌ@example.com", "c\u0430rol@example.com", "dave@munchen.de"))


def test_cli_the_readmes_steps_take_a_taken_over_account_back(app, actor, secret, clock):
    """README "Someone else got into an account", run as written: export, disable, activity, set-password,
    reset-2fa, enable. The export keeps the intruder's session (browser, IP address), which the disable then
    ends, and the activity still names their browser; their device is gone and their password and codes no
    longer open anything; the person signs in with the new password alone, to set up 2FA again; each step
    left its audit record (security.md 42), and the closing `enable` says what the account signs in with now
    (a review: the export came after the disable and so showed no session, and the test skipped it)."""
    import json

    user = actor.user(secret=secret, devices={"Intruder's phone": (intruder_secret := new_secret())})
    intruder = Actor(app, app.test_client(), clock)
    intruder.client.environ_base.update({"HTTP_USER_AGENT": "Mozilla/5.0 (Windows NT 10.0) Chrome/126.0 Edg/126.0",
                                         "REMOTE_ADDR": "198.51.100.66"})
    intruder.sign_in(secret=intruder_secret)
    assert intruder.client.get("/settings").status_code == 200

    steps = [("export", "alice@example.com"), ("disable", "alice@example.com", "--reason", "taken over, ticket T-7"),
             ("activity", "alice@example.com"),
             ("set-password", "alice@example.com", "--password", "a new one given by phone"),
             ("reset-2fa", "alice@example.com"), ("enable", "alice@example.com")]
    outputs = []
    for step in steps:
        result = run(app, "users", *step)
        assert result.exit_code == 0, (step, result.output)
        outputs.append(result.output)

    assert [(s["ip"], s["browser"]) for s in json.loads(outputs[0])["sessions"]] == [
        ("198.51.100.66", "Mozilla/5.0 (Windows NT 10.0) Chrome/126.0 Edg/126.0")]
    assert [line for line in outputs[2].splitlines()
            if "Signed in" in line and "Browser: Edge on Windows" in line and line.endswith("from 198.51.100.66")]
    assert outputs[-1] == ("alice@example.com is enabled again: it signs in with its current password and no code "
                           "(no authenticator device)\n")
    assert intruder.client.get("/settings").status_code == 302
    clock.advance(60)
    again = Actor(app, app.test_client(), clock)
    r = again.password_step()
    assert r.status_code == 200 and "Incorrect email address or password." in r.get_data(as_text=True)
    clock.advance(2)  # past the wrong password's back-off
    owner = Actor(app, app.test_client(), clock)
    assert owner.password_step(password="a new one given by phone").headers["Location"] == "/settings"
    with app.app_context():
        assert Device.select().where(Device.user == user.id).count() == 0
        kinds = [e.kind for e in AuditEvent.select().where(AuditEvent.user == user.id).order_by(AuditEvent.id)]
        assert kinds[-6:] == ["account_disabled", "password_changed", "tfa_reset", "account_enabled",
                              "password_rejected", "signin"]


def test_cli_enable_says_an_account_whose_support_window_ran_out_still_cannot_sign_in(app, actor, clock):
    """A review: `users enable` of an account with no device whose support window had run out said it "signs in
    with its current password and no code", but such an account is refused after the password (security.md
    39, fail closed). It says that it still cannot sign in, and how it can."""
    from webapp.clock import now

    user = actor.user()
    with app.app_context():
        User.update(tfa_reset_until=now() - timedelta(hours=1)).where(User.id == user.id).execute()
    assert run(app, "users", "disable", "alice@example.com").exit_code == 0
    result = run(app, "users", "enable", "alice@example.com")
    assert result.exit_code == 0
    assert result.output == ("alice@example.com is enabled again: it still cannot sign in: support's window ended "
                             "without a new device (a new window, or users reset-2fa for the password alone)\n")
    assert actor.password_step().status_code == 403


def test_cli_list_holds_a_batch_of_accounts_at_a_time_not_all_of_them(app, actor, secret, monkeypatch):
    """`users list` read every account before printing the first (peewee keeps the rows a query returned,
    psycopg fetches them all): a million accounts held in memory at once. It reads them in batches by address
    now, so ten times the accounts cost the same memory beyond the lines printed, and every account is listed
    once, in order, with its devices and its waits, across the batches' ends."""
    import tracemalloc

    from webapp import cli
    from webapp.models import User

    monkeypatch.setattr(cli, "LIST_BATCH", 50)
    actor.user(email="a-0050@example.com", secret=secret)  # a device: the first of the second batch
    for email in ("a-0099@example.com", "a-0149@example.com"):
        actor.user(email=email)
    account_lock = lock_password_entry(other_browser(actor), "a-0099@example.com")  # a batch's last line
    browsers = other_browser(actor)  # a browser of the person's own, waiting, in the third batch
    assert browsers.password_step(email="a-0149@example.com").headers["Location"] == "/settings"
    browsers.client.post("/logout", data={"csrf_token": browsers.csrf("/settings")})
    browser_lock = lock_password_entry(browsers, "a-0149@example.com")

    def add(first, last):
        User.insert_many([{"email": f"a-{n:04d}@example.com", "password_hash": "x"} for n in range(first, last)
                          if n not in (50, 99, 149)]).execute()

    def peak():
        tracemalloc.start()
        try:
            output = run(app, "users", "list").output
            return tracemalloc.get_traced_memory()[1], output
        finally:
            tracemalloc.stop()

    add(0, 400)
    few, few_output = peak()
    add(400, 4000)
    many, output = peak()
    lines = output.splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"a-{n:04d}@example.com" for n in range(4000)]
    assert lines[48:51] == ["a-0048@example.com\tuser\t2FA off", "a-0049@example.com\tuser\t2FA off",
                            "a-0050@example.com\tuser\t2FA active (1 device)"]
    assert lines[99] == ("a-0099@example.com\tuser\t2FA off; password entry locked until "
                         f"{account_lock:%Y-%m-%d %H:%M:%S} UTC")
    assert lines[149] == ("a-0149@example.com\tuser\t2FA off; password entry in 1 known browser(s) locked until "
                          f"{browser_lock:%Y-%m-%d %H:%M:%S} UTC")
    assert lines[150] == "a-0150@example.com\tuser\t2FA off"
    # The 3,600 accounts more cost what their lines cost (the runner's buffer and the text read from it), not a
    # kilobyte an account as when all were read first (4.3 MB against 0.45 MB at the peak).
    assert many - few < 3 * (len(output) - len(few_output)), (few, many)
