"""Database: one peewee proxy, opened from DATABASE_URL, a connection kept per thread, tables created on
start, and Prepared queries for the paths every request takes."""
import fcntl
import functools
import hashlib
import logging
import os
import re
import select
import signal
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager

from peewee import (SQL, BigAutoField, CharField, ColumnBase, DatabaseError, DatabaseProxy, Field, ForeignKeyField,
                    IntegerField, InterfaceError, InternalError, ModelSelect, NodeList, OperationalError,
                    PostgresqlDatabase, ProgrammingError, SqliteDatabase, sort_models)
from playhouse.db_url import parse
from werkzeug.wsgi import ClosingIterator

from .config import ConfigError

db = DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "busy_timeout": 10000,
    "foreign_keys": 1,
    "synchronous": "normal",
    # A backstop only: requests checkpoint the WAL themselves after their response (_ConnectionUpkeep),
    # outside the writer lock. SQLite's own checkpoint (default: at 1000 pages) runs inside the committing
    # write transaction's lock here and waits on two fsyncs, which stalled every other writer.
    "wal_autocheckpoint": 5000,
    # The WAL file keeps the largest size it ever reached unless limited: one big transaction (a purge of a
    # backlog, `keys rotate` over many devices) left hundreds of megabytes for good. Cut back to 64 MiB when
    # SQLite starts the log over after a complete checkpoint (a soak test's busy hours stayed near 30 MiB).
    "journal_size_limit": 64 * 1024 * 1024,
}


def open_database(url):
    """Build a peewee database for a sqlite:/// or postgresql:// URL (ConfigError for anything else)."""
    if url.startswith("sqlite:"):
        # No database in memory either (sqlite://, sqlite:///:memory:): each process and thread would get an
        # empty one of its own, without tables, and lose it at every restart.
        if not url.startswith("sqlite:///") or url in ("sqlite:///", "sqlite:///:memory:"):
            # sqlite://app.db (two slashes) would otherwise be a database in memory, gone at every restart.
            raise ConfigError("DATABASE_URL for SQLite is sqlite:/// and a path: sqlite:///app.db (relative) "
                              "or sqlite:////var/lib/twostep/app.db (absolute)")
        return SqliteDatabase(url[len("sqlite:///"):], pragmas=SQLITE_PRAGMAS, timeout=10)
    if url.startswith(("postgres://", "postgresql://")):
        try:
            params = parse(url)
        except ValueError as exc:
            raise ConfigError(f"DATABASE_URL is not a valid postgresql:// address ({exc})") from None
        name = params.pop("database", None)
        if not name:
            raise ConfigError("DATABASE_URL names no database: postgresql://user:password@host:5432/DATABASE")
        return _Postgresql(name, **params)
    raise ConfigError("DATABASE_URL must start with sqlite:/// or postgresql://")


class _Postgresql(PostgresqlDatabase):
    """PostgreSQL, with a database that refuses writes (read_only_sql_transaction, 25006: a standby not yet
    promoted, or default_transaction_read_only set for maintenance) raised as the OperationalError of an
    outage, as SQLite's read-only file is. psycopg raises it as an InternalError, which no handler took: every
    sign-in and change answered 500, and the connection, opened read-only, was kept after the database took
    writes again (the 503 handler and a failed session save drop it).

    Each new connection waits at most LOCK_TIMEOUT for a row another transaction holds, as SQLite's writers
    wait at most busy_timeout, unless the role or the database sets a lock_timeout of its own. PostgreSQL's
    default is to wait for ever: one transaction left holding a person's row (a command suspended with
    Ctrl-Z, a console session left open) made each request for that person wait until gunicorn's timeout
    killed its worker, with no page, and then the next one."""

    LOCK_TIMEOUT = "10s"

    def _initialize_connection(self, conn):
        super()._initialize_connection(conn)
        with conn.cursor() as cursor:  # peewee's connections are in autocommit mode: SET holds for the session
            cursor.execute("SELECT current_setting('lock_timeout')")
            if cursor.fetchone()[0] == "0":
                cursor.execute("SELECT set_config('lock_timeout', %s, false)", (self.LOCK_TIMEOUT,))

    def execute_sql(self, sql, params=None):
        try:
            return super().execute_sql(sql, params)
        except InternalError as exc:
            if _sqlstate(exc) != "25006":
                raise
            raise _outage(exc.orig) from exc


def _outage(driver_error):
    """`driver_error` as the peewee OperationalError the app's handlers take for a database that cannot be used
    now (the 503 page, "Please try again" for a lock), as peewee itself wraps the driver's errors."""
    return OperationalError(driver_error, *driver_error.args)


