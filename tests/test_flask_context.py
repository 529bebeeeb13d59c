"""What the app's own ways of doing Flask's, flask-login's and Flask-WTF's per-request work (read from the
request's context, not through Flask's proxies: webapp/flaskctx.py) must keep of theirs: where the CSRF token
may come from and what refuses it (security.md 33), the configured limits, and flask-login's session
protection once it is configured."""
import pytest

from webapp.models import AuditEvent

from .conftest import PASSWORD, make_test_app
from .test_auth import signed_in


def _password_post(actor, **kwargs):
    return actor.client.post("/login", **kwargs)


def test_the_csrf_token_is_taken_from_the_header_or_a_prefixed_field_as_flask_wtf_takes_it(actor):
    """security.md 33: the token of the session in the form field, the X-CSRFToken header or a field whose
    name ends in csrf_token (a prefixed form) is accepted; none, or another session's, is refused with the
    "Form expired" page and nothing is done."""
    actor.user()
    token = actor.csrf("/login")
    credentials = {"email": "alice@example.com", "password": PASSWORD}
    r = _password_post(actor, data=credentials, headers={"X-CSRFToken": token})
    assert r.status_code == 302 and r.headers["Location"] == "/settings"  # no device: signed in
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    assert not signed_in(actor.client)
    token = actor.csrf("/login")
    r = _password_post(actor, data={**credentials, "other-csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"] == "/settings"
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})

    stranger = actor.app.test_client()
    foreign = actor.csrf("/login")
    for refused in ({}, {"csrf_token": ""}, {"csrf_token": "not-a-token"}):
        r = stranger.post("/login", data={**credentials, **refused})
        assert r.status_code == 400 and "Form expired" in r.get_data(as_text=True)
    stranger.get("/login")  # a session of its own, with its own token
    r = stranger.post("/login", data={**credentials, "csrf_token": foreign})
    assert r.status_code == 400 and "Form expired" in r.get_data(as_text=True)
    assert not signed_in(stranger)
    with actor.app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "signin").count() == 2  # the two above only


def test_the_referer_check_over_https_applies_when_configured(tmp_path, clock):
    """Flask-WTF's WTF_CSRF_SSL_STRICT (off here: the app's Referrer-Policy: no-referrer leaves browsers no
    Referer to send) still refuses an HTTPS form post without a same-site Referer when an operator turns it
    on; the app's own CSRF hook leaves that check to Flask-WTF."""
    app = make_test_app(tmp_path, f"sqlite:///{tmp_path / 'strict.db'}", clock, WTF_CSRF_SSL_STRICT=True)
    from webapp.models import User
    from webapp.security import hash_password

    with app.app_context():
        User.create(email="alice@example.com", password_hash=hash_password(PASSWORD))
    browser = app.test_client()
    page = browser.get("/login", base_url="https://localhost").get_data(as_text=True)
    from .conftest import csrf_from

    form = {"csrf_token": csrf_from(page), "email": "alice@example.com", "password": PASSWORD}
    r = browser.post("/login", data=form, base_url="https://localhost")
    assert r.status_code == 400 and "Form expired" in r.get_data(as_text=True)
    r = browser.post("/login", data=form, base_url="https://localhost", headers={"Referer": "https://evil.example/"})
    assert r.status_code == 400
    r = browser.post("/login", data=form, base_url="https://localhost", headers={"Referer": "https://localhost/login"})
    assert r.status_code == 302 and r.headers["Location"] == "/settings"


def test_a_lower_body_limit_set_after_start_applies_to_the_next_request(actor, app):
    """MAX_CONTENT_LENGTH as the config says at each request (the app sets it on the request as it is made)."""
    actor.user()
    token = actor.csrf("/login")
    app.config["MAX_CONTENT_LENGTH"] = 512
    r = actor.client.post("/login", data={"csrf_token": token, "email": "alice@example.com", "password": PASSWORD,
                                          "padding": "x" * 600})
    assert r.status_code == 413
    assert not signed_in(actor.client)


@pytest.mark.parametrize("mode", [None, "strong"])
def test_flask_logins_session_protection_applies_only_when_configured(tmp_path, clock, mode):
    """Off by default (the server-side session is the protection: another User-Agent on the same cookie is
    still that session); an operator who sets SESSION_PROTECTION = "strong" gets flask-login's own check, which
    signs out a session whose browser's address or User-Agent changed."""
    app = make_test_app(tmp_path, f"sqlite:///{tmp_path / 'protect.db'}", clock,
                        **({"SESSION_PROTECTION": mode} if mode else {}))
    from webapp.models import User
    from webapp.security import hash_password

    from .conftest import csrf_from

    with app.app_context():
        User.create(email="alice@example.com", password_hash=hash_password(PASSWORD))
    browser = app.test_client()
    agent = {"User-Agent": "Firefox/1"}
    token = csrf_from(browser.get("/login", headers=agent).get_data(as_text=True))
    r = browser.post("/login", data={"csrf_token": token, "email": "alice@example.com", "password": PASSWORD},
                     headers=agent)
    assert r.status_code == 302
    assert browser.get("/settings", headers=agent).status_code == 200
    r = browser.get("/settings", headers={"User-Agent": "Chrome/2"})
    if mode is None:
        assert r.status_code == 200 and "User Settings" in r.get_data(as_text=True)
    else:
        assert r.status_code == 302 and "/login" in r.headers["Location"]


@pytest.mark.parametrize("mode", ["basic", "strong"])
def test_sessions_made_before_session_protection_is_turned_on_keep_working(tmp_path, clock, mode):
    """A sign-in stores flask-login's identifier of its browser although protection is off (as flask-login's
    login_user does): an operator who turns SESSION_PROTECTION on later neither signs out (strong) nor marks
    as not fresh (basic) the sessions made before, from the same browser."""
    app = make_test_app(tmp_path, f"sqlite:///{tmp_path / 'later.db'}", clock)
    from webapp.models import User
    from webapp.security import hash_password

    from .conftest import csrf_from

    with app.app_context():
        User.create(email="alice@example.com", password_hash=hash_password(PASSWORD))
    browser = app.test_client()
    token = csrf_from(browser.get("/login").get_data(as_text=True))
    browser.post("/login", data={"csrf_token": token, "email": "alice@example.com", "password": PASSWORD})
    app.config["SESSION_PROTECTION"] = mode
    r = browser.get("/settings")
    assert r.status_code == 200 and "User Settings" in r.get_data(as_text=True)
    with browser.session_transaction() as stored:
        assert stored["_fresh"] is True and stored["_user_id"]
