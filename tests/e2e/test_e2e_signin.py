"""Sign-in in a real browser for a person whose device already exists, with codes from oathtool.

Real time, no injected clock: oathtool reads the system clock, so the server must too.
"""
import re

from browser_kit import PASSWORD, next_step_code, oathtool_code, random_secret, wrong_code
from journey import (enter_code, expect, expect_code_refused, expect_code_step, expect_signed_in, follow, log_in,
                     log_out, settings_text)


def test_password_then_oathtool_code_signs_in_and_log_out_ends_it(page, server):
    """security.md 21, 30: the code step comes after the password; Log out really ends the session."""
    secret = random_secret()
    server.user("dana@example.com", devices={"Dana's Pixel": secret})

    log_in(page, "dana@example.com")
    expect_code_step(page)
    expect(page).to_have_url(re.compile(r"/login/verify$"))
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
    text = settings_text(page)
    assert "Active" in text and "Dana's Pixel" in text

    log_out(page)
    page.goto("/settings")
    expect(page.get_by_role("button", name="Log in", exact=True)).to_be_visible()
    expect(page.get_by_role("heading", name="User Settings")).to_have_count(0)


def test_code_step_is_not_a_session(page, server):
    """security.md 22: after the password alone, protected pages are still closed."""
    server.user("erin@example.com", devices={"Phone": random_secret()})
    log_in(page, "erin@example.com")
    expect_code_step(page)
    page.goto("/settings")
    expect(page.get_by_role("heading", name="User Settings")).to_have_count(0)
    expect(page.get_by_label("Password", exact=True)).to_be_visible()


def test_replayed_and_wrong_codes_are_refused_with_a_visible_message(page, server):
    """security.md 16, 17: a code is accepted once; wrong and replayed codes are refused and said so."""
    secret = random_secret()
    server.user("finn@example.com", devices={"Phone": secret})

    log_in(page, "finn@example.com")
    first = oathtool_code(secret)
    enter_code(page, first)
    expect_signed_in(page)
    log_out(page)

    log_in(page, "finn@example.com")
    enter_code(page, first)  # the same code, still inside its 90-second window
    expect_code_refused(page)
    server.wait_out_code_throttle("finn@example.com")  # each failure costs a short back-off (security.md 18)
    enter_code(page, wrong_code(secret))
    expect_code_refused(page)
    server.wait_out_code_throttle("finn@example.com")

    enter_code(page, next_step_code(secret))  # a later step: accepted
    expect_signed_in(page)


def test_wrong_password_is_refused_without_revealing_which_part(page, server):
    """security.md 19: one message for unknown email and wrong password."""
    server.user("gus@example.com", devices={"Phone": random_secret()})
    log_in(page, "gus@example.com", PASSWORD + "x")
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    message = alert.inner_text()
    log_in(page, "nobody@example.com")
    expect(page.get_by_role("alert")).to_have_text(message)
    expect(page.get_by_label("Verification code")).to_have_count(0)


def test_sign_in_works_without_javascript(nojs_page, server):
    """Plain forms: the whole two-step sign-in with JavaScript switched off."""
    secret = random_secret()
    server.user("hana@example.com", devices={"Phone": secret})
    page = nojs_page
    log_in(page, "hana@example.com")
    expect_code_step(page)
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
    assert "Active" in settings_text(page)
    log_out(page)


def test_verify_clicked_twice_on_a_slow_connection_signs_in_once(page, server):
    """A second click on Verify while the first answer was on its way made the browser drop that answer
    (with the new session's cookie) and post the code again with the old cookie: the person was told their
    session had ended, their code was used up, and a session nobody could use was left behind. A plain form
    now goes once (static/app.js): one POST, signed in, one session."""
    from webapp.models import ServerSession

    secret = random_secret()
    server.user("gail@example.com", devices={"Phone": secret})
    log_in(page, "gail@example.com")
    expect_code_step(page)
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 1500,
                                                  "downloadThroughput": -1, "uploadThroughput": -1})
    page.get_by_label("Verification code", exact=True).fill(oathtool_code(secret))
    box = page.get_by_role("button", name="Verify", exact=True).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    with page.expect_navigation(timeout=15_000):
        page.mouse.click(x, y)  # the mouse itself: a locator's click would wait for the navigation first
        page.wait_for_timeout(400)  # the person clicks again while the first answer is on its way
        page.mouse.click(x, y)
    expect_signed_in(page)
    assert [u for u in posts if u.endswith("/login/verify")] == [server.url + "/login/verify"]
    assert server.query(lambda: ServerSession.select().where(ServerSession.user.is_null(False)).count()) == 1