def first_line(exc):
    """The first line of an error's message (a driver's can run to several), or its class name without one."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_health():
    """For GET /healthz: raise the OperationalError of an outage (the 503 page) unless the database answers a
    read of the accounts table (a DATABASE_URL naming an empty database, or one the role may not read,
    fails), on SQLite reads as a sound file (_check_sqlite_file), and, on PostgreSQL, takes writes (a standby
    not yet promoted, or a database set read-only for maintenance, answers reads only: every sign-in would
    fail there). Returns what to run once the answer has gone out (the SQLite file's whole check, when it is
    due), or None."""
    from .models import AuditEvent, User

    after = None
    try:
        User.select(User.id).limit(1).execute()
        if is_sqlite():
            after = _check_sqlite_file(skip_full=(AuditEvent._meta.table_name,))
        read_only = not is_sqlite() and db.execute_sql(
            "SELECT current_setting('transaction_read_only')").fetchone()[0] == "on"
    except (OperationalError, InterfaceError):
        raise
    except DatabaseError as exc:  # PostgreSQL: no such table, no right to read it (ProgrammingError)
        raise _outage(getattr(exc, "orig", None) or exc) from exc
    if read_only:
        from psycopg.errors import ReadOnlySqlTransaction

        raise _outage(ReadOnlySqlTransaction("the database takes no writes (transaction_read_only is on)"))
    return after


def is_damaged(exc):
    """Whether a database error is SQLite finding its file damaged ("database disk image is malformed",
    "file is not a database"): a disk fault, a copy taken while it was written, a truncated restore."""
    original = getattr(exc, "orig", None) or exc
    return isinstance(original, sqlite3.DatabaseError) and (
        getattr(original, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class _FileCheck:
    """What /healthz reads of an SQLite file to find it damaged where sign-ins would hit it (README "Health
    check"), at a cost a probe every few seconds can afford on a file of gigabytes. A whole PRAGMA
    quick_check reads every page: 0.6 to 1 s for a file of 700 MB on the project machine. So:

    - at every probe, the schema and both ends of every table and index: each read goes from the root
      page down to the first or last leaf, where the newest rows are added (under a millisecond in all);
    - once every SECONDS per process, PRAGMA quick_check of every table with its indexes, but the tables
      in `skip_full` (the audit log: the bulk of the file, append-only, so its ends are what a sign-in
      writes): 0.25 s with 600,000 accounts and 200,000 sessions. It runs after a probe's answer has gone
      out (the probe answers at once: a balancer gives up on a slow answer and takes a sound server out of
      use), and the damage it finds is what the next probe answers. That probe checks again before it
      answers: a file put right is healthy at once. Only a check that passed is trusted for SECONDS."""

    SECONDS = 60.0

    def __init__(self):
        self.passed = {}  # database path -> time.monotonic() of the last full check that found nothing
        self.damage = {}  # database path -> the outage the last full check found
        self.reads = {}  # (database path, schema version) -> _end_reads()

    def __call__(self, skip_full=()):
        """Read the ends; raise the damage the last full check found if it is still there; return the full
        check to run after the answer when one is due, else None."""
        path = db.obj.database
        version = db.execute_sql("PRAGMA schema_version").fetchone()[0]
        reads = self.reads.get((path, version))
        if reads is None:
            reads = self.reads[(path, version)] = _end_reads()  # reads the whole schema
        for what, sql in reads:
            _read(what, sql)
        if path in self.damage:
            self.full(skip_full)  # raises while the damage is there
        elif _monotonic() - self.passed.get(path, float("-inf")) >= self.SECONDS:
            return functools.partial(self._after_answer, skip_full)
        return None

    def full(self, skip_full):
        """quick_check every table but those in `skip_full`: the outage raised (and kept for the next probe) at
        the first damage found, else the time noted."""
        path = db.obj.database
        tables = [name for (name,) in db.execute_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name") if name not in skip_full]
        try:
            for table in tables:
                # What is wrong comes after a line naming the database ("*** in database main ***").
                what = f"PRAGMA quick_check of table {table}"
                found = [line for (row,) in _read(what, f'PRAGMA quick_check("{table}")')
                         for line in row.splitlines() if not line.startswith("***")]
                if found != ["ok"]:
                    raise _outage(sqlite3.DatabaseError(f"{what}: {found[0] if found else 'failed'}"))
        except OperationalError as exc:
            self.damage[path] = exc
            raise
        self.damage.pop(path, None)
        self.passed[path] = _monotonic()

    def _after_answer(self, skip_full):
        """The full check, once the probe's answer has gone out: what it finds waits for the next probe. On the
        connection of the request, or its own if the request closed it."""
        connect_here = db.is_closed()
        try:
            if connect_here:
                db.connect()
            self.full(skip_full)
        except (OperationalError, InterfaceError):
            pass  # kept in self.damage when it was damage; an outage shows at the next probe anyway
        finally:
            if connect_here and not db.is_closed():
                db.close()


def _read(what, sql):
    """The rows of `sql`; a damaged file (is_damaged) raised as the outage, saying what was being read. SQLite
    may find the damage while the rows are fetched, past peewee's wrapping of its errors."""
    try:
        return db.execute_sql(sql).fetchall()
    except (DatabaseError, sqlite3.DatabaseError) as exc:
        if not is_damaged(exc):
            raise
        raise _outage(sqlite3.DatabaseError(f"{what}: {first_line(exc)}")) from exc


_monotonic = time.monotonic  # the tests move it on


def _end_reads():
    """(what, statement) for the statements that read the first and the last entry of every table and index in
    the schema (a partial index with its own WHERE, so that SQLite may use it)."""
    reads = []
    for name, table, kind, sql in db.execute_sql(
            "SELECT name, tbl_name, type, sql FROM sqlite_master WHERE type IN ('table', 'index') ORDER BY name"
    ).fetchall():
        if kind == "index":
            columns = [column for (_, _, column, _, _, key) in db.execute_sql(f'PRAGMA index_xinfo("{name}")')
                       if key]
            if None in columns:
                continue  # an index on an expression (none today): no ORDER BY names its entries' order
            where = sql.split(" WHERE ", 1)[1] if sql and " WHERE " in sql else "1"
        for order, end in (("ASC", "first"), ("DESC", "last")):
            if kind == "table":
                reads.append((f"reading the {end} row of table {name}",
                              f'SELECT rowid FROM "{name}" ORDER BY rowid {order} LIMIT 1'))
            else:
                reads.append((f"reading the {end} entry of index {name}",
                              f'SELECT 1 FROM "{table}" INDEXED BY "{name}" WHERE {where} ORDER BY '
                              + ", ".join(f'"{column}" {order}' for column in columns) + " LIMIT 1"))
    return reads


_check_sqlite_file = _FileCheck()


def is_sqlite():
    """Whether the configured database is SQLite (it has no SELECT ... FOR UPDATE)."""
    return isinstance(db.obj, SqliteDatabase)


@contextmanager
def write_transaction():
    """A transaction that serialises writers: BEGIN IMMEDIATE on SQLite; callers add FOR UPDATE on PostgreSQL.

    Inside another transaction it joins that one rather than opening a savepoint (two statements and a
    generated name each time, and the sign-in nests three): nothing here catches an error to carry on
    after part of a transaction, and code that does uses db.atomic() for its savepoint explicitly.
    Actions given to after_commit() inside it run once it has committed."""
    if db.in_transaction():
        yield None
        return
    _after.actions = []
    try:
        if is_sqlite():
            with _writer_queue(), db.atomic("IMMEDIATE") as txn:
                yield txn
            _checkpoints.wrote()
        else:
            with db.atomic() as txn:
                yield txn
        _after.commits = getattr(_after, "commits", 0) + 1
        actions = _after.actions
    finally:
        _after.actions = None
    for action in actions:
        action()


_after = threading.local()


def commits():
    """How many write transactions this thread has committed: a command that fails tells a failure before its
    change from one after it (cli)."""
    return getattr(_after, "commits", 0)


def after_commit(action):
    """Call `action()` when the enclosing write_transaction has committed (never, if it rolls back), or at
    once outside one. For work that must follow a commit but need not hold the writer lock, such as the
    audit log lines (security.audit): on SQLite every write waits while the lock is held."""
    actions = getattr(_after, "actions", None)
    if actions is None:
        action()
    else:
        actions.append(action)


_QUEUE_FILES = {}


@contextmanager
def _writer_queue():
    """On SQLite, wait for other processes' write transactions in a kernel queue (flock on a file next to
    the database) before BEGIN IMMEDIATE. SQLite's own busy handler polls with sleeps of 1, 2, 5 ... 100 ms,
    so under parallel sign-ins a writer that just missed the lock could wait far longer than the lock is
    held (p99 over 400 ms in `make bench`); flock hands the lock over as soon as it is released."""
    path = db.obj.database
    if not path or path == ":memory:" or path.startswith("file:"):
        yield
        return
    key = (os.getpid(), path)  # per process: a descriptor inherited across fork would share the lock
    handle = _QUEUE_FILES.get(key)
    if handle is None:
        try:
            handle = _QUEUE_FILES[key] = open(path + "-writers", "a+b")  # noqa: SIM115 (kept open on purpose)
        except OSError as exc:
            # Another user's file (a command run as root: README "Operator commands"), a read-only volume: no
            # change can be stored, as with a read-only database file, so it is that outage (the 503 page), not
            # a 500 at every sign-in and logout. Tried again at the next write: no restart is needed.
            logging.getLogger("twostep").error("cannot open %s-writers: %s", path, exc.strerror or exc)
            raise _outage(sqlite3.OperationalError(f"unable to open the writers' queue file: {exc.strerror}")) from exc
    _take_queue(handle, SQLITE_PRAGMAS["busy_timeout"] / 1000)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)


