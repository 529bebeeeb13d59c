"""The help article's enrolment in a real browser: the gear, the dialog, the QR code decoded from pixels,
codes from oathtool, Complete Activation, and the next sign-in; also without JavaScript and by keyboard."""
import re

from webapp.models import Device, PendingEnrolment

from browser_kit import next_step_code, oathtool_code, parse_otpauth, qr_from_element, wrong_code
from journey import (enter_code, expect, expect_code_refused, expect_code_step, expect_signed_in, follow,
                     gear, is_focused_within, log_in, log_out, manual_key, qr_image, settings_text, tab_to,
                     wizard_dialog)


def _read_qr(locator, tmp_path, account):
    """Decode the QR code from a screenshot of it and check the otpauth URI (security.md 6, 7)."""
    uri = qr_from_element(locator, tmp_path / "qr.png")
    parts = parse_otpauth(uri)
    assert parts["account"] == account
    assert parts["issuer"] == parts["label_issuer"] == "twostep"
    assert re.fullmatch(r"[A-Z2-7]{32}", parts["secret"]), "160-bit Base32 secret, unpadded (security.md 3)"
    assert parts.get("digits", "6") == "6" and parts.get("period", "30") == "30"
    assert parts.get("algorithm", "SHA1").upper() == "SHA1"
    return parts["secret"]


def _walk_wizard(root, tmp_path, email, device_name):
    """From the first step to Complete Activation inside `root` (the dialog, or the page without
    JavaScript): QR decoded from pixels, manual key checked, code from oathtool. Returns (secret, code)."""
    root.get_by_role("button", name="Next", exact=True).click()
    qr = qr_image(root)
    expect(qr).to_be_visible()
    secret = _read_qr(qr, tmp_path, email)
    assert manual_key(root).replace(" ", "") == secret
    root.get_by_role("button", name="Next", exact=True).click()
    code = oathtool_code(secret)
    root.get_by_label("Verification code", exact=True).fill(code)
    root.get_by_role("button", name="Next", exact=True).click()
    root.get_by_label("Device name", exact=True).fill(device_name)
    root.get_by_role("button", name="Complete Activation", exact=True).click()
    expect(root.get_by_text(device_name, exact=False).first).to_be_visible()
    return secret, code


def _signed_in_at_the_qr_step(page, server, tmp_path, email):
    """A new person signs in, opens the gear and goes on to the QR code; returns (dialog, secret read from it)."""
    server.user(email)
    log_in(page, email)
    gear(page).click()
    dialog = wizard_dialog(page)
    dialog.get_by_role("button", name="Next", exact=True).click()
    return dialog, _read_qr(qr_image(dialog), tmp_path, email)


def _sign_in_again_after_enrolment(page, server, email, enrolment_code, secret):
    """The enrolment's code is used up; a wrong code is refused; a code of a later step signs in."""
    log_out(page)
    log_in(page, email)
    expect_code_step(page)
    enter_code(page, enrolment_code)  # security.md 16: the confirming code counts as used
    expect_code_refused(page)
    server.wait_out_code_throttle(email)
    enter_code(page, wrong_code(secret))
    expect_code_refused(page)
    server.wait_out_code_throttle(email)
    enter_code(page, next_step_code(secret))
    expect_signed_in(page)


def test_enrolment_in_the_dialog_then_sign_in_with_the_new_device(page, server, tmp_path):
    """The article's journey with JavaScript: gear -> dialog -> Next -> QR -> code -> name -> Active."""
    server.user("kim@example.com")
    log_in(page, "kim@example.com")
    expect_signed_in(page)
    follow(page, page.get_by_role("link", name="User Settings", exact=True))
    expect(page.get_by_text("Off", exact=True)).to_be_visible()

    gear(page).click()
    dialog = wizard_dialog(page)
    expect(dialog).to_be_visible()
    secret, code = _walk_wizard(dialog, tmp_path, "kim@example.com", "Kim's iPhone")
    # Behind the dialog the row already says Active and lists the device.
    dialog.get_by_role("button", name="Done", exact=True).click()
    expect(dialog).to_have_count(0)
    expect(page.get_by_role("list", name="Your authenticator devices")).to_contain_text("Kim's iPhone")
    assert "Active" in settings_text(page)
    assert server.query(lambda: Device.select().count()) == 1

    _sign_in_again_after_enrolment(page, server, "kim@example.com", code, secret)
    assert "Kim's iPhone" in settings_text(page)


def test_a_wrong_code_in_the_wizard_activates_nothing(page, server, tmp_path):
    """security.md 8: the secret is not active until a correct code from it is entered."""
    dialog, secret = _signed_in_at_the_qr_step(page, server, tmp_path, "lee@example.com")
    dialog.get_by_role("button", name="Next", exact=True).click()
    field = dialog.get_by_label("Verification code", exact=True)
    field.fill(wrong_code(secret))
    dialog.get_by_role("button", name="Next", exact=True).click()
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_have_accessible_description(re.compile(r"\w"))
    expect(dialog.get_by_label("Device name")).to_have_count(0)
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    page.reload()
    expect(page.get_by_text("Off", exact=True)).to_be_visible()


