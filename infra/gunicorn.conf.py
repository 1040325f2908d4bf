"""Gunicorn configuration for one Switchboard replica.

One replica = one gunicorn master with WEB_CONCURRENCY uvicorn workers, all sharing the Redis
channel layer with every other replica. Values come from the environment (config/env.py).
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(_ROOT / "app")]

from config import env  # noqa: E402
from observability import logs as _logs  # noqa: E402
from observability import replica as _replica  # noqa: E402

wsgi_app = "config.asgi:application"
worker_class = "infra.uvicorn_worker.SwitchboardUvicornWorker"
pythonpath = f"{_ROOT},{_ROOT / 'app'}"
chdir = str(_ROOT / "app")

bind = [f"{env.get('BIND_HOST')}:{env.get_int('PORT', minimum=1)}"]
workers = env.get_int("WEB_CONCURRENCY", minimum=1)
# Websockets live long: on stop, workers get this long to close them (1012) and finish requests.
graceful_timeout = env.get_int("GRACEFUL_TIMEOUT", minimum=1)
# Heartbeat between master and workers; a wedged event loop is replaced after this.
timeout = 30
keepalive = 5
# Only nginx may tell us the client's scheme and address.
forwarded_allow_ips = env.get("FORWARDED_ALLOW_IPS")
# Each worker imports the app itself: a crash in one never takes shared state with it.
preload_app = False
accesslog = None  # nginx logs requests; message bodies are never logged
errorlog = "-"
loglevel = "info"
proc_name = "switchboard"
# gunicorn >= 25 opens a control socket at one fixed path per user ($HOME/.gunicorn/gunicorn.ctl):
# every replica on the host would fight over it, and anything running as this user could resize
# or stop the replica through it. supervisord and signals manage replicas; gunicorn < 25 ignores
# this name.
control_socket_disable = True

# -- metrics and logs (app/observability/) ---------------------------------------------------------
# LOG_FORMAT=json: gunicorn's own records, and uvicorn's (the worker hands them gunicorn's
# handlers), in the app's JSON format.
if env.get("LOG_FORMAT") == "json":
    logconfig_dict = _replica.gunicorn_logconfig(_logs.formatter_config("json"))


def on_starting(server: object) -> None:
    """Before any worker exists: give this replica an empty folder for its metric files."""
    _replica.prepare_metrics_dir()


def child_exit(server: object, worker: object) -> None:
    """A worker is gone (exit, crash, SIGKILL): its open sockets leave the connection gauge."""
    _replica.worker_exited(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    _replica.remove_metrics_dir()
