"""In-process cost per request: CPU milliseconds and SQL statements for each benchmarked step, with no HTTP
server or load generator in the way (steadier than wall-clock figures on a busy machine).

    .venv/bin/python bench/profile.py            # table of CPU ms/request and queries/request
    .venv/bin/python bench/profile.py verify     # plus a pyinstrument profile of one step (pip install pyinstrument)
    PROFILE_STEPS=verify,settings PROFILE_REPEAT=3 .venv/bin/python bench/profile.py   # some steps, best of 3

The same seeding and session preparation as bench/run.py; requests go straight to the WSGI callable.
"""
import io
import os
import shutil
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run  # noqa: E402  (bench/run.py: seeding and request pools)

N = int(os.environ.get("PROFILE_REQUESTS", "400"))
STEPS = [s for s in os.environ.get("PROFILE_STEPS", "").split(",") if s]
REPEAT = int(os.environ.get("PROFILE_REPEAT", "1"))  # the best of several runs: the machine may be busy


def environ_for(line):
    """A WSGI environ for one pool line (method, path, cookie, body, htmx, base_step, codes)."""
    from werkzeug.test import EnvironBuilder

    method, path, cookie, body, htmx, base_step, codes = (line.split("\t") + [""] * 7)[:7]
    if base_step:
        import time as _t

        # Only the placeholder at the end: the signed CSRF token before it can contain the letters CODE too.
        body = body.removesuffix("CODE") + codes.split(",")[int(_t.time()) // 30 - int(base_step)]
    headers = {}
    if cookie:
        headers["Cookie"] = cookie
    if htmx == "1":
        headers["HX-Request"] = "true"
    builder = EnvironBuilder(path=path, method=method, headers=headers, data=body or None,
                             content_type="application/x-www-form-urlencoded" if method == "POST" else None)
    env = builder.get_environ()
    env["REMOTE_ADDR"] = "127.0.0.1"
    return env, (body or "").encode()


def call(app, env, body):
    env = dict(env)
    env["wsgi.input"] = io.BytesIO(body)
    status = []
    out = app(env, lambda s, h, exc_info=None: status.append(s))
    for _ in out:
        pass
    if hasattr(out, "close"):
        out.close()
    return int(status[0].split()[0])


def measure(app, lines, expect, counter):
    """CPU ms per request and SQL statements per request over the given lines (each used once)."""
    prepared = [environ_for(line) for line in lines]
    counter[0] = 0
    cpu = time.process_time()
    wall = time.perf_counter()
    bad = 0
    for env, body in prepared:
        if call(app, env, body) != expect:
            bad += 1
    n = len(prepared)
    return {"cpu_ms": round((time.process_time() - cpu) / n * 1000, 3),
            "wall_ms": round((time.perf_counter() - wall) / n * 1000, 3),
            "queries": round(counter[0] / n, 2), "unexpected": bad}


def main():
    from cryptography.fernet import Fernet
    import secrets

    tmp = tempfile.mkdtemp(prefix="twostep-profile-")
    keys = {"secret_key": secrets.token_urlsafe(48), "fernet": Fernet.generate_key().decode()}
    url = "sqlite:///" + os.path.join(tmp, "app.db")
    os.environ.update({"DATABASE_URL": url, "SECRET_KEY": keys["secret_key"], "TOTP_ENCRYPTION_KEYS": keys["fernet"],
                       "TWOSTEP_INSTANCE": os.path.join(tmp, "inst")})
    users = N * 3 + 10
    seeder = run.Seeder(url, keys["secret_key"], keys["fernet"], os.path.join(tmp, "inst"))
    pw_hash = "$argon2id$v=19$m=8,t=1,p=1$" + "c2FsdHNhbHQ" + "$" + "x" * 22  # unused: no password step here
    run.seed_people(seeder, 1, users, pw_hash, admin_ids={1})
    pools = run.Pools(seeder)
    ids = list(range(2, users + 1))

    from webapp.db import db

    app = seeder.app
    import logging

    logging.getLogger("twostep").setLevel(logging.WARNING)  # no audit lines on the console while measuring
    counter = [0]
    original = db.obj.execute_sql

    def counting(sql, params=None):
        counter[0] += 1
        return original(sql, params)

    db.obj.execute_sql = counting

    sys.path.insert(0, BENCH)
    import hello

    steps = {
        "hello": (hello.app, [run.pool_line("GET", "/")] * N, 200),
        "login_page": (app, [run.pool_line("GET", "/login")] * N, 200),
        "verify": (app, pools.verify(ids[:N]), 302),
        "settings": (app, pools.signed_in(ids[N:2 * N], "/settings"), 200),
        "qr": (app, pools.enrolling(ids[N:2 * N]), 200),
        "support_search": (app, pools.signed_in([1] * N, lambda _u, it=iter(
            run.search_prefixes(users, N, __import__("random").Random(1))): f"/support?q={next(it)}", htmx=True), 200),
    }
    only = sys.argv[1] if len(sys.argv) > 1 else None
    hello_cpu = None
    print(f"{'step':16} {'cpu ms':>8} {'wall ms':>8} {'queries':>8} {'x hello':>8} {'unexpected':>10}")
    for name, (target, lines, expect) in steps.items():
        if (only and name not in (only, "hello")) or (STEPS and name not in STEPS + ["hello"]):
            continue
        call(target, *environ_for(lines[0]))  # warm up (template compilation etc.), uses one line
        lines = lines[1:]
        if only == name:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0002)
            profiler.start()
            r = measure(target, lines, expect, counter)
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False, show_all=False))
        else:
            # Each run needs fresh lines (a code is accepted once): split them between the runs.
            size = len(lines) // REPEAT
            runs = [measure(target, lines[k * size:(k + 1) * size], expect, counter) for k in range(REPEAT)]
            r = min(runs, key=lambda x: x["cpu_ms"])
        if name == "hello":
            hello_cpu = r["cpu_ms"]
        print(f"{name:16} {r['cpu_ms']:8.3f} {r['wall_ms']:8.3f} {r['queries']:8.2f} "
              f"{r['cpu_ms'] / hello_cpu:8.1f} {r['unexpected']:10d}")
    seeder.close()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
