"""Evidence for fixing the QR mask in totp.qr_svg: segno's automatic mask choice costs most of the QR step.

For many otpauth URIs it renders the QR code with segno's automatic mask and with each fixed mask 0-7, as
PNG in several degraded variants, and counts how many decode back to the exact URI with zxing-cpp and zbarimg;
it also times segno.make. Run: .venv/bin/python bench/qr_masks.py [N]   (zbar-tools and zxing-cpp needed)
"""
import io
import os
import random
import subprocess
import sys
import tempfile
import time

import segno
import zxingcpp
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from webapp.totp import new_secret, provisioning_uri, qr_code  # noqa: E402


def uris(n, rng):
    out = []
    for _ in range(n):
        name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz.-") for _ in range(rng.randint(3, 48)))
        out.append(provisioning_uri(new_secret(), f"{name}@example.com", rng.choice(["twostep", "Example Corp"])))
    return out


def variants(q):
    """As rendered (5 px per module), tiny (2 px and 1.6 px per module), and blurred (sigma 2 and 3 px)."""
    buf = io.BytesIO()
    q.save(buf, kind="png", scale=5, border=4)
    buf.seek(0)
    img = Image.open(buf).convert("L")
    small = img.resize((img.width * 2 // 5, img.height * 2 // 5), Image.BILINEAR)
    tiny = img.resize((img.width * 8 // 25, img.height * 8 // 25), Image.BILINEAR)
    return {"sharp": img, "2px": small, "1.6px": tiny, "blur2": img.filter(ImageFilter.GaussianBlur(2)),
            "blur3": img.filter(ImageFilter.GaussianBlur(3))}


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    rng = random.Random(3)
    sample = uris(n, rng)
    tmpd = tempfile.mkdtemp()
    png = os.path.join(tmpd, "q.png")

    def zbar(img, uri):
        img.save(png)
        out = subprocess.run(["zbarimg", "-q", "--raw", "--nodbus", png], capture_output=True, text=True)
        return out.stdout.strip() == uri

    def zxing(img, uri):
        return any(b.text == uri for b in zxingcpp.read_barcodes(img))

    print(f"{n} otpauth URIs, error level M; counts decoded exactly")
    makers = [(str(mask) if mask is not None else "auto",
               lambda uri, mask=mask: segno.make(uri, error="m", micro=False, mask=mask))
              for mask in [None] + list(range(8))]
    makers.append(("app", qr_code))  # what the wizard serves: webapp.totp.qr_code
    for label, make in makers:
        t = time.perf_counter()
        for uri in sample:
            make(uri)
        make_ms = (time.perf_counter() - t) / n * 1000
        ok = {}
        for uri in sample:
            for vname, img in variants(make(uri)).items():
                for dname, dec in (("zxing", zxing), ("zbar", zbar)):
                    ok[f"{dname}/{vname}"] = ok.get(f"{dname}/{vname}", 0) + dec(img, uri)
        print(f"mask {label:4} make {make_ms:5.2f} ms  " + "  ".join(f"{k} {v}/{n}" for k, v in sorted(ok.items())),
              flush=True)


if __name__ == "__main__":
    main()
