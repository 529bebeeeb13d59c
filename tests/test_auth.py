"""Sign-in in two steps, as a person and as an attacker would try it (security.md C and D)."""
import json
import re
from datetime import timedelta

import pyotp
import pytest
from argon2 import PasswordHasher

from webapp.auth import GENERIC_CODE_ERROR
from webapp.models import AuditEvent, ServerSession, SignInChallenge, User
from webapp.sessions import token_hash

from .conftest import PASSWORD, RFC_SECRET, csrf_from
from .test_support import utc

WRONG = "000000"


def kinds(app):
    with app.app_context():
        return [e.kind for e in AuditEvent.select().order_by(AuditEvent.id)]


def user_row(app, email="alice@example.com"):
    with app.app_context():
        return User.by_email(email)


def signed_in(client):
    """Whether the client reaches User Settings (rather than being sent to sign-in)."""
    r = client.get("/settings")
    return r.status_code == 200 and "User Settings" in r.get_data(as_text=True)


# ------------------------------------------------------------------ password step

def reauth_refused(actor, url, data):
    """Send "Confirm it's you" with `data`; a refusal answers 303 to the form's own page (GET), which shows it:
    that page's response."""
    r = actor.post_form(url, data)
    assert r.status_code == 303 and r.headers["Location"] == url, r.headers.get("Location")
    return actor.client.get(r.headers["Location"])


def test_login_page_has_the_visible_names(actor):
    actor.user()
    html = actor.client.get("/login").get_data(as_text=True)
    for text in ('>Email address<', '>Password<', '>Log in<', "Lost access to your authenticator app?"):
        assert text in html
    assert 'autocomplete="current-password"' in html


def test_password_only_account_signs_in_directly(actor):
    actor.user()
    r = actor.password_step()
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    assert signed_in(actor.client)
    assert "signin" in kinds(actor.app)


def test_email_is_matched_case_insensitively(actor):
    actor.user(email="Alice@Example.com")
    r = actor.password_step(email="  ALICE@example.COM ")
    assert r.status_code == 302 and signed_in(actor.client)


def test_unknown_email_and_wrong_password_look_the_same(actor, monkeypatch):
    """Enumeration: same status, same text, and the same password-hash work for both."""
    actor.user()
    calls = []
    original = PasswordHasher.verify
    monkeypatch.setattr(PasswordHasher, "verify", lambda self, h, p: calls.append(1) or original(self, h, p))
    a = actor.password_step(email="nobody@example.com")
    b = actor.password_step(password="wrong password")
    assert a.status_code == b.status_code == 200
    assert "Incorrect email address or password." in a.get_data(as_text=True)
    assert "Incorrect email address or password." in b.get_data(as_text=True)
    assert calls == [1, 1]
    assert not signed_in(actor.client)


@pytest.mark.parametrize("chosen,typed", [
    ("caf\u00e9 secret word", "cafe\u0301 secret word"),  # é as one character, and as e with an accent
    ("cafe\u0301 secret word", "caf\u00e9 secret word"),
    ("password\uff11\uff12 long", "password12 long"),  # full-width digits from an East Asian keyboard
])
def test_a_password_is_the_same_whichever_way_unicode_spells_it(app, actor, clock, chosen, typed):
    """NIST SP 800-63B 3.1.1.2: a password with characters Unicode can spell in several ways is normalised
    (NFKC) before it is hashed, so the person who chose "café" on one keyboard gets in typing it on another
    (a Unicode review: "Incorrect email address or password." before). A wrong password stays wrong, and
    an unknown address costs the same hashing as a known one."""
    from .conftest import Actor

    actor.user(email="admin@example.com", admin=True)  # past the first run's set-up page
    visitor = Actor(app, app.test_client(), clock)
    r = visitor.post_form("/signup", {"email": "zoe@example.com", "password": chosen, "confirm": chosen},
                          form_url="/signup")
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    r = actor.password_step(email="zoe@example.com", password=typed)
    assert r.status_code == 302 and r.headers["Location"] == "/settings" and signed_in(actor.client)
    stranger = Actor(app, app.test_client(), clock)
    r = stranger.password_step(email="zoe@example.com", password=typed.replace("secret", "secert").replace("12", "21"))
    assert r.status_code == 200 and "Incorrect email address or password." in r.get_data(as_text=True)


def test_a_password_hashed_before_normalisation_still_signs_in(app, actor, monkeypatch):
    """Hashes made before passwords were normalised hold the password as it was typed: a person who chose
    "cafe" and an accent then still gets in typing it the same way (the password as typed is tried too), and
    an unknown address spends as many hash checks as a known one for the same password."""
    raw = "cafe\u0301 secret word"
    with app.app_context():
        from webapp.security import _hasher

        User.create(email="zoe@example.com", password_hash=_hasher().hash(raw))
    calls = []
    original = PasswordHasher.verify
    monkeypatch.setattr(PasswordHasher, "verify", lambda self, h, p: calls.append(p) or original(self, h, p))
    unknown = actor.password_step(email="nobody@example.com", password=raw)
    assert unknown.status_code == 200 and len(calls) == 2
    r = actor.password_step(email="zoe@example.com", password=raw)
    assert r.status_code == 302 and signed_in(actor.client) and len(calls) == 4


def test_a_hash_holding_the_password_as_typed_is_replaced_at_the_next_sign_in(app, actor, clock):
    """NIST SP 800-63B 3.1.1.2: the first sign-in with a hash made before passwords were normalised stores
    the normalised one instead (as a hash made with outdated parameters is replaced). Before it, "café" typed
    with "é" as one character did not open an account whose password was chosen as "e" and an accent; after
    it, both spellings do."""
    from argon2 import PasswordHasher
    from .conftest import Actor

    raw, composed = "cafe\u0301 secret word", "caf\u00e9 secret word"
    with app.app_context():
        from webapp.security import _hasher

        User.create(email="zoe@example.com", password_hash=_hasher().hash(raw))
    elsewhere = Actor(app, app.test_client(), clock)
    r = elsewhere.password_step(email="zoe@example.com", password=composed)
    assert r.status_code == 200 and not signed_in(elsewhere.client)
    clock.advance(60)  # past the back-off of that refusal
    r = actor.password_step(email="zoe@example.com", password=raw)
    assert r.status_code == 302 and signed_in(actor.client)
    with app.app_context():
        stored = User.by_email("zoe@example.com").password_hash
    assert PasswordHasher().verify(stored, composed)  # the hash holds the normalised password now
    again = Actor(app, app.test_client(), clock)
    r = again.password_step(email="zoe@example.com", password=composed)
    assert r.status_code == 302 and r.headers["Location"] == "/settings" and signed_in(again.client)


@pytest.mark.parametrize("data", [
    {"email": "", "password": ""},
    {"email": "not-an-email", "password": "x"},
    {"email": "a@example.com", "password": "x" * 5000},
    {"email": "a" * 300 + "@example.com", "password": "x"},
])
def test_malformed_login_gets_a_message_not_a_crash(actor, data):
    actor.user()
    r = actor.post_form("/login", data)
    assert r.status_code == 400
    assert 'class="error"' in r.get_data(as_text=True)
    assert not signed_in(actor.client)


def test_oversized_body_is_refused(actor):
    """Bad input: a huge request body gets 413, not a 500."""
    actor.user()
    r = actor.post_form("/login", {"email": "a@example.com", "password": "x" * 200_000})
    assert r.status_code == 413


@pytest.mark.parametrize("size, status", [(64 * 1024, 200), (64 * 1024 + 1, 413)])
def test_a_form_of_64_kib_is_read_and_one_byte_more_is_refused(actor, size, status):
    """README "Deployment" sets nginx's client_max_body_size to the app's own limit, 64 KiB: a form body of that
    size is read, one byte more gets the plain 413 page and changes nothing."""
    actor.user()
    head = f"csrf_token={actor.csrf('/login')}&email=alice%40example.com&password=wrong&padding="
    r = actor.client.post("/login", data=head + "x" * (size - len(head)),
                          content_type="application/x-www-form-urlencoded")
    page = r.get_data(as_text=True)
    assert r.status_code == status
    if status == 413:
        assert "What was sent is larger than this form takes. Shorten it and try again." in page
    else:
        assert "Incorrect email address or password." in page
    assert not signed_in(actor.client)


def test_login_without_csrf_token_is_refused(actor, caplog):
    """security.md 33: a forged form post changes nothing; the log says which form and why, not what it held."""
    actor.user()
    r = actor.client.post("/login", data={"email": "alice@example.com", "password": PASSWORD})
    assert r.status_code == 400 and "Reload the page" in r.get_data(as_text=True)
    assert not signed_in(actor.client)
    refused = [rec.getMessage() for rec in caplog.records if "csrf refused" in rec.getMessage()]
    assert refused == ["csrf refused: POST /login (The CSRF token is missing.)"]
    assert PASSWORD not in caplog.text


def test_password_failures_back_off_per_account(actor, clock):
    """security.md 18 (password side): failures lock the account's password step for a growing time."""
    actor.user()
    for _ in range(5):
        actor.password_step(password="wrong")
        clock.advance(0)  # no time passes: the back-off applies
    r = actor.password_step()
    assert r.status_code == 429 and "Too many failed attempts" in r.get_data(as_text=True)
    assert not signed_in(actor.client)
    clock.advance(3600)
    assert actor.password_step().status_code == 302
    assert user_row(actor.app).password_failures == 0


def test_the_wrong_password_that_locks_password_entry_is_recorded_with_the_locks_end(app, actor, clock):
    """security.md 18, 43: an incident review found the start of a password lock in no record ("Failures in a
    row: 5", then "Sign-in refused"), where code entry has its code_lockout. The fifth wrong password in a
    row, which locks password entry for 15 minutes, writes password_lockout with the lock's end; the short
    pauses before it write none. The audit log page offers it among the sign-in events."""
    from .test_support import sign_in_admin

    actor.user()
    for wait in (0, 1, 2, 4, 8):
        clock.advance(wait)
        assert actor.password_step(password="a wrong guess").status_code == 200
        with app.app_context():
            locks = [e.details for e in AuditEvent.select().where(AuditEvent.kind == "password_lockout")]
        assert locks == ([] if wait < 8 else [{"until": (utc(clock.t) + timedelta(minutes=15)).isoformat() + "Z"}])
    admin = type(actor)(app, app.test_client(), clock)
    sign_in_admin(admin, pyotp.random_base32())
    page = admin.client.get("/support/audit?kind=password_lockout").get_data(as_text=True)
    assert "Password entry locked after too many wrong passwords" in page and "alice@example.com" in page


@pytest.mark.parametrize("password", [PASSWORD, "another wrong guess"])
def test_guesses_sent_at_once_meet_the_lock_the_first_failure_sets(actor, clock, monkeypatch, password):
    """security.md 18, 20 (password side): guesses sent at the same moment all pass the lock check before any
    is hashed. A wrong one that finishes first sets the back-off; a right one finishing after it is refused
    like any attempt during a back-off, and each failure counts from the one before. A wrong one finishing
    after it is refused the same way: it neither restarts the back-off nor says the password was wrong, but
    it counts: it was checked (found by mutation testing: without the check under the lock, no test noticed;
    and a review of the change that stopped counting refused attempts: eight guesses sent at once were all
    checked and counted as one)."""
    from webapp import auth
    from webapp.clock import now

    actor.user()
    real_verify = auth.verify_password

    def verify_while_a_wrong_guess_fails(stored, password):
        result = real_verify(stored, password)
        with actor.app.app_context():  # what the other guess commits meanwhile: the first failure
            User.update(password_failures=1, password_locked_until=now() + auth.backoff(1)).where(
                User.email == "alice@example.com").execute()
        return result

    monkeypatch.setattr(auth, "verify_password", verify_while_a_wrong_guess_fails)
    r = actor.password_step(password=password)
    monkeypatch.setattr(auth, "verify_password", real_verify)
    assert r.status_code == 429 and "Too many failed attempts" in r.get_data(as_text=True)
    assert not signed_in(actor.client)
    assert user_row(actor.app).password_failures == (1 if password == PASSWORD else 2)  # a right one: not counted
    assert user_row(actor.app).password_locked_until == utc(clock.t) + timedelta(seconds=1)  # the first one's
    assert _counted(actor.app, "failed-sign-ins") == 1  # refused all the same: it counts against the network
    clock.advance(2)
    assert actor.password_step().status_code == 302  # once the back-off is over


def _log_out(actor):
    r = actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    assert r.status_code == 302 and not signed_in(actor.client)


def _lock_the_account_from_a_stranger(actor, clock):
    """Someone who only knows the address: seven wrong passwords, each after the wait the one before set,
    until the account waits an hour (security.md 18)."""
    stranger = type(actor)(actor.app, actor.app.test_client(), clock)
    for guess in range(7):
        if guess:
            clock.advance((user_row(actor.app).password_locked_until - utc(clock.t)).total_seconds())
        assert stranger.password_step(password="guess").status_code in (200, 429)
    assert user_row(actor.app).password_locked_until >= utc(clock.t) + timedelta(hours=1)
    r = stranger.password_step()  # even the right password is refused now
    assert r.status_code == 429 and "Too many failed attempts" in r.get_data(as_text=True)
    return stranger


def test_a_stranger_cannot_lock_the_owner_out_of_the_browser_they_sign_in_from(actor, clock):
    """Auth-CS "Account Lockout" (security.md 18 weighs it): wrong passwords from anywhere lock the account for
    every browser but the ones its owner completed a sign-in from; those keep a throttle of their own."""
    actor.user()
    assert actor.password_step().status_code == 302  # the owner's usual browser
    _log_out(actor)
    _lock_the_account_from_a_stranger(actor, clock)
    assert user_row(actor.app).password_locked_until is not None
    r = actor.password_step()  # the owner, in their own browser, with the right password
    assert r.status_code == 302 and signed_in(actor.client)
    with actor.app.app_context():
        events = [(e.kind, e.details) for e in AuditEvent.select().order_by(AuditEvent.id)]
    assert ("password_rejected", {"failures": 7}) in events  # the stranger's, on the account
    # The owner's browser counts its own failures: five wrong passwords there lock it, not the account.
    _log_out(actor)
    failures_before = user_row(actor.app).password_failures
    for _ in range(5):
        actor.password_step(password="typo")
    r = actor.password_step()
    assert r.status_code == 429 and not signed_in(actor.client)
    assert user_row(actor.app).password_failures == failures_before
    with actor.app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "password_rejected",
                                         AuditEvent.detail.contains("known browser")).count() == 1


def test_the_known_browser_cookie_signs_nobody_in_and_cannot_be_made_up(app, actor, clock):
    """security.md 27, 31: the cookie is not a remember-me: without the session nobody is signed in. A
    made-up value, or the cookie of a browser known for another account, counts on the account as before."""
    actor.user()
    actor.user("bob@example.com")
    r = actor.password_step()
    [cookie] = [c for c in r.headers.getlist("Set-Cookie") if c.startswith("twostep_known=")]
    attrs = {p.strip() for p in cookie.split(";")}
    assert {"HttpOnly", "SameSite=Lax", "Path=/", f"Max-Age={180 * 86400}"} <= attrs
    _log_out(actor)
    assert actor.client.get_cookie("twostep_known") is not None
    r = actor.client.get("/settings")
    assert r.status_code == 302 and "/login" in r.headers["Location"]

    _lock_the_account_from_a_stranger(actor, clock)
    bob = type(actor)(app, app.test_client(), clock)
    assert bob.password_step("bob@example.com").status_code == 302  # bob's browser is known for bob only
    for value in (bob.client.get_cookie("twostep_known").value, "A" * 43, "not a token", "\u00e9" * 43):
        other = type(actor)(app, app.test_client(), clock)
        other.client.set_cookie("twostep_known", value)
        assert other.password_step().status_code == 429, value


def test_a_known_browser_is_forgotten_after_its_lifetime_of_disuse(app, actor, clock):
    """KNOWN_BROWSER_TTL (180 days): each completed sign-in from the browser starts it again and sends the
    cookie again; 180 days without one, the browser counts on the account again and the purge removes it
    (security.md 18)."""
    from webapp.clock import now
    from webapp.models import KnownBrowser, purge_expired

    actor.user()
    assert actor.password_step().status_code == 302
    _log_out(actor)
    clock.advance(150 * 86400)
    r = actor.password_step()  # still known: the lifetime starts again, the cookie goes out again
    assert r.status_code == 302
    assert any(c.startswith("twostep_known=") and f"Max-Age={180 * 86400}" in c for c in r.headers.getlist("Set-Cookie"))
    _log_out(actor)
    clock.advance(150 * 86400)  # 300 days after the first sign-in, 150 after the last
    with app.app_context():
        assert purge_expired(app.config, now()) == (0, 0, 0, 0, 0, 0)  # its lifetime runs from its last use
    _lock_the_account_from_a_stranger(actor, clock)
    assert actor.password_step().status_code == 302
    _log_out(actor)
    clock.advance(181 * 86400)
    _lock_the_account_from_a_stranger(actor, clock)
    assert actor.password_step().status_code == 429
    with app.app_context():
        assert KnownBrowser.select().count() == 1
        purge_expired(app.config, now())
        assert KnownBrowser.select().count() == 0


