"""User Settings: the Two-Factor Authentication row, the enrolment wizard behind the gear, and device management.

The wizard is one self-replacing fragment (intro -> QR code -> code -> device name -> done) re-rendered from
server-side state: the pending secret lives in a PendingEnrolment row tied to this session, never in the
cookie, and becomes a Device only after a correct code and a name (security.md 8, 25).
"""
import functools
import hashlib
import re
import unicodedata

from flask import Blueprint, abort, current_app, flash, g, redirect, render_template, request, session, url_for
from flask_login import current_user
from peewee import Case, IntegrityError, fn
from wtforms import BooleanField, StringField
from wtforms.validators import DataRequired, Length, ValidationError

from . import fields, flaskctx, htmx, totp
from .auth import (MALFORMED_CODE_ERROR, NEW_BROWSER, WRONG_PASSWORD_ERROR, code_error, code_field,
                   current_password_field, kept_refusal, new_browser_detail, new_password_field, password_check,
                   refusal_status, refused_see_other, repeat_password_field, show_refused_fields, strip_text)
from .clock import expired, now, timestamp
from .db import Param, Prepared, db, for_update, write_transaction
from .fields import Form, freeze
from .models import AuditEvent, Device, PendingEnrolment, ServerSession, User
from .security import (audit, end_code_steps, forget_browsers, fresh_login_required, hash_password,
                       login_required, replace_password, same_password, verify_password)
from .sessions import browser_label, end_user_sessions, token_hash, write_session_now
from .support import activity_view

bp = Blueprint("settings", __name__, url_prefix="/settings")

MAX_ENROLMENT_FAILURES = 5  # wrong codes against one pending secret before it is thrown away
DEVICE_NAME_MAX = 64
WRONG_ENROLMENT_CODE = ("That code does not match. Check that the entry in your app is the one added from this "
                        "page (its QR code or key), then enter the code it shows now.")
# The form field (and, for the steps that are pages of their own, the query parameter) naming the pending key
# a wizard page was made for: pending_handle().
SETUP_FIELD = "setup"
_HANDLE_RE = re.compile(r"[0-9a-f]{16}")


def _nfc(value):
    """Form filter: one Unicode spelling for names that look the same ("é" composed or as "e" + accent), so
    the duplicate check sees them as the same name."""
    return unicodedata.normalize("NFC", value) if isinstance(value, str) else value


# A run of spaces: Unicode's category Zs, the no-break, thin and ideographic spaces too. Line breaks and other
# controls are not spaces here: _printable refuses them.
_SPACES = re.compile(r"[^\S\t\n\v\f\r\x1c-\x1f\x85\u2028\u2029]+")


def _single_spaces(value):
    """Form filter: each run of spaces in a name stored as one ordinary space. A page draws "Maria's  iPhone"
    with one gap and a no-break space as an ordinary one, so the name is kept as it shows: the list, the audit
    records and `users export` then say the same, and the unique index on names sees what the owner sees."""
    return _SPACES.sub(" ", value) if isinstance(value, str) else value


# Punctuation as phones type it (’ “ ‑) and as computers do (' " -): "Maria’s iPhone" from one and "Maria's
# iPhone" from the other look the same in the list, so they are the same name.
_PUNCTUATION = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"',
                              "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2212": "-"})
_LOOKALIKES = str.maketrans(fields.LATIN_LOOKALIKES)
_LOOKALIKE_CAPITALS = str.maketrans(fields.LATIN_LOOKALIKE_CAPITALS)


def _look(name):
    """How a name looks, twice: in lower case and in capitals, each with the Cyrillic and Greek letters that
    read as Latin ones in that case made Latin ("Росо" is "Poco" in either; "НТС" is "HTC" in capitals only).
    Compatibility characters (full-width letters, ligatures, the no-break space: NFKC), the kind of quote
    mark and dash, and runs of spaces (which names stored before they were made single may hold) aside."""
    text = " ".join(unicodedata.normalize("NFKC", name).translate(_PUNCTUATION).split())
    return text.casefold().translate(_LOOKALIKES), text.upper().translate(_LOOKALIKE_CAPITALS)


def _same_name(a, b):
    """Whether two device names would look the same to their owner (_look): an intruder's second "Maria's
    iPhone" beside the owner's read as the owner's own phone, in the list and in Security activity."""
    return any(x == y for x, y in zip(_look(a), _look(b)))


_NAME_TAKEN = "You already have a device with this name, or one that looks the same. Choose another name."


def _printable(form, field):
    name = field.data or ""
    if field.errors:
        return  # too long already: one message, and the name is not read character by character
    if fields.has_hidden_characters(name):  # fields.HIDDEN_CATEGORIES
        raise ValidationError("Use letters, digits, spaces and punctuation only.")
    if name and not any(unicodedata.category(c)[0] in "LNPS" for c in name):
        raise ValidationError("Give this device a name with letters or digits in it.")
    # "iPhоne" with a Cyrillic "о" reads as "iPhone", and another device's name could pass for it.
    if fields.has_mixed_alphabet_word(name):
        raise ValidationError("A word in this name mixes letters of different alphabets (such as Latin and "
                              "Cyrillic). Write each word in one alphabet.")


# ---------------------------------------------------------------- forms

class EnrolCodeForm(Form):
    code = code_field()


def _name_field():
    return StringField("Device name", filters=[strip_text, _nfc, _single_spaces], validators=[
        DataRequired("Give this device a name."),
        Length(max=DEVICE_NAME_MAX, message=f"Use at most {DEVICE_NAME_MAX} characters."),
        _printable], render_kw={"autocomplete": "off", "maxlength": str(DEVICE_NAME_MAX), "spellcheck": "false"})


class DeviceNameForm(Form):
    name = _name_field()


# The device-management forms appear once per device on one page, so they carry a prefix (unique ids for
# labels and aria-describedby). Like every form (fields.Form), the CSRF token is the page's `csrf_token`.
class RenameForm(Form):
    name = _name_field()


_CURRENT_CODE = "Enter a current code from your authenticator app."


class RemoveForm(Form):
    code = code_field(_CURRENT_CODE, autofocus=False)
    confirm_off = BooleanField("Yes, turn two-factor authentication off")
    # Asked only when the last device goes: that turns 2FA off, which needs the password too (security.md 32).
    password = current_password_field(required=None)


