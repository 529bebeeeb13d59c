"""Server-side sessions: the cookie carries only a random token; the data lives in ServerSession rows.

Why not Flask's signed-cookie session: a cookie session cannot be revoked (logout, timeouts, "sign out
everywhere" and support actions must really end sessions: security.md 26, 30, 35, 40), and it would show
the client what state it is in (security.md 25).

A visitor who has stored nothing yet (the sign-in page, sign-up, the contact form) gets the cookie but no
row: their CSRF token is derived from the cookie's token with an HMAC under SECRET_KEY (anonymous_csrf),
so it needs no storage. The row is written when the session first holds something else (the password
step's challenge, a flash message, a sign-in), under a new random token. Before, every page view without a
cookie wrote a row, so anyone could fill the table (and the disk) at hundreds of rows a second until the
idle purge.
"""
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
from datetime import timedelta

from flask.sessions import SessionInterface, SessionMixin
from markupsafe import Markup, escape
from peewee import JOIN, InterfaceError, OperationalError
from werkzeug.datastructures import CallbackDict

from . import flaskctx
from .clock import expired, now
from .db import Param, Prepared, for_update, loaded, write_transaction
from .htmx import is_htmx
from .models import PendingEnrolment, ServerSession, User

TOUCH_INTERVAL = timedelta(seconds=60)  # write last_seen at most once a minute per session


# Every request runs one or two of these: compiled once (db.Prepared).
# The session with its person, if any, in one query: flask-login's user loader takes the person from here
# (__init__._load_user) instead of asking the database a second time on every signed-in request.
_BY_ID = Prepared(lambda: ServerSession.select(ServerSession, User).join(User, JOIN.LEFT_OUTER)
                  .where(ServerSession.id == Param("id")))
_INSERT = Prepared(lambda: ServerSession.insert(
    id=Param("id"), user=Param("user"), data=Param("data"), created_at=Param("created_at"),
    last_seen_at=Param("last_seen_at"), ip=Param("ip"), user_agent=Param("user_agent")))
_UPDATE = Prepared(lambda: ServerSession.update(
    data=Param("data"), last_seen_at=Param("last_seen_at"), user=Param("user")).where(ServerSession.id == Param("id")))
_DELETE = Prepared(lambda: ServerSession.delete().where(ServerSession.id == Param("id")))
_TOUCH = Prepared(lambda: ServerSession.update(last_seen_at=Param("at")).where(ServerSession.id == Param("id")))
_LOCK = Prepared(lambda: for_update(ServerSession.select(ServerSession.id).where(ServerSession.id == Param("id"))))
_MOVE_ENROLMENTS = Prepared(lambda: PendingEnrolment.update(session=Param("new")).where(
    PendingEnrolment.session == Param("old")))


# The tokens this server issues (secrets.token_urlsafe(32)); any other cookie value is replaced, not used.
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")
# A signed-in session's token starts with this, so that a browser whose session has ended since (idle, signed
# out elsewhere, support) can be told so: once its row is gone, the cookie is all that is left of it. Before
# sign-in and without a row a token is random alone (sessions made before this marker existed have none).
SIGNED_IN_MARK = "s."
_SESSION_TOKEN_SHAPE = re.compile(r"(?:s\.)?[A-Za-z0-9_-]{43}")
_ANONYMOUS_CSRF_LABEL = b"twostep: CSRF token of a session without a row\x00"


