"""Changing your own password (User Settings -> Password -> Change password): the current password first,
throttled like the sign-in (security.md 19); afterwards every other session ends (security.md 30, 35;
ASVS 4 3.3.3) and the change is audited without the password (security.md 43)."""
import re
import threading

import pytest

from webapp.models import AuditEvent, Device, KnownBrowser, ServerSession, User
from webapp.security import verify_password
from webapp.sessions import token_hash

from .conftest import PASSWORD, Actor
from .test_sessions import browser, signed_in

NEW = "a brand new passphrase"
URL = "/settings/password"


def text(response):
    return response.get_data(as_text=True)


def form(current=PASSWORD, new=NEW, confirm=None):
    return {"current": current, "new": new, "confirm": new if confirm is None else confirm}


def stored_hash(app):
    with app.app_context():
        return User.by_email("alice@example.com").password_hash


def changed_meanwhile(app, step):
    """`step` (a function taking the account first) wrapped so that the operator replaces the password right
    after it ran, before its result is used: what a change landing during that slow step looks like."""
    from webapp.security import hash_password, replace_password

    def wrapper(account, *args, **kwargs):
        result = step(account, *args, **kwargs)
        with app.app_context():
            replace_password(User.get_by_id(account.id), hash_password(NEW), via="cli")
        return result

    return wrapper


def refused(actor, data):
    """Send Change password without JavaScript: a refusal answers 303 to the page itself (Post/Redirect/Get, so
    Reload sends no password again), which shows it once. That page's response."""
    r = actor.post_form(URL, data)
    assert r.status_code == 303 and r.headers["Location"] == URL, (r.status_code, r.headers.get("Location"))
    return actor.client.get(URL)


@pytest.fixture
def alice(actor, secret):
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    return user


def test_the_page_is_linked_from_user_settings_and_its_fields_are_labelled_for_password_managers(actor, alice):
    assert f'<a href="{URL}">Change password</a>' in text(actor.client.get("/settings"))
    page = text(actor.client.get(URL))
    assert "<h1>Change password</h1>" in page
    for field_id, label, autocomplete in (("current", "Current password", "current-password"),
                                          ("new", "New password", "new-password"),
                                          ("confirm", "Repeat the new password", "new-password")):
        assert f'<label for="{field_id}">{label}</label>' in page
        tag = page.split(f'id="{field_id}"')[0].rsplit("<input", 1)[1] + page.split(f'id="{field_id}"')[1].split(">")[0]
        assert f'autocomplete="{autocomplete}"' in tag and 'type="password"' in tag
    assert PASSWORD not in page
    # the address a password manager files the new password under, inside the form, hidden
    form_markup = page.split('<form method="post" action="/settings/password"', 1)[1].split("</form>", 1)[0]
    assert ('<input type="email" name="username" value="alice@example.com" autocomplete="username" hidden readonly>'
            in form_markup)


def test_confirm_its_you_tells_password_managers_whose_password_it_asks(app, actor, alice, clock):
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    page = text(actor.client.get("/reauth?next=/settings/password"))
    form_markup = page.split('<form method="post" action="/reauth', 1)[1].split("</form>", 1)[0]
    assert ('<input type="email" name="username" value="alice@example.com" autocomplete="username" hidden readonly>'
            in form_markup)


