"""Every member of a room gets every message, across worker processes and replicas, via nginx/TLS."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

from tests.harness import RunningStack, connections, recv_json, replica_of, room_path

pytestmark = pytest.mark.e2e

CLIENTS = 12
MESSAGES_PER_CLIENT = 3


async def run_room_fanout(stack: RunningStack, room: str) -> dict:
    """12 clients in one room; each sends 3 messages; collect what everyone received."""
    started = time.monotonic()
    async with connections(stack, room_path(room), CLIENTS) as sockets:
        expected = CLIENTS * MESSAGES_PER_CLIENT
        received: list[list[dict]] = [[] for _ in sockets]

        async def reader(index: int) -> None:
            ws = sockets[index]
            try:
                while len(received[index]) < expected:
                    received[index].append(await recv_json(ws, timeout=5))
            except TimeoutError:
                pass

        readers = [asyncio.create_task(reader(i)) for i in range(CLIENTS)]
        for round_ in range(MESSAGES_PER_CLIENT):
            for index, ws in enumerate(sockets):
                await ws.send(json.dumps({"message": f"m{round_}-{index}", "ref": f"{index}.{round_}"}))
        await asyncio.gather(*readers)
    return {"received": received, "expected": expected, "seconds": time.monotonic() - started}


async def test_every_member_receives_every_message_across_processes_and_replicas(
    stack: RunningStack,
) -> None:
    result = await run_room_fanout(stack, "crossproc")
    received, expected = result["received"], result["expected"]

    for index, frames in enumerate(received):
        assert len(frames) == expected, f"client {index} got {len(frames)}/{expected}"
        ids = [frame["id"] for frame in frames]
        assert len(set(ids)) == expected, f"client {index} got duplicates"
        for frame in frames:
            assert frame["type"] == "chat.message"
            assert frame["room"] == "crossproc"
            assert frame["user"] == "anonymous"
            assert frame["message"] == "m{1}-{0}".format(*frame["ref"].split("."))

    # Where each client sits: every frame it receives was delivered by its own worker process.
    holders = []
    for frames in received:
        delivered_by = {frame["delivered_by"] for frame in frames}
        assert len(delivered_by) == 1
        holders.append(delivered_by.pop())
    processes = set(holders)
    replicas = {replica_of(p) for p in processes}
    assert len(processes) >= 3, f"clients sit on only {processes}"
    assert len(replicas) >= 2, f"clients sit on only {replicas}"

    pairs = Counter((f["sent_by"], f["delivered_by"]) for frames in received for f in frames)
    cross_process = {pair for pair in pairs if pair[0] != pair[1]}
    cross_replica = {pair for pair in pairs if replica_of(pair[0]) != replica_of(pair[1])}
    assert cross_process and cross_replica
    print(
        f"\nE2E fan-out: {CLIENTS} clients on {len(processes)} processes in {len(replicas)} "
        f"replicas; {CLIENTS * MESSAGES_PER_CLIENT} messages sent, "
        f"{sum(len(f) for f in received)} deliveries, {len(cross_process)} cross-process pairs, "
        f"{len(cross_replica)} cross-replica pairs, {result['seconds']:.2f} s"
    )
