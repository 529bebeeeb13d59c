"""Reads through Flask's context proxies per request of a step, and where they are made (a dev tool).

    .venv/bin/python bench/proxy_reads.py            # the code step and User Settings
    .venv/bin/python bench/proxy_reads.py settings   # one of them

Each attribute read through `request`, `session`, `g`, `current_app` or flask-login's `current_user` goes
through werkzeug's LocalProxy (~0.6 µs, against ~0.03 on the object itself: docs/performance.md). This counts
them by wrapping the lookup that every such read takes, after the same seeding and warm-up as
bench/instructions.py, and names the function each read was made in.
"""
import collections
import os
import shutil
import sys
import tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
REQUESTS = 100


def count(step):
    import logging

    import werkzeug.local
    from cryptography.fernet import Fernet

    import profile as pool_tools  # bench/profile.py: environ_for, call
    import run

    tmp = tempfile.mkdtemp(prefix="twostep-proxy-reads-")
    url = "sqlite:///" + os.path.join(tmp, "app.db")
    os.environ.update({"DATABASE_URL": url, "SECRET_KEY": "k" * 64, "TOTP_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                       "TWOSTEP_INSTANCE": os.path.join(tmp, "inst")})
    seeder = run.Seeder(url, os.environ["SECRET_KEY"], os.environ["TOTP_ENCRYPTION_KEYS"], os.path.join(tmp, "inst"))
    run.seed_people(seeder, 1, 3 * REQUESTS, "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$" + "x" * 22, admin_ids={1})
    logging.getLogger("twostep").setLevel(logging.WARNING)
    pools, app = run.Pools(seeder), seeder.app
    if step == "verify":
        lines, expect = pools.verify(list(range(2, 2 * REQUESTS + 2))), 302
    elif step == "settings":
        lines, expect = pools.signed_in(list(range(2, REQUESTS + 2)), "/settings") * 2, 200
    else:
        raise SystemExit(f"unknown step {step!r}: verify or settings")
    prepared = [pool_tools.environ_for(line) for line in lines]
    warm, measured = prepared[:REQUESTS], prepared[REQUESTS:2 * REQUESTS]
    for env, body in warm:
        pool_tools.call(app, env, body)

    where = collections.Counter()
    lookup = werkzeug.local._ProxyLookup.__get__

    def counted(self, instance, owner=None):
        if instance is not None:
            caller = sys._getframe(1).f_code
            where[f"{caller.co_filename.rpartition('site-packages/')[2]}:{caller.co_name}"] += 1
        return lookup(self, instance, owner)

    werkzeug.local._ProxyLookup.__get__ = counted
    try:
        wrong = sum(pool_tools.call(app, env, body) != expect for env, body in measured)
    finally:
        werkzeug.local._ProxyLookup.__get__ = lookup
        seeder.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if wrong:
        raise SystemExit(f"{wrong} of {len(measured)} {step} requests did not answer {expect}")
    print(f"{step}: {sum(where.values()) / len(measured):.1f} reads through Flask's proxies a request")
    for place, n in where.most_common():
        print(f"  {n / len(measured):5.1f}  {place.replace(os.path.dirname(BENCH) + '/', '')}")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["verify", "settings"]:
        count(name)