@pytest.mark.parametrize("count, said", [(2, "2 other browsers."), (1, "1 other browser.")])
def test_changing_the_password_ends_the_other_sessions_and_keeps_this_one_with_a_new_id(app, actor, alice, secret,
                                                                                          clock, count, said):
    # security.md 30, 35
    others = [browser(app, clock, secret=secret, agent=f"Other/{i}") for i in range(count)]
    before = actor.session_cookie()
    r = actor.post_form(URL, form())
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    page = text(actor.client.get("/settings"))
    assert "Your password was changed. You were signed out on " + said in page
    assert "<title>User Settings · twostep</title>" in page  # news, not an error ("Error: ..." in the title)
    assert actor.session_cookie() != before  # a new session id after the change
    for other in others:
        assert not signed_in(other.client)
    with app.app_context():
        user = User.by_email("alice@example.com")
        assert verify_password(user.password_hash, NEW) and not verify_password(user.password_hash, PASSWORD)
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 1
        assert Device.select().where(Device.user == user.id).count() == 1  # 2FA stays
        [event] = AuditEvent.select().where(AuditEvent.kind == "password_changed")
        assert event.details == {"via": "settings", "sessions_ended": count}
        # The other browsers are no longer known (their own password throttle goes with them; forgotten, they
        # keep the contact form's allowance alone); this one is.
        known = [b.id for b in KnownBrowser.select().where((KnownBrowser.user == user.id)
                                                           & KnownBrowser.forgotten_at.is_null())]
        assert known == [token_hash(actor.client.get_cookie("twostep_known").value)]
        assert KnownBrowser.select().where(KnownBrowser.forgotten_at.is_null(False)).count() == len(others)
    assert "Password changed" in page  # Security activity
    # signing in again: the old password is refused, the new one leads to the code step
    clock.advance(30)
    fresh = Actor(app, app.test_client(), clock)
    assert fresh.password_step(password=PASSWORD).status_code == 200
    clock.advance(5)  # the back-off after that wrong password
    r = fresh.password_step(password=NEW)
    assert r.status_code == 302 and r.headers["Location"] == "/login/verify"


def test_a_setup_under_way_goes_on_after_changing_the_password(app, actor, alice):
    """The new session id the change gives this browser keeps the wizard's key: the entry scanned before the
    change still completes the setup afterwards."""
    from .test_wizard import Wizard

    w = Wizard(actor)
    w.start()
    assert actor.post_form(URL, form()).status_code == 302
    w.token = None  # the page's form token, read again as a reloaded page would
    assert 'data-step="name"' in text(w.submit_code())
    assert 'data-step="done"' in text(w.complete("Tablet"))


def test_a_wrong_current_password_changes_nothing_and_counts_like_a_sign_in_guess(app, actor, alice, clock):
    """Whoever holds a stolen session cannot guess the password here faster than at the sign-in (security.md 19)."""
    before = stored_hash(app)
    r = refused(actor, form(current="not my password"))
    assert r.status_code == 403 and "That is not your current password." in text(r)
    assert stored_hash(app) == before
    with app.app_context():  # counted for this browser, where the person completed a sign-in (auth.password_check)
        [event] = AuditEvent.select().where(AuditEvent.kind == "password_rejected")
        assert event.details["failures"] == 1
    r = refused(actor, form())  # at once: the back-off after a failure is not over
    assert r.status_code == 429 and "Too many" in text(r)
    assert stored_hash(app) == before
    clock.advance(60)
    assert actor.post_form(URL, form()).status_code == 302
    assert stored_hash(app) != before


def test_a_refused_change_without_javascript_is_said_once_after_a_redirect_and_counted_once(app, actor, alice):
    """A wrong current password sent without JavaScript is answered with a 303 to this page (Post/Redirect/Get),
    which says it once, titled "Error:", its field focused: Reload then loads the page again instead of
    sending the password once more (each resend was one more wrong guess towards the back-off, and the
    browser asked to resubmit the form). No password is kept; the wrong one counts once; nothing changes."""
    import json

    before = stored_hash(app)
    r = actor.post_form(URL, form(current="not my password"))
    assert r.status_code == 303 and r.headers["Location"] == URL
    with app.app_context():
        kept = json.dumps(ServerSession.select().where(ServerSession.user.is_null(False)).get().load())
    assert "not my password" not in kept and NEW not in kept and PASSWORD not in kept
    page = actor.client.get(URL)
    body = text(page)
    assert page.status_code == 403 and "That is not your current password." in body
    assert re.search(r"<title>Error: Change password · twostep</title>", body)
    tag = re.search(r'<input [^>]*\bid="current"[^>]*>', body).group(0)
    assert "autofocus" in tag and 'aria-invalid="true"' in tag and 'aria-describedby="current-error"' in tag
    again = actor.client.get(URL)  # Reload
    assert again.status_code == 200 and "That is not your current password." not in text(again)
    assert "<title>Change password · twostep</title>" in text(again)
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "password_rejected")
        assert event.details["failures"] == 1
    assert stored_hash(app) == before


