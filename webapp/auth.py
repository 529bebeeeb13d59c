"""Sign-in in two steps (password, then code), re-authentication, logout, sign-up and first-run setup."""
import hashlib
import hmac
import secrets
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user
from flask_login.signals import user_logged_in
from peewee import IntegrityError
from wtforms import EmailField, PasswordField, StringField
from wtforms.validators import DataRequired, Email, EqualTo, InputRequired, Length, Optional, ValidationError

from . import flaskctx
from .clock import expired, now, timestamp
from .db import Param, Prepared, db, for_update, lock_keys, write_transaction
from .fields import Form
from .htmx import is_htmx
from .models import KnownBrowser, NetworkCounter, SignInChallenge, User, lookalike_problem, normalise_email
from .security import (PASSWORD_MAX, PASSWORD_MIN, REAUTH_NOT_DONE, audit, backoff, client_ip, client_network,
                       client_network_48, count_for_network, hash_password, is_common_password, is_fresh, is_lock,
                       known_browser, login_required, network_full_column, network_full_until,
                       password_hash_outdated, password_length, remember_browser, safe_next, verify_password,
                       wait_end, wait_text)
from .sessions import browser_label, end_session_now, token_hash, touch_session_now, write_session_now
from .totp import CheckResult, check_user_code, code_matches, normalise_code

bp = Blueprint("auth", __name__)

GENERIC_LOGIN_ERROR = "Incorrect email address or password."
# The same refusal for a signed-in person confirming an action: there is no email address on that form.
WRONG_PASSWORD_ERROR = "Incorrect password."
# The same words for a wrong code and one already used (security.md 17); the second sentence is for the latter:
# the app still shows the code just used to sign in, and typing it again would fail again.
GENERIC_CODE_ERROR = ("That code is not valid, or it was already used. Enter the code your app shows now; if "
                      "that is the one you just used, wait for the next one.")
MALFORMED_CODE_ERROR = "Enter the 6-digit code your authenticator app shows: six numbers (spaces don't matter)."


def strip_text(value):
    """Form filter: trim surrounding whitespace from text input (None stays None)."""
    return value.strip() if isinstance(value, str) else value


CODE_FIELD_ATTRS = {
    "autocomplete": "one-time-code",
    "inputmode": "numeric",
    "pattern": "[0-9 ]*",
    "maxlength": "9",
    "autofocus": True,
    "spellcheck": "false",
    # The on-screen keyboard's Enter key reads "Done" (a phone and zoom review): the code is all the form asks.
    "enterkeyhint": "done",
}


def code_field(required="Enter the 6-digit code from your authenticator app.", autofocus=True):
    """A field for a six-digit code (sign-in, the wizard, device changes): the same limits and attributes
    everywhere. `required` None: an empty one is left to the view."""
    validators = [DataRequired(required)] if required else []
    return StringField("Verification code", validators=[*validators, Length(max=32, message=MALFORMED_CODE_ERROR)],
                       render_kw=CODE_FIELD_ATTRS if autofocus else {**CODE_FIELD_ATTRS, "autofocus": False})


def current_password_field(label="Password", required="Enter your password.", autofocus=False):
    """A field for the password someone has now (sign-in, confirming it's them, device changes). `required`
    None: optional (asked only in some cases, which the view decides)."""
    first = DataRequired(required) if required else Optional()
    render_kw = {"autocomplete": "current-password", **({"autofocus": True} if autofocus else {})}
    return PasswordField(label, validators=[first, Length(max=PASSWORD_MAX, message="That password is too long.")],
                         render_kw=render_kw)


class LoginForm(Form):
    email = EmailField("Email address", validators=[
        DataRequired("Enter your email address."), Length(max=254, message="That email address is too long."),
        Email("Enter a valid email address.", check_deliverability=False)], filters=[strip_text],
        render_kw={"autocomplete": "username", "autofocus": True})
    password = current_password_field()


class CodeForm(Form):
    code = code_field()


class ReauthForm(Form):
    password = current_password_field(autofocus=True)
    code = code_field(required=None, autofocus=False)


def _not_only_spaces(form, field):
    if field.data and not field.data.strip():
        raise ValidationError("A password of spaces only cannot be used to sign in: choose another.")


def _long_enough(form, field):
    """PASSWORD_MIN counts the characters as the password is hashed (NFKC) too: eight typed as letters and
    their accents apart are four letters. (After Length, which counts them as typed, as the browser does for
    the field's minlength: one message if both refuse.)"""
    if field.data and not field.errors and password_length(field.data) < PASSWORD_MIN:
        raise ValidationError(_LENGTH_MESSAGE)


_LENGTH_MESSAGE = f"Use at least {PASSWORD_MIN} characters (and at most {PASSWORD_MAX})."


def _not_common(form, field):
    """security.is_common_password: the first ones an attacker tries (after the length rules: one message)."""
    if field.data and not field.errors and is_common_password(field.data):
        raise ValidationError(COMMON_PASSWORD_MESSAGE)


COMMON_PASSWORD_MESSAGE = ("This password is one of the most common ones, which are tried first. Choose another: "
                           "a few unrelated words are long and easy to remember.")


def new_password_field(label, required_message):
    """A field for choosing a password (sign-up, first run, Change password): the same rules everywhere."""
    return PasswordField(label, validators=[
        InputRequired(required_message),  # not DataRequired: spaces only get their own message
        _not_only_spaces,
        Length(min=PASSWORD_MIN, max=PASSWORD_MAX, message=_LENGTH_MESSAGE), _long_enough, _not_common],
        render_kw={"autocomplete": "new-password"})


def repeat_password_field(label, of, required_message, differ_message):
    """The same password typed again, for `of` (the field's name)."""
    return PasswordField(label, validators=[DataRequired(required_message), EqualTo(of, differ_message)],
                         render_kw={"autocomplete": "new-password"})


