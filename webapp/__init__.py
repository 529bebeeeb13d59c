"""twostep: two-factor authentication for web accounts (Flask + htmx)."""
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import sqlite3
import sys
import time
import types
import weakref

import jinja2.compiler
import jinja2.runtime
import markupsafe
from flask import Flask, Response, current_app, flash, g, redirect, request, session, url_for
from flask.globals import request_ctx
from flask.templating import Environment as FlaskEnvironment
from flask.templating import _default_template_ctx_processor
from flask.wrappers import Request as FlaskRequest
from flask.wrappers import Response as FlaskResponse
from flask_login import LoginManager, current_user
from flask_login.signals import user_accessed
from flask_wtf.csrf import CSRFError, CSRFProtect, validate_csrf
from flask_wtf.form import SUBMIT_METHODS
from itsdangerous import URLSafeTimedSerializer
from itsdangerous.encoding import base64_encode
from itsdangerous.url_safe import URLSafeSerializerMixin
from markupsafe import Markup, escape
from peewee import DatabaseError, InterfaceError, OperationalError
from werkzeug.exceptions import BadRequest, HTTPException, LengthRequired
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter
from werkzeug.wrappers import Request as WerkzeugRequest
from werkzeug.wrappers import Response as WerkzeugResponse
from wtforms.validators import ValidationError

from . import config as config_module
from . import db as db_module
from . import fields, flaskctx
from .clock import now
from .models import User, purge_expired
from .totp import SecretError


class _FromTrustedProxies(ProxyFix):
    """ProxyFix for requests that come from one of the trusted proxies (FORWARDED_ALLOW_IPS) only. From any
    other address (gunicorn reachable around the proxy by mistake), X-Forwarded-* are dropped, not believed:
    a client could otherwise choose the address the contact form's limit counts and the audit log records,
    and claim https."""

    _FORWARDED = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST",
                  "HTTP_X_FORWARDED_PORT", "HTTP_X_FORWARDED_PREFIX")

    def __init__(self, app, trusted, **kwargs):
        super().__init__(app, **kwargs)
        self.trusted = trusted  # networks, or None for any peer
        self.warned = False
        self.warned_short = False
        self.warned_missing = False

    def __call__(self, environ, start_response):
        address = environ.get("REMOTE_ADDR") or ""
        if self.trusted is not None and not self._trusted_peer(address):
            dropped = [key for key in self._FORWARDED if environ.pop(key, None) is not None]
            if dropped and not self.warned:
                # Once per process: a proxy missing from the list would otherwise only show as 403s (the
                # scheme seems http) and one client address for everybody.
                self.warned = True
                logging.getLogger("twostep").warning(
                    "X-Forwarded-* headers from %s were ignored: that address is not in FORWARDED_ALLOW_IPS. "
                    "If it is your proxy, add it there (README \"Deployment\").", address)
            return self.app(environ, start_response)
        # Not for /healthz: a load balancer's probe comes without the header, or with one address fewer (its
        # own, written by the proxy behind it).
        if not (self.warned_short and self.warned_missing) and environ.get("PATH_INFO") != "/healthz":
            forwarded = environ.get("HTTP_X_FORWARDED_FOR")
            if forwarded and forwarded.count(",") + 1 < self.x_for and not self.warned_short:
                # Once per process: werkzeug then keeps the proxy's address as the client's, for every visitor.
                self.warned_short = True
                logging.getLogger("twostep").warning(
                    "X-Forwarded-For from %s holds %d address(es), fewer than PROXY_HOPS=%d: every client is seen "
                    "as %s (one client for the per-network limits). Set PROXY_HOPS to the number of proxies that "
                    "append to it (README \"Deployment\").", address, forwarded.count(",") + 1, self.x_for, address)
            elif forwarded is None and not self.warned_missing:
                # A proxy that does not add the header at all (nginx without proxy_set_header X-Forwarded-For)
                # makes every visitor the proxy just the same (an operator's walk through the README). A flag of
                # its own: an operator's request past the proxy must not hide a short header later (a review).
                self.warned_missing = True
                logging.getLogger("twostep").warning(
                    "A request from %s carries no X-Forwarded-For, but PROXY_HOPS=%d: if %s is your proxy, every "
                    "client is seen as %s (one client for the per-network limits); set the proxy to add the "
                    "client's address (README \"Deployment\"). A request sent on that host past the proxy shows "
                    "this too.", address or "the socket's peer", self.x_for, address or "it",
                    address or "the proxy")
        return super().__call__(environ, start_response)

    def _trusted_peer(self, address):
        if not address:
            return True  # a Unix socket (gunicorn gives no address): only a local proxy can reach it
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return False
        if peer.version == 6 and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped  # nginx at 127.0.0.1 seen by gunicorn bound to [::]
        return any(peer in network for network in self.trusted)


class _NoProxyExpected:
    """PROXY_HOPS=0: X-Forwarded-For is not believed. Said once per process when a request carries one, since
    behind a proxy (a host whose PROXY_HOPS was forgotten) every visitor is then the proxy's address: one client
    for the per-network limits, and a stranger's wrong passwords shut everyone out of that host."""

    def __init__(self, app):
        self.app = app
        self.warned = False

    def __call__(self, environ, start_response):
        if not self.warned and "HTTP_X_FORWARDED_FOR" in environ:
            self.warned = True
            address = environ.get("REMOTE_ADDR") or "the socket's peer"
            logging.getLogger("twostep").warning(
                "X-Forwarded-For came from %s, but PROXY_HOPS is 0: it is not believed, and every client is seen "
                "as %s (one client for the per-network limits). Behind a reverse proxy, set PROXY_HOPS to the "
                "number of proxies (README \"Deployment\"); without one, a client sent it.", address, address)
        return self.app(environ, start_response)


