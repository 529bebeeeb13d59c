"""Where you're signed in (User Settings): the list of your live sessions, signing out one other browser, and
"Sign out everywhere else" (security.md 30, 34, 35)."""
import re

import pytest

from webapp.models import AuditEvent, ServerSession
from webapp.sessions import token_hash

from .conftest import PASSWORD, Actor, csrf_from

HX = {"HX-Request": "true"}
HANDLE_RE = re.compile(r'action="/settings/sessions/([0-9a-f]+)/end"')


def text(response):
    return response.get_data(as_text=True)


def signed_in(client):
    r = client.get("/settings")
    return r.status_code == 200 and "User Settings" in text(r)


def browser(app, clock, email="alice@example.com", secret=None, agent="TestBrowser/1.0", ip="127.0.0.1"):
    """Another browser (own cookie jar, user agent and address) signed in as `email`."""
    clock.advance(30)  # a fresh code: the previous one was used (security.md 16)
    other = Actor(app, app.test_client(), clock)
    other.client.environ_base.update({"HTTP_USER_AGENT": agent, "REMOTE_ADDR": ip})
    other.password_step(email)
    if secret is not None:
        other.code_step(other.code(secret))
    assert signed_in(other.client)
    return other


def kinds(app):
    with app.app_context():
        return [(e.kind, e.details) for e in AuditEvent.select().order_by(AuditEvent.id)]


@pytest.fixture
def alice(actor, secret):
    user = actor.user(secret=secret)
    actor.client.environ_base.update({"HTTP_USER_AGENT": "AliceLaptop/2.0", "REMOTE_ADDR": "198.51.100.7"})
    actor.sign_in(secret=secret)
    actor.clock.advance(30)
    return user


def test_settings_list_my_sessions_with_this_browser_marked(app, actor, alice, secret, clock):
    """security.md 30: created, last seen, IP and user agent of each live session; this one is marked."""
    browser(app, clock, secret=secret, agent="PhoneBrowser/9", ip="203.0.113.9")
    clock.advance(30)
    html = text(actor.client.get("/settings"))
    assert "Where you're signed in" in html
    assert "PhoneBrowser/9" in html and "203.0.113.9" in html
    assert "AliceLaptop/2.0" in html and "198.51.100.7" in html
    assert html.count("This browser</span>") == 1
    assert len(HANDLE_RE.findall(html)) == 1  # only the other browser can be signed out from here
    # This browser is in use now: its stored "last seen" is written after the page, at most every few minutes,
    # and showed a time up to half an hour old (a review of times). The other one's is its own.
    assert html.count("· in use now") == 1 and html.count("· last seen <time") == 1
    with app.app_context():
        for row in ServerSession.select():
            assert row.id not in html  # the page never shows the session's database key


def test_sessions_of_other_people_are_not_listed(app, actor, alice, secret, clock):
    """security.md 34: Bob's sessions never appear in Alice's list, and leave hers whole: her laptop (this
    browser) and her phone are there, and only the phone can be signed out from here. (An empty list would
    show no Bob either.)"""
    browser(app, clock, secret=secret, agent="PhoneBrowser/9", ip="203.0.113.9")
    actor.user("bob@example.com")
    browser(app, clock, email="bob@example.com", agent="BobBrowser/1", ip="192.0.2.44")
    html = text(actor.client.get("/settings"))
    assert "BobBrowser/1" not in html and "192.0.2.44" not in html
    assert html.count("This browser</span>") == 1
    assert re.search(r"<strong>AliceLaptop/2\.0</strong> <span class=\"badge on\">This browser</span>", html)
    assert "<strong>PhoneBrowser/9</strong>" in html and "203.0.113.9" in html
    assert len(HANDLE_RE.findall(html)) == 1  # Alice's phone; nothing of Bob's to sign out


@pytest.mark.parametrize("htmx", [False, True])
def test_a_stale_session_cannot_sign_the_others_out(app, actor, alice, secret, clock, htmx):
    """ASVS 4 3.3.4: ending sessions needs a sign-in from the last 10 minutes, like the 2FA changes. Someone
    holding a stolen session must not sign its owner out everywhere (which also forgets the owner's known
    browsers, so their password throttle is the account's again). After re-authenticating it works."""
    other = browser(app, clock, secret=secret, agent="Other/1")
    clock.advance(11 * 60)
    assert signed_in(other.client)  # an active session: only this one is stale
    token = actor.csrf("/settings")
    handle = re.search(r'action="/settings/sessions/([^/"]+)/end"', text(actor.client.get("/settings"))).group(1)
    for url in ("/settings/sessions/end-others", f"/settings/sessions/{handle}/end"):
        r = actor.client.post(url, data={"csrf_token": token}, headers=HX if htmx else {})
        where = r.headers.get("HX-Redirect") if htmx else r.headers.get("Location")
        assert (r.status_code, where) == ((401 if htmx else 302), "/reauth?next=/settings"), url
    assert signed_in(other.client)
    assert "sessions_ended" not in kinds(app)
    r = actor.post_form("/reauth?next=/settings", {"password": PASSWORD, "code": actor.code(secret)})
    assert r.headers["Location"] == "/settings"
    # The page it comes back to says that the sign-out was not done: with nothing said, it seemed to have
    # worked (a review). Once; and the last action asked for is the one said.
    page = text(actor.client.get("/settings"))
    assert page.count("but that browser was not signed out yet: sign it out again.") == 1 and "You confirmed it" in page
    assert "other browsers were not signed out" not in page
    assert "was not signed out yet" not in text(actor.client.get("/settings"))
    actor.post_form("/settings/sessions/end-others", {}, form_url="/settings")
    assert not signed_in(other.client)
    # Confirmed for another page than the one the action comes back to (the note is not about it): not said.
    clock.advance(11 * 60)
    actor.client.post("/settings/sessions/end-others", data={"csrf_token": actor.csrf("/settings")})
    actor.client.post("/settings/password", data={"csrf_token": actor.csrf("/settings")})
    r = actor.post_form("/reauth?next=/settings", {"password": PASSWORD, "code": actor.code(secret, 1)})
    assert r.headers["Location"] == "/settings" and "yet:" not in text(actor.client.get("/settings"))


