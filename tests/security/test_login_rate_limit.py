"""nginx limits login attempts per client address (nginx/snippets/login-rate-limit*.conf).

10 POSTs a minute with a burst of 20 per address, then 429 before Django is reached; loading
the form is never limited, and other addresses are unaffected.
"""

from __future__ import annotations

import math
import re
import time

import httpx
import pytest

from tests.harness import RunningStack

pytestmark = pytest.mark.e2e

BURST = 20
SECONDS_PER_ATTEMPT = 6  # rate=10r/m
GUESSER, OTHER = "127.0.0.61", "127.0.0.62"


def client_from(stack: RunningStack, address: str) -> httpx.Client:
    transport = httpx.HTTPTransport(verify=stack.ssl_context(), local_address=address)
    return httpx.Client(base_url=stack.base_url, transport=transport, timeout=30)


def attempt(client: httpx.Client, stack: RunningStack, path: str) -> int:
    """One wrong password (the CSRF check passes: this is a real login attempt)."""
    form = client.get(path)
    assert form.status_code == 200
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
    response = client.post(
        path,
        data={"username": "nobody", "password": "wrong-guess", "csrfmiddlewaretoken": token},
        headers={"Referer": stack.base_url + path},
    )
    return response.status_code


@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
def test_login_attempts_are_rate_limited_per_address(limits_stack: RunningStack, path: str) -> None:
    stack = limits_stack
    offset = len(stack.log("nginx"))
    guesser = client_from(stack, GUESSER if path.startswith("/accounts") else "127.0.0.63")
    with (
        guesser,
        client_from(stack, OTHER if path.startswith("/accounts") else "127.0.0.64") as other,
    ):
        # The burst is answered by Django (200: the form again, with its error) -- plus the
        # attempts the bucket refilled meanwhile (one per 6 s) -- then nginx refuses at once.
        started = time.monotonic()
        statuses: list[int] = []
        while len(statuses) < BURST + 20 and 429 not in statuses:
            statuses.append(attempt(guesser, stack, path))
        refilled = math.ceil((time.monotonic() - started) / SECONDS_PER_ATTEMPT)
        assert statuses[-1] == 429, statuses
        assert set(statuses[:-1]) == {200}
        assert BURST <= len(statuses) - 1 <= BURST + refilled, statuses
        assert attempt(guesser, stack, path) == 429
        assert guesser.get(path).status_code == 200
        assert attempt(other, stack, path) == 200  # per address
    log = stack.log("nginx")[offset:]
    assert re.search(rf'"POST {re.escape(path)} HTTP/[\d.]+" 429 .* limit_req=REJECTED', log)