class _SessionOnlyLoginManager(LoginManager):
    """flask-login, minus its remember-me cookie: twostep never issues one (security.md 27), and the stock
    manager would still accept a `remember_token` cookie signed with SECRET_KEY as a sign-in without the
    password and the code. Only the server-side session signs anyone in."""

    def _load_user_from_remember_cookie(self, cookie):
        return None

    # What flask-login does on every request, without its reads through Flask's proxies (webapp/flaskctx.py),
    # where the app's settings make the rest of the work nothing: each falls back to flask-login's own.

    def _session_protection_failed(self):
        """Session protection is off (create_app: the server-side session is the protection), but flask-login
        works out the visitor's identifier first (a SHA-512 of the address and User-Agent, three proxy reads)
        and then reads that the mode is off."""
        app = flaskctx.the_app()
        if app is not None and not app.config.get("SESSION_PROTECTION", self.session_protection):
            return False
        return super()._session_protection_failed()

    def _update_remember_cookie(self, response):
        """Nothing to do unless the session holds flask-login's instruction for its remember cookie (put
        there by logout_user, to delete a cookie this app never sets) or the app refreshes that cookie."""
        current = flaskctx.request_context()
        if (current is not None and "_remember" not in current.session
                and not current.app.config.get("REMEMBER_COOKIE_REFRESH_EACH_REQUEST")):
            return response
        return super()._update_remember_cookie(response)

    def _load_user(self):
        """The session's person, else nobody: flask-login's own steps, whose other ways in (a remember cookie,
        a request or header loader) give nobody here."""
        current = flaskctx.request_context()
        if (current is None or self._user_callback is None or self._request_callback is not None
                or self._header_callback is not None):
            return super()._load_user()
        user_accessed.send(current.app)
        if self._session_protection_failed():
            return self._update_request_context_with_user()
        user_id = current.session.get("_user_id")
        return self._update_request_context_with_user(None if user_id is None else self._user_callback(user_id))

    def _update_request_context_with_user(self, user=None):
        request_g = flaskctx.request_g()
        if request_g is None:
            return super()._update_request_context_with_user(user)
        request_g._login_user = self.anonymous_user() if user is None else user


_PLAIN_CALLABLES = (types.FunctionType, functools.partial)


class _TemplateContext(jinja2.runtime.Context):
    """Jinja's context with a shorter way to call a plain function from a template. Jinja asks every callable,
    and its __call__, whether it wants the context, the evaluation context or the environment first
    (pass_context and its kind): two attribute lookups that fail, ~0.6 µs a call, where the call itself
    takes ~0.04; a User Settings page makes ~40 such calls (url_for, csrf_token, field, strftime, ...). A
    Python function or a functools.partial says so in its own __dict__ (the decorators set an attribute
    there), and a built-in method (strftime, isoformat) cannot carry one: those are called at once, with
    Jinja's other rules kept (its loop and block variables are not passed on, a StopIteration is an
    undefined value). Anything else takes Jinja's own way."""

    def call(__self, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature: a keyword may be "self")
        kind = type(__obj)
        if kind is types.BuiltinMethodType or (kind in _PLAIN_CALLABLES and "jinja_pass_arg" not in __obj.__dict__):
            if kwargs:
                kwargs.pop("_loop_vars", None)
                kwargs.pop("_block_vars", None)
            try:
                return __obj(*args, **kwargs)
            except StopIteration:
                return __self.environment.undefined("value was undefined because a callable raised a"
                                                    " StopIteration exception")
        return super().call(__obj, *args, **kwargs)


class _TemplateCode(jinja2.compiler.CodeGenerator):
    """Jinja's code generator, with each `{{ ... }}` of an autoescaped template escaped by escape_output."""

    def _output_child_pre(self, node, frame, finalize):
        if frame.eval_ctx.volatile or not frame.eval_ctx.autoescape:
            return super()._output_child_pre(node, frame, finalize)  # `{% autoescape %}` blocks, plain text
        self.write("environment.escape_output(")  # every function Jinja generates can reach `environment`
        if finalize.src is not None:
            self.write(finalize.src)


_escape_inner = getattr(markupsafe, "_escape_inner", None)  # markupsafe's own (C) escaping, without the Markup


def escape_output(value, _as_markup=str.__new__):
    """markupsafe.escape for what a template prints, the same text made a third as dear. escape makes its
    Markup with Markup(...), whose __new__ (Python) asks the string for __html__ first, a failed lookup: ~0.4
    µs of the ~0.5 an escape costs, ~50 times a User Settings page. Here a str's escaped text becomes a Markup
    directly, and a Markup (already safe, immutable) is returned as it is, where escape made a copy of it.
    Anything else goes to escape."""
    kind = type(value)
    if kind is str and _escape_inner is not None:
        return _as_markup(Markup, _escape_inner(value))
    if kind is Markup:
        return value
    return escape(value)


class _TemplateEnvironment(FlaskEnvironment):
    """Flask's Jinja environment with the app's cheaper calls (_TemplateContext) and escaping (_TemplateCode),
    and templates that read the environment's globals as they are. Jinja 3 gives each template a ChainMap of
    its own globals (none, in this app) over the environment's, and every render and include copies it, in
    Python: about 30 lookups a page and a pass over both maps for each of its four templates. Jinja 2 used
    the environment's dict itself when a template had no globals of its own; so does this. Nothing writes
    to a template's globals (Jinja calls that unsafe; get_template's own globals are refused below), and
    globals added later are seen as before."""

    context_class = _TemplateContext
    code_generator_class = _TemplateCode
    escape_output = staticmethod(escape_output)

    def make_globals(self, d):
        return self.globals if not d else super().make_globals(d)

    # Jinja adds a cached template's own globals into its globals: here that would write into every template's
    # (a review). Nothing in the app gives a template globals of its own; these refuse it rather than leak.
    def get_template(self, name, parent=None, globals=None):
        if globals:
            raise ValueError("templates take no globals of their own here (_TemplateEnvironment): pass values")
        return super().get_template(name, parent)

    def select_template(self, names, parent=None, globals=None):
        if globals:
            raise ValueError("templates take no globals of their own here (_TemplateEnvironment): pass values")
        return super().select_template(names, parent)


class _Request(FlaskRequest):
    """Flask's request, whose size limits and form-parsing debug check each read the app's config through
    current_app (two reads through Flask's proxies each time; a code step made ten): _Flask.request_context
    sets them on each request as it is made, from that same config. A view can still set its own (Flask 3.1)."""

    _app_debug = True  # until request_context says: Flask's own check

    def _load_form_data(self):
        if self._app_debug:
            return super()._load_form_data()  # Flask's: in debug mode, a clearer error for a missing file
        return WerkzeugRequest._load_form_data(self)


class _Response(FlaskResponse):
    """Flask's response, with MAX_COOKIE_SIZE read from the app without Flask's proxies (each cookie set read
    it twice through them)."""

    @property
    def max_cookie_size(self):
        app = flaskctx.the_app()
        return WerkzeugResponse.max_cookie_size if app is None else app.config["MAX_COOKIE_SIZE"]


