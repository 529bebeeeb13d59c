"""Accessibility audit: axe-core 4.x (pinned, vendored) on every page of the journey; zero WCAG A/AA violations.

The audit browser bypasses the CSP only so the axe script can be injected; findings are fixed in the app.
"""
import re

from browser_kit import oathtool_code, random_secret
from journey import (assert_accessible, enter_code, expect, expect_code_step, expect_signed_in, follow, log_in,
                     reach_the_code_step_past_refusals, sign_in_admin, visit_reauth_and_change_password)


def test_first_run_setup_page_is_accessible(audit_page, server):
    page = audit_page
    page.goto("/setup")
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    assert_accessible(page, "first-run setup page")


def test_sign_in_pages_and_settings_are_accessible(audit_page, server):
    """Log in (empty and with an error), the code step (empty and with an error), User Settings."""
    secret = random_secret()
    server.user("ivy@example.com", devices={"Phone": secret})
    page = audit_page
    reach_the_code_step_past_refusals(page, server, "ivy@example.com", "12345", assert_accessible)

    server.wait_out_code_throttle("ivy@example.com")
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
    assert_accessible(page, "User Settings")
    visit_reauth_and_change_password(page, server, assert_accessible)


def test_sign_up_error_and_contact_pages_are_accessible(audit_page, server):
    server.user("jo@example.com")
    page = audit_page
    page.goto("/signup")
    assert_accessible(page, "sign-up page")
    page.goto("/no-such-page")
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    assert_accessible(page, "404 page")
    page.goto("/login")
    follow(page, page.get_by_role("link", name="Lost access to your authenticator app?"))
    expect(page.get_by_role("heading", name="Contact support")).to_be_visible()
    assert_accessible(page, "contact form")


def test_the_audit_itself_finds_a_known_violation(audit_page):
    """The audit must be able to fail: an unlabelled field and low-contrast text are reported."""
    from browser_kit import axe_violations

    audit_page.set_content('<!doctype html><html lang="en"><title>t</title><main>'
                           '<p style="color:#bbb;background:#fff">faint</p><input type="text"></main></html>')
    ids = {v["id"] for v in axe_violations(audit_page)}
    assert {"label", "color-contrast"} <= ids, ids


def test_every_wizard_step_in_the_dialog_is_accessible(audit_page, server, tmp_path):
    """Each step of the dialog as it is shown, including the manual key and a refused code."""
    from browser_kit import parse_otpauth, qr_from_element
    from journey import finish_wizard_dialog, gear, manual_key, open_wizard_dialog, qr_image, wizard_dialog

    server.user("pat@example.com")
    page = audit_page
    dialog = open_wizard_dialog(page, "pat@example.com", assert_accessible)
    dialog.get_by_role("button", name="Next", exact=True).click()
    expect(qr_image(dialog)).to_be_visible()
    secret = parse_otpauth(qr_from_element(qr_image(dialog), tmp_path / "qr.png"))["secret"]
    manual_key(dialog)
    assert_accessible(page, "wizard step 2 (QR code, manual key open)")
    page.keyboard.press("Escape")  # closed after scanning, then opened again
    expect(dialog).to_have_count(0)
    gear(page).click()
    dialog = wizard_dialog(page)
    expect(dialog.get_by_role("button", name="Continue with the same key", exact=True)).to_be_visible()
    assert_accessible(page, "wizard step 1 again, offering the same key")
    dialog.get_by_role("button", name="Continue with the same key", exact=True).click()
    expect(qr_image(dialog)).to_be_visible()
    finish_wizard_dialog(page, dialog, secret, "Pat's phone", assert_accessible, empty_name_first=True)
    dialog.get_by_role("button", name="Done", exact=True).click()
    expect(dialog).to_have_count(0)
    for summary in ("Rename", "Remove", "Turn off two-factor authentication"):
        page.get_by_text(summary, exact=False).first.click()
    assert_accessible(page, "User Settings with a device and its forms open")


