"""The lost-phone path in a real browser: the code step's link, the contact form, an admin's Support page,
Temporarily disable 2FA, and the person's password-only sign-in with the prompt to set up a new device."""
import re

from browser_kit import oathtool_code, random_secret
from journey import (enter_code, expect, expect_code_step, expect_signed_in, follow, log_in,
                     search_users, settings_text, sign_in_admin, tab_to)

ADMIN = "admin@example.com"
PERSON = "olga@example.com"


def ask_support(page, message="I lost my phone with the authenticator app. Please help me sign in again."):
    """From the code step: Lost access -> Contact support -> Send request."""
    follow(page, page.get_by_role("link", name="Lost access to your authenticator app?", exact=True))
    expect(page.get_by_role("heading", name="Contact support", exact=True)).to_be_visible()
    page.get_by_label("Email address", exact=True).fill(PERSON)
    page.get_by_label("Message", exact=True).fill(message)
    follow(page, page.get_by_role("button", name="Send request", exact=True))


def person_row(page):
    return page.get_by_role("article", name=re.compile(re.escape(PERSON)))


def open_support_and_find_person(page):
    """Support page, Search users for the person; their row shows 2FA Active."""
    follow(page, page.get_by_role("navigation").get_by_role("link", name="Support", exact=True))
    expect(page.get_by_role("heading", name="Support", exact=True)).to_be_visible()
    search_users(page, "olga")
    row = person_row(page)
    expect(row).to_be_visible()
    expect(row).to_contain_text("Active")
    return row


def disable_2fa_for_person(page):
    """Support page: Search users, then Temporarily disable 2FA with a Reason and a Disable for duration.

    The result row holds only a link; htmx fetches the form into the row on demand, focused on Reason, or on
    the person's open requests shown above it when there are some."""
    row = open_support_and_find_person(page)
    expect(row.get_by_label("Reason", exact=True)).to_have_count(0)  # search results stay light
    row.get_by_role("link", name="Temporarily disable 2FA", exact=True).click()
    reason = person_row(page).get_by_label("Reason", exact=True)
    expect(page.locator(":focus")).to_have_attribute("id", re.compile(r"^(u\d+-reason|user-\d+-requests)$"))
    reason.fill("Called back on the number on file; lost phone (request from today).")
    person_row(page).get_by_label("Disable for", exact=True).select_option(label="24 hours")
    person_row(page).get_by_role("button", name=re.compile("Disable")).click()
    expect(person_row(page)).to_contain_text("Temporarily off")


def test_lost_phone_to_support_to_password_only_sign_in(page, new_page, server):
    """security.md 38-40: support revokes the lost device; the person signs in with the password alone,
    is told to set up a new device, and the old device no longer counts."""
    lost_secret = random_secret()
    server.user(PERSON, devices={"Lost phone": lost_secret})

    log_in(page, PERSON)
    expect_code_step(page)
    ask_support(page)
    expect(page.get_by_role("heading", name="Request sent")).to_be_visible()

    admin = new_page()
    sign_in_admin(admin, server)
    follow(admin, admin.get_by_role("navigation").get_by_role("link", name="Support", exact=True))
    requests = admin.get_by_role("region", name=re.compile("Open contact requests"))
    expect(requests).to_contain_text(PERSON)
    expect(requests).to_contain_text("I lost my phone")
    disable_2fa_for_person(admin)

    log_in(page, PERSON)
    expect_signed_in(page)  # no code step any more
    expect(page.get_by_label("Verification code")).to_have_count(0)
    expect(page.get_by_text(re.compile("temporarily", re.I)).first).to_be_visible()
    prompt = page.get_by_role("link", name="Set up a new device")
    expect(prompt).to_be_visible()
    assert "Lost phone" not in settings_text(page)
    assert "Temporarily off" in settings_text(page)  # as Support's page says it


def test_after_support_the_person_enrols_a_new_phone_and_2fa_is_back(page, new_page, server, tmp_path):
    """The prompt leads to the wizard (on User Settings, its dialog, as the gear does); a new device ends
    support's window: the code step returns."""
    from browser_kit import next_step_code, parse_otpauth, qr_from_element
    from journey import log_out, qr_image, wizard_dialog

    server.user(PERSON, devices={"Lost phone": random_secret()})
    admin = new_page()
    sign_in_admin(admin, server)
    disable_2fa_for_person(admin)

    log_in(page, PERSON)
    expect_signed_in(page)
    page.get_by_role("link", name="Set up a new device").click()
    dialog = wizard_dialog(page)
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Next", exact=True).click()
    secret = parse_otpauth(qr_from_element(qr_image(dialog), tmp_path / "qr.png"))["secret"]
    dialog.get_by_role("button", name="Next", exact=True).click()
    dialog.get_by_label("Verification code", exact=True).fill(oathtool_code(secret))
    dialog.get_by_role("button", name="Next", exact=True).click()
    dialog.get_by_label("Device name", exact=True).fill("New phone")
    dialog.get_by_role("button", name="Complete Activation", exact=True).click()
    dialog.get_by_role("button", name="Done", exact=True).click()
    expect(page.get_by_role("link", name="Set up a new device")).to_have_count(0)
    assert "Active" in settings_text(page)

    log_out(page)
    log_in(page, PERSON)
    expect_code_step(page)
    enter_code(page, next_step_code(secret))
    expect_signed_in(page)


