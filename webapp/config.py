"""Configuration: defaults in code, secrets and URLs from the environment or the instance folder."""
import ipaddress
import os
import secrets
from datetime import timedelta

from cryptography.fernet import Fernet


class ConfigError(RuntimeError):
    """Raised at start-up when the configuration is unsafe or incomplete."""


DEFAULTS = {
    "TOTP_ISSUER": "twostep",
    "SIGNUP_ENABLED": True,
    # Server-side session lifetimes (security.md 30: idle <= 30 min, absolute <= 12 h).
    "SESSION_IDLE_TIMEOUT": timedelta(minutes=30),
    "SESSION_ABSOLUTE_TIMEOUT": timedelta(hours=12),
    # How long a completed sign-in counts as "fresh" for sensitive actions (security.md 9, 32, 37).
    "FRESH_LOGIN_WINDOW": timedelta(minutes=10),
    # The state between password and code (security.md 24).
    "CHALLENGE_TTL": timedelta(minutes=5),
    "CHALLENGE_MAX_FAILURES": 5,
    # A started but unconfirmed enrolment (security.md 8).
    "PENDING_ENROLMENT_TTL": timedelta(minutes=15),
    # Per-account throttle: back-off 1, 2, 4, 8 s, then a lock from the fifth consecutive failure.
    "THROTTLE_FREE_FAILURES": 4,
    "THROTTLE_LOCK": timedelta(minutes=15),
    "THROTTLE_MAX_LOCK": timedelta(hours=24),
    # A browser that completed a sign-in keeps a throttle of its own for that account this long (security.py,
    # "known browsers"); its cookie lives as long.
    "KNOWN_BROWSER_TTL": timedelta(days=180),
    # A known browser forgotten (Change password, Sign out everywhere else, support's disable, `users reset-2fa`,
    # ten newer browsers) keeps only the contact form's own allowance this long (support._take_request): the
    # owner of an account an intruder took over is in the form from their usual browser, whoever else types the
    # address. Then the purge deletes it.
    "FORGOTTEN_BROWSER_TTL": timedelta(days=30),
    # Contact requests marked as handled (or closed by a 2FA disable) are deleted this long after: their message is
    # free text about a person. None keeps them (HANDLED_REQUESTS_KEEP_DAYS=0). Open requests are never deleted.
    "HANDLED_REQUEST_RETENTION": timedelta(days=180),
    # How often each app process deletes expired sessions, challenges and enrolments by itself, after a
    # response has gone out (0 turns it off, for operators who run `purge-expired` from cron instead).
    "PURGE_INTERVAL": timedelta(minutes=10),
    "MAX_CONTENT_LENGTH": 64 * 1024,
    "PASSWORD_HASH_PROFILE": "default",
    "SECURE_COOKIES": False,
    "PRODUCTION": False,
    "PROXY_HOPS": 0,
    # The proxies whose X-Forwarded-* headers count (addresses or networks; "*" for any): gunicorn's own
    # setting of the same name, read from the same variable, so one value serves both (README "Deployment").
    "FORWARDED_ALLOW_IPS": "127.0.0.1,::1",
    "SUPPORT_REQUESTS_PER_HOUR": 3,
    # Per-network limits on what anyone can do without an account (security.count_for_network), each per
    # client network (security.client_network: an IPv4 address or an IPv6 /64) and hour. Sign-ups: each
    # account made costs a hash and adds rows, and each "already exists" answer tells whether an address has
    # an account.
    "SIGNUPS_PER_HOUR": 10,
    # Wrong passwords (or unknown addresses) at the password step, against any accounts: one client trying
    # one password on many accounts meets no per-account throttle. Generous: an office behind one address
    # signs in at 9 am, typos and all. Browsers known for the account typed are not held by it. This one and
    # SIGNUPS_PER_HOUR can be set from the environment, 0 turning the limit off.
    "FAILED_SIGNINS_PER_HOUR": 100,
    # The contact form's second limit, per IPv6 /48 (ten times SUPPORT_REQUESTS_PER_HOUR): whoever is routed
    # a /48 holds 65,536 /64s, each with a count of its own.
    "SUPPORT_REQUESTS_PER_HOUR_48": 30,
    # The token lives as long as the server-side session; before a session stores anything, as long as its
    # cookie (the token is then derived from the cookie's: sessions.anonymous_csrf).
    "WTF_CSRF_TIME_LIMIT": None,
    # Flask-WTF's "SSL strict" mode refuses HTTPS posts without a same-origin Referer, but our
    # Referrer-Policy: no-referrer (security.md 12) means browsers never send one: every form post over HTTPS
    # would fail. The token (bound to the server-side session, in a __Host- cookie that neither plain HTTP
    # nor a subdomain can set) plus the Origin check (security.check_origin) do that job instead.
    "WTF_CSRF_SSL_STRICT": False,
    # Flask-WTF's own hook is off: webapp._check_csrf_token calls the same check, only for the form methods.
    "WTF_CSRF_CHECK_DEFAULT": False,
    "REMEMBER_COOKIE_DURATION": timedelta(seconds=0),  # no remember-me cookie is ever issued
}

