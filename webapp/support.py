"""Support: the public contact form, the admins' Support page (search, open requests, time-boxed 2FA
disable, early end), the read-only audit log, and each person's own security activity."""
import bisect
import functools
import hashlib
import ipaddress
import json
import logging
import operator
import re
from datetime import date, datetime, timedelta, timezone

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user
from peewee import JOIN, SQL, NodeList, Select, fn
from wtforms import BooleanField, DateField, EmailField, HiddenField, SelectField, StringField, TextAreaField
from wtforms.fields import SelectChoice
from wtforms.validators import AnyOf, DataRequired, Email, Length, Optional, ValidationError

from . import htmx
from .auth import strip_text
from .clock import now
from .db import Param, Prepared, db, for_update, is_sqlite, lock_keys, planned_for_values, write_transaction
from .fields import Form, VisibleText, address, revealed, revealed_address, revealed_text
from .models import AuditEvent, Device, ServerSession, SupportRequest, User, normalise_email
from .security import (audit, client_ip, client_network, client_network_48, contact_browser, count_for_network,
                       is_fresh, network_full_until, revoke_second_factor)
from .sessions import address_in, browser_label, end_user_sessions

bp = Blueprint("support", __name__)
log = logging.getLogger("twostep")

PER_PAGE = 25
AUDIT_PER_PAGE = 50
OPEN_REQUESTS_SHOWN = 100  # a page of open contact requests (open_page)
_SHOWN_MAX = OPEN_REQUESTS_SHOWN * 19  # the disable form's list of request numbers: 100 of 18 digits and commas
HANDLED_SHOWN = 20

# The only windows support may open (security.md 39: time-boxed); anything else is refused.
DURATIONS = {
    # An hour for someone support is talking to, who sets up the new phone at once: the shortest time in which
    # the password alone is enough (a support walkthrough found only a day and more on offer).
    "1h": ("1 hour", timedelta(hours=1)),
    "24h": ("24 hours", timedelta(hours=24)),
    "3d": ("3 days", timedelta(days=3)),
    "7d": ("7 days", timedelta(days=7)),
}

# ---------------------------------------------------------------- forms

def text_lines(value):
    """Form filter for a textarea: trimmed, with the CRLF line breaks browsers send as plain newlines. The
    browser's maxlength counts a line break as one character; unchanged, each would count as two here and a
    message the browser allowed could be refused as too long."""
    value = strip_text(value)
    return value.replace("\r\n", "\n").replace("\r", "\n") if isinstance(value, str) else value


class ContactForm(Form):
    email = EmailField("Email address", filters=[strip_text], validators=[
        DataRequired("Enter the email address of your account."),
        Length(max=254, message="That email address is too long (254 characters at most)."),
        Email("Enter a valid email address, for example name@example.com.", check_deliverability=False),
        # Support reads it beside the request's hints: no character that shows nothing (it would read as another
        # address) and no pile of marks painted over them, as in the message and in new accounts' addresses.
        VisibleText("This address holds characters that do not show, or more accents on one letter than writing "
                    "needs. Type the address you sign in with in ordinary letters.")],
        render_kw={"autocomplete": "email", "maxlength": 254})
    message = TextAreaField("Message", filters=[text_lines], validators=[
        DataRequired("Write a short message so support knows what happened."),
        Length(min=10, max=4000, message="Write between 10 and 4000 characters."),
        VisibleText("Use letters, digits, spaces, punctuation and line breaks only.", lines=True)],
        render_kw={"maxlength": 4000, "rows": 7})


REASON_MIN = 10
REASON_MAX = 500  # support's reasons, and `users disable --reason`


class RequestNumbersField(HiddenField):
    """A hidden list of request numbers, written back as "12,15"."""

    def _value(self):
        return ",".join(map(str, self.data)) if isinstance(self.data, list) else ""


