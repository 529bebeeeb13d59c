"""Cross-cutting security helpers: password hashing, throttling, known browsers, per-network limits, audit
records, safe redirects, freshness, response headers and log redaction."""
import functools
import ipaddress
import json
import logging
import re
import secrets
import unicodedata
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError
from flask import abort, current_app, g, redirect, request, session, url_for
from flask_login import current_user
from flask_login.config import EXEMPT_METHODS
from peewee import Case

from . import flaskctx

from .clock import expired, now, timestamp
from .db import Param, Prepared, after_commit, for_update
from .fields import HIDDEN_CATEGORIES
from .models import AuditEvent, KnownBrowser, NetworkCounter
# A known browser's token is made and stored like a session's; the client address is the one sessions store.
from .sessions import TOKEN_SHAPE, address_in, client_ip, cookie_attributes, token_hash

log = logging.getLogger("twostep.audit")

_HASHERS = {}


def _hasher():
    profile = current_app.config["PASSWORD_HASH_PROFILE"]
    if profile not in _HASHERS:
        if profile == "cheapest":  # tests only: verification still reads parameters from the hash
            _HASHERS[profile] = PasswordHasher.from_parameters(profiles.CHEAPEST)
        else:
            _HASHERS[profile] = PasswordHasher()
    return _HASHERS[profile]


def hash_password(password):
    """An argon2id hash of the password in Unicode's NFKC form (NIST SP 800-63B 3.1.1.2: "é" typed as one
    character or as "e" and an accent, and full-width letters from an East Asian keyboard, are the password
    the person chose)."""
    return _hasher().hash(unicodedata.normalize("NFKC", password))


def same_password(one, other):
    """Whether two typed passwords are one password as hash_password sees it (NFKC)."""
    return unicodedata.normalize("NFKC", one) == unicodedata.normalize("NFKC", other)


_HELD_AS_TYPED = "password_hash_held_as_typed"  # g: a stored hash verify_password matched only as typed


def verify_password(stored_hash, password):
    """Whether the password matches; with stored_hash None, spend the same time and return False. The password
    as typed is tried too when NFKC changes it: hashes made before passwords were normalised hold it so. Such
    a match is noted for the request, and password_hash_outdated then has the hash replaced."""
    hasher = _hasher()
    normalised = unicodedata.normalize("NFKC", password)
    matched = set()
    for candidate in dict.fromkeys((normalised, password)):  # one when ASCII or NFKC already
        try:
            # Every candidate, even after a match: as long for an unknown address (the dummy hash) as for a
            # known one, right or wrong.
            if hasher.verify(stored_hash if stored_hash is not None else _dummy_hash(), candidate):
                matched.add(candidate)
        except (VerificationError, InvalidHashError):
            pass
    if stored_hash is None or not matched:
        return False
    if normalised not in matched:
        g.setdefault(_HELD_AS_TYPED, set()).add(stored_hash)
    return True


def password_hash_outdated(stored_hash):
    """Whether a stored hash should be made again at the next sign-in with the right password (what
    argon2-cffi advises for check_needs_rehash): made with other parameters than hashes are made with now
    (argon2's defaults after an upgrade, or a changed profile), or holding the password as typed before
    passwords were normalised (verify_password noted it in this request). Once replaced, the password
    counts as normalised for good, whichever way Unicode spells it."""
    if stored_hash in g.get(_HELD_AS_TYPED, ()):
        return True
    try:
        return _hasher().check_needs_rehash(stored_hash)
    except InvalidHashError:
        return False


def password_length(password):
    """A password's length as it is hashed (NFKC): "e" and an accent count once, as "é" does."""
    return len(unicodedata.normalize("NFKC", password))


def is_common_password(password):
    """Whether a new password is one of the 30,000 most common ones, in any case (zxcvbn's list, drawn from
    leaked passwords): NIST SP 800-63B 5.1.1.2 asks that those be refused. "password" and "iloveyou123" met
    the length rule and were taken (a review). Compared as it is hashed (NFKC), case-folded."""
    return unicodedata.normalize("NFKC", password).casefold() in common_passwords()


@functools.lru_cache(maxsize=1)
def common_passwords():
    """zxcvbn's list as a set, made once per process (create_app makes it in gunicorn's master, before the
    workers are forked: ~0.1 s and ~13 MB with the module's other lists)."""
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def _dummy_hash():
    key = ("dummy", current_app.config["PASSWORD_HASH_PROFILE"])
    if key not in _HASHERS:
        _HASHERS[key] = _hasher().hash("not a real password, only here to spend time")
    return _HASHERS[key]


