"""Checklist items that cut across features (guides/security.md): each test names its item number.

The per-feature tests live next to their feature (test_auth, test_wizard, test_devices, test_support, ...);
these walk every route, every authentication path or every step of the journey at once.
"""
import ast
import base64
import inspect
import json
import logging
import re

import pyotp
import pytest
from cryptography.fernet import Fernet

from webapp import auth as auth_module
from webapp import create_app
from webapp.db import db
from webapp.models import AuditEvent, Device, PendingEnrolment, ServerSession, User
from webapp.sessions import token_hash
from webapp.totp import group_key

from .conftest import PASSWORD, Actor
from .test_wizard import HX, Wizard, otpauth_of

ADMIN = "boss@example.com"


def text(response):
    return response.get_data(as_text=True)


def signed_in(client):
    r = client.get("/settings")
    return r.status_code == 200 and "User Settings" in text(r)


def other(actor):
    """Another browser with its own cookie jar."""
    return Actor(actor.app, actor.app.test_client(), actor.clock)


def audit_rows(app):
    with app.app_context():
        return list(AuditEvent.select().order_by(AuditEvent.id))


def kinds(app, user=None):
    return [e.kind for e in audit_rows(app) if user is None or e.user_id == user.id]


# ---------------------------------------------------------------- security.md 9, 32: freshness