def _request_numbers(value):
    """The request ids of a hidden field ("12,15"), or those given as a list; none at all for anything that
    is not such a list, so a forged or damaged field closes nothing rather than everything."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.isascii() or len(value) > _SHOWN_MAX:
        return []
    parts = value.split(",") if value else []
    if len(parts) > OPEN_REQUESTS_SHOWN or not all(p.isdigit() and len(p) <= 18 for p in parts):
        return []
    return sorted({int(p) for p in parts})


class DisableForm(Form):
    """Per-person form; rendered with a prefix so several rows on one page keep unique field ids."""

    reason = TextAreaField("Reason", filters=[text_lines], validators=[
        DataRequired("Give a reason, including how you confirmed the person's identity."),
        # The audit record's only account of the identity check (security.md 38): "x" or "ok" says nothing.
        Length(min=REASON_MIN, message=f"Say in a few words why, including how you confirmed the person's "
                                       f"identity (at least {REASON_MIN} characters)."),
        Length(max=REASON_MAX, message=f"Keep the reason to {REASON_MAX} characters or fewer."),
        VisibleText("Use letters, digits, spaces, punctuation and line breaks only.", lines=True)],
        render_kw={"maxlength": REASON_MAX, "rows": 3})
    duration = SelectField("Disable for", choices=[SelectChoice(k, label) for k, (label, _) in DURATIONS.items()],
                           default="24h", validate_choice=False,
                           validators=[AnyOf(list(DURATIONS), message="Choose 1 hour, 24 hours, 3 days or 7 days.")])
    ticket = StringField("Ticket reference", filters=[strip_text], validators=[
        Optional(), Length(max=64, message="Keep the ticket reference to 64 characters or fewer."),
        VisibleText()],
        render_kw={"maxlength": 64, "autocomplete": "off"})
    close_requests = BooleanField("Mark this person's open contact requests as handled", default=True)
    # The numbers of those requests listed when the form was shown: one that comes in while the admin fills the
    # form (perhaps the real owner's "I did not ask for this") stays open, as one nobody has read. The exact
    # numbers, not the newest: PostgreSQL hands out ids before commit, so a request committed after the form
    # was shown can have a smaller id than one on it.
    requests_shown = RequestNumbersField(filters=[_request_numbers])


class EndWindowForm(Form):
    """"End support window now" for one person (prefixed like DisableForm): the reason is optional, since
    ending a window only takes access away, but the next admin who reads the row sees it."""

    reason = TextAreaField("Reason", filters=[text_lines], validators=[
        Optional(), Length(max=REASON_MAX, message=f"Keep the reason to {REASON_MAX} characters or fewer."),
        VisibleText("Use letters, digits, spaces, punctuation and line breaks only.", lines=True)],
        render_kw={"maxlength": REASON_MAX, "rows": 2})


def _plausible_date(form, field):
    """A filter date the log can be searched by: the search adds a day to the "to" date, which would
    overflow at 31 December 9999."""
    if field.data is not None and not date(1970, 1, 1) <= field.data <= date(9998, 12, 31):
        raise ValidationError("Enter a date between 1970 and 9998.")


def _one_address(form, field):
    """The IP address filter: one whole IPv4 or IPv6 address (what each record holds), not a network or the
    start of an address, which the log cannot be searched by (its text does not start the same for every
    address of an IPv6 network)."""
    if field.data:
        try:
            ipaddress.ip_address(field.data)
        except ValueError:
            raise ValidationError("Enter one whole IP address, as the events show it: for example 203.0.113.7 or "
                                  "2001:db8::1 (not a network, and not the start of an address).") from None


class AuditFilterForm(Form):
    """Filters of the audit log (a GET form)."""

    email = StringField("Person (email address)", filters=[strip_text],
                        validators=[Optional(), Length(max=254, message="That email address is too long.")])
    # The address an event came from: what else an intruder's address did (other accounts tried, contact
    # requests sent), which the other filters could not list.
    ip = StringField("IP address", filters=[strip_text], validators=[
        Optional(), Length(max=64, message="That is longer than any IP address."), _one_address],
        render_kw={"maxlength": 64, "autocomplete": "off", "spellcheck": "false"})
    kind = SelectField("Event", validate_choice=False)
    start = DateField("From (UTC date)", validators=[Optional(), _plausible_date])
    end = DateField("To (UTC date)", validators=[Optional(), _plausible_date])

    def validate_end(self, field):
        if field.data and self.start.data and field.data < self.start.data:
            raise ValidationError("The “To” date is before the “From” date: swap them to see that range.")


# ---------------------------------------------------------------- plain words for audit events

KIND_LABELS = {
    "account_created": "Account created",
    "signin": "Signed in",
    "password_accepted": "Password accepted, code requested",
    "password_rejected": "Wrong password entered",
    "password_throttled": "Sign-in refused: too many wrong passwords, waiting time not over",
    "signin_blocked": "Sign-in blocked: support's time window had ended without a new device",
    "signin_account_disabled": "Sign-in refused after the right password: the account is disabled",
    "code_accepted": "Code accepted",
    "code_rejected": "Wrong code entered",
    "totp_replay": "An already used code was entered again",
    "code_throttled": "Code refused: too many wrong codes, waiting time not over",
    "code_lockout": "Code entry locked after too many wrong codes",
    "password_lockout": "Password entry locked after too many wrong passwords",
    "reauthenticated": "Identity confirmed for a sensitive action",
    "signout": "Signed out",
    "role_changed": "Admin rights changed",
    "password_changed": "Password changed",
    "tfa_reset": "Two-factor authentication reset by the server operator",
    "throttle_cleared": "Failed sign-in attempts cleared by the server operator",
    "account_disabled": "Account disabled by the server operator",
    "account_erased": "Account erased by the server operator (its data deleted)",
    "contact_requests_erased": "Contact requests in an address without an account erased by the server operator",
    "account_enabled": "Account enabled again by the server operator",
    "totp_keys_rotated": "Stored authenticator secrets re-encrypted with the newest key by the server operator",
    "tfa_enabled": "Two-factor authentication turned on",
    "device_added": "Another authenticator device added",
    "tfa_enrolment_started": "Set-up of an authenticator app started",
    "tfa_enrolment_code_accepted": "Code from the new authenticator app accepted",
    "tfa_enrolment_code_rejected": "Wrong code entered while setting up an authenticator app",
    "tfa_enrolment_discarded": "Set-up of an authenticator app cancelled after too many wrong codes",
    "tfa_enrolment_expired": "Unfinished set-up of an authenticator app expired",
    "tfa_reset_window_ended": "New device set up: support's time window closed",
    "sessions_ended": "Signed out on other browsers",
    "device_renamed": "Authenticator device renamed",
    "device_removed": "Authenticator device removed",
    "tfa_disabled": "Two-factor authentication turned off",
    "support_request": "Support request sent",
    "support_request_handled": "Support request marked as handled",
    "support_request_reopened": "Support request reopened",
    "support_tfa_disabled": "Support turned off 2FA for a limited time",
    "support_window_ended": "Support ended the 2FA time window early",
    "support_action_refused": "Support action refused: not allowed on one's own or another admin's account",
    "network_limit_reached": "A client network reached its hourly limit; more is refused until the hour ends",
    "network_count_cleared": "A client network's hourly count cleared by the server operator",
    "email_respelled": "Address stored in its usual spelling by an upgrade (sign-in finds it as typed)",
}

# The Event filter's groups, in the order support meets them (sign-in trouble first); kinds are listed
# alphabetically by label within each. Forty kinds in one alphabetical list had "Wrong code entered" far from
# "Code entry locked" and the operator's actions among the person's own.
KIND_GROUPS = {
    "Signing in": ("signin", "password_accepted", "password_rejected", "password_throttled", "signin_blocked",
                   "signin_account_disabled", "code_accepted", "code_rejected", "totp_replay", "code_throttled",
                   "code_lockout", "password_lockout", "reauthenticated", "signout", "sessions_ended",
                   "network_limit_reached"),
    "Authenticator devices": ("tfa_enabled", "device_added", "tfa_enrolment_started", "tfa_enrolment_code_accepted",
                              "tfa_enrolment_code_rejected", "tfa_enrolment_discarded", "tfa_enrolment_expired",
                              "tfa_reset_window_ended", "device_renamed", "device_removed", "tfa_disabled"),
    "Support": ("support_request", "support_request_handled", "support_request_reopened", "support_tfa_disabled",
                "support_window_ended", "support_action_refused"),
    "Account": ("account_created", "password_changed", "role_changed"),
    "Server operator": ("tfa_reset", "throttle_cleared", "account_disabled", "account_enabled", "account_erased",
                        "contact_requests_erased", "totp_keys_rotated", "network_count_cleared", "email_respelled"),
}

DETAIL_LABELS = {
    "reason": "Reason",
    "ticket": "Ticket",
    "until": "Until",
    "was_until": "Window was open until",
    "via": "Through",
    "method": "Method",
    "browser": "Browser",
    # Whether the browser was new to the account (no live known-browser cookie: auth.NEW_BROWSER), what
    # tells an intruder's sign-in from the owner's when both send the same User-Agent. Recorded only when new.
    "new_browser": "Browser new to the account",
    "failures": "Failures in a row",
    "devices_removed": "Devices removed",
    "requests_closed": "Requests marked as handled",
    "requests_deleted": "Contact requests deleted",
    "requests": "Request numbers",
    "sessions_ended": "Sessions ended",
    "sign_ins_ended": "Half-finished sign-ins ended",
    "set_ups_ended": "Unfinished authenticator set-ups ended",
    "disabled_since": "Disabled since",
    "device": "Device",
    # A device's number: names repeat and change (a second "Phone", a rename), so records of one device are
    # told from another's by it (an incident review: an intruder's device renamed as the owner's).
    "device_id": "Device number",
    "old_name": "Previous name",
    "admin": "Admin",
    "request": "Request number",
    "duration": "Duration",
    "count": "Number",
    "adding": "Adding another device",
    "devices": "Devices",
    "device_ids": "Device numbers",
    "counted_in": "Counted against",
    "after_password": "Sender had entered the account's password (not proof of identity)",
    # Keys that end in "since" are shown as times (detail_text).
    "browser_signed_in_since": "Sent from a browser that first signed in to the account at",
    "browser_forgotten": "That browser was no longer known to the account (signed out by a new password, Sign "
                         "out everywhere else or a 2FA reset, or ten newer browsers)",
    "browser_forgotten_since": "No longer known to the account since",
    "action": "Action",
    "why": "Why",
    "code_failures": "Refused codes cleared",
    "code_locked_until": "Code entry was locked until",
    "password_failures": "Wrong passwords cleared",
    "password_locked_until": "Password entry was locked until",
    "known_browsers": "Known browsers cleared of wrong passwords",
    "known_browser_failures": "Wrong passwords cleared in those browsers",
    "limit": "Which limit",
    "network": "Network",
    "per_hour": "Limit per hour",
    "hits": "Count cleared",
    "was": "Stored before as",
}
DETAIL_ORDER = {key: i for i, key in enumerate(DETAIL_LABELS)}  # the most telling details first

# The app's own words in the details that hold them, by detail key. Only there: a device, an address or a
# reason is someone's own text, and a device named "cli" showed as "Device: command line" (a security review).
VALUE_WORDS = {
    "method": {"password+code": "password and code", "password": "password only"},
    "reason": {"wrong": "wrong code", "replay": "code already used", "malformed": "not six digits"},
    "via": {"cli": "command line", "first-run": "first-run setup", "signup": "sign-up page"},
    "counted_in": {"known browser": "a browser the person signed in from before, not the account"},
    "limit": {
        "sign-ups": "sign-ups (accounts made, or refused as existing)",
        "failed-sign-ins": "wrong passwords and unknown addresses at sign-in",
        "contact-48": "contact requests from one IPv6 /48",
        "sign-ups-48": "sign-ups from one IPv6 /48",
        "failed-sign-ins-48": "wrong passwords and unknown addresses at sign-in from one IPv6 /48",
    },
}


def recorded_time(text):
    """A time an audit record's details hold, as a naive UTC datetime (ValueError if it is none): written with
    a "Z" since 2026-12-07 (security._detail_json), without one before."""
    moment = datetime.fromisoformat(text)
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def _fmt_time(value, seconds=False):
    """A stored time (datetime or ISO text) as 'YYYY-MM-DD HH:MM UTC' (with the seconds: HH:MM:SS); other text
    unchanged."""
    if isinstance(value, str):
        try:
            value = recorded_time(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M") + " UTC"
    return "" if value is None else str(value)


def _humanise(kind):
    """A readable fallback for an event kind nobody described yet."""
    words = (kind or "event").replace("_", " ").replace("tfa", "2FA").replace("totp", "code").strip()
    return words[:1].upper() + words[1:]


def event_text(kind, detail):
    """One sentence, in plain words, saying what an audit event means (no codes, no secrets)."""
    if kind == "signin":
        return "Signed in with a code" if detail.get("method") == "password+code" else "Signed in with password only"
    until = _window_end(kind, detail)
    if until is not None:
        return f"{_WINDOW_TEXT} {_fmt_time(until)}"
    if kind == "password_changed" and detail.get("via") == "cli":
        return "Password changed by the server operator"
    if kind == "role_changed":
        return "Admin rights given" if detail.get("admin") else "Admin rights removed"
    # The device by name, as its owner knows it (a removal or rename they did not make is what they look for);
    # its number is in the details (detail_text).
    if kind == "device_renamed" and detail.get("device"):
        if detail.get("old_name"):
            return f"{KIND_LABELS[kind]}: \u201c{detail['old_name']}\u201d to \u201c{detail['device']}\u201d"
        return f"{KIND_LABELS[kind]} to \u201c{detail['device']}\u201d"
    if kind in ("tfa_enabled", "device_added", "device_removed") and detail.get("device"):
        return f"{KIND_LABELS[kind]}: \u201c{detail['device']}\u201d"
    return KIND_LABELS.get(kind) or _humanise(kind)


# The events whose `reason` is the app's own word (VALUE_WORDS): elsewhere it is what support or the operator
# wrote, and `users disable --reason replay` read "Reason: code already used" (a diff review).
_WORDED_REASONS = frozenset({"code_rejected", "totp_replay"})


def detail_text(detail, kind=None):
    """The detail of an event (of `kind`) as 'Label: value' pairs in plain words."""
    parts = []
    for key, value in sorted(detail.items(), key=lambda kv: (DETAIL_ORDER.get(kv[0], len(DETAIL_ORDER)), kv[0])):
        label = DETAIL_LABELS.get(key) or _humanise(key)
        if value is None or value == "":
            shown = "none"
        elif isinstance(value, bool):
            shown = "yes" if value else "no"
        elif key.endswith(("until", "since")):
            # To the second, as the record's own time on the audit page and in `users activity`: a lock's end
            # cut to the minute was a time at which sign-in was still refused (a review of times).
            shown = _fmt_time(value, seconds=True)
        elif isinstance(value, (list, tuple)):
            shown = ", ".join(str(v) for v in value) or "none"
        else:
            words = VALUE_WORDS.get(key, {}) if key != "reason" or kind in _WORDED_REASONS else {}
            shown = words.get(str(value), str(value))
        parts.append((label, shown))
    return parts


# Shown on every User Settings view: compiled once (db.Prepared).
_OWN_EVENTS = Prepared(lambda: AuditEvent.select().where((AuditEvent.user == Param("user")) & _before_page())
                       .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc()).limit(Param("limit")))


# Events in User Settings' Security activity, and after its "Show more" (one more is the most any caller gets:
# it tells whether older events follow).
ACTIVITY_SHORT, ACTIVITY_LONG = 10, 100


@bp.app_template_global()
def activity_shows_more():
    """Whether Security activity lists ACTIVITY_LONG events: on the page opened with ?activity=more ("Show
    more events"), and in the section an htmx action on that page sends back (_activity_query). The header is
    the browser's to set, as the query is: it chooses only how many of one's own events one sees."""
    return _activity_query().get("activity") == "more"


def _activity_query():
    """The query of the page Security activity is shown on: this request's, or, for the section an htmx action
    on that page sends back (renaming a device, signing out elsewhere), whose own address has no query, that
    of the page htmx names in HX-Current-URL. The list fell back to ten events there, and to the newest on a
    page of older ones."""
    # The request's own query only when it names the list: a device's forms carry `added` in theirs, and the
    # section their htmx answer sends back fell back to ten events on the longer list.
    current = request._get_current_object()
    args = current.args
    if not htmx.is_htmx(current) or "activity" in args or "before" in args:
        return args
    return htmx.page_query()


@bp.app_template_global()
def activity_view():
    """The Security activity list as this page shows it, as arguments for User Settings' address: {} for the
    ten latest. The page's forms carry it in their addresses, and their answers lead back to it (settings,
    security.fresh_login_required): without JavaScript the page came back with ten events after an action
    on the longer list."""
    if not activity_shows_more():
        return {}
    return {"activity": "more", "before": _activity_query().get("before")} if activity_before() \
        else {"activity": "more"}


@bp.app_template_global()
def activity_before():
    """Where Security activity's "Show older events" goes on from (?before=TIME,NUMBER: the last record the page
    before it showed, ActivityPage.older), as (time, record number), or None for the newest events; anything
    else reads as none."""
    return page_position(_activity_query().get("before", ""))


def page_position(value):
    """A place in a list of audit records in (time, number) order, as a link names it ("TIME,NUMBER", _page_end),
    as (time, record number); None for anything else. Any such place will do, a record's or not: the page
    lists the records before (or after) it."""
    at, _, number = value.rpartition(",")
    if not (0 < len(at) <= 40 and number.isascii() and number.isdigit() and len(number) <= 18):
        return None
    try:
        moment = datetime.fromisoformat(at)
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment
    except (ValueError, OverflowError):  # not a time, or one a zone puts outside the years a datetime holds
        return None
    return moment, int(number)


class ActivityPage(list):
    """Lines of Security activity, newest first; `older`: the `before` of the page after them (the time and
    number of the last record they show, "TIME,NUMBER"), or None when nothing is older. A page ends at a
    record, in the list's order (time, then number), not after a number of lines: the next one lists what
    came before it, so each record is on one page only, those of the same microsecond too (a run of refusals
    that goes on across the end is counted on each page for its records there)."""

    older = None


def _page_end(at, number):
    return f"{at.isoformat(timespec='microseconds')},{number}"


def _before_page():
    """Records before the page's end (`before`, `before_id`) in the list's order (_earlier_than)."""
    return _earlier_than((Param("before"), Param("before_id")), AuditEvent)


@bp.app_template_global()
def security_activity(user, limit=ACTIVITY_SHORT, before=None):
    """The person's own most recent security events (those before `before` if given), newest first, in plain
    words (for User Settings): at most `limit` lines, where a run of one refusal between two other events is
    one line with its count (_grouped_activity)."""
    if user is None or not getattr(user, "is_authenticated", False):
        return ActivityPage()
    limit = max(1, min(int(limit), ACTIVITY_LONG))
    bound = {"before": before[0], "before_id": before[1]} if before else {"before": _FAR_FUTURE, "before_id": 0}
    events = _OWN_EVENTS.rows(user=user.id, limit=limit + 1, **bound)  # one more: is anything older?
    if _repeats(events):
        return _grouped_activity(user.id, limit, bound)
    page = ActivityPage(_activity_line(e, user.id) for e in events[:limit])
    if len(events) > limit:
        page.older = _page_end(events[limit - 1].created_at, events[limit - 1].id)
    return page


def _activity_line(e, user_id, times=None):
    """One line of Security activity. The address of each event about the account that no admin did: the
    person's own, and those of whoever typed its address (a wrong password, a contact request in its name), so
    that its owner can tell them apart. Never an admin's address (an event with an actor). The browser a
    sign-in or a new device came from, as the sessions list names browsers: what lets a person notice an
    intruder's sign-in among their own ("Edge on Windows" when they use Firefox), and whether that browser was
    new to the account: an intruder can send the owner's browser name, not a cookie of the owner's browser.
    `times`: (count, first, whether there were at least that many) for a run of refusals shown as one line,
    whose addresses and browsers may be many and are not shown."""
    details, own = e.details, e.actor_id in (None, user_id) and times is None
    line = {"when": e.created_at, "when_text": _fmt_time(e.created_at), **_text_and_until(e.kind, details),
            "ip": e.ip if own else None, "browser": details.get("browser") if own else None,
            "new_browser": own and details.get("new_browser") is True, "times": None}
    if times is not None:
        count, first, at_least = times
        line.update(times=f"{count:,}", at_least=at_least, first=first, first_text=_fmt_time(first))
    return line


# Refusals that whoever knows an address, or its password, can cause again and again, held back only by the
# per-network limits (README "Security"): passwords and codes refused, sign-ins blocked, requests to support in
# the person's name. A few hundred of them pushed an intruder's sign-in out of Security activity, past "Show
# more" too, so each run of one of them between two other events is shown as one line with its count. The
# records themselves all stay, one per attempt (security.md 43), in the audit log and `users activity`.
REPEATED_REFUSALS = frozenset({
    "password_accepted", "password_rejected", "password_throttled", "password_lockout", "signin_blocked",
    "signin_account_disabled", "code_rejected", "code_throttled", "code_lockout", "totp_replay", "support_request"})
# A run is counted up to this many records (a count is a walk through the index): "1,000 times or more".
RUN_COUNTED = 1000
_FAR_FUTURE = datetime(9999, 1, 1)


def _repeats(events):
    """Whether two records of one refusal come between the same two other events (newest first)."""
    seen = set()
    for e in events:
        if e.kind not in REPEATED_REFUSALS:
            seen.clear()
        elif e.kind in seen:
            return True
        else:
            seen.add(e.kind)
    return False


def _newest_others():
    """The person's newest events other than the repeated refusals: the newest of each kind on the index by
    person, event and time, merged (a flood of a hundred thousand refusals is never walked through). Kinds no
    label names (none are written) are left out here; _OWN_EVENTS, which reads every kind, lists them."""
    arms = [AuditEvent.select(AuditEvent.id)
            .where((AuditEvent.user == Param("user")) & (AuditEvent.kind == kind) & _before_page())
            .order_by(AuditEvent.created_at.desc()).limit(Param("limit"))
            for kind in sorted(set(KIND_LABELS) - REPEATED_REFUSALS)]
    return (AuditEvent.select().where(AuditEvent.id.in_(functools.reduce(lambda a, b: a | b, arms)))
            .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc()).limit(Param("limit")))


_OTHER_EVENTS = Prepared(_newest_others)
_NEWEST_REFUSAL = Prepared(lambda: AuditEvent.select().where(
    (AuditEvent.user == Param("user")) & (AuditEvent.kind == Param("kind"))
    & (AuditEvent.created_at < Param("gap_end")) & _before_page()).order_by(AuditEvent.created_at.desc()).limit(1))
# The newest records of each refusal since a time, up to `cap` of each kind, in one statement.
_RECENT_REFUSALS = Prepared(lambda: functools.reduce(lambda a, b: a.union_all(b), [
    AuditEvent.select(AuditEvent.id, AuditEvent.kind, AuditEvent.created_at)
    .where((AuditEvent.user == Param("user")) & (AuditEvent.kind == kind) & (AuditEvent.created_at >= Param("since"))
           & _before_page())
    .order_by(AuditEvent.created_at.desc()).limit(Param("cap")) for kind in sorted(REPEATED_REFUSALS)]))
_BY_IDS_SIZE = 10
_BY_IDS = Prepared(lambda: AuditEvent.select().where(AuditEvent.id.in_([Param(f"id{n}") for n in range(_BY_IDS_SIZE)])))
# Read at once, the records of one refusal since the oldest event listed, when they are fewer than this; a
# flood of them is walked gap by gap instead (_runs).
RECENT_READ = 200


def _run_query():
    """How many records of refusal `kind` from (`since`, `since_id`) to `until`, before the page's end, up to
    `cap`, and the time of the first of them."""
    since = Param("since")
    newest = (AuditEvent.select(AuditEvent.created_at)
              .where((AuditEvent.user == Param("user")) & (AuditEvent.kind == Param("kind"))
                     & (AuditEvent.created_at >= since) & ((AuditEvent.created_at > since)
                                                          | (AuditEvent.id >= Param("since_id")))
                     & (AuditEvent.created_at <= Param("until")) & _before_page())
              .order_by(AuditEvent.created_at.desc()).limit(Param("cap")))
    return newest.select_from(fn.COUNT(SQL("*")), fn.MIN(newest.c.created_at))


_RUN = Prepared(_run_query)


def _as_time(value):
    """A time as the database returned it outside a model (SQLite: ISO text) as a datetime."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _grouped_activity(user_id, limit, bound):
    """Security activity when refusals repeat: the `limit` newest lines of the other events and, between each
    two of them (and above the newest), for each refusal, its record alone or one line for all of them. However
    many records a gap holds, this reads a few index entries per refusal and per gap that has any."""
    others = _OTHER_EVENTS.rows(user=user_id, limit=limit + 1, **bound)
    ascending = [e.created_at for e in reversed(others)]
    complete = len(others) <= limit  # no other event is older: the refusals below the last one are listed too

    def floor(at):
        """The time of the other event just below `at` (at it or before), which opens its gap; None below all."""
        index = bisect.bisect_right(ascending, at)
        return ascending[index - 1] if index else None

    recent = {kind: [] for kind in REPEATED_REFUSALS}
    since = datetime.min if complete else ascending[0]
    for record_id, kind, created in _RECENT_REFUSALS.values(user=user_id, since=since, cap=RECENT_READ, **bound):
        recent[kind].append((_as_time(created), record_id))
    runs = [run for kind, found in recent.items() for run in _runs(user_id, kind, found, floor, complete, bound)]
    # Newest first, in the order of the records the lines end with (time, then number), which the next
    # page's start follows.
    items = sorted([(e.created_at, e.id, 0, e) for e in others] + [(run[1], run[0], 1, run) for run in runs],
                   key=lambda item: item[:2], reverse=True)
    page, shown = ActivityPage(), [(at, is_run, item) for at, _, is_run, item in items[:limit]]
    if len(items) > limit:
        end = items[limit - 1][:2]  # the last record shown: (time, number)
        page.older = _page_end(*end)
        # A run that began at the page's end or before is counted here for its records from the end on; the
        # next page counts the others.
        shown = [(at, is_run, _recounted(user_id, item, end, bound) if is_run and item[3] <= end[0] else item)
                 for at, is_run, item in shown]
    # Only the runs shown are read whole.
    wanted = [run[0] for _, is_run, run in shown if is_run]
    records = {}
    for start in range(0, len(wanted), _BY_IDS_SIZE):
        ids = wanted[start:start + _BY_IDS_SIZE]
        ids += [0] * (_BY_IDS_SIZE - len(ids))
        records.update((e.id, e) for e in _BY_IDS.rows(**{f"id{n}": value for n, value in enumerate(ids)}))
    for _, is_run, item in shown:
        if not is_run:
            page.append(_activity_line(item, user_id))
        elif item[0] in records:  # (not erased meanwhile)
            record_id, _, count, first, at_least, _ = item
            page.append(_activity_line(records[record_id], user_id, (count, first, at_least) if count > 1 else None))
    return page