@pytest.mark.parametrize("htmx", [False, True])
def test_sign_out_everywhere_else_ends_every_other_session(app, actor, alice, secret, clock, htmx):
    """security.md 30, 35: the other browsers are signed out server-side at once; this one stays; audited."""
    others = [browser(app, clock, secret=secret, agent=f"Other/{i}") for i in range(2)]
    clock.advance(30)
    captured = [o.session_cookie() for o in others]
    r = actor.post_form("/settings/sessions/end-others", {}, form_url="/settings", headers=HX if htmx else {})
    if htmx:
        assert r.status_code == 200 and 'id="sessions"' in text(r) and "Signed out on 2 other browsers." in text(r)
        assert "<html" not in text(r)
        # the Security activity comes along out of band, already listing what was just done
        activity = text(r).split('id="security-activity" hx-swap-oob="true"', 1)
        assert len(activity) == 2 and "Signed out on other browsers" in activity[1]
    else:
        assert r.status_code == 302 and r.headers["Location"] == "/settings"
        assert "Signed out on 2 other browsers." in text(actor.client.get("/settings"))
    assert signed_in(actor.client)
    for other, cookie in zip(others, captured):
        assert not signed_in(other.client)
        replay = app.test_client()
        replay.set_cookie(app.session_interface.get_cookie_name(app), cookie)
        assert not signed_in(replay)
    from webapp.models import KnownBrowser
    from webapp.sessions import token_hash

    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == alice.id).count() == 1
        # the other browsers are no longer known either (their own password throttle goes; forgotten, they keep
        # the contact form's allowance alone); this one is
        [kept] = KnownBrowser.select().where((KnownBrowser.user == alice.id) & KnownBrowser.forgotten_at.is_null())
        assert kept.id == token_hash(actor.client.get_cookie("twostep_known").value)
    assert ("sessions_ended", {"count": 2, "reason": "signed out everywhere else"}) in kinds(app)


def test_sign_out_everywhere_else_is_all_or_nothing(app, actor, alice, secret, clock, monkeypatch):
    """security.md 30, 42: the other sessions, their browsers' own throttles and the record commit together.
    They were three commits (a code reader's review): the record failing left the browsers signed out with
    nothing in the audit log. Now nothing changes and the person sees the 503 page."""
    from webapp.models import KnownBrowser

    from .conftest import failing_audit

    other = browser(app, clock, secret=secret, agent="Other/1")
    with app.app_context():
        known = KnownBrowser.select().where(KnownBrowser.user == alice.id).count()

    failing_audit(monkeypatch, "webapp.settings")
    r = actor.post_form("/settings/sessions/end-others", {}, form_url="/settings")
    assert r.status_code == 503
    monkeypatch.undo()
    assert signed_in(other.client)
    with app.app_context():
        assert KnownBrowser.select().where(KnownBrowser.user == alice.id).count() == known == 2
    assert not any(kind == "sessions_ended" for kind, _ in kinds(app))


def test_sign_out_everywhere_else_alone_is_harmless(app, actor, alice):
    r = actor.post_form("/settings/sessions/end-others", {}, form_url="/settings")
    assert r.status_code == 302
    assert "You were not signed in anywhere else." in text(actor.client.get("/settings"))
    assert signed_in(actor.client)


def test_sign_out_one_other_browser(app, actor, alice, secret, clock):
    """security.md 30: one chosen session ends; the others and this one go on."""
    phone = browser(app, clock, secret=secret, agent="Phone/1")
    clock.advance(30)
    tablet = browser(app, clock, secret=secret, agent="Tablet/1")
    html = text(actor.client.get("/settings"))
    phone_handle = re.search(r'Phone/1</strong>.*?action="/settings/sessions/([0-9a-f]+)/end"', html, re.S).group(1)
    r = actor.post_form(f"/settings/sessions/{phone_handle}/end", {}, form_url="/settings")
    assert r.status_code == 302
    assert not signed_in(phone.client)
    assert signed_in(tablet.client) and signed_in(actor.client)
    assert ("sessions_ended", {"count": 1, "reason": "signed out one other browser"}) in kinds(app)


@pytest.mark.parametrize("htmx", [False, True])
def test_cannot_sign_out_another_persons_session(app, actor, alice, clock, htmx):
    """security.md 34 (IDOR): Bob's session handle in Alice's request gets exactly the answer of a handle that
    matches nothing ("already ended"), and Bob stays signed in."""
    from webapp.settings import session_handle

    actor.user("bob@example.com")
    bob = browser(app, clock, email="bob@example.com")
    bob_handle = session_handle(token_hash(bob.session_cookie()))
    headers = HX if htmx else {}
    answers = []
    for handle in (bob_handle, "0" * 32):
        r = actor.post_form(f"/settings/sessions/{handle}/end", {}, form_url="/settings", headers=headers)
        answers.append((r.status_code, r.headers.get("Location"), text(r).replace(handle, "HANDLE")))
    assert answers[0] == answers[1]
    assert signed_in(bob.client)
    actor.post_form("/settings/sessions/end-others", {"user_id": "2"}, form_url="/settings")
    assert signed_in(bob.client)  # a user_id field does not pick whose sessions end
    assert ("sessions_ended", {"count": 1, "reason": "signed out one other browser"}) not in kinds(app)


