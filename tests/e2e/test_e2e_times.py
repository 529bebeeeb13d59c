"""Times as people in other places read them: shown in the browser's own time zone and language by app.js."""
import json
from datetime import timedelta

from browser_kit import PASSWORD
from journey import expect, expect_signed_in, follow

PERSON = "nour@example.com"


def test_a_time_in_arabic_keeps_its_place_in_the_english_sentence(new_page, server):
    """In an Arabic browser the times are Arabic, inside English sentences: each keeps its own direction apart
    from the words around it. "Support turned off 2FA until" was drawn with the window's end to its left and
    the event's own time to its right, so the window read as ending before it began (a review of times). The
    time also carries its language, for a screen reader's voice."""
    from webapp.clock import now
    from webapp.models import AuditEvent, User

    page = new_page(locale="ar-EG", timezone_id="Africa/Cairo")
    server.user(PERSON)
    server.query(lambda: AuditEvent.create(
        kind="support_tfa_disabled", user=User.get(User.email == PERSON).id, created_at=now(),
        detail=json.dumps({"until": (now() + timedelta(days=1)).isoformat() + "Z", "duration": "24 hours"})))
    page.goto("/login")
    page.get_by_label("Email address", exact=True).fill(PERSON)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    follow(page, page.get_by_role("button", name="Log in", exact=True))
    expect_signed_in(page)
    line = page.locator("#security-activity li").filter(has_text="Support turned off 2FA until")
    began, ends = line.locator("time").nth(0), line.locator("time").nth(1)
    expect(ends).to_have_attribute("lang", "ar-EG")
    words = line.locator("bdi").first.bounding_box()
    assert began.bounding_box()["x"] < words["x"]  # the event's time, then what happened
    # And after "until", the window's end: on the same line to its right, or, when the line wraps (a two-digit
    # hour in Cairo made it wrap, so this test failed from 10:00 to 12:59 there), on a line below. Its first
    # line box decides: a wrapped time's bounding box starts at the left of the next line.
    first = ends.evaluate("e => { const r = e.getClientRects()[0]; return {x: r.x, y: r.y}; }")
    assert (first["y"] > words["y"] + words["height"] - 1
            or (abs(first["y"] - words["y"]) < 2 and first["x"] > words["x"] + words["width"] - 1)), (first, words)