def test_a_step_answers_a_press_the_moment_it_appears(page, server, tmp_path):
    """The fastest possible press of Next: from the very event that puts the first step on the page, before
    the browser has even drawn it. htmx has already taken over the step's form, so the dialog moves on to the
    QR code; it does not fall back to the plain form, which would leave the dialog for the no-JavaScript
    page (htmx 2 wires new content up when the swap settles: base.html settles at once)."""
    server.user("ola@example.com")
    log_in(page, "ola@example.com")
    expect_signed_in(page)
    page.evaluate("""() => document.body.addEventListener("htmx:afterSwap", () => queueMicrotask(() => {
        document.querySelector("dialog.wizard .wizard-step form button[type=submit]").click();
    }), {once: true})""")
    gear(page).click()
    dialog = wizard_dialog(page)
    _read_qr(qr_image(dialog), tmp_path, "ola@example.com")
    assert page.url.endswith("/settings"), page.url


def test_closing_the_wizard_after_scanning_and_continuing_with_the_same_key(page, server, tmp_path):
    """Scan, close the dialog (Escape), open the gear again: the first step offers the key already in the
    app; continuing shows that key again and it activates, so the app holds one working account."""
    dialog, scanned = _signed_in_at_the_qr_step(page, server, tmp_path, "noa@example.com")
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    gear(page).click()
    dialog = wizard_dialog(page)
    expect(dialog.get_by_role("status").filter(has_text="did not finish")).to_be_visible()
    expect(dialog.get_by_role("button", name="Start over with a new key", exact=True)).to_be_visible()
    dialog.get_by_role("button", name="Continue with the same key", exact=True).click()
    assert _read_qr(qr_image(dialog), tmp_path, "noa@example.com") == scanned
    dialog.get_by_role("button", name="Next", exact=True).click()
    dialog.get_by_label("Verification code", exact=True).fill(oathtool_code(scanned))
    dialog.get_by_role("button", name="Next", exact=True).click()
    dialog.get_by_label("Device name", exact=True).fill("Noa's phone")
    dialog.get_by_role("button", name="Complete Activation", exact=True).click()
    expect(dialog.get_by_text("Noa's phone", exact=False).first).to_be_visible()
    assert server.query(lambda: Device.select().count()) == 1


def test_enrolment_without_javascript(nojs_page, server, tmp_path):
    """No JavaScript: the gear button opens a full page, every step a plain form, same result."""
    page = nojs_page
    server.user("max@example.com")
    log_in(page, "max@example.com")
    expect_signed_in(page)
    follow(page, gear(page))
    expect(page.get_by_role("heading", name="Two-Factor Authentication", level=1)).to_be_visible()
    secret, code = _walk_wizard(page, tmp_path, "max@example.com", "Max's Nokia")
    follow(page, page.get_by_role("link", name="User Settings", exact=True))
    text = settings_text(page)
    assert "Active" in text and "Max's Nokia" in text

    _sign_in_again_after_enrolment(page, server, "max@example.com", code, secret)


