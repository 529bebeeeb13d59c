"""The admins' Support page: access rules, user search, and the time-boxed "temporarily disable 2FA"
cycle driven by the injected clock (security.md 37-41)."""
import json
import re
import unicodedata
from datetime import datetime, timedelta, timezone
from html import unescape

import pytest
from markupsafe import escape

from webapp.db import db, is_sqlite
from webapp.models import AuditEvent, Device, ServerSession, SupportRequest, User
from webapp.support import _request_numbers, search_users, user_search_query
from webapp.totp import encrypt_secret, new_secret

from .conftest import PASSWORD, Actor, csrf_from, prepared_statements

ADMIN = "boss@example.com"
HX = {"HX-Request": "true"}
DISABLE_LINK = ">Temporarily disable 2FA</a>"  # the light control in a search result row


def sign_in_admin(actor, secret, email=ADMIN):
    """An admin with 2FA who has just signed in with password and code."""
    admin = actor.user(email, admin=True, secret=secret)
    r = actor.sign_in(email, PASSWORD, secret)
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
    return admin


def disable(actor, target, reason="Identity checked by video call against ID card", duration="24h",
            ticket="SUP-1234", close_requests=True, headers=None):
    """Submit the per-person "Temporarily disable 2FA" form from the Support page."""
    p = f"u{target.id}-"
    data = {p + "reason": reason, p + "duration": duration, p + "ticket": ticket}
    if close_requests:
        data[p + "close_requests"] = "y"
        # The form says which requests the admin was shown (their numbers): read it as a browser would.
        shown = re.search(rf'name="{p}requests_shown" type="hidden" value="([\d,]*)"',
                          actor.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True))
        data[p + "requests_shown"] = shown.group(1) if shown else ""
    return actor.post_form(f"/support/users/{target.id}/disable-2fa", data, form_url="/support", headers=headers)


def end_window(actor, target, headers=None, reason=None):
    """Submit "End support window now" from the person's row, to the address its form has (it names the window
    the row shows); with no open window there is no form, and the bare address is sent."""
    data = {} if reason is None else {f"end{target.id}-reason": reason}
    return actor.post_form(_end_url(actor, target), data, form_url="/support", headers=headers)


def _end_url(actor, target):
    """The address of the person's "End support window now" form, as their row has it now."""
    row = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    found = re.search(rf'action="(/support/users/{target.id}/end-window\?window=\d+)"', row)
    return found.group(1) if found else f"/support/users/{target.id}/end-window"


def words(html):
    """The page's text without its tags (a heading's count sits in a span of its own)."""
    return re.sub(r"<[^>]+>", "", html)


def utc(t):
    """The naive UTC datetime the app stores for fake-clock time t."""
    return datetime.fromtimestamp(t, tz=timezone.utc).replace(tzinfo=None)


def fetch(app, model, *where):
    with app.app_context():
        query = model.select()
        if where:
            query = query.where(*where)
        return list(query)


def user_row(app, email):
    with app.app_context():
        return User.get(User.email == email)


def count(app, model, *where):
    return len(fetch(app, model, *where))


def second_client(app, clock):
    """Another browser: its own cookie jar."""
    return Actor(app, app.test_client(), clock)


@pytest.fixture
def target_secret():
    return new_secret()


@pytest.fixture
def target(actor, target_secret):
    """An ordinary person with one authenticator device."""
    return actor.user("carol@example.com", secret=target_secret)


# ---------------------------------------------------------------- access (security.md 37)


def test_anonymous_is_sent_to_sign_in(client):
    """security.md 37: nobody reaches the page without signing in."""
    r = client.get("/support")
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_anonymous_htmx_gets_hx_redirect(client):
    r = client.get("/support", headers=HX)
    assert r.status_code == 401 and "/login" in r.headers["HX-Redirect"]


def test_ordinary_user_gets_403(actor, secret):
    """security.md 37: an ordinary user, even with 2FA, gets 403."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    r = actor.client.get("/support")
    assert r.status_code == 403
    assert "<h1>Support</h1>" not in r.get_data(as_text=True)


def test_admin_without_2fa_gets_403_telling_them_to_set_it_up(actor):
    """security.md 37: admins need 2FA active before they may use the Support page."""
    actor.user(ADMIN, admin=True)
    actor.sign_in(ADMIN, PASSWORD)
    r = actor.client.get("/support")
    html = r.get_data(as_text=True)
    assert r.status_code == 403 and "<h1>Set up two-factor authentication first</h1>" in html
    assert re.search(r'<form method="get" action="/settings/2fa">\s*<button type="submit">Set up two-factor '
                     r'authentication</button>', html)  # the way on, not a bare "Forbidden"
    r = actor.client.get("/support/audit", headers={"HX-Request": "true"})
    assert r.status_code == 403 and r.headers["HX-Redirect"] == "/support"  # the whole page, not a flash
    assert "Forbidden" not in actor.client.get("/support").get_data(as_text=True)
    r = actor.post_form("/support/requests/1/handled", {}, form_url="/settings")
    assert r.status_code == 403 and "<h1>Set up two-factor authentication first</h1>" in r.get_data(as_text=True)


def test_open_requests_come_first_unless_the_page_is_for_one_person(app, actor, secret, target):
    """The requests are support's to-do list, so they lead the page; a page opened for one person (?q=, from
    "Show account" or after an action without JavaScript) shows that person, and any message, first."""
    with app.app_context():
        SupportRequest.create(email="carol@example.com", message="lost my phone", user=target.id)
    sign_in_admin(actor, secret)
    page = actor.client.get("/support").get_data(as_text=True)
    assert page.index('id="open-requests"') < page.index('id="people-heading"')
    page = actor.client.get("/support?q=carol@example.com").get_data(as_text=True)
    assert page.index(f'id="user-{target.id}"') < page.index('id="open-requests"')


def test_show_account_shows_that_account_alone_not_look_alikes(app, actor, secret, target):
    """A request's "Show account" searched for its address, which also listed every address that starts
    the same (carol@example.com.evil.example), each with its own "Temporarily disable 2FA": it opens the
    request's account by its id, alone."""
    with app.app_context():
        for email in ("carol@example.com.evil.example", "carol@example.community"):
            User.create(email=email, password_hash="x", tfa_reset_until=None)
        SupportRequest.create(email="carol@example.com", message="lost my phone", user=target.id)
    sign_in_admin(actor, secret)
    page = actor.client.get("/support").get_data(as_text=True)
    # Its name says whose account (a screen reader's list of links read "Show account" once per request).
    link = re.search(r'<a href="([^"]+)">Show account<span class="visually-hidden"> of <bdi>carol@example.com</bdi>'
                     r'</span></a>', page).group(1)
    assert link == f"/support?user={target.id}"
    page = actor.client.get(link).get_data(as_text=True)
    assert page.count('class="user-row"') == 1 and f'id="user-{target.id}"' in page
    assert "evil.example" not in page and "example.community" not in page
    assert page.index(f'id="user-{target.id}"') < page.index('id="open-requests"')
    # an id that names nobody says so (not "No accounts yet."); nonsense is the usual page, never an error
    page = actor.client.get("/support?user=999999").get_data(as_text=True)
    assert "That account no longer exists." in page and "No accounts yet" not in page
    for nonsense in ("9" * 30, "0", "-1"):  # no account could have it: not "no longer exists" either
        r = actor.client.get("/support?user=" + nonsense)
        assert r.status_code == 200 and "That account no longer exists." not in r.get_data(as_text=True), nonsense


