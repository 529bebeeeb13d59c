"""Smoke: the two-step sign-in works end to end with a real TOTP code."""


def test_password_then_code_signs_in(actor, secret):
    actor.user(secret=secret)
    r = actor.password_step()
    assert r.status_code == 302 and r.headers["Location"].endswith("/login/verify")
    r = actor.code_step(actor.code(secret))
    assert r.status_code == 302 and r.headers["Location"].endswith("/settings")
    page = actor.client.get("/settings").get_data(as_text=True)
    assert "User Settings" in page and "Active" in page