def test_stale_post_to_start_the_wizard_comes_back_to_the_wizard(actor, app, secret):
    """security.md 9: a non-fresh POST to start (re-)enrolment goes to /reauth and, after password and code,
    back to the wizard's page (not User Settings); nothing was started meanwhile."""
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    token = actor.csrf("/settings")
    r = actor.client.post("/settings/2fa/start", data={"csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"] == "/reauth?next=/settings/2fa"
    r = actor.client.post("/settings/2fa/start", data={"csrf_token": token}, headers=HX)
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/reauth?next=/settings/2fa"
    with app.app_context():
        assert PendingEnrolment.select().where(PendingEnrolment.user == user.id).count() == 0
    r = actor.post_form("/reauth?next=/settings/2fa", {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == "/settings/2fa"
    page = text(actor.client.get(r.headers["Location"]))
    assert 'data-step="intro"' in page


@pytest.mark.parametrize("htmx", [True, False])
def test_every_wizard_step_with_a_pending_key_needs_a_fresh_sign_in(actor, app, secret, htmx):
    """security.md 9: a pending key lives 15 minutes, the freshness window 10. A session that is no longer
    fresh (someone else holding it, say) can neither read the key nor confirm it nor make it a device: each
    step sends it to /reauth first. Afterwards a page comes back to itself, a form to its step's page, with
    the same key."""
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    w = Wizard(actor, htmx=htmx)
    w.start()
    with app.app_context():
        pending = PendingEnrolment.get(PendingEnrolment.user == user.id)
    key = pyotp.TOTP(pyotp.random_base32())  # what the stale session would try; it never sees the real key
    actor.clock.advance(11 * 60)
    for method, path, data, back in [("GET", "/settings/2fa/qr", None, "/settings/2fa/qr"),
                                     ("GET", "/settings/2fa/code", None, "/settings/2fa/code"),
                                     ("POST", "/settings/2fa/code", {"code": key.now()}, "/settings/2fa/code"),
                                     ("GET", "/settings/2fa/name", None, "/settings/2fa/name"),
                                     ("POST", "/settings/2fa/complete", {"name": "Their phone"},
                                      "/settings/2fa/name")]:
        r = actor.client.open(path, method=method, headers=HX if htmx else {},
                              data={"csrf_token": w.csrf(), **data} if data else None)
        where = r.headers.get("HX-Redirect") if htmx else r.headers.get("Location")
        assert (r.status_code, where) == ((401 if htmx else 302), f"/reauth?next={back}"), (method, path)
        assert "otpauth" not in text(r) and pending.secret_enc not in text(r)
    with app.app_context():
        still = PendingEnrolment.get(PendingEnrolment.user == user.id)
        assert (still.id, still.verified_step, still.failures) == (pending.id, None, 0)
        assert [d.name for d in Device.select().where(Device.user == user.id)] == ["Phone"]
    r = actor.post_form("/reauth?next=/settings/2fa/code", {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == "/settings/2fa/code"
    assert 'data-step="code"' in text(actor.client.get("/settings/2fa/code"))  # back on the step, to type again
    assert 'data-step="name"' in text(w.submit_code())  # the same key, scanned before, still works
    assert "Continue with" in text(actor.client.get("/settings/2fa"))  # the gear offers it too


def test_stale_post_without_a_known_page_uses_only_a_same_site_referer(actor, app, secret):
    """security.md 9, 29: a stale POST's way back is a same-site path or nothing, never another site."""
    from webapp.security import _reauth_next

    with app.test_request_context("/x", method="POST", headers={"Referer": "https://evil.example/settings"}):
        assert _reauth_next(None) is None
    with app.test_request_context("/x", method="POST", headers={"Referer": "http://localhost/settings"}):
        assert _reauth_next(None) == "/settings"
    with app.test_request_context("/x", method="POST"):
        assert _reauth_next(None) is None


@pytest.mark.parametrize("action", ["disable", "remove"])
def test_stale_session_cannot_turn_2fa_off_or_remove_a_device(actor, app, secret, action):
    """security.md 32: even with the right password and code, a session that is not fresh goes to /reauth
    first and nothing changes; a fresh one succeeds."""
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    with app.app_context():
        device = Device.get(Device.user == user.id)
    if action == "disable":
        url, data = "/settings/2fa/disable", {"off-password": PASSWORD, "off-code": actor.code(secret)}
    else:
        url, data = (f"/settings/devices/{device.id}/remove",
                     {f"remove-{device.id}-code": actor.code(secret), f"remove-{device.id}-confirm_off": "y",
                      f"remove-{device.id}-password": PASSWORD})
    r = actor.post_form(url, data, form_url="/settings")
    assert r.status_code == 302 and r.headers["Location"] == "/reauth?next=/settings"
    with app.app_context():
        assert Device.select().where(Device.user == user.id).count() == 1
    r = actor.post_form("/reauth?next=/settings", {"password": PASSWORD, "code": actor.code(secret)})
    assert r.headers["Location"] == "/settings"
    actor.clock.advance(30)
    data = {k: (actor.code(secret) if k.endswith("code") else v) for k, v in data.items()}
    r = actor.post_form(url, data, form_url="/settings")
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    with app.app_context():
        assert Device.select().where(Device.user == user.id).count() == 0


def test_an_error_page_under_static_is_not_stored(actor, secret):
    """security.md 12: a missing file under /static/ gets the error page with the layout (the person's address,
    a CSRF token): it is sent no-store like every page (an infrastructure review: the static files' caching
    applied to it). The files themselves may be cached."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    missing = actor.client.get("/static/nope.css")
    assert missing.status_code == 404 and "alice@example.com" in missing.get_data(as_text=True)
    assert missing.headers.get("Cache-Control") == "no-store"
    css = actor.client.get("/static/app.css")
    css.close()  # a file response: the test client leaves it open otherwise
    assert css.status_code == 200 and css.headers.get("Cache-Control") != "no-store"


def test_pending_session_cannot_turn_2fa_off(actor, app, secret):
    """security.md 32: the password step alone (pending state) cannot reach the disable action."""
    user = actor.user(secret=secret)
    actor.password_step()
    r = actor.post_form("/settings/2fa/disable", {"off-password": PASSWORD, "off-code": actor.code(secret)},
                        form_url="/login/verify")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    with app.app_context():
        assert Device.select().where(Device.user == user.id).count() == 1


# ---------------------------------------------------------------- security.md 12: setup and confirm headers

def _assert_private(r, where):
    assert r.headers.get("Cache-Control") == "no-store", where
    assert r.headers.get("Referrer-Policy") == "no-referrer", where
    assert r.headers.get("X-Frame-Options") == "DENY", where
    assert "frame-ancestors 'none'" in r.headers.get("Content-Security-Policy", ""), where


@pytest.mark.parametrize("htmx", [False, True])
def test_setup_and_confirm_routes_send_no_store_no_referrer_and_no_framing(actor, app, htmx):
    """security.md 12: GET and POST of the setup routes (gear, start, QR) and the confirm routes (code,
    complete), successes and refusals alike, with and without htmx."""
    actor.user()
    actor.sign_in()
    w = Wizard(actor, htmx=htmx)
    seen = [("GET gear", w.open()), ("POST start", w.start()),
            ("GET qr", actor.client.get("/settings/2fa/qr", headers=w.headers)),
            ("GET code", w.code_step()),
            ("POST code malformed", w.submit_code("12")),
            ("POST code wrong", w.submit_code("000000" if w.code_now() != "000000" else "111111")),
            ("POST complete early", w.complete()),
            ("POST code right", w.submit_code()),
            ("POST complete bad name", w.complete("")),
            ("POST complete", w.complete()),
            ("POST start no csrf", actor.client.post("/settings/2fa/start", data={}, headers=w.headers))]
    actor.clock.advance(11 * 60)  # a stale sign-in: "Confirm it's you" asks (a fresh one goes straight on)
    seen += [("GET reauth", actor.client.get("/reauth")),
             ("POST reauth wrong", actor.post_form("/reauth", {"password": "nope"}))]
    statuses = {name: r.status_code for name, r in seen}
    assert statuses["POST start no csrf"] == 400
    for name, r in seen:
        _assert_private(r, name)


# ---------------------------------------------------------------- security.md 13: 2FA changes are recorded

def test_every_2fa_change_writes_exactly_one_audit_event_without_secrets(actor, app, secret, clock):
    """security.md 13 (recorded part; out-of-band mail comes in a later issue): turning 2FA on, adding a
    device (the secret changes), removing one, turning it off, and support's reset each write exactly one
    event for the person, and none holds a secret or a code."""
    from .test_support import disable as support_disable, sign_in_admin

    user = actor.user()
    actor.sign_in()
    w = Wizard(actor)
    w.run("Phone")
    first_secret, first_code = w.secret, w.code_now()
    clock.advance(30)
    w2 = Wizard(actor)
    w2.run("Tablet")
    clock.advance(30)
    with app.app_context():
        tablet = Device.get((Device.user == user.id) & (Device.name == "Tablet"))
    actor.post_form(f"/settings/devices/{tablet.id}/remove", {f"remove-{tablet.id}-code": w2.code_now()},
                    form_url="/settings")
    clock.advance(30)
    actor.post_form("/settings/2fa/disable", {"off-password": PASSWORD, "off-code": pyotp.TOTP(first_secret).at(clock.t)},
                    form_url="/settings")
    mine = kinds(app, user)
    for kind in ("tfa_enabled", "device_added", "device_removed", "tfa_disabled"):
        assert mine.count(kind) == 1, (kind, mine)
    # Support's reset of someone else.
    carol_secret = pyotp.random_base32()
    carol = actor.user("carol@example.com", secret=carol_secret)
    admin = other(actor)
    sign_in_admin(admin, pyotp.random_base32())
    assert support_disable(admin, carol).status_code in (200, 302)
    assert kinds(app, carol).count("support_tfa_disabled") == 1
    everything = "\n".join(e.kind + e.detail for e in audit_rows(app))
    for needle in (first_secret, w2.secret, carol_secret, group_key(first_secret), first_code, "otpauth"):
        assert needle not in everything


# ---------------------------------------------------------------- security.md 19: lockout is recorded

def test_password_then_failed_codes_and_the_lockout_are_recorded(app, clock, secret):
    """security.md 19 (recorded part; notification later): a correct password followed by wrong codes, and
    the lockout, are audit events of that person; a success resets the counter."""
    Actor(app, app.test_client(), clock).user(secret=secret)
    for wait in (1, 2, 4, 8, 0):
        a = Actor(app, app.test_client(), clock)
        a.password_step()
        a.code_step("000000" if a.code(secret) != "000000" else "111111")
        clock.advance(wait)
    found = kinds(app)
    assert found.count("password_accepted") == 5
    assert found.count("code_rejected") >= 4 and "code_lockout" in found
    with app.app_context():
        assert User.get().code_failures == 5
    clock.advance(16 * 60)
    a = Actor(app, app.test_client(), clock)
    a.password_step()
    a.code_step(a.code(secret))
    with app.app_context():
        assert User.get().code_failures == 0


# ---------------------------------------------------------------- security.md 25: nothing in the session

# wizard_done: the id of the device this session's wizard just activated, only so that a second click on
# Complete Activation shows "done" again; it grants nothing (the device row decides) and says nothing secret.
# new_browser: this session's sign-in came from a browser new to the account, for the record of a device its
# wizard adds (auth.NEW_BROWSER); it grants nothing either.
# "refused": a refusal kept a minute for the page its 303 leads to (auth.refused_see_other): its words and status,
# never what was typed (the needles below).
SESSION_KEYS_ALLOWED = {"_user_id", "_fresh", "_id", "csrf_token", "auth_at", "challenge", "_flashes", "wizard_done",
                        "sign_in_email", "new_browser", "refused"}
FLAG_WORDS = re.compile(r"(?i)passed|verified|step|2fa|tfa|otp|mfa|secret|code|password|pending|enrol")


def _session_state(app, actor):
    """The cookie and the server-side row data of this browser."""
    cookie = actor.session_cookie()
    data = {}
    if cookie:
        with app.app_context():
            row = ServerSession.get_or_none(ServerSession.id == token_hash(cookie))
            data = row.load() if row else {}
    return cookie, data


def _assert_clean(app, actor, needles, where):
    cookie, data = _session_state(app, actor)
    if cookie:
        # An opaque 32-byte random token (marked "s." once signed in: sessions.SIGNED_IN_MARK): nothing to decode.
        assert re.fullmatch(r"(s\.)?[A-Za-z0-9_-]{43}", cookie), where
        raw = base64.urlsafe_b64decode(cookie.removeprefix("s.") + "=")
        assert len(raw) == 32, where
    blob = json.dumps(data)
    assert set(data) <= SESSION_KEYS_ALLOWED, (where, set(data))
    assert not any(FLAG_WORDS.search(k) for k in data), (where, list(data))
    for needle in needles:
        if not needle:
            continue
        variants = {needle, needle.lower(), base64.b64encode(needle.encode()).decode(),
                    base64.urlsafe_b64encode(needle.encode()).decode().rstrip("=")}
        for v in variants:
            assert v not in blob and v not in (cookie or ""), (where, "leaks", needle)


def test_no_password_secret_code_or_step_flag_in_cookie_or_session_after_any_step(actor, app, clock):
    """security.md 25: after every step (password, wrong code, code, each wizard step, reauth) the cookie is
    an opaque token and the server-side session data holds no password, secret, code or "step passed" flag."""
    actor.user()
    secrets_seen = [PASSWORD]
    check = lambda where: _assert_clean(app, actor, secrets_seen, where)  # noqa: E731
    actor.client.get("/login")
    check("login page")
    actor.password_step(password="wrong password")
    secrets_seen.append("wrong password")
    check("wrong password")
    clock.advance(2)
    actor.password_step()
    check("password (no 2FA)")
    w = Wizard(actor)
    w.open()
    check("wizard open")
    w.start()
    secrets_seen += [w.secret, group_key(w.secret)]
    check("wizard start")
    actor.client.get("/settings/2fa/qr")
    check("wizard qr")
    wrong = "000000" if w.code_now() != "000000" else "111111"
    w.submit_code(wrong)
    secrets_seen.append(wrong)
    check("wizard wrong code")
    code = w.code_now()
    w.submit_code(code)
    secrets_seen.append(code)
    check("wizard code")
    w.complete()
    check("wizard complete")
    actor.post_form("/logout", {}, form_url="/settings")
    check("logout")
    clock.advance(30)
    actor.password_step()
    check("password step (pending)")
    actor.code_step(wrong)
    check("wrong code")
    clock.advance(1)
    code = actor.code(w.secret)
    secrets_seen.append(code)
    actor.code_step(code)
    check("code step")
    clock.advance(11 * 60)  # a stale sign-in, so that "Confirm it's you" checks the code
    code = actor.code(w.secret)
    secrets_seen.append(code)
    actor.post_form("/reauth", {"password": PASSWORD, "code": code})
    check("reauth")


# ---------------------------------------------------------------- security.md 28: every way in

def test_only_the_known_views_can_sign_anybody_in():
    """security.md 28: login_user is called only by start_session; start_session only by complete_sign_in and
    the code step (which redirects after its transaction); complete_sign_in only by the password step (which
    checks for devices first, holding the person's row), sign-up and first-run. A new way in fails this test
    until it is reviewed for 2FA."""
    tree = ast.parse(inspect.getsource(auth_module))
    callers = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("login_user", "start_session",
                                                                                  "complete_sign_in"):
                    callers.setdefault(node.func.id, set()).add(fn.name)
    assert callers == {"login_user": {"start_session"}, "start_session": {"complete_sign_in", "verify"},
                       "complete_sign_in": {"after_password", "signup", "first_run"}}
    import pathlib

    import webapp

    for path in pathlib.Path(webapp.__file__).parent.glob("*.py"):
        if path.name != "auth.py":
            source = path.read_text()
            assert not {"login_user", "start_session", "complete_sign_in"} & set(re.findall(r"\w+", source)), path.name


def test_after_password_sends_an_enrolled_person_to_the_code_step(actor, app, secret):
    """security.md 28: the only password-only branch is for people without a device, checked again while the
    person's row is held."""
    source = inspect.getsource(auth_module.after_password)
    assert source.count("complete_sign_in(") == 1
    lock = source.index("user = for_update(User.select().where(User.id == user.id)).get()")
    check = source.index("if not user.has_2fa:", lock)
    assert lock < check < source.index("return complete_sign_in(user, next_url)")
    actor.user(secret=secret)
    r = actor.password_step()
    assert r.headers["Location"] == "/login/verify" and not signed_in(actor.client)


def test_a_device_activated_during_the_password_step_sends_it_to_the_code_step(actor, app, secret, monkeypatch):
    """security.md 28, 35: the password step read "no device" just before the person's setup completed in
    another browser (which ends their other sessions, but not one that is only being opened). Decided on that
    read, the password alone opened a session nobody ended, with 2FA on. It must be decided on the person
    as read holding their row, which the setup's completion holds too. Here every read of an object not
    loaded under that lock sees the stale "no device"; only the locked read sees the device."""
    import webapp.auth as auth_module
    from webapp.models import User as UserModel

    user = actor.user(secret=secret)
    real_has_2fa, real_for_update = UserModel.has_2fa, auth_module.for_update

    def tagging_for_update(query):
        locked = real_for_update(query)
        get = locked.get

        def get_and_tag(*args, **kwargs):
            row = get(*args, **kwargs)
            row.loaded_under_lock = True
            return row

        locked.get = get_and_tag
        return locked

    def stale_unless_locked(self):
        return real_has_2fa.fget(self) if getattr(self, "loaded_under_lock", False) else False

    monkeypatch.setattr(auth_module, "for_update", tagging_for_update)
    monkeypatch.setattr(UserModel, "has_2fa", property(stale_unless_locked))
    r = actor.password_step()
    assert r.headers["Location"] == "/login/verify" and not signed_in(actor.client)
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 0


def test_no_route_signs_in_an_enrolled_person_without_the_code(actor, app, secret):
    """security.md 28: walk app.url_map and send every route, GET and POST, everything a sign-in could want
    (email, password, setup code, a user id, an empty code): the enrolled person is never signed in, neither
    from a fresh browser nor from one that passed the password step."""
    user = actor.user(secret=secret, admin=True)
    fields = {"email": "alice@example.com", "password": PASSWORD, "confirm": PASSWORD,
              "setup_code": "setup-code-123", "user_id": str(user.id), "code": "", "remember": "1",
              "next": "/settings"}
    for pending in (False, True):
        for rule in app.url_map.iter_rules():
            if rule.endpoint == "static":
                continue
            url = rule.build({k: 1 for k in rule.arguments})[1] if rule.arguments else rule.rule
            for method in sorted(rule.methods & {"GET", "POST"}):
                browser = other(actor)
                if pending:
                    browser.password_step()
                token = browser.csrf("/login") if not pending else browser.csrf("/login/verify")
                if method == "GET":
                    r = browser.client.get(url, query_string=fields)
                else:
                    r = browser.client.post(url, data={"csrf_token": token, **fields})
                assert r.status_code < 500, (rule.endpoint, method, r.status_code)
                assert not signed_in(browser.client), (rule.endpoint, method, pending)
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 0
        assert "signin" not in [e.kind for e in AuditEvent.select()]


# ---------------------------------------------------------------- security.md 43: the whole journey's logs

ALL_EVENT_KINDS = ["account_created", "signin", "tfa_enrolment_started", "tfa_enrolment_code_accepted",
                   "tfa_enabled", "signout", "password_rejected", "password_accepted", "code_rejected",
                   "code_accepted", "totp_replay", "code_lockout", "reauthenticated",
                   "tfa_disabled", "support_tfa_disabled", "sessions_ended"]


def test_the_whole_journey_logs_every_event_and_no_secret(actor, app, clock, caplog):
    """security.md 43: sign-up, enrolment (start, confirm, activate), sign-in with wrong code, replay and
    lockout, re-authentication, turning 2FA off, and support's reset, all under DEBUG logging: every event
    type appears in the log; no secret, code, otpauth URI, QR data or password appears anywhere."""
    from .test_support import disable as support_disable, sign_in_admin

    caplog.set_level(logging.DEBUG)
    codes = set()
    # Sign-up (open once the instance has its first account) and enrolment.
    actor.user("first@example.com")
    bob = other(actor)
    bob.post_form("/signup", {"email": "bob@example.com", "password": PASSWORD, "confirm": PASSWORD})
    w = Wizard(bob)
    w.open()
    start = text(w.start())
    uri = otpauth_of(start)
    qr_data = re.search(r'class="qrline"[^>]*d="([^"]+)"', start).group(1)  # the QR modules themselves
    codes.add(w.code_now())
    w.submit_code()
    w.complete("Phone")
    bob.post_form("/logout", {}, form_url="/settings")
    # A wrong password, a wrong code, the right code, its replay elsewhere.
    clock.advance(30)
    bob.password_step("bob@example.com", password="not my password")
    clock.advance(2)
    bob.password_step("bob@example.com")
    bob.code_step("000000" if bob.code(w.secret) != "000000" else "111111")
    clock.advance(1)
    good = bob.code(w.secret)
    codes.add(good)
    bob.code_step(good)
    thief = other(actor)
    thief.password_step("bob@example.com")
    thief.code_step(good)
    # Lockout from more wrong codes.
    for wait in (2, 4, 8, 16):
        clock.advance(wait)
        t = other(actor)
        t.password_step("bob@example.com")
        t.code_step("000000" if t.code(w.secret) != "000000" else "111111")
    clock.advance(16 * 60)
    # A second browser of Bob's, so turning 2FA off ends a session; re-authentication; turning off.
    clock.advance(30)
    second = other(actor)
    second.password_step("bob@example.com")
    c = second.code(w.secret)
    codes.add(c)
    second.code_step(c)
    clock.advance(11 * 60)
    c = bob.code(w.secret)
    codes.add(c)
    bob.post_form("/reauth", {"password": PASSWORD, "code": c})
    clock.advance(30)
    c = bob.code(w.secret)
    codes.add(c)
    bob.post_form("/settings/2fa/disable", {"off-password": PASSWORD, "off-code": c}, form_url="/settings")
    # Support resets Carol.
    carol_secret = pyotp.random_base32()
    carol = actor.user("carol@example.com", secret=carol_secret)
    admin_secret = pyotp.random_base32()
    admin = other(actor)
    sign_in_admin(admin, admin_secret)
    codes.add(admin.code(admin_secret))
    support_disable(admin, carol)

    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("twostep", "werkzeug", "webapp")))
    everything = "\n".join(r.getMessage() for r in caplog.records) + "".join(str(r.args) for r in caplog.records)
    missing = [k for k in ALL_EVENT_KINDS if f"audit {k} " not in ours]
    assert not missing, missing
    for needle in (w.secret, w.secret.lower(), group_key(w.secret), carol_secret, admin_secret, uri,
                   "otpauth://", qr_data[:60], PASSWORD, "not my password"):
        assert needle not in everything, needle[:40]
    for code in codes:  # six digits can occur by chance in SQL timestamps, so only our own logs
        assert code not in ours, code


# ---------------------------------------------------------------- security.md 44: the proxy hop count

def _app(tmp_path, clock, **overrides):
    return create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "instance"),
                       "SECRET_KEY": "test-secret-key-" + "x" * 32,
                       "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                       "DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.db'}", "PASSWORD_HASH_PROFILE": "cheapest",
                       "CLOCK": clock, **overrides})


@pytest.mark.parametrize("hops, trusted, forwarded, expected", [
    (1, "10.0.0.0/8", "203.0.113.5", "203.0.113.5"),           # one proxy: its X-Forwarded-For names the client
    (1, "10.0.0.1", "6.6.6.6, 203.0.113.5", "203.0.113.5"),   # a client-forged first entry is not trusted
    (1, "127.0.0.1,::1", "203.0.113.5", "10.0.0.1"),          # the peer is no trusted proxy: header dropped
    (0, "10.0.0.1", "203.0.113.5", "10.0.0.1"),               # no proxy configured: the header is ignored
    (1, "*", "203.0.113.5", "203.0.113.5"),                   # "*": every peer is a proxy (as in gunicorn)
    (1, "", "203.0.113.5", "10.0.0.1"),                       # set but empty: no peer is
    (1, "10.0.0.1", "203.0.113.5:51234", "203.0.113.5"),      # a proxy that writes the port: stored without it
    (1, "10.0.0.1", "[2001:db8::5]:443", "2001:db8::5"),      # the same for IPv6, in brackets
])
def test_proxy_headers_are_trusted_for_exactly_the_configured_hops(tmp_path, clock, hops, trusted, forwarded,
                                                                   expected):
    """security.md 44 (and 41): ProxyFix with PROXY_HOPS decides which address the audit log records, and only
    for requests from a proxy in FORWARDED_ALLOW_IPS (gunicorn reached around the proxy must not believe a
    client's X-Forwarded-For); with 0 hops a spoofed X-Forwarded-For changes nothing."""
    app = _app(tmp_path, clock, PROXY_HOPS=hops, FORWARDED_ALLOW_IPS=trusted)
    try:
        a = Actor(app, app.test_client(), clock)
        a.user()
        a.client.environ_base["REMOTE_ADDR"] = "10.0.0.1"
        r = a.password_step(password="wrong")
        assert r.status_code == 200
        r = a.post_form("/login", {"email": "alice@example.com", "password": "wrong"},
                        headers={"X-Forwarded-For": forwarded, "X-Forwarded-Proto": "http"})
        with app.app_context():
            last = AuditEvent.select().order_by(AuditEvent.id.desc()).first()
        assert last.kind in ("password_rejected", "password_throttled") and last.ip == expected
    finally:
        db.close()


def test_an_untrusted_peer_cannot_claim_https_or_another_host(tmp_path, clock):
    """With PROXY_HOPS=1 but the request from an address outside FORWARDED_ALLOW_IPS, X-Forwarded-Proto and
    -Host are dropped too: the app sees plain http and the real Host (so a forged https Origin is refused)."""
    app = _app(tmp_path, clock, PROXY_HOPS=1, FORWARDED_ALLOW_IPS="192.0.2.10")
    try:
        a = Actor(app, app.test_client(), clock)
        a.user()
        a.client.environ_base["REMOTE_ADDR"] = "198.51.100.66"
        forged = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "twostep.example",
                  "Origin": "https://twostep.example"}
        r = a.post_form("/login", {"email": "alice@example.com", "password": "wrong"}, headers=forged)
        assert r.status_code == 403
        a.client.environ_base["REMOTE_ADDR"] = "192.0.2.10"  # the trusted proxy: the same headers count
        r = a.post_form("/login", {"email": "alice@example.com", "password": "wrong"}, headers=forged)
        assert r.status_code == 200 and "Incorrect email address or password." in r.get_data(as_text=True)
    finally:
        db.close()