class DisableForm(Form):
    password = current_password_field()
    code = code_field(_CURRENT_CODE, autofocus=False)


class PasswordForm(Form):
    current = current_password_field("Current password", "Enter your current password.", autofocus=True)
    new = new_password_field("New password", "Choose a new password.")
    confirm = repeat_password_field("Repeat the new password", "new", "Repeat the new password.",
                                    "The two new passwords differ.")

    def validate_new(self, field):
        # As they are hashed (security.hash_password): "café" typed in two ways is the same password.
        if field.data and same_password(field.data, self.current.data or ""):
            raise ValidationError("That is your current password: choose a different one.")


# ---------------------------------------------------------------- helpers

def _user():
    return flaskctx.signed_in_user()


# User Settings runs these on every view: compiled once (db.Prepared). A session is live up to its idle and
# absolute limits inclusive (sessions.open_session ends it only beyond them), so the list keeps it until then;
# one whose times lie more than those limits ahead has ended too (clock.expired: a clock set back since).
_DEVICES = Prepared(lambda: Device.select().where(Device.user == Param("user")).order_by(Device.created_at, Device.id))
_LIVE_SESSIONS = Prepared(lambda: ServerSession.select(
    ServerSession.id, ServerSession.created_at, ServerSession.last_seen_at, ServerSession.ip, ServerSession.user_agent)
    .where((ServerSession.user == Param("user"))
           & ServerSession.last_seen_at.between(Param("idle_after"), Param("idle_before"))
           & ServerSession.created_at.between(Param("created_after"), Param("created_before")))
    .order_by(ServerSession.last_seen_at.desc(), ServerSession.created_at.desc())
    .limit(50))

_PENDING = Prepared(lambda: PendingEnrolment.select()
                    .where((PendingEnrolment.session == Param("session")) & (PendingEnrolment.user == Param("user")))
                    .order_by(PendingEnrolment.created_at.desc(), PendingEnrolment.id.desc()).limit(1))


def _devices(user):
    return _DEVICES.rows(user=user.id)


_DEVICE_GONE = ("That device is no longer on your account: it may have been removed in another tab or browser. "
                "Nothing was changed.")


def _own_device(device_id):
    """The signed-in person's device with this id, or 404: nobody reaches another person's devices (security.md 34),
    and one removed in another tab is gone, which is what the message says (the same for both).

    The forms' addresses also carry when the device was added (`added`, device_stamp): SQLite gave a new row
    the id of the last one deleted (until device numbers were never given twice, 2026-12-07), so a page from
    before "Old phone" was removed in another tab would otherwise rename or remove the "New phone" added
    since (the PostgreSQL review). Kept as a second guard. A form without it (a page from before this check)
    is taken by its id, as before."""
    device = Device.get_or_none((Device.id == device_id) & (Device.user == current_user.id))
    added = request.args.get("added")
    if device is None or (added is not None and added != device_stamp(device)):
        abort(404, description=_DEVICE_GONE)
    return device


def device_stamp(device):
    """When a device was added, to the microsecond, as the device forms' addresses carry it (_own_device)."""
    return f"{device.created_at:%Y%m%d%H%M%S%f}"


@functools.cache
def _blank_form(form_class, prefix, value=None):
    """A form that is only shown, never filled in or validated: nothing in it depends on the request or the
    person beyond its prefix, so each is built once per process. The device forms are built once per class
    with placeholders for the device's id and name (fields.moved). Building them was a tenth of a User
    Settings view."""
    return freeze(form_class(formdata=None, prefix=prefix, data={"name": value} if value is not None else None))


class _DeviceForms:
    """A device's forms on User Settings and its creation stamp (device_stamp), read by the template as
    attributes (an object for the reason given at _SessionShown)."""

    __slots__ = ("rename", "remove", "added")

    def __init__(self, rename, remove, added):
        self.rename, self.remove, self.added = rename, remove, added


def _row_context(user, failed=None, notice=None):
    """Everything the Two-Factor Authentication row needs; `failed` is (kind, device_id, form) to show with errors."""
    devices = _devices(user)
    rename = _blank_form(RenameForm, f"rename-{fields.ITEM}", fields.VALUE)
    remove = _blank_form(RemoveForm, f"remove-{fields.ITEM}")
    forms = {d.id: _DeviceForms(fields.moved(rename, d.id, d.name), fields.moved(remove, d.id), device_stamp(d))
             for d in devices}
    disable_form = _blank_form(DisableForm, "off")
    open_form = None
    if failed:
        kind, device_id, form = failed
        if kind == "disable":
            disable_form, open_form = form, (kind, device_id)
        elif device_id in forms:  # not a device removed meanwhile: its refusal has nowhere to show
            setattr(forms[device_id], kind, form)
            open_form = (kind, device_id)
    return {"devices": devices, "device_forms": forms, "disable_form": disable_form, "open_form": open_form,
            "notice": notice}


def _settings_response(user, failed=None, notice=None, status=200, sessions_oob=False, activity_oob=False):
    """The settings page, or only the #tfa-row fragment for htmx (errors stay 200 so htmx swaps them); with
    sessions_oob the list of sessions comes too, out of band (other sessions were just ended), and with
    activity_oob the Security activity list (a change was just recorded). A refusal (`failed`) sent without
    JavaScript is a 303 to the page, which shows it (_row_refused)."""
    if htmx.is_htmx():
        status = 200
    elif failed:
        return _row_refused(failed, status)
    return htmx.render("settings/index.html", "settings/_tfa_row.html", status=status, sessions_oob=sessions_oob,
                       activity_oob=activity_oob, **_row_context(user, failed=failed, notice=notice))


# A refused device name is kept for the page that shows it again up to this length: longer is no name a
# browser sends (the field's maxlength), and a session is no store for whatever a crafted form holds.
_KEPT_NAME_MAX = 2 * DEVICE_NAME_MAX


def _row_refused(failed, status):
    """A refused rename, removal or turn-off sent without JavaScript: 303 to User Settings (with Security
    activity as it was shown), whose GET shows the form open with its errors and the refusal's status
    (auth.refused_see_other). Reload then sends no code or password again, which counted once more towards
    the person's lock. Kept besides the errors: the name typed and the tick, never a password or a code."""
    kind, device_id, form = failed
    values = {"kind": kind, "device": device_id}
    if kind == "rename":
        values["name"] = (form.name.data or "")[:_KEPT_NAME_MAX]
    elif kind == "remove":
        values["confirm_off"] = bool(form.confirm_off.data)
    return refused_see_other(url_for("settings.index", **activity_view()), status, fields=form,
                             page="settings.index", values=values)


