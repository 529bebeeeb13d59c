"""The whole data model: people, their authenticator devices, server-side sessions, sign-in challenges,
pending enrolments, support requests, the per-network counters and the append-only audit log. All times are
naive UTC."""
import json
import re
import sys
import time
import unicodedata
from datetime import timedelta

from email_validator import EmailNotValidError, validate_email
from flask_login import UserMixin
from peewee import (
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
    fn,
)

from .clock import now
from .db import NeverReusedAutoField, Param, Prepared, db, for_update, is_sqlite
from .fields import (LATIN_LOOKALIKES, has_stacked_marks, is_invisible, is_mark, is_plain_letter,
                     mixes_alphabets)


class BaseModel(Model):
    class Meta:
        database = db


# Ids on PostgreSQL. An AutoField is a 32-bit `serial` there, whose sequence stops at 2**31 - 1: every insert
# fails from then on, and with it the transaction it is in (a wrong password's count, security.md 18). And a
# sequence moves on for every insert tried, also one rolled back or turned into an update by ON CONFLICT.
# A table whose sequence someone can move on by sending requests has a 64-bit id (BigAutoField: `bigserial`;
# on SQLite it stays INTEGER PRIMARY KEY, 64 bits already); those that grow only with accounts keep `serial`.
# db._widen_ids makes the columns of a database from before 2026-12-07 64-bit at start (README "Upgrades").
# ServerSession, KnownBrowser and SignInChallenge have random text ids and no sequence.


class User(UserMixin, BaseModel):
    """A person with an account; email is stored normalised (trimmed, lower-case)."""

    # A 32-bit id (serial) on purpose: a number is taken by an account made (or, rarely, by the same address
    # signing up twice at once), which stays: nothing deletes accounts, and sign-ups are limited per network
    # (SIGNUPS_PER_HOUR), so two billion of them would be a table of hundreds of gigabytes first. A 64-bit
    # one would change every foreign key to a person, rewriting at the upgrade every table that has one.
    email = CharField(max_length=254, unique=True)
    password_hash = CharField(max_length=255)
    is_admin = BooleanField(default=False)
    created_at = DateTimeField(default=now)
    last_login_at = DateTimeField(null=True)
    # Throttling, kept apart for passwords and codes (security.md 18, 19).
    password_failures = IntegerField(default=0)
    password_locked_until = DateTimeField(null=True)
    # code_failures counts every refused code, those sent during a pause or lock too (security.md 20);
    # code_strikes only the wrong ones that were checked: the back-off grows with these, so codes typed while
    # the account waits do not lengthen its next lock.
    code_failures = IntegerField(default=0)
    code_strikes = IntegerField(default=0)
    code_locked_until = DateTimeField(null=True)
    # Set by support's "temporarily disable 2FA": password-only sign-in until then (security.md 39).
    tfa_reset_until = DateTimeField(null=True)
    # Set by the operator's `users disable`: the account is out of use (no sign-in, no session) until
    # `users enable` clears it. Devices and password stay as they were.
    disabled_at = DateTimeField(null=True)

    @staticmethod
    def any_exist():
        """Whether any account exists yet (asked by the sign-in page on every view: compiled once)."""
        return bool(_ANY_USER.rows())

    @classmethod
    def lock(cls, user_id):
        """Inside a write_transaction, hold this person's row until it ends (SELECT ... FOR NO KEY UPDATE on
        PostgreSQL: db.for_update; SQLite's BEGIN IMMEDIATE already excludes every other writer)."""
        for_update(cls.select(cls.id).where(cls.id == user_id)).get()

    @classmethod
    def by_email(cls, email, **also):
        """The user with this email, or None. Stored in its normal form (normalise_email), or as stored before
        2026-12-05, only stripped and lower-cased: as typed, or with the domain in punycode (as some browsers
        send it), so those accounts stay reachable whichever spelling comes now. Each of `also` (name=query)
        is read in the same statement, as an attribute of the user of that name."""
        spellings = _stored_spellings(email)
        query = cls.select(cls, *(sub.alias(name) for name, sub in also.items()))
        if len(spellings) == 1:
            return query.where(cls.email == spellings[0]).first()
        found = {user.email: user for user in query.where(cls.email.in_(spellings))}
        return next((found[s] for s in spellings if s in found), None)

    def support_window(self, at=None):
        """Support's time window for a new device (security.md 39): None when none was opened, "open" until
        tfa_reset_until, "ended" from then on. It matters only while the person has no device."""
        if self.tfa_reset_until is None:
            return None
        return "open" if self.tfa_reset_until > (at or now()) else "ended"

    @property
    def has_2fa(self):
        """Whether this person has at least one authenticator device (asked on most pages: compiled once)."""
        return bool(_ANY_DEVICE.rows(user=self.id))


