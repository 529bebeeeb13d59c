"""The idle warning (WCAG 2.2.1 Timing Adjustable): every signed-in page says how long its session has left,
htmx answers say it again, and "Stay signed in" (/session/extend) counts the session as used now. A session
that has ended stays ended."""
import re

import pytest

from webapp.db import db
from webapp.models import ServerSession
from webapp.sessions import token_hash

from .conftest import csrf_from

HX = {"HX-Request": "true"}
IDLE, ABSOLUTE = 30 * 60, 12 * 3600


def text(response):
    return response.get_data(as_text=True)


def page_timer(response):
    """The seconds the page gives app.js: (left, absolute)."""
    html = text(response)
    left = re.search(r'data-seconds-left="(\d+)"', html)
    absolute = re.search(r'data-absolute-seconds-left="(\d+)"', html)
    assert left and absolute, "the page carries no idle timer"
    return int(left.group(1)), int(absolute.group(1))


def header_timer(response):
    """The seconds an htmx answer gives app.js: (left, absolute)."""
    return int(response.headers["Session-Seconds-Left"]), int(response.headers["Session-Absolute-Seconds-Left"])


def last_seen(app, actor):
    """The session row's last_seen_at, as a Unix time (the test clock's scale)."""
    from datetime import timezone

    with app.app_context():
        row = ServerSession.get(ServerSession.id == token_hash(actor.session_cookie()))
        return row.last_seen_at.replace(tzinfo=timezone.utc).timestamp()


def session_rows(app):
    with app.app_context():
        return ServerSession.select().count()


@pytest.fixture
def signed_in(actor, clock):
    """Alice, signed in with her password (no 2FA) at the clock's start; returns the sign-in time."""
    actor.user()
    r = actor.sign_in()
    assert r.headers["Location"] == "/settings"
    actor.client.get("/settings")  # the first page stores the session's CSRF token, which writes the row
    return clock.t


def test_a_page_says_the_seconds_left_after_its_own_touch(app, actor, clock, signed_in):
    """Within a minute of the last write the server does not write last_seen_at again, so the page counts from
    the old one; later, the request itself moved the end on, so a whole 30 minutes are left."""
    clock.advance(50)
    r = actor.client.get("/settings")
    assert page_timer(r) == (IDLE - 50, ABSOLUTE - 50)
    assert last_seen(app, actor) == signed_in
    clock.advance(10 * 60)  # 10:50 after the last write
    r = actor.client.get("/settings")
    assert page_timer(r) == (IDLE, ABSOLUTE - 650)
    assert last_seen(app, actor) == clock.t
    html = text(r)
    assert 'data-idle-minutes="30"' in html and 'data-absolute-hours="12"' in html
    assert 'data-login-url="/login"' in html


def test_pages_without_a_signed_in_session_have_no_timer(actor):
    actor.user()
    r = actor.client.get("/login")
    assert r.status_code == 200 and "Log in" in text(r)
    assert "idle-warning" not in text(r) and "Stay signed in" not in text(r)


def test_htmx_answers_say_the_seconds_left_after_their_own_touch(app, actor, clock, signed_in):
    clock.advance(30)
    r = actor.client.get("/settings", headers=HX)
    assert header_timer(r) == (IDLE - 30, ABSOLUTE - 30)
    clock.advance(5 * 60)
    r = actor.client.get("/settings", headers=HX)
    assert header_timer(r) == (IDLE, ABSOLUTE - 330)
    assert "Session-Seconds-Left" not in actor.client.get("/settings").headers  # pages carry it in the body


def test_stay_signed_in_writes_last_seen_now_even_within_a_minute(app, actor, clock, signed_in, monkeypatch):
    """The button's press moves the end on at once, with one write; the next request within a minute writes
    nothing more."""
    token = csrf_from(text(actor.client.get("/settings")))
    clock.advance(50)
    statements = []
    original = db.obj.execute_sql
    monkeypatch.setattr(db.obj, "execute_sql", lambda sql, params=None: statements.append(sql) or
                        original(sql, params))
    r = actor.client.post("/session/extend", data={"csrf_token": token}, headers=HX)
    assert r.status_code == 204 and text(r) == ""
    assert header_timer(r) == (IDLE, ABSOLUTE - 50)
    assert last_seen(app, actor) == clock.t
    assert len([s for s in statements if s.startswith('UPDATE "serversession"')]) == 1
    statements.clear()
    clock.advance(5)
    assert page_timer(actor.client.get("/settings")) == (IDLE - 5, ABSOLUTE - 55)
    assert not [s for s in statements if s.startswith(("UPDATE", "INSERT", "DELETE"))]