def token_hash(token):
    """The stored form of a session or challenge token."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def cookie_attributes(app):
    """Attributes of every cookie this server sets: this host only, whole site, HTTPS-only when configured,
    hidden from scripts, not sent on cross-site posts (security.md 31)."""
    return dict(domain=None, path="/", secure=app.config["SECURE_COOKIES"], httponly=True, samesite="Lax")


def anonymous_csrf(secret_key, token):
    """The raw CSRF token (Flask-WTF signs it for the forms) of a row-less session with this cookie token:
    stable for the cookie, unguessable without SECRET_KEY, and different for every cookie."""
    key = secret_key.encode("utf-8") if isinstance(secret_key, str) else secret_key
    return hmac.new(key, _ANONYMOUS_CSRF_LABEL + token.encode("ascii"), hashlib.sha256).hexdigest()


def client_ip():
    """The client address as seen after ProxyFix (which trusts exactly PROXY_HOPS proxies), cut to the 64
    characters that session rows, audit records and counters keep: behind a PROXY_HOPS that counts one hop
    too many the client writes it (X-Forwarded-For), and PostgreSQL refused a longer one (a 500 at every
    sign-in). Without the port a proxy may write after it ("203.0.113.7:51234", "[2001:db8::1]:443"): stored
    with it, a record was not found by the audit log's IP address filter, which takes a whole address and
    nothing more, and each connection read as another address."""
    here = flaskctx.request_context()
    if here is None:
        return None
    text = here.request.remote_addr or ""
    if text.startswith("[") or text.count(":") == 1:  # perhaps with a port; a bare IPv6 address is left as sent
        address = address_in(text)
        text = str(address) if address is not None else text
    return text[:64]


def address_in(text):
    """The IP address in `text`, also when a proxy wrote it with its port ("203.0.113.7:51234",
    "[2001:db8::1]:443"): counted with the port, every connection would be a client of its own. None when
    it is no address."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has two colons at least
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class DbSession(CallbackDict, SessionMixin):
    """Session data with the token and row it came from."""

    def __init__(self, initial=None, token=None, row=None):
        def on_update(self):
            self.modified = True

        super().__init__(initial, on_update)
        self.token = token
        self.row = row
        self.modified = False
        self.rotated_from = None
        self.keep_enrolment = False
        self.ended = False
        self.cookie_due = False  # written early (write_session_now): save_session still sets the cookie
        self.unavailable = None  # the database error met while loading it (see raise_if_unavailable)
        self.derived_csrf = None  # a row-less session's CSRF token (anonymous_csrf), while it has no row
        self.new_cookie = False  # a row-less session whose token this response would be the first to send

    @property
    def ended_since(self):
        """Whether the browser holds the cookie of a signed-in session that has ended (its row is gone)."""
        return self.row is None and not self.new_cookie and (self.token or "").startswith(SIGNED_IN_MARK)

    def rotate(self, keep_enrolment=False):
        """Give this session a brand-new token and row (after sign-in: security.md 26; after re-authentication).
        With keep_enrolment, a wizard's pending enrolment moves to the new row, so re-authenticating in the
        middle of the wizard does not throw away the key the person may have scanned already."""
        if self.row is not None and self.rotated_from is None:
            self.rotated_from = self.row
            self.keep_enrolment = keep_enrolment
        self.token = None
        self.row = None
        self.modified = True

    def end(self):
        """Forget everything and delete the row (logout)."""
        self.clear()
        self.ended = True


