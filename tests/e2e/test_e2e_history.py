"""Back and Forward in a browser that keeps pages in its back/forward cache, as the browsers people use do
(Playwright's own launch turns that cache off, so the rest of the suite never meets it)."""
import re

from browser_kit import PASSWORD, next_step_code, oathtool_code, random_secret
from journey import enter_code, expect, expect_code_step, expect_signed_in, follow, log_in

PERSON = "bob@example.com"


def signed_in_then_elsewhere(page, server):
    """Signed in with password and code, on User Settings, then on to the contact form (a page of its own)."""
    secret = random_secret()
    server.user(PERSON, devices={"Phone": secret})
    log_in(page, PERSON)
    expect_code_step(page)
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
    page.goto("/support/contact")
    expect(page.get_by_role("heading", name="Contact support", exact=True)).to_be_visible()


def test_back_after_the_session_ended_elsewhere_shows_no_signed_in_page(cached_page, server):
    """security.md 12, 30: once this browser's session has ended elsewhere ("Sign out everywhere else" from
    another browser, a password change, support or the operator), Back does not bring User Settings back
    from the cache with the sessions, addresses and activity on it: Chromium kept the no-store page while the
    cookie stayed the same (a history review). The page is loaded again, and the server sends it to sign in."""
    from webapp.models import ServerSession, User

    page = cached_page
    signed_in_then_elsewhere(page, server)
    server.query(lambda: ServerSession.delete().where(
        ServerSession.user == User.get(User.email == PERSON).id).execute())
    page.go_back(wait_until="commit")  # a page from the cache fires no load event
    expect(page.get_by_role("button", name="Log in", exact=True)).to_be_visible()
    expect(page.get_by_text("Your session has ended")).to_be_visible()
    assert "/login" in page.url and PERSON not in page.get_by_role("main").inner_text()


def test_back_to_a_signed_in_page_while_the_session_lasts_shows_it_as_it_is_now(cached_page, server):
    """The same Back with the session still on: User Settings, loaded again, with what happened meanwhile
    (here a device added in another browser)."""
    from webapp.models import Device, User
    from webapp.totp import encrypt_secret

    page = cached_page
    signed_in_then_elsewhere(page, server)
    server.query(lambda: Device.create(user=User.get(User.email == PERSON).id, name="Tablet added meanwhile",
                                       secret_enc=encrypt_secret(random_secret())))
    page.go_back(wait_until="commit")  # a page from the cache fires no load event
    expect_signed_in(page)
    expect(page.get_by_role("main")).to_contain_text("Tablet added meanwhile")


def stale_on_settings_with_another_browser(page, server, new_page):
    """Signed in here (code from the Tablet) and in another browser (the Phone), on User Settings, with the
    sign-in here no longer fresh: "Sign out everywhere else" asks "Confirm it's you" first."""
    phone, tablet = random_secret(), random_secret()
    server.user(PERSON, devices={"Phone": phone, "Tablet": tablet})
    other = new_page()
    log_in(other, PERSON)
    enter_code(other, oathtool_code(phone))
    expect_signed_in(other)
    log_in(page, PERSON)
    enter_code(page, oathtool_code(tablet))
    expect_signed_in(page)
    server.age_sign_ins()
    return phone


def refusals(server, kind):
    """How many refusals of this kind the person's record holds (each one counts towards a lock)."""
    from webapp.models import AuditEvent

    return server.query(lambda: AuditEvent.select().where(AuditEvent.kind == kind).count())


