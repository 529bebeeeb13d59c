"""Operator commands: flask --app wsgi users ..., networks ..., keys rotate, audit export, purge-expired and
backup."""
import errno
import heapq
import ipaddress
import json
import os
import re
import secrets
import sqlite3
import tempfile
import unicodedata
from datetime import timedelta
from urllib.parse import quote, urlsplit

import click
from email_validator import EmailNotValidError, validate_email
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from peewee import JOIN, IntegrityError, InterfaceError, OperationalError, fn

from .clock import expired, now
from .config import keys_source
from .db import commits, db, first_line, for_update, is_sqlite, lock_keys, write_transaction
from .fields import has_disguising_characters
from .models import (AuditEvent, Device, KnownBrowser, NetworkCounter, PendingEnrolment, ServerSession,
                     SignInChallenge, SupportRequest, User, lookalike_problem, maybe_not_normal, normalise_email)
from .models import purge_expired as purge
from .security import (NETWORK_LIMITS, PASSWORD_MAX, PASSWORD_MIN, audit, client_network, client_network_48,
                       end_code_steps, hash_password, is_common_password, is_lock, network_limit, one_line,
                       password_length, replace_password, revoke_second_factor, wait_end)
from .sessions import end_user_sessions, printable_agent
from .support import (_WRITTEN_TOGETHER, REASON_MAX, _email_order, _fmt_time, detail_text, event_text,
                      person_events, text_lines)
from .totp import SecretError, reencrypt_secret


class _OneLineDatabaseErrors:
    """A database that stops answering while a command runs (PostgreSQL restarted or its connection ended,
    SQLite's writers busy beyond the busy timeout) ends the command with one `Error:` line and exit 1, not
    the driver's traceback (a fault-injection review). Each command stores its changes in one transaction, so
    the line says whether that transaction had committed (db.commits). At start, an unusable database is
    already one line (db.init_app)."""

    def invoke(self, ctx):
        before = commits()
        try:
            return super().invoke(ctx)
        except (OperationalError, InterfaceError) as exc:
            reason = first_line(exc)
            if commits() != before:  # after its transaction (a review: promote read the account again after it)
                raise click.ClickException(
                    f"the database stopped answering ({reason}) after the command had stored its change: check "
                    "the account (users list, users activity) before running it again.") from None
            raise click.ClickException(
                f"the database stopped answering ({reason}). Nothing was changed: a command stores all its "
                "changes at once or none. Run it again once the database answers.") from None


class _Group(_OneLineDatabaseErrors, AppGroup):
    pass


class _Command(_OneLineDatabaseErrors, click.Command):
    pass


users = _Group("users", help="Manage accounts.")
keys = _Group("keys", help="Manage the keys that encrypt TOTP secrets at rest.")
audit_group = _Group("audit", help="Read the audit log.")
networks = _Group("networks", help="See and clear what the per-network limits counted this hour.")


def _get_user(email, erased=False, missing_ok=False):
    """The account an operator command names: by its address, or by its number as "#8" (what the start-up
    warning about one mailbox in several spellings gives: those addresses look alike, and the address finds
    only one of them). An erased account only for the commands that pass `erased`: nothing may put it back
    in use (enable, set-password, promote). None for an address no account has when `missing_ok`."""
    text = email.strip()
    if text.startswith("#") and text[1:].isascii() and text[1:].isdigit() and len(text) <= 19:
        user = User.get_or_none(User.id == int(text[1:]))
        if user is None:
            raise click.ClickException(f"no account number {text}")
    else:
        user = User.by_email(email)
        if user is None and missing_ok:
            return None
        if user is None:
            raise click.ClickException(f"no account with email {normalise_email(email)}")
    if not erased:
        _refuse_erased(user)
    return user


def _refuse_erased(user):
    """Refuse an erased account (users erase) to a command that would put it back in use. Checked when the
    command looks the account up, and again holding its row: it may have been erased meanwhile."""
    if user.email == erased_email(user.id):
        raise click.ClickException(f"account #{user.id} was erased (users erase): it cannot be used again. "
                                   "Nothing changed.")


_OTHER_ENCODING = "(a terminal or a script in another character encoding?)"


def _not_utf8(text):
    """Whether `text` holds characters that stand for no text: bytes that are not UTF-8 on the command line
    ($'\\xff@example.com' in the shell, a script saved in Latin-1) come to Python as lone surrogates, which
    no database driver can send (a UnicodeEncodeError traceback)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _utf8_text(ctx, param, value):
    """Argument and option callback: text that is not UTF-8 is refused in one line, as the bytes were typed
    ("\\xff@example.com"), before anything is looked up or changed."""
    if value is None or not _not_utf8(value):
        return value
    try:
        typed = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (not from the command line)
        typed = value.encode("utf-8", "backslashreplace").decode("utf-8")
    name = param.human_readable_name if isinstance(param, click.Argument) else param.opts[0]
    raise click.ClickException(f"{name} {typed} is not UTF-8 text {_OTHER_ENCODING}")


def _reason_text(value):
    """--reason as support's form takes a reason (support.EndWindowForm): trimmed, at most REASON_MAX characters, and
    nothing that hides or reorders what it says (a right-to-left override showed it reversed on the audit log
    page, an escape sequence recoloured the terminal of whoever ran `users activity`)."""
    if value is None:
        return None
    value = text_lines(value)
    if len(value) > REASON_MAX:
        raise click.ClickException(f"--reason can have at most {REASON_MAX} characters. Nothing changed.")
    if has_disguising_characters(value):
        raise click.ClickException("--reason may hold letters, digits, spaces, punctuation and line breaks only. "
                                   "Nothing changed.")
    return value or None


def _check_password(password):
    """The sign-in form's limits: a password it would refuse could never be used."""
    if _not_utf8(password):  # said without the password
        raise click.ClickException(f"the password is not UTF-8 text {_OTHER_ENCODING}")
    if not password.strip():
        raise click.ClickException("the password cannot be empty or only spaces: the sign-in form refuses it")
    if "\x00" in password:  # the app refuses any request with one (a 400), so it could never be typed there
        raise click.ClickException("the password cannot hold a NUL character: the sign-in form refuses it")
    if min(len(password), password_length(password)) < PASSWORD_MIN:  # as typed and as hashed, as the forms count
        raise click.ClickException(f"the password must have at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise click.ClickException(f"the password must have at most {PASSWORD_MAX} characters")
    if is_common_password(password):  # as the forms refuse it
        raise click.ClickException("the password is one of the most common ones, which are tried first: choose "
                                   "another")


def _named_account(ctx, param, value):
    """Argument callback: the account EMAIL names (_get_user), looked up before any password is asked for
    (the prompt comes after the arguments), so that a wrong address is said first."""
    return _get_user(_utf8_text(ctx, param, value))


def _already_exists(email):
    return click.ClickException(f"an account with email {normalise_email(email)} already exists")


def _new_account(ctx, param, value):
    """Argument callback: no account may have this address yet, said before any password is asked for."""
    if User.by_email(_utf8_text(ctx, param, value).strip()) is not None:
        raise _already_exists(value)
    return value


@users.command("create")
@click.argument("email", callback=_new_account)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True,
              help="Prompted for when left out.")