class _QueueWaitOver(Exception):
    """Raised by the timer of _take_queue in the thread waiting for the writers' queue."""


def _take_queue(handle, seconds):
    """Take the writers' queue, waiting for it at most `seconds` (SQLite's busy_timeout), then fail as SQLite
    does for its own lock: "database is locked", which the person reads as "Please try again". Without a
    limit, one writer that held it (a worker stopped mid-transaction, a long `keys rotate`, a command
    suspended with Ctrl-Z) made every other write wait until gunicorn's timeout killed the worker, with
    its bare "Internal Server Error", and with every worker waiting no page was served at all.

    The wait is still the kernel's queue, cut off by a timer signal (SIGALRM), which only the main thread
    can receive: gunicorn's sync workers and the commands serve from it. Elsewhere (a server with a thread
    per request), or when SIGALRM is someone else's, it waits as long as it takes, as before."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    if (threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]
            or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None)):
        fcntl.flock(handle, fcntl.LOCK_EX)
        return
    waiting = [True]

    def over(signum, frame):
        if waiting[0]:
            raise _QueueWaitOver

    previous = signal.signal(signal.SIGALRM, over)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            waiting[0] = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _QueueWaitOver:
        fcntl.flock(handle, fcntl.LOCK_UN)  # the timer may have gone off just as the queue was taken
        raise _outage(sqlite3.OperationalError("database is locked")) from None
    finally:
        signal.signal(signal.SIGALRM, previous)


class _Checkpoints:
    """When this thread's SQLite connection should checkpoint the WAL: after COMMITS write transactions of
    its own, or when it wrote and SECONDS have passed since its last checkpoint (a quiet server need not
    checkpoint after every request: each one waits for two fsyncs). A sign-in adds about 20 pages to the
    WAL, so with four workers a checkpoint finds about 4 x 32 x 20 = 2,560 new pages, under the 5,000-page
    backstop (a passive checkpoint cannot start the log over while others read: under a soak test's
    sustained load the file levelled off near 7,700 pages, 30 MiB).
    A PASSIVE checkpoint copies committed pages into the database file without taking the writer lock, so
    other requests go on writing while this one waits for the disk."""

    COMMITS = 32
    SECONDS = 10.0

    def __init__(self):
        self.local = threading.local()

    def wrote(self):
        self.local.commits = getattr(self.local, "commits", 0) + 1

    def due(self):
        commits = getattr(self.local, "commits", 0)
        return commits >= self.COMMITS or (
            commits and time.monotonic() - getattr(self.local, "last", 0.0) >= self.SECONDS)

    def run(self):
        self.local.commits = 0
        self.local.last = time.monotonic()
        database = db.obj
        if isinstance(database, SqliteDatabase) and not database.is_closed() and not database.in_transaction():
            try:
                database.execute_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except (OperationalError, InterfaceError):
                pass  # another connection is checkpointing, or the file is busy: the next one will do


_checkpoints = _Checkpoints()


def lock_keys(*keys):
    """Inside a write_transaction, hold these names until it ends, so requests that count rows and then
    insert one (a rate limit) cannot both count before either inserts. SQLite's BEGIN IMMEDIATE already
    excludes every other writer; PostgreSQL takes a transaction-scoped advisory lock per name, in sorted
    order so that two requests never wait for each other's second name."""
    if is_sqlite():
        return
    for key in sorted(set(keys)):
        number = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big", signed=True)
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (number,))


