"""The benchmark (`make bench`): throughput and latency of twostep under gunicorn, against a bare Flask app
served with the same settings (bench/hello.py, the framework's ceiling), with wrk as the load generator.

What it does, in one run (a few minutes):
  1. measures the password-hash ceiling (argon2 verifications/s with one process per worker) before and
     after the password step, and takes the mean;
  2. seeds a SQLite database with BENCH_USERS people, each with a device whose secret the bench knows, and
     prepares sessions directly in the database (pending sign-ins with a challenge, signed-in sessions,
     pending enrolments, a fresh admin), so each wrk request is the step being measured;
  3. runs wrk (bench/pool.lua) against hello and the app: sign-in page, code step (valid fresh codes, one
     person per request), password step, User Settings, the wizard's QR step, the Support search;
  4. the Support search again on one million seeded accounts, on SQLite and on PostgreSQL (scripts/pg.sh),
     each after an uncounted warm-up with other search terms;
  5. 60 s of mixed load, counting errors;
  6. prints a table and writes bench/results.json.

Environment: BENCH_WORKERS (4), BENCH_SECONDS (10, each one-million search), BENCH_MIXED_SECONDS (60),
BENCH_PASSWORD_SECONDS (30, the password step), BENCH_CONNECTIONS (8),
BENCH_USERS (120000), BENCH_SEARCH_USERS (1000000), BENCH_SKIP_PG=1 to skip PostgreSQL,
BENCH_PHASES=verify,settings to run only those hello/endpoint pairs (a quick check while working; the
password step, the mixed load and the one-million searches are skipped, and no target is judged),
BENCH_ROUNDS (4) and BENCH_WINDOW_SECONDS (3): how each endpoint is compared with hello (below).

Each ratio to hello comes from ROUNDS rounds, after an uncounted warm-up window of the endpoint: hello for
WINDOW seconds, the endpoint for WINDOW seconds, ..., ending with hello. A round's ratio is the endpoint's
requests/s over the mean of the hello windows on either side of it, and the reported ratio is the median of
the rounds. The machine's speed drifts: hello alone measured 2,009 and 2,731 requests/s twenty seconds
apart, so one hello run next to one endpoint run could move a ratio by a third either way.
"""
import base64
import datetime
import hashlib
import json
import multiprocessing
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
CACHE = os.path.join(BENCH, ".cache")

WORKERS = int(os.environ.get("BENCH_WORKERS", "4"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
MIXED_SECONDS = int(os.environ.get("BENCH_MIXED_SECONDS", "60"))
PASSWORD_SECONDS = int(os.environ.get("BENCH_PASSWORD_SECONDS", "30"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "8"))
WRK_THREADS = 2
# Each code step spends one seeded person (a code is accepted once): 120,000 people give the code step 48,000
# (9,600 a window, 3,200 requests/s) and the mixed load 48,000. 30,000 ran out on a machine where hello
# served 6,000 requests/s: the replayed requests failed and the ratio meant nothing (see pool_exhausted).
USERS = int(os.environ.get("BENCH_USERS", "120000"))
SEARCH_USERS = int(os.environ.get("BENCH_SEARCH_USERS", "1000000"))
PHASES = [p for p in os.environ.get("BENCH_PHASES", "").split(",") if p]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "4"))
WINDOW = int(os.environ.get("BENCH_WINDOW_SECONDS", "3"))
PASSWORD = "bench password 1"
STEP = 30


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- secrets the bench knows

def secret_for(i):
    """The deterministic TOTP secret of seeded person i (160 bits, Base32)."""
    return base64.b32encode(hashlib.sha1(f"twostep-bench-{i}".encode()).digest()).decode()


def codes_from(secret, base_step, count=8):
    """TOTP codes for base_step, base_step+1, ... (the Lua script picks the current one)."""
    import pyotp

    totp = pyotp.TOTP(secret)
    return [totp.generate_otp(base_step + k) for k in range(count)]


def email_for(i):
    return f"user{i:07d}@example.com"


# ---------------------------------------------------------------- the app's database, seeded in bulk