@pytest.mark.parametrize("data,message", [
    (form(confirm="something else entirely"), "The two new passwords differ."),
    (form(new="short"), "Use at least 8 characters (and at most 1024)."),
    (form(new=" " * 10), "A password of spaces only cannot be used to sign in"),
    (form(new=PASSWORD), "That is your current password: choose a different one."),
    # The same password on an East Asian keyboard (full-width letters): hashed as one (NIST SP 800-63B
    # 3.1.1.2), so it is no new password either.
    (form(new="".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" for c in PASSWORD)),
     "That is your current password: choose a different one."),
    (form(new="x" * 1025), "Use at least 8 characters (and at most 1024)."),
    # Eight characters as typed, four letters as hashed (NFKC): each "e" is followed by its accent.
    (form(new="e\u0301" * 4, confirm="e\u0301" * 4), "Use at least 8 characters (and at most 1024)."),
    (form(current=""), "Enter your current password."),
    # One of the most common passwords, in any case and in full-width letters (NIST SP 800-63B 5.1.1.2: a
    # review changed the password to "password"; the hint below the field says the opposite).
    (form(new="password"), "This password is one of the most common ones, which are tried first."),
    (form(new="IloveYou123"), "This password is one of the most common ones, which are tried first."),
    (form(new="ｑｗｅｒｔｙｕｉｏｐ"), "This password is one of the most common ones, which are tried first."),
])
def test_a_new_password_that_cannot_be_used_is_refused_with_a_reason(app, actor, alice, data, message):
    before = stored_hash(app)
    r = refused(actor, data)
    assert r.status_code == 400 and message in text(r)
    assert stored_hash(app) == before
    assert NEW not in text(r)  # nothing typed comes back in the page
    with app.app_context():
        assert not AuditEvent.select().where(AuditEvent.kind == "password_changed").exists()


def test_the_page_needs_a_signed_in_session_and_a_csrf_token(app, client, actor, alice):
    anonymous = app.test_client()
    r = anonymous.get(URL)
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")
    before = stored_hash(app)
    r = actor.client.post(URL, data=form())
    assert r.status_code == 400 and stored_hash(app) == before


def test_a_stale_sign_in_must_confirm_it_is_you_first(app, actor, alice, secret, clock):
    """Like signing the other browsers out (ASVS 4 3.3.4): a session older than 10 minutes, possibly stolen
    together with a leaked password, cannot change the password without the code; after re-authenticating
    the person is back on the form (security.md 9)."""
    token = actor.csrf(URL)
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    before = stored_hash(app)
    r = actor.client.get(URL)
    assert r.status_code == 302 and r.headers["Location"] == "/reauth?next=/settings/password"
    r = actor.client.post(URL, data={"csrf_token": token, **form()})
    assert r.status_code == 302 and r.headers["Location"] == "/reauth?next=/settings/password"
    assert stored_hash(app) == before
    r = actor.post_form(r.headers["Location"], {"password": PASSWORD, "code": actor.code(secret)})
    assert r.headers["Location"] == URL
    assert actor.post_form(URL, form()).status_code == 302 and stored_hash(app) != before


def test_a_sign_in_is_fresh_to_the_end_of_its_window_and_not_a_moment_longer(app, actor, alice, clock):
    """security.md 9, 32: FRESH_LOGIN_WINDOW (10 minutes) after the sign-in the page still opens; a second
    later it asks to confirm it is you first."""
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds())
    assert actor.client.get(URL).status_code == 200
    clock.advance(1)
    r = actor.client.get(URL)
    assert r.status_code == 302 and r.headers["Location"] == "/reauth?next=/settings/password"