@click.option("--admin", is_flag=True, help="Give the account access to the Support page.")
def create_user(email, password, admin):
    """Create an account."""
    email = email.strip()  # as the other commands and the sign-in form take it
    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError as exc:
        raise click.ClickException(f"invalid email address: {exc}") from exc
    problem = lookalike_problem(email)
    if problem:
        raise click.ClickException(f"invalid email address: {problem}")
    _check_password(password)
    password_hash = hash_password(password)  # slow: outside the transaction
    try:
        with write_transaction():
            user = User.create(email=normalise_email(email), password_hash=password_hash, is_admin=admin)
            audit("account_created", user=user, via="cli", admin=admin)
    except IntegrityError:  # made meanwhile (a sign-up, /setup or another run): said, not a traceback
        raise _already_exists(email) from None
    click.echo(f"created {'admin ' if admin else ''}{user.email}")


def _wait_words(until, counted, current):
    """'locked until ... UTC' while a throttle's wait runs ('paused' during the short waits after the first
    failures, as the sign-in pages tell them apart: security.backoff), or None when there is no wait left."""
    until = wait_end(until, counted, current)  # as the sign-in pages say it, should the clock have gone back
    if until is None or until <= current:
        return None
    word = "locked" if is_lock(counted) else "paused"
    return f"{word} until {until:%Y-%m-%d %H:%M:%S} UTC"


def _counted_browsers(current, user=None):
    """The live known browsers (those a sign-in still consults) that count wrong passwords of their own, of
    `user` or of everyone; a browser past KNOWN_BROWSER_TTL is no longer consulted, whatever it counted."""
    query = KnownBrowser.select().where(
        (KnownBrowser.last_used_at > current - current_app.config["KNOWN_BROWSER_TTL"])
        & KnownBrowser.forgotten_at.is_null()  # consulted by nothing but the contact form
        & ((KnownBrowser.password_failures > 0) | KnownBrowser.password_locked_until.is_null(False)))
    return query.where(KnownBrowser.user == user.id) if user is not None else query


def _browsers_wait(browsers, current):
    """(how many of `browsers` make their password entry wait now, the longest wait in words or None)."""
    waiting = [b for b in browsers if b.password_locked_until is not None and b.password_locked_until > current]
    if not waiting:
        return 0, None
    latest = max(waiting, key=lambda b: b.password_locked_until)
    return len(waiting), _wait_words(latest.password_locked_until, latest.password_failures, current)


def _throttle_states(user, browsers, current):
    """What makes this account's sign-in wait right now, in words (empty when nothing does)."""
    states = []
    for what, until, counted in (("code entry", user.code_locked_until, user.code_strikes),
                                 ("password entry", user.password_locked_until, user.password_failures)):
        words = _wait_words(until, counted, current)
        if words:
            states.append(f"{what} {words}")
    waiting, words = _browsers_wait(browsers, current)
    if waiting:
        states.append(f"password entry in {waiting} known browser(s) {words}")
    return states


LIST_BATCH = 2000


def _accounts_in_batches(current):
    """(account, its device count, its known browsers that count wrong passwords) for every account, in
    batches of LIST_BATCH by address: the whole list was read at once (peewee keeps every row a query
    returned, psycopg fetches them all), a million accounts held in memory before the first line came out.
    By code point on both databases, as the Support page lists them: PostgreSQL's collation (en_US) ignores
    punctuation and accents, so the same accounts came in another order there than on SQLite. Each batch
    counts its devices and reads its browsers in one statement each, not one per account: 100,000 accounts
    took 13 s on SQLite that way."""
    email, after = _email_order(), None
    while True:
        page = User.select().order_by(email).limit(LIST_BATCH)
        batch = list(page if after is None else page.where(email > after))
        if not batch:
            return
        ids = [user.id for user in batch]
        devices_of = dict(Device.select(Device.user, fn.COUNT(Device.id)).where(Device.user.in_(ids))
                          .group_by(Device.user).tuples())
        browsers = {}
        for browser in _counted_browsers(current).where(KnownBrowser.user.in_(ids)):
            browsers.setdefault(browser.user_id, []).append(browser)
        for user in batch:
            yield user, devices_of.get(user.id, 0), browsers.get(user.id, [])
        after = batch[-1].email


@users.command("list")
def list_users():
    """List accounts with their role, whether the operator disabled them, their 2FA status (with support's time
    window, as the Support page shows it), and any wait that failed sign-in attempts put on their code or
    password entry (`users unlock` clears it)."""
    current = now()
    listed = False
    for user, devices, browsers in _accounts_in_batches(current):
        role = "admin" if user.is_admin else "user"
        until, window = user.tfa_reset_until, user.support_window(current)
        if devices:
            status = f"2FA active ({devices} device{'s' if devices != 1 else ''})"
        elif window is None:
            status = "2FA off"
        elif window == "open":
            status = f"2FA temporarily off: password alone until {until:%Y-%m-%d %H:%M} UTC (support)"
        else:
            status = f"blocked: support's window ended {until:%Y-%m-%d %H:%M} UTC without a new device"
        disabled = [f"disabled since {user.disabled_at:%Y-%m-%d %H:%M} UTC"] if user.disabled_at else []
        status = "; ".join([*disabled, status, *_throttle_states(user, browsers, current)])
        click.echo(f"{user.email}\t{role}\t{status}")
        listed = True
    if not listed:  # on stderr: a script reading the list gets no line it would take for an account
        click.echo(f"no accounts in {_database_name()}", err=True)


def _database_name():
    """The database this command used, without a password: listing nothing from the wrong one is easy to
    miss (without DATABASE_URL, a command uses the development instance's SQLite file)."""
    url = current_app.config["DATABASE_URL"]
    netloc = urlsplit(url).netloc
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = netloc.rpartition("@")
    if sep and at and ":" in userinfo and rest.startswith(netloc):
        # Only the user-info part changes: a Unix socket (no host) or an IPv6 host in brackets stays as given.
        url = f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{rest[len(netloc):]}"
    # libpq also takes the password as a parameter: ?password=...
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


@users.command("promote")
@click.argument("email", callback=_utf8_text)
@click.option("--revoke", is_flag=True, help="Take admin rights away instead.")
def promote(email, revoke):
    """Make an account an admin (or, with --revoke, an ordinary user)."""
    user = _get_user(email)
    with write_transaction():  # the person's row first, as every change to their sessions takes it
        if revoke:
            # Every admin's row, in id order (the person's among them): two revokes at once on PostgreSQL
            # each saw the other admin still there and left none. Now the second waits, then counts again.
            for_update(User.select(User.id).where(User.is_admin).order_by(User.id)).execute()
        User.lock(user.id)
        user = User.get_by_id(user.id)  # as it is now, under the lock
        _refuse_erased(user)
        if user.is_admin != revoke:  # already so: no sign-out, no audit record of a change that did not happen
            click.echo(f"{user.email} is already {'an ordinary user' if revoke else 'an admin'}; nothing changed")
            return
        if revoke:
            _refuse_last_admin(user)
        User.update(is_admin=not revoke).where(User.id == user.id).execute()
        ended = end_user_sessions(user)
        audit("role_changed", user=user, admin=not revoke, via="cli")
    click.echo(f"{user.email} is now {'an ordinary user' if revoke else 'an admin'}; {ended} session(s) ended "
               "(the new role applies from the next sign-in)")
    if not revoke and not user.has_2fa:
        # support.support_admin_required: the Support page opens only to admins whose own 2FA is active.
        click.echo(f"{user.email} has no authenticator device: the Support page stays closed to them until they "
                   "set up two-factor authentication in User Settings")


