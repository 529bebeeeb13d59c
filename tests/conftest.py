"""Shared fixtures: a fresh app per test (temporary SQLite file, or TEST_DATABASE_URL for PostgreSQL),
an injected clock, cheap password hashing, and helpers that act like a person in a browser."""
import os
import re

import pyotp
import pytest
from cryptography.fernet import Fernet

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


@pytest.fixture
def clock():
    return FakeClock()


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
