"""The enrolment wizard behind the gear: intro -> QR code -> code -> device name -> Complete Activation.

Driven through the test client like a browser would, with and without htmx; the codes are computed from the
otpauth:// URI parsed out of the response, at the injected clock's time.
"""
import html
import json
import re
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

from webapp.models import AuditEvent, Device, PendingEnrolment, ServerSession, User
from webapp.totp import group_key, step_at

HX = {"HX-Request": "true"}
PASSWORD = "correct horse battery"  # the password conftest's Actor.user() sets
OTPAUTH_RE = re.compile(r'href="(otpauth://[^"]+)"')
SETUP_RE = re.compile(r'<input type="hidden" name="setup" value="([^"]*)">')


def otpauth_of(body):
    """The otpauth:// URI from the manual-entry link."""
    match = OTPAUTH_RE.search(body)
    assert match, "no otpauth link in the response"
    return html.unescape(match.group(1))


def secret_of(body):
    return pyotp.parse_uri(otpauth_of(body)).secret


def text(response):
    return response.get_data(as_text=True)


def setup_of(body):
    """The handle of the pending key a wizard page was made for, which each of its forms carries."""
    handles = set(SETUP_RE.findall(body))
    assert len(handles) == 1, f"the page's forms name {len(handles)} keys"
    return handles.pop()


class Wizard:
    """Walks the wizard as one signed-in browser, either with htmx (fragments) or without (pages)."""

    def __init__(self, actor, htmx=True):
        self.actor, self.client, self.clock = actor, actor.client, actor.clock
        self.headers = dict(HX) if htmx else {}
        self.token = None
        self.secret = None

    def csrf(self):
        if self.token is None:
            self.token = self.actor.csrf("/settings")
        return self.token

    def open(self):
        return self.client.get("/settings/2fa", headers=self.headers)

    def start(self):
        # Without htmx the answer is a redirect to the QR page (post/redirect/get), which a browser follows.
        r = self.client.post("/settings/2fa/start", data={"csrf_token": self.csrf()}, headers=self.headers,
                             follow_redirects=not self.headers)
        if r.status_code == 200 and "otpauth://" in text(r):
            self.secret = secret_of(text(r))
        return r

    def code_step(self):
        return self.client.get("/settings/2fa/code", headers=self.headers)

    def code_now(self, offset_steps=0):
        return pyotp.TOTP(self.secret).at(self.clock.t + 30 * offset_steps)

    def submit_code(self, code=None, setup=None):
        """Send the code step's form; `setup` is the page's pending-key handle (None: a page made without it)."""
        code = self.code_now() if code is None else code
        return self.client.post("/settings/2fa/code",
                                data={"csrf_token": self.csrf(), "code": code, **_setup_field(setup)},
                                headers=self.headers, follow_redirects=not self.headers)

    def complete(self, name="Work phone", setup=None):
        return self.client.post("/settings/2fa/complete",
                                data={"csrf_token": self.csrf(), "name": name, **_setup_field(setup)},
                                headers=self.headers, follow_redirects=not self.headers)

    def get(self, path, setup=None):
        """A GET form of a step (Next on the QR code, Back to the QR code), with its pending-key handle."""
        return self.client.get(path, query_string=_setup_field(setup), headers=self.headers)

    def reauth(self, with_code=False):
        """Re-authenticate (/reauth) with the password, and a code of the key this wizard enrolled when 2FA is
        on (with_code)."""
        data = {"password": PASSWORD, **({"code": self.code_now()} if with_code else {})}
        r = self.actor.post_form("/reauth", data)
        assert r.status_code == 302, text(r)
        return r

    def run(self, name="Work phone"):
        """The whole wizard; returns the final response."""
        assert self.open().status_code == 200
        assert self.start().status_code == 200
        assert self.code_step().status_code == 200
        assert 'data-step="name"' in text(self.submit_code())
        return self.complete(name)


def _setup_field(setup):
    return {} if setup is None else {"setup": setup}


def signed_in(actor, **user_kwargs):
    """An account without 2FA, signed in (fresh) through the real sign-in."""
    user = actor.user(**user_kwargs)
    r = actor.sign_in()
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
    return user


def logout(actor):
    return actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")})


def devices(app, user):
    with app.app_context():
        return list(Device.select().where(Device.user == user.id))


def pendings(app, user):
    with app.app_context():
        return list(PendingEnrolment.select().where(PendingEnrolment.user == user.id))


def audit_kinds(app, user):
    with app.app_context():
        return [e.kind for e in AuditEvent.select().where(AuditEvent.user == user.id).order_by(AuditEvent.id)]


# ---------------------------------------------------------------- the gear and each step, fragment and page

def test_settings_row_offers_the_gear_and_says_off(actor):
    signed_in(actor)
    page = text(actor.client.get("/settings"))
    assert "<h1>User Settings</h1>" in page
    assert "Two-Factor Authentication" in page and ">Off<" in page
    # The brief's "gear button": a button in a GET form, so without JavaScript it opens the wizard's page.
    form = re.search(r'<form method="get" action="/settings/2fa" class="gear-form">\s*(<button[^>]*>)', page)
    gear = form.group(1)
    assert 'type="submit"' in gear and 'class="gear"' in gear
    assert 'title="Two-Factor Authentication settings"' in gear and 'hx-get="/settings/2fa"' in gear
    assert "aria-label" not in gear  # the title names it; both made it say its name twice (name, description)
    assert 'id="dialog-slot"' in page
    # And in words, for whoever does not take a gear for "set up" (a usability review): the same steps, a link
    # without JavaScript. Once 2FA is on, the row offers "Add another device" in its place.
    assert re.search(r'<a href="/settings/2fa" hx-get="/settings/2fa" hx-target="#dialog-slot" hx-swap="innerHTML" '
                     r'data-opens-dialog>Turn on two-factor authentication</a>', page)
    Wizard(actor).run("Phone")
    page = text(actor.client.get("/settings"))
    assert "Turn on two-factor authentication" not in page and ">Add another device</a>" in page


def test_gear_with_htmx_returns_a_dialog_fragment(actor):
    signed_in(actor)
    r = Wizard(actor).open()
    body = text(r)
    assert r.status_code == 200 and "HX-Request" in r.headers["Vary"]
    assert "<html" not in body and body.lstrip().startswith("<dialog")
    assert 'aria-labelledby="tfa-dialog-title"' in body
    assert re.search(r'<h2 id="tfa-dialog-title"[^>]*>Two-Factor Authentication</h2>', body)
    assert 'data-step="intro"' in body and 'hx-target="this" hx-swap="outerHTML"' in body
    assert ">Next</button>" in body and "SMS" in body
    assert "otpauth" not in body  # the first step issues no secret yet
    assert pendings(actor.app, _alice(actor)) == []


def _alice(actor):
    with actor.app.app_context():
        return User.get(User.email == "alice@example.com")


def test_gear_without_javascript_is_a_full_page_with_the_same_step(actor):
    signed_in(actor)
    r = Wizard(actor, htmx=False).open()
    body = text(r)
    assert r.status_code == 200 and "HX-Request" in r.headers["Vary"]
    assert "<html" in body and "<h1" in body and "Two-Factor Authentication" in body
    assert "<dialog" not in body
    assert 'data-step="intro"' in body and 'action="/settings/2fa/start"' in body and 'method="post"' in body


def test_start_shows_the_qr_code_as_fragment(actor):
    signed_in(actor)
    w = Wizard(actor)
    r = w.start()
    body = text(r)
    assert r.status_code == 200 and "HX-Request" in r.headers["Vary"] and "<html" not in body
    assert 'data-step="qr"' in body
    qr = re.search(r'<div class="qr" role="img" aria-label="([^"]*)">(.*?)</div>', body, re.S)
    assert qr and "QR code" in qr.group(1) and qr.group(2).startswith("<svg")
    assert qr.group(1) == "QR code to add alice@example.com to your authenticator app"  # whose account it adds
    assert "<summary>Enter the key manually</summary>" in body
    assert group_key(w.secret) in body  # grouped for reading: "ABCD EFGH ..."
    # On the phone that has the app there is nothing to scan: the link to hand it the key is not folded away.
    # It comes after "Enter the key manually": on a computer the link does nothing, and a keyboard user who
    # cannot scan met it first.
    after_details = body.split("</details>", 1)[1]
    assert re.search(r'<a href="otpauth://totp/[^"]+">Open the key in your authenticator app</a>', after_details)
    assert "otpauth://" not in body.split("</details>", 1)[0].split('aria-label="QR code')[1].split("</svg>", 1)[1]
    assert len(pendings(actor.app, _alice(actor))) == 1
    # How long the key lasts is said before it runs out (it was said only after: "This setup has expired"),
    # and a person setting up on the phone itself is told where their way is, right under the code (above
    # it, the lines pushed the code below a phone's first screen).
    under_the_code = " ".join(body.split("</svg>", 1)[1].split("<details", 1)[0].split())
    assert "Setting up the app on this phone, or cannot scan? The key and a link for the app are below." in under_the_code
    assert "This key can be added for 15 minutes" in under_the_code


def test_start_without_javascript_renders_the_qr_page(actor):
    signed_in(actor)
    w = Wizard(actor, htmx=False)
    r = w.start()
    body = text(r)
    assert r.status_code == 200 and "<html" in body and 'data-step="qr"' in body and "<dialog" not in body
    assert 'action="/settings/2fa/code"' in body and 'method="get"' in body
    assert r.history[0].status_code == 303 and r.request.path == "/settings/2fa/qr"