def test_outside_the_tests_passwords_are_hashed_at_argon2s_recommended_cost(app):
    """The tests hash at argon2's cheapest setting to run fast; every other profile (the default) must hash
    with argon2id at RFC 9106's recommended parameters, which verification then reads from the hash."""
    from argon2 import Type, extract_parameters, profiles

    from webapp.security import hash_password

    with app.app_context():
        app.config["PASSWORD_HASH_PROFILE"] = "default"
        stored = hash_password(PASSWORD)
        assert verify_password(stored, PASSWORD) and not verify_password(stored, NEW)
    parameters = extract_parameters(stored)
    assert parameters.type == Type.ID and parameters == profiles.RFC_9106_LOW_MEMORY


@pytest.mark.parametrize("how", ["settings", "cli"])
def test_a_sign_in_half_done_with_the_old_password_cannot_be_finished(app, actor, alice, secret, clock, how):
    """A code step reached with the old password (the person who leaked it, or whoever has it) ends with the
    change: entering a code there afterwards signs nobody in (security.md 24)."""
    clock.advance(30)
    half = Actor(app, app.test_client(), clock)
    assert half.password_step(password=PASSWORD).headers["Location"] == "/login/verify"
    token = half.csrf("/login/verify")
    if how == "settings":
        assert actor.post_form(URL, form()).status_code == 302
    else:
        result = app.test_cli_runner().invoke(args=["users", "set-password", "alice@example.com", "--password", NEW])
        assert result.exit_code == 0, result.output
    clock.advance(30)
    r = half.client.post("/login/verify", data={"csrf_token": token, "code": half.code(secret)})
    assert r.status_code == 302 and r.headers["Location"].startswith("/login?notice=")
    assert not signed_in(half.client)


@pytest.mark.parametrize("overtaken_by", ["set-password", "signed-out", "same-session", "rehashed-and-signed-out"])
def test_a_change_overtaken_while_the_hash_ran_changes_nothing(app, actor, alice, secret, clock, monkeypatch,
                                                               overtaken_by):
    """The new password is hashed (slowly) before the transaction. If meanwhile the operator set another
    password, or another browser signed this one out (the owner against a stolen session), the change used
    to go through anyway: it undid the operator's password, or signed the owner out everywhere with a
    password only the thief knew (security.md 35). "same-session": the same session changed it a moment ago
    and has not been renewed yet (two tabs, or the owner and a thief holding the stolen session cookie and the
    old password): the change proved with the replaced password must not overwrite the new one; found by
    mutation testing (replace_password's checked_hash comparison removed: no SQLite test noticed).
    "rehashed-and-signed-out": a sign-in elsewhere made the same password's hash again, which alone refuses
    nothing (test_a_sign_in_that_only_rehashed_the_password_meanwhile_does_not_refuse_the_change), and this
    browser was signed out too."""
    import webapp.settings as settings_module
    from webapp.sessions import end_user_sessions

    original = settings_module.hash_password

    def hash_while_overtaken(password):
        result = original(password)
        if overtaken_by == "set-password":
            out = app.test_cli_runner().invoke(args=["users", "set-password", "alice@example.com",
                                                     "--password", "the operator's choice"])
            assert out.exit_code == 0, out.output
        elif overtaken_by == "same-session":  # what the other request's replace_password commits, before its renewal
            from flask import session

            from webapp.security import replace_password
            replace_password(User.by_email("alice@example.com"), original("the owner's choice"), via="settings",
                             keep_token=session.token)
        else:
            with app.app_context():
                if overtaken_by == "rehashed-and-signed-out":
                    _store_hash(app, _current_hash(app))  # what auth.after_password's upgrade commits
                end_user_sessions(User.by_email("alice@example.com"))
        return result

    monkeypatch.setattr(settings_module, "hash_password", hash_while_overtaken)
    before = stored_hash(app)
    r = actor.post_form(URL, form())
    if overtaken_by == "same-session":  # still signed in: the page the refusal's 303 leads to says it
        assert r.status_code == 303 and r.headers["Location"] == URL
        r = actor.client.get(URL)
    # Signed out meanwhile (the operator's set-password signs out too): said at once, where the page's address
    # would only lead to the sign-in page
    assert r.status_code == 409 and "At the same moment your password was changed somewhere else" in text(r)
    assert "Nothing was changed here" in text(r)
    with app.app_context():
        user = User.by_email("alice@example.com")
        assert not verify_password(user.password_hash, NEW)
        if overtaken_by == "set-password":
            assert verify_password(user.password_hash, "the operator's choice")
        elif overtaken_by == "same-session":
            assert verify_password(user.password_hash, "the owner's choice")
        elif overtaken_by == "signed-out":
            assert user.password_hash == before
        else:
            assert verify_password(user.password_hash, PASSWORD)
        assert [e.details["via"] for e in AuditEvent.select().where(AuditEvent.kind == "password_changed")] == (
            {"set-password": ["cli"], "same-session": ["settings"]}.get(overtaken_by, []))