def test_wizard_as_a_full_page_is_accessible(audit_page, server):
    """The page the gear leads to without JavaScript (same fragments, full layout)."""
    server.user("quinn@example.com")
    page = audit_page
    log_in(page, "quinn@example.com")
    expect_signed_in(page)
    page.goto("/settings/2fa")
    expect(page.get_by_role("heading", name="Two-Factor Authentication", level=1)).to_be_visible()
    assert_accessible(page, "wizard page, step 1")
    page.get_by_role("button", name="Next", exact=True).click()
    expect(page.get_by_role("img", name=re.compile("QR code"))).to_be_visible()
    assert_accessible(page, "wizard page, step 2")
    # With JavaScript on, each step is still a page of its own (the page's section has hx-disable): htmx swapped
    # the dialog's steps in, with headings a level too deep under the page's h1 and the title left on step 1.
    expect(page).to_have_url(re.compile(r"/settings/2fa/qr"))
    expect(page).to_have_title(re.compile(r"^Step 2 of 4: Scan the QR code"))
    expect(page.get_by_role("heading", name="Step 2 of 4: Scan the QR code", level=2)).to_be_visible()


def test_contact_and_support_pages_are_accessible(audit_page, new_page, server):
    """Contact form (empty, with errors, sent) and the admin's Support page, search, disable form, audit log."""
    from journey import search_users
    from test_e2e_support import PERSON, person_row

    server.user(PERSON, devices={"Phone": random_secret()})
    page = audit_page
    page.goto("/support/contact")
    assert_accessible(page, "contact form")
    follow(page, page.get_by_role("button", name="Send request", exact=True))
    expect(page.get_by_label("Message", exact=True)).to_have_attribute("aria-invalid", "true")
    assert_accessible(page, "contact form with errors")
    page.get_by_label("Email address", exact=True).fill(PERSON)
    page.get_by_label("Message", exact=True).fill("Lost my phone in the lake, please help.")
    follow(page, page.get_by_role("button", name="Send request", exact=True))
    expect(page.get_by_role("heading", name="Request sent")).to_be_visible()
    assert_accessible(page, "contact request sent")

    admin = new_page(bypass_csp=True)
    sign_in_admin(admin, server)
    follow(admin, admin.get_by_role("navigation").get_by_role("link", name="Support", exact=True))
    expect(admin.get_by_role("heading", name="Support", exact=True)).to_be_visible()
    assert_accessible(admin, "Support page")
    search_users(admin, "olga")
    row = person_row(admin)
    expect(row).to_be_visible()
    row.get_by_text("Temporarily disable 2FA", exact=True).click()
    expect(row.get_by_label("Reason", exact=True)).to_be_visible()
    assert_accessible(admin, "Support page with the disable form open")
    row.get_by_role("button", name=re.compile("Disable")).click()
    expect(person_row(admin).get_by_label("Reason", exact=True)).to_have_attribute("aria-invalid", "true")
    assert_accessible(admin, "disable form with a missing reason")
    person_row(admin).get_by_label("Reason", exact=True).fill("Identity confirmed by phone call.")
    person_row(admin).get_by_role("button", name=re.compile("Disable")).click()
    expect(person_row(admin)).to_contain_text("Temporarily off")
    assert_accessible(admin, "Support page after disabling")
    admin.get_by_text("Recently handled (1)", exact=True).click()  # the request the disable closed
    expect(admin.get_by_role("button", name=re.compile("^Reopen"))).to_be_visible()
    assert_accessible(admin, "Support page with the handled requests open")
    follow(admin, admin.get_by_role("link", name="Audit log", exact=True))
    expect(admin.get_by_role("heading", name="Audit log")).to_be_visible()
    assert_accessible(admin, "audit log")

    log_in(page, PERSON)
    expect_signed_in(page)
    expect(page.get_by_role("link", name="Set up a new device")).to_be_visible()
    assert_accessible(page, "User Settings with support's temporary-exception banner")