def test_reloading_the_qr_page_without_javascript_keeps_the_key(actor, app):
    """The page after Next is reached by a redirect: reloading it shows the key already scanned again,
    instead of posting once more for a new key that would make the app's entry useless."""
    user = signed_in(actor)
    w = Wizard(actor, htmx=False)
    shown = w.start()
    scanned = secret_of(text(shown))
    [pending] = pendings(app, user)
    # A reload sends again the request that produced the page on screen, form data included.
    last = shown.request
    reload = actor.client.open(last.path, method=last.method, data={"csrf_token": w.csrf()})
    assert reload.status_code == 200 and secret_of(text(reload)) == scanned
    assert [p.id for p in pendings(app, user)] == [pending.id]


def test_reloading_the_qr_page_after_a_start_over_in_another_tab_says_so(actor, app):
    """Without JavaScript the QR page's address names its key: reloaded after Start over in another tab, it says
    the setup was restarted, instead of showing the new key as if it were the one scanned from that page."""
    signed_in(actor)
    tab1 = Wizard(actor, htmx=False)
    shown = tab1.start()
    assert shown.request.args["setup"] == setup_of(text(shown))
    _start_over_in_a_second_tab(actor, tab1)
    _says_restarted(actor.client.get(shown.request.full_path), htmx=False)


@pytest.mark.parametrize("htmx", [True, False])
def test_submitting_the_last_steps_again_after_activation_says_it_is_active(actor, app, htmx):
    """A second click on Complete Activation, or the browser sending the code or the name again, must not
    tell the person that nothing changed and to delete the app's entry: the device is active and works."""
    user = signed_in(actor)
    w = Wizard(actor, htmx=htmx)
    first = text(w.run("Phone"))
    assert 'data-step="done"' in first
    for again in (w.complete("Phone"), w.submit_code(), w.code_step()):
        body = text(again)
        assert again.status_code == 200 and 'data-step="done"' in body and "“<bdi>Phone</bdi>” is set up" in body
        assert "Nothing was changed" not in body and "remove the old entry" not in body
    assert [d.name for d in devices(app, user)] == ["Phone"]
    if not htmx:
        assert actor.client.get("/settings/2fa/done").status_code == 200  # reloading the done page


def test_after_activation_a_new_setup_or_time_brings_back_the_expired_step(actor, app):
    """The "done" answer is only for the setup just finished: after Start again, or once the key's lifetime
    has passed, a step without a pending key is the expired one again, and the done page leads to settings."""
    signed_in(actor)
    w = Wizard(actor)
    w.run("Phone")
    actor.clock.advance(16 * 60)
    w.reauth(with_code=True)  # past the freshness window too: every wizard step asks for a fresh sign-in first
    assert 'data-step="expired"' in text(w.complete("Phone"))
    assert actor.client.get("/settings/2fa/done").headers["Location"] == "/settings"


def test_the_done_page_lasts_as_long_as_a_key_and_not_a_moment_longer(actor, app):
    """Reloading the done page shows it for PENDING_ENROLMENT_TTL after the activation, to the second."""
    signed_in(actor)
    Wizard(actor, htmx=False).run("Phone")
    actor.clock.advance(15 * 60)
    assert 'data-step="done"' in text(actor.client.get("/settings/2fa/done"))
    actor.clock.advance(1)
    assert actor.client.get("/settings/2fa/done").headers["Location"] == "/settings"


def test_a_setup_started_after_an_activation_is_not_answered_as_that_activation(actor, app):
    """After Start for another device, that setup's steps answer for the new key: once five wrong codes have
    thrown it away, a code sent again is told the setup expired, not that the earlier device "is set up"."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.run("Phone")
    w.start()
    wrong = "123456" if w.code_now() != "123456" else "654321"
    for _ in range(5):
        w.submit_code(wrong)
    body = text(w.submit_code())
    assert 'data-step="expired"' in body and "is set up" not in body
    assert [d.name for d in devices(app, user)] == ["Phone"]


@pytest.mark.parametrize("htmx", [True, False])
def test_code_step_has_one_verification_code_field(actor, htmx):
    signed_in(actor)
    w = Wizard(actor, htmx=htmx)
    w.start()
    r = w.code_step()
    body = text(r)
    assert r.status_code == 200 and ("<html" in body) is (not htmx) and "HX-Request" in r.headers["Vary"]
    assert '<label for="code">Verification code</label>' in body
    field = re.search(r'<input[^>]*name="code"[^>]*>', body).group(0)
    assert 'autocomplete="one-time-code"' in field and 'inputmode="numeric"' in field


def test_provisioning_uri_follows_the_key_uri_format(actor, app):
    """security.md 6: otpauth://totp/Issuer:account?secret=BASE32&issuer=Issuer, and the codes agree."""
    signed_in(actor)
    w = Wizard(actor)
    uri = otpauth_of(text(w.start()))
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    assert unquote(parts.path.lstrip("/")) == f"{app.config['TOTP_ISSUER']}:alice@example.com"
    assert re.fullmatch(r"[A-Z2-7]+", query["secret"][0]) and "=" not in query["secret"][0]
    assert query["issuer"] == [app.config["TOTP_ISSUER"]]
    assert pyotp.parse_uri(uri).at(actor.clock.t) == w.code_now()


def test_qr_code_is_inline_and_references_no_other_origin(actor):
    """security.md 11: the QR is inline SVG; nothing in the step loads from elsewhere or puts the secret in a URL."""
    signed_in(actor)
    w = Wizard(actor, htmx=False)
    r = w.start()
    body = text(r)
    svg = re.search(r'<div class="qr"[^>]*>(.*?)</div>', body, re.S).group(1)
    assert "http" not in svg and "href" not in svg and "<image" not in svg
    for attr, url in re.findall(r'\b(src|href|action)="([^"]*)"', body):
        assert url.startswith("/") or url.startswith("#") or url.startswith("otpauth://"), (attr, url)
        if not url.startswith("otpauth://"):
            assert w.secret not in url and "otpauth" not in url
    assert "img-src 'self' data:" in r.headers["Content-Security-Policy"]


def test_wizard_responses_are_not_stored_and_send_no_referrer(actor):
    """security.md 12: every step (GET and POST) carries no-store, no-referrer and a framing policy."""
    signed_in(actor)
    w = Wizard(actor)
    responses = [w.open(), w.start(), actor.client.get("/settings/2fa/qr", headers=HX), w.code_step(),
                 w.submit_code("000000" if w.code_now() != "000000" else "111111"), w.submit_code(),
                 w.complete()]
    for r in responses:
        assert r.status_code == 200
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


# ---------------------------------------------------------------- the whole wizard

def test_whole_wizard_with_htmx_activates_2fa(actor, app):
    """security.md 8: only Complete Activation creates the device; the row turns Active out of band."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.open()
    w.start()
    w.code_step()
    r = w.submit_code()
    assert 'data-step="name"' in text(r) and '<label for="name">Device name</label>' in text(r)
    assert devices(app, user) == []  # a correct code alone does not turn 2FA on
    accepted_step = step_at(actor.clock.t)
    r = w.complete("  Philipp's iPhone  ")
    body = text(r)
    assert r.status_code == 200 and 'data-step="done"' in body
    oob = re.search(r'<div class="setting-row" id="tfa-row" hx-swap-oob="true">(.*)', body, re.S)
    assert oob and ">Active<" in oob.group(1) and "Philipp&#39;s iPhone" in oob.group(1)
    [device] = devices(app, user)
    assert device.name == "Philipp's iPhone"  # trimmed
    assert device.last_step == accepted_step
    assert pendings(app, user) == []
    settings = text(actor.client.get("/settings"))
    assert ">Active<" in settings and "Philipp&#39;s iPhone" in settings


def test_activation_with_htmx_refreshes_the_list_of_sessions_it_ended(actor, app):
    """security.md 35: activation ends the person's other sessions; the done step brings the list of sessions
    behind the dialog up to date out of band, so no "Sign out" button for an ended session is left."""
    from .conftest import Actor

    user = signed_in(actor)
    other = Actor(app, app.test_client(), actor.clock)
    other.client.environ_base["HTTP_USER_AGENT"] = "OtherBrowser/3"
    other.password_step()
    assert "OtherBrowser/3" in text(actor.client.get("/settings"))
    body = text(Wizard(actor).run())
    assert 'data-step="done"' in body
    oob = body.split('id="sessions" hx-swap-oob="true"', 1)
    sessions = oob[1].split("</section>", 1)[0] if len(oob) == 2 else ""  # the list, not the activity after it
    assert "OtherBrowser/3" not in sessions and "This browser</span>" in sessions
    assert other.client.get("/settings").status_code == 302  # it really ended
    assert len(devices(app, user)) == 1


def test_activation_that_ended_no_session_sends_no_sessions_list(actor):
    signed_in(actor)
    body = text(Wizard(actor).run())
    assert 'data-step="done"' in body and 'id="sessions"' not in body


def test_whole_wizard_without_javascript(actor, app):
    user = signed_in(actor)
    w = Wizard(actor, htmx=False)
    r = w.run("Tablet")
    body = text(r)
    assert r.status_code == 200 and "<html" in body and 'data-step="done"' in body
    assert r.history[0].status_code == 303 and r.request.path == "/settings/2fa/done"  # not a 307 that re-posts
    assert "hx-swap-oob" not in body  # a full page needs no out-of-band swap
    assert [d.name for d in devices(app, user)] == ["Tablet"]
    assert ">Active<" in text(actor.client.get("/settings"))


def test_without_javascript_each_step_page_names_its_step_in_the_title(actor, app):
    """Screen readers read the page title first: each wizard page says which step it is."""
    signed_in(actor)
    w = Wizard(actor, htmx=False)

    def title(r):
        return re.search(r"<title>(.*?)</title>", text(r)).group(1)

    assert title(w.open()) == "Step 1 of 4: Get an authenticator app · Two-Factor Authentication · twostep"
    assert title(w.start()).startswith("Step 2 of 4: Scan the QR code · ")
    assert title(w.code_step()).startswith("Step 3 of 4: Enter the code · ")
    assert title(w.submit_code("000000" if w.code_now() != "000000" else "111111")).startswith(
        "Error: Step 3 of 4: Enter the code · ")
    assert title(w.submit_code()).startswith("Step 4 of 4: Name this device · ")
    assert title(w.complete("")).startswith("Error: Step 4 of 4: Name this device · ")
    assert title(w.complete("Phone")).startswith("Two-factor authentication is active · ")


def test_after_activation_sign_in_asks_for_the_code(actor, app):
    signed_in(actor)
    w = Wizard(actor)
    w.run()
    logout(actor)
    actor.clock.advance(60)
    r = actor.password_step()
    assert r.headers["Location"].endswith("/login/verify")
    r = actor.code_step(w.code_now())
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")


def test_enrolment_code_cannot_be_replayed_at_next_sign_in(actor):
    """security.md 16: the step used to confirm enrolment counts as used."""
    signed_in(actor)
    w = Wizard(actor)
    w.run()
    enrol_code = w.code_now()
    logout(actor)
    actor.password_step()
    r = actor.code_refused(enrol_code)
    assert r.status_code == 200 and "That code is not valid" in text(r)
    actor.clock.advance(30)
    r = actor.code_step(w.code_now())
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")


def test_an_older_code_after_a_newer_one_does_not_lower_the_replay_mark(actor, app):
    """security.md 16: entering the T code, then the T-1 code, still marks step T as used."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    w.submit_code(w.code_now())
    assert 'data-step="name"' in text(w.submit_code(w.code_now(offset_steps=-1)))
    w.complete()
    [device] = devices(app, user)
    assert device.last_step == step_at(actor.clock.t)
    logout(actor)
    actor.password_step()
    assert "That code is not valid" in text(actor.code_refused(w.code_now()))