def _refuse_last_admin(user):
    """Refuse to leave no admin who can sign in (promote --revoke, disable): nobody could reach the Support page
    any more, and /setup does not come back while accounts exist. Call holding every admin's row."""
    others = User.select().where(User.is_admin & (User.id != user.id))
    if user.disabled_at is None and not others.where(User.disabled_at.is_null()).exists():
        which = "admin whose account is not disabled" if others.exists() else "admin"
        raise click.ClickException(f"{user.email} is the only {which}: promote another account first. "
                                   "Nothing changed.")


@users.command("disable")
@click.argument("email", callback=_utf8_text)
@click.option("--reason", callback=lambda ctx, param, value: _reason_text(_utf8_text(ctx, param, value)),
              help="Why (kept in the audit record): someone who left, an account in other hands.")
def disable(email, reason):
    """Take an account out of use: it cannot sign in, and its sessions, half-finished sign-ins and unfinished
    set-ups of an authenticator app end now. Its devices and password stay, for `users enable`. Audited."""
    user = _get_user(email)
    with write_transaction():
        # Every admin's row first, in id order, as promote --revoke takes them: two commands leaving the last
        # two admins out of use at once each wait for the other, then count again (_refuse_last_admin).
        for_update(User.select(User.id).where(User.is_admin).order_by(User.id)).execute()
        User.lock(user.id)
        user = User.get_by_id(user.id)  # as it is now, under the lock
        if user.disabled_at is not None:
            click.echo(f"{user.email} is already disabled (since {user.disabled_at:%Y-%m-%d %H:%M} UTC); "
                       "nothing changed")
            return
        if user.is_admin:
            _refuse_last_admin(user)
        User.update(disabled_at=now()).where(User.id == user.id).execute()
        sign_ins = end_code_steps(user)
        set_ups = PendingEnrolment.delete().where(PendingEnrolment.user == user.id).execute()
        ended = end_user_sessions(user)
        audit("account_disabled", user=user, via="cli", reason=reason, sessions_ended=ended,
              sign_ins_ended=sign_ins, set_ups_ended=set_ups)
    click.echo(f"{user.email} is disabled: {ended} session(s), {sign_ins} half-finished sign-in(s) and {set_ups} "
               "unfinished authenticator set-up(s) ended; devices and password unchanged (`users enable` undoes it)")


@users.command("enable")
@click.argument("email", callback=_utf8_text)
def enable(email):
    """Put a disabled account back in use: it signs in again as before, with its devices and password.
    Audited. A session of the account left from before (none should be: disable ended them, and the app
    refuses them) ends, so that nothing opened before the disable comes back with this."""
    user = _get_user(email)
    with write_transaction():
        User.lock(user.id)
        user = User.get_by_id(user.id)  # as it is now, under the lock
        _refuse_erased(user)
        if user.disabled_at is None:
            click.echo(f"{user.email} is not disabled; nothing changed")
            return
        User.update(disabled_at=None).where(User.id == user.id).execute()
        left = end_user_sessions(user)
        audit("account_enabled", user=user, via="cli", disabled_since=user.disabled_at,
              **({"sessions_ended": left} if left else {}))
        # As things are now, not "as before": set-password or reset-2fa may have run while it was disabled (the
        # order a takeover is cleaned up in), and "devices and password unchanged" then read as if they had not.
        devices = Device.select().where(Device.user == user.id).count()
    ended = f"; {left} session(s) left from before ended" if left else ""
    if devices:
        how = f"signs in with its current password and a code from {devices} authenticator device(s)"
    elif user.support_window() == "ended":  # fail closed (security.md 39): the password alone opens nothing
        how = ("still cannot sign in: support's window ended without a new device (a new window, or users "
               "reset-2fa for the password alone)")
    else:
        how = "signs in with its current password and no code (no authenticator device)"
    click.echo(f"{user.email} is enabled again: it {how}{ended}")


@users.command("reset-2fa")
@click.argument("email", callback=_utf8_text)
def reset_2fa(email):
    """Remove every authenticator device of an account and end its sessions (operator's last resort)."""
    user = _get_user(email)
    if user.tfa_reset_until is None and not Device.select().where(Device.user == user.id).exists():
        click.echo(f"{user.email} has no authenticator device; nothing changed")
        return
    with write_transaction():  # BEGIN IMMEDIATE on SQLite, like the app's own writers
        removed, ended, details = revoke_second_factor(user)  # half-finished sign-ins go too (their code step fails)
        audit("tfa_reset", user=user, via="cli", devices_removed=removed, **details)
    click.echo(f"removed {removed} device(s) of {user.email}; 2FA is off; {ended} session(s) ended")


@users.command("set-password")
@click.argument("user", metavar="EMAIL", callback=_named_account)
@click.option("--password", prompt="New password", hide_input=True, confirmation_prompt=True,
              help="Prompted for when left out (better: it stays out of the shell's history).")
def set_password(user, password):
    """Give an account a new password (a forgotten one, or one that leaked): every session of the account
    ends and its password throttle starts over. Two-factor authentication stays as it is."""
    _check_password(password)
    password_hash = hash_password(password)  # slow: before the transaction
    with write_transaction():
        User.lock(user.id)
        _refuse_erased(User.get_by_id(user.id))  # erased while the password was asked for or hashed
        ended = replace_password(user, password_hash, via="cli")
    click.echo(f"new password set for {user.email}; {ended} session(s) ended")


@users.command("unlock")
@click.argument("email", callback=_utf8_text)
def unlock(email):
    """Clear the failed sign-in attempts counted against an account, so that its owner can sign in again at
    once: the code entry's throttle (refused codes, strikes, lock) and the password entry's, the account's own
    and that of each of its known browsers. Nothing else changes: sessions, devices, half-finished sign-ins
    and known browsers stay. Audited (throttle_cleared). An operator's decision, like reset-2fa: the counters
    otherwise start over only after a correct code or password (security.md 19).

    Why the known browsers too: a wrong password typed in a browser the person signed in from counts against
    that browser, not the account (auth.password_check), so a stranger's guesses lock everyone else out but
    not the owner's usual browser. What locks the owner out there is the wrong passwords typed in it, most
    often their own; the account's counter is only what they meet in a browser not known for them. The
    operator cannot tell which browser the person will use, so both go."""
    user = _get_user(email)
    with write_transaction():  # the person's row first, as every change to their sign-in state takes it
        User.lock(user.id)
        user = User.get_by_id(user.id)  # as it is now, under the lock
        current = now()
        browsers = list(_counted_browsers(current, user))
        cleared, detail = [], {}
        if user.code_failures or user.code_strikes or user.code_locked_until is not None:
            words = _wait_words(user.code_locked_until, user.code_strikes, current)
            cleared.append(f"code entry ({user.code_failures} refused code(s){', ' + words if words else ''})")
            detail.update(code_failures=user.code_failures,
                          **_lifted("code_locked_until", user.code_locked_until, current))
        if user.password_failures or user.password_locked_until is not None:
            words = _wait_words(user.password_locked_until, user.password_failures, current)
            cleared.append(f"password entry ({user.password_failures} wrong password(s)"
                           f"{', ' + words if words else ''})")
            detail.update(password_failures=user.password_failures,
                          **_lifted("password_locked_until", user.password_locked_until, current))
        if browsers:
            failures = sum(b.password_failures for b in browsers)
            waiting, words = _browsers_wait(browsers, current)
            cleared.append(f"password entry in {len(browsers)} known browser(s) ({failures} wrong password(s)"
                           f"{f', {waiting} of them {words}' if waiting else ''})")
            detail.update(known_browsers=len(browsers), known_browser_failures=failures)
        if not cleared:
            click.echo(f"{user.email} has no failed sign-in attempts counted; nothing to clear; nothing changed")
            return
        User.update(code_failures=0, code_strikes=0, code_locked_until=None, password_failures=0,
                    password_locked_until=None).where(User.id == user.id).execute()
        if browsers:
            KnownBrowser.update(password_failures=0, password_locked_until=None).where(
                KnownBrowser.id.in_([b.id for b in browsers])).execute()
        audit("throttle_cleared", user=user, via="cli", **detail)
    click.echo(f"cleared for {user.email}: {'; '.join(cleared)}; nothing else changed")