class _Flask(Flask):
    """Flask with two answers it works out on every request kept instead (each is the same for the life of a
    function or of the process, and each cost a User Settings view 1-2 % of its instructions: callgrind), and
    the Jinja environment above."""

    # Templates by name in a plain dict. Jinja's default is an LRU of 400 whose every lookup takes a lock and
    # moves the name to the end of a deque, a scan of it; a page takes five lookups (its includes). The app has
    # a few dozen templates, all named in its code, never by a visitor: the dict cannot grow beyond them.
    jinja_options = {"cache_size": -1}
    jinja_environment = _TemplateEnvironment
    request_class = _Request
    response_class = _Response

    def request_context(self, environ):
        current = super().request_context(environ)
        config, made = self.config, current.request
        made._max_content_length = config["MAX_CONTENT_LENGTH"]
        made._max_form_memory_size = config["MAX_FORM_MEMORY_SIZE"]
        made._max_form_parts = config["MAX_FORM_PARTS"]
        made._app_debug = self.debug
        return current

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The functions known to be plain (not coroutine functions), held weakly: a function made for one
        # request (after_this_request, a class-based view's method) leaves with it, with what it holds.
        self._known_sync = weakref.WeakKeyDictionary()

    def ensure_sync(self, func):
        """Flask asks this of every hook and the view on every request (inspect.iscoroutinefunction, about 20
        times a page); the answer for a function does not change."""
        try:
            if func in self._known_sync:
                return func
        except TypeError:  # an object that takes no weak reference: asked each time
            return super().ensure_sync(func)
        made = super().ensure_sync(func)
        if made is func:
            self._known_sync[func] = True
        return made


csrf = CSRFProtect()
login_manager = _SessionOnlyLoginManager()

HERE = os.path.dirname(os.path.abspath(__file__))


def create_app(test_config=None):
    """Build the application: config, database, sessions, login, CSRF, blueprints, errors and CLI."""
    app = _Flask(
        __name__,
        # A relative TWOSTEP_INSTANCE is taken from the working directory (Flask accepts absolute paths only).
        instance_path=os.path.abspath((test_config or {}).get("INSTANCE_PATH") or os.environ.get("TWOSTEP_INSTANCE")
                                      or os.path.join(os.path.dirname(HERE), "instance")),
        template_folder=os.path.join(os.path.dirname(HERE), "templates"),
        static_folder=os.path.join(os.path.dirname(HERE), "static"),
    )
    app.url_map.converters["int"] = _RowId  # before any route is added: they take the converter then
    # Werkzeug answers a path with "//" in it by a redirect to the merged path, an absolute URL built from the
    # request's Host header (`/support//contact` with `Host: evil.example` went to http://evil.example/...).
    # No page of ours has such a path: it is a 404 like any other unknown one.
    app.url_map.merge_slashes = False
    config_module.load(app, test_config)
    if app.config["PROXY_HOPS"]:
        # Every proxy appends to X-Forwarded-For, so the client is PROXY_HOPS entries from the end. The scheme
        # and host are set (not appended) by the proxy in front of the app, which passes on what the visitor
        # used (README "Deployment"): one value each, whatever the number of hops.
        app.wsgi_app = _FromTrustedProxies(app.wsgi_app, config_module.trusted_proxies(
            app.config["FORWARDED_ALLOW_IPS"]), x_for=app.config["PROXY_HOPS"], x_proto=1, x_host=1)
    else:
        app.wsgi_app = _NoProxyExpected(app.wsgi_app)

    _init_logging(app)
    db_module.init_app(app)

    from .security import PASSWORD_MIN, check_origin, common_passwords, set_known_browser_cookie, set_security_headers
    from .sessions import DbSessionInterface, idle_warning_data, raise_if_unavailable

    common_passwords()  # made here, in gunicorn's master (preload_app), not once in every worker

    app.session_interface = DbSessionInterface()
    app.before_request(raise_if_unavailable)
    app.before_request(_refuse_unreadable_bodies)  # before CSRFProtect's hook reads the form
    app.config["SESSION_COOKIE_NAME"] = app.session_interface.get_cookie_name(app)
    # Flask-WTF's check of every form's token runs from _check_csrf_token, for the methods it checks
    # (WTF_CSRF_METHODS): its own hook, turned off by WTF_CSRF_CHECK_DEFAULT (config), looked up the view's
    # exemptions first on every page view too, seven reads through Flask's proxies for nothing.
    csrf.init_app(app)
    app.before_request(_check_csrf_token)
    login_manager.init_app(app, add_context_processor=False)  # templates get current_user from bound_helpers
    login_manager.session_protection = None  # the server-side session is the protection
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please log in to continue."
    login_manager.user_loader(_load_user)
    login_manager.unauthorized_handler(_unauthorized)

    from . import auth, cli, settings, support

    app.register_blueprint(auth.bp)
    app.register_blueprint(settings.bp)
    app.register_blueprint(support.bp)
    cli.init_app(app)

    app.before_request(check_origin)
    app.before_request(_refuse_nul_characters)
    app.after_request(set_security_headers)
    app.after_request(set_known_browser_cookie)
    # Globals rather than macros imported from a template: Jinja rebuilds an imported template module on
    # every render when context processors add variables, which cost ~0.2 ms a page.
    app.jinja_env.globals.update(field=fields.field, control=fields.control, form_error=fields.form_error,
                                 status_notice=fields.status_notice, message_html=fields.message_html,
                                 username_for_password_managers=fields.username_for_password_managers,
                                 idle_warning_data=idle_warning_data, PASSWORD_MIN=PASSWORD_MIN,
                                 ACTIVITY_SHORT=support.ACTIVITY_SHORT, ACTIVITY_LONG=support.ACTIVITY_LONG)
    _memoise_template_helpers(app)
    _register_error_handlers(app)
    _schedule_purge(app)

    @app.get("/")
    def index():
        """Send people to their settings, or to sign-in, or to first-run setup."""
        if current_user.is_authenticated:
            return redirect(url_for("settings.index"))
        if not User.any_exist():
            return redirect(url_for("auth.first_run"))
        return redirect(url_for("auth.login"))

    @app.get("/healthz")
    def health():
        """For a load balancer or a service monitor (README "Deployment"): "ok" while this process can serve
        sign-ins, the 503 page while its database cannot (the error handler logs why). No session is read
        or made: the checker sends no cookie, and a session row per probe would fill the table."""
        after = db_module.check_health()
        response = app.response_class("ok\n", 200, {"Content-Type": "text/plain; charset=utf-8",
                                                     "Cache-Control": "no-store"})
        if after is not None:  # the SQLite file's whole check, due: the answer goes out first
            response.call_on_close(after)
        return response

    _startup_notices(app)
    return app


