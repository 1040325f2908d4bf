"""The native stack's Redis requires its password; without it, every command is refused."""

from __future__ import annotations

import socket
import stat

import pytest
import redis

from tests.faults.tools import redis_client
from tests.harness import RunningStack

pytestmark = pytest.mark.e2e


def raw_command(port: int, *lines: bytes) -> list[bytes]:
    """Speak RESP inline commands to Redis directly; one reply line per command."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        replies = []
        for line in lines:
            conn.sendall(line + b"\r\n")
            replies.append(conn.recv(4096).split(b"\r\n", 1)[0])
        return replies


def test_redis_refuses_clients_without_the_password(stack: RunningStack) -> None:
    port = stack.stack.redis_port
    ping, keys, config = raw_command(port, b"PING", b"KEYS *", b"CONFIG GET requirepass")
    for reply in (ping, keys, config):
        assert reply.startswith(b"-NOAUTH"), reply
    (wrong,) = raw_command(port, b"AUTH not-the-password")
    assert wrong.startswith(b"-WRONGPASS"), wrong
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, password="not-the-password", socket_timeout=2).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, socket_timeout=2).set("x", "1")


def test_redis_with_the_password_is_locked_down(stack: RunningStack) -> None:
    client = redis_client(stack)
    assert client.ping()
    assert len(client.config_get("requirepass")["requirepass"]) >= 32
    assert client.config_get("protected-mode")["protected-mode"] == "yes"
    assert set(client.config_get("bind")["bind"].split()) <= {"127.0.0.1", "-::1", "::1"}
    # An evicted group or queue is a silently lost message: never evict.
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_the_password_file_is_readable_by_its_owner_only(stack: RunningStack) -> None:
    secrets = stack.stack.run_dir / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for name in ("redis_password", "django_secret_key"):
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((stack.stack.run_dir / "redis" / "redis.conf").stat().st_mode) == 0o600
