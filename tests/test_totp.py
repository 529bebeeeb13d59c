"""The TOTP domain against RFC 6238 / RFC 4226 vectors and the Key URI Format (security.md A, B, 14)."""
import base64
import pathlib
import random
import re
import struct
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

from webapp import totp
from webapp.config import ConfigError, validate

from .conftest import RFC_SECRET

# RFC 6238 Appendix B, SHA-1 rows: (time, 8-digit TOTP).
RFC6238 = [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
           (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130")]
RFC4226 = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"]


@pytest.mark.parametrize("t,expected", RFC6238)
def test_rfc6238_vectors_six_digits(t, expected):
    """security.md 1: our code for each RFC time is the last 6 digits of the RFC's 8-digit TOTP."""
    assert totp.code_for_step(RFC_SECRET, totp.step_at(t)) == expected[-6:]


@pytest.mark.parametrize("t,expected", RFC6238)
def test_rfc6238_vectors_eight_digits_same_hotp(t, expected):
    """security.md 1: the same HOTP core yields the RFC's 8-digit values (T0 = 0, X = 30)."""
    assert pyotp.TOTP(RFC_SECRET, digits=8).generate_otp(totp.step_at(t)) == expected


@pytest.mark.parametrize("count,expected", list(enumerate(RFC4226)))
def test_rfc4226_hotp_vectors(count, expected):
    """security.md 1: RFC 4226 Appendix D HOTP values for counts 0-9."""
    assert totp.code_for_step(RFC_SECRET, count) == expected


def test_time_step_beyond_32_bits():
    """security.md 2: t=20000000000 gives T=0x27BC86AA and still the RFC code (no 32-bit truncation)."""
    step = totp.step_at(20000000000)
    assert step == 0x27BC86AA
    assert totp.code_for_step(RFC_SECRET, step) == "353130"
    assert struct.pack(">Q", step) == bytes.fromhex("0000000027BC86AA")


def test_no_32_bit_packing_in_source():
    """security.md 2: nothing in the app packs a counter as a 32-bit integer."""
    source = "".join(p.read_text() for p in pathlib.Path(totp.__file__).parent.glob("*.py"))
    assert '">I"' not in source and "'>I'" not in source


def test_secrets_are_160_bit_unique_base32(monkeypatch):
    """security.md 3: 10,000 secrets are 32 Base32 chars, 20 bytes, unique, and do not use `random`."""
    def boom(*a, **k):
        raise AssertionError("random module used for a secret")

    monkeypatch.setattr(random, "random", boom)
    monkeypatch.setattr(random, "choice", boom)
    monkeypatch.setattr(random, "getrandbits", boom)
    seen = set()
    for _ in range(10000):
        s = totp.new_secret()
        assert re.fullmatch(r"[A-Z2-7]{32}", s)
        assert len(base64.b32decode(s)) == 20
        seen.add(s)
    assert len(seen) == 10000


@pytest.mark.parametrize("raw,expected", [
    ("005924", "005924"), ("005 924", "005924"), (" 005924 ", "005924"),
    ("5924", None), ("+5924", None), ("00_5924", None), ("００５９２４", None), ("0059240", None),
    ("00592a", None), ("005\t924", None), ("", None), ("1" * 1000, None), ("٠٠٥٩٢٤", None),
])
def test_code_format_is_exactly_six_ascii_digits(raw, expected):
    """security.md 5: only six ASCII digits after removing ASCII spaces."""
    assert totp.normalise_code(raw) == expected


@pytest.mark.parametrize("code,offset", [("980357", -1), ("005924", 0), ("590587", 1)])
def test_window_accepts_previous_current_next(code, offset):
    """security.md 14: T-1, T, T+1 are accepted and the matched step is returned."""
    assert totp.match_step(RFC_SECRET, code, 1234567890) == 41152263 + offset


@pytest.mark.parametrize("code", ["186057", "240500"])
def test_window_refuses_two_steps_away(code):
    """security.md 14: T-2 and T+2 are refused."""
    assert totp.match_step(RFC_SECRET, code, 1234567890) is None


@pytest.mark.parametrize("code,expected", [("186057", -2), ("240500", 2), ("123456", None)])
def test_clock_offset_is_only_a_hint(code, expected):
    """A code from a mis-set phone clock is recognised (for a hint) but never accepted."""
    assert totp.clock_offset_steps(RFC_SECRET, code, 1234567890) == expected
    assert totp.match_step(RFC_SECRET, code, 1234567890) is None


def test_provisioning_uri_follows_key_uri_format(app):
    """security.md 6: scheme, host, label Issuer:account, unpadded secret, issuer param equals prefix."""
    secret = totp.new_secret()
    uri = totp.provisioning_uri(secret, "alice@example.com", "twostep")
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    assert unquote(parts.path) == "/twostep:alice@example.com"
    assert re.fullmatch(r"[A-Z2-7]+", query["secret"][0]) and "%3D" not in uri.upper()
    assert query["issuer"] == ["twostep"]
    assert set(query) == {"secret", "issuer"}
    assert pyotp.parse_uri(uri).at(1234567890) == pyotp.TOTP(secret).at(1234567890)


def test_label_round_trips_awkward_account():
    """security.md 7: a/b:c@d e?x#y&z% survives build and parse; '/' and ':' are percent-encoded."""
    account = "a/b:c@d e?x#y&z%"
    uri = totp.provisioning_uri(RFC_SECRET, account, "Acme Co")
    parts = urlsplit(uri)
    issuer_enc, account_enc = parts.path.lstrip("/").split(":")
    assert unquote(account_enc) == account and unquote(issuer_enc) == "Acme Co"
    assert "/" not in account_enc and ":" not in account_enc
    parsed = pyotp.parse_uri(uri)
    assert parsed.name == account and parsed.issuer == "Acme Co"


def test_an_issuer_with_query_characters_round_trips_in_the_issuer_parameter():
    """security.md 6, 7: the issuer parameter equals the label's prefix even for an issuer the configuration
    allows with '&', '+', '#' or '=' (only ':' is refused): unencoded, "Smith & Sons" would read as "Smith "."""
    issuer = "Smith & Sons+Co #1 =x"
    uri = totp.provisioning_uri(RFC_SECRET, "alice@example.com", issuer)
    query = parse_qs(urlsplit(uri).query)
    assert query["issuer"] == [issuer] and query["secret"] == [RFC_SECRET]
    assert pyotp.parse_uri(uri).issuer == issuer


@pytest.mark.parametrize("issuer", ["bad:issuer", "", "x" * 65])
def test_issuer_with_colon_is_rejected_at_config_load(issuer):
    """security.md 7: an issuer that cannot round-trip stops start-up."""
    with pytest.raises(ConfigError):
        validate({"SECRET_KEY": "k" * 40, "DATABASE_URL": "sqlite://", "TOTP_ISSUER": issuer,
                  "TOTP_ENCRYPTION_KEYS": "aPn4xQzeWv7mBHRzV2bnBHQc4GzbBX7k6cXtGn4UNnM="})


def test_qr_svg_is_inline_and_self_contained():
    """security.md 11: the QR code is inline SVG with no external reference."""
    svg = totp.qr_svg(totp.provisioning_uri(RFC_SECRET, "a@example.com", "twostep"))
    assert svg.startswith("<svg") and "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_qr_svg_strokes_cover_exactly_the_dark_modules():
    """security.md 6: the SVG written from segno's matrix shows every dark module and nothing else, inside a
    white quiet zone of four modules (the browser suite also decodes it with zxing-cpp and zbar)."""
    import re

    uri = totp.provisioning_uri(RFC_SECRET, "someone.with.a.long.name@example.com", "twostep")
    svg = totp.qr_svg(uri)
    matrix = totp.qr_code(uri).matrix
    drawn = set()
    for x, y, length in re.findall(r"M(\d+) (\d+)\.5h(\d+)", re.search(r'class="qrline"[^>]*d="([^"]+)"', svg).group(1)):
        drawn.update((int(x) + k - 4, int(y) - 4) for k in range(int(length)))
    dark = {(x, y) for y, row in enumerate(matrix) for x, v in enumerate(row) if v & 1}
    assert drawn == dark and len(dark) > 400
    size = len(matrix) + 8
    assert f'width="{size * 5}" height="{size * 5}"' in svg and f'd="M0 0h{size}v{size}h-{size}z"' in svg


def test_group_key_reads_in_fours():
    assert totp.group_key(RFC_SECRET) == "GEZD GNBV GY3T QOJQ GEZD GNBV GY3T QOJQ"


def test_secret_encryption_round_trip_and_rotation(app):
    """security.md 4: ciphertext hides the secret; a rotated key list still decrypts and re-encrypts."""
    from cryptography.fernet import Fernet

    with app.app_context():
        token = totp.encrypt_secret(RFC_SECRET)
        assert RFC_SECRET not in token
        assert base64.b32decode(RFC_SECRET) not in base64.urlsafe_b64decode(token)
        assert totp.decrypt_secret(token) == RFC_SECRET
        old_key = app.config["TOTP_ENCRYPTION_KEYS"]
        new_key = Fernet.generate_key().decode()
        app.config["TOTP_ENCRYPTION_KEYS"] = f"{new_key},{old_key}"
        assert totp.decrypt_secret(token) == RFC_SECRET
        rotated = totp.reencrypt_secret(token)
        app.config["TOTP_ENCRYPTION_KEYS"] = new_key
        assert totp.decrypt_secret(rotated) == RFC_SECRET
        with pytest.raises(totp.SecretError):
            totp.decrypt_secret(token)
