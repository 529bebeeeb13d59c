"""The reader's steps, as a person does them, found only by the brief's visible names (roles and labels).

Shared by the browser tests and by screenshots.py. No CSS selectors for anything a person acts on.
"""
import re

from browser_kit import PASSWORD, oathtool_code, random_secret, wrong_code

try:
    from playwright.sync_api import expect
    # The machine may be busy with other suites: allow assertions the same 10 s as actions.
    expect.set_options(timeout=10_000)
except ImportError:  # conftest skips (or fails in CI) with the reason before any test gets here
    expect = None

# The app says the same for a wrong and a replayed code (security.md 17); a throttle message would not match.
CODE_REFUSED = re.compile(r"code is not valid", re.I)


def follow(page, locator):
    """Click a link or a plain form's button and wait until the page it loads has finished loading.

    htmx takes over the page's gear, search and buttons only once its deferred script has run; a click
    before that is an ordinary link or form (the no-JavaScript path), so a test that goes on to use htmx
    waits for the load first. Playwright's click itself does not wait for the navigation it starts.
    """
    with page.expect_navigation():
        locator.click()


def log_in(page, email, password=PASSWORD):
    """First step: Email address, Password, Log in."""
    page.goto("/login")
    page.get_by_label("Email address", exact=True).fill(email)
    page.get_by_label("Password", exact=True).fill(password)
    follow(page, page.get_by_role("button", name="Log in", exact=True))


