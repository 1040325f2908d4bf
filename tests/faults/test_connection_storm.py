"""2,000 websockets connect in a burst, all get a message, then all close.

No worker dies, and afterwards Redis ``connected_clients`` and the workers' open file descriptors
come back to where they were: channels-redis' pool used to keep every connection a burst opened
(1,740 Redis connections left behind by this very test; see channel_layer/redis_core.py).

The clients come from 20 loopback addresses (127.0.0.10-29), 100 each, as 2,000 users would:
nginx's per-IP handshake limit (20/s, burst 200) is tested on its own in tests/security.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import websockets

from config import env
from tests.faults.tools import (
    eventually,
    log_offsets,
    record_figures,
    redis_client,
    unhandled_errors,
)
from tests.harness import RunningStack, recv_json, room_path

pytestmark = pytest.mark.e2e

CONNECTIONS = 2000
SOURCE_ADDRESSES = [f"127.0.0.{10 + i}" for i in range(20)]
CONCURRENT_HANDSHAKES = 200
MAX_IDLE = int(env.get("REDIS_MAX_IDLE_CONNECTIONS"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(stack: RunningStack) -> dict[str, object]:
    programs = [f"app{i}" for i in range(1, stack.stack.replicas + 1)]
    workers = {pid: open_fds(pid) for name in programs for pid in stack.worker_pids(name)}
    return {
        "redis_clients": int(redis_client(stack).info("clients")["connected_clients"]),
        "worker_fds": workers,
        "masters": {name: stack.program_pid(name) for name in programs},
    }


async def test_connection_storm_leaves_nothing_behind(fault_stack: RunningStack) -> None:
    stack = fault_stack
    offsets = log_offsets(stack)
    before = snapshot(stack)
    limit = asyncio.Semaphore(CONCURRENT_HANDSHAKES)

    async def one(index: int) -> websockets.ClientConnection:
        async with limit:
            return await stack.connect(
                room_path("storm"),
                local_addr=(SOURCE_ADDRESSES[index % len(SOURCE_ADDRESSES)], 0),
            )

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(CONNECTIONS)), return_exceptions=True)
    connect_seconds = time.monotonic() - started
    sockets = [r for r in results if isinstance(r, websockets.ClientConnection)]
    failures = [repr(r)[:200] for r in results if not isinstance(r, websockets.ClientConnection)]
    try:
        assert not failures, f"{len(failures)} handshakes failed, e.g. {failures[:3]}"
        peak = snapshot(stack)
        # Everyone is really in the room: one message reaches all 2,000.
        fanout_started = time.monotonic()
        await sockets[0].send(json.dumps({"message": "storm", "ref": "storm"}))
        frames = await asyncio.gather(*(recv_json(ws, timeout=60) for ws in sockets))
        fanout_seconds = time.monotonic() - fanout_started
        assert all(frame.get("ref") == "storm" for frame in frames)
    finally:
        closing = time.monotonic()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        close_seconds = time.monotonic() - closing

    # Back to the baseline: each worker may keep MAX_IDLE idle Redis connections, no more.
    workers = len(before["worker_fds"])
    redis_ceiling = before["redis_clients"] + workers * MAX_IDLE

    def settled() -> bool:
        now = snapshot(stack)
        return now["redis_clients"] <= redis_ceiling and all(
            now["worker_fds"].get(pid, 10**6) <= fds + MAX_IDLE + 2
            for pid, fds in before["worker_fds"].items()
        )

    try:
        settle_seconds = await eventually(settled, timeout=30, interval=0.5)
    except TimeoutError:
        after = snapshot(stack)
        raise AssertionError(f"not back to baseline: before {before}, after {after}") from None
    after = snapshot(stack)
    # No worker died or was replaced, no master restarted.
    assert set(after["worker_fds"]) == set(before["worker_fds"])
    assert after["masters"] == before["masters"]
    assert unhandled_errors(stack, offsets) == []
    record_figures(
        "connection_storm",
        {
            "connections": CONNECTIONS,
            "source_addresses": len(SOURCE_ADDRESSES),
            "handshake_failures": len(failures),
            "connect_all_s": round(connect_seconds, 2),
            "fanout_to_all_s": round(fanout_seconds, 2),
            "close_all_s": round(close_seconds, 2),
            "back_to_baseline_after_s": round(settle_seconds, 2),
            "redis_clients": {
                "before": before["redis_clients"],
                "peak": peak["redis_clients"],
                "after": after["redis_clients"],
            },
            "worker_fds": {
                "before": sorted(before["worker_fds"].values()),
                "peak": sorted(peak["worker_fds"].values()),
                "after": sorted(after["worker_fds"].values()),
            },
            "workers_died": 0,
        },
    )
