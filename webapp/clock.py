"""The one clock the app reads; tests replace it through app.config["CLOCK"]."""
import time
from datetime import datetime, timezone

from flask import current_app, has_app_context


def timestamp():
    """Return the current Unix time in seconds, from the injected clock when one is configured."""
    if has_app_context():
        clock = current_app.config.get("CLOCK")
        if clock is not None:
            return float(clock())
    return time.time()


def now():
    """Return the current time as a naive UTC datetime (how every timestamp is stored)."""
    return datetime.fromtimestamp(timestamp(), tz=timezone.utc).replace(tzinfo=None)
