"""Devices after enrolment, in User Settings: list, rename, remove (with a code), add another, turn 2FA off.

Every change is audited and ends the person's other sessions; nobody reaches another person's devices.
"""
import re

import pyotp
import pytest

from webapp import fields
from webapp.models import AuditEvent, Device, ServerSession, User

HX = {"HX-Request": "true"}
PASSWORD = "correct horse battery"  # the password conftest's Actor.user() sets


def text(response):
    return response.get_data(as_text=True)


@pytest.fixture
def alice(actor, secret):
    """Alice with one device ("Phone"), signed in; the clock moved on so her next code is not a replay."""
    user = actor.user(secret=secret)
    r = actor.sign_in(secret=secret)
    assert r.status_code == 302
    actor.clock.advance(30)
    return user


def add_device(app, user, name, secret=None):
    """A device created directly in the database (no wizard), for tests that need several."""
    from webapp.totp import encrypt_secret

    with app.app_context():
        return Device.create(user=user.id, name=name, secret_enc=encrypt_secret(secret or pyotp.random_base32()))


def device_rows(app, user):
    with app.app_context():
        return list(Device.select().where(Device.user == user.id).order_by(Device.id))


def kinds(app, user):
    with app.app_context():
        return [e.kind for e in AuditEvent.select().where(AuditEvent.user == user.id).order_by(AuditEvent.id)]


def post(actor, url, data, htmx=False):
    headers = HX if htmx else {}
    return actor.client.post(url, data={"csrf_token": actor.csrf("/settings"), **data}, headers=headers)


def refused(actor, url, data, page="/settings"):
    """Send a device form without JavaScript: a refusal answers 303 to User Settings (Post/Redirect/Get, so
    Reload sends no code or password again), whose page shows it once. That page's response."""
    r = post(actor, url, data)
    assert r.status_code == 303 and r.headers["Location"] == page, (r.status_code, r.headers.get("Location"))
    return actor.client.get(page)


def second_session(actor, app, email="alice@example.com", secret=None):
    """Another browser signed in as the same person (for security.md 35)."""
    other = type(actor)(app, app.test_client(), actor.clock)
    r = other.password_step(email)
    if secret is not None:
        other.code_step(other.code(secret))
    assert other.client.get("/settings").status_code == 200
    return other


def signed_out(client):
    r = client.get("/settings")
    return r.status_code == 302 and "/login" in r.headers["Location"]


# ---------------------------------------------------------------- listing

def test_devices_are_listed_with_name_added_date_and_last_use(actor, app, alice):
    page = text(actor.client.get("/settings"))
    assert ">Active<" in page
    assert '<strong class="device-name"><bdi>Phone</bdi></strong>' in page
    assert "Added <time" in page and "last used <time" in page  # the sign-in used it
    # Without JavaScript the date stays in UTC, and says so as every other time does (a review of times: a
    # device added at 23:30 UTC read as added the day before in India).
    with app.app_context():
        added = Device.get().created_at
    assert f'data-local="date">{added:%Y-%m-%d} UTC</time>' in page
    assert "Add another device" in page and "Turn off two-factor authentication" in page
    assert 'href="/settings/2fa"' in page


def test_a_name_in_a_right_to_left_script_does_not_move_the_text_after_it(actor, app, alice):
    """A device named in Hebrew or Arabic ("הטלפון שלי") and the words after it are one run of text to the
    browser's bidirectional algorithm: "(not used to sign in yet)" or ": added ..." then drew on the wrong
    side of the name (a Unicode review). Each name that text follows is isolated (<bdi>), on User Settings and
    on the Support page's row of the person."""
    add_device(app, alice, "הטלפון שלי")
    page = text(actor.client.get("/settings"))
    assert '<strong class="device-name"><bdi>הטלפון שלי</bdi></strong>' in page
    from .test_support import sign_in_admin

    admin = type(actor)(app, app.test_client(), actor.clock)
    sign_in_admin(admin, pyotp.random_base32())
    row = text(admin.client.get(f"/support?user={alice.id}"))
    assert "<li><bdi>הטלפון שלי</bdi>: added" in row


def test_devices_are_listed_in_the_order_they_were_added(actor, app, alice):
    add_device(app, alice, "Tablet")
    add_device(app, alice, "Laptop")
    page = text(actor.client.get("/settings"))
    names = re.findall(r'<strong class="device-name"><bdi>([^<]+)</bdi></strong>', page)
    assert names == ["Phone", "Tablet", "Laptop"]


def test_a_device_never_used_to_sign_in_says_so(actor, app, alice):
    add_device(app, alice, "Tablet")
    page = text(actor.client.get("/settings"))
    assert '<strong class="device-name"><bdi>Tablet</bdi></strong>' in page and "not used to sign in yet" in page


# ---------------------------------------------------------------- rename

def test_rename_a_device(actor, app, alice):
    [device] = device_rows(app, alice)
    r = post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": "  Old iPhone "})
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
    assert [d.name for d in device_rows(app, alice)] == ["Old iPhone"]
    assert "device_renamed" in kinds(app, alice)
    assert "Old iPhone" in text(actor.client.get("/settings"))


def test_rename_with_htmx_returns_the_row_fragment(actor, app, alice):
    [device] = device_rows(app, alice)
    r = post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": "Pixel"}, htmx=True)
    body = text(r)
    assert r.status_code == 200 and "HX-Request" in r.headers["Vary"]
    assert "<html" not in body and body.lstrip().startswith('<div class="setting-row" id="tfa-row"')
    assert 'role="status"' in body and "Pixel" in body


@pytest.mark.parametrize("name, message", [
    ("", "Give this device a name."),
    ("   ", "Give this device a name."),
    ("y" * 65, "at most 64 characters"),
    ("TABLET", "already have a device with this name"),
    ("Ben\u2019s \u201cwork\u201d phone", "already have a device with this name"),  # Ben's "work" phone, typed on a phone
    # a joiner after an emoji joins it; one after that joiner joins nothing and only hides in the name
    ("\U0001f600\u200d\u200d\u200c phone", "letters, digits"),
])
def test_rename_is_validated(actor, app, alice, name, message):
    add_device(app, alice, "Tablet")
    add_device(app, alice, 'Ben\'s "Work" phone')
    device = device_rows(app, alice)[0]
    field = f"rename-{device.id}-name"
    r = refused(actor, f"/settings/devices/{device.id}/rename", {field: name})
    body = text(r)
    assert r.status_code == 400 and message in body
    assert re.search(rf'<input[^>]*aria-describedby="{field}-error"[^>]*id="{field}"', body)
    assert [d.name for d in device_rows(app, alice)] == ["Phone", "Tablet", 'Ben\'s "Work" phone']
    r = post(actor, f"/settings/devices/{device.id}/rename", {field: name}, htmx=True)
    assert r.status_code == 200 and message in text(r)  # htmx swaps only 2xx


@pytest.mark.parametrize("name", ["گوشی\u200cمن", "👩\u200d💻 laptop", "Phone \U0001fae8", "Anna's ❤️ phone",
                                  "1\ufe0f\u20e3 phone", "🏳️\u200d🌈 phone", "❤️\u200d🔥", "葛\U000e0100飾の電話",
                                  "ᠮᠣᠩᠭᠣᠯ\u180b утас"])
def test_names_written_with_joiners_or_newer_emoji_are_allowed(actor, app, alice, name):
    """Persian spells with the zero-width non-joiner, emoji are built with the joiner and the variation
    selectors, Mongolian letters and Japanese kanji variants take selectors too, and an emoji newer than the
    server's Unicode tables is no hidden character: such names are taken as typed (the review of the check
    for characters that show nothing)."""
    [device] = device_rows(app, alice)
    r = post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": name})
    assert r.status_code == 302
    assert [d.name for d in device_rows(app, alice)] == [name]