@pytest.mark.parametrize("htmx", [False, True])
def test_a_session_that_ended_meanwhile_says_so_and_refreshes_the_list(app, actor, alice, secret, clock, htmx):
    """The "Sign out" button of a browser that has signed out since (or was ended in another tab) answers
    with the up-to-date list and says the session had already ended, instead of a "Not Found" page."""
    other = browser(app, clock, secret=secret, agent="GoneBrowser/1")
    html = text(actor.client.get("/settings"))
    [handle] = HANDLE_RE.findall(html)
    other.client.post("/logout", data={"csrf_token": csrf_from(text(other.client.get("/settings")))})
    r = actor.post_form(f"/settings/sessions/{handle}/end", {}, form_url="/settings", headers=HX if htmx else {})
    if htmx:
        assert r.status_code == 200 and text(r).lstrip().startswith('<section class="card"')
        page = text(r)
    else:
        assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
        page = text(actor.client.get("/settings"))
    assert "That session had already ended." in page and "GoneBrowser/1" not in _sessions_section(page)
    assert signed_in(actor.client)


def test_logging_out_deletes_the_unconfirmed_key_set_up_in_that_session(app, actor):
    """security.md 8, 30: logging out destroys the server-side session, and with it the authenticator key a
    set-up started there and never confirmed (its row goes with the session's: ON DELETE CASCADE, which SQLite
    enforces only with its foreign_keys pragma on). The secret does not wait in the database for the purge."""
    from webapp.models import PendingEnrolment

    actor.user()
    assert actor.password_step().headers["Location"] == "/settings"  # no 2FA yet: signed in
    assert actor.post_form("/settings/2fa/start", {}, form_url="/settings").status_code == 303
    with app.app_context():
        assert PendingEnrolment.select().count() == 1
    assert actor.post_form("/logout", {}, form_url="/settings").status_code == 302
    with app.app_context():
        assert ServerSession.select().count() == 0 and PendingEnrolment.select().count() == 0


def test_a_set_up_started_just_as_the_session_ends_elsewhere_says_signed_out(app, actor, monkeypatch):
    """security.md 30: "Set up" pressed at the moment this session is signed out from another browser: by the
    time the new key would be stored under the session, its row has gone. The answer is the plain 401 page
    (a title and words a person understands, not Werkzeug's "Unauthorized" text), and no key is stored."""
    from webapp.models import PendingEnrolment, User

    actor.user()
    actor.password_step()
    token = actor.csrf("/settings")
    lock = User.lock

    def signed_out_meanwhile(user_id):
        lock(user_id)
        ServerSession.delete().execute()  # what "Sign out everywhere else" in another browser commits

    monkeypatch.setattr(User, "lock", staticmethod(signed_out_meanwhile))
    r = actor.client.post("/settings/2fa/start", data={"csrf_token": token})
    page = text(r)
    assert r.status_code == 401
    assert "<h1>Signed out</h1>" in page and "Your session has ended. Sign in again to go on." in page
    with app.app_context():
        assert PendingEnrolment.select().count() == 0


def test_this_browser_is_not_ended_by_its_handle(app, actor, alice):
    """Ending your own session goes through Log out; the handle of this browser changes nothing."""
    from webapp.settings import session_handle

    handle = session_handle(token_hash(actor.session_cookie()))
    r = actor.post_form(f"/settings/sessions/{handle}/end", {}, form_url="/settings")
    assert r.status_code == 302 and signed_in(actor.client)


