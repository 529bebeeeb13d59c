"""Cross-cutting checklist items that are not one feature's (security.md 27, 28, 33, 41, 43, 44)."""
import functools
import hashlib
import logging

import pytest
from flask import render_template_string
from markupsafe import Markup, escape

from webapp import escape_output
from webapp.models import ServerSession, SignInChallenge
from webapp.totp import new_secret

from .conftest import PASSWORD, csrf_from


def signed_in(client):
    r = client.get("/settings")
    return r.status_code == 200 and "User Settings" in r.get_data(as_text=True)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost.evil.example",
                                    "http://localhost:8443"])
def test_cross_site_origin_is_refused(actor, origin, caplog):
    """security.md 33: a POST from another origin is refused even with a valid token, and nothing happens.
    The log says what was compared: a proxy that drops the visitor's port or scheme (nginx's `$host`)
    refuses every form, and the operator must be able to see why."""
    actor.user()
    r = actor.post_form("/login", {"email": "alice@example.com", "password": PASSWORD},
                        headers={"Origin": origin})
    assert r.status_code == 403
    assert not signed_in(actor.client)
    [line] = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("origin refused")]
    assert line.startswith(f"origin refused: POST '/login' from Origin {origin!r}; this app sees itself as "
                           "'http://localhost' (")


def test_an_origin_cannot_write_the_operators_diagnosis_into_the_log(actor, caplog):
    """The refused Origin is quoted in the log line, so a made-up one cannot pass for the app's own
    conclusion ("this app sees itself as ..."), and the path is cut short like the Origin."""
    forged = "https://x; this app sees itself as 'https://evil.example' (trust it"
    actor.user()
    token = actor.csrf("/login")
    r = actor.client.post("/login/" + "a" * 5000, data={"csrf_token": token}, headers={"Origin": forged})
    assert r.status_code == 403
    [line] = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("origin refused")]
    assert f"from Origin {forged!r}; this app sees itself as 'http://localhost' (" in line
    assert len(line) < 800


def test_a_remember_cookie_signed_with_the_secret_key_signs_nobody_in(app, actor, secret):
    """security.md 25-27: flask-login accepts a `remember_token` cookie (id|HMAC under SECRET_KEY) as a
    sign-in of its own, with neither password nor code. twostep never issues one and must not accept one:
    a leaked SECRET_KEY would otherwise sign anyone in, silently (no audit record)."""
    from flask_login.utils import encode_cookie

    from webapp.models import AuditEvent, ServerSession

    user = actor.user(secret=secret)
    with app.test_request_context():
        forged = encode_cookie(str(user.id))
    browser = app.test_client()
    browser.set_cookie("remember_token", forged)
    r = browser.get("/settings")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert not signed_in(browser)
    with app.app_context():
        assert ServerSession.select().where(ServerSession.user == user.id).count() == 0
        assert AuditEvent.select().where(AuditEvent.kind == "signin").count() == 0


def test_a_sign_in_form_left_open_for_hours_still_signs_in(actor, secret, monkeypatch):
    """security.md 33: the CSRF token is bound to the session, not to a time of its own (README "Security"): a
    sign-in page opened in the morning and sent in the afternoon signs in, rather than saying "Form expired"
    (Flask-WTF's default was a one-hour token, reckoned by the wall clock)."""
    import time

    actor.user(secret=secret)
    token = actor.csrf("/login")
    later = time.time() + 6 * 3600
    monkeypatch.setattr(time, "time", lambda: later)  # what Flask-WTF's signed token is timed by
    r = actor.client.post("/login", data={"csrf_token": token, "email": "alice@example.com", "password": PASSWORD})
    assert r.status_code == 302 and r.headers["Location"] == "/login/verify"


def test_same_origin_post_is_fine(actor):
    actor.user()
    r = actor.post_form("/login", {"email": "alice@example.com", "password": PASSWORD},
                        headers={"Origin": "http://localhost"})
    assert r.status_code == 302


def test_no_remember_me_cookie_is_ever_issued(actor, secret):
    """security.md 27, 31: there is no remember-me; asking for it sets nothing, before or after 2FA."""
    actor.user(secret=secret)
    r1 = actor.post_form("/login", {"email": "alice@example.com", "password": PASSWORD, "remember": "1"})
    r2 = actor.code_step(actor.code(secret))
    for r in (r1, r2):
        assert "remember_token" not in " ".join(r.headers.getlist("Set-Cookie"))
    assert actor.client.get_cookie("remember_token") is None


def test_losing_the_session_cookie_mid_flow_does_not_authenticate(actor, secret, app):
    """security.md 27: the code step belongs to the session that gave the password, nothing else. Someone who
    knows Alice's current code but not her cookie (here: her own browser, its session cookie deleted after the
    password step) sends the code from a fresh session with a valid CSRF token of its own: it is refused with
    "sign in again", and nobody is signed in. Alice's challenge is left waiting for her own session."""
    actor.user(secret=secret)
    r = actor.password_step()
    assert r.status_code == 302 and r.headers["Location"].endswith("/login/verify")  # mid-flow, not signed in
    actor.client.delete_cookie(app.session_interface.get_cookie_name(app))

    r = actor.code_step(actor.code(secret), form_url="/login")  # the token of the cookie-less browser's new session
    assert r.status_code == 302 and r.headers["Location"].endswith("/login?notice=sign-in-expired")
    page = actor.client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Your sign-in expired. Please enter your email address and password again." in page
    assert not signed_in(actor.client)
    with app.app_context():
        assert SignInChallenge.select().count() == 1
        assert ServerSession.select().where(ServerSession.user.is_null(False)).count() == 0