def test_wrong_code_keeps_the_same_secret_and_ties_the_error_to_the_field(actor, app):
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    first_secret = w.secret
    wrong = "123456" if w.code_now() != "123456" else "654321"
    r = w.submit_code(wrong)
    body = text(r)
    assert r.status_code == 200 and 'data-step="code"' in body
    field = re.search(r'<input[^>]*name="code"[^>]*>', body).group(0)
    assert 'aria-describedby="code-error"' in field and 'aria-invalid="true"' in field
    assert re.search(r'<p class="error" id="code-error">That code does not match', body)
    assert secret_of(text(actor.client.get("/settings/2fa/qr", headers=HX))) == first_secret
    assert len(pendings(app, user)) == 1 and devices(app, user) == []
    assert 'data-step="name"' in text(w.submit_code())


@pytest.mark.parametrize("raw", ["12345", "+12345", "12_456", "１２３４５６", "1234567", "abcdef", ""])
def test_malformed_codes_are_refused_clearly(actor, app, raw):
    """security.md 5: only six ASCII digits; a clear message, no 500, nothing written."""
    user = signed_in(actor)
    w = Wizard(actor, htmx=False)
    w.start()
    r = w.submit_code(raw)
    assert r.status_code == 400
    assert 'id="code-error"' in text(r) and 'data-step="code"' in text(r)
    assert devices(app, user) == []
    with app.app_context():
        assert PendingEnrolment.get(PendingEnrolment.user == user.id).verified_step is None


def test_malformed_code_with_htmx_comes_back_200_so_it_is_swapped(actor):
    signed_in(actor)
    w = Wizard(actor)
    w.start()
    r = w.submit_code("12 34")
    assert r.status_code == 200 and "6-digit code" in text(r) and 'id="code-error"' in text(r)


def test_code_with_spaces_is_accepted(actor):
    signed_in(actor)
    w = Wizard(actor)
    w.start()
    code = w.code_now()
    assert 'data-step="name"' in text(w.submit_code(f"{code[:3]} {code[3:]}"))


def test_wrong_codes_during_enrolment_are_throttled(actor, app):
    """security.md 18: five wrong codes discard the pending secret; its correct code no longer works."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    old_secret = w.secret
    wrong = "123456" if w.code_now() != "123456" else "654321"
    for _ in range(4):
        assert 'data-step="code"' in text(w.submit_code(wrong))
    r = w.submit_code(wrong)
    assert 'data-step="expired"' in text(r) and "Too many wrong codes" in text(r)
    assert pendings(app, user) == []
    r = w.submit_code()  # the right code for the discarded secret
    assert 'data-step="expired"' in text(r) and devices(app, user) == []
    w.start()
    assert w.secret != old_secret
    assert "tfa_enrolment_discarded" in audit_kinds(app, user)


def test_a_wrong_code_sent_with_the_one_that_discards_the_key_gets_the_same_answer(actor, app, monkeypatch):
    """Two wrong codes sent at once after four: the other one discards the key while this one is checked.
    This one then finds no key to count against and says so (the expired step), instead of a 500."""
    from webapp import totp

    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    wrong = "123456" if w.code_now() != "123456" else "654321"
    for _ in range(4):
        w.submit_code(wrong)
    real_match = totp.match_step

    def match_while_the_other_code_discards_the_key(*args, **kwargs):
        with app.app_context():
            PendingEnrolment.delete().where(PendingEnrolment.user == user.id).execute()
        return real_match(*args, **kwargs)

    monkeypatch.setattr(totp, "match_step", match_while_the_other_code_discards_the_key)
    r = w.submit_code(wrong)
    assert r.status_code == 200
    assert 'data-step="expired"' in text(r) and "Too many wrong codes" in text(r)
    assert pendings(app, user) == [] and devices(app, user) == []
    assert "tfa_enrolment_discarded" not in audit_kinds(app, user)  # the other request's to write


def test_pending_secret_expires_after_its_ttl(actor, app):
    """security.md 8: past PENDING_ENROLMENT_TTL (15 min) the secret cannot be confirmed."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    actor.clock.advance(16 * 60)
    w.reauth()  # past the freshness window too: every wizard step asks for a fresh sign-in first
    r = w.submit_code()
    assert r.status_code == 200 and 'data-step="expired"' in text(r) and "expired" in text(r)
    assert pendings(app, user) == [] and devices(app, user) == []
    assert 'data-step="expired"' in text(w.complete())
    assert "tfa_enrolment_expired" in audit_kinds(app, user)  # security.md 43


def test_a_pending_secret_works_to_the_end_of_its_ttl(actor, app):
    """security.md 8: the key lasts PENDING_ENROLMENT_TTL (15 min) to the second, as the QR step says; it is
    gone only after that (the test above)."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    actor.clock.advance(15 * 60)
    w.reauth()
    assert 'data-step="name"' in text(w.submit_code())
    assert 'data-step="done"' in text(w.complete("Phone"))
    assert [d.name for d in devices(app, user)] == ["Phone"]
    assert "tfa_enrolment_expired" not in audit_kinds(app, user)


def test_a_pending_secret_and_a_fresh_sign_in_do_not_outlast_a_clock_set_back(actor, app):
    """security.md 8, 9: with the server's clock set back 20 minutes (an NTP step, a VM resumed), a sign-in
    more than the 10-minute freshness window "ahead" is not fresh, and a key more than its 15 minutes ahead has
    expired: both lasted as much longer as the clock went back."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    actor.clock.advance(-20 * 60)
    r = w.code_step()
    assert r.status_code == 401 and "/reauth" in r.headers["HX-Redirect"]
    w.reauth()
    r = w.submit_code()
    assert r.status_code == 200 and 'data-step="expired"' in text(r)
    assert pendings(app, user) == [] and devices(app, user) == []


def test_complete_activation_without_a_verified_code_is_refused(actor, app):
    """security.md 8: naming the device is not enough, a code from the new secret must come first."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    r = w.complete("Phone")
    assert 'data-step="code"' in text(r)
    assert devices(app, user) == []


def test_abandoned_wizard_leaves_sign_in_unchanged(actor, app):
    """security.md 8: a started, unconfirmed enrolment changes nothing: password-only sign-in still works."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    w.submit_code()  # even with a correct code, but without Complete Activation
    logout(actor)
    r = actor.password_step()
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
    assert devices(app, user) == []


def test_restarting_the_wizard_replaces_the_pending_secret(actor, app):
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    old = Wizard(actor)
    old.secret, old.token = w.secret, w.token
    w.start()
    assert w.secret != old.secret and len(pendings(app, user)) == 1
    code = old.code_now()
    if code != w.code_now():
        assert 'data-step="code"' in text(w.submit_code(code))


# ---------------------------------------------------------------- one session, the wizard open in two tabs

RESTARTED = "This setup was restarted in another tab or window, with a new key."


def _start_over_in_a_second_tab(actor, tab1):
    """Tab 2 of the same browser (same session) opens the gear a little later and presses Start over with a new
    key. Returns tab 2, whose key is now the session's pending key."""
    actor.clock.advance(20)
    tab2 = Wizard(actor, htmx=bool(tab1.headers))
    tab2.token = tab1.token
    intro = text(tab2.open())
    assert ">Start over with a new key</button>" in intro
    assert setup_of(intro)  # Continue with the same key names the key it continues
    tab2.start()
    assert tab2.secret != tab1.secret
    return tab2


