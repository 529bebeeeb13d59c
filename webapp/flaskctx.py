"""The request, its session, `g`, the app and the signed-in person, read from Flask's context variables once,
for the code that runs on every request. Each attribute read through one of Flask's proxies (`request`,
`session`, `g`, `current_app`; flask-login's `current_user` goes through two of them) costs ~0.6 µs in
werkzeug's LocalProxy against ~0.03 on the object itself, and a code step made ~95 such reads, a User Settings
view 35 (docs/performance.md, "Reads through Flask's proxies" and "The rest of the proxy reads";
bench/proxy_reads.py counts them). The values are the very objects the proxies give; outside a request (or an
app context) these answer None where the proxies would raise. Code that only runs inside a request (the hooks,
the views) uses them at once: misused outside one, it fails with an AttributeError on None rather than
Flask's "Working outside of request context".

`_cv_app` and `_cv_request` are the context variables behind Flask's proxies (flask.globals, Flask 2.2 to
3.1): should an upgrade rename them, the app stops at its first import rather than serving wrongly."""
from flask.globals import _cv_app, _cv_request


def request_context():
    """Flask's RequestContext of this request (its .request, .session, .app), or None."""
    return _cv_request.get(None)


def the_app():
    """The running app (current_app's object), or None."""
    context = _cv_app.get(None)
    return context.app if context is not None else None


def request_g():
    """This app context's `g`, or None."""
    context = _cv_app.get(None)
    return context.g if context is not None else None


def signed_in_user():
    """flask-login's current_user (its _get_user): the person loaded once per request, or the anonymous
    user; None outside a request."""
    if _cv_request.get(None) is None:
        return None
    context = _cv_app.get()
    if "_login_user" not in context.g:
        context.app.login_manager._load_user()
    return context.g._login_user