# flask-login loads the signed-in person on every request: compiled once (db.Prepared).
_USER_BY_ID = db_module.Prepared(lambda: User.select().where(User.id == db_module.Param("id")))


def _load_user(user_id):
    """The signed-in person: the one read with the session row at the start of this request when it is
    the same account, else from the database.

    Nobody, once support's window has run out without a new device (security.md 39, fail closed): the
    sessions opened with the password alone during the window stop working then, as they do when support
    ends a window early, and signing in again is blocked (auth.after_password).

    Nobody either for an account the operator disabled: `users disable` ends its sessions, and this refuses
    one presented all the same (`users enable` ends any such left, so none comes back). No query of its
    own: disabled_at comes with the person's row."""
    user_id = int(user_id)
    row = getattr(flaskctx.request_context().session, "row", None)
    if row is not None and row.user_id == user_id and "user" in row.__rel__:
        user = row.__rel__["user"]
    else:
        user = _USER_BY_ID.first(id=user_id)
    if user is not None and user.disabled_at is not None:
        g.account_disabled = True  # _unauthorized says why
        return None
    if user is not None and user.support_window() == "ended" and not user.has_2fa:
        g.support_window_ended = True  # _unauthorized tells the person why, not just "log in"
        return None
    return user


def _memoise_template_helpers(app):
    """Cheaper url_for and csrf_token for templates: a User Settings page calls them ~20 times.

    url_for results are kept per (endpoint, script root, arguments) for absolute endpoints with plain
    arguments; they depend on nothing else for the relative URLs we build (no URL defaults, no
    subdomains). csrf_token: Flask-WTF signs the session's raw token again on every request; the signed
    form of each raw token is kept instead (it never expires: WTF_CSRF_TIME_LIMIT is None, the session's
    own timeouts bound it). Both caches are per process and bounded. A raw token seen for the first time is
    signed by CsrfTokens, which makes the same tokens as Flask-WTF at a third of the cost.

    Each render gets both with the request's script root, g and session bound to them (a context processor),
    so no call reads them through Flask's proxies: each such read cost ~9,000 instructions (callgrind), and
    url_for's read of the script root alone was 3 % of a User Settings view. (Jinja's pass_context would
    hand them the context instead, but a call in a block or a loop then copies the context.) So do Flask's
    get_flashed_messages (asked twice by the layout), the idle warning's data and flask-login's current_user
    (its context processor is off: it read two proxies more). The globals are what a template sees without
    the context processor: outside a request they raise, as Flask's own do.

    A device's addresses differ on every page (its number, when it was added): they are built from a shape
    kept per endpoint (url_from_shape), where Werkzeug took 4-5 µs an address."""
    from flask_wtf.csrf import generate_csrf

    from .sessions import idle_warning_data

    build = app.url_for
    urls, signed, signers, shapes = {}, {}, {}, {}

    def url_for_under(script_root, endpoint, **values):
        if values:
            # Exactly str or int: True is 1 to a dict key, and Werkzeug writes it as "True" (a review).
            if endpoint[:1] == "." or any(k[:1] == "_" or type(v) not in (str, int) for k, v in values.items()):
                return build(endpoint, **values)
            key = (endpoint, script_root, tuple(sorted(values.items())))
        elif endpoint[:1] == ".":
            return build(endpoint)
        else:
            key = (endpoint, script_root)
        url = urls.get(key)
        if url is None:
            if len(urls) > 4096:
                urls.clear()
            verbatim = values and all(_verbatim(value) for value in values.values())
            url = urls[key] = url_from_shape(script_root, endpoint, values) if verbatim else build(endpoint, **values)
        return url

    def url_from_shape(script_root, endpoint, values):
        # An address whose values differ on every page (a device's number and when it was added) is built by
        # Werkzeug once per shape, with marks in place of the values, then filled in: the values are digits
        # and ASCII letters, which Werkzeug writes as they are, in the path and in the query.
        names = tuple(values)  # in the caller's order, which is the query's
        shape = (endpoint, script_root, names, tuple(type(values[name]) is int for name in names))
        pieces = shapes.get(shape)
        if pieces is None:
            marks = {name: _INT_MARK + i if is_int else f"{_TEXT_MARK}{i}z"
                     for i, (name, is_int) in enumerate(zip(names, shape[3]))}
            try:
                pieces = fixed_shape(endpoint) and _pieces(build(endpoint, **marks), marks) or False
            except (ValueError, LookupError):  # a mark the route refuses (text for a number): built each time
                pieces = False
            if len(shapes) < 512:  # the shapes are the app's own; this bounds them all the same
                shapes[shape] = pieces
        if not pieces:
            return build(endpoint, **values)
        start, parts = pieces
        return start + "".join([str(values[name]) + text for name, text in parts])

    def fixed_shape(endpoint):
        # Whether the endpoint's addresses all have one shape, whatever the values: one rule, without defaults
        # (Werkzeug picks among several rules, and leaves out a value equal to a default, by the values), and
        # no url_defaults function that could add values by the others (a review).
        rules = list(app.url_map.iter_rules(endpoint))  # LookupError for an unknown endpoint: built, and refused
        return len(rules) == 1 and not rules[0].defaults and not any(app.url_default_functions.values())

    def csrf_token_of(request_g, request_session):
        token = request_g.get("csrf_token")  # where Flask-WTF keeps the request's signed token
        if token is None:
            raw = request_session.get("csrf_token")
            token = signed.get(raw) if raw else None
            if token is None:
                if raw:
                    key = app.config.get("WTF_CSRF_SECRET_KEY") or app.secret_key
                    signer = signers.get(key) or signers.setdefault(key, CsrfTokens(key, salt="wtf-csrf-token"))
                    token = signer.dumps(raw)
                else:
                    token = generate_csrf()  # makes the session's raw token first
                if len(signed) > 10000:
                    signed.clear()
                signed[request_session["csrf_token"]] = token
            request_g.csrf_token = token
        return token

    def url_for(endpoint, **values):
        return url_for_under(request.script_root, endpoint, **values)

    def csrf_token():
        return csrf_token_of(g._get_current_object(), session._get_current_object())

    def flashed_in(current, with_categories=False, category_filter=()):
        # Flask's get_flashed_messages, reading the request's context once instead of through its proxies.
        messages = current.flashes
        if messages is None:
            messages = current.flashes = current.session.pop("_flashes") if "_flashes" in current.session else []
        if category_filter:
            messages = [message for message in messages if message[0] in category_filter]
        return messages if with_categories else [text for _, text in messages]

    def bound_helpers():
        current = flaskctx.request_context()
        if current is None:  # what flask-login's own processor and the layout's gave
            return {"csrf_token": csrf_token, "current_user": None, "reset_window": None}
        request_g = flaskctx.request_g()
        # flask-login's own context processor (turned off) gave current_user the same, through its proxy.
        user = flaskctx.signed_in_user()
        return {"url_for": functools.partial(url_for_under, current.request.script_root),
                "csrf_token": functools.partial(csrf_token_of, request_g, current.session),
                "get_flashed_messages": functools.partial(flashed_in, current),
                "idle_warning_data": functools.partial(idle_warning_data, current_session=current.session,
                                                       config=app.config),
                "current_user": user, "reset_window": support_window_banner(user, request_g)}

    app.jinja_env.globals.update(url_for=url_for, csrf_token=csrf_token)
    # Flask-WTF also puts its own csrf_token into every template context, which would hide the global.
    app.context_processor(bound_helpers)
    # Each blueprint registers Flask's default processor (`g` and `request`) again under its own name, so a
    # page of a blueprint ran it twice for the same two values: once, the app's, is enough.
    for name, processors in app.template_context_processors.items():
        if name is not None:
            processors[:] = [f for f in processors if f is not _default_template_ctx_processor]


