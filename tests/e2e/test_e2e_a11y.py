"""Accessibility audit: axe-core 4.x (pinned, vendored) on every page of the journey; zero WCAG A/AA violations.

The audit browser bypasses the CSP only so the axe script can be injected; findings are fixed in the app.
"""
from browser_kit import oathtool_code, random_secret
from journey import assert_accessible, enter_code, expect, expect_code_step, expect_signed_in, log_in


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
    page.goto("/login")
    assert_accessible(page, "Log in page")
    log_in(page, "ivy@example.com", "wrong password")
    expect(page.get_by_role("alert")).to_be_visible()
    assert_accessible(page, "Log in page with an error")

    log_in(page, "ivy@example.com")
    expect_code_step(page)
    assert_accessible(page, "code step")
    enter_code(page, "12345")
    expect(page.get_by_label("Verification code", exact=True)).to_have_attribute("aria-invalid", "true")
    assert_accessible(page, "code step with an error")

    server.wait_out_code_throttle("ivy@example.com")
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
    assert_accessible(page, "User Settings")


def test_sign_up_and_contact_pages_are_accessible(audit_page, server):
    server.user("jo@example.com")
    page = audit_page
    page.goto("/signup")
    assert_accessible(page, "sign-up page")
    page.goto("/login")
    page.get_by_role("link", name="Lost access to your authenticator app?").click()
    expect(page.get_by_role("heading", name="Contact support")).to_be_visible()
    assert_accessible(page, "contact form")


def test_the_audit_itself_finds_a_known_violation(audit_page):
    """The audit must be able to fail: an unlabelled field and low-contrast text are reported."""
    from browser_kit import axe_violations

    audit_page.set_content('<!doctype html><html lang="en"><title>t</title><main>'
                           '<p style="color:#bbb;background:#fff">faint</p><input type="text"></main></html>')
    ids = {v["id"] for v in axe_violations(audit_page)}
    assert {"label", "color-contrast"} <= ids, ids
