"""The idle warning in a real browser (WCAG 2.2.1 Timing Adjustable).

The browser's clock is moved (page.clock, installed before the first page); the live server's is real, so
what the server did is read from its database, and a session is aged there when the server must agree that
it has ended.
"""
import re
from datetime import datetime, timedelta, timezone

from journey import assert_accessible, expect, expect_signed_in, follow, log_in, tab_to

WARNING = "You will be signed out in 2 minutes because nothing has happened here."


def session_row(server):
    """The one signed-in session's row."""
    from webapp.models import ServerSession

    return server.query(lambda: ServerSession.get(ServerSession.user.is_null(False)))


def age_session(server, **ago):
    """Move the signed-in session's times back (last_seen_at, created_at) as if that much had passed."""
    from webapp.models import ServerSession

    def age():
        row = ServerSession.get(ServerSession.user.is_null(False))
        for field, delta in ago.items():
            setattr(row, field, getattr(row, field) - delta)
        row.save()

    server.query(age)


def alert_saying(page, words):
    return page.get_by_role("alert").filter(has_text=words)


def test_the_warning_comes_two_minutes_before_and_stay_signed_in_moves_the_end_on(page, server):
    """The warning does not take focus; "Stay signed in", pressed with the keyboard, writes the session's
    last_seen_at at once (within the minute in which ordinary requests do not), the warning goes and focus
    goes back where it was."""
    server.user("ida@example.com")
    page.clock.install()
    log_in(page, "ida@example.com")
    expect_signed_in(page)
    before = session_row(server).last_seen_at
    change = page.get_by_role("link", name="Change password", exact=True)
    tab_to(page, change)

    page.clock.fast_forward("28:05")
    warning = alert_saying(page, WARNING)
    expect(warning).to_be_visible()
    expect(change).to_be_focused()  # announced by the alert, not by moving focus
    button = page.get_by_role("button", name="Stay signed in", exact=True)
    tab_to(page, button, key="Shift+Tab")
    with page.expect_response(lambda response: response.url.endswith("/session/extend")) as answer:
        page.keyboard.press("Enter")
    assert answer.value.status == 204
    assert int(answer.value.headers["session-seconds-left"]) >= 30 * 60 - 5
    expect(warning).to_have_count(0)
    expect(button).to_be_hidden()
    expect(change).to_be_focused()
    # and it says so, in the page's status region (the warning's going alone said nothing to a screen reader)
    expect(page.get_by_role("status").filter(has_text="You are still signed in.")).to_be_visible()
    assert session_row(server).last_seen_at > before

    # The end moved on from the press: 28 minutes later the warning comes again, not the sign-out.
    page.clock.fast_forward("27:00")
    expect(alert_saying(page, "signed out")).to_have_count(0)
    page.clock.fast_forward("01:05")
    expect(warning).to_be_visible()


def test_when_nothing_happens_the_page_says_the_person_was_signed_out(audit_page, server):
    """After the warning, the end: the message says why and links to sign-in, which leads back here."""
    page = audit_page
    server.user("jon@example.com")
    page.clock.install()
    log_in(page, "jon@example.com")
    expect_signed_in(page)
    follow(page, page.get_by_role("link", name="Change password", exact=True))
    page.clock.fast_forward("28:05")
    expect(alert_saying(page, WARNING)).to_be_visible()
    assert_accessible(page, "Change password with the idle warning")

    page.clock.fast_forward("02:00")
    ended = alert_saying(page, "You were signed out after 30 minutes without activity. Log in again.")
    expect(ended).to_be_visible()
    expect(page.get_by_role("button", name="Stay signed in", exact=True)).to_be_hidden()
    assert_accessible(page, "Change password after the idle sign-out")

    age_session(server, last_seen_at=timedelta(minutes=31))  # the server's own clock agrees now
    follow(page, ended.get_by_role("link", name="Log in again."))
    expect(page.get_by_role("button", name="Log in", exact=True)).to_be_visible()
    page.get_by_label("Email address", exact=True).fill("jon@example.com")
    page.get_by_label("Password", exact=True).fill("correct horse battery")
    follow(page, page.get_by_role("button", name="Log in", exact=True))
    expect(page.get_by_role("heading", name="Change password", level=1)).to_be_visible()  # back where it ended