def _says_restarted(response, htmx):
    """The answer to a step sent from a page of the replaced key: what happened, and the way on."""
    body = text(response)
    assert response.status_code == (200 if htmx else 409)
    assert 'data-step="restarted"' in body and RESTARTED in body
    assert "The key you scanned here no longer works: delete its entry in your authenticator app" in " ".join(
        body.split())
    assert "does not match" not in body and "Step 3 of 4" not in body and "otpauth://" not in body
    assert re.search(r'<form method="get" action="/settings/2fa/qr"[^>]*>\s*<button type="submit">Continue with '
                     r'the new key</button>', body)
    if not htmx:
        assert "<title>This setup was restarted · Two-Factor Authentication" in body
    return body


def _activates(app, user, tab, setup):
    """The tab's key still goes all the way: its code, a name, Complete Activation, a device with that key."""
    from webapp.totp import decrypt_secret

    assert 'data-step="name"' in text(tab.submit_code(setup=setup))
    assert 'data-step="done"' in text(tab.complete("Phone", setup=setup))
    [device] = devices(app, user)
    with app.app_context():
        assert decrypt_secret(device.secret_enc) == tab.secret


@pytest.mark.parametrize("htmx", [True, False])
def test_a_code_for_a_key_replaced_in_another_tab_is_not_checked_against_the_new_key(actor, app, htmx):
    """Tab 1 shows key K1 (scanned), tab 2 starts over with K2; tab 1's right code for K1 used to read "That code
    does not match" and count against K2, so five of them threw K2 away under tab 2. Now tab 1 is told that
    the setup was restarted and is led to K2: wrong codes count against the key they were typed for only
    (security.md 18), and tab 1 never saw K2."""
    user = signed_in(actor)
    tab1 = Wizard(actor, htmx=htmx)
    tab1.open()
    k1 = setup_of(text(tab1.start()))
    code_page = text(tab1.get("/settings/2fa/code", k1))  # Next on the QR code
    assert 'data-step="code"' in code_page and setup_of(code_page) == k1
    tab2 = _start_over_in_a_second_tab(actor, tab1)
    [pending] = pendings(app, user)
    for _ in range(6):  # more than the five attempts a key has
        _says_restarted(tab1.submit_code(setup=k1), htmx)
    # The QR code's Next and Back to the QR code, pressed in tab 1, say so too: not K2 as if it were K1.
    _says_restarted(tab1.get("/settings/2fa/code", k1), htmx)
    body = _says_restarted(tab1.get("/settings/2fa/qr", k1), htmx)
    [still] = pendings(app, user)
    assert (still.id, still.created_at, still.failures, still.verified_step) == (
        pending.id, pending.created_at, 0, None)
    assert devices(app, user) == [] and "tfa_enrolment_code_rejected" not in audit_kinds(app, user)
    # Continue with the new key: tab 1 shows K2's QR code; K2 still completes, from either tab.
    k2 = setup_of(body)
    assert k2 != k1
    qr = text(tab1.get("/settings/2fa/qr", k2))
    assert 'data-step="qr"' in qr and secret_of(qr) == tab2.secret and setup_of(qr) == k2
    _activates(app, user, tab2, k2)


@pytest.mark.parametrize("htmx", [True, False])
def test_complete_activation_for_a_key_replaced_in_another_tab_activates_nothing(actor, app, htmx):
    """Tab 1 has entered K1's code and is on the name step; tab 2 starts over with K2. Complete Activation in
    tab 1 used to fall back to "Step 3 of 4: Enter the code" without a word. Now it says the setup was
    restarted, and creates no device: only a key whose code was entered becomes one (security.md 8)."""
    user = signed_in(actor)
    tab1 = Wizard(actor, htmx=htmx)
    k1 = setup_of(text(tab1.start()))
    name_page = tab1.submit_code(setup=k1)
    assert 'data-step="name"' in text(name_page) and setup_of(text(name_page)) == k1
    if not htmx:  # the name step's page, reached by a redirect, names its key in its address
        assert name_page.request.args["setup"] == k1
    tab2 = _start_over_in_a_second_tab(actor, tab1)
    k2 = setup_of(text(tab1.get("/settings/2fa/qr")))  # the QR page without a handle: the session's key
    _says_restarted(tab1.complete("Phone", setup=k1), htmx)
    _says_restarted(tab1.get("/settings/2fa/name", k1), htmx)  # reloading the name page without JavaScript
    [pending] = pendings(app, user)
    assert (pending.failures, pending.verified_step) == (0, None) and devices(app, user) == []
    _activates(app, user, tab2, k2)


@pytest.mark.parametrize("garbled", ["", "not-a-handle", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0",
                                     "０１２３４５６７８９ａｂｃｄｅｆ", "<script>", "9" * 2000])
def test_a_garbled_setup_handle_counts_as_none(actor, app, garbled):
    """A handle that cannot be one of ours (cut short, edited, not lower-case hex) is taken as missing, without
    a 500: the step works on the session's key as it did before handles, and its page names that key."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    qr = w.get("/settings/2fa/qr", garbled)
    assert qr.status_code == 200 and secret_of(text(qr)) == w.secret
    current = setup_of(text(qr))
    wrong = "123456" if w.code_now() != "123456" else "654321"
    r = w.submit_code(wrong, setup=garbled)
    assert r.status_code == 200 and "That code does not match" in text(r) and setup_of(text(r)) == current
    [pending] = pendings(app, user)
    assert pending.failures == 1  # a wrong code for the session's key, as always (security.md 18)
    r = w.submit_code(setup=garbled)
    assert 'data-step="name"' in text(r) and setup_of(text(r)) == current
    assert 'data-step="done"' in text(w.complete("Phone", setup=garbled))
    assert len(devices(app, user)) == 1


@pytest.mark.parametrize("htmx", [True, False])
def test_a_page_made_before_handles_gets_the_step_of_the_sessions_key(actor, app, htmx):
    """A wizard page open when handles came carries none: its step works on the session's key as before, so a
    Start over in another tab meanwhile still makes its code a wrong one (counted: security.md 18). The page
    it gets back names that key, so from then on it is a page of that key."""
    user = signed_in(actor)
    tab1 = Wizard(actor, htmx=htmx)
    tab1.start()
    tab2 = _start_over_in_a_second_tab(actor, tab1)
    if tab1.code_now() == tab2.code_now():  # one chance in a million: the two keys show the same code now
        actor.clock.advance(30)
    k2 = setup_of(text(tab2.get("/settings/2fa/qr")))
    r = tab1.submit_code()
    body = text(r)
    assert r.status_code == 200 and 'data-step="code"' in body and "That code does not match" in body
    assert setup_of(body) == k2
    [pending] = pendings(app, user)
    assert (pending.failures, pending.verified_step) == (1, None)
    r = tab1.complete("Phone")  # no code accepted for the session's key: back to the code step, as before
    assert 'data-step="code"' in text(r) and setup_of(text(r)) == k2 and devices(app, user) == []
    _activates(app, user, tab2, None)


def test_pending_secret_belongs_to_its_session_only(actor, app):
    """The pending record is tied to the browser session that saw the QR code."""
    signed_in(actor)
    w = Wizard(actor)
    w.start()
    other_client = app.test_client()
    other = type(actor)(app, other_client, actor.clock)
    other.sign_in()
    w2 = Wizard(other)
    w2.secret = w.secret
    r = w2.submit_code()
    assert 'data-step="expired"' in text(r)
    assert "otpauth" not in text(other_client.get("/settings/2fa/qr", headers=HX))


def test_starting_a_setup_leaves_one_under_way_in_another_browser_alone(actor, app):
    """Start (and Start over) replaces this browser's key only: a setup under way on the person's laptop keeps
    its key, and the entry scanned there still completes."""
    user = signed_in(actor)
    laptop = type(actor)(app, app.test_client(), actor.clock)
    laptop.sign_in()
    on_laptop = Wizard(laptop)
    on_laptop.start()
    Wizard(actor).start()
    assert len(pendings(app, user)) == 2
    assert 'data-step="name"' in text(on_laptop.submit_code())
    assert 'data-step="done"' in text(on_laptop.complete("Laptop"))


def test_secrets_are_encrypted_at_rest(actor, app):
    """security.md 4: neither the pending row nor the device row holds the Base32 secret."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    [pending] = pendings(app, user)
    assert w.secret not in pending.secret_enc
    w.code_step()
    w.submit_code()
    w.complete()
    [device] = devices(app, user)
    assert w.secret not in device.secret_enc