def _no_lookalike(form, field):
    problem = lookalike_problem(field.data or "")
    if problem:
        raise ValidationError(problem)


class NewAccountForm(Form):
    email = EmailField("Email address", validators=[
        DataRequired("Enter an email address."), Length(max=254, message="That email address is too long."),
        Email("Enter a valid email address.", check_deliverability=False), _no_lookalike], filters=[strip_text],
        render_kw={"autocomplete": "username"})
    password = new_password_field("Password", "Choose a password.")
    confirm = repeat_password_field("Repeat password", "password", "Repeat the password.", "The two passwords differ.")


class FirstRunForm(NewAccountForm):
    setup_code = StringField("Setup code", validators=[DataRequired("Enter the setup code."), Length(max=64)],
                             render_kw={"autocomplete": "off", "spellcheck": "false"})


# ---------------------------------------------------------------- helpers

# The sign-in steps' queries, compiled once (db.Prepared). The challenge is joined with the person: the
# code step needs them, and a second query would cost as much as this one.
_CHALLENGE = Prepared(lambda: SignInChallenge.select(SignInChallenge, User).join(User)
                      .where(SignInChallenge.id == Param("id")).limit(1))
_DROP_CHALLENGE = Prepared(lambda: SignInChallenge.delete().where(SignInChallenge.id == Param("id")))
_MARK_LOGIN = Prepared(lambda: User.update(last_login_at=Param("at")).where(User.id == Param("id")))

def complete_sign_in(user, next_url=None, method=None):
    """Start a brand-new session for a fully authenticated user and send them on (security.md 26)."""
    start_session(user, method)
    return after_sign_in(next_url)


def after_sign_in(next_url):
    """Where a completed sign-in goes: the page asked for, if it is on this site (security.md 29), else
    User Settings."""
    return redirect(safe_next(next_url) or url_for("settings.index"))


NEW_BROWSER = "new_browser"  # session key: this session's sign-in came from a browser new to the account


def new_browser_detail(new):
    """The audit detail of a sign-in, or of a device added, from a browser new to the account: only when it
    was, so that the records of a known browser, and those written before, read as they did."""
    return {"new_browser": True} if new else {}


def login_user(current, user):
    """flask-login's login_user(user) for this app's sign-ins (fresh, never remembered), given the request's
    session: its reads through Flask's proxies were a tenth of a code step's. Its session-protection
    identifier is stored as flask-login stores it, though that protection is off (create_app): an operator
    who turns it on does not sign out every session made before."""
    if not user.is_active:
        return False
    app = flaskctx.the_app()
    manager = app.login_manager
    current["_user_id"] = user.get_id()
    current["_fresh"] = True
    current["_id"] = manager._session_identifier_generator()
    manager._update_request_context_with_user(user)
    user_logged_in.send(app, user=user)
    return True


def start_session(user, method=None):
    """The signed-in session of complete_sign_in, without the redirect: inside the caller's write
    transaction, if there is one, so the sign-in commits once. Its record says whether the browser was new to
    the account (security.remember_browser): the browser's name is the User-Agent, which an intruder can copy
    from the owner's; and so does the session, for the device its wizard may add (settings.complete)."""
    current = flaskctx.request_context().session  # not through Flask's proxy (webapp/flaskctx.py)
    pending_messages = current.get("_flashes")  # messages queued for the next page survive the new session
    current.rotate()
    current.clear()
    if pending_messages:
        current["_flashes"] = pending_messages
    login_user(current, user)
    current["auth_at"] = timestamp()
    with write_transaction():  # last sign-in, audit record and the new session row: one commit
        _MARK_LOGIN.execute(at=now(), id=user.id)
        new = remember_browser(user)
        if new:
            current[NEW_BROWSER] = True
        audit("signin", user=user, method=method or ("password+code" if user.has_2fa else "password"),
              browser=browser_label(flaskctx.request_context().request.headers.get("User-Agent")),
              **new_browser_detail(new))
        write_session_now()


_SIGN_IN_EMAIL = "sign_in_email"  # session key: the address of the code step under way (after_password)


def drop_challenge():
    """Forget the pending sign-in, server-side and in the session; returns whether its row was still there."""
    current = session._get_current_object()
    if _SIGN_IN_EMAIL in current:
        current.pop(_SIGN_IN_EMAIL)
    token = current.pop("challenge", None)
    return bool(token) and bool(_DROP_CHALLENGE.execute(id=token_hash(token)))


BLOCKED_SIGN_IN = "blocked_sign_in"  # session key: whose password a blocked sign-in entered, and when


def blocked_sign_in_user():
    """The account whose correct password this browser entered at a sign-in that support's ended window
    blocked, for as long as a code step would have lasted (CHALLENGE_TTL) and that password is still the
    account's, else None."""
    entry = session.get(BLOCKED_SIGN_IN)
    if not isinstance(entry, dict):
        return None
    if timestamp() - entry.get("at", 0) > current_app.config["CHALLENGE_TTL"].total_seconds():
        session.pop(BLOCKED_SIGN_IN, None)
        return None
    user = User.get_or_none(User.id == entry.get("user"))
    if user is None or entry.get("password") != _fingerprint(user.password_hash):
        return None  # the password was changed since (security.replace_password): the old one proves nothing
    return user


def _fingerprint(password_hash):
    """A short digest of a stored password hash: tells whether it changed, reveals nothing of it."""
    return hashlib.sha256(password_hash.encode("utf-8")).hexdigest()[:16]


def current_challenge(current=None):
    """The live challenge for this session (or the session `current`), or None (expired ones are deleted:
    security.md 24)."""
    token = (session if current is None else current).get("challenge")
    if not token or not isinstance(token, str):
        return None
    challenge = _CHALLENGE.first(id=token_hash(token))
    if challenge is None or expired(challenge.created_at, flaskctx.the_app().config["CHALLENGE_TTL"], now()):
        drop_challenge()
        return None
    return challenge


