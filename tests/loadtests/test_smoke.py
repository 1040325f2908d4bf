"""A few seconds of ``python -m loadtests fanout`` through nginx/TLS against the real stack.

Runs the CLI as a user would (a subprocess, its exit status, its JSON report) against the
session's native stack (3 replicas x 2 uvicorn workers, the default channel layer) and asserts
what the tool exists to prove: nothing lost or duplicated, and messages crossed both processes
and replicas. Performance targets are not checked here: they live in the benchmarks
(loadtests/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import RunningStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_fanout_through_nginx_loses_nothing_and_crosses_processes_and_replicas(
    stack: RunningStack, tmp_path: Path
) -> None:
    report = tmp_path / "fanout.json"
    command = [
        sys.executable,
        "-m",
        "loadtests",
        "fanout",
        "--target",
        stack.base_url,
        "--ca",
        str(stack.stack.ca_file),
        "--run-dir",
        str(stack.stack.run_dir),
        "--connections",
        "60",
        "--room-size",
        "10",
        "--rate",
        "2",
        "--duration",
        "3",  # below the stack's per-connection rate limit
        "--json",
        str(report),
        "--no-plot",
        "--no-progress",
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    data = json.loads(report.read_text())
    [target] = data["targets"]
    assert target["connect"]["opened"] == 60 and target["connect"]["failed"] == 0
    [phase] = target["phases"]
    assert phase["sent"] == 60 * 6
    assert phase["expected_deliveries"] == 60 * 6 * 10
    assert phase["received"] == phase["expected_deliveries"]
    assert phase["lost"] == phase["duplicated"] == phase["misdelivered"] == 0
    # The receivers check the rooms' offsets by themselves: a normal run has no gap.
    assert phase["offsets"]["frames_with_offset"] >= phase["received"]
    assert phase["offsets"]["gaps"] == phase["offsets"]["new_epochs"] == 0
    assert phase["cross_process_pairs"] > 0
    assert phase["cross_replica_pairs"] > 0
    assert target["placement"]["processes"] >= 3
    assert target["placement"]["replicas"] >= 2
    # The stack's own process ids were found: server CPU and memory figures are real.
    assert phase["server_cpu_s"].get("app", 0) > 0