@pytest.mark.parametrize("headers", [{"X-Forwarded-For": "127.0.0.1"}, {"X-Debug": "1"},
                                     {"X-Real-IP": "127.0.0.1"}, {"X-Original-URL": "/settings"}])
def test_no_header_bypasses_the_second_step(actor, secret, headers):
    """security.md 41: no trusted IPs, debug headers or break-glass paths skip 2FA."""
    actor.user(secret=secret, admin=True)
    actor.password_step()
    for url in ("/settings", "/support"):
        r = actor.client.get(url, headers=headers)
        assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_signup_is_not_a_way_around_2fa(actor, secret):
    """security.md 28: signing up with an enrolled person's email does not sign them in."""
    actor.user(secret=secret)
    r = actor.post_form("/signup", {"email": "alice@example.com", "password": PASSWORD, "confirm": PASSWORD})
    assert "already exists" in r.get_data(as_text=True)
    assert not signed_in(actor.client)


def test_password_only_sign_in_paths_all_check_for_devices(actor, secret, app):
    """security.md 28: first-run is closed once accounts exist; reauth needs a signed-in session."""
    actor.user(secret=secret)
    assert actor.client.get("/setup").status_code == 404
    r = actor.post_form("/reauth", {"password": PASSWORD}, form_url="/login")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert not signed_in(actor.client)


def test_debug_is_off_and_no_debugger_is_reachable(app, client):
    """security.md 44: no Werkzeug debugger or console in the app."""
    assert not app.debug
    assert client.get("/console").status_code == 404


def test_logs_never_contain_codes_secrets_or_passwords(actor, secret, caplog):
    """security.md 43: a whole sign-in at DEBUG; the audit events appear, the secrets never do."""
    caplog.set_level(logging.DEBUG)
    actor.user(secret=secret)
    actor.password_step(password="wrong password")
    actor.clock.advance(1)
    actor.password_step()
    actor.code_step("000000")
    actor.clock.advance(1)
    code = actor.code(secret)
    actor.code_step(code)
    logging.getLogger("twostep").info("debug echo secret=%s code=%s uri=%s", secret, code,
                                      f"otpauth://totp/x?secret={secret}")
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for kind in ("password_rejected", "password_accepted", "code_rejected", "code_accepted", "signin"):
        assert kind in text
    for needle in (secret, code, PASSWORD, "wrong password", "otpauth://totp/x"):
        assert needle not in text, needle


def test_audit_lines_reach_stderr_when_no_logging_is_configured(app, capfd, monkeypatch):
    """With no logging configuration (gunicorn's default), audit events still appear in the error log,
    masked (security.md 42, 43): Python alone drops INFO records that no handler takes."""
    import webapp

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a gunicorn worker: root unconfigured
    monkeypatch.setattr(logging.getLogger("twostep"), "handlers", [])
    webapp._init_logging(app)
    logging.getLogger("twostep.audit").info("audit signin user=7 actor=None code=123456")
    err = capfd.readouterr().err
    assert "twostep.audit: audit signin user=7" in err
    assert "123456" not in err


@pytest.mark.parametrize("line, secret", [
    ("POST /login/verify?code=123456 HTTP/1.1", "123456"),
    ("form: CODE=12 34 56&next=/", "12"),
    ("Password=hunter2hunter2 sent", "hunter2hunter2"),
    ("csrf_token=IjRmZ.abc cookie=abcdef", "IjRmZ.abc"),
    ("request Cookie=s.Zm9vYmFyYmF6 sent", "s.Zm9vYmFyYmF6"),
    ("uri otpauth://totp/twostep:bob?secret=JBSWY3DPEHPK3PXP&issuer=twostep here", "JBSWY3DPEHPK3PXP"),
    ("the key is JBSWY3DPEHPK3PXP, keep it", "JBSWY3DPEHPK3PXP"),
    ("entered 654321 twice", "654321"),
])
def test_log_lines_are_redacted(line, secret):
    """security.md 43: whatever reaches a log line, a code, a key, an otpauth URI or a password field is
    masked; keys are matched in any case (the filter looks for them in the lowered line first)."""
    from webapp.security import RedactingFilter

    record = logging.LogRecord("twostep", logging.INFO, __file__, 1, "%s", (line,), None)
    assert RedactingFilter().filter(record)
    assert secret not in record.getMessage() and "[redacted]" in record.getMessage()