class Throttled(str):
    """A refusal for a wait that is not over (a back-off or a network's hourly limit): its page answers 429
    Too Many Requests, whichever page it is. Told by its type, not by its words."""


def refusal_status(error, otherwise):
    """The status of a page that shows `error`: 429 for a Throttled one, else `otherwise`."""
    return 429 if isinstance(error, Throttled) else otherwise


def password_check(user, password, wrong=GENERIC_LOGIN_ERROR, network=None):
    """Check a password with the throttle; returns None on success or the error to show (`wrong` when the
    password is not the account's).

    The failures counted are the account's, or, in a browser the person completed a sign-in from, that
    browser's own (security.known_browser): a stranger's wrong guesses lock the account everywhere else
    but not there, and a stolen browser cookie gets the same back-off as the account. With `network` (the
    password step's: security.client_network), a wrong password or an unknown address also counts against
    that network (FAILED_SIGNINS_PER_HOUR, login), except one counted against a known browser: that browser
    is not held by its network's limit either. So is an attempt refused by the back-off
    (_password_throttled)."""
    holder = (known_browser(user) or user) if user is not None else None
    if holder is not None and _waiting(holder):
        # Refused before the hash: the 429 says already that the address has an account, so hashing anyway
        # would hide nothing and hand anyone who knows an address an argon2 hash per request.
        return _password_throttled(user, holder, holder, network)
    correct = verify_password(user.password_hash if user else None, password)  # slow: outside any lock
    if user is None:
        if network:
            with write_transaction():
                _count_failed_sign_in(network)
        return wrong
    # Read the counter again after the hash: guesses sent at the same moment were all let in against the
    # state before any of them failed. The first failure's back-off applies to the others, right or wrong,
    # and each failure counts from the one before it (security.md 18, 20).
    if correct:
        # A plain read will do: a failure committed before it is seen, one committed after it came later.
        holder, fresh = _fresh_counter(user, holder)
        if fresh is None:
            return wrong
        if _waiting(fresh):
            return _password_throttled(user, holder, fresh, network)
        if fresh.password_failures:
            _set_counter(holder, password_failures=0, password_locked_until=None)
        return None
    return _count_failure(user, holder, wrong, network)


def refuse_replaced_password(user, network=None):
    """A password that was right when it was checked but replaced before the sign-in was decided (see
    after_password): counted and recorded like a wrong one, so it tells nobody more than a wrong guess."""
    return _count_failure(user, known_browser(user) or user, GENERIC_LOGIN_ERROR, network)


def _count_failure(user, holder, wrong, network=None):
    """Count a wrong password against `holder` (the browser's own counter or the account's), with its back-off
    and audit record, and, unless the holder is a known browser, against `network`; returns the error to
    show."""
    with write_transaction():
        # The person's row first, always: support's actions lock it before they forget the person's browsers.
        User.lock(user.id)
        holder, fresh = _fresh_counter(user, holder, lock=True)
        if fresh is None:
            return wrong
        if _waiting(fresh):
            # Hashed and found wrong while a guess sent at the same moment set the back-off: a guess all the
            # same, counted (not refused unheard), or N guesses sent at once would count as one.
            return _password_throttled(user, holder, fresh, network, wrong=fresh.password_failures + 1)
        failures = fresh.password_failures + 1
        until = now() + backoff(failures)
        _set_counter(holder, password_failures=failures, password_locked_until=until)
        audit("password_rejected", user=user, failures=failures, **_counted_in(holder))
        if is_lock(failures):  # every lock, as code_lockout: when password entry closed, and until when
            audit("password_lockout", user=user, until=until, **_counted_in(holder))
        if not isinstance(holder, KnownBrowser):
            _count_failed_sign_in(network)
    return wrong


def _fresh_counter(user, holder, lock=False):
    """(holder, its failure count and back-off as stored now); the account's when the browser's row went, or
    was forgotten meanwhile (a new password, Sign out everywhere else, ... while the hash ran: the row stays,
    for the contact form, and a guess counted on it escaped the account's and the network's count)."""
    for candidate in (holder, user):
        model = type(candidate)
        query = model.select(model.password_failures, model.password_locked_until).where(model.id == candidate.id)
        if model is KnownBrowser:
            query = query.where(KnownBrowser.forgotten_at.is_null())
        fresh = (for_update(query) if lock else query).first()
        if fresh is not None:
            return candidate, fresh
    return user, None  # the account itself was deleted meanwhile


def _set_counter(holder, **values):
    """Write the password failure counter of `holder`: the account (User) or a known browser."""
    model = type(holder)
    model.update(**values).where(model.id == holder.id).execute()


def _waiting(counter):
    return counter.password_locked_until is not None and counter.password_locked_until > now()


def _password_throttled(user, holder, counter, network=None, wrong=None):
    """Refuse a password while the account (or this browser) waits out its back-off (security.md 18), as
    `counter` (holder's failures and wait, as read) says; a wait the clock going back made longer than the whole
    back-off is stored shortened (security.wait_end). The
    attempt is recorded and, at the password step and unless `holder` is a known browser, counted against
    the client's network, but it does not make the account's wait longer: like codes typed during a lock
    (code_strikes), only passwords found wrong do. Counted there, a stranger could send twenty attempts in
    the first seconds of pauses and lock the account for a day (the request-facing security review), and
    send them without end: nothing else bounded them. `wrong`: the failure count, for a password that was
    checked and found wrong meanwhile (_count_failure), which counts like any wrong one."""
    locked_until = wait_end(counter.password_locked_until, counter.password_failures)
    with write_transaction():  # the record and the network's count together (joins the caller's transaction)
        if locked_until < counter.password_locked_until:
            # Only while the count is the one read: a failure counted meanwhile set a wait of its own.
            model = type(holder)
            model.update(password_locked_until=locked_until).where(
                (model.id == holder.id) & (model.password_failures == counter.password_failures)
                & (model.password_locked_until > locked_until)).execute()
        if wrong is not None:
            _set_counter(holder, password_failures=wrong)
        audit("password_throttled", user=user, **_counted_in(holder))
        if network and not isinstance(holder, KnownBrowser):
            _count_failed_sign_in(network)
    return Throttled(f"Too many failed attempts. Try again in {wait_text(locked_until)}.")