@pytest.mark.parametrize("url", ["/settings/sessions/end-others", "/settings/sessions/" + "0" * 32 + "/end"])
def test_session_actions_need_post_and_a_csrf_token(app, actor, alice, secret, clock, url):
    """security.md 33: GET is 405; a POST without a token or from another origin is refused and ends nothing."""
    other = browser(app, clock, secret=secret)
    assert actor.client.get(url).status_code == 405
    assert actor.client.post(url, data={}).status_code == 400
    r = actor.post_form(url, {}, form_url="/settings", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert signed_in(other.client)


def test_anonymous_and_pending_sessions_cannot_end_sessions(app, actor, secret, clock):
    """security.md 21: the pending state (password only) cannot reach the session actions."""
    actor.user(secret=secret)
    other = browser(app, clock, secret=secret)
    actor.password_step()
    r = actor.post_form("/settings/sessions/end-others", {}, form_url="/login/verify")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert signed_in(other.client)


def test_the_most_recently_used_session_is_listed_first(app, actor, alice, secret, clock):
    """security.md 30: the list goes by last use, not by sign-in: a phone signed in before the tablet but used
    since comes first."""
    phone = browser(app, clock, secret=secret, agent="Phone/1")
    browser(app, clock, secret=secret, agent="Tablet/1")
    clock.advance(120)
    assert signed_in(phone.client)
    clock.advance(120)
    sessions = _sessions_section(text(actor.client.get("/settings")))
    assert sessions.index("Phone/1") < sessions.index("Tablet/1")


def test_a_session_that_ends_while_it_is_signed_out_here_records_nothing(app, actor, alice, secret, clock,
                                                                         monkeypatch):
    """security.md 43: a Sign out of one other browser whose session ended by itself meanwhile (signed out
    there, between this request finding it and deleting it) writes no "sessions ended" record: none ended."""
    from webapp import settings

    other = browser(app, clock, secret=secret, agent="Leaving/1")
    html = text(actor.client.get("/settings"))
    [handle] = HANDLE_RE.findall(html)
    real_lock = settings.User.lock

    def signed_out_there_meanwhile(user_id):
        ServerSession.delete().where(ServerSession.id == token_hash(other.session_cookie())).execute()
        return real_lock(user_id)

    monkeypatch.setattr(settings.User, "lock", signed_out_there_meanwhile)
    r = actor.post_form(f"/settings/sessions/{handle}/end", {}, form_url="/settings")
    monkeypatch.undo()
    assert r.status_code == 302 and not signed_in(other.client) and signed_in(actor.client)
    assert [k for k, _ in kinds(app) if k == "sessions_ended"] == []


def test_expired_sessions_are_not_listed(app, actor, alice, secret, clock):
    """security.md 30: a session idle past the timeout is gone from the list (and from the server)."""
    browser(app, clock, secret=secret, agent="Forgotten/1")
    assert "Forgotten/1" in _sessions_section(text(actor.client.get("/settings")))
    clock.advance(20 * 60)
    actor.client.get("/settings")
    clock.advance(20 * 60)  # 40 min idle for the other browser, 20 for this one
    # (Security activity still names its sign-in's browser: only the list is looked at)
    assert "Forgotten/1" not in _sessions_section(text(actor.client.get("/settings")))


@pytest.mark.parametrize("ua,label", [
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0", "Firefox on Windows"),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.5 Mobile/15E148 Safari/604.1", "Safari on iPhone"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0 Safari/537.36 Edg/126.0", "Edge on macOS"),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/156.0 Safari/537.36",
     "Headless Chrome on Linux"),
    ("curl/8.5.0", "curl/8.5.0"),
    ("B" * 80, "B" * 60),  # an unknown one is named by its start, not by a line that overflows the list
    ("", "Unknown browser"),
    # gunicorn lets C1 controls through in a header: shown as they were, they could restyle a terminal that
    # prints an audit record (a Unicode review)
    ("Mozilla\x9b2J\x9b31mEvil/1.0", "Mozilla2J31mEvil/1.0"),
    ("\x9b\x9b", "Unknown browser"),
])
def test_sessions_list_names_browsers_readably(ua, label):
    from webapp.sessions import browser_label

    assert browser_label(ua) == label


def test_the_signed_in_person_comes_with_the_session_row(app, actor, alice, monkeypatch):
    """One query reads the session and its person (an outer join: an anonymous session reads None);
    flask-login takes the person from it. User Settings then runs no separate query for the account, and a
    change to the account made in another request shows on the next page."""
    from webapp.db import db
    from webapp.models import User

    statements = []
    original = db.obj.execute_sql
    monkeypatch.setattr(db.obj, "execute_sql", lambda sql, params=None: statements.append(sql) or
                        original(sql, params))
    html = text(actor.client.get("/settings"))
    assert "alice@example.com" in html
    user_reads = [s for s in statements if re.search(r'FROM "user" AS "t1" WHERE', s)]
    assert user_reads == [] and any('LEFT OUTER JOIN "user"' in s for s in statements)
    with app.app_context():
        User.update(email="alice.new@example.com").where(User.id == alice.id).execute()
    assert "alice.new@example.com" in text(actor.client.get("/settings"))
    halfway = Actor(app, app.test_client(), actor.clock)  # a session row with no person yet
    halfway.password_step("alice.new@example.com")
    assert "Verification code" in text(halfway.client.get("/login/verify"))
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user.is_null()).count() == 1


def test_visitors_who_store_nothing_get_a_cookie_but_no_row(app, actor, secret, clock):
    """Anonymous page views write no session row: before, anyone could add rows (and fill the disk) at
    hundreds a second until the idle purge. The sign-in form's CSRF token is bound to the cookie without
    storage; the row comes with the first thing worth storing (the password step's challenge), under a new
    token that the visitor did not choose (security.md 26: the pre-login cookie then carries nothing)."""
    actor.user(secret=secret)
    name = app.session_interface.get_cookie_name(app)
    visitor = app.test_client()
    first = visitor.get("/login")
    assert first.status_code == 200 and f"{name}=" in first.headers["Set-Cookie"]
    anonymous_token = visitor.get_cookie(name).value
    again = visitor.get("/login")
    assert "Set-Cookie" not in again.headers  # the same cookie, the same token in the form
    assert csrf_from(text(again)) == csrf_from(text(first))
    wrong = visitor.post("/login", data={"csrf_token": csrf_from(text(first)), "email": "alice@example.com",
                                         "password": "not the password"})
    assert wrong.status_code == 200 and "Incorrect email address or password." in text(wrong)
    with app.app_context():
        assert ServerSession.select().count() == 0

    # The token works only with the cookie it was made for: another visitor's, or a made-up cookie, is refused.
    stranger = app.test_client()
    stranger.get("/login")
    stolen = stranger.post("/login", data={"csrf_token": csrf_from(text(first)), "email": "alice@example.com",
                                           "password": PASSWORD})
    assert stolen.status_code == 400 and "Form expired" in text(stolen)
    chosen = app.test_client()
    chosen.set_cookie(name, "A" * 43)
    assert chosen.post("/login", data={"csrf_token": csrf_from(text(first)), "email": "alice@example.com",
                                       "password": PASSWORD}).status_code == 400
    with app.app_context():
        assert ServerSession.select().count() == 0 and not AuditEvent.select().where(
            AuditEvent.kind == "password_accepted").exists()

    clock.advance(3600)  # past the wait that the wrong password started
    accepted = visitor.post("/login", data={"csrf_token": csrf_from(text(first)), "email": "alice@example.com",
                                            "password": PASSWORD})
    assert accepted.status_code == 302 and accepted.headers["Location"].endswith("/login/verify")
    stored_token = visitor.get_cookie(name).value
    assert stored_token != anonymous_token
    with app.app_context():
        assert [row.id for row in ServerSession.select()] == [token_hash(stored_token)]
    assert "Verification code" in text(visitor.get("/login/verify"))