def test_six_digit_account_numbers_in_audit_lines_are_kept_and_codes_beside_them_are_not():
    """security.md 43: the six-digit mask hid every account number from 100000 to 999999 in the audit lines
    ("audit signin user=104857 actor=None") and in Support's addresses (?user=104857): a performance review
    found it. Those stay; a code anywhere else on the line is still masked."""
    from webapp.security import RedactingFilter

    line = "audit code_rejected user=104857 actor=654321 {\"reason\": \"wrong\"} GET /support?user=223344 code 123456 x=987654"
    record = logging.LogRecord("twostep", logging.INFO, __file__, 1, "%s", (line,), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == ("audit code_rejected user=104857 actor=654321 {\"reason\": \"wrong\"} "
                                   "GET /support?user=223344 code [redacted] x=[redacted]")


def test_a_visitor_cannot_start_a_log_line_of_their_own(app, actor, capfd, monkeypatch):
    """security.md 42, 43: the error log holds one line per event. A newline in a path (%0a, which Werkzeug
    decodes) went into the "csrf refused" line as it was, so an anonymous POST could add a made-up line
    such as a fake audit record; control characters are now written as escapes."""
    import webapp

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a gunicorn worker: root unconfigured
    monkeypatch.setattr(logging.getLogger("twostep"), "handlers", [])
    webapp._init_logging(app)
    fake = "2026-12-05 16:00:00,000 INFO twostep.audit: audit support_tfa_disabled user=2 actor=1 {}"
    path = "/settings/sessions/x%0a" + fake.replace(" ", "%20").replace("{", "%7B").replace("}", "%7D") + "%C2%85%E2%80%A8/end"
    r = actor.client.post(path)
    assert r.status_code == 400
    lines = [line for line in capfd.readouterr().err.splitlines() if line]
    assert len(lines) == 1 and "csrf refused: POST /settings/sessions/x\\n2026-12-05 16:00:00,000" in lines[0]
    assert "\\x85\\u2028/end (The CSRF token is missing.)" in lines[0]  # NEL: a line break to splitlines()
    assert not any(line.startswith("2026-12-05 16:00:00") for line in lines)
    # A backslash the visitor typed is doubled, so the escape above cannot be faked with "\n" typed as is.
    actor.client.post("/settings/sessions/y%5Cn2026/end")
    assert "csrf refused: POST /settings/sessions/y\\\\n2026/end" in capfd.readouterr().err
    # A right-to-left override (and its kin) drew the rest of the line backwards: "dne/..." for "/end".
    actor.client.post("/settings/sessions/z%E2%80%AE%E2%81%A6%E2%80%8B/end")
    assert "csrf refused: POST /settings/sessions/z\\u202e\\u2066\\u200b/end" in capfd.readouterr().err


def test_werkzeugs_own_lines_are_masked_but_not_escaped_again(app):
    """The development server escapes its request line itself and colours it; escaping its lines again
    turned the colours and its own tracebacks into escape sequences. They are still masked (security.md 43)."""
    import webapp
    from webapp.security import RedactingFilter

    webapp._init_logging(app)
    [each] = [f for f in logging.getLogger("werkzeug").filters if isinstance(f, RedactingFilter)]
    record = logging.LogRecord("werkzeug", logging.INFO, __file__, 1, "%s", ("\x1b[32mGET /?code=123456\x1b[0m\nmore",), None)
    assert each.filter(record)
    assert record.getMessage() == "\x1b[32mGET /?code=[redacted]\x1b[0m\nmore"  # the colour's end is kept


@pytest.mark.parametrize("seconds, words", [
    (0.2, "1 second"), (1.5, "2 seconds"), (89, "89 seconds"), (90, "2 minutes"), (14 * 60 + 1, "15 minutes"),
    (89 * 60, "89 minutes"), (90 * 60, "1 hour 30 minutes"), (100 * 60 + 1, "1 hour 41 minutes"),
    (2 * 3600, "2 hours"), (121 * 60, "2 hours 1 minute"), (23 * 3600 + 1800, "23 hours 30 minutes"),
])
def test_a_wait_is_never_said_shorter_than_it_is(app, seconds, words):
    """security.md 18: the wait a refusal names (the back-off, the lock, a network's hour) is rounded up, never
    down: whoever comes back when told is not refused again (and counted again) for coming back too early. Nor
    much longer: from 90 minutes on it says hours and minutes (it said "2 hours" for 1 hour 41 minutes, beside
    the lock's end as a time of day)."""
    from datetime import timedelta

    from webapp.clock import now
    from webapp.security import wait_text

    with app.app_context():
        assert wait_text(now() + timedelta(seconds=seconds)) == words


def test_an_audit_line_names_the_client_address(app, actor, caplog):
    """security.md 43: an incident review could not tell from the log which address sent the wrong passwords:
    the audit lines had the account's number but no address, and only the access log, matched by the
    second, had it. Each audit line carries the client address of its event (`ip=-` when there is none, as
    for an operator command)."""
    actor.user()
    caplog.set_level(logging.INFO, logger="twostep.audit")
    actor.client.environ_base["REMOTE_ADDR"] = "198.51.100.66"
    assert actor.password_step(password="a wrong password").status_code == 200
    [line] = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("audit password_rejected")]
    assert line.startswith("audit password_rejected user=1 actor=None ip=198.51.100.66 {")
    assert app.test_cli_runner().invoke(args=["users", "unlock", "alice@example.com"]).exit_code == 0
    [line] = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("audit throttle_cleared")]
    assert line.startswith("audit throttle_cleared user=1 actor=None ip=- {")


def test_log_lines_without_secrets_are_left_alone():
    """The redaction leaves ordinary lines (access lines, audit lines with ids and dates) as they were."""
    from webapp.security import RedactingFilter

    for line in ('127.0.0.1 - - [28/Nov/2026:16:30:00 +0000] "GET /settings HTTP/1.1" 200 10234 "-" "wrk"',
                 'audit signin user=12345 actor=None {"method": "password+code"}'):
        record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, line, None, None)
        assert RedactingFilter().filter(record)
        assert record.getMessage() == line


def test_key_names_are_found_in_any_case_the_pattern_matches():
    """The filter's substring test must not skip lines its case-insensitive pattern would redact."""
    from webapp.security import RedactingFilter

    for line in ("PASSWORD=hunter2", "pa\u017fsword=hunter2", "Code=hunter2"):  # \u017f: long s, "s" ignoring case
        record = logging.LogRecord("twostep", logging.INFO, __file__, 1, line, None, None)
        RedactingFilter().filter(record)
        assert "hunter2" not in record.getMessage(), line


# ---------------------------------------------------------------- input that would have reached the database badly