def backoff(failures):
    """How long an account must wait after `failures` consecutive failures (security.md 18).

    1, 2, 4, 8 s for the first failures, then a lock of 15 min that doubles with every further
    failure, capped at 24 h: about a dozen guesses in the first day and one a day after, far below NIST's
    ceiling of 100."""
    cfg = current_app.config
    free = cfg["THROTTLE_FREE_FAILURES"]
    if failures <= 0:
        return timedelta(0)
    if failures <= free:
        return timedelta(seconds=2 ** (failures - 1))
    lock = cfg["THROTTLE_LOCK"] * (2 ** min(failures - free - 1, 20))
    return min(lock, cfg["THROTTLE_MAX_LOCK"])


def is_lock(counted):
    """Whether the wait that `counted` failures set is the lock (15 minutes or more), not one of the short
    pauses after the first failures (backoff): the pages and `users list` say "locked" only then."""
    return counted > current_app.config["THROTTLE_FREE_FAILURES"]


def wait_end(until, counted, current=None):
    """When a wait that failures set to end at `until` ends, as the clock reads now (None: no wait). Never
    further off than the whole wait that `counted` failures set (backoff): only a clock set back since the wait
    was set (an NTP step, a VM resumed, another app host whose clock runs ahead) puts it further, and then the
    one-second pause after a mistyped code, set before the clock went back an hour, lasted an hour. The caller
    that refuses an attempt stores the shortened end, so the wait runs from then (it does not move on)."""
    if until is None:
        return None
    return min(until, (current or now()) + backoff(counted))


def wait_text(until):
    """Human wording for the time left until `until`."""
    seconds = max(1, int((until - now()).total_seconds() + 0.999))
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = (seconds + 59) // 60
    if minutes < 90:
        return f"{minutes} minutes"
    # Hours and minutes, not hours rounded up: "Wait 2 hours" stood beside a lock's end 1 hour 41 minutes away
    # (a review of times as people read them).
    hours, minutes = divmod(minutes, 60)
    words = f"{hours} hour{'s' if hours != 1 else ''}"
    return f"{words} {minutes} minute{'s' if minutes != 1 else ''}" if minutes else words


# ---------------------------------------------------------------- known browsers (lockout denial of service)

def known_browser_cookie_name(app=None):
    # The __Host- prefix pins the cookie to this host, path / and HTTPS, as the session's (security.md 31).
    return "__Host-known" if (app or flaskctx.the_app()).config["SECURE_COOKIES"] else "twostep_known"


# The most recently used; older ones are forgotten when a new one comes (one forgotten lately that signs in
# again is known again at once, and the next new browser trims them back to ten).
KNOWN_BROWSERS_PER_PERSON = 10
# Forgotten browsers kept per person for the contact form (contact_browser): those known longest. An intruder's
# browsers are all first known after the takeover, so signing in from new ones and forgetting them again and
# again cannot push the owner's out, as it would if the most recent were kept.
FORGOTTEN_BROWSERS_PER_PERSON = 10


def _live_browser():
    """The row of cookie `id` for person `user`, used since `since` and not forgotten: the condition of
    _KB_FIND."""
    return ((KnownBrowser.id == Param("id")) & (KnownBrowser.user == Param("user"))
            & (KnownBrowser.last_used_at > Param("since")) & KnownBrowser.forgotten_at.is_null())


def _own_browser():
    """The row of cookie `id` for person `user`, used since `since`, known, or forgotten after
    `forgotten_since`: a browser of the person's own for the contact form (contact_browser), and one a
    completed sign-in makes known again with its age (_KB_REVIVE)."""
    return ((KnownBrowser.id == Param("id")) & (KnownBrowser.user == Param("user"))
            & (KnownBrowser.last_used_at > Param("since"))
            & (KnownBrowser.forgotten_at.is_null() | (KnownBrowser.forgotten_at > Param("forgotten_since"))))


def _forget(at):
    """The values that forget a browser at `at`. It keeps no password throttle of its own: its count is not
    consulted again, and one made known again by a sign-in starts from none."""
    return {KnownBrowser.forgotten_at: at, KnownBrowser.password_failures: 0, KnownBrowser.password_locked_until: None}