def _recounted(user_id, run, since, bound):
    """`run` counted for its records from `since` (time, number) on only."""
    record_id, newest, _, _, _, kind = run
    (count, first), = _RUN.values(user=user_id, kind=kind, since=since[0], since_id=since[1], until=newest,
                                  cap=RUN_COUNTED, **bound)
    return (record_id, newest, count, _as_time(first), count >= RUN_COUNTED, kind)


def _runs(user_id, kind, recent, floor, complete, bound):
    """The runs of one refusal in the gaps of the list: (its newest record's id and time, count, first time,
    whether the count stopped at RUN_COUNTED, the refusal). `recent`: its newest records since the oldest
    event listed, as (time, id), RECENT_READ at most: fewer, and they are all of them, grouped here; as many,
    and each gap is walked: its newest record, then its count."""
    if len(recent) < RECENT_READ:
        runs = {}
        for at, record_id in sorted(recent, reverse=True):  # newest first
            run = runs.setdefault(floor(at), [record_id, at, 0, at, False, kind])
            run[2] += 1
            run[3] = at
        return [tuple(run) for run in runs.values()]
    runs, gap_end = [], _FAR_FUTURE
    while True:
        newest = _NEWEST_REFUSAL.first(user=user_id, kind=kind, gap_end=gap_end, **bound)
        if newest is None:
            break
        below = floor(newest.created_at)
        if below is None and not complete:
            break  # below every event listed
        (count, first), = _RUN.values(user=user_id, kind=kind, since=below or datetime.min, since_id=0,
                                      until=newest.created_at, cap=RUN_COUNTED, **bound)
        runs.append((newest.id, newest.created_at, count, _as_time(first), count >= RUN_COUNTED, kind))
        if below is None:
            break
        gap_end = below
    return runs


def _text_and_until(kind, details):
    """An event's words, with the end of support's window apart (`until`), so that the page can show it in
    the reader's time zone like the event's own time, not in UTC beside a local time."""
    until = _window_end(kind, details)
    if until is not None:
        return {"text": _WINDOW_TEXT, "until": until, "until_text": _fmt_time(until)}
    return {"text": event_text(kind, details), "until": None}


_WINDOW_TEXT = "Support turned off 2FA until"


def _window_end(kind, detail):
    """The end of the support window an event opened, as a datetime, or None."""
    if kind != "support_tfa_disabled" or not detail.get("until"):
        return None
    try:
        return recorded_time(detail["until"])
    except (TypeError, ValueError):
        return None


# People's text on the admin pages (and the signed-in address in the layout): `revealed` in text, `revealed_address`
# for an address (revealed in <bdi>), `revealed_text` in an attribute or a <title>, where no markup goes.
bp.add_app_template_filter(revealed, "revealed")
bp.add_app_template_filter(revealed_address, "revealed_address")
bp.add_app_template_filter(revealed_text, "revealed_text")


@bp.app_template_filter("utc_minutes")
def utc_minutes(value):
    """Template filter: a naive UTC datetime as 'YYYY-MM-DD HH:MM UTC'."""
    return _fmt_time(value)


# ---------------------------------------------------------------- contact form (no sign-in needed)

@planned_for_values()  # an address strangers flood: the plan for any address read all its requests
def _recent_requests(field, value, *where):
    """How many contact requests with this email / ip (and `where`) arrived within the last hour. On
    PostgreSQL planned for its values each time (db.planned_for_values): the plan kept for all values, made for
    an address with a request or two, read every request in the address by its index and checked its time
    (25,000 for one that strangers kept sending requests for: 5-6 ms a count, under the address's lock),
    where the last hour's on the index by time are a handful (docs/performance.md)."""
    since = now() - timedelta(hours=1)
    return SupportRequest.select().where((field == value) & (SupportRequest.created_at >= since), *where).count()


@bp.route("/support/contact", methods=["GET", "POST"])
def contact():
    """Contact form for people who lost their authenticator; same answer whether or not the account exists."""
    form = ContactForm()
    error, status = None, 200
    if request.method == "GET" and not form.email.data:
        form.email.data = _prefill_email()
    if request.method == "POST":
        if not form.validate_on_submit():
            status = 400
        else:
            email = normalise_email(form.email.data)
            after_password, signed_in = _sender_of(email)
            if _take_request(form, email, after_password, signed_in):
                return redirect(url_for("support.contact_sent"))
            error = ("Several requests for this email address, or from your network, came in within the last "
                     "hour, so this one was not sent. Please wait an hour before sending another.")
            if not after_password:
                error += (" If this is your account and you know its password, sign in up to the code step first: "
                          "its link “Lost access to your authenticator app?” leads here with more room.")
            status = 429
    return render_template("support/contact.html", form=form, error=error), status


def _sender_of(email):
    """(after_password, signed_in): whether this browser entered the password of the account `email` names
    (signed in, at the code step, or refused after support's window), and whether it is signed in to it."""
    owner = _password_proven_user()
    # By account, not by spelling: an address stored before it was normalised is the same mailbox.
    named = User.by_email(email) if owner is not None else None
    after_password = named is not None and named.id == owner.id
    return after_password, after_password and current_user.is_authenticated


def _take_request(form, email, after_password, signed_in):
    """Store the request and its audit record unless the limits refuse it; returns whether it is sent (stored
    now, or the same request from this browser stored within the hour and still open: _repeat_key).

    Limits per hour (SUPPORT_REQUESTS_PER_HOUR): per address typed, per client network, and, looser, per IPv6
    /48 (SUPPORT_REQUESTS_PER_HOUR_48: whoever is routed one holds 65,536 /64s; a counter, as the stored /64s
    do not tell their /48 by a prefix). Anyone may type an address: strangers' requests could use up its limit
    and keep the owner out of the form for an hour, again and again. A browser that entered the account's
    password gets as many again (twice the limit per address); but after an intruder changed the password the
    owner knows none, and one stranger's three requests an hour kept them out (a security review).

    So each browser the account signed in from (security.contact_browser: known, or forgotten lately, as the
    owner's are once the intruder changed the password or signed them out) also has the limit for itself, per
    address, which nobody else can use up: its requests count there first, then against the address's shared
    limit (the stored request names the browser when it counted there). An intruder's browsers get one each
    too, but not the owner's. The per-network limits hold for every sender."""
    address = client_ip()
    ip = client_network(address)
    site = client_network_48(address)
    limit = current_app.config["SUPPORT_REQUESTS_PER_HOUR"]
    per_address = limit * (2 if after_password else 1)
    with write_transaction():
        # Count and insert in one write transaction, holding the address and network, so parallel posts cannot
        # slip past the limit (on PostgreSQL too, where the count alone locks nothing).
        lock_keys("contact-email:" + email, *(["contact-ip:" + ip] if ip else []),
                  *(["contact-48:" + site] if site else []))
        # The same request sent again within the hour while it is open (a second click; Back and Send again):
        # taken as sent (it was), not stored twice, and not refused as over the limit, which would say it was
        # not sent. Known by _repeat_key, which only the browser that sent it can make.
        form_hash = _repeat_key(email, form.message.data)
        if form_hash is not None and SupportRequest.select().where(
                (SupportRequest.created_at >= now() - timedelta(hours=1))
                & (SupportRequest.form_hash == form_hash) & SupportRequest.handled_at.is_null()).exists():
            return True
        if ((ip and _recent_requests(SupportRequest.ip, ip) >= limit)
                or network_full_until("contact-48", site) is not None):
            return False
        user = User.by_email(email)
        browser = contact_browser(user) if user is not None else None
        # Both counts under the address's lock: the browser's requests are all in this address.
        in_address = SupportRequest.email
        own = browser is not None and _recent_requests(
            in_address, email, SupportRequest.known_browser == browser.id) < limit
        if not own and _recent_requests(in_address, email, SupportRequest.known_browser.is_null()) >= per_address:
            return False
        req = SupportRequest.create(email=email, message=form.message.data, user=user, ip=ip, created_at=now(),
                                    form_hash=form_hash, known_browser=browser.id if own else None)
        count_for_network("contact-48", site)
        # Whether the sender had entered the password, and whether their browser had signed in to the account
        # (since when; forgotten since?): a record of what happened, not a sign of who sent it (someone who
        # stole the password has it too, and an intruder's browser signed in as well).
        audit("support_request", user=user, request=req.id, after_password=after_password,
              **({"signed_in": True} if signed_in else {}), **_browser_details(browser))
    return True