def test_an_id_too_large_for_the_database_is_a_404(actor, secret):
    """A 20-digit id in the address is no row of ours: 404, like any id that does not exist, not an
    OverflowError from the driver (SQLite ids are 64-bit)."""
    from .test_support import sign_in_admin

    sign_in_admin(actor, secret)
    token = actor.csrf("/settings")
    huge = "99999999999999999999"
    r = actor.client.post(f"/settings/devices/{huge}/rename", data={"csrf_token": token, f"rename-{huge}-name": "x"})
    assert r.status_code == 404
    assert actor.client.get(f"/support/users/{huge}/disable-2fa").status_code == 404
    assert actor.client.get(f"/support/users/{2**63 - 1}/disable-2fa").status_code == 404  # largest id: no row
    assert actor.client.get(f"/support/users/{2**63}/disable-2fa").status_code == 404  # 19 digits, one past it
    assert actor.client.post(f"/support/users/{huge}/disable-2fa", data={"csrf_token": token}).status_code == 404


@pytest.mark.parametrize("path", ["/support//contact", "/static//app.css", "/settings//2fa/qr"])
def test_a_path_with_doubled_slashes_is_not_sent_to_the_host_the_request_names(client, path):
    """Werkzeug answered a path with "//" in it by a 308 to the merged path, as an absolute URL made from the
    request's Host header: `/support//contact` with `Host: evil.example` went to http://evil.example/. Such a
    path is now an unknown page, with no Location at all (a security review of the anonymous pages)."""
    response = client.get("/", environ_overrides={"PATH_INFO": path}, headers={"Host": "evil.example"})

    assert response.status_code == 404
    assert "Location" not in response.headers


@pytest.mark.parametrize("signed_in", [False, True])
@pytest.mark.parametrize("method, path", [("GET", "/login"), ("GET", "/settings"), ("GET", "/healthz"),
                                          ("POST", "/session/extend")])
def test_a_host_header_that_is_no_host_name_is_a_400_not_a_500(app, actor, signed_in, method, path):
    """A Host header with a label over 63 characters cannot be encoded by IDNA: Werkzeug refuses to route it
    (BadHost), leaving the request no way to build an address, and the 400 page, made of addresses (its
    layout's links and stylesheets, the idle warning's sign-in link), raised again on every route and for
    everyone (a 500 and a traceback from gunicorn; an HTTP-level fuzzing review). It is a plain 400 that
    changes nothing."""
    if signed_in:
        actor.user()
        assert actor.sign_in().status_code == 302
    with app.app_context():
        before = ServerSession.select().count()

    response = actor.client.open(path, method=method, headers={"Host": "a" * 64 + ".example"})

    assert response.status_code == 400
    assert response.mimetype == "text/plain"
    assert "Traceback" not in response.get_data(as_text=True)
    with app.app_context():
        assert ServerSession.select().count() == before


def test_an_id_in_other_digits_is_no_id(app, actor, secret):
    """Werkzeug's int converter reads any Unicode digit: "١" (Arabic-Indic) or "１" (full-width) in the
    address acted on row 1 (a fuzzing review). Ids are ASCII digits; anything else is a 404."""
    from .test_support import sign_in_admin

    user = sign_in_admin(actor, secret)
    device = user.devices.get()
    token = actor.csrf("/settings")
    for digit in {"١": "%D9%A1", "１": "%EF%BC%91"}.values():
        path = f"/settings/devices/{digit}/rename"
        r = actor.client.post(path, data={"csrf_token": token, f"rename-{device.id}-name": "Renamed"})
        assert r.status_code == 404
    with app.app_context():
        assert type(device).get_by_id(device.id).name == device.name


def test_a_nul_character_is_refused_and_changes_nothing(app, actor, secret):
    """PostgreSQL cannot store NUL in text, and nobody types one: the public contact form and the Support
    search answer 400 with a message, and no request is stored."""
    from webapp.models import SupportRequest

    from .test_support import sign_in_admin

    r = actor.post_form("/support/contact", {"email": "alice@example.com", "message": "Lost my phone\x00, help"})
    assert r.status_code == 400 and "not allowed (NUL)" in r.get_data(as_text=True)
    # In a form's own address too (its query), not only in its fields.
    r = actor.post_form("/support/contact?ref=a%00b", {"email": "alice@example.com", "message": "Lost my phone, help"},
                        form_url="/support/contact")
    assert r.status_code == 400 and "not allowed (NUL)" in r.get_data(as_text=True)
    with app.app_context():
        assert SupportRequest.select().count() == 0
    sign_in_admin(actor, secret)
    r = actor.client.get("/support?q=ali%00ce")
    assert r.status_code == 400 and "Nothing was changed" in r.get_data(as_text=True)
    assert actor.client.get("/support?q=alice").status_code == 200
    # A repeated name: the second value is checked too.
    r = actor.client.get("/support?q=alice&q=ali%00ce")
    assert r.status_code == 400 and "not allowed (NUL)" in r.get_data(as_text=True)


@pytest.mark.parametrize("query", ["end=9999-12-31", "start=0001-01-01"])
def test_audit_log_dates_outside_the_searchable_range_are_refused_clearly(actor, secret, query):
    """The "To" date is searched up to the next midnight: 31 December 9999 has none."""
    from .test_support import sign_in_admin

    sign_in_admin(actor, secret)
    r = actor.client.get(f"/support/audit?{query}")
    assert r.status_code == 400 and "Enter a date between 1970 and 9998." in r.get_data(as_text=True)
    r = actor.client.get("/support/audit?start=2026-01-01&end=2026-12-31")
    assert r.status_code == 200 and "Signed in" in r.get_data(as_text=True)


