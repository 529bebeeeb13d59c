"""`make screenshots`: walk the help article's journey in Chromium and save a PNG of every step.

Usage: python tests/e2e/screenshots.py [OUTPUT_DIR]   (default docs/screenshots)

Runs its own throwaway server (temporary SQLite database, real clock); the accounts, secrets and QR codes
in the pictures exist only for the run. The same journey runs in the suite (test_e2e_screenshots.py).
"""
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser_kit import (LiveServer, launch_chromium, next_step_code, oathtool_code,  # noqa: E402
                         parse_otpauth, qr_from_element, random_secret)
from journey import (enter_code, expect, expect_code_step, expect_signed_in, follow, gear, log_in,  # noqa: E402
                     log_out, manual_key, qr_image, search_users, wizard_dialog)

ROOT = Path(__file__).resolve().parents[2]
VIEWPORT = {"width": 1000, "height": 720}
# What a person's desktop Chrome sends; the pictures should not say "HeadlessChrome" in "Where you're signed in".
USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/140.0.0.0 Safari/537.36")

# (file name, caption) in journey order; the README shows them with these captions.
SHOTS = [
    ("01-log-in.png", "Log in with email address and password"),
    ("02-user-settings.png",
     "User Settings: Two-Factor Authentication is Off; the gear (or the words under it) opens the setup"),
    ("03-wizard-intro.png", "The dialog, step 1: get an authenticator app"),
    ("04-wizard-qr.png", "Step 2: scan the QR code"),
    ("05-wizard-manual-key.png", "Or enter the key manually, grouped for reading"),
    ("06-wizard-code.png", "Step 3: the code the app shows"),
    ("07-wizard-device-name.png", "Step 4: name the device, then Complete Activation"),
    ("08-wizard-done.png", "Done: two-factor authentication is active"),
    ("09-settings-active.png", "User Settings: Active, with the device listed"),
    ("10-code-step.png", "The next sign-in asks for the six-digit code"),
    ("11-code-refused.png", "A code that was already used is refused"),
    ("12-contact-support.png", "Lost access? The contact form"),
    ("13-support-page.png", "An admin's Support page: the request, the person, Temporarily disable 2FA"),
    ("14-password-only-prompt.png", "Afterwards: password-only sign-in with a prompt to set up a new device"),
]


def take_screenshots(browser, outdir, workdir):
    """Run the journey against a fresh server and write every PNG of SHOTS into `outdir`."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    names = iter(SHOTS)
    server = LiveServer(workdir)
    contexts = []

    def new_page():
        ctx = browser.new_context(base_url=server.url, viewport=VIEWPORT, user_agent=USER_AGENT)
        ctx.set_default_timeout(10_000)
        contexts.append(ctx)
        return ctx.new_page()

    def shot(page):
        name, _ = next(names)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(outdir / name))

    try:
        email = "sam@example.com"
        server.user(email)
        page = new_page()
        page.goto("/login")
        page.get_by_label("Email address", exact=True).fill(email)
        page.get_by_label("Password", exact=True).fill("correct horse battery")
        shot(page)  # 01
        follow(page, page.get_by_role("button", name="Log in", exact=True))
        expect_signed_in(page)
        expect(gear(page)).to_be_visible()
        shot(page)  # 02

        gear(page).click()
        dialog = wizard_dialog(page)
        expect(dialog).to_be_visible()
        shot(page)  # 03
        dialog.get_by_role("button", name="Next", exact=True).click()
        qr = qr_image(dialog)
        expect(qr).to_be_visible()
        secret = parse_otpauth(qr_from_element(qr, Path(workdir) / "qr.png"))["secret"]
        shot(page)  # 04
        manual_key(dialog)
        shot(page)  # 05
        dialog.get_by_role("button", name="Next", exact=True).click()
        code = oathtool_code(secret)
        dialog.get_by_label("Verification code", exact=True).fill(code)
        shot(page)  # 06
        dialog.get_by_role("button", name="Next", exact=True).click()
        dialog.get_by_label("Device name", exact=True).fill("Sam's iPhone")
        shot(page)  # 07
        dialog.get_by_role("button", name="Complete Activation", exact=True).click()
        expect(dialog.get_by_role("button", name="Done", exact=True)).to_be_visible()
        shot(page)  # 08
        dialog.get_by_role("button", name="Done", exact=True).click()
        expect(dialog).to_have_count(0)
        expect(page.get_by_text("Sam's iPhone").first).to_be_visible()
        shot(page)  # 09

        log_out(page)
        log_in(page, email)
        expect_code_step(page)
        page.get_by_label("Verification code", exact=True).fill(next_step_code(secret))
        shot(page)  # 10
        follow(page, page.get_by_role("button", name="Verify", exact=True))
        expect_signed_in(page)
        log_out(page)
        log_in(page, email)
        enter_code(page, code)  # the enrolment's code: already used
        expect(page.get_by_label("Verification code", exact=True)).to_have_attribute("aria-invalid", "true")
        shot(page)  # 11

        # Lost phone: Olga asks support, an admin disables her 2FA for a day, she signs in with her password.
        olga = "olga@example.com"
        server.user(olga, devices={"Olga's Galaxy": random_secret()})
        lost = new_page()
        log_in(lost, olga)
        expect_code_step(lost)
        follow(lost, lost.get_by_role("link", name="Lost access to your authenticator app?", exact=True))
        lost.get_by_label("Email address", exact=True).fill(olga)
        lost.get_by_label("Message", exact=True).fill(
            "My phone with the authenticator app was stolen yesterday. I still know my password. "
            "You can call me back on the number on file.")
        shot(lost)  # 12
        follow(lost, lost.get_by_role("button", name="Send request", exact=True))
        expect(lost.get_by_role("heading", name="Request sent")).to_be_visible()

        admin_secret = random_secret()
        server.user("admin@example.com", admin=True, devices={"Admin phone": admin_secret})
        admin = new_page()
        admin.set_viewport_size({"width": 1000, "height": 1100})
        log_in(admin, "admin@example.com")
        enter_code(admin, oathtool_code(admin_secret))
        expect_signed_in(admin)
        follow(admin, admin.get_by_role("navigation").get_by_role("link", name="Support", exact=True))
        search_users(admin, "olga")
        row = admin.get_by_role("article", name=re.compile(re.escape(olga)))
        expect(row).to_be_visible()
        row.get_by_text("Temporarily disable 2FA", exact=True).click()
        row.get_by_label("Reason", exact=True).fill("Called back on the number on file; phone stolen.")
        row.get_by_label("Disable for", exact=True).select_option(label="24 hours")
        shot(admin)  # 13
        row.get_by_role("button", name=re.compile("Disable")).click()
        expect(admin.get_by_role("article", name=re.compile(re.escape(olga)))).to_contain_text("Temporarily off")

        log_in(lost, olga)
        expect_signed_in(lost)
        expect(lost.get_by_role("link", name="Set up a new device")).to_be_visible()
        shot(lost)  # 14
        log_out(lost)
    finally:
        for ctx in contexts:
            ctx.close()
        server.stop()
    return [outdir / name for name, _ in SHOTS]


def main(argv):
    from playwright.sync_api import sync_playwright

    from browser_kit import missing_tools

    missing = missing_tools()
    if missing:
        sys.exit("make screenshots needs " + ", ".join(missing))
    outdir = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "screenshots"
    with tempfile.TemporaryDirectory() as workdir, sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            paths = take_screenshots(browser, outdir, workdir)
        finally:
            browser.close()
    for path in paths:
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


if __name__ == "__main__":
    main(sys.argv)