@pytest.mark.parametrize("marks", [1, 6, 7, 28])
def test_a_name_takes_up_to_six_combining_marks_on_one_letter(actor, app, alice, marks):
    """Writing stacks a few marks on one letter (Vietnamese two, pointed Hebrew with cantillation four): up
    to six (fields.MAX_STACKED_MARKS) make a name; seven or more, which paint over the lines around the name
    on the page, are refused and the name stays as it was."""
    [device] = device_rows(app, alice)
    name = "Z" + "\u033f" * marks + " phone"  # U+033F COMBINING DOUBLE OVERLINE: no composed form with Z
    r = post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": name})
    if marks <= 6:
        assert r.status_code == 302
        assert [d.name for d in device_rows(app, alice)] == [name]
    else:
        assert r.status_code == 303 and r.headers["Location"] == "/settings"
        r = actor.client.get("/settings")
        assert r.status_code == 400 and "Use letters, digits, spaces and punctuation only." in text(r)
        assert [d.name for d in device_rows(app, alice)] == ["Phone"]


def test_renaming_to_its_own_name_in_other_case_is_allowed(actor, app, alice):
    [device] = device_rows(app, alice)
    post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": "PHONE"})
    assert [d.name for d in device_rows(app, alice)] == ["PHONE"]


# A name that reads like another: written with two spaces (a page draws one), a no-break space, full-width
# letters, or Cyrillic letters that pass for Latin ones (a security review: an intruder's second "Maria's
# iPhone" read, in the list and in Security activity, like the owner's own phone).
LOOKS_TAKEN = "You already have a device with this name, or one that looks the same."
MIXES_ALPHABETS = "A word in this name mixes letters of different alphabets"


@pytest.mark.parametrize("name, message", [
    ("Maria's  iPhone", LOOKS_TAKEN),  # two spaces
    ("Maria's\u00a0iPhone", LOOKS_TAKEN),  # a no-break space
    ("Maria's \u2009\u3000iPhone", LOOKS_TAKEN),  # a thin and an ideographic space
    ("\uff2d\uff41\uff52\uff49\uff41's iPhone", LOOKS_TAKEN),  # full-width letters
    ("\u0420\u043e\u0441\u043e X3", LOOKS_TAKEN),  # "Росо X3": every letter of the word Cyrillic
    ("\u041d\u0422\u0421 one", LOOKS_TAKEN),  # "НТС one": Cyrillic capitals that read as Latin ones ("нтс" does not)
    ("Maria's iPh\u043ene", MIXES_ALPHABETS),  # a Cyrillic "о" in a Latin word
    ("M\u0430ria's iPhone", MIXES_ALPHABETS),  # a Cyrillic "а"
    ("Maria\u2019s iP\u04bbone", MIXES_ALPHABETS),  # a Cyrillic "һ", with a phone's apostrophe
])
def test_a_name_that_looks_like_another_devices_name_is_refused(actor, app, alice, name, message):
    """security.md 13: until notices go out, the owner learns of a new device from Security activity ("Another
    authenticator device added: “Maria's iPhone”") and the list of devices, so a new name must not pass for
    one of theirs. Runs of spaces and other spaces, compatibility characters and Cyrillic or Greek letters
    that read as Latin ones count as what they look like, and a word that mixes alphabets is refused."""
    add_device(app, alice, "Maria's iPhone")
    add_device(app, alice, "Poco X3")
    add_device(app, alice, "HTC One")
    device = device_rows(app, alice)[0]
    field = f"rename-{device.id}-name"
    r = refused(actor, f"/settings/devices/{device.id}/rename", {field: name})
    assert r.status_code == 400 and message in text(r)
    assert [d.name for d in device_rows(app, alice)] == ["Phone", "Maria's iPhone", "Poco X3", "HTC One"]


@pytest.mark.parametrize("name", ["Телефон Маши", "Телефон у Маши", "小米手机", "Zoë's Pixel", "Κινητό της Ελένης",
                                  "iPhone Маши", "iPhone-Маши", "Маша's phone", "Poco X3 Pro", "Росинка"])
def test_names_in_one_alphabet_a_word_are_allowed_beside_look_alike_rules(actor, app, alice, name):
    """The look-alike rules leave ordinary names alone: any one script, Russian words whose every letter has
    a Latin twin ("у"), and names whose words are each in their own alphabet."""
    add_device(app, alice, "Poco X3")
    device = device_rows(app, alice)[0]
    r = post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": name})
    assert r.status_code == 302, text(r)
    assert [d.name for d in device_rows(app, alice)] == [name, "Poco X3"]


def test_a_run_of_spaces_in_a_name_is_stored_as_one_space(actor, app, alice):
    """A page draws "Old  iPhone" with one gap, and a no-break space as an ordinary one: the name is stored as
    it shows, so the audit record and `users export` name the device as its owner sees it."""
    [device] = device_rows(app, alice)
    field = f"rename-{device.id}-name"
    r = post(actor, f"/settings/devices/{device.id}/rename", {field: "Old \u00a0iPhone\u3000\u20097"})
    assert r.status_code == 302
    assert [d.name for d in device_rows(app, alice)] == ["Old iPhone 7"]
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "device_renamed").get().details["device"] == "Old iPhone 7"


def test_the_wizards_name_step_refuses_a_name_that_looks_like_another_devices(actor, app, alice):
    """security.md 13: the wizard's name step applies the rename's rules (an intruder adds the second "Maria's
    iPhone" there); a name in one alphabet a word still completes it."""
    from .test_wizard import Wizard

    add_device(app, alice, "Maria's iPhone")
    w = Wizard(actor)
    body = text(w.run("Maria's\u00a0 iPhone"))
    assert 'data-step="name"' in body and LOOKS_TAKEN in body
    for name, message in (("Maria's iPh\u043ene", MIXES_ALPHABETS), ("MARIA’S IPHONE", LOOKS_TAKEN)):
        body = text(w.complete(name))
        assert 'data-step="name"' in body and message in body
    assert 'data-step="done"' in text(w.complete("Телефон  Маши"))
    assert [d.name for d in device_rows(app, alice)] == ["Phone", "Maria's iPhone", "Телефон Маши"]


# ---------------------------------------------------------------- remove

def test_removing_a_device_needs_a_current_code(actor, app, alice, secret):
    """security.md 32: a stolen session alone cannot remove a factor."""
    add_device(app, alice, "Tablet")
    phone, tablet = device_rows(app, alice)
    url = f"/settings/devices/{tablet.id}/remove"
    r = refused(actor, url, {})
    assert r.status_code == 400 and "Enter a current code" in text(r)
    wrong = "123456" if actor.code(secret) != "123456" else "654321"
    r = refused(actor, url, {f"remove-{tablet.id}-code": wrong})
    assert r.status_code == 200 and "That code is not valid" in text(r)
    assert len(device_rows(app, alice)) == 2
    actor.clock.advance(10)  # past the one-second back-off after the wrong code
    r = post(actor, url, {f"remove-{tablet.id}-code": actor.code(secret)})
    assert r.status_code == 302
    assert [d.name for d in device_rows(app, alice)] == ["Phone"]
    assert "device_removed" in kinds(app, alice)
    assert ">Active<" in text(actor.client.get("/settings"))


def test_removing_the_last_device_needs_explicit_confirmation(actor, app, alice, secret):
    [device] = device_rows(app, alice)
    url = f"/settings/devices/{device.id}/remove"
    page = text(actor.client.get("/settings"))
    assert "only device" in page and f'name="remove-{device.id}-confirm_off"' in page
    r = refused(actor, url, {f"remove-{device.id}-code": actor.code(secret)})
    assert r.status_code == 400 and "Tick the box" in text(r)
    assert len(device_rows(app, alice)) == 1
    r = post(actor, url, {f"remove-{device.id}-code": actor.code(secret), f"remove-{device.id}-confirm_off": "y",
             f"remove-{device.id}-password": PASSWORD},
             htmx=True)
    body = text(r)
    assert r.status_code == 200 and ">Off<" in body and "now off" in body
    assert device_rows(app, alice) == []
    assert "tfa_disabled" in kinds(app, alice)