def test_a_person_keeps_their_ten_latest_browsers_and_one_browser_one_account(app, actor, clock):
    """Sign-ins from new browsers cannot grow the table without bound: ten known browsers, the most recently
    used, and ten forgotten ones, those known longest (they keep the contact form's allowance alone); a browser
    that signs in to another account drops its row for the first (security.md 18)."""
    from webapp.models import KnownBrowser

    actor.user()
    actor.user("bob@example.com")
    browsers = []
    for _ in range(25):
        browsers.append(type(actor)(app, app.test_client(), clock))
        assert browsers[-1].password_step().status_code == 302
        clock.advance(1)
    fresh = browsers[-1]
    token = lambda b: token_hash(b.client.get_cookie("twostep_known").value)
    with app.app_context():
        known = KnownBrowser.select().where(KnownBrowser.forgotten_at.is_null())
        assert {b.id for b in known} == {token(b) for b in browsers[-10:]}
        forgotten = KnownBrowser.select().where(KnownBrowser.forgotten_at.is_null(False))
        assert {b.id for b in forgotten} == {token(b) for b in browsers[:10]}
    _log_out(fresh)
    assert fresh.password_step("bob@example.com").status_code == 302
    with app.app_context():
        assert [b.user.email for b in KnownBrowser.select()].count("alice@example.com") == 19
        assert KnownBrowser.select().where(KnownBrowser.user == User.by_email("bob@example.com").id).count() == 1


def test_a_forgotten_browser_keeps_no_password_throttle_of_its_own(app, actor, clock):
    """security.md 18, 35: a browser forgotten by "Sign out everywhere else" (or a new password, support's
    disable, `users reset-2fa`, ten newer browsers) is kept for the contact form's allowance alone
    (security.contact_browser), and gets nothing else a known browser gets: its wrong passwords count on the
    account and on its network, the account's lock holds it, and the network's limit too. A completed sign-in
    there makes it known again, as old as it was."""
    from webapp.models import KnownBrowser, NetworkCounter

    actor.user()
    assert actor.password_step().status_code == 302
    _log_out(actor)
    cookie = token_hash(actor.client.get_cookie("twostep_known").value)
    with app.app_context():
        first_known = KnownBrowser.get_by_id(cookie).created_at
    clock.advance(60)
    other = type(actor)(app, app.test_client(), clock)
    other.client.environ_base["REMOTE_ADDR"] = "198.51.100.8"
    assert other.password_step().status_code == 302
    assert other.post_form("/settings/sessions/end-others", {}, form_url="/settings").status_code == 302
    with app.app_context():
        assert KnownBrowser.get_by_id(cookie).forgotten_at == utc(clock.t)
    assert actor.password_step(password="typo").status_code == 200
    with app.app_context():
        event = AuditEvent.select().where(AuditEvent.kind == "password_rejected").order_by(AuditEvent.id.desc()).get()
        assert event.details == {"failures": 1}  # on the account, not "counted_in": "known browser"
        assert user_row(app).password_failures == 1 and KnownBrowser.get_by_id(cookie).password_failures == 0
        assert NetworkCounter.get(NetworkCounter.purpose == "failed-sign-ins").hits == 1  # its network's, too
    clock.advance(2)
    _lock_the_account_from_a_stranger(actor, clock)
    r = actor.password_step()  # the right password in the forgotten browser: the account's lock holds it
    assert r.status_code == 429 and "Too many failed attempts" in r.get_data(as_text=True)
    # A network full of wrong passwords refuses it, as any browser the account does not know.
    clock.advance((user_row(app).password_locked_until - utc(clock.t)).total_seconds())
    app.config["FAILED_SIGNINS_PER_HOUR"] = 1
    assert type(actor)(app, app.test_client(), clock).password_step("nobody@example.com").status_code == 200
    r = actor.password_step()
    assert r.status_code == 429 and "Too many failed sign-ins from your network" in r.get_data(as_text=True)
    app.config["FAILED_SIGNINS_PER_HOUR"] = 100
    assert actor.password_step().status_code == 302 and signed_in(actor.client)
    with app.app_context():
        row = KnownBrowser.get_by_id(cookie)  # the same browser, known again since its first sign-in
        assert row.forgotten_at is None and row.created_at == first_known and row.last_used_at == utc(clock.t)


def test_password_and_code_failures_are_counted_separately(actor, secret):
    actor.user(secret=secret)
    actor.password_step(password="wrong")
    u = user_row(actor.app)
    assert (u.password_failures, u.code_failures) == (1, 0)


# ------------------------------------------------------------------ between the steps

def test_password_step_does_not_sign_in(actor, secret):
    """security.md 21: a correct password with a device only creates a server-side challenge."""
    actor.user(secret=secret)
    r = actor.password_step()
    assert r.headers["Location"] == "/login/verify"
    assert not signed_in(actor.client)
    with actor.app.app_context():
        row = ServerSession.get(ServerSession.id == token_hash(actor.session_cookie()))
        assert row.user is None and "_user_id" not in row.load()
        assert SignInChallenge.select().count() == 1


def test_every_route_refuses_the_pending_state(actor, secret, app):
    """security.md 21: walk app.url_map with a pending session; nothing but the code step serves content."""
    actor.user(secret=secret, admin=True)
    actor.password_step()
    allowed = {"auth.verify", "auth.login", "auth.logout", "auth.signup", "static",
               "support.contact", "auth.first_run", "index", "health"}  # health: "ok" for a load balancer
    for rule in app.url_map.iter_rules():
        public = rule.endpoint in allowed or rule.endpoint.startswith("support.contact")
        if public or "GET" not in rule.methods:
            continue
        url = rule.build({k: 1 for k in rule.arguments})[1] if rule.arguments else rule.rule
        r = actor.client.get(url)
        assert r.status_code in (302, 401, 403, 404), (rule.endpoint, r.status_code)
        if r.status_code == 302:
            assert "/login" in r.headers["Location"], rule.endpoint


def test_pending_session_cookie_carries_no_state(actor, secret):
    """security.md 25: the cookie is an opaque token: no password, secret, code or user id in it."""
    actor.user(secret=secret)
    actor.password_step()
    cookie = actor.session_cookie()
    assert len(cookie) < 64 and "." not in cookie
    for needle in (PASSWORD, secret, "_user_id", "alice"):
        assert needle not in cookie
    actor.code_step(actor.code(secret))
    cookie = actor.session_cookie()
    for needle in (PASSWORD, secret, actor.code(secret), "_user_id"):
        assert needle not in cookie