def test_stay_signed_in_without_javascript_goes_back_to_its_page(app, actor, clock, signed_in):
    clock.advance(20)
    token = csrf_from(text(actor.client.get("/settings/password")))
    r = actor.client.post("/session/extend", data={"csrf_token": token, "next": "/settings/password"})
    assert r.status_code == 302 and r.headers["Location"] == "/settings/password"
    assert last_seen(app, actor) == clock.t
    r = actor.client.post("/session/extend", data={"csrf_token": token, "next": "//evil.example/"})
    assert r.headers["Location"] == "/settings"


@pytest.mark.parametrize("htmx", [True, False])
def test_an_idle_session_cannot_be_extended_or_revived(app, actor, clock, signed_in, htmx):
    token = csrf_from(text(actor.client.get("/settings")))
    clock.advance(IDLE + 1)
    r = actor.client.post("/session/extend", data={"csrf_token": token}, headers=HX if htmx else {})
    if htmx:
        assert r.status_code == 401 and r.headers["HX-Redirect"] == "/login?notice=session-ended"
        assert "Session-Seconds-Left" not in r.headers
    else:
        assert r.status_code == 302 and r.headers["Location"] == "/login?notice=session-ended"
    assert session_rows(app) == 0
    assert actor.client.get("/settings").status_code == 302  # still signed out
    assert session_rows(app) == 0


def test_a_visitor_who_never_signed_in_cannot_make_a_session_this_way(app, actor):
    actor.user()
    token = actor.csrf("/login")
    r = actor.client.post("/session/extend", data={"csrf_token": token}, headers=HX)
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/login"
    assert session_rows(app) == 0


def test_a_session_ended_while_the_press_is_on_its_way_stays_ended(app, actor, clock, signed_in, monkeypatch):
    """Signed out elsewhere between reading the session and writing it: no new row in its place."""
    token = csrf_from(text(actor.client.get("/settings")))
    interface = app.session_interface
    original = interface.open_session

    def open_then_end_elsewhere(flask_app, request):
        session = original(flask_app, request)
        if request.path == "/session/extend":
            ServerSession.delete().execute()
        return session

    monkeypatch.setattr(interface, "open_session", open_then_end_elsewhere)
    r = actor.client.post("/session/extend", data={"csrf_token": token}, headers=HX)
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/login?notice=session-ended"
    assert session_rows(app) == 0


def test_without_its_csrf_token_the_press_changes_nothing(app, actor, clock, signed_in):
    other = csrf_from(text(app.test_client().get("/login")))  # a token, but another browser's
    clock.advance(30)
    for data in ({}, {"csrf_token": other}):
        r = actor.client.post("/session/extend", data=data)
        assert r.status_code == 400 and "Form expired" in text(r)
    assert last_seen(app, actor) == signed_in


def test_the_twelve_hours_cap_the_time_left(app, actor, clock, signed_in):
    """Near the absolute end the page and the button's answer give what is left of the 12 hours, which the
    warning then says cannot be extended; after it, the press is refused."""
    for _ in range(35):  # in use all along: 700 minutes
        clock.advance(20 * 60)
        assert actor.client.get("/settings").status_code == 200
    clock.advance(5 * 60)  # 15 minutes before the end
    r = actor.client.get("/settings")
    assert page_timer(r) == (15 * 60, 15 * 60)
    token = csrf_from(text(r))
    clock.advance(60)
    r = actor.client.post("/session/extend", data={"csrf_token": token}, headers=HX)
    assert r.status_code == 204 and header_timer(r) == (14 * 60, 14 * 60)
    clock.advance(14 * 60 + 1)
    r = actor.client.post("/session/extend", data={"csrf_token": token}, headers=HX)
    assert r.status_code == 401
    assert session_rows(app) == 0