def _trim_forgotten():
    """Delete the person's forgotten browsers but the FORGOTTEN_BROWSERS_PER_PERSON known longest that still
    have their allowance (those past it first)."""
    forgotten = (KnownBrowser.user == Param("user")) & KnownBrowser.forgotten_at.is_null(False)
    counting = ((KnownBrowser.forgotten_at > Param("forgotten_since"))
                & (KnownBrowser.last_used_at > Param("since")))
    kept = (KnownBrowser.select(KnownBrowser.id).where(forgotten & counting)
            .order_by(KnownBrowser.created_at, KnownBrowser.id).limit(FORGOTTEN_BROWSERS_PER_PERSON))
    return KnownBrowser.delete().where(forgotten & KnownBrowser.id.not_in(kept))


# Every completed sign-in runs two of these: compiled once (db.Prepared).
_KB_FIND = Prepared(lambda: KnownBrowser.select().where(_live_browser()))
_KB_OWN = Prepared(lambda: KnownBrowser.select().where(_own_browser()))
_KB_TOUCH = Prepared(lambda: KnownBrowser.update(last_used_at=Param("at")).where(_live_browser()))
# A browser forgotten lately, known again after a completed sign-in in it: with no count of its own from while it
# was forgotten (a guess counted on it then would lock the owner's own browser).
_KB_REVIVE = Prepared(lambda: KnownBrowser.update(
    last_used_at=Param("at"), forgotten_at=None, password_failures=0, password_locked_until=None).where(
    _own_browser() & KnownBrowser.forgotten_at.is_null(False)))
_KB_DROP = Prepared(lambda: KnownBrowser.delete().where(KnownBrowser.id == Param("id")))
_KB_INSERT = Prepared(lambda: KnownBrowser.insert(id=Param("id"), user=Param("user"), created_at=Param("at"),
                                                  last_used_at=Param("at"), password_failures=0))
# Forgotten, not deleted: signing in from ten new browsers deleted the owner's, contact allowance and all.
_KB_TRIM = Prepared(lambda: KnownBrowser.update(_forget(Param("at"))).where(
    (KnownBrowser.user == Param("user")) & KnownBrowser.forgotten_at.is_null() & KnownBrowser.id.not_in(
        KnownBrowser.select(KnownBrowser.id).where(
            (KnownBrowser.user == Param("user")) & KnownBrowser.forgotten_at.is_null())
        .order_by(KnownBrowser.last_used_at.desc(), KnownBrowser.id).limit(KNOWN_BROWSERS_PER_PERSON))))
_KB_TRIM_FORGOTTEN = Prepared(_trim_forgotten)


def _cookie_token():
    current = flaskctx.request_context()
    token = current.request.cookies.get(known_browser_cookie_name(current.app))
    return token if token and TOKEN_SHAPE.fullmatch(token) else None


def _lifetimes(current):
    """The `since` and `forgotten_since` of the queries above, at `current`."""
    cfg = flaskctx.the_app().config
    return {"since": current - cfg["KNOWN_BROWSER_TTL"], "forgotten_since": current - cfg["FORGOTTEN_BROWSER_TTL"]}


def known_browser(user):
    """This request's browser if `user` completed a sign-in from it within KNOWN_BROWSER_TTL and it was not
    forgotten since, else None.

    Wrong passwords typed in such a browser count against it, not against the account (auth.password_check):
    someone who only knows the email address can lock the account for every other browser, but not for the
    ones its owner signs in from (OWASP's "device cookies")."""
    token = _cookie_token()
    if token is None:
        return None
    return _KB_FIND.first(id=token_hash(token), user=user.id,
                          since=now() - current_app.config["KNOWN_BROWSER_TTL"])


def contact_browser(user):
    """This request's browser if it is one of `user`'s own for the contact form (support._take_request), else
    None: known (known_browser), or forgotten within FORGOTTEN_BROWSER_TTL (and within the lifetime it had).
    Only the contact form asks: a forgotten browser gets nothing else a known one gets."""
    token = _cookie_token()
    if token is None:
        return None
    return _KB_OWN.first(id=token_hash(token), user=user.id, **_lifetimes(now()))


