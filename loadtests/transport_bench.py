"""What the layer's hand-written subscriber buys over redis-py's pub/sub, in one run.

    python -m loadtests.transport_bench [--messages 50000] [--rounds 2]

Starts a redis-server and a 6-node cluster (``infra.redis_topologies``) on loopback. For each
topology, a subscriber in this process receives ``--messages`` messages of 200 bytes that a
separate publisher process sends as fast as it can (pipelined ``PUBLISH`` / ``SPUBLISH`` to the
channel's owner), and the subscriber thread's CPU time (``time.thread_time``: the publisher is
not counted, idle waits are not CPU) is divided by the messages received. The subscribers:

* ``layer``: ``channel_layer.transport.RespConnection`` (hiredis ``Reader``, pushes handed to
  a callback), what the layer uses;
* ``redis-py``: ``redis.asyncio`` ``PubSub.get_message`` on one server, ``ClusterPubSub``
  (``ssubscribe`` / ``get_sharded_message``) on the cluster -- the library's own path, with
  hiredis installed.

Paths and topologies alternate within each round; the table gives every round.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from infra.redis_topologies import LocalCluster, _Topology, free_ports

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "app"))

from channel_layer.transport import RedisAddress, RespConnection  # noqa: E402

CHANNEL = b"bench:0:g:{chat.room-1}"
PAYLOAD_BYTES = 200

PUBLISHER = """
import sys, redis
host, port, password, command, channel, count = sys.argv[1:7]
client = redis.Redis(host=host, port=int(port), password=password)
payload = b"x" * {size}
sent = 0
while sent < int(count):
    pipe = client.pipeline(transaction=False)
    for _ in range(min(500, int(count) - sent)):
        pipe.execute_command(command, channel, payload)
        sent += 1
    pipe.execute()
"""


def publish(port: int, password: str, command: str, count: int) -> subprocess.Popen[bytes]:
    code = PUBLISHER.replace("{size}", str(PAYLOAD_BYTES))
    return subprocess.Popen(
        [sys.executable, "-c", code, "127.0.0.1", str(port), password, command, CHANNEL, str(count)]
    )


async def layer_path(port: int, password: str, sharded: bool, count: int) -> float:
    address = RedisAddress(host="127.0.0.1", port=port, password=password)
    received = 0
    done = asyncio.get_running_loop().create_future()
    kind = b"smessage" if sharded else b"message"

    def on_push(reply: list) -> None:
        nonlocal received
        if reply[0] == kind:
            received += 1
            if received == count and not done.done():
                done.set_result(None)

    confirmed = asyncio.get_running_loop().create_future()

    def on_first(reply: list) -> None:
        if reply[0] in (b"subscribe", b"ssubscribe") and not confirmed.done():
            confirmed.set_result(None)
        on_push(reply)

    connection = await RespConnection.open(address, on_first)
    connection.write("SSUBSCRIBE" if sharded else "SUBSCRIBE", CHANNEL)
    await confirmed
    started = time.thread_time()
    publisher = publish(port, password, "SPUBLISH" if sharded else "PUBLISH", count)
    await asyncio.wait_for(done, 120)
    cpu = time.thread_time() - started
    publisher.wait(30)
    connection.close()
    return cpu


async def library_path(port: int, password: str, sharded: bool, count: int) -> float:
    if sharded:
        client = RedisCluster(host="127.0.0.1", port=port, password=password)
        await client.initialize()
        pubsub = client.pubsub()
        await pubsub.ssubscribe(CHANNEL)
        owner = client.get_node_from_key(CHANNEL)
        get = pubsub.get_sharded_message
        target = owner.port
    else:
        client = Redis(host="127.0.0.1", port=port, password=password)
        pubsub = client.pubsub()
        await pubsub.subscribe(CHANNEL)
        get = pubsub.get_message
        target = port
    while await get(timeout=1.0) is None:  # the subscription's confirmation
        pass
    started = time.thread_time()
    publisher = publish(target, password, "SPUBLISH" if sharded else "PUBLISH", count)
    received = 0
    deadline = time.monotonic() + 120
    while received < count and time.monotonic() < deadline:
        message = await get(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None and message["type"] in ("message", "smessage", b"message"):
            received += 1
    cpu = time.thread_time() - started
    publisher.wait(30)
    await pubsub.aclose()
    await client.aclose()
    if received < count:
        raise RuntimeError(f"redis-py received {received} of {count}")
    return cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.transport_bench", description=__doc__
    )
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="transport-bench-"))
    single = _Topology(directory / "single")
    port = free_ports(1)
    single._server(port)
    cluster = LocalCluster(directory / "cluster").start()
    try:
        time.sleep(0.5)
        owner = cluster.owner_of(key_slot(CHANNEL))
        rows = []
        for round_ in range(1, options.rounds + 1):
            for name, sharded, server_port, password in (
                ("single", False, port, single.password),
                ("cluster", True, owner, cluster.password),
            ):
                for path, run in (("layer", layer_path), ("redis-py", library_path)):
                    seed = server_port if path == "layer" or not sharded else cluster.ports[0]
                    cpu = asyncio.run(run(seed, password, sharded, options.messages))
                    rows.append((round_, name, path, cpu / options.messages * 1e6))
        print(f"\n{options.messages:,} messages of {PAYLOAD_BYTES} bytes per measurement")
        print(f"{'round':>5}  {'topology':<8}  {'subscriber':<9}  {'CPU us/message':>14}")
        for round_, name, path, us in rows:
            print(f"{round_:>5}  {name:<8}  {path:<9}  {us:>14.2f}")
        for name in ("single", "cluster"):
            layer = [us for _, n, p, us in rows if n == name and p == "layer"]
            library = [us for _, n, p, us in rows if n == name and p == "redis-py"]
            print(
                f"{name}: redis-py costs {min(library) / max(layer):.1f}-"
                f"{max(library) / min(layer):.1f}x the layer's subscriber per message"
            )
    finally:
        cluster.stop()
        single.stop()


if __name__ == "__main__":
    main()