@pytest.mark.parametrize("with_2fa", [True, False])
def test_a_sign_in_whose_password_is_changed_while_it_is_checked_opens_nothing(app, actor, secret, clock,
                                                                             monkeypatch, with_2fa):
    """The password step checks the password against the hash it read, slowly; a change committed meanwhile
    (the owner, or the operator's set-password) must win: the old password then leads neither to the code
    step nor to a session (an attacker's sign-ins 0.13 s after the change survived it in a review)
    (security.md 30, 35)."""
    import webapp.auth as auth_module
    from webapp.models import ServerSession, SignInChallenge

    user = actor.user(secret=secret if with_2fa else None)
    monkeypatch.setattr(auth_module, "password_check", changed_meanwhile(app, auth_module.password_check))
    r = actor.password_step(password=PASSWORD)
    assert r.status_code == 200 and "Incorrect email address or password." in text(r)
    assert not signed_in(actor.client)
    with app.app_context():
        assert SignInChallenge.select().where(SignInChallenge.user == user.id).count() == 0
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 0
        assert not AuditEvent.select().where(AuditEvent.kind.in_(["password_accepted", "signin"])).exists()
        # counted and recorded like any wrong password: the refusal tells nobody more than a wrong guess would
        [rejected] = AuditEvent.select().where(AuditEvent.kind == "password_rejected")
        assert rejected.details["failures"] == 1


def test_a_code_step_whose_password_is_changed_while_its_code_is_checked_opens_nothing(app, actor, secret,
                                                                                       monkeypatch):
    """The code step checks the code before its transaction; a password change landing meanwhile deletes the
    code step's challenge, and the sign-in begun with the old password must not finish. Nothing of the
    attempt stays: no session, no sign-in record, and the code is not used up (security.md 30)."""
    import webapp.auth as auth_module
    from webapp.models import ServerSession

    user = actor.user(secret=secret)
    assert actor.password_step(password=PASSWORD).headers["Location"] == "/login/verify"
    monkeypatch.setattr(auth_module, "code_matches", changed_meanwhile(app, auth_module.code_matches))
    r = actor.code_step(actor.code(secret))
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=sign-in-expired"
    assert not signed_in(actor.client)
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 0
        assert not AuditEvent.select().where(AuditEvent.kind.in_(["signin", "code_accepted"])).exists()
        assert Device.get(Device.user == user.id).last_step == 0