def test_an_expired_code_step_keeps_the_address_on_the_sign_in_page(actor, app, secret, clock):
    """A code step left open past its 5 minutes sends the person back to the sign-in page, which asks for the
    address and password again: the address comes filled in (it came back empty: the help-article
    walkthrough), taken from the server-side session, not from the page's address; the focus is on
    Password. Once: a later visit of the sign-in page is blank, and another browser never sees it."""
    actor.user(secret=secret)
    assert actor.password_step().headers["Location"] == "/login/verify"
    token = actor.csrf("/login/verify")
    clock.advance(app.config["CHALLENGE_TTL"].total_seconds() + 1)
    r = actor.client.post("/login/verify", data={"csrf_token": token, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    # The words ask for what is missing, not for the address shown (an accessibility check).
    assert ("Your sign-in expired: the code step stays open for 5 minutes after the password. Enter your "
            "password again to get a new one.") in page and "Please enter your email address" not in page
    assert re.search(r'<input[^>]*autocomplete="username"[^>]*value="alice@example.com"', page)
    assert re.search(r'<input[^>]*autocomplete="current-password"[^>]*autofocus', page)
    assert not re.search(r'<input[^>]*autocomplete="username"[^>]*autofocus', page)
    assert "alice@example.com" not in actor.client.get("/login?notice=sign-in-expired").get_data(as_text=True)
    assert actor.password_step().headers["Location"] == "/login/verify"  # and it signs in as usual
    clock.advance(1)
    assert actor.code_step(actor.code(secret, 1)).headers["Location"] == "/settings"


def test_the_sign_in_page_reached_during_a_code_step_does_not_fill_in_the_address(actor, secret):
    """The address is filled in only on the page an expired code step sends the person to. Reached another
    way while the code step is open ("Back to sign-in" on the contact form, a bookmark), the sign-in page is
    blank as for anyone, and it forgets the address: the step expiring afterwards fills in nothing."""
    actor.user(secret=secret)
    assert actor.password_step().headers["Location"] == "/login/verify"
    for notice in ("", "?notice=logged-out"):
        assert "alice@example.com" not in actor.client.get("/login" + notice).get_data(as_text=True)

def test_verify_without_a_challenge_goes_back_to_login(actor, app):
    """The sign-in page says why, from the address alone: no session row is written to carry the message
    (a visitor without a row could otherwise fill the table by asking for this page)."""
    from webapp.models import ServerSession

    actor.user()
    r = actor.client.get("/login/verify")
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Your sign-in expired. Please enter your email address and password again." in page
    with app.app_context():
        assert ServerSession.select().count() == 0
    assert "Your sign-in expired" not in actor.client.get("/login?notice=anything-else").get_data(as_text=True)


def test_challenge_expires_after_five_minutes(actor, secret, clock):
    """security.md 24: 11 minutes after the password step the code is not even looked at."""
    actor.user(secret=secret)
    actor.password_step()
    token = actor.csrf("/login/verify")
    clock.advance(11 * 60)
    r = actor.client.post("/login/verify", data={"csrf_token": token, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    assert not signed_in(actor.client)
    with actor.app.app_context():
        assert SignInChallenge.select().count() == 0


def test_the_code_step_lasts_five_minutes_to_the_second(actor, secret, clock):
    """security.md 24: CHALLENGE_TTL after the password step the code is still taken; a second later it is not."""
    actor.user(secret=secret)
    actor.password_step()
    token = actor.csrf("/login/verify")
    clock.advance(5 * 60 + 1)
    r = actor.client.post("/login/verify", data={"csrf_token": token, "code": actor.code(secret)})
    assert r.headers["Location"] == "/login?notice=sign-in-expired"
    actor.password_step()
    clock.advance(5 * 60)
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"


def test_the_code_step_does_not_outlast_a_clock_set_back(actor, secret, clock):
    """security.md 24: a code step made more than its five minutes "ahead" of the server's clock (the clock went
    back since: an NTP step, a VM resumed) has ended; it lasted as much longer as the clock went back. A clock
    two minutes back, or another app host's a few seconds behind, leaves it as it is."""
    actor.user(secret=secret)
    actor.password_step()
    token = actor.csrf("/login/verify")
    clock.advance(-6 * 60)
    r = actor.client.post("/login/verify", data={"csrf_token": token, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    actor.password_step()
    clock.advance(-2 * 60)
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"


def test_a_code_step_left_by_a_new_password_step_or_a_logout_is_deleted(actor, secret, app):
    """security.md 24: one code step per browser. Its challenge goes when the browser enters a password again
    or logs out, rather than staying usable for its five minutes to a copy of that session (as in
    test_challenge_is_single_use)."""
    actor.user(secret=secret)
    actor.password_step()
    with app.app_context():
        [first] = SignInChallenge.select()
    actor.password_step()
    with app.app_context():
        [second] = SignInChallenge.select()
        assert second.id != first.id
    r = actor.client.post("/logout", data={"csrf_token": actor.csrf("/login/verify")})
    with app.app_context():
        assert SignInChallenge.select().count() == 0
    # "Cancel and start over": nobody was signed in, so the page does not say "You are logged out."
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-cancelled"
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Sign-in cancelled. You can sign in again below." in page and "logged out" not in page


def test_cancelling_a_code_step_that_has_already_ended_says_sign_in_cancelled(actor, secret, app, clock):
    """"Cancel and start over" pressed on a code step that had expired (or that another tab replaced): the
    person never signed in, so the page says "Sign-in cancelled", not "You are logged out" (found by mutation
    testing)."""
    actor.user(secret=secret)
    actor.password_step()
    token = actor.csrf("/login/verify")
    clock.advance(app.config["CHALLENGE_TTL"].total_seconds() + 1)
    with app.app_context():
        SignInChallenge.delete().execute()  # the purge took it meanwhile
    r = actor.client.post("/logout", data={"csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-cancelled"


def test_challenge_is_single_use(actor, secret, app):
    """security.md 24, 26: the pre-sign-in cookie cannot be used for a second code after success: its row
    went with the rotation, and the challenge itself is gone too, so even a copy of that session's data
    under another cookie (same challenge, same CSRF token) only hears that the sign-in expired."""
    import secrets as token_maker

    actor.user(secret=secret)
    actor.password_step()
    pending_cookie = actor.session_cookie()
    with app.app_context():
        pending = ServerSession.get(ServerSession.id == token_hash(pending_cookie))
    token = actor.csrf("/login/verify")
    r = actor.client.post("/login/verify", data={"csrf_token": token, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
    name = app.session_interface.get_cookie_name(app)

    old = app.test_client()
    old.set_cookie(name, pending_cookie)
    r = old.post("/login/verify", data={"csrf_token": token, "code": actor.code(secret, 1)})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=code-step-ended" and not signed_in(old)
    # What a second press of Verify without JavaScript meets (the browser dropped the first answer and its new
    # cookie): not "after 30 minutes without activity", which it was not.
    page = " ".join(old.get(r.headers["Location"]).get_data(as_text=True).split())
    assert "That sign-in step has ended: it expired, or it was completed by an earlier press of Verify" in page
    assert "without activity" not in page

    copy_cookie = token_maker.token_urlsafe(32)
    with app.app_context():
        assert SignInChallenge.select().count() == 0
        ServerSession.create(id=token_hash(copy_cookie), user=None, data=pending.data, created_at=pending.created_at,
                             last_seen_at=pending.last_seen_at, ip=pending.ip, user_agent=pending.user_agent)
    copy = app.test_client()
    copy.set_cookie(name, copy_cookie)
    r = copy.post("/login/verify", data={"csrf_token": token, "code": actor.code(secret, 1)})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    assert not signed_in(copy)


def test_five_wrong_codes_drop_the_challenge(actor, secret, clock):
    """Per challenge: after 5 wrong codes the password is needed again."""
    actor.user(secret=secret)
    actor.password_step()
    for wait in (0, 1, 2, 4, 8):
        clock.advance(wait)  # past the account back-off, so each code is really evaluated
        r = actor.code_step(WRONG)
    assert r.status_code == 302 and r.headers["Location"] == "/login"
    assert user_row(actor.app).code_failures == 5
    assert actor.client.get("/login/verify").headers["Location"] == "/login?notice=sign-in-expired"


def test_the_code_lock_is_said_when_it_sends_the_person_back_and_again_on_the_next_code_page(actor, secret, clock):
    """security.md 18: the fifth wrong code locks the account's code step for 15 minutes and ends this code
    step. "Please sign in again" alone sent people straight back, where the right code was then refused
    (and counted). The message gives the wait, and the next code page says it before a code is typed, with
    no field: it asked to wait 15 minutes on a step that closes after 5, over a field that refused every code
    (the help-article walkthrough)."""
    actor.user(secret=secret)
    actor.password_step()
    for wait in (0, 1, 2, 4, 8):
        clock.advance(wait)
        r = actor.code_step(WRONG)
    assert r.headers["Location"] == "/login"
    page = actor.client.get("/login").get_data(as_text=True)
    assert "Too many wrong codes. For your security, wait 15 minutes, then sign in again." in page
    clock.advance(60)
    assert actor.password_step().headers["Location"] == "/login/verify"
    r = actor.client.get("/login/verify")
    page = r.get_data(as_text=True)
    assert "Too many wrong codes. Wait 14 minutes before trying again." in page
    assert r.status_code == 429  # a page that says a wait answers Too Many Requests, whichever page it is
    assert "This sign-in step closes before then" in page and "stays open for 5" not in page
    # The end of the wait as a time too, to the minute after it: a tab looked at later still says when.
    until = user_row(actor.app).code_locked_until
    shown = (until + timedelta(seconds=59, microseconds=999999)).replace(second=0, microsecond=0)
    assert f"Sign in again with your password after <time datetime=\"{shown:%Y-%m-%dT%H:%M:%S}Z\" data-local>" \
           f"{shown:%Y-%m-%d %H:%M} UTC</time>." in " ".join(page.split())
    assert 'aria-labelledby="code-locked-wait"' in page
    assert 'name="code"' not in page and ">Verify</button>" not in page
    assert 'href="/support/contact">Lost access to your authenticator app?' in page  # the ways on stay
    assert user_row(actor.app).code_failures == 5  # showing it counted nothing
    clock.advance(13 * 60)
    # A minute of the lock left, less than the new step's 5: the field is there, with the wait (a review: the
    # page said to sign in again after a lock that would end while the step stayed open).
    assert actor.password_step().headers["Location"] == "/login/verify"  # that code step had expired (5 min)
    r = actor.client.get("/login/verify")
    page = r.get_data(as_text=True)
    assert "Wait 60 seconds before trying again." in page and 'name="code"' in page
    assert r.status_code == 429
    assert "This sign-in step closes before then" not in page
    clock.advance(60)
    page = actor.client.get("/login/verify").get_data(as_text=True)
    assert "Too many" not in page and "Wait" not in page
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"


def test_a_mistyped_code_that_starts_the_lock_says_the_wait(actor, secret, clock):
    """security.md 18: a mistyped code (five digits) counts towards the code lock too. The one that starts it
    gets the page without a field: it says how long to wait, not only that the code was mistyped (a review:
    "Enter the 6-digit code... This sign-in step closes before then", with no time)."""
    actor.user(secret=secret)
    actor.password_step()
    for wait in (0, 1, 2, 4):
        clock.advance(wait)
        actor.code_step(WRONG)
    actor.password_step()  # a new code step: its own count starts again, the account's does not
    clock.advance(8)
    r = actor.code_refused("12345")
    page = r.get_data(as_text=True)
    assert r.status_code == 429 and "wait 15 minutes before trying again" in page.lower()
    assert "This sign-in step closes before then" in page and 'name="code"' not in page



def test_a_short_pause_that_outlasts_the_code_step_keeps_the_field(actor, secret, clock):
    """security.md 18: only the account's code lock (15 minutes or more) takes the field away. A wrong code
    seconds before the step closes sets a pause of a few seconds that ends after the step: the page keeps
    the field and says the wait, not "sign in again" after a lock there is not."""
    actor.user(secret=secret)
    actor.password_step()
    for wait in (0, 1, 2):
        clock.advance(wait)
        actor.code_step(WRONG)
    clock.advance(296 - 3)  # 4 min 56 s into the step: the fourth wrong code's pause (8 s) ends after it
    page = actor.code_refused(WRONG).get_data(as_text=True)
    assert "That code is not valid" in page and 'name="code"' in page
    assert "This sign-in step closes before then" not in page

def test_codes_sent_during_the_lock_count_but_do_not_lengthen_the_next_lock(actor, secret, clock):
    """security.md 18, 20: a code sent while the account waits is refused and counted (the stored count is
    every refused code), but the wait grows only with the codes that were checked. Before, a person who
    kept trying during the 15-minute lock turned the next wrong code into a lock of hours: four tries during
    it, and one typo after it locked them out for four hours instead of 30 minutes."""
    actor.user(secret=secret)
    actor.password_step()
    for wait in (0, 1, 2, 4, 8):
        clock.advance(wait)
        actor.code_step(WRONG)  # the fifth: a lock of 15 minutes, and this code step ends
    clock.advance(60)
    for _ in range(4):  # the right code too: refused, as the lock says
        actor.password_step()
        r = actor.code_refused(actor.code(secret))
        assert r.status_code == 429 and "Too many wrong codes. Wait 14 minutes" in r.get_data(as_text=True)
    row = user_row(actor.app)
    assert (row.code_failures, row.code_strikes) == (9, 5)
    assert kinds(actor.app).count("code_throttled") == 4  # security.md 19, 43: each refused try is recorded
    clock.advance(14 * 60)
    actor.password_step()
    r = actor.code_refused(WRONG)  # checked: the sixth strike doubles the lock, no more
    # and says so at once, with 429 as every answer that asks to wait (an upgrade review: the page said only
    # "not valid", with 200, and the next code met the lock)
    assert r.status_code == 429 and "That code is not valid" in r.get_data(as_text=True)
    assert "Too many wrong codes in a row: wait 30 minutes before trying again." in r.get_data(as_text=True)
    row = user_row(actor.app)
    assert (row.code_failures, row.code_strikes) == (10, 6)
    assert row.code_locked_until == utc(clock.t) + timedelta(minutes=30)
    with actor.app.app_context():  # the record counts every refused code; each lock is recorded (19, 43)
        last = AuditEvent.select().where(AuditEvent.kind == "code_rejected").order_by(AuditEvent.id.desc()).get()
        assert last.details["failures"] == 10
        lockouts = [e.details["until"] for e in AuditEvent.select().where(AuditEvent.kind == "code_lockout")
                    .order_by(AuditEvent.id)]
    assert len(lockouts) == 2 and lockouts[1] == row.code_locked_until.isoformat() + "Z"
    clock.advance(30 * 60)
    actor.password_step()
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"
    row = user_row(actor.app)
    assert (row.code_failures, row.code_strikes, row.code_locked_until) == (0, 0, None)


def test_a_typo_then_the_right_code_at_once_waits_a_second_without_counting_against_the_lock(actor, secret, clock):
    """The common slip: a five-digit code, then the right one straight away. The second is refused for the
    one-second pause and counted, but only the typo was checked: the pause after the next wrong code is two
    seconds, not four."""
    actor.user(secret=secret)
    actor.password_step()
    assert actor.code_refused("12345").status_code == 400
    r = actor.code_refused(actor.code(secret))
    assert r.status_code == 429 and "Wait 1 second before entering another code." in r.get_data(as_text=True)
    # It says so: with the field empty, a right code refused without a word looked like a wrong one (found by a
    # usability review).
    assert "This code was not checked: after a wrong code, codes are paused for a moment." in r.get_data(as_text=True)
    # The field comes back empty like any refused code's: the page cannot tell a code never checked from the
    # wrong one sent twice (a double press), and keeping that one would invite a third strike.
    assert f'value="{actor.code(secret)}"' not in r.get_data(as_text=True)
    clock.advance(1)
    r = actor.code_refused(WRONG)
    assert r.status_code == 200
    row = user_row(actor.app)
    assert (row.code_failures, row.code_strikes) == (3, 2)
    assert row.code_locked_until == utc(clock.t) + timedelta(seconds=2)


# ------------------------------------------------------------------ the code step

def test_correct_code_signs_in_with_a_new_session_id(actor, secret, app):
    """security.md 26: after the code a brand-new session; the old cookies are worthless."""
    actor.user(secret=secret)
    actor.client.get("/login")
    before = actor.session_cookie()
    actor.password_step()
    pending = actor.session_cookie()
    r = actor.code_step(actor.code(secret))
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    after = actor.session_cookie()
    assert after not in (before, pending)
    assert signed_in(actor.client)
    for old in (before, pending):
        replay = app.test_client()
        replay.set_cookie(app.session_interface.get_cookie_name(app), old)
        assert not signed_in(replay)


@pytest.mark.parametrize("code", ["980357", "005924", "590587"])
def test_code_window_over_http(actor, code):
    """security.md 14: T-1, T and T+1 at t=1234567890 sign in (each a fresh user)."""
    actor.user(secret=RFC_SECRET)
    actor.password_step()
    assert actor.code_step(code).headers.get("Location") == "/settings"


@pytest.mark.parametrize("code", ["186057", "240500"])
def test_codes_two_steps_away_are_refused_over_http(actor, code):
    """security.md 14: T-2 and T+2 are refused."""
    actor.user(secret=RFC_SECRET)
    actor.password_step()
    r = actor.code_refused(code)
    assert r.status_code == 200 and "That code is not valid" in r.get_data(as_text=True)
    assert not signed_in(actor.client)


@pytest.mark.parametrize("code", ["005 924", "005924", "005\u00a0924", " 005\u2009924 ", "005\u202f924"])
def test_spaces_in_the_code_are_fine(actor, code):
    """security.md 5: '005 924' is the same code, also with the no-break, thin or narrow no-break space a
    code copied from a page may carry (they were refused as malformed and counted)."""
    actor.user(secret=RFC_SECRET)
    actor.password_step()
    assert actor.code_step(code).headers.get("Location") == "/settings"


@pytest.mark.parametrize("code", ["5924", "+5924", "00_5924", "００５９２４", "0059240", "", "005-924", "005\t924",
                                  "005\n924", "005\u200b924", "005\u1680924"])
def test_malformed_codes_get_400_and_count(actor, code):
    """security.md 5: anything but six ASCII digits is refused with 400 and counted as a failure."""
    actor.user(secret=RFC_SECRET)
    actor.password_step()
    r = actor.code_refused(code)
    assert r.status_code == 400
    assert ("Enter the 6-digit code from your authenticator app." if code == "" else
            "Enter the 6-digit code your authenticator app shows: six numbers (spaces don&#39;t matter).") in \
        r.get_data(as_text=True)
    assert user_row(actor.app).code_failures == 1
    assert not signed_in(actor.client)


def test_code_field_is_accessible_and_autofills(actor, secret):
    actor.user(secret=secret)
    actor.password_step()
    html = actor.client.get("/login/verify").get_data(as_text=True)
    assert 'autocomplete="one-time-code"' in html and 'inputmode="numeric"' in html
    assert 'enterkeyhint="done"' in html  # the on-screen keyboard's Enter key
    assert '<label for="code">Verification code</label>' in html
    assert ">Verify<" in html and "Lost access to your authenticator app?" in html
    # how long the step stays open, said before it runs out (someone may go and fetch the phone)
    assert "This step stays open for 5 minutes after your password." in " ".join(html.split())


def test_wrong_code_error_is_tied_to_the_field(actor, secret):
    actor.user(secret=secret)
    actor.password_step()
    html = actor.code_refused(WRONG).get_data(as_text=True)
    assert 'aria-describedby="code-error"' in html and 'id="code-error"' in html
    assert 'aria-invalid="true"' in html


@pytest.mark.parametrize("code", [WRONG, "12345"])
def test_a_refused_code_comes_back_as_an_empty_field(actor, app, secret, code):
    """A wrong or malformed code is not put back in the field: on a phone the person had to delete six digits
    before typing the next code. The refusal stays tied to the field. The same on "Confirm it's you"."""
    import re

    actor.user(secret=secret)
    actor.password_step()
    html = actor.code_refused(code).get_data(as_text=True)
    [field] = re.findall(r'<input[^>]*name="code"[^>]*>', html)
    assert 'value=""' in field and code not in field and 'aria-invalid="true"' in field
    actor.clock.advance(2)
    actor.code_step(actor.code(secret))
    actor.clock.advance(11 * 60)
    html = reauth_refused(actor, "/reauth", {"password": PASSWORD, "code": code}).get_data(as_text=True)
    [field] = re.findall(r'<input[^>]*name="code"[^>]*>', html)
    assert 'value=""' in field and code not in field and ("That code is not valid" in html or "6-digit" in html)


def test_replayed_code_is_refused(actor, secret, app, clock):
    """security.md 16: the same valid code in a second sign-in within its step is refused."""
    actor.user(secret=secret)
    code = actor.code(secret)
    actor.password_step()
    assert actor.code_step(code).headers.get("Location") == "/settings"
    second = app.test_client()
    from .conftest import Actor

    other = Actor(app, second, clock)
    other.password_step()
    r = other.code_refused(code)
    assert r.status_code == 200 and "That code is not valid" in r.get_data(as_text=True)
    assert not signed_in(second)
    assert "totp_replay" in kinds(app)


def test_older_code_after_newer_one_is_refused(actor, app, clock):
    """security.md 16: a T-1 code after a T code was accepted is a replay too."""
    actor.user(secret=RFC_SECRET)
    actor.password_step()
    actor.code_step("005924")
    from .conftest import Actor

    other = Actor(app, app.test_client(), clock)
    other.password_step()
    r = other.code_refused("980357")
    assert "That code is not valid" in r.get_data(as_text=True)
    assert not signed_in(other.client)


def _strip_csrf(html):
    import re

    return re.sub(r'value="[^"]+"', 'value=""', re.sub(r'"X-CSRFToken": "[^"]+"', "", html))


def test_replay_looks_exactly_like_a_wrong_code(app, clock):
    """security.md 17: status and body match byte for byte apart from the CSRF token; the log knows."""
    from .conftest import Actor

    a = Actor(app, app.test_client(), clock)
    a.user(secret=RFC_SECRET)
    a.password_step()
    a.code_step("005924")
    clock.advance(30)  # out of any back-off; still inside the window for the replay
    b = Actor(app, app.test_client(), clock)
    b.password_step()
    replay = b.code_refused("005924")
    clock.advance(30)
    c = Actor(app, app.test_client(), clock)
    c.password_step()
    wrong = c.code_refused(WRONG)
    assert replay.status_code == wrong.status_code == 200
    assert _strip_csrf(replay.get_data(as_text=True)) == _strip_csrf(wrong.get_data(as_text=True))
    assert kinds(app).count("totp_replay") == 1 and kinds(app).count("code_rejected") == 1


def test_client_supplied_time_is_ignored(actor):
    """security.md 15: form fields or a Date header cannot move the verifier's clock."""
    actor.user(secret=RFC_SECRET)
    actor.password_step()
    r = actor.post_form("/login/verify", {"code": "240500", "timestamp": "1234567950", "time": "1234567950"},
                        headers={"Date": "Fri, 13 Feb 2009 23:32:30 GMT"})
    assert r.status_code == 303
    assert "That code is not valid" in actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert not signed_in(actor.client)


def test_verify_uses_only_the_server_side_user(app, clock):
    """security.md 22: an attacker's own code plus the victim's id anywhere never yields the victim."""
    from .conftest import Actor

    attacker = Actor(app, app.test_client(), clock)
    victim_secret = pyotp.random_base32()
    victim = attacker.user(email="victim@example.com", secret=victim_secret)
    attacker.user(email="mallory@example.com", secret=RFC_SECRET)
    attacker.password_step(email="mallory@example.com")
    attacker.client.set_cookie("user_id", str(victim.id))
    r = attacker.post_form("/login/verify", {"code": "005924", "user_id": victim.id, "username": "victim@example.com",
                                             "verify": "victim@example.com"},
                           headers={"X-User-Id": str(victim.id)})
    assert r.headers["Location"] == "/settings"
    html = attacker.client.get("/settings").get_data(as_text=True)
    assert "mallory@example.com" in html and "victim@example.com" not in html


def code_failures(app):
    """(the account's count of refused codes, the code step's own), as stored."""
    with app.app_context():
        return user_row(app).code_failures, SignInChallenge.select(SignInChallenge.failures).scalar()


def wrong_code_for(actor, secret):
    """A six-digit code that none of the window's steps accepts (and that the clock's time does not hold)."""
    return next(c for c in ("271828", "314159") if c not in {actor.code(secret, k) for k in (-1, 0, 1)})


def test_a_refused_code_answers_303_to_the_code_step_which_says_it_once(actor, app, secret, clock):
    """Without JavaScript a refused code answered the POST with the page: Reload sent the same code again (after
    "Confirm Form Resubmission"), one more failure towards the lock. It answers 303 to the code step now
    (Post/Redirect/Get, as Confirm it's you does); that page says the refusal once, with the words, status,
    focus and Error: title the POST's answer had, and the session keeps the refusal, never the code. htmx
    still gets its answer at once, the same page; the right code still signs in."""
    actor.user(secret=secret)
    actor.password_step()
    wrong = wrong_code_for(actor, secret)
    r = actor.code_step(wrong)
    assert r.status_code == 303 and r.headers["Location"] == "/login/verify"
    with app.app_context():
        kept = json.dumps(ServerSession.get(ServerSession.id == token_hash(actor.session_cookie())).load())
    assert GENERIC_CODE_ERROR in kept and wrong not in kept
    assert code_failures(app) == (1, 1)
    assert actor.client.head("/login/verify").status_code == 200  # a HEAD (a link checker) leaves it for the GET
    page = actor.client.get("/login/verify")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and GENERIC_CODE_ERROR in html
    assert "<title>Error: Verification code · twostep</title>" in html
    [field] = re.findall(r'<input[^>]*name="code"[^>]*>', html)
    assert 'aria-invalid="true"' in field and 'aria-describedby="code-error"' in field and " autofocus" in field
    assert 'value=""' in field and f'<p class="error" id="code-error">{GENERIC_CODE_ERROR}</p>' in html
    again = actor.client.get("/login/verify")  # Reload: the form again, nothing sent, nothing said
    assert again.status_code == 200 and GENERIC_CODE_ERROR not in again.get_data(as_text=True)
    assert 'aria-invalid' not in again.get_data(as_text=True)
    assert "<title>Verification code · twostep</title>" in again.get_data(as_text=True)
    assert code_failures(app) == (1, 1)
    clock.advance(1)  # past the pause after one wrong code
    hx = actor.code_step(wrong, headers={"HX-Request": "true"})
    assert hx.status_code == 200 and _strip_csrf(hx.get_data(as_text=True)) == _strip_csrf(html)
    assert code_failures(app) == (2, 2)
    assert GENERIC_CODE_ERROR not in actor.client.get("/login/verify").get_data(as_text=True)  # none kept for it
    clock.advance(2)
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"


def test_a_mistyped_code_and_one_sent_in_the_pause_keep_400_and_429_after_the_303(actor, app, secret):
    """The page a refused code leads to answers with the refusal's status, as the POST did: 400 for a mistyped
    code (security.md 5), 429 for one refused by the pause after it (security.md 18). Each counted once."""
    actor.user(secret=secret)
    actor.password_step()
    page = actor.code_refused("12345")
    assert page.status_code == 400
    assert "six numbers (spaces don&#39;t matter)" in page.get_data(as_text=True)
    assert 'aria-invalid="true"' in page.get_data(as_text=True)
    page = actor.code_refused(actor.code(secret))  # within the second's pause after the typo
    assert page.status_code == 429 and "This code was not checked" in page.get_data(as_text=True)
    assert code_failures(app) == (2, 2)
    assert actor.client.get("/login/verify").status_code == 200 and code_failures(app) == (2, 2)


def test_the_wrong_code_that_starts_the_lock_says_the_wait_after_its_303_with_429(actor, app, secret, clock):
    """security.md 18: the wrong code that starts the account's code lock (the one after THROTTLE_FREE_FAILURES)
    answers 303 as any refused code; the page it leads to says the wait and when it ends, without a field,
    with 429, as the POST's answer did. Reload counts nothing; after the lock the right code signs in."""
    actor.user(secret=secret)
    for k in range(app.config["THROTTLE_FREE_FAILURES"]):
        actor.password_step()  # a code step each: one step's fifth wrong code ends it instead
        actor.code_refused(WRONG)
        clock.advance(2 ** k)  # past the pause it set (1, 2, 4, 8 s)
    actor.password_step()
    page = actor.code_refused(WRONG)
    html = " ".join(page.get_data(as_text=True).split())
    assert page.status_code == 429
    assert "Too many wrong codes in a row: wait 15 minutes before trying again." in html
    until = user_row(app).code_locked_until
    shown = (until + timedelta(seconds=59, microseconds=999999)).replace(second=0, microsecond=0)
    assert f"Sign in again with your password after <time datetime=\"{shown:%Y-%m-%dT%H:%M:%S}Z\" data-local>" in html
    assert 'id="code-locked" tabindex="-1" autofocus aria-labelledby="code-locked-wait"' in html
    assert 'name="code"' not in html and "<title>Error: Verification code · twostep</title>" in html
    failures = app.config["THROTTLE_FREE_FAILURES"] + 1
    assert code_failures(app) == (failures, 1)
    again = " ".join(actor.client.get("/login/verify").get_data(as_text=True).split())  # Reload
    assert "in a row" not in again and "Too many wrong codes. Wait 15 minutes before trying again." in again
    assert 'name="code"' not in again and code_failures(app) == (failures, 1)
    clock.advance(15 * 60)
    actor.password_step()
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"


def test_a_refused_code_is_said_only_within_its_minute_on_its_own_code_step_and_expiry_goes_on_as_before(
        actor, app, secret, clock):
    """A refused code is kept a minute, for its own code step: its 303 not followed (the answer lost, the tab
    left), it is not said a minute later, nor on the code step the password starts next. A code step that
    expires before the page of its refusal is loaded sends the person to sign in again, with the address kept,
    as an expired code step did; a code sent to it then counts nothing."""
    actor.user(secret=secret)
    actor.password_step()
    assert actor.code_step(WRONG).status_code == 303
    clock.advance(61)
    assert GENERIC_CODE_ERROR not in actor.client.get("/login/verify").get_data(as_text=True)
    assert actor.code_step(WRONG).status_code == 303
    actor.password_step()  # a new code step, before the first one's refusal was shown
    page = actor.client.get("/login/verify")
    assert page.status_code == 200 and GENERIC_CODE_ERROR not in page.get_data(as_text=True)
    token = csrf_from(page.get_data(as_text=True))
    clock.advance(app.config["CHALLENGE_TTL"].total_seconds() - 10)
    assert actor.client.post("/login/verify", data={"csrf_token": token, "code": WRONG}).status_code == 303
    clock.advance(11)  # the code step expires before the page its refusal led to is loaded
    r = actor.client.get("/login/verify")
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert 'value="alice@example.com"' in page and GENERIC_CODE_ERROR not in page
    r = actor.client.post("/login/verify", data={"csrf_token": token, "code": WRONG})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    assert user_row(app).code_failures == 3


def test_wrong_code_grants_nothing(actor, secret):
    """security.md 23: after a wrong code, protected pages stay closed whatever the client claims."""
    actor.user(secret=secret, admin=True)
    actor.password_step()
    actor.code_step(WRONG)
    for url in ("/settings", "/support", "/settings/2fa"):
        r = actor.client.get(url, headers={"X-2FA-Status": "ok"})
        assert r.status_code == 302 and "/login" in r.headers["Location"]


# ------------------------------------------------------------------ throttling

def test_account_lock_holds_across_clients_and_addresses(app, clock, secret):
    """security.md 18: six wrong codes from fresh cookie jars and IPs; the sixth and a correct code are refused."""
    from .conftest import Actor

    Actor(app, app.test_client(), clock).user(secret=secret)
    waits = [1, 2, 4, 8, 0]
    for i in range(5):
        a = Actor(app, app.test_client(), clock)
        a.password_step()
        r = a.code_refused(WRONG, environ_base={"REMOTE_ADDR": f"10.0.0.{i + 1}"},
                           headers={"X-Forwarded-For": f"192.0.2.{i}"})
        assert "That code is not valid" in r.get_data(as_text=True)
        clock.advance(waits[i])
    for code in (WRONG, None):
        a = Actor(app, app.test_client(), clock)
        a.password_step()
        r = a.code_refused(code or a.code(secret), environ_base={"REMOTE_ADDR": "10.9.9.9"})
        assert r.status_code == 429 and "Too many wrong codes" in r.get_data(as_text=True)
        assert not signed_in(a.client)
    assert user_row(app).code_failures == 7
    assert "code_lockout" in kinds(app)
    clock.advance(16 * 60)
    a = Actor(app, app.test_client(), clock)
    a.password_step()
    assert a.code_step(a.code(secret)).headers.get("Location") == "/settings"


def test_back_off_refuses_quick_retries_without_evaluating(actor, secret, clock):
    """security.md 18: within the back-off even a correct code is not evaluated."""
    actor.user(secret=secret)
    actor.password_step()
    actor.code_step(WRONG)
    r = actor.code_refused(actor.code(secret))
    # One mistyped code is not "too many": the short pause says only how long to wait.
    assert r.status_code == 429 and "Wait 1 second before entering another code." in r.get_data(as_text=True)
    assert "Too many" not in r.get_data(as_text=True)
    clock.advance(1)
    assert actor.code_step(actor.code(secret)).headers.get("Location") == "/settings"


def test_the_lock_says_too_many_to_its_last_second(actor, secret, clock):
    """The wording follows the failures, not the time left: the last half minute of the 15-minute lock after
    five wrong codes still says "Too many wrong codes" (it read like the short pause after one mistake)."""
    actor.user(secret=secret)
    actor.password_step()
    for wait in (1, 2, 4, 8, 0):
        actor.code_step(WRONG)
        clock.advance(wait)
    clock.advance(15 * 60 - 30)
    actor.password_step()  # the fifth wrong code also ended that sign-in (its challenge)
    r = actor.code_refused(actor.code(secret))
    assert r.status_code == 429 and "Too many wrong codes. Wait 30 seconds before trying again." in r.get_data(
        as_text=True)


def test_codes_refused_during_a_pause_do_not_make_it_a_lock(actor, secret, clock):
    """security.md 18: only the codes checked (the strikes) decide whether the account's wait is one of the
    short pauses or the lock; codes refused during a pause are counted, but do not make "Too many wrong codes"
    of it. With 4 strikes and 9 refused codes (a pause of 5 seconds left), the code page shows no refusal
    before a code is typed, a code sent reads "Wait 5 seconds before entering another code", and the code
    step ended by its fifth code asks to sign in again without a wait to sit out, speaking of attempts: none
    of those five codes was checked, and "Too many wrong codes" contradicted the pages before it (a
    usability review)."""
    user = actor.user(secret=secret)
    assert actor.password_step().headers["Location"] == "/login/verify"
    with actor.app.app_context():
        User.update(code_failures=9, code_strikes=actor.app.config["THROTTLE_FREE_FAILURES"],
                    code_locked_until=utc(clock.t) + timedelta(seconds=5)).where(User.id == user.id).execute()
    page = actor.client.get("/login/verify").get_data(as_text=True)
    assert "Too many" not in page and "Wait" not in page
    for _ in range(4):
        r = actor.code_refused(actor.code(secret))
        assert r.status_code == 429 and "Wait 5 seconds before entering another code." in r.get_data(as_text=True)
        assert "Too many" not in r.get_data(as_text=True)
    r = actor.code_step(actor.code(secret))  # the code step's fifth refused code ends it
    assert r.status_code == 302 and r.headers["Location"] == "/login"
    page = actor.client.get("/login").get_data(as_text=True)
    assert "Too many attempts. For your security, please sign in again." in page
    assert "then sign in again" not in page and "wrong codes" not in page
    row = user_row(actor.app)
    assert (row.code_failures, row.code_strikes) == (14, 4)
    clock.advance(5)
    assert actor.password_step().headers["Location"] == "/login/verify"
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"


def test_the_pauses_after_the_first_wrong_codes_are_1_2_4_and_8_seconds(actor, secret, clock):
    """security.md 18: each pause after wrong codes 1-4 doubles, and lasts to its end: a second before, even
    the right code is refused ("Wait 1 second"); at its end, it is accepted."""
    actor.user(secret=secret)
    for pause in (1, 2, 4, 8):
        actor.password_step()  # a code step of its own each time: the challenge allows 5 refused codes
        actor.code_step(WRONG)
        clock.advance(pause - 1)
        r = actor.code_refused(actor.code(secret))
        assert r.status_code == 429 and "Wait 1 second before entering another code." in r.get_data(as_text=True)
        clock.advance(1)
    assert actor.code_step(actor.code(secret)).headers.get("Location") == "/settings"


def test_a_clock_set_back_does_not_make_a_pause_or_a_lock_longer(actor, secret, clock):
    """security.md 18: a wait lasts at most its whole length from now, should the server's clock go back after
    it was set (an NTP step, a VM resumed). Set back an hour, the one-second pause after a wrong password said
    "Try again in 61 minutes" and the 15-minute lock "Wait 75 minutes"; set back four minutes (within the code
    step), the pause after a mistyped code said "Wait 5 minutes"."""
    actor.user(secret=secret)
    actor.password_step(password="wrong")
    clock.advance(-3600)
    r = actor.password_step()
    assert r.status_code == 429 and "Try again in 1 second." in r.get_data(as_text=True)
    clock.advance(1)
    assert actor.password_step().headers["Location"] == "/login/verify"
    actor.code_step(WRONG)
    clock.advance(-4 * 60)
    r = actor.code_refused(actor.code(secret))
    assert r.status_code == 429 and "Wait 1 second before entering another code." in r.get_data(as_text=True)
    clock.advance(1)
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    # Another account: Alice's device took a code of the time before this hour (replay protection, rightly).
    actor.user("bob@example.com", secret=secret)
    actor.password_step("bob@example.com")
    for wait in (1, 2, 4, 8, 0):
        actor.code_step(WRONG)
        clock.advance(wait)
    clock.advance(-3600)
    actor.password_step("bob@example.com")
    r = actor.code_refused(actor.code(secret))
    assert r.status_code == 429 and "Too many wrong codes. Wait 15 minutes before trying again." in r.get_data(
        as_text=True)
    clock.advance(15 * 60)
    actor.password_step("bob@example.com")
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"


def test_a_pause_set_by_an_app_host_whose_clock_runs_ahead_lasts_its_second_on_another(actor, secret, clock):
    """Two app hosts behind one database, one clock 30 seconds ahead of the other: the pause after a mistyped
    code on the first lasts a second on the second too (it said "Wait 31 seconds")."""
    actor.user(secret=secret)
    actor.password_step()
    clock.advance(30)  # the host ahead
    actor.code_step(WRONG)
    clock.advance(-30)  # the next request goes to the other host
    r = actor.code_refused(actor.code(secret))
    assert r.status_code == 429 and "Wait 1 second before entering another code." in r.get_data(as_text=True)
    clock.advance(1)
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"


def test_success_resets_the_failure_counter(actor, secret, clock):
    """security.md 19: four failures then a success leave the counter at 0."""
    actor.user(secret=secret)
    actor.password_step()
    for wait in (1, 2, 4, 8):
        actor.code_step(WRONG)
        clock.advance(wait)
    assert user_row(actor.app).code_failures == 4
    # The challenge allows 5 failures; the fifth attempt is the right code.
    assert actor.code_step(actor.code(secret)).headers.get("Location") == "/settings"
    assert user_row(actor.app).code_failures == 0


# ------------------------------------------------------------------ redirects

@pytest.mark.parametrize("target", ["///evil.example", "////evil.example", "/\t/evil.example", "/\n/evil.example",
                                    "//evil.example/path", "https:evil.example", "/" + "a" * 512])
def test_safe_next_refuses_every_way_to_name_another_host(target):
    """security.md 29: urlsplit("///evil.example") finds no host at all, yet browsers go to evil.example; and
    they drop a tab or newline in a URL, so "/\t/evil.example" is "//evil.example" to them. Found by
    mutation testing: without the "//" check no test noticed."""
    from webapp.security import safe_next

    assert safe_next(target) is None


@pytest.mark.parametrize("target", ["/settings\r\nSet-Cookie: a=b", "/settings\x00", "/settings\x1b[2J"])
def test_safe_next_refuses_control_characters(target):
    """security.md 29: a next with a line break (a header of the attacker's in the redirect) or another
    control character is refused, not passed on to the Location header."""
    from webapp.security import safe_next

    assert safe_next(target) is None


def test_safe_next_keeps_same_site_paths():
    # security.md 29
    from webapp.security import safe_next

    for target in ("/settings", "/support?q=alice%40example.com&page=2", "/settings/2fa#step"):
        assert safe_next(target) == target


@pytest.mark.parametrize("target", ["https://evil.example", "//evil.example", "/\\evil.example",
                                    "%2F%2Fevil.example", "javascript:alert(1)", "http:/evil.example",
                                    "///evil.example", "////evil.example"])
def test_open_redirects_are_refused(actor, secret, target):
    """security.md 29: next is honoured only for same-site paths, carried server-side through 2FA."""
    actor.user(secret=secret)
    actor.password_step(next_url=target)
    r = actor.code_step(actor.code(secret))
    assert r.headers["Location"] == "/settings"


def test_same_site_next_survives_the_code_step(actor, secret):
    actor.user(secret=secret)
    actor.client.get("/settings/2fa")  # anonymous: sent to login with next
    actor.password_step(next_url="/settings/2fa")
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings/2fa"


def test_anonymous_is_sent_to_login_with_next(client, actor):
    actor.user()
    r = client.get("/settings")
    assert r.status_code == 302 and r.headers["Location"] == "/login?next=/settings"


def test_htmx_request_without_session_gets_hx_redirect(client, actor):
    actor.user()
    r = client.get("/settings", headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.headers["HX-Redirect"].startswith("/login")


# ------------------------------------------------------------------ sessions

def test_a_logout_the_database_could_not_record_does_not_claim_to_have_logged_out(actor, app, secret, monkeypatch):
    """security.md 30: the session's row is deleted inside the request. When that fails, the person gets the
    503 page and stays signed in, rather than "You are logged out." over a cookie that still works."""
    import webapp.sessions as sessions_module

    from .conftest import database_error

    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    token = actor.csrf("/settings")
    captured = actor.session_cookie()

    class Failing:
        def execute(self, **params):
            raise database_error()

    with monkeypatch.context() as patch:
        patch.setattr(sessions_module, "_DELETE", Failing())
        r = actor.client.post("/logout", data={"csrf_token": token})
    assert r.status_code == 503 and "logged-out" not in r.headers.get("Location", "")
    assert actor.session_cookie() == captured and signed_in(actor.client)
    with app.app_context():  # and no record of a sign-out that did not happen
        assert not AuditEvent.select().where(AuditEvent.kind == "signout").exists()
    r = actor.client.post("/logout", data={"csrf_token": token})
    assert r.headers["Location"] == "/login?notice=logged-out" and not signed_in(actor.client)


def test_logout_ends_the_session_server_side(actor, app, secret):
    """security.md 30: a cookie captured before logout is worthless afterwards."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    captured = actor.session_cookie()
    r = actor.post_form("/logout", {}, form_url="/settings")
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=logged-out"
    assert "twostep_session=;" in r.headers["Set-Cookie"] and "Max-Age=0" in r.headers["Set-Cookie"]
    # The sign-in page says so, from the address alone: nothing is stored for the message.
    assert "You are logged out." in actor.client.get(r.headers["Location"]).get_data(as_text=True)
    with app.app_context():
        assert ServerSession.select().count() == 0
    replay = app.test_client()
    replay.set_cookie(app.session_interface.get_cookie_name(app), captured)
    assert not signed_in(replay)
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user.is_null(False)).count() == 0


def test_logout_is_post_only(actor):
    actor.user()
    actor.sign_in()
    assert actor.client.get("/logout").status_code == 405
    assert signed_in(actor.client)


def test_idle_timeout(actor, clock):
    """security.md 30: 31 idle minutes end the session."""
    actor.user()
    actor.sign_in()
    clock.advance(29 * 60)
    assert signed_in(actor.client)
    clock.advance(31 * 60)
    assert not signed_in(actor.client)


def test_absolute_timeout(actor, clock):
    """security.md 30: activity cannot keep a session alive past 12 hours: it lasts to their last second
    (a page every 30 minutes, the idle limit), and not one second longer."""
    actor.user()
    actor.sign_in()
    for _ in range(24):
        clock.advance(30 * 60)
        assert signed_in(actor.client)
    clock.advance(1)
    assert not signed_in(actor.client)


def test_the_idle_limit_counts_from_now_after_the_clock_goes_back(actor, clock):
    """security.md 30: after the server's clock went back (an NTP step, a VM resumed), the next request writes
    the session's last activity again, so 31 idle minutes after it end the session (it lasted as much longer
    as the clock went back); a session whose last activity lies more than the idle limit ahead has ended."""
    actor.user()
    actor.sign_in()
    clock.advance(-20 * 60)
    assert signed_in(actor.client)
    clock.advance(31 * 60)
    assert not signed_in(actor.client)
    actor.sign_in()
    clock.advance(-3600)
    assert not signed_in(actor.client)


def test_a_session_last_seen_ahead_of_this_hosts_clock_is_said_once_in_the_log(actor, clock, caplog, monkeypatch):
    """A diff review: app hosts whose clocks are over a minute apart make each request that lands on the one
    behind write its session row again, and the sign-in and session limits differ between them as much;
    nothing said so. One warning per process names the gap; hosts a few seconds apart get none."""
    import logging

    import webapp.sessions as sessions_module

    monkeypatch.setattr(sessions_module, "_warned_clock", [])
    caplog.set_level(logging.WARNING)
    actor.user()
    actor.sign_in()
    clock.advance(-5)  # another host, 5 s behind
    assert signed_in(actor.client)
    assert "ahead of this host's clock" not in caplog.text
    clock.advance(-5 * 60)  # five minutes behind
    assert signed_in(actor.client) and signed_in(actor.client)
    lines = [r.getMessage() for r in caplog.records if "ahead of this host's clock" in r.getMessage()]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"a session was last seen (300|305) seconds ahead of this host's clock: the clock went "
                        r"back, or another app host's clock runs ahead; keep the hosts' clocks synchronised \(NTP\)",
                        lines[0]), lines


def test_session_cookie_attributes(actor):
    """security.md 31: HttpOnly, SameSite=Lax, Path=/ (Secure and __Host- when served over HTTPS)."""
    actor.user()
    r = actor.password_step()
    [cookie] = [c for c in r.headers.getlist("Set-Cookie") if c.startswith("twostep_session=")]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Expires" not in cookie and "Max-Age" not in cookie  # a browser-session cookie


def test_secure_cookie_uses_host_prefix(tmp_path, clock):
    from cryptography.fernet import Fernet

    from webapp import create_app

    app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path), "SECURE_COOKIES": True,
                      "SECRET_KEY": "k" * 40, "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}", "PASSWORD_HASH_PROFILE": "cheapest",
                      "CLOCK": clock})
    r = app.test_client().get("/setup", base_url="https://localhost")
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("__Host-session=") and "Secure" in cookie and "Domain" not in cookie
    assert r.headers["Strict-Transport-Security"].startswith("max-age=")


def test_tampered_cookie_is_just_anonymous(actor, app):
    actor.user()
    client = app.test_client()
    client.set_cookie(app.session_interface.get_cookie_name(app), "x" * 43)
    r = client.get("/settings")
    assert r.status_code == 302
    client.set_cookie(app.session_interface.get_cookie_name(app), "\u00e9" * 500)
    assert client.get("/login").status_code == 200


def test_session_row_stores_only_a_hash_of_the_cookie(actor, app):
    actor.user()
    actor.sign_in()
    cookie = actor.session_cookie()
    with app.app_context():
        ids = [s.id for s in ServerSession.select()]
        assert cookie not in ids and token_hash(cookie) in ids
        data = json.loads(ServerSession.get(ServerSession.id == token_hash(cookie)).data)
        assert PASSWORD not in json.dumps(data)


def test_security_headers_on_pages(client, actor):
    """security.md 11, 12: CSP without inline script, no framing, no caching, no referrer."""
    actor.user()
    r = client.get("/login")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and "img-src 'self' data:" in csp
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_password_only_sign_in_during_a_support_window_says_why(actor, clock):
    """security.md 39: in support's window the password alone signs in, and the banner says why (once)."""
    from datetime import timedelta

    from webapp.clock import now

    user = actor.user()
    with actor.app.app_context():
        User.update(tfa_reset_until=now() + timedelta(hours=24)).where(User.id == user.id).execute()
    r = actor.password_step()
    assert r.headers["Location"] == "/settings"
    html = actor.client.get("/settings").get_data(as_text=True)
    assert html.count("Two-factor authentication is temporarily off on your account.") == 1
    assert 'id="reset-banner"' in html and "Set up a new device" in html


def test_a_match_found_before_the_lock_cannot_be_used_twice(app, actor, secret):
    """security.md 16, 20: the decrypting and HMACs run before the write transaction (totp.code_matches), so
    two requests can both find the same match; only the first to reach the conditional update signs in, the
    other is refused as a replay and counted as a failure."""
    from webapp.totp import check_user_code, code_matches

    user = actor.user(secret=secret)
    code = actor.code(secret)
    with app.test_request_context("/login/verify", method="POST"):
        first, second = code_matches(user, code), code_matches(user, code)
        assert len(first) == 1 and first[0][1] == second[0][1]  # the same device and step
        assert check_user_code(user, code, first).ok
        late = check_user_code(user, code, second)
        assert not late.ok and late.reason == "replay"
    with app.app_context():
        assert User.get_by_id(user.id).code_failures == 1
        assert [e.kind for e in AuditEvent.select().order_by(AuditEvent.id)] == ["code_accepted", "totp_replay"]


# ------------------------------------------------------------------ found by mutation testing (each test
# failed with one deliberate bug that the rest of the suite let through)

def test_reauth_with_2fa_needs_the_code_not_just_the_password(actor, app, secret):
    """security.md 9, 32: /reauth for a person with 2FA refuses the password alone (the code field is
    optional in the form: the view must demand it); the session stays stale and the wizard stays shut."""
    from webapp.models import PendingEnrolment

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    page = actor.client.get("/reauth?next=/settings/2fa").get_data(as_text=True)
    assert '<a href="/settings">Cancel</a> and go back to User Settings.' in page  # a way out without confirming
    r = actor.post_form("/reauth?next=/settings/2fa", {"password": PASSWORD})
    assert r.status_code != 302
    r = actor.client.post("/settings/2fa/start", data={"csrf_token": actor.csrf("/settings")})
    assert r.status_code == 302 and r.headers["Location"].startswith("/reauth")
    with app.app_context():
        assert PendingEnrolment.select().where(PendingEnrolment.user == user.id).count() == 0
        assert AuditEvent.select().where(AuditEvent.kind == "reauthenticated").count() == 0



def test_confirm_clicked_twice_or_reached_again_by_back_goes_on_instead_of_asking_for_a_new_code(actor, app, secret):
    """A second click on Confirm (its code used up by the first) showed "That code is not valid, or it was
    already used" to a person just confirmed, and counted a failure; Back to the form asked for yet another
    code. A session confirmed within the window goes straight on to where it was going."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    token = actor.csrf("/reauth?next=/settings/password")
    form = {"csrf_token": token, "password": PASSWORD, "code": actor.code(secret)}
    first = actor.client.post("/reauth?next=/settings/password", data=form)
    assert first.status_code == 302 and first.headers["Location"] == "/settings/password"
    second = actor.client.post("/reauth?next=/settings/password", data=form)  # the old page's token
    assert second.status_code == 302 and second.headers["Location"] == "/settings/password"
    # Back to the form: it says that it is done, with the way on, and asks for nothing (no field, no button).
    back = actor.client.get("/reauth?next=/settings/password").get_data(as_text=True)
    assert "You have confirmed it's you." in back and '<a href="/settings/password">Go back to where you were</a>' \
        in back and 'name="password"' not in back and "Confirm</button>" not in back
    assert user_row(app).code_failures == 0
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "reauthenticated").count() == 1
    actor.clock.advance(11 * 60)  # stale again: the form is asked for, as before
    assert actor.client.get("/reauth?next=/settings/password").status_code == 200


def test_a_confirmation_sent_again_with_htmx_names_its_next_page_in_a_header_a_server_can_send(actor, app, secret):
    """Confirm it's you sent again from an old tab with htmx, by a session confirmed since: the answer is
    401 with HX-Redirect to the `next` of the address. A `next` with "€" or DEL went into that header as it
    was, and gunicorn answers a response header outside printable ASCII and Latin-1 with a 500 of its own.
    It is sent as a URI now (as werkzeug sends Location), and nothing is written for it. DEL and the other
    control and format characters are no `next` at all now (safe_next): such an answer names User Settings."""
    import re

    from webapp.models import ALL_MODELS

    actor.user(secret=secret)
    actor.sign_in(secret=secret)

    def rows():
        with app.app_context():
            return {m.__name__: sorted(map(repr, m.select().tuples())) for m in ALL_MODELS}

    before = rows()
    for sent, expected in (("/%E2%82%AC", "/%E2%82%AC"), ("/settings%7F", "/settings"),
                           ("/caf%C3%A9?x=%E2%80%94", "/caf%C3%A9?x=%E2%80%94"), ("/x%E2%80%AE", "/settings")):
        r = actor.client.post("/reauth?next=" + sent, data={"csrf_token": "from-an-old-page"},
                              headers={"HX-Request": "true"})
        assert (r.status_code, r.headers["HX-Redirect"]) == (401, expected)
        # gunicorn.http.wsgi.HEADER_VALUE_RE: what it lets through
        assert all(re.fullmatch(r"[ \t\x21-\x7e\x80-\xff]*", value) for _, value in r.headers.items())
    assert rows() == before


@pytest.mark.parametrize("path", ["/login", "/login/verify", "/signup"])
def test_a_sign_in_form_sent_from_another_tab_after_signing_in_goes_to_user_settings(actor, app, secret, path):
    """Two tabs at the sign-in page (or at the code step, or at the sign-up page); the person signs in in the
    first, then sends the second: its token belongs to the session before the sign-in. It said "Form expired.
    Reload the page", and reloading sent the form again. A person who is signed in now goes to User Settings;
    nothing is checked, counted or made."""
    actor.user(secret=secret)
    if path == "/login/verify":
        actor.password_step()
    old_token = actor.csrf(path)
    if path != "/login/verify":
        actor.password_step()
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"
    data = {"csrf_token": old_token, "email": "alice@example.com", "password": PASSWORD, "confirm": PASSWORD,
            "code": "123456"}
    r = actor.client.post(path, data=data)
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    page = actor.client.get("/settings")
    assert page.status_code == 200
    assert ("You are already signed in as <bdi>alice@example.com</bdi>. To use another account, log out first."
            in page.get_data(as_text=True))  # the address shown as every page shows one (fields.revealed_address)
    # The same form sent by htmx: told to load User Settings as a whole page (a 302 would be swapped into it).
    r = actor.client.post(path, data=data, headers={"HX-Request": "true"})
    assert r.headers["HX-Redirect"] == "/settings" and "Location" not in r.headers
    row = user_row(app)
    assert (row.code_failures, row.password_failures) == (0, 0)


def test_a_refused_password_puts_the_focus_on_password_which_names_the_reason(actor):
    """After "Incorrect email address or password." the email stays filled in and the person retypes the
    password: focus goes there (not back to Email), and the field is described by the message."""
    import re

    actor.user()
    html = actor.post_form("/login", {"email": "alice@example.com", "password": "wrong"}).get_data(as_text=True)
    focused = re.findall(r"<input[^>]*\bautofocus\b[^>]*>", html)
    assert len(focused) == 1 and 'name="password"' in focused[0] and 'aria-describedby="login-error"' in focused[0]
    assert re.search(r'<p [^>]*id="login-error"[^>]*>Incorrect email address or password.</p>', html)
    fresh = actor.client.get("/login").get_data(as_text=True)
    focused = re.findall(r"<input[^>]*\bautofocus\b[^>]*>", fresh)
    assert len(focused) == 1 and 'name="email"' in focused[0]
    # Password left empty: Email keeps its value and gives up its autofocus to the field with the error
    # (browsers focus the first autofocus in a page)
    html = actor.post_form("/login", {"email": "alice@example.com", "password": ""}).get_data(as_text=True)
    focused = re.findall(r"<input[^>]*\bautofocus\b[^>]*>", html)
    assert len(focused) == 1 and 'name="password"' in focused[0] and 'aria-invalid="true"' in focused[0]


def test_reauth_with_a_malformed_code_focuses_the_code_not_the_password(actor, secret):
    import re

    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    r = reauth_refused(actor, "/reauth", {"password": PASSWORD, "code": "1" * 40})
    focused = re.findall(r"<input[^>]*\bautofocus\b[^>]*>", r.get_data(as_text=True))
    assert r.status_code == 400 and len(focused) == 1 and 'name="code"' in focused[0]
    assert 'value="1111' not in r.get_data(as_text=True)  # what was typed is not kept, nor shown


def test_reauth_with_a_wrong_password_says_so_without_mentioning_an_email_address(actor, app, secret):
    """The "Confirm it's you" form has no email field: its refusal is "Incorrect password.", and nothing changes."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    r = reauth_refused(actor, "/reauth?next=/settings/2fa", {"password": "not my password", "code": actor.code(secret)})
    body = r.get_data(as_text=True)
    assert r.status_code == 200 and "Incorrect password." in body and "Incorrect email address" not in body
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "reauthenticated").count() == 0


def test_confirm_its_you_answers_429_while_the_password_or_the_code_waits(actor, app, secret):
    """security.md 18: "Confirm it's you" shows the back-off's "Too many ..." as every other page does, and
    answers 429 Too Many Requests with it as they do (it answered 200); a wrong password before the wait is
    an ordinary 200. The status follows the refusal's kind, not its first words."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    r = reauth_refused(actor, "/reauth", {"password": "not my password", "code": actor.code(secret)})
    assert r.status_code == 200 and "Incorrect password." in r.get_data(as_text=True)
    r = reauth_refused(actor, "/reauth", {"password": PASSWORD, "code": actor.code(secret)})  # within the 1 s pause
    assert r.status_code == 429 and "Too many failed attempts. Try again in" in r.get_data(as_text=True)
    actor.clock.advance(60)
    wrong = WRONG if actor.code(secret) != WRONG else "111111"
    r = reauth_refused(actor, "/reauth", {"password": PASSWORD, "code": wrong})
    assert r.status_code == 200 and "Incorrect password." not in r.get_data(as_text=True)
    r = reauth_refused(actor, "/reauth", {"password": PASSWORD, "code": actor.code(secret)})  # the code's pause
    assert r.status_code == 429 and "This code was not checked" in r.get_data(as_text=True)
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "reauthenticated").count() == 0


def test_a_refused_confirmation_is_said_once_on_its_own_page_and_keeps_nothing_typed(actor, app, secret):
    """"Confirm it's you" answers a refusal with a 303 to its own page (Post/Redirect/Get), so Reload and Back
    send no password or code again (each resend was one more failure). That page says the refusal once; the
    form of another page, or one opened a minute later, starts clean. No password or code is kept."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    r = actor.post_form("/reauth?next=/settings", {"password": "not my password", "code": actor.code(secret)})
    assert r.status_code == 303 and r.headers["Location"] == "/reauth?next=/settings"
    with app.app_context():
        kept = json.dumps(ServerSession.select().where(ServerSession.user.is_null(False)).get().load())
    assert "not my password" not in kept and actor.code(secret) not in kept
    assert "Incorrect password." in actor.client.get("/reauth?next=/settings").get_data(as_text=True)
    again = actor.client.get("/reauth?next=/settings").get_data(as_text=True)  # Reload
    assert "Incorrect password." not in again and 'name="password"' in again
    actor.clock.advance(2)
    actor.post_form("/reauth?next=/settings", {"password": "not my password", "code": actor.code(secret)})
    assert "Incorrect password." not in actor.client.get("/reauth?next=/support").get_data(as_text=True)
    actor.clock.advance(2)
    actor.post_form("/reauth?next=/settings", {"password": "not my password", "code": actor.code(secret)})
    actor.clock.advance(61)
    assert "Incorrect password." not in actor.client.get("/reauth?next=/settings").get_data(as_text=True)
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "password_rejected").count() == 3


def test_the_fifth_wrong_code_locks_for_minutes_and_is_recorded_then(app, clock, secret):
    """security.md 18, 19: failures 1-4 back off 1, 2, 4, 8 s; the fifth locks for 15 minutes, so 17 s later
    a right code is still refused; the lockout is recorded at the fifth failure, not before."""
    from .conftest import Actor

    Actor(app, app.test_client(), clock).user(secret=secret)
    for i, wait in enumerate((1, 2, 4, 8, 17)):
        a = Actor(app, app.test_client(), clock)
        a.password_step()
        a.code_step(WRONG if a.code(secret) != WRONG else "111111")
        with app.app_context():
            assert AuditEvent.select().where(AuditEvent.kind == "code_lockout").count() == (1 if i == 4 else 0), i
        clock.advance(wait)
    a = Actor(app, app.test_client(), clock)
    a.password_step()
    r = a.code_refused(a.code(secret))
    assert r.status_code == 429 and "minutes" in r.get_data(as_text=True)


def test_the_lock_never_exceeds_its_cap(app):
    """security.md 18 and the lockout denial of service: however many failures, at most THROTTLE_MAX_LOCK."""
    from datetime import timedelta

    from webapp.security import backoff

    with app.app_context():
        assert backoff(5) == timedelta(minutes=15)
        assert max(backoff(n) for n in range(1, 200)) == app.config["THROTTLE_MAX_LOCK"] == timedelta(hours=24)


# ------------------------------------------------------------------ 2FA turned off while a code step is under way

def _after_code_matches(monkeypatch, app, action):
    """The code step's slow match (before its transaction) followed by `action`: a change landing meanwhile."""
    import webapp.auth as auth_module

    original = auth_module.code_matches

    def wrapper(user, *args, **kwargs):
        found = original(user, *args, **kwargs)
        with app.app_context():
            action(user)
        return found

    monkeypatch.setattr(auth_module, "code_matches", wrapper)


@pytest.mark.parametrize("right_code", [True, False])
def test_a_code_step_whose_2fa_support_turns_off_meanwhile_counts_nothing(app, actor, secret, clock, monkeypatch,
                                                                          right_code):
    """Support's disable deletes the code steps under way. One whose code was being checked then is not a
    replay, nor a failure of the person's: nothing of it stays, and the browser is sent to sign in again
    (security.md 16, 18: the failure counter counts guesses, not the database's timing)."""
    from datetime import timedelta

    from webapp.clock import now
    from webapp.db import write_transaction
    from webapp.security import revoke_second_factor

    def support_disables(user):
        with write_transaction():
            revoke_second_factor(User.get_by_id(user.id), reset_until=now() + timedelta(days=1))

    user = actor.user(secret=secret)
    assert actor.password_step().headers["Location"] == "/login/verify"
    _after_code_matches(monkeypatch, app, support_disables)
    r = actor.code_step(actor.code(secret) if right_code else WRONG)
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    assert not signed_in(actor.client)
    assert user_row(app).code_failures == 0 and user_row(app).code_locked_until is None
    assert not {"totp_replay", "code_rejected", "code_accepted", "signin"} & set(kinds(app))
    monkeypatch.undo()
    assert actor.password_step().headers["Location"] == "/settings"  # 2FA is off: the password alone now


def test_a_code_from_a_device_removed_meanwhile_is_a_wrong_code_not_a_replay(app, actor, secret, monkeypatch):
    """The device whose code matched was removed (in another tab) while the code was checked; the person has
    another device. The code is no longer any device's: refused as wrong and recorded so, not as a replay
    (security.md 16: a replay record means a code was used twice)."""
    from webapp.models import Device

    user = actor.user(secret=secret, devices={"Tablet": pyotp.random_base32()})
    assert actor.password_step().headers["Location"] == "/login/verify"
    _after_code_matches(monkeypatch, app,
                        lambda u: Device.delete().where((Device.user == u.id) & (Device.name == "Phone")).execute())
    r = actor.code_refused(actor.code(secret))
    assert r.status_code == 200 and GENERIC_CODE_ERROR in r.get_data(as_text=True)
    assert not signed_in(actor.client)
    with app.app_context():
        [rejected] = AuditEvent.select().where(AuditEvent.user == user.id, AuditEvent.kind == "code_rejected")
        assert rejected.details["reason"] == "wrong"
    assert "totp_replay" not in kinds(app) and user_row(app).code_failures == 1


@pytest.mark.parametrize("how", ["disable", "remove the only device"])
def test_turning_2fa_off_ends_the_code_steps_under_way_elsewhere(app, actor, secret, how):
    """A browser at the code step (the password was right) can never finish once the owner turns 2FA off:
    it is told its sign-in expired, not shown 'wrong code' until it locks the account (security.md 18)."""
    from webapp.models import Device

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    other = type(actor)(app, app.test_client(), actor.clock)
    assert other.password_step().headers["Location"] == "/login/verify"
    other_token = other.csrf("/login/verify")  # the code step's page, open in that browser
    actor.clock.advance(30)
    token = actor.csrf("/settings")
    if how == "disable":
        data = {"off-password": PASSWORD, "off-code": actor.code(secret)}
        url = "/settings/2fa/disable"
    else:
        device = Device.get(Device.user == user.id)
        data = {f"remove-{device.id}-code": actor.code(secret), f"remove-{device.id}-confirm_off": "y",
                f"remove-{device.id}-password": PASSWORD}
        url = f"/settings/devices/{device.id}/remove"
    assert actor.client.post(url, data={"csrf_token": token, **data}).status_code == 302
    assert not user_row(app).has_2fa
    with app.app_context():
        assert SignInChallenge.select().where(SignInChallenge.user == user.id).count() == 0
    r = other.client.post("/login/verify", data={"csrf_token": other_token, "code": other.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    assert user_row(app).code_failures == 0 and "code_rejected" not in kinds(app)


def test_a_page_sent_back_with_a_refusal_says_error_first_in_its_title(actor, secret):
    """Without JavaScript a refused form comes back as a whole page, and a screen reader reads its title
    first: it starts with "Error:" (as the wizard's pages did already), and only then."""
    import re

    def title(r):
        return re.search(r"<title>(.*?)</title>", r.get_data(as_text=True)).group(1)

    actor.user(secret=secret)
    assert title(actor.client.get("/login")) == "Log in · twostep"
    assert title(actor.password_step(password="wrong password")) == "Error: Log in · twostep"
    actor.clock.advance(2)  # past the back-off
    actor.password_step()
    assert title(actor.client.get("/login/verify")) == "Verification code · twostep"
    # The code step answers a refusal with a 303 to its page too (code_refused), which says it once
    assert title(actor.code_refused(WRONG)) == "Error: Verification code · twostep"
    assert title(actor.client.get("/login/verify")) == "Verification code · twostep"
    actor.clock.advance(2)
    actor.code_step(actor.code(secret))
    assert title(actor.client.get("/settings")) == "User Settings · twostep"
    # These two answer a refusal with a 303 to their page (Post/Redirect/Get): the page it leads to says it,
    # and only once
    r = actor.post_form("/settings/password", {"current": "wrong password", "new": "another long one",
                                               "confirm": "another long one"})
    assert r.status_code == 303 and title(actor.client.get(r.headers["Location"])) == "Error: Change password · twostep"
    assert title(actor.client.get("/settings/password")) == "Change password · twostep"
    device = user_row(actor.app).devices.get()
    r = actor.post_form(f"/settings/devices/{device.id}/remove", {f"remove-{device.id}-code": WRONG},
                        form_url="/settings")
    r = actor.client.get(r.headers["Location"])
    assert "remove-" in r.get_data(as_text=True) and title(r) == "Error: User Settings · twostep"
    assert title(actor.client.get("/settings")) == "User Settings · twostep"


# ------------------------------------------------------------------ an account the operator disabled

def disable_account(app, email="alice@example.com"):
    result = app.test_cli_runner().invoke(args=["users", "disable", email])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("with_device", [True, False])
def test_a_disabled_account_is_told_so_only_after_the_right_password(actor, app, secret, with_device):
    """A disabled account (`users disable`) cannot sign in, with or without 2FA. A wrong password gets exactly
    the page an unknown address gets (Auth-CS "Authentication and Error Messages": nobody who lacks the
    password learns that the account exists, or that it is disabled). The right one gets the reason and a
    pointer to the organisation that runs the service: no code step, no challenge row, no session, and an
    audit record of its own (security.md 43). The contact form still takes the person's request."""
    from webapp.models import SupportRequest

    user = actor.user(secret=secret if with_device else None)
    disable_account(app)
    unknown = actor.password_step(email="nobody@example.com", password="wrong password")
    wrong = actor.password_step(password="wrong password")
    assert unknown.status_code == wrong.status_code == 200
    assert wrong.get_data(as_text=True).replace("alice@example.com", "nobody@example.com") == \
        unknown.get_data(as_text=True)
    assert "disabled" not in wrong.get_data(as_text=True)

    actor.clock.advance(2)  # past the pause the wrong password set
    r = actor.password_step()
    html = r.get_data(as_text=True)
    assert r.status_code == 403 and "Location" not in r.headers
    assert "This account has been disabled by the organisation that runs this service" in html
    assert "contact that organisation" in html and 'href="/support/contact"' in html
    assert "Incorrect email address or password." not in html and "Verification code" not in html
    assert not signed_in(actor.client)
    with app.app_context():
        assert SignInChallenge.select().count() == 0
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 0
    assert kinds(app)[-2:] == ["password_rejected", "signin_account_disabled"]

    r = actor.post_form("/support/contact", {"email": "alice@example.com", "message": "Why can I not sign in?"})
    assert r.status_code == 302 and r.headers["Location"] == "/support/contact/sent"
    with app.app_context():
        assert [q.user_id for q in SupportRequest.select()] == [user.id]


def test_a_session_of_a_disabled_account_is_not_honoured(actor, app, monkeypatch):
    """Belt and braces: `users disable` ends the person's sessions, but one presented all the same (made
    here by setting the column behind the command's back) signs nobody in, and the browser is sent to the
    sign-in page, which says why. No query is added for it: the column comes with the session's own read
    of the person. `users enable` ends such a leftover session, so that it does not come back (security.md
    40)."""
    from webapp.clock import now
    from webapp.db import db

    user = actor.user()
    actor.sign_in()
    statements = []
    original = db.obj.execute_sql
    monkeypatch.setattr(db.obj, "execute_sql", lambda sql, params=None: statements.append(sql) or
                        original(sql, params))
    assert signed_in(actor.client)
    assert not [s for s in statements if 'FROM "user" AS "t1" WHERE' in s]
    assert any('"disabled_at"' in s and 'LEFT OUTER JOIN "user"' in s for s in statements)
    monkeypatch.undo()

    with app.app_context():
        User.update(disabled_at=now()).where(User.id == user.id).execute()
    r = actor.client.get("/settings")
    assert (r.status_code, r.headers["Location"]) == (302, "/login?notice=account-disabled")
    r = actor.client.get("/settings", headers={"HX-Request": "true"})
    assert (r.status_code, r.headers["HX-Redirect"]) == (401, "/login?notice=account-disabled")
    page = actor.client.get("/login?notice=account-disabled").get_data(as_text=True)
    assert "This account has been disabled by the organisation that runs this service" in page
    result = app.test_cli_runner().invoke(args=["users", "enable", "alice@example.com"])
    assert result.exit_code == 0
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 0
        assert AuditEvent.select().where(AuditEvent.kind == "account_enabled").get().details["sessions_ended"] == 1
    assert not signed_in(actor.client)


# ------------------------------------------------------------------ per-network limits: sign-up and spraying

SPRAYED = "Winter2026!"  # the one password a sprayer tries on every address


def _from(ip):
    """Request keywords for a client at `ip`."""
    return {"environ_base": {"REMOTE_ADDR": ip}}


def _sign_up(app, clock, email, **kwargs):
    """A sign-up from a browser of its own (a browser signed in by its sign-up is sent on from /signup)."""
    from .conftest import Actor

    visitor = Actor(app, app.test_client(), clock)
    return visitor.post_form("/signup", {"email": email, "password": PASSWORD, "confirm": PASSWORD},
                             form_url="/signup", **kwargs)


def _limit_records(app):
    with app.app_context():
        return [(e.ip, e.details) for e in AuditEvent.select().where(AuditEvent.kind == "network_limit_reached")
                .order_by(AuditEvent.id)]


def _counted(app, purpose, network="127.0.0.1"):
    from webapp.models import NetworkCounter

    with app.app_context():
        row = NetworkCounter.get_or_none(NetworkCounter.purpose == purpose, NetworkCounter.network == network)
        return row.hits if row else 0


def _hashing(monkeypatch):
    """The argon2 calls made from now on (a hash or a verification each)."""
    calls = []
    hash_, verify = PasswordHasher.hash, PasswordHasher.verify
    monkeypatch.setattr(PasswordHasher, "hash", lambda self, *a, **k: calls.append("hash") or hash_(self, *a, **k))
    monkeypatch.setattr(PasswordHasher, "verify", lambda self, *a: calls.append("verify") or verify(self, *a))
    return calls


def test_signups_from_one_network_stop_at_the_hourly_limit(app, actor, clock, monkeypatch):
    """/signup made an account for anyone as fast as a password hashes, each adding rows. Now SIGNUPS_PER_HOUR
    (10) per client network: the next is refused with 429 and the wait in words, hashing nothing and storing
    nothing, and for an address that has an account the answer is the same (it says nothing about the
    address). Reaching the limit leaves one audit record."""
    actor.user()  # an account exists (before the first one, /signup leads to the first-run page)
    limit = app.config["SIGNUPS_PER_HOUR"]
    assert limit == 10
    for i in range(limit):
        assert _sign_up(app, clock, f"person{i}@example.com").status_code == 302
        clock.advance(60)
    with app.app_context():
        before = (User.select().count(), ServerSession.select().count(), AuditEvent.select().count())
    calls = _hashing(monkeypatch)
    for email in ("late@example.com", "alice@example.com"):
        r = _sign_up(app, clock, email)
        html = r.get_data(as_text=True)
        assert r.status_code == 429
        assert "Too many sign-ups from your network in the last hour. Try again in 50 minutes." in html
        assert "already exists" not in html
    assert calls == []
    with app.app_context():
        assert (User.select().count(), ServerSession.select().count(), AuditEvent.select().count()) == before
        assert User.by_email("late@example.com") is None
    assert _limit_records(app) == [("127.0.0.1", {"limit": "sign-ups", "network": "127.0.0.1", "per_hour": 10})]


def test_sign_ups_refused_as_existing_count_against_the_network(app, actor, clock):
    """/signup says "already exists" for an address with an account: unlimited, it let anyone test address after
    address. Those answers count towards SIGNUPS_PER_HOUR like the accounts made; past the limit every
    address gets the same 429, existing or not."""
    app.config["SIGNUPS_PER_HOUR"] = 3
    actor.user()
    for _ in range(3):
        r = _sign_up(app, clock, "alice@example.com")
        assert r.status_code == 200 and "already exists" in r.get_data(as_text=True)
    assert _counted(app, "sign-ups") == 3
    for email in ("alice@example.com", "new@example.com"):
        r = _sign_up(app, clock, email)
        assert r.status_code == 429 and "already exists" not in r.get_data(as_text=True)
    with app.app_context():
        assert User.by_email("new@example.com") is None


def test_a_client_whose_address_is_not_an_address_is_limited_as_it_is(app, actor, clock):
    """A proxy may pass on a client address that is no address ("unknown" in X-Forwarded-For, which ProxyFix
    takes as it is): such a client is counted under that name, not let past every per-network limit."""
    actor.user()
    for i in range(app.config["SIGNUPS_PER_HOUR"]):
        assert _sign_up(app, clock, f"person{i}@example.com", **_from("unknown")).status_code == 302
    assert _sign_up(app, clock, "late@example.com", **_from("unknown")).status_code == 429
    assert _counted(app, "sign-ups", network="unknown") == app.config["SIGNUPS_PER_HOUR"]


def test_the_signup_limit_is_per_network_and_ends_with_its_hour(app, actor, clock):
    """Each client network has its count: another IPv4 address, another IPv6 /64. The addresses of one /64
    are one client (one computer picks new ones in it at will). The hour runs from the network's first
    sign-up; when it is over, the count starts again."""
    actor.user()
    limit = app.config["SIGNUPS_PER_HOUR"]
    for i in range(limit):
        assert _sign_up(app, clock, f"six{i}@example.com", **_from(f"2001:db8:1:2::{i + 1:x}")).status_code == 302
    assert _sign_up(app, clock, "late@example.com", **_from("2001:db8:1:2::ff")).status_code == 429
    assert _sign_up(app, clock, "four@example.com", **_from("198.51.100.7")).status_code == 302
    assert _sign_up(app, clock, "next@example.com", **_from("2001:db8:1:3::1")).status_code == 302
    clock.advance(3599)
    r = _sign_up(app, clock, "late@example.com", **_from("2001:db8:1:2::1"))
    assert r.status_code == 429 and "Try again in 1 second." in r.get_data(as_text=True)
    clock.advance(1)
    assert _sign_up(app, clock, "late@example.com", **_from("2001:db8:1:2::1")).status_code == 302
    assert _counted(app, "sign-ups", "2001:db8:1:2::/64") == 1


def test_sign_ups_from_the_64s_of_one_48_add_up_to_a_looser_limit(app, actor, clock):
    """security.md 18: each IPv6 /64 is a client with SIGNUPS_PER_HOUR of its own, and whoever is routed a
    /48 (a tunnel broker gives one away) holds 65,536 of them: 65,536 times the sign-ups and "already exists"
    answers (a security review). Their /48 also counts, at ten times the limit; past it, every /64 of that
    /48 gets the 429, and another /48 is not held."""
    app.config["SIGNUPS_PER_HOUR"] = 2
    actor.user()
    for net in range(10):
        for i in range(2):
            r = _sign_up(app, clock, f"n{net}i{i}@example.com", **_from(f"2001:db8:7:{net:x}::{i + 1}"))
            assert r.status_code == 302
    assert _counted(app, "sign-ups-48", "2001:db8:7::/48") == 20
    r = _sign_up(app, clock, "late@example.com", **_from("2001:db8:7:ff::1"))  # a /64 of its own, unused
    assert r.status_code == 429 and "Too many sign-ups from your network" in r.get_data(as_text=True)
    with app.app_context():
        assert User.by_email("late@example.com") is None
    assert ("2001:db8:7:9::2", {"limit": "sign-ups-48", "network": "2001:db8:7::/48", "per_hour": 20}) in \
        _limit_records(app)
    assert _sign_up(app, clock, "late@example.com", **_from("2001:db8:8::1")).status_code == 302  # another /48


def test_wrong_passwords_from_the_64s_of_one_48_add_up_to_a_looser_limit(app, actor, clock, monkeypatch):
    """security.md 18: the same for FAILED_SIGNINS_PER_HOUR: spraying passwords from a new /64 each time
    got a fresh allowance every time (a security review). The /48 has ten times the limit; past it the
    password step refuses before any hash, even the right password, for every /64 in it, and says the
    wait."""
    app.config["FAILED_SIGNINS_PER_HOUR"] = 2
    actor.user()

    def attempt(ip, email="nobody@example.com", password=SPRAYED):
        return type(actor)(app, app.test_client(), clock).post_form(
            "/login", {"email": email, "password": password}, form_url="/login", **_from(ip))

    for net in range(10):
        for _ in range(2):
            assert attempt(f"2001:db8:7:{net:x}::1").status_code == 200
    assert _counted(app, "failed-sign-ins-48", "2001:db8:7::/48") == 20
    calls = _hashing(monkeypatch)
    r = attempt("2001:db8:7:ff::1", "alice@example.com", PASSWORD)
    assert r.status_code == 429
    assert ("Too many failed sign-ins from your network. Try again in 60 minutes, or from a browser you have "
            "signed in with before.") in r.get_data(as_text=True)
    assert calls == [] and user_row(app).password_failures == 0
    assert attempt("2001:db8:8::1", "alice@example.com", PASSWORD).status_code == 302  # another /48


def test_signups_sent_at_once_cannot_pass_the_limit_together(app, actor, clock, monkeypatch):
    """The count is read before the slow hash, so sign-ups sent at once all pass that read. It is read
    again, holding the network, before the account is made: one that finished meanwhile and reached the
    limit refuses this one, which stores nothing."""
    from webapp import auth

    actor.user()
    limit = app.config["SIGNUPS_PER_HOUR"]
    for i in range(limit - 1):
        assert _sign_up(app, clock, f"person{i}@example.com").status_code == 302
    real_hash = auth.hash_password

    def hash_while_another_signs_up(password):
        result = real_hash(password)
        monkeypatch.setattr(auth, "hash_password", real_hash)
        assert _sign_up(app, clock, "quick@example.com").status_code == 302  # finishes first: the tenth
        return result

    monkeypatch.setattr(auth, "hash_password", hash_while_another_signs_up)
    r = _sign_up(app, clock, "slow@example.com")
    assert r.status_code == 429 and "Too many sign-ups from your network" in r.get_data(as_text=True)
    with app.app_context():
        assert User.by_email("slow@example.com") is None and User.by_email("quick@example.com") is not None
        assert User.select().count() == limit + 1
    assert _counted(app, "sign-ups") == limit


def test_wrong_passwords_from_one_network_stop_at_the_hourly_limit(app, actor, clock, monkeypatch):
    """security.md 18: the password step throttles per account and per known browser, so one client could
    try one password on many accounts (spraying). FAILED_SIGNINS_PER_HOUR (100) wrong passwords or unknown
    addresses per client network and hour; then the password step answers 429 without hashing or looking
    at the password, even the right one, and counts nothing against the account. Another network is not
    held; the first one is free again when its hour is over."""
    limit = app.config["FAILED_SIGNINS_PER_HOUR"]
    assert limit == 100
    actor.user()
    actor.user("bob@example.com")
    actor.user("carol@example.com")
    token = actor.csrf()

    def attempt(email, password=SPRAYED, **kwargs):
        return actor.client.post("/login", data={"csrf_token": token, "email": email, "password": password},
                                 **kwargs)

    for i in range(limit):
        email = ("alice@example.com", "bob@example.com")[i] if i < 2 else f"user{i}@example.com"
        r = attempt(email)
        assert r.status_code == 200 and "Incorrect email address or password." in r.get_data(as_text=True)
    assert _counted(app, "failed-sign-ins") == limit
    calls = _hashing(monkeypatch)
    r = attempt("carol@example.com", PASSWORD)
    assert r.status_code == 429
    assert ("Too many failed sign-ins from your network. Try again in 60 minutes, or from a browser you have "
            "signed in with before.") in r.get_data(as_text=True)
    assert calls == [] and not signed_in(actor.client)
    carol = user_row(app, "carol@example.com")
    assert (carol.password_failures, carol.password_locked_until) == (0, None)
    with app.app_context():
        assert SignInChallenge.select().count() == 0
    assert _counted(app, "failed-sign-ins") == limit  # a refusal is not counted: the hour does not grow
    assert _limit_records(app) == [
        ("127.0.0.1", {"limit": "failed-sign-ins", "network": "127.0.0.1", "per_hour": limit})]

    assert attempt("carol@example.com", PASSWORD, **_from("198.51.100.7")).status_code == 302  # another network
    clock.advance(3600)
    assert actor.password_step("bob@example.com").status_code == 302


def test_attempts_during_a_back_off_neither_lengthen_it_nor_escape_the_network_limit(app, actor, clock,
                                                                                   monkeypatch):
    """security.md 18 and H (lockout denial of service): passwords sent while the account waits out a pause
    are refused with 429 and recorded, but do not make its wait longer. Counted, twenty of them in the
    first seconds of pauses locked the account for a day, where a stranger's honest guesses take a day and a
    half to get there (the request-facing security review). They count against the client's network
    instead: without that, anyone who knows an address could send them without end, each with an argon2
    hash and an audit record. They are refused before any hash."""
    app.config["FAILED_SIGNINS_PER_HOUR"] = 10
    actor.user()
    assert actor.password_step(password="guess").status_code == 200  # a pause of 1 s
    calls = _hashing(monkeypatch)
    for _ in range(8):
        r = actor.password_step(password="guess")
        assert r.status_code == 429 and "Too many failed attempts. Try again in 1 second." in r.get_data(as_text=True)
    assert calls == []  # refused before the hash
    row = user_row(app)
    assert (row.password_failures, row.password_locked_until) == (1, utc(clock.t) + timedelta(seconds=1))
    assert kinds(app).count("password_throttled") == 8
    assert _counted(app, "failed-sign-ins") == 9
    # The tenth attempt from the network fills its hour: then the network is refused, and nothing is recorded.
    assert actor.password_step(password="guess").status_code == 429
    assert _counted(app, "failed-sign-ins") == 10
    recorded = len(kinds(app))
    r = actor.password_step(password="guess")
    assert r.status_code == 429 and "Too many failed sign-ins from your network" in r.get_data(as_text=True)
    assert len(kinds(app)) == recorded
    # The owner, from another network, once the one pause is over: signed in.
    clock.advance(1)
    r = actor.post_form("/login", {"email": "alice@example.com", "password": PASSWORD}, **_from("198.51.100.7"))
    assert r.status_code == 302


@pytest.mark.parametrize("value", [250, 0])
def test_the_operator_moves_the_failed_sign_in_limit_or_turns_it_off(app, actor, value):
    """security.md 18: many people behind one address (an office's or a carrier's NAT) share one count, and a
    stranger among them can use it up for everyone signing in from a new browser. FAILED_SIGNINS_PER_HOUR
    moves the limit (test_accounts: read from the environment); 0 turns it off: nothing is counted, nothing
    refused."""
    app.config["FAILED_SIGNINS_PER_HOUR"] = value
    actor.user()
    for i in range(101):
        assert actor.password_step(f"user{i}@example.com", SPRAYED).status_code == 200
    assert actor.password_step().status_code == 302  # the 102nd, past the default of 100
    assert _counted(app, "failed-sign-ins") == (101 if value else 0)


@pytest.mark.parametrize("seen, network", [("203.0.113.7:51234", "203.0.113.7"),
                                           ("[2001:db8:1:2::7]:443", "2001:db8:1:2::/64")])
def test_an_address_written_with_its_port_counts_as_its_network(app, actor, seen, network):
    """security.md 18: some proxies write the client's port with its address; counted as written, every
    connection would have been a network of its own and no limit would ever hold."""
    app.config["FAILED_SIGNINS_PER_HOUR"] = 2
    actor.user()
    token = actor.csrf()

    def attempt(seen_as, email="nobody@example.com", password=SPRAYED):
        return actor.client.post("/login", data={"csrf_token": token, "email": email, "password": password},
                                 **_from(seen_as))

    host = seen.rpartition(":")[0]
    for other_port in ("1111", "2222"):
        assert attempt(f"{host}:{other_port}").status_code == 200
    assert _counted(app, "failed-sign-ins", network) == 2
    assert attempt(seen, "alice@example.com", PASSWORD).status_code == 429


def test_over_the_network_limit_every_address_gets_the_same_answer(app, actor, clock):
    """security.md 18: the refusal tells nothing about the address typed. An account with its right password,
    the same with a wrong one, and an address without an account get the same status and the same page (but
    for the address it shows back)."""
    app.config["FAILED_SIGNINS_PER_HOUR"] = 3
    actor.user()
    for i in range(3):
        actor.password_step(f"user{i}@example.com", SPRAYED)
    answers = set()
    for email, password in (("alice@example.com", PASSWORD), ("alice@example.com", SPRAYED),
                            ("nobody@example.com", SPRAYED)):
        r = actor.password_step(email, password)
        answers.add((r.status_code, r.get_data(as_text=True).replace(email, "EMAIL")))
    [(status, page)] = answers
    assert status == 429 and "Too many failed sign-ins from your network" in page
    assert user_row(app).password_failures == 0


def test_right_passwords_neither_count_nor_reset_the_networks_count(app, actor, clock, monkeypatch):
    """security.md 19, applied to the network's count: only failures count, so an office's people signing in
    at 9 am use up nothing; and no success resets it, or one account's right password between guesses
    would let a sprayer go on for ever. The right password pays no statement of its own for the limit: it is
    read with the account."""
    from webapp.db import db

    from .conftest import Actor

    limit = app.config["FAILED_SIGNINS_PER_HOUR"]
    actor.user()
    for i in range(limit - 1):
        actor.password_step(f"user{i}@example.com", SPRAYED)
    statements = []
    original = db.obj.execute_sql
    monkeypatch.setattr(db.obj, "execute_sql", lambda sql, params=None: statements.append(sql) or
                        original(sql, params))
    for _ in range(5):  # five colleagues behind the same address, each in a browser of their own
        colleague = Actor(app, app.test_client(), clock)
        assert colleague.password_step().status_code == 302
    monkeypatch.undo()
    assert _counted(app, "failed-sign-ins") == limit - 1
    own = [s for s in statements if '"networkcounter"' in s and not s.startswith('SELECT "t1"."id", "t1"."email"')]
    assert own == [] and any('"networkcounter"' in s for s in statements)
    actor.password_step("alice@example.com", SPRAYED)  # the hundredth failure
    r = Actor(app, app.test_client(), clock).password_step()
    assert r.status_code == 429 and "Too many failed sign-ins from your network" in r.get_data(as_text=True)


def test_a_browser_known_for_the_account_is_not_held_by_its_networks_limit(app, actor, clock):
    """security.md 18: behind one office address, an attacker's failures must not lock out a colleague at
    their usual browser. A browser known for the account it types passes its network's limit and meets its
    own throttle instead (its failures count there, not against the network). The same browser typing
    another account is held like any other (one browser, one account), and so is a new browser."""
    from .conftest import Actor

    app.config["FAILED_SIGNINS_PER_HOUR"] = 5
    actor.user()
    actor.user("bob@example.com")
    assert actor.password_step().status_code == 302  # alice's usual browser
    _log_out(actor)
    attacker = Actor(app, app.test_client(), clock)
    for i in range(5):
        attacker.password_step(f"user{i}@example.com", SPRAYED)
    assert Actor(app, app.test_client(), clock).password_step().status_code == 429  # alice, in a new browser
    assert actor.password_step("bob@example.com").status_code == 429
    r = actor.password_step(password="typo")
    assert r.status_code == 200 and "Incorrect email address or password." in r.get_data(as_text=True)
    assert _counted(app, "failed-sign-ins") == 5
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "password_rejected",
                                         AuditEvent.detail.contains("known browser")).count() == 1
    clock.advance(1)  # the browser's own pause after its typo
    assert actor.password_step().status_code == 302 and signed_in(actor.client)


def test_a_password_refused_by_a_known_browsers_own_pause_is_not_counted_against_its_network(app, actor, clock):
    """security.md 18: a browser known for the account meets its own throttle, not its network's limit. A
    password it sends during its own pause is refused with 429 and recorded, and counts against nothing
    else: counted against the network, the owner's retries at their usual browser would use up the hour of
    everyone behind the office's address."""
    actor.user()
    assert actor.password_step().status_code == 302  # alice's usual browser
    _log_out(actor)
    assert actor.password_step(password="typo").status_code == 200  # the browser's own pause of 1 s
    r = actor.password_step()
    assert r.status_code == 429 and "Too many failed attempts" in r.get_data(as_text=True)
    assert kinds(app).count("password_throttled") == 1
    assert _counted(app, "failed-sign-ins") == 0

def test_the_purge_deletes_network_counters_whose_hour_is_over(app, actor, clock):
    """A counter row (with its network) stays only as long as its hour: the purge deletes it then, and the
    next failure from that network starts a new hour."""
    from webapp.clock import now
    from webapp.models import NetworkCounter, purge_expired

    actor.user()
    actor.post_form("/login", {"email": "nobody@example.com", "password": SPRAYED}, **_from("198.51.100.7"))
    clock.advance(1800)
    actor.password_step("nobody@example.com", SPRAYED)  # from 127.0.0.1, half an hour later
    clock.advance(1800)
    with app.app_context():
        assert purge_expired(app.config, now()) == (0, 0, 0, 0, 1, 0)
        assert [row.network for row in NetworkCounter.select()] == ["127.0.0.1"]


# ------------------------------------------------------------------ per-network limits: the operator's commands

def _networks(app, *args):
    result = app.test_cli_runner().invoke(args=["networks", *args])
    return result.exit_code, result.output


def _count(app, clock, purpose, network, hits, minutes_ago=0):
    from webapp.models import NetworkCounter

    with app.app_context():
        NetworkCounter.create(purpose=purpose, network=network, hits=hits,
                              window_start=utc(clock.t) - timedelta(minutes=minutes_ago))


def test_the_operator_lets_a_full_network_in_again_at_once(app, actor, clock, monkeypatch):
    """An office behind one address whose count a stranger's wrong passwords filled: `networks list` shows
    it full and until when, `networks clear ADDRESS` deletes its count (audited, security.md 43), and a
    colleague's right password signs in at once instead of waiting for the end of the hour. Another
    network's count stays."""
    monkeypatch.setitem(app.config, "FAILED_SIGNINS_PER_HOUR", 3)
    actor.user()
    office = _from("203.0.113.7")
    for _ in range(3):
        actor.post_form("/login", {"email": "nobody@example.com", "password": SPRAYED}, **office)
    actor.post_form("/login", {"email": "nobody@example.com", "password": SPRAYED}, **_from("198.51.100.9"))
    assert actor.post_form("/login", {"email": "alice@example.com", "password": PASSWORD}, **office).status_code == 429

    code, output = _networks(app, "list")
    assert code == 0
    assert output.splitlines() == [
        f"203.0.113.7  failed-sign-ins  3 of 3  full: refused until {utc(clock.t) + timedelta(hours=1):%Y-%m-%d %H:%M:%S} UTC",
        f"198.51.100.9  failed-sign-ins  1 of 3  2 left until {utc(clock.t) + timedelta(hours=1):%Y-%m-%d %H:%M:%S} UTC"]

    code, output = _networks(app, "clear", " 203.0.113.7 ")
    assert (code, output) == (0, "cleared 203.0.113.7  failed-sign-ins  (3 counted)\n")
    assert _counted(app, "failed-sign-ins", "203.0.113.7") == 0
    assert _counted(app, "failed-sign-ins", "198.51.100.9") == 1
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "network_count_cleared")
        assert (event.user, event.details) == (None, {"via": "cli", "limit": "failed-sign-ins",
                                                      "network": "203.0.113.7", "hits": 3})
    r = actor.post_form("/login", {"email": "alice@example.com", "password": PASSWORD}, **office)
    assert (r.status_code, r.headers["Location"]) == (302, "/settings")


def test_clearing_an_ipv6_address_takes_its_64_and_48_and_can_keep_to_one_limit(app, clock):
    """An IPv6 client is counted by its /64 (sign-ups, wrong passwords) and its /48 (contact requests): the
    address names both, --limit keeps to one of them, and a network typed as `networks list` shows it
    works too. Other networks, and counts whose hour is over (from the instant it ends, as the limits take
    it), are left alone: neither listed nor cleared."""
    _count(app, clock, "failed-sign-ins", "2001:db8:1:2::/64", 40)
    _count(app, clock, "sign-ups", "2001:db8:1:2::/64", 10)
    _count(app, clock, "contact-48", "2001:db8:1::/48", 30)
    _count(app, clock, "failed-sign-ins", "2001:db8:1:3::/64", 5)  # the same /48, another /64
    _count(app, clock, "contact-48", "2001:db8:2::/48", 30, minutes_ago=60)  # its hour ends this instant

    code, output = _networks(app, "clear", "2001:db8:1:2::5", "--limit", "contact-48")
    assert (code, output) == (0, "cleared 2001:db8:1::/48  contact-48  (30 counted)\n")
    code, output = _networks(app, "clear", "2001:DB8:1:2:0:0:0:9")
    assert code == 0 and output.splitlines() == ["cleared 2001:db8:1:2::/64  failed-sign-ins  (40 counted)",
                                                 "cleared 2001:db8:1:2::/64  sign-ups  (10 counted)"]
    assert _counted(app, "failed-sign-ins", "2001:db8:1:3::/64") == 5
    assert _networks(app, "clear", "2001:db8:1:3:ffff::/64") == (0, "cleared 2001:db8:1:3::/64  failed-sign-ins  "
                                                                    "(5 counted)\n")
    # One address written as a network (/128, /32) is that address (a review: it said nothing was counted)
    _count(app, clock, "failed-sign-ins", "2001:db8:1:4::/64", 3)
    _count(app, clock, "failed-sign-ins", "192.0.2.8", 2)
    assert _networks(app, "clear", "2001:db8:1:4::5/128") == (0, "cleared 2001:db8:1:4::/64  failed-sign-ins  "
                                                                 "(3 counted)\n")
    assert _networks(app, "clear", "192.0.2.8/32") == (0, "cleared 192.0.2.8  failed-sign-ins  (2 counted)\n")
    assert _networks(app, "list") == (0, "no network has been counted in the last hour\n")
    assert _networks(app, "clear", "2001:db8:2::1") == (
        0, "nothing counted this hour for 2001:db8:2::/48, 2001:db8:2::/64; nothing changed\n")
    assert _counted(app, "contact-48", "2001:db8:2::/48") == 30  # left to the purge
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "network_count_cleared").count() == 6


def test_clearing_a_network_takes_every_count_within_it(app, clock):
    """An office's /24 or a site's /48, typed as a network: each IPv4 address counted in it goes, and the /48
    with its /64s; addresses just outside, the other IP version and a proxy's odd header stay."""
    _count(app, clock, "failed-sign-ins", "203.0.113.7", 40)
    _count(app, clock, "sign-ups", "203.0.113.200", 3)
    _count(app, clock, "failed-sign-ins", "203.0.114.1", 9)  # the next /24
    _count(app, clock, "failed-sign-ins", "unknown", 2)  # a proxy's header that is no address, counted as it came
    _count(app, clock, "failed-sign-ins", "2001:db8:1:2::/64", 5)
    _count(app, clock, "contact-48", "2001:db8:1::/48", 30)
    _count(app, clock, "failed-sign-ins", "2001:db8:2::/64", 6)  # another /48

    code, output = _networks(app, "clear", "203.0.113.0/24")
    assert code == 0 and output.splitlines() == ["cleared 203.0.113.7  failed-sign-ins  (40 counted)",
                                                 "cleared 203.0.113.200  sign-ups  (3 counted)"]
    assert _networks(app, "clear", "2001:db8:1::/48", "--limit", "failed-sign-ins") == (
        0, "cleared 2001:db8:1:2::/64  failed-sign-ins  (5 counted)\n")
    assert _networks(app, "clear", "2001:db8:1:0:1::/48") == (0, "cleared 2001:db8:1::/48  contact-48  (30 counted)\n")
    assert _networks(app, "clear", "198.51.100.0/24") == (
        0, "nothing counted this hour within 198.51.100.0/24; nothing changed\n")
    assert _networks(app, "clear", "::/0") == (0, "cleared 2001:db8:2::/64  failed-sign-ins  (6 counted)\n")
    assert _counted(app, "failed-sign-ins", "203.0.114.1") == 9
    assert _counted(app, "failed-sign-ins", "unknown") == 2
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "network_count_cleared").count() == 5


def test_a_client_address_that_is_no_address_can_be_cleared_as_the_list_shows_it(app, actor, clock, monkeypatch):
    """A proxy that sends "unknown" as the client address makes every visitor one client, counted under that
    text: `networks list` shows it, and `networks clear unknown` must let them all in again (it was refused as
    no IP address, and the whole site waited for the end of the hour)."""
    monkeypatch.setitem(app.config, "FAILED_SIGNINS_PER_HOUR", 2)
    actor.user()
    for _ in range(2):
        actor.post_form("/login", {"email": "nobody@example.com", "password": SPRAYED}, **_from("unknown"))
    assert actor.post_form("/login", {"email": "alice@example.com", "password": PASSWORD},
                           **_from("unknown")).status_code == 429
    assert _networks(app, "list")[1].startswith("unknown  failed-sign-ins  2 of 2  full")

    assert _networks(app, "clear", "unknown", "--limit", "sign-ups") == (
        0, "nothing counted this hour under sign-ups for unknown; nothing changed\n")  # under another limit
    assert _networks(app, "clear", " unknown ") == (0, "cleared unknown  failed-sign-ins  (2 counted)\n")
    assert _counted(app, "failed-sign-ins", "unknown") == 0
    r = actor.post_form("/login", {"email": "alice@example.com", "password": PASSWORD}, **_from("unknown"))
    assert (r.status_code, r.headers["Location"]) == (302, "/settings")


def test_networks_list_says_when_a_limit_was_turned_off_after_it_counted(app, clock, monkeypatch):
    """A limit turned off (set to 0) within the hour no longer refuses anyone: `networks list` says so of
    what it counted before, instead of calling the network full."""
    _count(app, clock, "sign-ups", "198.51.100.9", 4)
    monkeypatch.setitem(app.config, "SIGNUPS_PER_HOUR", 0)
    assert _networks(app, "list") == (0, "198.51.100.9  sign-ups  4 of -  limit turned off\n")


@pytest.mark.parametrize("address, message", [
    ("203.0.113.7", "nothing counted this hour for 203.0.113.7; nothing changed"),
    ("office printer", "'office printer' is not an IP address or network (203.0.113.7, 2001:db8:1:2::/64), nor "
                       "anything else `networks list` shows this hour"),
    ("10.0.0.300", "'10.0.0.300' is not an IP address or network"),
])
def test_clearing_a_network_with_nothing_counted_or_no_address_changes_nothing(app, clock, address, message):
    """Bad input gets a clear message and changes nothing: no row goes and nothing is audited."""
    _count(app, clock, "sign-ups", "198.51.100.9", 4)
    code, output = _networks(app, "clear", address)
    assert message in output and code == (0 if "nothing changed" in message else 2)
    assert _counted(app, "sign-ups", "198.51.100.9") == 4
    with app.app_context():
        assert not AuditEvent.select().where(AuditEvent.kind == "network_count_cleared").exists()


def test_wrong_codes_sent_at_once_to_one_code_step_meet_its_limit_of_five(app, actor, secret, clock, monkeypatch):
    """security.md 18, 20: a code step is dropped at its fifth wrong code, counted as stored when it is
    decided. Wrong codes sent at once (two tabs, a script replaying the cookie) each read the count before
    their transaction: here four others are counted while this one is checked, so this one is the fifth. It
    survived, and a sixth code (the right one) signed in on it (a race review)."""
    import webapp.auth as auth

    actor.user(secret=secret)
    assert actor.password_step().headers["Location"].endswith("/login/verify")
    real = auth.code_matches
    done = []

    def meanwhile(user, code):
        if not done:  # four other wrong codes of this code step, committed while this one is checked
            done.append(1)
            SignInChallenge.update(failures=SignInChallenge.failures + 4).execute()
        return real(user, code)

    monkeypatch.setattr(auth, "code_matches", meanwhile)
    wrong = next(c for c in ("123456", "654321") if c not in {actor.code(secret, k) for k in (-1, 0, 1)})
    r = actor.code_step(wrong)
    assert r.status_code == 302 and r.headers["Location"] == "/login"  # too many: sign in again
    with app.app_context():
        assert SignInChallenge.select().count() == 0
    clock.advance(31)
    r = actor.post_form("/login/verify", {"code": actor.code(secret)}, form_url="/login")
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    assert actor.client.get("/settings").status_code == 302  # nobody signed in


def test_a_wrong_password_in_flight_when_its_browser_is_forgotten_counts_on_the_account(app, actor, clock, monkeypatch):
    """A review of forgotten browsers: a browser forgotten (Change password, Sign out everywhere else, support's
    disable, ...) keeps its row for the contact form. A wrong password typed in it while the forget committed
    (during the hash, which runs outside any transaction) was counted on that row, as if the browser were
    still known: the account's count, its lock and the network's count missed it, and the record said
    "counted in: known browser" (security.md 18, 20). It counts on the account now, as before the rows were
    kept; and the browser, known again after a full sign-in, starts with no count of its own."""
    import webapp.auth as auth_module
    from webapp.db import write_transaction
    from webapp.models import KnownBrowser, NetworkCounter
    from webapp.security import forget_browsers

    actor.user()
    assert actor.password_step().status_code == 302
    _log_out(actor)
    browser = token_hash(actor.client.get_cookie("twostep_known").value)
    real = auth_module.verify_password

    def verify_then_the_owner_forgets(stored, password):
        result = real(stored, password)
        with write_transaction():  # the owner's Sign out everywhere else, committed meanwhile
            forget_browsers(User.by_email("alice@example.com"))
        return result

    monkeypatch.setattr(auth_module, "verify_password", verify_then_the_owner_forgets)
    assert actor.password_step(password="a guess").status_code == 200
    monkeypatch.setattr(auth_module, "verify_password", real)
    with app.app_context():
        row = KnownBrowser.get_by_id(browser)
        assert row.forgotten_at is not None and row.password_failures == 0 and row.password_locked_until is None
        assert user_row(app).password_failures == 1
        assert "counted_in" not in AuditEvent.get(AuditEvent.kind == "password_rejected").details
        assert {c.purpose: c.hits for c in NetworkCounter.select()}.get("failed-sign-ins") == 1
        KnownBrowser.update(password_failures=3).where(KnownBrowser.id == browser).execute()  # however it came
    clock.advance(5)
    assert actor.password_step().headers["Location"] == "/settings"  # a full sign-in: known again
    with app.app_context():
        row = KnownBrowser.get_by_id(browser)
        assert (row.forgotten_at, row.password_failures, row.password_locked_until) == (None, 0, None)


def test_a_browser_the_owner_signed_out_reads_as_new_when_it_signs_in_again(app, actor, clock):
    """A review of forgotten browsers: a lost laptop's browser, signed out by the owner's "Sign out everywhere
    else", signed in again an hour later and its record read like any of the owner's usual sign-ins: it was
    made known again, as old as it was. Its sign-in is told as new to the account, what the owner must notice;
    the browser is known again all the same (security.md 43)."""
    from webapp.models import KnownBrowser

    from .test_contact import _browser_at

    actor.user()
    assert actor.password_step().headers["Location"] == "/settings"  # the laptop
    laptop = token_hash(actor.client.get_cookie("twostep_known").value)
    clock.advance(60)
    owner = _browser_at(app, clock, "198.51.100.8")
    assert owner.password_step().headers["Location"] == "/settings"
    assert owner.post_form("/settings/sessions/end-others", {}, form_url="/settings").status_code == 302
    clock.advance(3600)
    assert actor.password_step().headers["Location"] == "/settings"  # from the signed-out laptop
    assert _new_browser_signins(app) == [True, True, True]
    with app.app_context():
        assert KnownBrowser.get_by_id(laptop).forgotten_at is None  # known again, the same row
    clock.advance(60)
    _log_out(actor)
    assert actor.password_step().headers["Location"] == "/settings"
    assert _new_browser_signins(app)[-1] is None  # and from then on as known


def _new_browser_signins(app):
    """The new_browser detail of each sign-in's record, oldest first."""
    with app.app_context():
        return [e.details.get("new_browser") for e in AuditEvent.select().where(AuditEvent.kind == "signin")
                .order_by(AuditEvent.id)]