def remember_browser(user):
    """After a completed sign-in (inside its transaction): this browser is known for `user` for another
    KNOWN_BROWSER_TTL, and its cookie goes out again; one forgotten lately is known again, as old as it was. One
    account per browser: a cookie for another account is replaced and its row deleted. A person keeps the
    KNOWN_BROWSERS_PER_PERSON most recent browsers; the others are forgotten.

    Returns whether the browser was new to `user`: no cookie, or one expired, forgotten (signed out of the
    account by a new password, Sign out everywhere else, ...: the owner cut it off, and its sign-in is what
    the owner must notice, as a diff review found) or of another account. The sign-in's record says so
    (auth.NEW_BROWSER): an intruder can send the owner's User-Agent, but not a cookie of the owner's browser.
    Told by the statements a sign-in runs anyway: none more for a known browser or one without a cookie."""
    token, current, request_g = _cookie_token(), now(), flaskctx.request_g()
    lifetimes = _lifetimes(current)
    if token is not None:
        ids = {"id": token_hash(token), "user": user.id}
        if _KB_TOUCH.execute(at=current, since=lifetimes["since"], **ids):
            request_g.known_browser_token = token
            return False
        if _KB_REVIVE.execute(at=current, **lifetimes, **ids):
            request_g.known_browser_token = token
            return True
        _KB_DROP.execute(id=ids["id"])
    token = secrets.token_urlsafe(32)
    _KB_INSERT.execute(id=token_hash(token), user=user.id, at=current)
    request_g.known_browser_token = token
    if _KB_TRIM.execute(user=user.id, at=current):  # only a new browser can make them more than ten
        _KB_TRIM_FORGOTTEN.execute(user=user.id, **lifetimes)
    return True


def forget_browsers(user, keep_this_one=False):
    """No browser is known for `user` any more (Change password, support's disable, the CLI's reset, "sign out
    everywhere else" with keep_this_one): a lost phone's or a shared computer's browser loses its own
    throttle. Each stays, forgotten, with the contact form's allowance alone for FORGOTTEN_BROWSER_TTL
    (contact_browser): after an intruder changed the password, the owner's own browsers still reach support
    however many strangers type the address. Returns how many were forgotten. `users erase` deletes them
    instead."""
    current = now()
    query = KnownBrowser.update(_forget(current)).where(
        (KnownBrowser.user == user.id) & KnownBrowser.forgotten_at.is_null())
    token = _cookie_token() if keep_this_one else None
    if token is not None:
        query = query.where(KnownBrowser.id != token_hash(token))
    forgotten = query.execute()
    if forgotten:
        _KB_TRIM_FORGOTTEN.execute(user=user.id, **_lifetimes(current))
    return forgotten


def end_code_steps(user):
    """Inside the caller's transaction: delete `user`'s sign-ins waiting at the code step. A browser there is
    then told its sign-in expired (turned 2FA off, support's disable, a new password), rather than being
    refused code after code. Returns how many there were."""
    from .models import SignInChallenge

    return SignInChallenge.delete().where(SignInChallenge.user == user.id).execute()


def revoke_second_factor(user, reset_until=None):
    """Inside the caller's transaction: every device of `user` goes, and with them everything a lost phone
    could still be used for: half-finished sign-ins, sessions, known browsers, the code throttle. Support's
    temporary disable passes the end of its window; the CLI's reset passes none. Returns (devices removed,
    sessions ended, details for the audit record): the devices by name and number (names repeat and change),
    and what it lifted of the code throttle (the refused codes counted and a lock still running), which an
    investigation of a takeover needs to see were cleared."""
    from .models import Device, User
    from .sessions import end_user_sessions

    # The person's row first, as every other change to their 2FA takes it (sign-in, Complete Activation,
    # removing a device): taken after the devices, it deadlocked on PostgreSQL with a code step under way.
    throttle = for_update(User.select(User.code_failures, User.code_locked_until).where(User.id == user.id)).get()
    lifted = {"code_failures": throttle.code_failures} if throttle.code_failures else {}
    if throttle.code_locked_until is not None and throttle.code_locked_until > now():
        lifted["code_locked_until"] = throttle.code_locked_until
    # Listed under the person's row: a device activated meanwhile (it takes that row too) is either listed and
    # removed, or added after this transaction.
    devices = list(Device.select(Device.id, Device.name).where(Device.user == user.id).order_by(Device.id))
    details = {"devices": ", ".join(d.name for d in devices) or None, "device_ids": [d.id for d in devices] or None,
               **lifted}
    removed = Device.delete().where(Device.user == user.id).execute()
    User.update(tfa_reset_until=reset_until, code_failures=0, code_strikes=0, code_locked_until=None).where(
        User.id == user.id).execute()
    end_code_steps(user)
    sessions = end_user_sessions(user)
    forget_browsers(user)  # a lost phone's browser keeps no password throttle of its own
    return removed, sessions, details


PASSWORD_MIN = 8  # new passwords: the sign-up form, Change password and the CLI
PASSWORD_MAX = 1024  # every password field; longer is refused before hashing