def _stored_spellings(email):
    """The spellings `email` may be stored under, the normal form first (User.by_email)."""
    text = (email or "").strip()
    valid = _validated(text)
    spellings = [_folded(valid.normalized if valid is not None else text), text.lower()]
    if valid is not None and valid.ascii_email:
        spellings.append(valid.ascii_email.lower())
    return list(dict.fromkeys(spellings))


def normalise_email(email):
    """The one spelling of an address used for storage and lookups: email-validator's normal form (the domain
    through IDNA, so "xn--mnchen-3ya.de", "münchen.de" and full-width letters agree; the local part in NFC),
    lower-cased and in NFC. What it cannot parse (a partial address typed into the Support search, a wrong
    sign-in) is only lower-cased and put in NFC: it names no account, and a prefix still matches."""
    text = (email or "").strip()
    valid = _validated(text)
    return _folded(valid.normalized if valid is not None else text)


_LATIN_LOOKALIKES = frozenset(LATIN_LOOKALIKES)  # a part written wholly in them ("аӏісе") passes for a Latin word


def lookalike_problem(email):
    """Why a new account must not have this address, or None. Such an address reads like another one: to
    support, who goes by what the address looks like, a person could pass for someone else.
    - Compatibility characters in the local part (full-width "ａｌｉｃｅ", ligatures, superscripts): NFKC
      makes them ordinary letters, and the address then looks like the plain one it is not.
    - Letters of two look-alike alphabets in one part ("аlice" with a Cyrillic а): the classic spoof.
    - A part written wholly in Cyrillic or Greek letters that read as Latin ones ("аӏісе").
    The parts are checked as they will be stored: a punycode domain ("xn--xample-2of.com") in Unicode.
    Other addresses in one alphabet are fine ("иван@пример.рф", "zoë@example.com"), and so are scripts that
    look like no other (Japanese kana beside kanji)."""
    typed_local = email.rpartition("@")[0]
    # Characters that show nothing ("vi\u034fctim" reads "victim"), and marks that NFC could not join to the
    # Latin, Cyrillic or Greek letter before them (an "i" with a second dot above reads as a plain "i").
    if any(is_invisible(c) for c in email):
        return "This address holds characters that do not show. Type it in ordinary letters."
    # A pile of marks (on a letter of any script) paints over the lines around the address on the Support page.
    if has_stacked_marks(email):
        return "This address has more accents on one letter than writing needs. Type it in ordinary letters."
    # As typed and as stored: lower-casing makes such a pair of some capitals ("İ" becomes "i" and a dot above,
    # which reads as a plain "i"), so "İnci@" became an account that looks like "inci@".
    for composed in (unicodedata.normalize("NFC", email), normalise_email(email)):
        for before, c in zip(composed, composed[1:]):
            if is_mark(c) and is_plain_letter(before):
                return "This address has accents that do not belong to a letter. Type it in ordinary letters."
    # The domain goes through IDNA (normalise_email), which makes such letters ordinary; the local part is kept.
    if unicodedata.normalize("NFKC", typed_local) != unicodedata.normalize("NFC", typed_local):
        return "Type the address in ordinary letters (not full-width or other special forms)."
    valid = _validated(email)
    local, _, domain = (valid.normalized if valid is not None else email).rpartition("@")
    # Each word on its own ("ivan.иванов" is two words in two alphabets, as people write their names).
    for part in [*re.split(r"[.+_-]", local), *domain.split(".")]:
        letters = [c for c in part.lower() if c.isalpha()]
        if mixes_alphabets(part):
            return "This address mixes letters of different alphabets (such as Latin and Cyrillic). Use another."
        if letters and not part.isascii() and all(c in _LATIN_LOOKALIKES for c in letters):
            return "This address is written in letters that look like Latin ones but are not. Use another."
    return None