@pytest.mark.parametrize("raw", [hashlib.sha1(b"one").hexdigest(), hashlib.sha256(b"two").hexdigest()],
                         ids=["signed-in session's token", "row-less session's token"])
def test_page_csrf_tokens_are_flask_wtfs_own(app, monkeypatch, raw):
    """security.md 32: the pages' CSRF tokens come from a cheaper signer (webapp.CsrfTokens) than Flask-WTF's
    generate_csrf; they must be the very tokens Flask-WTF makes where it keeps the payload as it is (the
    40-character raw tokens), pass validate_csrf for either length, and fail it once altered or for
    another session's raw token."""
    import time

    from flask import g, render_template_string, session
    from flask_wtf.csrf import generate_csrf, validate_csrf
    from wtforms import ValidationError

    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # one timestamp for both signers
    with app.test_request_context("/"):
        session["csrf_token"] = raw
        ours = render_template_string("{{ csrf_token() }}")
        del g.csrf_token
        stock = generate_csrf()
        if len(raw) == 40:
            assert ours == stock
        validate_csrf(ours)
        for bad in (ours[:-1] + ("A" if ours[-1] != "A" else "B"), stock.replace(stock.split(".")[0], "x")):
            with pytest.raises(ValidationError):
                validate_csrf(bad)
        session["csrf_token"] = "ef" * 20
        with pytest.raises(ValidationError):
            validate_csrf(ours)


def test_links_are_built_under_the_root_each_request_came_in_at(app, actor):
    """One process reached under a path prefix (SCRIPT_NAME, as gunicorn and other WSGI servers set it) and at /:
    the links of each page (pages, scripts, styles) start with that request's own root. The app keeps built
    URLs per process to save time (_memoise_template_helpers); those of one root are not given to the other."""
    import re

    actor.user()

    def links(root):
        page = actor.client.get("/login", environ_overrides={"SCRIPT_NAME": root}).get_data(as_text=True)
        return re.findall(r'(?:href|action|src)="([^"#][^"]*)"', page)

    under = links("/twostep")
    assert "/twostep/signup" in under and "/twostep/static/app.css" in under
    assert all(link.startswith("/twostep/") for link in under)
    at_root = links("")
    assert "/signup" in at_root and "/static/app.css" in at_root
    assert not any(link.startswith("/twostep") for link in at_root)


@pytest.mark.parametrize("values", [
    {"device_id": 7, "added": "20261107113008000000"},
    {"device_id": 7, "added": "20261107113008000000", "activity": "more"},
    {"device_id": 2**63 - 1, "added": "x"},  # the largest id a route takes, and a value that is one letter
    {"device_id": 12, "added": "a b"},  # a space: written %20 in the query, not as it is
    {"device_id": 12, "added": "ünï"},  # letters beyond ASCII: percent-encoded as UTF-8
    {"device_id": 12, "added": ""},
    {"device_id": 12, "added": "a&b=c"},
    {"device_id": 12, "added": 5},  # a number where the address takes text
    {"device_id": True, "added": "1"},  # a bool is an int to Python; Werkzeug writes it as 1
    {"device_id": "12", "added": "1"},  # a number given as text, which the route's number converter takes
    {"device_id": 12, "added": "2026", "before": "2026-12-07T10:00:00,15"},
])
@pytest.mark.parametrize("root", ["", "/twostep"])
def test_addresses_built_from_a_kept_shape_are_what_werkzeug_builds(app, values, root):
    """Templates build a device's form addresses from a shape kept per process (_memoise_template_helpers:
    Werkzeug builds each address with marks in place of its values once, then the values are put in): the
    address must be the very one Werkzeug builds, for values it writes as they are and for values it escapes
    (those are built by Werkzeug each time), under the site's root and at /."""
    with app.test_request_context("/settings", environ_overrides={"SCRIPT_NAME": root}):
        expected = app.url_for("settings.rename_device", **values)
        for _ in range(2):  # the first call makes the shape, the second uses it
            assert render_template_string("{{ url_for('settings.rename_device', **v) }}", v=values) == \
                str(escape(expected))
        other = dict(values, device_id=values["device_id"] + 1 if type(values["device_id"]) is int else "3")
        assert render_template_string("{{ url_for('settings.rename_device', **v) }}", v=other) == \
            str(escape(app.url_for("settings.rename_device", **other)))


def test_kept_addresses_follow_route_defaults_url_defaults_and_tell_true_from_1(app):
    """A review of the kept addresses (_memoise_template_helpers): an address built from a kept shape is right
    only when Werkzeug's choice of rule and the values it adds do not depend on the values. An endpoint with a
    rule that has defaults ("/list" for page 1, "/list/2" for the others) and a url_defaults function that
    adds a value by another are built by Werkzeug each time; and True, which a dict takes for 1, is not given
    the address kept for 1 (Werkzeug writes it as True)."""
    @app.get("/list", defaults={"page": 1}, endpoint="listing")
    @app.get("/list/<int:page>", endpoint="listing")
    def listing(page):
        return str(page)

    @app.url_defaults
    def language(endpoint, values):
        if endpoint == "settings.rename_device" and "lang" not in values:
            values["lang"] = "en" if values.get("device_id", 0) % 2 else "fr"

    def built(template, **values):
        return render_template_string(template, **values)

    with app.test_request_context("/settings"):
        for page in (2, 1, 2, 1):
            assert built("{{ url_for('listing', page=p) }}", p=page) == str(escape(app.url_for("listing", page=page)))
        for device in (3, 4, 3):
            assert built("{{ url_for('settings.rename_device', device_id=d, added='x') }}", d=device) == str(
                escape(app.url_for("settings.rename_device", device_id=device, added="x")))
        for page in (1, True):
            assert built("{{ url_for('support.index', page=p) }}", p=page) == str(
                escape(app.url_for("support.index", page=page)))
        with pytest.raises(ValueError):  # its own globals would be every template's (_TemplateEnvironment)
            app.jinja_env.get_template("base.html", globals={"title": "leaked"})