def replace_password(user, password_hash, via, keep_token=None, checked_hash=None):
    """Inside one write transaction: `user`'s new password hash, and everything the old password had opened
    goes: sessions (all but `keep_token`'s), half-finished sign-ins (a code step reached with the old
    password), known browsers (their own throttles were about the old password; this browser's stays when
    one is kept) and the password throttle. Audited. Returns how many sessions ended, or None, changing
    nothing, when the change was overtaken while the slow hashes ran: the session of `keep_token` was ended
    (signed out elsewhere, or by support), or the password is no longer `checked_hash`, the one the person
    proved (changed meanwhile by the operator or in another browser)."""
    from .db import for_update, write_transaction
    from .models import ServerSession, User
    from .sessions import end_user_sessions

    with write_transaction():
        stored = for_update(User.select(User.password_hash).where(User.id == user.id)).get().password_hash
        if checked_hash is not None and stored != checked_hash:
            return None
        if keep_token is not None and not ServerSession.select().where(
                ServerSession.id == token_hash(keep_token)).exists():
            return None
        User.update(password_hash=password_hash, password_failures=0, password_locked_until=None).where(
            User.id == user.id).execute()
        end_code_steps(user)
        ended = end_user_sessions(user, keep_token=keep_token)
        forget_browsers(user, keep_this_one=keep_token is not None)
        audit("password_changed", user=user, via=via, sessions_ended=ended)
    return ended


def set_known_browser_cookie(response):
    """after_request: send the cookie of a browser that remember_browser() has just made known."""
    token = flaskctx.request_g().pop("known_browser_token", None)
    if token is not None:
        app = flaskctx.the_app()
        response.set_cookie(known_browser_cookie_name(app), token, **cookie_attributes(app),
                            max_age=int(app.config["KNOWN_BROWSER_TTL"].total_seconds()))
    return response


# ---------------------------------------------------------------- per-network limits (anonymous abuse)

def client_network(ip):
    """What a per-client limit counts: an IPv4 address, or the /64 network of an IPv6 one. One IPv6 computer
    usually owns a whole /64 and may pick a new address in it for every request (privacy addresses do
    exactly that), so counting single IPv6 addresses would limit nobody. The exact address of every request
    is in its audit record."""
    if not ip:
        return ip
    address = address_in(ip)
    if address is None:
        return ip  # not an address (a proxy's odd header): counted as it is
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:  # an IPv4 client seen through an IPv6 socket
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


def client_network_48(ip):
    """The IPv6 /48 the client's address is in, or None for IPv4 (and anything that is not an address). A
    site routed a /48 (what many providers give a customer) has 65,536 /64s, each a client of its own to
    client_network: a limit per /48, looser, holds them together."""
    address = address_in(ip or "")
    if address is None or address.version == 4 or address.ipv4_mapped is not None:
        return None
    return str(ipaddress.ip_network(f"{address}/48", strict=False))


SITE_CLIENTS = 10  # a /48's limit is ten clients' worth, as the contact form's (SUPPORT_REQUESTS_PER_HOUR_48)

# What each limit counts: the setting with its number per network and hour, and how many times that number.
NETWORK_LIMITS = {
    "sign-ups": ("SIGNUPS_PER_HOUR", 1),  # accounts made through /signup, and its "already exists" answers
    "failed-sign-ins": ("FAILED_SIGNINS_PER_HOUR", 1),  # wrong passwords and unknown addresses at the password step
    "contact-48": ("SUPPORT_REQUESTS_PER_HOUR_48", 1),  # contact requests stored, per IPv6 /48
    # The first two per IPv6 /48 as well: whoever is routed a /48 holds 65,536 /64s, each a client of its own,
    # and had as many times the allowance (a security review).
    "sign-ups-48": ("SIGNUPS_PER_HOUR", SITE_CLIENTS),
    "failed-sign-ins-48": ("FAILED_SIGNINS_PER_HOUR", SITE_CLIENTS),
}


def network_limit(purpose):
    """The number of events of `purpose` a network may have in its hour; 0 when the operator turned the limit
    off (nothing is then counted or refused)."""
    setting, times = NETWORK_LIMITS[purpose]
    return current_app.config[setting] * times


def _counted(purpose, network):
    """The network whose events of `purpose` count, or None: without a network (an address that is not
    known limits nobody, as at the contact form) or with the limit turned off."""
    return network if network and network_limit(purpose) else None


def _full(purpose, network, since, limit):
    """The condition of a counter that reached `limit` in an hour still running at `since` + the window."""
    return ((NetworkCounter.purpose == purpose) & (NetworkCounter.network == network)
            & (NetworkCounter.window_start > since) & (NetworkCounter.hits >= limit))