def test_the_warning_counts_down_and_is_announced_once(page, server):
    """The time left stays true while the warning is shown: it said "in 2 minutes" until the sign-out (a review
    of times). Only its first words were an alert: a screen reader does not read the warning again each time
    the count changes."""
    server.user("lia@example.com")
    page.clock.install()
    log_in(page, "lia@example.com")
    expect_signed_in(page)
    # The clock stops here (it runs on by itself otherwise, and the page's seconds would drift from the test's).
    loaded = datetime.fromtimestamp(page.evaluate("Date.now()") / 1000, tz=timezone.utc)
    page.clock.pause_at(loaded + timedelta(minutes=28, seconds=5))  # 1 minute 55 seconds left
    expect(alert_saying(page, WARNING)).to_be_visible()
    warning = page.locator("#idle-warning").get_by_text(re.compile("^You will be signed out in"))
    page.clock.run_for("00:40")  # 75 seconds left
    expect(warning).to_have_text("You will be signed out in 1 minute because nothing has happened here.")
    expect(page.get_by_role("alert")).to_have_count(0)
    page.clock.run_for("00:30")  # 45 seconds left
    expect(warning).to_have_text("You will be signed out in less than a minute because nothing has happened here.")
    expect(page.get_by_role("button", name="Stay signed in", exact=True)).to_be_visible()


def test_near_the_twelve_hours_the_warning_says_it_cannot_be_extended(page, server):
    server.user("kim@example.com")
    page.clock.install()
    log_in(page, "kim@example.com")
    expect_signed_in(page)
    age_session(server, created_at=timedelta(hours=11, minutes=50))
    page.reload()
    expect_signed_in(page)

    page.clock.fast_forward("08:05")
    expect(alert_saying(page, "You will be signed out in 2 minutes: a session ends 12 hours after signing in, "
                              "and this one cannot be extended.")).to_be_visible()
    expect(page.get_by_role("button", name="Stay signed in", exact=True)).to_be_hidden()
    page.clock.fast_forward("02:00")
    expect(alert_saying(page, "You were signed out: a session ends 12 hours after signing in. Log in again.")
           ).to_be_visible()


def test_without_htmx_stay_signed_in_comes_back_to_the_same_page(page, server):
    """htmx did not load (app.js did): the button is a plain form post, which moves the end on and comes back
    to the page the person was on, not to User Settings."""
    server.user("lea@example.com")
    page.route(lambda url: url.endswith("/htmx.min.js"), lambda route: route.abort())
    page.clock.install()
    log_in(page, "lea@example.com")
    expect_signed_in(page)
    follow(page, page.get_by_role("link", name="Change password", exact=True))
    before = session_row(server).last_seen_at

    page.clock.fast_forward("28:05")
    expect(alert_saying(page, WARNING)).to_be_visible()
    follow(page, page.get_by_role("button", name="Stay signed in", exact=True))
    expect(page.get_by_role("heading", name="Change password", level=1)).to_be_visible()
    assert page.url.endswith("/settings/password")
    assert session_row(server).last_seen_at > before


def test_stay_signed_in_pressed_from_nowhere_puts_focus_on_the_heading(page, server):
    """When nothing had focus as the warning came (the page had just loaded), the pressed button's focus goes to
    the page's heading: not to the whole of <main>, which a screen reader would read from the top."""
    server.user("max@example.com")
    page.clock.install()
    log_in(page, "max@example.com")
    expect_signed_in(page)
    page.evaluate("document.activeElement.blur()")
    page.clock.fast_forward("28:05")
    expect(alert_saying(page, WARNING)).to_be_visible()
    button = page.get_by_role("button", name="Stay signed in", exact=True)
    tab_to(page, button)
    with page.expect_response(lambda response: response.url.endswith("/session/extend")):
        page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="User Settings", level=1)).to_be_focused()
    expect(page.get_by_role("status").filter(has_text="You are still signed in.")).to_be_visible()


def test_stay_signed_in_inside_the_wizard_says_so_inside_the_dialog(page, server):
    """The modal wizard makes the rest of the page inert, #flashes with it: "You are still signed in." written
    there was not in the accessibility tree, so a screen reader heard nothing after Stay signed in (the button
    went, focus went back to the step's heading). The dialog has a status line of its own for it."""
    from journey import gear, wizard_dialog

    server.user("noa@example.com")
    page.clock.install()
    log_in(page, "noa@example.com")
    expect_signed_in(page)
    gear(page).click()
    dialog = wizard_dialog(page)
    expect(dialog.get_by_role("heading", name=re.compile("^Step 1 of 4"))).to_be_focused()
    page.clock.fast_forward("28:05")
    expect(dialog.get_by_role("alert").filter(has_text=WARNING)).to_be_visible()
    button = dialog.get_by_role("button", name="Stay signed in", exact=True)
    tab_to(page, button, key="Shift+Tab")
    with page.expect_response(lambda response: response.url.endswith("/session/extend")):
        page.keyboard.press("Enter")
    expect(dialog.get_by_role("heading", name=re.compile("^Step 1 of 4"))).to_be_focused()
    expect(dialog.get_by_role("status").filter(has_text="You are still signed in.")).to_be_visible()