def _counted_in(holder):
    """The audit detail saying a failure counted against a known browser rather than the account."""
    return {"counted_in": "known browser"} if isinstance(holder, KnownBrowser) else {}


def code_error(result):
    """The message for a failed code; wrong and replayed codes read the same (security.md 17)."""
    if result.reason == "locked":
        if not is_lock(result.strikes):
            # Within the short pauses after the first wrong codes (1, 2, 4, 8 s; security.backoff): one
            # mistyped code is not "too many".
            return Throttled(f"This code was not checked: after a wrong code, codes are paused for a moment. "
                             f"Wait {wait_text(result.locked_until)} before entering another code.")
        return Throttled(f"Too many wrong codes. Wait {wait_text(result.locked_until)} before trying again.")
    if result.reason == "malformed":
        return MALFORMED_CODE_ERROR
    if result.locked_until is not None and is_lock(result.strikes):
        # This wrong code started a lock (the fifth in a row, or the first after a lock ran out): said now,
        # not only when the next code, perhaps the right one, is refused. The same for a replayed code.
        return Throttled(f"{GENERIC_CODE_ERROR} Too many wrong codes in a row: wait "
                         f"{wait_text(result.locked_until)} before trying again.")
    return GENERIC_CODE_ERROR


# ---------------------------------------------------------------- views

def login_notice_url(notice, **values):
    """The sign-in page with one of its fixed notices (login_notice). For a browser whose session has ended or
    never had a row: a flashed message would have to write a session row just to carry it (sessions.py), so
    anyone could fill the table by sending such requests."""
    return url_for("auth.login", notice=notice, **values)