def _failed_again(refused):
    """The `failed` of _row_context for a refusal kept by _row_refused: its form, as the refused request
    showed it."""
    values = refused["values"]
    kind, device_id = values.get("kind"), values.get("device")
    if kind == "rename":
        form = RenameForm(formdata=None, prefix=f"rename-{device_id}", data={"name": values.get("name")})
    elif kind == "remove":
        form = RemoveForm(formdata=None, prefix=f"remove-{device_id}",
                          data={"confirm_off": values.get("confirm_off", False)})
    else:
        form = DisableForm(formdata=None, prefix="off")
    show_refused_fields(form, refused)
    return kind, device_id, form


def _app_entry(user):
    """How the person's authenticator app names its entry for this account (the QR code's issuer and account)."""
    return f"the entry for {current_app.config['TOTP_ISSUER']} ({user.email})"


def _delete_entry(user):
    """Once no device of theirs works here: the app's entry would only make codes that are refused, and a new
    setup would put a second entry of the same name beside it."""
    return f"You can delete {_app_entry(user)} in your authenticator app."


def _end_other_sessions(user):
    """Inside the transaction of a 2FA change: end every other session of the person, with its record
    (security.md 35). In the change's own transaction, so that no failure between them leaves the old
    sessions alive after the factor changed, or the change without its records. Returns how many ended."""
    ended = end_user_sessions(user, keep_token=session.token)
    if ended:
        audit("sessions_ended", user=user, reason="2fa change", count=ended)
    return ended


def _after_change(user, notice, ended=0):
    """Show the row after a device change (and, for htmx, when other sessions were `ended`, the list of
    sessions without them: its buttons for them would lead nowhere)."""
    if htmx.is_htmx():
        return _settings_response(user, notice=notice, sessions_oob=bool(ended), activity_oob=True)
    flash(notice, "success")
    return redirect(url_for("settings.index", **activity_view()))  # with Security activity as it was shown


def _unchanged(user, notice):
    """A request that asked for what is already so: the row with a message (htmx), or back with a flash."""
    if htmx.is_htmx():
        return _settings_response(user, notice=notice)
    flash(notice, "info")
    return redirect(url_for("settings.index", **activity_view()))


def current_pending(user):
    """This session's unexpired pending enrolment for `user`, or None (expired ones are deleted: security.md 8)."""
    if session.row is None:
        return None
    pending = _PENDING.first(session=session.row.id, user=user.id)
    if pending is None:
        return None
    if expired(pending.created_at, current_app.config["PENDING_ENROLMENT_TTL"], now()):
        with write_transaction():  # that key only (see _same_key), and its record with it
            if PendingEnrolment.delete().where(_same_key(pending)).execute():
                audit("tfa_enrolment_expired", user=user)
        return None
    return pending


def _with_pending(view=None, *, back_to=None):
    """For the wizard's steps from the QR code on: call `view(user, pending)` with this session's pending key,
    or answer without it (_without_pending) when there is none. A step sent from a page of an earlier key
    (its `setup` handle names another: Start over in another tab) is answered by _restarted instead.

    Like the gear and Start, these steps need a fresh sign-in (security.md 9): a pending key outlives the
    freshness window (PENDING_ENROLMENT_TTL against FRESH_LOGIN_WINDOW), and whoever holds a session that
    is no longer fresh must not read that key or make it a device. After re-authenticating, a page comes
    back to itself and a form to `back_to`, the page of its step, still with the same key."""
    if view is None:
        return functools.partial(_with_pending, back_to=back_to)

    @fresh_login_required(back_to=back_to)
    @functools.wraps(view)
    def wrapper():
        user = _user()
        pending = current_pending(user)
        if pending is None:
            return _without_pending(user)
        sent = _sent_handle()
        if sent is not None and sent != pending_handle(pending):
            return _restarted(pending)
        return view(user, pending)
    return wrapper


def pending_handle(pending):
    """The public name of a pending key in the wizard's pages, so that a step can tell which key the page it
    was sent from showed (one session holds one pending key, but the wizard may be open in two tabs).

    Derived from the row, never from the secret. The row id alone is not enough: SQLite gives the new row of
    a Start over the id of the one it just deleted; the moment it was made tells the two apart."""
    raw = f"twostep-pending-handle:{pending.id}:{pending.created_at}"
    return hashlib.sha256(raw.encode("ascii")).hexdigest()[:16]


def _same_key(pending):
    """The condition for `pending`'s own row: its id, and the moment it was made, since SQLite may give a Start
    over's new row the id of the one it deleted."""
    return (PendingEnrolment.id == pending.id) & (PendingEnrolment.created_at == pending.created_at)


def _sent_handle():
    """The pending key's handle the submitted page carries, or None. Pages made before the handle existed
    send none, and a garbled one is taken as none: both get the step as it was (the session's key)."""
    value = request.values.get(SETUP_FIELD)
    return value if value is not None and _HANDLE_RE.fullmatch(value) else None


def _restarted(pending):
    """A step sent from a page made for an earlier key of this session: Start over (in another tab or window)
    replaced that key. Nothing is checked or counted against the current key, which that page never showed
    (a code from the key in the person's app would count as wrong and could use up the new key's attempts);
    the answer says what happened and leads to the current key's QR code."""
    return _wizard("restarted", status=409, pending=pending)


def _replaced_meanwhile(user):
    """For a step whose key has gone while it was checked: the "restarted" answer when Start over put a new
    key in its place, or None when there is no key left (used up, discarded, or expired)."""
    current = current_pending(user)
    return _restarted(current) if current is not None else None


_STEP_TITLES = {"intro": "Step 1 of 4: Get an authenticator app", "qr": "Step 2 of 4: Scan the QR code",
                "code": "Step 3 of 4: Enter the code", "name": "Step 4 of 4: Name this device",
                "restarted": "This setup was restarted"}