def support_window_banner(user, request_g):
    """When the layout's banner says 2FA is off on the signed-in person's account until: during support's
    window, while they have no device yet; else None. Not while the error page of an outage is drawn: the
    query would fail again, past every handler."""
    if (user is None or not user.is_authenticated or user.tfa_reset_until is None
            or request_g.get("database_unavailable")):
        return None
    from .models import Device

    return None if Device.select().where(Device.user == user.id).exists() else user.tfa_reset_until


# Marks for url_from_shape: a number of 19 digits (within the 64-bit ids <int:...> takes) and a word, each
# followed by its position; neither is a value any page has.
_INT_MARK, _TEXT_MARK = 9061561234567890100, "ZzMark"


def _verbatim(value):
    """Whether Werkzeug writes this URL value as it is (a plain number, or ASCII letters and digits)."""
    if type(value) is int:
        return 0 <= value < 2**63 - 100
    return type(value) is str and value.isascii() and value.isalnum()


def _pieces(url, marks):
    """`url` cut at its marks: (the text before the first, [(name, the text after its mark), ...]), or None when
    a mark is not found exactly once (a value that does not go into the address as it is)."""
    found = []
    for name, mark in marks.items():
        mark = str(mark)
        at = url.find(mark)
        if at < 0 or url.find(mark, at + 1) >= 0:
            return None
        found.append((at, len(mark), name))
    found.sort()
    start, parts = url[:found[0][0]], []
    for i, (at, length, name) in enumerate(found):
        end = found[i + 1][0] if i + 1 < len(found) else len(url)
        parts.append((name, url[at + length:end]))
    return start, parts


class CsrfTokens(URLSafeTimedSerializer):
    """Flask-WTF's signed CSRF tokens (generate_csrf: this serializer, salt "wtf-csrf-token"), made without
    trying zlib on each token's JSON. That attempt was most of the cost of signing (~18 of 25 µs), and
    validate_csrf reads a payload either way; for the 40-character raw tokens of signed-in sessions,
    Flask-WTF never keeps the compressed form (it is longer), so the tokens are the very same."""

    def dump_payload(self, obj):
        return base64_encode(super(URLSafeSerializerMixin, self).dump_payload(obj))


def _unauthorized():
    """Anonymous access: htmx gets 401 + HX-Redirect; pages redirect to sign-in; others 401."""
    from .htmx import hx_redirect, is_htmx
    from .security import safe_next

    if g.get("support_window_ended") or g.get("account_disabled"):
        # Signing in again is blocked too (auth.after_password): no way back to this page, just the reason.
        target = url_for("auth.login", notice="support-window-ended" if g.get("support_window_ended")
                         else "account-disabled")
    else:
        # A browser whose signed-in session has ended (idle, 12 hours, signed out from elsewhere) is told
        # so on the sign-in page; one that was never signed in just gets the page.
        notice = "session-ended" if getattr(session._get_current_object(), "ended_since", False) else None
        target = url_for("auth.login", notice=notice,
                         next=safe_next(request.full_path.rstrip("?")) if request.method == "GET" else None)
    if is_htmx():
        return hx_redirect(target)
    return redirect(target)


def _startup_notices(app):
    """What the console says at start, on one connection: the one-time setup code while no account exists,
    else a warning if the keys cannot open the stored TOTP secrets."""
    with db_module.db.connection_context():
        if not User.any_exist():
            if _serving():
                code = setup_code(app)
                print(f" * twostep: no accounts yet. Create the first admin at /setup with the one-time code: "
                      f"{code}", file=sys.stderr, flush=True)
            return
        _warn_about_unreadable_secrets(app)


def _serving():
    """Whether this process will serve pages (gunicorn, `flask run`) rather than run one `flask` command: the
    setup code is for the server's console, not for a cron job's mail or the output of `users create`."""
    import click

    context = click.get_current_context(silent=True)
    return context is None or context.info_name == "run"


def _warn_about_unreadable_secrets(app):
    """Say at start when TOTP_ENCRYPTION_KEYS opens neither the oldest nor the newest stored secret (a key
    dropped too early, or the instance folder's key used instead of the environment's): every sign-in with
    2FA would fail until it is fixed. A warning rather than a refusal to start, so that `flask keys rotate`
    can still name the rows."""
    from .models import Device, User
    from .totp import decrypt_secret

    ends = [Device.select(Device.id, Device.secret_enc, User.email).join(User).order_by(order).first()
            for order in (Device.id, Device.id.desc())]
    for device in filter(None, ends):
        try:
            with app.app_context():
                decrypt_secret(device.secret_enc)
        except SecretError:
            print(f" * twostep: WARNING: {config_module.keys_source(app.config)} cannot decrypt the stored TOTP "
                  f"secret of device {device.id} ({device.user.email}'s): sign-ins with 2FA will fail. Give the "
                  f"key(s) that encrypted it (README \"Rotating the encryption key\").", file=sys.stderr, flush=True)
            return