def _lifted(key, until, current):
    """{key: until} for the audit record when that wait was still running, else nothing."""
    return {key: until} if until is not None and until > current else {}


def erased_email(user_id):
    """What an erased account's address becomes: unique, never a valid address (email-validator refuses the
    reserved .invalid domain, so no sign-up or `users create` can take it) and already in its normal form."""
    return f"erased-{user_id}@erased.invalid"


@users.command("erase")
@click.argument("email", callback=_utf8_text)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
def erase(email, yes):
    """Erase a person (an erasure request): their devices, sessions, known browsers (those forgotten lately
    too), half-finished sign-ins and set-ups, and every contact request from their account or sent in their
    email address (in any spelling of it: its normal form decides, not a look-alike's) are deleted.
    The account stays as a disabled row named erased-NUMBER@erased.invalid with an unknown password, so its
    number is never given to another account and the audit records keep pointing at it. The audit records
    stay (security events: README "Personal data"). Cannot be undone. Audited.

    An address no account has: the contact requests sent in it (in any spelling) are deleted (someone without
    an account who wrote to support)."""
    user = _get_user(email, erased=True, missing_ok=True)
    if user is None:
        _erase_requests_only(normalise_email(email), yes)
        return
    if user.email == erased_email(user.id):
        click.echo(f"account #{user.id} is already erased; nothing changed")
        return
    if not yes:
        click.confirm(f"Erase {user.email} (account #{user.id}) for good? This cannot be undone", abort=True)
    placeholder = hash_password(secrets.token_urlsafe(32))  # nobody knows it (outside the transaction: slow)
    with write_transaction():
        # Every admin's row first, in id order, as disable and promote --revoke take them (_refuse_last_admin).
        for_update(User.select(User.id).where(User.is_admin).order_by(User.id)).execute()
        User.lock(user.id)
        user = User.get_by_id(user.id)  # as it is now, under the lock
        if user.email == erased_email(user.id):  # by another run meanwhile
            click.echo(f"account #{user.id} is already erased; nothing changed")
            return
        if user.is_admin:
            _refuse_last_admin(user)
        address = user.email
        # The name the contact form holds from its count to its commit (support._take_request): a request in
        # this address being stored now is waited for, and deleted below; none can be stored until this commits.
        # The form names it in its normal form, which an account the upgrade could not re-spell does not hold.
        lock_keys("contact-email:" + normalise_email(address))
        # By number, as every other removal records them (security.revoke_second_factor): what the records of
        # each device's sign-ins name it by. Not by name: the erasure does not copy what the person typed.
        device_ids = [d.id for d in Device.select(Device.id).where(Device.user == user.id).order_by(Device.id)]
        devices = Device.delete().where(Device.user == user.id).execute()
        sign_ins = end_code_steps(user)
        set_ups = PendingEnrolment.delete().where(PendingEnrolment.user == user.id).execute()
        sessions = end_user_sessions(user) + _end_sessions_naming(user)
        # Deleted, not forgotten (security.forget_browsers): those forgotten lately too.
        browsers = KnownBrowser.delete().where(KnownBrowser.user == user.id).execute()
        requests = SupportRequest.delete().where(_requests_of(address, user)).execute()
        User.update(email=erased_email(user.id), password_hash=placeholder, is_admin=False, last_login_at=None,
                    password_failures=0, password_locked_until=None, code_failures=0, code_strikes=0,
                    code_locked_until=None, tfa_reset_until=None,
                    disabled_at=user.disabled_at or now()).where(User.id == user.id).execute()
        # No address in the record: the erased one would stay in it, and in the log line that copies it.
        audit("account_erased", user=user, via="cli", devices_removed=devices, device_ids=device_ids or None,
              sessions_ended=sessions, requests_deleted=requests)
    click.echo(f"erased {address}: it is now {erased_email(user.id)}, disabled; deleted {devices} device(s), "
               f"{sessions} session(s), {browsers} known browser(s), {sign_ins + set_ups} half-finished sign-in(s) "
               f"and set-up(s), {requests} contact request(s). Its {_audit_count(user)} audit record(s) stay "
               "(README \"Personal data\")")


def _erase_requests_only(address, yes):
    """users erase for an address without an account: delete the contact requests sent in it, audited (the
    record names no address, as account_erased does)."""
    count = _requests_in(address).count()
    if not yes:
        click.confirm(f"No account has {address}. Delete the {count} contact request(s) sent in it for good? This "
                      "cannot be undone", abort=True)
    with write_transaction():
        # As erase: a request in this address being stored now is waited for, and deleted too.
        lock_keys("contact-email:" + address)
        deleted = SupportRequest.delete().where(_requests_of(address)).execute()
        if deleted:
            audit("contact_requests_erased", via="cli", requests_deleted=deleted)
    click.echo(f"deleted {deleted} contact request(s) sent in {address}, which no account has. Their audit "
               "record(s) stay (README \"Personal data\")")


def _requests_in(address):
    """The contact requests sent in `address` (normalised), in whatever spelling they were stored
    (_requests_of), for export and erase when no account has it; the usual error when there are none either."""
    requests = SupportRequest.select().where(_requests_of(address))
    if not requests.exists():
        raise click.ClickException(f"no account and no contact request with email {address}")
    return requests


def _requests_of(address, user=None):
    """Which contact requests are the person's, as a condition: those from their account (`user`), and those no
    account holds that were sent in their address, whatever spelling they were stored in (_spellings_of):
    before 2026-12-05 an address was stored as typed, only trimmed and lower-cased, so a request sent in
    "Zoë@ＭÜＮＣＨＥＮ.de" holds "zoë@ｍüｎｃｈｅｎ.de", and one sent before the upgrade re-spelled the account
    (email_respelled) holds the account's old spelling."""
    unlinked = SupportRequest.user.is_null()
    stored = (SupportRequest.select(SupportRequest.email).distinct()
              .where(unlinked & (SupportRequest.email.in_(sorted({address, normalise_email(address)}))
                                 | maybe_not_normal(SupportRequest.email))).tuples())
    mine = unlinked & SupportRequest.email.in_(_spellings_of(address, [email for (email,) in stored]))
    return mine if user is None else (SupportRequest.user == user.id) | mine


