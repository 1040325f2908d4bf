"""`make run` in the foreground: Ctrl-C ends every process it started; nothing is left running.
`make start` refuses at once when a port it needs is taken, and a start that fails leaves
nothing running."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


# -- ports already taken ---------------------------------------------------------------------------
def processes_mentioning(text: str) -> set[int]:
    """Processes whose command line contains ``text`` (a run directory: every program the
    stack starts names it)."""
    found = set()
    for process in Path("/proc").iterdir():
        if process.name.isdigit() and int(process.name) != os.getpid():
            try:
                if text.encode() in (process / "cmdline").read_bytes():
                    found.add(int(process.name))
            except OSError:
                continue
    return found


@contextlib.contextmanager
def plain_listener(port: int) -> Iterator[int]:
    """A plain TCP listener on loopback (this test process); its pid."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        yield os.getpid()


@contextlib.contextmanager
def foreign_redis(port: int, directory: Path) -> Iterator[int]:
    """Somebody else's redis-server on ``port``; its pid."""
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            time.sleep(0.05)
        yield process.pid
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("taken", ["redis", "replica", "nginx"])
def test_a_taken_port_is_refused_at_once_and_nothing_is_left_running(
    tmp_path: Path, taken: str
) -> None:
    stack = RunningStack(tmp_path / "run", replicas=2).stack
    port, variable, role = {
        "redis": (stack.redis_port, "SWITCHBOARD_REDIS_PORT", "Redis"),
        "replica": (stack.app_ports[1], "SWITCHBOARD_APP_PORT_BASE", "replica app2"),
        "nginx": (stack.https_port, "SWITCHBOARD_HTTPS_PORT", "nginx HTTPS"),
    }[taken]
    holding = foreign_redis(port, tmp_path) if taken == "redis" else plain_listener(port)
    with holding as holder:
        started = time.monotonic()
        # What `make start` runs.
        result = subprocess.run(
            [sys.executable, "-m", "infra.stack", "start"],
            cwd=ROOT,
            env=stack.environ,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
        left = processes_mentioning(str(stack.run_dir))
    assert result.returncode != 0, result.stdout
    message = result.stderr
    assert f"port {port} ({role}) is already in use by pid {holder}" in message, message
    assert f"set {variable} to another port" in message, message
    assert took < 10, f"refused after {took:.1f} s, not at once"
    # Refused before anything was started or even written.
    assert left == set(), left
    assert not (stack.run_dir / "supervisord.conf").exists()


def test_a_start_that_fails_later_stops_what_it_started(tmp_path: Path) -> None:
    """A replica that cannot serve (here: an unknown WS_PROTOCOL) makes `start` fail, and
    `start` takes down the processes it had started (Redis, nginx, the other replica)."""
    stack = RunningStack(tmp_path / "run", replicas=1, WS_PROTOCOL="no-such-protocol").stack
    with pytest.raises(SystemExit, match="not ready"):
        stack.start(timeout=15)
    deadline = time.monotonic() + 30
    while processes_mentioning(str(stack.run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(stack.run_dir)) == set()
    assert not stack.is_running()


def test_make_run_refuses_a_taken_port_too(tmp_path: Path) -> None:
    stack = RunningStack(tmp_path / "run", replicas=1).stack
    with plain_listener(stack.http_port) as holder:
        result = subprocess.run(
            [sys.executable, "-m", "infra.stack", "run"],  # what `make run` execs
            cwd=ROOT,
            env=stack.environ,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert f"port {stack.http_port} (nginx HTTP) is already in use by pid {holder}" in (
        result.stderr
    ), result.stderr
    assert "set SWITCHBOARD_HTTP_PORT to another port" in result.stderr
    assert not (stack.run_dir / "supervisord.conf").exists()