class Seeder:
    """Opens the app (which creates the tables) and writes rows in bulk, bypassing the request cycle."""

    def __init__(self, url, secret_key, fernet_key, instance):
        from webapp import create_app

        self.url = url
        self.app = create_app({"DATABASE_URL": url, "SECRET_KEY": secret_key,
                               "TOTP_ENCRYPTION_KEYS": fernet_key, "INSTANCE_PATH": instance})
        self.secret_key = secret_key
        from itsdangerous import URLSafeTimedSerializer

        self.signer = URLSafeTimedSerializer(secret_key, salt="wtf-csrf-token")
        self.now = datetime.datetime.utcnow().replace(microsecond=0)

    def ctx(self):
        return self.app.app_context()

    def close(self):
        from webapp.db import db

        db.close()

    def insert_rows(self, model, rows):
        """Bulk-insert dicts (field name -> value; other fields get their defaults) into `model`'s table:
        one executemany in one transaction on SQLite, COPY on PostgreSQL."""
        from webapp.db import db

        if not rows:
            return
        with self.ctx():
            fields = [f for f in model._meta.sorted_fields if not (f is model._meta.primary_key
                                                                   and f.name not in rows[0])]
            defaults = {f.name: (f.default() if callable(f.default) else f.default) for f in fields}
            data = [tuple(r.get(f.name, defaults[f.name]) for f in fields) for r in rows]
            cols = ", ".join(f'"{f.column_name}"' for f in fields)
            table = model._meta.table_name
            conn = db.connection()
            if self.url.startswith("sqlite"):
                data = [tuple(str(v) if isinstance(v, datetime.datetime) else v for v in row) for row in data]
                conn.execute("BEGIN")
                conn.executemany(f'INSERT INTO "{table}" ({cols}) VALUES ({", ".join("?" for _ in fields)})', data)
                conn.execute("COMMIT")
            else:
                with conn.cursor() as cur:
                    with cur.copy(f'COPY "{table}" ({cols}) FROM STDIN') as cp:
                        for row in data:
                            cp.write_row(row)
                    pk = model._meta.primary_key
                    if pk.name in rows[0] and isinstance(rows[0][pk.name], int):
                        cur.execute(f"SELECT setval(pg_get_serial_sequence('\"{table}\"', '{pk.column_name}'), "
                                    f'(SELECT max("{pk.column_name}") FROM "{table}"))')
                    cur.execute(f'VACUUM ANALYZE "{table}"')  # as a live table would be; no autovacuum mid-run

    def session(self, user_id=None, extra=None, created=None):
        """A server-side session row; returns (cookie value, signed CSRF token, row dict)."""
        from webapp.sessions import token_hash

        token = secrets.token_urlsafe(32)
        raw_csrf = hashlib.sha1(os.urandom(64)).hexdigest()
        data = {"csrf_token": raw_csrf}
        if user_id is not None:
            data.update({"_user_id": str(user_id), "_fresh": True, "_id": secrets.token_hex(32),
                         "auth_at": time.time()})
        data.update(extra or {})
        row = {"id": token_hash(token), "user": user_id, "data": json.dumps(data),
               "created_at": created or self.now, "last_seen_at": created or self.now,
               "ip": "127.0.0.1", "user_agent": "wrk"}
        return token, self.signer.dumps(raw_csrf), row


def password_hash():
    from argon2 import PasswordHasher

    return PasswordHasher().hash(PASSWORD)


def seed_people(seeder, first, count, pw_hash, with_devices=True, admin_ids=()):
    """People first..first+count-1 (ids are assigned in order), each with one device ("Phone")."""
    from webapp.models import Device, User
    from webapp.totp import encrypt_secret

    created = seeder.now - datetime.timedelta(days=30)
    batch = 50000
    for start in range(first, first + count, batch):
        stop = min(start + batch, first + count)
        seeder.insert_rows(User, [{"id": i, "email": email_for(i), "password_hash": pw_hash,
                                   "is_admin": i in admin_ids, "created_at": created}
                                  for i in range(start, stop)])
    if with_devices:
        with seeder.ctx():
            rows = [{"user": i, "name": "Phone", "secret_enc": encrypt_secret(secret_for(i)), "created_at": created,
                     "last_step": 0} for i in range(first, first + count)]
        seeder.insert_rows(Device, rows)


# ---------------------------------------------------------------- request pools (files for pool.lua)

def pool_line(method, path, cookie="", body="", htmx=False, base_step="", codes=()):
    return "\t".join([method, path, cookie, body, "1" if htmx else "0", str(base_step), ",".join(codes)])


