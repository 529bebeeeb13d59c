"""gunicorn settings for `make run` and production (override with GUNICORN_CMD_ARGS or flags)."""
import multiprocessing
import os

workers = int(os.environ.get("WEB_CONCURRENCY", min(4, multiprocessing.cpu_count() * 2)))
worker_class = "sync"
preload_app = True  # one create_app in the master: keys and the setup code are made once
timeout = 30
graceful_timeout = 10
accesslog = "-"
errorlog = "-"
# Only trust X-Forwarded-* from these proxy addresses; the app applies ProxyFix with PROXY_HOPS.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
