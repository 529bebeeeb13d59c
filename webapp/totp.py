"""The TOTP domain: secrets, encryption at rest, the otpauth URI, the QR code, and code checking.

RFC 6238 with the parameters every authenticator app supports: SHA-1, 6 digits, 30-second steps, T0 = 0.
"""
import base64
import functools
import hmac
import re
import secrets
from urllib.parse import quote

import pyotp
import segno
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from . import flaskctx

PERIOD = 30
DIGITS = 6
WINDOW = 1  # accept T-1, T, T+1 (security.md 14)
SKEW_SEARCH_STEPS = 20  # how far the wizard looks for a mis-set phone clock (10 minutes either way)
SECRET_BYTES = 20  # 160 bits, the length of an HMAC-SHA1 output (security.md 3)

_CODE_RE = re.compile(r"[0-9]{6}")


class SecretError(Exception):
    """A stored secret could not be decrypted with any configured key."""


def new_secret():
    """A fresh 160-bit secret from the OS CSPRNG, as 32 unpadded Base32 characters."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


# The spaces normalise_code removes: ASCII, no-break, en/em and the other typographic spaces, narrow no-break,
# medium mathematical and ideographic.
_SPACES = dict.fromkeys(map(ord, " \u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                             "\u202f\u205f\u3000"))


def normalise_code(raw):
    """Return the code as exactly six ASCII digits (spaces removed), or None if it is anything else.

    Stricter than pyotp or int(): no '+', '_', '-', line breaks, tabs or non-ASCII digits (security.md 5).
    Besides the ordinary space, the blank spaces a code copied from a page that groups it as "123 456" may
    carry (no-break, thin, figure, ideographic ...) are removed; not every Unicode space: U+1680 is drawn
    as a dash.
    """
    if not isinstance(raw, str) or len(raw) > 32:
        return None
    code = raw.translate(_SPACES)
    return code if _CODE_RE.fullmatch(code) else None


def step_at(timestamp):
    """The RFC 6238 time step (an unbounded Python int, so 64-bit and beyond: security.md 2)."""
    return int(timestamp) // PERIOD


class _TOTP(pyotp.TOTP):
    """pyotp's TOTP, keeping the key it decodes: pyotp decodes the Base32 secret again for every code (and
    once more when it is made, to check it), ~40,000 instructions each time with Python's b32decode, and a
    code check makes three codes. The key is the decoding of the secret it was made for, as pyotp's."""

    def byte_secret(self):
        kept = self.__dict__.get("_kept_key")
        if kept is not None and kept[0] is self.secret:
            return kept[1]
        key = super().byte_secret()
        self._kept_key = (self.secret, key)
        return key


def _otp(secret):
    """pyotp's generator for `secret` with our parameters; one serves any number of steps."""
    return _TOTP(secret, digits=DIGITS, interval=PERIOD)


def code_for_step(secret, step):
    """The six-digit code for one time step (HOTP-SHA1 over the 8-byte big-endian counter)."""
    return _otp(secret).generate_otp(step)


def match_step(secret, code, timestamp, window=WINDOW):
    """The step within +-window of now whose code equals `code`, or None; every step is compared.

    `code` must already be normalised. Comparison is constant-time per step (security.md 5).
    """
    current = step_at(timestamp)
    otp = _otp(secret)  # one for the whole window
    matched = None
    for step in range(current - window, current + window + 1):
        if hmac.compare_digest(otp.generate_otp(step), code) and matched is None:
            matched = step
    return matched


def clock_offset_steps(secret, code, timestamp, search=SKEW_SEARCH_STEPS):
    """If `code` belongs to a step outside the accepted window but within `search`, its offset in steps.

    Used only to explain a failure ("your phone's clock is off"); it never accepts the code.
    """
    current = step_at(timestamp)
    otp = _otp(secret)
    for distance in range(WINDOW + 1, search + 1):
        for step in (current - distance, current + distance):
            if step >= 0 and hmac.compare_digest(otp.generate_otp(step), code):
                return step - current
    return None


def provisioning_uri(secret, account, issuer):
    """otpauth://totp/ISSUER:ACCOUNT?secret=...&issuer=ISSUER per the Key URI Format (security.md 6, 7).

    Algorithm, digits and period are left at the defaults, which some apps ignore anyway.
    """
    label = quote(issuer, safe="") + ":" + quote(account, safe="")
    return f"otpauth://totp/{label}?secret={secret.rstrip('=')}&issuer={quote(issuer, safe='')}"