def expect_code_step(page):
    expect(page.get_by_label("Verification code", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Verify", exact=True)).to_be_visible()


def enter_code(page, code):
    """Second step: Verification code, Verify."""
    page.get_by_label("Verification code", exact=True).fill(code)
    follow(page, page.get_by_role("button", name="Verify", exact=True))


def expect_signed_in(page):
    """Signed in: the User Settings page with its left navigation and a Log out button."""
    expect(page.get_by_role("heading", name="User Settings", exact=True)).to_be_visible()
    expect(page.get_by_role("navigation").get_by_role("link", name="User Settings", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Log out", exact=True)).to_be_visible()


def expect_code_refused(page):
    """Still at the code step, with a message tied to the field."""
    field = page.get_by_label("Verification code", exact=True)
    expect(field).to_be_visible()
    expect(field).to_have_accessible_description(CODE_REFUSED)
    expect(page.get_by_role("heading", name="User Settings", exact=True)).to_have_count(0)


def log_out(page):
    follow(page, page.get_by_role("button", name="Log out", exact=True))
    expect(page.get_by_role("button", name="Log in", exact=True)).to_be_visible()


def settings_text(page):
    """What the User Settings page says (the Two-Factor Authentication status and device names)."""
    return page.get_by_role("main").inner_text()


def gear(page):
    """The gear button next to Two-Factor Authentication (the brief: a button, with or without JavaScript)."""
    return page.get_by_role("button", name="Two-Factor Authentication settings", exact=True)


def assert_accessible(page, where):
    """axe-core (WCAG 2.0/2.1 A and AA) finds nothing on the page as it is now."""
    from browser_kit import axe_violations, format_violations

    violations = axe_violations(page)
    assert not violations, format_violations(where, violations)


def assert_readable(page, where, focus_steps=12):
    """WCAG AA as the page is now, measured in the browser: each visible text against its effective background
    (4.5:1, large text 3:1), the borders of fields against what is around them (3:1), and the focus ring of
    the first `focus_steps` controls Tab reaches against the background it is drawn on (3:1)."""
    from browser_kit import contrast_report, focus_ring

    report = contrast_report(page)
    assert report["texts"], f"no text measured on {where}"
    low = [t for t in report["texts"] if t["ratio"] < t["needed"]]
    low += [b for b in report["borders"] if b["ratio"] < b["needed"]]
    page.evaluate("document.activeElement && document.activeElement.blur()")
    for _ in range(focus_steps):
        page.keyboard.press("Tab")
        ring = focus_ring(page)
        if ring is not None and ring["ratio"] < 3:
            low.append({**ring, "needed": 3, "text": "(focus ring)"})
    assert not low, f"too little contrast on {where}:\n" + "\n".join(
        f"- {x['element']} {x.get('text', '(border)')!r}: {x['colour']} on {x['background']} is "
        f"{x['ratio']:.2f}:1, needs {x['needed']}:1" for x in low)


def wizard_dialog(page):
    """The modal the gear opens: role=dialog whose accessible name contains Two-Factor Authentication."""
    return page.get_by_role("dialog", name=re.compile("Two-Factor Authentication"))


def qr_image(scope):
    """The QR code: an image whose accessible name contains "QR code"."""
    return scope.get_by_role("img", name=re.compile("QR code"))


GROUPED_KEY = re.compile(r"^[A-Z2-7]{4}( [A-Z2-7]{1,4})+$")


def manual_key(scope):
    """Open "Enter the key manually" and return the key as shown (grouped for reading)."""
    scope.get_by_text("Enter the key manually", exact=True).click()
    key = scope.get_by_text(GROUPED_KEY)
    expect(key).to_be_visible()
    return key.inner_text().strip()


def reach_the_code_step_past_refusals(page, server, email, bad_code, check):
    """Log in, a wrong password refused, the right one, the code step, `bad_code` refused there, calling
    `check(page, where)` on each page on the way."""
    page.goto("/login")
    check(page, "Log in page")
    log_in(page, email, "wrong password")
    expect(page.get_by_role("alert")).to_be_visible()
    check(page, "Log in page with an error")
    server.forgive_password_failures(email)
    log_in(page, email)
    expect_code_step(page)
    check(page, "code step")
    enter_code(page, bad_code)
    expect(page.get_by_label("Verification code", exact=True)).to_have_attribute("aria-invalid", "true")
    check(page, "code step with an error")


def visit_reauth_and_change_password(page, server, check):
    """From a signed-in page: Confirm it's you (the sign-in made stale), then Change password and its errors
    (fresh again), calling `check(page, where)` on each."""
    server.age_sign_ins()  # a fresh sign-in goes straight past "Confirm it's you"
    page.goto("/reauth")
    expect(page.get_by_label("Password", exact=True)).to_be_visible()
    check(page, "confirm-it-is-you page (reauth)")
    server.age_sign_ins(-11)  # fresh again for the pages below (confirming would need the next code)
    page.goto("/settings")
    follow(page, page.get_by_role("link", name="Change password", exact=True))
    expect(page.get_by_role("heading", name="Change password", level=1)).to_be_visible()
    check(page, "Change password page")
    page.get_by_label("New password", exact=True).fill("short")
    follow(page, page.get_by_role("button", name="Change password", exact=True))
    expect(page.get_by_label("New password", exact=True)).to_have_attribute("aria-invalid", "true")
    check(page, "Change password page with errors")


def open_wizard_dialog(page, email, check):
    """Sign `email` in, then open the wizard's dialog with the gear, calling `check(page, where)` on User
    Settings and on the dialog's first step; returns the dialog."""
    log_in(page, email)
    expect_signed_in(page)
    check(page, "User Settings with 2FA off")
    gear(page).click()
    dialog = wizard_dialog(page)
    expect(dialog).to_be_visible()
    check(page, "wizard step 1 (intro)")
    return dialog


def finish_wizard_dialog(page, dialog, secret, name, check, empty_name_first=False):
    """From the wizard dialog's QR step to Done, calling `check(page, where)` on each state on the way: the code
    step, a wrong code refused, the device name step (and, with `empty_name_first`, a missing name refused),
    then Complete Activation."""
    dialog.get_by_role("button", name="Next", exact=True).click()
    code_field = dialog.get_by_label("Verification code", exact=True)
    expect(code_field).to_be_visible()
    check(page, "wizard step 3 (code)")
    code_field.fill(wrong_code(secret))
    dialog.get_by_role("button", name="Next", exact=True).click()
    expect(code_field).to_have_attribute("aria-invalid", "true")
    check(page, "wizard step 3 with a refused code")
    code_field.fill(oathtool_code(secret))
    dialog.get_by_role("button", name="Next", exact=True).click()
    name_field = dialog.get_by_label("Device name", exact=True)
    expect(name_field).to_be_visible()
    check(page, "wizard step 4 (device name)")
    if empty_name_first:
        name_field.fill("")
        dialog.get_by_role("button", name="Complete Activation", exact=True).click()
        expect(name_field).to_have_attribute("aria-invalid", "true")
        check(page, "wizard step 4 with a missing name")
    name_field.fill(name)
    dialog.get_by_role("button", name="Complete Activation", exact=True).click()
    expect(dialog.get_by_role("button", name="Done", exact=True)).to_be_visible()
    check(page, "wizard done")


def is_focused_within(locator):
    return locator.evaluate("el => el.contains(document.activeElement)")


def tab_to(page, locator, limit=40, key="Tab"):
    """Press Tab until `locator` has the keyboard focus (fails after `limit` presses)."""
    for _ in range(limit):
        if locator.evaluate("el => el === document.activeElement"):
            return
        page.keyboard.press(key)
    raise AssertionError(f"{locator} never received keyboard focus after {limit} presses of {key}")


def expect_focus_says(page, locator, pattern):
    """`locator` has the focus, and the name Chromium gives it there (what a screen reader says as the focus
    lands) is its own visible words, which match `pattern`."""
    from browser_kit import focused_name

    expect(locator).to_be_focused()
    expect(locator).to_have_text(pattern)
    role, name = focused_name(page)
    shown = " ".join(locator.inner_text().split())
    assert name == shown, f"the focused {role} is announced as {name!r}, but it shows {shown!r}"


def search_users(page, text):
    """Support page: type into Search users and press Search.

    The field also searches by itself 300 ms after typing (htmx); waiting for the network to be quiet
    keeps that late answer from replacing a row the test has already started to use.
    """
    page.get_by_label("Search users", exact=True).fill(text)
    page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_load_state("networkidle")


def sign_in_admin(page, server, email="admin@example.com"):
    """An admin with 2FA active (the Support page requires it: security.md 37), created in the DB, signed in
    with a code from oathtool."""
    secret = random_secret()
    server.user(email, admin=True, devices={"Admin phone": secret})
    log_in(page, email)
    expect_code_step(page)
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