def test_when_the_window_ends_without_a_new_device_sign_in_stays_closed(page, server):
    """security.md 39: after support's end time without a new device, the password alone no longer works
    and the page points to support."""
    from datetime import timedelta

    from webapp.clock import now
    from webapp.models import User

    server.user(PERSON)
    server.query(lambda: User.update(tfa_reset_until=now() - timedelta(minutes=1))
                 .where(User.email == PERSON).execute())
    log_in(page, PERSON)
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(page.get_by_role("heading", name="User Settings")).to_have_count(0)
    follow(page, alert.get_by_role("link", name="Contact support"))
    expect(page.get_by_role("heading", name="Contact support", exact=True)).to_be_visible()


def test_disable_form_by_keyboard_with_an_error_first(page, server):
    """Keyboard alone: Tab to the row's link, Enter opens the form in the row with focus on Reason; a missing
    reason comes back tied to the field, focused; then the disable goes through."""
    server.user(PERSON, devices={"Lost phone": random_secret()})
    sign_in_admin(page, server)
    row = open_support_and_find_person(page)
    tab_to(page, row.get_by_role("link", name="Temporarily disable 2FA", exact=True))
    page.keyboard.press("Enter")
    reason = person_row(page).get_by_label("Reason", exact=True)
    expect(reason).to_be_focused()
    tab_to(page, person_row(page).get_by_role("button", name=re.compile("Disable")))
    page.keyboard.press("Enter")
    reason = person_row(page).get_by_label("Reason", exact=True)
    expect(reason).to_have_attribute("aria-invalid", "true")
    expect(reason).to_have_accessible_description(re.compile("Give a reason"))
    expect(reason).to_be_focused()
    page.keyboard.type("Video call, passport seen.")
    tab_to(page, person_row(page).get_by_role("button", name=re.compile("Disable")))
    page.keyboard.press("Enter")
    expect(person_row(page)).to_contain_text("Temporarily off")
    # The row replaced itself with the button just pressed: focus is on the outcome, not lost on <body>.
    expect(person_row(page).get_by_role("status")).to_be_focused()
    expect(person_row(page).get_by_role("status")).to_contain_text("is off until")


def test_ending_a_window_early_with_a_reason_by_keyboard(page, server):
    """security.md 39, 42: the agent opens "End support window now" with the keyboard, gives an optional
    reason and ends the window; the row says it was ended early, by whom and why (it read like a window that
    ran out), and the focus is on the outcome."""
    server.user(PERSON, devices={"Lost phone": random_secret()})
    sign_in_admin(page, server)
    disable_2fa_for_person(page)
    tab_to(page, person_row(page).get_by_text("End support window now", exact=True))
    page.keyboard.press("Enter")
    reason = person_row(page).get_by_label("Reason", exact=True)
    expect(reason).to_be_visible()
    expect(reason).to_have_accessible_description(re.compile("Optional"))
    tab_to(page, reason)
    page.keyboard.type("Owner called back: the request was not from her.")
    button = person_row(page).get_by_role("button", name="End the window", exact=True)
    expect(button).to_have_accessible_description(re.compile("cannot sign in with the password alone any more"))
    tab_to(page, button)
    page.keyboard.press("Enter")
    expect(person_row(page).get_by_role("status")).to_be_focused()
    expect(person_row(page)).to_contain_text("Blocked")
    expect(person_row(page)).to_contain_text(
        re.compile(f"Ended early .* UTC by {re.escape(ADMIN)}: “Owner called back: the request was not from her.” "
                   "Password-only sign-in has stopped"))
    # the warning Tab passes over is the button's description
    expect(person_row(page).get_by_role("button", name="End the window", exact=True)).to_have_count(0)