def _spellings_of(address, stored):
    """Those of the addresses `stored` (as stored) that are `address` in some spelling: the same normal form
    (normalise_email), so not a look-alike address ("ｚｏë@" with full-width letters, a Cyrillic "о"), which
    is another mailbox. Not one that another account holds exactly: one mailbox in several spellings (the
    start-up warning, README "Upgrades"), whose accounts each keep what came in their own spelling."""
    normal = normalise_email(address)
    same = {s for s in stored if isinstance(s, str) and (s == address or normalise_email(s) == normal)}
    others = sorted(same - {address})
    taken = User.select(User.email).where(User.email.in_(others)).tuples() if others else []
    return sorted(same - {email for (email,) in taken})


def _sessions_naming(user):
    """The sessions not signed in that still name the person: a browser at the code step keeps the address
    typed at the password step (auth._SIGN_IN_EMAIL), one refused after the right password the account's
    number (auth.BLOCKED_SIGN_IN). Their data is JSON text: the few that mention either key are read (LIKE's
    `_` matches any character, so each is checked), and those naming this person returned."""
    from .auth import _SIGN_IN_EMAIL, BLOCKED_SIGN_IN

    rows = [(row, json.loads(row.data or "{}")) for row in ServerSession.select().where(
        ServerSession.user.is_null()
        & (ServerSession.data.contains(_SIGN_IN_EMAIL) | ServerSession.data.contains(BLOCKED_SIGN_IN)))]
    # The address as the account held it then: its old spelling in a session begun before the upgrade
    # re-spelled it (_spellings_of).
    spellings = set(_spellings_of(user.email, [data.get(_SIGN_IN_EMAIL) for _, data in rows]))
    naming = []
    for row, data in rows:
        blocked, email = data.get(BLOCKED_SIGN_IN), data.get(_SIGN_IN_EMAIL)
        if (isinstance(email, str) and email in spellings) or (
                isinstance(blocked, dict) and blocked.get("user") == user.id):
            naming.append(row)
    return sorted(naming, key=lambda row: (row.created_at, row.id))


def _end_sessions_naming(user):
    """Delete the sessions not signed in that still name the person (_sessions_naming)."""
    naming = [row.id for row in _sessions_naming(user)]
    return ServerSession.delete().where(ServerSession.id.in_(naming)).execute() if naming else 0


def _audit_count(user):
    return AuditEvent.select().where((AuditEvent.user == user.id) | (AuditEvent.actor == user.id)).count()


@users.command("activity")
@click.argument("email", callback=_utf8_text)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000),
              help="How many events, newest first (1 to 10000).")
def activity(email, limit):
    """Show an account's recent security events in plain words (read-only, like the audit log page)."""
    user = _get_user(email, erased=True)
    query = list(person_events(user.id, limit=limit))
    # The other side of each event, by address: the admin who acted on this account, or the account this
    # one acted on (support's disables, for example). One query for the page.
    others = {e.user_id for e in query if e.user_id != user.id} | {e.actor_id for e in query if e.actor_id}
    others.discard(user.id)
    emails = dict(User.select(User.id, User.email).where(User.id.in_(sorted(others))).tuples()) if others else {}
    for event in query:
        if event.user_id != user.id:
            who = " (done by this account" + (f", on {emails[event.user_id]})" if event.user_id in emails else ")")
        elif event.actor_id and event.actor_id != user.id:
            who = f" (by {emails.get(event.actor_id, 'a deleted account')})"
        else:
            who = ""
        # One event, one line: a reason support typed may hold line breaks, which printed as they are made lines
        # that read as events of their own.
        details = one_line("; ".join(f"{label}: {value}" for label, value in detail_text(event.details, event.kind)))
        click.echo(f"{_fmt_time(event.created_at, seconds=True)}  {event_text(event.kind, event.details)}{who}"
                   + (f"  [{details}]" if details else "") + (f"  from {one_line(event.ip)}" if event.ip else ""))


@users.command("export")
@click.argument("email", callback=_utf8_text)
def export_person(email):
    """Write what is stored about one person as JSON to standard output, for an access request (read-only;
    umask 077 before redirecting it to a file): the account (with its counts of wrong passwords and codes),
    its devices (names and dates, never a secret), its sessions (those past their timeout too, until the
    purge deletes them), known browsers (those forgotten lately too, with when), half-finished sign-ins and
    set-ups, the contact requests from the account or sent in its email address (in any spelling of it), and
    the audit records about the account, with those of the requests sent in its address with no account
    named. Records of what an admin did to it say only that it was an admin, without the admin's address or
    IP address (User Settings shows neither); records of what the account did to others (an admin's) say
    only what and when.

    An address no account has: the contact requests sent in it, each with its audit record (someone without
    an account who wrote to support)."""
    user = _get_user(email, erased=True, missing_ok=True)
    if user is None:
        _export_requests_only(normalise_email(email))
        return
    current, stamp, cfg = now(), _json_time, current_app.config
    # Every session of the person's that is stored: one past its timeout is refused, but its row (IP address,
    # browser) stays until the purge (PURGE_INTERVAL, or cron's purge-expired when that is turned off).
    sessions = list(ServerSession.select().where(ServerSession.user == user.id).order_by(ServerSession.created_at,
                                                                                        ServerSession.id))
    # A browser between the password and the code (or refused after the right password) has a session of its
    # own, not yet the account's, that names the person: listed apart, as it was never signed in.
    naming = _sessions_naming(user)

    def ended(s):  # as sessions.open_session decides it
        return (expired(s.last_seen_at, cfg["SESSION_IDLE_TIMEOUT"], current)
                or expired(s.created_at, cfg["SESSION_ABSOLUTE_TIMEOUT"], current))

    requests = list(SupportRequest.select().where(_requests_of(user.email, user))
                    .order_by(SupportRequest.created_at, SupportRequest.id))
    # The records of the requests sent in the person's address with no account named (before it was made, or
    # in a spelling it was not found by then): the sender's exact IP address, as for an address without one.
    sent_in_address = _request_records([r for r in requests if r.user_id is None])
    theirs = {e.id for e in sent_in_address}

    def audit_record(e):
        details = e.details
        base = {"id": e.id, "time": stamp(e.created_at), "kind": e.kind, "event": event_text(e.kind, details)}
        if e.user_id != user.id and e.id not in theirs:
            # done by this account, to another one or to none: their details are not its own
            return {**base, "about_this_account": False}
        by_admin = e.actor_id not in (None, user.id)
        return {**base, "about_this_account": True, "by_an_admin": by_admin, "ip": None if by_admin else e.ip,
                "details": details}

    record = {
        "account": {"number": user.id, "email": user.email, "created": stamp(user.created_at),
                    "last_sign_in": stamp(user.last_login_at), "admin": user.is_admin,
                    "disabled_since": stamp(user.disabled_at), "support_window_until": stamp(user.tfa_reset_until),
                    "wrong_passwords": user.password_failures,
                    "passwords_refused_until": stamp(user.password_locked_until),
                    "wrong_codes": user.code_failures, "codes_refused_until": stamp(user.code_locked_until)},
        "devices": [{"number": d.id, "name": d.name, "added": stamp(d.created_at), "last_used": stamp(d.last_used_at)}
                    for d in Device.select().where(Device.user == user.id).order_by(Device.created_at, Device.id)],
        "sessions": [{"signed_in": stamp(s.created_at), "last_seen": stamp(s.last_seen_at), "ip": s.ip,
                      "browser": printable_agent(s.user_agent) or None, "expired": ended(s)} for s in sessions],
        "browsers_not_signed_in": [{"started": stamp(s.created_at), "last_seen": stamp(s.last_seen_at), "ip": s.ip,
                                    "browser": printable_agent(s.user_agent) or None, "expired": ended(s)}
                                   for s in naming],
        # Those forgotten too (with when), until the purge: the contact form still knows them.
        "known_browsers": [{"first_sign_in": stamp(b.created_at), "last_used": stamp(b.last_used_at),
                            "wrong_passwords": b.password_failures,
                            "passwords_refused_until": stamp(b.password_locked_until),
                            "forgotten": stamp(b.forgotten_at)}
                           for b in KnownBrowser.select().where(KnownBrowser.user == user.id)
                           .order_by(KnownBrowser.created_at)],
        "sign_ins_waiting_for_a_code": [
            {"started": stamp(c.created_at), "wrong_codes": c.failures, "going_to": c.next_url}
            for c in SignInChallenge.select().where(SignInChallenge.user == user.id)
            .order_by(SignInChallenge.created_at)],
        "devices_being_set_up": [  # never the key
            {"started": stamp(p.created_at), "wrong_codes": p.failures}
            for p in PendingEnrolment.select(PendingEnrolment.created_at, PendingEnrolment.failures)
            .where(PendingEnrolment.user == user.id).order_by(PendingEnrolment.created_at)],
        "contact_requests": [_request_json(r) for r in requests],
    }
    # The audit records last, written as they are read (_person_records): a person under attack or an admin has
    # 100,000 and more, and all of them in one list, then in one string, took 360 MB per 100,000. The
    # document is the one json.dumps(indent=2) writes.
    click.echo(_export_json(record)[:-2] + ',\n  "audit_records": [', nl=False)
    written, chunk = 0, []
    for e in heapq.merge((e for e in _person_records(user.id) if e.id not in theirs), sent_in_address,
                         key=lambda e: (e.created_at, e.id)):
        chunk.append(_export_json(audit_record(e)).replace("\n", "\n    "))
        if len(chunk) == EXPORT_BATCH:  # one write a batch (click.echo flushes each time)
            click.echo(("," if written else "") + "\n    " + ",\n    ".join(chunk), nl=False)
            written, chunk = written + len(chunk), []
    if chunk:
        click.echo(("," if written else "") + "\n    " + ",\n    ".join(chunk), nl=False)
    click.echo("\n  ]\n}" if written or chunk else "]\n}")


