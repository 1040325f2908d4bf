"""Every member of a room gets every message, across processes and replicas, via nginx/TLS."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.harness import CLIENTS, MESSAGES_PER_CLIENT, RunningStack, replica_of, room_fanout

pytestmark = pytest.mark.e2e


async def test_every_member_receives_every_message_across_processes_and_replicas(
    stack: RunningStack,
) -> None:
    result = await room_fanout(stack, "crossproc")
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


def test_in_memory_layer_is_caught_missing_cross_process_delivery(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same test against InMemoryChannelLayer must fail: proof that Redis carries messages."""
    import asyncio

    from tests.harness import started

    with started(tmp_path_factory.mktemp("memory"), CHANNEL_LAYER="memory") as memory_stack:
        result = asyncio.run(room_fanout(memory_stack, "crossproc"))
    received, expected = result["received"], result["expected"]
    short = [len(frames) for frames in received if len(frames) < expected]
    assert short, "every client got every message without Redis?"
    pairs = {(f["sent_by"], f["delivered_by"]) for frames in received for f in frames}
    assert all(sent == delivered for sent, delivered in pairs), "cross-process delivery in memory?"
    print(f"\nInMemoryChannelLayer: {len(short)}/{CLIENTS} clients missed messages; no cross pairs")