def _add_hit():
    """INSERT ... ON CONFLICT DO UPDATE: one more event for (purpose, network), or the first of a new hour
    when the stored one is over. One statement, so two requests counting at once cannot lose an event
    (PostgreSQL locks the row; SQLite has one writer), and the first event of a network needs no row before."""
    since, at = Param("since"), Param("at")
    over = NetworkCounter.window_start <= since
    return NetworkCounter.insert(purpose=Param("purpose"), network=Param("network"), window_start=at,
                                 hits=1).on_conflict(
        conflict_target=[NetworkCounter.purpose, NetworkCounter.network],
        update={NetworkCounter.hits: Case(None, [(over, 1)], NetworkCounter.hits + 1),
                NetworkCounter.window_start: Case(None, [(over, at)], NetworkCounter.window_start)})


_NC_FULL = Prepared(lambda: NetworkCounter.select(NetworkCounter.window_start).where(
    _full(Param("purpose"), Param("network"), Param("since"), Param("limit"))))
_NC_ADD = Prepared(_add_hit)
_NC_HITS = Prepared(lambda: NetworkCounter.select(NetworkCounter.hits).where(
    (NetworkCounter.purpose == Param("purpose")) & (NetworkCounter.network == Param("network"))))


def network_full_until(purpose, network):
    """When `network` may do `purpose` again, if it reached its limit in the current hour, else None (also
    when it is not counted: _counted)."""
    network = _counted(purpose, network)
    if network is None:
        return None
    row = _NC_FULL.first(purpose=purpose, network=network, since=now() - NetworkCounter.WINDOW,
                         limit=network_limit(purpose))
    return row.window_start + NetworkCounter.WINDOW if row is not None else None


def network_full_column(purpose, network):
    """The start of `network`'s hour if it reached the limit of `purpose`, as a subquery to read in the same
    statement as something else (auth.login reads it with the account): NULL while under the limit, and
    always when the network is not counted (no counter has the empty network: count_for_network)."""
    return NetworkCounter.select(NetworkCounter.window_start).where(
        _full(purpose, _counted(purpose, network) or "", now() - NetworkCounter.WINDOW, network_limit(purpose)))


def count_for_network(purpose, network):
    """Inside the caller's write transaction: one more event of `purpose` for `network` (nothing without a
    network). The event that reaches the limit leaves one audit record; the refusals after it leave none, so
    being refused cannot fill the audit log: one record per network and hour at most."""
    network = _counted(purpose, network)
    if network is None:
        return
    current = now()
    _NC_ADD.execute(purpose=purpose, network=network, at=current, since=current - NetworkCounter.WINDOW)
    # Read back under the row's lock (the upsert took it; SQLite's writer lock covers all): exactly one event
    # of the hour sees the limit reached.
    limit = network_limit(purpose)
    if _NC_HITS.first(purpose=purpose, network=network).hits == limit:
        audit("network_limit_reached", limit=purpose, network=network, per_hour=limit)


# Details that must never reach the audit log or any other log (security.md 43).
FORBIDDEN_DETAIL_KEYS = {"code", "secret", "password", "uri", "token", "otpauth"}


_INSERT_AUDIT = Prepared(lambda: AuditEvent.insert(
    kind=Param("kind"), user=Param("user"), actor=Param("actor"), ip=Param("ip"), detail=Param("detail"),
    created_at=Param("created_at")))


def _detail_json(value):
    """How json.dumps writes a detail that JSON has no type for: a time (naive, in UTC, as every stored time)
    in ISO 8601 marked as UTC with a "Z", as `audit export` marks a record's own time (which it gives to the
    second; a lock's end keeps its fraction of a second here); anything else as text. Times
    recorded before 2026-12-07 were written by the callers without the "Z"."""
    if isinstance(value, datetime):
        return value.isoformat() + "Z"
    return str(value)


def audit(kind, user=None, actor=None, **detail):
    """Append one audit record and log it; detail must never hold codes, secrets or passwords."""
    bad = FORBIDDEN_DETAIL_KEYS.intersection(detail)
    if bad:
        raise ValueError(f"audit detail must not contain {sorted(bad)}")
    values = dict(kind=kind, user=getattr(user, "id", user), actor=getattr(actor, "id", actor),
                  ip=client_ip(), detail=json.dumps(detail, default=_detail_json, sort_keys=True),
                  created_at=now())
    _INSERT_AUDIT.execute(**values)
    # The log line follows the commit: it costs more than the insert, and a rolled-back event is not logged.
    # With the client address: from the log alone, "which address tried these passwords" needed the access log
    # beside it, matched by the second (an incident review).
    after_commit(functools.partial(log.info, "audit %s user=%s actor=%s ip=%s %s", kind, values["user"],
                                   values["actor"], values["ip"] or "-", values["detail"]))


