"""gunicorn settings for `make run` and production (override with GUNICORN_CMD_ARGS or flags).

Several worker processes are safe: sessions, sign-in challenges, pending enrolments, throttling counters and
the replay state (last accepted step) all live in the database, and the checks that race are single
transactions (README "Deployment"). Nothing is kept per process except caches of constant data.
"""
import gc
import multiprocessing
import os

from gunicorn.glogging import Logger

# Sync workers: every request is short and CPU-bound (a password hash is the longest, ~150 ms), so one
# request per process at a time is simplest; 2 x cores keeps the CPU busy while one waits on the database.
workers = int(os.environ.get("WEB_CONCURRENCY", min(4, multiprocessing.cpu_count() * 2)))
worker_class = "sync"
preload_app = True  # one create_app in the master: keys and the setup code are made once (db.py drops
#                     any SQLite connection a worker would inherit across fork)
timeout = 30
graceful_timeout = 10
accesslog = "-"
errorlog = "-"
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"  # worker heartbeats on tmpfs: no stalls when /tmp is a slow overlay disk
# Only trust X-Forwarded-* from these proxy addresses (gunicorn's own handling of X-Forwarded-Proto); the
# app itself applies ProxyFix with exactly PROXY_HOPS hops (README "Deployment"). Keep both in step.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
# gunicorn 27's control socket (for gunicornc) has one default path per user ($XDG_RUNTIME_DIR/gunicorn.ctl or
# ~/.gunicorn/gunicorn.ctl): a second gunicorn on the host (another instance, a test server) took it over and
# removed the first one's. twostep needs none; to use gunicornc, set control_socket to a path of this instance.
control_socket_disable = True


class AccessLine(Logger):
    """gunicorn's logger, whose access line leaves out the query string of its request line (%(r)s): the query
    string of the Support search and of the audit log's filter is the email address an admin looked for
    (/support?q=alice%40example.com; a sign-in page's next= carries it too), and the log, kept apart from the
    database and often for longer, should not gather people's addresses (a privacy review). The path stays as
    the client sent it (%(U)s would write it decoded, with any quote or line break a visitor put in it)."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["r"] = "%s %s %s" % (environ["REQUEST_METHOD"], environ["RAW_URI"].partition("?")[0],
                                   environ["SERVER_PROTOCOL"])
        return atoms


# A class of our own: with statsd_host set, gunicorn no longer swaps in its statsd logger by itself.
logger_class = AccessLine


def pre_fork(server, worker):
    """Move everything the master loaded (the app, templates, compiled queries: ~60,000 objects) out of the
    garbage collector's view before a worker is forked. A worker's full collection then walks only what it
    made itself: it took ~50-60 ms with them, a pause some request would wait through, and walking them
    also wrote to the master's memory pages shared with each worker, which the kernel then copied."""
    gc.freeze()