def _validated(text):
    """email-validator's reading of an address (no DNS), or None when it is not one."""
    try:
        return validate_email(text, check_deliverability=False)
    except EmailNotValidError:
        return None


def _folded(text):
    return unicodedata.normalize("NFC", text.lower())  # in this order: lower-casing can undo NFC


class Device(BaseModel):
    """An authenticator app bound to a person; secret_enc is the Fernet-encrypted Base32 secret."""

    # 64-bit: anyone with an account can add a device (with a code from its new key, which they have) and
    # remove it, again and again. A few rows per person: widening it is quick. Never given twice: the audit
    # records tell devices apart by their number (an intruder's device added under a removed one's name and
    # number read like the owner's device put back; a security review).
    id = NeverReusedAutoField()
    user = ForeignKeyField(User, backref="devices", on_delete="CASCADE")
    name = CharField(max_length=64)
    secret_enc = TextField()
    created_at = DateTimeField(default=now)
    last_used_at = DateTimeField(null=True)
    # Highest accepted time step: a code for this step or an older one is a replay (security.md 16).
    last_step = BigIntegerField(default=0)

    class Meta:
        indexes = ((("user", "name"), True),)


class ServerSession(BaseModel):
    """A browser session; the cookie holds a random token and only its SHA-256 is stored here."""

    id = CharField(max_length=64, primary_key=True)
    user = ForeignKeyField(User, null=True, backref="sessions", on_delete="CASCADE")
    data = TextField(default="{}")
    created_at = DateTimeField(default=now)
    last_seen_at = DateTimeField(default=now, index=True)
    ip = CharField(max_length=64, null=True)
    user_agent = CharField(max_length=200, null=True)

    def load(self):
        return json.loads(self.data or "{}")


class KnownBrowser(BaseModel):
    """A browser this person completed a sign-in from; its cookie holds a random token, stored here as its
    SHA-256. Wrong passwords typed there count here, not on the account, so someone who only knows the
    address can lock out every other browser, not the owner's (security.md 18; Auth-CS "Account Lockout").

    A forgotten one (forgotten_at: security.forget_browsers, or ten newer browsers) is known for nothing of
    that any more; it keeps for FORGOTTEN_BROWSER_TTL only an allowance of its own at the contact form
    (security.contact_browser): after an intruder changed the password, the owner's usual browser is what
    still tells them apart from the strangers who can use up the address's shared limit (a security review)."""

    id = CharField(max_length=64, primary_key=True)
    user = ForeignKeyField(User, backref="known_browsers", on_delete="CASCADE")
    created_at = DateTimeField(default=now)
    # Each completed sign-in from the browser moves this on and sends its cookie again: the lifetime slides.
    last_used_at = DateTimeField(default=now, index=True)
    password_failures = IntegerField(default=0)
    password_locked_until = DateTimeField(null=True)
    # When it stopped being known (None: known). Indexed for the purge, forgotten browsers only (after the class).
    forgotten_at = DateTimeField(null=True)