def test_removing_the_last_device_needs_the_password_too(actor, app, alice, secret):
    """security.md 32: removing the only device turns 2FA off, so it needs the password as well as a code;
    without it or with a wrong one nothing changes."""
    [device] = device_rows(app, alice)
    url = f"/settings/devices/{device.id}/remove"
    assert f'name="remove-{device.id}-password"' in text(actor.client.get("/settings"))
    base = {f"remove-{device.id}-code": actor.code(secret), f"remove-{device.id}-confirm_off": "y"}
    r = refused(actor, url, base)
    assert r.status_code == 400 and "Enter your password" in text(r)
    r = refused(actor, url, {**base, f"remove-{device.id}-password": "not my password"})
    # a signed-in person confirms with a password only: the message names no email address
    assert r.status_code == 403 and "Incorrect password." in text(r) and "email address" not in text(r)
    assert len(device_rows(app, alice)) == 1 and "tfa_disabled" not in kinds(app, alice)
    actor.clock.advance(2)  # past the back-off of the wrong password
    r = post(actor, url, {**base, f"remove-{device.id}-password": PASSWORD})
    assert r.status_code == 302 and device_rows(app, alice) == []


def test_removing_one_of_several_devices_does_not_ask_for_the_password(actor, app, alice, secret):
    add_device(app, alice, "Tablet")
    page = text(actor.client.get("/settings"))
    assert "-password" not in page.split('class="turn-off"')[0]


def test_two_removals_at_once_cannot_turn_2fa_off_without_the_password(actor, app, alice, secret, monkeypatch):
    """security.md 32, 43: with two devices, two removals sent at once each saw two devices when they began.
    Here the other removal commits while this one checks its code; this one must then see the last device,
    ask for the password and the tick, and remove nothing."""
    from webapp import totp

    add_device(app, alice, "Tablet")
    phone, tablet = device_rows(app, alice)
    real_check = totp.check_user_code

    def check_while_the_other_removal_commits(user, raw_code, matches=None):
        result = real_check(user, raw_code, matches)
        with app.app_context():
            Device.delete().where(Device.id == tablet.id).execute()
        return result

    monkeypatch.setattr(totp, "check_user_code", check_while_the_other_removal_commits)
    r = refused(actor, f"/settings/devices/{phone.id}/remove", {f"remove-{phone.id}-code": actor.code(secret)})
    monkeypatch.setattr(totp, "check_user_code", real_check)
    assert r.status_code == 409 and "This is now your only device" in text(r)
    assert [d.name for d in device_rows(app, alice)] == ["Phone"]
    assert "tfa_disabled" not in kinds(app, alice) and "device_removed" not in kinds(app, alice)
    page = text(actor.client.get("/settings"))
    assert ">Active<" in page and f'name="remove-{phone.id}-password"' in page

    actor.clock.advance(30)  # the code above was used up: the next step's code, with password and tick
    r = post(actor, f"/settings/devices/{phone.id}/remove", {
        f"remove-{phone.id}-code": actor.code(secret), f"remove-{phone.id}-confirm_off": "y",
        f"remove-{phone.id}-password": PASSWORD})
    assert r.status_code == 302 and device_rows(app, alice) == []
    assert {"device_removed", "tfa_disabled"} <= set(kinds(app, alice))


def test_removing_the_only_device_while_another_is_added_says_what_happened(actor, app, alice, secret,
                                                                             monkeypatch):
    """The form asked for the password because this was the only device, but a new one was enrolled while the
    code was checked: only this device goes, 2FA stays on, and the message says so (security.md 32)."""
    from webapp import totp

    [phone] = device_rows(app, alice)
    real_check = totp.check_user_code

    def check_while_a_device_is_added(user, raw_code, matches=None):
        result = real_check(user, raw_code, matches)
        add_device(app, alice, "Tablet")
        return result

    monkeypatch.setattr(totp, "check_user_code", check_while_a_device_is_added)
    r = post(actor, f"/settings/devices/{phone.id}/remove", {
        f"remove-{phone.id}-code": actor.code(secret), f"remove-{phone.id}-confirm_off": "y",
        f"remove-{phone.id}-password": PASSWORD})
    monkeypatch.undo()
    assert r.status_code == 302
    page = text(actor.client.get("/settings"))
    assert "Removed “Phone”" in page and "now off" not in page and ">Active<" in page
    assert [d.name for d in device_rows(app, alice)] == ["Tablet"] and "tfa_disabled" not in kinds(app, alice)


@pytest.mark.parametrize("change", ["remove", "disable"])
def test_wrong_codes_when_removing_or_turning_off_count_towards_the_account_throttle(actor, app, alice, secret, change):
    """security.md 18: the remove form and Turn off share the per-account code throttle."""
    [device] = device_rows(app, alice)
    url, data = device_change(actor, device, secret, change)
    code_field = next(k for k in data if k.endswith("code"))
    wrong = "123456" if actor.code(secret) != "123456" else "654321"
    for _ in range(6):
        post(actor, url, {**data, code_field: wrong})
    r = refused(actor, url, data)
    # Six wrong codes within a second: the first started a 1-second pause that the others met, and counted;
    # only the first was checked, so it is still that pause (not "too many wrong codes").
    assert r.status_code == 429 and "Wait 1 second before entering another code." in text(r)
    assert len(device_rows(app, alice)) == 1
    with app.app_context():
        row = User.get_by_id(alice.id)
    assert (row.code_failures, row.code_strikes) == (7, 1)


@pytest.mark.parametrize("change", ["remove", "disable"])
def test_the_wrong_code_that_starts_a_lock_says_so_with_429(actor, app, alice, secret, change):
    """security.md 18: the fifth wrong code in a row locks code entry; the answer to it says so at once and is
    a 429, as every answer that asks to wait (it was 200 or 403 with only "not valid"). Nothing changes."""
    [device] = device_rows(app, alice)
    url, data = device_change(actor, device, secret, change)
    code_field = next(k for k in data if k.endswith("code"))
    wrong = "123456" if actor.code(secret) != "123456" else "654321"
    for pause in (0, 1, 2, 4):
        actor.clock.advance(pause)
        assert refused(actor, url, {**data, code_field: wrong}).status_code in (200, 403)
    actor.clock.advance(8)
    r = refused(actor, url, {**data, code_field: wrong})
    assert r.status_code == 429
    assert "Too many wrong codes in a row: wait 15 minutes before trying again." in text(r)
    assert len(device_rows(app, alice)) == 1


@pytest.mark.parametrize("change", ["remove", "disable"])
def test_turning_2fa_off_shares_the_password_throttle(actor, app, alice, secret, change):
    """security.md 19, 32: a wrong password when removing the only device or turning 2FA off starts the same
    back-off as at the sign-in: the right one sent at once is refused with 429 ("Too many"), and nothing goes."""
    [device] = device_rows(app, alice)
    url, data = device_change(actor, device, secret, change)
    password_field = next(k for k in data if k.endswith("password"))
    r = refused(actor, url, {**data, password_field: "not my password"})
    assert r.status_code == 403 and "Incorrect" in text(r)
    r = refused(actor, url, data)
    assert r.status_code == 429 and "Too many" in text(r)
    assert len(device_rows(app, alice)) == 1


@pytest.mark.parametrize("change, password, status, message", [
    ("remove", "x" * 1025, 400, "That password is too long."),
    ("disable", "", 403, "Enter your password."),
])
def test_a_password_that_cannot_be_right_is_refused_before_it_is_checked(actor, app, alice, secret, change, password,
                                                                         status, message):
    """security.md 32: a missing or over-long password is named as such; it is not hashed and compared, so it
    is no wrong guess for the throttle, and nothing changes."""
    [device] = device_rows(app, alice)
    url, data = device_change(actor, device, secret, change)
    password_field = next(k for k in data if k.endswith("password"))
    r = refused(actor, url, {**data, password_field: password})
    assert r.status_code == status and message in text(r) and "Incorrect" not in text(r)
    assert len(device_rows(app, alice)) == 1 and "password_rejected" not in kinds(app, alice)


def test_a_removed_device_no_longer_signs_in(actor, app, alice, secret):
    """security.md 35: removing the factor revokes it at once."""
    new_secret = pyotp.random_base32()
    add_device(app, alice, "Tablet", new_secret)
    phone, _ = device_rows(app, alice)
    post(actor, f"/settings/devices/{phone.id}/remove", {f"remove-{phone.id}-code": actor.code(new_secret)})
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    actor.clock.advance(30)
    actor.password_step()
    r = actor.code_refused(actor.code(secret))
    assert r.status_code == 200 and "That code is not valid" in text(r)


# ---------------------------------------------------------------- turn off entirely

