"""The one clock the app reads; tests replace it through app.config["CLOCK"]."""
import time
from datetime import datetime, timedelta

from . import flaskctx


def timestamp():
    """Return the current Unix time in seconds, from the injected clock when one is configured."""
    # The app without Flask's current_app proxy (and has_app_context before it): two reads through Flask's
    # proxies a call, and a code step reads the time 11 times (webapp/flaskctx.py).
    app = flaskctx.the_app()
    clock = app.config.get("CLOCK") if app is not None else None
    if clock is not None:
        return float(clock())
    return time.time()


_EPOCH = datetime(1970, 1, 1)


def now():
    """Return the current time as a naive UTC datetime (how every timestamp is stored): the epoch plus the
    seconds, the same datetime as datetime.fromtimestamp(seconds, timezone.utc) without its time zone (both
    round to the microsecond half to even; a test compares them), at half the cost of that and the
    replace(tzinfo=None) after it. A request reads the time up to a dozen times."""
    return _EPOCH + timedelta(seconds=timestamp())


def expired(start, limit, current):
    """Whether a time limit of `limit` that began at `start` is over at `current` (datetimes and a timedelta,
    or seconds). Also when `start` lies more than `limit` ahead: only a clock set back since then does that (an
    NTP step, a VM resumed), and the limit would otherwise last as much longer as the clock went back (a code
    step of five minutes for an hour and five). App hosts whose clocks differ by less than `limit` agree."""
    return not -limit <= current - start <= limit
