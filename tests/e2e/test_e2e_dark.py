"""A browser set to a dark appearance gets dark pages that are still readable (WCAG AA), measured in Chromium
with `color_scheme="dark"`: every visible text against its effective background, the borders of fields and
the focus rings; the QR code stays black modules on a white quiet zone, which phone cameras need."""
import re

from browser_kit import colour_at, decode_qr, parse_otpauth, random_secret, relative_luminance, wrong_code
from journey import (assert_readable, expect, expect_signed_in, finish_wizard_dialog, follow, gear, log_in, manual_key,
                     open_wizard_dialog, qr_image, reach_the_code_step_past_refusals, search_users, sign_in_admin,
                     visit_reauth_and_change_password)


def dark_page(new_page):
    return new_page(color_scheme="dark")


def assert_dark_and_readable(page, where):
    """The page follows the dark appearance (a dark background, light text, and the browser's own form
    controls told to be dark too), and passes assert_readable."""
    background, text = colour_at(page, "body"), colour_at(page, "body", "color")
    assert relative_luminance(background) < 0.05 < 0.6 < relative_luminance(text), (where, background, text)
    assert "dark" in page.evaluate("getComputedStyle(document.documentElement).colorScheme"), where
    assert_readable(page, where)


def assert_qr_dark_on_light(qr, path):
    """The QR code as drawn: white all round (its quiet zone), black modules, and two decoders read it."""
    from PIL import Image

    assert colour_at(qr.page, ".qr")[:3] == (255, 255, 255)
    qr.screenshot(path=str(path))
    with Image.open(path) as shot:
        grey = shot.convert("L")
    width, height = grey.size
    # Bands 12 px wide inside the 4-module (20 px) quiet zone, from 1 px in: a code at a fractional position
    # brings a row of the dialog's own background into the screenshot.
    a, b = 1, 13
    edges = [grey.crop(box).getextrema()[0] for box in ((a, a, width - a, b), (a, height - b, width - a, height - a),
                                                         (a, a, b, height - a), (width - b, a, width - a, height - a))]
    assert min(edges) >= 240, f"the quiet zone is not white: darkest {min(edges)}"
    assert grey.getextrema()[0] <= 30, "no black modules"
    return decode_qr(path)


def test_sign_in_code_step_contact_and_error_pages_in_dark(new_page, server):
    """The pages of someone not signed in: Log in (and its error), the code step (and a refused code),
    Contact support (with errors, then sent), a 404, sign-up with errors."""
    secret = random_secret()
    server.user("dara@example.com", devices={"Phone": secret})
    page = dark_page(new_page)
    reach_the_code_step_past_refusals(page, server, "dara@example.com", wrong_code(secret), assert_dark_and_readable)

    follow(page, page.get_by_role("link", name="Lost access to your authenticator app?"))
    expect(page.get_by_role("heading", name="Contact support")).to_be_visible()
    assert_dark_and_readable(page, "Contact support")
    follow(page, page.get_by_role("button", name="Send request", exact=True))
    expect(page.get_by_label("Message", exact=True)).to_have_attribute("aria-invalid", "true")
    assert_dark_and_readable(page, "Contact support with errors")
    page.get_by_label("Email address", exact=True).fill("dara@example.com")
    page.get_by_label("Message", exact=True).fill("My phone fell in the sea. Please help me sign in.")
    follow(page, page.get_by_role("button", name="Send request", exact=True))
    expect(page.get_by_role("heading", name="Request sent")).to_be_visible()
    assert_dark_and_readable(page, "request sent")

    page.goto("/no-such-page")
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    assert_dark_and_readable(page, "404 page")
    page.goto("/signup")
    follow(page, page.get_by_role("button", name=re.compile("^Create")))
    expect(page.get_by_role("textbox", name="Email address")).to_have_attribute("aria-invalid", "true")
    assert_dark_and_readable(page, "sign-up page with errors")


def test_user_settings_and_the_wizard_dialog_in_dark_with_the_qr_code_kept_light(new_page, server, tmp_path):
    """User Settings, each step of the wizard's dialog (the manual key and a refused code too), and the row
    afterwards; the QR code is black on white and decodes."""
    server.user("eli@example.com")
    page = dark_page(new_page)
    dialog = open_wizard_dialog(page, "eli@example.com", assert_dark_and_readable)
    dialog.get_by_role("button", name="Next", exact=True).click()
    qr = qr_image(dialog)
    expect(qr).to_be_visible()
    secret = parse_otpauth(assert_qr_dark_on_light(qr, tmp_path / "qr.png"))["secret"]
    manual_key(dialog)
    assert_dark_and_readable(page, "wizard step 2, manual key open")
    finish_wizard_dialog(page, dialog, secret, "Eli's phone", assert_dark_and_readable)
    dialog.get_by_role("button", name="Done", exact=True).click()
    expect(dialog).to_have_count(0)
    row = page.locator("#tfa-row")
    row.locator("summary", has_text="Rename").click()
    row.get_by_role("button", name="Save name").click()  # the same name: a message in the row
    expect(row.get_by_role("status")).to_be_visible()
    assert_dark_and_readable(page, "User Settings with a device, a message and the rename form open")