def _repeat_key(email, message):
    """What tells a contact request sent again by the same browser: a SHA-256 of that browser's session token
    (its cookie, which only it has; the session needs no row for it), the address and the words. Kept with the
    request (form_hash). A one-time id in the page did this before, and Back and Send again stored the request
    twice: the page is never cached, so Back brought a new one, with only the words put back (a review of the
    lost-phone path). Matching the words alone (a first version) let a stranger test, free of any limit,
    whether someone had sent a given text, or send it first so that the owner's own request was never stored.
    The password step gives the browser a new token: the same words sent after it are a new request, which
    says that the password was entered (a review)."""
    token = session.token
    if not token:
        return None
    text = "\n".join((token, email, message))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _browser_details(browser):
    """The audit details of a contact request sent from one of the account's own browsers (contact_browser):
    when it first signed in to the account, and whether it was forgotten since (a new password, Sign out
    everywhere else, a 2FA reset, ten newer browsers). Support tells the owner's browser from an intruder's by
    the first: an intruder's browser first signed in at the takeover, the owner's usual one long before."""
    if browser is None:
        return {}
    return {"browser_signed_in_since": browser.created_at,
            **({"browser_forgotten": True, "browser_forgotten_since": browser.forgotten_at}
               if browser.forgotten_at is not None else {})}


def _prefill_email():
    """The email of whoever is signed in or half-way through sign-in (the code step), else empty."""
    user = _password_proven_user()
    return user.email if user is not None else None


def _password_proven_user():
    """The account whose password this browser entered: signed in, half-way through sign-in (the code step,
    whose challenge lives server-side), or just refused because support's window had ended, else None."""
    if current_user.is_authenticated:
        return current_user._get_current_object()
    from .auth import blocked_sign_in_user, current_challenge

    challenge = current_challenge()
    return challenge.user if challenge is not None else blocked_sign_in_user()


@bp.get("/support/contact/sent")
def contact_sent():
    """Confirmation after a contact request (identical for known and unknown addresses)."""
    return render_template("support/contact_sent.html")


# ---------------------------------------------------------------- access to the Support page

def support_admin_required(view):
    """Admins with 2FA active and a fresh sign-in only (security.md 37); anonymous people go to sign-in."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not current_user.is_authenticated:
            return current_app.login_manager.unauthorized()
        if not current_user.is_admin:
            abort(403)
        if not current_user.has_2fa:
            # The way on rather than a bare "Forbidden": htmx loads that page whole (HX-Redirect).
            if htmx.is_htmx():
                return htmx.hx_redirect(url_for("support.index"), status=403)
            return render_template("support/needs_2fa.html"), 403
        if not is_fresh():
            # Like fresh_login_required, but an action posted from a stale page comes back to the Support
            # page after re-authenticating (the action itself is not replayed: it must be submitted again).
            # A disable comes back to that person's form with what was typed in it: confirming who the
            # person is often takes longer than a sign-in stays fresh.
            if request.method == "GET":
                back = request.full_path.rstrip("?")
            elif request.endpoint == "support.disable_2fa":
                _keep_draft(kwargs["user_id"])
                back = url_for("support.disable_2fa_form", user_id=kwargs["user_id"])
            elif request.endpoint == "support.end_window":
                # Back to that person alone, with the reason as typed (it is optional, but a lost one is
                # seldom typed again, and the next admin reads it on the row).
                _keep_end_draft(kwargs["user_id"])
                back = url_for("support.index", user=kwargs["user_id"])
            else:
                if request.endpoint in _REQUEST_ACTIONS:
                    # Said on the Support page afterwards: it came back there without a word, and the request
                    # looked handled to an admin who had pressed Mark as handled (a support walkthrough).
                    session[_DRAFT] = {"kind": _REQUEST_ACTIONS[request.endpoint], "request": kwargs["request_id"]}
                back = url_for("support.index", **_card_state(_card_args()))
            target = url_for("auth.reauth", next=back)
            return htmx.hx_redirect(target) if htmx.is_htmx() else redirect(target)
        return view(*args, **kwargs)

    return wrapper


_DRAFT = "support_draft"


def _keep_draft(user_id):
    """Keep a stale disable's entries in the (server-side) session for that person's form, cut to the form's
    own limits. Nothing is checked or done with them until the admin presses Disable again."""
    prefix = f"u{user_id}-"
    form = request.form
    session[_DRAFT] = {"user": user_id, "kind": "disable", "reason": form.get(prefix + "reason", "")[:REASON_MAX],
                       "duration": form.get(prefix + "duration", "")[:8], "ticket": form.get(prefix + "ticket", "")[:64],
                       "close_requests": bool(form.get(prefix + "close_requests")),
                       "requests_shown": form.get(prefix + "requests_shown", "")[:_SHOWN_MAX]}


def _keep_end_draft(user_id):
    """Keep a stale "End support window now"'s reason, as _keep_draft keeps a disable's entries."""
    session[_DRAFT] = {"user": user_id, "kind": "end",
                       "reason": request.form.get(f"end{user_id}-reason", "")[:REASON_MAX],
                       "window": request.args.get("window", "")[:32]}


_REQUEST_ACTIONS = {"support.mark_handled": "handled", "support.reopen": "reopen"}


def _take_request_draft():
    """After a stale Mark as handled or Reopen and the re-authentication it led to: what the Support page says
    about that request, once (the action itself is not replayed), and whether Recently handled is to be shown
    open (where Reopen is pressed again); else (None, False)."""
    draft = session.get(_DRAFT)
    if not draft or draft.get("kind") not in _REQUEST_ACTIONS.values():
        return None, False
    session.pop(_DRAFT)
    req = SupportRequest.get_or_none(SupportRequest.id == draft.get("request"))
    if req is None:
        return None, False
    handled = req.handled_at is not None
    if draft["kind"] == "handled":
        if handled:
            return ["The request from ", address(req.email), " was marked as handled meanwhile", *_by_whom(req),
                    "."], False
        return ["Not done yet: you confirmed it's you, and the request from ", address(req.email), " is still "
                "open. Press Mark as handled again if you still mean to."], False
    if not handled:
        return ["The request from ", address(req.email), " was reopened meanwhile: it is open."], False
    if req.id not in {r.id for r in _recently_handled()}:
        # HANDLED_SHOWN others were handled since: its Reopen is no longer on the page (a review)
        return ["Not done yet: the request from ", address(req.email), " is still handled, and no longer among "
                "the recently handled requests listed here, where Reopen is."], False
    return ["Not done yet: you confirmed it's you, and the request from ", address(req.email), " is still "
            "handled. Press Reopen again (under Recently handled) if you still mean to."], True


def _by_whom(req):
    """ ", by ADMIN" for a handled request as parts of a message (fields.message_html), or none when its admin's
    account is gone."""
    _add_handlers([req])
    return [", by ", address(req.handler)] if req.handler else []


def _take_draft(user_id, kind="disable"):
    """The kept entries for this person's disable form (or, with kind "end", their End support window form),
    once, or None."""
    draft = session.get(_DRAFT)
    if not draft:
        return None
    session.pop(_DRAFT)
    if draft.pop("user", None) != user_id or draft.pop("kind", "disable") != kind:
        return None
    if kind == "end":
        return draft
    if draft.get("duration") not in DURATIONS:
        draft["duration"] = None  # the form's default
    return {k: v for k, v in draft.items() if v is not None}


# ---------------------------------------------------------------- rows of people on the Support page

class UserRow:
    """What the Support page shows about one person (never a secret: devices are loaded without them).

    Search results are light: the disable form is built only for the row that shows it (`form` given), since
    rendering it in every row was most of a search's cost."""

    def __init__(self, user, devices, open_requests, form=None, notice=None, error=None, current=None,
                 actor_id=None, opened_by=None, end_form=None, sessions=None):
        self.user = user
        self.devices = devices
        self.open_requests = open_requests
        # Where they are signed in now (live_sessions): whether an intruder still is. Read-only.
        self.sessions = sessions or LiveSessions()
        # The latest support disable of this person: who, when, why. Shown with their window, and until
        # LAST_DISABLE_SHOWN after the disable once it has closed: someone who got in through a window and set
        # up their own phone leaves an account that looks like any other, and its owner's complaint comes later.
        self.opened_by = opened_by
        self.form = form
        self.notice = notice
        self.focus_notice = False  # the page's focus starts at the notice (a kept End reason: support.index)
        self.error = error
        self.window = None if devices else user.support_window(current)
        if opened_by and not self.window and opened_by["created_at"] < (current or now()) - LAST_DISABLE_SHOWN:
            self.opened_by = None
        self.is_self = user.id == (current_user.id if actor_id is None else actor_id)
        self.protected = self.is_self or user.is_admin
        # Out of use by the operator's `users disable`: nothing for support to do until `users enable`.
        self.disabled = user.disabled_at is not None
        # A disable only makes sense where there is 2FA to disable or a lapsed window to open again: while a
        # window is open, a second one (a double click, another admin's old tab) would move its end and sign
        # the person out of the sessions they opened in it.
        self.can_disable = not (self.protected or self.disabled) and (bool(devices) or self.window == "ended")
        self.can_end = not (self.protected or self.disabled) and self.window == "open"
        self.show_form = self.can_disable and form is not None
        # Blank unless sent back with an error; built only for the rare row with an open window.
        self.end_form = (end_form or EndWindowForm(formdata=None, prefix=f"end{user.id}")) if self.can_end else None
        # Which window the End form was shown for (its end time): it ends that one, or none (end_window).
        self.window_stamp = window_stamp(user) if self.can_end else None
        # Support's early end of this window ({created_at, actor_email, reason}), told apart from one that ran out.
        self.ended_early = opened_by.get("ended_early") if opened_by and self.window == "ended" else None


LAST_DISABLE_SHOWN = timedelta(days=30)


def _end_refusal(stamp, user):
    """Why an "End support window now" for the open window of `user`, sent with the window `stamp` its form was
    shown for, must not end it, or None: the window is another one (opened again since), or the form named
    none (a page from before this check, or an address typed by hand)."""
    if stamp == window_stamp(user):
        return None
    if not re.fullmatch(r"\d{20}", stamp):
        return ("Nothing was changed: this form does not say which support window it ends (a page from before "
                "an update?). The row below is as it is now: end the window from it if you still mean to.")
    return ("Nothing was changed: this is not the support window your page showed. It was opened again since, "
            f"and now runs until {user.tfa_reset_until:%Y-%m-%d %H:%M} UTC. Read who opened it and why below, "
            "then end it if you still mean to.")


def window_stamp(user):
    """A support window's end time to the microsecond, as its "End support window now" form's address carries
    it: no two windows of a person end at the same microsecond."""
    return f"{user.tfa_reset_until:%Y%m%d%H%M%S%f}" if user.tfa_reset_until else ""


USER_COLUMNS = (User.id, User.email, User.is_admin, User.created_at, User.last_login_at, User.tfa_reset_until,
                User.disabled_at)


_IDS_SQL = {}


def _by_ids(model, build, ids):
    """`build(ids)` run as a raw query whose SQL is generated once per database kind and number of ids:
    peewee's SQL generation cost more than SQLite takes to run these index lookups (bench/profile.py)."""
    key = (build, type(db.obj), len(ids))
    sql = _IDS_SQL.get(key)
    if sql is None:
        query = build(ids)
        sql, params = query.sql()
        if list(params) != list(ids):  # something besides the ids is a parameter: the text is not reusable
            return query
        _IDS_SQL[key] = sql
    return model.raw(sql, *ids)


def _devices_query(ids):
    """Devices of these people, oldest first (never their secrets)."""
    return (Device.select(Device.id, Device.user, Device.name, Device.created_at, Device.last_used_at)
            .where(Device.user.in_(ids)).order_by(Device.created_at, Device.id))


def _open_counts_query(ids):
    """(person id, number of open contact requests) for these people."""
    return (SupportRequest.select(SupportRequest.user, fn.COUNT(SupportRequest.id))
            .where(SupportRequest.user.in_(ids) & SupportRequest.handled_at.is_null())
            .group_by(SupportRequest.user))


def build_rows(users, forms=None, notices=None, errors=None, end_forms=None):
    """UserRows for `users` with their devices, open-request counts and live sessions in three queries (no
    N+1)."""
    ids = [u.id for u in users]
    devices = {i: [] for i in ids}
    counts = {}
    current, actor_id = now(), current_user.id  # once per page, not once per row
    if ids:
        for d in _by_ids(Device, _devices_query, ids):
            devices[d.user_id].append(d)
        counts = dict(_by_ids(SupportRequest, _open_counts_query, ids).tuples())
    sessions = live_sessions(ids, current)
    opened = _windows_opened_by(ids)  # their latest support disables (shown for a while after the window)
    forms, notices, errors, end_forms = forms or {}, notices or {}, errors or {}, end_forms or {}
    return [UserRow(u, devices[u.id], counts.get(u.id, 0), forms.get(u.id), notices.get(u.id), errors.get(u.id),
                    current=current, actor_id=actor_id, opened_by=opened.get(u.id), end_form=end_forms.get(u.id),
                    sessions=None if _sessions_refused(u, devices[u.id], current) else sessions.get(u.id))
            for u in users]