def test_a_proxy_seen_as_an_ipv4_mapped_address_is_trusted_and_an_untrusted_one_is_named_once(tmp_path, clock,
                                                                                               caplog):
    """gunicorn bound to [::] sees nginx at 127.0.0.1 as ::ffff:127.0.0.1: still the trusted proxy. Headers
    from a peer outside FORWARDED_ALLOW_IPS are dropped with one warning per process that names the address
    (a proxy left out of the list would otherwise only show as 403s and one address for every client)."""
    app = _app(tmp_path, clock, PROXY_HOPS=1, FORWARDED_ALLOW_IPS="127.0.0.1")
    try:
        a = Actor(app, app.test_client(), clock)
        a.user()
        a.client.environ_base["REMOTE_ADDR"] = "::ffff:127.0.0.1"
        a.post_form("/login", {"email": "alice@example.com", "password": "wrong"},
                    headers={"X-Forwarded-For": "203.0.113.5"})
        with app.app_context():
            assert AuditEvent.select().order_by(AuditEvent.id.desc()).first().ip == "203.0.113.5"
        caplog.set_level(logging.WARNING, logger="twostep")
        a.client.environ_base["REMOTE_ADDR"] = "198.51.100.9"
        for _ in range(2):
            clock.advance(60)
            a.post_form("/login", {"email": "alice@example.com", "password": "wrong"},
                        headers={"X-Forwarded-For": "203.0.113.5"})
        with app.app_context():
            assert AuditEvent.select().order_by(AuditEvent.id.desc()).first().ip == "198.51.100.9"
        warnings = [r.getMessage() for r in caplog.records if "were ignored" in r.getMessage()]
        assert len(warnings) == 1 and "198.51.100.9" in warnings[0] and "FORWARDED_ALLOW_IPS" in warnings[0]
    finally:
        db.close()