def setup_code(app):
    """The first-run code (config SETUP_CODE in tests): derived from SECRET_KEY, so every host and process of
    one deployment prints and accepts the same code (one kept in each host's instance folder was refused
    by the host the load balancer sent the form to), and nothing has to be written. Unguessable without
    SECRET_KEY, which signs the sessions' CSRF tokens anyway; useless once any account exists."""
    if app.config.get("SETUP_CODE"):
        return app.config["SETUP_CODE"]
    key = app.secret_key.encode("utf-8") if isinstance(app.secret_key, str) else app.secret_key
    digest = hmac.new(key, b"twostep: first-run setup code", hashlib.sha256).hexdigest()
    return "-".join(digest[i:i + 6] for i in (0, 6, 12))


def _init_logging(app):
    from .security import RedactingFilter

    redactor = RedactingFilter()
    # Werkzeug's development server escapes the request line itself and colours its lines (ANSI escapes),
    # and prints tracebacks in its messages: its lines are only masked.
    for name, each in (("twostep", redactor), ("twostep.audit", redactor), ("webapp", redactor),
                       ("werkzeug", RedactingFilter(escape_controls=False)), ("gunicorn.access", redactor),
                       ("gunicorn.error", redactor)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(each)
    ours = logging.getLogger("twostep")
    ours.setLevel(logging.INFO)
    # Audit lines (twostep.audit) are INFO: with no logging configured anywhere, Python drops them, so give
    # them a stderr handler (gunicorn's error log) unless the operator configured the root logger.
    if not ours.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)


# How long the app's own purge may go on starting batches (models.purge_expired): far below gunicorn's 30 s
# timeout, and a worker busy purging serves nobody. A backlog (the app stopped for a day) goes over several
# intervals; the `purge-expired` command has no limit.
PURGE_SECONDS = 2.0


def _schedule_purge(app):
    """Every PURGE_INTERVAL, a request of each process deletes the expired rows (models.purge_expired) once its
    response has gone out, so nobody waits for it and no cron job is needed. A failure is logged and
    tried again at the next interval."""
    interval = app.config["PURGE_INTERVAL"].total_seconds()
    if interval <= 0:
        return
    due = {}  # per process: gunicorn forks its workers from one loaded app
    log = logging.getLogger("twostep")

    def purge(config, current):
        connect_here = db_module.db.is_closed()  # a thread that closed its connection after the request
        try:
            if connect_here:
                db_module.db.connect()
            counts = purge_expired(config, current, seconds=PURGE_SECONDS)
            if any(counts):
                log.info("purged expired rows: %d session(s), %d challenge(s), %d pending enrolment(s), "
                         "%d known browser(s), %d per-network counter(s), %d handled contact request(s)", *counts)
        except (OperationalError, InterfaceError) as exc:
            log.warning("purging expired rows failed: %s", exc)
        finally:
            if connect_here and not db_module.db.is_closed():
                db_module.db.close()

    @app.after_request
    def _purge_after_response(response):
        pid, moment = os.getpid(), time.monotonic()
        if pid not in due:  # the first deadline falls at random, so workers started together spread out
            due[pid] = moment + interval * random.random()
        elif moment >= due[pid]:
            due[pid] = moment + interval
            response.call_on_close(functools.partial(purge, app.config, now()))
        return response


class _RowId(IntegerConverter):
    """`<int:...>` in every route, bounded to the 64-bit ids the database can hold: a longer number in the
    address is a 404 page, not an OverflowError from the database driver. ASCII digits only (Werkzeug's
    \\d also takes "١" or "１" as 1), and at most 19 of them."""

    regex = r"[0-9]{1,19}"

    def __init__(self, url_map, *args, **kwargs):
        kwargs.setdefault("max", 2**63 - 1)
        super().__init__(url_map, *args, **kwargs)


def _refuse_unreadable_bodies():
    """Refuse a submitted body that cannot be read as the form it claims to be, before any view or the CSRF
    check reads it; nothing is changed.

    - 411 without Content-Length (Transfer-Encoding: chunked): Werkzeug reads such a body only up to
      MAX_CONTENT_LENGTH and then stops without an error, so a form over the limit lost its end silently (a
      contact message was stored cut short) where the same form with a length gets 413. Browsers send
      every form with its length.
    - 400 for a body that stops short of its Content-Length (the connection broke off): gunicorn marks its
      input as ending where the body ends (wsgi.input_terminated), so Werkzeug took the part as the whole
      form (a contact message stored without its end, a wizard started, a request marked handled). The body
      is at most MAX_CONTENT_LENGTH, so it is read here (and kept for the form parser).
    - 400 for a urlencoded body with bytes that are not UTF-8 (a browser percent-encodes them): Werkzeug
      dropped the undecodable fields, and the refusal then blamed the CSRF token ("Form expired")."""
    current = request._get_current_object()  # one read through Flask's proxy, not five
    if current.method not in SUBMIT_METHODS:
        return
    if current.content_length is None:
        if "Transfer-Encoding" in current.headers:
            raise LengthRequired("This form was sent without its length (Content-Length). Send it again from "
                                 "the page. Nothing was changed.")
        return
    body = current.get_data(cache=True)  # 413 above MAX_CONTENT_LENGTH, as before
    if len(body) < current.content_length:
        raise BadRequest("The form did not arrive whole (the connection broke off). Send it again. "
                         "Nothing was changed.")
    if current.mimetype == "application/x-www-form-urlencoded" and not body.isascii():
        try:
            body.decode("utf-8")  # raw UTF-8 (curl --data 'message=Héllo') is read right; other bytes are not
        except UnicodeDecodeError:
            raise BadRequest("The form could not be read: it contains characters that are not UTF-8. "
                             "Send it again from the page. Nothing was changed.") from None