def _sessions_refused(user, devices, current):
    """Whether the app refuses every session of `user` at its next request (webapp._load_user): support's window
    ran out without a new device, or the operator disabled the account. Their rows stay until then, and Support
    listed them as "Signed in now" beside "Blocked" for up to the idle limit: an intruder, it seemed (a
    review of the lost-phone path)."""
    return user.disabled_at is not None or (not devices and user.support_window(current) == "ended")


SESSIONS_SHOWN = 5  # a person's live sessions listed in their row, those last seen most recently


class LiveSessions(list):
    """A person's live sessions as their row lists them (at most SESSIONS_SHOWN), with `total`: how many they
    have, more than listed when someone signed in from many browsers."""

    total = 0


def live_sessions(ids, current):
    """The live sessions (signed in, not past their idle or absolute limit: as User Settings lists them) of
    the people `ids`, as {person id: LiveSessions}, each {signed_in, last_seen, ip, browser}, last seen first.
    One query for the page. Read-only: support sees whether someone, an intruder perhaps, is still signed in,
    and ends nothing here (its disable and early end sign the person out everywhere; the operator's `users
    disable` takes the account back). Each person's are counted and ranked in the database, so a person
    signed in from thousands of browsers (during a support window the password alone signs in) costs the page
    a count, not thousands of rows."""
    if not ids:
        return {}
    cfg = current_app.config
    idle, absolute = cfg["SESSION_IDLE_TIMEOUT"], cfg["SESSION_ABSOLUTE_TIMEOUT"]
    prepared = _LIVE_SESSIONS.get(len(ids))
    if prepared is None:  # compiled once per number of people (a search page has up to PER_PAGE)
        prepared = _LIVE_SESSIONS[len(ids)] = Prepared(functools.partial(_live_sessions_query, len(ids)))
    rows = prepared.values(**{f"id{i}": person for i, person in enumerate(ids)}, shown=SESSIONS_SHOWN,
                           idle_after=current - idle, idle_before=current + idle,
                           created_after=current - absolute, created_before=current + absolute)
    found, t = {}, ServerSession
    for user_id, created_at, last_seen_at, ip, user_agent, total in rows:
        listed = found.setdefault(user_id, LiveSessions())
        listed.total = total
        listed.append({"signed_in": t.created_at.python_value(created_at),
                       "last_seen": t.last_seen_at.python_value(last_seen_at), "ip": ip,
                       "browser": browser_label(user_agent)})
    return found


_LIVE_SESSIONS = {}


def _live_sessions_query(count):
    """live_sessions' query for `count` people (Params id0, id1, ...): each one's live sessions ranked by when
    last seen and counted, of which the first `shown` are returned."""
    t = ServerSession
    place = fn.ROW_NUMBER().over(partition_by=[t.user], order_by=[t.last_seen_at.desc(), t.created_at.desc(), t.id])
    live = t.select(t.user, t.created_at, t.last_seen_at, t.ip, t.user_agent, place.alias("place"),
                    fn.COUNT(t.id).over(partition_by=[t.user]).alias("total")).where(
        t.user.in_([Param(f"id{i}") for i in range(count)]),
        t.last_seen_at.between(Param("idle_after"), Param("idle_before")),
        t.created_at.between(Param("created_after"), Param("created_before"))).alias("live")
    return (Select([live], [live.c.user_id, live.c.created_at, live.c.last_seen_at, live.c.ip, live.c.user_agent,
                            live.c.total])
            .where(live.c.place <= Param("shown")).order_by(live.c.user_id, live.c.place))


@planned_for_values()  # a page with a person of 100,000 records: the plan for any people read them all
def _windows_opened_by(ids):
    """Who opened each person's latest support window, when, with what reason and ticket (their latest
    support disable), and, under "ended_early", who ended that window before its time and why, in one query
    for the page. Another admin, or the same one later, sees whose decision it was without searching the
    audit log, and does not take a window support ended for one that ran out. On PostgreSQL planned for its
    people each time (db.planned_for_values): the plan kept for a page of several, made for people with a
    few records each, read every record of each person by the index on person and kept those of the three
    events; with someone under attack on the page that was 125,000 records (4.5 ms, against 0.05 reading
    the three events of each person on the index by person and event)."""
    if not ids:
        return {}
    found, ended, enrolled = {}, {}, {}
    for e in _by_ids(AuditEvent, _latest_window_events_query, ids).dicts():
        detail = json.loads(e["detail"] or "{}")
        event = {"id": e["id"], "created_at": e["created_at"], "actor_email": e["actor_email"],
                 "reason": detail.get("reason"), "ticket": detail.get("ticket")}
        {"support_tfa_disabled": found, "support_window_ended": ended}.get(e["kind"], enrolled)[e["user"]] = event
    for user, event in ended.items():
        if user in found and event["id"] > found[user]["id"]:  # an end of an older window says nothing now
            found[user]["ended_early"] = event
    for user, event in enrolled.items():
        # The person's new device closed the window, as its record says: not a device set up after the window
        # closed otherwise (the operator's reset-2fa, say), which the row took for it (a review).
        if user in found and event["id"] > found[user]["id"]:
            found[user]["closed_by_device"] = True
    return found


def _latest_window_events_query(ids):
    """The latest support disable, the latest early end and the latest window closed by a new device of each of
    these people, with the admin's address. The event kinds are written into the SQL, so that the ids are its
    only parameters and _by_ids keeps the text."""
    actor = User.alias()
    latest = (AuditEvent.select(fn.MAX(AuditEvent.id))
              .where(AuditEvent.kind.in_([SQL("'support_tfa_disabled'"), SQL("'support_window_ended'"),
                                          SQL("'tfa_reset_window_ended'")])
                     & AuditEvent.user.in_(ids))
              .group_by(AuditEvent.user, AuditEvent.kind))
    return (AuditEvent.select(AuditEvent.id, AuditEvent.kind, AuditEvent.user, AuditEvent.created_at,
                              AuditEvent.detail, actor.email.alias("actor_email"))
            .join(actor, JOIN.LEFT_OUTER, on=(AuditEvent.actor == actor.id))
            .where(AuditEvent.id.in_(latest)))


# The upper end of a prefix range: U+10FFFF, the last code point, sorts after every character in code point
# order (Python), as UTF-8 bytes (SQLite) and in C-locale collations. U+FFFF did not: an address with a
# character above it after the prefix (some CJK, emoji) fell outside the range.
_LAST_CHARACTER = "\U0010ffff"


def _email_order():
    """The email column compared and sorted by code point, as the [q, q + U+10FFFF) range needs.

    SQLite compares text that way already. PostgreSQL uses the database's collation, and a usual one
    (en_US, from glibc or ICU) ignores punctuation and sorts U+10FFFF before letters: the range then found
    nothing for "al". COLLATE "C" compares bytes, which in UTF-8 is code point order; the index
    user_email_c (models.POSTGRESQL_INDEXES) serves it. `users list` sorts by it too: the same order as here,
    whichever the database."""
    return User.email if is_sqlite() else User.email.collate('"C"')


def _prefix_query(lo, hi, length, prefix):
    """People whose email lies in [lo, hi) and starts with `prefix` (`length` characters)."""
    # Emails are stored lower-case; a prefix range on an email index, then an exact check on the rows the
    # range found (a safeguard: with code point order the range holds exactly the emails that start so).
    email = _email_order()
    return User.select(*USER_COLUMNS).where((email >= lo) & (email < hi)
                                            & (fn.SUBSTR(User.email, 1, length) == prefix))


def user_search_query(q):
    """People whose email starts with `q`, by email: a range on an email index, never a full scan."""
    query = _prefix_query(q, q + _LAST_CHARACTER, len(q), q) if q else User.select(*USER_COLUMNS)
    return query.order_by(_email_order())


# The same two queries as user_search_query, compiled once: peewee's SQL generation was the larger part of
# a search's database time on a million accounts (bench/profile.py).
_SEARCH_PREFIX = Prepared(lambda: _prefix_query(Param("lo"), Param("hi"), Param("length"), Param("prefix"))
                          .order_by(_email_order()).limit(Param("limit")).offset(Param("offset")))
_SEARCH_ALL = Prepared(lambda: User.select(*USER_COLUMNS).order_by(_email_order())
                       .limit(Param("limit")).offset(Param("offset")))


def search_users(q, page):
    """One page of search results and whether another page follows (no COUNT over a million rows)."""
    window = {"limit": PER_PAGE + 1, "offset": (page - 1) * PER_PAGE}
    if q:
        users = _SEARCH_PREFIX.rows(lo=q, hi=q + _LAST_CHARACTER, length=len(q), prefix=q, **window)
    else:
        users = _SEARCH_ALL.rows(**window)
    return users[:PER_PAGE], len(users) > PER_PAGE


def _page_arg():
    """The ?page= number, 1 when missing or nonsense."""
    try:
        return max(1, min(int(request.args.get("page", 1)), 100000))
    except (TypeError, ValueError):
        return 1


class OpenPage:
    """One page of open contact requests (open_page): `requests`, oldest first; `start`, the place of the
    first of them in the whole list (1 for the oldest); `total`; whether pages come before and after; and
    `window`, the part of the address that names this page ({} for the oldest)."""

    def __init__(self, requests, start, total, has_prev, has_next, window):
        self.requests, self.start, self.total = requests, start, total
        self.end = start + len(requests) - 1
        self.has_prev, self.has_next, self.window = has_prev, has_next, window


def open_page(user_id=None, after=None, before=None, newest=False):
    """A page of at most OPEN_REQUESTS_SHOWN open contact requests (only account `user_id`'s, if given),
    oldest first: those after request number `after` or before request number `before` in that order, the
    newest, or else the oldest. Pages are named by a request (keyset), not by a number: a request handled or
    sent meanwhile moves no other one past an admin going from page to page, and each page is a range of the
    (handled_at, created_at) index, however many are open. A page that would be empty, or short at the start,
    falls back to the newest or the oldest. Each request is marked as _mark_request_hints says."""
    page = _open_requests(user_id, after, before, newest)
    _mark_request_hints(page.requests)  # prepared as usual: planning its OR of a hundred ranges costs 1.5-3 ms
    return page


@planned_for_values()
def _open_requests(user_id, after, before, newest):
    """open_page's requests, without their hints. On PostgreSQL each read is planned for its values, never
    prepared (db.planned_for_values): the plan kept for any page size, guessing a tenth of the open requests
    for its LIMIT, walked the index by time from the oldest request through all the handled ones to the open
    ones (99,700 of them for the oldest page, 12 ms, against 0.1 on the (handled_at, created_at) index)."""
    is_open = SupportRequest.handled_at.is_null()
    if user_id is not None:
        is_open &= SupportRequest.user == user_id
    shown = OPEN_REQUESTS_SHOWN

    def read(*where, newest_first=False):
        order = ((SupportRequest.created_at.desc(), SupportRequest.id.desc()) if newest_first
                 else (SupportRequest.created_at, SupportRequest.id))
        return list(SupportRequest.select().where(is_open, *where).order_by(*order).limit(shown + 1))

    def count(*where):
        return SupportRequest.select().where(is_open, *where).count()

    key = _request_key(after if after is not None else before)
    page = None
    if key is not None and after is not None:
        rows = read(_later_than(key))
        if rows:
            start = count(_earlier_than(_key_of(rows[0]))) + 1
            page = OpenPage(rows[:shown], start, count(), start > 1, len(rows) > shown, {"after": after})
        else:
            newest = True  # nothing after it now (handled meanwhile): the newest are nearest
    elif key is not None and before is not None:
        rows = read(_earlier_than(key), newest_first=True)
        if len(rows) > shown:  # fewer: the oldest page holds them all
            rows = rows[:shown][::-1]
            start = count(_earlier_than(_key_of(rows[0]))) + 1
            total = count()
            page = OpenPage(rows, start, total, True, start + len(rows) - 1 < total, {"before": before})
    if page is None and newest:
        rows = read(newest_first=True)
        more = len(rows) > shown
        rows = rows[:shown][::-1]
        total = count() if more else len(rows)
        page = OpenPage(rows, total - len(rows) + 1, total, more, False, {"newest": 1} if more else {})
    if page is None:
        rows = read()
        more = len(rows) > shown
        # Fewer than a page: that is all of them, so no COUNT query is needed (the usual case).
        page = OpenPage(rows[:shown], 1, count() if more else len(rows), False, more, {})
    return page


def _request_key(number):
    """The place of request `number` in the order of the open list ((created_at, id)), or None when there is
    no such request (erased, or purged long after it was handled: the page falls back to the oldest)."""
    if number is None:
        return None
    row = SupportRequest.select(SupportRequest.id, SupportRequest.created_at).where(
        SupportRequest.id == number).first()
    return _key_of(row) if row is not None else None