def safe_next(target):
    """`target` if it is a same-site path, else None (security.md 29). Not one with a character no path of the
    app's holds that could act on whoever reads it (fields.HIDDEN_CATEGORIES): a line break (a header of the
    sender's), a C1 control such as the CSI that drives a terminal (`users export` prints the target of a
    sign-in under way), a bidirectional override or another invisible format character, a line separator."""
    if not target or not isinstance(target, str) or len(target) > 512:
        return None
    if "\\" in target or any(unicodedata.category(c) in HIDDEN_CATEGORIES for c in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    return target


def is_fresh():
    """Whether the current session completed a full sign-in (password and, if enrolled, code) recently."""
    auth_at = session.get("auth_at")
    if not current_user.is_authenticated or auth_at is None:
        return False
    return not expired(float(auth_at), current_app.config["FRESH_LOGIN_WINDOW"].total_seconds(), timestamp())


def login_required(view):
    """flask-login's login_required (the signed-in person, or its unauthorized handler; OPTIONS and
    LOGIN_DISABLED let anyone through), reading the request's context once (webapp/flaskctx.py)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        current = flaskctx.request_context()
        app = current.app
        if (current.request.method not in EXEMPT_METHODS and not app.config.get("LOGIN_DISABLED")
                and not flaskctx.signed_in_user().is_authenticated):
            return app.login_manager.unauthorized()
        return app.ensure_sync(view)(*args, **kwargs)

    return wrapper


def fresh_login_required(view=None, *, back_to=None, not_done=None):
    """Send signed-in people whose sign-in is not fresh to re-authenticate first (security.md 9, 32, 37).

    After re-authenticating they come back to the page they asked for; a POST is not replayed, so it comes
    back to `back_to` (an endpoint: the page that holds the form), else to a same-site Referer, else home,
    and that page says "You confirmed it's you, but `not_done`." (what was not done yet, and to do it
    again): without it, coming back to the page with nothing said, "Sign out" on another browser seemed to
    have worked (a review).
    """
    if view is None:
        return functools.partial(fresh_login_required, back_to=back_to, not_done=not_done)

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not current_user.is_authenticated:
            return current_app.login_manager.unauthorized()
        if not is_fresh():
            from .htmx import hx_redirect, is_htmx

            if is_htmx() and request.method == "GET" and request.headers.get("HX-Target") == "dialog-slot":
                # The gear's dialog (or "Add another device"): back on User Settings with the dialog open
                # again, not on the wizard's page without JavaScript (settings.index reads `dialog`).
                return hx_redirect(url_for("auth.reauth", next=url_for("settings.index", dialog="wizard")))
            next_url = _reauth_next(back_to)
            target = url_for("auth.reauth", next=next_url)
            if not_done and request.method != "GET":
                session[REAUTH_NOT_DONE] = {"text": not_done, "next": next_url}  # said by auth.reauth
            if is_htmx():
                return hx_redirect(target)
            return redirect(target)
        return view(*args, **kwargs)

    return wrapper


# Session key: what a POST sent to "Confirm it's you" asked for and did not do, and the page it comes back to.
REAUTH_NOT_DONE = "reauth_not_done"


def _reauth_next(back_to):
    """Where /reauth should send the person afterwards: a same-site path or None."""
    if request.method == "GET":
        return safe_next(request.full_path.rstrip("?"))
    if back_to:
        if back_to == "settings.index":
            # Back to User Settings with Security activity as the page showed it (its forms carry that).
            from .support import activity_view

            return url_for(back_to, **activity_view())
        return url_for(back_to)
    referrer = urlsplit(request.referrer or "")
    if referrer.netloc == request.host:
        return safe_next(referrer.path)
    return None


UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def check_origin():
    """Refuse state-changing requests whose Origin header names another site (security.md 33).

    The CSRF token is the main defence; this also stops a cross-site form post that somehow carries one.
    Browsers send Origin on every cross-origin POST, so a missing header is left to the token check.
    """
    made = flaskctx.request_context().request
    if made.method not in UNSAFE_METHODS:
        return None
    origin = made.headers.get("Origin")
    if origin is None:
        return None
    # Our own Referrer-Policy: no-referrer (security.md 12) makes browsers send "Origin: null" on
    # same-origin form posts; then only the browser's Sec-Fetch-Site: same-origin lets it through.
    if origin == "null" and made.headers.get("Sec-Fetch-Site") == "same-origin":
        return None
    expected = f"{made.scheme}://{made.host}"
    if origin != expected:
        # For the operator: behind a proxy that does not pass on the visitor's scheme and host (with the
        # port), every form is refused here, and the access log alone shows only the 403s.
        logging.getLogger("twostep").warning(
            "origin refused: %s %r from Origin %r; this app sees itself as %r (behind a reverse proxy, "
            "X-Forwarded-Proto and X-Forwarded-Host must be what the visitor used: README \"Deployment\")",
            made.method, made.path[:200], origin[:200], expected)
        abort(403, "This request came from another site and was refused.")
    return None


CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


SECURITY_HEADERS = (("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                    ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
                    ("Cross-Origin-Opener-Policy", "same-origin"))
HSTS = ("Strict-Transport-Security", "max-age=63072000; includeSubDomains")


def set_security_headers(response):
    """Headers on every response (security.md 11, 12, 44), unless the view set its own value."""
    h = response.headers
    present = {name.lower() for name, _ in h.items()}  # one pass: Headers.setdefault scans the list each time
    current = flaskctx.request_context()
    for name, value in SECURITY_HEADERS + ((HSTS,) if current.app.config["SECURE_COOKIES"] else ()):
        if name.lower() not in present:
            h.add(name, value)
    if current.request.endpoint != "static" or response.status_code >= 400:
        # Pages depend on who is signed in and may show secrets: never store them (security.md 12). An error
        # page under /static/ (a missing file) is such a page too: it has the layout, the person's address
        # and a CSRF token.
        h["Cache-Control"] = "no-store"
    return response


def one_line(text):
    """`text` with its line breaks, other control characters and backslashes written as Python escapes
    (RedactingFilter.CONTROLS): what someone typed stays on the one line it is printed on."""
    return RedactingFilter.CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class RedactingFilter(logging.Filter):
    """Masks anything that looks like a code, a Base32 secret, an otpauth URI or a password field, and writes
    control characters as escapes (security.md 43)."""

    KEYS = ("password", "secret", "code", "csrf_token", "cookie")
    # (pattern, replacement, strings one of which a line must hold, casefolded, for the pattern to matter).
    # The case-insensitive key=value search cost half of this filter, which sees every log line (gunicorn's
    # access lines too): a substring test first rules most lines out. casefold, not lower: the pattern's
    # IGNORECASE also matches the likes of "ſ" for "s", and so does casefold.
    PATTERNS = [
        (re.compile(r"otpauth://\S+"), "otpauth://[redacted]", None),
        # The value ends at a control character too: an escape sequence after it (a colour's end) is kept.
        (re.compile(r"(?i)(" + "|".join(KEYS) + r")=([^&\s\x00-\x1f]+)"), r"\1=[redacted]",
         tuple(k + "=" for k in KEYS)),
        (re.compile(r"\b[A-Z2-7]{16,}\b"), "[redacted]", None),
        # Not an account's number after "user=" or "actor=" (audit lines, the Support page's addresses): a
        # review found user=104857 logged as user=[redacted]. Codes are never logged under those names.
        (re.compile(r"(?<![\d.:/-])(?<!user=)(?<!actor=)\d{6}(?![\d.:/-])"), "[redacted]", None),
    ]

    # Line breaks and other control characters (NEL and the Unicode line and paragraph separators too, not the
    # tab), and the backslash, so that an escape in the log cannot be told apart from one a visitor typed.
    # With the bidirectional controls and the invisible characters that change how a line reads: a right-to-left
    # override in a path drew the rest of its log line backwards in a terminal. Not the joiners (U+200C, U+200D),
    # which Persian words and emoji hold and which move nothing.
    CONTROLS = re.compile(r"[\\\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e"
                          r"\u2060-\u2064\u2066-\u2069\ufeff]")

    def __init__(self, escape_controls=True):
        super().__init__()
        self.escape_controls = escape_controls

    def filter(self, record):
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        folded = message.casefold()
        for pattern, repl, needles in self.PATTERNS:
            if needles is None or any(needle in folded for needle in needles):
                message = pattern.sub(repl, message)
        if self.escape_controls and self.CONTROLS.search(message):
            # One event, one line: a newline in something a visitor chose (a path, a header) would otherwise
            # start a line of their own making, such as a fake "audit" record.
            message = one_line(message)
        record.msg, record.args = message, None
        return True