def for_update(query):
    """Lock the selected rows until the transaction ends (a no-op on SQLite, where the whole DB is locked).

    On PostgreSQL FOR NO KEY UPDATE, not FOR UPDATE: holders still exclude each other, but not the FOR KEY
    SHARE lock that PostgreSQL takes on a row whenever a new row refers to it. Every audit record refers to
    its person and actor: with FOR UPDATE, a transaction that held another row of a person and then wrote
    their audit record waited for whoever held the person, and deadlocked when that one went for the same
    row (logout against Sign out everywhere else, Mark as handled against Support's disable, a support
    action against `users disable` of its admin: a race review). Nothing here changes an id."""
    return query if is_sqlite() else query.for_update("FOR NO KEY UPDATE")


@contextmanager
def planned_for_values():
    """Statements run inside are planned for their own values each time on PostgreSQL: psycopg prepares none of
    them on the server (a no-op on SQLite, which prepares nothing across statements).

    Why: psycopg prepares a statement at its sixth run on a connection (prepare_threshold, 5), and after five
    runs of a prepared statement PostgreSQL may keep one generic plan for all values. For a read whose best
    index depends on its values that plan is the wrong one: the audit log's deep page of an intruder's address
    with an event, planned for an address as rare as most, read and sorted all 25,000 of the address's records
    before the page and 50,000 after it (65-160 ms a page, against 6-10 planned for its values: docs/performance.md).
    The same held for the Support page's open requests and its people's latest support windows, and for the
    contact form's counts by address ("Generic plans on skewed data" there). Only for such reads: every other
    statement is still prepared, as the hot paths want (db.Prepared), and a plan made each time costs 0.05-0.2
    ms, more for a long statement (the contact requests' hints: 1.5-3 ms)."""
    if is_sqlite():
        yield
        return
    connection = db.connection()
    kept = connection.prepare_threshold
    connection.prepare_threshold = None  # psycopg: None turns preparing off on the connection, until put back
    try:
        yield
    finally:
        connection.prepare_threshold = kept


