"""Serving traps: boot order (AppRegistryNotReady), worker class, forwarded headers, whitenoise
under ASGI, the HTTP->HTTPS redirect and probes on the bare replica port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.harness import RunningStack, free_port_block

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = str(Path(sys.executable).parent / "gunicorn")

#: The seeds' broken order: routing (consumers, channels.auth -> auth models) imported before
#: get_asgi_application() has set Django up.
SEED_STYLE_ASGI = """
import os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application
from config.routing import websocket_urlpatterns
application = ProtocolTypeRouter({
    "http": get_asgi_application(),
    "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
})
"""


@contextmanager
def gunicorn(
    tmp_path: Path, app: str = "config.asgi:application", **environ: str
) -> Iterator[tuple[subprocess.Popen, int, Path]]:
    """One fresh gunicorn master with one uvicorn worker on a free port."""
    port = free_port_block(1)
    log = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "CHANNEL_LAYER": "memory",
        "DJANGO_SECRET_KEY": "test-secret-key-for-a-throwaway-gunicorn-0123456789",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "PYTHONPATH": str(tmp_path),
        **environ,
    }
    with log.open("w") as handle:
        process = subprocess.Popen(
            [GUNICORN, "-c", str(ROOT / "infra" / "gunicorn.conf.py"), app],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, port, log
    finally:
        process.terminate()
        process.wait(30)


def wait_http(port: int, process: subprocess.Popen, timeout: float = 30) -> httpx.Response | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        except httpx.TransportError:
            time.sleep(0.2)
    return None


def test_app_boots_in_a_fresh_interpreter_under_gunicorn(tmp_path: Path) -> None:
    with gunicorn(tmp_path) as (process, port, log):
        response = wait_http(port, process)
        assert response is not None and response.status_code == 200, log.read_text()
    text = log.read_text()
    assert "AppRegistryNotReady" not in text
    assert "Booting worker with pid" in text


def test_seed_style_import_order_fails_with_app_registry_not_ready(tmp_path: Path) -> None:
    """Control: the same boot with the seeds' import order must fail, so the test above can."""
    (tmp_path / "seed_asgi.py").write_text(SEED_STYLE_ASGI)
    with gunicorn(tmp_path, app="seed_asgi:application") as (process, port, log):
        assert wait_http(port, process, timeout=20) is None
    assert "AppRegistryNotReady" in log.read_text()


def test_worker_class_is_not_the_deprecated_one() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::DeprecationWarning",
            "-c",
            "import infra.uvicorn_worker as w, uvicorn_worker; "
            "assert issubclass(w.SwitchboardUvicornWorker, uvicorn_worker.UvicornWorker); "
            "import sys; assert 'uvicorn.workers' not in sys.modules",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    conf = (ROOT / "infra" / "gunicorn.conf.py").read_text()
    assert "uvicorn.workers" not in conf


@pytest.mark.parametrize(("trusted", "expect_status"), [("127.0.0.1", 200), ("192.0.2.1", 301)])
def test_forwarded_proto_is_trusted_only_from_the_proxy(
    tmp_path: Path, trusted: str, expect_status: int
) -> None:
    """X-Forwarded-Proto from an untrusted peer is ignored: the request stays plain HTTP and
    Django's SSL redirect answers 301. From FORWARDED_ALLOW_IPS it marks the request secure."""
    with gunicorn(tmp_path, FORWARDED_ALLOW_IPS=trusted, DJANGO_SECURE="true") as (
        process,
        port,
        log,
    ):
        assert wait_http(port, process) is not None, log.read_text()
        response = httpx.get(
            f"http://127.0.0.1:{port}/chat/lobby/",
            headers={"X-Forwarded-Proto": "https", "Host": "localhost"},
        )
    assert response.status_code == expect_status


def test_http_redirects_to_https(stack: RunningStack) -> None:
    response = httpx.get(f"http://localhost:{stack.stack.http_port}/chat/lobby/?x=1")
    assert response.status_code == 301
    assert response.headers["location"] == f"{stack.base_url}/chat/lobby/?x=1"


def test_probes_answer_on_the_bare_replica_port_with_any_host(stack: RunningStack) -> None:
    """Like a kubelet hitting the pod IP: no DisallowedHost, no HTTPS redirect."""
    port = stack.stack.app_ports[0]
    for path, body in (("/healthz", "alive"), ("/readyz", "ready")):
        response = httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Host": "10.1.2.3:8000"})
        assert response.status_code == 200, response.text
        assert response.json()["status"] == body
    # Everything else on that port still enforces ALLOWED_HOSTS.
    other = httpx.get(f"http://127.0.0.1:{port}/chat/lobby/", headers={"Host": "10.1.2.3:8000"})
    assert other.status_code == 400


def test_static_files_come_from_whitenoise_without_asgi_warnings(stack: RunningStack) -> None:
    with stack.http() as client:
        page = client.get("/chat/lobby/")
        assert page.status_code == 200
        script = client.get("/static/chat/chat.js")
        assert script.status_code == 200
        assert "reconnect" in script.text
        hashed = client.get(page.text.split('href="')[1].split('"')[0])  # manifest-hashed CSS
        assert hashed.status_code == 200
        assert "max-age=315360000" in hashed.headers.get("cache-control", "")
    logs = "".join(stack.log(f"app{i}") for i in range(1, stack.stack.replicas + 1))
    assert "must consume synchronous iterators" not in logs
    assert "Exception in ASGI application" not in logs
    assert "DeprecationWarning" not in logs  # e.g. uvicorn's legacy "websockets" implementation