# Characters json.dumps writes as they are when it keeps letters readable (ensure_ascii off) but that act on
# the terminal the JSON is printed to, or on how the text around them reads: DEL and the C1 controls (the CSI
# starts an escape sequence), format characters (the bidirectional overrides, zero-width spaces) and the line
# and paragraph separators; lone surrogates too, which no terminal can be sent. The controls below 32 it
# escapes itself. Stored text may hold them: a sign-in's target from before safe_next refused them, rows from
# before other checks, a contact message or support's reason (format characters such as U+200F).
_ACTIVE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}
_NOT_ASCII = re.compile(r"[^\x00-\x7e]")


def _escaped(match):
    c = match.group()
    return json.dumps(c)[1:-1] if unicodedata.category(c) in _ACTIVE_CATEGORIES else c


def _export_json(value):
    """`value` as `users export` writes it: JSON with indent 2, letters of every alphabet as they are (an
    address "zoë@..." reads as such), and every character that could act on the operator's terminal as a
    \\u escape (_ACTIVE_CATEGORIES), which any JSON reader turns back into the character stored."""
    return _NOT_ASCII.sub(_escaped, json.dumps(value, indent=2, ensure_ascii=False))


def _request_json(r):
    return {"sent": _json_time(r.created_at), "email": r.email, "message": r.message, "ip": r.ip,
            "handled": _json_time(r.handled_at)}


def _export_requests_only(address):
    """users export for an address without an account: its contact requests, and each one's audit record
    (_request_records)."""
    requests = list(_requests_in(address).order_by(SupportRequest.created_at, SupportRequest.id))
    records = _request_records(requests)
    click.echo(_export_json({
        "account": None,
        "contact_requests": [_request_json(r) for r in requests],
        "audit_records": [{"id": e.id, "time": _json_time(e.created_at), "kind": e.kind,
                           "event": event_text(e.kind, e.details), "ip": e.ip, "details": e.details}
                          for e in records],
    }))


def _request_records(requests):
    """The audit record of each of the contact `requests` (support_request, with the sender's exact IP address:
    the request keeps only the network), oldest first, found as the Support page finds it: the record
    written with the request, naming its number (support._WRITTEN_TOGETHER)."""
    records = []
    for r in requests:
        near = AuditEvent.select().where(
            (AuditEvent.kind == "support_request")
            & (AuditEvent.user.is_null() if r.user_id is None else AuditEvent.user == r.user_id)
            & AuditEvent.created_at.between(r.created_at - _WRITTEN_TOGETHER, r.created_at + _WRITTEN_TOGETHER))
        records += [e for e in near if e.details.get("request") == r.id]
    return sorted(records, key=lambda e: (e.created_at, e.id))


def _person_records(person_id):
    """Every audit record about the person or done by them, oldest first (by time, then id), EXPORT_BATCH at a
    time from each side: about them on the (user, created_at) index, by them on (actor, created_at), those
    about themselves by themselves on the first side only."""
    about = AuditEvent.user == person_id
    by = (AuditEvent.actor == person_id) & (AuditEvent.user.is_null() | (AuditEvent.user != person_id))
    return heapq.merge(_in_batches(about), _in_batches(by), key=lambda e: (e.created_at, e.id))


def _in_batches(condition):
    """The audit records meeting `condition` by time, then id, each batch a query of its own from after the last
    one read (psycopg reads a whole result before it hands over a row: export_audit)."""
    query = AuditEvent.select().where(condition).order_by(AuditEvent.created_at, AuditEvent.id).limit(EXPORT_BATCH)
    batch = list(query)
    while batch:
        yield from batch
        if len(batch) < EXPORT_BATCH:
            return
        last = batch[-1]
        # The >= alone bounds the index range; the OR alone would have each batch read from the first record.
        batch = list(query.where(AuditEvent.created_at >= last.created_at,
                                 (AuditEvent.created_at > last.created_at) | (AuditEvent.id > last.id)))


def _json_time(value):
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


@keys.command("rotate")
def rotate_keys():
    """Re-encrypt every stored TOTP secret with the first key in TOTP_ENCRYPTION_KEYS (under `make run`, the
    first key in instance/totp_keys)."""
    count = 0
    # All or nothing: a secret that no key opens leaves every secret as it was. BEGIN IMMEDIATE on SQLite: a
    # deferred transaction that read first could not start writing while the app's sign-ins write.
    with write_transaction():
        # The waiting keys first: a wizard completed meanwhile copies its waiting key's ciphertext into a new
        # device (settings.complete), committed before the devices are read (PostgreSQL reads what each
        # statement finds committed) or waiting for this transaction's row of that key, so it is re-encrypted
        # either way. Read first, the devices missed it, and it kept the old key's ciphertext.
        for model in (PendingEnrolment, Device):
            for row in model.select(model.id, model.user, model.secret_enc):
                try:
                    secret = reencrypt_secret(row.secret_enc)
                except SecretError:
                    owner = User.get_by_id(row.user_id).email
                    raise click.ClickException(
                        f"{model.__name__.lower()} {row.id} ({owner}'s): its secret opens with none of "
                        f"{keys_source(current_app.config)}. Add the key it was encrypted with (after the new "
                        "one) and run this again. Nothing was changed.") from None
                model.update(secret_enc=secret).where(model.id == row.id).execute()
                count += 1
        # In the same transaction: recorded only when the secrets were re-encrypted, and always when they were.
        audit("totp_keys_rotated", user=None, via="cli", count=count)
    click.echo(f"re-encrypted {count} secret(s) with the newest key")