def _key_of(req):
    return req.created_at, req.id


def _later_than(key, model=SupportRequest):
    """Rows of `model` after `key` in (created_at, id) order; written as a range on created_at, which the
    indexes serve."""
    at, number = key
    return (model.created_at >= at) & ((model.created_at > at) | (model.id > number))


def _earlier_than(key, model=SupportRequest):
    """Rows of `model` before `key` in (created_at, id) order (see _later_than): the open contact requests'
    pages, and Security activity's (_before_page)."""
    at, number = key
    return (model.created_at <= at) & ((model.created_at < at) | (model.id < number))


def _mark_request_hints(requests, last_code=True):
    """Set on each request what support can tell of its sender and of the account's phone:
    - `after_password`: whether the sender had entered the account's password (signed in, at the code step,
      or refused after support's window), and `signed_in`, whether they were signed in, as its audit record
      says. Not proof of who sent it, but the one difference between the owner and a stranger typing their
      address that support can see.
    - `browser_since`: when the sender's browser first signed in to the account, if it had (its audit
      record's browser_signed_in_since), and `browser_forgotten`, whether it was no longer known then. The
      owner's usual browser first signed in long before any trouble; an intruder's browser signed in too,
      but only from the takeover on. A hint, like the other: a shared computer the owner once used counts.
    - `last_code_at` (with `last_code`, for open requests): when a code from the account's devices that
      existed when it was sent was last accepted. "I lost my phone" followed by a right code from that phone,
      or sent minutes after one, is worth a question before 2FA is turned off; a new phone set up since
      (after support's disable) says nothing about it.
    Two queries for the whole list."""
    ids = {r.user_id for r in requests if r.user_id}
    records, devices = {}, {}
    if ids:
        # Each request's own record, written with it (_take_request), looked for near its time on the
        # (user, kind, created_at) index. Reading every contact record of these people read tens of thousands
        # a page for an address strangers keep sending requests for (anyone may type one: a few an hour).
        # The terms joined flat: a chain of | nests a level of parentheses per request, and SQLite's parser
        # stops at 100.
        near = [(AuditEvent.user == r.user_id) & (AuditEvent.kind == "support_request")
                & AuditEvent.created_at.between(r.created_at - _WRITTEN_TOGETHER, r.created_at + _WRITTEN_TOGETHER)
                for r in requests if r.user_id]
        events = AuditEvent.select(AuditEvent.user, AuditEvent.detail, AuditEvent.created_at).where(
            NodeList(near, " OR ", parens=True))
        for e in events:
            details = e.details
            records.setdefault((e.user_id, details.get("request")), []).append(
                (e.created_at, bool(details.get("after_password")), bool(details.get("signed_in")), details))
        if last_code:
            used = Device.select(Device.user, Device.created_at, Device.last_used_at).where(
                Device.user.in_(sorted(ids)) & Device.last_used_at.is_null(False))
            for user_id, created_at, used_at in used.tuples():
                devices.setdefault(user_id, []).append((created_at, used_at))
    for r in requests:
        # Its own record, written with it in one transaction: on SQLite a request deleted by the purge or an
        # erasure gives its number to the next one, and the old request's record must not speak for it.
        own = [(entered, signed_in, details) for at, entered, signed_in, details
               in records.get((r.user_id, r.id), ()) if abs(at - r.created_at) <= _WRITTEN_TOGETHER]
        r.after_password = any(entered for entered, _, _ in own)
        r.signed_in = any(signed_in for _, signed_in, _ in own)
        browser = next((details for _, _, details in own if details.get("browser_signed_in_since")), {})
        r.browser_since = _recorded_or_none(browser.get("browser_signed_in_since"))
        r.browser_forgotten = bool(browser.get("browser_forgotten"))
        # When: support sees that the owner cut that browser off the day before (older records say only that).
        r.browser_forgotten_at = _recorded_or_none(browser.get("browser_forgotten_since"))
        r.last_code_at = max((used for made, used in devices.get(r.user_id, ()) if made <= r.created_at),
                             default=None)


def _recorded_or_none(text):
    """A time an audit record's details hold (recorded_time), or None for none or anything else."""
    try:
        return recorded_time(text) if isinstance(text, str) else None
    except ValueError:
        return None


# How far from its request's time a contact request's audit record may be dated: the two are written in one
# transaction, a moment apart (unless the clock was stepped in between: the hint is then missing, not wrong).
_WRITTEN_TOGETHER = timedelta(seconds=5)


def _index_context(q, page, rows=None, has_next=False):
    """Everything the Support page template needs."""
    if rows is None:
        users, has_next = search_users(q, page)
        rows = build_rows(users)
    return {"q": q, "page_no": page, "rows": rows, "has_next": has_next, **_requests_context()}


def _requests_context():
    """The contact requests part of the Support page: a page of the open ones (all of them when they fit,
    else the card's pager leads to the others), how many are open, and the recently handled. `requests_args`
    is the card's part of the address, which its buttons carry so that the card comes back as it was."""
    args = _card_args()
    person = None
    if args.get("requests") == "theirs":
        person = User.select(User.id, User.email).where(User.id == args["user"]).first()
        if person is None:  # erased meanwhile, and their requests with them: the whole list
            args.pop("requests")
    page = open_page(person.id if person else None, after=args.get("after"), before=args.get("before"),
                     newest="newest" in args)
    view = {k: v for k, v in args.items() if k not in _WINDOW_ARGS}  # the page the pager's links keep

    def link(**window):
        return url_for("support.index", **view, **window, _anchor="open-requests")

    links = {"oldest": link(), "newest": link(newest=1)}
    if page.requests:
        links.update(older=link(before=page.requests[0].id), newer=link(after=page.requests[-1].id))
    if person is not None:
        links["all"] = url_for("support.index", **{k: v for k, v in view.items() if k != "requests"},
                               _anchor="open-requests")
    return {"requests": page.requests, "requests_page": page, "requests_links": links,
            "requests_of": person.email if person else None,
            "open_count": _open_count() if person else page.total,
            "requests_args": {**_card_state(view), **page.window},
            "handled": _recently_handled()}


# The open requests card's part of the Support page's address: whose requests it lists (`requests=theirs`: only
# those of the account `user` the page is for), and which page of them (_WINDOW_ARGS, see open_page); with the
# search it sits under (q, page), which the pager's links keep.
_WINDOW_ARGS = ("after", "before", "newest")
_CARD_ARGS = ("q", "page", "user", "requests") + _WINDOW_ARGS


def _card_state(args):
    """Of the card's arguments, those its buttons carry (whose requests, which page), not the search's."""
    return {k: v for k, v in args.items() if k in _WINDOW_ARGS or (k in ("user", "requests") and "requests" in args)}


def _card_args():
    """The card's arguments, checked (nonsense is left out) and at most one of _WINDOW_ARGS: from the address
    (the page's, or that of a button on the card, which carries them), else, for an htmx action elsewhere on
    the page (a disable, which refreshes the card too), from the page's own address (HX-Current-URL)."""
    args = request.args
    if htmx.is_htmx() and not any(name in args for name in _CARD_ARGS):
        args = htmx.page_query()  # {} when it is not an address: the card as it is first shown
    found = {}
    if args.get("q"):
        found["q"] = args["q"][:254]
    for name, top in (("page", 100000), ("user", 2 ** 63), ("after", 2 ** 63), ("before", 2 ** 63)):
        value = args.get(name, "")
        if value.isascii() and value.isdigit() and 0 < int(value) < top and not (name == "page" and value == "1"):
            found[name] = int(value)
    if args.get("requests") == "theirs" and "user" in found:
        found["requests"] = "theirs"
    if args.get("newest") == "1":
        found["newest"] = 1
    window = [name for name in _WINDOW_ARGS if name in found]
    for name in window[1:]:  # a page is named one way
        del found[name]
    return found


def _recently_handled():
    """The last HANDLED_SHOWN requests marked as handled (newest first), each with who handled it, so a
    request closed by mistake can be found and reopened."""
    handled = list(SupportRequest.select().where(SupportRequest.handled_at.is_null(False))
                   .order_by(SupportRequest.handled_at.desc(), SupportRequest.id.desc()).limit(HANDLED_SHOWN))
    _add_handlers(handled)
    _add_outcomes(handled)
    _mark_request_hints(handled, last_code=False)  # decided already: the phone's later codes are no news
    return handled


def _add_outcomes(requests):
    """Set `disabled_for` on handled requests that a support disable closed: the window's length ("24
    hours"), from the disable's audit record, which names the requests it closed. Others were marked as
    handled alone (None). One query for all of them."""
    for r in requests:
        r.disabled_for = None
    users = sorted({r.user_id for r in requests if r.user_id})
    if not users:
        return
    wanted = {r.id: r for r in requests}
    events = AuditEvent.select(AuditEvent.detail, AuditEvent.created_at).where(
        (AuditEvent.kind == "support_tfa_disabled") & AuditEvent.user.in_(users))
    for event in events:
        detail = json.loads(event.detail or "{}")
        for number in str(detail.get("requests") or "").split(","):
            closed = wanted.get(int(number)) if number.strip().isdigit() else None
            # That disable closed it this time: one reopened since and handled again was closed otherwise.
            if closed is not None and abs(closed.handled_at - event.created_at) <= timedelta(seconds=5):
                closed.disabled_for = detail.get("duration") or "a time"


def _add_handlers(requests):
    """Set `handler` (the admin's address, or None) on handled requests: one query for all of them."""
    ids = sorted({r.handled_by_id for r in requests if r.handled_by_id})
    emails = dict(User.select(User.id, User.email).where(User.id.in_(ids)).tuples()) if ids else {}
    for r in requests:
        r.handler = emails.get(r.handled_by_id)


def _open_count():
    """How many contact requests are waiting."""
    return SupportRequest.select().where(SupportRequest.handled_at.is_null()).count()


@bp.get("/support")
@support_admin_required
def index():
    """The Support page: search people, open contact requests; htmx searches get only the results."""
    q = normalise_email(request.args.get("q", ""))[:254]
    page = _page_arg()
    one = request.args.get("user", type=int)
    if one is not None and 0 < one < 2 ** 63:
        # A contact request's "Show account": that account alone, not a search for its address, which would
        # also list look-alikes that start the same (bob@example.com.evil.example).
        users = list(User.select(*USER_COLUMNS).where(User.id == one))
        kept = _take_draft(one, kind="end")  # a stale "End support window now", back from re-authenticating
        end_forms = None
        if kept and kept.get("reason"):
            end_forms = {one: EndWindowForm(formdata=None, prefix=f"end{one}", data={"reason": kept["reason"]})}
        rows = build_rows(users, end_forms=end_forms)
        if rows and end_forms and rows[0].can_end:  # else the window closed meanwhile: there is nothing to press
            # Still the window the stale page showed? (A review: re-authenticating led past end_window's check,
            # and the kept reason ended a window opened since.)
            rows[0].error = _end_refusal(kept.get("window", ""), users[0])
            if rows[0].error is None:
                rows[0].notice = _END_DRAFT_KEPT
                rows[0].focus_notice = True  # a notice already there at load is not read out: the focus goes to it
        context = _index_context(users[0].email if users else "", 1, rows=rows)
        return render_template("support/index.html", gone=not users, **context)
    if htmx.is_htmx():
        users, has_next = search_users(q, page)
        return htmx.render("support/index.html", "support/_results.html", q=q, page_no=page,
                           rows=build_rows(users), has_next=has_next)
    # A notice already in the page as it loads is not read out: the focus starts there (app.js focuses the
    # htmx one).
    notice, open_handled = _take_request_draft()
    return render_template("support/index.html", requests_notice=notice, focus_requests_notice=bool(notice),
                           open_handled=open_handled, **_index_context(q, page))


# ---------------------------------------------------------------- actions on one person

def _target_or_404(user_id):
    """The person an action is about (selected without their password hash)."""
    user = User.select(*USER_COLUMNS).where(User.id == user_id).first()
    if user is None:
        abort(404)
    return user


def _lock_target(user_id):
    """Re-read the person inside the write transaction (row lock on PostgreSQL); 404 if deleted meanwhile."""
    user = for_update(User.select(*USER_COLUMNS).where(User.id == user_id)).first()
    if user is None:
        abort(404)
    return user


_PROTECTED = ("Support cannot change two-factor authentication on its own account or on another admin's account. "
              "Ask the server operator instead.")


def _recheck_actor(actor):
    """First in the action's transaction: hold the acting admin's row and check that they are still an admin
    whose account is in use. Checked when the request came in (support_admin_required), but `users disable`
    or `promote --revoke` of that admin may have committed since, and told the operator it took effect (a
    race review: the disabled admin's disable still went through after it). Held, so that such a command
    waits for the action or the action for it, and before the person's row, in the order those commands
    take them (every admin, then the person)."""
    row = for_update(User.select(User.is_admin, User.disabled_at).where(User.id == actor.id)).first()
    if row is None or not row.is_admin or row.disabled_at is not None:
        abort(403, "Your account can no longer take support actions: the server operator changed it a moment "
                   "ago. Nothing was changed.")


