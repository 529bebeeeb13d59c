"""WSGI entry point: gunicorn wsgi:app, flask --app wsgi ..."""
import sys

from webapp import create_app
from webapp.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:  # a setting to fix: say which, without a traceback (gunicorn and the flask CLI)
    sys.exit(f"Error: {exc}")
