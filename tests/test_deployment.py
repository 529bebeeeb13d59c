"""The documented production set-up (README "Deployment"): gunicorn with gunicorn.conf.py, configured from the
environment, behind exactly PROXY_HOPS reverse proxies."""
import os

import pytest

from webapp.models import AuditEvent

from .conftest import PASSWORD
from .live_app import ROOT, Browser, LiveServer


def _rejected_password_ip(app, server, forwarded_for):
    """Send a wrong password through `server` claiming X-Forwarded-For, return the IP the audit log recorded."""
    status, _, body = Browser(server).post("/login", {"email": "alice@example.com", "password": "wrong " + PASSWORD},
                                           headers={"X-Forwarded-For": forwarded_for})
    assert status == 200 and "Incorrect email address or password." in body
    with app.app_context():
        event = (AuditEvent.select().where(AuditEvent.kind == "password_rejected")
                 .order_by(AuditEvent.id.desc()).first())
    return event.ip


@pytest.mark.parametrize("hops, expected", [("1", "203.0.113.7"), ("0", "127.0.0.1")])
def test_proxy_hops_from_the_environment_decide_which_client_address_is_believed(app, actor, tmp_path, hops, expected):
    """security.md 41, 44: with PROXY_HOPS=1 (one proxy in front) the address the proxy appended is the client;
    with 0 (no proxy) a client's own X-Forwarded-For is ignored and the socket address counts."""
    actor.user()
    server = LiveServer(app, workers=2, log_dir=str(tmp_path), extra_env={"PROXY_HOPS": hops})
    try:
        assert _rejected_password_ip(app, server, "203.0.113.7") == expected
    finally:
        server.stop()
    assert "Traceback" not in server.read_log()


def test_gunicorn_hides_the_preloaded_app_from_the_workers_garbage_collector():
    """gunicorn.conf.py freezes the master's objects before each fork: a worker's full garbage collection
    then walks only its own objects (~50 ms less per full collection, a pause a request would wait
    through)."""
    import gc
    import runpy

    conf = runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py"))
    before = gc.get_freeze_count()
    try:
        conf["pre_fork"](None, None)
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