class DbSessionInterface(SessionInterface):
    """Flask session interface backed by the ServerSession table."""

    def get_cookie_name(self, app):
        # The __Host- prefix pins the cookie to this host, path / and HTTPS (security.md 31).
        return "__Host-session" if app.config["SECURE_COOKIES"] else "twostep_session"

    def open_session(self, app, request):
        token = request.cookies.get(self.get_cookie_name(app))
        if not token or not _SESSION_TOKEN_SHAPE.fullmatch(token):
            return self._without_row(app)
        try:
            row = _BY_ID.first(id=token_hash(token))
        except (OperationalError, InterfaceError) as exc:
            # Flask opens the session outside the error handlers: keep the error for a before_request
            # hook to re-raise, so the person gets the 503 page and keeps their cookie.
            session = DbSession()
            session.unavailable = exc
            return session
        if row is None:
            return self._without_row(app, token)
        current = now()
        if (expired(row.last_seen_at, app.config["SESSION_IDLE_TIMEOUT"], current)
                or expired(row.created_at, app.config["SESSION_ABSOLUTE_TIMEOUT"], current)):
            try:
                _DELETE.execute(id=row.id)
            except (OperationalError, InterfaceError):
                # Refused as expired all the same; the purge deletes the row later. Raised here, outside
                # the error handlers, it left no session open, and the 500 page itself failed on that.
                pass
            return self._without_row(app, token)
        return DbSession(row.load(), token=token, row=row)

    @staticmethod
    def _without_row(app, token=None):
        """A session with nothing stored: only its derived CSRF token, for the cookie's token or a new one.
        (A token whose row has gone, by sign-out elsewhere or expiry, only ever carries an anonymous CSRF
        token from then on; whatever gets stored goes into a row under a new token.)"""
        session = DbSession()
        session.new_cookie = token is None
        session.token = token or secrets.token_urlsafe(32)
        session.derived_csrf = anonymous_csrf(app.secret_key, session.token)
        dict.__setitem__(session, app.config["WTF_CSRF_FIELD_NAME"], session.derived_csrf)  # not a change
        return session

    def save_session(self, app, session, response):
        request_g = flaskctx.request_g()
        if session.unavailable is not None or request_g.get("database_unavailable"):
            return  # an outage: never write, delete or rewrite the cookie because of it
        name = self.get_cookie_name(app)
        cookie_args = cookie_attributes(app)
        try:
            if session.rotated_from is not None:
                with write_transaction():  # the old row goes and the new one comes in one commit
                    outcome = self._write(session)
            else:
                outcome = self._write(session)
        except (OperationalError, InterfaceError) as exc:
            # The response is made already; Flask would turn this into a 500 without the error handlers. The
            # session keeps its cookie and its row as they were (a renewal rolled back as a whole).
            app.logger.error("session not saved: %s", type(exc).__name__)
            _drop_connection()
            return
        made = flaskctx.request_context().request
        if outcome in ("written", "unchanged") and session.get("_user_id") and is_htmx(made):
            # The idle warning (app.js) counts from the page's time left; an htmx answer says it again, after
            # this request's touch: only the server knows whether it wrote last_seen_at (TOUCH_INTERVAL).
            left, absolute = time_left(session, app.config, saved=True)
            response.headers["Session-Seconds-Left"] = str(left)
            response.headers["Session-Absolute-Seconds-Left"] = str(absolute)
        if outcome == "deleted":
            if session.ended or name in made.cookies:
                response.delete_cookie(name, **cookie_args)
        elif outcome == "gone":
            # The row was deleted meanwhile: it is not made again, and the cookie is left as it is. Signed out
            # elsewhere, the browser's next request finds no row for it (and is told the session ended).
            # Renewed by another tab of this browser (a new password, "Confirm it's you"), that tab's answer
            # brought the new session's cookie: deleting the cookie here deleted that one, and a refusal sent
            # without JavaScript (it writes the refusal into the row) signed the browser out (a review).
            pass
        elif outcome == "written" or session.cookie_due or (
                # a new row-less session's cookie goes out only with a form bound to it (a CSRF token was made)
                outcome == "no row" and session.new_cookie and request_g.get(app.config["WTF_CSRF_FIELD_NAME"])):
            response.vary.add("Cookie")
            response.set_cookie(name, session.token, **cookie_args)

    def _write(self, session):
        """Bring the session's row up to date: 'deleted', 'written', 'gone' (vanished meanwhile), 'unchanged'
        or 'no row' (nothing stored but the derived CSRF token). A rotated session's old row is deleted,
        after its new row is in (the caller holds a transaction for the two); if it has gone before, the
        session ends instead."""
        if (session.row is None and session.rotated_from is None and not session.ended
                and session.derived_csrf is not None and list(session.values()) == [session.derived_csrf]):
            return "no row"
        old, session.rotated_from = session.rotated_from, None
        if session.ended or (not session and session.row is None):
            for row in (old, session.row):
                if row is not None:
                    _DELETE.execute(id=row.id)
            session.row = None
            return "deleted"
        current = now()
        user_id = session.get("_user_id")
        if session.row is None:
            if old is not None and old.user_id is not None:
                # A signed-in session renewed (re-authentication), which "Sign out everywhere else", Support
                # and 2FA changes may end meanwhile (they delete by person; a sign-in's row before the code
                # step belongs to nobody yet, so none of them can end it). Serialised with them on the
                # person's row (end_user_sessions takes it too): on PostgreSQL a DELETE already under way
                # would not see the new row. If the old row has gone (signed out while this request spent a
                # whole password hash), no new one is made in its place.
                User.lock(old.user_id)
                if _LOCK.first(id=old.id) is None:
                    session.ended = True  # and stays so: a later save must not store it under a new token
                    return "gone"
            # never the cookie's token: the client may have chosen it
            session.token = (SIGNED_IN_MARK if user_id else "") + secrets.token_urlsafe(32)
            session.derived_csrf = None
            values = dict(id=token_hash(session.token), user=int(user_id) if user_id else None,
                          data=json.dumps(dict(session)), created_at=current, last_seen_at=current,
                          ip=client_ip() or None,
                          user_agent=(flaskctx.request_context().request.user_agent.string or "")[:200])
            _INSERT.execute(**values)
            session.row = loaded(ServerSession, values)
            if old is not None:
                if session.keep_enrolment:
                    _MOVE_ENROLMENTS.execute(new=values["id"], old=old.id)
                _DELETE.execute(id=old.id)
        elif _row_due(session, current):
            updated = _UPDATE.execute(data=json.dumps(dict(session)), last_seen_at=current,
                                      user=int(user_id) if user_id else None, id=session.row.id)
            if not updated:
                return "gone"
            session.row.last_seen_at = current  # what the row says now (time_left; a second save writes nothing)
        else:
            return "unchanged"
        session.modified = False
        return "written"