@pytest.mark.parametrize("value", ["10.0.0.300", "proxy.example", "10.0.0.0/33"])
def test_a_malformed_list_of_trusted_proxies_stops_the_start(tmp_path, monkeypatch, value):
    from webapp.config import ConfigError

    monkeypatch.setenv("PROXY_HOPS", "1")
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", value)
    with pytest.raises(ConfigError, match="FORWARDED_ALLOW_IPS must list the proxies"):
        create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "inst"), "SECRET_KEY": "k" * 40,
                    "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"})


def test_behind_a_load_balancer_and_nginx_https_and_the_client_are_seen(tmp_path, clock):
    """README "Deployment", two proxies (a load balancer terminating TLS, then nginx on the host): both append
    to X-Forwarded-For, nginx passes on the balancer's X-Forwarded-Proto and the Host. The app must see the
    client's address and https, or the Origin check (security.md 33) refuses every htmx post, whose Origin
    is the real https://host."""
    app = _app(tmp_path, clock, PROXY_HOPS=2)
    try:
        a = Actor(app, app.test_client(), clock)
        a.user()
        a.client.environ_base["REMOTE_ADDR"] = "127.0.0.1"  # nginx
        proxied = {"X-Forwarded-For": "203.0.113.9, 10.0.0.5", "X-Forwarded-Proto": "https",
                   "X-Forwarded-Host": "twostep.example"}
        r = a.post_form("/login", {"email": "alice@example.com", "password": "wrong"},
                        headers={**proxied, "Origin": "https://twostep.example", "HX-Request": "true"})
        assert r.status_code == 200 and "Incorrect email address or password." in r.get_data(as_text=True)
        with app.app_context():
            assert AuditEvent.select().order_by(AuditEvent.id.desc()).first().ip == "203.0.113.9"
        forged = a.post_form("/login", {"email": "alice@example.com", "password": "wrong"},
                             headers={**proxied, "Origin": "https://evil.example"})
        assert forged.status_code == 403
    finally:
        db.close()


