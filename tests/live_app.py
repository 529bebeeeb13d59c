"""A real multi-process server for concurrency and fault tests: gunicorn with sync workers running the app
configured from the environment, plus a tiny cookie-keeping HTTP client that behaves like a browser.

gunicorn imports `live_app:create_live_app()` from this folder. The test process shares the database
(DATABASE_URL) and the keys (SECRET_KEY, TOTP_ENCRYPTION_KEYS) with it, so it can seed and inspect rows.
The clock cannot be injected into another process: tests compute codes from the real time.
"""
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from http.cookies import SimpleCookie
from urllib.parse import urlencode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
_CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def create_live_app():
    """The app for gunicorn: env-configured, cheap password hashing, optional fault injection."""
    sys.path.insert(0, ROOT)
    from webapp import create_app
    from webapp.db import db

    app = create_app({"PASSWORD_HASH_PROFILE": "cheapest"})
    stall = os.environ.get("TWOSTEP_STALL_SQL")
    if stall:
        _install_stall(db.obj, re.compile(stall), os.environ["TWOSTEP_STALL_MARKER"],
                       re.compile(os.environ.get("TWOSTEP_STALL_PARAMS", "")),
                       outside=os.environ.get("TWOSTEP_STALL_OUTSIDE") == "1")
    return app


def _install_stall(database, pattern, marker, params_pattern, outside=False):
    """Fault injection: a statement matching `pattern`, with parameters matching `params_pattern` (their
    repr), inside a transaction announces the worker's pid in `marker` and hangs there, so a test can SIGKILL
    the worker in the middle of a transaction. With `outside`, a statement outside any transaction instead:
    the worker is killed after a transaction committed, before its answer went out."""
    original = database.execute_sql

    def execute_sql(sql, params=None):
        if database.in_transaction() != outside and pattern.search(sql) and params_pattern.search(repr(params)):
            try:  # once per server: the worker that replaces the killed one must not stall again
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return original(sql, params)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(str(os.getpid()))
            time.sleep(120)
        return original(sql, params)

    database.execute_sql = execute_sql


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """gunicorn (sync workers) serving create_live_app() on a free port; stop() ends it and its workers."""

    def __init__(self, app, workers=4, log_dir=None, extra_env=None):
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        env = {**os.environ,
               "DATABASE_URL": app.config["DATABASE_URL"],
               "SECRET_KEY": app.config["SECRET_KEY"],
               "TOTP_ENCRYPTION_KEYS": app.config["TOTP_ENCRYPTION_KEYS"],
               "TWOSTEP_INSTANCE": app.instance_path,
               "SIGNUP_ENABLED": "1",
               **(extra_env or {})}
        env.pop("TWOSTEP_PRODUCTION", None)
        self.log_path = os.path.join(log_dir or app.instance_path, f"gunicorn-{self.port}.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", os.path.join(ROOT, "gunicorn.conf.py"),
             "--workers", str(workers), "--bind", self.url, "--timeout", "60", "--chdir", HERE,
             "--access-logfile", "-", "live_app:create_live_app()"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("gunicorn exited early:\n" + self.read_log())
            try:
                status, _, _ = Browser(self).get("/login")
                if status < 500:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("gunicorn did not answer in time:\n" + self.read_log())

    def worker_pids(self):
        """The pids of the master's worker processes (children of the gunicorn master)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def read_log(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: in-flight responses finish
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.log.close()


class Browser:
    """One person's browser: keeps cookies, fetches CSRF tokens from forms, does not follow redirects."""

    def __init__(self, server, timeout=30):
        self.server, self.timeout, self.cookies = server, timeout, {}

    def request(self, method, path, data=None, headers=None):
        """Send one request; returns (status, headers dict with lower-case names, body text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=self.timeout)
        try:
            hdrs = dict(headers or {})
            body = None
            if data is not None:
                body = urlencode(data)
                hdrs["Content-Type"] = "application/x-www-form-urlencoded"
            if self.cookies:
                hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
            for header in resp.msg.get_all("Set-Cookie") or []:
                for name, morsel in SimpleCookie(header).items():
                    if morsel["max-age"] == "0" or not morsel.value or "1970" in morsel["expires"]:
                        self.cookies.pop(name, None)
                    else:
                        self.cookies[name] = morsel.value
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def csrf(self, path):
        """The CSRF token rendered in the form at `path`."""
        status, _, text = self.get(path)
        match = _CSRF_RE.search(text)
        assert match, f"no CSRF token on {path} (status {status})"
        return match.group(1)

    def post(self, path, data, form_url=None, **kw):
        """GET the page holding the form (for its token), then POST the data to `path`."""
        token = self.csrf(form_url or path)
        return self.request("POST", path, data={"csrf_token": token, **data}, **kw)

    def start_wizard(self):
        """Press Next on the wizard's first page and follow the redirect to the QR page; returns (status, page)."""
        status, headers, page = self.post("/settings/2fa/start", {}, form_url="/settings/2fa")
        if status == 303:
            status, _, page = self.get(headers["location"])
        return status, page

    def submit_wizard_code(self, code):
        """Send the wizard's code step and follow the redirect to the name step; returns (status, page)."""
        status, headers, page = self.post("/settings/2fa/code", {"code": code}, form_url="/settings/2fa/code")
        if status == 303:
            status, _, page = self.get(headers["location"])
        return status, page

    def password_step(self, email, password):
        """The first sign-in step; asserts it leads to the code step."""
        status, headers, _ = self.post("/login", {"email": email, "password": password})
        assert status == 302 and headers["location"].endswith("/login/verify"), status
        return self
