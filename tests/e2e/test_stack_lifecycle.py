"""`make run` in the foreground: Ctrl-C ends every process it started; nothing is left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import RunningStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            tasks = Path(f"/proc/{current}/task").iterdir()
            children = {int(c) for t in tasks for c in (t / "children").read_text().split()}
        except FileNotFoundError:
            continue
        found |= children
        pending.extend(children)
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def test_ctrl_c_on_the_foreground_stack_stops_everything(tmp_path: Path) -> None:
    stack = RunningStack(tmp_path / "run", replicas=2)
    log = (tmp_path / "foreground.log").open("w")
    # What `make run` execs; a new session stands for the terminal's process group.
    process = subprocess.Popen(
        [sys.executable, "-m", "infra.stack", "run"],
        cwd=ROOT,
        env=stack.stack.environ,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        stack.stack.wait_ready(timeout=90)
        started = descendants(process.pid)
        # redis, 2 gunicorn masters with 2 workers each, nginx master + workers.
        assert len(started) >= 1 + 2 * 3 + 2, started
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        assert process.wait(60) == 0 or process.returncode is not None
        deadline = time.monotonic() + 30
        while alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(started) == set(), "left running after Ctrl-C"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "foreground.log").read_text()
    assert "Switchboard: https://localhost:" in output


def test_make_stop_leaves_nothing_running(tmp_path: Path) -> None:
    stack = RunningStack(tmp_path / "run", replicas=2).start()
    supervisord = stack.stack.supervisord_pid()
    assert supervisord is not None
    started = descendants(supervisord) | {supervisord}
    stack.stop()
    deadline = time.monotonic() + 30
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(started) == set()