class Param(ColumnBase):
    """A named placeholder in a Prepared query. Values are passed as the driver takes them: ids for
    foreign keys, datetimes as they are (peewee itself converts nothing else for our column types)."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def __sql__(self, ctx):
        ctx._values.append(self)  # marks this value's position in the parameter list
        return ctx.literal(ctx.state.param or "?")


class Prepared:
    """A peewee query whose SQL is generated once per kind of database and then run with new values.

    Why: generating SQL costs peewee ~0.3 ms a query, over ten times what SQLite takes to run it, and the
    requests people wait on (sign-in, the code step, User Settings) run the same handful of queries every
    time (bench/profile.py; docs/performance.md). `build` returns the query with Param placeholders; it is
    called again for each database class (SQLite and PostgreSQL differ in placeholders and FOR UPDATE).
    Rows become model instances directly (_row_plan), or through peewee's own cursor wrapper for shapes
    that plan does not cover; column conversions apply either way.
    """

    def __init__(self, build):
        self.build = build
        self._compiled = {}

    def _get(self):
        database = db.obj
        compiled = self._compiled.get(type(database))
        if compiled is None:
            query = self.build()
            sql, values = database.get_sql_context().sql(query).query()
            compiled = self._compiled[type(database)] = (query, sql, values, _row_plan(query))
        return compiled

    def _run(self, params):
        query, sql, values, plan = self._get()
        args = [params[value.name] if isinstance(value, Param) else value for value in values]
        return query, plan, db.execute_sql(sql, args)

    def rows(self, **params):
        """The selected rows as model instances, with joined rows attached to their foreign key."""
        query, plan, cursor = self._run(params)
        if plan is None:
            return list(query._get_cursor_wrapper(cursor))
        return [_build(plan, row) for row in cursor.fetchall()]

    def first(self, **params):
        """The first selected row, or None."""
        rows = self.rows(**params)
        return rows[0] if rows else None

    def values(self, **params):
        """The selected rows as plain tuples of what the database returned (aggregates), unconverted."""
        return self._run(params)[2].fetchall()

    def execute(self, **params):
        """Run an INSERT, UPDATE or DELETE; returns the number of rows it changed."""
        return self._run(params)[2].rowcount


def _row_plan(query):
    """How to turn a row into model instances without peewee's generic cursor wrapper (a third of a short
    query's cost), for the plain shape our prepared SELECTs have: whole rows of a model, optionally followed
    by whole rows of models it points to. None for anything else (peewee's wrapper is used then)."""
    if not isinstance(query, ModelSelect):
        return None
    groups = []  # [model, [(field name, converter)], foreign key on the first model or None]
    for column in query._returning:
        if not isinstance(column, Field):
            return None
        if not groups or groups[-1][0] is not column.model:
            if groups:
                link = [f for f in groups[0][0]._meta.sorted_fields
                        if isinstance(f, ForeignKeyField) and f.rel_model is column.model]
                if len(link) != 1:
                    return None
                groups.append([column.model, [], link[0].name])
            else:
                groups.append([column.model, [], None])
        groups[-1][1].append((column.name, _native_type(column), column.python_value))
    return groups


def _native_type(field):
    """The Python type a value of `field` already has when it needs no conversion (peewee's would give it back
    as it is), or None. A row of integers and strings is most of what the hot paths read, and peewee converts
    each value through two calls (python_value, adapt): a value of the type named is kept as the driver
    returned it. Only for peewee's own integer and text conversions: a field class that converts in its own
    way is always asked."""
    kind = type(field.rel_field if isinstance(field, ForeignKeyField) else field)
    if kind.python_value is not Field.python_value:
        return None
    if kind.adapt is IntegerField.adapt:
        return int
    if kind.adapt is CharField.adapt:  # TextField's too
        return str
    return None


def _build(plan, row):
    """Model instances for one row, following a _row_plan; the first is returned, the others attached."""
    position, main = 0, None
    for model, fields, link in plan:
        data = {}
        for name, native, convert in fields:
            value = row[position]
            data[name] = value if value is None or type(value) is native else convert(value)
            position += 1
        if main is not None and all(value is None for value in data.values()):
            continue  # an outer join that found nothing: the foreign key reads None
        instance = loaded(model, data)
        if main is None:
            main = instance
        else:
            main.__rel__[link] = instance
    return main


def loaded(model, data):
    """An instance of `model` holding `data` (field name -> value, foreign keys as ids) as a row read from the
    database would, without Model.__init__'s work for each field (defaults, conversions)."""
    instance = model.__new__(model)
    instance.__data__, instance._dirty, instance.__rel__ = data, set(), {}
    return instance


class NeverReusedAutoField(BigAutoField):
    """A 64-bit id that no later row gets again, for a table whose numbers the audit records name (a device's:
    an incident review tells devices apart by them). SQLite gives an INTEGER PRIMARY KEY without AUTOINCREMENT
    the highest id in the table plus one: once the newest row is deleted its number goes to the next row, and
    an intruder's device could be named and numbered like the owner's device it replaced. AUTOINCREMENT keeps
    the highest id ever given in sqlite_sequence. PostgreSQL's sequence never goes back: `bigserial`, as for
    any BigAutoField. A table made without it is rebuilt at start (_never_reuse_ids)."""

    def ddl(self, ctx):
        node = super().ddl(ctx)
        if self.ddl_datatype(ctx).sql == "INTEGER":  # SQLite's rowid: the only column AUTOINCREMENT is for
            node = NodeList((node, SQL("AUTOINCREMENT")))
        return node


def _create_tables(database, models, postgresql_indexes=(), added_columns=(), fill_values=None, upgrade=None,
                   obsolete_indexes=(), used_ids=None):
    """At every start: add the columns an existing table is missing (with what fills them), create the tables
    and indexes that are missing (on PostgreSQL also the extra indexes, and 64-bit ids where a table has
    32-bit ones: _widen_ids; on SQLite AUTOINCREMENT where a NeverReusedAutoField lacks it: _never_reuse_ids,
    with `used_ids`), drop the `obsolete_indexes` still there, and run `upgrade()`, which brings rows an earlier
    version wrote up to date and returns lines to print. Once the columns are added, and before any index is
    made, every table already there is checked for every column this version reads (_check_columns); a table
    made here has them all."""
    with database.connection_context():
        if isinstance(database, PostgresqlDatabase):
            _take_schema_lock(database)
            try:
                existing = database.table_exists(models[0]._meta.table_name)
                with database.atomic():  # the column and its fill together (DDL is transactional here)
                    added = _add_columns(database, added_columns, fill_values)
                _check_columns(database, models)
                _create_missing(database, models)  # after the columns: their indexes need them
                _drop_obsolete(database, obsolete_indexes)  # before _widen_ids, which would rewrite them too
                _widen_ids(database, models)
                rebuilt = []  # sequences never hand out a number twice
                with database.atomic():
                    done = upgrade() if upgrade else []
                for statement in postgresql_indexes:
                    name = re.search(r"INDEX IF NOT EXISTS (\w+)", statement).group(1)
                    if existing:  # a table in use: built without holding up its writers
                        _build_index(database, name, statement)
                    elif _missing(database, name):  # a new, empty table: at once
                        database.execute_sql(statement)
            finally:
                database.execute_sql("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
        else:
            with database.atomic("IMMEDIATE"):  # writing first: processes that add a column take turns
                added = _add_columns(database, added_columns, fill_values)
            _check_columns(database, models)
            rebuilt = _never_reuse_ids(database, models, used_ids or {})
            _say_building(database, models)
            database.create_tables(models, safe=True)  # SQLite's own lock serialises creators
            with database.atomic("IMMEDIATE"):
                _drop_obsolete(database, obsolete_indexes)
                done = upgrade() if upgrade else []
    for line in [f"added {column}" for column in added] + rebuilt + done:  # once committed
        print(f" * twostep: upgraded the database: {line} (README \"Upgrades\")", file=sys.stderr, flush=True)


def _create_missing(database, models):
    """On PostgreSQL, create the tables and the models' indexes that do not exist yet, and nothing else. peewee's
    create_tables(safe=True) runs CREATE INDEX IF NOT EXISTS for every index at every start, and PostgreSQL
    takes the table's SHARE lock for it before it finds the index there: the start waited for any write
    transaction open on the table, and every writer that came after (the sign-ins of the hosts still serving
    during a rolling restart) queued behind it until that transaction ended. A new table gets its indexes
    with it; an index missing from a table already there is built without blocking its writers (_build_index).
    Run holding the schema lock, so what it finds missing stays missing until it has made it."""
    for model in sort_models(models):
        if _missing(database, model._meta.table_name):
            model.create_table(safe=True)  # the table with its indexes
            continue
        for index in model._meta.fields_to_index():
            sql, params = model._schema._create_index(index, safe=False).query()
            _build_index(database, index._name, sql, params)


def _build_index(database, name, statement, params=None):
    """On PostgreSQL, build the index `name` of a table in use (its CREATE INDEX `statement`) when it is missing,
    or when a build that was interrupted left it INVALID, saying so first.

    CREATE INDEX took the table's SHARE lock for the whole build: every write to the table waited meanwhile, the
    sign-ins of the hosts still serving during a rolling restart too (with ten million audit records, one failed
    at the 10 s lock_timeout and the next waited 7 s more: bench/index_build.py). CREATE INDEX CONCURRENTLY
    takes a lock that writers pass (SHARE UPDATE EXCLUSIVE), reads the table twice, and waits for the
    transactions under way at each step, each wait at most the connection's lock_timeout. It cannot run inside a
    transaction, and when it fails or its session ends (an error, a lock timeout, a host killed) it leaves the
    index there but INVALID: never used by a query, still written by every insert. The next start drops it (DROP
    INDEX CONCURRENTLY) and builds it again."""
    valid = _index_valid(database, name)
    if valid:
        return  # IF NOT EXISTS alone would still lock the table (_create_missing)
    if valid is None:
        _say_building_index(name)
    else:
        print(f" * twostep: upgrading the database: rebuilding index {name}, which an interrupted start left "
              f"unfinished (README \"Upgrades\")", file=sys.stderr, flush=True)
        database.execute_sql(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
    statement = re.sub(r"^CREATE (UNIQUE )?INDEX (IF NOT EXISTS )?", r"CREATE \1INDEX CONCURRENTLY ", statement)
    database.execute_sql(statement, params or None)


def _index_valid(database, name):
    """On PostgreSQL, whether the index `name` can be used: None when there is none, False when it is INVALID
    (an interrupted CREATE or DROP INDEX CONCURRENTLY)."""
    row = database.execute_sql("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                               (f'"{name}"',)).fetchone()
    return None if row is None else row[0]


def _take_schema_lock(database):
    """On PostgreSQL, take the schema lock (_SCHEMA_LOCK, a session-level advisory lock), waiting as long as
    another host's start holds it. Hosts started at the same moment on an empty database: PostgreSQL's CREATE
    ... IF NOT EXISTS is not safe against another session creating the same table (or its row type)
    concurrently, so the creators take turns.

    Asked again every _SCHEMA_LOCK_POLL seconds rather than waited for in one statement: a statement that waits
    holds a snapshot, and CREATE INDEX CONCURRENTLY in the start holding the lock waits for every transaction
    with an older snapshot to end. Each waited for the other, and PostgreSQL ended the waiting start ("deadlock
    detected"). Nor does a wait end at the connection's lock_timeout (LOCK_TIMEOUT): another host's start may be
    building an index on a big table, and 10 s later this start failed ("cannot be used")."""
    while not database.execute_sql("SELECT pg_try_advisory_lock(%s)", (_SCHEMA_LOCK,)).fetchone()[0]:
        time.sleep(_SCHEMA_LOCK_POLL)


def _say_building(database, models):
    """On SQLite, say which indexes of tables already there the start is about to build (create_tables): on a
    big table (the audit log) each takes a while, and every writer waits meanwhile."""
    tables = set(database.get_tables())
    have = {name for (name,) in database.execute_sql("SELECT name FROM sqlite_master WHERE type = 'index'")}
    for model in models:
        if model._meta.table_name in tables:
            for index in model._meta.fields_to_index():
                if index._name not in have:
                    _say_building_index(index._name)


def _say_building_index(name):
    print(f" * twostep: upgrading the database: building index {name} (README \"Upgrades\")",
          file=sys.stderr, flush=True)


def _drop_obsolete(database, names):
    """Drop those of the indexes `names` (models.OBSOLETE_INDEXES) that are still there, saying so once. On
    PostgreSQL with DROP INDEX CONCURRENTLY: DROP INDEX waits for every transaction using the table, and every
    request that comes after, readers too, queues behind it meanwhile (at most the lock_timeout); this one
    lets them pass. Interrupted, it leaves the index INVALID, still there: the next start drops it."""
    concurrently = "CONCURRENTLY " if isinstance(database, PostgresqlDatabase) else ""
    for name in names:
        if not _missing(database, name):
            print(f" * twostep: upgrading the database: dropping index {name}, which another one now serves "
                  f"(README \"Upgrades\")", file=sys.stderr, flush=True)
            database.execute_sql(f'DROP INDEX {concurrently}IF EXISTS "{name}"')


def _missing(database, name):
    """Whether no table or index of that name exists (on PostgreSQL quoted: "user" is a keyword)."""
    if isinstance(database, PostgresqlDatabase):
        return database.execute_sql("SELECT to_regclass(%s) IS NULL", (f'"{name}"',)).fetchone()[0]
    return database.execute_sql("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is None


def _check_columns(database, models):
    """Stop the start (ConfigError) when a table already there lacks a column this version reads: a database
    made by a version whose change no upgrade step covers. It started, and every request that read the column
    answered 503 "cannot reach our database" (an operator's upgrade from a checkout of 2026-11-28). Run before
    the indexes are made, which on such a column failed on PostgreSQL with a bare "column does not exist" and
    on SQLite were made on the column's name as a constant text; the tables made after it have every column."""
    with database.connection_context():
        existing = set(database.get_tables())
        missing = [f"{model._meta.table_name}.{field.column_name}" for model in models
                   if model._meta.table_name in existing
                   for have in [{c.name for c in database.get_columns(model._meta.table_name)}]
                   for field in model._meta.sorted_fields if field.column_name not in have]
    if missing:
        raise ConfigError(f"the database lacks {', '.join(missing)}: it was made by a version this one cannot "
                          "upgrade (README \"Upgrades\")")


def _add_columns(database, added_columns, fill_values=None):
    """ALTER TABLE ... ADD COLUMN for each (table, column, SQL, fill) that an existing table does not have yet
    (models.ADDED_COLUMNS), then the statement that fills it in the rows already there: a
    table made by an earlier version gets what this one reads. Run before create_tables makes the indexes
    the models declare: on a column still missing, PostgreSQL refuses the index and SQLite makes it on the
    column's name as a constant text."""
    added, tables = [], set(database.get_tables())
    for table, column, definition, fill in added_columns:
        if table in tables and column not in {c.name for c in database.get_columns(table)}:
            # An index on it made while it was missing is on the name as a text (SQLite; earlier versions made
            # the indexes first): with the column there, SQLite calls the whole file malformed. Made again.
            database.execute_sql(f'DROP INDEX IF EXISTS "{table}_{column}"')
            database.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {definition}')
            if fill:
                database.execute_sql(fill.format(**(fill_values or {})))  # only integers from the configuration
            added.append(f"{table}.{column}")
    return added


def _widen_ids(database, models):
    """On PostgreSQL, make 64-bit the ids that the models declare so (BigAutoField: `bigserial`), their
    sequences and the foreign keys that point at them, where a table made before 2026-12-07 has them 32-bit
    (`serial`: an integer column, a sequence AS integer that stops at 2**31 - 1; the comment after
    models.BaseModel says why).
    Run at every start holding the schema lock (_create_tables), so hosts starting together take turns and
    the next finds nothing left to do. Each table in a transaction of its own, announced before it starts:
    ALTER COLUMN ... TYPE rewrites the table and its indexes under an exclusive lock, and on a big table (the
    audit log) the start, and every request that uses the table, waits for it."""
    wide = {model for model in models if isinstance(model._meta.primary_key, BigAutoField)}
    for model in models:
        table = model._meta.table_name
        fields = [field for field in model._meta.sorted_fields
                  if (field is model._meta.primary_key and model in wide)
                  or (isinstance(field, ForeignKeyField) and field.rel_model in wide
                      and field.rel_field is field.rel_model._meta.primary_key)]
        if not fields:
            continue
        types = dict(database.execute_sql(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped", (f'"{table}"',)).fetchall())
        narrow = [field.column_name for field in fields if types.get(field.column_name) == "integer"]
        sequence = None
        if model in wide:
            sequence = database.execute_sql(
                "SELECT seqrelid::regclass::text FROM pg_sequence WHERE seqrelid = pg_get_serial_sequence(%s, %s)"
                "::regclass AND seqtypid = 'integer'::regtype",
                (f'"{table}"', model._meta.primary_key.column_name)).fetchone()
        if not narrow and sequence is None:
            continue
        if narrow:
            size = database.execute_sql("SELECT pg_size_pretty(pg_total_relation_size(%s::regclass))",
                                        (f'"{table}"',)).fetchone()[0]
            what = (f"{', '.join(f'{table}.{column}' for column in narrow)} to 64 bits, which rewrites {table} "
                    f"({size}) under an exclusive lock: the start and the requests that use it wait meanwhile")
        else:
            what = f"sequence {sequence[0]} to 64 bits"
        print(f" * twostep: upgrading the database: {what} (README \"Upgrades\")", file=sys.stderr, flush=True)
        with database.atomic():
            if narrow:
                database.execute_sql(f'ALTER TABLE "{table}" '
                                     + ", ".join(f'ALTER COLUMN "{column}" TYPE bigint' for column in narrow))
            if sequence is not None:
                # Its maximum was integer's own, so it becomes bigint's (ALTER SEQUENCE).
                database.execute_sql(f"ALTER SEQUENCE {sequence[0]} AS bigint")


def _never_reuse_ids(database, models, used_ids):
    """On SQLite, rebuild with AUTOINCREMENT each table whose id is a NeverReusedAutoField but that an earlier
    version made without it (the device table before 2026-12-07), so that no id is given twice from now on.
    Its next id is above both the highest in the table and the highest `used_ids[model]()` finds recorded
    (the audit log's device numbers; (highest, last record read), and with that record only those after it):
    an id given before the upgrade and deleted since is not given again either. Returns the lines to print
    once committed.

    SQLite's own procedure for a change ALTER TABLE cannot make (sqlite.org/lang_altertable.html), in one
    transaction: a new table, the rows copied with their ids, the old one dropped, the new one renamed to its
    name, its indexes made. With foreign keys off: dropping the old table would otherwise delete or refuse the
    rows of a table that points at it (none does today). Those keep pointing at the same ids under the same
    name, which the check before the commit confirms. Under BEGIN IMMEDIATE: processes started together take
    turns, and the next finds nothing left to do."""
    def lacking():
        found = []
        for model in models:
            if isinstance(model._meta.primary_key, NeverReusedAutoField):
                sql = _table_sql(database, model._meta.table_name)
                if sql is not None and "AUTOINCREMENT" not in sql.upper():  # a missing one is made with it
                    found.append(model)
        return found

    if not lacking():  # every start but one: a read of the schema
        return []
    # The records read before the writer lock (a WAL reader holds up no writer), and under it only those
    # written since: read under it, a few million held every other writer for seconds, past busy_timeout.
    recorded = {model: used_ids[model]() for model in lacking() if model in used_ids}
    lines = []
    keys_on = database.execute_sql("PRAGMA foreign_keys").fetchone()[0]
    database.execute_sql("PRAGMA foreign_keys = OFF")  # no effect inside a transaction: set before it
    try:
        with database.atomic("IMMEDIATE"):
            for model in lacking():  # again under the lock: another process may have rebuilt it meanwhile
                table, new = model._meta.table_name, f"{model._meta.table_name}_rebuilt"
                print(f" * twostep: upgrading the database: rebuilding table {table} so that no number is given "
                      f"twice (README \"Upgrades\")", file=sys.stderr, flush=True)
                before = _broken_references(database, table)
                columns = ", ".join(f'"{field.column_name}"' for field in model._meta.sorted_fields)
                create, _ = model._schema._create_table(safe=False).query()  # as the models declare it
                database.execute_sql(create.replace(f'CREATE TABLE "{table}"', f'CREATE TABLE "{new}"', 1))
                database.execute_sql(f'INSERT INTO "{new}" ({columns}) SELECT {columns} FROM "{table}"')
                database.execute_sql(f'DROP TABLE "{table}"')
                database.execute_sql(f'ALTER TABLE "{new}" RENAME TO "{table}"')
                for index in model._meta.fields_to_index():
                    database.execute(model._schema._create_index(index, safe=False))
                if _broken_references(database, table) - before:  # rolled back: the start stops, nothing changed
                    raise ConfigError(f"rebuilding table {table} would leave rows pointing at none of its rows "
                                      "(README \"Upgrades\")")
                key = model._meta.primary_key.column_name
                highest = database.execute_sql(f'SELECT COALESCE(MAX("{key}"), 0) FROM "{table}"').fetchone()[0]
                if model in used_ids:
                    found, last = recorded.get(model) or used_ids[model]()
                    highest = max(highest, found, used_ids[model](last)[0])  # and in those written since
                database.execute_sql("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
                database.execute_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, highest))
                lines.append(f"{table} numbers are never given twice; the next is {highest + 1}")
    finally:
        database.execute_sql(f"PRAGMA foreign_keys = {int(keys_on)}")
    return lines


def _broken_references(database, table):
    """The rows of tables pointing at `table` whose foreign key finds no row there (PRAGMA foreign_key_check)."""
    children = [name for (name,) in database.execute_sql(
        "SELECT m.name FROM sqlite_master m, pragma_foreign_key_list(m.name) f "
        "WHERE m.type = 'table' AND f.\"table\" = ?", (table,))]
    return {tuple(row) for child in children
            for row in database.execute_sql(f'PRAGMA foreign_key_check("{child}")').fetchall() if row[2] == table}


def _table_sql(database, table):
    """The CREATE TABLE statement SQLite keeps for `table`, or None when there is no such table."""
    row = database.execute_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return row[0] if row else None


def _create_private(path):
    """A new SQLite file readable by its owner alone (it holds password hashes and the encrypted TOTP
    secrets); SQLite gives its -wal and -shm files the same permissions. An existing file stays as it is."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except (FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError):
        pass  # there already, or its folder is not: opening it says what is wrong (ConfigError below)


_SCHEMA_LOCK = int.from_bytes(hashlib.sha256(b"twostep: create tables").digest()[:8], "big", signed=True)
_SCHEMA_LOCK_POLL = 0.2  # seconds between a waiting start's tries (_take_schema_lock)


def init_app(app):
    """Bind the proxy to the configured database, create the tables, and manage the kept connections."""
    from . import models

    database = open_database(app.config["DATABASE_URL"])
    if db.obj is not None and not db.obj.is_closed():
        db.obj.close()  # a process that builds several apps (tests, the benchmark) keeps no stale connection
    for key in [k for k in _QUEUE_FILES if k[0] == os.getpid() and k[1] != getattr(database, "database", None)]:
        _QUEUE_FILES.pop(key).close()  # nor the writer queue files of the databases it used before
    db.initialize(database)
    if isinstance(database, SqliteDatabase):
        _create_private(database.database)
    try:
        _create_tables(database, models.ALL_MODELS, models.POSTGRESQL_INDEXES, models.ADDED_COLUMNS,
                       {"lock": int(app.config["THROTTLE_FREE_FAILURES"]) + 1}, models.respell_stored_emails,
                       models.OBSOLETE_INDEXES, models.USED_IDS)
    except (OperationalError, InterfaceError, ProgrammingError) as exc:  # unreachable, no such file, no rights
        reason = first_line(exc)
        if _sqlstate(exc) == "42501":  # insufficient privilege: since PostgreSQL 15 only the database's owner
            # may create tables in `public` (checked by code, not by message: servers speak other languages)
            reason += (" (the role in DATABASE_URL must be allowed to create tables: make it the database's "
                       "owner, e.g. CREATE DATABASE twostep OWNER twostep; README \"Deployment\")")
        raise ConfigError(f"the database in DATABASE_URL cannot be used: {reason}") from exc

    # Connections are kept between requests: opening one per request cost ~0.6 ms on SQLite (closing the
    # last connection checkpoints the WAL) and ~10 ms on PostgreSQL (a new server backend), more than most
    # requests take (docs/performance.md). SQLite keeps one per thread; PostgreSQL in the main thread.
    app.wsgi_app = _ConnectionUpkeep(app.wsgi_app)

    @app.before_request
    def _connect():
        db.connect(reuse_if_open=True)

    @app.teardown_appcontext
    def _close(exc):
        if db.is_closed():
            return
        if db.in_transaction():
            db.close()  # a request that failed inside a transaction: drop the connection with it
        elif not isinstance(db.obj, SqliteDatabase) and threading.current_thread() is not threading.main_thread():
            # Kept only where the thread lives on between requests (gunicorn's sync workers serve from the
            # main thread): servers with a thread per request would leave one server backend per thread.
            db.close()


class _ConnectionUpkeep:
    """WSGI wrapper for the kept connections.

    Before a request, a kept PostgreSQL connection is checked with a trivial query and dropped if the server
    went away meanwhile (a restart, a backend ended by an administrator), so the request opens a new one
    instead of failing with a 503. The query runs when the connection sat idle for a while, or at once when
    its socket has something to read: an idle connection is sent nothing unless the server is hanging up
    (its "terminating connection" notice, or the end of the stream), and a zero-timeout poll costs a
    system call, not a round trip. A request that meets a broken connection anyway (the server went away
    during it) gets the 503 page, which closes it (__init__._register_error_handlers).

    After a request that wrote to SQLite, once the response has gone out (the server closes the body),
    the WAL is checkpointed when it is due (_Checkpoints)."""

    IDLE_SECONDS = 5.0

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app
        self.local = threading.local()

    def __call__(self, environ, start_response):
        database = db.obj
        if not isinstance(database, SqliteDatabase) and not database.is_closed() and (
                time.monotonic() - getattr(self.local, "last", 0.0) > self.IDLE_SECONDS
                or _has_input(database._state.conn)):
            try:
                database.execute_sql("SELECT 1")
            except (OperationalError, InterfaceError):
                try:
                    database.close()
                except (OperationalError, InterfaceError):
                    database._state.reset()
        try:
            body = self.wsgi_app(environ, start_response)
        finally:
            self.local.last = time.monotonic()
        if _checkpoints.due():
            return ClosingIterator(body, _checkpoints.run)
        return body


def _has_input(connection):
    """Whether an idle connection's socket has something to read (or is closed): zero-timeout poll (poll(),
    not select(), which cannot take descriptors above 1023)."""
    try:
        poller = select.poll()
        poller.register(connection.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except Exception:  # closed meanwhile, no socket to poll: the query decides (it handles what it raises)
        return True


def _sqlstate(exc):
    """The SQLSTATE of a database error (peewee keeps psycopg's exception as `orig`), or None."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None)


_INHERITED = []  # connections a forked worker got from its parent: never used, never closed by the child


def _forget_inherited():
    """After fork: a connection must not cross into the child (sqlite.org/howtocorrupt.html; a PostgreSQL
    socket shared by two processes mixes their conversations)."""
    database = db.obj
    if database is not None and database._state.conn is not None:
        _INHERITED.append(database._state.conn)
        database._state.reset()


os.register_at_fork(after_in_child=_forget_inherited)