def _check_csrf_token():
    """CSRFProtect's check (its token, its exemptions, its 400 "Form expired" page: _register_error_handlers)
    on the requests it checks; nothing on the others. Its steps, with the request's context read once: its
    protect() read the request, the session, g and the config through Flask's proxies ~20 times a form post
    (a fifth of a code step's such reads). What this app does not use (exempt views, the HTTPS Referer check
    that its own Referrer-Policy would fail) is left to protect() itself. validate_csrf is Flask-WTF's."""
    current = flaskctx.request_context()
    made, app = current.request, current.app
    config = app.config
    if made.method not in config["WTF_CSRF_METHODS"] or not config["WTF_CSRF_ENABLED"]:
        return
    if csrf._exempt_views or csrf._exempt_blueprints or (made.is_secure and config["WTF_CSRF_SSL_STRICT"]):
        csrf.protect(apply_exemptions=True)
        return
    if not made.endpoint:
        return  # no view takes it (a 404 or 405 follows): nothing to protect, as in protect()
    field = config["WTF_CSRF_FIELD_NAME"]
    try:
        # The form's field, else where Flask-WTF also looks (a prefixed field, the X-CSRFToken header).
        validate_csrf(made.form.get(field) or csrf._get_csrf_token(),
                      secret_key=config.get("WTF_CSRF_SECRET_KEY", app.secret_key),
                      time_limit=config.get("WTF_CSRF_TIME_LIMIT", 3600), token_key=field)
    except ValidationError as refused:
        logging.getLogger("flask_wtf.csrf").info(refused.args[0])
        csrf._error_response(refused.args[0])  # raises CSRFError
    flaskctx.request_g().csrf_valid = True  # as protect() marks it


def _refuse_nul_characters():
    """Refuse a query or form value, or a stored header, containing NUL before any view reads it. No person types
    one, PostgreSQL cannot store one in text (the driver raises), and SQLite would store a string that ends
    early in C code."""
    # The form only where Flask-WTF reads one (POST, PUT, PATCH, DELETE): building an empty one for every
    # page view cost ~2 % of a User Settings request.
    current = request._get_current_object()  # one read through Flask's proxy, not four
    sources = (current.args, current.form) if current.method in SUBMIT_METHODS else (current.args,)
    # Every value of a repeated name too, not only the first one that the views read. And the two headers
    # that are stored: the User-Agent (a new session's row) and the client address, which ProxyFix takes from
    # X-Forwarded-For (session rows, audit records, per-network counters). gunicorn refuses a header with NUL
    # itself; a server that passed one on made a sign-in on PostgreSQL end in a 500.
    if (any("\x00" in value for values in sources for listed in values.listvalues() for value in listed)
            or "\x00" in current.headers.get("User-Agent", "") or "\x00" in (current.remote_addr or "")):
        raise BadRequest("The request contained a character that is not allowed (NUL). Nothing was changed.")


# The forms that a visitor who has stored nothing may send: every other form is made for a session with a row.
_FORMS_WITHOUT_A_SESSION = {"auth.login", "auth.signup", "auth.first_run", "support.contact"}


def _session_ended_meanwhile():
    """Whether this request sends a form that only a session with a row could have been shown (a signed-in
    page, the code step), with a cookie whose row no longer exists: it expired or was deleted, and the server
    now sees a visitor who has stored nothing (sessions.py)."""
    current = session._get_current_object()
    if request.endpoint is None or request.endpoint in _FORMS_WITHOUT_A_SESSION:
        return False
    return (getattr(current, "derived_csrf", None) is not None and not current.new_cookie and current.row is None
            and current.unavailable is None)


def _done_in_another_tab():
    """Where to send a form whose token belongs to the session before a sign-in (or a "Confirm it's you") that
    this browser has completed since, in another tab or by a second click: the sign-in forms of a person
    now signed in go to User Settings, a confirmation of a person now confirmed goes on. "Form expired"
    would be wrong, and reloading it would post the form again. None for every other form."""
    from .security import is_fresh, safe_next

    if request.endpoint in ("auth.login", "auth.verify", "auth.signup") and current_user.is_authenticated:
        # Said, in case this tab was meant for another account: this browser is signed in as someone already.
        # The address as a part (fields.message_html): revealed in <bdi>, as every page shows an address.
        flash(["You are already signed in as ", fields.address(current_user.email),
               ". To use another account, log out first."], "info")
        return url_for("settings.index")
    if request.endpoint == "auth.reauth" and is_fresh():
        return safe_next(request.args.get("next")) or url_for("settings.index")
    return None


# Longer than any token Flask-WTF makes (a 40-character hex payload, its timestamp and signature: 91).
_CSRF_TOKEN_MAX = 200


def _signed_with_another_key(exc):
    """For the "csrf refused" log line: why a well-formed token of ours failed its signature, when that is most
    likely another SECRET_KEY (hosts or workers configured apart, or the key changed since the page was made),
    which the person sees only as "Form expired" on every other request. Most likely so when the token carries
    this very session's own token: only this session's pages show it (its holder could still re-sign it by
    hand, so the line says "most likely"). Empty for a token that is not one of ours at all."""
    if exc.description != "The CSRF token is invalid.":
        return ""
    token = csrf._get_csrf_token()
    if not isinstance(token, str) or len(token) > _CSRF_TOKEN_MAX or token.startswith("."):
        # Not one of ours: ours are ~91 characters and never compressed. loads_unsafe inflates a compressed
        # payload before any signature is checked: a 60 kB form field of zlib made it build ~45 MB (0.35 s).
        return ""
    try:
        _, payload = URLSafeTimedSerializer(b"", salt="wtf-csrf-token").loads_unsafe(token)
    except Exception:  # anything that cannot even be read as a token
        return ""
    if not isinstance(payload, str):
        return ""
    own = session.get(current_app.config["WTF_CSRF_FIELD_NAME"])
    where = ("every host and worker must have the same SECRET_KEY (README \"Several processes, several "
             "machines\")")
    if isinstance(own, str) and hmac.compare_digest(own.encode(), payload.encode()):
        return (f"; the token was made for this session but its signature is not this SECRET_KEY's (most likely "
                f"another SECRET_KEY): {where}")
    return (f"; the token is well formed but not signed with this SECRET_KEY: if its page came from another host "
            f"or worker, {where}")


# What an error page says when the code that refused gave no words of its own.
PLAIN_ERRORS = {
    400: ("Something was wrong with that request", "Go back, reload the page and try again."),
    401: ("Signed out", "Your session has ended. Sign in again to go on."),
    403: ("Not allowed", "Your account cannot open this page or do this."),
    404: ("Not found", "There is nothing at this address. The link may be old or mistyped."),
    405: ("Not available this way", "This address works only through the buttons on its page."),
    413: ("Too much at once", "What was sent is larger than this form takes. Shorten it and try again."),
}


# SQLSTATEs of a transaction the database undid because of another one: deadlock_detected,
# serialization_failure, lock_not_available.
_CONFLICT_STATES = {"40P01", "40001", "55P03"}