def test_at_320_css_pixels_no_page_scrolls_sideways(new_page, server):
    """WCAG 1.4.10 (reflow): on a 320 px wide screen (a phone, or 1280 px zoomed to 400 %) the pages fit the
    width; the Support page was 414 px wide (its Search button cut off) and the audit log 960 px, because
    the page column could not shrink below its content. The audit log's table then scrolled inside its own
    box, with Person and Details out of sight and out of a keyboard's reach: its events now stack, each cell
    under its column's name."""
    from webapp.clock import now
    from webapp.models import SupportRequest

    secret = random_secret()
    # Long words too: dots are no place to break a line, and a device name may be 64 characters without a
    # space (a phone and zoom review: the disable form's page was 683 px wide, User Settings 406 px).
    admin = "admin.with.a.rather.long.address@subdomain.example-organisation.com"
    server.user(admin, admin=True, devices={"Phone": secret, "Averyveryverylongdevicenamewithoutanyspaceforty": random_secret()})
    olga = server.user("olga.someone.with.a.very.long.address@subdomain.example-organisation.com",
                       devices={"Olga's phone": random_secret()})
    server.query(lambda: SupportRequest.create(email=olga.email, user=olga.id, message="Lost my phone " * 20,
                                               created_at=now(), ip="127.0.0.1"))
    page = new_page(viewport={"width": 320, "height": 640})
    log_in(page, admin)
    expect_code_step(page)
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
    for path in ("/settings", "/support?q=olga", "/support/audit", "/support/contact", "/settings/2fa",
                 f"/support/users/{olga.id}/disable-2fa", f"/support/audit?email={olga.email}"):
        page.goto(path)
        expect(page.get_by_role("heading", level=1)).to_be_visible()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 320, f"{path} is {width} px wide at a 320 px viewport"
    page.goto("/support/audit")
    assert page.locator(".table-scroll").evaluate("box => box.scrollWidth <= box.clientWidth")
    first = page.locator("tr.event").first
    for column in ("What happened", "Person", "Details"):
        cell = first.locator(f'td[data-label="{column}"]')
        box = cell.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 320, (column, box)
        assert cell.evaluate("td => getComputedStyle(td, '::before').content") == f'"{column}"'