# ---------------------------------------------------------------- strict input: body size on every POST

def _post_rules(app):
    for rule in app.url_map.iter_rules():
        if "POST" in rule.methods:
            yield rule, (rule.build({k: 1 for k in rule.arguments})[1] if rule.arguments else rule.rule)


@pytest.mark.parametrize("signed", [False, True])
def test_every_form_post_without_its_csrf_token_is_refused_and_changes_nothing(actor, app, secret, signed):
    """security.md 33 on every POST route, for anonymous and signed-in people: without the token, or with
    another session's, the form is refused (Flask-WTF's check, called by the app's own hook:
    webapp._check_csrf_token) before any view runs: 400 "Form expired", or the page to go to instead (the
    sign-in page for someone not signed in, User Settings for a sign-in form of someone who is:
    _done_in_another_tab). Nothing is written, and nobody is signed in or out."""
    actor.user(ADMIN, admin=True, secret=secret)
    stranger = other(actor)
    foreign = stranger.csrf("/login")  # a real token, of another browser's session
    if signed:
        actor.sign_in(ADMIN, PASSWORD, secret)
    actor.csrf("/settings" if signed else "/login")  # the session has a token of its own
    before = len(audit_rows(app))
    rules = list(_post_rules(app))
    assert len(rules) >= 10
    for rule, url in rules:
        for data in ({}, {"csrf_token": foreign}):
            r = actor.client.post(url, data={**data, "email": ADMIN, "password": PASSWORD, "code": "123456"})
            assert r.status_code == 400 or (r.status_code == 302 and r.headers["Location"].startswith(
                ("/login", "/settings"))), (rule.endpoint, data, r.status_code)
    assert len(audit_rows(app)) == before
    assert signed_in(actor.client) == signed


