"""The framework's ceiling for the benchmark: a bare Flask app that returns a short text, served by gunicorn
with exactly the same settings as the real app (bench/run.py)."""
from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello():
    """A short text, nothing else."""
    return "Hello, World!"