def _refuse_protected(target):
    """Separation of duties: no action on yourself or on another admin (security.md 41). An attempt to act
    (a POST: the page offers no such button, so it came from a forged request or a page from before a
    promotion) is audited, for whoever reviews what admins did; reading the form is only logged."""
    if target.id == current_user.id or target.is_admin:
        log.warning("support action refused: actor=%s target=%s", current_user.id, target.id)
        if request.method == "POST":
            with write_transaction():
                audit("support_action_refused", user=target, actor=current_user._get_current_object(),
                      action=request.endpoint.rpartition(".")[2],
                      why="own account" if target.id == current_user.id else "another admin")
        abort(403, _PROTECTED)


def _focus(form):
    """Mark Reason as where a keyboard user lands (htmx focuses [autofocus] in swapped content; a full page
    focuses it on load). When the form has errors, fields.py moves the focus to the first field with one."""
    form.reason.render_kw = {**(form.reason.render_kw or {}), "autofocus": True}  # a copy: shared by the class
    return form


def _row_response(target, status=200, form=None, notice=None, error=None, flash_message=None,
                  refresh_requests=False, warning=None, end_form=None):
    """htmx: the person's row re-rendered in place; plain forms: redirect with a flash, or the page with errors."""
    fresh = User.select(*USER_COLUMNS).where(User.id == target.id).get()
    if warning and htmx.is_htmx():
        # One line: a notice that names people is a list of parts (fields.message_html).
        notice = (notice if isinstance(notice, list) else [notice]) + [" " + warning] if notice else warning
    rows = build_rows([fresh], forms={fresh.id: form} if form else None,
                      notices={fresh.id: notice} if notice else None, errors={fresh.id: error} if error else None,
                      end_forms={fresh.id: end_form} if end_form else None)
    if htmx.is_htmx():
        # htmx 2 does not swap 4xx answers: validation errors come back 200 inside the fragment.
        if refresh_requests:
            # The action may have closed requests: the list below is refreshed out of band.
            return htmx.render("support/index.html", "support/_row_update.html", row=rows[0],
                               **_requests_context())
        return htmx.render("support/index.html", "support/_user_row.html", row=rows[0],
                           **({"person_requests": _person_requests(fresh.id)} if form is not None else {}))
    if status < 400:
        flash(flash_message or notice, "success")
        if warning:
            flash(warning, "warning")  # a line of its own, not shown as part of the success
        return redirect(url_for("support.index", user=fresh.id))  # that person alone, not a search
    if form is not None:
        # The disable form with its errors, on the page where the form lives without JavaScript.
        return htmx.render("support/disable.html", "support/_user_row.html", status=status, row=rows[0],
                           person_requests=_person_requests(fresh.id))
    context = _index_context(fresh.email, 1, rows=rows)
    return htmx.render("support/index.html", "support/_user_row.html", status=status, **context)


@bp.get("/support/users/<int:user_id>/disable-2fa")
@support_admin_required
def disable_2fa_form(user_id):
    """One person's "Temporarily disable 2FA" form: htmx swaps it into their row; without JavaScript, a page."""
    target = _target_or_404(user_id)
    _refuse_protected(target)
    draft = _take_draft(target.id) or {}
    person_requests = _person_requests(target.id)
    if "requests_shown" not in draft:
        # The requests listed (this page lists at most OPEN_REQUESTS_SHOWN, oldest first)
        draft["requests_shown"] = ",".join(str(r.id) for r in person_requests)
    form = DisableForm(formdata=None, prefix=f"u{target.id}", data=draft)
    if not person_requests:
        # With requests of theirs, those come first, on the form's own page and in the row: the focus starts
        # at them (the top of the page, or their heading in the row), so keyboard and screen-reader users meet
        # them before the form instead of landing past them in Reason.
        _focus(form)
    notices = {target.id: _DRAFT_KEPT} if len(draft) > 1 else None
    row = build_rows([target], forms={target.id: form}, notices=notices)[0]
    if not row.can_disable:
        row.error = (_ACCOUNT_DISABLED if row.disabled else _already_off(target) if row.window == "open"
                     else _NOTHING_TO_DISABLE)
    return htmx.render("support/disable.html", "support/_user_row.html", row=row, person_requests=person_requests)


class _Listed(list):
    """Requests listed, with `total`: how many there are, more than listed when the list stops at a page."""

    def __init__(self, page):
        super().__init__(page.requests)
        self.total = page.total


def _person_requests(user_id):
    """The person's open contact requests, oldest first, shown above the disable form (in the row and on the
    form's own page): the admin reads what they asked for before deciding. At most OPEN_REQUESTS_SHOWN, and
    `total` says how many there are (the form marks as handled only those listed)."""
    return _Listed(open_page(user_id))


@bp.post("/support/users/<int:user_id>/disable-2fa")
@support_admin_required
def disable_2fa(user_id):
    """Temporarily disable a person's 2FA: revoke devices, open a time-boxed window, end sessions (security.md 38-42)."""
    target = _target_or_404(user_id)
    _refuse_protected(target)
    form = DisableForm(prefix=f"u{target.id}")
    if not form.validate():
        return _row_response(target, status=400, form=_focus(form),
                             error="Nothing was changed. Check the fields below.")
    label, duration = DURATIONS[form.duration.data]
    actor = current_user._get_current_object()
    with write_transaction():
        _recheck_actor(actor)
        locked = _lock_target(target.id)
        if locked.is_admin:  # made an admin since the page was read
            abort(403, _PROTECTED)
        disabled = locked.disabled_at is not None  # by the operator since the page was read
        has_devices = Device.select().where(Device.user == locked.id).exists()
        # Opening a window for someone without 2FA would lock them out when it ends.
        nothing_to_disable = not has_devices and locked.tfa_reset_until is None
        already_open = not has_devices and locked.support_window() == "open"
        if not (disabled or nothing_to_disable or already_open):
            until, removed, sessions, closed, left_open, meanwhile = _open_window(locked, actor, form, label,
                                                                                   duration)
    # Rendering happens after the write transaction, so the write lock is held no longer than needed.
    if disabled:
        return _row_response(target, status=409, error=_ACCOUNT_DISABLED)
    if nothing_to_disable:
        return _row_response(target, status=400, form=form, error=_NOTHING_TO_DISABLE + " Nothing was changed.")
    if already_open:
        return _row_response(target, status=409, error=_already_off(locked))
    # The app sends no email: the notice says what the reply to the person must tell them.
    # A message naming people by their addresses, as parts (fields.message_html): flashed, or in the row.
    handled = [f", {_count(closed, 'contact request')} marked as handled"] if closed else []
    if meanwhile:
        handlers = sorted({r.handler for r in meanwhile if r.handler})
        were = "was" if len(meanwhile) == 1 else "were"
        by = []
        for handler in handlers:
            by += [", " if by else ", by ", address(handler)]
        handled += [f" ({_count(len(meanwhile), 'request')} shown on the form {were} marked as handled meanwhile",
                    *by, ")"]
    notice = ["2FA for ", address(target.email), f" is off until {_fmt_time(until)}: {_count(removed, 'device')} "
              f"revoked, {_count(sessions, 'session')} ended", *handled, ". Now reply to them: until then they sign "
              "in with their password alone, and they should set up their new phone right away."]
    warning = None
    if left_open:
        warning = (f"{_count(left_open, 'contact request')} of theirs {'was' if left_open == 1 else 'were'} left "
                   "open: not shown when this form was, or this page is older than the last upgrade. Read "
                   "before marking as handled.")
    return _row_response(target, notice=notice, refresh_requests=True, warning=warning)


_NOTHING_TO_DISABLE = "This person has no two-factor authentication to disable."
_ACCOUNT_DISABLED = ("The server operator has disabled this account: support actions on it are not possible. "
                     "Nothing was changed.")
_END_DRAFT_KEPT = ("Your reason was kept while you confirmed it's you. Nothing was changed yet: the window is "
                   "still open. Check the reason, then press End the window.")
_DRAFT_KEPT = "Your entries were kept while you confirmed it's you. Nothing was changed yet: check them, then press Disable."


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _already_off(user):
    return ["2FA for ", address(user.email), f" is already off until {_fmt_time(user.tfa_reset_until)}. Nothing "
            "was changed. To give them a different end time, end the support window first, then disable again."]


def _open_window(locked, actor, form, label, duration):
    """The disable itself, inside the caller's transaction: every step or none (security.md 39, 40, 42)."""
    current = now()
    until = current + duration
    removed, sessions, details = revoke_second_factor(locked, reset_until=until)
    closed = []
    if form.close_requests.data:
        # Only those the admin could have read (see DisableForm.requests_shown), each named in the record.
        if form.requests_shown.data:
            shown = ((SupportRequest.user == locked.id) & SupportRequest.handled_at.is_null()
                     & SupportRequest.id.in_(form.requests_shown.data))
            # Held until the commit: another admin's Mark as handled of one of them waits, then finds it handled.
            closed = [r.id for r in for_update(SupportRequest.select(SupportRequest.id).where(shown)
                                               .order_by(SupportRequest.id))]
        if closed:
            SupportRequest.update(handled_at=current, handled_by=actor.id).where(
                SupportRequest.id.in_(closed)).execute()
    audit("support_tfa_disabled", user=locked, actor=actor, reason=form.reason.data,
          ticket=form.ticket.data or None, until=until, duration=label,
          devices_removed=removed, sessions_ended=sessions, requests_closed=len(closed),
          requests=", ".join(map(str, closed)) or None, **details)
    left_open, handled_meanwhile = 0, []
    if form.close_requests.data:  # what the admin asked to close but could not have read: said in the notice
        left_open = SupportRequest.select().where((SupportRequest.user == locked.id)
                                                  & SupportRequest.handled_at.is_null()).count()
        if form.requests_shown.data:
            # Shown on the form, but another admin marked them as handled since: said too (a support
            # walkthrough: the outcome did not mention them, and the request read "no 2FA change with it").
            handled_meanwhile = list(SupportRequest.select(SupportRequest.id, SupportRequest.handled_by).where(
                (SupportRequest.user == locked.id) & SupportRequest.id.in_(form.requests_shown.data)
                & SupportRequest.handled_at.is_null(False) & SupportRequest.id.not_in(closed or [0])))
            _add_handlers(handled_meanwhile)
    return until, removed, sessions, len(closed), left_open, handled_meanwhile


@bp.post("/support/users/<int:user_id>/end-window")
@support_admin_required
def end_window(user_id):
    """End a person's support window now: password-only sign-in stops working at once (fail closed)."""
    target = _target_or_404(user_id)
    _refuse_protected(target)
    form = EndWindowForm(prefix=f"end{target.id}")
    if not form.validate():
        return _row_response(target, status=400, end_form=form, error="Nothing was changed. Check the reason below.")
    actor = current_user._get_current_object()
    with write_transaction():
        _recheck_actor(actor)
        locked = _lock_target(target.id)
        has_devices = Device.select().where(Device.user == locked.id).exists()
        current = now()
        disabled = locked.disabled_at is not None
        is_open = not (has_devices or disabled) and locked.support_window(current) == "open"
        # The window on the admin's page, not one opened since: another admin may have ended that one and
        # opened a new one after checking the person again (a support walkthrough: a stale End form closed
        # the new window, under a reason written about the old one, and blocked the person).
        another = is_open and _end_refusal(request.args.get("window", ""), locked)
        if is_open and not another:
            User.update(tfa_reset_until=current).where(User.id == locked.id).execute()
            # Sessions opened with the password alone during the window end with it.
            sessions = end_user_sessions(locked)
            audit("support_window_ended", user=locked, actor=actor, was_until=locked.tfa_reset_until,
                  sessions_ended=sessions, reason=form.reason.data or None)
    if disabled:
        return _row_response(target, status=409, error=_ACCOUNT_DISABLED)
    if not is_open:
        return _row_response(target, status=400, error="This person has no open support window. Nothing was changed.")
    if another:
        # The reason comes back as typed, under the row as it is now: who opened this window, when and why.
        return _row_response(target, status=409, end_form=form, error=another)
    return _row_response(target, notice=["The support window for ", address(target.email), " is closed; signing in "
                                         "now needs support again."])


@bp.post("/support/requests/<int:request_id>/handled")
@support_admin_required
def mark_handled(request_id):
    """Mark one contact request as handled (it leaves the open list)."""
    actor = current_user._get_current_object()
    with write_transaction():
        _recheck_actor(actor)
        req = SupportRequest.get_or_none(SupportRequest.id == request_id)
        if req is None:
            abort(404, _REQUEST_GONE)
        changed = 0
        if req.handled_at is None:
            changed = (SupportRequest.update(handled_at=now(), handled_by=actor.id)
                       .where((SupportRequest.id == req.id) & SupportRequest.handled_at.is_null()).execute())
            if changed:
                audit("support_request_handled", user=req.user_id, actor=actor, request=req.id)
    return _request_response(request_id, (lambda r: ["The request from ", address(r.email), " is marked as handled."])
                             if changed else lambda r: ["The request from ", address(r.email), " was already handled",
                                                        *_by_whom(r), "."])