@pytest.mark.parametrize("signed", [False, True])
def test_every_form_post_refuses_an_oversized_body_with_413(actor, app, secret, signed):
    """Strict input (security.md 5, 33 context): a body over MAX_CONTENT_LENGTH is refused with 413 on every
    POST route, before any view runs, for anonymous and signed-in people; nothing is written."""
    actor.user(ADMIN, admin=True, secret=secret)
    if signed:
        actor.sign_in(ADMIN, PASSWORD, secret)
    token = actor.csrf("/settings" if signed else "/login")
    before = len(audit_rows(app))
    big = "x" * (app.config["MAX_CONTENT_LENGTH"] + 1024)
    rules = list(_post_rules(app))
    assert len(rules) >= 10
    for rule, url in rules:
        for kwargs in ({"data": {"csrf_token": token, "email": "a@example.com", "password": big}},
                       {"data": {"csrf_token": token, "message": big}, "content_type": "multipart/form-data"}):
            r = actor.client.post(url, **kwargs)
            assert r.status_code == 413, (rule.endpoint, r.status_code)
            assert "Traceback" not in text(r)
    assert len(audit_rows(app)) == before
    assert signed == signed_in(actor.client)


def _what_is_written(app):
    """How many audit records and contact requests there are: what a refused form must not add to."""
    with app.app_context():
        return len(audit_rows(app)), db.execute_sql("SELECT COUNT(*) FROM supportrequest").fetchone()[0]


def _admin_and_what_is_written(actor, app, secret, signed):
    """An admin with 2FA, signed in or not; a CSRF token of this browser and the counts before the test."""
    actor.user(ADMIN, admin=True, secret=secret)
    if signed:
        actor.sign_in(ADMIN, PASSWORD, secret)
    return actor.csrf("/settings" if signed else "/login"), _what_is_written(app)