def _counted_now(current):
    """The per-network counts whose hour is still running (older rows are only waiting for the purge)."""
    return NetworkCounter.select().where(NetworkCounter.window_start > current - NetworkCounter.WINDOW)


@networks.command("list")
def list_networks():
    """The client networks counted by a per-network limit in their current hour, the most counted first
    (read-only): sign-ups, wrong passwords and unknown addresses at sign-in, contact requests per IPv6 /48.
    A network is an IPv4 address, an IPv6 /64 or, for contact requests, an IPv6 /48."""
    current = now()
    rows = list(_counted_now(current).order_by(NetworkCounter.hits.desc(), NetworkCounter.purpose,
                                               NetworkCounter.network))
    if not rows:
        click.echo("no network has been counted in the last hour")
        return
    for row in rows:
        limit = network_limit(row.purpose)
        ends = row.window_start + NetworkCounter.WINDOW
        if not limit:
            state = "limit turned off"
        elif row.hits >= limit:
            state = f"full: refused until {ends:%Y-%m-%d %H:%M:%S} UTC"
        else:
            state = f"{limit - row.hits} left until {ends:%Y-%m-%d %H:%M:%S} UTC"
        click.echo(f"{row.network}  {row.purpose}  {row.hits} of {limit or '-'}  {state}")


def _networks_of(text):
    """What `networks clear` takes for `text`: (the counted networks of an IP address: its /64 and /48 when
    IPv6, None, False), (None, the network typed, False), or, for anything else, ({text}, None, True): a client
    address that is no address (a proxy's "unknown") is counted as it came, and `networks list` shows it so."""
    text = text.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return {text}, None, True
        if network.num_addresses > 1:
            return None, network, False
        address = network.network_address  # a /32 or /128 is that one address: cleared as the address is
    return {client_network(str(address)), client_network_48(str(address))} - {None}, None, False


def _inside(stored, network):
    """Whether a counted network (an IPv4 address, an IPv6 /64 or /48) lies within `network`."""
    try:
        return ipaddress.ip_network(stored, strict=False).subnet_of(network)
    except (ValueError, TypeError):  # a proxy's odd header counted as it came; the other IP version
        return False


@networks.command("clear")
@click.argument("address", callback=_utf8_text)
@click.option("--limit", "purpose", type=click.Choice(sorted(NETWORK_LIMITS)),
              help="Only this limit's count (all of them when left out).")
def clear_network(address, purpose):
    """Let a network in again at once: delete what the per-network limits counted for ADDRESS this hour. An
    IP address clears what its client was counted under (for IPv6 its /64 and its /48); a network clears
    every count within it (203.0.113.0/24: each address counted in it; a /48: it and its /64s). For an
    office or a carrier behind one address that a stranger's guesses filled; a limit that keeps filling is
    better raised (FAILED_SIGNINS_PER_HOUR, SIGNUPS_PER_HOUR) or turned off. Audited (network_count_cleared)."""
    exact, network, literal = _networks_of(address)
    with write_transaction():
        query = _counted_now(now())
        if exact:
            query = query.where(NetworkCounter.network.in_(sorted(exact)))
        if purpose:
            query = query.where(NetworkCounter.purpose == purpose)
        rows = [row for row in for_update(query.order_by(NetworkCounter.purpose, NetworkCounter.network))
                if network is None or _inside(row.network, network)]
        if not rows and literal and not _counted_now(now()).where(NetworkCounter.network.in_(exact)).exists():
            raise click.UsageError(f"{address.strip()!r} is not an IP address or network (203.0.113.7, "
                                   "2001:db8:1:2::/64), nor anything else `networks list` shows this hour")
        if not rows:
            where = f"for {', '.join(sorted(exact))}" if exact else f"within {network}"
            under = f" under {purpose}" if purpose else ""  # the address may be counted under another limit
            click.echo(f"nothing counted this hour{under} {where}; nothing changed")
            return
        NetworkCounter.delete().where(NetworkCounter.id.in_([r.id for r in rows])).execute()
        for row in rows:
            audit("network_count_cleared", user=None, via="cli", limit=row.purpose, network=row.network,
                  hits=row.hits)
    for row in rows:
        click.echo(f"cleared {row.network}  {row.purpose}  ({row.hits} counted)")


@click.command("purge-expired", cls=_Command)
@with_appcontext
def purge_expired():
    """Delete expired sessions, sign-in challenges and pending enrolments, known browsers unused for 180 days
    or forgotten 30 days ago, per-network counts whose hour is over and contact requests handled longer ago than
    HANDLED_REQUESTS_KEEP_DAYS (each app process also does this by itself every PURGE_INTERVAL_SECONDS; safe
    to run from cron as well)."""
    sessions, challenges, enrolments, browsers, counters, requests = purge(current_app.config, now())
    click.echo(f"deleted {sessions} session(s), {challenges} sign-in challenge(s), "
               f"{enrolments} pending enrolment(s), {browsers} known browser(s), "
               f"{counters} per-network counter(s), {requests} handled contact request(s)")


@click.command("backup", cls=_Command)
@click.argument("path", type=click.Path(dir_okay=False))
@with_appcontext
def backup(path):
    """Copy the SQLite database to PATH while the app runs, with SQLite's own backup (a consistent copy; cp
    may miss what is still in the -wal file). The copy is private to this user (mode 600) and takes the name
    PATH only once PRAGMA quick_check has passed, so a failed backup leaves no file that looks like one; a
    database without any account (a mistyped DATABASE_URL) is refused. PATH must not exist yet. The TOTP
    encryption keys are not in it: keep them apart. PostgreSQL: pg_dump."""
    if not is_sqlite():
        raise click.ClickException("the database is PostgreSQL: back it up with pg_dump -Fc (README \"Backups\")")
    source = os.path.realpath(db.obj.database)
    path = os.path.abspath(path)  # not resolved: a symlink at PATH is a file that exists (lexists below)
    folder = os.path.dirname(path)
    if os.path.realpath(path) in {source, source + "-wal", source + "-shm", source + "-journal"}:
        raise click.ClickException(f"{path} is the database itself: name a file elsewhere")
    if not os.path.isdir(folder):
        raise click.ClickException(f"there is no folder {folder}: create it first, writable by this user")
    if os.path.lexists(path):
        raise click.ClickException(f"{path} already exists: name another file, or remove it first")
    try:
        fd, partial = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")  # mode 600
    except OSError as exc:
        raise click.ClickException(f"cannot write in {folder}: {exc.strerror}") from None
    os.close(fd)
    try:
        _copy_checked(source, partial)
        _take_name(partial, path)
    finally:
        if os.path.exists(partial):  # kept under PATH now (a second name), or a failed copy
            os.unlink(partial)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the new name outlives a power cut too
    finally:
        os.close(directory)
    click.echo(f"backed up {source} to {path} ({os.path.getsize(path)} bytes; quick check ok). The TOTP "
               "encryption keys are not in it: keep a copy of them apart from it")