def test_turning_2fa_off_needs_password_and_code(actor, app, alice, secret):
    """security.md 32: password and a current code, by POST; without them 403 and nothing changes."""
    r = refused(actor, "/settings/2fa/disable", {"off-password": PASSWORD})
    assert r.status_code == 403 and "Enter a current code" in text(r)
    r = refused(actor, "/settings/2fa/disable", {"off-password": "wrong password", "off-code": actor.code(secret)})
    assert r.status_code == 403 and "Incorrect" in text(r)
    assert len(device_rows(app, alice)) == 1
    actor.clock.advance(30)  # past the back-off the wrong password earned (and onto a fresh code)
    r = post(actor, "/settings/2fa/disable", {"off-password": PASSWORD, "off-code": actor.code(secret)})
    assert r.status_code == 302
    assert device_rows(app, alice) == []
    page = text(actor.client.get("/settings"))
    assert ">Off<" in page
    # Its entry in the app would only make refused codes, and a new setup would add one of the same name.
    assert (f"You can delete the entry for {app.config['TOTP_ISSUER']} ({alice.email}) in your authenticator app."
            in page)
    assert "tfa_disabled" in kinds(app, alice)
    actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})
    r = actor.password_step()
    assert r.headers["Location"].endswith("/settings")  # password alone now


def test_a_device_renamed_while_it_is_removed_is_recorded_by_its_new_name(actor, app, alice, secret, monkeypatch):
    """The removal read the device before checking the code, and its record named it so: renamed in another
    tab meanwhile, the audit log said a device was removed by a name it no longer had. The record and the
    message now use the name read under the person's row."""
    import webapp.settings as settings_module

    tablet = add_device(app, alice, "Tablet")
    original = settings_module.totp.check_user_code

    def check_while_renamed(user, code):
        result = original(user, code)
        Device.update(name="Old tablet").where(Device.id == tablet.id).execute()  # the other tab's rename
        return result

    monkeypatch.setattr(settings_module.totp, "check_user_code", check_while_renamed)
    r = post(actor, f"/settings/devices/{tablet.id}/remove", {f"remove-{tablet.id}-code": actor.code(secret)})
    assert r.status_code == 302
    assert ("Removed “Old tablet”. It no longer works for signing in: in the authenticator app on that device, "
            f"delete the entry for {app.config['TOTP_ISSUER']} ({alice.email}).") in text(actor.client.get("/settings"))
    with app.app_context():
        [event] = AuditEvent.select().where((AuditEvent.user == alice.id) & (AuditEvent.kind == "device_removed"))
        assert event.details == {"device": "Old tablet", "device_id": tablet.id}


def test_removing_a_device_another_tab_removed_meanwhile_says_so_and_changes_nothing(actor, app, alice, secret,
                                                                                    monkeypatch):
    """Gone between the page and the removal (after the code check): 404 with the reason, like a rename; it
    used to say "Removed" and sign the person's other browsers out for a removal it had not made."""
    import webapp.settings as settings_module

    tablet = add_device(app, alice, "Tablet")
    add_device(app, alice, "Laptop")
    other = second_session(actor, app, secret=secret)
    original = settings_module.totp.check_user_code

    def check_while_removed(user, code):
        result = original(user, code)
        Device.delete().where(Device.id == tablet.id).execute()  # the other tab's removal lands here
        return result

    monkeypatch.setattr(settings_module.totp, "check_user_code", check_while_removed)
    actor.clock.advance(30)
    r = post(actor, f"/settings/devices/{tablet.id}/remove", {f"remove-{tablet.id}-code": actor.code(secret)})
    assert r.status_code == 404 and "That device is no longer on your account" in text(r)
    assert other.client.get("/settings").status_code == 200  # nobody signed out
    assert "device_removed" not in kinds(app, alice) and "sessions_ended" not in kinds(app, alice)


def test_turning_2fa_off_is_all_or_nothing(actor, app, alice, secret, monkeypatch):
    """The devices, the pending keys and the audit record go in one transaction: the audit insert failing
    (the database gone at that moment) used to leave 2FA off with no record of it. Now nothing changes,
    and the person sees the 503 page."""
    from .conftest import failing_audit

    failing_audit(monkeypatch, "webapp.settings", "tfa_disabled")
    r = post(actor, "/settings/2fa/disable", {"off-password": PASSWORD, "off-code": actor.code(secret)})
    assert r.status_code == 503
    assert len(device_rows(app, alice)) == 1
    assert "tfa_disabled" not in kinds(app, alice)


@pytest.mark.parametrize("change", ["remove", "disable", "add"])
def test_a_2fa_change_whose_sessions_cannot_be_ended_changes_nothing(actor, app, alice, secret, monkeypatch,
                                                                     change):
    """security.md 35: the change, its records and the end of the other sessions commit together. A code
    reader's review: they were separate transactions, so the database failing between them left a removed
    factor (or a new device) with the person's other sessions still signed in. Now nothing changes, the
    other browser stays as it was, and the person sees the 503 page."""
    import webapp.settings as settings_module

    from .conftest import database_error

    actor.clock.advance(30)
    other = second_session(actor, app, secret=secret)
    actor.clock.advance(30)
    [device] = device_rows(app, alice)
    if change == "add":
        from .test_wizard import Wizard

        wizard = Wizard(actor)
        wizard.start()
        assert wizard.submit_code().status_code == 200
    before = kinds(app, alice)

    def failing(user, keep_token=None):
        raise database_error()

    monkeypatch.setattr(settings_module, "end_user_sessions", failing)
    if change == "add":
        r = wizard.complete("Tablet")
    else:
        r = post(actor, *device_change(actor, device, secret, change))
    assert r.status_code == 503
    assert [d.name for d in device_rows(app, alice)] == ["Phone"]
    after = kinds(app, alice)
    assert after[:len(before)] == before
    assert set(after[len(before):]) <= {"code_accepted"}  # the code was checked (and is used up): nothing else
    assert not signed_out(other.client)


def test_turning_2fa_off_with_a_wrong_code_changes_nothing(actor, app, alice, secret):
    wrong = "123456" if actor.code(secret) != "123456" else "654321"
    r = post(actor, "/settings/2fa/disable", {"off-password": PASSWORD, "off-code": wrong}, htmx=True)
    assert r.status_code == 200 and 'id="off-code-error"' in text(r) and "<html" not in text(r)
    assert len(device_rows(app, alice)) == 1


# ---------------------------------------------------------------- refusals without JavaScript: Post/Redirect/Get

def title(response):
    return re.search(r"<title>(.*?)</title>", text(response)).group(1)


def code_counts(app, user):
    with app.app_context():
        row = User.get_by_id(user.id)
    return row.code_failures, row.code_strikes


def kept_refusal(app, user):
    """The refusal this person's session keeps for the page its redirect leads to, as stored (the server-side
    session row), without the moment it was kept."""
    import json

    with app.app_context():
        kept = ServerSession.select().where(ServerSession.user == user.id).get().load()["refused"]
    assert set(kept) == {"page", "at", "status", "error", "fields", "values"}
    return json.dumps({k: v for k, v in kept.items() if k != "at"})