def test_templates_call_functions_as_jinja_does(app):
    """Template calls take a shorter way for plain functions (_TemplateContext): a function marked to take
    the context or the environment still gets it (with the variables set in a loop), a loop's variables are
    not passed on as arguments, and a StopIteration raised by a function reads as an undefined value: the
    page is the one Jinja's own way makes."""
    import jinja2.runtime
    from jinja2 import pass_context, pass_environment

    @pass_context
    def name_in_context(context, name):
        return context.get(name)

    @pass_environment
    def environment_of(environment):
        return environment is app.jinja_env

    def plain(*args, **kwargs):
        return f"{len(args)}{''.join(sorted(kwargs))}"

    def stops():
        raise StopIteration

    template = ("{{ ctx('who') }} {{ env() }} {% for i in [1] %}{% set j = 5 %}{{ plain(i, k=2) }} {{ ctx('j') }}"
                "{% endfor %} [{{ stops() }}] {{ part() }} {{ '{}'.format(3) }}")
    values = dict(ctx=name_in_context, env=environment_of, plain=plain, stops=stops,
                  part=functools.partial(plain, 9, 8), who="someone")
    with app.test_request_context("/"):
        ours = render_template_string(template, **values)
        kept, app.jinja_env.context_class = app.jinja_env.context_class, jinja2.runtime.Context
        try:
            stock = render_template_string(template, **values)
        finally:
            app.jinja_env.context_class = kept
    assert ours == stock == "someone True 1k 5 [] 2 3"


def _stock_jinja(app):
    """Jinja's own context, code generator and template globals on the app's environment (_TemplateEnvironment),
    with its compiled templates dropped."""
    import jinja2
    import jinja2.compiler
    import jinja2.runtime

    environment = app.jinja_env
    environment.context_class, environment.code_generator_class = jinja2.runtime.Context, jinja2.compiler.CodeGenerator
    environment.make_globals = functools.partial(jinja2.Environment.make_globals, environment)
    environment.cache.clear()


def test_templates_escape_what_they_print_as_jinja_does(app):
    """What a template prints is escaped by the app's escape_output (_TemplateCode), a cheaper way to the same
    text as markupsafe.escape: the page must be the one Jinja's own code makes, for text with markup in it,
    Markup, numbers, None, an object with __html__, an undefined name, a list, in a macro, a {% set %} block,
    a loop, an {% autoescape false %} block and through filters."""
    class Html:
        def __html__(self):
            return "<b>safe</b>"

    template = ("{{ s }}|{{ m }}|{{ n }}|{{ f }}|{{ none }}|{{ h }}|{{ nowhere }}|{{ items }}|{{ s|upper }}|"
                "{% macro box(x) %}[{{ x }}]{% endmacro %}{{ box(s) }}{{ box(m) }}|{% set b %}{{ s }}{% endset %}{{ b }}|"
                "{% for c in 'a<' %}{{ c }}{% endfor %}|{% autoescape false %}{{ s }}{% endautoescape %}|"
                "{{ s ~ m }}|{{ m|safe }}|{{ s|e }}|{{ s if n else m }}")
    values = dict(s="<a href='x'>&\"", m=Markup("<i>ok</i>"), n=5, f=1.5, none=None, h=Html(), items=["<"])
    with app.test_request_context("/"):
        ours = render_template_string(template, **values)
        _stock_jinja(app)
        stock = render_template_string(template, **values)
    assert ours == stock
    assert ours.startswith("&lt;a href=&#39;x&#39;&gt;&amp;&#34;|<i>ok</i>|5|1.5|None|<b>safe</b>||[&#39;&lt;&#39;]|")
    assert type(escape_output("<")) is Markup and escape_output("<") == "&lt;"


def test_pages_are_the_same_as_jinjas_own_code_makes_them(app, actor, secret):
    """User Settings (a device, sessions, activity), the code step and the Support page, drawn by the app's
    template code (_TemplateContext, _TemplateCode) and then by Jinja's own: the same HTML, byte for byte."""
    actor.user("admin@example.com", admin=True, secret=secret)
    actor.user("carol@example.com", secret=new_secret())
    actor.sign_in("admin@example.com", PASSWORD, secret)
    other = app.test_client()
    other.post("/login", data={"csrf_token": csrf_from(other.get("/login").get_data(as_text=True)),
                               "email": "carol@example.com", "password": PASSWORD})
    pages = [(actor.client, "/settings"), (actor.client, "/support?q=carol"), (actor.client, "/support/audit"),
             (other, "/login/verify")]
    for client, path in pages:  # once first: what a page shows only once (a message after signing in) is gone
        client.get(path)
    ours = [client.get(path).get_data(as_text=True) for client, path in pages]
    _stock_jinja(app)
    stock = [client.get(path).get_data(as_text=True) for client, path in pages]
    assert ours == stock
    assert "carol@example.com" in ours[1] and 'name="code"' in ours[3]