def test_support_pages_in_dark(new_page, server):
    """An admin's Support page (a person's row, the disable form, the outcome, the contact requests), the audit
    log, and the person's User Settings with support's banner."""
    from test_e2e_support import PERSON, person_row
    from webapp.clock import now
    from webapp.models import SupportRequest

    person = server.user(PERSON, devices={"Phone": random_secret()})
    server.query(lambda: SupportRequest.create(email=PERSON, user=person.id, message="Lost my phone, please help.",
                                               created_at=now(), ip="127.0.0.1"))
    admin = dark_page(new_page)
    sign_in_admin(admin, server)
    follow(admin, admin.get_by_role("navigation").get_by_role("link", name="Support", exact=True))
    assert_dark_and_readable(admin, "Support")
    search_users(admin, "olga")
    person_row(admin).get_by_role("link", name="Temporarily disable 2FA", exact=True).click()
    expect(person_row(admin).get_by_label("Reason", exact=True)).to_be_visible()
    assert_dark_and_readable(admin, "Support with the disable form open")
    person_row(admin).get_by_label("Reason", exact=True).fill("Identity confirmed by phone call.")
    person_row(admin).get_by_role("button", name=re.compile("Disable")).click()
    expect(person_row(admin).get_by_role("status")).to_be_visible()
    assert_dark_and_readable(admin, "Support after disabling")
    follow(admin, admin.get_by_role("link", name="Audit log", exact=True))
    expect(admin.get_by_role("heading", name="Audit log")).to_be_visible()
    assert_dark_and_readable(admin, "audit log")

    page = dark_page(new_page)
    log_in(page, PERSON)
    expect_signed_in(page)
    expect(page.get_by_role("link", name="Set up a new device")).to_be_visible()
    assert_dark_and_readable(page, "User Settings with support's banner")


def test_the_other_pages_in_dark(new_page, server, tmp_path):
    """The pages the tests above do not reach: first-run setup, Confirm it's you, Change password (and its
    errors), the idle warning, the wizard as a full page without JavaScript (the QR code kept light there too),
    and hidden characters shown in their boxes on the Support page."""
    from datetime import datetime, timedelta, timezone

    from test_e2e_support import PERSON
    from webapp.clock import now
    from webapp.models import SupportRequest

    page = dark_page(new_page)
    page.goto("/setup")
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    assert_dark_and_readable(page, "first-run setup")

    server.user("fay@example.com")
    page.clock.install()
    log_in(page, "fay@example.com")
    expect_signed_in(page)
    visit_reauth_and_change_password(page, server, assert_dark_and_readable)
    loaded = datetime.fromtimestamp(page.evaluate("Date.now()") / 1000, tz=timezone.utc)
    page.clock.pause_at(loaded + timedelta(minutes=28, seconds=5))
    expect(page.get_by_role("button", name="Stay signed in", exact=True)).to_be_visible()
    assert_dark_and_readable(page, "the idle warning")

    plain = new_page(color_scheme="dark", java_script_enabled=False)
    server.user("gus@example.com")
    log_in(plain, "gus@example.com")
    expect_signed_in(plain)
    follow(plain, gear(plain))
    expect(plain.get_by_role("heading", name="Two-Factor Authentication", level=1)).to_be_visible()
    assert_dark_and_readable(plain, "the wizard's first step as a page")
    follow(plain, plain.get_by_role("button", name="Next", exact=True))
    qr = qr_image(plain)
    expect(qr).to_be_visible()
    assert parse_otpauth(assert_qr_dark_on_light(qr, tmp_path / "qr-page.png"))["secret"]
    assert_dark_and_readable(plain, "the wizard's QR step as a page")

    server.user(PERSON)
    server.query(lambda: SupportRequest.create(email=PERSON, message="Lost my\u200b phone \u200fplease",
                                               created_at=now(), ip="127.0.0.1"))
    admin = dark_page(new_page)
    sign_in_admin(admin, server)
    follow(admin, admin.get_by_role("navigation").get_by_role("link", name="Support", exact=True))
    expect(admin.locator(".hidden-char").first).to_be_visible()
    assert_dark_and_readable(admin, "Support with hidden characters in their boxes")
