"""Managing devices on User Settings in a real browser: the row replaces itself (htmx), and focus and
messages must follow, for keyboard and screen-reader users too."""
import re

from browser_kit import oathtool_code, random_secret
from journey import enter_code, expect, expect_signed_in, log_in, tab_to


def sign_in_with(page, server, email, devices):
    server.user(email, devices=devices)
    log_in(page, email)
    enter_code(page, oathtool_code(next(iter(devices.values()))))
    expect_signed_in(page)


def tfa_row(page):
    return page.locator("#tfa-row")


def test_renaming_by_keyboard_focuses_the_error_then_the_result(page, server):
    """An empty name comes back in the replaced row with the field focused, invalid and described by the
    error; a good name comes back with the message focused, saying what was done."""
    sign_in_with(page, server, "rae@example.com", {"Phone": random_secret()})
    summary = tfa_row(page).locator("summary", has_text="Rename")
    tab_to(page, summary)
    page.keyboard.press("Enter")
    name = tfa_row(page).get_by_label("Device name", exact=True)
    tab_to(page, name)
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.press("Enter")  # submits the rename form

    name = tfa_row(page).get_by_label("Device name", exact=True)
    expect(name).to_have_attribute("aria-invalid", "true")
    expect(name).to_have_accessible_description(re.compile("Give this device a name"))
    expect(name).to_be_focused()

    page.keyboard.type("Work phone")
    page.keyboard.press("Enter")
    notice = tfa_row(page).get_by_role("status")
    expect(notice).to_have_text("Renamed “Phone” to “Work phone”.")
    expect(notice).to_be_focused()
    expect(tfa_row(page).locator(".device-name")).to_have_text(["Work phone"])


def test_a_refused_htmx_action_reloads_the_page_with_the_reason(page, server):
    """A device removed in another tab: its Rename answers 404, which htmx would not show; the page reloads
    (HX-Refresh) and says what happened, and the row lists the devices that are left."""
    from webapp.models import Device

    sign_in_with(page, server, "sam@example.com", {"Phone": random_secret(), "Tablet": random_secret()})
    tablet_row = tfa_row(page).locator("li.device", has_text="Tablet")
    tablet_row.locator("summary", has_text="Rename").click()
    server.query(lambda: Device.delete().where(Device.name == "Tablet").execute())
    field = tablet_row.get_by_label("Device name", exact=True)
    field.fill("Old tablet")
    tablet_row.get_by_role("button", name="Save name").click()
    expect(page.locator(".flashes")).to_contain_text("Not found:")
    expect(tfa_row(page).locator(".device-name")).to_have_text(["Phone"])