class Pools:
    """Builds the request lines for each measured step, writing the sessions they need into the database."""

    def __init__(self, seeder, cookie_name="twostep_session"):
        self.s = seeder
        self.cookie_name = cookie_name

    def cookie(self, token):
        return f"{self.cookie_name}={token}"

    def verify(self, user_ids):
        """Pending sign-ins (session + challenge) for these people: POST /login/verify with the current code."""
        from webapp.models import ServerSession, SignInChallenge
        from webapp.sessions import token_hash

        base = int(time.time()) // STEP
        sessions, challenges, lines = [], [], []
        for uid in user_ids:
            challenge = secrets.token_urlsafe(32)
            token, csrf, row = self.s.session(extra={"challenge": challenge})
            sessions.append(row)
            challenges.append({"id": token_hash(challenge), "user": uid, "created_at": self.s.now, "failures": 0,
                               "next_url": None})
            lines.append(pool_line("POST", "/login/verify", self.cookie(token), f"csrf_token={csrf}&code=CODE",
                                   base_step=base, codes=codes_from(secret_for(uid), base)))
        # A challenge lives CHALLENGE_TTL (5 min): its created_at must be close to the real now.
        now = datetime.datetime.utcnow()
        for c in challenges:
            c["created_at"] = now
        self.s.insert_rows(ServerSession, sessions)
        self.s.insert_rows(SignInChallenge, challenges)
        return lines

    def signed_in(self, user_ids, path, htmx=False, method="GET"):
        """Signed-in, fresh sessions of these people, each requesting `path`."""
        from webapp.models import ServerSession

        rows, lines = [], []
        for uid in user_ids:
            token, csrf, row = self.s.session(user_id=uid)
            rows.append(row)
            lines.append(pool_line(method, path(uid) if callable(path) else path, self.cookie(token), htmx=htmx))
        self.s.insert_rows(ServerSession, rows)
        return lines

    def enrolling(self, user_ids):
        """Signed-in sessions with a pending enrolment each: GET /settings/2fa/qr (the wizard's QR step)."""
        from webapp.models import PendingEnrolment, ServerSession
        from webapp.totp import encrypt_secret, new_secret

        rows, pend, lines = [], [], []
        now = datetime.datetime.utcnow()
        with self.s.ctx():
            for uid in user_ids:
                token, csrf, row = self.s.session(user_id=uid)
                rows.append(row)
                pend.append({"session": row["id"], "user": uid, "secret_enc": encrypt_secret(new_secret()),
                             "created_at": now})
                lines.append(pool_line("GET", "/settings/2fa/qr", self.cookie(token)))
        self.s.insert_rows(ServerSession, rows)
        self.s.insert_rows(PendingEnrolment, pend)
        return lines

    def password(self, user_ids, sessions=400):
        """Anonymous sessions holding a CSRF token: POST /login with a correct password (-> the code step)."""
        from webapp.models import ServerSession

        made = [self.s.session() for _ in range(min(sessions, len(user_ids)))]
        self.s.insert_rows(ServerSession, [row for _, _, row in made])
        lines = []
        for k, uid in enumerate(user_ids):
            token, csrf, _ = made[k % len(made)]
            body = f"csrf_token={csrf}&email={email_for(uid).replace('@', '%40')}&password={PASSWORD.replace(' ', '+')}"
            lines.append(pool_line("POST", "/login", self.cookie(token), body))
        return lines


def search_prefixes(n_users, count, rng):
    """Search terms people would type: email prefixes of varying length, and whole addresses."""
    out = []
    for _ in range(count):
        i = rng.randrange(1, n_users + 1)
        email = email_for(i)
        cut = rng.choice([5, 6, 7, 8, 9, 10, 11, len(email)])
        out.append(email[:cut])
    return out


def write_pool(path, lines):
    with open(path, "w", encoding="ascii") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- servers and load

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """gunicorn with the project's gunicorn.conf.py and the given worker count (both sides format their access
    log lines into /dev/null)."""

    def __init__(self, target, env, chdir, log_path):
        self.port = free_port()
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", os.path.join(ROOT, "gunicorn.conf.py"),
             "--workers", str(WORKERS), "--bind", f"127.0.0.1:{self.port}", "--chdir", chdir,
             "--access-logfile", "/dev/null", target],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn did not start: see {log_path}")
                time.sleep(0.2)

    def status(self, path, cookie=None, htmx=False):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if cookie:
            req.add_header("Cookie", cookie)
        if htmx:
            req.add_header("HX-Request", "true")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def cpu_seconds(self):
        """CPU time (user + system) used so far by the gunicorn master and its workers."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        total = 0
        for pid in [self.proc.pid] + [int(p) for p in out.stdout.split()]:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def cpu_times():
    """(busy, total) clock ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