def qr_code(uri):
    """The segno QR code for `uri`, made with fixed choices (bench/qr_masks.py checks they stay readable)."""
    # A fixed mask: segno's automatic choice renders all eight and scores them, ~4x the cost of the whole
    # QR step. With zxing-cpp and zbar every mask decoded all samples at 5 and 2 px per module, and all or
    # all but one when blurred (sigma 2 px); at 1.6 px per module all masks are near the unreadable edge,
    # the automatic choice too (bench/qr_masks.py, docs/performance.md). make_qr in byte mode (what the
    # automatic choice picks for an otpauth URI) at level M without segno's boost skips two more searches;
    # the "app" row of bench/qr_masks.py decodes exactly like mask 1 made the old way.
    return segno.make_qr(uri, error="m", mode="byte", boost_error=False, mask=1)


def qr_svg(uri, scale=5, border=4):
    """The QR code of `uri` as inline SVG markup: black modules on a white quiet zone of 4 modules.

    segno makes the code; the SVG is written here from its module matrix, one horizontal stroke per run of
    dark modules: segno's own SVG writer took 1.6 ms for what this does in 0.5 ms, a sixth of the QR step
    (docs/performance.md). The markup has segno's shape (width/height, scale(), class "qrline"), and
    tests/test_totp.py checks that its strokes cover exactly the matrix's dark modules.
    """
    matrix = qr_code(uri).matrix
    size = len(matrix) + 2 * border
    runs = []
    for y, row in enumerate(matrix):
        x, width = 0, len(row)
        while x < width:
            if row[x] & 1:
                start = x
                while x < width and row[x] & 1:
                    x += 1
                runs.append(f"M{start + border} {y + border}.5h{x - start}")
            else:
                x += 1
    # The viewBox lets CSS shrink the code to a narrow screen's width (app.css) instead of cutting it off.
    side = size * scale
    # Hidden from assistive technology: the element around it (the wizard's QR step) is the image with a name;
    # the <svg> itself was exposed inside it as a second image with none.
    return (f'<svg width="{side}" height="{side}" viewBox="0 0 {side} {side}" class="segno" aria-hidden="true">'
            f'<g transform="scale({scale})">'
            f'<path fill="#fff" d="M0 0h{size}v{size}h-{size}z"/>'
            f'<path class="qrline" stroke="#000" d="{"".join(runs)}"/></g></svg>')


def group_key(secret, size=4):
    """The key in groups of four for reading aloud or typing ("ABCD EFGH ...")."""
    return " ".join(secret[i:i + size] for i in range(0, len(secret), size))


def _fernet():
    return _fernet_for(str(flaskctx.the_app().config["TOTP_ENCRYPTION_KEYS"]))


@functools.lru_cache(maxsize=8)
def _fernet_for(setting):
    """The MultiFernet for a TOTP_ENCRYPTION_KEYS value, built once (parsing the keys on every check cost
    about 6 % of the code check)."""
    keys = [k.strip() for k in setting.split(",") if k.strip()]
    return MultiFernet([Fernet(k) for k in keys])


def encrypt_secret(secret):
    """Encrypt a Base32 secret with the newest key (security.md 4)."""
    return _fernet().encrypt(secret.encode("ascii")).decode("ascii")


def decrypt_secret(token):
    """Decrypt a stored secret with any configured key; raises SecretError if none fits."""
    try:
        return _fernet().decrypt(token.encode("ascii")).decode("ascii")
    except (InvalidToken, ValueError) as exc:
        raise SecretError("stored TOTP secret cannot be decrypted with the configured keys") from exc


def reencrypt_secret(token):
    """Re-encrypt a stored secret under the newest key (key rotation)."""
    try:
        return _fernet().rotate(token.encode("ascii")).decode("ascii")
    except InvalidToken as exc:
        raise SecretError("stored TOTP secret cannot be decrypted with the configured keys") from exc


class CheckResult:
    """The outcome of checking a person's code: ok, or why not (wrong and replay look the same to them)."""

    def __init__(self, ok, reason, device=None, locked_until=None, failures=0, strikes=0):
        self.ok = ok
        self.reason = reason  # "ok", "malformed", "wrong", "replay", "locked"
        self.device = device
        self.locked_until = locked_until
        self.failures = failures  # the account's refused codes in a row, this attempt included
        self.strikes = strikes  # of those, the ones checked (not refused during a wait): they set the wait

    def __bool__(self):
        return self.ok