def _step_title(step, had_2fa_before=False, too_many=False, turned_off=False, **_):
    """A wizard step's heading, which is also its page's title without JavaScript (settings/tfa.html)."""
    if step == "done":
        return "Device added" if had_2fa_before else "Two-factor authentication is active"
    if step == "expired":
        return ("Too many wrong codes" if too_many else "Two-factor authentication was turned off" if turned_off
                else "This setup has expired")
    return _STEP_TITLES[step]


def _wizard(step, status=200, pending=None, **context):
    """Render one wizard step: alone for htmx (it replaces itself), inside the full page otherwise. With
    `pending`, the step's forms name that key (pending_handle), so a later step can tell a page of a key
    replaced meanwhile from a page of the current one."""
    if htmx.is_htmx():
        status = 200
    if pending is not None:
        context["setup"] = pending_handle(pending)
    context.setdefault("has_2fa", _user().has_2fa)
    context.setdefault("in_dialog", htmx.is_htmx())  # step headings sit one level below the dialog title
    return htmx.render("settings/tfa.html", "settings/_wizard_step.html", status=status, step=step,
                       step_title=_step_title(step, **context), **context)


def _qr_context(user, pending):
    """What the QR step shows: the QR code, the grouped key and the otpauth link (never after activation)."""
    secret = totp.decrypt_secret(pending.secret_enc)
    uri = totp.provisioning_uri(secret, user.email, current_app.config["TOTP_ISSUER"])
    return {"qr_svg": totp.qr_svg(uri), "grouped_key": totp.group_key(secret), "otpauth_uri": uri,
            "issuer": current_app.config["TOTP_ISSUER"], "account": user.email,
            "key_minutes": int(current_app.config["PENDING_ENROLMENT_TTL"].total_seconds() // 60)}


def _skew_text(steps):
    """Human wording for a code `steps` time steps away from now. Two steps back is most often a code typed
    slowly (it changed meanwhile), not a wrong clock: only further off is the phone's clock the likely cause."""
    if steps == -2:
        return ("That code has already changed. Enter the one your app shows now. If this happens again, turn on "
                "automatic date and time in your phone's settings: its clock may be a minute behind.")
    seconds = abs(steps) * totp.PERIOD
    amount = f"{seconds} seconds" if seconds < 120 else f"{round(seconds / 60)} minutes"
    direction = "ahead" if steps > 0 else "behind"
    return (f"That code would have been right, but your phone's clock seems to be about {amount} {direction}. "
            "Turn on automatic date and time in your phone's settings, then enter the new code.")


# ---------------------------------------------------------------- settings page

@bp.get("")
@login_required
def index():
    """The User Settings page with the Two-Factor Authentication row. `?dialog=wizard` opens the wizard's
    dialog as the page loads (htmx), after a re-authentication that the gear's dialog asked for; it names
    a dialog, not an address, so a link cannot make the page fetch anything else."""
    reopen = url_for("settings.tfa") if flaskctx.request_context().request.args.get("dialog") == "wizard" else None
    refused = kept_refusal("settings.index")  # a device form refused without JavaScript (_row_refused)
    failed = _failed_again(refused) if refused else None
    context = _row_context(_user(), failed=failed)
    # Its status only with its form shown: not for a device removed since (in another tab), whose refusal
    # has nowhere to go (the page said "Error:" with no error on it).
    return render_template("settings/index.html", reopen_dialog=reopen, **context), \
        refused["status"] if refused and context["open_form"] else 200


# ---------------------------------------------------------------- the wizard

@bp.get("/2fa")
@fresh_login_required
def tfa():
    """The gear: the wizard's first step, as a dialog for htmx or a full page without JavaScript (security.md 9).

    Someone who closed the wizard after the QR code and opens it again may have the key in their app
    already: the first step then offers to go on with that key, as well as to start over with a new one."""
    user = _user()
    pending = current_pending(user)
    return htmx.render("settings/tfa.html", "settings/_wizard_dialog.html",
                       step="intro", step_title=_step_title("intro"), has_2fa=user.has_2fa, in_dialog=htmx.is_htmx(),
                       replacing_lost=not user.has_2fa and _had_a_device(user),
                       resume=pending and ("name" if pending.verified_step is not None else "qr"),
                       setup=pending_handle(pending) if pending else None)


@bp.post("/2fa/start")
@fresh_login_required(back_to="settings.tfa")  # a stale session comes back to the wizard (security.md 9)
def start():
    """Issue a new pending secret for this session (replacing any earlier one) and show its QR code."""
    user = _user()
    # A POST (it issues a new secret), so CSRFProtect has checked its token before this view runs.
    if session.row is None:
        abort(400)
    secret = totp.new_secret()
    session.pop(_WIZARD_DONE, None)  # a new setup: a later click on an old page is not "done" any more
    session.pop(_WIZARD_ENDED_BY_TURN_OFF, None)
    with write_transaction():
        # The person's row first, like Complete Activation and Support's disable: taking the pending row
        # first made the three deadlock on PostgreSQL when they met.
        User.lock(user.id)
        PendingEnrolment.delete().where((PendingEnrolment.session == session.row.id)
                                        & (PendingEnrolment.user == user.id)).execute()
        try:
            with db.atomic():
                pending = PendingEnrolment.create(session=session.row.id, user=user,
                                                  secret_enc=totp.encrypt_secret(secret), created_at=now())
        except IntegrityError:  # the session row vanished meanwhile (signed out elsewhere)
            abort(401)
        # With the key: _keys_started_since_last_device counts these records to tell a person about old entries.
        audit("tfa_enrolment_started", user=user, adding=user.has_2fa)
    if not htmx.is_htmx():
        # Post/redirect/get: reloading the QR page shows the same key again instead of posting for a new one,
        # which would silently break the entry the person may have scanned already.
        # The QR page's address names its key: reloaded after a Start over in another tab, it says so instead
        # of showing the new key as if it were the one scanned from it.
        return redirect(url_for("settings.qr", **{SETUP_FIELD: pending_handle(pending)}), 303)
    return _wizard("qr", pending=pending, **_qr_context(user, pending))


@bp.get("/2fa/qr")
@login_required
@_with_pending
def qr(user, pending):
    """Show the pending secret's QR code again (the Back button), or say that the setup expired."""
    return _wizard("qr", pending=pending, **_qr_context(user, pending))


@bp.get("/2fa/code")
@login_required
@_with_pending
def code(user, pending):
    """The code step: one field for the code the app shows now."""
    return _wizard("code", pending=pending, form=EnrolCodeForm(formdata=None))


@bp.post("/2fa/code")
@login_required
@_with_pending(back_to="settings.code")
def verify_code(user, pending):
    """Check a code against the pending secret; wrong codes keep the same secret, too many discard it."""
    form = EnrolCodeForm()
    error = None
    if not form.validate_on_submit():
        error = form.code.errors[0] if form.code.errors else MALFORMED_CODE_ERROR
        form.code.errors = []
        status = 400
    else:
        normalised = totp.normalise_code(form.code.data)
        status = 200
        if normalised is None:
            error, status = MALFORMED_CODE_ERROR, 400
        else:
            secret = totp.decrypt_secret(pending.secret_enc)
            step = totp.match_step(secret, normalised, timestamp())
            if step is not None:
                # Keep the newest accepted step: the device must refuse every code already seen (security.md 16).
                # Compared with what is stored when it is written: a newer code accepted meanwhile in another
                # tab was overwritten by this older one, whose step the device then started from (a race
                # review: the newer code then signed in once more).
                verified = PendingEnrolment.verified_step
                newest = Case(None, [((verified.is_null()) | (verified < step), step)], verified)
                with write_transaction():
                    if not PendingEnrolment.update(verified_step=newest).where(_same_key(pending)).execute():
                        # Start over replaced the key while this code was checked (SQLite may give the new row
                        # the same id): the code is the old key's and must not mark the new one as confirmed.
                        return _replaced_meanwhile(user) or _without_pending(user)
                    audit("tfa_enrolment_code_accepted", user=user)
                if not htmx.is_htmx():
                    # Post/redirect/get: a reload asks for the name again instead of sending the code again
                    # (by then possibly too old, which would count as a wrong code).
                    return redirect(url_for("settings.name_step", **{SETUP_FIELD: pending_handle(pending)}), 303)
                return _wizard("name", pending=pending, form=DeviceNameForm(formdata=None))
            offset = totp.clock_offset_steps(secret, normalised, timestamp())
            error = _skew_text(offset) if offset is not None else WRONG_ENROLMENT_CODE
    # Every failed attempt counts against this secret, malformed ones included (security.md 5, 18).
    with write_transaction():
        PendingEnrolment.update(failures=PendingEnrolment.failures + 1).where(_same_key(pending)).execute()
        counted = PendingEnrolment.get_or_none(_same_key(pending))
        replaced = _replaced_meanwhile(user) if counted is None else None
        if replaced is not None:  # Start over replaced the key meanwhile: this code was the old key's
            return replaced
        # None: a wrong code sent at the same time used up the last attempt and discarded the key already.
        failures = MAX_ENROLMENT_FAILURES if counted is None else counted.failures
        discarded_now = counted is not None and failures >= MAX_ENROLMENT_FAILURES
        if discarded_now:
            counted.delete_instance()
        # In the same transaction: the key is never gone without the record of why (security.md 43).
        audit("tfa_enrolment_code_rejected", user=user, failures=failures)
        if discarded_now:
            audit("tfa_enrolment_discarded", user=user, reason="too many wrong codes")
    if failures >= MAX_ENROLMENT_FAILURES:
        return _wizard("expired", too_many=True)
    return _wizard("code", status=status, pending=pending, form=form, error=error)


@bp.get("/2fa/name")
@login_required
@_with_pending
def name_step(user, pending):
    """The name step as a page of its own (where a correct code leads without JavaScript)."""
    if pending.verified_step is None:
        return redirect(url_for("settings.code"))
    return _wizard("name", pending=pending, form=DeviceNameForm(formdata=None))


@bp.post("/2fa/complete")
@login_required
@_with_pending(back_to="settings.name_step")
def complete(user, pending):
    """Name the device and activate it: only now is 2FA on; other sessions end (security.md 8, 35, 39)."""
    if pending.verified_step is None:
        return _wizard("code", pending=pending, form=EnrolCodeForm(formdata=None))
    form = DeviceNameForm()
    if not form.validate_on_submit():
        return _wizard("name", status=400, pending=pending, form=form)
    name = form.name.data
    with write_transaction():
        # Lock the person first: every session of theirs completing at once queues here, so on PostgreSQL
        # the Device insert and the DELETE of the other sessions' pending rows cannot deadlock.
        User.lock(user.id)
        # Then this session's row, which the activation writes (below), before its pending key: a logout of
        # it in another tab deletes the session first and its pending key with it (ON DELETE CASCADE).
        for_update(ServerSession.select(ServerSession.id).where(ServerSession.id == session.row.id)).first()
        locked = for_update(PendingEnrolment.select().where(PendingEnrolment.id == pending.id)).first()
        if locked is not None and pending_handle(locked) != pending_handle(pending):
            return _restarted(locked)  # Start over meanwhile, and SQLite gave its new key the same id
        if locked is None or locked.verified_step is None:  # a parallel request used it already
            return _without_pending(user)
        devices = _devices(user)
        if any(_same_name(d.name, name) for d in devices):
            form.name.errors = [_NAME_TAKEN]
            return _wizard("name", status=400, pending=pending, form=form)
        # Read under the person's row: the last device removed in another tab meanwhile makes this activation
        # the one that turns 2FA on, and so it is recorded (it was recorded as "device added").
        had_2fa = bool(devices)
        had_reset_window = User.select(User.tfa_reset_until).where(User.id == user.id).scalar() is not None
        try:
            # A savepoint, so a lost race on the unique name leaves the outer transaction usable (PostgreSQL).
            with db.atomic():
                # The code that confirmed enrolment counts as used: last_step stops its replay (security.md 16).
                device = Device.create(user=user, name=name, secret_enc=locked.secret_enc,
                                       last_step=locked.verified_step, created_at=now())
        except IntegrityError:
            form.name.errors = [_NAME_TAKEN]
            return _wizard("name", status=400, pending=pending, form=form)
        PendingEnrolment.delete().where(PendingEnrolment.user == user.id).execute()
        User.update(tfa_reset_until=None).where(User.id == user.id).execute()
        other_keys = _keys_started_since_last_device(user) > 1  # before this activation's own record
        # Whether this session's sign-in came from a browser new to the account (auth.NEW_BROWSER): the
        # browser's name alone is the User-Agent, which an intruder can copy from the owner's.
        audit("device_added" if had_2fa else "tfa_enabled", user=user, device=device.name, device_id=device.id,
              browser=browser_label(request.headers.get("User-Agent")),
              **new_browser_detail(session.get(NEW_BROWSER)))
        if had_reset_window:
            audit("tfa_reset_window_ended", user=user, reason="new device enrolled")
        ended = _end_other_sessions(user)
        # With the device, or neither: pressed again after a worker died before answering, the done step says
        # the device is active (_without_pending), not that the setup expired and to remove the app's entry.
        session[_WIZARD_DONE] = {"device": device.id, "added": had_2fa, "reset": had_reset_window,
                                 "others": other_keys}
        write_session_now()
    if ended:
        g.sessions_changed = True  # the done step refreshes the list of sessions behind the dialog too
    if not htmx.is_htmx():
        return redirect(url_for("settings.done"), 303)  # a reload shows the done page, not a second submission
    return _done_step(User.get_by_id(user.id), device, session[_WIZARD_DONE])


@bp.get("/2fa/done")
@login_required
def done():
    """The last step as a page of its own (where Complete Activation leads without JavaScript)."""
    user = _user()
    device = _just_activated(user)
    if device is None:
        return redirect(url_for("settings.index"))
    return _done_step(user, device, session[_WIZARD_DONE])


# This session's last completed setup: {"device": id, "added": had 2FA before, "reset": ended support's window,
# "others": other keys were made since the last device, which may be entries in the app that never work}.
_WIZARD_DONE = "wizard_done"
_WIZARD_ENDED_BY_TURN_OFF = "wizard_ended_by_turn_off"  # set by Turn off when it discarded a setup under way


def _just_activated(user):
    """The device this session's wizard activated within the last PENDING_ENROLMENT_TTL, if it still exists."""
    done_info = session.get(_WIZARD_DONE)
    device_id = done_info.get("device") if isinstance(done_info, dict) else None
    if not isinstance(device_id, int):
        return None
    device = Device.get_or_none((Device.id == device_id) & (Device.user == user.id))
    if device is None or now() - device.created_at > current_app.config["PENDING_ENROLMENT_TTL"]:
        return None
    return device


def _had_a_device(user):
    """Whether `user`, who has no device now, had one before (support's disable, the operator's reset-2fa, or
    turning 2FA off): an entry for it may still be in their authenticator app, and its codes now fail."""
    return (user.tfa_reset_until is not None or AuditEvent.select().where(
        (AuditEvent.user == user.id) & AuditEvent.kind.in_(["device_added", "tfa_enabled"])).exists())


def _keys_started_since_last_device(user):
    """How many keys the wizard made for `user` (Start, Start over, in any browser) since a device was last
    activated: each but the one activated now may be an entry in their authenticator app that never works."""
    last = (AuditEvent.select(fn.MAX(AuditEvent.id))
            .where((AuditEvent.user == user.id) & AuditEvent.kind.in_(["device_added", "tfa_enabled"])))
    return AuditEvent.select().where((AuditEvent.user == user.id) & (AuditEvent.kind == "tfa_enrolment_started")
                                     & (AuditEvent.id > fn.COALESCE(last, 0))).count()


def _done_step(user, device, done_info):
    return _wizard("done", device=device, oob_row=htmx.is_htmx(), sessions_oob=g.get("sessions_changed", False),
                   activity_oob=True, other_keys=done_info.get("others"),
                   had_reset_window=done_info.get("reset"),
                   had_2fa_before=done_info.get("added"), has_2fa=True, **_row_context(user))


def _without_pending(user):
    """A wizard step was submitted but this session holds no pending key. If its wizard has just activated a
    device (a second click on Complete Activation, or the browser sending the code or name again), say so
    again: the "expired" step would tell the person to delete the entry that now works. Else it expired."""
    device = _just_activated(user)
    if device is not None:
        return _done_step(user, device, session[_WIZARD_DONE])
    if session.pop(_WIZARD_ENDED_BY_TURN_OFF, None):
        # Turned off in another tab (the same session) while this one was adding a device: "expired, nothing
        # was changed on your account" would be wrong twice.
        return _wizard("expired", turned_off=True)
    return _wizard("expired")


# ---------------------------------------------------------------- devices afterwards

@bp.post("/devices/<int:device_id>/rename")
@login_required
def rename_device(device_id):
    """Rename one of your own devices."""
    user = _user()
    device = _own_device(device_id)
    form = RenameForm(prefix=f"rename-{device.id}")
    if form.validate():
        name = form.name.data
        with write_transaction():
            # The person's row first, then the devices as they are now: two renames at once (in two tabs)
            # each passed the duplicate check before either wrote ("Phone" beside "phone"), and recorded the
            # same old name.
            User.lock(user.id)
            devices = _devices(user)
            current = next((d for d in devices if d.id == device.id and d.created_at == device.created_at), None)
            if current is None:
                outcome = "gone"  # removed in another tab since the page was made
            elif name == current.name:
                outcome = "same"
            elif any(_same_name(d.name, name) and d.id != device.id for d in devices):
                outcome = "taken"
            else:
                try:
                    with db.atomic():  # a savepoint: the unique name index may still refuse it
                        renamed = Device.update(name=name).where(
                            (Device.id == device.id) & (Device.user == user.id)).execute()
                except IntegrityError:
                    outcome = "taken"
                else:
                    outcome = "renamed" if renamed else "gone"  # gone: a writer that did not take the person
                    if renamed:
                        audit("device_renamed", user=user, device=name, old_name=current.name,
                              device_id=current.id)
        if outcome == "gone":
            abort(404, description=_DEVICE_GONE)
        if outcome == "same":  # nothing to do: no audit record
            return _unchanged(user, f"“{name}” already has this name. Nothing was changed.")
        if outcome == "renamed":
            # A name changes no factor (the same keys sign in as before): the person's other browsers stay
            # signed in, unlike after a removal (security.md 35).
            return _after_change(user, f"Renamed “{current.name}” to “{name}”.")
        form.name.errors = [_NAME_TAKEN]
    return _settings_response(user, failed=("rename", device.id, form), status=400)


@bp.post("/devices/<int:device_id>/remove")
# Removing a factor needs a fresh sign-in (security.md 32).
@fresh_login_required(back_to="settings.index",
                      not_done="the device was not removed yet: remove it again")
def remove_device(device_id):
    """Remove one of your devices after a current code; removing the last one needs explicit confirmation."""
    user = _user()
    device = _own_device(device_id)
    form = RemoveForm(prefix=f"remove-{device.id}")
    last = len(_devices(user)) == 1
    valid = form.validate()
    if last:
        # Everything missing is said at once (the box, the password, the code), not one per attempt.
        if not form.confirm_off.data:
            form.confirm_off.errors = ["This is your only device. Tick the box to confirm that two-factor "
                                       "authentication should be turned off."]
            valid = False
        if not form.password.data and not form.password.errors:
            # Removing the only device turns 2FA off: password and code, like Turn off (security.md 32).
            form.password.errors = ["Enter your password: removing your only device turns two-factor "
                                    "authentication off."]
            valid = False
    if not valid:
        return _settings_response(user, failed=("remove", device.id, form), status=400)
    if last:
        error = password_check(user, form.password.data, wrong=WRONG_PASSWORD_ERROR)
        if error is not None:
            form.password.errors = [error]
            return _settings_response(user, failed=("remove", device.id, form),
                                      status=refusal_status(error, 403))
    # A stolen session alone cannot remove a factor: a current code is needed (security.md 32).
    result = totp.check_user_code(user, form.code.data)
    if not result:
        error = code_error(result)
        form.code.errors = [error]
        return _settings_response(user, failed=("remove", device.id, form), status=refusal_status(error, 200))
    with write_transaction():
        # Count again under the lock: another removal may have finished since `last` was read, leaving this
        # the only device, and removing that one turns 2FA off, which needs the password (security.md 32).
        User.lock(user.id)
        left = Device.select().where(Device.user == user.id).count()
        refused = left == 1 and not last
        # Read again under the lock: renamed meanwhile in another tab, the record names it as it is now.
        current = None if refused else Device.get_or_none((Device.id == device.id) & (Device.user == user.id)
                                                          & (Device.created_at == device.created_at))
        gone = not refused and current is None  # removed in another tab meanwhile: nothing done here
        if current is not None:
            Device.delete().where(Device.id == current.id).execute()
            audit("device_removed", user=user, device=current.name, device_id=current.id)
            if left == 1:
                end_code_steps(user)  # with 2FA off it could never finish
                audit("tfa_disabled", user=user, via="last device removed")
            ended = _end_other_sessions(user)
            device = current
    if gone:
        abort(404, description=_DEVICE_GONE)
    if refused:
        form.confirm_off.errors = ["This is now your only device: another device was removed meanwhile. "
                                   "Enter a new code, your password and tick the box to turn 2FA off."]
        return _settings_response(user, failed=("remove", device.id, form), status=409)
    if left == 1:
        return _after_change(user, "Two-factor authentication is now off: you removed your only device. "
                                   f"{_delete_entry(user)}", ended)
    return _after_change(user, f"Removed “{device.name}”. It no longer works for signing in: in the authenticator "
                               f"app on that device, delete {_app_entry(user)}.", ended)


@bp.post("/2fa/disable")
# security.md 32: fresh session plus password and code.
@fresh_login_required(back_to="settings.index",
                      not_done="two-factor authentication was not turned off yet: turn it off again")
def disable():
    """Turn 2FA off entirely: needs the password and a current code, POST only (security.md 32, 33)."""
    user = _user()
    if not user.has_2fa:  # turned off meanwhile (another tab): show the row as it is now
        return _unchanged(user, "Two-factor authentication is already off.")
    form = DisableForm(prefix="off")
    # Refusals are 403 (no password and code, no change: security.md 32); htmx still gets 200 to swap them.
    if not form.validate():
        return _settings_response(user, failed=("disable", None, form), status=403)
    error = password_check(user, form.password.data, wrong=WRONG_PASSWORD_ERROR)
    if error is not None:
        form.password.errors = [error]
        return _settings_response(user, failed=("disable", None, form),
                                  status=refusal_status(error, 403))
    result = totp.check_user_code(user, form.code.data)
    if not result:
        error = code_error(result)
        form.code.errors = [error]
        return _settings_response(user, failed=("disable", None, form), status=refusal_status(error, 403))
    with write_transaction():  # all of it or nothing, holding the person's row like every 2FA change
        User.lock(user.id)
        devices = _devices(user)
        Device.delete().where(Device.user == user.id).execute()
        discarded = PendingEnrolment.delete().where(PendingEnrolment.user == user.id).execute()
        end_code_steps(user)  # with 2FA off it could never finish
        audit("tfa_disabled", user=user, via="settings", devices=[d.name for d in devices],
              device_ids=[d.id for d in devices])
        ended = _end_other_sessions(user)
    if discarded:
        session[_WIZARD_ENDED_BY_TURN_OFF] = True  # for a wizard open in another tab: _without_pending
    return _after_change(user, "Two-factor authentication is now off. Your devices no longer work for signing in. "
                               f"{_delete_entry(user)}", ended)


# ---------------------------------------------------------------- password

@bp.route("/password", methods=["GET", "POST"])
@login_required
@fresh_login_required(back_to="settings.password",
                      not_done="your password was not changed yet: change it again")
def password():
    """Change your password: the current one (throttled like the sign-in), then the new one twice. Every other
    session of yours ends and the other browsers are no longer known (ASVS 4 2.1.5, 3.3.3); this one gets
    a new session id. 2FA stays as it is.

    Like signing the other browsers out, it needs a sign-in from the last 10 minutes (with the code, when 2FA
    is on): whoever holds a stolen session and a leaked password must not lock the owner out with it."""
    user = _user()
    form = PasswordForm()
    if not form.is_submitted():
        refused = kept_refusal("settings.password", form)  # a change refused without JavaScript (_password_refused)
        return _password_page(form, refused["status"] if refused else 200)
    if not form.validate():
        return _password_refused(form, 400)
    error = password_check(user, form.current.data, wrong="That is not your current password.")
    if error is not None:
        form.current.errors = [error]
        return _password_refused(form, refusal_status(error, 403))
    # The hash first (slow), outside the transaction that other writers wait for.
    checked, new_hash = user.password_hash, hash_password(form.new.data)
    ended = replace_password(user, new_hash, via="settings", keep_token=session.token, checked_hash=checked)
    if ended is None:
        # Signed out meanwhile, or the stored hash changed. Most often a change elsewhere, but a sign-in in another
        # browser may only have made the same password's hash again (auth.upgraded_hash): the password proved
        # here is then still the account's, checked once more against what is stored now (as auth.login does).
        stored = User.get_or_none(User.id == user.id)
        if stored is not None and stored.password_hash != checked and verify_password(stored.password_hash,
                                                                                      form.current.data):
            ended = replace_password(user, new_hash, via="settings", keep_token=session.token,
                                     checked_hash=stored.password_hash)
    if ended is None:
        form.current.errors = [_PASSWORD_OVERTAKEN]
        if session.row is None or not ServerSession.select().where(ServerSession.id == session.row.id).exists():
            # This browser was signed out meanwhile: after a redirect it would only meet the sign-in page, without
            # the reason. Said here, as before; a resent form changes and counts nothing (its session is gone).
            return _password_page(form, 409)
        return _password_refused(form, 409)
    session.rotate(keep_enrolment=True)
    others = f" You were signed out on {ended} other browser{'s' if ended != 1 else ''}." if ended else ""
    flash("Your password was changed." + others, "success")
    return redirect(url_for("settings.index"))


_PASSWORD_OVERTAKEN = ("At the same moment your password was changed somewhere else, or this browser was signed "
                       "out or confirmed it's you in another tab. Nothing was changed here: reload the page and "
                       "try again if you need to.")


def _password_page(form, status):
    return render_template("settings/password.html", form=form), status


def _password_refused(form, status):
    """A refused change: without JavaScript, 303 to this page, which shows its errors and status once
    (auth.refused_see_other), so Reload sends no password again (a wrong one counted once more). No password
    is kept, only the fields' errors."""
    if htmx.is_htmx():
        return _password_page(form, status)
    return refused_see_other(url_for("settings.password"), status, fields=form, page="settings.password")


# ---------------------------------------------------------------- sessions: where you are signed in

def session_handle(row_id):
    """The public name of a session in the page: derived from the row id, so the page never shows the DB key."""
    return hashlib.sha256(b"twostep-session-handle:" + row_id.encode("ascii")).hexdigest()[:32]


@bp.app_template_global()
def active_sessions(user):
    """The person's live sessions, most recently used first, each marked if it is this browser (security.md 30)."""
    here = flaskctx.request_context()
    cfg = here.app.config
    current = now()
    token = getattr(here.session, "token", None)
    this_id = token_hash(token) if token else None
    idle, absolute = cfg["SESSION_IDLE_TIMEOUT"], cfg["SESSION_ABSOLUTE_TIMEOUT"]
    rows = _LIVE_SESSIONS.rows(user=user.id, idle_after=current - idle, idle_before=current + idle,
                               created_after=current - absolute, created_before=current + absolute)
    return _Sessions(_SessionShown(session_handle(r.id), r.created_at, r.last_seen_at, r.ip,
                                   browser_label(r.user_agent), r.id == this_id) for r in rows)


class _SessionShown:
    """One line of active_sessions. An object, not a dict: Jinja reads `s.ip` as an attribute first, and a
    dict answered each of a page's ~20 such reads by raising AttributeError before its key was tried."""

    __slots__ = ("handle", "created_at", "last_seen_at", "ip", "user_agent", "current")

    def __init__(self, handle, created_at, last_seen_at, ip, user_agent, current):
        self.handle, self.created_at, self.last_seen_at = handle, created_at, last_seen_at
        self.ip, self.user_agent, self.current = ip, user_agent, current


class _Sessions(list):
    """active_sessions' list, which also says whether any session is not this browser's (the template's
    `rejectattr('current')|list` for that was a twentieth of a User Settings view)."""

    @property
    def others(self):
        return any(not s.current for s in self)


def _sessions_response(notice):
    """After ending sessions: the refreshed list for htmx (and the Security activity, out of band: it may
    list the sessions just ended), else back to User Settings with a message."""
    if htmx.is_htmx():
        return htmx.render("settings/index.html", "settings/_sessions_update.html", sessions_notice=notice)
    flash(notice, "success")
    return redirect(url_for("settings.index", **activity_view()))  # with Security activity as it was shown


# Ending sessions needs a fresh sign-in too (ASVS 4 3.3.4: "having authenticated again"): someone holding a
# stolen session must not sign its owner out everywhere, which also forgets the owner's known browsers.
@bp.post("/sessions/end-others")
@login_required
@fresh_login_required(back_to="settings.index",
                      not_done="your other browsers were not signed out yet: sign them out again")
def end_other_sessions():
    """Sign out everywhere else: delete every other session of this person, server-side (security.md 30, 35)."""
    user = _user()
    with write_transaction():  # the sessions, the browsers' throttles and the record together, or none
        ended = end_user_sessions(user, keep_token=session.token)
        forget_browsers(user, keep_this_one=True)  # the others lose their own password throttle too
        audit("sessions_ended", user=user, reason="signed out everywhere else", count=ended)
    if ended:
        return _sessions_response(f"Signed out on {ended} other browser{'s' if ended != 1 else ''}.")
    return _sessions_response("You were not signed in anywhere else.")


@bp.post("/sessions/<handle>/end")
@login_required
@fresh_login_required(back_to="settings.index",
                      not_done="that browser was not signed out yet: sign it out again")
def end_one_session(handle):
    """Sign out one other browser of your own. A handle that is not one of your sessions (it ended meanwhile:
    signed out, expired, ended by a 2FA change in another tab; or it is another person's) gets the same
    answer as a session that has just ended, with the list refreshed, and changes nothing (security.md 34)."""
    user = _user()
    this_id = token_hash(session.token) if session.token else None
    rows = ServerSession.select(ServerSession.id).where(ServerSession.user == user.id)
    match = next((r.id for r in rows if session_handle(r.id) == handle), None)
    if match is None:
        return _sessions_response("That session had already ended.")
    if match == this_id:
        return _sessions_response("To sign out of this browser, use Log out.")
    with write_transaction():
        User.lock(user.id)  # like end_user_sessions: a renewal of that session under way sees it gone
        ended = ServerSession.delete().where((ServerSession.id == match) & (ServerSession.user == user.id)).execute()
        if ended:
            audit("sessions_ended", user=user, reason="signed out one other browser", count=ended)
    return _sessions_response("That browser is signed out.")