def wrk(server, pool_file, expect, seconds=SECONDS, expect_location=None, connections=CONNECTIONS, tmp=None):
    """Run wrk with pool.lua for `seconds`; returns the JSON the script wrote."""
    out = os.path.join(tmp, f"wrk-{time.monotonic_ns()}.json")
    env = {**os.environ, "POOL_FILE": pool_file, "EXPECT": str(expect), "OUT": out, "NTHREADS": str(WRK_THREADS)}
    # Flush what the setup wrote (a 200 MB copy of the one-million-account database, PostgreSQL's bulk load)
    # first, so the kernel is not writing it back while requests are timed.
    os.sync()
    cpu_before = server.cpu_seconds()
    busy_before, total_before = cpu_times()
    if expect_location:
        env["EXPECT_LOCATION"] = expect_location
    subprocess.run(["wrk", "-t", str(WRK_THREADS), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
                    "-s", os.path.join(BENCH, "pool.lua"), f"http://127.0.0.1:{server.port}"],
                   env=env, check=True, capture_output=True, timeout=seconds + 60)
    cpu = server.cpu_seconds() - cpu_before
    busy_after, total_after = cpu_times()
    with open(out, encoding="utf-8", errors="replace") as fh:  # first_error quotes a page, in UTF-8
        r = json.load(fh)
    # Server CPU per request: steadier than requests/s when other programs share the machine.
    r["server_cpu_ms_per_request"] = round(cpu / max(r["requests"], 1) * 1000, 3)
    # How busy the whole machine was (server, wrk, anything else): under 100 % means requests waited on
    # something other than the CPU, such as a lock.
    r["machine_busy_pct"] = round(100 * (busy_after - busy_before) / max(total_after - total_before, 1), 1)
    r["rps"] = round(r["requests"] / (r["duration_us"] / 1e6), 1)
    r["ok_rps"] = round(r["ok"] / (r["duration_us"] / 1e6), 1)
    r["p50_ms"] = round(r["p50_us"] / 1000, 2)
    r["p99_ms"] = round(r["p99_us"] / 1000, 2)
    return r


def combine(runs):
    """One result for several wrk windows of the same endpoint: totals, rates over their summed time, the
    median p50 and the highest p99 (percentiles of separate windows cannot be merged exactly: the highest is
    the cautious choice), the server CPU per request over all of them, and each window's requests/s."""
    if len(runs) == 1:
        return dict(runs[0])
    out = {}
    for key in ("requests", "ok", "errors", "unexpected", "socket_errors", "timeouts", "status_5xx", "duration_us",
                "pool_wrapped"):
        out[key] = sum(r.get(key, 0) for r in runs)
    out["max_us"] = max(r["max_us"] for r in runs)
    out["first_error"] = next((r["first_error"] for r in runs if r.get("first_error")), "")
    seconds = out["duration_us"] / 1e6
    out["rps"] = round(out["requests"] / seconds, 1)
    out["ok_rps"] = round(out["ok"] / seconds, 1)
    out["ok_rps_windows"] = [r["ok_rps"] for r in runs]
    out["p50_us"] = int(median(r["p50_us"] for r in runs))
    out["p99_us"] = max(r["p99_us"] for r in runs)
    out["p90_us"] = max(r["p90_us"] for r in runs)
    out["p50_ms"], out["p99_ms"] = round(out["p50_us"] / 1000, 2), round(out["p99_us"] / 1000, 2)
    out["server_cpu_ms_per_request"] = round(
        sum(r["server_cpu_ms_per_request"] * r["requests"] for r in runs) / max(out["requests"], 1), 3)
    out["machine_busy_pct"] = round(sum(r["machine_busy_pct"] for r in runs) / len(runs), 1)
    return out


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _hash_worker(args):
    stored, seconds = args
    from argon2 import PasswordHasher

    ph = PasswordHasher()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        ph.verify(stored, PASSWORD)
        n += 1
    return n, time.perf_counter() - start


def hash_ceiling(stored, seconds=10):
    """argon2 verifications/s with WORKERS processes at once: the most password steps the server can do.

    10 s rather than 4: each process stops after the hash that crosses the time limit, so the last half
    second of the run has fewer hashes running at once, each faster; over 4 s (about eight hashes per
    process) that flattered the ceiling by a few per cent."""
    with multiprocessing.Pool(WORKERS) as pool:
        results = pool.map(_hash_worker, [(stored, seconds)] * WORKERS)
    per_hash = sum(t for _, t in results) / sum(n for n, _ in results)  # wall time of one hash, under load
    return {"hash_ms_under_load": round(per_hash * 1000, 1), "hash_limit_per_s": round(WORKERS / per_hash, 1)}


# ---------------------------------------------------------------- the one-million-account search

