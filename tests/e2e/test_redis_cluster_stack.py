"""The native stack (3 replicas x 2 workers, nginx/TLS) on a real 6-node Redis Cluster.

One cluster and one stack for the module. First, the end-to-end cross-process fan-out of
tests/e2e/test_cross_process_delivery.py, in rooms whose group channels land on each of the 3
masters. Then the failover: the master owning a busy room's slot is SIGKILLed during traffic;
its replica is promoted, subscriptions move, delivery resumes within 10 s, and every message
that did not reach everyone was either refused to its sender (``unavailable``) or counted and
logged as lost by the layer. Figures: ``artifacts/faults/cluster_failover.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

from channel_layer.layer import FanoutChannelLayer
from chat.protocol import room_group
from config import env
from infra.redis_topologies import LocalCluster
from tests.faults.failover import RESUME_LIMIT, failover_during_traffic
from tests.faults.tools import (
    ChatClient,
    locate,
    log_offsets,
    log_since,
    lost_logged,
    record_figures,
    send_paced,
    start_clients,
    unhandled_errors,
    wait_until,
)
from tests.harness import (
    CLIENTS,
    MESSAGES_PER_CLIENT,
    RunningStack,
    replica_of,
    room_fanout,
    started,
)
from tests.redis_topologies import cluster_fixture

pytestmark = pytest.mark.e2e

cluster = cluster_fixture()


@pytest.fixture(scope="module")
def cluster_stack(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    with started(
        tmp_path_factory.mktemp("cluster-stack"),
        replicas=3,
        workers=2,
        REDIS_TOPOLOGY="cluster",
        REDIS_URL=cluster.url,
    ) as running:
        yield running


def room_owners(cluster: LocalCluster, count_per_master: int = 1) -> dict[int, list[str]]:
    """Chat rooms whose group channel lands on each master: ``{master port: [room, ...]}``."""
    naming = FanoutChannelLayer(hosts=[{"address": cluster.url}], prefix=env.get("CHANNEL_PREFIX"))
    owners: dict[int, list[str]] = {port: [] for port in cluster.master_ports()}
    for n in range(10_000):
        room = f"shard-room-{n}"
        port = cluster.owner_of(key_slot(naming.group_channel(room_group(room))))
        if len(owners[port]) < count_per_master:
            owners[port].append(room)
        if all(len(rooms) >= count_per_master for rooms in owners.values()):
            return owners
    raise AssertionError("no room found for every master")


async def test_cross_process_fanout_in_rooms_on_every_shard(
    cluster_stack: RunningStack, cluster: LocalCluster
) -> None:
    owners = room_owners(cluster)
    assert len(owners) == 3
    rooms = [rooms[0] for rooms in owners.values()]
    results = await asyncio.gather(*(room_fanout(cluster_stack, room) for room in rooms))
    processes: set[str] = set()
    pairs: Counter[tuple[str, str]] = Counter()
    for room, result in zip(rooms, results, strict=True):
        for index, frames in enumerate(result["received"]):
            assert len(frames) == result["expected"], f"{room}: client {index} got {len(frames)}"
            assert len({frame["id"] for frame in frames}) == result["expected"]
            assert {frame["room"] for frame in frames} == {room}
            processes |= {frame["delivered_by"] for frame in frames}
            pairs.update((frame["sent_by"], frame["delivered_by"]) for frame in frames)
    replicas = {replica_of(p) for p in processes}
    assert len(processes) >= 3 and len(replicas) >= 2, processes
    assert any(replica_of(s) != replica_of(d) for s, d in pairs)
    print(
        f"\nCluster fan-out: {len(rooms)} rooms on {len(owners)} masters, {CLIENTS} clients "
        f"each on {len(processes)} processes in {len(replicas)} replicas, "
        f"{CLIENTS * MESSAGES_PER_CLIENT} messages per room, all delivered"
    )


async def test_slot_migration_of_a_live_room(
    cluster_stack: RunningStack, cluster: LocalCluster
) -> None:
    """The slot of a busy room moves to another master (as ``redis-cli --cluster reshard``
    does) while its members chat: they keep receiving, nothing is silently lost."""
    stack = cluster_stack
    source = cluster.master_ports()[1]
    room = room_owners(cluster)[source][0]
    slot = key_slot(
        FanoutChannelLayer(
            hosts=[{"address": cluster.url}], prefix=env.get("CHANNEL_PREFIX")
        ).group_channel(room_group(room))
    )
    target = next(port for port in cluster.master_ports() if port != source)
    offsets = log_offsets(stack)
    clients = await start_clients(stack, room, 6)
    sender = ChatClient(stack, room, name="sender")
    await sender.start()
    try:
        await locate([*clients, sender], probe=sender)
        sending = asyncio.create_task(send_paced(sender, "mig", 40, 8))
        await asyncio.sleep(2.0)
        moved_at = time.monotonic()
        await asyncio.to_thread(cluster.move_slot, slot, target)
        refs = await sending
        await asyncio.gather(*(c.wait_for_ref(refs[-1], timeout=RESUME_LIMIT) for c in clients))
        await asyncio.sleep(0.5)
        everywhere = {r for r in refs if all(r in c.refs for c in clients)}
        unavailable = len(sender.errors("unavailable"))
        lost = lost_logged(stack, offsets)
        after_move = [
            r for r in refs if r in everywhere and all(c.arrived_at[r] > moved_at for c in clients)
        ]
        figures = {
            "messages_sent": len(refs),
            "messages_delivered_to_all": len(everywhere),
            "unavailable_errors_to_sender": unavailable,
            "messages_lost_counted_and_logged": lost,
            "messages_silently_lost": max(0, len(refs) - len(everywhere) - unavailable - lost),
            "messages_delivered_after_the_move": len(after_move),
            "subscriptions_moved_logged": sum(
                log_since(stack, name, offset).count("subscription(s) moved")
                for name, offset in offsets.items()
                if name.startswith("app")
            ),
        }
        record_figures("cluster_slot_migration_stack", figures)
        assert cluster.owner_of(slot) == target
        assert figures["messages_silently_lost"] == 0, figures
        assert after_move, "members stopped receiving after the move"
        assert figures["subscriptions_moved_logged"] >= 1
        assert all(not c.closes for c in [*clients, sender])
        assert unhandled_errors(stack, offsets) == []
    finally:
        await asyncio.gather(*(c.stop() for c in [*clients, sender]))


async def test_master_sigkill_during_traffic(
    cluster_stack: RunningStack, cluster: LocalCluster
) -> None:
    master = cluster.master_ports()[0]
    room = room_owners(cluster)[master][0]

    def promoted() -> bool:
        with contextlib.suppress(redis.RedisError, StopIteration):
            return master not in cluster.master_ports()
        return False

    result = await failover_during_traffic(
        cluster_stack,
        room,
        kill=lambda: cluster.kill(master),
        wait_promotion=lambda: wait_until(promoted, 30),
    )
    figures = result["figures"]
    record_figures("cluster_failover", figures)
    assert result["resumed_at"] is not None, "delivery did not resume"
    assert result["resumed_at"] - result["killed_at"] < RESUME_LIMIT
    assert figures["messages_silently_lost"] == 0, figures
    assert figures["duplicates"] == 0, figures
    assert figures["history_epochs_seen"] == 2, figures  # the promotion started a new epoch
    assert figures["unavailable_errors_to_sender"] > 0  # the dead master's sends were refused
    assert result["closes"] == 0, "sockets must ride it out"
    assert result["unhandled_errors"] == []