def login_notice(key):
    """The text of a notice the sign-in page was sent with (?notice=...); None for anything unknown."""
    if key == "logged-out":
        return "You are logged out."
    if key == "sign-in-cancelled":
        return "Sign-in cancelled. You can sign in again below."
    if key == "sign-in-expired":
        return "Your sign-in expired. Please enter your email address and password again."
    if key == "code-step-ended":
        # A code sent from a code step whose session has gone: most often Verify pressed twice without
        # JavaScript (the first press signed in, but the browser dropped its answer with the new cookie), or
        # the code step left open too long. Either way this browser is not signed in.
        return ("That sign-in step has ended: it expired, or it was completed by an earlier press of Verify whose "
                "answer did not arrive. Please sign in again.")
    if key == "session-ended":
        idle = int(current_app.config["SESSION_IDLE_TIMEOUT"].total_seconds() // 60)
        limit = int(current_app.config["SESSION_ABSOLUTE_TIMEOUT"].total_seconds() // 3600)
        return (f"Your session has ended (after {idle} minutes without activity, {limit} hours after signing in, "
                "or when it was signed out from elsewhere: another browser, a password change, a change to your "
                "authenticator devices, support or the server's operator). Please sign in again.")
    return None


@bp.route("/login", methods=["GET", "POST"])
def login():
    """First step: email and password. With a device, leads to the code step without signing in."""
    if current_user.is_authenticated:
        return redirect(url_for("settings.index"))
    if not User.any_exist():
        return redirect(url_for("auth.first_run"))
    form = LoginForm()
    error, status = None, 200
    next_url = safe_next(request.args.get("next"))
    notice = request.args.get("notice")
    kept_email = session.pop(_SIGN_IN_EMAIL) if _SIGN_IN_EMAIL in session else None  # once, whatever comes
    email_kept = bool(kept_email) and request.method == "GET" and notice == "sign-in-expired"
    if email_kept:
        form.email.data = kept_email
    if request.method == "POST":
        if not form.validate_on_submit():
            status = 400
        else:
            network = client_network(client_ip())
            # Whether the network is over its limit of failed sign-ins is read with the account, in the same
            # statement: a correct password costs nothing more for it (only an unknown address, always a
            # failure, pays a read of its own: network_refusal).
            user = User.by_email(form.email.data,
                                 network_full_since=network_full_column("failed-sign-ins", network))
            error = network_refusal(user, network)
            if error is None:
                error = password_check(user, form.password.data, network=network)
                if error is None:
                    response = after_password(user, next_url, upgraded_hash(user, form.password.data))
                    if response is None:
                        # The stored hash changed while the password was checked. Most often a new password:
                        # this is the old one. But another sign-in of the same person may only have upgraded
                        # the hash (after_password): checked once more against what is stored now.
                        user = User.get_or_none(User.id == user.id)
                        if user is not None and verify_password(user.password_hash, form.password.data):
                            response = after_password(user, next_url)
                    if response is not None:
                        return response
                    error = refuse_replaced_password(user, network) if user is not None else GENERIC_LOGIN_ERROR
            status = refusal_status(error, 200)
    # A session that support's window ended comes here with this notice (webapp._unauthorized): the same
    # words as a sign-in refused after the window, which they tell anyone who types the address too.
    blocked = notice == "support-window-ended" and request.method == "GET"
    # And one of a disabled account (webapp._load_user): the words a sign-in with its password gets.
    disabled = notice == "account-disabled" and request.method == "GET"
    if email_kept:
        # The address is there already: the words ask for what is missing (a review: "Please enter your email
        # address and password again" over a filled-in address).
        text = (f"Your sign-in expired: the code step stays open for "
                f"{int(current_app.config['CHALLENGE_TTL'].total_seconds() // 60)} minutes after the password. "
                "Enter your password again to get a new one.")
    else:
        text = login_notice(notice)
    return render_template("auth/login.html", form=form, error=error, next_url=next_url, blocked=blocked,
                           disabled=disabled, notice=text, email_kept=email_kept), status


def _count_failed_sign_in(network):
    """Inside the caller's write transaction: one more failed sign-in for the client's network and, for an
    IPv6 client, for its /48 too (FAILED_SIGNINS_PER_HOUR, SITE_CLIENTS times that per /48)."""
    count_for_network("failed-sign-ins", network)
    if network:
        count_for_network("failed-sign-ins-48", client_network_48(client_ip()))


def network_refusal(user, network):
    """The password step's answer while the client's network has had FAILED_SIGNINS_PER_HOUR wrong passwords
    in its hour, else None: one client trying one password on many accounts meets no per-account throttle
    (security.md 18). Given before the password is hashed or looked at, and the same words for every
    address typed, an account's or not. A browser known for the account typed (security.known_browser)
    is let through, to its own throttle: a colleague behind the same address as the attacker still signs
    in. `user` comes from User.by_email with network_full_since."""
    if user is not None:
        since = user.network_full_since
        until = None if since is None else \
            NetworkCounter.window_start.python_value(since) + NetworkCounter.WINDOW  # SQLite gives text
    else:
        until = network_full_until("failed-sign-ins", network)
    if network:
        # The client's IPv6 /48 (no query for IPv4): its /64s, each under its own limit, add up there. The
        # later of the two ends is the wait said, never one after which the other still refuses.
        until = _later(until, network_full_until("failed-sign-ins-48", client_network_48(client_ip())))
    if until is None:
        return None
    if user is not None and known_browser(user) is not None:
        return None
    return Throttled(f"Too many failed sign-ins from your network. Try again in {wait_text(until)}, or from a "
                     "browser you have signed in with before.")


def upgraded_hash(user, password):
    """A new hash of the right password when the stored one was made with outdated parameters, else None. Made
    here, before after_password's transaction: hashing is slow and must not hold the person's row."""
    return hash_password(password) if password_hash_outdated(user.password_hash) else None


def after_password(user, next_url, new_hash=None):
    """Decide what a correct password leads to: the code step, a direct sign-in, or a closed door (an account
    the operator disabled, or support's window ended without a new device); None when
    the password changed while it was being checked (the one entered is the old one: it opens nothing, and
    the caller counts it as a wrong one). With new_hash (upgraded_hash), the stored hash is replaced by it
    in the same transaction, the password unchanged."""
    checked_hash = user.password_hash
    blocked = disabled = False
    with write_transaction():
        # Decided again holding the person's row, which completing a setup and changing the password hold too.
        # A device activated a moment ago sends this sign-in to the code step below; one activated a moment
        # later ends this session with the person's others (decided unlocked, the password alone could open a
        # session that no one ends, just after 2FA was turned on). A password changed a moment ago refuses
        # this one; changed a moment later, it ends what this opens (security.replace_password).
        user = for_update(User.select().where(User.id == user.id)).get()
        if user.password_hash != checked_hash:
            return None  # before anything else changes: this browser keeps what it had, as after a wrong one
        if new_hash is not None:
            User.update(password_hash=new_hash).where(User.id == user.id).execute()
            user.password_hash = new_hash
        drop_challenge()  # an earlier code step of this browser goes: this sign-in replaces it
        if user.disabled_at is not None:
            # Said only now, after the right password: a wrong one reads as for an unknown address, so the
            # page tells nobody without the password that the account exists, let alone that it is disabled.
            audit("signin_account_disabled", user=user)
            disabled = True
        elif not user.has_2fa:
            if user.support_window() != "ended":
                # No device (during support's window, the banner on every page says so: base.html).
                return complete_sign_in(user, next_url)
            audit("signin_blocked", user=user, reason="support window ended without a new device")
            blocked = True
        else:
            token = secrets.token_urlsafe(32)
            SignInChallenge.create(id=token_hash(token), user=user, next_url=next_url, created_at=now())
            audit("password_accepted", user=user)
    if disabled:  # no challenge, no session, nothing stored for the contact form: it works as for anyone
        return render_template("auth/login.html", form=LoginForm(), next_url=None, disabled=True, error=None), 403
    if blocked:  # the page is made after the commit: the writer lock is not held meanwhile
        # The page's way on is the contact form: it knows whose password this browser just entered, as it
        # does at the code step (its address filled in, the record and the per-address limit), for as long
        # as that password is the account's (blocked_sign_in_user).
        session[BLOCKED_SIGN_IN] = {"user": user.id, "at": timestamp(), "password": _fingerprint(user.password_hash)}
        return render_template("auth/login.html", form=LoginForm(), next_url=None, blocked=True,
                               error=None), 403
    session["challenge"] = token
    session[_SIGN_IN_EMAIL] = user.email  # for the sign-in page, should this step expire (verify)
    return redirect(url_for("auth.verify"))


class _ChallengeGone(Exception):
    """The code step's challenge was deleted while its code was being checked: roll the attempt back."""


@bp.route("/login/verify", methods=["GET", "POST"])
def verify():
    """Second step: the six-digit code; the user comes from the server-side challenge only (security.md 22)."""
    if flaskctx.signed_in_user().is_authenticated:
        return redirect(url_for("settings.index"))
    here = flaskctx.request_context()
    email = here.session.get(_SIGN_IN_EMAIL)
    challenge = current_challenge(here.session)
    if challenge is None:
        if email:
            # The sign-in page asks for the address again with it filled in: the person typed it minutes ago
            # in this browser (it came back empty: the help-article walkthrough). Kept in the server-side
            # session, not in the address of the page.
            session[_SIGN_IN_EMAIL] = email
        return redirect(login_notice_url("sign-in-expired"))
    form = CodeForm()
    error, status = None, 200
    if here.request.method == "POST":
        valid = form.validate_on_submit()
        raw_code = form.code.data or ""
        # The slow part of the check (decrypting, HMACs) needs no lock: it runs before the transaction.
        matches = code_matches(challenge.user, normalise_code(raw_code))
        # One transaction for the check and everything it leads to: a single commit instead of five. The
        # redirect is built after it: on SQLite every other writer waits while the transaction is open.
        try:
            with write_transaction():
                result = check_user_code(challenge.user, raw_code, matches)  # a malformed code counts too
                signed_in = valid and result
                if signed_in:
                    # Under the person's row (check_user_code took it), the challenge must still be there: a
                    # password change while the code was checked deletes it, and the old password's sign-in
                    # must not finish. Then nothing of this attempt stays (the code is not used up either).
                    if not drop_challenge():
                        raise _ChallengeGone
                    start_session(challenge.user, method="password+code")
                else:
                    if not valid:
                        status, error = 400, form.code.errors[0] if form.code.errors else MALFORMED_CODE_ERROR
                    else:
                        error = code_error(result)
                        status = 400 if result.reason == "malformed" else refusal_status(error, 200)
                    # None of this counts if the challenge went meanwhile (2FA turned off by support or the
                    # operator, the password changed): the attempt rolls back and the sign-in starts again.
                    if not SignInChallenge.update(failures=SignInChallenge.failures + 1).where(
                            SignInChallenge.id == challenge.id).execute():
                        raise _ChallengeGone
                    # The count as stored now, not the one read before the transaction: wrong codes sent at
                    # once to one code step each read the same count, and together passed the limit (a race
                    # review). Under the person's row (check_user_code), so those are counted already.
                    failures = SignInChallenge.select(SignInChallenge.failures).where(
                        SignInChallenge.id == challenge.id).scalar()
                    if failures >= current_app.config["CHALLENGE_MAX_FAILURES"]:
                        drop_challenge()
                        flash(_too_many_codes(result), "error")
                        return redirect(url_for("auth.login"))
        except _ChallengeGone:
            return redirect(login_notice_url("sign-in-expired"))
        if signed_in:
            return after_sign_in(challenge.next_url)
    elif (refused := kept_refusal(_refused_code_page(challenge), form)) is not None:
        # The page a refused code led to (below): its words, the field's error, focus and status, and the
        # account's lock with its end, as the refused POST would have shown them; once.
        kept_until = refused["values"].get("locked_until")
        return _verify_page(form, refused["error"], refused["status"],
                            datetime.fromisoformat(kept_until) if kept_until else None)
    elif _locked_for_minutes(challenge.user):
        # Back after the lock sent this browser to sign in again (or someone else's wrong codes set it): say
        # so before a right code is refused.
        result = CheckResult(False, "locked", locked_until=wait_end(challenge.user.code_locked_until,
                                                                    challenge.user.code_strikes),
                             failures=challenge.user.code_failures, strikes=challenge.user.code_strikes)
        error = code_error(result)
        status = refusal_status(error, status)  # 429, as on every page that says a wait (Throttled)
    else:
        result = None
    # During the account's lock (15 minutes or more) this step, open for CHALLENGE_TTL, can take no code: the
    # page says so and offers no field (it asked to wait 15 minutes on a step that closes after 5, over a
    # field that refused every code: the help-article walkthrough).
    locked = (result is not None and result.locked_until is not None and is_lock(result.strikes)
              and result.locked_until >= challenge.created_at + current_app.config["CHALLENGE_TTL"])
    if locked and result.reason == "malformed":
        # A mistyped code that started the lock (it counts too): the page says the wait, not the typo.
        error = code_error(CheckResult(False, "locked", locked_until=result.locked_until,
                                       failures=result.failures, strikes=result.strikes))
        status = refusal_status(error, status)
    # To the minute after it: a time said is never before the wait is over.
    locked_until = (result.locked_until + timedelta(seconds=59, microseconds=999999)).replace(
        second=0, microsecond=0) if locked else None
    if request.method == "POST" and not is_htmx():
        # A refused code (wrong, mistyped, already used, or refused by the pause or the lock) answers 303 to
        # this page, which shows it once (refused_see_other): Reload sent the same code again, counted as one
        # more failure towards the lock, after asking to resubmit the form. Only refusals come here: a
        # right code has signed in above, with nothing more to write or read.
        return refused_see_other(url_for("auth.verify"), status, error, fields=(form.code,),
                                 page=_refused_code_page(challenge),
                                 values={"locked_until": locked_until.isoformat()} if locked else None)
    return _verify_page(form, error, status, locked_until)


def _refused_code_page(challenge):
    """What a refused code is kept for: this code step, not the page's address. A refusal whose 303 was not
    followed (the answer lost, the tab left) must not turn up on the next code step of this browser, after
    the password again, within the minute it is kept."""
    return "auth.verify " + challenge.id


def _verify_page(form, error, status, locked_until):
    """The code step's page: the field (with `error`), or, when `locked_until` (the account's lock outlasts
    this step), the wait with no field."""
    return render_template("auth/verify.html", form=form, error=error, locked=locked_until is not None,
                           locked_until=locked_until,
                           step_minutes=int(current_app.config["CHALLENGE_TTL"].total_seconds() // 60)), status


def _locked_for_minutes(user):
    """Whether the account's code lock (not one of the short pauses after the first wrong codes) is on."""
    return (user.code_locked_until is not None and user.code_locked_until > now()
            and is_lock(user.code_strikes))


def _too_many_codes(result):
    """The message for a code step ended by too many refused codes: with the wait, when the account's lock is
    on (sign in again at once, and even the right code would be refused until it ends). Ended by a code sent
    during a pause, which was refused without being checked (the page had just said so), it speaks of
    attempts, not of wrong codes (a usability review: one code checked, four sent within its one-second
    pause, and the step ended with "Too many wrong codes")."""
    what = "attempts" if result.reason == "locked" else "wrong codes"
    if result.locked_until is not None and result.locked_until > now() \
            and is_lock(result.strikes):
        return f"Too many {what}. For your security, wait {wait_text(result.locked_until)}, then sign in again."
    return f"Too many {what}. For your security, please sign in again."


def _without_dialog(url):
    """A same-site address without the `dialog` of its query (settings.index opens the wizard for one)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dialog"]
    return urlunsplit(parts._replace(query=urlencode(query)))


# A form refused without JavaScript, kept for the page its 303 leads to (refused_see_other): its status, the
# error and the fields' errors, and what else that page shows again, never a password or a code (a refused code
# comes back empty anyway). Used by "Confirm it's you", User Settings' forms and the code step (verify).
_REFUSED = "refused"
# Long enough for the redirect that follows the refusal at once; an older one is from a page left meanwhile.
_REFUSED_TTL = 60


def refused_see_other(location, status, error=None, fields=(), page=None, values=None):
    """Post/Redirect/Get for a refusal too: keep it for `page` (`location` unless named otherwise) and answer
    303 to `location`, whose GET shows it once (kept_refusal). Reload then sends no password or code again
    (each resend counted as one more failure, towards the lock), and Back meets no "Confirm Form Resubmission"
    (a history review without JavaScript). Kept: `status`, `error`, the errors of the form fields `fields`,
    and `values` (what the page shows again that is no secret: a device name, a ticked box)."""
    session[_REFUSED] = {"page": page or location, "at": timestamp(), "status": status,
                         "error": str(error) if error else None,
                         "fields": {f.short_name: list(f.errors) for f in fields if f.errors}, "values": values or {}}
    return redirect(location, 303)


def kept_refusal(page, form=None):
    """The refusal refused_see_other kept for `page`, taken from the session (it is shown once), with its
    fields' errors put back on `form`; None when there is none, it was for another page, or it is older
    than _REFUSED_TTL (from a page left meanwhile). A HEAD request (a link checker, a monitor) reads it and
    leaves it for the GET: its answer shows nobody the page."""
    here = flaskctx.request_context()
    current = here.session
    if _REFUSED not in current:  # the common case: the session is not changed
        return None
    refused = current[_REFUSED] if here.request.method == "HEAD" else current.pop(_REFUSED)
    if not isinstance(refused, dict) or refused.get("page") != page or expired(refused.get("at", 0), _REFUSED_TTL,
                                                                               timestamp()):
        return None
    if form is not None:
        show_refused_fields(form, refused)
    return refused


def show_refused_fields(form, refused):
    """Put a kept refusal's field errors back on `form`, as the refused request showed them (the focus goes to
    the first field with one)."""
    for name, errors in refused["fields"].items():
        if name in form:
            form[name].errors = errors


@bp.route("/reauth", methods=["GET", "POST"])
@login_required
def reauth():
    """Confirm it is really you (password, plus a code when 2FA is on) before a sensitive action."""
    form = ReauthForm()
    user = current_user._get_current_object()
    needs_code = user.has_2fa
    error, status = None, 200
    next_url = safe_next(request.args.get("next"))
    here = url_for("auth.reauth", next=next_url)
    # The page a refusal led to: its words, the fields' errors (the focus goes to the first field with one) and
    # its status (429 while a wait is on, as on every page that says one).
    refused = kept_refusal(here, form) if request.method == "GET" else None
    if is_fresh():
        if request.method == "GET":
            # Back to this page after confirming (or a reload of it): it says that it is done and where to go
            # on, without asking again (that would cost a new code, and count the used one as a failure). It
            # redirected to `next` instead, the page the person had just come back from: Back seemed to do
            # nothing (a history review without JavaScript). The link does not open the gear's dialog once
            # more: pressed after the wizard was done, it showed step 1 again (a history review).
            return render_template("auth/reauth.html", form=None, confirmed=True, error=None, needs_code=needs_code,
                                   next_url=_without_dialog(next_url) if next_url else url_for("settings.index"),
                                   fresh_until=datetime.fromtimestamp(
                                       float(session["auth_at"]) + current_app.config[
                                           "FRESH_LOGIN_WINDOW"].total_seconds(), timezone.utc).replace(tzinfo=None))
        # A second click on Confirm (its code is used up by the first): on to the page, as the first went.
        return redirect(next_url or url_for("settings.index"))
    if request.method == "POST":
        if not form.validate_on_submit():
            status = 400
        else:
            error = password_check(user, form.password.data, wrong=WRONG_PASSWORD_ERROR)
            if error is None and needs_code:
                result = check_user_code(user, form.code.data or "")
                if not result:
                    error = code_error(result)
            if error is None:
                not_done = session.pop(REAUTH_NOT_DONE, None)
                if isinstance(not_done, dict) and not_done.get("next") == next_url and not_done.get("text"):
                    # On the page it goes back to (fresh_login_required).
                    flash(f"You confirmed it's you, but {not_done['text']}.", "info")
                session.rotate(keep_enrolment=True)  # a new session id whenever someone proves who they are
                session["auth_at"] = timestamp()
                with write_transaction():  # the renewed session and its record together, or neither
                    renewed = write_session_now() == "written"
                    if renewed:
                        audit("reauthenticated", user=user)
                if not renewed:  # signed out meanwhile (elsewhere, or by a password change): it stays so
                    return redirect(login_notice_url("session-ended"))
                return redirect(next_url or url_for("settings.index"))
            status = refusal_status(error, 200)
        return refused_see_other(here, status, error, fields=(form.password, form.code))
    if refused:
        error, status = refused["error"], refused["status"]
    return render_template("auth/reauth.html", form=form, error=error, needs_code=needs_code,
                           next_url=next_url), status


@bp.post("/logout")
def logout():
    """End the session server-side and forget the cookie (security.md 30)."""
    # "Cancel and start over" at the code step: nobody was signed in yet (also when the step had ended
    # meanwhile: expired, or replaced in another tab).
    cancelled = "challenge" in session
    drop_challenge()
    user = current_user._get_current_object() if current_user.is_authenticated else None  # before it ends
    with write_transaction():  # the record and the row's deletion together: a failed logout records none
        end_session_now()
        if user is not None:
            audit("signout", user=user)
    return redirect(login_notice_url("logged-out" if user is not None or not cancelled else "sign-in-cancelled"))


@bp.post("/session/extend")
@login_required
def extend_session():
    """Stay signed in (the idle warning's button, app.js; WCAG 2.2.1): count this session as used now, writing
    last_seen_at even within TOUCH_INTERVAL, once. htmx gets 204 with the new time left in its headers
    (sessions.save_session); the form sent without htmx (app.js ran, htmx did not load) goes back to the page
    it was on (`next`, added by app.js, same-site only), else to User Settings. A session that has ended
    stays ended: an expired one is nobody's here (login_required), and one ended during this request is not
    written again."""
    if not touch_session_now():
        return current_app.login_manager.unauthorized()
    if is_htmx():
        return "", 204
    return redirect(safe_next(request.form.get("next")) or url_for("settings.index"))


def _sign_ups_full_until(network, site):
    """When the client may sign up again, if its network or its IPv6 /48 used up its hour, else None."""
    return _later(network_full_until("sign-ups", network), network_full_until("sign-ups-48", site))


def _later(one, other):
    """The later of two ends of a wait, either of which may be None (no wait)."""
    return max((t for t in (one, other) if t is not None), default=None)


def _count_sign_up(network, site):
    count_for_network("sign-ups", network)
    count_for_network("sign-ups-48", site)


@bp.route("/signup", methods=["GET", "POST"])
def signup():
    """Create an account (if the operator allows sign-up)."""
    if not current_app.config["SIGNUP_ENABLED"]:
        abort(404)
    if current_user.is_authenticated:
        return redirect(url_for("settings.index"))
    if not User.any_exist():
        # The first account is the admin made on /setup with the code from the server's console: a sign-up
        # before it would make /setup disappear and leave the instance without an admin.
        return redirect(url_for("auth.first_run"))
    form = NewAccountForm()
    error, status = None, 200
    if request.method == "POST":
        if form.validate_on_submit():
            email = normalise_email(form.email.data)
            # SIGNUPS_PER_HOUR per client network: without it anyone could make accounts as fast as passwords
            # hash, each adding rows, or learn which addresses have an account ("already exists", which
            # counts too). Checked first: over it, nothing is hashed, and nothing is said about the address.
            network = client_network(client_ip())
            site = client_network_48(client_ip())  # an IPv6 client's /48 (None for IPv4): a looser limit
            full_until = _sign_ups_full_until(network, site)
            user = None
            if full_until is None and User.by_email(email) is None:
                password_hash = hash_password(form.password.data)  # slow: outside the transaction
                with write_transaction():
                    # Counted again holding the network, so sign-ups sent at once cannot all pass the count
                    # made before their hashes (on PostgreSQL too, where the count alone locks nothing).
                    if network:
                        lock_keys("signup:" + network, *(["signup:" + site] if site else []))
                    full_until = _sign_ups_full_until(network, site)
                    if full_until is None:
                        try:
                            with db.atomic():
                                user = User.create(email=email, password_hash=password_hash)
                        except IntegrityError:  # the same address signed up a moment ago (a form sent twice)
                            user = None
                        else:
                            _count_sign_up(network, site)
                            audit("account_created", user=user, via="signup")  # with the account, or neither
            if full_until is not None:
                error, status = (f"Too many sign-ups from your network in the last hour. Try again in "
                                 f"{wait_text(full_until)}."), 429
            elif user is None:
                with write_transaction():
                    _count_sign_up(network, site)
                error = "An account with this email address already exists. Log in instead."
            else:
                response = complete_sign_in(user)
                flash("Your account is ready. To protect it with a code from your phone, press the gear next to "
                      "Two-Factor Authentication.", "success")
                return response
        else:
            status = 400
    return render_template("auth/signup.html", form=form, error=error), status


@bp.route("/setup", methods=["GET", "POST"])
def first_run():
    """One-time page that creates the first admin; needs the code printed on the server console."""
    if User.any_exist():
        abort(404)
    from . import setup_code

    form = FirstRunForm()
    error, status = None, 200
    if request.method == "POST":
        if form.validate_on_submit():
            expected = setup_code(current_app)
            if not hmac.compare_digest(form.setup_code.data.strip().encode(), expected.encode()):
                error, status = "That setup code is not right. It is printed in the server's console.", 403
            else:
                password_hash = hash_password(form.password.data)  # slow: outside the transaction
                user = None
                with write_transaction():
                    # Checked again holding the page's name: two forms sent at once (a double click, or someone
                    # else with the code) made two admins on PostgreSQL, or a 500 for the same address twice.
                    lock_keys("first-run")
                    if not User.any_exist():
                        user = User.create(email=normalise_email(form.email.data), is_admin=True,
                                           password_hash=password_hash)
                        audit("account_created", user=user, via="first-run", admin=True)
                if user is None:
                    flash("The first admin account was created a moment ago by another request, and this page is "
                          "closed. Log in with that account. If it was not you, stop the server and check "
                          "users list (README “Operator commands”).", "warning")
                    return redirect(url_for("auth.login"))
                flash("Your admin account is ready. Set up two-factor authentication next.", "success")
                return complete_sign_in(user)
        else:
            status = 400
    return render_template("auth/first_run.html", form=form, error=error), status
