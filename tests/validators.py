"""The offline validators' virtualenv (.venv-validators), shared by tests/static and tests/e2e.

It is created on demand from the pinned, hashed requirements/validators.txt by
infra/install-validators.sh (``make test`` runs that first, so CI pays once, before pytest).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / os.environ.get("VALIDATORS_VENV", ".venv-validators")


@functools.cache
def validators_bin() -> Path:
    """The venv's bin/ folder, created or refreshed first if the lock file changed."""
    subprocess.run([str(ROOT / "infra" / "install-validators.sh"), str(VENV)], check=True)
    return VENV / "bin"


def tool(name: str) -> str:
    """Path of one validator's executable (fails loudly if the lock lost it)."""
    path = validators_bin() / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: is {name} still in requirements/validators.in?")
    return str(path)


def run(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    """Run a validator offline and capture its output (never raises on a non-zero exit)."""
    environ = dict(os.environ)
    environ.update(env or {})
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=environ,
        cwd=cwd or ROOT,
        timeout=timeout,
        check=False,
    )