# What link(2) answers on a file system without hard links (FAT, some network ones; EPERM on a few).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _take_name(partial, path):
    """Give the finished copy the name PATH, never replacing a file of that name: a hard link fails if the name
    exists, in one step (a look before a rename left a moment in which a file made meanwhile was replaced).
    On a file system without hard links, the look and the rename."""
    try:
        os.link(partial, path)
        return
    except FileExistsError:
        raise click.ClickException(f"{path} appeared while the backup ran: the copy is not kept") from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise click.ClickException(f"cannot name the copy {path}: {exc.strerror}; nothing was kept") from None
    if os.path.lexists(path):
        raise click.ClickException(f"{path} appeared while the backup ran: the copy is not kept")
    os.replace(partial, path)


def _copy_checked(source, target):
    """SQLite's online backup of `source` (opened read-only) into the file `target`, then PRAGMA quick_check on
    the copy, a look for an account in it, and fsync."""
    try:
        reader = sqlite3.connect(f"file:{quote(source)}?mode=ro", uri=True, timeout=10)
        try:
            copy = sqlite3.connect(target)
            try:
                reader.backup(copy)
                # One file, readable where it lies: the backup copied the live database's WAL mode, and reading
                # a WAL database writes a -wal and a -shm file beside it (refused in a folder the reader may
                # not write to). A restored copy is put back in WAL mode by the app's start (db.SQLITE_PRAGMAS).
                copy.execute("PRAGMA journal_mode=DELETE")
                problems = [row[0] for row in copy.execute("PRAGMA quick_check")]
                accounts = problems == ["ok"] and copy.execute('SELECT EXISTS (SELECT 1 FROM "user")').fetchone()[0]
            finally:
                copy.close()
        finally:
            reader.close()
    except sqlite3.Error as exc:
        raise click.ClickException(f"the backup failed ({exc}); nothing was kept") from None
    if problems != ["ok"]:
        raise click.ClickException(f"the copy fails SQLite's quick check ({problems[0]}): nothing was kept. Is the "
                                   "database itself damaged? (sqlite3 FILE 'PRAGMA integrity_check')")
    if not accounts:
        # A mistyped DATABASE_URL: the app's start, before this command, made the missing file a new, empty
        # database (read-only, the backup then found it), and a copy of it looked like a good backup.
        raise click.ClickException(f"{_database_name()} holds no account, so nothing was kept: is DATABASE_URL the "
                                   "app's? (A path with no database becomes a new, empty one when a command starts.)")
    with open(target, "rb+") as fh:
        os.fsync(fh.fileno())


@audit_group.command("export")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"]),
              help="From this UTC date or time on (YYYY-MM-DD, YYYY-MM-DDTHH:MM:SS, or an export's own time).")
@click.option("--after-id", type=click.IntRange(0, 2 ** 63 - 1), default=0, show_default=True,
              help="Only records with a larger id: the last id of an earlier export, to go on from there.")
def export_audit(since, after_id):
    """Write audit records as JSON lines, oldest first, for a log archive or a SIEM (read-only): id, time
    (UTC), kind, the person's and the actor's address, the client address and the details, as stored (they
    never hold a code, secret or password: security.audit refuses them).

    Records of the last EXPORT_SETTLE are left for the next export: on PostgreSQL a record gets its id when
    it is written and shows when its transaction commits, so a later id can show first, and an export that
    went on from it (--after-id) skipped the earlier one for good (a review held a transaction open and saw
    it). The app's transactions take well under that. So are the records after the first one left, whatever
    their time: a record's time is the clock of the host that wrote it, and one from a host whose clock runs
    ahead, or from before the clock was set back, was left while later ids went out, and then skipped too."""
    person, actor = User.alias(), User.alias()
    query = AuditEvent.select()
    if since is not None:
        query = query.where(AuditEvent.created_at >= since)
    settled = now() - EXPORT_SETTLE
    unsettled = (query.select(fn.MIN(AuditEvent.id)).where(AuditEvent.id > after_id)
                 .where(AuditEvent.created_at > settled).scalar())
    # In batches of EXPORT_BATCH by id (keyset: after the last id written), each batch a query of its own:
    # psycopg reads a whole result before it hands over the first row, so one query over the table held
    # every record in memory on PostgreSQL (a million records: 500 MB; SQLite streamed them). Each batch is a
    # range of ids, from the last one written (not also from after_id: SQLite then read the ids from after_id
    # at every batch) to the first unsettled one or the last one there is (with --since and no upper end,
    # SQLite read all the records since that date and sorted them at every batch): a day's records out of
    # ten million took a minute.
    batch = (query.select(AuditEvent.id, AuditEvent.created_at, AuditEvent.kind, AuditEvent.ip, AuditEvent.detail,
                          person.email.alias("user_email"), actor.email.alias("actor_email"))
             .join_from(AuditEvent, person, JOIN.LEFT_OUTER, on=(AuditEvent.user == person.id))
             .join_from(AuditEvent, actor, JOIN.LEFT_OUTER, on=(AuditEvent.actor == actor.id))
             .where(AuditEvent.created_at <= settled).order_by(AuditEvent.id).limit(EXPORT_BATCH))
    end = unsettled if unsettled is not None else (AuditEvent.select(fn.MAX(AuditEvent.id)).scalar() or 0) + 1
    batch = batch.where(AuditEvent.id < end)
    last = after_id
    while True:
        events = list(batch.where(AuditEvent.id > last).dicts())
        for e in events:
            click.echo(json.dumps({"id": e["id"], "time": e["created_at"].strftime("%Y-%m-%dT%H:%M:%SZ"),
                                   "kind": e["kind"], "user": e["user_email"], "actor": e["actor_email"],
                                   "ip": e["ip"], "detail": json.loads(e["detail"] or "{}")}, sort_keys=True))
        if len(events) < EXPORT_BATCH:
            break
        last = events[-1]["id"]
    if unsettled is not None:
        click.echo(f"records of the last {int(EXPORT_SETTLE.total_seconds())} seconds are left for the next export",
                   err=True)
        first = AuditEvent.get_by_id(unsettled).created_at
        if first > settled + EXPORT_SETTLE:
            # Ahead of this clock: everything after it waits too, for as long as it stays ahead.
            click.echo(f"record {unsettled} is dated {first:%Y-%m-%d %H:%M:%S} UTC, ahead of this host's clock: it "
                       f"and the records after it are left until this clock passes that time by "
                       f"{int(EXPORT_SETTLE.total_seconds())} seconds (is the clock of an app host ahead?)", err=True)


EXPORT_SETTLE = timedelta(seconds=60)
EXPORT_BATCH = 1000  # records a query of `audit export` reads at most


def init_app(app):
    """Register the command groups."""
    app.cli.add_command(users)
    app.cli.add_command(networks)
    app.cli.add_command(keys)
    app.cli.add_command(audit_group)
    app.cli.add_command(purge_expired)
    app.cli.add_command(backup)