def _lock_conflict(exc):
    """Whether a database error is a conflict between transactions rather than an outage (peewee keeps
    the driver's exception as `orig`)."""
    original = getattr(exc, "orig", None)
    return getattr(original, "sqlstate", None) in _CONFLICT_STATES or "database is locked" in str(original)


def _statement_cancelled(exc):
    """Whether PostgreSQL cancelled a statement (query_canceled, 57014): it ran past the role's or the
    database's statement_timeout, most often waiting for a row another transaction held, or an administrator
    cancelled it. The database is up, and it undid the transaction."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == "57014"


def _register_error_handlers(app):
    from .htmx import hx_redirect, is_htmx, render

    def render_error(status, title, message, can_store=None):
        """The error page, or for htmx its fragment with a reload (HX-Refresh); either way Vary: HX-Request."""
        if request_ctx.url_adapter is None:
            # Werkzeug could not read the Host header as a host name (BadHost: one IDNA cannot encode, such as a
            # label over 63 characters), so no address of this site can be built for the request, and the page
            # and its layout are made of them: drawing it raised again, past every handler (a 500 and a
            # traceback from gunicorn). The words alone, as plain text.
            return Response(f"{title}: {message}\n", status, mimetype="text/plain")
        response = render("errors/error.html", "errors/_error.html", status=status, title=title, message=message)
        if not is_htmx():
            return response
        # htmx swaps no 4xx or 5xx answer (htmx 2's default), so an error fragment would never be seen and the
        # click would seem to do nothing: the page reloads instead (HX-Refresh) with the message on top. Only
        # in a session that has a row already: anyone can send HX-Request to a missing page, and a message for
        # a visitor without a row would write one (sessions.py). Not for 5xx either: during an outage the
        # message cannot be stored, and the reload shows the page itself.
        if (status < 500 if can_store is None else can_store) and getattr(session, "row", None) is not None:
            flash(f"{title}: {message}", "error")
        response.headers["HX-Refresh"] = "true"
        return response

    @app.errorhandler(CSRFError)
    def csrf_error(exc):
        # Flask-WTF's own note of the reason goes to a logger nobody listens to by default.
        logging.getLogger("twostep").warning("csrf refused: %s %s (%s)%s", request.method, request.path,
                                             exc.description, _signed_with_another_key(exc))
        done = _done_in_another_tab()
        if done is not None:
            return hx_redirect(done) if is_htmx() else redirect(done)
        if _session_ended_meanwhile():
            # The page was made for a session that has ended since (idle timeout, signed out elsewhere): its
            # form cannot be sent any more, and "reload and try again" would not help. Sign in again.
            from .auth import login_notice_url

            notice = {"auth.logout": "logged-out", "auth.verify": "code-step-ended"}.get(request.endpoint,
                                                                                       "session-ended")
            target = login_notice_url(notice)
            return hx_redirect(target) if is_htmx() else redirect(target)
        return render_error(400, "Form expired",
                            "This form was open too long or came from another site. Reload the page and try again.")

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if exc.code in PLAIN_ERRORS:
            # Werkzeug's own words ("read-protected or not readable by the server") explain nothing to people:
            # plain ones, unless the code that refused gave its own.
            title, message = PLAIN_ERRORS[exc.code]
            return render_error(exc.code, title, message if exc.description == type(exc).description
                                else exc.description)
        return render_error(exc.code or 500, exc.name, exc.description)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def database_down(exc):
        conflict = _lock_conflict(exc)
        cancelled = not conflict and _statement_cancelled(exc)
        what = ("database conflict, rolled back" if conflict
                else "database statement cancelled (statement_timeout, pg_cancel_backend), rolled back" if cancelled
                else "database unavailable")
        # With the driver's first line, which says why (no route to the host, which file, which lock): the
        # operator has nothing else to go by, the health check's failures included.
        app.logger.error("%s: %s (%s)", what, type(exc).__name__,
                         db_module.first_line(getattr(exc, "orig", None) or exc))
        g.database_unavailable = True  # the session is not saved on this response (sessions.py)
        try:
            db_module.db.close()
        except (OperationalError, InterfaceError):
            pass
        if conflict:
            # The database is up: it undid this request's transaction to let another one finish (a deadlock
            # PostgreSQL broke, or SQLite's writer lock held past busy_timeout). Saying it is unreachable
            # would be wrong. An action of several transactions may have committed its first ones, so the
            # page does not claim that nothing changed.
            return render_error(503, "Please try again",
                                "Another change was being made at the same moment, so this one could not finish. "
                                "Reload the page to see what is in place now, then try again if you need to.")
        if cancelled:
            # Not an outage either: the statement took longer than the database allows, and its transaction
            # was undone (the same caution as above about actions of several transactions).
            return render_error(503, "Please try again",
                                "This took the database too long, so it was stopped before it could finish. "
                                "Reload the page to see what is in place now, then try again if you need to.")
        return render_error(503, "Temporarily unavailable",
                            "We cannot reach our database right now. Please try again in a minute.")

    @app.errorhandler(DatabaseError)
    @app.errorhandler(sqlite3.DatabaseError)  # raised while rows are fetched, past peewee's wrapping
    def database_damaged(exc):
        # An SQLite file found damaged (db.is_damaged) is an outage of the whole site, not a fault of this
        # request: the 503 page, with the log line that says so. It was a 500 with a traceback, /healthz's
        # too when the damage was in the pages every new connection reads. Any other DatabaseError (an
        # IntegrityError no code expected) stays the 500 it was.
        if not db_module.is_damaged(exc):
            raise exc
        return database_down(exc)

    @app.errorhandler(SecretError)
    def unreadable_secret(exc):
        # An operator's mistake (TOTP_ENCRYPTION_KEYS lost the key of stored secrets): the person can do
        # nothing about it, and the transaction that needed the secret has rolled back.
        app.logger.error("a stored TOTP secret cannot be decrypted with %s: give the key that encrypted it "
                         "(README \"Rotating the encryption key\")", config_module.keys_source(app.config))
        # The database works, so the reloaded page (htmx) can carry the message, unlike in an outage.
        return render_error(503, "Temporarily unavailable",
                            "Two-factor authentication cannot be checked right now. Nothing was changed. "
                            "Please try again later; if this goes on, contact support.", can_store=True)

    @app.errorhandler(500)
    def server_error(exc):
        return render_error(500, "Something went wrong", "An unexpected error occurred. Nothing was changed.")
