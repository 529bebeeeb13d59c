"""Compare two checkouts of twostep side by side under gunicorn, with hello between them (a dev tool).

    .venv/bin/python bench/ab.py /path/to/checkout-A /path/to/checkout-B     # code step and User Settings

One change is hard to judge from two `make bench` runs: this machine's speed drifts by a tenth or more
within a minute. Here each checkout seeds its own database with its own code (schema changes count), then
hello, A and B take turns in WINDOW-second windows (A and B swap places every round), and the medians are
printed side by side. All three servers run with this script's Python and this checkout's gunicorn.conf.py.
Environment: AB_ROUNDS (7), AB_USERS (60000), BENCH_WINDOW_SECONDS (3), BENCH_WORKERS (4).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run  # noqa: E402  (bench/run.py: servers, wrk and pools)

ROUNDS = int(os.environ.get("AB_ROUNDS", "7"))
USERS = int(os.environ.get("AB_USERS", "60000"))


def prepare(root, out):
    """Seed a database and write the request pools in `out`, in a child process that imports `root`'s code."""
    subprocess.run([sys.executable, __file__, "--prepare", root, out], check=True)


def _prepare_here(root, out):
    sys.path[:] = [os.path.join(root, "bench"), root] + [p for p in sys.path if os.path.abspath(p) != BENCH]
    for name in [m for m in sys.modules if m == "run" or m == "webapp" or m.startswith("webapp.")]:
        del sys.modules[name]
    import random
    import secrets

    import run as their_run
    from cryptography.fernet import Fernet

    keys = {"secret_key": secrets.token_urlsafe(48), "fernet": Fernet.generate_key().decode()}
    seeder = their_run.Seeder("sqlite:///" + os.path.join(out, "app.db"), keys["secret_key"], keys["fernet"],
                              os.path.join(out, "inst"))
    import webapp

    if not webapp.__file__.startswith(os.path.abspath(root)):
        sys.exit(f"imported {webapp.__file__}, not the checkout {root}")
    their_run.seed_people(seeder, 1, USERS, their_run.password_hash(), admin_ids={1})
    pools = their_run.Pools(seeder)
    ids = list(range(2, USERS + 1))
    random.Random(1).shuffle(ids)
    verify = pools.verify(ids[:USERS * 3 // 4])
    per = len(verify) // (ROUNDS + 1)
    for k in range(ROUNDS + 1):
        their_run.write_pool(os.path.join(out, f"verify-{k}.txt"), verify[k * per:(k + 1) * per])
    their_run.write_pool(os.path.join(out, "settings.txt"),
                         pools.signed_in(ids[USERS * 3 // 4:USERS * 3 // 4 + 500], "/settings"))
    with open(os.path.join(out, "keys.json"), "w", encoding="utf-8") as fh:
        json.dump(keys, fh)
    seeder.close()


def main(root_a, root_b):
    tmp = tempfile.mkdtemp(prefix="twostep-ab-")
    sides = {"A": os.path.abspath(root_a), "B": os.path.abspath(root_b)}
    servers = {}
    hello = run.Server("hello:app", {**os.environ}, BENCH, os.path.join(tmp, "hello.log"))
    try:
        for name, root in sides.items():
            out = os.path.join(tmp, name)
            os.makedirs(out)
            run.log(f"{name}: seeding {USERS} people with {root}")
            prepare(root, out)
            with open(os.path.join(out, "keys.json"), encoding="utf-8") as fh:
                keys = json.load(fh)
            env = run.server_env("sqlite:///" + os.path.join(out, "app.db"), keys, out, "server")
            servers[name] = run.Server("wsgi:app", env, root, os.path.join(out, "gunicorn.log"))
        hello_pool = run.write_pool(os.path.join(tmp, "hello.txt"), [run.pool_line("GET", "/")])
        for step in ("verify", "settings"):
            run.log(f"{step}: {ROUNDS} rounds of hello, A and B (the first round is a warm-up)")
            results, order = {"A": [], "B": [], "hello": []}, ["A", "B"]
            for k in range(ROUNDS + 1):
                results["hello"].append(run.wrk(hello, hello_pool, 200, tmp=tmp, seconds=run.WINDOW))
                for name in order:
                    out = os.path.join(tmp, name)
                    if step == "verify":
                        r = run.wrk(servers[name], os.path.join(out, f"verify-{k}.txt"), 302,
                                    expect_location="/settings", tmp=tmp, seconds=run.WINDOW)
                    else:
                        r = run.wrk(servers[name], os.path.join(out, "settings.txt"), 200, tmp=tmp,
                                    seconds=run.WINDOW)
                    results[name].append(r)
                order.reverse()
            hello_rps = run.median(r["ok_rps"] for r in results["hello"][1:])
            hello_cpu = run.median(r["server_cpu_ms_per_request"] for r in results["hello"][1:])
            for name in ("A", "B"):
                runs = results[name][1:]
                rps = run.median(r["ok_rps"] for r in runs)
                cpu = run.median(r["server_cpu_ms_per_request"] for r in runs)
                busy = run.median(r["machine_busy_pct"] for r in runs)
                wrapped = sum(r["pool_wrapped"] for r in runs) if step == "verify" else 0
                print(f"{step:9} {name}: {rps:7.1f} requests/s = {rps / hello_rps:.3f} x hello; "
                      f"{cpu:.3f} ms CPU = {hello_cpu / cpu:.3f}; busy {busy} %;"
                      f" not ok {sum(r['unexpected'] for r in runs)}" + (" POOL RAN OUT" if wrapped else ""),
                      flush=True)
            print(f"{step:9} hello: {hello_rps:.1f} requests/s, {hello_cpu:.3f} ms CPU", flush=True)
    finally:
        hello.stop()
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--prepare":
        _prepare_here(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