def test_back_at_log_in_the_focused_field_says_why(page, server):
    """WCAG 2.2.1, 3.3.1: a code step left open past its 5 minutes, or ended by too many wrong codes, goes back
    to Log in with the reason above the form. The focus starts in the first field to fill in (Password, when
    the expired step's address is kept), past it, and a message that is in a page as it loads is not read
    out: a screen reader said only "Log in, Email address", as if nothing had happened. The field is now
    described by the reason, and a refusal's title starts with "Error:"."""
    from datetime import timedelta

    from webapp.clock import now
    from webapp.models import SignInChallenge

    secret = random_secret()
    server.user("ines@example.com", devices={"Phone": secret})
    log_in(page, "ines@example.com")
    expect_code_step(page)
    server.query(lambda: SignInChallenge.update(created_at=now() - timedelta(minutes=6)).execute())
    enter_code(page, oathtool_code(secret))
    email = page.get_by_label("Email address", exact=True)
    expect(email).to_have_value("ines@example.com")  # kept from the expired step: the focus is on Password
    password = page.get_by_label("Password", exact=True)
    expect(password).to_be_focused()
    expect(password).to_have_accessible_description(re.compile("^Your sign-in expired"))
    expect(page).to_have_title("Log in · twostep")

    server.app.config["CHALLENGE_MAX_FAILURES"] = 1  # the fifth wrong code, without waiting out four pauses
    log_in(page, "ines@example.com")
    enter_code(page, wrong_code(secret))
    expect(email).to_be_focused()
    expect(email).to_have_accessible_description(re.compile("^Too many wrong codes"))
    expect(page).to_have_title("Error: Log in · twostep")


def test_confirm_its_you_names_the_refusal_in_the_focused_field(page, server):
    """WCAG 3.3.1: "Confirm it's you" comes back after a wrong password with the focus in Password, past the
    error above the form, and the field did not say it: a screen reader heard an empty Password field again."""
    secret = random_secret()
    server.user("jon@example.com", devices={"Phone": secret})
    log_in(page, "jon@example.com")
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
    server.age_sign_ins()
    page.goto("/reauth")
    page.get_by_label("Password", exact=True).fill(PASSWORD + "x")
    page.get_by_label("Verification code", exact=True).fill(next_step_code(secret))
    follow(page, page.get_by_role("button", name="Confirm", exact=True))
    password = page.get_by_label("Password", exact=True)
    expect(password).to_be_focused()
    expect(password).to_have_accessible_description("Incorrect password.")
    expect(page).to_have_title("Error: Confirm it's you · twostep")


def test_the_locked_code_step_says_when_to_sign_in_again_as_it_takes_the_focus(page, server):
    """During the account's 15-minute code lock the code step has no field: the focus starts on the message,
    named by its first line ("Wait 15 minutes"). Its second line, when to sign in again, was in neither its
    name nor its description, so a screen reader said only the wait, not the time, unless read on."""
    from datetime import timedelta

    from webapp.clock import now
    from webapp.models import User

    server.user("lou@example.com", devices={"Phone": random_secret()})
    server.query(lambda: User.update(code_strikes=6, code_failures=6,
                                     code_locked_until=now() + timedelta(minutes=15)).execute())
    log_in(page, "lou@example.com")
    alert = page.get_by_role("alert", name=re.compile(r"^Too many wrong codes\. Wait 1\d minutes"))
    expect(alert).to_be_focused()
    expect(alert).to_have_accessible_description(
        re.compile(r"cannot accept a code\. Sign in again with your password after .*\d:\d\d"))
    expect(page.get_by_label("Verification code", exact=True)).to_have_count(0)


def test_reload_after_a_refused_code_without_javascript_sends_nothing_again(nojs_page, server):
    """A history review without JavaScript: a refused code was the answer to its POST, so Reload sent the same
    code again (after "Confirm Form Resubmission"), one more failure towards the lock. Now the refusal is a
    page of its own (a 303 after the POST), with the focus in the field that it describes and "Error:" in the
    title; Reload shows the field again, without the refusal, and counts nothing. The right code signs in."""
    from webapp.models import User

    secret = random_secret()
    server.user("kim@example.com", devices={"Phone": secret})
    page = nojs_page
    log_in(page, "kim@example.com")
    expect_code_step(page)
    enter_code(page, wrong_code(secret))
    expect(page).to_have_url(re.compile(r"/login/verify$"))
    field = page.get_by_label("Verification code", exact=True)
    expect(field).to_be_focused()
    expect(field).to_have_accessible_description(re.compile("^That code is not valid"))
    expect(page).to_have_title("Error: Verification code · twostep")
    refused = lambda: server.query(lambda: User.by_email("kim@example.com").code_failures)  # noqa: E731
    assert refused() == 1
    page.reload()
    expect_code_step(page)
    expect(page.get_by_label("Verification code", exact=True)).not_to_have_attribute("aria-invalid", "true")
    expect(page).to_have_title("Verification code · twostep")
    assert refused() == 1  # nothing was sent again
    server.wait_out_code_throttle("kim@example.com")  # the second's pause after the wrong code
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
