"""Tools for the real-browser suite that share no code with the app's TOTP logic.

A live server (werkzeug, real clock), Debian's Chromium through Playwright, codes from `oathtool`
(an independent RFC 6238 implementation), QR codes decoded from screenshot pixels by two decoders
(zxing-cpp in-process and `zbarimg`), and an axe-core accessibility audit. Used by the pytest fixtures
in conftest.py and by screenshots.py (`make screenshots`).
"""
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.fernet import Fernet

HERE = Path(__file__).resolve().parent
AXE_JS = HERE / "vendor" / "axe.min.js"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PASSWORD = "correct horse battery"
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


def missing_tools():
    """What this machine lacks to run the browser suite (empty list when everything is there)."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    for tool, package in (("oathtool", "oathtool"), ("zbarimg", "zbar-tools")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install {package})")
    try:
        import zxingcpp  # noqa: F401
        import PIL  # noqa: F401
    except ImportError:
        missing.append("zxing-cpp and pillow (pip install -e '.[test]')")
    return missing


def launch_chromium(playwright, back_forward_cache=False):
    """Debian's Chromium, headless, with the flags that keep it quiet and offline. Playwright turns the
    back/forward cache off (--disable-back-forward-cache); a browser people use has it on, which
    back_forward_cache=True gives."""
    extra = {"ignore_default_args": ["--disable-back-forward-cache"]} if back_forward_cache else {}
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, **extra)


# ------------------------------------------------------------------ live server

def _read_whole(app):
    """`app` with each response read whole, and closed, before the server writes it. werkzeug's development
    server does not close a response whose client went away while it was written (Chromium drops the
    favicon's connection when a page navigates on): the static file stayed open, and its ResourceWarning
    failed whichever test was being torn down when it was collected (seen once in CI). The app's responses
    are small pages and images."""
    def wsgi(environ, start_response):
        response = app(environ, start_response)
        try:
            body = b"".join(response)
        finally:
            if hasattr(response, "close"):
                response.close()
        return [body]

    return wsgi


class LiveServer:
    """The real app on 127.0.0.1 (random port) in a daemon thread, with a temp SQLite file and real time."""

    def __init__(self, workdir, **config):
        from werkzeug.serving import make_server

        from webapp import create_app

        workdir = Path(workdir)
        self.app = create_app({
            "TESTING": True,
            "INSTANCE_PATH": str(workdir / "instance"),
            "SECRET_KEY": "e2e-secret-key-" + "x" * 32,
            "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            # `make test-postgres` sets TEST_DATABASE_URL: then the browser drives the app on PostgreSQL too.
            "DATABASE_URL": os.environ.get("TEST_DATABASE_URL") or f"sqlite:///{workdir / 'e2e.db'}",
            "PASSWORD_HASH_PROFILE": "cheapest",
            "SETUP_CODE": "setup-code-123",
            **config,
        })
        self.server = make_server("127.0.0.1", 0, _read_whole(self.app), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="e2e-live-server", daemon=True)
        self.thread.start()

    def stop(self):
        """Stop serving and close the database."""
        from webapp.db import db
        from webapp.models import ALL_MODELS

        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        if self.app.config["DATABASE_URL"].startswith("postgres"):
            with db.connection_context():
                db.drop_tables(ALL_MODELS, cascade=True)
        if not db.is_closed():
            db.close()

    def user(self, email, password=PASSWORD, admin=False, devices=None):
        """Create an account in the DB with the app's own models, optionally with devices {name: secret}."""
        from webapp.db import db
        from webapp.models import Device, User
        from webapp.security import hash_password
        from webapp.totp import encrypt_secret

        with self.app.app_context(), db.connection_context():
            user = User.create(email=email, password_hash=hash_password(password), is_admin=admin)
            for name, secret in (devices or {}).items():
                Device.create(user=user, name=name, secret_enc=encrypt_secret(secret))
            return user

    def wait_out_code_throttle(self, email):
        """Sleep until the account's code back-off (1, 2, 4 s after each failure) has passed.

        The suite runs on the real clock, so a person's pause is a real pause; it stays a few seconds.
        """
        from webapp.clock import now
        from webapp.models import User

        until = self.query(lambda: User.by_email(email).code_locked_until)
        if until is not None:
            with self.app.app_context():
                remaining = (until - now()).total_seconds()
            assert remaining < 10, f"unexpectedly long code lock: {remaining} s"
            if remaining > 0:
                time.sleep(remaining + 0.1)

    def forgive_password_failures(self, email):
        """Clear the account's password back-off (1 s after a wrong password) so a test about something
        else can sign in right away; the back-off itself is tested in tests/test_auth.py."""
        from webapp.models import User

        self.query(lambda: User.update(password_failures=0, password_locked_until=None)
                   .where(User.email == email).execute())

    def age_sign_ins(self, minutes=11):
        """Make every signed-in session's sign-in `minutes` older (past the 10 minutes in which it counts as
        fresh), changing nothing else about the sessions: "Confirm it's you" then asks. A negative number
        makes them younger again."""
        import json

        from webapp.models import ServerSession

        def age():
            for row in ServerSession.select().where(ServerSession.user.is_null(False)):
                data = row.load()
                data["auth_at"] -= minutes * 60
                ServerSession.update(data=json.dumps(data)).where(ServerSession.id == row.id).execute()

        self.query(age)

    def query(self, fn):
        """Run fn() inside the app and a DB connection (for looking at rows the browser caused)."""
        from webapp.db import db

        with self.app.app_context(), db.connection_context():
            return fn()


# ------------------------------------------------------------------ independent TOTP

def random_secret():
    """A fresh Base32 secret for a device created in the DB (os.urandom, not the app's generator)."""
    import base64

    return base64.b32encode(os.urandom(20)).decode("ascii")


def oathtool_code(secret, at=None):
    """The six-digit code for `secret` at Unix time `at` (default: now), computed by oathtool."""
    args = ["oathtool", "--totp", "-b", secret]
    if at is not None:
        args += ["--now", f"@{int(at)}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    assert len(out) == 6 and out.isdigit(), out
    return out


def next_step_code(secret):
    """The code of the step after the current one (T+1, accepted by the window), for a second sign-in
    that must not reuse the step an earlier sign-in or enrolment consumed."""
    return oathtool_code(secret, time.time() + 30)


def wrong_code(secret):
    """A six-digit code that matches none of the steps T-2..T+2 (so the app must refuse it)."""
    now = time.time()
    taken = {oathtool_code(secret, now + 30 * k) for k in range(-2, 3)}
    for candidate in ("000000", "123456", "999999", "111111"):
        if candidate not in taken:
            return candidate
    raise AssertionError("unlucky secret")


# ------------------------------------------------------------------ QR codes from pixels

def decode_qr(png_path):
    """Decode the QR code in a screenshot with zxing-cpp and zbarimg; both must read the same text."""
    import zxingcpp
    from PIL import Image

    with Image.open(png_path) as image:
        found = zxingcpp.read_barcodes(image)
    zxing_texts = [b.text for b in found if b.format == zxingcpp.BarcodeFormat.QRCode]
    assert len(zxing_texts) == 1, f"zxing-cpp found {len(zxing_texts)} QR codes in {png_path}"
    zbar = subprocess.run(["zbarimg", "-q", "--raw", "--nodbus", str(png_path)],
                          capture_output=True, text=True, timeout=30)
    assert zbar.returncode == 0, f"zbarimg found no QR code in {png_path} (exit {zbar.returncode})"
    zbar_text = zbar.stdout.rstrip("\n")
    assert zbar_text == zxing_texts[0], (zbar_text, zxing_texts[0])
    return zxing_texts[0]


def parse_otpauth(uri):
    """Split an otpauth:// URI (Key URI Format) into its parts with urllib only."""
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp", uri
    label = unquote(parts.path.lstrip("/"))
    issuer_label, _, account = label.partition(":")
    query = {k: v[0] for k, v in parse_qs(parts.query, strict_parsing=True).items()}
    return {"label_issuer": issuer_label, "account": account, **query}


def qr_from_element(locator, path):
    """Screenshot one element and decode the QR code in it."""
    locator.screenshot(path=str(path))
    return decode_qr(path)


def tmp_png(directory=None):
    fd, path = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(fd)
    return Path(path)


# ------------------------------------------------------------------ accessibility

def axe_violations(page):
    """Inject the pinned axe-core and run the WCAG 2.0/2.1 A+AA rules on the page as it is now.

    Needs a browser context with bypass_csp=True: the app's CSP rightly blocks injected scripts.
    """
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE_JS))
    return page.evaluate(
        """async (tags) => {
            const result = await axe.run(document, {runOnly: tags});
            return result.violations.map(v => ({
                id: v.id, impact: v.impact, help: v.help,
                nodes: v.nodes.map(n => ({target: n.target.join(' '), html: n.html.slice(0, 200),
                                          summary: n.failureSummary}))}));
        }""",
        WCAG_TAGS,
    )