def _drop_connection():
    """Close the connection after a database error (a broken one must not serve the next request)."""
    from .db import db

    try:
        db.close()
    except (OperationalError, InterfaceError):
        db.obj._state.reset()


def end_session_now():
    """Log out: delete this session's row now, inside the request, so that a database error reaches the
    error handlers (503) instead of a logged-out page over a session that still works; the cookie goes
    with the response."""
    from flask import session

    current = session._get_current_object()
    if current.row is not None:
        _DELETE.execute(id=current.row.id)
        current.row = None
    current.end()


def write_session_now():
    """Store the current (typically just rotated) session inside the caller's transaction rather than
    after the response is built, so a sign-in commits once; the response still gets the new cookie."""
    here = flaskctx.request_context()
    current = here.session  # not the proxy: _write reads ~20 of its attributes
    with write_transaction():
        outcome = here.app.session_interface._write(current)
        if outcome == "written":
            current.cookie_due = True
    return outcome


def _row_due(session, current):
    """Whether saving this session (it has a row) writes the row: it changed, or TOUCH_INTERVAL has passed
    since last_seen_at was written. _write decides by it, and time_left foresees the save by it. Also when
    last_seen_at is that far ahead (the clock went back): the idle limit then counts from now, not from then."""
    gap = current - session.row.last_seen_at
    if gap < -TOUCH_INTERVAL:
        _clock_behind(-gap)
    return session.modified or abs(gap) > TOUCH_INTERVAL


_warned_clock = []


def _clock_behind(gap):
    """Say once per process that a session was last seen further ahead than TOUCH_INTERVAL: this host's clock
    went back, or another app host's clock runs ahead of it. With hosts that far apart, each request that
    lands on the other host writes its session row again (a diff review measured it), and the time limits
    of sign-ins and sessions differ between hosts by as much."""
    if not _warned_clock:
        _warned_clock.append(True)
        logging.getLogger("twostep").warning(
            "a session was last seen %d seconds ahead of this host's clock: the clock went back, or another app "
            "host's clock runs ahead; keep the hosts' clocks synchronised (NTP)", gap.total_seconds())


def time_left(session, config, saved=False):
    """Whole seconds until this session ends by itself if no other request comes: (idle, absolute). Idle
    counts from last_seen_at as this request leaves it and is never past the absolute end; before the save
    (a page being made), whether the save will write it is foreseen by _row_due, as _write decides it (a
    change made after the page is made writes it too, and the page then says up to a minute less than there
    is). Rounded down: never more than the server gives."""
    current = now()
    row = session.row
    if row is None:  # its row is written with this response
        last = created = current
    else:
        created, last = row.created_at, row.last_seen_at
        if not saved and _row_due(session, current):
            last = current
    absolute = created + config["SESSION_ABSOLUTE_TIMEOUT"] - current
    idle = min(last + config["SESSION_IDLE_TIMEOUT"] - current, absolute)
    return max(0, int(idle.total_seconds())), max(0, int(absolute.total_seconds()))