def test_escape_closes_the_end_form_and_leaves_the_window_open(page, server):
    """A support walkthrough: Escape did nothing in the disable and End forms. It closes the one the focus is
    in, with the focus back on its summary, and changes nothing."""
    server.user(PERSON, devices={"Lost phone": random_secret()})
    sign_in_admin(page, server)
    disable_2fa_for_person(page)
    summary = person_row(page).get_by_text("End support window now", exact=True)
    tab_to(page, summary)
    page.keyboard.press("Enter")
    reason = person_row(page).get_by_label("Reason", exact=True)
    tab_to(page, reason)
    page.keyboard.type("Typed, then thought better of it")
    page.keyboard.press("Escape")
    expect(reason).to_be_hidden()
    expect(summary).to_be_focused()
    expect(person_row(page)).to_contain_text("Temporarily off")


def test_mark_as_handled_by_keyboard_keeps_the_focus_on_the_request(page, server):
    """Enter on Mark as handled: the requests card is replaced, and focus goes to the status line saying what
    was done (it was left on <body>, so the next Tab started again at the top of the page); the count follows
    and the request is under "Recently handled"."""
    from webapp.models import SupportRequest
    from webapp.clock import now

    server.query(lambda: SupportRequest.create(email=PERSON, message="Lost my phone, please help.",
                                               created_at=now(), ip="127.0.0.1"))
    sign_in_admin(page, server)
    follow(page, page.get_by_role("navigation").get_by_role("link", name="Support", exact=True))
    requests = page.locator("#open-requests")
    expect(requests.get_by_role("heading")).to_contain_text("(1)")
    tab_to(page, requests.get_by_role("button", name=re.compile(r"^Mark as handled\b")))
    page.keyboard.press("Enter")
    handled = requests.get_by_role("status")
    expect(handled).to_contain_text("is marked as handled")
    expect(handled).to_be_focused()
    expect(requests.get_by_role("heading", level=2)).to_contain_text("(0)")
    expect(requests.get_by_text("Recently handled (1)")).to_be_visible()


def test_disable_without_javascript_uses_a_page_with_the_form(nojs_page, server):
    """No JavaScript: the row's link opens a page with the same form; submitting it returns to the search
    with the outcome, and an error comes back on that page next to the field."""
    server.user(PERSON, devices={"Lost phone": random_secret()})
    page = nojs_page
    sign_in_admin(page, server)
    row = open_support_and_find_person(page)
    row.get_by_role("link", name="Temporarily disable 2FA", exact=True).click()
    expect(page.get_by_role("heading", name="Temporarily disable 2FA", exact=True)).to_be_visible()
    page.get_by_role("button", name=re.compile("Disable")).click()
    reason = page.get_by_label("Reason", exact=True)
    expect(reason).to_have_attribute("aria-invalid", "true")
    expect(reason).to_have_accessible_description(re.compile("Give a reason"))
    reason.fill("Called back on the number on file.")
    page.get_by_label("Disable for", exact=True).select_option(label="3 days")
    page.get_by_role("button", name=re.compile("Disable")).click()
    expect(page.get_by_role("heading", name="Support", exact=True)).to_be_visible()
    expect(page.get_by_text(re.compile(r"2FA for olga@example\.com is off until"))).to_be_visible()
    expect(person_row(page)).to_contain_text("Temporarily off")


def test_disable_page_opened_directly_with_javascript_returns_to_the_search(page, server):
    """The form's own page (e.g. the link opened in a new tab) also works with JavaScript on: the plain post
    comes back to the search with the outcome, and no script error on the way."""
    person = server.user(PERSON, devices={"Lost phone": random_secret()})
    sign_in_admin(page, server)
    page.goto(f"/support/users/{person.id}/disable-2fa")
    expect(page.get_by_role("heading", name="Temporarily disable 2FA", exact=True)).to_be_visible()
    expect(page.get_by_label("Reason", exact=True)).to_be_focused()
    page.get_by_label("Reason", exact=True).fill("Called back on the number on file.")
    page.get_by_role("button", name=re.compile("Disable")).click()
    expect(page.get_by_role("heading", name="Support", exact=True)).to_be_visible()
    expect(page.get_by_text(re.compile(r"2FA for olga@example\.com is off until"))).to_be_visible()
    expect(person_row(page)).to_contain_text("Temporarily off")


def test_results_replaced_while_tabbing_through_them_give_the_focus_back_to_the_search(page, server):
    """Search users searches by itself a moment after typing: a keyboard user who had tabbed on into the old
    results before the answer came lost the focus to <body> when they were replaced (the next Tab started at
    the top of the page). It goes back to the search field, and the status line says what was found."""
    for name in ("olga", "oliver", "otto"):
        server.user(f"{name}@example.com", devices={"Phone": random_secret()})
    sign_in_admin(page, server)
    follow(page, page.get_by_role("navigation").get_by_role("link", name="Support", exact=True))
    search = page.get_by_label("Search users", exact=True)
    held = []
    page.route(lambda url: "q=ol" in url, lambda route: held.append(route))  # the answer waits until the keyboard is in the results
    search.fill("ol")
    tab_to(page, page.get_by_role("link", name="Audit log for otto@example.com", exact=True))
    while not held:
        page.wait_for_timeout(50)
    held[0].continue_()
    expect(page.get_by_role("status").filter(has_text="found")).to_have_text("2 accounts found.")
    expect(search).to_be_focused()