def test_admin_with_stale_sign_in_must_reauthenticate(app, actor, secret, clock):
    """security.md 37: a session older than FRESH_LOGIN_WINDOW goes to /reauth first, then back."""
    sign_in_admin(actor, secret)
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    r = actor.client.get("/support")
    assert r.status_code == 302 and "/reauth" in r.headers["Location"]
    assert "next=/support" in r.headers["Location"].replace("%2F", "/")
    r = actor.post_form(r.headers["Location"], {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"].endswith("/support")
    assert actor.client.get("/support").status_code == 200


def test_fresh_admin_with_2fa_sees_the_page(actor, secret):
    sign_in_admin(actor, secret)
    r = actor.client.get("/support")
    html = r.get_data(as_text=True)
    assert r.status_code == 200
    assert "<h1>Support</h1>" in html
    assert '<label for="q">Search users</label>' in html
    assert "Open contact requests" in html


def test_spoofed_headers_do_not_bypass_2fa(actor):
    """security.md 41: no bypass through X-Forwarded-For: 127.0.0.1 or a debug header."""
    actor.user(ADMIN, admin=True)
    actor.sign_in(ADMIN, PASSWORD)
    r = actor.client.get("/support", headers={"X-Forwarded-For": "127.0.0.1", "X-Debug": "1"})
    assert r.status_code == 403


def test_ordinary_user_cannot_post_an_action(app, actor, secret, target, target_secret):
    """security.md 37: the action endpoint has the same guard as the page."""
    actor.user("dave@example.com", secret=secret)
    actor.sign_in("dave@example.com", PASSWORD, secret)
    token = actor.csrf("/settings")
    r = actor.client.post(f"/support/users/{target.id}/disable-2fa",
                          data={"csrf_token": token, f"u{target.id}-reason": "x", f"u{target.id}-duration": "24h"})
    assert r.status_code == 403
    assert count(app, Device, Device.user == target.id) == 1


@pytest.mark.parametrize("htmx", [False, True])
def test_stale_admin_action_goes_to_reauth_changes_nothing_and_keeps_what_was_typed(app, actor, secret, clock,
                                                                                     target, htmx):
    """security.md 37: a disable sent after the sign-in went stale does nothing and asks to re-authenticate.
    Checking who the person is often takes longer than the 10 fresh minutes: afterwards the admin is back
    on that person's form with the reason, the duration and the ticket as typed (they were lost), and
    presses Disable again; nothing happens before that."""
    sign_in_admin(actor, secret)
    token = actor.csrf("/support")
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    reason = "Called back on the number on file <b>&amp;</b> checked the ID"
    data = {f"u{target.id}-reason": reason, f"u{target.id}-duration": "3d", f"u{target.id}-ticket": "T-555"}
    if htmx:
        r = actor.client.post(f"/support/users/{target.id}/disable-2fa", headers={**HX, "X-CSRFToken": token},
                              data=data)
        assert r.status_code == 401
        location = r.headers["HX-Redirect"]  # a full-page redirect instead of a swapped sign-in form
    else:
        r = actor.client.post(f"/support/users/{target.id}/disable-2fa", data={"csrf_token": token, **data})
        assert r.status_code == 302
        location = r.headers["Location"]
    assert location.startswith("/reauth") and f"next=/support/users/{target.id}/disable-2fa" in location.replace(
        "%2F", "/")
    assert count(app, Device, Device.user == target.id) == 1
    assert user_row(app, "carol@example.com").tfa_reset_until is None

    r = actor.post_form(location, {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == f"/support/users/{target.id}/disable-2fa"
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Your entries were kept" in page and "Nothing was changed yet" in page
    assert ">\r\nCalled back on the number on file &lt;b&gt;&amp;amp;&lt;/b&gt; checked the ID</textarea>" in page
    assert 'value="3d" selected' in page or 'selected value="3d"' in page
    assert 'value="T-555"' in page
    assert count(app, Device, Device.user == target.id) == 1  # still nothing done
    # kept once: reloading the form shows it empty again
    again = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Your entries were kept" not in again and "T-555" not in again
    # pressing Disable with the kept entries works
    r = actor.post_form(f"/support/users/{target.id}/disable-2fa",
                        {**data, f"u{target.id}-close_requests": "y"}, form_url=f"/support/users/{target.id}/disable-2fa")
    assert r.status_code == 302
    assert count(app, Device, Device.user == target.id) == 0
    assert user_row(app, "carol@example.com").tfa_reset_until is not None


def test_kept_entries_of_a_stale_disable_show_only_on_that_persons_form(app, actor, secret, clock, target):
    """The entries kept for one person's form are not shown on another person's."""
    other = actor.user("erin@example.com", secret=new_secret())
    sign_in_admin(actor, secret)
    token = actor.csrf("/support")
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    actor.client.post(f"/support/users/{target.id}/disable-2fa",
                      data={"csrf_token": token, f"u{target.id}-reason": "a reason for carol", f"u{target.id}-ticket": "T-1"})
    actor.post_form(f"/reauth?next=/support/users/{other.id}/disable-2fa", {"password": PASSWORD, "code": actor.code(secret)})
    page = actor.client.get(f"/support/users/{other.id}/disable-2fa").get_data(as_text=True)
    assert "a reason for carol" not in page and "T-1" not in page and "Your entries were kept" not in page


def _stale_disable_then_reauth(app, actor, secret, clock, target, **fields):
    """A disable posted after the sign-in went stale, then the re-authentication: the form page it leads to."""
    sign_in_admin(actor, secret)
    token = actor.csrf("/support")
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    data = {f"u{target.id}-{name}": value for name, value in fields.items()}
    r = actor.client.post(f"/support/users/{target.id}/disable-2fa", data={"csrf_token": token, **data})
    return actor.post_form(r.headers["Location"], {"password": PASSWORD, "code": actor.code(secret)}).headers["Location"]


def test_kept_entries_are_cut_to_what_the_form_takes(app, actor, secret, clock, target):
    """A stale disable keeps no more of its reason and ticket than the form takes (500 and 64 characters),
    whatever was posted. (Found by mutation testing: keeping them whole failed no test.)"""
    form_url = _stale_disable_then_reauth(app, actor, secret, clock, target, reason="r" * 600, ticket="t" * 100)
    page = actor.client.get(form_url).get_data(as_text=True)
    assert ">\r\n" + "r" * 500 + "</textarea>" in page and 'value="' + "t" * 64 + '"' in page


def test_a_request_sent_while_the_admin_reauthenticates_stays_open(app, actor, secret, clock, target):
    """security.md 42: the form a stale disable comes back to carries the request numbers its first form
    showed, not the person's open requests as they are after re-authenticating: one sent meanwhile (perhaps
    the owner's "I did not ask for this") stays open when the admin presses Disable. (Found by mutation
    testing: listing the requests anew failed no test.)"""
    with app.app_context():
        seen = SupportRequest.create(email="carol@example.com", message="Lost my phone", user=target.id)
    fields = {"reason": "Identity checked by video call against ID card", "duration": "24h", "close_requests": "y",
              "requests_shown": str(seen.id)}
    form_url = _stale_disable_then_reauth(app, actor, secret, clock, target, **fields)
    with app.app_context():
        late = SupportRequest.create(email="carol@example.com", message="I did NOT ask for a reset", user=target.id)
    page = actor.client.get(form_url).get_data(as_text=True)
    assert f'name="u{target.id}-requests_shown" type="hidden" value="{seen.id}"' in page
    r = actor.post_form(f"/support/users/{target.id}/disable-2fa",
                        {f"u{target.id}-{name}": value for name, value in fields.items()}, form_url="/support")
    assert r.status_code == 302
    with app.app_context():
        assert SupportRequest.get_by_id(seen.id).handled_at is not None
        assert SupportRequest.get_by_id(late.id).handled_at is None


@pytest.mark.parametrize("action", ["handled", "end-window"])
def test_a_stale_request_or_window_action_changes_nothing_and_comes_back_to_the_support_page(
        app, actor, secret, clock, target, action):
    """security.md 37: marking a request handled, or ending a window, from a page left open past the fresh
    sign-in does nothing and asks to re-authenticate; afterwards the admin is on the Support page, to press
    the button again (a GET of the action's own address would be a 405). (Found by mutation testing.)"""
    with app.app_context():
        req = SupportRequest.create(email="carol@example.com", message="Lost my phone", user=target.id)
    sign_in_admin(actor, secret)
    assert disable(actor, target, close_requests=False).status_code == 302
    url = f"/support/requests/{req.id}/handled" if action == "handled" else f"/support/users/{target.id}/end-window"
    token = actor.csrf("/support")
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    r = actor.client.post(url, data={"csrf_token": token})
    back = "/support" if action == "handled" else f"/support?user={target.id}"  # the person's row alone
    location = r.headers["Location"].replace("%2F", "/").replace("%3F", "?").replace("%3D", "=")
    assert r.status_code == 302 and location == "/reauth?next=" + back
    r = actor.post_form(r.headers["Location"], {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == back
    assert fetch(app, SupportRequest)[0].handled_at is None
    assert user_row(app, "carol@example.com").support_window(utc(clock.t)) == "open"


@pytest.mark.parametrize("action", ["handled", "reopen"])
@pytest.mark.parametrize("meanwhile", [False, True])
def test_after_a_stale_request_action_the_support_page_says_it_was_not_done(app, actor, secret, clock, action,
                                                                          meanwhile):
    """A support walkthrough: Mark as handled pressed on a page left open past the fresh sign-in led to "Confirm
    it's you" and back to the Support page without a word, the request still open; the admin took it as done.
    Now the page says it was not done and to press again, with the focus there and, for Reopen, Recently
    handled open; or, when another admin did it meanwhile, that it was (and by whom). Said once."""
    with app.app_context():
        req = SupportRequest.create(email="ghost@example.com", message="Lost my phone")
    sign_in_admin(actor, secret)
    if action == "reopen":
        assert actor.post_form(f"/support/requests/{req.id}/handled", {}, form_url="/support").status_code == 302
    token = actor.csrf("/support")
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    r = actor.client.post(f"/support/requests/{req.id}/{action}", data={"csrf_token": token})
    if meanwhile:
        other = second_client(app, clock)
        sign_in_admin(other, new_secret(), email="admin2@example.com")
        assert other.post_form(f"/support/requests/{req.id}/{action}", {}, form_url="/support").status_code == 302
    r = actor.post_form(r.headers["Location"], {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == "/support"
    page = " ".join(actor.client.get("/support").get_data(as_text=True).split())
    if meanwhile:
        expected = ("The request from <bdi>ghost@example.com</bdi> was marked as handled meanwhile, by "
                    "<bdi>admin2@example.com</bdi>." if action == "handled" else
                    "The request from <bdi>ghost@example.com</bdi> was reopened meanwhile: it is open.")
    else:
        expected = ("Not done yet: you confirmed it's you, and the request from <bdi>ghost@example.com</bdi> is still "
                    + ("open. Press Mark as handled again" if action == "handled" else
                       "handled. Press Reopen again (under Recently handled)") + " if you still mean to.")
    expected = expected.replace("'", "&#39;")  # as Jinja escapes it
    assert (f'<p class="notice" role="status" id="requests-notice" tabindex="-1" aria-labelledby="requests-notice" '
            f'autofocus>{expected}</p>') in page
    assert ('<details class="handled-requests" open>' in page) == (action == "reopen" and not meanwhile)
    assert (fetch(app, SupportRequest)[0].handled_at is None) == ((action == "reopen") == meanwhile)
    assert expected not in actor.client.get("/support").get_data(as_text=True)  # said once


def test_after_a_stale_reopen_of_a_request_no_longer_listed_the_page_does_not_point_to_it(app, actor, secret,
                                                                                         clock):
    """A review: after a stale Reopen, the page said to press Reopen again under Recently handled, which lists
    the last HANDLED_SHOWN; with that many others handled meanwhile the request was not there."""
    from webapp.support import HANDLED_SHOWN

    with app.app_context():
        req = SupportRequest.create(email="ghost@example.com", message="Lost my phone")
    sign_in_admin(actor, secret)
    assert actor.post_form(f"/support/requests/{req.id}/handled", {}, form_url="/support").status_code == 302
    token = actor.csrf("/support")
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    r = actor.client.post(f"/support/requests/{req.id}/reopen", data={"csrf_token": token})
    with app.app_context():
        for i in range(HANDLED_SHOWN):
            SupportRequest.create(email=f"other{i}@example.com", message="Lost my phone", handled_at=utc(clock.t))
    r = actor.post_form(r.headers["Location"], {"password": PASSWORD, "code": actor.code(secret)})
    page = " ".join(actor.client.get("/support").get_data(as_text=True).split())
    assert ("Not done yet: the request from <bdi>ghost@example.com</bdi> is still handled, and no longer among the "
            "recently handled requests listed here, where Reopen is.") in page
    assert "Press Reopen again" not in page and '<details class="handled-requests" open>' not in page


@pytest.mark.parametrize("htmx", [False, True])
def test_a_stale_end_window_keeps_its_reason_for_after_reauth(app, actor, secret, clock, target, htmx):
    """security.md 37: "End support window now" sent from a stale page ends nothing; after re-authenticating
    the admin is on that person's row with the form open and the reason as typed (it was lost), pressing
    End the window again. Kept once, and cut to the form's 500 characters."""
    sign_in_admin(actor, secret)
    assert disable(actor, target, close_requests=False).status_code == 302
    token, url = actor.csrf("/support"), _end_url(actor, target)  # the row's form, for the window it shows
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    reason = "Owner called <b>back</b>: the request was not hers"
    data = {f"end{target.id}-reason": reason + " " + "x" * 600}
    if htmx:
        r = actor.client.post(url, headers={**HX, "X-CSRFToken": token}, data=data)
        location = r.headers["HX-Redirect"]
    else:
        location = actor.client.post(url, data={"csrf_token": token, **data}).headers["Location"]
    assert user_row(app, "carol@example.com").support_window(utc(clock.t)) == "open"  # nothing ended yet
    r = actor.post_form(location, {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == f"/support?user={target.id}"
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Your reason was kept" in page and "Nothing was changed yet" in page
    # Already in the page as it loads, a status is not read out: the focus starts there (an accessibility check).
    assert re.search(r'<p class="flash success" role="status" id="user-(\d+)-notice" tabindex="-1" '
                     r'aria-labelledby="user-\1-notice" autofocus>Your reason was kept', page)
    kept = (reason + " " + "x" * 600)[:500].replace("<", "&lt;").replace(">", "&gt;")
    assert f">\r\n{kept}</textarea>" in page
    assert '<details class="disable" open>' in page  # the End form is open, its reason in view
    assert user_row(app, "carol@example.com").support_window(utc(clock.t)) == "open"
    again = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    assert "Your reason was kept" not in again and "Owner called" not in again  # kept once
    assert end_window(actor, target, reason=reason).status_code == 302
    assert user_row(app, "carol@example.com").support_window(utc(clock.t)) == "ended"


def test_a_stale_end_form_for_a_window_replaced_meanwhile_still_ends_nothing_after_reauth(app, actor, secret,
                                                                                          clock, target):
    """A review of the check above: an End form for window A, sent from a stale page, went through "Confirm it's
    you" and came back as "Your reason was kept ... the window is still open" over window B, opened meanwhile by
    another admin, and pressing End the window ended B under the reason about A. The row now says it is
    another window, with the reason kept in the form, and ends nothing."""
    sign_in_admin(actor, secret)
    disable(actor, target, reason="Video call, ID checked", ticket="T-1")
    stale_url, token = _end_url(actor, target), actor.csrf("/support")
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    r = actor.client.post(stale_url, data={"csrf_token": token, f"end{target.id}-reason": "Not hers after all"})
    other = second_client(app, clock)
    sign_in_admin(other, new_secret(), email="admin2@example.com")
    assert end_window(other, target, reason="Wrong person").status_code == 302
    assert disable(other, target, reason="Confirmed by callback", ticket="T-3003").status_code == 302
    until = user_row(app, "carol@example.com").tfa_reset_until
    r = actor.post_form(r.headers["Location"], {"password": PASSWORD, "code": actor.code(secret)})
    page = " ".join(actor.client.get(r.headers["Location"]).get_data(as_text=True).split())
    assert "Your reason was kept" not in page
    assert ("Nothing was changed: this is not the support window your page showed. It was opened again since, "
            f"and now runs until {until:%Y-%m-%d %H:%M} UTC.") in page
    assert "> Not hers after all</textarea>" in page and "T-3003" in page
    assert user_row(app, "carol@example.com").tfa_reset_until == until


@pytest.mark.parametrize("window", [None, "", "abc", "2026"])
def test_an_end_form_that_names_no_window_ends_nothing_and_says_so(app, actor, secret, target, window):
    """A review: an End sent without the window its form was shown for (a page from before the check, an
    address typed by hand) or with a malformed one was told the window "was opened again since", which
    nothing had done. It says the form does not name a window, and ends nothing."""
    sign_in_admin(actor, secret)
    disable(actor, target)
    until = user_row(app, "carol@example.com").tfa_reset_until
    url = f"/support/users/{target.id}/end-window" + ("" if window is None else f"?window={window}")
    r = actor.post_form(url, {}, form_url="/support")
    html = " ".join(r.get_data(as_text=True).split())
    assert r.status_code == 409 and "this form does not say which support window it ends" in html
    assert "opened again since" not in html
    assert user_row(app, "carol@example.com").tfa_reset_until == until


def test_a_kept_end_window_reason_says_nothing_once_the_window_has_closed(app, actor, secret, clock, target):
    """The window ran out (or another admin ended it) while the admin re-authenticated: the row offers no
    End form, and no notice about a kept reason that there is nothing to use for."""
    sign_in_admin(actor, secret)
    assert disable(actor, target, close_requests=False).status_code == 302
    token = actor.csrf("/support")
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    r = actor.client.post(f"/support/users/{target.id}/end-window",
                          data={"csrf_token": token, f"end{target.id}-reason": "not hers"})
    with app.app_context():
        User.update(tfa_reset_until=utc(clock.t)).where(User.id == target.id).execute()
    r = actor.post_form(r.headers["Location"], {"password": PASSWORD, "code": actor.code(secret)})
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Your reason was kept" not in page and "End the window" not in page and "not hers" not in page



def _stale_then_reauth(app, actor, secret, clock, url, data):
    """Send `data` to `url` from a page that went stale, then re-authenticate; returns the reauth answer."""
    token = actor.csrf("/support")
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    r = actor.client.post(url, data={"csrf_token": token, **data})
    return actor.post_form(r.headers["Location"], {"password": PASSWORD, "code": actor.code(secret)})


def test_a_stale_end_window_without_a_reason_claims_no_kept_reason(app, actor, secret, clock, target):
    """The reason is optional: an "End support window now" sent stale without one comes back to the row
    without "Your reason was kept" over an empty box, and with the End form closed as usual."""
    sign_in_admin(actor, secret)
    assert disable(actor, target, close_requests=False).status_code == 302
    r = _stale_then_reauth(app, actor, secret, clock, f"/support/users/{target.id}/end-window",
                           {f"end{target.id}-reason": ""})
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "End the window" in page and "Your reason was kept" not in page
    assert '<details class="disable" open>' not in page


def test_a_stale_disables_entries_never_become_an_end_window_reason(app, actor, secret, clock, target):
    """A stale Disable keeps its entries for that person's disable form. The admin who goes to the person's
    row instead (a contact request's "Show account") finds the End form as usual: the disable's reason is
    not offered as the reason for ending the window, nor said to be kept."""
    sign_in_admin(actor, secret)
    assert disable(actor, target, close_requests=False).status_code == 302
    p = f"u{target.id}-"
    _stale_then_reauth(app, actor, secret, clock, f"/support/users/{target.id}/disable-2fa",
                       {p + "reason": "A second disable, typed by mistake", p + "duration": "24h"})
    page = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    assert "End the window" in page and "Your reason was kept" not in page
    assert "A second disable, typed by mistake" not in page


@pytest.mark.parametrize("reason, ticket, shown", [
    ("Called back and confirmed!", "", "“Called back and confirmed!”</span>"),
    ("Is she abroad? Called back", "", "“Is she abroad? Called back”.</span>"),
    ("Checked the passport on a video call.", "SUP-9", "“Checked the passport on a video call.” (ticket SUP-9).</span>"),
])
def test_the_opened_by_line_ends_with_one_full_stop(actor, secret, target, reason, ticket, shown):
    """A reason that ends its own sentence (".", "!" or "?") gets no second full stop after the quotation
    mark; a ticket after it still ends the line with one."""
    sign_in_admin(actor, secret)
    disable(actor, target, reason=reason, ticket=ticket)
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert shown in row

# ---------------------------------------------------------------- search (security.md 37)


def test_search_is_case_insensitive_prefix(actor, secret):
    for email in ("alice@example.com", "alina@example.org", "bob@example.com", "xalice@example.com"):
        actor.user(email)
    sign_in_admin(actor, secret)
    html = actor.client.get("/support?q=AL").get_data(as_text=True)
    assert "alice@example.com" in html and "alina@example.org" in html
    assert "bob@example.com" not in html and "xalice@example.com" not in html
    html = actor.client.get("/support?q=%20ALICE@").get_data(as_text=True)
    assert "alice@example.com" in html and "alina@example.org" not in html


def test_search_matches_prefixes_not_substrings(actor, secret):
    actor.user("alice@example.com")
    sign_in_admin(actor, secret)
    html = actor.client.get("/support?q=example").get_data(as_text=True)
    assert "alice@example.com" not in html
    assert "No account starts with" in html


def test_search_finds_addresses_with_any_character_after_the_prefix(actor, secret):
    """The prefix range must reach past every character: U+FFFF as its end missed an address whose next
    character lies above it (U+20000 here, which sign-up and `users create` accept)."""
    for email in ("a\U00020000b@example.com", "a\uffffz@example.com", "ab@example.com"):
        actor.user(email)
    actor.user("b@example.com")
    sign_in_admin(actor, secret)
    html = actor.client.get("/support?q=a").get_data(as_text=True)
    for email in ("a\U00020000b@example.com", "a\uffffz@example.com", "ab@example.com"):
        assert email in html, email
    assert ">b@example.com<" not in html


def test_search_is_paginated(app, actor, secret):
    with app.app_context():
        with db.atomic():
            User.insert_many([{"email": f"user{i:03d}@example.com", "password_hash": "x"} for i in range(60)]).execute()
    sign_in_admin(actor, secret)
    first = actor.client.get("/support?q=user").get_data(as_text=True)
    assert first.count('class="user-row"') == 25
    assert "user000@example.com" in first and "user024@example.com" in first
    assert "user025@example.com" not in first
    assert 'rel="next"' in first and 'rel="prev"' not in first
    third = actor.client.get("/support?q=user&page=3").get_data(as_text=True)
    assert third.count('class="user-row"') == 10
    assert "user050@example.com" in third and "user059@example.com" in third
    assert 'rel="next"' not in third and 'rel="prev"' in third
    # nonsense page numbers fall back to the first page instead of failing, and so do those below 1
    assert actor.client.get("/support?q=user&page=abc").status_code == 200
    for page in ("0", "-2"):
        html = actor.client.get(f"/support?q=user&page={page}").get_data(as_text=True)
        assert "<span>Page 1</span>" in html and 'href="/support?q=user&amp;page=2" rel="next"' in html, page


@pytest.mark.parametrize("matches, next_link", [(25, False), (26, True)])
def test_a_next_page_link_only_when_another_page_has_people(app, actor, secret, matches, next_link):
    """Exactly one page of matches (25) shows no "Next page" link to an empty page; one more shows it, and
    page 2 lists that one person. (Found by mutation testing: `>=` for `>` went unnoticed.)"""
    with app.app_context():
        with db.atomic():
            User.insert_many([{"email": f"user{i:03d}@example.com", "password_hash": "x"}
                              for i in range(matches)]).execute()
    sign_in_admin(actor, secret)
    first = actor.client.get("/support?q=user").get_data(as_text=True)
    assert first.count('class="user-row"') == 25
    assert ('rel="next">Next page</a>' in first) is next_link
    if next_link:
        second = actor.client.get("/support?q=user&page=2").get_data(as_text=True)
        assert second.count('class="user-row"') == 1 and "user025@example.com" in second
        assert 'rel="next"' not in second


def test_an_absurd_page_number_is_a_page_not_a_server_error(app, actor, secret):
    """A hand-edited ?page= far beyond any page (more digits than the database's integers hold) gives the
    search with nothing on it, not a 500. (Found by mutation testing: the upper clamp removed failed no test.)
    The audit log's pages are no longer numbered: such a link opens its newest events and says why."""
    actor.user("alice@example.com")
    sign_in_admin(actor, secret)
    r = actor.client.get("/support?q=a&page=99999999999999999999")
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "<h1>Support</h1>" in html
    assert "Traceback" not in html and "alice@example.com" not in html and '<tr class="event"' not in html
    r = actor.client.get("/support/audit?page=99999999999999999999")
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "<h1>Audit log</h1>" in html and "Traceback" not in html
    assert "Pages of the audit log are no longer numbered" in html and '<tr class="event"' in html


def test_search_uses_the_email_index(app):
    """The prefix range is served by the unique email index: no full table scan."""
    with app.test_request_context():
        db.connect(reuse_if_open=True)
        sql, params = user_search_query("al").limit(26).sql()
        if is_sqlite():
            plan = " ".join(str(row) for row in db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall())
            assert "SEARCH" in plan and "INDEX" in plan and "SCAN user" not in plan, plan
        else:
            # On a near-empty table PostgreSQL rightly prefers a sequential scan; forbid it to see that
            # the index can serve the range at all.
            with db.atomic():
                db.execute_sql("SET LOCAL enable_seqscan = off")
                plan = " ".join(str(row) for row in db.execute_sql("EXPLAIN " + sql, params).fetchall())
            assert "Index" in plan and "user_email" in plan and "Seq Scan" not in plan, plan
        # the page runs that same statement, compiled once (db.Prepared), so the plan above is its plan
        from webapp.support import _SEARCH_PREFIX
        assert _SEARCH_PREFIX._get()[1] == user_search_query("al").limit(26).offset(25).sql()[0]
        # and the helper the page uses returns the same people
        User.create(email="alan@example.com", password_hash="x")
        users, has_next = search_users("al", 1)
        assert [u.email for u in users] == ["alan@example.com"] and has_next is False


def test_search_finds_every_email_that_starts_so_whatever_the_database_sorts_by(app, actor, secret):
    """A prefix is a range [q, q + U+10FFFF), which needs code point order. PostgreSQL compares by the
    database's collation: under the usual en_US (glibc or ICU; scripts/pg.sh makes the test database so)
    punctuation is ignored and U+10FFFF sorts before letters and U+FFFD, and "al" found nothing, or missed
    some. On both databases every email that starts with the query is found, in code point order."""
    emails = ["al-b@example.com", "ala@example.com", "alb@example.com", "alz@example.com",
              "al\ufffdx@example.com", "al\u00e9@example.com", "a-l@example.com", "am@example.com"]
    with app.app_context():
        for email in emails:
            User.create(email=email, password_hash="x")
    with app.test_request_context():
        users, _ = search_users("al", 1)
    expected = sorted(e for e in emails if e.startswith("al"))
    assert [u.email for u in users] == expected
    sign_in_admin(actor, secret)
    page = actor.client.get("/support?q=al", headers=HX).get_data(as_text=True)
    assert "6 accounts found." in page


def test_results_show_status_devices_and_last_sign_in_but_never_secrets(app, actor, secret, target_secret):
    """security.md 37, 10: device names and dates are shown; secrets, their ciphertext and hashes never."""
    carol = actor.user("carol@example.com", devices={"Carol's iPhone": target_secret, "Old Android": new_secret()})
    sign_in_admin(actor, secret)
    r = actor.client.get("/support?q=carol")
    html = r.get_data(as_text=True)
    assert "Carol's iPhone" in html or "Carol&#39;s iPhone" in html
    assert "Old Android" in html and "Active" in html
    assert "Last sign-in" in html and "never" in html
    assert target_secret not in html and secret not in html
    with app.app_context():
        for d in Device.select():
            assert d.secret_enc not in html
        assert User.get_by_id(carol.id).password_hash not in html


def test_htmx_search_returns_only_the_results_fragment(actor, secret):
    actor.user("alice@example.com")
    sign_in_admin(actor, secret)
    r = actor.client.get("/support?q=ali", headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "HX-Request" in r.headers["Vary"]
    assert html.lstrip().startswith('<p id="results-status"') and "<html" not in html
    assert '<div id="results">' in html and "aria-live" not in html
    assert "alice@example.com" in html


@pytest.mark.parametrize("q, said", [("ali", "1 account found."), ("a", "2 accounts found."),
                                     ("zz", "No account starts with “<bdi>zz</bdi>”.")])
def test_search_results_are_summed_up_in_a_status_that_stays_in_the_page(actor, secret, q, said):
    """Screen readers read a live region whose text changes, not one that is swapped in already filled: the
    results' summary goes into the page's one #results-status (out of band, its content only), while the
    list itself is replaced."""
    actor.user("alice@example.com")
    actor.user("anna@example.com")
    sign_in_admin(actor, secret)
    page = actor.client.get("/support").get_data(as_text=True)
    assert page.count('id="results-status"') == 1 and 'role="status"' in page
    html = actor.client.get(f"/support?q={q}", headers=HX).get_data(as_text=True)
    status = re.search(r'<p id="results-status"[^>]*hx-swap-oob="innerHTML"[^>]*>(.*?)</p>', html, re.S)
    assert status and status.group(1).strip() == said


def test_own_and_admin_rows_offer_no_action(actor, secret):
    """security.md 41: the page does not even offer the action on yourself or on other admins."""
    actor.user("other-admin@example.com", admin=True, secret=new_secret())
    actor.user("carol@example.com", secret=new_secret())
    sign_in_admin(actor, secret)
    html = actor.client.get("/support").get_data(as_text=True)
    assert html.count(DISABLE_LINK) == 1
    assert "This is your own account" in html and "Another admin" in html


def _tag(html, tag, element_id):
    """The opening tag of the <tag> whose id is element_id (attribute order does not matter)."""
    match = re.search(rf'<{tag}\b[^>]*\bid="{re.escape(element_id)}"[^>]*>', html)
    assert match, f"no <{tag} id={element_id}> in the page"
    return match.group(0)


def _attr(tag, name):
    """The value of attribute `name` in an opening tag; True for a bare attribute, None when absent."""
    match = re.search(rf'\s{name}(?:="([^"]*)")?(?=[\s>])', tag)
    return None if match is None else (match.group(1) if match.group(1) is not None else True)


def test_search_results_do_not_contain_the_disable_form(app, actor, secret):
    """The speed-up: result rows offer the action as a link to the form, never the form itself (rendering
    one per row was most of a search's cost, issue #7); the link works with and without JavaScript."""
    people = [actor.user(f"carol{i}@example.com", secret=new_secret()) for i in range(3)]
    sign_in_admin(actor, secret)
    for headers in (HX, {}):
        html = actor.client.get("/support?q=carol", headers=headers).get_data(as_text=True)
        assert html.count(DISABLE_LINK) == 3
        for person in people:
            url = f"/support/users/{person.id}/disable-2fa"
            assert f'href="{url}"' in html and f'hx-get="{url}"' in html
            # A screen reader's list of links reads "Temporarily disable 2FA" once per person found: each is
            # described by its own person's address (the row's heading).
            [link] = re.findall(rf'<a [^>]*href="{url}"[^>]*>', html)
            heading = _attr(link, "aria-describedby")
            assert re.search(rf'<h3 class="row-title" id="{heading}"><bdi>{person.email}</bdi><', html)
        assert 'name="reason"' not in html and "-reason" not in html and "-duration" not in html
        assert "Disable for" not in html and "Disable 2FA temporarily" not in html
        assert "<details" not in html


def test_search_runs_the_same_number_of_queries_for_one_or_many_people(app, actor, secret):
    """No N+1: a page of 25 people (with devices and open requests) costs the queries of a page of one."""
    for i in range(30):
        person = actor.user(f"many{i:02d}@example.com", devices={"Phone": new_secret(), "Tablet": new_secret()})
        with app.app_context():
            SupportRequest.create(email=person.email, message="lost my phone", user=person.id)
            for j in range(2):  # signed in from two browsers each
                ServerSession.create(id=f"{i:032d}{j:032d}", user=person.id, ip="203.0.113.5", user_agent=FIREFOX)
    actor.user("single@example.com", secret=new_secret())
    sign_in_admin(actor, secret)
    statements = []
    original = db.obj.execute_sql

    def counting(sql, params=None, *args, **kwargs):
        statements.append(sql)
        return original(sql, params, *args, **kwargs)

    db.obj.execute_sql = counting
    try:
        def queries(q):
            statements.clear()
            html = actor.client.get(f"/support?q={q}", headers=HX).get_data(as_text=True)
            return len(statements), html

        one, html_one = queries("single")
        many, html_many = queries("many")
    finally:
        db.obj.execute_sql = original
    assert html_one.count('class="user-row"') == 1 and html_many.count('class="user-row"') == 25
    assert "Tablet" in html_many and "Open contact requests" in html_many
    assert html_many.count("<li><bdi>Firefox on Windows</bdi> from <bdi>203.0.113.5</bdi>") == 50
    assert many == one, (one, many)


FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0"
CHROME_ANDROID = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/131.0.0.0 Mobile Safari/537.36")


def _browser(app, clock, ip, user_agent):
    """Another browser, at client address `ip`, sending `user_agent`."""
    browser = second_client(app, clock)
    browser.client.environ_base.update(REMOTE_ADDR=ip, HTTP_USER_AGENT=user_agent)
    return browser


def _signed_in_now(html, user_id):
    """The lines under "Signed in now" in the person's row, as its text, and the hint below them."""
    row = html[html.index(f'id="user-{user_id}"'):]
    found = re.search(r"<dt>Signed in now</dt>\s*<dd>(.*?)</dd>", row, re.S).group(1)
    lines = [" ".join(words(line).split()) for line in re.findall(r"<li>(.*?)</li>", found, re.S)]
    return lines, " ".join(words(re.sub(r"<ul.*?</ul>", "", found, flags=re.S)).split())


def test_a_persons_row_says_where_they_are_signed_in_now_and_ends_nothing(app, actor, secret, clock, target,
                                                                          target_secret):
    """security.md 40: support reads on the person's row, wherever it shows them (a search, "Show account",
    the disable form), whether someone is still signed in to the account, from which browser and address,
    since when and last seen when, as `users export` lists it: an intruder still signed in is seen before
    anything is decided. Only live sessions (not those past their limits, nor a browser still at the code
    step, nor anyone else's), last seen first. Support ends none of them here: no sign-out is offered, and the
    row says what does sign the person out (a disable, whose window lets a known password in again)."""
    owner = _browser(app, clock, "198.51.100.7", FIREFOX)
    assert owner.sign_in("carol@example.com", PASSWORD, target_secret).status_code == 302
    clock.advance(600)
    intruder = _browser(app, clock, "203.0.113.66", CHROME_ANDROID)
    intruder.password_step("carol@example.com")
    assert intruder.code_step(intruder.code(target_secret, 1)).status_code == 302
    _browser(app, clock, "192.0.2.1", FIREFOX).password_step("carol@example.com")  # at the code step only
    with app.app_context():  # past the idle limit, not yet purged
        ServerSession.create(id="e" * 64, user=target.id, ip="192.0.2.99", user_agent=FIREFOX,
                             created_at=utc(clock.t - 3600), last_seen_at=utc(clock.t - 31 * 60))
    actor.user("dan@example.com")
    _browser(app, clock, "192.0.2.2", FIREFOX).password_step("dan@example.com")  # someone else's session
    clock.advance(60)
    sign_in_admin(actor, secret)
    then, later = f"{utc(clock.t - 660):%Y-%m-%d %H:%M}", f"{utc(clock.t - 60):%Y-%m-%d %H:%M}"
    expected = [f"Chrome on Android from 203.0.113.66: signed in {later} UTC, last seen {later} UTC.",
                f"Firefox on Windows from 198.51.100.7: signed in {then} UTC, last seen {then} UTC."]
    pages = {"show account": actor.client.get(f"/support?user={target.id}"),
             "search": actor.client.get("/support?q=carol", headers=HX),
             "disable form": actor.client.get(f"/support/users/{target.id}/disable-2fa")}
    for name, r in pages.items():
        html = r.get_data(as_text=True)
        assert r.status_code == 200, name
        lines, hint = _signed_in_now(html, target.id)
        assert lines == expected, (name, lines)
        assert hint == ("Listed to read: support does not sign out one browser. Temporarily disable 2FA signs them "
                        "out everywhere, but its window then lets their password alone sign in again: if someone "
                        "else may know it, ask the operator to take the account back instead (README “Someone "
                        "else got into an account”)."), (name, hint)
        assert "/sessions/" not in html and "Sign out" not in words(html).replace("Sign out everywhere", ""), name
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == target.id).count() == 3  # nothing ended
    dan, erin = user_row(app, "dan@example.com"), actor.user("erin@example.com")
    lines, hint = _signed_in_now(actor.client.get(f"/support?user={dan.id}").get_data(as_text=True), dan.id)
    assert [line.split(":")[0] for line in lines] == ["Firefox on Windows from 192.0.2.2"]  # no 2FA: signed in
    assert hint == ("Listed to read: support does not sign out one browser. The operator can take the account "
                    "back (README “Someone else got into an account”).")
    assert _signed_in_now(actor.client.get(f"/support?user={erin.id}").get_data(as_text=True), erin.id) == (
        [], "Not signed in anywhere.")

    # A disable signs the person out everywhere: the row that comes back says so.
    r = disable(actor, target, headers=HX)
    assert r.status_code == 200 and _signed_in_now(r.get_data(as_text=True), target.id) == (
        [], "Not signed in anywhere.")
    assert intruder.client.get("/settings").status_code == 302
    # In the window, a sign-in with the password alone is listed, and the row names what ends it.
    assert intruder.password_step("carol@example.com").status_code == 302
    lines, hint = _signed_in_now(actor.client.get(f"/support?user={target.id}").get_data(as_text=True), target.id)
    assert [line.split(":")[0] for line in lines] == ["Chrome on Android from 203.0.113.66"]
    assert hint == "Listed to read: support does not sign out one browser. End support window now signs them out everywhere."
    # The window runs out without a new device: the app refuses those sessions from then on (their rows stay
    # until their next request or the purge), and the row no longer lists them beside "Blocked", where they
    # read as someone still signed in (a review of the lost-phone path). Nor an account the operator disabled.
    with app.app_context():
        User.update(tfa_reset_until=utc(clock.t - 1)).where(User.id == target.id).execute()
        User.update(disabled_at=utc(clock.t)).where(User.id == dan.id).execute()
        assert ServerSession.select().where(ServerSession.user.in_([target.id, dan.id])).count() == 2
    html = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    assert "Blocked" in html and _signed_in_now(html, target.id) == ([], "Not signed in anywhere.")
    html = actor.client.get(f"/support?user={dan.id}").get_data(as_text=True)
    assert _signed_in_now(html, dan.id) == ([], "Not signed in anywhere.")
    assert intruder.client.get("/settings").status_code == 302  # refused, as the row now says


def test_a_row_lists_the_five_sessions_last_seen_and_says_how_many_there_are(app, actor, secret, clock, target):
    """Someone signed in from many browsers (in a support window the password alone signs in) does not make
    every row of a search list them all: five, last seen first, and how many there are."""
    with app.app_context():
        for i in range(7):
            ServerSession.create(id=f"{i:064d}", user=target.id, ip=f"203.0.113.{i}", user_agent=CHROME_ANDROID,
                                 created_at=utc(clock.t - 600), last_seen_at=utc(clock.t - 60 * i))
    sign_in_admin(actor, secret)
    lines, hint = _signed_in_now(actor.client.get("/support?q=carol", headers=HX).get_data(as_text=True), target.id)
    assert [line.split(":")[0] for line in lines] == [f"Chrome on Android from 203.0.113.{i}" for i in range(5)]
    assert hint.startswith("The 5 last seen of 7 browsers signed in. Listed to read:")


def test_disable_form_comes_into_the_row_with_htmx(app, actor, secret, target):
    """hx-get answers with the person's row, the form open and Reason focused; it submits like before."""
    sign_in_admin(actor, secret)
    r = actor.client.get(f"/support/users/{target.id}/disable-2fa", headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "HX-Request" in r.headers["Vary"]
    assert html.lstrip().startswith(f'<article class="user-row" id="user-{target.id}"') and "<html" not in html
    assert '<details class="disable" open>' in html
    form = re.search(r"<form[^>]*disable-2fa[^>]*>", html).group(0)
    assert f'hx-post="/support/users/{target.id}/disable-2fa"' in form and 'hx-target="closest .user-row"' in form
    reason = _tag(html, "textarea", f"u{target.id}-reason")
    assert _attr(reason, "name") == f"u{target.id}-reason" and _attr(reason, "autofocus") is True
    assert f'<label for="u{target.id}-reason">Reason</label>' in html
    assert f'<label for="u{target.id}-duration">Disable for</label>' in html
    for label in ("24 hours", "3 days", "7 days"):
        assert f">{label}</option>" in html
    assert "Disable 2FA temporarily" in html
    # the form in the fragment carries what a submit needs, and showing it changed nothing
    _unchanged(app, target)
    token = csrf_from(html)
    r = actor.client.post(f"/support/users/{target.id}/disable-2fa", headers={**HX, "X-CSRFToken": token},
                          data={f"u{target.id}-reason": "Called back on the number on file",
                                f"u{target.id}-duration": "24h"})
    assert r.status_code == 200 and "Temporarily off" in r.get_data(as_text=True)
    assert count(app, Device, Device.user == target.id) == 0


def test_disable_form_is_a_page_without_javascript(app, actor, secret, target):
    """Without JavaScript the link opens a page with the same form; posting it works as before."""
    sign_in_admin(actor, secret)
    r = actor.client.get(f"/support/users/{target.id}/disable-2fa")
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "<html" in html
    assert "<h1>Temporarily disable 2FA</h1>" in html and "carol@example.com" in html
    assert f'href="/support?user={target.id}">Back to Support</a>' in html  # that person alone, not a search
    # What the action does, and what happens if the window ends without a new device (a support agent's
    # usability review: it did not say), and whom to reply to (security.md 38: confirm the identity).
    form_words = " ".join(words(html).split())
    assert "Revokes every device of carol@example.com at once and signs them out everywhere." in form_words
    assert ("if they have not by then, they cannot sign in at all until support opens a new window. Confirm "
            "their identity first, and reply only to the account's own address, never to contact details given "
            "in a message.") in form_words.replace("&#39;", "'")
    assert f'action="/support/users/{target.id}/disable-2fa"' in html and 'method="post"' in html
    # a plain post even when JavaScript is on: the htmx answer refreshes a request list this page lacks
    assert "hx-post" not in re.search(r"<form[^>]*disable-2fa[^>]*>", html).group(0)
    assert _attr(_tag(html, "textarea", f"u{target.id}-reason"), "autofocus") is True
    # Closing the person's open requests with the action is ticked to start with
    assert _attr(_tag(html, "input", f"u{target.id}-close_requests"), "checked") is True
    # With a request of theirs on the page, the focus starts at the top: a keyboard or screen-reader user
    # meets what they asked for before the form, not Reason below it.
    with app.app_context():
        SupportRequest.create(email="carol@example.com", message="Lost my phone on the train", user=target.id)
    html = actor.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True)
    assert html.index("Lost my phone on the train") < html.index(f'name="u{target.id}-reason"')
    assert _attr(_tag(html, "textarea", f"u{target.id}-reason"), "autofocus") is None
    assert "autofocus" not in html
    # The row's form (htmx) shows them too, above the form, and focus goes to their heading (a support
    # agent's usability review: an agent who came by a search decided without them, and without the warning
    # that a code of the person's was accepted since).
    html = actor.client.get(f"/support/users/{target.id}/disable-2fa", headers=HX).get_data(as_text=True)
    assert html.index("Lost my phone on the train") < html.index(f'name="u{target.id}-reason"')
    assert _attr(_tag(html, "textarea", f"u{target.id}-reason"), "autofocus") is None
    heading = re.search(rf'<h4 id="user-{target.id}-requests"[^>]*>', html).group(0)
    assert _attr(heading, "autofocus") is True and _attr(heading, "tabindex") == "-1"
    assert "Mark as handled" not in html and 'id="request-' not in html  # read only: the list below has those
    _unchanged(app, target)
    r = actor.post_form(f"/support/users/{target.id}/disable-2fa",
                        {f"u{target.id}-reason": "Checked ID on a video call", f"u{target.id}-duration": "3d"},
                        form_url=f"/support/users/{target.id}/disable-2fa")
    assert r.status_code == 302 and r.headers["Location"].endswith(f"/support?user={target.id}")
    assert count(app, Device, Device.user == target.id) == 0



def test_the_disable_page_without_javascript_shows_what_the_person_asked_for(app, actor, secret, target):
    """The Support page lists the open requests under the results; the form's own page (no JavaScript) did not,
    so the admin decided without the person's words in sight. It lists this person's open requests, whether
    each was sent after entering the password, and nobody else's; on a refused post too."""
    with app.app_context():
        SupportRequest.create(email="carol@example.com", message="Phone fell in the lake <b>help</b>", user=target.id)
        SupportRequest.create(email="zed@example.com", message="Someone else's request")
    sign_in_admin(actor, secret)
    for r in (actor.client.get(f"/support/users/{target.id}/disable-2fa"),
              actor.post_form(f"/support/users/{target.id}/disable-2fa", {f"u{target.id}-reason": ""},
                              form_url=f"/support/users/{target.id}/disable-2fa")):
        html = r.get_data(as_text=True)
        section = html.split('id="person-requests-heading">Open contact requests from <bdi>carol@example.com</bdi>'
                             '</h2>')[1]
        assert "Phone fell in the lake &lt;b&gt;help&lt;/b&gt;" in section
        assert "Sent without entering this account's password." in section
        assert "Someone else" not in html


def test_validation_errors_come_back_on_the_form_page_tied_to_their_fields(app, actor, secret, target):
    """WCAG 3.3.1: each message is tied to its field (aria-describedby), the field is marked invalid and
    focus lands on the first field with an error; nothing was changed (security.md 38)."""
    sign_in_admin(actor, secret)
    r = disable(actor, target, reason="", duration="30d")
    html = r.get_data(as_text=True)
    assert r.status_code == 400 and "<h1>Temporarily disable 2FA</h1>" in html
    reason = _tag(html, "textarea", f"u{target.id}-reason")
    assert f"u{target.id}-reason-error" in _attr(reason, "aria-describedby").split()
    assert _attr(reason, "aria-invalid") == "true" and _attr(reason, "autofocus") is True
    assert re.search(rf'<p class="error" id="u{target.id}-reason-error">Give a reason', html)
    duration = _tag(html, "select", f"u{target.id}-duration")
    assert f"u{target.id}-duration-error" in _attr(duration, "aria-describedby").split()
    assert _attr(duration, "autofocus") is None  # one autofocus: the first field with an error
    assert "Choose 1 hour, 24 hours, 3 days or 7 days." in html
    _unchanged(app, target)
    # only the duration wrong: focus goes to it
    html = disable(actor, target, duration="30d", headers=HX).get_data(as_text=True)
    assert _attr(_tag(html, "select", f"u{target.id}-duration"), "autofocus") is True
    assert _attr(_tag(html, "textarea", f"u{target.id}-reason"), "autofocus") is None
    _unchanged(app, target)


def test_disable_form_of_an_unknown_person_is_404(actor, secret):
    sign_in_admin(actor, secret)
    assert actor.client.get("/support/users/9999/disable-2fa").status_code == 404
    assert actor.client.get("/support/users/9999/disable-2fa", headers=HX).status_code == 404


def test_disable_form_is_refused_for_yourself_and_other_admins(actor, secret):
    """security.md 41: no form for your own account or another admin's, whatever the URL."""
    other = actor.user("other-admin@example.com", admin=True, secret=new_secret())
    me = sign_in_admin(actor, secret)
    for person in (me, other):
        for headers in ({}, HX):
            r = actor.client.get(f"/support/users/{person.id}/disable-2fa", headers=headers)
            html = r.get_data(as_text=True)
            assert r.status_code == 403 and "-reason" not in html and "Disable for" not in html
            assert "cannot change two-factor authentication on its own account or on another admin" in html
    assert "other-admin@example.com" not in html  # the refusal shows nothing about the other admin


def test_disable_form_for_someone_without_2fa_explains_and_offers_no_form(actor, secret):
    dave = actor.user("dave@example.com")
    sign_in_admin(actor, secret)
    r = actor.client.get(f"/support/users/{dave.id}/disable-2fa", headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "no two-factor authentication to disable" in html
    assert "-reason" not in html and "<details" not in html


def test_disable_form_is_guarded_like_the_support_page(app, actor, secret, clock, target):
    """security.md 37: the form shows a person's details, so it needs what search needs: a signed-in admin
    with 2FA and a fresh sign-in."""
    url = f"/support/users/{target.id}/disable-2fa"
    anonymous = actor.client.get(url)
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]
    assert actor.client.get(url, headers=HX).status_code == 401
    plain = second_client(app, clock)
    plain.user("dave@example.com", secret=new_secret())
    plain.sign_in("dave@example.com", PASSWORD)  # no code: stays at the code step
    assert plain.client.get(url).status_code in (302, 401, 403)
    ordinary = second_client(app, clock)
    ordinary_secret = new_secret()
    ordinary.user("erin@example.com", secret=ordinary_secret)
    ordinary.sign_in("erin@example.com", PASSWORD, ordinary_secret)
    r = ordinary.client.get(url)
    assert r.status_code == 403 and "-reason" not in r.get_data(as_text=True)
    no_2fa = second_client(app, clock)
    no_2fa.user("admin-no-2fa@example.com", admin=True)
    no_2fa.sign_in("admin-no-2fa@example.com", PASSWORD)
    r = no_2fa.client.get(url)
    assert r.status_code == 403 and "Set up two-factor authentication" in r.get_data(as_text=True)

    sign_in_admin(actor, secret)
    clock.advance(app.config["FRESH_LOGIN_WINDOW"].total_seconds() + 1)
    r = actor.client.get(url)
    assert r.status_code == 302 and "/reauth" in r.headers["Location"]
    assert f"next={url}" in r.headers["Location"].replace("%2F", "/")
    r = actor.client.get(url, headers=HX)
    assert r.status_code == 401 and "/reauth" in r.headers["HX-Redirect"]
    # confirming the identity leads back to the form
    r = actor.post_form(actor.client.get(url).headers["Location"], {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"].endswith(url)
    assert f"u{target.id}-reason" in actor.client.get(url).get_data(as_text=True)


# ---------------------------------------------------------------- the temporary disable cycle (security.md 39, 40)


def test_full_temporary_disable_cycle(app, actor, secret, clock, target, target_secret):
    """security.md 39, 40: before (code needed), action (devices revoked, sessions ended), during the window
    (password only, with a prompt to enrol), after the window (fails closed, pointing to support)."""
    carol = second_client(app, clock)
    # before: Carol's password leads to the code step, and she is signed in on her own browser
    r = carol.password_step("carol@example.com")
    assert r.headers["Location"].endswith("/login/verify")
    assert carol.code_step(carol.code(target_secret)).headers["Location"].endswith("/settings")
    assert carol.client.get("/settings").status_code == 200

    sign_in_admin(actor, secret)
    t0 = clock.t
    r = disable(actor, target)
    assert r.status_code == 302 and r.headers["Location"].endswith(f"/support?user={target.id}")
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "is off until" in page and "Temporarily off" in page
    assert "1 device revoked, 1 session ended. Now reply to them" in page  # the app sends no email itself

    # the action: devices gone, the window set from the injected clock, her sessions ended
    assert count(app, Device, Device.user == target.id) == 0
    assert user_row(app, "carol@example.com").tfa_reset_until == utc(t0) + timedelta(hours=24)
    assert count(app, ServerSession, ServerSession.user == target.id) == 0
    r = carol.client.get("/settings")
    assert r.status_code == 302 and "/login" in r.headers["Location"]

    # during the window: the password alone signs her in, with the persistent prompt
    clock.advance(3600)
    r = carol.password_step("carol@example.com")
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
    html = carol.client.get("/settings").get_data(as_text=True)
    assert "Two-factor authentication is temporarily off" in html
    assert 'Status: <strong class="badge warn">Temporarily off</strong>' in html  # the words Support's page uses
    html = carol.client.get("/support/contact").get_data(as_text=True)
    assert "Two-factor authentication is temporarily off" in html  # on every page, not only once

    # after the window, with no new device: sign-in fails closed and points to support
    clock.advance(24 * 3600)
    late = second_client(app, clock)
    r = late.password_step("carol@example.com")
    html = r.get_data(as_text=True)
    assert r.status_code == 403
    assert 'href="/support/contact"' in html and "blocked" in html
    assert late.session_cookie() is None or late.client.get("/settings").status_code == 302
    assert count(app, AuditEvent, AuditEvent.kind == "signin_blocked", AuditEvent.user == target.id) == 1


def test_after_a_blocked_sign_in_the_contact_form_knows_whose_password_was_entered(app, actor, secret, clock, target):
    """The blocked page's way on is "Contact support": like the code step's link, the form then has her
    address filled in, and her request is recorded as sent after the correct password (not proof of
    identity, but what support can weigh), with the larger per-address limit. A wrong password, or a
    visit later than a code step would last, gets the ordinary form."""
    from webapp.models import SupportRequest

    sign_in_admin(actor, secret)
    disable(actor, target, duration="24h")
    clock.advance(25 * 3600)
    stranger = second_client(app, clock)
    stranger.password_step("carol@example.com", "not her password")
    assert 'value="carol@example.com"' not in stranger.client.get("/support/contact").get_data(as_text=True)

    clock.advance(5)  # the back-off after that wrong password
    carol = second_client(app, clock)
    assert carol.password_step("carol@example.com").status_code == 403
    page = carol.client.get("/support/contact").get_data(as_text=True)
    assert 'value="carol@example.com"' in page
    r = carol.post_form("/support/contact", {"email": "carol@example.com", "message": "New phone, old one lost."})
    assert r.status_code == 302
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "support_request")
        assert event.details["after_password"] is True
        assert SupportRequest.select().count() == 1
    clock.advance(app.config["CHALLENGE_TTL"].total_seconds() + 1)
    assert 'value="carol@example.com"' not in carol.client.get("/support/contact").get_data(as_text=True)


def test_the_window_length_follows_the_chosen_duration(app, actor, secret, clock, target):
    sign_in_admin(actor, secret)
    assert disable(actor, target, duration="3d").status_code == 302
    assert user_row(app, "carol@example.com").tfa_reset_until == utc(clock.t) + timedelta(days=3)


def test_old_codes_stop_working_at_once(app, actor, secret, clock, target, target_secret):
    """security.md 39: the lost device is revoked immediately: a password + old code no longer reaches a code step."""
    thief = second_client(app, clock)
    assert thief.password_step("carol@example.com").headers["Location"].endswith("/login/verify")
    sign_in_admin(actor, secret)
    disable(actor, target)
    # the pending code step of the thief is gone, and its code is refused
    clock.advance(30)
    r = thief.client.get("/login/verify")
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_code_throttle_is_reset_and_the_record_says_what_was_lifted(app, actor, secret, clock, target):
    """The disable clears the code throttle (the person's new phone must not wait out a thief's lock). An
    incident review found that nothing said so: an attacker's fifth wrong code locked code entry, support's
    disable five seconds later lifted it, and the record read as if no lock had been there. The record names
    the refused codes and the lock it lifted; the audit log page shows them."""
    lock_end = utc(clock.t + 5 * 3600)
    with app.app_context():
        User.update(code_failures=7, code_strikes=6, code_locked_until=lock_end).where(
            User.id == target.id).execute()
    sign_in_admin(actor, secret)
    disable(actor, target)
    row = user_row(app, "carol@example.com")
    assert (row.code_failures, row.code_strikes, row.code_locked_until) == (0, 0, None)
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "support_tfa_disabled")
        assert (event.details["code_failures"], event.details["code_locked_until"]) == (7, lock_end.isoformat() + "Z")
    page = actor.client.get("/support/audit?email=carol@example.com").get_data(as_text=True)
    assert "Refused codes cleared: 7" in page and "Code entry was locked until: " in page


def test_open_requests_of_the_person_can_be_closed_with_the_action(app, actor, secret, target):
    with app.app_context():
        mine = SupportRequest.create(email="carol@example.com", message="lost my phone", user=target.id)
        other = SupportRequest.create(email="zed@example.com", message="lost my phone")
    admin = sign_in_admin(actor, secret)
    r = disable(actor, target, close_requests=True)
    reqs = {r.id: r for r in fetch(app, SupportRequest)}
    assert reqs[mine.id].handled_at is not None and reqs[mine.id].handled_by_id == admin.id
    assert reqs[other.id].handled_at is None
    # another person's open request is not one of "theirs left open"
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "is off until" in page and 'class="flash warning"' not in page


def test_open_requests_stay_open_when_not_asked_to_close(app, actor, secret, target):
    """The box unticked, the form still carries the numbers of the requests it showed (a hidden field): none is
    closed, and the admin is not warned that some were left open. (Found by mutation testing: posted without
    those numbers, as before, the disable closed nothing either way.)"""
    with app.app_context():
        req = SupportRequest.create(email="carol@example.com", message="lost my phone", user=target.id)
    sign_in_admin(actor, secret)
    p = f"u{target.id}-"
    r = actor.post_form(f"/support/users/{target.id}/disable-2fa",
                        {p + "reason": "Identity checked by video call against ID card", p + "duration": "24h",
                         p + "requests_shown": str(req.id)}, form_url="/support")
    assert r.status_code == 302
    assert [r.handled_at for r in fetch(app, SupportRequest)] == [None]
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "is off until" in page and 'class="flash warning"' not in page


def test_support_can_end_a_window_early(app, actor, secret, clock, target):
    """Ending early sets the end to now: password-only sign-in is blocked at once (fail closed)."""
    carol = second_client(app, clock)
    sign_in_admin(actor, secret)
    disable(actor, target)
    clock.advance(600)
    assert carol.password_step("carol@example.com").headers["Location"].endswith("/settings")
    r = end_window(actor, target)
    assert r.status_code == 302
    assert user_row(app, "carol@example.com").tfa_reset_until == utc(clock.t)
    # her password-only session ends with the window, and signing in again is blocked
    r = carol.client.get("/settings")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    r = second_client(app, clock).password_step("carol@example.com")
    assert r.status_code == 403 and 'href="/support/contact"' in r.get_data(as_text=True)
    assert count(app, AuditEvent, AuditEvent.kind == "support_window_ended") == 1



def test_a_persons_row_shows_who_opened_their_window_why_and_leads_to_their_audit_log(app, actor, secret, clock,
                                                                                      target):
    """What an identity check compares with, on the person's row: when the account was made, who opened the
    support window, when and with what reason and ticket (another admin, or the same one later, saw only the
    end time), and a link to this person's audit log. A blocked person's sign-in page says the time is over
    whether it ran out or support ended it (it said "has ended without a new authenticator app")."""
    sign_in_admin(actor, secret)
    row = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    assert "Account created" in row and "Opened " not in row
    assert f'<a href="/support/audit?email={target.email}">Audit log for <bdi>{target.email}</bdi></a>' in row
    with app.app_context():
        device_ids = [d.id for d in Device.select().where(Device.user == target.id)]
    disable(actor, target, reason="Called back on the number on file, matched ID", ticket="SUP-77")
    clock.advance(120)
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert (f"Opened {utc(clock.t - 120):%Y-%m-%d %H:%M} UTC by <bdi>{ADMIN}</bdi>: “Called back on the number on "
            f"file, matched ID” (ticket SUP-77)") in row
    with app.app_context():  # the record names the devices revoked, not only how many, and their numbers
        details = AuditEvent.get(AuditEvent.kind == "support_tfa_disabled").details
        assert (details["devices"], details["device_ids"]) == ("Phone", device_ids)
    end_window(actor, target)
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert "Ended early" in row and "Password-only sign-in has stopped" in row
    assert f"by <bdi>{ADMIN}</bdi>: “Called back" in row
    # How to let the real owner in again (a support walkthrough: a window opened for a stranger and ended
    # early left the owner, phone in hand, blocked, with nothing on the row about what to do).
    assert ("The devices the disable removed do not come back. If the request was not theirs, their password may "
            "be known to someone else: ask the operator to set a new one (<code>users set-password</code>) before "
            "a new window, and open that while you are in contact with them.") in row
    # A reason that ends its own sentence gets no second full stop after the quotation mark.
    other = actor.user("erin@example.com", secret=new_secret())
    disable(actor, other, reason="Checked the passport on a video call.", ticket="")
    row = " ".join(actor.client.get(f"/support?user={other.id}").get_data(as_text=True).split())
    assert "“Checked the passport on a video call.”</span>" in row
    page = " ".join(second_client(app, clock).password_step("carol@example.com").get_data(as_text=True).split())
    assert "that time is over (it ran out, or support ended it)" in page


def test_a_window_the_operator_closed_is_not_said_to_be_closed_by_a_later_device(app, actor, secret, clock,
                                                                                  target):
    """A review: the row said a window "closed when a new device was set up" whenever the person had a device
    now. Closed by the operator's `users reset-2fa`, with a device set up days later, it says "closed since";
    the new device's own record is what says a device closed it."""
    from .test_wizard import Wizard

    sign_in_admin(actor, secret)
    disable(actor, target, reason="Called back on the number on file, matched ID", ticket="SUP-77")
    assert app.test_cli_runner().invoke(args=["users", "reset-2fa", "carol@example.com"]).exit_code == 0
    clock.advance(3 * 24 * 3600)
    carol = second_client(app, clock)
    carol.sign_in("carol@example.com")
    Wizard(carol).run("New phone")
    actor.sign_in(ADMIN, secret=secret)
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert "(ticket SUP-77), and closed since.</span>" in row and "when a new device was set up" not in row
    assert "device is not theirs" not in row


def test_a_closed_window_stays_on_the_row_for_30_days_after_the_disable(app, actor, secret, clock, target):
    """A security review: someone who got in through a support window and set up their own phone left an
    account that looked like any other ("Support window: None"), just when its owner's "I did not ask for
    this" came in. The row keeps the last disable (who, when, why) for 30 days after it, also once the window
    has closed."""
    sign_in_admin(actor, secret)
    disable(actor, target, reason="Called back on the number on file, matched ID", ticket="SUP-77")
    opened = clock.t
    carol = second_client(app, clock)
    carol.sign_in("carol@example.com")  # the password alone, in the window
    from .test_wizard import Wizard

    Wizard(carol).run("New phone")  # a new device closes the window
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert (f"None <br><span class=\"hint\">The last one was opened {utc(opened):%Y-%m-%d %H:%M} UTC by "
            f"<bdi>{ADMIN}</bdi>: "
            # how it closed (a support walkthrough read "closed since" as not saying whether it ran out)
            f"“Called back on the number on file, matched ID” (ticket SUP-77), and closed when a new device was set "
            "up.</span>") in row
    # An incident review: after a takeover through the window, the row offered only another window, which the
    # password lets the same person through again. It says so, and where the operator's steps are.
    assert ("If they say that device is not theirs, someone else signed in with their password in that window, and "
            "a new window would let them in again: ask the operator to take the account back first (README "
            "“Someone else got into an account”).") in row
    clock.advance(opened + 30 * 24 * 3600 - clock.t)  # exactly 30 days after the disable: still shown
    actor.sign_in(ADMIN, secret=secret)
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert "The last one was opened" in row
    clock.advance(1)
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert "Support window</dt> <dd> None </dd>" in row and "The last one" not in row


def test_a_window_support_ended_early_says_so_on_the_row_with_who_and_why(app, actor, secret, clock, target):
    """A support agent's review: a window another admin ended (perhaps on the owner's "I did not ask for this")
    read exactly like one that ran out. The row now says who ended it, when and, if given, why; the optional
    reason goes into the audit record (security.md 42). An older early end says nothing about a newer window,
    and a window that runs out still reads as such."""
    sign_in_admin(actor, secret)
    disable(actor, target)
    clock.advance(300)
    page = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    assert f'<label for="end{target.id}-reason">Reason</label>' in page  # the field sits in the end form
    assert end_window(actor, target, reason="Owner called: the request was not hers").status_code == 302
    ended = utc(clock.t)
    with app.app_context():
        event = AuditEvent.get(AuditEvent.kind == "support_window_ended")
        assert event.details["reason"] == "Owner called: the request was not hers"
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert (f"Ended early {ended:%Y-%m-%d %H:%M} UTC by <bdi>{ADMIN}</bdi>: “Owner called: the request was not "
            "hers”. "
            f"Password-only sign-in has stopped: only a new support window lets them in.") in row
    assert "without a new device" not in row
    clock.advance(60)
    disable(actor, target, duration="24h")  # a new window: the old early end is history
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert "Open until" in row and "Ended early" not in row
    clock.advance(24 * 3600 + 1)  # this one runs out
    actor.sign_in(ADMIN, secret=secret)
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert "without a new device: sign-in is blocked until support opens a new window." in row
    assert "Ended early" not in row


def test_ending_a_window_without_a_reason_records_none(app, actor, secret, clock, target):
    """The reason is optional: one click still ends the window, and the row names who did it."""
    sign_in_admin(actor, secret)
    disable(actor, target)
    assert end_window(actor, target).status_code == 302
    with app.app_context():
        assert AuditEvent.get(AuditEvent.kind == "support_window_ended").details["reason"] is None
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert f"UTC by <bdi>{ADMIN}</bdi>. Password-only sign-in has stopped" in row


@pytest.mark.parametrize("htmx", [False, True])
@pytest.mark.parametrize("reason", ["Owner said \u202edeirrow", "x" * 501])
def test_a_bad_end_reason_changes_nothing_and_says_why(app, actor, secret, clock, target, htmx, reason):
    """Bad input changes nothing: a reason with a direction override (it would read reversed in the audit
    log) or over 500 characters leaves the window open, writes no record, and the row comes back with the
    end form open and the message at the field (htmx swaps 200 only)."""
    sign_in_admin(actor, secret)
    disable(actor, target)
    until = user_row(app, "carol@example.com").tfa_reset_until
    r = end_window(actor, target, headers=HX if htmx else None, reason=reason)
    assert r.status_code == (200 if htmx else 400)
    html = " ".join(r.get_data(as_text=True).split())
    assert "Nothing was changed. Check the reason below." in html
    assert ("500 characters or fewer" if len(reason) > 500 else "Use letters, digits, spaces") in html
    assert '<details class="disable" open> <summary aria-describedby' in html
    assert user_row(app, "carol@example.com").tfa_reset_until == until
    assert count(app, AuditEvent, AuditEvent.kind == "support_window_ended") == 0
    assert second_client(app, clock).password_step("carol@example.com").headers["Location"].endswith("/settings")


@pytest.mark.parametrize("htmx", [False, True])
def test_an_end_form_ends_only_the_window_it_was_shown_for(app, actor, secret, clock, target, htmx):
    """A support walkthrough with two admins: the second opened Carol's End form and typed a reason; the first
    ended that window meanwhile and opened a new one after checking Carol again. The second's End then closed
    the new window, which they never saw, under a reason written about the old one, and blocked Carol. Now
    it changes nothing and says so, with the row as it is and the reason as typed; pressed again from that
    row, it ends the window."""
    sign_in_admin(actor, secret)
    disable(actor, target, reason="Video call, ID checked", ticket="T-1")
    other = second_client(app, clock)
    sign_in_admin(other, new_secret(), email="admin2@example.com")
    row = other.client.get(f"/support?user={target.id}").get_data(as_text=True)
    stale_url = re.search(rf'action="(/support/users/{target.id}/end-window\?window=\d+)"', row).group(1)
    token = csrf_from(row)
    clock.advance(60)
    assert end_window(actor, target, reason="Wrong person").status_code == 302
    assert disable(actor, target, reason="Confirmed by callback", ticket="T-3003").status_code == 302
    until = user_row(app, "carol@example.com").tfa_reset_until
    reason = "Carol wrote that the request was not hers"
    r = other.client.post(stale_url, headers=HX if htmx else {},
                          data={"csrf_token": token, f"end{target.id}-reason": reason})
    assert r.status_code == (200 if htmx else 409)
    html = " ".join(r.get_data(as_text=True).split())
    assert ("Nothing was changed: this is not the support window your page showed. It was opened again since, "
            f"and now runs until {until:%Y-%m-%d %H:%M} UTC.") in html
    assert "Confirmed by callback" in html and "T-3003" in html  # who opened this one, and why
    assert f"> {reason}</textarea>" in html and "<details class=\"disable\" open>" in html  # as typed, in view
    assert user_row(app, "carol@example.com").tfa_reset_until == until  # still open
    assert count(app, AuditEvent, AuditEvent.kind == "support_window_ended") == 1  # the first admin's only
    assert end_window(other, target, reason=reason).status_code == 302
    assert user_row(app, "carol@example.com").support_window(utc(clock.t)) == "ended"


def test_password_only_sessions_end_when_the_window_runs_out(app, actor, secret, clock, target):
    """security.md 39: a session opened with the password alone near the end of the window stops working
    when the window ends by itself, as when support ends it early; it cannot re-authenticate with the
    password alone either."""
    carol = second_client(app, clock)
    sign_in_admin(actor, secret)
    disable(actor, target, duration="24h")
    clock.advance(24 * 3600 - 600)  # ten minutes before the end
    assert carol.password_step("carol@example.com").headers["Location"].endswith("/settings")
    assert carol.client.get("/settings").status_code == 200
    clock.advance(601)  # one second past the end
    for url in ("/settings", "/settings/2fa", "/reauth"):
        r = carol.client.get(url)
        assert (r.status_code, r.headers["Location"]) == (302, "/login?notice=support-window-ended"), url
    r = carol.client.get("/settings", headers=HX)
    assert (r.status_code, r.headers["HX-Redirect"]) == (401, "/login?notice=support-window-ended")
    # The sign-in page says why (a plain "Log in" would only lead to the refusal after typing the password).
    page = carol.client.get("/login?notice=support-window-ended").get_data(as_text=True)
    assert "that time is over" in page and "signing in is blocked" in page and 'href="/support/contact"' in page
    r = carol.client.post("/reauth", data={"csrf_token": carol.csrf("/login"), "password": PASSWORD})
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    r = second_client(app, clock).password_step("carol@example.com")
    assert r.status_code == 403


def test_support_disable_forgets_the_persons_known_browsers(app, actor, secret, clock, target, target_secret):
    """A lost phone's browser, known from earlier sign-ins, keeps no password throttle of its own once support
    acts: a stranger's lock on the account applies to it again (security.md 18). It stays, forgotten, for the
    contact form alone (security.contact_browser)."""
    from webapp.models import KnownBrowser

    phone = second_client(app, clock)
    phone.password_step("carol@example.com")
    assert phone.code_step(phone.code(target_secret)).status_code == 302
    with app.app_context():
        assert KnownBrowser.select().where(KnownBrowser.user == target.id).count() == 1
    sign_in_admin(actor, secret)
    assert disable(actor, target).status_code == 302
    with app.app_context():
        [phones] = KnownBrowser.select().where(KnownBrowser.user == target.id)
        assert phones.forgotten_at is not None
        assert KnownBrowser.select().where(KnownBrowser.forgotten_at.is_null()).count() == 1  # the admin's own


def test_ending_a_window_that_is_not_open_changes_nothing(app, actor, secret, target):
    sign_in_admin(actor, secret)
    r = end_window(actor, target)
    assert r.status_code == 400 and "no open support window" in r.get_data(as_text=True)
    assert user_row(app, "carol@example.com").tfa_reset_until is None
    assert count(app, AuditEvent, AuditEvent.kind == "support_window_ended") == 0


def test_ending_one_persons_window_leaves_everyone_elses_open(app, actor, secret, clock, target):
    """security.md 39: an early end is for that person's window alone; another person's keeps its end time
    and their password still signs them in. (Found by mutation testing: an end that closed every open window
    failed no test.)"""
    erin = actor.user("erin@example.com", secret=new_secret())
    sign_in_admin(actor, secret)
    assert disable(actor, target).status_code == disable(actor, erin).status_code == 302
    until = user_row(app, "erin@example.com").tfa_reset_until
    clock.advance(60)
    assert end_window(actor, target).status_code == 302
    assert user_row(app, "erin@example.com").tfa_reset_until == until
    assert second_client(app, clock).password_step("erin@example.com").headers["Location"].endswith("/settings")


def test_enrolling_again_ends_the_window(app, actor, secret, clock, target):
    """security.md 39: once a new device is confirmed (the wizard clears tfa_reset_until), the code is needed again."""
    sign_in_admin(actor, secret)
    disable(actor, target)
    new = new_secret()
    with app.app_context():
        # what the enrolment wizard does on Complete Activation
        Device.create(user=target.id, name="New phone", secret_enc=encrypt_secret(new))
        User.update(tfa_reset_until=None).where(User.id == target.id).execute()
    carol = second_client(app, clock)
    assert carol.password_step("carol@example.com").headers["Location"].endswith("/login/verify")
    html = actor.client.get("/support?q=carol").get_data(as_text=True)
    assert "Active" in html and "New phone" in html and "Open until" not in html
    # and after the old end time she still signs in with her new device, not blocked
    clock.advance(48 * 3600)
    later = second_client(app, clock)
    later.password_step("carol@example.com")
    assert later.code_step(later.code(new)).headers["Location"].endswith("/settings")


def test_a_blocked_person_can_be_given_a_new_window(app, actor, secret, clock, target):
    """After a window lapsed, support may open another one (the person needs support again, security.md 39)."""
    sign_in_admin(actor, secret)
    disable(actor, target)
    clock.advance(25 * 3600)
    fresh = second_client(app, clock)  # the first admin's session has long timed out
    sign_in_admin(fresh, new_secret(), email="boss2@example.com")
    html = fresh.client.get("/support?q=carol").get_data(as_text=True)
    assert "Blocked" in html and DISABLE_LINK in html
    form = fresh.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True)
    assert "Until the end time they sign in" in " ".join(words(form).split()) and "Revokes every device" not in form
    assert disable(fresh, target).status_code == 302
    assert second_client(app, clock).password_step("carol@example.com").headers["Location"].endswith("/settings")


@pytest.mark.parametrize("htmx", [False, True])
def test_disabling_again_while_the_window_is_open_changes_nothing(app, actor, secret, clock, target, htmx):
    """A second "Disable 2FA temporarily" (a double click, another admin's old tab) while the window is open
    said "0 device(s) revoked", moved the window's end and signed the person out of the session they had
    just opened with their password. Now it says the window is already open and changes nothing."""
    sign_in_admin(actor, secret)
    assert disable(actor, target).status_code == 302
    until = user_row(app, "carol@example.com").tfa_reset_until
    clock.advance(240)
    carol = second_client(app, clock)
    assert carol.password_step("carol@example.com").headers["Location"].endswith("/settings")
    html = actor.client.get("/support?q=carol").get_data(as_text=True)
    assert "Temporarily off" in html and DISABLE_LINK not in html and "End support window now" in html
    r = disable(actor, target, duration="3d", headers=HX if htmx else None)
    body = r.get_data(as_text=True)
    assert r.status_code == (200 if htmx else 409)
    assert "is already off until" in body and "Nothing was changed." in body
    assert user_row(app, "carol@example.com").tfa_reset_until == until
    assert carol.client.get("/settings").status_code == 200  # still signed in
    assert count(app, AuditEvent, AuditEvent.kind == "support_tfa_disabled") == 1
    r = actor.client.get(f"/support/users/{target.id}/disable-2fa")
    assert "is already off until" in r.get_data(as_text=True) and 'name="u%d-reason"' % target.id not in (
        r.get_data(as_text=True))


def test_person_without_2fa_cannot_be_given_a_window(app, actor, secret):
    """Opening a window for someone who never had 2FA would lock them out later: refused, nothing changed."""
    dave = actor.user("dave@example.com")
    sign_in_admin(actor, secret)
    r = disable(actor, dave)
    assert r.status_code == 400 and "no two-factor authentication to disable" in r.get_data(as_text=True)
    assert user_row(app, "dave@example.com").tfa_reset_until is None
    assert count(app, AuditEvent, AuditEvent.kind == "support_tfa_disabled") == 0


# ---------------------------------------------------------------- bad input and separation of duties (38, 41)

def _unchanged(app, target):
    assert count(app, Device, Device.user == target.id) == 1
    assert user_row(app, target.email).tfa_reset_until is None
    assert count(app, AuditEvent, AuditEvent.kind == "support_tfa_disabled") == 0


def test_missing_reason_is_refused_and_nothing_changes(app, actor, secret, target, target_secret):
    """security.md 38: no reason, no action: 400, devices, sessions and the audit log untouched."""
    carol = second_client(app, clock=actor.clock)
    carol.sign_in("carol@example.com", PASSWORD, target_secret)
    sign_in_admin(actor, secret)
    r = disable(actor, target, reason="   ")
    html = r.get_data(as_text=True)
    assert r.status_code == 400
    assert "Give a reason" in html and "Nothing was changed" in html
    _unchanged(app, target)
    assert carol.client.get("/settings").status_code == 200


@pytest.mark.parametrize("reason", ["r", "ok", " checked  "])
def test_a_reason_that_says_nothing_is_refused_and_nothing_changes(app, actor, secret, target, reason):
    """security.md 38: the reason is the audit record's account of how the person's identity was checked;
    a letter or a word is refused like no reason (400, nothing changed, no audit record)."""
    sign_in_admin(actor, secret)
    r = disable(actor, target, reason=reason)
    html = r.get_data(as_text=True)
    assert r.status_code == 400
    assert "how you confirmed the person&#39;s identity (at least 10 characters)" in html
    assert "Nothing was changed" in html
    _unchanged(app, target)


@pytest.mark.parametrize("duration", ["", "30d", "0", "24 hours", "1000000h"])
def test_duration_outside_the_allow_list_is_refused(app, actor, secret, target, duration):
    """security.md 38, 39: only 1 hour, 24 hours, 3 days or 7 days."""
    sign_in_admin(actor, secret)
    r = disable(actor, target, duration=duration)
    assert r.status_code == 400 and "Choose 1 hour, 24 hours, 3 days or 7 days." in r.get_data(as_text=True)
    _unchanged(app, target)


def test_a_one_hour_window_ends_after_an_hour_and_the_form_still_offers_a_day_first(app, actor, secret, clock,
                                                                                   target):
    """security.md 39: a support walkthrough found nothing shorter than a day for someone support is talking to,
    who sets up the new phone at once. "1 hour" opens a window that ends an hour later; the form still starts
    at 24 hours."""
    sign_in_admin(actor, secret)
    form = actor.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True)
    assert re.findall(r'<option (?:selected )?value="(\w+)"', form) == ["1h", "24h", "3d", "7d"]
    assert re.search(r'<option selected value="24h">24 hours</option>', form)
    assert disable(actor, target, duration="1h").status_code == 302
    assert user_row(app, "carol@example.com").tfa_reset_until == utc(clock.t) + timedelta(hours=1)
    with app.app_context():
        assert AuditEvent.get(AuditEvent.kind == "support_tfa_disabled").details["duration"] == "1 hour"
    clock.advance(3601)
    assert user_row(app, "carol@example.com").support_window(utc(clock.t)) == "ended"


def test_overlong_reason_and_ticket_are_refused(app, actor, secret, target):
    sign_in_admin(actor, secret)
    assert disable(actor, target, reason="r" * 501).status_code == 400
    assert disable(actor, target, ticket="t" * 65).status_code == 400
    _unchanged(app, target)


@pytest.mark.parametrize("field, value", [
    ("reason", "Verified \u202eby phone\u202c against the ID card"),  # shown reversed in the record
    ("reason", "Called back \x1b[31m OK \x07 verified by phone"),
    ("reason", "Identity checked\u2028by video call"),
    ("ticket", "SUP-\x01\x02\x1b[31m\x7f"),
    ("ticket", "\ufeffSUP-12"),
])
def test_hidden_characters_in_what_support_writes_are_refused(app, actor, secret, target, field, value):
    """security.md 38, 42: the reason and ticket go into an audit record nobody can edit. Control characters,
    bidirectional overrides and invisible format characters there made the record read differently from
    what was typed (a fuzzing review); they are refused like in device names, and nothing changes."""
    sign_in_admin(actor, secret)
    r = disable(actor, target, **{field: value})
    assert r.status_code == 400
    assert "Use letters, digits, spaces" in r.get_data(as_text=True)
    _unchanged(app, target)


def test_a_reason_on_several_lines_is_fine(app, actor, secret, target):
    sign_in_admin(actor, secret)
    assert disable(actor, target, reason="Called back on the number on file.\r\nChecked\tthe ID card.").status_code == 302
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "support_tfa_disabled")
        assert event.details["reason"] == "Called back on the number on file.\nChecked\tthe ID card."


def test_htmx_validation_error_comes_back_200_inside_the_row(app, actor, secret, target):
    """htmx 2 does not swap 4xx: errors come back 200 in the row fragment, the form open."""
    sign_in_admin(actor, secret)
    r = disable(actor, target, reason="", headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "<html" not in html
    assert html.lstrip().startswith(f'<article class="user-row" id="user-{target.id}"')
    assert "Give a reason" in html and "<details class=\"disable\" open>" in html
    _unchanged(app, target)


def test_htmx_success_replaces_the_row(app, actor, secret, target):
    with app.app_context():
        SupportRequest.create(email="carol@example.com", message="lost my phone", user=target.id)
    sign_in_admin(actor, secret)
    assert "lost my phone" in actor.client.get("/support").get_data(as_text=True)
    r = disable(actor, target, headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "HX-Request" in r.headers["Vary"]
    assert html.lstrip().startswith(f'<article class="user-row" id="user-{target.id}"') and "<html" not in html
    assert "Temporarily off" in html and "End support window now" in html
    # ending the window blocks the person's sign-in: the button is behind a summary that says so first
    assert re.search(rf'<details class="disable">\s*<summary aria-describedby="user-{target.id}-email">End support '
                     r'window now</summary>.*?cannot sign in'
                     rf'.*?<button type="submit" class="danger" aria-describedby="user-{target.id}-end-warning">End '
                     r'the window</button>', html, re.S)
    assert count(app, Device, Device.user == target.id) == 0
    # the requests the action closed leave the list too (an out-of-band swap of the list)
    assert '<section class="card" aria-labelledby="requests-heading" id="open-requests" hx-swap-oob="true">' in html
    open_part, handled_part = html.split("Recently handled (1)")
    assert "Open contact requests (0)" in words(open_part) and "lost my phone" not in open_part
    assert "lost my phone" in handled_part and "by <bdi>boss@example.com</bdi>" in handled_part
    # and says how it was handled (a support agent's review: "Recently handled" did not say whether 2FA went off)
    assert ", who turned 2FA off for 24 hours." in handled_part
    # and the notice says so: the request left the open ones (a support agent's usability review)
    assert "ended, 1 contact request marked as handled. Now reply to them" in " ".join(words(html).split())


def test_the_notice_counts_devices_and_sessions_apart(app, actor, secret, clock, target_secret):
    """The admin reads how many devices were revoked and how many sessions ended, each its own count, to
    tell the person: 2 devices and 1 signed-in browser say so (the device count was the session count)."""
    target = actor.user("carol@example.com", devices={"Phone": target_secret, "Tablet": new_secret()})
    carol = second_client(app, clock)
    assert carol.sign_in("carol@example.com", PASSWORD, target_secret).status_code == 302
    sign_in_admin(actor, secret)
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == target.id).count() == 1
    r = disable(actor, target, headers=HX)
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and ": 2 devices revoked, 1 session ended. Now reply to them" in html
    assert count(app, Device, Device.user == target.id) == 0
    with app.app_context():
        event = AuditEvent.get(AuditEvent.kind == "support_tfa_disabled")
        assert (event.details["devices_removed"], event.details["sessions_ended"]) == (2, 1)


def test_closing_requests_leaves_those_handled_earlier_as_they_were(app, actor, secret, clock, target):
    """security.md 42: "Mark this person's open contact requests as handled" closes the open ones only. A
    request another admin handled earlier still says who handled it and when (history is not rewritten),
    and the audit record counts only the request this action closed."""
    earlier_admin = actor.user("boss2@example.com", admin=True, secret=new_secret())
    handled_at = utc(clock.t - 3600)
    with app.app_context():
        old = SupportRequest.create(email="carol@example.com", message="Lost my phone last week", user=target.id,
                                    handled_at=handled_at, handled_by=earlier_admin.id)
        new = SupportRequest.create(email="carol@example.com", message="Lost my phone again", user=target.id)
    admin = sign_in_admin(actor, secret)
    row = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    assert "<dt>Open contact requests</dt><dd>1</dd>" in row  # the handled one is not counted as open
    assert disable(actor, target, close_requests=True).status_code == 302
    with app.app_context():
        old, new = SupportRequest.get_by_id(old.id), SupportRequest.get_by_id(new.id)
        assert (old.handled_at, old.handled_by_id) == (handled_at, earlier_admin.id)
        assert (new.handled_at, new.handled_by_id) == (utc(clock.t), admin.id)
        event = AuditEvent.get(AuditEvent.kind == "support_tfa_disabled")
        assert event.details["requests_closed"] == 1
    handled = actor.client.get("/support").get_data(as_text=True).split("Recently handled (2)")[1]
    earlier = handled.split("Lost my phone last week")[1].split("</li>")[0]
    assert "by <bdi>boss2@example.com</bdi> (no 2FA change with it)." in earlier and "Marked as handled" in earlier
    closed = handled.split("Lost my phone again")[1].split("</li>")[0]
    assert f"Closed {utc(clock.t):%Y-%m-%d %H:%M} UTC by <bdi>{ADMIN}</bdi>, who turned 2FA off for 24 hours." in closed
    # reopened and marked as handled later: that is how it was handled now
    actor.post_form(f"/support/requests/{new.id}/reopen", {}, form_url="/support")
    clock.advance(600)
    actor.post_form(f"/support/requests/{new.id}/handled", {}, form_url="/support")
    handled = actor.client.get("/support").get_data(as_text=True).split("Recently handled (2)")[1]
    again = handled.split("Lost my phone again")[1].split("</li>")[0]
    assert "Marked as handled" in again and "turned 2FA off" not in again


def test_a_disable_says_which_shown_requests_another_admin_marked_as_handled_meanwhile(app, actor, secret, clock,
                                                                                       target):
    """A support walkthrough with two admins: one marked a request as handled while the other, who had it on
    the disable form, disabled with "mark as handled" ticked. The outcome counted only what it closed and did
    not mention the other request. Now it says that one was marked as handled meanwhile, and by whom."""
    with app.app_context():
        first = SupportRequest.create(email="carol@example.com", message="Lost my phone", user=target.id)
        second = SupportRequest.create(email="carol@example.com", message="Still locked out", user=target.id)
    sign_in_admin(actor, secret)
    form_page = actor.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True)
    shown = re.search(rf'name="u{target.id}-requests_shown" type="hidden" value="([\d,]*)"', form_page).group(1)
    assert shown == f"{first.id},{second.id}"
    other = second_client(app, clock)
    sign_in_admin(other, new_secret(), email="admin2@example.com")
    assert other.post_form(f"/support/requests/{second.id}/handled", {}, form_url="/support").status_code == 302
    p = f"u{target.id}-"
    r = actor.post_form(f"/support/users/{target.id}/disable-2fa",
                        {p + "reason": "Identity checked by video call against ID card", p + "duration": "24h",
                         p + "close_requests": "y", p + "requests_shown": shown}, form_url="/support", headers=HX)
    html = " ".join(r.get_data(as_text=True).split())
    assert ("0 sessions ended, 1 contact request marked as handled (1 request shown on the form was marked as "
            "handled meanwhile, by <bdi>admin2@example.com</bdi>). Now reply to them") in html
    with app.app_context():
        assert SupportRequest.get_by_id(second.id).handled_by_id != SupportRequest.get_by_id(first.id).handled_by_id


@pytest.mark.parametrize("seen_id, late_id", [(None, None), (1000, 500)])
def test_a_request_that_comes_in_while_the_form_is_filled_stays_open(app, actor, secret, target, seen_id, late_id):
    """security.md 42: the disable closes only the person's requests that were open when its form was shown
    (the form carries their numbers). One sent meanwhile, perhaps by the real owner ("I did not ask
    for this"), nobody has read: it stays on the open list. The audit record names the requests it closed.
    The second case numbers the late request below the one shown: PostgreSQL hands out a request's id when it is
    inserted, not when it commits, so a request the form did not show can have a smaller id than one it did
    (its sender committed last); "every id up to the newest shown" closed it unread."""
    with app.app_context():
        seen = SupportRequest.create(id=seen_id, email="carol@example.com", message="Lost my phone", user=target.id)
    sign_in_admin(actor, secret)
    form_page = actor.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True)
    shown = re.search(rf'name="u{target.id}-requests_shown" type="hidden" value="([\d,]*)"', form_page).group(1)
    assert shown == str(seen.id)
    with app.app_context():
        late = SupportRequest.create(id=late_id, email="carol@example.com", message="I did NOT ask for a reset",
                                     user=target.id)
    p = f"u{target.id}-"
    r = actor.post_form(f"/support/users/{target.id}/disable-2fa",
                        {p + "reason": "Identity checked by video call against ID card", p + "duration": "24h",
                         p + "close_requests": "y", p + "requests_shown": shown}, form_url="/support")
    assert r.status_code == 302
    with app.app_context():
        assert SupportRequest.get_by_id(seen.id).handled_at is not None
        assert SupportRequest.get_by_id(late.id).handled_at is None
        event = AuditEvent.get(AuditEvent.kind == "support_tfa_disabled")
        assert (event.details["requests_closed"], event.details["requests"]) == (1, str(seen.id))
    # The admin is told, with the outcome, that one was left open and why; it is on the open list.
    flashed = " ".join(actor.client.get(r.headers["Location"]).get_data(as_text=True).split())
    assert '<p class="flash warning">1 contact request of theirs was left open: not shown when this form was' in flashed
    assert "I did NOT ask for a reset" in actor.client.get("/support").get_data(as_text=True).split("Recently")[0]
    # A form without the numbers (or a forged list) closes nothing rather than everything.
    for forged in ("", "x", "-1", "١", "1,,2", "1;2", "1," * 100 + "1", "9" * 19, None):
        assert _request_numbers(forged) == []
    assert _request_numbers("15,12,15") == [12, 15]
    assert _request_numbers(",".join(map(str, range(100, 0, -1)))) == list(range(1, 101))  # a full list of 100


def test_acting_on_yourself_is_refused(app, actor, secret):
    """security.md 41: support cannot reset its own 2FA."""
    admin = sign_in_admin(actor, secret)
    r = disable(actor, admin)
    assert r.status_code == 403
    assert count(app, Device, Device.user == admin.id) == 1
    assert user_row(app, ADMIN).tfa_reset_until is None
    assert count(app, AuditEvent, AuditEvent.kind == "support_tfa_disabled") == 0
    with app.app_context():  # the attempt is audited (security.md 43)
        event = AuditEvent.get(AuditEvent.kind == "support_action_refused")
        assert (event.actor_id, event.user_id, event.details["why"]) == (admin.id, admin.id, "own account")


def test_acting_on_another_admin_is_refused(app, actor, secret):
    """security.md 41: no admin-on-admin resets without a second approver (we do not offer it at all)."""
    other = actor.user("other-admin@example.com", admin=True, secret=new_secret())
    sign_in_admin(actor, secret)
    assert disable(actor, other).status_code == 403
    assert end_window(actor, other).status_code == 403
    assert count(app, Device, Device.user == other.id) == 1
    assert user_row(app, "other-admin@example.com").tfa_reset_until is None
    assert count(app, AuditEvent, AuditEvent.kind.in_(["support_tfa_disabled", "support_window_ended"])) == 0
    # security.md 43: the attempts are audited, with who tried what on whom (a 403 was only a log line);
    # reading the form is not an attempt
    assert actor.client.get(f"/support/users/{other.id}/disable-2fa").status_code == 403
    with app.app_context():
        refused = [(e.actor_id, e.user_id, e.details) for e in AuditEvent.select().where(
            AuditEvent.kind == "support_action_refused").order_by(AuditEvent.id)]
    admin_id = user_row(app, ADMIN).id
    assert refused == [(admin_id, other.id, {"action": "disable_2fa", "why": "another admin"}),
                       (admin_id, other.id, {"action": "end_window", "why": "another admin"})]


def test_a_person_made_an_admin_while_the_form_was_checked_is_not_acted_on(app, actor, secret, target, monkeypatch):
    """security.md 41: the disable re-reads the person under their row lock and refuses an admin there too,
    not only on the page's first read: a promotion landing in between (`users promote`) must not let
    support strip an admin's 2FA. Found by mutation testing: dropping the re-check failed no test."""
    import webapp.support as support_module

    original = support_module._target_or_404

    def read_then_promoted(user_id):
        found = original(user_id)  # read as an ordinary user ...
        User.update(is_admin=True).where(User.id == user_id).execute()  # ... promoted a moment later
        return found

    sign_in_admin(actor, secret)
    monkeypatch.setattr(support_module, "_target_or_404", read_then_promoted)
    # Without reading the form first: that read would promote the person before the post, and the post's
    # first read would refuse them, so the re-check was still untested (found by a second mutation sweep).
    assert disable(actor, target, close_requests=False).status_code == 403
    assert count(app, Device, Device.user == target.id) == 1
    assert user_row(app, "carol@example.com").tfa_reset_until is None
    assert count(app, AuditEvent, AuditEvent.kind == "support_tfa_disabled") == 0


def test_unknown_person_is_404(actor, secret):
    sign_in_admin(actor, secret)
    assert actor.post_form("/support/users/9999/disable-2fa", {"u9999-reason": "x", "u9999-duration": "24h"},
                           form_url="/support").status_code == 404


def test_action_without_csrf_token_is_refused(app, actor, secret, target):
    sign_in_admin(actor, secret)
    r = actor.client.post(f"/support/users/{target.id}/disable-2fa",
                          data={f"u{target.id}-reason": "checked", f"u{target.id}-duration": "24h"})
    assert r.status_code == 400
    _unchanged(app, target)


# ---------------------------------------------------------------- open contact requests


def test_open_requests_are_listed_and_linked_to_the_account(app, actor, secret, target):
    with app.app_context():
        SupportRequest.create(email="carol@example.com", message="Phone fell in the lake", user=target.id)
        SupportRequest.create(email="ghost@example.com", message="Who am I even")
        SupportRequest.create(email="done@example.com", message="Old one", handled_at=utc(0))
    sign_in_admin(actor, secret)
    html = actor.client.get("/support").get_data(as_text=True)
    open_part, handled_part = html.split("Recently handled (1)")
    assert "Phone fell in the lake" in open_part and "Who am I even" in open_part and "Old one" not in open_part
    assert "Old one" in handled_part
    assert f'href="/support?user={target.id}"' in open_part
    # what to do then (a support agent's usability review: the request was a dead end)
    assert ("no account with this address: ask which address they sign in with, and treat that account as "
            "unconfirmed until its owner answers there") in open_part
    assert "Open contact requests (2)" in words(open_part)


def test_the_open_count_is_the_true_total_when_more_are_waiting_than_are_listed(app, actor, secret):
    """The list stops at the oldest 100; the heading still counts every open request."""
    from webapp.support import OPEN_REQUESTS_SHOWN

    total = OPEN_REQUESTS_SHOWN + 5
    with app.app_context():
        SupportRequest.insert_many([{"email": f"p{i:03d}@example.com", "message": f"request number {i:03d}",
                                     "created_at": utc(i)} for i in range(total)]).execute()
    sign_in_admin(actor, secret)
    html = actor.client.get("/support").get_data(as_text=True)
    assert f"Open contact requests ({total})" in words(html)
    assert html.count('class="request"') == OPEN_REQUESTS_SHOWN
    assert "request number 000" in html and f"request number {total - 1:03d}" not in html  # oldest first


def _pages(html):
    """The open requests card's page links, by their words (the page's text: addresses unescaped)."""
    nav = re.search(r'<nav class="pager"[^>]* aria-label="Pages of open contact requests">(.*?)</nav>', html, re.S)
    links = re.findall(r'<a href="([^"]+)"[^>]*>([^<]+)</a>', nav.group(1)) if nav else []
    return {text: unescape(href) for href, text in links}


def _open_part(html):
    """The open requests card without its Recently handled list."""
    card = html[html.index('id="open-requests"'):]
    return card.split('<details class="handled-requests"')[0]


def _contact(actor, email, message, ip):
    """The contact form sent from client address `ip`, as anyone can."""
    return actor.post_form("/support/contact", {"email": email, "message": message},
                           environ_base={"REMOTE_ADDR": ip})


def test_requests_past_the_first_hundred_are_reached_through_the_pages(app, actor, secret, clock, target):
    """A security review: strangers may send requests in anyone's name within the limits (3 an hour per
    address typed and per network), and 102 from 34 networks filled the list, which stopped at the oldest 100:
    the admin read "Open contact requests (103)", and the owner's "my account was taken over", sent after
    them, was on no page. The card says which of them it shows, and its links lead to every other one, with
    or without JavaScript (plain addresses)."""
    stranger = second_client(app, clock)
    for i in range(102):
        r = _contact(stranger, f"someone{i}@example.com", f"Please turn 2FA off, message {i:03d}",
                     f"198.51.100.{i // 3 + 1}")
        assert r.status_code == 302, i
    owner = second_client(app, clock)
    assert _contact(owner, "carol@example.com", "My account was taken over: do not turn anything off",
                    "203.0.113.7").status_code == 302
    sign_in_admin(actor, secret)

    page = actor.client.get("/support").get_data(as_text=True)
    text = words(" ".join(page.split()))
    assert "Open contact requests (103)" in text and "Showing 1–100 of 103 (oldest first)." in text
    assert "taken over" not in page and _open_part(page).count('class="request"') == 100
    links = _pages(page)
    assert set(links) == {"Newer requests", "Newest requests"}  # nothing older than the oldest
    assert all(link.endswith("#open-requests") for link in links.values())  # the browser goes to the card

    later = actor.client.get(links["Newer requests"]).get_data(as_text=True)
    assert "Showing 101–103 of 103 (oldest first)." in words(" ".join(later.split()))
    assert "My account was taken over" in later and _open_part(later).count('class="request"') == 3
    assert set(_pages(later)) == {"Oldest requests", "Older requests"}
    assert "message 000" in actor.client.get(_pages(later)["Older requests"]).get_data(as_text=True)
    newest = actor.client.get(links["Newest requests"]).get_data(as_text=True)
    assert "Showing 4–103 of 103 (oldest first)." in words(" ".join(newest.split()))
    assert "My account was taken over" in newest and "message 002" not in newest and "message 003" in newest

    # Handled from that page without JavaScript, the admin is back on it (not on the oldest hundred).
    with app.app_context():
        owners = SupportRequest.get(SupportRequest.email == "carol@example.com")
    action = re.search(rf'action="(/support/requests/{owners.id}/handled[^"]*)"', later).group(1)
    r = actor.post_form(unescape(action), {}, form_url="/support")
    assert r.status_code == 302 and r.headers["Location"] == unescape(links["Newer requests"]).split("#")[0]
    back = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "The request from <bdi>carol@example.com</bdi> is marked as handled." in back
    assert "Showing 101–102 of 102 (oldest first)." in words(" ".join(back.split()))


def test_the_next_page_starts_after_the_last_request_shown_whatever_was_handled_meanwhile(app, actor, secret):
    """Pages are named by a request, not by a number: while one admin reads the first hundred, another handles
    ten of them, and "Newer requests" still starts with the 101st they had not seen yet (page 2 by number
    would have started at the 111th, and ten requests would have been on no page the admin saw)."""
    with app.app_context():
        SupportRequest.insert_many([{"email": f"p{i:03d}@example.com", "message": f"request number {i:03d}",
                                     "created_at": utc(i)} for i in range(150)]).execute()
    sign_in_admin(actor, secret)
    newer = _pages(actor.client.get("/support").get_data(as_text=True))["Newer requests"]
    with app.app_context():  # another admin, meanwhile
        SupportRequest.update(handled_at=utc(500)).where(SupportRequest.message < "request number 010").execute()
    page = actor.client.get(newer).get_data(as_text=True)
    first = re.search(r'<p class="request-message">([^<]+)</p>', _open_part(page)).group(1)
    assert first == "request number 100"
    assert "Showing 91–140 of 140 (oldest first)." in words(" ".join(page.split()))
    # and going back shows the 90 before it, from the oldest
    older = actor.client.get(_pages(page)["Older requests"]).get_data(as_text=True)
    assert "Showing 1–100 of 140 (oldest first)." in words(" ".join(older.split()))
    assert "request number 010" in older and "request number 009" not in _open_part(older)


def test_the_open_requests_and_windows_are_planned_for_their_values_while_the_hints_stay_prepared(app, actor, secret,
                                                                                                  clock):
    """psycopg prepares a statement on the server at its sixth run on a connection, and PostgreSQL may then keep
    one plan for all values (docs/performance.md). Two of the Support page's reads went wrong so: the plan of
    the oldest page of open requests, guessing a tenth of the open requests for its LIMIT, walked the index by
    time through every handled request (12 ms with 100,000, against 0.1), and that of the latest support
    windows of several people read every record of a person under attack (4.5 ms with 125,000, against 0.25).
    Asked for again and again, the page shows the same, and on PostgreSQL neither read is prepared, while the
    requests' hints, whose plan takes 1.5-3 ms to make for a hundred requests, are."""
    admin = sign_in_admin(actor, secret)
    people = [actor.user(f"p{i}@example.com", secret=new_secret()) for i in range(3)]
    with app.app_context():
        handled = [{"email": f"h{i:03d}@example.com", "user": None, "message": "handled", "created_at": utc(i),
                    "handled_at": utc(i + 1)} for i in range(30)]
        waiting = [{"email": p.email, "user": p.id, "message": f"open request of {p.email}",
                    "created_at": utc(100 + i), "handled_at": None} for i, p in enumerate(people)]
        SupportRequest.insert_many(handled + waiting).execute()
        AuditEvent.insert_many([{"kind": "support_tfa_disabled", "user": p.id, "actor": admin.id,
                                 "created_at": utc(clock.t - 60),
                                 "detail": '{"reason": "Checked on a video call"}'} for p in people]).execute()
    pages = [actor.client.get("/support?q=p").get_data(as_text=True) for _ in range(12)]
    assert pages == [pages[0]] * 12 and pages[0].count("open request of p") == 3
    assert pages[0].count("Checked on a video call") == 3
    if is_sqlite():
        return

    before = prepared_statements(app)
    assert actor.client.get("/support?q=p").get_data(as_text=True) == pages[0]
    after = prepared_statements(app)
    assert [sql for sql in after if 'FROM "supportrequest"' in sql and 'ORDER BY "t1"."created_at"' in sql] == []
    assert [sql for sql in after if "support_window_ended" in sql] == []
    hints = [sql for sql in after if '"auditevent"' in sql and "BETWEEN" in sql]
    assert hints and all(after[sql] == before.get(sql, 0) + 1 for sql in hints), after


def test_each_page_link_of_the_requests_card_is_there_once_and_the_range_line_leads_to_them(app, actor, secret,
                                                                                           target):
    """A review: a long first page had "Newest requests" twice, in the line saying which requests are shown
    and in the pager, same words and same address, so a screen reader's list of links and Tab gave it twice.
    Each page link is now in the pager alone; the line above the list still says where the page is and leads
    to the pager (an in-page link to it, which takes the focus there: the keyboard does not Tab through a
    hundred requests to reach it), on every page that has others, also one person's."""
    with app.app_context():
        SupportRequest.insert_many([{"email": f"p{i:03d}@example.com", "message": f"request number {i:03d}",
                                     "created_at": utc(i)} for i in range(250)]).execute()
        SupportRequest.insert_many([{"email": "carol@example.com", "user": target.id, "created_at": utc(300 + i),
                                     "message": f"in her name {i:03d}"} for i in range(101)]).execute()
    sign_in_admin(actor, secret)
    first = actor.client.get("/support").get_data(as_text=True)
    middle = actor.client.get(_pages(first)["Newer requests"]).get_data(as_text=True)
    last = actor.client.get(_pages(first)["Newest requests"]).get_data(as_text=True)
    theirs = actor.client.get(f"/support?user={target.id}&requests=theirs").get_data(as_text=True)
    for html, shown in ((first, "Showing 1–100 of 351 (oldest first)."), (middle, "Showing 101–200 of 351"),
                        (last, "Showing 252–351 of 351"), (theirs, "Only the requests from carol@example.com: "
                                                                   "1–100 of 101 (oldest first).")):
        card = _open_part(html)
        links = re.findall(r'<a href="([^"]+)"[^>]*>([^<]+)</a>', card)
        texts = [text for _, text in links]
        assert len(texts) == len(set(texts)), texts  # no link twice
        assert set(links) >= {(address, text) for text, address in _pages(html).items()
                              for address in [address.replace("&", "&amp;")]}
        line = re.search(r'<p class="requests-range">(.*?)</p>', card, re.S).group(1)
        assert shown in words(" ".join(line.split()))
        assert '<a href="#requests-pages">Skip to the page links</a>' in line
        assert not set(re.findall(r">([^<]+)</a>", line)) & set(_pages(html))  # no page link of its own
        assert '<nav class="pager" id="requests-pages" tabindex="-1" aria-label="Pages of open contact requests">' in card
    assert [t for t in re.findall(r">([^<]+)</a>", _open_part(first)) if t == "Newest requests"] == ["Newest requests"]
    # With every open request on the page there are no pages: neither the line nor the link to them.
    with app.app_context():
        SupportRequest.delete().execute()
        SupportRequest.create(email="ghost@example.com", message="Please help me")
    few = _open_part(actor.client.get("/support").get_data(as_text=True))
    assert "requests-range" not in few and "#requests-pages" not in few and "requests-pages" not in few


def test_few_requests_are_shown_as_before_and_odd_addresses_show_the_oldest(app, actor, secret):
    """The usual case is unchanged: every open request on the page, no line about which, no page links, and
    buttons whose addresses carry nothing. An address naming no page (hand-edited, or a request erased since)
    shows the oldest."""
    with app.app_context():
        req = SupportRequest.create(email="ghost@example.com", message="Please help me")
    sign_in_admin(actor, secret)
    for query in ("", "?after=abc", "?after=999999", "?before=0", "?newest=yes", "?requests=theirs",
                  f"?after={req.id}&before={req.id}", "?after=" + "9" * 30, "?after=%C2%B2"):
        r = actor.client.get("/support" + query)
        html = r.get_data(as_text=True)
        assert r.status_code == 200 and "Please help me" in html, query
        assert "Showing" not in words(html) and not _pages(html) and "Only the requests" not in html, query
    assert f'action="/support/requests/{req.id}/handled"' in actor.client.get("/support").get_data(as_text=True)


def test_one_persons_requests_are_found_from_their_row_however_many_others_wait(app, actor, secret, target):
    """Among many open requests, one person's may be pages away: their row (a search, or "Show account")
    links to theirs alone, to read and handle; a flood in their own name is paged in the same way, and the
    disable form, which lists the oldest hundred of theirs, says so and links to the rest."""
    with app.app_context():
        SupportRequest.insert_many([{"email": f"p{i:03d}@example.com", "message": f"someone else {i:03d}",
                                     "created_at": utc(i)} for i in range(150)]).execute()
        SupportRequest.insert_many([{"email": "carol@example.com", "user": target.id, "created_at": utc(200 + i),
                                     "message": f"in her name {i:03d}"} for i in range(101)]).execute()
        own = SupportRequest.create(email="carol@example.com", user=target.id, created_at=utc(400),
                                    message="This is really carol: my account was taken over")
    sign_in_admin(actor, secret)
    row = actor.client.get("/support?q=carol@example.com").get_data(as_text=True)
    link = re.search(r'<a href="([^"]+)">Open contact requests from <bdi>carol@example.com</bdi> \(102\)</a>', row)
    assert link and unescape(link.group(1)) == f"/support?user={target.id}&requests=theirs#open-requests"
    page = actor.client.get(unescape(link.group(1))).get_data(as_text=True)
    text = words(" ".join(page.split()))
    assert "Open contact requests (252)" in text  # all of them, in the heading as before
    assert "Only the requests from carol@example.com: 1–100 of 102 (oldest first)." in text
    assert "someone else" not in page and "in her name 000" in page and "really carol" not in page
    assert re.search(rf'<a href="/support\?user={target.id}#open-requests">Show all open requests</a>', page)
    assert page.index(f'id="user-{target.id}"') < page.index('id="open-requests"')  # her row, then hers
    newest = actor.client.get(_pages(page)["Newest requests"]).get_data(as_text=True)
    assert "really carol" in newest and "someone else" not in newest
    assert "Only the requests from carol@example.com: 3–102 of 102 (oldest first)." in words(" ".join(newest.split()))

    # The disable form lists the oldest hundred of hers, and says there are more.
    form = actor.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True)
    assert "The oldest 100 of their 102 open requests: the form marks only these as handled." in words(
        " ".join(form.split()))
    assert f'href="/support?user={target.id}&amp;requests=theirs#open-requests">Read all of them' in form
    assert "really carol" not in form

    # Marked as handled there with htmx: the card comes back as it was, hers on that page.
    action = unescape(re.search(rf'hx-post="(/support/requests/{own.id}/handled[^"]*)"', newest).group(1))
    assert "requests=theirs" in action and "newest=1" in action
    card = actor.client.post(action, headers={**HX, "X-CSRFToken": csrf_from(newest)}).get_data(as_text=True)
    assert "Only the requests from carol@example.com: 2–101 of 101 (oldest first)." in words(" ".join(card.split()))
    assert "someone else" not in card and "in her name 100" in card
    # A disable in her row (htmx) refreshes the card as the page shows it (HX-Current-URL), not the oldest of all.
    r = disable(actor, target, headers={**HX, "HX-Current-URL": "http://localhost" + unescape(link.group(1))})
    oob = r.get_data(as_text=True).split('id="open-requests"')[1]
    assert "Only the requests from carol@example.com" in words(oob) and "someone else" not in oob



def _tags(text):
    """`text` spelled in tag characters (U+E0020-E007E), which show nothing."""
    return "".join(chr(0xE0000 + ord(c)) for c in text)


def test_characters_that_show_nothing_are_shown_as_escapes_on_the_support_page(app, actor, secret, clock):
    """A review: a contact message reached the Support page as it was written. A zero-width space, a word
    joiner or a byte-order mark split words where the admin saw none, right-to-left marks reordered the text
    around them, and tag characters (U+E0020-E007E) spelled a whole text that nobody reading saw. Each is
    shown as its escape in a box (`\\u200b`, as the log writes it), a run of them in one box; emoji, the flag
    of England, Persian spelling with its non-joiner and Hebrew show as written. A message and an address
    stored before the form refused overrides and such addresses show theirs as escapes too."""
    england = "\U0001f3f4" + _tags("gbeng") + "\U000e007f"
    sent = {
        "alice@example.com": "Lost my\u200b phone\u2060\ufeff, ple\u2062ase \u200fhelp\u061c\u200e now",
        "bob@example.com": "Please help me." + _tags("Ignore the identity check, disable 2FA now"),
        "carol@example.com": f"Lost it {england} \U0001f469\u200d\U0001f4bb \u2764\ufe0f \u05e2\u05d6\u05e8\u05d4 "
                             "گوشی\u200cام",
        # a "flag" whose code is no flag's: its tags are text nobody sees
        "dave@example.com": "My phone \U0001f3f4" + _tags("pin 1234") + "\U000e007f is gone",
    }
    for n, (email, message) in enumerate(sent.items()):
        assert _contact(Actor(app, app.test_client(), clock), email, message, f"198.51.100.{n}").status_code == 302
    with app.app_context():
        SupportRequest.create(email="o\u200bld@example.com", message="Old message \u202eenohp ym\u202c please")
    sign_in_admin(actor, secret)

    page = _open_part(actor.client.get("/support").get_data(as_text=True))

    def box(*chars):  # the escapes of `chars`, in their box
        return '<code class="hidden-char" dir="ltr">' + "".join(c.encode("unicode_escape").decode() for c in chars) \
            + "</code>"

    assert ("Lost my" + box("\u200b") + " phone" + box("\u2060", "\ufeff") + ", ple" + box("\u2062") + "ase "
            + box("\u200f") + "help" + box("\u061c", "\u200e") + " now") in page
    assert r"Please help me.<code class=" + '"hidden-char" dir="ltr">' + r"\U000e0049\U000e0067\U000e006e" in page
    assert "Please help me." + box(*_tags("Ignore the identity check, disable 2FA now")) in page
    assert sent["carol@example.com"] in page
    assert "My phone \U0001f3f4" + box(*_tags("pin 1234"), "\U000e007f") + " is gone" in page
    assert "Old message " + box("\u202e") + "enohp ym" + box("\u202c") + " please" in page
    assert "<bdi>o" + box("\u200b") + "ld@example.com</bdi>" in page
    shown = page.replace(england, "").replace("\u200d", "").replace("\ufe0f", "").replace("\u200c", "")
    assert not [c for c in shown if unicodedata.category(c) == "Cf" or 0xE0000 <= ord(c) <= 0xE0FFF]


# An address stored before the forms refused such: markup, and a right-to-left override that reverses what follows.
_TRICKY = "<script>alert(1)</script>\u202eevil@example.com"
# As the Support page shows it: the markup as text, the override as its escape in a box, the whole inside <bdi>.
_TRICKY_SHOWN = ('<bdi>&lt;script&gt;alert(1)&lt;/script&gt;<code class="hidden-char" dir="ltr">\\u202e</code>'
                 'evil@example.com</bdi>')


def _said(html, htmx, notice_id):
    """The line an action left: the flashed messages at the top of the page it led to (category, text), or,
    after an htmx action, the status line with `notice_id` in what came back."""
    if htmx:
        return [("success", re.search(rf'<p [^>]*id="{notice_id}"[^>]*>(.*?)</p>', html, re.S).group(1))]
    flashes = re.search(r'<div class="flashes" id="flashes" role="status">(.*?)</div>', html, re.S).group(1)
    return re.findall(r'<p class="flash (\w+)">(.*?)</p>', flashes, re.S)


@pytest.mark.parametrize("htmx", [False, True], ids=["flashed", "htmx"])
def test_what_an_action_on_a_request_says_shows_its_address_as_the_card_does(app, actor, secret, htmx):
    """A review: the line Mark as handled and Reopen leave (flashed on the page a plain form goes back to, or
    the card's status line) gave the request's address as stored, where the card shows it revealed in <bdi>:
    a right-to-left override in an address stored before the form refused such reversed the rest of the line,
    "... is marked as handled.", and a zero-width space hid in it. The address is shown as the card shows it,
    and markup in it stays text."""
    with app.app_context():
        req = SupportRequest.create(email=_TRICKY, message="Lost my phone")
    sign_in_admin(actor, secret)
    said = []
    for action in ("handled", "handled", "reopen", "reopen"):  # each a second time: "already"
        if htmx:
            page = actor.client.get("/support").get_data(as_text=True)
            html = actor.client.post(f"/support/requests/{req.id}/{action}",
                                     headers={**HX, "X-CSRFToken": csrf_from(page)}).get_data(as_text=True)
        else:
            r = actor.post_form(f"/support/requests/{req.id}/{action}", {}, form_url="/support")
            assert r.status_code == 302
            html = actor.client.get(r.headers["Location"]).get_data(as_text=True)
        said += _said(html, htmx, "requests-notice")
        assert "\u202e" not in html and "<script>alert" not in html
    assert said == [("success", f"The request from {_TRICKY_SHOWN} is marked as handled."),
                    ("success", f"The request from {_TRICKY_SHOWN} was already handled, by <bdi>{ADMIN}</bdi>."),
                    ("success", f"The request from {_TRICKY_SHOWN} is open again."),
                    ("success", f"The request from {_TRICKY_SHOWN} was open already.")]


@pytest.mark.parametrize("htmx", [False, True], ids=["flashed", "htmx"])
def test_what_a_disable_and_an_early_end_say_shows_the_persons_address_revealed(app, actor, secret, clock, htmx):
    """The same review: the lines a disable and an early end leave gave the person's address as stored. Shown
    as the Support page shows addresses in people's text: revealed, in <bdi>, markup as text; and so does the
    refusal of a second disable while the window is open."""
    target = actor.user(_TRICKY, secret=new_secret())
    sign_in_admin(actor, secret)
    r = disable(actor, target, headers=HX if htmx else None)
    html = r.get_data(as_text=True) if htmx else actor.client.get(r.headers["Location"]).get_data(as_text=True)
    [(category, line)] = _said(html, htmx, f"user-{target.id}-notice")
    assert category == "success" and line.startswith(f"2FA for {_TRICKY_SHOWN} is off until ")
    assert "1 device revoked" in line and "\u202e" not in line and "<script>" not in line
    refused = actor.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True)
    assert re.search(rf'id="user-{target.id}-error"[^>]*>2FA for {re.escape(_TRICKY_SHOWN)} is already off until ',
                     refused)
    clock.advance(60)
    r = end_window(actor, target, headers=HX if htmx else None)
    html = r.get_data(as_text=True) if htmx else actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert _said(html, htmx, f"user-{target.id}-notice") == [
        ("success", f"The support window for {_TRICKY_SHOWN} is closed; signing in now needs support again.")]


# Addresses no form takes any more (email-validator refuses U+200B and U+202E as "unsafe characters", and "<"
# outside quotes; sign-up also refuses every character that shows nothing: models.lookalike_problem), which
# rows stored before those checks may still hold: a person's, and that of an admin who acted on them.
_HIDDEN_PERSON = "car\u200bol\u202emoc.elpmaxe@evil.example"
_HIDDEN_ADMIN = "bo\u202ess\u200b@example.com"
_TRICKY_ADMIN = "<i>boss</i>\u202e@example.com"
_RLO = '<code class="hidden-char" dir="ltr">\\u202e</code>'  # U+202E, as its escape in a box
_ZWSP = '<code class="hidden-char" dir="ltr">\\u200b</code>'  # U+200B
# Each as the admin pages show it: in the page, revealed inside <bdi>; in an attribute or the <title>, where no
# markup goes, as plain text with the same escapes (and escaped as any text).
_SHOWN = {
    _HIDDEN_PERSON: (f"<bdi>car{_ZWSP}ol{_RLO}moc.elpmaxe@evil.example</bdi>",
                     "car\\u200bol\\u202emoc.elpmaxe@evil.example"),
    _HIDDEN_ADMIN: (f"<bdi>bo{_RLO}ss{_ZWSP}@example.com</bdi>",
                    "bo\\u202ess\\u200b@example.com"),
    _TRICKY: (_TRICKY_SHOWN, "&lt;script&gt;alert(1)&lt;/script&gt;\\u202eevil@example.com"),
    _TRICKY_ADMIN: (f"<bdi>&lt;i&gt;boss&lt;/i&gt;{_RLO}@example.com</bdi>",
                    "&lt;i&gt;boss&lt;/i&gt;\\u202e@example.com"),
}


@pytest.mark.parametrize("email", [_HIDDEN_PERSON, _TRICKY, "carol\u202e@example.com", "car\u200bol@example.com"])
def test_no_form_takes_such_an_address_now(app, actor, email):
    """Why the test below stores its addresses itself: sign-up, sign-in and the contact form refuse them
    (email-validator's "unsafe characters", and "<" outside quotes; sign-up's lookalike check, the contact
    form's VisibleText). Only rows stored before those checks hold them."""
    actor.user(ADMIN, admin=True)  # an instance in use: sign-up, not the first-run page
    for r in (actor.post_form("/signup", {"email": email, "password": PASSWORD, "confirm": PASSWORD}),
              actor.post_form("/support/contact", {"email": email, "message": "Lost my phone, please help"}),
              actor.password_step(email)):
        assert r.status_code == 400 and 'id="email-error"' in r.get_data(as_text=True)
    with app.app_context():
        assert User.select().count() == 1 and SupportRequest.select().count() == 0


def _revealed_only(html, *addresses):
    """`html` with its whitespace squeezed, after asserting what an admin page must not hold: a hidden character
    of the addresses as it is, anywhere but in the value of a text field (the search box, the audit log's
    Person filter: the form sends it back, and it must be the address itself), their markup unescaped, or one
    of them shown but not revealed inside <bdi>."""
    outside_fields = re.sub(r'(<input [^>]*value=")[^"]*"', r'\1"', html)
    assert "\u202e" not in outside_fields and "\u200b" not in outside_fields
    assert "<script>" not in html and "<i>boss" not in html
    for address in addresses:
        shown = _SHOWN[address][0]
        assert 0 < html.count(shown) == html.count(shown.removeprefix("<bdi>").removesuffix("</bdi>"))
    return " ".join(html.split())


@pytest.mark.parametrize("person, admin_address", [(_HIDDEN_PERSON, _HIDDEN_ADMIN), (_TRICKY, _TRICKY_ADMIN)],
                         ids=["hidden-characters", "markup"])
def test_the_admin_pages_show_every_address_revealed_in_bdi(app, actor, secret, clock, monkeypatch, person,
                                                            admin_address):
    """A review: the contact requests showed their addresses revealed (hidden characters as escapes in a box)
    inside <bdi>, but the rest of the admin pages printed an account's address as stored: the heading of a
    person's row, its "Audit log for" and "Open contact requests from" links, the hints of the disable and
    End support window forms, the disable form's page (its title and the name of its section too), "Only the
    requests from", the admin "by" whom a window was opened, ended or a request handled, the signed-in
    admin's own address, the audit log's Person column and the accounts its filter offers. A right-to-left
    override in such an address showed the rest of the address (and of the line) reversed, a zero-width space
    hid in it. Every one is now shown as the requests show addresses; in attributes and the title, as text
    with the same escapes."""
    monkeypatch.setattr("webapp.support.OPEN_REQUESTS_SHOWN", 1)  # "The oldest 1 of their 2 open requests"
    target = actor.user(person, secret=new_secret())
    admin = sign_in_admin(actor, secret)
    with app.app_context():
        for message in ("Lost my phone", "Still locked out"):
            SupportRequest.create(email=person, message=message, user=target.id)
        SupportRequest.create(email="ghost@example.com", message="Lost my phone, please help", handled_at=utc(clock.t),
                              handled_by=admin.id)
        # The signed-in admin's address as an old row could hold it: every "by" below is theirs.
        User.update(email=admin_address).where(User.id == admin.id).execute()
    p, a = _SHOWN[person][0], _SHOWN[admin_address][0]
    minute = f"{utc(clock.t):%Y-%m-%d %H:%M} UTC"

    page = _revealed_only(actor.client.get("/support").get_data(as_text=True), person, admin_address)
    for expected in (f"Signed in as <strong>{a}</strong>",
                     f'id="user-{target.id}-email">{p}</h3>', f'id="user-{admin.id}-email">{a} <span class="badge',
                     f"Audit log for {p}</a>", f"Open contact requests from {p} (2)</a>",
                     f"<strong>{p}</strong>, {minute}, request",
                     f'Show account<span class="visually-hidden"> of {p}</span>',
                     f'Mark as handled<span class="visually-hidden"> the request from {p}</span>',
                     f"Marked as handled {minute} by {a} (no 2FA change with it)."):
        assert expected in page
    html = actor.client.get(f"/support?user={target.id}&requests=theirs").get_data(as_text=True)
    assert f"Only the requests from {p}: 1–1 of 2 (oldest first)." in _revealed_only(html, person, admin_address)
    # The search box holds the address itself, as the form sends it back: a text field is a paragraph of its own,
    # which an override in it cannot reorder, and the row under it shows the address revealed.
    assert re.search(r'<input type="search" id="q" name="q" value="([^"]*)"', html).group(1) == escape(person)

    # The disable form: its own page (without JavaScript), and in the row (htmx).
    form_page = _revealed_only(actor.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True),
                               person, admin_address)
    text = _SHOWN[person][1]
    for expected in (f"<title>Temporarily disable 2FA: {text} · twostep</title>", f'aria-label="{text}"',
                     f'id="person-requests-heading">Open contact requests from {p}</h2>',
                     f'(open contact requests from {p})</span>', f"Revokes every device of {p} at once"):
        assert expected in form_page
    row = _revealed_only(actor.client.get(f"/support/users/{target.id}/disable-2fa", headers=HX)
                         .get_data(as_text=True), person)
    assert f'id="user-{target.id}-requests" tabindex="-1" autofocus>Open contact requests from {p}</h4>' in row

    assert disable(actor, target).status_code == 302  # closes the one request its form showed
    with app.app_context():
        SupportRequest.update(handled_at=utc(clock.t), handled_by=admin.id).where(
            SupportRequest.user == target.id).execute()
    page = _revealed_only(actor.client.get(f"/support?user={target.id}&requests=theirs").get_data(as_text=True),
                          person, admin_address)
    for expected in (f"None: {p} has no open requests.", f"Opened {minute} by {a}: “Identity checked",
                     f"{p} then cannot sign in with the password alone",
                     f"Closed {minute} by {a}, who turned 2FA off for 24 hours."):
        assert expected in page
    clock.advance(60)
    assert end_window(actor, target).status_code == 302
    page = _revealed_only(actor.client.get(f"/support?user={target.id}").get_data(as_text=True), person,
                          admin_address)
    assert f"Ended early {utc(clock.t):%Y-%m-%d %H:%M} UTC by {a}. Password-only sign-in has stopped" in page

    # The audit log: its Person column, and the accounts its filter offers for the start of an address.
    log = _revealed_only(actor.client.get("/support/audit").get_data(as_text=True), person, admin_address)
    assert f'data-label="Person">{p}<br><span class="hint">by {a}</span></td>' in log
    assert f'data-label="Person">{a}</td>' in log  # their own sign-in
    offered = _revealed_only(actor.client.get("/support/audit", query_string={"email": person[:3]})
                             .get_data(as_text=True), person)
    assert re.search(rf'<li><a href="[^"]+">{re.escape(p)}</a></li>', offered)
    html = actor.client.get("/support/audit", query_string={"email": person}).get_data(as_text=True)
    assert f'data-label="Person">{p}<br>' in _revealed_only(html, person, admin_address)
    assert re.search(r'<input [^>]*name="email"[^>]* value="([^"]*)"', html).group(1) == escape(person)
    # And what a search found nothing for: the start of an address, typed or in a link.
    html = actor.client.get("/support", query_string={"q": "zz\u202e"}, headers=HX).get_data(as_text=True)
    assert f"No account starts with “<bdi>zz{_RLO}</bdi>”." in _revealed_only(html)


def test_device_names_on_a_persons_row_and_in_the_audit_logs_sentences_are_revealed(app, actor, secret, clock):
    """The rest of that review's list: a person's row named each device inside <bdi> but as stored, and the
    audit log's sentence saying what happened ("Device renamed: ... to ...") printed the name as stored too. A
    device name stored before the name field refused hidden characters (or one a later check refuses) showed a
    right-to-left override as it is: the rest of the line (when it was added and last used) read backwards.
    Both show it revealed now (escapes in a box), markup as text, as the audit log's details already did."""
    target = actor.user("carol@example.com", secret=new_secret())
    sign_in_admin(actor, secret)
    name = "<i>Pho</i>\u202ene\u200b"
    shown = f"&lt;i&gt;Pho&lt;/i&gt;{_RLO}ne{_ZWSP}"
    with app.app_context():
        Device.update(name=name).where(Device.user == target.id).execute()
        AuditEvent.create(created_at=utc(clock.t), kind="device_renamed",
                          user=target.id, detail=json.dumps({"device": name, "old_name": "Phone", "device_id": 1}))
    row = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    assert f"<li><bdi>{shown}</bdi>: added " in row and "\u202e" not in row and "<i>Pho" not in row
    log = actor.client.get("/support/audit", query_string={"email": "carol@example.com"}).get_data(as_text=True)
    assert f'data-label="What happened">Authenticator device renamed: “Phone” to “{shown}”</td>' in log
    assert f'<span class="detail">Device: {shown}</span>' in log
    assert "\u202e" not in log and "<i>Pho" not in log


def test_line_breaks_of_an_older_message_are_line_breaks_not_escapes(app, actor, secret):
    """A review of fields.revealed: a message stored before the form turned a browser's CRLF line breaks into
    newlines (2026-12-05) holds a carriage return at every line end. HTML shows CRLF and CR as one line break,
    as the page did before; revealed showed each as a boxed \\r, on every line of every older message."""
    with app.app_context():
        SupportRequest.create(email="old@example.com", message="Lost my phone.\r\nPlease help.\rThanks\u200b")
    sign_in_admin(actor, secret)
    page = _open_part(actor.client.get("/support").get_data(as_text=True))
    assert ('<p class="request-message">Lost my phone.\nPlease help.\nThanks'
            '<code class="hidden-char" dir="ltr">\\u200b</code></p>') in page
    assert "\\r" not in page and "\r" not in page


def test_request_cards_show_the_numbers_the_audit_log_gives_and_where_a_forgotten_password_goes(app, actor,
                                                                                                  secret, target):
    """A support walkthrough: the audit log says "Request numbers: 2, 5" for a disable that closed requests,
    and the cards showed no numbers to match them with. And a person who also forgot the password ("I forgot
    my password as well") is the operator's: the requests card says so."""
    with app.app_context():
        first = SupportRequest.create(email="carol@example.com", message="Lost my phone", user=target.id)
        second = SupportRequest.create(email="carol@example.com", message="And my password", user=target.id)
    sign_in_admin(actor, secret)
    page = words(" ".join(actor.client.get("/support").get_data(as_text=True).split()))
    assert f"request {first.id} " in page and f"request {second.id} " in page
    assert "A forgotten password is the server operator's to reset (users set-password" in page.replace("&#39;", "'")
    assert disable(actor, target).status_code == 302
    log = words(" ".join(actor.client.get("/support/audit?email=carol@example.com").get_data(as_text=True).split()))
    assert f"Request numbers: {first.id}, {second.id}" in log


def test_a_request_can_be_marked_handled(app, actor, secret):
    with app.app_context():
        req = SupportRequest.create(email="ghost@example.com", message="Please help me")
    admin = sign_in_admin(actor, secret)
    r = actor.post_form(f"/support/requests/{req.id}/handled", {}, form_url="/support")
    assert r.status_code == 302 and r.headers["Location"].endswith("/support")
    assert "marked as handled" in actor.client.get("/support").get_data(as_text=True)
    [row] = fetch(app, SupportRequest)
    assert row.handled_at is not None and row.handled_by_id == admin.id
    # a second click changes nothing, says so, and writes no second audit record
    actor.post_form(f"/support/requests/{req.id}/handled", {}, form_url="/support")
    # by whom (a support walkthrough: another admin's "already handled" said nothing of who)
    assert (f"The request from <bdi>ghost@example.com</bdi> was already handled, by <bdi>{ADMIN}</bdi>."
            in actor.client.get("/support").get_data(as_text=True))
    assert count(app, AuditEvent, AuditEvent.kind == "support_request_handled") == 1


def test_marking_handled_with_htmx_returns_the_requests_card_as_it_is_now(app, actor, secret):
    """The whole card comes back: the request has moved from the open list to "Recently handled", both
    counts follow, and a status line says what was done (app.js focuses it)."""
    with app.app_context():
        req = SupportRequest.create(email="ghost@example.com", message="Please help me")
        SupportRequest.create(email="other@example.com", message="Please help me too")
    sign_in_admin(actor, secret)
    page = actor.client.get("/support").get_data(as_text=True)
    assert "Open contact requests (2)" in words(page) and page.count('hx-swap-oob') == 0
    r = actor.client.post(f"/support/requests/{req.id}/handled", headers={**HX, "X-CSRFToken": csrf_from(page)})
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and html.lstrip().startswith('<section class="card" aria-labelledby="requests-heading" '
                                                             'id="open-requests">')
    assert ('<p class="notice" role="status" id="requests-notice" tabindex="-1" aria-labelledby="requests-notice">'
            'The request from <bdi>ghost@example.com</bdi> is marked as handled.</p>') in html
    open_part, handled_part = html.split("Recently handled (1)")
    assert "Open contact requests (1)" in words(open_part) and "Please help me too" in open_part
    assert "ghost@example.com" not in open_part.split("</p>", 2)[2]  # only in the status line above the list
    assert "ghost@example.com" in handled_part and "Reopen" in handled_part


@pytest.mark.parametrize("htmx", [False, True])
def test_a_request_marked_handled_by_mistake_can_be_found_and_reopened(app, actor, secret, htmx):
    """The handled requests used to vanish: one closed by mistake was lost. The latest ones are listed under
    "Recently handled" with who handled them and when; Reopen puts one back on the open list, audited."""
    with app.app_context():
        req = SupportRequest.create(email="ghost@example.com", message="Please help me")
    admin = sign_in_admin(actor, secret)
    actor.post_form(f"/support/requests/{req.id}/handled", {}, form_url="/support")
    page = actor.client.get("/support").get_data(as_text=True)
    assert "Open contact requests (0)" in words(page)
    handled = page.split("Recently handled (1)")[1]
    assert "Please help me" in handled and f"by <bdi>{ADMIN}</bdi>" in handled
    assert f'action="/support/requests/{req.id}/reopen"' in handled
    assert "Reopen<span class=\"visually-hidden\"> the request from <bdi>ghost@example.com</bdi></span>" in handled

    if htmx:
        r = actor.client.post(f"/support/requests/{req.id}/reopen", headers={**HX, "X-CSRFToken": csrf_from(page)})
        html = r.get_data(as_text=True)
        assert r.status_code == 200 and 'id="open-requests"' in html and "<html" not in html
        assert "The request from <bdi>ghost@example.com</bdi> is open again." in html
        assert "Open contact requests (1)" in words(html) and "Recently handled" not in html
        assert "Mark as handled" in html
    else:
        r = actor.post_form(f"/support/requests/{req.id}/reopen", {}, form_url="/support")
        assert r.status_code == 302 and r.headers["Location"] == "/support"
        page = actor.client.get("/support").get_data(as_text=True)
        assert "The request from <bdi>ghost@example.com</bdi> is open again." in page
    [row] = fetch(app, SupportRequest)
    assert row.handled_at is None and row.handled_by_id is None
    page = actor.client.get("/support").get_data(as_text=True)
    assert "Open contact requests (1)" in words(page) and "Recently handled" not in page
    # a second click changes nothing and writes no second record
    actor.post_form(f"/support/requests/{req.id}/reopen", {}, form_url="/support")
    with app.app_context():
        [event] = AuditEvent.select().where(AuditEvent.kind == "support_request_reopened")
        assert event.actor_id == admin.id and event.details == {"request": req.id}


def test_reopening_needs_the_support_role_and_an_existing_request(app, actor, secret):
    with app.app_context():
        req = SupportRequest.create(email="ghost@example.com", message="Please help me", handled_at=utc(0))
    actor.user("dave@example.com", secret=secret)
    actor.sign_in("dave@example.com", PASSWORD, secret)
    assert actor.post_form(f"/support/requests/{req.id}/reopen", {}, form_url="/settings").status_code == 403
    assert fetch(app, SupportRequest)[0].handled_at is not None
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    actor.clock.advance(30)
    sign_in_admin(actor, secret)
    assert actor.post_form("/support/requests/4242/reopen", {}, form_url="/support").status_code == 404


def test_marking_an_unknown_request_is_404(actor, secret):
    sign_in_admin(actor, secret)
    assert actor.post_form("/support/requests/4242/handled", {}, form_url="/support").status_code == 404


@pytest.mark.parametrize("action, handled_at", [("handled", None), ("reopen", utc(0))])
def test_a_request_deleted_while_it_is_marked_or_reopened_is_404_not_a_server_error(app, actor, secret, monkeypatch,
                                                                                   action, handled_at):
    """Contact requests are deleted now (the purge of long-handled ones, `users erase`). One deleted by such a
    transaction after Mark as handled or Reopen had read it (PostgreSQL: their UPDATE waits for the delete's
    commit, then changes nothing) was read again to say what happened, and its absence was a 500 with a
    traceback. It is a 404 that says the request is gone, as for one deleted before."""
    with app.app_context():
        req = SupportRequest.create(email="ghost@example.com", message="Please help me", handled_at=handled_at)
    sign_in_admin(actor, secret)
    token = actor.csrf("/support")
    real = SupportRequest.get_or_none

    def read_then_deleted(*args, **kwargs):
        found = real(*args, **kwargs)
        if found is not None:  # what the other transaction does meanwhile
            SupportRequest.delete().where(SupportRequest.id == found.id).execute()
        return found

    monkeypatch.setattr(SupportRequest, "get_or_none", read_then_deleted)
    for headers in ({}, HX):
        with app.app_context():
            SupportRequest.insert(id=req.id, email=req.email, message=req.message, handled_at=handled_at,
                                  created_at=req.created_at).on_conflict_ignore().execute()
        r = actor.client.post(f"/support/requests/{req.id}/{action}", data={"csrf_token": token}, headers=headers)
        assert r.status_code == 404, r.status_code
        assert "no longer stored" in r.get_data(as_text=True)


def test_the_request_handled_last_is_at_the_top_of_recently_handled(app, actor, secret, clock):
    """A request just closed by mistake is the first under "Recently handled", where the admin looks for it
    to reopen it; with more handled than are listed, the oldest drop off, never the newest."""
    with app.app_context():
        first = SupportRequest.create(email="first@example.com", message="The first request")
        second = SupportRequest.create(email="second@example.com", message="The second request")
    sign_in_admin(actor, secret)
    actor.post_form(f"/support/requests/{first.id}/handled", {}, form_url="/support")
    clock.advance(60)
    actor.post_form(f"/support/requests/{second.id}/handled", {}, form_url="/support")
    handled = actor.client.get("/support").get_data(as_text=True).split("Recently handled (2)")[1]
    assert handled.index("The second request") < handled.index("The first request")

    from webapp.support import HANDLED_SHOWN

    with app.app_context():
        SupportRequest.delete().execute()
        SupportRequest.insert_many([{"email": f"p{i:03d}@example.com", "message": f"handled number {i:03d}",
                                     "created_at": utc(i), "handled_at": utc(1000 + i)}
                                    for i in range(HANDLED_SHOWN + 1)]).execute()
    html = actor.client.get("/support").get_data(as_text=True)
    handled = html.split(f"Recently handled ({HANDLED_SHOWN})")[1]
    assert handled.count('class="request"') == HANDLED_SHOWN
    assert "handled number 000" not in handled  # the oldest fell off
    assert handled.index(f"handled number {HANDLED_SHOWN:03d}") < handled.index("handled number 001")


def test_enrolling_through_the_wizard_ends_the_window(app, actor, secret, clock, target):
    """security.md 39, end to end: password-only sign-in in the window, the real wizard, then codes again."""
    from .test_wizard import Wizard

    sign_in_admin(actor, secret)
    disable(actor, target)
    clock.advance(3600)
    carol = second_client(app, clock)
    assert carol.password_step("carol@example.com").headers["Location"].endswith("/settings")
    wizard = Wizard(carol)
    assert wizard.run("Replacement phone").status_code == 200
    assert user_row(app, "carol@example.com").tfa_reset_until is None
    assert "temporarily off" not in carol.client.get("/settings").get_data(as_text=True)
    support = second_client(app, clock)
    sign_in_admin(support, new_secret(), email="boss2@example.com")
    html = support.client.get("/support?q=carol").get_data(as_text=True)
    assert "Replacement phone" in html and "Open until" not in html
    clock.advance(30 * 3600)
    later = second_client(app, clock)
    assert later.password_step("carol@example.com").headers["Location"].endswith("/login/verify")
    assert later.code_step(later.code(wizard.secret)).headers["Location"].endswith("/settings")


def test_the_disable_is_all_or_nothing(app, actor, secret, target, target_secret, monkeypatch):
    """One transaction: if the audit record cannot be written, no device is revoked and no session ended."""
    import webapp.support as support_module

    carol = second_client(app, clock=actor.clock)
    carol.sign_in("carol@example.com", PASSWORD, target_secret)
    sign_in_admin(actor, secret)

    def broken_audit(*args, **kwargs):
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr(support_module, "audit", broken_audit)
    with pytest.raises(RuntimeError):
        disable(actor, target)
    assert count(app, Device, Device.user == target.id) == 1
    assert user_row(app, "carol@example.com").tfa_reset_until is None
    assert count(app, ServerSession, ServerSession.user == target.id) == 1
    assert carol.client.get("/settings").status_code == 200


def test_ending_a_window_early_deletes_the_persons_sessions(app, actor, secret, clock, target):
    """security.md 40, 42: ending the window deletes the person's password-only sessions server-side (not
    only refuses them on load), and the audit record says how many. (Found by mutation testing.)"""
    import json

    carol = second_client(app, clock)
    sign_in_admin(actor, secret)
    disable(actor, target)
    clock.advance(600)
    carol.password_step("carol@example.com")
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == target.id).count() == 1
    assert end_window(actor, target).status_code == 302
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == target.id).count() == 0
        event = AuditEvent.get(AuditEvent.kind == "support_window_ended")
        assert json.loads(event.detail)["sessions_ended"] == 1


def test_open_requests_say_whether_the_sender_had_entered_the_password(app, actor, secret, clock, target):
    """Support decided blind: the owner's request (sent from the code step, after the correct password) and
    a stranger's request for someone else's address looked the same; the difference was only in the audit
    log. The list now says it, and that it is not proof of identity."""
    actor.user("dave@example.com")
    carol = second_client(app, clock)
    assert carol.password_step("carol@example.com").headers["Location"] == "/login/verify"
    carol.post_form("/support/contact", {"email": "carol@example.com", "message": "Lost my phone in a lake."})
    stranger = second_client(app, clock)
    stranger.client.environ_base["REMOTE_ADDR"] = "203.0.113.9"  # another network: its own per-network limit
    stranger.post_form("/support/contact", {"email": "dave@example.com", "message": "Please turn off my 2FA."})
    stranger.post_form("/support/contact", {"email": "nobody@example.com", "message": "Who am I, then?"})
    sign_in_admin(actor, secret)
    page = actor.client.get("/support").get_data(as_text=True)
    items = {email: page.split(f"<strong><bdi>{email}</bdi></strong>", 1)[1].split("</li>", 1)[0]
             for email in ("carol@example.com", "dave@example.com", "nobody@example.com")}
    assert "Sent after entering this account's password (not proof of identity" in items["carol@example.com"]
    assert "Sent without entering this account's password." in items["dave@example.com"]
    assert "account's password" not in items["nobody@example.com"]  # no account: nothing to enter
    # still said once it is handled, where support decides whether to reopen it
    with app.app_context():
        carols = SupportRequest.get(SupportRequest.email == "carol@example.com")
    actor.post_form(f"/support/requests/{carols.id}/handled", {}, form_url="/support")
    handled = actor.client.get("/support").get_data(as_text=True).split("Recently handled (1)")[1]
    assert "Sent after entering this account's password (not proof of identity" in handled


def test_a_request_says_when_its_senders_browser_first_signed_in_to_the_account(app, actor, secret, clock, target,
                                                                                target_secret):
    """security.md 38: support confirms who writes by hand, and the request's hints are what it has to start
    from. After a takeover the intruder is signed in and knows the password, so "signed in" and "entered the
    password" point at them; the owner knows neither. What tells them apart: the owner's usual browser first
    signed in to the account long before, the intruder's at the takeover. Each request from a browser the
    account signed in from (known, or forgotten lately: the owner's, once the intruder changed the password)
    says when that browser first signed in and whether it was forgotten since; not proof either, and it says so
    (a shared computer the owner once used counts too)."""
    owner = second_client(app, clock)
    owner.client.environ_base["REMOTE_ADDR"] = "198.51.100.4"
    assert owner.sign_in("carol@example.com", secret=target_secret).status_code == 302
    owners_first = utc(clock.t)
    clock.advance(40 * 86400)  # the takeover, weeks later
    intruder = second_client(app, clock)
    intruder.client.environ_base["REMOTE_ADDR"] = "203.0.113.66"
    assert intruder.sign_in("carol@example.com", secret=target_secret).status_code == 302
    intruders_first = utc(clock.t)
    new = {"current": PASSWORD, "new": "the intruder's passphrase", "confirm": "the intruder's passphrase"}
    assert intruder.post_form("/settings/password", new).status_code == 302
    forgotten = utc(clock.t)
    clock.advance(600)
    owner.post_form("/support/contact", {"email": "carol@example.com", "message": "My password was changed!"})
    intruder.post_form("/support/contact", {"email": "carol@example.com", "message": "All good, ignore that."})
    stranger = second_client(app, clock)
    stranger.client.environ_base["REMOTE_ADDR"] = "192.0.2.9"
    stranger.post_form("/support/contact", {"email": "carol@example.com", "message": "Please turn off my 2FA."})
    sign_in_admin(actor, secret)
    page = " ".join(actor.client.get("/support").get_data(as_text=True).split())
    hint = {text: page.split(text)[0].rsplit('<p class="hint">', 1)[1]
            for text in ("My password was changed!", "All good, ignore that.", "Please turn off my 2FA.")}
    # And since when it is no longer known: the owner cut it off (or the intruder did) ten minutes before.
    assert (f"Sent from a browser that first signed in to this account on {owners_first:%Y-%m-%d %H:%M} UTC, no "
            f"longer known to it since {forgotten:%Y-%m-%d %H:%M} UTC (a new password, Sign out everywhere else, "
            "a 2FA reset or ten newer browsers): not proof either") in hint["My password was changed!"]
    assert "Sent without entering this account's password." in hint["My password was changed!"]
    said = hint["All good, ignore that."]
    assert f"first signed in to this account on {intruders_first:%Y-%m-%d %H:%M} UTC: not proof either" in said
    assert "Sent while signed in to this account" in said
    assert "Sent from a browser" not in hint["Please turn off my 2FA."]
    # The audit log says it in its own words.
    log = " ".join(actor.client.get("/support/audit?email=carol%40example.com").get_data(as_text=True).split())
    assert "Sent from a browser that first signed in to the account at" in log
    assert f"{owners_first:%Y-%m-%d %H:%M:%S} UTC" in log
    assert f"No longer known to the account since: {forgotten:%Y-%m-%d %H:%M:%S} UTC" in log


def test_a_request_numbered_as_a_deleted_one_is_not_told_that_ones_sender(app, actor, secret, clock, target):
    """On SQLite a new row takes the largest id plus one: once the newest contact request is deleted (the purge
    of requests handled long ago, `users erase`), the next request gets its number. The hint read the first
    request's record by that number, and a stranger's request for the same account said "Sent after entering
    this account's password", the one thing support tells the owner from a stranger by. A request's record is
    the one written with it, and request numbers are no longer given twice."""
    from webapp.clock import now
    from webapp.models import purge_expired

    carol = second_client(app, clock)
    assert carol.password_step("carol@example.com").headers["Location"] == "/login/verify"
    carol.post_form("/support/contact", {"email": "carol@example.com", "message": "Lost my phone in a lake."})
    with app.app_context():
        first = SupportRequest.get()
        SupportRequest.update(handled_at=utc(clock.t)).execute()
    clock.advance(181 * 86400)  # past HANDLED_REQUESTS_KEEP_DAYS
    with app.app_context():
        assert purge_expired(app.config, now())[5] == 1
    stranger = second_client(app, clock)
    stranger.client.environ_base["REMOTE_ADDR"] = "203.0.113.9"
    stranger.post_form("/support/contact", {"email": "carol@example.com", "message": "Please turn off my 2FA."})
    with app.app_context():
        second = SupportRequest.get()
        # Not the number again, on SQLite either since 2026-12-07 (AUTOINCREMENT): the hint still reads the
        # record written with the request.
        assert second.id == first.id + 1
    sign_in_admin(actor, secret)
    page = " ".join(actor.client.get("/support").get_data(as_text=True).split())
    item = page.split("<strong><bdi>carol@example.com</bdi></strong>", 1)[1].split("</li>", 1)[0]
    assert "Sent without entering this account's password." in item


def test_a_request_says_whether_its_sender_was_signed_in_and_when_the_phone_last_gave_a_code(
        app, actor, secret, clock, target, target_secret):
    """A security review: "I lost my phone" sent by someone who has the password, after the owner's phone had
    just signed in, looked like any other request. It now says whether the sender was signed in (not only
    past the password) and when a code from the account's devices was last accepted, in bold when that was
    after the request: the phone is not lost, or not lost by the person who wrote."""
    dave = actor.user("dave@example.com")
    carol = second_client(app, clock)
    assert carol.password_step("carol@example.com").headers["Location"] == "/login/verify"
    carol.post_form("/support/contact", {"email": "carol@example.com", "message": "Lost my phone in a lake."})
    signed_in = second_client(app, clock)
    signed_in.client.environ_base["REMOTE_ADDR"] = "203.0.113.9"
    signed_in.sign_in("dave@example.com")  # no 2FA: the password alone signs in
    signed_in.post_form("/support/contact", {"email": "dave@example.com", "message": "How do I set up 2FA?"})
    clock.advance(120)
    owner = second_client(app, clock)  # the owner's phone gives a right code after the request
    owner.client.environ_base["REMOTE_ADDR"] = "198.51.100.4"
    owner.sign_in("carol@example.com", secret=target_secret)
    sign_in_admin(actor, secret)
    page = " ".join(actor.client.get("/support").get_data(as_text=True).split())
    items = {email: page.split(f"<strong><bdi>{email}</bdi></strong>", 1)[1].split("</li>", 1)[0]
             for email in ("carol@example.com", "dave@example.com")}
    assert "Sent after entering this account's password" in items["carol@example.com"]
    assert (f"<strong>A code from this account's device was accepted after this request was sent</strong>, "
            f"{utc(clock.t):%Y-%m-%d %H:%M} UTC: ask about it before turning 2FA off.") in items["carol@example.com"]
    # The same warning beside the form in the person's row, where an agent who came by a search decides
    # (a support agent's usability review), also when the form comes back with an error.
    carol_id = user_row(app, "carol@example.com").id
    for r in (actor.client.get(f"/support/users/{carol_id}/disable-2fa", headers=HX),
              actor.post_form(f"/support/users/{carol_id}/disable-2fa", {f"u{carol_id}-reason": ""},
                              form_url="/support", headers=HX)):
        row = " ".join(r.get_data(as_text=True).split())
        assert "A code from this account's device was accepted after this request was sent" in row
        assert row.index("Lost my phone in a lake.") < row.index(f'name="u{carol_id}-reason"')
    # the field with the error takes the focus, not the requests' heading
    assert 'aria-invalid="true" autofocus id=' in row and f'<h4 id="user-{carol_id}-requests" tabindex="-1">' in row
    assert count(app, Device, Device.user == carol_id) == 1
    assert "Sent while signed in to this account (not proof of identity" in items["dave@example.com"]
    dave_hint = items["dave@example.com"].split('<p class="hint">', 1)[1].split("</p>", 1)[0]
    assert "Sent while signed in" in dave_hint and "code" not in dave_hint  # no device: nothing about codes
    with app.app_context():
        assert [e.details.get("signed_in") for e in AuditEvent.select().where(
            AuditEvent.kind == "support_request").order_by(AuditEvent.id)] == [None, True]
    # A request sent after the phone's last code says when that was, without the warning.
    carol.post_form("/support/contact", {"email": "carol@example.com", "message": "Still no phone, please."})
    page = " ".join(actor.client.get("/support").get_data(as_text=True).split())
    last = page.split("Still no phone, please.")[0].rsplit("<strong><bdi>carol@example.com</bdi></strong>", 1)[1]
    assert f"Last code accepted from this account's devices: {utc(clock.t):%Y-%m-%d %H:%M} UTC." in last
    assert dave.id is not None


def test_a_new_phone_set_up_after_a_request_raises_no_question_about_it(app, actor, secret, clock, target):
    """The review of the hint above: a phone set up after the request (in support's window) and signing in
    since is the person's new one, not the lost one still at work. Only devices that existed when the request
    was sent count; handled requests say nothing of codes at all."""
    carol = second_client(app, clock)
    carol.password_step("carol@example.com")
    carol.post_form("/support/contact", {"email": "carol@example.com", "message": "Lost my phone in a lake."})
    sign_in_admin(actor, secret)
    assert disable(actor, target, close_requests=False).status_code == 302
    clock.advance(60)
    carol = second_client(app, clock)
    carol.sign_in("carol@example.com")  # the password alone, in the window
    from .test_wizard import Wizard

    new_phone = Wizard(carol)
    new_phone.run("New phone")
    clock.advance(60)
    second_client(app, clock).sign_in("carol@example.com", secret=new_phone.secret)
    page = " ".join(actor.client.get("/support").get_data(as_text=True).split())
    request = page.split("<strong><bdi>carol@example.com</bdi></strong>", 1)[1].split("</li>", 1)[0]
    assert "Lost my phone in a lake." in request and "accepted after this request" not in request
    assert "Last code accepted" not in request


def test_an_owner_whose_address_is_stored_in_an_older_spelling_is_still_recognised(app, actor, secret, clock, target):
    """The contact form told a signed-in owner to "sign in up to the code step first" and recorded their
    request as sent without the password, when their address was stored before addresses were normalised
    (punycode domain): it compared spellings, not accounts."""
    from webapp.models import SupportRequest

    with app.app_context():
        User.update(email="eve@xn--mnchen-3ya.de").where(User.id == target.id).execute()  # stored as before
    stranger = second_client(app, clock)
    for n in range(app.config["SUPPORT_REQUESTS_PER_HOUR"]):
        stranger.client.environ_base["REMOTE_ADDR"] = f"203.0.113.{n + 1}"
        stranger.post_form("/support/contact", {"email": "eve@münchen.de", "message": f"Turn it off, it is me ({n})."})
    eve = second_client(app, clock)
    eve.client.environ_base["REMOTE_ADDR"] = "198.51.100.20"
    assert eve.password_step("eve@münchen.de").headers["Location"] == "/login/verify"
    page = eve.client.get("/support/contact").get_data(as_text=True)
    assert 'value="eve@xn--mnchen-3ya.de"' in page  # the form offers the address as stored
    r = eve.post_form("/support/contact", {"email": "eve@xn--mnchen-3ya.de", "message": "My phone is gone, truly."})
    assert r.status_code == 302  # the owner's own room above the strangers' limit
    with app.app_context():
        last = AuditEvent.select().where(AuditEvent.kind == "support_request").order_by(AuditEvent.id.desc()).get()
        assert last.details["after_password"] is True and last.user_id == target.id
        assert SupportRequest.select().count() == app.config["SUPPORT_REQUESTS_PER_HOUR"] + 1


def test_a_blocked_sign_in_proves_nothing_once_the_password_is_changed(app, actor, secret, clock, target):
    """The blocked page's browser counts as having entered the password for a few minutes; after the
    operator sets a new password, the old one it entered proves nothing."""
    sign_in_admin(actor, secret)
    disable(actor, target, duration="24h")
    clock.advance(25 * 3600)
    carol = second_client(app, clock)
    assert carol.password_step("carol@example.com").status_code == 403
    assert 'value="carol@example.com"' in carol.client.get("/support/contact").get_data(as_text=True)
    result = app.test_cli_runner().invoke(args=["users", "set-password", "carol@example.com",
                                                "--password", "a completely new one"])
    assert result.exit_code == 0, result.output
    assert 'value="carol@example.com"' not in carol.client.get("/support/contact").get_data(as_text=True)


@pytest.mark.parametrize("htmx", [False, True])
def test_an_account_the_operator_disabled_shows_so_and_takes_no_support_action(app, actor, secret, clock, target,
                                                                                htmx):
    """An account out of use by `users disable`: its row says since when, and offers no support action (a
    window would revoke devices that `users enable` is meant to give back, on an account that may be in
    other hands). A disable or an early end sent all the same (an old tab) changes nothing. The audit log
    says what the operator did, with the reason (security.md 42)."""
    sign_in_admin(actor, secret)
    clock.advance(60)
    result = app.test_cli_runner().invoke(args=["users", "disable", "carol@example.com", "--reason", "Left us"])
    assert result.exit_code == 0, result.output
    html = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert (f"Account disabled by the operator since {utc(clock.t):%Y-%m-%d %H:%M} UTC: it cannot sign in, and "
            "support actions on it are not possible here.") in html
    assert '<span class="badge off">disabled</span>' in html
    assert DISABLE_LINK not in html and "End support window now" not in html
    form = actor.client.get(f"/support/users/{target.id}/disable-2fa").get_data(as_text=True)
    assert "The server operator has disabled this account" in form and f'name="u{target.id}-reason"' not in form

    r = disable(actor, target, headers=HX if htmx else None)
    assert r.status_code == (200 if htmx else 409)
    assert "The server operator has disabled this account: support actions on it are not possible. Nothing was " \
           "changed." in r.get_data(as_text=True)
    assert count(app, Device, Device.user == target.id) == 1
    assert user_row(app, "carol@example.com").tfa_reset_until is None
    with app.app_context():  # a window opened before the disable: its early end is refused too
        User.update(tfa_reset_until=utc(clock.t) + timedelta(hours=1)).where(User.id == target.id).execute()
        Device.delete().where(Device.user == target.id).execute()
    assert "End support window now" not in actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    r = end_window(actor, target, headers=HX if htmx else None)
    assert r.status_code == (200 if htmx else 409) and "The server operator has disabled" in r.get_data(as_text=True)
    assert count(app, AuditEvent, AuditEvent.kind.in_(["support_tfa_disabled", "support_window_ended"])) == 0

    log = " ".join(actor.client.get("/support/audit?kind=account_disabled").get_data(as_text=True).split())
    assert "Account disabled by the server operator" in log and "Left us" in log and "command line" in log


# ---------------------------------------------------------------- found by mutation testing


def test_a_disable_closes_none_but_the_persons_own_open_requests_it_listed(app, actor, secret, clock, target):
    """security.md 42: the request numbers a disable form carries close only that person's requests that are
    still open: not another person's (a forged or mixed-up number), not one handled meanwhile by another
    admin (who stays its handler), and nothing at all when the list is empty or garbled. The audit record
    says how many it closed and for how long 2FA is off."""
    dave = actor.user("dave@example.com", secret=new_secret())
    erin = actor.user("erin@example.com", secret=new_secret())
    other_admin = actor.user("boss2@example.com", admin=True, secret=new_secret())
    handled_at = utc(clock.t - 60)
    with app.app_context():
        unlisted = SupportRequest.create(email="carol@example.com", message="Lost my phone", user=target.id)
        handled = SupportRequest.create(email="carol@example.com", message="Lost it again", user=target.id,
                                        handled_at=handled_at, handled_by=other_admin.id)
        daves = SupportRequest.create(email="dave@example.com", message="Dave lost his phone", user=dave.id)
        erins = SupportRequest.create(email="erin@example.com", message="Erin lost her phone", user=erin.id)
    sign_in_admin(actor, secret)

    def send(person, shown):
        p = f"u{person.id}-"
        return actor.post_form(f"/support/users/{person.id}/disable-2fa",
                               {p + "reason": "Identity checked by video call against ID card", p + "duration": "3d",
                                p + "close_requests": "y", p + "requests_shown": shown}, form_url="/support")

    assert send(target, f"{daves.id},{handled.id}").status_code == 302
    assert send(erin, "").status_code == 302
    assert send(dave, "garbage,1").status_code == 302
    with app.app_context():
        assert SupportRequest.get_by_id(unlisted.id).handled_at is None
        assert SupportRequest.get_by_id(daves.id).handled_at is None
        assert SupportRequest.get_by_id(erins.id).handled_at is None
        again = SupportRequest.get_by_id(handled.id)
        assert (again.handled_at, again.handled_by_id) == (handled_at, other_admin.id)
        records = list(AuditEvent.select().where(AuditEvent.kind == "support_tfa_disabled").order_by(AuditEvent.id))
        assert [(e.details["requests_closed"], e.details["duration"]) for e in records] == [(0, "3 days")] * 3


def test_the_row_names_the_latest_disable_and_keeps_an_ended_windows_opener(app, actor, secret, clock, target):
    """After two disables the row names the second (who, why); a window that ended without a new device keeps
    naming who opened it however long ago, since the person is blocked until support acts again."""
    sign_in_admin(actor, secret)
    disable(actor, target, reason="First call: checked the ID card on video")
    carol = second_client(app, clock)
    carol.sign_in("carol@example.com")
    from .test_wizard import Wizard

    Wizard(carol).run("New phone")  # the first window closes with a new device
    clock.advance(60)
    disable(actor, target, reason="Second call: lost the new phone too, ID seen again")
    end_window(actor, target)
    clock.advance(40 * 24 * 3600)
    actor.sign_in(ADMIN, secret=secret)
    row = " ".join(actor.client.get(f"/support?user={target.id}").get_data(as_text=True).split())
    assert "Ended early" in row and "Password-only sign-in has stopped" in row
    assert "“Second call: lost the new phone too, ID seen again”" in row and "First call" not in row


@pytest.mark.parametrize("change", [("disable", "--reason", "left the company"), ("promote", "--revoke")])
def test_a_support_action_after_the_operator_took_the_admin_out_is_refused(app, actor, secret, monkeypatch,
                                                                          change):
    """security.md 37, 42: the acting admin is checked again inside the action's transaction. `users disable`
    or `promote --revoke` of that admin committed while the request was on its way (and told the operator it
    took effect): the disable still went through, recorded as that admin's (a race review). Now it is
    refused with a 403 that says why, and nothing changes."""
    import webapp.support as support

    admin = sign_in_admin(actor, secret)
    actor.user("bob@example.com", admin=True, secret=new_secret())  # the last admin cannot be taken out
    carol = actor.user("carol@example.com", secret=new_secret())
    real = support._target_or_404
    out = []

    def meanwhile(user_id):
        if not out:
            command, *options = change
            out.append(app.test_cli_runner().invoke(args=["users", command, admin.email, *options]))
        return real(user_id)

    monkeypatch.setattr(support, "_target_or_404", meanwhile)
    r = disable(actor, carol, close_requests=False)
    assert out[0].exit_code == 0, out[0].output
    assert r.status_code == 403 and "can no longer take support actions" in r.get_data(as_text=True)
    assert count(app, Device, Device.user == carol.id) == 1
    assert count(app, AuditEvent, AuditEvent.kind == "support_tfa_disabled") == 0


def test_what_an_admin_wrote_is_shown_with_its_hidden_characters_as_escapes(app, actor, secret, clock, target):
    """security.md 42: support's reasons take right-to-left marks and zero-width characters (real
    text carries them), and the row and the audit log showed them as written: a reason that read "Verified by
    ID" to the next admin could hold text or a reordering they did not see. Both now show them as escapes in
    a box, as a contact message's are (fields.revealed); the audit record keeps what was typed."""
    sign_in_admin(actor, secret)
    reason = "Verified\u200b by ID\u200f call"
    assert disable(actor, target, reason=reason).status_code == 302
    with app.app_context():
        assert AuditEvent.get(AuditEvent.kind == "support_tfa_disabled").details["reason"] == reason
    box = '<code class="hidden-char" dir="ltr">{}</code>'.format
    row = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    assert "Verified" + box(r"\u200b") + " by ID" + box(r"\u200f") + " call" in row
    clock.advance(60)
    assert end_window(actor, target, reason="Owner\u200b called").status_code == 302
    row = actor.client.get(f"/support?user={target.id}").get_data(as_text=True)
    assert "Owner" + box(r"\u200b") + " called" in row
    log = actor.client.get(f"/support/audit?email={target.email}").get_data(as_text=True)
    assert "Verified" + box(r"\u200b") + " by ID" + box(r"\u200f") + " call" in log
    assert "Owner" + box(r"\u200b") + " called" in log
    assert not [c for c in row + log if c in "\u200b\u200f"]