# ---------------------------------------------------------------- a page left open past the session's end


@pytest.mark.parametrize("how", ["idle", "idle, then purged", "signed out elsewhere"])
def test_a_page_opened_after_the_session_ended_says_why_on_the_sign_in_page(actor, app, clock, secret, how):
    """security.md 30: a person whose session ended (left idle, or signed out in another browser) and who opens
    a page again lands on the sign-in page with the reason, and comes back to that page after signing in.
    Without it the sign-in page appeared with no word of why. Their cookie carries the signed-in mark
    (sessions.SIGNED_IN_MARK), which is all that is left once the row is gone; nothing new is stored."""
    from webapp.clock import now
    from webapp.models import purge_expired

    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    assert actor.session_cookie().startswith("s.")
    if how.startswith("idle"):
        clock.advance(31 * 60)
        if how.endswith("purged"):
            with app.app_context():
                assert purge_expired(app.config, now())[0] == 1
    else:
        with app.app_context():
            ServerSession.delete().execute()  # what "Sign out everywhere else" or Change password elsewhere does
    r = actor.client.get("/settings")
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=session-ended&next=/settings"
    assert "Your session has ended (after 30 minutes without activity" in text(actor.client.get(r.headers["Location"]))
    r = actor.client.get("/settings", headers=HX)
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/login?notice=session-ended&next=/settings"
    with app.app_context():
        assert ServerSession.select().count() == 0


def test_a_visitor_who_never_signed_in_gets_the_sign_in_page_without_a_reason(actor, app, secret):
    """Only a session that was signed in has ended: a visitor with the cookie of the sign-in page, or of a
    sign-in that stopped at the code step, is sent to sign in with no "session ended" notice."""
    actor.user(secret=secret)
    actor.client.get("/login")  # the sign-in page's row-less cookie
    assert actor.session_cookie() and not actor.session_cookie().startswith("s.")
    r = actor.client.get("/settings")
    assert r.status_code == 302 and r.headers["Location"] == "/login?next=/settings"
    actor.password_step()  # at the code step: a row, but nobody signed in yet
    assert not actor.session_cookie().startswith("s.")
    with app.app_context():
        ServerSession.delete().execute()  # the step ran out and was purged
    r = actor.client.get("/settings")
    assert r.status_code == 302 and r.headers["Location"] == "/login?next=/settings"