MIN_SECRET_KEY_BYTES = 32
MIN_SECRET_KEY_SYMBOLS = 8  # different characters in it (even 32 random hex digits have fewer once in 27 million draws)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _env_bool(env, name, default):
    """A yes/no variable; anything else stops the start naming it (TWOSTEP_PRODUCTION=y silently read as
    "no" would run production with generated secrets)."""
    value = env.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word not in _TRUE + _FALSE:
        raise ConfigError(f"{name} must be 1 or 0 (also true/false, yes/no, on/off), not {value!r}")
    return word in _TRUE


_COUNT_MAX = 10 ** 9  # far above any useful limit or interval, and what SQLite's integers and timedelta hold
_KEEP_DAYS_MAX = 36500  # a century; 0 keeps for good


def _env_count(env, name, what, most=_COUNT_MAX):
    """A whole number from 0 to `most` from the environment; anything else stops the start naming the
    variable and its own ceiling. Without the ceiling a huge limit broke every sign-in on SQLite (it cannot
    store the number), and a huge purge interval stopped the start with a traceback."""
    try:
        value = int(env[name])
    except ValueError:
        value = -1
    if not 0 <= value <= most:
        raise ConfigError(f"{name} must be {what}, at most {most:,}")
    return value


def _instance_secret(instance_path, name, factory):
    """Read a secret kept in the instance folder, creating it once (O_EXCL: safe with several workers)."""
    path = os.path.join(instance_path, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path, encoding="ascii") as fh:
            value = fh.read().strip()
        if value:
            return value
        raise ConfigError(f"{path} is empty; delete it to have a new secret generated")
    value = factory()
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(value + "\n")
    return value


def load(app, test_config=None):
    """Fill app.config: defaults, then environment, then instance-folder secrets, then test overrides."""
    app.config.update(DEFAULTS)
    env = os.environ
    production = _env_bool(env, "TWOSTEP_PRODUCTION", False)
    app.config["PRODUCTION"] = production
    for key in ("SECRET_KEY", "DATABASE_URL", "TOTP_ISSUER", "TOTP_ENCRYPTION_KEYS"):
        if env.get(key):
            app.config[key] = env[key]
    for key in ("SIGNUP_ENABLED", "SECURE_COOKIES"):
        if env.get(key):
            app.config[key] = _env_bool(env, key, app.config[key])
    if env.get("PROXY_HOPS"):
        try:
            app.config["PROXY_HOPS"] = int(env["PROXY_HOPS"])
        except ValueError as exc:
            raise ConfigError("PROXY_HOPS must be the number of reverse proxies in front of the app "
                              "(0 when there is none)") from exc
        if app.config["PROXY_HOPS"] < 0:
            raise ConfigError("PROXY_HOPS must be the number of reverse proxies in front of the app "
                              "(0 when there is none)")
    if env.get("FORWARDED_ALLOW_IPS") is not None:  # set but empty trusts no proxy, as in gunicorn
        app.config["FORWARDED_ALLOW_IPS"] = env["FORWARDED_ALLOW_IPS"]
    if app.config["PROXY_HOPS"]:
        trusted_proxies(app.config["FORWARDED_ALLOW_IPS"])  # a typo stops the start, naming the setting
    if env.get("PURGE_INTERVAL_SECONDS"):
        seconds = _env_count(env, "PURGE_INTERVAL_SECONDS", "a whole number of seconds (0 turns it off)")
        app.config["PURGE_INTERVAL"] = timedelta(seconds=seconds)
    if env.get("HANDLED_REQUESTS_KEEP_DAYS"):
        what = "a whole number of days (0 keeps them)"
        # The purge counts back from today: a million days is before year 1. One ceiling for every wrong value:
        # "x" was told "at most 1,000,000,000", and 40000 then "at most 36,500" (an operator's review).
        days = _env_count(env, "HANDLED_REQUESTS_KEEP_DAYS", what, most=_KEEP_DAYS_MAX)
        app.config["HANDLED_REQUEST_RETENTION"] = timedelta(days=days) if days else None
    # The per-network limits an operator may have to move: many people behind one address (an office's NAT, a
    # carrier's) share one count, and a stranger among them can use it up for everyone not in a known browser.
    for key in ("SIGNUPS_PER_HOUR", "FAILED_SIGNINS_PER_HOUR"):
        if env.get(key):
            app.config[key] = _env_count(env, key, "a whole number per hour (0 turns the limit off)")
    if production:
        app.config["SECURE_COOKIES"] = True
    if test_config:
        app.config.update(test_config)

    if not app.config.get("PRODUCTION"):
        # Development and `make run`: keep generated secrets in the instance folder, never in the repo.
        os.makedirs(app.instance_path, exist_ok=True)
        if not app.config.get("SECRET_KEY"):
            app.config["SECRET_KEY"] = _instance_secret(
                app.instance_path, "secret_key", lambda: secrets.token_urlsafe(48))
        if not app.config.get("TOTP_ENCRYPTION_KEYS"):
            app.config["TOTP_ENCRYPTION_KEYS"] = _instance_secret(
                app.instance_path, "totp_keys", lambda: Fernet.generate_key().decode())
            app.config["TOTP_KEYS_SOURCE"] = os.path.join(app.instance_path, "totp_keys")
        if not app.config.get("DATABASE_URL"):
            app.config["DATABASE_URL"] = "sqlite:///" + os.path.join(app.instance_path, "twostep.db")
    validate(app.config)


