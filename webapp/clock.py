"""The one clock the app reads; tests replace it through app.config["CLOCK"]."""
import time
from datetime import datetime, timezone

from flask import current_app, has_app_context

try:
    # The application context itself: asking Flask's current_app proxy (and has_app_context before it) cost two
    # reads through Flask's proxies a call, and a code step reads the time 11 times (docs/performance.md
    # "Reads through Flask's proxies"). A name of Flask's own (3.x), hence the fallback.
    from flask.globals import _cv_app
except ImportError:  # another Flask: through its proxies
    _cv_app = None


def timestamp():
    """Return the current Unix time in seconds, from the injected clock when one is configured."""
    if _cv_app is not None:
        context = _cv_app.get(None)
        clock = context.app.config.get("CLOCK") if context is not None else None
    else:
        clock = current_app.config.get("CLOCK") if has_app_context() else None
    if clock is not None:
        return float(clock())
    return time.time()


def now():
    """Return the current time as a naive UTC datetime (how every timestamp is stored)."""
    return datetime.fromtimestamp(timestamp(), tz=timezone.utc).replace(tzinfo=None)


def expired(start, limit, current):
    """Whether a time limit of `limit` that began at `start` is over at `current` (datetimes and a timedelta,
    or seconds). Also when `start` lies more than `limit` ahead: only a clock set back since then does that (an
    NTP step, a VM resumed), and the limit would otherwise last as much longer as the clock went back (a code
    step of five minutes for an hour and five). App hosts whose clocks differ by less than `limit` agree."""
    return not -limit <= current - start <= limit
