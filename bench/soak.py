"""Soak test (not part of `make bench`): SECONDS of mixed load in 30 s wrk windows (bench/soak.lua), sampling
between windows each worker's RSS and open descriptors, the SQLite -wal size, the row counts of the tables
that expire, the log's size and WARNING/ERROR lines, and each window's requests/s, p50, p99, server CPU per
request and status classes per kind of request. Reuses bench/run.py's seeding and request pools: real code
steps (new sessions, known browsers, audit records) from a different third of the people each window,
password steps, wrong passwords and wrong codes, from many X-Forwarded-For networks (PROXY_HOPS=1).

    PYTHONPATH=. .venv/bin/python bench/soak.py sqlite:////tmp/soak/app.db 7083 720 /tmp/soak

Environment: SOAK_USERS (30000), SOAK_VERIFY_PER_WINDOW (7000; 3 windows' worth must fit in SOAK_USERS),
SOAK_PURGE (PURGE_INTERVAL_SECONDS, 60), SOAK_IDLE (seconds of /healthz probes after the load, so the
purge goes on; 0), SOAK_KEEP=1 leaves gunicorn running. Samples go to OUTDIR/samples.jsonl."""
import datetime
import json
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run as B
from cryptography.fernet import Fernet

URL, PORT, SECONDS, OUT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
N = int(os.environ.get("SOAK_USERS", "30000"))
PER_WINDOW = int(os.environ.get("SOAK_VERIFY_PER_WINDOW", "7000"))
WINDOW = 30
os.makedirs(OUT, exist_ok=True)
rng = random.Random(11)
log = B.log
keys = {"secret_key": secrets.token_urlsafe(48), "fernet": Fernet.generate_key().decode()}
inst = os.path.join(OUT, "inst")
seeder = B.Seeder(URL, keys["secret_key"], keys["fernet"], inst)
pw_hash = B.password_hash()
log(f"seeding {N} people")
B.seed_people(seeder, 1, N, pw_hash, admin_ids={1})
pools = B.Pools(seeder)
ids = list(range(2, N + 1)); rng.shuffle(ids)
groups = [ids[k * PER_WINDOW:(k + 1) * PER_WINDOW] for k in range(3)]   # verify: group k%3 in window k
wrongcode_ids = ids[3 * PER_WINDOW:3 * PER_WINDOW + 2000]
rest = ids[3 * PER_WINDOW + 2000:]
attackers = [f"203.0.113.{i}" for i in range(1, 6)]
clients = [f"10.{i // 250}.{i % 250}.{rng.randrange(1, 250)}" for i in range(3000)]

def ip(): return rng.choice(clients)
def tag(line, kind, xff): return line + "\t" + kind + "\t" + xff
def fresh_now(): seeder.now = datetime.datetime.utcnow().replace(microsecond=0)

fresh_now()
settings = pools.signed_in(rest[:300], "/settings")
search = pools.signed_in([1] * 300, lambda _u, it=iter(B.search_prefixes(N, 300, rng)): f"/support?q={next(it)}", htmx=True)
pw_ok = pools.password(rest[600:900], sessions=100)
bad_sessions = [seeder.session() for _ in range(200)]
from webapp.models import ServerSession  # noqa: E402 (after run.py put the checkout on the path)
seeder.insert_rows(ServerSession, [r for _, _, r in bad_sessions])
qr = []

def pw_bad_line(k):
    token, csrf, _ = bad_sessions[k % len(bad_sessions)]
    email = B.email_for(rng.choice(rest)) if k % 3 else f"nobody{k}@example.org"
    body = f"csrf_token={csrf}&email={email.replace('@', '%40')}&password=wrong+password+{k}"
    xff = rng.choice(attackers) if k % 2 else f"198.18.{(k // 250) % 250}.{k % 250 + 1}"
    return tag(B.pool_line("POST", "/login", pools.cookie(token), body), "pwbad", xff)

pwbad_k = [0]
def window_pool(k):
    global qr
    fresh_now()
    if k % 10 == 0:
        qr = pools.enrolling(rest[300:600])  # pending enrolments live 15 min
    verify = pools.verify(groups[k % 3])
    wc_ids = [wrongcode_ids[(k * 100 + j) % len(wrongcode_ids)] for j in range(100)]
    wrong = [l.replace("code=CODE", "code=123456").rsplit("\t", 2)[0] + "\t\t" for l in pools.verify(wc_ids)]
    pattern = (["verify"] * 60 + ["settings"] * 56 + ["login"] * 40 + ["qr"] * 20 + ["search"] * 18
               + ["pwok"] * 1 + ["pwbad"] * 1 + ["codebad"] * 4)
    rng.shuffle(pattern)
    lines, v, cur = [], 0, {"settings": 0, "qr": 0, "search": 0, "pwok": 0, "codebad": 0}
    src = {"settings": settings, "qr": qr, "search": search, "pwok": pw_ok, "codebad": wrong}
    while v < len(verify):
        for kind in pattern:
            if kind == "verify":
                if v >= len(verify): break
                lines.append(tag(verify[v], "verify", ip())); v += 1
            elif kind == "login":
                lines.append(tag(B.pool_line("GET", "/login"), "login", ip()))
            elif kind == "pwbad":
                lines.append(pw_bad_line(pwbad_k[0])); pwbad_k[0] += 1
            else:
                s = src[kind]; lines.append(tag(s[cur[kind] % len(s)], kind, ip())); cur[kind] += 1
    return B.write_pool(os.path.join(OUT, "pool.txt"), lines)

