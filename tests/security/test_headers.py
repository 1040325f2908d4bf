"""Security headers on HTTP responses through nginx, and the checks Django runs for deployment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import RunningStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

#: Pages of every kind nginx serves: the app's HTML, a redirect, a login form, a static file,
#: Django's 404, nginx's own answers (/healthz, the hidden /readyz, a limit refusal page is
#: covered by `always`).
PATHS = [
    "/chat/lobby/",
    "/",
    "/accounts/login/",
    "/static/chat/chat.js",
    "/no-such-page/",
    "/healthz",
    "/readyz",
    "/ws/chat/lobby/",
]


def header_values(response: httpx.Response, name: str) -> list[str]:
    return response.headers.get_list(name)


@pytest.mark.parametrize("path", PATHS)
def test_every_response_carries_the_security_headers(stack: RunningStack, path: str) -> None:
    with stack.http() as client:
        response = client.get(path)
    hsts = header_values(response, "Strict-Transport-Security")
    assert len(hsts) == 1, hsts  # once: nginx hides the app's copy
    max_age = int(re.search(r"max-age=(\d+)", hsts[0]).group(1))
    assert max_age >= 31536000 and "includeSubDomains" in hsts[0]
    assert header_values(response, "X-Content-Type-Options") == ["nosniff"]
    assert header_values(response, "Referrer-Policy") in (
        ["same-origin"],
        ["no-referrer"],
        ["strict-origin-when-cross-origin"],
    )
    framing = header_values(response, "X-Frame-Options")
    csp = response.headers.get("Content-Security-Policy", "")
    assert framing == ["DENY"] or "frame-ancestors 'none'" in csp
    assert response.headers.get("Server") == "nginx"  # no version (server_tokens off)


def test_the_chat_page_has_a_strict_content_security_policy(stack: RunningStack) -> None:
    with stack.http() as client:
        response = client.get("/chat/lobby/")
    assert response.status_code == 200
    policies = header_values(response, "Content-Security-Policy")
    assert len(policies) == 1
    directives = {
        part.split()[0]: part.split()[1:] for part in policies[0].split(";") if part.strip()
    }
    assert directives["default-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]  # no inline script, no eval
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["object-src"] == ["'none'"]
    assert "connect-src" in directives and "'unsafe-inline'" not in policies[0]
    # The page really has no inline script for the policy to break (the room name is JSON).
    scripts = re.findall(r"<script(?P<attrs>[^>]*)>(?P<body>.*?)</script>", response.text, re.S)
    for attrs, body in scripts:
        assert "src=" in attrs or 'type="application/json"' in attrs, (attrs, body[:80])


def test_session_and_csrf_cookies_are_locked_down(stack: RunningStack) -> None:
    client = stack.login("cookie-check")
    cookies = {c.name: c for c in client.cookies.jar}
    client.close()
    session = cookies["sessionid"]
    assert session.secure and session.has_nonstandard_attr("HttpOnly")
    assert session.get_nonstandard_attr("SameSite") in {"Lax", "Strict"}
    assert cookies["csrftoken"].secure


def test_plain_http_only_redirects_and_probes_stay_internal(stack: RunningStack) -> None:
    response = httpx.get(f"http://localhost:{stack.stack.http_port}/chat/lobby/")
    assert response.status_code == 301
    assert response.headers["location"].startswith("https://")
    with stack.http() as client:
        # /readyz costs a Redis round trip and names internal failures: not for the internet.
        assert client.get("/readyz").status_code == 404


def test_check_deploy_passes_with_the_stacks_production_settings(stack: RunningStack) -> None:
    """The native stack's real environment (DEBUG off, generated secret key, HTTPS on)."""
    result = stack.stack.manage("check", "--deploy", "--fail-level", "WARNING", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_fails_on_insecure_settings(stack: RunningStack) -> None:
    """The same check bites: debug on and HTTPS hardening off are findings."""
    env = stack.stack.app_environment() | {"DJANGO_DEBUG": "true", "DJANGO_SECURE": "false"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        cwd=ROOT / "app",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "security.W018" in output  # DEBUG in deployment
    assert "security.W008" in output  # no SSL redirect