def test_an_unexpected_error_gives_the_plain_500_page(app, actor, monkeypatch):
    """A bug (an exception no handler expects) gives a plain 500 page in words, never a traceback; its request's
    transaction has rolled back, so "Nothing was changed". Through htmx the page reloads itself (HX-Refresh)
    and no message is stored for that reload: it shows the page as it is (a 5xx carries no message)."""
    import webapp.settings

    def broken(user):
        raise RuntimeError("a bug: Traceback of secrets")

    app.config["PROPAGATE_EXCEPTIONS"] = False  # as in production (tests re-raise by default)
    actor.user()
    actor.password_step()  # signed in: a session with a row, where a message could be stored
    monkeypatch.setattr(webapp.settings, "_row_context", broken)
    r = actor.client.get("/settings")
    page = r.get_data(as_text=True)
    assert r.status_code == 500 and "<h1>Something went wrong</h1>" in page
    assert "An unexpected error occurred. Nothing was changed." in page and "a bug" not in page
    r = actor.client.get("/settings", headers={"HX-Request": "true"})
    assert r.status_code == 500 and r.headers["HX-Refresh"] == "true"
    monkeypatch.undo()
    page = actor.client.get("/settings").get_data(as_text=True)
    assert "<h1>User Settings</h1>" in page and "unexpected error" not in page


def test_error_pages_speak_plainly(actor, secret):
    """An error page without words of its own (a mistyped address, a page for admins, a GET to a form's
    address) says what happened in plain words, not Werkzeug's ("read-protected or not readable by the
    server", "If you entered the URL manually"), and leads back to the start page."""
    actor.user(secret=secret)
    actor.sign_in(secret=secret)
    for method, path, status, words in [("GET", "/no/such/page", 404, "There is nothing at this address."),
                                        ("GET", "/support", 403, "Your account cannot open this page or do this."),
                                        ("GET", "/settings/2fa/disable", 405,
                                         "This address works only through the buttons on its page.")]:
        r = actor.client.open(path, method=method)
        page = r.get_data(as_text=True)
        assert r.status_code == status and words in page and 'href="/"' in page, path
        assert "read-protected" not in page and "entered the URL manually" not in page
        assert "The method is not allowed" not in page
    # Words of its own keep the plain title: "Not allowed", not Werkzeug's "Forbidden".
    r = actor.client.post("/logout", data={"csrf_token": actor.csrf("/settings")},
                          headers={"Origin": "https://evil.example"})
    page = r.get_data(as_text=True)
    assert r.status_code == 403 and "<h1>Not allowed</h1>" in page and "came from another site" in page


# ---------------------------------------------------------------- security.md 44: which proxy headers count