def test_a_re_authentication_whose_password_is_changed_meanwhile_renews_nothing(app, actor, alice, secret, clock,
                                                                              monkeypatch):
    """/reauth checks the password, then renews the session. A change landing meanwhile ends this session;
    the renewal then finds it gone, the browser stays signed out, and no re-authentication is recorded
    (security.md 30)."""
    import webapp.auth as auth_module

    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    monkeypatch.setattr(auth_module, "password_check", changed_meanwhile(app, auth_module.password_check))
    r = actor.post_form("/reauth?next=/settings", {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=session-ended"
    assert not signed_in(actor.client)
    with app.app_context():
        assert not AuditEvent.select().where(AuditEvent.kind == "reauthenticated").exists()


def test_a_refused_new_password_is_described_by_its_hint_and_its_error(app, actor, alice):
    """WCAG 1.3.1, 3.3.1: with a screen reader, the refused "New password" field reads both the rule (its
    hint) and what was wrong (its error); the error alone left out the rule it refers to."""
    r = refused(actor, form(new="short"))
    page = text(r)
    assert r.status_code == 400
    tag = re.search(r'<input [^>]*\bid="new"[^>]*>', page).group(0)
    assert 'aria-describedby="new-hint new-error"' in tag and 'aria-invalid="true"' in tag
    assert '<p class="hint" id="new-hint">At least 8 characters.' in page
    assert '<p class="error" id="new-error">Use at least 8 characters (and at most 1024).</p>' in page


def _outdated_hash(password):
    """A hash made as an older release would have: argon2id, but not with the parameters hashes get now."""
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=2, memory_cost=16, parallelism=1, hash_len=16, salt_len=16).hash(password)


def _store_hash(app, password_hash):
    with app.app_context():
        User.update(password_hash=password_hash).where(User.email == "alice@example.com").execute()


@pytest.mark.parametrize("with_2fa", [True, False])
def test_a_sign_in_replaces_a_hash_made_with_outdated_parameters(app, actor, secret, with_2fa):
    """When argon2's parameters change (a new release's defaults, another profile), old hashes are made again
    with the new ones at the next correct password, as argon2-cffi advises; the password
    itself stays the same and so do the person's sessions."""
    from argon2 import extract_parameters

    from webapp.security import _hasher

    actor.user(secret=secret if with_2fa else None)
    old = _outdated_hash(PASSWORD)
    _store_hash(app, old)
    r = actor.password_step()
    assert r.status_code == 302 and r.headers["Location"] == ("/login/verify" if with_2fa else "/settings")
    new = stored_hash(app)
    assert new != old
    with app.app_context():
        assert extract_parameters(new) == _hasher()._parameters
        assert verify_password(new, PASSWORD) and not verify_password(new, NEW)
        assert not AuditEvent.select().where(AuditEvent.kind == "password_changed").exists()
    if with_2fa:
        assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"
    assert signed_in(actor.client)


def test_a_wrong_password_or_an_up_to_date_hash_is_left_as_it_is(app, actor, clock):
    """Only the right password can make the new hash; a hash already made with today's parameters is not
    made again at every sign-in (it would double the cost of each)."""
    actor.user()
    old = _outdated_hash(PASSWORD)
    _store_hash(app, old)
    assert actor.password_step(password="a wrong guess").status_code == 200
    assert stored_hash(app) == old
    clock.advance(2)  # past the wrong guess's back-off
    current = _current_hash(app)
    _store_hash(app, current)
    assert actor.password_step().headers["Location"] == "/settings"
    assert stored_hash(app) == current


def _current_hash(app):
    from webapp.security import hash_password

    with app.app_context():
        return hash_password(PASSWORD)


def test_a_hash_upgraded_by_another_sign_in_meanwhile_still_lets_this_one_in(app, actor, secret, monkeypatch):
    """Two sign-ins of the same person at once with an outdated hash: the first upgrades it while the second
    is still checking the password against the old one. The second must not take that for a password change
    (which refuses the old password): the password it holds is right for the new hash too."""
    import webapp.auth as auth_module

    actor.user(secret=secret)
    _store_hash(app, _outdated_hash(PASSWORD))
    real_check = auth_module.password_check

    def check_while_another_sign_in_upgrades(user, *args, **kwargs):
        result = real_check(user, *args, **kwargs)
        _store_hash(app, _current_hash(app))
        return result

    monkeypatch.setattr(auth_module, "password_check", check_while_another_sign_in_upgrades)
    r = actor.password_step()
    assert r.status_code == 302 and r.headers["Location"] == "/login/verify"
    with app.app_context():
        assert not AuditEvent.select().where(AuditEvent.kind == "password_rejected").exists()
        assert User.by_email("alice@example.com").password_failures == 0


def test_a_blocked_sign_in_whose_hash_was_upgraded_still_fills_in_the_contact_form(app, actor, clock):
    """After support's window ended without a new device, the blocked page remembers whose password was
    entered, by a digest of the stored hash; the upgrade at that same sign-in must not make it look as if
    the password had been changed since (the contact form would forget her address)."""
    from datetime import timedelta

    from webapp.clock import now

    actor.user()
    with app.app_context():
        User.update(password_hash=_outdated_hash(PASSWORD), tfa_reset_until=now() - timedelta(hours=1)).where(
            User.email == "alice@example.com").execute()
    assert actor.password_step().status_code == 403
    assert 'value="alice@example.com"' in actor.client.get("/support/contact").get_data(as_text=True)


RAW = "cafe\u0301 secret word"  # "é" typed as "e" and an accent: NFKC makes it one character


def _as_typed_hash(password):
    """A hash made before passwords were normalised: it holds the password as typed."""
    from webapp.security import _hasher

    return _hasher().hash(password)


@pytest.mark.parametrize("password, stale_hash", [(PASSWORD, _outdated_hash), (RAW, _as_typed_hash)],
                         ids=["outdated-parameters", "held-as-typed"])
def test_a_sign_in_that_only_rehashed_the_password_meanwhile_does_not_refuse_the_change(
        app, actor, clock, monkeypatch, password, stale_hash):
    """Change password refuses (409) when the stored hash changed while its slow hashes ran, for a change made
    elsewhere. A sign-in in another browser that only hashes the same password again (argon2's parameters
    changed, or the hash held the password as typed before passwords were normalised: auth.upgraded_hash)
    changes the stored hash too, and the person was refused for nothing: the password they proved is still
    the account's, and the change goes through (refused still when this browser was signed out as well:
    test_a_change_overtaken_while_the_hash_ran_changes_nothing) (security.md 35)."""
    import webapp.settings as settings_module

    actor.user(email="zoe@example.com", password=password)
    assert actor.password_step(email="zoe@example.com", password=password).headers["Location"] == "/settings"
    with app.app_context():
        stale = stale_hash(password)
        User.update(password_hash=stale).where(User.email == "zoe@example.com").execute()
    original = settings_module.hash_password

    def hash_while_another_sign_in_rehashes(new_password):
        result = original(new_password)
        elsewhere = Actor(app, app.test_client(), clock)
        # In a thread of its own, as another worker serves it (a request nested in this one would share its
        # app context, and so its signed-in user); joined before this change goes on.
        done = []
        worker = threading.Thread(target=lambda: done.append(
            elsewhere.password_step(email="zoe@example.com", password=password).status_code))
        worker.start()
        worker.join()
        assert done == [302]
        with app.app_context():
            assert User.by_email("zoe@example.com").password_hash != stale  # made again by that sign-in
        return result

    monkeypatch.setattr(settings_module, "hash_password", hash_while_another_sign_in_rehashes)
    r = actor.post_form(URL, form(current=password))
    with app.app_context():
        stored = User.by_email("zoe@example.com").password_hash
        now_opens = verify_password(stored, NEW), verify_password(stored, password)
        changes = [e.details["via"] for e in AuditEvent.select().where(AuditEvent.kind == "password_changed")]
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    assert "Your password was changed. You were signed out on 1 other browser." in text(actor.client.get("/settings"))
    assert now_opens == (True, False) and changes == ["settings"]