# The purge's `forgotten_at < ?` (which SQLite too takes as implying IS NOT NULL, so it may use the index). The
# known browsers, most of the table, are left out: an index entry for each of them was one more write at every
# sign-in from a new browser, and space for nothing. Named apart from the index on every row it replaced on
# 2026-12-07 (OBSOLETE_INDEXES), so that a database of before gets this one at start.
KnownBrowser.add_index(KnownBrowser.index(KnownBrowser.forgotten_at, where=KnownBrowser.forgotten_at.is_null(False),
                                          name="knownbrowser_forgotten_at_set"))


class SignInChallenge(BaseModel):
    """The server-side state between a correct password and a correct code (security.md 21, 22, 24)."""

    id = CharField(max_length=64, primary_key=True)  # SHA-256 of the token in the session
    user = ForeignKeyField(User, backref="challenges", on_delete="CASCADE")
    created_at = DateTimeField(default=now)
    failures = IntegerField(default=0)
    next_url = CharField(max_length=512, null=True)


class PendingEnrolment(BaseModel):
    """A secret shown in the wizard but not yet confirmed; tied to one session, expires (security.md 8)."""

    # 64-bit: every Start of the wizard (one POST of anyone signed in) takes a number. Rows expire: a small table.
    id = BigAutoField()
    session = ForeignKeyField(ServerSession, backref="enrolments", on_delete="CASCADE")
    user = ForeignKeyField(User, backref="pending_enrolments", on_delete="CASCADE")
    secret_enc = TextField()
    created_at = DateTimeField(default=now)
    # Set once a correct code from the new secret was entered; the device is created from it.
    verified_step = BigIntegerField(null=True)
    # Wrong codes entered against this secret; the wizard discards the secret after too many.
    failures = IntegerField(default=0)


class SupportRequest(BaseModel):
    """A message sent through the contact form; linked to the account whose email matches, if any."""

    # 64-bit: anyone can send the form, without an account (limited per network, but from many networks).
    # Never given twice: the audit records and the Support page name requests by number, and a request erased
    # or purged while it was the newest gave its number to the next one on SQLite.
    id = NeverReusedAutoField()
    email = CharField(max_length=254, index=True)
    message = TextField()
    # No index on user alone: the index on (user, handled_at, created_at) starts with it (OBSOLETE_INDEXES).
    user = ForeignKeyField(User, null=True, backref="support_requests", on_delete="SET NULL", index=False)
    created_at = DateTimeField(default=now, index=True)
    ip = CharField(max_length=64, null=True)  # what the per-client limit counts (security.client_network)
    handled_at = DateTimeField(null=True)
    handled_by = ForeignKeyField(User, null=True, backref="handled_requests", on_delete="SET NULL")
    # support._repeat_key: a SHA-256 of the sending browser's session token with the request, so that the same
    # request sent twice by it (a double click, Back and Send again) is one. Only that browser can make it.
    # (Until 2026-12-07 the SHA-256 of a one-time id of the page.) No index of its own: the lookup goes by
    # created_at (indexed) first.
    form_hash = CharField(max_length=64, null=True)
    # The id of the browser whose own allowance it was counted against (security.contact_browser: one the
    # account signed in from), or None: counted against the address's shared limit. No foreign key: the count
    # must not move to the shared limit when the browser's row goes.
    known_browser = CharField(max_length=64, null=True)

    class Meta:
        # The Support page lists open requests (handled_at IS NULL) oldest first: one index serves both; and
        # one person's (?user=...&requests=theirs, the disable form), which walked past everyone else's open
        # requests to reach theirs (93 ms with 80,000 open).
        indexes = ((("handled_at", "created_at"), False), (("user", "handled_at", "created_at"), False))


class NetworkCounter(BaseModel):
    """What one client network did in its current hour, for one of the per-network limits on what anyone
    can do without an account (security.count_for_network): sign-ups, wrong passwords, contact requests
    per IPv6 /48. A fixed hour from the first counted event (WINDOW), then the count starts again: one row
    per limit and network, however many events, and none for networks that stay quiet."""

    WINDOW = timedelta(hours=1)

    # 64-bit: the upsert (security._add_hit) takes a number for every event counted, though it inserts a row
    # only for the first of a network's hour: wrong passwords from anyone would exhaust a 32-bit one.
    id = BigAutoField()
    purpose = CharField(max_length=20)
    network = CharField(max_length=64)  # security.client_network, or the /48 of an IPv6 one
    window_start = DateTimeField()
    hits = IntegerField(default=0)

    class Meta:
        indexes = ((("purpose", "network"), True),)  # the upsert's conflict target