def test_back_after_confirming_it_is_you_without_javascript_shows_each_step_and_no_resubmission(
        cached_nojs_page, server, new_page):
    """A history review without JavaScript: after a wrong password on "Confirm it's you" and then the right one,
    Back landed on "Confirm Form Resubmission" (the refusal was the answer to a POST), and Reload of the refusal
    sent the password again, one more failure counted. Now the refusal is a page of its own (a 303 after the
    POST): Reload shows the form again and counts nothing, and Back goes through Confirm it's you, which says
    it is done and asks for nothing, to User Settings as it was before."""
    page = cached_nojs_page
    phone = stale_on_settings_with_another_browser(page, server, new_page)
    follow(page, page.get_by_role("button", name="Sign out everywhere else", exact=True))
    expect(page.get_by_role("heading", name="Confirm it's you", exact=True)).to_be_visible()
    page.get_by_label("Password", exact=True).fill("not the password")
    page.get_by_label("Verification code", exact=True).fill(oathtool_code(phone))
    follow(page, page.get_by_role("button", name="Confirm", exact=True))
    expect(page.get_by_role("alert")).to_have_text("Incorrect password.")
    password = page.get_by_label("Password", exact=True)
    expect(password).to_be_focused()
    expect(password).to_have_accessible_description("Incorrect password.")
    assert refusals(server, "password_rejected") == 1
    page.reload()
    expect(page.get_by_label("Password", exact=True)).to_be_visible()
    expect(page.get_by_role("alert")).to_have_count(0)
    assert refusals(server, "password_rejected") == 1  # nothing was sent again
    page.wait_for_timeout(1100)  # the pause after a wrong password (this browser's own)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Verification code", exact=True).fill(next_step_code(phone))
    follow(page, page.get_by_role("button", name="Confirm", exact=True))
    expect_signed_in(page)
    for _ in range(2):  # the form's page, and the one that said the refusal
        page.go_back()
        expect(page.get_by_role("heading", name="Confirm it's you", exact=True)).to_be_visible()
        expect(page.get_by_text("You have confirmed it's you.")).to_be_visible()
        expect(page.get_by_label("Password", exact=True)).to_have_count(0)
    page.go_back()
    expect_signed_in(page)  # where the button was pressed
    page.go_forward(wait_until="commit")  # a page from the cache fires no load event
    follow(page, page.get_by_role("link", name="Go back to where you were", exact=True))
    expect_signed_in(page)
    follow(page, page.get_by_role("button", name="Sign out everywhere else", exact=True))  # no asking now
    expect(page.get_by_text("Signed out on 1 other browser.")).to_be_visible()
    assert refusals(server, "password_rejected") == 1 and refusals(server, "reauthenticated") == 1


def activity_lines(page):
    return page.locator("#security-activity li")


def test_the_longer_security_activity_stays_open_after_an_action_without_javascript(nojs_page, server, new_page):
    """A history review without JavaScript: with "Show more events" open, renaming a device (or a name refused,
    or signing out a browser) came back to User Settings with the ten latest events again. The page comes back
    as it was shown, the longer list too."""
    from datetime import timedelta

    from webapp.clock import now
    from webapp.models import AuditEvent, User

    page = nojs_page
    stale_on_settings_with_another_browser(page, server, new_page)
    server.age_sign_ins(-11)  # fresh again: this is about the list, not Confirm it's you

    def older_events():
        user = User.get(User.email == PERSON)
        for minutes in range(20, 35):
            AuditEvent.create(user=user.id, kind="signout", created_at=now() - timedelta(minutes=minutes))

    server.query(older_events)
    page.goto("/settings")
    expect(activity_lines(page)).to_have_count(10)
    follow(page, page.get_by_role("link", name="Show more events", exact=True))
    total = activity_lines(page).count()
    assert total > 10

    row = page.locator("#tfa-row li", has_text="Phone")
    row.locator("summary", has_text="Rename").click()
    row.get_by_label("Device name", exact=True).fill("")
    follow(page, row.get_by_role("button", name="Save name", exact=True))  # refused: the page with the error
    name = page.locator("#tfa-row li", has_text="Phone").get_by_label("Device name", exact=True)
    expect(name).to_have_accessible_description(re.compile("Give this device a name"))
    expect(name).to_be_focused()
    expect(activity_lines(page)).to_have_count(total)

    row = page.locator("#tfa-row li", has_text="Phone")
    row.get_by_label("Device name", exact=True).fill("Work phone")
    follow(page, row.get_by_role("button", name="Save name", exact=True))
    expect(page.get_by_text("Renamed “Phone” to “Work phone”.")).to_be_visible()
    expect(activity_lines(page)).to_have_count(total + 1)  # the renaming, and all that was shown before
    follow(page, page.locator("#sessions").get_by_role("button", name=re.compile("^Sign out ")).first)
    expect(page.get_by_text("That browser is signed out.")).to_be_visible()
    expect(activity_lines(page)).to_have_count(total + 2)
    expect(page.get_by_role("link", name="Show more events", exact=True)).to_have_count(0)
