"""Shared fixtures: a fresh app per test (temporary SQLite file, or TEST_DATABASE_URL for PostgreSQL),
an injected clock, cheap password hashing, and helpers that act like a person in a browser."""
import functools
import importlib
import os
import re
import sqlite3
import tempfile
from types import SimpleNamespace

import pyotp
import pytest
from cryptography.fernet import Fernet
from peewee import OperationalError

from webapp import config as config_module
from webapp import create_app
from webapp.db import db
from webapp.models import ALL_MODELS, Device, User, normalise_email
from webapp.security import hash_password
from webapp.totp import encrypt_secret, new_secret

# RFC 6238 test secret, ASCII "12345678901234567890" (security.md section I).
RFC_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
RFC_T = 1234567890  # exactly the start of step 41152263
PASSWORD = "correct horse battery"

_CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


class FakeClock:
    """A clock the tests move by hand; the app reads it through app.config["CLOCK"]."""

    def __init__(self, t=RFC_T):
        self.t = float(t)

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


class _EnvironmentWatch(dict):
    """An empty environment that notes every name looked up in it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def get(self, name, default=None):
        self.names.add(name)
        return default

    def __getitem__(self, name):
        self.names.add(name)
        raise KeyError(name)

    def __contains__(self, name):
        self.names.add(name)
        return False


class _OsWith:
    """The os module, but for its environment."""

    def __init__(self, environ):
        self.environ = environ

    def __getattr__(self, name):
        return getattr(os, name)


# Read by create_app and Flask rather than config.load: where the instance folder is when no INSTANCE_PATH is
# given, and debugging (Flask's DEBUG, which a production start refuses).
_READ_OUTSIDE_CONFIG_LOAD = frozenset({"TWOSTEP_INSTANCE", "FLASK_DEBUG"})
# What the suite itself is configured by: never cleared.
_SUITE_SETTINGS = frozenset({"TEST_DATABASE_URL"})


@functools.cache
def config_environment_names():
    """Every environment variable that configures the app: the names config.load looks up, found by running
    it on an environment that notes each lookup (so a setting added there is cleared with no list to keep
    up), plus the ones read outside it."""
    watch = _EnvironmentWatch()
    with tempfile.TemporaryDirectory() as instance, pytest.MonkeyPatch.context() as patch:
        patch.setattr(config_module, "os", _OsWith(watch))
        config_module.load(SimpleNamespace(config={}, instance_path=instance), {
            "SECRET_KEY": "k" * 48, "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "DATABASE_URL": "sqlite://"})
    return frozenset((watch.names | _READ_OUTSIDE_CONFIG_LOAD) - _SUITE_SETTINGS)


def clear_configuration_environment(monkeypatch):
    """Remove every variable of config_environment_names() for the rest of the test."""
    for name in config_environment_names():
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_configuration_from_the_shell(monkeypatch):
    """Each test's apps start from the documented defaults, whatever the shell running the suite exports
    (SIGNUP_ENABLED=false, PROXY_HOPS=2, TOTP_ISSUER=..., a developer's DATABASE_URL): a test that wants a
    variable sets it with monkeypatch. TEST_DATABASE_URL, which picks the suite's database, stays; the app
    fixture passes it to the app as DATABASE_URL in the test config, not through the environment."""
    clear_configuration_environment(monkeypatch)


@pytest.fixture
def clock():
    return FakeClock()


def database_error(message="disk I/O error"):
    """What peewee raises when the database fails (the driver's error inside), as the app's handlers see it."""
    driver_error = sqlite3.OperationalError(message)
    return OperationalError(driver_error, *driver_error.args)


def failing_audit(monkeypatch, module, *kinds):
    """`module`'s audit() fails with a database error for records of `kinds` (of every kind when none is
    given): the database going away between a change and its record."""
    target = importlib.import_module(module)
    real = target.audit

    def audit(kind, *args, **kwargs):
        if not kinds or kind in kinds:
            raise database_error()
        return real(kind, *args, **kwargs)

    monkeypatch.setattr(target, "audit", audit)


def record_statements(monkeypatch):
    """The SQL of every statement the app's database runs from now on in this test, as a list that grows."""
    statements, execute_sql = [], db.obj.execute_sql

    def noted(sql, params=None):
        statements.append(sql)
        return execute_sql(sql, params)

    monkeypatch.setattr(db.obj, "execute_sql", noted)
    return statements


def make_test_app(tmp_path, url, clock, **overrides):
    """A fresh app on `url` with the test clock, cheap hashing and a known setup code."""
    return create_app({
        "TESTING": True,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "SECRET_KEY": "test-secret-key-" + "x" * 32,
        "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "DATABASE_URL": url,
        "PASSWORD_HASH_PROFILE": "cheapest",
        "CLOCK": clock,
        "SETUP_CODE": "setup-code-123",
        **overrides,
    })


@pytest.fixture
def app(tmp_path, clock):
    url = os.environ.get("TEST_DATABASE_URL") or f"sqlite:///{tmp_path / 'test.db'}"
    application = make_test_app(tmp_path, url, clock)
    yield application
    if url.startswith("postgres"):
        with db.connection_context():
            db.drop_tables(ALL_MODELS, cascade=True)
    db.close()


@pytest.fixture
def client(app):
    return app.test_client()


def prepared_statements(app):
    """PostgreSQL: each statement prepared on the app's connection, with how many times it has run prepared
    (the tests of db.planned_for_values)."""
    with app.app_context():
        return dict(db.execute_sql("SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements"))


def csrf_from(html):
    """The CSRF token rendered in a page."""
    match = _CSRF_RE.search(html if isinstance(html, str) else html.decode())
    assert match, "page has no CSRF token"
    return match.group(1)


class Actor:
    """Drives the app through the test client like a person would: load the form, fill it, submit."""

    def __init__(self, app, client, clock):
        self.app, self.client, self.clock = app, client, clock

    def user(self, email="alice@example.com", password=PASSWORD, admin=False, secret=None, devices=None):
        """Create an account directly in the DB, optionally with devices ({name: secret})."""
        with self.app.app_context():
            user = User.create(email=normalise_email(email), password_hash=hash_password(password), is_admin=admin)
            if secret:
                devices = {**(devices or {}), "Phone": secret}
            for name, sec in (devices or {}).items():
                Device.create(user=user, name=name, secret_enc=encrypt_secret(sec))
            return user

    def csrf(self, url="/login"):
        return csrf_from(self.client.get(url).get_data(as_text=True))

    def post_form(self, url, data, form_url=None, **kwargs):
        """GET the page holding the form (for its CSRF token), then POST the data to `url`."""
        token = self.csrf(form_url or url)
        return self.client.post(url, data={"csrf_token": token, **data}, **kwargs)

    def password_step(self, email="alice@example.com", password=PASSWORD, next_url=None):
        url = "/login" + (f"?next={next_url}" if next_url else "")
        return self.post_form(url, {"email": email, "password": password}, form_url="/login")

    def code(self, secret, offset_steps=0):
        return pyotp.TOTP(secret).at(self.clock.t + 30 * offset_steps)

    def code_step(self, code, **kwargs):
        return self.post_form("/login/verify", {"code": code}, **kwargs)

    def code_refused(self, code, **kwargs):
        """Send a code the code step refuses: without htmx it answers 303 to its own page (Post/Redirect/Get),
        whose GET shows the refusal once. That page's response."""
        r = self.code_step(code, **kwargs)
        assert r.status_code == 303 and r.headers["Location"] == "/login/verify", (r.status_code,
                                                                                   r.headers.get("Location"))
        return self.client.get(r.headers["Location"])

    def sign_in(self, email="alice@example.com", password=PASSWORD, secret=None):
        """Both steps; returns the final response."""
        response = self.password_step(email, password)
        if secret is None:
            return response
        assert response.headers["Location"].endswith("/login/verify")
        return self.code_step(self.code(secret))

    def session_cookie(self):
        cookie = self.client.get_cookie(self.app.session_interface.get_cookie_name(self.app))
        return cookie.value if cookie else None


@pytest.fixture
def actor(app, client, clock):
    return Actor(app, client, clock)


@pytest.fixture
def secret():
    return new_secret()