def test_enrolment_by_keyboard_alone(page, server, tmp_path):
    """Tab/Enter/Escape reach and operate the gear, the dialog, every field and Complete Activation;
    focus moves into the dialog on open, stays inside while it is open, and returns to the gear on close."""
    server.user("nia@example.com")
    log_in(page, "nia@example.com")
    expect_signed_in(page)
    the_gear = gear(page)
    dialog = wizard_dialog(page)

    tab_to(page, the_gear)
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    assert is_focused_within(dialog), "focus did not move into the dialog"
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    expect(the_gear).to_be_focused()

    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    assert is_focused_within(dialog)
    for _ in range(8):  # a modal dialog keeps the keyboard inside it
        page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement === document.body") or is_focused_within(dialog)
    tab_to(page, dialog.get_by_role("button", name="Next", exact=True))
    page.keyboard.press("Enter")

    qr = qr_image(dialog)
    expect(qr).to_be_visible()
    secret = _read_qr(qr, tmp_path, "nia@example.com")
    summary = dialog.get_by_text("Enter the key manually", exact=True)
    tab_to(page, summary)
    page.keyboard.press("Enter")
    key = dialog.get_by_text(re.compile(r"^[A-Z2-7]{4}( [A-Z2-7]{1,4})+$"))
    expect(key).to_be_visible()
    assert key.inner_text().replace(" ", "") == secret
    tab_to(page, dialog.get_by_role("button", name="Next", exact=True))
    page.keyboard.press("Enter")

    code_field = dialog.get_by_label("Verification code", exact=True)
    expect(code_field).to_be_visible()
    # Focus skips the heading to the field; its form carries the step's name for screen readers.
    step_form = dialog.get_by_role("form", name="Step 3 of 4: Enter the code", exact=True)
    expect(step_form.get_by_label("Verification code", exact=True)).to_be_focused()
    expect(step_form).to_have_accessible_description(re.compile("six-digit code"))
    tab_to(page, code_field)
    page.keyboard.type(oathtool_code(secret))
    page.keyboard.press("Enter")  # submits the form the field is in

    name_field = dialog.get_by_label("Device name", exact=True)
    expect(name_field).to_be_visible()
    expect(dialog.get_by_role("form", name="Step 4 of 4: Name this device", exact=True)
           .get_by_label("Device name", exact=True)).to_be_focused()
    tab_to(page, name_field)
    page.keyboard.type("Nia's tablet")
    activate = dialog.get_by_role("button", name="Complete Activation", exact=True)
    tab_to(page, activate)
    page.keyboard.press("Enter")
    done = dialog.get_by_role("button", name="Done", exact=True)
    expect(done).to_be_visible()
    tab_to(page, done)
    page.keyboard.press("Enter")
    expect(dialog).to_have_count(0)
    expect(the_gear).to_be_focused()
    assert "Nia's tablet" in settings_text(page) and "Active" in settings_text(page)


def test_qr_code_fits_a_phone_sized_window(new_page, server, tmp_path):
    """On a 360 px wide screen (enrolling from a laptop is not the only case) with a long address, the QR code
    stays whole inside the dialog and still decodes."""
    email = "firstname.lastname.department@example.com"
    server.user(email)
    page = new_page(viewport={"width": 360, "height": 740})
    log_in(page, email)
    expect_signed_in(page)
    gear(page).click()
    dialog = wizard_dialog(page)
    dialog.get_by_role("button", name="Next", exact=True).click()
    qr = qr_image(dialog)
    expect(qr).to_be_visible()
    box, frame = qr.bounding_box(), dialog.bounding_box()
    assert box["x"] >= frame["x"] and box["x"] + box["width"] <= frame["x"] + frame["width"], (box, frame)
    assert box["x"] + box["width"] <= 360
    _read_qr(qr, tmp_path, email)


def test_a_stale_sign_in_comes_back_to_the_dialog_after_confirming(page, server):
    """security.md 9: the gear with a sign-in older than 10 minutes asks "Confirm it's you" first; after the
    password the person is back on User Settings with the dialog open and the focus in it (it used to be the
    wizard's page for browsers without JavaScript). The address is plain /settings again, so a reload opens
    nothing, and Escape still closes the dialog."""
    from browser_kit import PASSWORD

    email = "stale@example.com"
    server.user(email)
    log_in(page, email)
    expect_signed_in(page)

    server.age_sign_ins()
    with page.expect_navigation():
        gear(page).click()
    expect(page.get_by_role("heading", name="Confirm it's you", exact=True)).to_be_visible()
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    follow(page, page.get_by_role("button", name="Confirm", exact=True))
    dialog = wizard_dialog(page)
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("button", name="Next", exact=True)).to_be_visible()
    assert is_focused_within(dialog)
    expect(page).to_have_url(re.compile(r"/settings$"))
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    page.reload()
    expect_signed_in(page)
    expect(wizard_dialog(page)).to_have_count(0)


def _start_over_in(tab, tmp_path, email):
    """In another tab of the same browser: the gear, Start over with a new key; returns the new key."""
    tab.goto("/settings")
    gear(tab).click()
    dialog = wizard_dialog(tab)
    dialog.get_by_role("button", name="Start over with a new key", exact=True).click()
    return _read_qr(qr_image(dialog), tmp_path, email)


def test_a_tab_whose_key_was_replaced_in_another_tab_says_so(context, page, server, tmp_path):
    """The wizard in two tabs of one browser (one session, one pending key). Tab 1's code for the key it
    showed, after tab 2 started over, is not checked against tab 2's key: tab 1 says the setup was restarted
    and continues with the new key. Its QR code's Next (htmx GET forms carry the key too) says so as well."""
    email = "lee@example.com"
    dialog, k1 = _signed_in_at_the_qr_step(page, server, tmp_path, email)
    dialog.get_by_role("button", name="Next", exact=True).click()
    tab2 = context.new_page()
    k2 = _start_over_in(tab2, tmp_path, email)
    assert k2 != k1
    dialog.get_by_label("Verification code", exact=True).fill(oathtool_code(k1))
    dialog.get_by_role("button", name="Next", exact=True).click()
    expect(dialog.get_by_role("heading", name="This setup was restarted", exact=True)).to_be_visible()
    expect(dialog).to_contain_text("The key you scanned here no longer works")
    failures = server.query(lambda: [p.failures for p in PendingEnrolment.select()])
    assert failures == [0]
    dialog.get_by_role("button", name="Continue with the new key", exact=True).click()
    assert _read_qr(qr_image(dialog), tmp_path, email) == k2
    k3 = _start_over_in(tab2, tmp_path, email)
    dialog.get_by_role("button", name="Next", exact=True).click()
    expect(dialog.get_by_role("heading", name="This setup was restarted", exact=True)).to_be_visible()
    dialog.get_by_role("button", name="Continue with the new key", exact=True).click()
    assert _read_qr(qr_image(dialog), tmp_path, email) == k3
    assert server.query(lambda: Device.select().count()) == 0


