"""Instructions per request of a step, counted by valgrind's callgrind in one process (a dev tool).

    .venv/bin/python bench/instructions.py settings verify hello    # needs valgrind (apt-get install valgrind)

Each step runs twice under callgrind, with 20 and with 220 measured requests after the same seeding and
warm-up; the difference over 200 is what one request costs, with the start-up left out. Unlike CPU time it
hardly depends on what else the machine is doing: two runs of the same code differ by about 0.4 % side by
side and 1 % an hour apart (the random keys and tokens of each seeding, the time on the pages): measure the
old and the new code one after the other. User Settings views are replayed (every person's page once as a
warm-up, then again), as the bench's pools replay them; each code step is a different person's first.
Under gunicorn a request costs more than this (the server, and four processes sharing the caches), so a
change is judged here first and then with bench/ab.py.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
PEOPLE = 300


def run_requests(step, count):
    """Seed, warm up, then send `count` requests of `step` (in the process valgrind watches)."""
    import logging

    from cryptography.fernet import Fernet

    import hello
    import profile as pool_tools  # bench/profile.py: environ_for, call
    import run

    tmp = tempfile.mkdtemp(prefix="twostep-instructions-")
    secret_key, fernet = "k" * 64, Fernet.generate_key().decode()
    url = "sqlite:///" + os.path.join(tmp, "app.db")
    os.environ.update({"DATABASE_URL": url, "SECRET_KEY": secret_key, "TOTP_ENCRYPTION_KEYS": fernet,
                       "TWOSTEP_INSTANCE": os.path.join(tmp, "inst")})
    seeder = run.Seeder(url, secret_key, fernet, os.path.join(tmp, "inst"))
    pw_hash = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$" + "x" * 22  # no password step is measured here
    run.seed_people(seeder, 1, PEOPLE * 2 + 100, pw_hash, admin_ids={1})
    logging.getLogger("twostep").setLevel(logging.WARNING)  # as bench/profile.py: no audit lines on the console
    pools, ids, app = run.Pools(seeder), list(range(2, PEOPLE * 2 + 100)), seeder.app
    if step == "verify":
        lines, expect, replayed = pools.verify(ids[:PEOPLE]), 302, False
    elif step == "settings":
        lines, expect, replayed = pools.signed_in(ids[:PEOPLE], "/settings"), 200, True
    elif step == "hello":
        app, lines, expect, replayed = hello.app, [run.pool_line("GET", "/")] * PEOPLE, 200, True
    else:
        raise SystemExit(f"unknown step {step!r}: verify, settings or hello")
    prepared = [pool_tools.environ_for(line) for line in lines]
    warm, todo = (prepared, prepared[:count]) if replayed else (prepared[:30], prepared[30:30 + count])
    for env, body in warm:
        pool_tools.call(app, env, body)
    wrong = sum(pool_tools.call(app, env, body) != expect for env, body in todo)
    seeder.close()
    shutil.rmtree(tmp, ignore_errors=True)
    if wrong:
        raise SystemExit(f"{wrong} of {count} {step} requests did not answer {expect}")


def counted(step, count):
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          __file__, "--run", step, str(count)], capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode or not found:
        raise SystemExit(out.stderr[-2000:])
    return int(found.group(1))


def main():
    if sys.argv[1:2] == ["--run"]:
        return run_requests(sys.argv[2], int(sys.argv[3]))
    for step in sys.argv[1:] or ["settings", "verify"]:
        per_request = (counted(step, 220) - counted(step, 20)) / 200
        print(f"{step:10} {per_request / 1e6:6.3f} M instructions a request")


if __name__ == "__main__":
    main()