def search_db_sqlite(keys, tmp):
    """A copy of the cached SQLite database with SEARCH_USERS people (seeded once, kept in bench/.cache)."""
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(ROOT, "webapp", "models.py"), "rb") as fh:
        tag = hashlib.sha256(fh.read()).hexdigest()[:12]
    cached = os.path.join(CACHE, f"search-{SEARCH_USERS}-{tag}.sqlite")
    if not os.path.exists(cached):
        log(f"seeding {SEARCH_USERS} accounts into {cached} (once; cached)")
        for old in os.listdir(CACHE):  # databases seeded for an older models.py
            if old.startswith(f"search-{SEARCH_USERS}-") and old.endswith(".sqlite"):
                os.remove(os.path.join(CACHE, old))
        part = cached + ".part"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(part + suffix):
                os.remove(part + suffix)
        seeder = Seeder("sqlite:///" + part, keys["secret_key"], keys["fernet"], os.path.join(tmp, "seed-inst"))
        started = time.monotonic()
        seed_people(seeder, 1, SEARCH_USERS, "$argon2id$v=19$m=65536,t=3,p=4$" + "x" * 22 + "$" + "y" * 43,
                    with_devices=False)
        with seeder.ctx():
            from webapp.db import db

            db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        seeder.close()
        os.replace(part, cached)
        log(f"seeded in {time.monotonic() - started:.1f} s")
    work = os.path.join(tmp, "search.sqlite")
    shutil.copyfile(cached, work)
    return "sqlite:///" + work


def search_phase(url, keys, tmp, label, pw_hash, rng):
    """Admin session + search terms on a database that already holds SEARCH_USERS people; wrk the Support search."""
    seeder = Seeder(url, keys["secret_key"], keys["fernet"], os.path.join(tmp, f"inst-{label}"))
    admin = SEARCH_USERS + 1
    seed_people(seeder, admin, 1, pw_hash, admin_ids={admin})
    pools = Pools(seeder)
    terms = search_prefixes(SEARCH_USERS, 2000, rng)
    warm_terms = search_prefixes(SEARCH_USERS, 500, rng)  # other terms: the measured ones start cold
    lines, warm_lines = (
        pools.signed_in([admin] * len(t), lambda _u, it=iter(t): f"/support?q={next(it)}", htmx=True)
        for t in (terms, warm_terms))
    seeder.close()
    pool = write_pool(os.path.join(tmp, f"search-{label}.txt"), lines)
    server = Server("wsgi:app", server_env(url, keys, tmp, label), ROOT, os.path.join(tmp, f"gunicorn-{label}.log"))
    try:
        cookie = lines[0].split("\t")[2]
        if server.status("/support?q=user", cookie=cookie, htmx=True) != 200:
            return None
        # An uncounted warm-up, as in the other phases: before it, each worker's first search compiled the
        # page's templates and opened its database connection (single requests of up to ~200 ms).
        wrk(server, write_pool(os.path.join(tmp, f"search-{label}-warm.txt"), warm_lines), 200,
            connections=WORKERS, tmp=tmp, seconds=WINDOW)
        # Latency at a moderate load: one connection per worker.
        return wrk(server, pool, 200, connections=WORKERS, tmp=tmp)
    finally:
        server.stop()


def seed_search_postgres(url, keys, tmp):
    seeder = Seeder(url, keys["secret_key"], keys["fernet"], os.path.join(tmp, "seed-pg"))
    started = time.monotonic()
    seed_people(seeder, 1, SEARCH_USERS, "$argon2id$v=19$m=65536,t=3,p=4$" + "x" * 22 + "$" + "y" * 43,
                with_devices=False)
    with seeder.ctx():
        from webapp.db import db

        db.execute_sql("CHECKPOINT")  # write the bulk load out now, not while the search is measured
    seeder.close()
    log(f"PostgreSQL: seeded {SEARCH_USERS} accounts in {time.monotonic() - started:.1f} s")


def server_env(url, keys, tmp, label):
    env = {**os.environ, "DATABASE_URL": url, "SECRET_KEY": keys["secret_key"],
           "TOTP_ENCRYPTION_KEYS": keys["fernet"], "TWOSTEP_INSTANCE": os.path.join(tmp, f"inst-{label}")}
    env.pop("TWOSTEP_PRODUCTION", None)
    return env


# ---------------------------------------------------------------- main