def test_a_request_that_gets_no_answer_says_so_where_the_person_is_looking(page, server, console_watch):
    """The network down, or a proxy in front answering 502 itself: htmx swaps nothing, and the gear or Next
    did nothing at all. The page says so (in its messages, or in the open dialog), announced as an alert,
    and the note goes once a request goes through."""
    server.user("nia@example.com")
    log_in(page, "nia@example.com")
    expect_signed_in(page)

    page.route(lambda url: "/settings/2fa" in url, lambda route: route.abort())
    gear(page).click()
    expect(page.locator("#flashes").get_by_role("alert")).to_have_text(re.compile("could not be reached"))
    expect(wizard_dialog(page)).to_have_count(0)

    page.unroute_all()
    gear(page).click()
    dialog = wizard_dialog(page)
    expect(dialog).to_be_visible()
    expect(page.get_by_role("alert")).to_have_count(0)

    page.route(lambda url: "/settings/2fa" in url, lambda route: route.fulfill(status=502, body="Bad Gateway"))
    dialog.get_by_role("button", name="Next", exact=True).click()
    expect(dialog.get_by_role("alert")).to_have_text(re.compile(r"could not answer just now \(error 502\)"))
    expect(qr_image(dialog)).to_have_count(0)
    # htmx reports both failures in the console itself; nothing else may be there.
    expected = ("htmx:afterRequest", "htmx:sendError", "Response Status Error Code 502")
    console_watch.problems = [p for p in console_watch.problems if not any(e in p for e in expected)]


def test_the_words_beside_the_gear_open_the_same_dialog_and_get_focus_back(page, server):
    """While 2FA is off, "Turn on two-factor authentication" (for whoever does not take the gear for "set up")
    opens the gear's dialog at its first step; closed with Escape, focus goes back to the link pressed."""
    server.user("ola@example.com")
    log_in(page, "ola@example.com")
    expect_signed_in(page)
    link = page.get_by_role("link", name="Turn on two-factor authentication", exact=True)
    tab_to(page, link)
    page.keyboard.press("Enter")
    dialog = wizard_dialog(page)
    expect(dialog.get_by_role("heading", name="Step 1 of 4: Get an authenticator app")).to_be_visible()
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    expect(link).to_be_focused()


def test_the_qr_code_is_one_named_image_without_an_unnamed_one_inside(page, server):
    """The QR code is a role=img with a name; the <svg> inside it was exposed in Chromium's accessibility tree
    as a second image with no name, which a screen reader's list of graphics read as an unlabelled one."""
    server.user("uma@example.com")
    log_in(page, "uma@example.com")
    gear(page).click()
    dialog = wizard_dialog(page)
    dialog.get_by_role("button", name="Next", exact=True).click()
    expect(qr_image(dialog)).to_be_visible()
    expect(dialog.get_by_role("img")).to_have_count(1)
    cdp = page.context.new_cdp_session(page)
    images = [node for node in cdp.send("Accessibility.getFullAXTree")["nodes"]
              if not node.get("ignored") and node.get("role", {}).get("value") in ("image", "img", "SvgRoot")]
    assert [node.get("name", {}).get("value") for node in images] == [
        "QR code to add uma@example.com to your authenticator app"], images


def test_the_gear_says_its_name_once(page, server):
    """The gear is named "Two-Factor Authentication settings" (the brief) with that as its tooltip, and has no
    description repeating it: an aria-label beside the same title gave it both, and screen readers said the
    name twice (seen in Chromium's accessibility tree)."""
    server.user("uma@example.com")
    log_in(page, "uma@example.com")
    expect(gear(page)).to_have_attribute("title", "Two-Factor Authentication settings")
    cdp = page.context.new_cdp_session(page)
    buttons = [node for node in cdp.send("Accessibility.getFullAXTree")["nodes"]
               if node.get("role", {}).get("value") == "button"
               and node.get("name", {}).get("value") == "Two-Factor Authentication settings"]
    assert [node.get("description", {}).get("value", "") for node in buttons] == [""], buttons