def idle_warning_data(login_url, current_session=None, config=None):
    """The idle warning's data attributes on the signed-in layout (base.html, for app.js): the seconds left,
    idle and absolute (time_left), the two limits in the words the warning uses, and the sign-in page
    `login_url` (app.js adds the page's own address as `next`; the template's url_for is the memoised one).
    One string, rather than a dozen lookups in every page's template. Templates get it with the request's
    session and the configuration given (webapp._memoise_template_helpers), not read through Flask's proxies."""
    from flask import current_app, session

    if config is None:
        config = current_app.config
    if current_session is None:
        current_session = session._get_current_object()
    left, absolute = time_left(current_session, config)
    return Markup(f'data-seconds-left="{left}" data-absolute-seconds-left="{absolute}" '
                  f'data-idle-minutes="{int(config["SESSION_IDLE_TIMEOUT"].total_seconds() // 60)}" '
                  f'data-absolute-hours="{int(config["SESSION_ABSOLUTE_TIMEOUT"].total_seconds() // 3600)}" '
                  f'data-login-url="{escape(login_url)}"')


def touch_session_now():
    """Stay signed in: write this session's last_seen_at now, even within TOUCH_INTERVAL, in one UPDATE (the
    save after the response then writes nothing more). False when its row has gone meanwhile (signed out
    elsewhere): the session ends here rather than come back under a new row."""
    from flask import session

    current_session = session._get_current_object()
    row, current = current_session.row, now()
    if row is not None and _TOUCH.execute(at=current, id=row.id):
        row.last_seen_at = current
        return True
    current_session.row = None
    current_session.end()
    return False


def raise_if_unavailable():
    """before_request: re-raise a database error met while opening the session (-> the 503 handler)."""
    current = flaskctx.request_context().session
    if getattr(current, "unavailable", None) is not None:
        raise current.unavailable


def end_user_sessions(user, keep_token=None):
    """Delete every session of `user` except the one with `keep_token` (security.md 35, 40), holding the
    person's row, so that a session being renewed at that moment (DbSessionInterface._write) either is
    ended here or sees that its old row has gone."""
    query = ServerSession.delete().where(ServerSession.user == user)
    if keep_token:
        query = query.where(ServerSession.id != token_hash(keep_token))
    with write_transaction():
        User.lock(user.id)
        return query.execute()


# Markers in a User-Agent string, the first found naming it (Edge's and Opera's also say "Chrome/").
_BROWSERS = (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"), ("HeadlessChrome/", "Headless Chrome"),
             ("Chrome/", "Chrome"), ("Safari/", "Safari"))
_SYSTEMS = (("iPhone", "iPhone"), ("iPad", "iPad"), ("Android", "Android"), ("Windows", "Windows"),
            ("Mac OS X", "macOS"), ("CrOS", "ChromeOS"), ("Linux", "Linux"))


def browser_label(user_agent):
    """A short, readable name for a User-Agent string ("Firefox on Windows"): the sessions list, and the audit
    records of a sign-in and of a device added, which tell an intruder's browser from the owner's after the
    session is gone. An unknown one is its first 60 printable characters (a header may hold control ones).
    Kept per process for the strings a session row holds (200 characters at most): a User Settings page
    names each of the person's browsers, and working one out again scanned every character of it."""
    if user_agent and len(user_agent) <= 200:
        return _kept_browser_label(user_agent)
    return _browser_label(user_agent)


def _browser_label(user_agent):
    if not user_agent:
        return "Unknown browser"
    browser = next((name for marker, name in _BROWSERS if marker in user_agent), None)
    system = next((name for marker, name in _SYSTEMS if marker in user_agent), None)
    if browser and system:
        return f"{browser} on {system}"
    return browser or system or printable_agent(user_agent)[:60] or "Unknown browser"


_kept_browser_label = functools.lru_cache(maxsize=1024)(_browser_label)


def printable_agent(user_agent):
    """A User-Agent header as text to show or write out: without control and format characters (gunicorn lets
    C1 controls through, which restyle a terminal), and empty when it piles marks on a letter (they paint
    over the lines around it; fields.has_stacked_marks)."""
    from .fields import has_stacked_marks

    text = "".join(c for c in user_agent or "" if c.isprintable())
    return "" if has_stacked_marks(text) else text