def test_clock_skew_hint_for_a_phone_clock_that_is_off(actor, app):
    """A code from a few steps away is explained (automatic date and time) but never accepted (security.md 14)."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    r = w.submit_code(w.code_now(offset_steps=4))
    body = text(r)
    assert 'data-step="code"' in body and "about 2 minutes ahead" in body and "automatic date and time" in body
    r = w.submit_code(w.code_now(offset_steps=-3))
    assert "about 90 seconds behind" in text(r)
    # two steps back is usually a code typed slowly: that comes first, the clock only if it happens again
    r = w.submit_code(w.code_now(offset_steps=-2))
    assert "That code has already changed. Enter the one your app shows now. If this happens again" in text(r)
    assert "seems to be about" not in text(r)
    with app.app_context():
        assert PendingEnrolment.get(PendingEnrolment.user == user.id).verified_step is None


def test_adjacent_step_is_accepted_without_a_skew_hint(actor):
    """security.md 14: T-1 and T+1 are within the window."""
    signed_in(actor)
    w = Wizard(actor)
    w.start()
    assert 'data-step="name"' in text(w.submit_code(w.code_now(offset_steps=1)))


# ---------------------------------------------------------------- device name

@pytest.mark.parametrize("name, message", [
    ("", "Give this device a name."),
    ("    ", "Give this device a name."),
    ("x" * 65, "at most 64 characters"),
    ("work PHONE", "already have a device with this name"),
    ("tab\x07name", "letters, digits"),
    ("\u200b\u200b", "letters, digits"),  # zero-width spaces only: a name nobody can see
    ("Phone\u202egnp.exe", "letters, digits"),  # a right-to-left override: text that reads backwards
    ("next\u0085line", "letters, digits"),  # a C1 control
    ("\u200d", "letters, digits"),  # only the joiner that emoji use, joining nothing
    # letters and marks that show nothing (a security review): "Work\u034f phone" passes for "Work phone"
    ("Work\u034f phone", "letters, digits"),  # the combining grapheme joiner
    ("Work phone\ufe01", "letters, digits"),  # a variation selector after a Latin letter
    ("Work phone\ufe0f", "letters, digits"),  # even the emoji one: after "e" it only hides
    ("Work\u200dphone", "letters, digits"),  # a joiner inside a Latin word joins nothing
    ("Work\u2065phone", "letters, digits"),  # unassigned, kept for invisible characters: drawn as nothing
    ("Work\u3164phone", "letters, digits"),  # the Hangul filler, a "letter" drawn as nothing
    ("Z" + "\u033f" * 28, "letters, digits"),  # combining marks piled up over the lines around the name
    ("\u0301\u0301", "with letters or digits in it"),  # accents on nothing: no letter, digit or symbol to read
])
def test_device_name_is_validated(actor, app, name, message):
    user = signed_in(actor)
    w = Wizard(actor)
    w.run("Work phone")
    w.start()
    w.clock.advance(30)
    w.submit_code()
    r = w.complete(name)
    body = text(r)
    assert r.status_code == 200 and 'data-step="name"' in body and message in body
    field = re.search(r'<input[^>]*name="name"[^>]*>', body).group(0)
    assert "name-error" in field and 'aria-invalid="true"' in field
    assert [d.name for d in devices(app, user)] == ["Work phone"]
    assert 'data-step="done"' in text(w.complete("x" * 64))  # the pending secret survived the error
    assert len(devices(app, user)) == 2


def test_device_names_that_look_the_same_are_the_same_name(actor, app):
    """"Café" typed with a composed "é" or with "e" + a combining accent is one name (stored composed), so the
    second is refused as a duplicate; an emoji built with the zero-width joiner is a fine name. A phone types
    "Kim’s", a computer "Kim's": in the list they look the same, so the second is refused too (found by a
    usability review: the owner could not tell which of the two to remove)."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.run("Caf\u00e9")
    emoji_name = "Kim\u2019s \U0001F469\u200d\U0001F4BB"
    for name, expected in (("Cafe\u0301", "already have a device with this name"), (emoji_name, None),
                           ("KIM'S \U0001F469\u200d\U0001F4BB", "already have a device with this name")):
        w.start()
        w.clock.advance(30)
        w.submit_code()
        body = text(w.complete(name))
        assert (expected in body) if expected else 'data-step="done"' in body
    assert [d.name for d in devices(app, user)] == ["Caf\u00e9", "Kim\u2019s \U0001F469\u200d\U0001F4BB"]


def test_device_name_error_without_javascript_is_400(actor, app):
    user = signed_in(actor)
    w = Wizard(actor, htmx=False)
    w.start()
    w.submit_code()
    r = w.complete(" ")
    assert r.status_code == 400 and "<html" in text(r) and devices(app, user) == []


# ---------------------------------------------------------------- re-enrolment, freshness, sessions