def keys_source(config):
    """Where the TOTP encryption keys came from, for messages that tell the operator what to edit."""
    path = config.get("TOTP_KEYS_SOURCE")
    return f"the keys in {path or 'TOTP_ENCRYPTION_KEYS'}"


def validate(config):
    """Refuse to start with a configuration that would be unsafe (security.md 7, 44)."""
    missing = [k for k in ("SECRET_KEY", "TOTP_ENCRYPTION_KEYS", "DATABASE_URL") if not config.get(k)]
    if missing:
        raise ConfigError("missing configuration: " + ", ".join(missing)
                          + " (set them in the environment; see README 'Configuration')")
    if config.get("PRODUCTION"):
        if config.get("DEBUG"):
            raise ConfigError("debugging must be off in production: remove FLASK_DEBUG=1 or --debug")
        key = config["SECRET_KEY"]
        raw = key.encode() if isinstance(key, str) else key
        # Long enough, and not a placeholder such as "k" * 48 or "changeme" four times: a random key of 32 bytes
        # or more, written in hex, Base64 or as raw bytes, holds far more than MIN_SECRET_KEY_SYMBOLS symbols.
        if len(raw) < MIN_SECRET_KEY_BYTES or len(set(raw)) < MIN_SECRET_KEY_SYMBOLS:
            raise ConfigError(f"SECRET_KEY must be at least {MIN_SECRET_KEY_BYTES} random bytes; make one with "
                              "python -c \"import secrets; print(secrets.token_urlsafe(48))\"")
    issuer = config.get("TOTP_ISSUER") or ""
    if not issuer or ":" in issuer or len(issuer) > 64:
        raise ConfigError("TOTP_ISSUER must be 1-64 characters and contain no ':'")
    keys = [k.strip() for k in str(config["TOTP_ENCRYPTION_KEYS"]).split(",") if k.strip()]
    for number, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            # Which one, by its place in the list (never the key itself: the message goes to logs and consoles).
            raise ConfigError(f"TOTP_ENCRYPTION_KEYS must be comma-separated Fernet keys: key {number} of "
                              f"{len(keys)} is not one (44 characters of URL-safe Base64)") from None
    if not keys:
        raise ConfigError("TOTP_ENCRYPTION_KEYS is empty")


def trusted_proxies(value):
    """FORWARDED_ALLOW_IPS as a list of networks (one address is a network of one), or None for "*"."""
    entries = [part.strip() for part in value.split(",") if part.strip()]
    if "*" in entries:
        return None
    try:
        return [ipaddress.ip_network(entry, strict=False) for entry in entries]
    except ValueError as exc:
        raise ConfigError(f"FORWARDED_ALLOW_IPS must list the proxies' addresses or networks, comma-separated, "
                          f"or * ({exc})") from None