# ------------------------------------------------------------------ server
env = {**os.environ, "DATABASE_URL": URL, "SECRET_KEY": keys["secret_key"], "TOTP_ENCRYPTION_KEYS": keys["fernet"],
       "TWOSTEP_INSTANCE": inst, "PROXY_HOPS": "1", "WEB_CONCURRENCY": "4",
       "PURGE_INTERVAL_SECONDS": os.environ.get("SOAK_PURGE", "60"), "PYTHONPATH": B.ROOT}
env.pop("TWOSTEP_PRODUCTION", None)
logpath = os.path.join(OUT, "gunicorn.log")
logfh = open(logpath, "wb")
proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "gunicorn"), "--config",
                         os.path.join(B.ROOT, "gunicorn.conf.py"), "--bind", f"127.0.0.1:{PORT}", "--chdir", B.ROOT,
                         "wsgi:app"], env=env, stdout=logfh, stderr=subprocess.STDOUT, start_new_session=True)
open(os.path.join(OUT, "gunicorn.pid"), "w").write(str(proc.pid))
import urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=5); break
    except Exception:
        time.sleep(0.2)

TABLES = ["serversession", "signinchallenge", "knownbrowser", "networkcounter", "auditevent", "pendingenrolment"]
def counts():
    if URL.startswith("sqlite"):
        c = sqlite3.connect(f"file:{URL[len('sqlite:///'):]}?mode=ro", uri=True, timeout=10)
        try: return {t: c.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in TABLES}
        finally: c.close()
    import psycopg
    with psycopg.connect(URL) as c:
        return {t: c.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in TABLES} | {
            "db_bytes": c.execute("SELECT pg_database_size(current_database())").fetchone()[0]}

def workers():
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.split()
    res = {}
    for p in out:
        try:
            rss = int([l for l in open(f"/proc/{p}/status") if l.startswith("VmRSS")][0].split()[1])
            res[p] = (rss, len(os.listdir(f"/proc/{p}/fd")))
        except OSError: pass
    return res

def wal():
    if not URL.startswith("sqlite"): return None
    try: return os.path.getsize(URL[len("sqlite:///"):] + "-wal")
    except OSError: return 0

def logstats():
    size = os.path.getsize(logpath)
    warn = err = purge = 0
    with open(logpath, errors="replace") as fh:
        for line in fh:
            if " WARNING " in line or "[WARNING]" in line: warn += 1
            if " ERROR " in line or "[ERROR]" in line or "Traceback" in line: err += 1
            if "purged expired rows" in line: purge += 1
    return size, warn, err, purge

def server_cpu():
    total = 0
    for p in [str(proc.pid)] + list(workers()):
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError): pass
    return total / os.sysconf("SC_CLK_TCK")

samples = []
def sample(label, w=None):
    s = {"t": round(time.monotonic() - T0), "label": label, "workers": workers(), "wal": wal(), "rows": counts(),
         "log": logstats()}
    if w: s["wrk"] = w
    samples.append(s)
    with open(os.path.join(OUT, "samples.jsonl"), "a") as fh: fh.write(json.dumps(s) + "\n")
    rs = s["workers"]
    line = (f"t={s['t']:4d} {label:7} rss={sorted(v[0] // 1024 for v in rs.values())}MB fds={sorted(v[1] for v in rs.values())} "
            f"wal={s['wal']} rows={s['rows']} log={s['log']}")
    if w: line += (f" rps={w['requests'] / (w['duration_us'] / 1e6):.0f} p50={w['p50_us'] / 1000:.1f} p99={w['p99_us'] / 1000:.1f}"
                   f" cpu/req={w['cpu_ms_per_req']}ms sockerr={w['socket_errors']} to={w['timeouts']} miss={w['verify_not_signed_in']} wrap={w['wrapped']}"
                   f" kinds={w['kinds']} {w['first_verify_miss'][:120]}")
    print(line, flush=True)

T0 = time.monotonic()
try:
    sample("start")
    k = 0
    while time.monotonic() - T0 < SECONDS:
        pool = window_pool(k)
        cpu0 = server_cpu()
        outj = os.path.join(OUT, f"wrk-{k}.json")
        subprocess.run(["wrk", "-t", "8", "-c", "8", "-d", f"{WINDOW}s", "--timeout", "10s", "-s",
                        os.path.join(B.BENCH, "soak.lua"), f"http://127.0.0.1:{PORT}"],
                       env={**os.environ, "POOL_FILE": pool, "OUT": outj, "NTHREADS": "8"},
                       check=True, capture_output=True, timeout=WINDOW + 60)
        w = json.load(open(outj, errors="replace"))
        w["cpu_ms_per_req"] = round((server_cpu() - cpu0) * 1000 / max(w["requests"], 1), 3)
        sample(f"w{k}", w)
        k += 1
    # after the load: probes only (a load balancer's health check every 2 s), so the purge still runs
    idle = int(os.environ.get("SOAK_IDLE", "0"))
    end = time.monotonic() + idle
    nxt = time.monotonic()
    while time.monotonic() < end:
        for _ in range(10):
            try: urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=5).read()
            except Exception as exc: print("healthz", exc)
            time.sleep(2)
        if time.monotonic() >= nxt:
            sample("idle"); nxt = time.monotonic() + 30
    if os.environ.get("SOAK_KEEP") != "1":
        proc.send_signal(signal.SIGTERM); proc.wait(timeout=30)
finally:
    if proc.poll() is None and os.environ.get("SOAK_KEEP") != "1":
        os.killpg(proc.pid, signal.SIGKILL)
    seeder.close()