class AuditEvent(BaseModel):
    """One append-only record of a security event; never holds a code, secret or password (security.md 42, 43)."""

    # 64-bit: records are kept, and strangers cause many (wrong passwords, sign-ups, contact requests).
    id = BigAutoField()
    created_at = DateTimeField(default=now, index=True)
    kind = CharField(max_length=40)
    # No index on kind, user or actor alone: each starts one of the indexes after the class (OBSOLETE_INDEXES).
    user = ForeignKeyField(User, null=True, backref="audit_events", on_delete="SET NULL", index=False)
    actor = ForeignKeyField(User, null=True, backref="audit_actions", on_delete="SET NULL", index=False)
    ip = CharField(max_length=64, null=True)
    detail = TextField(default="{}")

    @property
    def details(self):
        return json.loads(self.detail or "{}")


# Nothing deletes audit records: a year of sign-ins is millions of them, and a person under attack or an admin
# has 100,000 or more. Each page reads a few, newest first, through one of these, and never sorts all of a
# person's or an event's records (with 10 million: User Settings of such a person took 190 ms, the audit log
# filtered by a common event 730 ms, a Support page 0.3 to 1 s). Those by person leave out the records of
# nobody (most have no actor): PostgreSQL takes `user_id = ?` and `IN` as excluding NULL, and so does SQLite.
_WITH_PERSON, _WITH_ACTOR = AuditEvent.user.is_null(False), AuditEvent.actor.is_null(False)
# User Settings' activity, a person's audit log, `users activity`:
AuditEvent.add_index(AuditEvent.index(AuditEvent.user, AuditEvent.created_at, where=_WITH_PERSON))
# A person's records of some events (each Support row's window, the contact requests' hints):
AuditEvent.add_index(AuditEvent.index(AuditEvent.user, AuditEvent.kind, AuditEvent.created_at, where=_WITH_PERSON))
# What an admin did (a person's audit log, `users activity`):
AuditEvent.add_index(AuditEvent.index(AuditEvent.actor, AuditEvent.created_at, where=_WITH_ACTOR))
# The audit log's Event filter:
AuditEvent.add_index(AuditEvent.index(AuditEvent.kind, AuditEvent.created_at))
# The audit log's IP address filter (what else an intruder's address did). Only records with an address: the
# operator's commands write none.
AuditEvent.add_index(AuditEvent.index(AuditEvent.ip, AuditEvent.created_at, where=AuditEvent.ip.is_null(False)))


_ANY_USER = Prepared(lambda: User.select(User.id).limit(1))
_ANY_DEVICE = Prepared(lambda: Device.select(Device.id).where(Device.user == Param("user")).limit(1))


def maybe_not_normal(field):
    """SQL: whether an address column may hold a spelling other than its normal one (normalise_email): a
    character outside printable ASCII, a capital or an "xn--" label. Every other address is its own normal
    form, so only these need a look in Python to tell which mailbox they are (cli._spellings_of)."""
    unusual = fn.GLOB("*[^ -~]*", field) if is_sqlite() else field.regexp("[^ -~]")
    return unusual | (field != fn.LOWER(field)) | field.contains("xn--")


def _warn(text):
    print(f" * twostep: WARNING: {text} (README \"Upgrades\")", file=sys.stderr, flush=True)


