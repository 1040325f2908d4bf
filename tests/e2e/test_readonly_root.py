"""A replica runs on a read-only root filesystem with only /tmp writable, as in the containers.

No Docker engine here, so the container's filesystem is reproduced with a private mount
namespace: / remounted read-only, a fresh tmpfs on /tmp, and the image's runtime environment
(HOME=/tmp, PYTHONDONTWRITEBYTECODE=1, gunicorn -c infra/gunicorn.conf.py). The test first
proves the repository is unwritable; the replica must then become ready, pass both probes, stop
cleanly on SIGTERM and log no "Read-only file system" error on the way.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import RunningStack, free_port_block

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_replica_serves_from_a_read_only_root(stack: RunningStack) -> None:
    port = free_port_block(1)
    bin_dir = Path(sys.executable).parent
    environ = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": "/tmp",  # the Dockerfile's ENV: gunicorn's control socket goes there
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": f"{ROOT}:{ROOT / 'app'}",
        "BIND_HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "DJANGO_SECRET_KEY": "read-only-root-test-key-not-secret-0123456789",
        "REDIS_URL": stack.stack.app_environment()["REDIS_URL"],
        # PostgreSQL-shaped, never contacted by the probes: no SQLite file to create.
        "DATABASE_URL": "postgres://nobody:nothing@127.0.0.1:1/none",
    }
    marker = ROOT / "app" / ".read-only-check"
    fresh_tmp = "mount -t tmpfs tmpfs /tmp || exit 91"
    if ROOT.is_relative_to("/tmp"):
        # A checkout under /tmp would vanish under the fresh tmpfs: keep a handle on the old /tmp
        # and bind the checkout back at its own path, read-only like the rest of the image.
        here = shlex.quote(str(ROOT))
        old = shlex.quote(str(Path("/mnt") / ROOT.relative_to("/tmp")))
        fresh_tmp = (
            f"mount --bind /tmp /mnt && mount -t tmpfs tmpfs /tmp && mkdir -p {here} && "
            f"mount --bind {old} {here} && mount -o remount,bind,ro {here} || exit 91"
        )
    script = f"""
        mount -o remount,bind,ro / || exit 90
        {fresh_tmp}
        if touch {shlex.quote(str(marker))} 2>/dev/null; then echo "repo is writable"; exit 92; fi
        gunicorn -c infra/gunicorn.conf.py & server=$!
        ready=1
        for _ in $(seq 150); do
            if python -m infra.probe /readyz >/dev/null 2>&1; then ready=0; break; fi
            sleep 0.2
        done
        python -m infra.probe /readyz; python -m infra.probe /healthz; probes=$?
        kill -TERM $server; wait $server; stopped=$?
        echo "ready=$ready probes=$probes stopped=$stopped"
        [ $ready -eq 0 ] && [ $probes -eq 0 ] && [ $stopped -eq 0 ]
    """
    namespace = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        namespace.insert(1, "--map-root-user")
    result = subprocess.run(
        [*namespace, "sh", "-c", script],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    marker.unlink(missing_ok=True)
    assert result.returncode == 0, output
    assert "ready=0 probes=0 stopped=0" in output
    assert "/readyz on 127.0.0.1" in output and " 200 " in output
    assert "Read-only file system" not in output, output