@pytest.mark.parametrize("change", ["remove", "disable"])
def test_a_wrong_code_without_javascript_is_said_once_after_a_redirect_and_counted_once(actor, app, alice, secret,
                                                                                         change):
    """Remove and Turn off answer a wrong code sent without JavaScript with a 303 to User Settings (Post/Redirect/
    Get), whose page says it once with the form open: Reload then loads that page again instead of sending the
    code once more (each resend was one more failure towards the person's lock, and the browser asked to
    resubmit the form). Nothing changes, and the wrong code counts exactly once."""
    tablet = add_device(app, alice, "Tablet")
    if change == "remove":
        url, data, code_field = (f"/settings/devices/{tablet.id}/remove", {}, f"remove-{tablet.id}-code")
        opened = r'<details open>\s*<summary>Remove<span class="visually-hidden"> Tablet</span>'
    else:
        url, data, code_field = "/settings/2fa/disable", {"off-password": PASSWORD}, "off-code"
        opened = r'<details class="turn-off" open>'
    wrong = "123456" if actor.code(secret) != "123456" else "654321"
    before = kinds(app, alice)
    r = post(actor, url, {**data, code_field: wrong})
    assert r.status_code == 303 and r.headers["Location"] == "/settings"
    assert code_counts(app, alice) == (1, 1)
    assert wrong not in kept_refusal(app, alice) and PASSWORD not in kept_refusal(app, alice)
    page = actor.client.get("/settings")
    body = text(page)
    assert page.status_code == (200 if change == "remove" else 403)  # the refusal's status, as the POST had
    assert "That code is not valid" in body and title(page) == "Error: User Settings · twostep"
    assert len(re.findall(r"<details[^>]* open>", body)) == 1 and re.search(opened, body)
    focused = re.findall(r"<input[^>]*\bautofocus\b[^>]*>", body)
    assert len(focused) == 1 and f'name="{code_field}"' in focused[0] and 'aria-invalid="true"' in focused[0]
    assert f'aria-describedby="{code_field}-error"' in focused[0] and f'value="{wrong}"' not in body
    # Reload: the page as it is, without the refusal, and nothing sent again
    again = actor.client.get("/settings")
    assert again.status_code == 200 and "That code is not valid" not in text(again)
    assert title(again) == "User Settings · twostep" and "<details open>" not in text(again)
    assert 'class="turn-off" open' not in text(again)
    assert code_counts(app, alice) == (1, 1)
    assert [d.name for d in device_rows(app, alice)] == ["Phone", "Tablet"] and ">Active<" in text(again)
    assert kinds(app, alice) == [*before, "code_rejected"]  # one wrong code recorded, and no change
    # With htmx the row comes back at once, refusal and all (200: htmx swaps only 2xx), and nothing is kept
    actor.clock.advance(30)  # past the pause after the wrong code
    r = post(actor, url, {**data, code_field: wrong}, htmx=True)
    assert r.status_code == 200 and "<html" not in text(r) and "That code is not valid" in text(r)
    assert "That code is not valid" not in text(actor.client.get("/settings"))


def test_a_refusal_is_not_shown_on_a_user_settings_page_loaded_a_minute_later(actor, app, alice, secret):
    """The refusal is kept for the redirect that follows it at once: a User Settings page opened more than a
    minute later (the redirect never followed) shows the page as it is."""
    [device] = device_rows(app, alice)
    r = post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": ""})
    assert r.status_code == 303
    actor.clock.advance(61)
    page = actor.client.get("/settings")
    assert page.status_code == 200 and "Give this device a name." not in text(page)
    assert title(page) == "User Settings · twostep"


def test_a_refused_rename_without_javascript_shows_the_name_typed_with_its_error(actor, app, alice):
    """The page a refused rename leads to is the page the POST answered before: the Rename form open, the name
    as typed (to correct it, not to type it again) with the reason, and the refusal's 400. Once."""
    [device] = device_rows(app, alice)
    field = f"rename-{device.id}-name"
    r = post(actor, f"/settings/devices/{device.id}/rename", {field: "Maria's iPh\u043ene"})
    assert r.status_code == 303 and r.headers["Location"] == "/settings"
    page = actor.client.get("/settings")
    body = text(page)
    assert page.status_code == 400 and "A word in this name mixes letters of different alphabets" in body
    assert re.search(r'<details open>\s*<summary>Rename<span class="visually-hidden"> Phone</span>', body)
    tag = re.search(rf'<input [^>]*\bid="{field}"[^>]*>', body).group(0)
    assert 'value="Maria&#39;s iPh\u043ene"' in tag and 'aria-invalid="true"' in tag and "autofocus" in tag
    assert [d.name for d in device_rows(app, alice)] == ["Phone"]
    again = text(actor.client.get("/settings"))
    assert "mixes letters" not in again and "<details open>" not in again
    assert 'value="Phone"' in re.search(rf'<input [^>]*\bid="{field}"[^>]*>', again).group(0)


def test_a_refused_rename_of_a_device_removed_meanwhile_is_not_said_on_the_page(actor, app, alice):
    """A rename refused without JavaScript, its device removed (in another tab) before the page its 303 leads
    to: that page has no form to show the refusal in, so it answers 200 with the ordinary title, not the
    refusal's 400 with "Error:" and no error on it (a review)."""
    [device] = device_rows(app, alice)
    r = post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": "Maria's iPh\u043ene"})
    assert r.status_code == 303
    with app.app_context():
        Device.delete().where(Device.id == device.id).execute()
    page = actor.client.get("/settings")
    body = text(page)
    assert page.status_code == 200 and "<title>User Settings · twostep</title>" in body
    assert "mixes letters" not in body and "<details open>" not in body


def test_removing_the_only_device_with_a_wrong_password_keeps_the_tick_and_nothing_secret(actor, app, alice, secret):
    """Removing the only device with the box ticked but a wrong password: the page the 303 leads to has the box
    still ticked and says what was wrong; the password and the code are kept nowhere. 2FA stays on."""
    [device] = device_rows(app, alice)
    code = actor.code(secret)
    r = post(actor, f"/settings/devices/{device.id}/remove", {
        f"remove-{device.id}-code": code, f"remove-{device.id}-confirm_off": "y",
        f"remove-{device.id}-password": "not my password"})
    assert r.status_code == 303 and r.headers["Location"] == "/settings"
    kept = kept_refusal(app, alice)
    assert "not my password" not in kept and code not in kept
    page = actor.client.get("/settings")
    body = text(page)
    assert page.status_code == 403 and "Incorrect password." in body
    assert re.search(rf'<input [^>]*name="remove-{device.id}-confirm_off"[^>]*>', body).group(0).count("checked") == 1
    assert "not my password" not in body
    assert len(device_rows(app, alice)) == 1 and "tfa_disabled" not in kinds(app, alice)
    assert "Incorrect password." not in text(actor.client.get("/settings"))


def test_the_redirect_after_a_refusal_keeps_security_activity_as_it_was_shown(actor, app, alice, secret):
    """Like the answer to a change (_after_change), the refusal's 303 leads back to the page with Security
    activity as long as it was shown."""
    r = post(actor, "/settings/2fa/disable?activity=more", {"off-password": "not my password",
                                                           "off-code": actor.code(secret)})
    assert r.status_code == 303 and r.headers["Location"] == "/settings?activity=more"
    page = actor.client.get(r.headers["Location"])
    assert page.status_code == 403 and "Incorrect password." in text(page)


def test_a_lock_started_without_javascript_is_still_said_after_the_redirect(actor, app, alice, secret):
    """The fifth wrong code in a row starts the lock: the page the 303 leads to says to wait, with 429, and
    Reload sends no sixth code (the counts stay where the five left them)."""
    tablet = add_device(app, alice, "Tablet")
    url, field = f"/settings/devices/{tablet.id}/remove", f"remove-{tablet.id}-code"
    wrong = "123456" if actor.code(secret) != "123456" else "654321"
    for pause in (0, 1, 2, 4, 8):
        actor.clock.advance(pause)
        assert post(actor, url, {field: wrong}).status_code == 303
    counts = code_counts(app, alice)
    assert counts == (5, 5)
    page = actor.client.get("/settings")
    assert page.status_code == 429
    assert "Too many wrong codes in a row: wait 15 minutes before trying again." in text(page)
    actor.client.get("/settings")
    assert code_counts(app, alice) == counts and len(device_rows(app, alice)) == 2


@pytest.mark.parametrize("url", ["/settings/2fa/disable", "/settings/devices/1/remove", "/settings/devices/1/rename"])
def test_device_changes_refuse_get(actor, alice, url):
    """security.md 32, 33: state changes are POST only."""
    assert actor.client.get(url).status_code == 405


def test_turning_off_without_csrf_token_is_refused(actor, app, alice, secret):
    """security.md 33: a forged POST (no token) gets 400 and nothing changes."""
    r = actor.client.post("/settings/2fa/disable", data={"off-password": PASSWORD, "off-code": actor.code(secret)})
    assert r.status_code == 400
    [device] = device_rows(app, alice)
    r = actor.client.post(f"/settings/devices/{device.id}/remove",
                          data={f"remove-{device.id}-code": actor.code(secret), f"remove-{device.id}-confirm_off": "y",
             f"remove-{device.id}-password": PASSWORD})
    assert r.status_code == 400
    r = actor.client.post(f"/settings/devices/{device.id}/rename", data={f"rename-{device.id}-name": "x"})
    assert r.status_code == 400
    assert [d.name for d in device_rows(app, alice)] == ["Phone"]