def _prepared_checks():
    """The code check's queries, compiled once per database (db.Prepared): this is the hottest path."""
    from .db import Param, Prepared, for_update
    from .models import Device, User

    lock_user = Prepared(lambda: for_update(User.select().where(User.id == Param("id"))))
    devices = Prepared(lambda: Device.select().where(Device.user == Param("user")).order_by(Device.id))
    # Conditional update: only a step newer than the last accepted one wins (security.md 16, 20).
    advance = Prepared(lambda: Device.update(last_step=Param("step"), last_used_at=Param("used_at")).where(
        (Device.id == Param("id")) & (Device.last_step < Param("step"))))
    exists = Prepared(lambda: Device.select(Device.id).where(Device.id == Param("id")))
    return lock_user, devices, advance, exists


_LOCK_USER, _DEVICES, _ADVANCE_STEP, _DEVICE_EXISTS = _prepared_checks()


def code_matches(user, code, ts=None):
    """The (device, step) pairs of `user` whose code for a step within the window equals `code` (already
    normalised; None matches nothing).

    This is the slow part of a check (decrypting each secret, three HMACs per device) and it needs no
    lock, so it runs before the write transaction: on SQLite that transaction excludes every other
    writer, and under parallel sign-ins the time spent inside it decides the throughput
    (docs/performance.md). Whether a match may be used is settled inside the transaction by a conditional update
    of the device's last step, so a device read here that changes meanwhile cannot let a code through
    twice.
    """
    from .clock import timestamp

    if code is None:
        return []
    ts = timestamp() if ts is None else ts
    found = []
    for device in _DEVICES.rows(user=user.id):
        step = match_step(decrypt_secret(device.secret_enc), code, ts)
        if step is not None:
            found.append((device, step))
    return found


def check_user_code(user, raw_code, matches=None):
    """Check a code against every device of `user`, atomically with the replay and throttle state.

    `matches` is code_matches() for this code, when the caller computed it already. One write transaction
    (BEGIN IMMEDIATE on SQLite, a row lock on PostgreSQL) covers the lock check, the replay check against
    each matching device's last step with its update, and the failure counter, so parallel submissions
    cannot both succeed or lose a failure (security.md 16, 18, 20). Every attempt that does not succeed
    increments the account's failure counter, even while locked; only the codes checked count as strikes,
    which set the back-off, so a person who keeps trying during a lock does not make the next one longer.
    """
    from .clock import now
    from .db import write_transaction
    from .models import User
    from .security import audit, backoff, is_lock, wait_end

    code = normalise_code(raw_code)
    if matches is None:
        matches = code_matches(user, code)
    with write_transaction():
        locked_user = _LOCK_USER.first(id=user.id)
        current = now()
        if locked_user.code_locked_until and locked_user.code_locked_until > current:
            # Never longer than the whole wait from now, should the clock have gone back since (wait_end).
            until = wait_end(locked_user.code_locked_until, locked_user.code_strikes, current)
            User.update(code_failures=User.code_failures + 1, code_locked_until=until).where(
                User.id == user.id).execute()
            audit("code_throttled", user=user)
            return CheckResult(False, "locked", locked_until=until,
                               failures=locked_user.code_failures + 1, strikes=locked_user.code_strikes)

        reason, matched = "malformed" if code is None else "wrong", None
        for device, step in matches:
            if _ADVANCE_STEP.execute(step=step, used_at=current, id=device.id):
                matched = device
                break
            # The device accepted this step or a later one already, or it was removed since code_matches()
            # read it: then the code is simply not one of the person's devices' (a rare path: one query).
            if _DEVICE_EXISTS.first(id=device.id) is not None:
                reason = "replay"
        if matched is not None:
            if locked_user.code_failures or locked_user.code_locked_until:  # nothing to reset otherwise
                User.update(code_failures=0, code_strikes=0, code_locked_until=None).where(
                    User.id == user.id).execute()
            audit("code_accepted", user=user, device=matched.name, device_id=matched.id)
            return CheckResult(True, "ok", device=matched)

        failures, strikes = locked_user.code_failures + 1, locked_user.code_strikes + 1
        until = current + backoff(strikes)
        User.update(code_failures=User.code_failures + 1, code_strikes=User.code_strikes + 1,
                    code_locked_until=until).where(User.id == user.id).execute()
        audit("totp_replay" if reason == "replay" else "code_rejected", user=user, reason=reason,
              failures=failures)
        if is_lock(strikes):  # every lock, the first and each longer one after it (an upgrade review)
            audit("code_lockout", user=user, until=until)
        return CheckResult(False, reason, locked_until=until, failures=failures, strikes=strikes)
