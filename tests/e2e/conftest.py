"""Fixtures for the real-browser suite: Debian's Chromium via Playwright against a live server.

Our own fixtures rather than pytest-playwright's, so the launch flags and the skip rule live here.
On a machine without Chromium (or oathtool, zbarimg, zxing-cpp) these tests skip with the reason;
with the CI environment variable set a missing tool is an error instead, never a silent skip.
"""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import browser_kit  # noqa: E402
from browser_kit import LiveServer, launch_chromium  # noqa: E402


def _in_ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def _browser_tools():
    """Fail (in CI) or skip (elsewhere) when the browser suite cannot run on this machine."""
    missing = browser_kit.missing_tools()
    if missing:
        reason = "browser suite needs " + ", ".join(missing)
        if _in_ci():
            pytest.fail(reason + " (CI is set, so this is a failure, not a skip)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def playwright_session(_browser_tools):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(playwright_session):
    """One headless Chromium for the whole run (contexts keep the tests apart)."""
    chromium = launch_chromium(playwright_session)
    yield chromium
    chromium.close()


@pytest.fixture(scope="session")
def browser_with_back_forward_cache(playwright_session):
    """A Chromium that keeps pages in its back/forward cache, as the browsers people use do (Playwright
    turns it off)."""
    chromium = launch_chromium(playwright_session, back_forward_cache=True)
    yield chromium
    chromium.close()


@pytest.fixture
def server(tmp_path, _browser_tools):
    """A fresh app and database per test, served on 127.0.0.1 with the real clock."""
    live = LiveServer(tmp_path)
    yield live
    live.stop()


def _context(browser, server, **options):
    options.setdefault("viewport", {"width": 1100, "height": 800})
    context = browser.new_context(base_url=server.url, **options)
    context.set_default_timeout(10_000)
    return context


class ConsoleWatch:
    """Collects what the browser reports as broken: script errors, CSP refusals, htmx errors.

    "Failed to load resource" lines are left out: they only repeat an HTTP status (a 404 for the
    favicon, a 400 for a form with errors) that the tests assert themselves where it matters.
    """

    def __init__(self):
        self.problems = []

    def attach(self, page):
        page.on("pageerror", lambda exc: self.problems.append(f"{page.url}: uncaught {exc}"))
        page.on("console", lambda msg: self._console(page, msg))
        return page

    def _console(self, page, msg):
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.problems.append(f"{page.url}: console error: {msg.text}")


@pytest.fixture
def console_watch():
    """Fails the test at the end if any page it used logged a script error or a CSP refusal."""
    watch = ConsoleWatch()
    yield watch
    assert not watch.problems, "the browser reported problems:\n" + "\n".join(watch.problems)


@pytest.fixture
def context(browser, server):
    """A browser profile of its own (cookies, storage) with JavaScript on."""
    ctx = _context(browser, server)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context, console_watch):
    return console_watch.attach(context.new_page())


@pytest.fixture
def new_page(browser, server, console_watch):
    """Factory for more independent browser profiles (a second person, an admin, no JavaScript, audits)."""
    contexts = []

    def make(**options):
        ctx = _context(browser, server, **options)
        contexts.append(ctx)
        return console_watch.attach(ctx.new_page())

    yield make
    for ctx in contexts:
        ctx.close()


@pytest.fixture
def cached_page(browser_with_back_forward_cache, server, console_watch):
    """A page of a browser with the back/forward cache on (JavaScript on)."""
    ctx = _context(browser_with_back_forward_cache, server)
    yield console_watch.attach(ctx.new_page())
    ctx.close()


@pytest.fixture
def cached_nojs_page(browser_with_back_forward_cache, server, console_watch):
    """A page of a browser with the back/forward cache on and JavaScript off: Back and Reload as such a
    browser does them, with plain links and forms."""
    ctx = _context(browser_with_back_forward_cache, server, java_script_enabled=False)
    yield console_watch.attach(ctx.new_page())
    ctx.close()


@pytest.fixture
def nojs_page(new_page):
    """A browser with JavaScript switched off: everything must work with plain links and forms."""
    return new_page(java_script_enabled=False)


@pytest.fixture
def audit_page(new_page):
    """A browser whose pages accept the injected axe-core script (CSP bypassed for the audit only)."""
    return new_page(bypass_csp=True)