# ---------------------------------------------------------------- IDOR, sessions

def test_other_peoples_devices_are_unreachable(actor, app, alice, secret):
    """security.md 34: Bob's device id in Alice's requests is a 404; Bob's device is untouched."""
    bob_secret = pyotp.random_base32()
    bob = actor.user("bob@example.com", devices={"Bob's phone": bob_secret})
    [bob_device] = device_rows(app, bob)
    r = post(actor, f"/settings/devices/{bob_device.id}/rename", {f"rename-{bob_device.id}-name": "pwned"})
    assert r.status_code == 404
    r = post(actor, f"/settings/devices/{bob_device.id}/remove",
             {f"remove-{bob_device.id}-code": actor.code(secret), f"remove-{bob_device.id}-confirm_off": "y"})
    assert r.status_code == 404
    r = post(actor, f"/settings/devices/{bob_device.id}/remove",
             {f"remove-{bob_device.id}-code": actor.code(bob_secret), f"remove-{bob_device.id}-confirm_off": "y"})
    assert r.status_code == 404
    assert [(d.id, d.name, d.secret_enc) for d in device_rows(app, bob)] == [
        (bob_device.id, "Bob's phone", bob_device.secret_enc)]
    assert "Bob" not in text(actor.client.get("/settings"))


def test_turning_off_ignores_a_user_id_field(actor, app, alice, secret):
    """security.md 34: a user_id in the form does not pick whose 2FA is turned off."""
    bob = actor.user("bob@example.com", devices={"Bob's phone": pyotp.random_base32()})
    r = post(actor, "/settings/2fa/disable",
             {"off-password": PASSWORD, "off-code": actor.code(secret), "user_id": str(bob.id)})
    assert r.status_code == 302
    assert device_rows(app, alice) == [] and len(device_rows(app, bob)) == 1


def device_change(actor, device, secret, change):
    """(url, form data) of one complete 2FA change of the only device: rename, remove (with the box, the
    password and a code) or turn off."""
    return {
        "rename": (f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": "Renamed"}),
        "remove": (f"/settings/devices/{device.id}/remove",
                   {f"remove-{device.id}-code": actor.code(secret), f"remove-{device.id}-confirm_off": "y",
                    f"remove-{device.id}-password": PASSWORD}),
        "disable": ("/settings/2fa/disable", {"off-password": PASSWORD, "off-code": actor.code(secret)}),
    }[change]


@pytest.mark.parametrize("change", ["remove", "disable"])
def test_removing_a_factor_ends_other_sessions(actor, app, alice, secret, change):
    """security.md 35: after a removal or turning 2FA off the person's other sessions are gone; this one stays."""
    actor.clock.advance(30)
    other = second_session(actor, app, secret=secret)
    actor.clock.advance(30)
    [device] = device_rows(app, alice)
    assert post(actor, *device_change(actor, device, secret, change)).status_code == 302
    r = other.client.get("/settings")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    # The other browser is told why in words that name what was just done elsewhere (a review: a device
    # removed on the laptop, and the phone's notice listed every reason but that one).
    assert "a change to your authenticator devices" in text(other.client.get(r.headers["Location"]))
    assert signed_out(other.client)
    assert not signed_out(actor.client)
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == alice.id).count() == 1
    assert "sessions_ended" in kinds(app, alice)


@pytest.mark.parametrize("htmx", [False, True])
def test_a_rename_keeps_the_other_sessions(actor, app, alice, secret, htmx):
    """A name changes no factor: the same keys sign in as before, so the person's other browsers stay signed
    in (they were all signed out, without a word in the notice, for a cosmetic change)."""
    actor.clock.advance(30)
    other = second_session(actor, app, secret=secret)
    [device] = device_rows(app, alice)
    r = post(actor, *device_change(actor, device, secret, "rename"), htmx=htmx)
    page = text(r) if htmx else text(actor.client.get(r.headers["Location"]))
    assert "Renamed “Phone” to “Renamed”." in page
    assert not signed_out(other.client)
    assert "device_renamed" in kinds(app, alice) and "sessions_ended" not in kinds(app, alice)


@pytest.mark.parametrize("change", ["remove", "disable"])
def test_with_htmx_a_device_change_also_refreshes_the_list_of_sessions(actor, app, alice, secret, change):
    """The sessions a change ended (security.md 35) leave the list on the page at once: the row comes back
    with the list out of band, without them (their "Sign out" buttons would lead nowhere)."""
    actor.clock.advance(30)
    second_session(actor, app, secret=secret)
    actor.clock.advance(30)
    assert text(actor.client.get("/settings")).count('<li class="device session">') == 2
    [device] = device_rows(app, alice)
    body = text(post(actor, *device_change(actor, device, secret, change), htmx=True))
    assert body.lstrip().startswith('<div class="setting-row" id="tfa-row"')
    oob = body.split('id="sessions" hx-swap-oob="true"', 1)
    assert len(oob) == 2, "the sessions list is not in the answer"
    assert oob[1].count('<li class="device session">') == 1 and "This browser</span>" in oob[1]
    assert "/settings/sessions/" not in oob[1]  # no button for an ended session


def test_with_htmx_a_device_change_also_refreshes_the_security_activity(actor, app, alice):
    """The Security activity list below the row tells people to check it for what they do not recognise:
    after a change it comes with the row, out of band, already listing that change."""
    [device] = device_rows(app, alice)
    assert "Authenticator device renamed" not in text(actor.client.get("/settings"))
    body = text(post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": "Old phone"},
                     htmx=True))
    oob = body.split('id="security-activity" hx-swap-oob="true"', 1)
    assert len(oob) == 2 and "Authenticator device renamed" in oob[1]


def test_a_rename_that_ends_no_session_sends_no_sessions_list(actor, app, alice):
    [device] = device_rows(app, alice)
    body = text(post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": "Renamed"},
                     htmx=True))
    assert 'id="tfa-row"' in body and 'id="sessions"' not in body


@pytest.mark.parametrize("htmx", [False, True])
def test_a_refused_rename_focuses_the_name_field(actor, app, alice, htmx):
    """The refused form is the page again (or the row, with htmx): the field to fix carries the page's only
    autofocus, so the browser (or htmx, after the swap) puts the focus there, inside the opened Rename."""
    import re

    [device] = device_rows(app, alice)
    url, data = f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": ""}
    r = post(actor, url, data, htmx=True) if htmx else refused(actor, url, data)
    focused = re.findall(r"<input[^>]*\bautofocus\b[^>]*>", text(r))
    assert len(focused) == 1 and f'name="rename-{device.id}-name"' in focused[0]
    assert 'aria-invalid="true"' in focused[0]


def test_removing_the_only_device_says_everything_missing_at_once(actor, app, alice):
    """No box ticked, no password, no code: all three are named in one answer (it took three tries, one
    message each), and nothing changes."""
    [device] = device_rows(app, alice)
    r = refused(actor, f"/settings/devices/{device.id}/remove", {})
    body = text(r)
    assert r.status_code == 400
    assert "Tick the box to confirm" in body and "Enter your password" in body and "Enter a current code" in body
    assert len(device_rows(app, alice)) == 1


def test_an_unticked_confirmation_box_gets_the_focus_without_javascript(actor, app, alice, secret):
    """Removing the only device without ticking "turn 2FA off": the box is the field to fix, and the page's
    only autofocus (the box is rendered by `control`, not `field`)."""
    import re

    [device] = device_rows(app, alice)
    r = refused(actor, f"/settings/devices/{device.id}/remove",
                {f"remove-{device.id}-code": actor.code(secret), f"remove-{device.id}-password": PASSWORD})
    focused = re.findall(r"<input[^>]*\bautofocus\b[^>]*>", text(r))
    assert r.status_code == 400 and len(focused) == 1
    assert f'name="remove-{device.id}-confirm_off"' in focused[0] and 'type="checkbox"' in focused[0]