def respell_stored_emails():
    """Store in their normal spelling (normalise_email) the addresses an earlier version stored only trimmed and
    lower-cased: decomposed accents ("zoe" and a combining diaeresis), full-width letters in the domain, a
    punycode domain. An upgrade review: nobody typing the address in the usual spelling found such an account,
    sign-up made a second one for the same mailbox, and Support's search missed it. Run at every start
    (db._create_tables, holding its lock); only addresses with a character outside printable ASCII or an
    "xn--" label are read, and each that changes gets an audit record.

    Left as they are, with a warning for the operator (a security review):
    - an address whose normal spelling another account has, or shares with another old spelling: re-spelling
      one would move the usual spelling, and the sign-ins that come with it, to the other account;
    - an address whose normal spelling would read like another one (lookalike_problem: "xn--pple-43d.com"
      is "аpple.com" with a Cyrillic а, plainly odd only in punycode).
    Returns the line to print once committed, if any."""
    from .security import audit  # security imports this module

    unusual = fn.GLOB("*[^ -~]*", User.email) if is_sqlite() else User.email.regexp("[^ -~]")
    rows = list(User.select(User.id, User.email).where(unusual | User.email.contains("xn--")).order_by(User.id))
    spellings = {row.id: normalise_email(row.email) for row in rows}
    changing = [row for row in rows if spellings[row.id] != row.email]
    sharing = {}
    for row in changing:
        sharing.setdefault(spellings[row.id], []).append(row)
    changed = 0
    for spelling, group in sharing.items():
        taken = User.select(User.id, User.email).where(User.email == spelling).first()
        if taken is not None or len(group) > 1:
            accounts = ", ".join(f"#{r.id} ({r.email})" for r in ([taken] if taken else []) + group)
            _warn(f"accounts {accounts} are one mailbox in several spellings, left as they are: keep one "
                  "account and `users disable` the others by number (users disable '#8')")
            continue
        [row] = group
        problem = lookalike_problem(spelling)
        if problem:
            _warn(f"account #{row.id} keeps its old spelling {row.email}: written as {spelling} it would read like "
                  f"another address ({problem})")
            continue
        User.update(email=spelling).where(User.id == row.id).execute()
        audit("email_respelled", user=row.id, was=row.email)
        changed += 1
    return [f"stored {changed} address(es) in their normal spelling"] if changed else []


# The audit records that name devices by number (device_id, device_ids), by event.
_DEVICE_NUMBER_KINDS = ("tfa_enabled", "device_added", "device_renamed", "device_removed", "code_accepted",
                        "tfa_disabled", "tfa_reset", "support_tfa_disabled", "account_erased")


def _highest_recorded(numbers, kinds, after_id):
    """(the highest integer the SQL `numbers` finds in the audit records of `kinds`, the last record read), for
    db._never_reuse_ids: with `after_id` None every record (through the index by event: run before the writer
    lock, as it takes seconds on millions), else only those after that record (by number: run under the
    lock, for the few written meanwhile)."""
    table = AuditEvent._meta.table_name
    marks = ", ".join("?" * len(kinds))
    if after_id is None:
        last = db.execute_sql(f'SELECT COALESCE(MAX(id), 0) FROM "{table}"').fetchone()[0]
        where, args = f'"{table}".kind IN ({marks})', list(kinds)  # (those written meanwhile: read again)
    else:  # "+kind": by the number's range, not the index by event
        last, where, args = None, f'"{table}".id > ? AND +"{table}".kind IN ({marks})', [after_id, *kinds]
    found = db.execute_sql(f"SELECT COALESCE(MAX(n), 0) FROM ({numbers.format(table=table, where=where)}) "
                           "WHERE typeof(n) = 'integer'", args * numbers.count("{where}")).fetchone()[0]
    return found, last


def highest_recorded_device_id(after_id=None):
    """The highest device number the audit records name (0 if none), for the upgrade after which no number is
    given twice (db._never_reuse_ids): a device removed before it may have had a number above every device
    left, and the next device must not get it. Codes accepted are most of the records read: 0.7 s for a
    million on the project machine, before the writer lock."""
    return _highest_recorded(
        "SELECT json_extract(detail, '$.device_id') AS n FROM \"{table}\" WHERE {where} AND json_valid(detail) "
        "UNION ALL SELECT j.value FROM \"{table}\", json_each(detail, '$.device_ids') AS j WHERE {where} "
        "AND json_valid(detail) AND json_type(detail, '$.device_ids') = 'array'", _DEVICE_NUMBER_KINDS, after_id)