def test_times_are_shown_in_the_browsers_time_zone_with_utc_kept_as_the_tooltip(new_page, server):
    """Times are written in UTC (what a page without JavaScript shows, labelled so); app.js shows each
    <time data-local> in the browser's own zone instead, the UTC original as its tooltip: an ordinary person
    should not have to convert the end of a support window or the time of a sign-in."""
    server.user("tokyo@example.com")
    page = new_page(timezone_id="Asia/Tokyo", locale="en-GB")  # UTC+9 all year (no summer time)
    log_in(page, "tokyo@example.com")
    expect_signed_in(page)
    shown = page.locator("#sessions time").first
    expect(shown).to_have_attribute("title", re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d UTC$"))
    utc = re.search(r"(\d\d):(\d\d) UTC$", shown.get_attribute("title"))
    expect(shown).to_contain_text(f"{(int(utc.group(1)) + 9) % 24:02d}:{utc.group(2)}")
    expect(shown).to_contain_text("GMT+9")
    assert "UTC" not in shown.inner_text()


def test_a_sessions_sign_out_button_names_its_time_as_the_list_shows_it(new_page, server):
    """A screen reader heard a session's sign-in time in the browser's zone in the list, then in UTC in the
    name of its Sign out button (a UTC+9 person: nine hours apart), as if the button were for another one."""
    server.user("osaka@example.com")
    log_in(new_page(), "osaka@example.com")  # another browser, which gets a Sign out button
    page = new_page(timezone_id="Asia/Tokyo", locale="en-GB")
    log_in(page, "osaka@example.com")
    expect_signed_in(page)
    other = page.locator("#sessions li").filter(has=page.get_by_role("button", name=re.compile("^Sign out ")))
    signed_in = other.locator("time").first.inner_text()
    assert "GMT+9" in signed_in
    expect(other.get_by_role("button")).to_have_accessible_name(re.compile(re.escape(f"signed in {signed_in}") + "$"))


def test_text_follows_the_browsers_own_text_size(new_page, server):
    """WCAG 1.4.4: someone who set a larger text size in the browser (Chrome's Font size, not zoom) gets it.
    The style sheet pinned the page to 16 px, so the setting changed nothing (a review of people who change
    how pages look). At 32 px the menu becomes the compact bar a narrow screen gets, and nothing scrolls
    sideways."""
    page = new_page()
    page.context.new_cdp_session(page).send("Page.setFontSizes", {"fontSizes": {"standard": 32}})
    sign_in_admin(page, server)
    for path in ("/support", "/settings"):
        page.goto(path)
        assert page.get_by_role("heading", level=1).evaluate("h => getComputedStyle(h).fontSize") == "51.2px"
        assert page.evaluate("document.documentElement.scrollWidth <= innerWidth"), path
        assert page.locator(".sidenav").evaluate("nav => getComputedStyle(nav).display") == "flex"
    gear = page.get_by_role("button", name="Two-Factor Authentication settings")
    assert gear.locator("svg").evaluate("svg => svg.getBoundingClientRect().width") == 48  # 1.5 em of 32 px


def test_in_forced_colours_the_current_page_and_link_buttons_are_still_told_apart(new_page, server):
    """Windows' high contrast (forced colours) removes backgrounds and shadows: the menu's current page was
    told only by its background, so "User Settings" and "Support" looked the same; and a button drawn as a
    link ("Cancel and start over") turned into plain text, neither link nor button (a review)."""
    page = new_page(forced_colors="active", color_scheme="dark")
    sign_in_admin(page, server)
    page.goto("/support")
    menu = page.get_by_role("navigation", name="Main")
    current, other = menu.get_by_role("link", name="Support"), menu.get_by_role("link", name="User Settings")
    style = "a => [getComputedStyle(a).outlineStyle, getComputedStyle(a).fontWeight]"
    assert current.evaluate(style) == ["solid", "700"] and other.evaluate(style) == ["none", "400"]

    elsewhere = new_page(forced_colors="active", color_scheme="dark")
    server.user("bo@example.com", devices={"Phone": random_secret()})
    log_in(elsewhere, "bo@example.com")
    expect_code_step(elsewhere)
    colour = "e => getComputedStyle(e).color"
    link = elsewhere.get_by_role("link", name="Lost access to your authenticator app?")
    button = elsewhere.get_by_role("button", name="Cancel and start over")
    assert button.evaluate(colour) == link.evaluate(colour) != elsewhere.locator("body").evaluate(colour)


def test_a_focused_message_on_user_settings_is_announced_by_its_words(page, new_page, server):
    """After Save name or Sign out the row replaces itself and the focus goes to the line saying what was done.
    A status takes no name from its text: Chromium named the focused line "", so a screen reader said only
    "status" (an accessibility-tree review). Each line is now named by its own words."""
    from browser_kit import next_step_code
    from journey import expect_focus_says

    secret = random_secret()
    server.user("uma@example.com", devices={"Phone": secret})
    elsewhere = new_page()  # signed in elsewhere too: a session to sign out below
    log_in(elsewhere, "uma@example.com")
    enter_code(elsewhere, oathtool_code(secret))
    expect_signed_in(elsewhere)
    log_in(page, "uma@example.com")
    expect_code_step(page)
    enter_code(page, next_step_code(secret))  # the step before was used up by the other browser
    expect_signed_in(page)

    row = page.locator("#tfa-row")
    row.locator("summary", has_text="Rename").click()
    row.get_by_label("Device name", exact=True).fill("Work phone")
    row.get_by_role("button", name="Save name").click()
    expect_focus_says(page, row.get_by_role("status"), "Renamed “Phone” to “Work phone”.")

    sessions = page.locator("#sessions")
    sessions.get_by_role("button", name=re.compile("^Sign out Headless")).click()
    expect_focus_says(page, sessions.get_by_role("status"), "That browser is signed out.")


def test_a_focused_message_on_the_support_pages_is_announced_by_its_words(page, server):
    """The same for support: a person's row after Disable (a status) and after a refused End (an alert), the
    contact requests after Mark as handled, and the audit log's list of accounts, focused as it loads."""
    from webapp.clock import now
    from webapp.models import SupportRequest, User

    from journey import expect_focus_says, search_users
    from test_e2e_support import PERSON, person_row

    olga = server.user(PERSON, devices={"Phone": random_secret()})
    server.query(lambda: SupportRequest.create(email="ghost@example.com", message="Lost my phone, please help.",
                                               created_at=now(), ip="127.0.0.1"))
    sign_in_admin(page, server)
    page.goto("/support")
    search_users(page, "olga")
    person_row(page).get_by_role("link", name="Temporarily disable 2FA", exact=True).click()
    person_row(page).get_by_label("Reason", exact=True).fill("Identity confirmed by phone call.")
    person_row(page).get_by_role("button", name=re.compile("Disable")).click()
    expect_focus_says(page, person_row(page).get_by_role("status"), re.compile("is off until"))

    person_row(page).get_by_text("End support window now", exact=True).click()
    # Meanwhile the window ran out: End is refused, and the row says so, focused.
    server.query(lambda: User.update(tfa_reset_until=now()).where(User.id == olga.id).execute())
    person_row(page).get_by_role("button", name="End the window", exact=True).click()
    expect_focus_says(page, person_row(page).get_by_role("alert"), re.compile("has no open support window"))

    requests = page.locator("#open-requests")
    requests.get_by_role("button", name=re.compile(r"^Mark as handled\b")).click()
    expect_focus_says(page, requests.get_by_role("status"), re.compile("is marked as handled"))

    page.goto("/support/audit?email=olga")
    notice = page.get_by_role("status").filter(has_text="No account has exactly that address")
    expect_focus_says(page, notice, re.compile("^No account has exactly that address"))