@pytest.mark.parametrize("htmx", [False, True])
def test_renaming_a_device_to_its_own_name_changes_nothing(actor, app, alice, secret, htmx):
    """Saving the name a device already has was a change: a device_renamed record and "Renamed “Phone” to
    “Phone”"."""
    actor.clock.advance(30)
    other = second_session(actor, app, secret=secret)
    [device] = device_rows(app, alice)
    r = post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": "  Phone "}, htmx=htmx)
    page = text(r) if htmx else text(actor.client.get(r.headers["Location"]))
    assert "“Phone” already has this name. Nothing was changed." in page
    assert "device_renamed" not in kinds(app, alice) and "sessions_ended" not in kinds(app, alice)
    assert not signed_out(other.client)


def test_a_device_removed_while_it_is_renamed_is_not_reported_renamed(actor, app, alice, monkeypatch):
    """The device goes between the rename's first read and its UPDATE (another tab removed it): the answer
    says it is gone; no device_renamed record and nobody signed out for a rename that did not happen."""
    from webapp import settings as settings_module

    tablet = add_device(app, alice, "Tablet")
    token = actor.csrf("/settings")  # the page is read before the other tab's removal
    original = settings_module._devices

    def devices_then_removed(user):
        rows = original(user)
        Device.delete().where(Device.id == tablet.id).execute()  # the other tab's removal lands here
        return rows

    monkeypatch.setattr(settings_module, "_devices", devices_then_removed)
    r = actor.client.post(f"/settings/devices/{tablet.id}/rename",
                          data={"csrf_token": token, f"rename-{tablet.id}-name": "iPad"})
    assert r.status_code == 404 and "That device is no longer on your account" in text(r)
    assert "device_renamed" not in kinds(app, alice)
    assert [d.name for d in device_rows(app, alice)] == ["Phone"]


def test_turning_off_again_without_javascript_says_it_is_already_off(actor, app, alice, secret):
    token = actor.csrf("/settings")
    with app.app_context():
        Device.delete().where(Device.user == alice.id).execute()
    r = actor.client.post("/settings/2fa/disable",
                          data={"csrf_token": token, "off-password": PASSWORD, "off-code": actor.code(secret)})
    assert r.status_code == 302
    page = text(actor.client.get(r.headers["Location"]))
    assert "Two-factor authentication is already off." in page and "tfa_disabled" not in kinds(app, alice)


def test_changes_are_audited_without_codes(actor, app, alice, secret):
    """security.md 43: device changes are audit events that hold neither code nor secret."""
    [device] = device_rows(app, alice)
    code = actor.code(secret)
    post(actor, f"/settings/devices/{device.id}/rename", {f"rename-{device.id}-name": "Renamed"})
    post(actor, "/settings/2fa/disable", {"off-password": PASSWORD, "off-code": code})
    with app.app_context():
        events = list(AuditEvent.select().where(AuditEvent.user == alice.id))
    assert {"device_renamed", "tfa_disabled"} <= {e.kind for e in events}
    details = {e.kind: e.details for e in events}
    assert details["device_renamed"] == {"device": "Renamed", "old_name": "Phone", "device_id": device.id}
    assert details["tfa_disabled"] == {"via": "settings", "devices": ["Renamed"], "device_ids": [device.id]}
    for e in events:
        assert code not in e.detail and secret not in e.detail and PASSWORD not in e.detail


def test_a_removed_devices_number_is_never_given_to_a_new_device(actor, app, alice, secret):
    """security.md 43: the records name devices by number as well as by name, so that an incident review tells
    them apart. SQLite gave a new device the highest number left plus one: an intruder who added "temp",
    removed "Backup tablet" with a code from it, removed "temp" and added a device named "Backup tablet" got
    its number back, and the records read like the owner removing and adding back the same device (a security
    review). A number is never given twice now, the highest one removed included."""
    from .test_wizard import Wizard

    backup = add_device(app, alice, "Backup tablet")
    temp = Wizard(actor)
    temp.run("temp")
    [_, _, added] = device_rows(app, alice)
    actor.clock.advance(30)
    r = post(actor, f"/settings/devices/{backup.id}/remove", {f"remove-{backup.id}-code": temp.code_now()})
    assert r.status_code == 302
    actor.clock.advance(30)
    r = post(actor, f"/settings/devices/{added.id}/remove", {f"remove-{added.id}-code": actor.code(secret)})
    assert r.status_code == 302
    actor.clock.advance(30)
    Wizard(actor).run("Backup tablet")
    [phone, again] = device_rows(app, alice)
    assert again.name == "Backup tablet" and again.id > added.id > backup.id > phone.id
    with app.app_context():
        numbers = [(e.kind, e.details.get("device"), e.details.get("device_id")) for e in AuditEvent.select().where(
            (AuditEvent.user == alice.id) & AuditEvent.kind.in_(["device_added", "device_removed"]))
            .order_by(AuditEvent.id)]
    assert numbers == [("device_added", "temp", added.id), ("device_removed", "Backup tablet", backup.id),
                       ("device_removed", "temp", added.id), ("device_added", "Backup tablet", again.id)]
    activity = app.test_cli_runner().invoke(args=["users", "activity", alice.email]).output
    assert (f"Authenticator device removed: \u201cBackup tablet\u201d  [Device: Backup tablet; Device number: "
            f"{backup.id}]") in activity
    assert re.search(f"Another authenticator device added: \u201cBackup tablet\u201d  \\[Browser: [^;]+; "
                     f"Browser new to the account: yes; Device: Backup tablet; Device number: {again.id}\\]", activity)


def test_add_another_device_goes_through_the_same_wizard(actor, alice):
    page = text(actor.client.get("/settings"))
    link = re.search(r'<a href="/settings/2fa"[^>]*>Add another device</a>', page)
    assert link and 'hx-target="#dialog-slot"' in link.group(0)
    r = actor.client.get("/settings/2fa", headers=HX)
    assert "<dialog" in text(r) and "adding another device" in text(r)


def test_frozen_blank_forms_render_exactly_like_fresh_ones(app):
    """fields.freeze keeps the markup of display-only forms, and fields.moved shows one frozen device form
    per device: both must give the markup a fresh form gives (labels, ids, validation attributes, the
    device's name as the value), and a form that is filled in and validated is never frozen, so its errors
    still show."""
    from markupsafe import Markup
    from werkzeug.datastructures import MultiDict

    from webapp.fields import control, field, freeze
    from webapp.settings import DisableForm, RemoveForm, RenameForm

    with app.test_request_context("/"):
        for form_class, prefix, data in ((RenameForm, "rename-7", {"name": 'Phone "A" <b>'}),
                                         (RemoveForm, "remove-7", None), (DisableForm, "off", None)):
            frozen = freeze(form_class(formdata=None, prefix=prefix, data=data))
            fresh = form_class(formdata=None, prefix=prefix, data=data)
            for kept, new in zip(frozen, fresh):
                for _ in range(2):  # the second call comes from the kept markup
                    assert field(kept) == field(new)
                    assert field(kept, hint="A hint") == field(new, hint="A hint")
                    assert control(kept, autofocus=True) == control(new, autofocus=True)
                    assert Markup(kept.label) == Markup(new.label) and kept.label.text == new.label.text
        assert 'value="Phone &#34;A&#34; &lt;b&gt;"' in field(freeze(RenameForm(formdata=None, prefix="rename-7",
                                                                                data={"name": 'Phone "A" <b>'})).name)
        # The device forms are frozen once with placeholders and moved to each device (fields.moved): the
        # markup must be a fresh form's for that device's prefix and name, whatever the name holds.
        from webapp.fields import ITEM, VALUE, moved

        rename = freeze(RenameForm(formdata=None, prefix=f"rename-{ITEM}", data={"name": VALUE}))
        remove = freeze(RemoveForm(formdata=None, prefix=f"remove-{ITEM}"))
        for device_id, name in ((7, 'Phone "A" <b>'), (12345, "rename-7-name & co"), (8, "\u00e9t\u00e9 \U0001f4f1")):
            fresh_rename = RenameForm(formdata=None, prefix=f"rename-{device_id}", data={"name": name})
            fresh_remove = RemoveForm(formdata=None, prefix=f"remove-{device_id}")
            for _ in range(2):
                shown = moved(rename, device_id, name)
                assert field(shown.name) == field(fresh_rename.name)
                assert shown.name.errors == () and shown.name.id == fresh_rename.name.id
                shown = moved(remove, device_id)
                for part in ("password", "code", "confirm_off"):
                    assert field(getattr(shown, part)) == field(getattr(fresh_remove, part))
                    assert control(getattr(shown, part)) == control(getattr(fresh_remove, part))
                    assert Markup(getattr(shown, part).label) == Markup(getattr(fresh_remove, part).label)
        filled = RenameForm(formdata=MultiDict({"rename-7-name": ""}), prefix="rename-7")
        assert not filled.validate()
        assert "has-error" in field(filled.name) and 'aria-invalid="true"' in field(filled.name)


