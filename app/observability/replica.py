"""One replica's side of the metrics, run by its gunicorn master (``infra/gunicorn.conf.py``).

prometheus_client's multiprocess mode keeps each worker's values in files in
``PROMETHEUS_MULTIPROC_DIR``; ``/metrics`` sums them. That folder must be the replica's own and
empty at start (files of an earlier run would add their counts), and known before any worker
imports prometheus_client (it decides at import whether to write files). So the master sets it
up in ``on_starting``; workers inherit the environment. When a worker exits, ``child_exit``
deletes its live-gauge files (``mark_process_dead``), so the connection gauge is right even
after a SIGKILL, and counts the exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from config import env

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
_created: Path | None = None


def prepare_metrics_dir() -> Path | None:
    """Create (``METRICS_DIR``, emptied) or make (a private temp folder) the metric folder."""
    global _created
    if not env.get_bool("METRICS_ENABLED"):
        return None
    configured = env.get("METRICS_DIR")
    if configured:
        folder = Path(configured)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
    else:
        folder = _created = Path(tempfile.mkdtemp(prefix="switchboard-metrics-"))
    os.environ[ENV_VAR] = str(folder)
    return folder


def worker_exited(pid: int) -> None:
    if not os.environ.get(ENV_VAR):
        return
    from prometheus_client import multiprocess

    from observability.metrics import WORKER_EXITS

    multiprocess.mark_process_dead(pid)
    WORKER_EXITS.inc()


def remove_metrics_dir() -> None:
    """Remove the temp folder :func:`prepare_metrics_dir` made (a configured one is kept)."""
    if _created is not None:
        shutil.rmtree(_created, ignore_errors=True)


def gunicorn_logconfig(formatter: dict[str, Any]) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: its error log on stderr with ``formatter``; no access log
    (nginx logs requests)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"switchboard": formatter},
        "handlers": {
            "error_console": {
                "class": "logging.StreamHandler",
                "formatter": "switchboard",
                "stream": "ext://sys.stderr",
            },
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "switchboard",
                "stream": "ext://sys.stdout",
            },
        },
        "root": {"level": "INFO", "handlers": []},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        },
    }