def format_violations(where, violations):
    """A readable report of axe violations for an assertion message."""
    lines = [f"axe-core found {len(violations)} WCAG violation(s) on {where}:"]
    for v in violations:
        lines.append(f"- {v['id']} ({v['impact']}): {v['help']}")
        for n in v["nodes"][:5]:
            lines.append(f"    at {n['target']}: {n['html']}")
            lines.append("      " + (n["summary"] or "").replace("\n", "\n      "))
    return "\n".join(lines)


def focused_name(page):
    """The role and accessible name Chromium computes for the focused element: what a screen reader is given
    when the focus lands there. Read from the browser's own accessibility tree (DevTools protocol), not
    worked out again by Playwright."""
    cdp = page.context.new_cdp_session(page)
    try:
        focused = cdp.send("Runtime.evaluate", {"expression": "document.activeElement"})["result"]
        node = cdp.send("Accessibility.getPartialAXTree",
                        {"objectId": focused["objectId"], "fetchRelatives": False})["nodes"][0]
    finally:
        cdp.detach()
    return node["role"]["value"], node.get("name", {}).get("value", "")


# ------------------------------------------------------------------ colours and contrast

# In the page: colours as the browser computed them, each text's effective background found by laying the
# backgrounds of its element and the elements around it over each other up to an opaque one (the page's
# canvas last), and the WCAG 2 contrast ratio of the two.
_COLOUR_JS = """
const parse = c => {
  const m = c.match(/rgba?\\(([^)]+)\\)/);
  if (!m) return [0, 0, 0, 0];
  const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
  return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
};
const over = (top, under) => {  // top laid over an opaque `under`
  const a = top[3];
  return [0, 1, 2].map(i => top[i] * a + under[i] * (1 - a)).concat([1]);
};
const canvas = () => parse(getComputedStyle(document.documentElement).colorScheme.includes("dark")
  && matchMedia("(prefers-color-scheme: dark)").matches ? "rgb(18, 18, 18)" : "rgb(255, 255, 255)");
const background = el => {
  const layers = [];
  for (let e = el; e; e = e.parentElement) {
    const b = parse(getComputedStyle(e).backgroundColor);
    if (b[3] > 0) layers.push(b);
    if (b[3] >= 1) break;
  }
  let colour = layers.length && layers[layers.length - 1][3] >= 1 ? layers.pop() : canvas();
  while (layers.length) colour = over(layers.pop(), colour);
  return colour;
};
const luminance = c => {
  const [r, g, b] = c.slice(0, 3).map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const ratio = (a, b) => { const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
const shown = el => {
  if (!el.checkVisibility({visibilityProperty: true, opacityProperty: true})) return false;
  const r = el.getBoundingClientRect();
  return r.width > 1 && r.height > 1 && r.right > 0 && r.bottom > 0;  // not visually-hidden, not off-screen
};
const describe = el => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
  (el.className && typeof el.className === "string" ? "." + el.className.trim().split(/\\s+/).join(".") : "");
const css = c => `rgb(${c.slice(0, 3).map(Math.round).join(", ")})`;
"""