def main():
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    from cryptography.fernet import Fernet

    started = time.monotonic()
    rng = random.Random(7)
    tmp = tempfile.mkdtemp(prefix="twostep-bench-")
    keys = {"secret_key": secrets.token_urlsafe(48), "fernet": Fernet.generate_key().decode()}
    results = {"machine": machine(), "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
               "settings": {"workers": WORKERS, "worker_class": "sync", "wrk_threads": WRK_THREADS,
                            "connections": CONNECTIONS, "rounds": ROUNDS, "window_seconds": WINDOW, "users": USERS},
               "endpoints": {}, "ratios": {}, "notes": []}
    servers = []
    try:
        pw_hash = password_hash()

        url = "sqlite:///" + os.path.join(tmp, "app.db")
        log(f"seeding {USERS} people with devices")
        seeder = Seeder(url, keys["secret_key"], keys["fernet"], os.path.join(tmp, "inst-main"))
        seed_people(seeder, 1, USERS, pw_hash, admin_ids={1})
        pools = Pools(seeder)
        ids = list(range(2, USERS + 1))
        rng.shuffle(ids)
        # Each code step needs its own person (a code is accepted once); other pools may share people.
        verify_ids, mixed_ids, rest = ids[:USERS * 2 // 5], ids[USERS * 2 // 5:USERS * 4 // 5], ids[USERS * 4 // 5:]

        def others(n):
            return [rest[k % len(rest)] for k in range(n)]

        hello = Server("hello:app", {**os.environ}, BENCH, os.path.join(tmp, "gunicorn-hello.log"))
        servers.append(hello)
        app = Server("wsgi:app", server_env(url, keys, tmp, "main"), ROOT, os.path.join(tmp, "gunicorn-main.log"))
        servers.append(app)

        endpoints = results["endpoints"]
        hello_pool = write_pool(os.path.join(tmp, "hello.txt"), [pool_line("GET", "/")])
        hello_runs = []
        exhausted = results["pool_exhausted"] = []  # single-use pools that ran out: their figures are void

        def phase(name, label, lines, expect, location=None, single_use=False):
            """A warm-up window, then rounds of hello and the endpoint, hello first and last (see the module's
            docstring). A single-use pool (each code is accepted once) is split between them.

            The warm-up is not counted: each worker fills its caches (compiled templates, built URLs, signed
            CSRF tokens) on its first requests for a page or a person, which a server that has been up for
            a while has done long before."""
            if PHASES and name not in PHASES:
                return
            log(f"{label} and hello: a warm-up, then {ROUNDS} rounds of {WINDOW} s")
            size = len(lines) // (ROUNDS + 1) if single_use else len(lines)
            wrk(app, write_pool(os.path.join(tmp, f"{name}-warm.txt"), lines[:size]), expect,
                expect_location=location, tmp=tmp, seconds=WINDOW)
            hellos = [wrk(hello, hello_pool, 200, tmp=tmp, seconds=WINDOW)]
            runs = []
            for k in range(1, ROUNDS + 1):
                part = lines[k * size:(k + 1) * size] if single_use else lines
                runs.append(wrk(app, write_pool(os.path.join(tmp, f"{name}-{k}.txt"), part), expect,
                                expect_location=location, tmp=tmp, seconds=WINDOW))
                hellos.append(wrk(hello, hello_pool, 200, tmp=tmp, seconds=WINDOW))
            hello_runs.extend(hellos)
            r = combine(runs)
            if single_use and r.get("pool_wrapped"):
                exhausted.append(name)
            around = [(hellos[k], hellos[k + 1]) for k in range(ROUNDS)]
            r["ratio_rounds"] = [round(run["ok_rps"] / ((a["ok_rps"] + b["ok_rps"]) / 2), 3)
                                 for run, (a, b) in zip(runs, around)]
            r["cpu_ratio_rounds"] = [
                round((a["server_cpu_ms_per_request"] + b["server_cpu_ms_per_request"]) / 2
                      / max(run["server_cpu_ms_per_request"], 1e-9), 3) for run, (a, b) in zip(runs, around)]
            r["hello_rps_adjacent"] = round(sum(h["ok_rps"] for h in hellos) / len(hellos), 1)
            r["hello_cpu_ms_adjacent"] = round(sum(h["server_cpu_ms_per_request"] for h in hellos) / len(hellos), 3)
            r["load_average"] = round(os.getloadavg()[0], 2)
            endpoints[name] = r

        phase("login_page", "sign-in page", [pool_line("GET", "/login")], 200)
        phase("verify", "second step (code)", pools.verify(verify_ids), 302, "/settings", single_use=True)
        phase("settings", "User Settings", pools.signed_in(others(500), "/settings"), 200)
        qr_lines = pools.enrolling(others(1000))
        if app.status("/settings/2fa/qr", cookie=qr_lines[0].split("\t")[2]) == 200:
            phase("qr", "wizard QR step", qr_lines, 200)
        else:
            results["notes"].append("wizard QR step (/settings/2fa/qr) not available: skipped")
        admin_lines = pools.signed_in([1] * 1000, lambda _u, it=iter(search_prefixes(USERS, 1000, rng)):
                                      f"/support?q={next(it)}", htmx=True)
        search_ok = app.status("/support?q=user", cookie=admin_lines[0].split("\t")[2], htmx=True) == 200
        if search_ok:
            phase("support_search", f"Support search ({USERS} people)", admin_lines, 200)
        else:
            results["notes"].append("Support search (/support?q=) not available: skipped")

        if PHASES:  # a quick partial run: nothing else
            endpoints["hello"] = combine(hello_runs)
            return finish(results, started, tmp)
        log("argon2 ceiling, the password step, the ceiling again")
        before = hash_ceiling(pw_hash)
        # 30 s rather than 10: a password step takes ~0.5 s under load, so the first half second of any
        # run can complete nothing, which alone cost a 10-second run ~5 % of its count.
        endpoints["login_password"] = wrk(app, write_pool(os.path.join(tmp, "password.txt"),
                                                          pools.password(others(2000))), 302,
                                          expect_location="/login/verify", tmp=tmp,
                                          seconds=max(SECONDS, PASSWORD_SECONDS))
        endpoints["login_password"]["load_average"] = round(os.getloadavg()[0], 2)
        after = hash_ceiling(pw_hash)
        # The ceiling on both sides of the step, like hello around the other steps (the machine's speed drifts).
        results["hash"] = {key: round((before[key] + after[key]) / 2, 1) for key in before}
        results["hash"]["hash_limit_per_s_before_after"] = [before["hash_limit_per_s"], after["hash_limit_per_s"]]
        endpoints["hello"] = combine(hello_runs)

        log(f"mixed load, {MIXED_SECONDS} s")
        mixed = mixed_pool(pools, mixed_ids, others(900), admin_lines if search_ok else [], qr_available="qr" in endpoints)
        results["mixed"] = wrk(app, write_pool(os.path.join(tmp, "mixed.txt"), mixed), 200,
                               seconds=MIXED_SECONDS, tmp=tmp)
        if results["mixed"].get("pool_wrapped"):
            exhausted.append("mixed")
        if results["mixed"]["errors"]:  # what the app said about them (a refused CSRF token, a traceback, ...)
            with open(os.path.join(tmp, "gunicorn-main.log"), encoding="utf-8", errors="replace") as fh:
                results["mixed"]["server_log"] = [line.rstrip() for line in fh
                                                  if " WARNING " in line or " ERROR " in line][-20:]
        seeder.close()
        for s in servers:
            s.stop()
        servers.clear()

        if search_ok:
            log("Support search on one million accounts: SQLite")
            r = search_phase(search_db_sqlite(keys, tmp), keys, tmp, "sqlite_1m", pw_hash, rng)
            if r:
                endpoints["support_search_sqlite_1m"] = r
            if os.environ.get("BENCH_SKIP_PG") != "1":
                log("Support search on one million accounts: PostgreSQL")
                pg_dir = tempfile.mkdtemp(prefix="twostep-bench-pg-")
                try:
                    pg_url = subprocess.run(["bash", os.path.join(ROOT, "scripts", "pg.sh"), "start", pg_dir],
                                            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                    seed_search_postgres(pg_url, keys, tmp)
                    r = search_phase(pg_url, keys, tmp, "postgresql_1m", pw_hash, rng)
                    if r:
                        endpoints["support_search_postgresql_1m"] = r
                except subprocess.CalledProcessError as exc:
                    log(f"PostgreSQL unavailable, skipped: {exc.stderr}")
                    results["notes"].append("PostgreSQL could not be started (scripts/pg.sh): search skipped")
                finally:
                    subprocess.run(["bash", os.path.join(ROOT, "scripts", "pg.sh"), "stop", pg_dir],
                                   capture_output=True)
                    shutil.rmtree(pg_dir, ignore_errors=True)
    finally:
        for s in servers:
            s.stop()

    finish(results, started, tmp)


def finish(results, started, tmp):
    """Summarise, write bench/results.json (a partial run writes bench/results-partial.json), print."""
    summarise(results)
    if PHASES:
        results["targets_met"] = {}  # a partial run's neighbours and load differ: judge nothing
        results["notes"].append(f"partial run: BENCH_PHASES={','.join(PHASES)}")
    results["runtime_s"] = round(time.monotonic() - started, 1)
    name = "results-partial.json" if PHASES else "results.json"
    with open(os.path.join(BENCH, name), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, sort_keys=True)
        fh.write("\n")
    print_table(results)
    shutil.rmtree(tmp, ignore_errors=True)


def mixed_pool(pools, verify_ids, other_ids, search_lines, qr_available):
    """Interleaved requests in proportions a real day might have; every code step uses a different person."""
    settings = pools.signed_in(other_ids[:300], "/settings")
    qr = pools.enrolling(other_ids[300:600]) if qr_available else []
    password = pools.password(other_ids[600:900], sessions=100)
    verify = pools.verify(verify_ids)
    pattern = (["verify"] * 6 + ["settings"] * 6 + ["login"] * 4 + ["qr"] * 2 + ["search"] * 2) * 5
    pattern[0] = "password"  # 1 in 100: an argon2 hash costs as much as ~50 other requests
    lines, n, k = [], len(verify), 0
    cursors = {"settings": 0, "qr": 0, "search": 0, "password": 0}
    sources = {"settings": settings, "qr": qr or settings, "search": search_lines or settings, "password": password}
    while k < n:
        for kind in pattern:
            if kind == "verify":
                if k >= n:
                    break
                lines.append(verify[k])
                k += 1
            elif kind == "login":
                lines.append(pool_line("GET", "/login"))
            else:
                src = sources[kind]
                lines.append(src[cursors[kind] % len(src)])
                cursors[kind] += 1
    return lines


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "os": platform.platform(), "load_average_at_start": os.getloadavg()[0]}


def summarise(results):
    e, ratios = results["endpoints"], results["ratios"]

    cpu = results["cpu_ratios"] = {}
    for key, name in (("verify_vs_hello", "verify"), ("settings_vs_hello", "settings"), ("qr_vs_hello", "qr"),
                      ("login_page_vs_hello", "login_page")):
        if name in e:
            ratios[key] = round(median(e[name]["ratio_rounds"]), 3)
            cpu[key] = round(median(e[name]["cpu_ratio_rounds"]), 3)
    if "login_password" in e:
        ratios["login_vs_hash_limit"] = round(e["login_password"]["ok_rps"] / results["hash"]["hash_limit_per_s"], 3)
    for label in ("sqlite_1m", "postgresql_1m"):
        r = e.get(f"support_search_{label}")
        results.setdefault("support_search_p99_ms", {})[label] = r["p99_ms"] if r else None
    m = results.get("mixed", {})
    results["errors"] = m.get("errors", 0) + m.get("socket_errors", 0) + m.get("timeouts", 0) if m else None
    targets = {"verify_vs_hello": 0.25, "settings_vs_hello": 0.35, "qr_vs_hello": 0.1, "login_vs_hash_limit": 0.9}
    results["targets_met"] = {k: (ratios[k] >= v) for k, v in targets.items() if k in ratios}
    void = results.get("pool_exhausted") or []  # replayed codes were refused: not a measurement
    if "verify" in void:
        results["targets_met"]["verify_vs_hello"] = False
    for label, p99 in results["support_search_p99_ms"].items():
        if p99 is not None:
            results["targets_met"][f"support_search_p99_{label}"] = p99 <= 50
    if results["errors"] is not None:
        results["targets_met"]["zero_errors"] = results["errors"] == 0 and "mixed" not in void


def print_table(results):
    e = results["endpoints"]
    rows = [("hello (bare Flask)", "hello"), ("sign-in page GET /login", "login_page"),
            ("second step POST /login/verify", "verify"), ("password step POST /login", "login_password"),
            ("User Settings GET /settings", "settings"), ("wizard QR step GET /settings/2fa/qr", "qr"),
            (f"Support search ({USERS // 1000}k people)", "support_search"),
            ("Support search, SQLite 1M", "support_search_sqlite_1m"),
            ("Support search, PostgreSQL 1M", "support_search_postgresql_1m")]
    print(f"\n{'endpoint':40} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'not ok':>7} {'hello next to it':>17}"
          f" {'CPU ms/req':>10} {'busy %':>6}")
    for label, key in rows:
        r = e.get(key)
        if r:
            adjacent = f"{r['hello_rps_adjacent']:17.1f}" if "hello_rps_adjacent" in r else ""
            adjacent = adjacent or " " * 17
            print(f"{label:40} {r['ok_rps']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['unexpected']:7d} {adjacent}"
                  f" {r['server_cpu_ms_per_request']:10.2f} {r['machine_busy_pct']:6.1f}")
        else:
            print(f"{label:40} {'skipped':>8}")
    m = results.get("mixed")
    if m:
        print(f"{'mixed load, ' + str(MIXED_SECONDS) + ' s':40} {m['rps']:8.1f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f}"
              f"   errors: {results['errors']}")
        if m.get("first_error"):
            print(f"  the first error: {m['first_error']}")
        for line in m.get("server_log", []):
            print(f"  server log: {line}")
    if "hash" in results:
        print(f"\nargon2 ceiling: {results['hash']['hash_limit_per_s']}/s "
              f"({results['hash']['hash_ms_under_load']} ms per hash with {WORKERS} at once)")
    if results.get("pool_exhausted"):
        print(f"NOT A MEASUREMENT: the single-use requests of {', '.join(results['pool_exhausted'])} ran out and were"
              " replayed (refused codes); run with a larger BENCH_USERS")
    print("ratios:", json.dumps(results["ratios"]))
    print("the same from server CPU per request (hello's / the endpoint's):", json.dumps(results["cpu_ratios"]))
    print("support_search_p99_ms:", json.dumps(results["support_search_p99_ms"]))
    print("targets met:", json.dumps(results["targets_met"]))
    print(f"runtime: {results['runtime_s']} s; written bench/{'results-partial.json' if PHASES else 'results.json'}")


if __name__ == "__main__":
    main()