def test_log_out_after_the_idle_timeout_still_logs_out(actor, app, clock):
    """A tab left open past the idle timeout: Log out takes the person to the sign-in page with the usual
    message, not to a "Form expired" error (the session ended already; there is nothing left to protect)
    (security.md 30)."""
    actor.user()
    actor.sign_in()
    token = actor.csrf("/settings")
    clock.advance(31 * 60)
    r = actor.client.post("/logout", data={"csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"] == "/login?notice=logged-out"
    assert "You are logged out." in text(actor.client.get(r.headers["Location"]))
    with app.app_context():
        assert ServerSession.select().count() == 0  # nothing was written to carry the message


@pytest.mark.parametrize("htmx", [True, False])
def test_a_form_sent_after_the_session_ended_asks_to_sign_in_again(actor, app, clock, secret, htmx):
    """Any signed-in form sent after the session ended (idle timeout here) is refused and changes nothing;
    htmx gets 401 + HX-Redirect (a 4xx answer it would not show), a plain form a redirect, both to the
    sign-in page, which says why (security.md 30)."""
    from webapp.models import Device

    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    token = actor.csrf("/settings")
    clock.advance(31 * 60)
    with app.app_context():
        device = Device.get()
    r = actor.client.post(f"/settings/devices/{device.id}/rename",
                          data={"csrf_token": token, f"rename-{device.id}-name": "Stolen"}, headers=HX if htmx else {})
    target = r.headers["HX-Redirect"] if htmx else r.headers["Location"]
    assert r.status_code == (401 if htmx else 302) and target == "/login?notice=session-ended"
    assert "Your session has ended (after 30 minutes without activity" in text(actor.client.get(target))
    with app.app_context():
        assert Device.get().name == "Phone"


def test_a_stale_form_of_a_live_session_reloads_the_page_for_htmx_with_the_reason(actor, app):
    """htmx shows no 4xx answer: a refused token (a page from before a re-authentication in another tab)
    reloads the page (HX-Refresh) and the reloaded page says why; nothing changes."""
    actor.user()
    actor.sign_in()
    r = actor.client.post("/settings/sessions/end-others", data={"csrf_token": "not-the-token"}, headers=HX)
    assert r.status_code == 400 and r.headers["HX-Refresh"] == "true"
    page = text(actor.client.get("/settings"))
    assert "Form expired: This form was open too long" in page


def test_htmx_errors_of_visitors_without_a_row_write_nothing(app, client):
    """An htmx request that ends in an error reloads the page (HX-Refresh); its message is stored only in a
    session that has a row already, else anyone could fill the sessions table with HX-Request headers."""
    for _ in range(3):
        r = client.get("/no-such-page", headers=HX)
        assert r.status_code == 404 and r.headers["HX-Refresh"] == "true"
    with app.app_context():
        assert ServerSession.select().count() == 0


@pytest.mark.parametrize("ender", ["end-others", "end-one"])
def test_a_session_signed_out_while_it_re_authenticates_stays_signed_out(app, actor, alice, secret, clock,
                                                                          monkeypatch, ender):
    """security.md 30, 35: "Sign out everywhere else" (or "Sign out" on this one browser) pressed in another
    browser while this one is re-authenticating (a whole password hash long) ends it. Re-authentication
    gives the session a new row; it used to insert that row without looking whether the old one was still
    there, so this browser stayed signed in, with a fresh session, after the owner had signed it out."""
    import webapp.auth as auth_module

    other = browser(app, clock, secret=secret, agent="Owner/2")
    clock.advance(11 * 60)
    other.post_form("/reauth?next=/settings", {"password": PASSWORD, "code": other.code(secret)})
    page = text(other.client.get("/settings"))
    handle = HANDLE_RE.search(page).group(1)  # the only other session listed there: this browser's (actor's)
    original = auth_module.password_check

    def check_while_signed_out_elsewhere(user, password, **kw):
        result = original(user, password, **kw)
        url = "/settings/sessions/end-others" if ender == "end-others" else f"/settings/sessions/{handle}/end"
        r = other.client.post(url, data={"csrf_token": csrf_from(page)})
        assert r.status_code == 302, r.status_code
        return result

    monkeypatch.setattr(auth_module, "password_check", check_while_signed_out_elsewhere)
    clock.advance(30)
    r = actor.post_form("/reauth?next=/settings", {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302
    assert not signed_in(actor.client)
    with app.app_context():
        [left] = ServerSession.select().where(ServerSession.user == alice.id)
        assert left.id == token_hash(other.session_cookie())
    assert signed_in(other.client)


# ---------------------------------------------------------------- the cookie of a visitor who stores nothing


def test_answers_without_a_form_give_a_new_visitor_no_cookie(app, actor):
    """A visitor without a cookie gets one only with a page that binds a CSRF token to it (every full page:
    its forms and hx-headers). A redirect, an htmx error answer (HX-Refresh, no body) or a static file sets
    none: crawlers and health checks that follow redirects are not handed a session cookie each time."""
    actor.user("admin@example.com", admin=True)  # past the first run: / leads to the sign-in page
    for url, headers in (("/", {}), ("/settings", {}), ("/no-such-page", HX), ("/static/app.css", {})):
        r = app.test_client().get(url, headers=headers)
        r.close()  # the static file's handle
        assert r.status_code in (200, 302, 404), url
        assert "Set-Cookie" not in r.headers, url
    page = app.test_client().get("/login")  # the sign-in form does need it
    assert page.status_code == 200 and "Set-Cookie" in page.headers


def test_answers_that_set_the_session_cookie_vary_on_cookie(app, actor):
    """A shared cache must not hand one visitor's cookie (and the CSRF token bound to it) to another: every
    response that sets the session cookie says Vary: Cookie, the anonymous one and the one after sign-in."""
    actor.user()
    name = app.session_interface.get_cookie_name(app)
    first = actor.client.get("/login")
    assert f"{name}=" in first.headers["Set-Cookie"] and "Cookie" in first.vary
    signed = actor.password_step()
    assert signed.status_code == 302 and any(c.startswith(f"{name}=") for c in signed.headers.getlist("Set-Cookie"))
    assert "Cookie" in signed.vary


def _sessions_section(html):
    return html.split('id="sessions"', 1)[1].split("</section>", 1)[0]


def test_the_sessions_list_shows_the_address_each_session_signed_in_from(app, actor, secret, clock):
    """security.md 30: "Where you're signed in" names the address of each session (from the session row: the
    Security activity further down lists addresses too, so only this list is looked at)."""
    actor.user(secret=secret)
    actor.client.environ_base.update({"HTTP_USER_AGENT": "Laptop/1", "REMOTE_ADDR": "203.0.113.7"})
    actor.sign_in(secret=secret)
    sessions = _sessions_section(text(actor.client.get("/settings")))
    assert "Laptop/1" in sessions and "· from 203.0.113.7" in sessions
    with app.app_context():
        assert [row.ip for row in ServerSession.select()] == ["203.0.113.7"]


def test_a_session_past_the_absolute_limit_is_not_listed_however_recently_seen(app, actor, alice, secret, clock):
    """security.md 30: a session older than 12 h is over, even if it was used a minute ago: it is not listed
    as a place you're signed in (nor offered a Sign out button)."""
    from datetime import timedelta

    from webapp.clock import now

    other = browser(app, clock, secret=secret, agent="Ancient/1")
    clock.advance(60)
    with app.app_context():
        ServerSession.update(created_at=now() - timedelta(hours=12, minutes=1),
                             last_seen_at=now() - timedelta(minutes=1)).where(
            ServerSession.id == token_hash(other.session_cookie())).execute()
    html = text(actor.client.get("/settings"))
    assert "Ancient/1" not in _sessions_section(html) and HANDLE_RE.findall(html) == []
    assert "This is the only browser signed in to your account." in html


@pytest.mark.parametrize("field", ["last_seen_at", "created_at"])
def test_a_session_dated_further_ahead_than_its_limit_is_not_listed(app, actor, alice, secret, clock, field):
    """security.md 30: a session whose last use (or start) lies more than its idle (or absolute) limit ahead
    has ended (clock.expired: only a clock set back since writes such times), and using it signs it out. The
    list showed it all the same, with a Sign out button for a browser that was no longer signed in."""
    from datetime import timedelta

    from webapp.clock import now

    other = browser(app, clock, secret=secret, agent="FromTheFuture/1")
    ahead = timedelta(minutes=31) if field == "last_seen_at" else timedelta(hours=12, minutes=1)
    with app.app_context():
        ServerSession.update({getattr(ServerSession, field): now() + ahead}).where(
            ServerSession.id == token_hash(other.session_cookie())).execute()
    html = text(actor.client.get("/settings"))
    assert "FromTheFuture/1" not in _sessions_section(html) and HANDLE_RE.findall(html) == []
    assert not signed_in(other.client)


@pytest.mark.parametrize("limit", ["idle", "absolute"])
def test_a_session_exactly_at_its_limit_still_works_and_so_is_listed(app, actor, alice, secret, clock, limit):
    """security.md 30: a session lives up to its idle (30 min) and absolute (12 h) limit to the second
    (sessions.open_session ends it only beyond); one exactly at a limit still opens pages, so the list shows
    it with its Sign out button instead of hiding a browser that is still signed in."""
    from datetime import timedelta

    from webapp.clock import now

    other = browser(app, clock, secret=secret, agent="AtTheLimit/1")
    clock.advance(60)
    with app.app_context():
        at_limit = ({"last_seen_at": now() - timedelta(minutes=30)} if limit == "idle" else
                    {"created_at": now() - timedelta(hours=12), "last_seen_at": now() - timedelta(minutes=1)})
        ServerSession.update(**at_limit).where(ServerSession.id == token_hash(other.session_cookie())).execute()
    html = text(actor.client.get("/settings"))
    assert "AtTheLimit/1" in html and len(HANDLE_RE.findall(html)) == 1
    assert signed_in(other.client)  # (after the list was made: this request moves its last use on)


@pytest.mark.parametrize("htmx", [False, True])
def test_ending_exactly_one_other_session_says_browser_not_browsers(app, actor, alice, secret, clock, htmx):
    """"Sign out everywhere else" with one other browser signed in: the message is in the singular."""
    other = browser(app, clock, secret=secret, agent="Other/1")
    clock.advance(30)
    r = actor.post_form("/settings/sessions/end-others", {}, form_url="/settings", headers=HX if htmx else {})
    page = text(r) if htmx else text(actor.client.get("/settings"))
    assert "Signed out on 1 other browser." in page and "1 other browsers" not in page
    assert not signed_in(other.client)


# ---------------------------------------------------------------- where a refused request is sent (mutation testing)


def test_a_form_sent_without_a_signed_in_session_goes_to_sign_in_without_coming_back_to_it(actor, app):
    """A form for signed-in people sent by a visitor who is not signed in (with a valid token of their own)
    goes to the sign-in page with no `next`: after signing in, the browser would GET an address that only
    takes POST, and see "Not available this way"."""
    actor.user()
    token = actor.csrf("/login")
    r = actor.client.post("/settings/2fa/start", data={"csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"] == "/login"


def test_a_stale_confirmation_form_of_a_session_not_confirmed_is_form_expired(actor, app, secret):
    """security.md 9, 29: "Confirm it's you" sent with a token from before a renewal goes on (without asking
    again) only when the session is confirmed already, and then only to a same-site address; for a session
    that is not confirmed it is refused as an expired form, and nothing is confirmed."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    data = {"csrf_token": "not-the-token", "password": PASSWORD, "code": actor.code(secret)}
    r = actor.client.post("/reauth?next=/settings/password", data=data)
    assert r.status_code == 400 and "Form expired" in r.get_data(as_text=True)
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "reauthenticated").count() == 0
    token = actor.csrf("/reauth?next=/settings/password")
    confirmed = actor.client.post("/reauth?next=/settings/password",
                                  data={"csrf_token": token, "password": PASSWORD, "code": actor.code(secret)})
    assert confirmed.headers["Location"] == "/settings/password"
    r = actor.client.post("/reauth?next=//evil.example/x", data=data)  # confirmed now: goes on, but not off-site
    assert r.status_code == 302 and r.headers["Location"] == "/settings"


def test_a_session_is_kept_up_to_the_idle_limit_and_not_a_moment_longer(actor, app, secret):
    """security.md 30: 30 minutes without activity is allowed; beyond them the session has ended."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(30 * 60)
    assert actor.client.get("/settings").status_code == 200
    actor.clock.advance(30 * 60 + 1)
    r = actor.client.get("/settings")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login?notice=session-ended")


def test_the_idle_limit_counts_from_the_last_request_to_the_minute(actor, app, secret):
    """security.md 30: the idle time runs from the last request (the row records it at most once a minute),
    not from an older one: a page opened 5 minutes after signing in keeps the session until 30 minutes after
    that page."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    assert actor.client.get("/settings").status_code == 200  # (its first page stores the form token: a write)
    actor.clock.advance(5 * 60)
    assert actor.client.get("/settings").status_code == 200  # changes nothing in the session
    actor.clock.advance(29 * 60)
    assert actor.client.get("/settings").status_code == 200


def test_a_session_deleted_while_its_request_runs_is_not_written_back(actor, app, secret, monkeypatch):
    """A session signed out from elsewhere while one of its requests runs (Support's disable, "Sign out
    everywhere else") is not written back when the request ends: the row stays gone, the answer leaves the
    cookie alone (it would delete the cookie of a session another tab has just renewed: the test below), and
    the browser's next request finds no session and is told that it ended."""
    import webapp.settings as settings_module

    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    original = settings_module._row_context

    def signed_out_meanwhile(user, **kwargs):
        with app.app_context():
            ServerSession.delete().execute()
        from flask import session

        session["touched"] = "yes"  # something to write back
        return original(user, **kwargs)

    monkeypatch.setattr(settings_module, "_row_context", signed_out_meanwhile)
    r = actor.client.get("/settings")
    assert not [h for h in r.headers.getlist("Set-Cookie") if h.startswith("twostep_session=")]
    with app.app_context():
        assert ServerSession.select().count() == 0
    monkeypatch.undo()
    r = actor.client.get("/settings")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login?notice=session-ended")


def test_a_refusal_racing_a_new_password_in_another_tab_keeps_the_browser_signed_in(actor, app, secret, clock,
                                                                                      monkeypatch):
    """Two tabs of one browser (one cookie): Turn off is refused without JavaScript (a wrong password) while
    the other tab's Change password renews the session. The refusal is kept in the session row for the page
    its 303 leads to, and that row has gone with the renewal: the refused request's answer deleted the
    cookie, the renewed session's, and the browser was signed out (a review). Now it keeps the new one."""
    import threading

    import webapp.settings as settings_module

    new = "a brand new password 123"
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    clock.advance(30)
    token = csrf_from(actor.client.get("/settings").get_data(as_text=True))
    password_token = csrf_from(actor.client.get("/settings/password").get_data(as_text=True))
    check, other_tab = settings_module.password_check, {}

    def other_tab_changes_the_password_meanwhile(*args, **kwargs):
        if not other_tab:
            other_tab["started"] = True
            tab = threading.Thread(target=lambda: other_tab.setdefault("answer", actor.client.post(
                "/settings/password", data={"csrf_token": password_token, "current": PASSWORD, "new": new,
                                            "confirm": new})))
            tab.start()
            tab.join()
        return check(*args, **kwargs)

    monkeypatch.setattr(settings_module, "password_check", other_tab_changes_the_password_meanwhile)
    refused = actor.client.post("/settings/2fa/disable", data={"csrf_token": token, "off-password": "wrong",
                                                               "off-code": "123456"})
    monkeypatch.undo()
    assert other_tab["answer"].status_code == 302  # the password was changed, the session renewed
    assert refused.status_code == 303
    assert not [h for h in refused.headers.getlist("Set-Cookie") if h.startswith("twostep_session=")]
    page = actor.client.get("/settings")
    assert page.status_code == 200 and "Signed in as" in page.get_data(as_text=True)
    with app.app_context():
        assert ServerSession.select().count() == 1


def _all_rows(app):
    from webapp.models import ALL_MODELS

    with app.app_context():
        return {m.__name__: sorted(map(repr, m.select().tuples())) for m in ALL_MODELS}


def test_a_nul_in_the_user_agent_is_refused_and_changes_nothing(app, actor):
    """A new session's row keeps the browser's User-Agent, and PostgreSQL cannot store NUL in text: a sign-in
    from a browser whose header held one ended in a 500 there (gunicorn refuses such a header itself,
    another server may pass it on). It is refused like a NUL in a form: 400 with the reason, nothing
    stored, the password not even looked at."""
    actor.user()
    token = actor.csrf("/login")
    before = _all_rows(app)
    r = actor.client.post("/login", data={"csrf_token": token, "email": "alice@example.com", "password": PASSWORD},
                          headers={"User-Agent": "Mozilla/5.0\x00 (X11)"})
    assert r.status_code == 400 and "not allowed (NUL)" in r.get_data(as_text=True)
    assert _all_rows(app) == before
    r = actor.client.post("/login", data={"csrf_token": token, "email": "alice@example.com", "password": PASSWORD},
                          headers={"User-Agent": "Mozilla/5.0 (X11)"})
    assert r.status_code == 302 and r.headers["Location"] == "/settings"


def test_a_long_forwarded_client_address_is_stored_cut_to_its_column(tmp_path, clock):
    """Behind a proxy, the client address is the X-Forwarded-For entry PROXY_HOPS from the end; with one hop
    too many counted, the client writes it. A new session's row took it whole, and PostgreSQL refused a
    value longer than the column (64): every sign-in through such a header ended in a 500 there. It is cut
    as for audit records and counters; a NUL in it is refused like one in a form."""
    import os

    from webapp.db import db
    from webapp.models import ALL_MODELS

    from .conftest import make_test_app

    url = os.environ.get("TEST_DATABASE_URL") or f"sqlite:///{tmp_path / 'proxy.db'}"
    app = make_test_app(tmp_path, url, clock, PROXY_HOPS=1)
    try:
        a = Actor(app, app.test_client(), clock)
        a.user()
        token = a.csrf("/login")
        form = {"csrf_token": token, "email": "alice@example.com", "password": PASSWORD}
        before = _all_rows(app)
        r = a.client.post("/login", data=form, headers={"X-Forwarded-For": "203.0.113.7\x00"})
        assert r.status_code == 400 and "not allowed (NUL)" in r.get_data(as_text=True)
        assert _all_rows(app) == before
        r = a.client.post("/login", data=form, headers={"X-Forwarded-For": "203.0.113.7, " + "a" * 300})
        assert r.status_code == 302 and r.headers["Location"] == "/settings"
        with app.app_context():
            assert [s.ip for s in ServerSession.select()] == ["a" * 64]
            assert AuditEvent.get(AuditEvent.kind == "signin").ip == "a" * 64
    finally:
        if url.startswith("postgres"):
            with db.connection_context():
                db.drop_tables(ALL_MODELS, cascade=True)
        db.close()
