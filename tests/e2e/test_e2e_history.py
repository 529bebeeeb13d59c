"""Back and Forward in a browser that keeps pages in its back/forward cache, as the browsers people use do
(Playwright's own launch turns that cache off, so the rest of the suite never meets it)."""
from browser_kit import oathtool_code, random_secret
from journey import enter_code, expect, expect_code_step, expect_signed_in, log_in

PERSON = "bob@example.com"


def signed_in_then_elsewhere(page, server):
    """Signed in with password and code, on User Settings, then on to the contact form (a page of its own)."""
    secret = random_secret()
    server.user(PERSON, devices={"Phone": secret})
    log_in(page, PERSON)
    expect_code_step(page)
    enter_code(page, oathtool_code(secret))
    expect_signed_in(page)
    page.goto("/support/contact")
    expect(page.get_by_role("heading", name="Contact support", exact=True)).to_be_visible()


def test_back_after_the_session_ended_elsewhere_shows_no_signed_in_page(cached_page, server):
    """security.md 12, 30: once this browser's session has ended elsewhere ("Sign out everywhere else" from
    another browser, a password change, support or the operator), Back does not bring User Settings back
    from the cache with the sessions, addresses and activity on it: Chromium kept the no-store page while the
    cookie stayed the same (a history review). The page is loaded again, and the server sends it to sign in."""
    from webapp.models import ServerSession, User

    page = cached_page
    signed_in_then_elsewhere(page, server)
    server.query(lambda: ServerSession.delete().where(
        ServerSession.user == User.get(User.email == PERSON).id).execute())
    page.go_back(wait_until="commit")  # a page from the cache fires no load event
    expect(page.get_by_role("button", name="Log in", exact=True)).to_be_visible()
    expect(page.get_by_text("Your session has ended")).to_be_visible()
    assert "/login" in page.url and PERSON not in page.get_by_role("main").inner_text()


def test_back_to_a_signed_in_page_while_the_session_lasts_shows_it_as_it_is_now(cached_page, server):
    """The same Back with the session still on: User Settings, loaded again, with what happened meanwhile
    (here a device added in another browser)."""
    from webapp.models import Device, User
    from webapp.totp import encrypt_secret

    page = cached_page
    signed_in_then_elsewhere(page, server)
    server.query(lambda: Device.create(user=User.get(User.email == PERSON).id, name="Tablet added meanwhile",
                                       secret_enc=encrypt_secret(random_secret())))
    page.go_back(wait_until="commit")  # a page from the cache fires no load event
    expect_signed_in(page)
    expect(page.get_by_role("main")).to_contain_text("Tablet added meanwhile")