def contrast_report(page):
    """Every visible text on the page (in an open dialog, its text and nothing behind it) with its colour, its
    effective background, their contrast ratio and the ratio WCAG 1.4.3 (AA) asks of it; the borders of fields
    and select boxes against the background around them (WCAG 1.4.11 asks 3:1)."""
    return page.evaluate("() => {" + _COLOUR_JS + """
      const modal = document.querySelector("dialog[open]");
      const texts = [], borders = [];
      for (const el of (modal || document.body).querySelectorAll("*")) {
        if (!shown(el) || el.closest("svg")) continue;
        const field = el.matches("input:not([type=hidden]):not([type=checkbox]):not([type=radio]), textarea, select");
        const words = field ? (el.value || "") :
          [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.data).join("").trim();
        const style = getComputedStyle(el);
        if (words) {
          const bg = background(el), fg = over(parse(style.color), bg);
          const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
          const large = size >= 24 || (bold && size >= 18.66);
          texts.push({element: describe(el), text: words.slice(0, 60), colour: css(fg), background: css(bg),
                      ratio: ratio(fg, bg), needed: large ? 3 : 4.5});
        }
        if (field) {
          const around = background(el.parentElement), line = over(parse(style.borderTopColor), around);
          borders.push({element: describe(el), colour: css(line), background: css(around), ratio: ratio(line, around),
                        needed: 3});
        }
      }
      return {texts, borders};
    }""")


def focus_ring(page):
    """The focused element's outline colour and the background it is drawn on (its parent's: the ring sits
    outside the element), with their contrast ratio (0 when it draws no outline); None when nothing is
    focused, or when the focus is on a part inside a browser's own control (a date field's calendar button),
    whose ring the browser draws."""
    return page.evaluate("() => {" + _COLOUR_JS + """
      const el = document.activeElement;
      if (!el || el === document.body || el === document.documentElement || !el.matches(":focus-visible")) return null;
      const style = getComputedStyle(el), around = background(el.parentElement);
      if (style.outlineStyle === "none" || parseFloat(style.outlineWidth) === 0)
        return {element: describe(el), colour: "none", background: css(around), ratio: 0};
      const ring = over(parse(style.outlineColor), around);
      return {element: describe(el), colour: css(ring), background: css(around), ratio: ratio(ring, around)};
    }""")


def colour_at(page, selector, prop="backgroundColor"):
    """An element's computed colour property as an (r, g, b, a) tuple."""
    return tuple(page.locator(selector).first.evaluate(
        "(el, prop) => {" + _COLOUR_JS + " return parse(getComputedStyle(el)[prop]); }", prop))


def relative_luminance(rgb):
    """WCAG 2's relative luminance of an (r, g, b) colour, 0 (black) to 1 (white)."""
    def channel(v):
        v /= 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(v) for v in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