def highest_recorded_request_id(after_id=None):
    """The highest contact request number the audit records name (0 if none): every request stored has its
    `support_request` record, written with it, which outlives the request (db._never_reuse_ids)."""
    return _highest_recorded(
        "SELECT json_extract(detail, '$.request') AS n FROM \"{table}\" WHERE {where} AND json_valid(detail)",
        ("support_request",), after_id)


# What db._never_reuse_ids finds recorded of the numbers a table without AUTOINCREMENT gave.
USED_IDS = {Device: highest_recorded_device_id, SupportRequest: highest_recorded_request_id}

ALL_MODELS = [User, Device, ServerSession, KnownBrowser, SignInChallenge, PendingEnrolment, SupportRequest,
              NetworkCounter, AuditEvent]

# Indexes that only PostgreSQL has, made at every start when missing: the Support search compares emails by
# code point (COLLATE "C": support._email_order), which the unique index in the database's own collation
# cannot serve.
POSTGRESQL_INDEXES = ['CREATE INDEX IF NOT EXISTS user_email_c ON "user" (email COLLATE "C")']

# Indexes of earlier versions that an index of the models now starts with or replaces, dropped at start
# when present (db._drop_obsolete), after the models' indexes are made: each was one more write for every
# audit record (or known browser).
# 2026-12-06: the audit log's single-column indexes on kind, user and actor.
OBSOLETE_INDEXES = ["auditevent_kind", "auditevent_user_id", "auditevent_actor_id",
                    # 2026-12-07: contact requests' index on the person alone.
                    "supportrequest_user_id",
                    # 2026-12-07: the known browsers' forgotten_at for every row, known ones too (now
                    # knownbrowser_forgotten_at_set, forgotten ones only).
                    "knownbrowser_forgotten_at"]

# Columns added to a table after databases with it were in use: (table, column, the column's SQL for both
# databases, what fills it in the rows already there, or None). Added at start when missing (db._add_columns),
# so an upgrade needs no hand-run SQL; before the indexes the models declare are made (db._add_columns).
ADDED_COLUMNS = [
    # 2026-11-28, before this list: known browsers counted their lifetime from their last sign-in (from when they
    # were made until then), and the code step counted wrong codes per set-up of the wizard.
    ("knownbrowser", "last_used_at", "TIMESTAMP", 'UPDATE "knownbrowser" SET last_used_at = created_at'),
    ("pendingenrolment", "failures", "INTEGER NOT NULL DEFAULT 0", None),
    # 2026-12-05. From the failures counted so far, which then set the back-off, but at most the strike that
    # locks ({lock}: THROTTLE_FREE_FAILURES + 1): an account locked during the upgrade stays locked, its next
    # wrong code is not one of the short pauses again, and the codes refused during a lock before the upgrade
    # (counted too, then) do not lengthen the next one.
    ("user", "code_strikes", "INTEGER NOT NULL DEFAULT 0",
     'UPDATE "user" SET code_strikes = CASE WHEN code_failures > {lock} THEN {lock} ELSE code_failures END '
     'WHERE code_failures > 0'),
    # 2026-12-06. Requests made before have none (a repeat of one of them is a request of its own).
    ("supportrequest", "form_hash", "VARCHAR(64)", None),
    # 2026-12-06. Empty: no account was disabled before the command existed. TIMESTAMP is what peewee makes
    # of a DateTimeField on PostgreSQL, and SQLite takes it too.
    ("user", "disabled_at", "TIMESTAMP", None),
    # 2026-12-07. Empty: browsers forgotten before were deleted, and requests sent before count against the
    # address's shared limit.
    ("knownbrowser", "forgotten_at", "TIMESTAMP", None),
    ("supportrequest", "known_browser", "VARCHAR(64)", None),
]