@pytest.mark.parametrize("signed", [False, True])
def test_every_form_post_refuses_a_body_without_a_length_with_411(actor, app, secret, signed):
    """Strict input: a form sent chunked (no Content-Length) is refused with 411 before any view or the CSRF
    check reads it. Werkzeug read such a body only up to MAX_CONTENT_LENGTH and silently dropped the rest,
    so an oversized contact message was stored cut short instead of getting 413. Nothing is written."""
    import io

    token, written_before = _admin_and_what_is_written(actor, app, secret, signed)
    with_token = f"csrf_token={token}&email=a%40example.com&message=hello".encode()
    for rule, url in _post_rules(app):
        # without a token too: the length is checked before the CSRF check reads the (cut) body
        for body in (with_token, b"email=a%40example.com&message=hello"):
            r = actor.client.post(url, input_stream=io.BytesIO(body),
                                  headers={"Transfer-Encoding": "chunked",
                                           "Content-Type": "application/x-www-form-urlencoded"},
                                  environ_overrides={"wsgi.input_terminated": True})
            assert r.status_code == 411, (rule.endpoint, r.status_code)
            assert "sent without its length" in text(r)
    assert _what_is_written(app) == written_before
    assert signed == signed_in(actor.client)


@pytest.mark.parametrize("signed", [False, True])
def test_every_form_post_refuses_a_body_cut_short_or_not_encoded_as_browsers_do(actor, app, secret, signed):
    """Bad input, no half-written record: a body that stops before its Content-Length (the connection broke
    off) was taken as the whole form under gunicorn, which marks its input as ending with the body: a
    contact message was stored without its end (a fuzzing review, against gunicorn). Raw bytes outside ASCII
    in a urlencoded body got "Form expired". Both are a 400 saying what happened, on every POST route,
    before any view or the CSRF check; nothing is written."""
    import io

    token, written_before = _admin_and_what_is_written(actor, app, secret, signed)
    body = f"csrf_token={token}&email=a%40example.com&message=First+part+of+my+message".encode()
    for rule, url in _post_rules(app):
        for sent, length, said in ((body, len(body) + 40, "did not arrive whole"),
                                   (body.replace(b"First", "Fïrst".encode("latin-1")), None, "could not be read")):
            r = actor.client.post(url, input_stream=io.BytesIO(sent),
                                  headers={"Content-Type": "application/x-www-form-urlencoded"},
                                  environ_overrides={"wsgi.input_terminated": True,  # as gunicorn does
                                                     "CONTENT_LENGTH": str(length or len(sent))})
            assert r.status_code == 400 and said in text(r) and "Nothing was changed" in text(r), (
                rule.endpoint, r.status_code)
    assert _what_is_written(app) == written_before
    assert signed == signed_in(actor.client)
    # and the whole form, sent the same way, still works
    r = actor.client.post("/support/contact", input_stream=io.BytesIO(body),
                          headers={"Content-Type": "application/x-www-form-urlencoded"},
                          environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": str(len(body))})
    assert r.status_code == 302


@pytest.mark.parametrize("signed", [False, True])
def test_json_and_file_bodies_are_not_read_as_forms(actor, app, secret, signed):
    """Bad input: forms read only form fields. A JSON body (CSRF token in the X-CSRFToken header, as htmx
    sends it) or a file where a text field is expected used to reach the validators as a number, list or file
    and end in a 500, on POSTs anyone can send; a JSON string also slipped a NUL past the NUL check."""
    import io

    actor.user(ADMIN, admin=True, secret=secret)
    if signed:
        actor.sign_in(ADMIN, PASSWORD, secret)
    token = actor.csrf("/settings" if signed else "/login")
    names = ["email", "password", "message", "code", "name", "reason", "duration", "off-password", "off-code",
             "rename-1-name", "remove-1-code"]
    for rule, url in _post_rules(app):
        if rule.endpoint == "auth.logout":
            continue  # it reads no form: a JSON body with a valid token logs out, which is right
        for value in (12345678, [1, 2], {"a": 1}, "hello\u0000 there"):
            r = actor.client.post(url, data=json.dumps({k: value for k in names}),
                                  headers={"Content-Type": "application/json", "X-CSRFToken": token})
            assert r.status_code < 500 and "Traceback" not in text(r), (rule.endpoint, value, r.status_code)
        r = actor.client.post(url, content_type="multipart/form-data", headers={"X-CSRFToken": token},
                              data={k: (io.BytesIO(b"123456"), "f.txt") for k in names})
        assert r.status_code < 500, (rule.endpoint, "file", r.status_code)
    with app.app_context():
        assert db.execute_sql("SELECT COUNT(*) FROM supportrequest").fetchone()[0] == 0
    if not signed:  # the right email and password as JSON sign nobody in: the form is empty, and says so
        r = actor.client.post("/login", data=json.dumps({"email": ADMIN, "password": PASSWORD}),
                              headers={"Content-Type": "application/json", "X-CSRFToken": token})
        assert r.status_code == 400 and "Enter your email address." in text(r) and "Enter your password." in text(r)
        assert not signed_in(actor.client)


# ---------------------------------------------------------------- security.md 30, 31, 44 over HTTPS

def test_cookies_and_hsts_at_every_step_over_https(tmp_path, clock):
    """security.md 31, 30, 44: served over HTTPS, every Set-Cookie at sign-in, the code step, re-authentication
    and logout is the __Host- session cookie with Secure, HttpOnly, SameSite=Lax, Path=/ and no lifetime
    (browser session); logout expires it with the same attributes; every response carries HSTS; no
    remember-me cookie ever appears. The only other cookie, once, at the completed sign-in: the __Host-
    known-browser cookie (same attributes, 180 days), which signs nobody in (security.known_browser)."""
    app = _app(tmp_path, clock, SECURE_COOKIES=True)
    try:
        a = Actor(app, app.test_client(), clock)
        secret = pyotp.random_base32()
        a.user(secret=secret)
        https = {"base_url": "https://localhost"}
        token = lambda url: re.search(r'name="csrf_token"[^>]*value="([^"]+)"',  # noqa: E731
                                      text(a.client.get(url, **https))).group(1)
        steps = [("login page", a.client.get("/login", **https))]
        steps.append(("password", a.client.post("/login", data={"csrf_token": token("/login"),
                                                                  "email": "alice@example.com",
                                                                  "password": PASSWORD}, **https)))
        steps.append(("code", a.client.post("/login/verify", data={"csrf_token": token("/login/verify"),
                                                                     "code": a.code(secret)}, **https)))
        clock.advance(11 * 60)  # stale: "Confirm it's you" asks and checks
        steps.append(("reauth", a.client.post("/reauth", data={"csrf_token": token("/reauth"), "password": PASSWORD,
                                                                "code": a.code(secret)}, **https)))
        steps.append(("logout", a.client.post("/logout", data={"csrf_token": token("/settings")}, **https)))
        cookies_seen = 0
        for name, r in steps:
            assert r.headers["Strict-Transport-Security"].startswith("max-age="), name
            for cookie in r.headers.getlist("Set-Cookie"):
                attrs = [p.strip() for p in cookie.split(";")]
                if attrs[0].startswith("__Host-known="):
                    assert name == "code", (name, cookie)
                    assert {"Secure", "HttpOnly", "SameSite=Lax", "Path=/", f"Max-Age={180 * 86400}"} <= set(attrs)
                    continue
                cookies_seen += 1
                assert attrs[0].startswith("__Host-session="), (name, cookie)
                assert {"Secure", "HttpOnly", "SameSite=Lax", "Path=/"} <= set(attrs), (name, cookie)
                assert not any(p.startswith("Domain") for p in attrs), (name, cookie)
                if name == "logout":
                    assert "Max-Age=0" in attrs, cookie
                else:
                    assert not any(p.startswith(("Max-Age", "Expires")) for p in attrs), (name, cookie)
                assert "remember" not in cookie.lower()
        assert cookies_seen >= 4
        assert [n for n, r in steps if n == "logout" and r.headers.getlist("Set-Cookie")], "logout sets no cookie"
    finally:
        db.close()


def test_https_form_posts_work_without_a_referer_and_cross_site_ones_are_refused(tmp_path, clock):
    """security.md 33 with 12: over HTTPS a browser sends no Referer (our no-referrer policy) and
    "Origin: null"; such a same-origin post signs in, while a cross-site Origin or a missing token is refused."""
    app = _app(tmp_path, clock, SECURE_COOKIES=True)
    try:
        https = {"base_url": "https://localhost"}
        browser_like = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
        Actor(app, app.test_client(), clock).user()
        for headers, expected in (({"Origin": "https://evil.example"}, 403), ({}, 400), (browser_like, 302)):
            a = Actor(app, app.test_client(), clock)
            page = text(a.client.get("/login", **https))
            token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
            data = {"email": "alice@example.com", "password": PASSWORD}
            if expected != 400:
                data["csrf_token"] = token
            r = a.client.post("/login", data=data, headers=headers, **https)
            assert r.status_code == expected, (headers, r.status_code)
            assert signed_in_https(a.client) == (expected == 302)
    finally:
        db.close()


def signed_in_https(client):
    r = client.get("/settings", base_url="https://localhost")
    return r.status_code == 200 and "User Settings" in text(r)


# ---------------------------------------------------------------- security.md 21, 41: the pending state and POSTs

PUBLIC_POSTS = {"auth.login", "auth.verify", "auth.logout", "auth.signup", "auth.first_run", "support.contact"}


def test_every_state_changing_route_refuses_the_pending_state(actor, app, secret):
    """security.md 21: with only the password step done, every POST route except the sign-in steps, logout,
    sign-up/first-run and the contact form sends the browser to sign in (or refuses); nothing changes."""
    user = actor.user(ADMIN, admin=True, secret=secret)
    victim = actor.user("carol@example.com", secret=pyotp.random_base32())
    actor.password_step(ADMIN)
    token = actor.csrf("/login/verify")
    with app.app_context():
        device_ids = {u: [d.id for d in Device.select().where(Device.user == u)] for u in (user.id, victim.id)}
    before = [e.kind for e in audit_rows(app)]
    checked = 0
    for rule in app.url_map.iter_rules():
        if "POST" not in rule.methods or rule.endpoint in PUBLIC_POSTS:
            continue
        args = {k: (device_ids[user.id][0] if "device" in k else victim.id if "user" in k else 1)
                for k in rule.arguments}
        url = rule.build(args)[1] if args else rule.rule
        r = actor.client.post(url, data={"csrf_token": token, "off-password": PASSWORD, "off-code": actor.code(secret),
                                         "name": "x", "reason": "r" * 20})
        assert r.status_code in (302, 401, 403, 404), (rule.endpoint, r.status_code)
        if r.status_code == 302:
            assert r.headers["Location"].startswith("/login"), rule.endpoint
        checked += 1
    assert checked >= 8
    with app.app_context():
        assert {u: [d.id for d in Device.select().where(Device.user == u)] for u in (user.id, victim.id)} == device_ids
        assert User.get_by_id(victim.id).tfa_reset_until is None
    assert [e.kind for e in audit_rows(app)] == before


def test_forwarded_loopback_address_does_not_skip_2fa_behind_a_proxy(tmp_path, clock):
    """security.md 41 with 44: even with PROXY_HOPS=1 (so X-Forwarded-For is believed), a request that claims
    to come from 127.0.0.1 still needs the code."""
    app = _app(tmp_path, clock, PROXY_HOPS=1)
    try:
        a = Actor(app, app.test_client(), clock)
        a.user(secret=pyotp.random_base32())
        loopback = {"X-Forwarded-For": "127.0.0.1"}
        r = a.post_form("/login", {"email": "alice@example.com", "password": PASSWORD}, headers=loopback)
        assert r.headers["Location"] == "/login/verify"
        r = a.client.get("/settings", headers=loopback)
        assert r.status_code == 302 and r.headers["Location"].startswith("/login")
    finally:
        db.close()


def test_the_readme_checklist_table_lists_exactly_the_tests_that_cite_each_item():
    """The README's "Checklist → tests" table is what a security reviewer reads first: its Tests column must
    be the tests that cite each item (`security.md N`), no more and no fewer. scripts/checklist.py rewrites
    it; this fails when a test was added, renamed or lost its citation and the table was not made again."""
    import subprocess
    import sys

    from .live_app import ROOT

    done = subprocess.run([sys.executable, "scripts/checklist.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
