"""A few seconds of ``python -m loadtests resume``: one uvicorn worker SIGKILLed mid-run.

The CLI starts a stack of its own (one replica of 2 workers behind nginx/TLS, its own Redis):
killing a worker of the session's shared stack would disturb the tests that run after this
one. Asserted: the worker was killed, its clients resumed with ``?since=&epoch=``, and every
message the server accepted reached every member of its room -- live or by the replay -- or its
loss was reported; none silently, none twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_a_killed_workers_clients_resume_and_nothing_is_lost_silently(tmp_path: Path) -> None:
    report = tmp_path / "resume.json"
    command = [
        sys.executable,
        "-m",
        "loadtests",
        "resume",
        "--target",
        "switchboard:replicas=1",
        "--connections",
        "40",
        "--room-size",
        "10",
        "--rate",
        "2",
        "--duration",
        "4",
        "--json",
        str(report),
        "--no-plot",
        "--no-progress",
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    [target] = json.loads(report.read_text())["targets"]
    resume = target["resume"]
    assert resume["killed"] is True
    assert resume["connections_of_killed_process"] > 0
    assert resume["resumes_of_killed_process_clients"] == resume["connections_of_killed_process"]
    assert resume["recovered_true"] > 0
    assert resume["accepted"] > 0
    assert resume["silently_lost"] == 0
    assert resume["offsets_nobody_received"] == resume["unaccounted"] == 0
    assert resume["duplicated"] == resume["misdelivered"] == 0
    assert resume["delivered"] + resume["reported_lost"] == resume["expected_deliveries"]