def test_renaming_a_device_removed_in_another_tab_reloads_the_page_with_the_reason(actor, app, alice):
    """htmx shows no 4xx answer, so a rename of a device that is gone (removed in another tab) would seem to
    do nothing: the page reloads instead (HX-Refresh) and says why; nothing changes."""
    tablet = add_device(app, alice, "Tablet")
    token = actor.csrf("/settings")
    with app.app_context():
        Device.delete().where(Device.id == tablet.id).execute()
    r = actor.client.post(f"/settings/devices/{tablet.id}/rename",
                          data={"csrf_token": token, f"rename-{tablet.id}-name": "Old tablet"}, headers=HX)
    assert r.status_code == 404 and r.headers["HX-Refresh"] == "true"
    # The fragment, and a page without htmx, each say that the answer varies on HX-Request (conventions: one
    # predicate decides page or fragment, and every such answer says so, or a cache serves one for the other).
    assert "HX-Request" in r.vary and "<html" not in text(r)
    page = text(actor.client.get("/settings"))
    assert "Not found: That device is no longer on your account" in page and "Old tablet" not in page
    plain = actor.client.get("/settings/no-such-page")
    assert plain.status_code == 404 and "HX-Request" in plain.vary and "<html" in text(plain)
    assert [d.name for d in device_rows(app, alice)] == ["Phone"]


def test_turning_off_from_a_stale_row_with_htmx_answers_with_the_row(actor, app, alice, secret):
    """2FA already turned off in another tab: htmx gets the row as it is now (a redirect would be followed
    and a whole page swapped into the row)."""
    token = actor.csrf("/settings")
    with app.app_context():
        Device.delete().where(Device.user == alice.id).execute()
    r = actor.client.post("/settings/2fa/disable", headers=HX,
                          data={"csrf_token": token, "off-password": "whatever", "off-code": "123456"})
    body = text(r)
    assert r.status_code == 200 and body.lstrip().startswith('<div class="setting-row" id="tfa-row"')
    assert "already off" in body and "<html" not in body and ">Off<" in body


class _CountingSet(frozenset):
    """A frozenset that counts how often it is asked whether it holds a character."""
    lookups = 0

    def __contains__(self, item):
        type(self).lookups += 1
        return frozenset.__contains__(self, item)


def test_the_hidden_character_check_reads_a_long_run_of_selectors_once(monkeypatch):
    """A form field of 64 KB (the contact form's address, a device name) is checked for characters that show
    nothing before its length is refused: walking back over the selectors before each selector made a run of
    21,000 of them cost 13 seconds of a worker's CPU (the request-facing security review). The check looks at
    each character a bounded number of times. Its answer is as before: refused (thousands of marks pile on
    one character)."""
    counting = _CountingSet(fields._SELECTORS)
    monkeypatch.setattr(fields, "_SELECTORS", counting)
    _CountingSet.lookups = 0
    text = "\u2764" + "\ufe0f" * 3000 + " phone"  # after an emoji, each selector is one it may take
    assert fields.has_hidden_characters(text) is True
    assert _CountingSet.lookups <= 4 * len(text)


def test_a_name_that_is_too_long_is_not_also_read_for_hidden_characters(app):
    """After the length refused a field, the check for characters that show nothing does not run on it: one
    message, and no character-by-character work on a 64 KB value."""
    from webapp.settings import DeviceNameForm
    from webapp.support import ContactForm
    hidden = "a" + "\u200b" * 300 + "@example.com"
    with app.test_request_context(method="POST", data={"name": hidden, "email": hidden, "message": "x" * 10}):
        name_form, contact_form = DeviceNameForm(), ContactForm()
        name_form.validate(), contact_form.validate()
        assert name_form.name.errors == ["Use at most 64 characters."]
        assert not any("do not show" in e for e in contact_form.email.errors)
        assert contact_form.email.errors[0] == "That email address is too long (254 characters at most)."


@pytest.mark.parametrize("gap", [60, 0.001])
@pytest.mark.parametrize("action", ["rename", "remove"])
def test_a_stale_device_form_does_not_act_on_a_new_device_that_got_the_old_ones_id(actor, app, alice, secret,
                                                                                  action, gap):
    """security.md 34 (a form acts on the device it was shown for, or on none): SQLite gave a new row the id
    of the last one deleted (until 2026-12-07; the stamp stays a second guard). "Old phone" removed in another
    tab and "New phone" added since, the page still open from before renamed or removed "New phone" (the
    PostgreSQL review: on PostgreSQL it was a 404). The forms' addresses carry when their device was added:
    such a form is refused as one for a device that has gone, and nothing changes. Also when the new device
    came a millisecond later (`gap`): the stamp is to the microsecond."""
    old = add_device(app, alice, "Old phone")
    page = text(actor.client.get("/settings"))
    url = re.search(rf'action="(/settings/devices/{old.id}/{action}\?added=\d+)"', page).group(1)
    with app.app_context():
        Device.delete().where(Device.id == old.id).execute()
    actor.clock.advance(gap)
    with app.app_context():  # what SQLite did: the next device got the id that came free
        Device.create(id=old.id, user=alice.id, name="New phone", secret_enc=old.secret_enc)
    data = {f"rename-{old.id}-name": "Old phone (lost)"} if action == "rename" else {
        f"remove-{old.id}-code": actor.code(secret)}
    r = post(actor, url, data)
    assert r.status_code == 404 and "That device is no longer on your account" in text(r)
    assert [d.name for d in device_rows(app, alice)] == ["Phone", "New phone"]
    assert not {"device_renamed", "device_removed"} & set(kinds(app, alice))
    # The page as it is now acts on "New phone".
    url = re.search(rf'action="(/settings/devices/{old.id}/{action}\?added=\d+)"',
                    text(actor.client.get("/settings"))).group(1)
    r = post(actor, url, data)
    assert r.status_code == 302
    assert [d.name for d in device_rows(app, alice)] == (["Phone", "Old phone (lost)"] if action == "rename"
                                                         else ["Phone"])


@pytest.mark.parametrize("action", ["rename", "remove"])
def test_a_device_replaced_after_its_form_was_checked_is_not_acted_on(actor, app, alice, secret, monkeypatch,
                                                                      action):
    """security.md 34: the device is read again under the person's row, with when it was added. "Old phone"
    removed in another tab and "New phone" added with its id (SQLite, before 2026-12-07) after this form
    passed the check of its address (_own_device), but before the change was made: the form finds its device
    gone, and "New phone" is neither renamed nor removed."""
    from webapp import settings

    old = add_device(app, alice, "Old phone")
    url = re.search(rf'action="(/settings/devices/{old.id}/{action}\?added=\d+)"',
                    text(actor.client.get("/settings"))).group(1)
    checked = settings._own_device

    def checked_then_replaced(device_id):
        device = checked(device_id)
        actor.clock.advance(1)  # what the other tab does meanwhile
        Device.delete().where(Device.id == old.id).execute()
        Device.create(id=old.id, user=alice.id, name="New phone", secret_enc=old.secret_enc)
        return device

    data = {f"rename-{old.id}-name": "Old phone (lost)"} if action == "rename" else {
        f"remove-{old.id}-code": actor.code(secret)}
    token = actor.csrf("/settings")
    monkeypatch.setattr(settings, "_own_device", checked_then_replaced)
    r = actor.client.post(url, data={"csrf_token": token, **data})
    assert r.status_code == 404 and "That device is no longer on your account" in text(r)
    assert [d.name for d in device_rows(app, alice)] == ["Phone", "New phone"]
    assert not {"device_renamed", "device_removed"} & set(kinds(app, alice))