def test_the_row_form_shows_the_persons_requests_first_and_focuses_them(page, server):
    """An agent who found the person by a search opens the form in the row: the person's open request (with
    the hints about it) is there above Reason, and the keyboard focus starts at it, not past it in Reason;
    Tab goes on into the form."""
    from webapp.clock import now
    from webapp.models import SupportRequest, User

    server.user(PERSON, devices={"Lost phone": random_secret()})
    server.query(lambda: SupportRequest.create(email=PERSON, message="Lost my phone at the station.",
                                               user=User.get(User.email == PERSON).id, created_at=now(),
                                               ip="127.0.0.1"))
    sign_in_admin(page, server)
    row = open_support_and_find_person(page)
    tab_to(page, row.get_by_role("link", name="Temporarily disable 2FA", exact=True))
    page.keyboard.press("Enter")
    heading = person_row(page).get_by_role("heading", name=f"Open contact requests from {PERSON}")
    expect(heading).to_be_focused()
    expect(person_row(page)).to_contain_text("Lost my phone at the station.")
    tab_to(page, person_row(page).get_by_label("Reason", exact=True))


def test_searching_as_one_types_keeps_the_address_and_adds_no_history_entry(page, server):
    """Search users searches a moment after each pause in the typing: the address follows the search (a reload
    shows the same results) but no history entry is added for each one. Leaving Support took a Back press per
    search typed, each loading the whole page again (a history review); one Back now goes to the page before."""
    for name in ("olga", "oliver"):
        server.user(f"{name}@example.com", devices={"Phone": random_secret()})
    sign_in_admin(page, server)
    settings_url = page.url
    follow(page, page.get_by_role("navigation").get_by_role("link", name="Support", exact=True))
    entries = page.evaluate("history.length")
    search = page.get_by_label("Search users", exact=True)
    for typed, found in (("o", "2 accounts found."), ("ol", "2 accounts found."), ("olg", "1 account found.")):
        search.fill(typed)
        expect(page).to_have_url(re.compile(rf"/support\?q={typed}$"))
        expect(page.get_by_role("status").filter(has_text="found")).to_have_text(found)
    assert page.evaluate("history.length") == entries
    page.reload()
    expect(person_row(page)).to_be_visible()
    expect(page.get_by_role("article")).to_have_count(1)
    page.go_back()
    expect(page).to_have_url(settings_url)


def test_the_persons_links_and_the_audit_log_keep_their_layout_on_a_phone_and_a_computer(page, new_page, server):
    """A visual review: at 1280 px the audit log squeezed the Person column to a few letters ("locked@ex" over
    "ample.com") beside the details; on a phone an event with no details showed a "Details" label over
    nothing; a person's second link on the Support page, wrapped under the first, started 1rem in; and the
    code step's "Lost access" link was a target of 18-19 px."""
    server.user(PERSON, devices={"Phone": random_secret()})
    log_in(page, PERSON)
    expect_code_step(page)
    lost = page.get_by_role("link", name="Lost access to your authenticator app?", exact=True)
    assert lost.bounding_box()["height"] >= 24  # a target alone on its line: 18-19 px before (WCAG 2.5.8)
    ask_support(page)
    expect(page.get_by_role("heading", name="Request sent")).to_be_visible()

    admin = new_page()
    sign_in_admin(admin, server)
    admin.set_viewport_size({"width": 320, "height": 640})
    row = open_support_and_find_person(admin)
    links = row.locator(".row-links a")
    expect(links).to_have_count(2)  # the audit log, and the open request
    first, second = links.nth(0).bounding_box(), links.nth(1).bounding_box()
    assert second["y"] > first["y"] and abs(second["x"] - first["x"]) < 1, (first, second)

    admin.set_viewport_size({"width": 1280, "height": 800})
    admin.goto("/support/audit")
    person_cells = admin.locator("table.audit td.person")
    expect(person_cells.first).to_be_visible()
    widths = [box["width"] for box in (cell.bounding_box() for cell in person_cells.all())]
    assert min(widths) >= 190, widths  # 12rem: an address of ordinary length on one line

    admin.set_viewport_size({"width": 390, "height": 844})
    details = [text.strip() for text in admin.locator("table.audit td.details").all_inner_texts()]
    assert details and all(details), details  # "—" where an event has none, as the Person column says
    assert "—" in details  # "Password accepted, code requested" has no details
