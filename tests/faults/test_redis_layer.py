"""The ``redis`` channel layer's own fixes, against a real redis-server (no stack needed).

The stack's default layer is ``fanout``; these keep ``CHANNEL_LAYER=redis`` (channels-redis,
``channel_layer.redis_core``) honest: its pool gives back what a burst opened, a cancelled receive
stops, and group memberships come back after Redis restarts empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from channel_layer.membership import MembershipKeeper
from channel_layer.redis_core import RedisChannelLayer
from config.channel_layers import redis_connection_options
from tests.harness import free_port_block


@dataclass(eq=False)  # weak-referenceable and hashable by identity, as consumers are
class Member:
    channel_layer: RedisChannelLayer
    channel_name: str
    joined: list[str]


class RedisProcess:
    """redis-server on a fixed port and password, which can be restarted (empty)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port_block(1)
        self.password = secrets.token_urlsafe(16)
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--requirepass",
                self.password,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


def layer_for(server: RedisProcess, **extra: object) -> RedisChannelLayer:
    host = {"address": server.url, **redis_connection_options(), "max_idle_connections": 4}
    return RedisChannelLayer(hosts=[host | extra], prefix=f"t{random.getrandbits(24)}")


async def test_a_burst_leaves_no_idle_connections_behind(redis_process: RedisProcess) -> None:
    layer = layer_for(redis_process)
    baseline = redis_process.client().info("clients")["connected_clients"]
    channels = [await layer.new_channel() for _ in range(300)]
    await asyncio.gather(*(layer.group_add("burst", c) for c in channels))
    await asyncio.gather(*(layer.group_discard("burst", c) for c in channels))
    after = redis_process.client().info("clients")["connected_clients"]
    # channels-redis' own pool would keep one connection per concurrent command (~300 here).
    assert after <= baseline + 4
    await layer.flush()


async def test_a_cancelled_receive_stops(redis_process: RedisProcess) -> None:
    """Two receivers cancelled at once, many times: none keeps blocking in BZPOPMIN (Python
    3.11's wait_for can drop the cancellation inside redis-py; channel_layer/redis_core.py)."""
    layer = layer_for(redis_process)
    for _ in range(40):
        names = [await layer.new_channel() for _ in range(2)]
        tasks = [asyncio.ensure_future(layer.receive(name)) for name in names]
        await asyncio.sleep(random.uniform(0, 0.2))
        for task in tasks:
            task.cancel()
        done, pending = await asyncio.wait(tasks, timeout=7)
        assert not pending, "a cancelled receive kept running"
        assert all(task.cancelled() for task in done)


async def test_memberships_come_back_after_redis_restarts_empty(
    redis_process: RedisProcess,
) -> None:
    layer = layer_for(redis_process)
    keeper = MembershipKeeper()
    member = Member(layer, await layer.new_channel(), ["room"])
    await layer.group_add("room", member.channel_name)
    keeper.add(member)
    try:
        await asyncio.sleep(0.2)  # the keeper has seen this Redis's run_id
        redis_process.stop()
        redis_process.start()  # same port and password, no data: the group is gone
        assert redis_process.client().exists(f"{layer.prefix}:group:room") == 0
        for _ in range(100):
            if keeper.restorations and keeper.available:
                break
            await asyncio.sleep(0.1)
        assert keeper.restorations == 1 and keeper.available
        await layer.group_send("room", {"type": "chat.message", "text": "back"})
        received = await asyncio.wait_for(layer.receive(member.channel_name), 10)
        assert received["text"] == "back"
    finally:
        keeper.discard(member)
        await layer.flush()