def test_reenrolment_requires_a_fresh_sign_in(actor, app, secret):
    """security.md 9: with 2FA on and a stale sign-in, the wizard sends you to /reauth first."""
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    r = actor.client.get("/settings/2fa")
    assert r.status_code == 302 and "/reauth" in r.headers["Location"]
    r = actor.client.get("/settings/2fa", headers=HX)
    assert r.status_code == 401 and "/reauth" in r.headers["HX-Redirect"]
    r = actor.client.post("/settings/2fa/start", data={"csrf_token": actor.csrf("/settings")})
    assert r.status_code == 302 and "/reauth" in r.headers["Location"]
    assert pendings(app, user) == []
    # After re-authenticating with password and code, the wizard opens.
    r = actor.post_form("/reauth?next=/settings/2fa", {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings/2fa")
    assert 'data-step="qr"' in text(Wizard(actor).start())


def test_the_gears_dialog_opens_again_after_the_re_authentication_it_asked_for(actor, app, secret):
    """security.md 9: the gear (htmx, into the dialog slot) with a stale sign-in goes to Confirm it's you, and
    from there back to User Settings with the dialog opening as the page loads: not to the wizard's page
    for browsers without JavaScript, which is where it used to land."""
    from urllib.parse import parse_qs, urlsplit

    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(11 * 60)
    r = actor.client.get("/settings/2fa", headers={**HX, "HX-Target": "dialog-slot"})
    assert r.status_code == 401
    reauth = r.headers["HX-Redirect"]
    [back] = parse_qs(urlsplit(reauth).query)["next"]
    assert urlsplit(reauth).path == "/reauth" and back == "/settings?dialog=wizard"
    actor.clock.advance(30)
    r = actor.post_form(reauth, {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"] == back
    page = text(actor.client.get(back))
    assert ('<div id="dialog-slot" hx-get="/settings/2fa" hx-trigger="load" hx-replace-url="/settings"></div>'
            in page)
    assert 'data-step="intro"' in text(actor.client.get("/settings/2fa", headers={**HX, "HX-Target": "dialog-slot"}))
    # Back to Confirm it's you later (a GET, the sign-in still fresh) says it is done, and its way on goes to
    # User Settings without opening the dialog again: after the wizard was done, Back showed its step 1 once
    # more (a history review). Other parts of the address stay.
    r = actor.client.get(reauth)
    assert r.status_code == 200 and '<a href="/settings">Go back to where you were</a>' in text(r)
    r = actor.client.get("/reauth", query_string={"next": "/settings?activity=more&dialog=wizard"})
    assert '<a href="/settings?activity=more">Go back to where you were</a>' in text(r)


@pytest.mark.parametrize("dialog", ["/support", "/settings/2fa", "/settings/2fa/start", "https://evil.example/", "",
                                    "Wizard"])
def test_user_settings_opens_no_other_dialog_than_the_wizard(actor, dialog):
    """`?dialog=` is a link anyone can send: it names the wizard (`wizard`), never an address to fetch."""
    signed_in(actor)
    page = text(actor.client.get("/settings", query_string={"dialog": dialog}))
    assert '<div id="dialog-slot"></div>' in page and "hx-trigger=\"load\"" not in page


def test_abandoned_reenrolment_keeps_the_old_device_working(actor, app, secret):
    """security.md 9: the old secret stays valid until a new one is confirmed."""
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    w = Wizard(actor)
    intro = " ".join(text(w.open()).split())
    assert "adding another device" in intro
    # The gear opened to manage devices or turn 2FA off says where that is (the help-article walkthrough).
    assert ("To rename or remove a device, or to turn two-factor authentication off, press Cancel, then use "
            "Rename, Remove or Turn off two-factor authentication") in intro
    w.start()
    w.submit_code()
    logout(actor)
    actor.clock.advance(30)
    actor.password_step()
    r = actor.code_step(actor.code(secret))
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
    assert [d.name for d in devices(app, user)] == ["Phone"]


def test_adding_a_second_device_keeps_the_first(actor, app, secret):
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(30)
    w = Wizard(actor)
    w.run("Tablet")
    assert sorted(d.name for d in devices(app, user)) == ["Phone", "Tablet"]
    assert "device_added" in audit_kinds(app, user)
    for sec in (secret, w.secret):
        logout(actor)
        actor.clock.advance(30)
        actor.password_step()
        assert actor.code_step(actor.code(sec)).status_code == 302


def test_completing_enrolment_ends_other_sessions(actor, app):
    """security.md 35: a 2FA change signs out every other session of the person, not this one."""
    user = signed_in(actor)
    other = type(actor)(app, app.test_client(), actor.clock)
    other.sign_in()
    assert other.client.get("/settings").status_code == 200
    Wizard(actor).run()
    r = other.client.get("/settings")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert actor.client.get("/settings").status_code == 200
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 1
        [ended] = AuditEvent.select().where((AuditEvent.user == user.id) & (AuditEvent.kind == "sessions_ended"))
        assert ended.details == {"count": 1, "reason": "2fa change"}  # security.md 43


STALE_ENTRIES = "attempts you did not finish will not work: delete those, and keep the one whose code you just entered"


@pytest.mark.parametrize("htmx", [True, False])
def test_a_setup_that_made_more_than_one_key_says_which_app_entry_to_keep(actor, app, htmx):
    """Start over, or a setup begun in another browser (whose key cannot be continued here), may leave an entry
    in the authenticator app that will never work: the done step says so, and only then."""
    signed_in(actor)
    w = Wizard(actor, htmx=htmx)
    w.start()
    actor.clock.advance(30)
    w.start()  # Start over with a new key: the first one may be in the app already
    w.submit_code()
    done = w.complete("Phone")
    page = text(done)
    assert "is set up" in page and STALE_ENTRIES in page
    assert "and those of your other devices" not in page
    # The next device, set up in one go, gets no such note: the earlier keys are behind the last activation.
    actor.clock.advance(30)
    page = text(Wizard(actor, htmx=htmx).run("Tablet"))
    assert "is set up" in page and STALE_ENTRIES not in page
    # Adding one after a Start over: the note must not send the person to delete the first device's entry.
    actor.clock.advance(30)
    w = Wizard(actor, htmx=htmx)
    w.start()
    actor.clock.advance(30)
    w.start()
    w.submit_code()
    page = " ".join(text(w.complete("Laptop")).split())
    assert STALE_ENTRIES + " and those of your other devices." in page
    # The keys counted are those since the last activation, not the first: a fourth device in one go, no note.
    actor.clock.advance(30)
    page = text(Wizard(actor, htmx=htmx).run("Watch"))
    assert "is set up" in page and STALE_ENTRIES not in page


def test_the_first_step_and_the_last_say_only_what_fits_the_moment(actor, app):
    """A first setup says nothing of an old device; once it is complete, the page's messages go (a
    usability walk: "Your account is ready... press the gear" stayed on screen next to "Active")."""
    signed_in(actor)
    page = text(actor.client.get("/settings"))
    assert '<div class="flashes" id="flashes" role="status">' in page  # there, if empty, to be emptied
    first = text(actor.client.get("/settings/2fa", headers={"HX-Request": "true"}))
    assert "Step 1 of 4" in first and "old device" not in first
    done = text(Wizard(actor).run("Phone"))
    assert '<div class="flashes" id="flashes" role="status" hx-swap-oob="true"></div>' in done
    # Adding another device: the device that signs in now is not an "old device that no longer works".
    adding = text(actor.client.get("/settings/2fa", headers={"HX-Request": "true"}))
    assert "adding another device" in adding and "old device" not in adding
    # After the operator's reset-2fa (no support window), the old entry is just as dead: the step says so.
    with app.app_context():
        from webapp.models import Device

        Device.delete().execute()
    first = text(actor.client.get("/settings/2fa", headers={"HX-Request": "true"}))
    assert "Your old device no longer works here." in first


def test_a_key_started_in_another_browser_counts_too(actor, app):
    user = signed_in(actor)
    laptop = type(actor)(app, app.test_client(), actor.clock)
    laptop.sign_in()
    Wizard(laptop).start()  # scanned on the laptop, never finished
    actor.clock.advance(30)
    page = text(Wizard(actor).run("Phone"))
    assert STALE_ENTRIES in page
    assert [d.name for d in devices(app, user)] == ["Phone"]


def test_completing_enrolment_ends_the_support_reset_window(actor, app, clock):
    """security.md 39: enrolling a new device ends support's temporary-disable window."""
    user = actor.user()
    with app.app_context():
        until = datetime.fromtimestamp(clock.t, timezone.utc).replace(tzinfo=None) + timedelta(hours=12)
        User.update(tfa_reset_until=until).where(User.id == user.id).execute()
    actor.sign_in()
    assert 'id="reset-banner"' in text(actor.client.get("/settings"))
    # The first step says the old device is gone: an app restored from a backup still shows its entry, whose
    # codes now fail with a "does not match" that did not say why (a usability walk).
    first = text(actor.client.get("/settings/2fa", headers={"HX-Request": "true"}))
    first = " ".join(re.sub(r"<[^>]+>", "", first).split())
    assert ("Your old device no longer works here. If your authenticator app still has an entry for twostep "
            "(alice@example.com), from a backup perhaps, delete it") in first
    r = Wizard(actor).run()
    assert "Sign-in with your password alone, which support allowed for a while, has ended" in text(r)
    assert '<div id="reset-banner" hx-swap-oob="delete"></div>' in text(r)  # the banner goes at once
    with app.app_context():
        assert User.get_by_id(user.id).tfa_reset_until is None
    assert 'id="reset-banner"' not in text(actor.client.get("/settings"))
    assert "tfa_reset_window_ended" in audit_kinds(app, user)


def test_enrolment_is_audited_without_secrets(actor, app):
    """security.md 43: each step is an audit event; none holds the secret or a code."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.run()
    kinds = audit_kinds(app, user)
    for kind in ("tfa_enrolment_started", "tfa_enrolment_code_accepted", "tfa_enabled"):
        assert kind in kinds
    with app.app_context():
        for event in AuditEvent.select():
            assert w.secret not in event.detail and w.code_now() not in event.detail
            json.loads(event.detail)


def test_enrolment_records_say_whether_a_device_is_added_and_count_the_wrong_codes(actor, app):
    """security.md 43: a setup's records say whether the person had 2FA already (adding a device) and how many
    wrong codes its key has had."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    wrong = "123456" if w.code_now() != "123456" else "654321"
    w.submit_code(wrong)
    w.submit_code(wrong)
    w.submit_code()
    w.complete("Phone")
    actor.clock.advance(30)
    Wizard(actor).run("Tablet")
    with app.app_context():
        events = [(e.kind, e.details) for e in AuditEvent.select().where(
            (AuditEvent.user == user.id)
            & AuditEvent.kind.in_(["tfa_enrolment_started", "tfa_enrolment_code_rejected"])).order_by(AuditEvent.id)]
    assert events == [("tfa_enrolment_started", {"adding": False}), ("tfa_enrolment_code_rejected", {"failures": 1}),
                      ("tfa_enrolment_code_rejected", {"failures": 2}), ("tfa_enrolment_started", {"adding": True})]


# ---------------------------------------------------------------- no secret after activation, CSRF, methods

def _crawl(app, client, device_id):
    """GET every route in the URL map (arguments filled in) and return all bodies and headers."""
    seen = []
    for rule in app.url_map.iter_rules():
        if "GET" not in rule.methods:
            continue
        args = {k: ("app.css" if k == "filename" else device_id) for k in rule.arguments}
        url = rule.build(args)[1] if args else rule.rule
        for headers in ({}, HX):
            r = client.get(url, headers=headers)
            assert r.status_code < 500, url
            seen.append(text(r) + "\n".join(f"{k}: {v}" for k, v in r.headers.items()))
            r.close()  # static files are streamed from disk
    return "\n".join(seen)


def test_no_route_shows_the_secret_after_activation(actor, app):
    """security.md 10: crawl every GET route as the person and as an admin: the secret is gone for good."""
    user = signed_in(actor)
    w = Wizard(actor)
    w.run()
    [device] = devices(app, user)
    forbidden = (w.secret, group_key(w.secret), "otpauth://", w.secret.lower())
    everything = _crawl(app, actor.client, device.id)
    for needle in forbidden:
        assert needle not in everything
    admin_secret = pyotp.random_base32()
    admin = type(actor)(app, app.test_client(), actor.clock)
    admin.user("admin@example.com", admin=True, secret=admin_secret)
    admin.sign_in("admin@example.com", secret=admin_secret)
    everything = _crawl(app, admin.client, device.id)
    for needle in forbidden:
        assert needle not in everything


@pytest.mark.parametrize("url", ["/settings/2fa/start", "/settings/2fa/complete", "/settings/2fa/disable"])
def test_state_changing_wizard_routes_refuse_get(actor, url):
    """security.md 33: no GET for actions that change state."""
    signed_in(actor)
    assert actor.client.get(url).status_code == 405


def test_wizard_posts_without_csrf_token_change_nothing(actor, app):
    """security.md 33: a missing CSRF token gets 400 and writes nothing."""
    user = signed_in(actor)
    r = actor.client.post("/settings/2fa/start", data={})
    assert r.status_code == 400 and pendings(app, user) == []
    w = Wizard(actor)
    w.start()
    code = w.code_now()
    r = actor.client.post("/settings/2fa/code", data={"code": code})
    assert r.status_code == 400
    w.submit_code()
    r = actor.client.post("/settings/2fa/complete", data={"name": "Phone"},
                          headers={"Origin": "https://evil.example"})
    assert r.status_code == 400 and devices(app, user) == []


def test_signed_out_htmx_request_gets_401_with_hx_redirect(client, actor):
    actor.user()
    r = client.get("/settings/2fa", headers=HX)
    assert r.status_code == 401 and "/login" in r.headers["HX-Redirect"]
    r = client.get("/settings/2fa/code")
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_wizard_logs_no_secret_code_or_uri(actor, app, caplog):
    """security.md 43: the whole wizard under DEBUG logging leaves no secret, code or otpauth URI in the logs."""
    import logging

    caplog.set_level(logging.DEBUG)
    signed_in(actor)
    w = Wizard(actor)
    w.open()
    uri = otpauth_of(text(w.start()))
    wrong = "123456" if w.code_now() != "123456" else "654321"
    w.submit_code(wrong)
    code = w.code_now()
    w.submit_code(code)
    w.complete()
    everything = "\n".join(record.getMessage() for record in caplog.records)  # peewee's SQL log included
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("twostep", "werkzeug")))
    assert "tfa_enrolment_started" in ours and "tfa_enabled" in ours
    for needle in (w.secret, group_key(w.secret), uri, PASSWORD):
        assert needle not in everything
    for needle in (code, wrong):  # six digits can occur by chance in SQL timestamps, so only our own logs
        assert needle not in ours


@pytest.mark.parametrize("htmx", [True, False])
def test_cancel_closes_or_leaves_without_changing_anything(actor, app, htmx):
    """Cancel is a plain GET back to User Settings (JavaScript closes the dialog instead): nothing changes."""
    user = signed_in(actor)
    w = Wizard(actor, htmx=htmx)
    for r in (w.open(), w.start(), w.code_step()):
        cancel = re.search(r'<form method="get" action="/settings" class="inline">\s*<button[^>]*>Cancel</button>',
                           text(r))
        assert cancel and "data-close-dialog" in cancel.group(0)
    page = text(actor.client.get("/settings"))
    assert ">Off<" in page and devices(app, user) == []


def test_reauthenticating_gives_a_new_session_id_and_keeps_the_wizard_going(actor, app, secret):
    """Re-authentication is a sign-in of its own: the session gets a new id, so a copy of the old cookie
    stops working (security.md 26's rule, applied to /reauth too). A key shown in the wizard before the
    re-authentication is still the one the wizard confirms afterwards (security.md 8: one pending secret)."""
    from webapp.sessions import token_hash

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    w = Wizard(actor, htmx=False)
    w.start()
    shown = w.secret
    assert shown and len(pendings(app, user)) == 1
    old_cookie = actor.session_cookie()
    actor.clock.advance(11 * 60)  # no longer fresh; the pending key is still valid (15 min)
    r = actor.client.get("/settings/2fa")
    assert r.status_code == 302 and "/reauth" in r.headers["Location"]
    actor.clock.advance(30)
    r = actor.post_form("/reauth?next=/settings/2fa", {"password": PASSWORD, "code": actor.code(secret)})
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings/2fa")
    new_cookie = actor.session_cookie()
    assert new_cookie and new_cookie != old_cookie

    stale = app.test_client()
    stale.set_cookie(app.session_interface.get_cookie_name(app), old_cookie)
    r = stale.get("/settings")
    assert r.status_code == 302 and "/login" in r.headers["Location"]

    [pending] = pendings(app, user)
    assert pending.session_id == token_hash(new_cookie)
    assert w.code_step().status_code == 200
    assert w.secret == shown and 'data-step="name"' in text(w.submit_code())  # a code from the key shown before
    assert w.complete("Tablet").status_code in (200, 302)
    assert [d.name for d in devices(app, user)] == ["Phone", "Tablet"]


@pytest.mark.parametrize("htmx", [True, False])
def test_reopening_the_wizard_offers_to_continue_with_the_same_key(actor, app, htmx):
    """Someone who closes the wizard after scanning and opens it again is offered the key already in their
    app, so they do not end up with a second, useless account in it; starting over is still there."""
    user = signed_in(actor)
    w = Wizard(actor, htmx=htmx)
    w.start()
    scanned = w.secret
    actor.clock.advance(60)
    body = text(w.open())
    assert 'data-step="intro"' in body and "did not finish" in body
    assert re.search(r'<form method="get" action="/settings/2fa/qr"[^>]*>\s*<button type="submit">Continue with the '
                     r'same key</button>', body)
    assert ">Start over with a new key</button>" in body and "otpauth" not in body
    r = actor.client.get("/settings/2fa/qr", headers=w.headers)
    assert 'data-step="qr"' in text(r) and secret_of(text(r)) == scanned
    assert 'data-step="name"' in text(w.submit_code())
    w.complete("Phone")
    with app.app_context():
        from webapp.totp import decrypt_secret

        assert [decrypt_secret(d.secret_enc) for d in Device.select().where(Device.user == user)] == [scanned]



@pytest.mark.parametrize("htmx", [True, False])
def test_reopening_after_the_code_was_accepted_continues_at_the_name(actor, app, htmx):
    """Closed at the name step (the code accepted) and opened again: Continue with the same key used to go back
    to the QR code and ask for a code again. It goes on to naming the device; the page coming back also
    leaves out the paragraphs about getting an app, so on a phone its buttons follow the banner."""
    user = signed_in(actor)
    w = Wizard(actor, htmx=htmx)
    w.start()
    assert 'data-step="name"' in text(w.submit_code())
    body = text(w.open())
    assert "did not finish" in body and "Install one now" not in body
    assert re.search(r'<form method="get" action="/settings/2fa/name"[^>]*>\s*<button type="submit">Continue with '
                     r'the same key</button>', body)
    r = actor.client.get("/settings/2fa/name", headers=w.headers)
    assert 'data-step="name"' in text(r) and "otpauth" not in text(r)
    w.complete("Phone")
    assert [d.name for d in devices(app, user)] == ["Phone"]


def test_the_first_step_offers_no_continue_without_a_live_pending_key(actor, app):
    """No pending key, or one past its TTL: the first step is the plain one, with Next."""
    user = signed_in(actor)
    w = Wizard(actor)
    body = text(w.open())
    assert ">Next</button>" in body and "Continue with the same key" not in body and "did not finish" not in body
    w.start()
    with app.app_context():  # older than PENDING_ENROLMENT_TTL (15 minutes); the sign-in itself stays fresh
        for pending in PendingEnrolment.select():
            PendingEnrolment.update(created_at=pending.created_at - timedelta(minutes=16)).where(
                PendingEnrolment.id == pending.id).execute()
    body = text(w.open())
    assert ">Next</button>" in body and "Continue with the same key" not in body
    assert pendings(app, user) == []


def test_without_javascript_a_right_code_leads_to_a_name_page_that_survives_a_reload(actor, app):
    """A correct code redirects to the name step's own page: reloading it minutes later asks for the name
    again instead of sending the (by then old) code once more, which would count as a wrong code."""
    user = signed_in(actor)
    w = Wizard(actor, htmx=False)
    assert 'data-step="expired"' in text(actor.client.get("/settings/2fa/name"))  # no setup going on
    w.start()
    assert actor.client.get("/settings/2fa/name").headers["Location"] == "/settings/2fa/code"  # no code yet
    r = w.submit_code()
    assert r.history[0].status_code == 303 and r.request.path == "/settings/2fa/name"
    assert 'data-step="name"' in text(r) and "<html" in text(r)
    actor.clock.advance(150)
    again = actor.client.get("/settings/2fa/name")
    assert again.status_code == 200 and 'data-step="name"' in text(again)
    [pending] = pendings(app, user)
    assert pending.failures == 0
    assert 'data-step="done"' in text(w.complete("Phone"))


def test_turning_2fa_off_ends_a_setup_under_way(actor, secret):
    """Turn off removes every device and the key of a setup not yet completed: that key was shown before 2FA
    went off, and turning 2FA off is meant to leave no authenticator of the account working. A later
    Complete Activation finds the setup gone. Found by mutation testing: keeping the key failed no test."""
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    w = Wizard(actor)
    w.open()
    w.start()
    assert 'data-step="name"' in text(w.submit_code())
    assert len(pendings(actor.app, user)) == 1
    actor.clock.advance(30)
    r = actor.client.post("/settings/2fa/disable", data={"csrf_token": w.csrf(), "off-password": PASSWORD,
                                                         "off-code": actor.code(secret)})
    assert r.status_code == 302
    assert pendings(actor.app, user) == []
    # The tab that was adding the device says why its setup ended: it used to say "This setup has expired ...
    # Nothing was changed on your account", just after 2FA had been turned off.
    done = " ".join(text(w.complete("Work phone")).split())
    assert 'data-step="expired"' in done and "This setup has expired" not in done
    assert "Two-factor authentication was turned off on this account (in another tab, for example)" in done
    assert "Nothing was changed on your account" not in done
    with actor.app.app_context():
        assert Device.select().where(Device.user == user.id).count() == 0
    again = text(w.complete("Work phone"))  # said once; after that the setup is simply gone
    assert "This setup has expired" in again


def test_turning_2fa_off_with_no_setup_under_way_leaves_no_note_for_a_later_one(actor, secret):
    """"Two-factor authentication was turned off" answers a wizard only when Turn off ended its setup: after
    Turn off with none under way, a wizard page whose key is long gone says the setup expired."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    actor.clock.advance(30)
    token = actor.csrf("/settings")
    r = actor.client.post("/settings/2fa/disable", data={"csrf_token": token, "off-password": PASSWORD,
                                                         "off-code": actor.code(secret)})
    assert r.status_code == 302
    body = text(actor.client.get("/settings/2fa/code", headers=HX))
    assert "This setup has expired" in body and "was turned off" not in body


def test_a_setup_started_after_turning_2fa_off_expires_as_any_other(actor, secret):
    """"Two-factor authentication was turned off" is the answer for the setup that Turn off ended only: a setup
    started afterwards, left until its key expires, says it expired."""
    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    w = Wizard(actor)
    w.start()
    actor.clock.advance(30)
    actor.client.post("/settings/2fa/disable", data={"csrf_token": w.csrf(), "off-password": PASSWORD,
                                                     "off-code": actor.code(secret)})
    assert devices(actor.app, user) == []
    w.start()  # a first device again, from the same browser
    actor.clock.advance(16 * 60)
    w.reauth()
    body = text(w.submit_code())
    assert 'data-step="expired"' in body and "This setup has expired" in body
    assert "was turned off" not in body


def test_a_start_over_landing_while_a_code_is_checked_does_not_confirm_the_new_key(actor, app, monkeypatch):
    """The code step reads the pending key, checks the code, then marks the key as confirmed. A Start over in
    another tab landing in between replaces the key, and SQLite may give the new row the old one's id: marked
    by id alone, the new key (never shown to this tab, never in the app) counted as confirmed, and Complete
    Activation would have made it a device whose codes nobody has (security.md 8). Now the mark also needs the
    row's moment of creation; the tab is told the setup was restarted and the new key stays unconfirmed."""
    from webapp import totp as totp_module
    from webapp.models import PendingEnrolment
    from webapp.totp import encrypt_secret, new_secret

    user = signed_in(actor)
    tab1 = Wizard(actor, htmx=True)
    k1 = setup_of(text(tab1.start()))
    real_match = totp_module.match_step

    def start_over_meanwhile(secret, code, ts):
        step = real_match(secret, code, ts)
        [old] = PendingEnrolment.select().where(PendingEnrolment.user == user.id)
        old.delete_instance()
        PendingEnrolment.create(id=old.id, user=user.id, session_id=old.session_id, secret_enc=encrypt_secret(
            new_secret()), created_at=old.created_at + timedelta(seconds=20))  # the same id, as SQLite may give
        return step

    monkeypatch.setattr(totp_module, "match_step", start_over_meanwhile)
    r = tab1.submit_code(setup=k1)
    monkeypatch.undo()
    _says_restarted(r, htmx=True)
    [pending] = pendings(app, user)
    assert pending.verified_step is None and "tfa_enrolment_code_accepted" not in audit_kinds(app, user)
    assert devices(app, user) == []



def test_a_wrong_code_meeting_a_start_over_says_restarted_not_too_many(actor, app, monkeypatch):
    """A wrong code sent while a Start over lands in another tab found its key gone when counting the failure,
    took that for "the last attempt was used up" and said "Too many wrong codes" (recording five failures).
    The new key is untouched; the tab is told the setup was restarted."""
    from webapp import totp as totp_module
    from webapp.totp import encrypt_secret, new_secret

    user = signed_in(actor)
    tab1 = Wizard(actor, htmx=True)
    k1 = setup_of(text(tab1.start()))
    real_match = totp_module.match_step

    def start_over_meanwhile(secret, code, ts):
        [old] = PendingEnrolment.select().where(PendingEnrolment.user == user.id)
        old.delete_instance()
        PendingEnrolment.create(id=old.id, user=user.id, session_id=old.session_id, secret_enc=encrypt_secret(
            new_secret()), created_at=old.created_at + timedelta(seconds=20))
        return real_match(secret, code, ts)

    monkeypatch.setattr(totp_module, "match_step", start_over_meanwhile)
    wrong = "000000" if tab1.code_now() != "000000" else "111111"
    r = tab1.submit_code(wrong, setup=k1)
    monkeypatch.undo()
    _says_restarted(r, htmx=True)
    [pending] = pendings(app, user)
    assert pending.failures == 0 and "tfa_enrolment_code_rejected" not in audit_kinds(app, user)


def test_a_start_over_landing_while_activation_waits_for_the_lock_activates_nothing(actor, app, monkeypatch):
    """Complete Activation read the pending key, then waits for the person's row; a Start over in another tab
    landing in between (whose code tab 2 has entered already, and to which SQLite gave the old id) must not
    become a device under tab 1's name: tab 1 never showed that key. Tab 1 is told the setup was restarted
    (security.md 8)."""
    from webapp import settings as settings_module
    from webapp.totp import encrypt_secret, new_secret

    user = signed_in(actor)
    tab1 = Wizard(actor, htmx=True)
    k1 = setup_of(text(tab1.start()))
    tab1.submit_code(setup=k1)
    real_lock = settings_module.User.lock
    landed = []

    def start_over_meanwhile(user_id):
        if not landed:
            [old] = PendingEnrolment.select().where(PendingEnrolment.user == user.id)
            old.delete_instance()
            landed.append(PendingEnrolment.create(
                id=old.id, user=user.id, session_id=old.session_id, secret_enc=encrypt_secret(new_secret()),
                created_at=old.created_at + timedelta(seconds=20), verified_step=old.verified_step))
        return real_lock(user_id)

    monkeypatch.setattr(settings_module.User, "lock", start_over_meanwhile)
    r = tab1.complete("Phone", setup=k1)
    monkeypatch.undo()
    _says_restarted(r, htmx=True)
    assert devices(app, user) == [] and [p.created_at for p in pendings(app, user)] == [landed[0].created_at]


# ---------------------------------------------------------------- found by a race review: decided on what is stored

def test_an_older_code_never_replaces_a_newer_one_accepted_meanwhile(app, actor, monkeypatch):
    """security.md 16: the wizard keeps the newest step it accepted, compared with what is stored when it
    writes. A code of step T checked while another tab's code of T+1 was accepted wrote T over it; the device
    then started from T, and the code of T+1, seen by the wizard already, signed in once more."""
    import webapp.totp as totp
    from webapp.totp import step_at

    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    newer = step_at(actor.clock.t) + 1
    real = totp.match_step

    def meanwhile(secret, code, ts, *args, **kwargs):
        step = real(secret, code, ts, *args, **kwargs)
        # the other tab's code of T+1, accepted and committed while this one was checked
        PendingEnrolment.update(verified_step=newer).where(PendingEnrolment.user == user.id).execute()
        return step

    monkeypatch.setattr(totp, "match_step", meanwhile)
    assert 'data-step="name"' in text(w.submit_code())  # the code of step T
    monkeypatch.setattr(totp, "match_step", real)
    assert 'data-step="done"' in text(w.complete())
    with app.app_context():
        assert Device.get(Device.user == user.id).last_step == newer
    logout(actor)
    actor.password_step()
    replay = actor.code_refused(w.code_now(offset_steps=1))  # the code the other tab entered in the wizard
    assert replay.status_code == 200 and "That code is not valid" in text(replay)
    with app.app_context():
        assert AuditEvent.select().where(AuditEvent.kind == "totp_replay").count() == 1


def test_activation_after_the_last_device_went_meanwhile_is_recorded_as_turning_2fa_on(app, actor, secret,
                                                                                        monkeypatch):
    """security.md 43: whether an activation adds a device or turns 2FA on is read under the person's row. The
    only device removed in another tab while the name was sent (2FA off) made the activation turn 2FA on
    again, recorded as "device added" and shown as "Device added"."""
    from webapp.security import audit

    user = actor.user(secret=secret)
    actor.sign_in(secret=secret)
    w = Wizard(actor)
    w.start()
    assert 'data-step="name"' in text(w.submit_code())
    real = User.lock.__func__
    done = []

    def meanwhile(cls, user_id):
        if not done:  # Remove of the only device, committed in another tab, with its records
            done.append(1)
            Device.delete().where(Device.user == user_id).execute()
            audit("device_removed", user=user_id, device="Phone")
            audit("tfa_disabled", user=user_id, via="last device removed")
        return real(cls, user_id)

    monkeypatch.setattr(User, "lock", classmethod(meanwhile))
    r = w.complete()
    assert 'data-step="done"' in text(r) and "Two-factor authentication is active" in text(r)
    with app.app_context():
        kinds = [e.kind for e in AuditEvent.select().where(AuditEvent.user == user.id).order_by(AuditEvent.id)]
    assert kinds[kinds.index("tfa_disabled"):][:2] == ["tfa_disabled", "tfa_enabled"]
    assert "device_added" not in kinds


def test_an_expired_keys_cleanup_leaves_the_key_a_start_over_made_meanwhile(app, actor, clock, monkeypatch):
    """security.md 8: an expired key is deleted with the moment it was made in the condition (_same_key), so
    a Start over in another tab that got the same id from SQLite keeps its new key; only the expired one is
    recorded as expired."""
    import webapp.settings as settings_module
    from webapp import totp
    from webapp.clock import now

    user = signed_in(actor)
    w = Wizard(actor)
    w.start()
    clock.advance(14 * 60)
    w.reauth()  # fresh again; the key moves to the renewed session row
    clock.advance(2 * 60)  # the key is now past PENDING_ENROLMENT_TTL (15 min)
    real = settings_module._same_key
    made = {}

    def meanwhile(pending):
        if not made:  # Start over in another tab: the session's key replaced (SQLite: the same id), committed
            PendingEnrolment.delete().where(PendingEnrolment.id == pending.id).execute()
            made["new"] = PendingEnrolment.create(id=pending.id, session=pending.session_id, user=pending.user_id,
                                                  secret_enc=totp.encrypt_secret(totp.new_secret()),
                                                  created_at=now())
        return real(pending)

    monkeypatch.setattr(settings_module, "_same_key", meanwhile)
    r = w.get("/settings/2fa/qr")
    assert 'data-step="expired"' in text(r)
    with app.app_context():
        [kept] = PendingEnrolment.select().where(PendingEnrolment.user == user.id)
        assert kept.created_at == made["new"].created_at
        assert AuditEvent.select().where(AuditEvent.kind == "tfa_enrolment_expired").count() == 0


def test_the_fifth_wrong_code_keeps_the_key_if_its_records_cannot_be_written(app, actor, monkeypatch):
    """security.md 43: the fifth wrong code discards the key in the same transaction as the records of that
    code and of the discard. A database error in between left the key gone with no record of why; now nothing
    of the fifth attempt stays, and the person sees the 503 page."""
    from .conftest import failing_audit
    from .test_lock_order import wizard_after_wrong_codes

    user, w, wrong = wizard_after_wrong_codes(actor, 4)
    failing_audit(monkeypatch, "webapp.settings", "tfa_enrolment_code_rejected")
    assert w.submit_code(wrong).status_code == 503
    with app.app_context():
        [pending] = PendingEnrolment.select().where(PendingEnrolment.user == user.id)
        assert pending.failures == 4
        kinds = [e.kind for e in AuditEvent.select().where(AuditEvent.user == user.id)]
    assert kinds.count("tfa_enrolment_code_rejected") == 4 and "tfa_enrolment_discarded" not in kinds
