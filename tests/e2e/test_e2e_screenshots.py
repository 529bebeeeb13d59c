"""`make screenshots` keeps working: the journey script runs in the suite and writes every picture."""
from PIL import Image

from browser_kit import decode_qr, parse_otpauth
from screenshots import SHOTS, take_screenshots


def test_screenshot_journey_writes_every_step(browser, tmp_path):
    (tmp_path / "work").mkdir()
    paths = take_screenshots(browser, tmp_path / "shots", tmp_path / "work")
    assert [p.name for p in paths] == [name for name, _ in SHOTS]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width == 1000 and image.height >= 720
    # The QR code is readable from the picture of the whole dialog, as a phone would see the screen.
    qr_step = next(p for p in paths if p.name.startswith("04-"))
    assert parse_otpauth(decode_qr(qr_step))["account"] == "sam@example.com"