@bp.post("/support/requests/<int:request_id>/reopen")
@support_admin_required
def reopen(request_id):
    """Put a handled contact request back on the open list (marked as handled by mistake, or the person
    wrote again about it)."""
    actor = current_user._get_current_object()
    with write_transaction():
        _recheck_actor(actor)
        req = SupportRequest.get_or_none(SupportRequest.id == request_id)
        if req is None:
            abort(404, _REQUEST_GONE)
        changed = (SupportRequest.update(handled_at=None, handled_by=None)
                   .where((SupportRequest.id == req.id) & SupportRequest.handled_at.is_null(False)).execute())
        if changed:
            audit("support_request_reopened", user=req.user_id, actor=actor, request=req.id)
    return _request_response(request_id, (lambda r: ["The request from ", address(r.email), " is open again."])
                             if changed else lambda r: ["The request from ", address(r.email), " was open already."])


_REQUEST_GONE = ("This contact request is no longer stored: handled requests are deleted some time after they "
                 "were handled, and erasing an account deletes its requests. Nothing was changed.")


def _request_response(request_id, describe):
    """After marking a request handled or reopening it, the message `describe` makes of the request as it is
    now: htmx gets the requests card again, both lists and their counts as they are now, the message on top
    (app.js focuses it); a plain form goes back to the Support page, the message flashed."""
    req = SupportRequest.get_or_none(SupportRequest.id == request_id)
    if req is None:  # deleted after the action read it (the purge, `users erase`): its UPDATE changed nothing
        abort(404, _REQUEST_GONE)
    message = describe(req)
    if htmx.is_htmx():
        return htmx.render("support/index.html", "support/_open_requests.html", requests_notice=message,
                           **_requests_context())
    flash(message, "success")
    return redirect(url_for("support.index", **_card_state(_card_args())))  # the card as it was


# ---------------------------------------------------------------- audit log (read-only)

def _kind_choices():
    """Event kinds for the filter, by their plain-words labels, in the groups of KIND_GROUPS (<optgroup>)."""
    return [SelectChoice("", "All events")] + [
        SelectChoice(kind, KIND_LABELS[kind], optgroup=group)
        for group, kinds in KIND_GROUPS.items() for kind in sorted(kinds, key=KIND_LABELS.get)]


@bp.get("/support/audit")
@support_admin_required
def audit_log():
    """The audit trail, newest first, filterable by person, event, client IP address and dates; there is no way to
    edit it. Its pages are named by a place in the list (?before=, ?after=: audit_page), not by a number."""
    form = AuditFilterForm(request.args)
    form.kind.choices = _kind_choices()
    page, status, notice, candidates = AuditPage([]), 200, None, []
    place, place_notice = _audit_place()
    if not form.validate():
        status = 400
    else:
        person, conditions, found = None, [], True
        if form.email.data:
            person = User.by_email(form.email.data)
            if person is None:
                # Support search takes the start of an address: here too, the accounts it starts are offered,
                # as links to their whole address (never one picked for the agent: "bob@example.com" may be
                # the start of a look-alike, bob@example.com.evil.example).
                candidates = _accounts_starting(normalise_email(form.email.data))
                notice = ("No account has exactly that address. Accounts whose address starts with it:"
                          if candidates else "No account has that email address, and none starts with it.")
                found = False
        addresses = address_spellings(form.ip.data) if form.ip.data else ()
        if form.kind.data:
            conditions.append(AuditEvent.kind == form.kind.data)
        # The "to" date is inclusive: everything before the next midnight.
        span = (datetime.combine(form.start.data, datetime.min.time()) if form.start.data else None,
                datetime.combine(form.end.data, datetime.min.time()) + timedelta(days=1) if form.end.data else None)
        if found:
            if person is not None:
                sides = person_sides(person.id)
                if addresses:
                    # Read along the person's index (SQLite plans so), the address checked on each record.
                    conditions.append(AuditEvent.ip.in_(list(addresses)))
            else:
                sides = [AuditEvent.ip == a for a in addresses] or [None]
            page = audit_page(sides, conditions, span, **(place or {}))
            page.events = _describe_events(page)
    # The pager's links keep the filter's own fields and nothing else: any other name went into url_for as a
    # keyword ("endpoint", "_method", "_anchor") and broke or bent the links.
    args = {field.name: request.args[field.name] for field in form if field.name in request.args}
    more = len(candidates) > CANDIDATES_SHOWN
    return render_template("support/audit.html", form=form, events=page.events, page=page, notice=notice,
                           place_notice=place_notice if status == 200 and not candidates else None,
                           addresses=_addresses_shown(page.events) if not form.ip.data else [],
                           args=args, candidates=candidates[:CANDIDATES_SHOWN], more=more), status


def _audit_place():
    """Which page of the audit log the address names, as audit_page's `before` or `after` (a place, see
    page_position), None for the newest; and a line for the admin when the address names a place that cannot be
    read, or a page by its number (the links of earlier versions: ?page=N), the newest events being shown
    instead."""
    for name in ("before", "after"):  # a page is named one way: the first of them wins
        if name in request.args:
            place = page_position(request.args[name])
            if place is None:
                return None, ("That link’s place in the log could not be read, so these are the newest events "
                              "that match.")
            return {name: place}, None
    if request.args.get("page", "1") != "1":
        return None, ("Pages of the audit log are no longer numbered (the events on a numbered page moved as new "
                      "ones came in): these are the newest events that match, and “Older events” goes on from "
                      "them.")
    return None, None


class AuditPage(list):
    """Records of one page of the audit log, newest first (audit_page); `newer` and `older`, the `after` and
    `before` of the pages beside it ("TIME,NUMBER": its first and its last record), None where none match."""

    def __init__(self, rows, newer=None, older=None):
        super().__init__(rows)
        self.newer, self.older, self.events = newer, older, []


@planned_for_values()  # each filter's best index depends on its values (an address, an event, a place)
def audit_page(sides, conditions, span=(None, None), before=None, after=None):
    """A page of at most AUDIT_PER_PAGE audit records that meet one of `sides` (None: any record) and all of
    `conditions`, and were written within `span` (from, until: either may be None), newest first: those just
    before the place `before` ((time, number): page_position) in the list's order, those just after `after`,
    or the newest. Pages are named by a place, not by a number (keyset, as the open contact requests' and
    Security activity's): records that come in meanwhile move no other one from page to page, so going on to
    older ones, or back to newer ones, lists each record once, and a deep page reads its 50 records on an index
    from its place, not all those before it. The newer page nearest the newest may hold fewer than 50 (that is
    all there is after its place); one with none falls back to the newest. Whether pages come before and after
    it is read, not guessed: a place can come from a link of another filter, or be typed. On PostgreSQL each read
    is planned for its values, never prepared (db.planned_for_values): the plan for any address read all of an
    intruder's records on either side of a deep page, not the 2,000 newest of the log before its place."""
    shown = AUDIT_PER_PAGE

    def read(limit, before=None, after=None):
        return _newest_of(sides, conditions + _within(span, before, after), limit, oldest_first=after is not None)

    if after is not None:
        rows = list(read(shown + 1, after=after))
        if rows:
            newer = _page_end(*_key_of(rows[shown - 1])) if len(rows) > shown else None
            rows = rows[:shown][::-1]
            older = _page_end(*_key_of(rows[-1])) if read(1, before=_key_of(rows[-1])).exists() else None
            return AuditPage(rows, newer, older)
    rows = list(read(shown + 1, before=before))
    older = _page_end(*_key_of(rows[shown - 1])) if len(rows) > shown else None
    rows = rows[:shown]
    newer = None
    if before is not None and rows:
        if read(1, after=_key_of(rows[0])).exists():
            newer = _page_end(*_key_of(rows[0]))
    elif before is not None and read(1, after=before).exists():
        newer = _page_end(*before)  # nothing older than the place: the way back to the newer ones
    return AuditPage(rows, newer, older)


def _within(span, before=None, after=None):
    """Conditions: written within `span` (from, until), and before or after a place in (time, number) order
    (_earlier_than, _later_than). A date the place is already within is left out: SQLite takes one bound each
    way for its range on the index, and took the date's, reading a month's records down from its end to a page
    in the middle of it."""
    start, end = span
    where = []
    if start is not None and not (after is not None and after[0] >= start):
        where.append(AuditEvent.created_at >= start)
    if end is not None and not (before is not None and before[0] < end):
        where.append(AuditEvent.created_at < end)
    if before is not None:
        where.append(_earlier_than(before, AuditEvent))
    if after is not None:
        where.append(_later_than(after, AuditEvent))
    return where


def person_sides(person_id):
    """The audit records about a person or done by them: the two sides _newest_of reads."""
    return [AuditEvent.user == person_id, AuditEvent.actor == person_id]


def person_events(person_id, *conditions, limit):
    """The `limit` newest audit records about a person or done by them (meeting `conditions` too). Each side is
    read newest first on its own index ((user, created_at) and (actor, created_at), or (user, kind,
    created_at)) only as far as the page needs: `user = ? OR actor = ?` read and sorted every record of the
    person, 100,000 and more for someone under attack or an admin."""
    return _newest_of(person_sides(person_id), list(conditions), limit)


def _newest_of(sides, conditions, limit, oldest_first=False):
    """The `limit` newest records (the oldest: `oldest_first`) that meet one of `sides` and all of
    `conditions`, in (time, number) order. One side (None: any record) is one read on an index; several are
    each read on their own index and only as far as the page needs, then the page taken from those (a UNION:
    a record on two sides counts once)."""
    order = ((AuditEvent.created_at, AuditEvent.id) if oldest_first
             else (AuditEvent.created_at.desc(), AuditEvent.id.desc()))
    if len(sides) == 1:
        where = [c for c in [sides[0], *conditions] if c is not None]
        return (AuditEvent.select().where(*where) if where else AuditEvent.select()).order_by(*order).limit(limit)
    reads = [AuditEvent.select(AuditEvent.id).where(side, *conditions).order_by(*order).limit(limit)
             for side in sides]
    return (AuditEvent.select().where(AuditEvent.id.in_(functools.reduce(operator.or_, reads)))
            .order_by(*order).limit(limit))


def _addresses_shown(events):
    """The addresses the page's events came from, each once with how many of them it sent, most first (then as
    they come on the page): one link each to all that came from it (the IP address filter), rather than one
    in each row, fifty tab stops and a screen reader's list of links that repeat one address. An IPv4 client
    that reached an IPv6 socket (::ffff:203.0.113.7) is the IPv4 address's; text that is no address is left
    out (the filter would refuse it). Each link lists every event it counts: a record the filter finds only as
    it is written (an address a proxy wrote in another spelling, "2001:DB8::0042") gets a link of its own, and
    one stored with a proxy's port before 2026-12-07, which the filter cannot find, gets none (it said "5 on
    this page" and listed 2)."""
    counts = {}
    for event in events:
        text = event["ip"] or ""
        address = address_in(text)
        if address is None:
            continue
        key = str(getattr(address, "ipv4_mapped", None) or address)
        if text not in address_spellings(key):
            try:
                ipaddress.ip_address(text)  # a whole address: the filter finds it as typed (address_spellings)
            except ValueError:
                continue  # with a port: no filter finds it (README "Deployment")
            key = text
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])


def address_spellings(text):
    """The ways the audit log may hold the IP address `text` (a valid one): as typed, in its usual spelling
    (IPv6 in lower case, zeros left out), and an IPv4 address also as an IPv6 socket gives it
    (::ffff:203.0.113.7), which is the same client (security.client_network counts it so), and the other way
    round. Each is looked up on the index by address; a handful at most."""
    address = ipaddress.ip_address(text)
    v4 = address if address.version == 4 else address.ipv4_mapped
    found = {text, str(address)}
    if v4 is not None:
        found |= {str(v4), f"::ffff:{v4}", str(ipaddress.IPv6Address(f"::ffff:{v4}"))}
    return sorted(found)


CANDIDATES_SHOWN = 10


def _accounts_starting(prefix):
    """The addresses of up to CANDIDATES_SHOWN + 1 accounts that start with `prefix`, in order (the one more
    tells that there are more)."""
    if not prefix:
        return []
    rows = _SEARCH_PREFIX.rows(lo=prefix, hi=prefix + _LAST_CHARACTER, length=len(prefix), prefix=prefix,
                               limit=CANDIDATES_SHOWN + 1, offset=0)
    return [u.email for u in rows]


def _describe_events(rows):
    """Audit rows with the emails of person and actor (one query) and their meaning in plain words."""
    ids = {r.user_id for r in rows} | {r.actor_id for r in rows}
    ids.discard(None)
    emails = {u.id: u.email for u in User.select(User.id, User.email).where(User.id.in_(list(ids)))} if ids else {}
    # To the second, as `users activity` and `audit export` give it: an attack's dozen events in one minute
    # read as one moment to the minute (an incident review).
    return [{"when": _fmt_time(r.created_at, seconds=True), "kind": r.kind, "text": event_text(r.kind, r.details),
             "person": emails.get(r.user_id), "actor": emails.get(r.actor_id), "ip": r.ip,
             "detail": detail_text(r.details, r.kind)} for r in rows]
