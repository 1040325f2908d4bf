"""The core cross-process test once more, with PostgreSQL behind DATABASE_URL.

Compose and Kubernetes run the app on PostgreSQL (users and sessions shared by every replica),
so the settings must work with it: here a real server from Debian's `postgresql` package, in a
throwaway cluster (initdb + pg_ctl on a free loopback port) that the fixture starts and removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.harness import (
    RunningStack,
    connections,
    free_port_block,
    recv_until,
    replica_of,
    room_path,
    started,
)

pytestmark = pytest.mark.e2e

INSTALL_HINT = "PostgreSQL server binaries are missing: apt-get install postgresql (make test does)"


def pg_binary(name: str) -> str:
    """initdb/pg_ctl of the newest installed major version (Debian keeps them off PATH)."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda path: int(re.sub(r"\D", "", path.parts[-3]) or 0),
    )
    found = str(versions[-1]) if versions else shutil.which(name)
    if found is None:
        pytest.fail(INSTALL_HINT)  # a missing dependency fails; it never skips
    return found


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields its ``postgres://`` DATABASE_URL."""
    port = free_port_block(1)
    password = secrets.token_urlsafe(18)
    # Under /tmp, not pytest's 0700 folder: the server's user must be able to reach it.
    base = Path(tempfile.mkdtemp(prefix="switchboard-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        # The server refuses to run as root: use the package's account (or nobody).
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            account = pwd.getpwnam("nobody")
        os.chown(base, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", account.pw_name, "--"]
    password_file = base / "password"
    password_file.write_text(password)
    password_file.chmod(0o600)
    os.chown(password_file, base.stat().st_uid, base.stat().st_gid)

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*run_as, *args], capture_output=True, text=True, check=False, timeout=120
        )

    data = base / "data"
    init = pg(
        pg_binary("initdb"),
        "--pgdata",
        str(data),
        "--username",
        "switchboard",
        "--auth",
        "scram-sha-256",
        "--pwfile",
        str(password_file),
        "--encoding",
        "UTF8",
        "--no-locale",
    )
    assert init.returncode == 0, init.stdout + init.stderr
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {base} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    start = pg(
        pg_binary("pg_ctl"),
        "--pgdata",
        str(data),
        "--log",
        str(base / "server.log"),
        "--options",
        options,
        "--wait",
        "--timeout",
        "60",
        "start",
    )
    try:
        assert start.returncode == 0, start.stdout + start.stderr + _log(base)
        admin = f"postgres://switchboard:{password}@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute("CREATE DATABASE switchboard")
        yield f"postgres://switchboard:{password}@127.0.0.1:{port}/switchboard"
    finally:
        pg(pg_binary("pg_ctl"), "--pgdata", str(data), "--mode", "fast", "--wait", "stop")
        shutil.rmtree(base, ignore_errors=True)


def _log(base: Path) -> str:
    log = base / "server.log"
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    started_at = time.monotonic()
    with (
        postgres_cluster() as url,
        started(tmp_path_factory.mktemp("pgstack"), DATABASE_URL=url) as running,
    ):
        running.database_url = url
        print(f"\nPostgreSQL cluster + stack ready in {time.monotonic() - started_at:.1f} s")
        yield running


async def test_core_cross_process_test_passes_on_postgresql(pg_stack: RunningStack) -> None:
    from tests.e2e import test_cross_process_delivery as core

    vendor = pg_stack.manage(
        "shell", "-c", "from django.db import connection; print(connection.vendor)"
    )
    assert vendor.stdout.strip().splitlines()[-1] == "postgresql", vendor.stdout + vendor.stderr
    await core.test_every_member_receives_every_message_across_processes_and_replicas(pg_stack)


async def test_one_login_is_known_to_every_replica(pg_stack: RunningStack) -> None:
    """A session created through one replica authenticates websockets on all of them."""
    client = pg_stack.login("pg-alice")
    async with connections(pg_stack, room_path("pg-shared"), 9, cookies=client.cookies) as sockets:
        await sockets[0].send(json.dumps({"message": "hello from postgres", "ref": "pg"}))
        frames = [await recv_until(ws, lambda frame: frame.get("ref") == "pg") for ws in sockets]
    assert {frame["user"] for frame in frames} == {"pg-alice"}
    replicas = {replica_of(frame["delivered_by"]) for frame in frames}
    assert len(replicas) >= 2, f"all sockets on {replicas}: nothing shared was exercised"

    with psycopg.connect(pg_stack.database_url) as connection:
        users = connection.execute(
            "SELECT count(*) FROM auth_user WHERE username = %s", ("pg-alice",)
        ).fetchone()
        sessions = connection.execute("SELECT count(*) FROM django_session").fetchone()
    assert users == (1,) and sessions[0] >= 1
    print(f"\nPostgreSQL: one login served by {len(replicas)} replicas ({sorted(replicas)})")