def _proxied_app(tmp_path, clock, monkeypatch, env, **overrides):
    """An app started with `env` in the environment (as gunicorn's would be) on a SQLite file."""
    from .conftest import make_test_app

    for key in ("PROXY_HOPS", "FORWARDED_ALLOW_IPS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return make_test_app(tmp_path, f"sqlite:///{tmp_path / 'proxy.db'}", clock, **overrides)


def _wrong_password_from(app, clock, peer, headers):
    """A wrong password posted through a peer at `peer` with `headers`; the address the audit log recorded."""
    from webapp.models import AuditEvent, User

    from .conftest import Actor

    a = Actor(app, app.test_client(), clock)
    with app.app_context():
        if not User.select().exists():
            a.user()
    a.client.environ_base["REMOTE_ADDR"] = peer
    clock.advance(3600)  # past any wait an earlier wrong password started
    r = a.post_form("/login", {"email": "alice@example.com", "password": "wrong"}, headers=headers)
    assert r.status_code == 200 and "Incorrect email address or password." in r.get_data(as_text=True)
    with app.app_context():
        return AuditEvent.select().order_by(AuditEvent.id.desc()).first().ip


def test_forwarded_allow_ips_set_empty_in_the_environment_trusts_no_proxy(tmp_path, clock, monkeypatch):
    """security.md 44: FORWARDED_ALLOW_IPS="" in the environment means no proxy is trusted, as in gunicorn,
    not the default (this host). A client on the same machine then cannot choose the address the audit log
    records with an X-Forwarded-For of its own."""
    from webapp.db import db

    app = _proxied_app(tmp_path, clock, monkeypatch, {"PROXY_HOPS": "1", "FORWARDED_ALLOW_IPS": ""})
    try:
        assert _wrong_password_from(app, clock, "127.0.0.1", {"X-Forwarded-For": "203.0.113.5"}) == "127.0.0.1"
    finally:
        db.close()


@pytest.mark.parametrize("env, peer, recorded", [
    ({}, "127.0.0.1", "127.0.0.1"),                      # PROXY_HOPS unset: no proxy, even from this host
    ({"PROXY_HOPS": "1"}, "127.0.0.1", "203.0.113.5"),   # FORWARDED_ALLOW_IPS unset: this host is the proxy ...
    ({"PROXY_HOPS": "1"}, "::1", "203.0.113.5"),         # ... over IPv6 too
    ({"PROXY_HOPS": "1"}, "::ffff:127.0.0.1", "203.0.113.5"),  # ... and as gunicorn bound to [::] sees it
    ({"PROXY_HOPS": "1"}, "10.0.0.1", "10.0.0.1"),       # and no other
])
def test_the_defaults_trust_no_proxy_then_only_this_host(tmp_path, clock, monkeypatch, env, peer, recorded):
    """security.md 44, README "Configuration": without PROXY_HOPS the app believes no X-Forwarded-For at all
    (a client's own header must not choose the address the audit log records); with it, the default
    FORWARDED_ALLOW_IPS trusts the proxy on this host, at 127.0.0.1 or ::1, and no other peer."""
    from webapp.db import db

    app = _proxied_app(tmp_path, clock, monkeypatch, env)
    try:
        assert _wrong_password_from(app, clock, peer, {"X-Forwarded-For": "203.0.113.5"}) == recorded
    finally:
        db.close()


def test_a_trusted_network_written_with_host_bits_is_accepted(tmp_path, clock, monkeypatch):
    """security.md 44: "10.0.0.1/8" (an address with its prefix length, as `ip addr` shows it) names the network
    10.0.0.0/8; it does not stop the start, and a proxy anywhere in that network is believed."""
    from webapp.db import db

    app = _proxied_app(tmp_path, clock, monkeypatch, {"PROXY_HOPS": "1", "FORWARDED_ALLOW_IPS": "10.0.0.1/8"})
    try:
        assert _wrong_password_from(app, clock, "10.9.8.7", {"X-Forwarded-For": "203.0.113.5"}) == "203.0.113.5"
        assert _wrong_password_from(app, clock, "11.0.0.1", {"X-Forwarded-For": "203.0.113.5"}) == "11.0.0.1"
    finally:
        db.close()


@pytest.mark.parametrize("peer", ["", None])
def test_a_proxy_on_a_unix_socket_is_trusted(tmp_path, clock, monkeypatch, peer):
    """gunicorn behind nginx on a Unix socket gives no peer address (REMOTE_ADDR empty or missing). Only a
    local process can reach the socket, so it is the proxy: its X-Forwarded-For names the client. Else every
    visitor would share one address in the audit log and in the contact form's limit."""
    from webapp.db import db

    app = _proxied_app(tmp_path, clock, monkeypatch, {"PROXY_HOPS": "1"})
    original = app.wsgi_app

    def without_peer(environ, start_response):
        environ.pop("REMOTE_ADDR", None)
        return original(environ, start_response)

    if peer is None:
        app.wsgi_app = without_peer
    try:
        assert _wrong_password_from(app, clock, "" if peer is None else peer,
                                    {"X-Forwarded-For": "203.0.113.5"}) == "203.0.113.5"
    finally:
        db.close()


def test_an_untrusted_peer_cannot_claim_https_with_the_scheme_header_alone(tmp_path, clock, monkeypatch, caplog):
    """security.md 33, 44: a client reaching gunicorn around the proxy sends only X-Forwarded-Proto: https and
    an https Origin for the app's real host. The header is dropped (the operator is told once), the app
    still sees http, so the Origin is foreign: 403 and nothing happens. The same from the proxy counts."""
    from webapp.db import db
    from webapp.models import AuditEvent

    from .conftest import Actor

    app = _proxied_app(tmp_path, clock, monkeypatch, {"PROXY_HOPS": "1"})
    try:
        a = Actor(app, app.test_client(), clock)
        a.user()
        forged = {"X-Forwarded-Proto": "https", "Origin": "https://localhost"}
        caplog.set_level(logging.WARNING, logger="twostep")
        a.client.environ_base["REMOTE_ADDR"] = "198.51.100.66"
        r = a.post_form("/login", {"email": "alice@example.com", "password": PASSWORD}, headers=forged)
        assert r.status_code == 403 and not signed_in(a.client)
        with app.app_context():
            assert not AuditEvent.select().where(AuditEvent.kind.startswith("password")).exists()
        warnings = [rec.getMessage() for rec in caplog.records if "were ignored" in rec.getMessage()]
        assert len(warnings) == 1 and "198.51.100.66" in warnings[0]
        a.client.environ_base["REMOTE_ADDR"] = "127.0.0.1"  # the proxy: the same headers are what the visitor used
        r = a.post_form("/login", {"email": "alice@example.com", "password": PASSWORD}, headers=forged)
        assert r.status_code == 302 and r.headers["Location"] == "/settings"
    finally:
        db.close()


def test_going_back_to_a_page_htmx_changed_gets_the_whole_page(actor, secret):
    """htmx's history restore (Back to a page whose results htmx replaced, when its cache misses) asks with
    HX-Request and HX-History-Restore-Request: it gets the whole page, not the results fragment alone (a
    bare list without the layout, the navigation or the styles); a plain htmx search still gets the fragment."""
    actor.user("admin@example.com", admin=True, secret=secret)
    actor.sign_in("admin@example.com", secret=secret)
    restore = actor.client.get("/support?q=a", headers={"HX-Request": "true", "HX-History-Restore-Request": "true"})
    page = restore.get_data(as_text=True)
    assert restore.status_code == 200 and "<html" in page and "admin@example.com" in page
    fragment = actor.client.get("/support?q=a", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.get_data(as_text=True)


@pytest.mark.parametrize("target", ["/settings\u009b2J", "/settings\x7f", "/settings\u0085", "/settings\u202egnp.exe",
                                    "/settings\u2066", "/settings\u200b", "/settings\u2028", "/settings\u2029"])
def test_a_next_with_a_c1_control_or_a_format_character_is_refused(actor, app, secret, target):
    """security.md 29: a `next` holds only what a path of the app's holds. A C1 control (the CSI, U+009B,
    starts an escape sequence on a terminal), DEL, a bidirectional override or isolate, a zero-width space or
    a line or paragraph separator was stored with the sign-in under way and printed by `users export`: such a
    target is refused like any other bad one, so nothing is stored and the sign-in ends on User Settings."""
    from urllib.parse import quote

    from webapp.security import safe_next

    assert safe_next(target) is None
    assert safe_next("/settings/Zo\u00eb") == "/settings/Zo\u00eb"  # a letter of any alphabet is not one
    actor.user(secret=secret)
    assert actor.password_step(next_url=quote(target)).headers["Location"] == "/login/verify"
    with app.app_context():
        assert SignInChallenge.get().next_url is None
    assert actor.code_step(actor.code(secret)).headers["Location"] == "/settings"
