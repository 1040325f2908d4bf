"""The container probes (infra/probe.py) against real replicas, as an orchestrator runs them.

Kubernetes, compose and the image's HEALTHCHECK exec `python -m infra.probe /readyz` (or
/healthz) in the container: a plain-HTTP GET on $POD_IP (else loopback) with that address as Host.
Both endpoints must pass on every replica, and a redirect must never count as healthy.
(Any Host, such as a pod IP outside ALLOWED_HOSTS, is covered by test_serving.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import RunningStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def probe(port: int, path: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PORT": str(port), "POD_IP": "127.0.0.1"}
    return subprocess.run(
        [sys.executable, "-m", "infra.probe", path],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=30,
        check=False,
    )


def test_probes_pass_on_every_replica_and_a_redirect_fails_them(stack: RunningStack) -> None:
    for port in stack.stack.app_ports:
        for path in ("/healthz", "/readyz"):
            result = probe(port, path)
            assert result.returncode == 0, result.stdout + result.stderr
            assert " 200 " in result.stdout
        # Django's own pages redirect plain HTTP to HTTPS: the probe must call that unhealthy.
        redirected = probe(port, "/accounts/login/")
        assert redirected.returncode == 1, redirected.stdout + redirected.stderr
        assert " 301 " in redirected.stderr


def test_readyz_is_not_served_through_a_proxy(stack: RunningStack) -> None:
    """A Gateway routing `/` to the pods' port, or any proxy, adds a forwarding header: then
    /readyz (its layer counters, its Redis round trip) is not there; the probe's direct GET is."""
    port = stack.stack.app_ports[0]
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Proto"):
        response = httpx.get(
            f"http://127.0.0.1:{port}/readyz", headers={header: "for=198.51.100.7"}, timeout=10
        )
        assert response.status_code == 404, (header, response.text)
        assert "layer" not in response.text
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