# Rows the purge deletes per transaction. All of them in one transaction held SQLite's writer lock for as long
# as the whole backlog took: 1.09 million expired sessions (three hours of sign-ins at 100 a second: an hourly
# cron job on a busier site, or the first purge after the app or the cron job was stopped for a while) held it
# for 17.5 s, and every sign-in meanwhile waited out the 10 s busy timeout ("Please try again"); 344,000 made
# each writer wait 3.2 s. That one transaction also grew the WAL to 506 MB, a size its file keeps. A batch
# takes tens of milliseconds, and the writers waiting for the lock get it between two batches.
PURGE_BATCH = 5000


def purge_expired(config, current, seconds=None):
    """Delete the sessions, sign-in challenges and pending enrolments that expired by `current` (they are
    already refused when used; this removes the rows, with their IP addresses and browser names), the
    known browsers past their lifetime, the per-network counters whose hour is over (the next event
    starts a new one anyway) and the contact requests handled longer ago than HANDLED_REQUEST_RETENTION. Known
    browsers go FORGOTTEN_BROWSER_TTL after they were forgotten too (counted with the others).
    Returns the six counts. Run by the app itself now and then
    (__init__._schedule_purge) and by the `purge-expired` command. PURGE_BATCH rows per write transaction,
    so other writers wait for one batch at most, not for the whole backlog. With `seconds`, no new batch
    starts once they have passed (each table still gets one): the app's own purge runs in a worker that
    serves nobody meanwhile, and gunicorn kills a worker silent for its timeout; the next purge goes on."""
    deadline = None if seconds is None else time.monotonic() + seconds
    return (
        _purge(ServerSession, (ServerSession.last_seen_at < current - config["SESSION_IDLE_TIMEOUT"])
               | (ServerSession.created_at < current - config["SESSION_ABSOLUTE_TIMEOUT"]), deadline),
        _purge(SignInChallenge, SignInChallenge.created_at < current - config["CHALLENGE_TTL"], deadline),
        _purge(PendingEnrolment, PendingEnrolment.created_at < current - config["PENDING_ENROLMENT_TTL"], deadline),
        _purge(KnownBrowser, KnownBrowser.last_used_at < current - config["KNOWN_BROWSER_TTL"], deadline)
        + _purge(KnownBrowser, KnownBrowser.forgotten_at < current - config["FORGOTTEN_BROWSER_TTL"], deadline),
        _purge(NetworkCounter, NetworkCounter.window_start <= current - NetworkCounter.WINDOW, deadline),
        _purge(SupportRequest, SupportRequest.handled_at < current - config["HANDLED_REQUEST_RETENTION"], deadline)
        if config["HANDLED_REQUEST_RETENTION"] else 0,
    )


def _purge(model, condition, deadline=None):
    """Delete the rows matching `condition` in transactions of at most PURGE_BATCH rows, until none is left or
    the monotonic `deadline` has passed; returns how many."""
    from .db import write_transaction

    total = 0
    while True:
        with write_transaction():
            deleted = _delete_unlocked(model, condition, PURGE_BATCH)
        total += deleted
        if deleted < PURGE_BATCH or (deadline is not None and time.monotonic() >= deadline):
            return total


def _delete_unlocked(model, condition, limit):
    """Delete up to `limit` rows matching `condition`, except, on PostgreSQL, those another transaction holds
    right now (SKIP LOCKED): the purge never waits for a person's transaction, so the two cannot deadlock
    (Support's disable deletes the same person's challenges and sessions in the other order). What it skips
    is refused when used anyway, and goes at the next purge. SQLite has one writer at a time: nothing to skip."""
    chosen = model.select(model.id).where(condition).limit(limit)
    if not is_sqlite():
        chosen = chosen.for_update(skip_locked=True)
    return model.delete().where(model.id.in_(chosen)).execute()
