"""Database: one peewee proxy, opened from DATABASE_URL, a connection per request (per thread on SQLite),
tables created on start."""
import os
from contextlib import contextmanager

from peewee import DatabaseProxy, PostgresqlDatabase, SqliteDatabase
from playhouse.db_url import parse

db = DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "busy_timeout": 10000,
    "foreign_keys": 1,
    "synchronous": "normal",
}


def open_database(url):
    """Build a peewee database for a sqlite:/// or postgresql:// URL."""
    if url.startswith("sqlite:"):
        path = url.split("sqlite:///", 1)[1] if "sqlite:///" in url else ":memory:"
        return SqliteDatabase(path, pragmas=SQLITE_PRAGMAS, timeout=10)
    if url.startswith(("postgres://", "postgresql://")):
        params = parse(url)
        name = params.pop("database")
        return PostgresqlDatabase(name, **params)
    raise ValueError("DATABASE_URL must start with sqlite:/// or postgresql://")


def is_sqlite():
    """Whether the configured database is SQLite (it has no SELECT ... FOR UPDATE)."""
    return isinstance(db.obj, SqliteDatabase)


@contextmanager
def write_transaction():
    """A transaction that serialises writers: BEGIN IMMEDIATE on SQLite; callers add FOR UPDATE on PostgreSQL."""
    if is_sqlite() and db.transaction_depth() == 0:
        with db.atomic("IMMEDIATE") as txn:
            yield txn
    else:
        with db.atomic() as txn:
            yield txn


def for_update(query):
    """Lock the selected rows until the transaction ends (a no-op on SQLite, where the whole DB is locked)."""
    return query if is_sqlite() else query.for_update()


def init_app(app):
    """Bind the proxy to the configured database, create the tables, and open/close per request."""
    from . import models

    database = open_database(app.config["DATABASE_URL"])
    db.initialize(database)
    with database.connection_context():
        database.create_tables(models.ALL_MODELS, safe=True)

    # SQLite: each thread keeps its connection between requests. Opening one per request and closing it
    # again (closing the last connection checkpoints the WAL) cost ~0.6 ms a request (bench/README
    # "Performance"). PostgreSQL connections are still opened and closed per request.
    keep_open = isinstance(database, SqliteDatabase)

    @app.before_request
    def _connect():
        db.connect(reuse_if_open=True)

    @app.teardown_appcontext
    def _close(exc):
        if db.is_closed() or (keep_open and not db.in_transaction()):
            return
        db.close()


_INHERITED = []  # connections a forked worker got from its parent: never used, never closed by the child


def _forget_inherited():
    """After fork: a SQLite connection must not cross into the child (sqlite.org/howtocorrupt.html)."""
    database = db.obj
    if isinstance(database, SqliteDatabase) and database._state.conn is not None:
        _INHERITED.append(database._state.conn)
        database._state.reset()


os.register_at_fork(after_in_child=_forget_inherited)
