"""What room history costs Redis per message, and which part of the append script costs it.

    python -m loadtests.history_bench [--messages 20000] [--rounds 2] [--batch 200]

Starts a redis-server on loopback with ``--subscribers`` (6) connections subscribed to one
room's channel (as many worker processes of a stack), then sends ``--messages`` chat messages
(a MessagePack event like the chat consumer's, ~230 bytes) as fast as a client can,
``--batch`` commands per round trip (1: one command per wake-up of Redis, as at a low rate),
once per *variant*, and divides the redis-server process's CPU time (``/proc``) by the
messages:

* ``publish``: ``PUBLISH`` alone, what a message costs with ``CHAT_HISTORY_SIZE=0``;
* ``append``: the layer's script (``channel_layer.history.APPEND``), as it runs;
* ``append, no INFO``: without reading ``INFO replication`` (the epoch's writer) per append;
* ``append, no re-pack``: publishing the message as given instead of unpacking it to add
  ``offset``/``epoch`` and packing it again (``cmsgpack``);
* ``append, no XTRIM``: without the age bound (``XTRIM MINID`` per append).

Each variant is the real script with one part taken out (string edits of ``APPEND``), so the
differences are what those parts cost. Variants alternate within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import redis

from infra.redis_topologies import _Topology, free_ports
from loadtests import procstat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "app"))

from channel_layer.history import APPEND  # noqa: E402
from channel_layer.transport import RedisAddress, RespConnection  # noqa: E402

CHANNEL = b"bench:0:g:{chat.room-1}"
KEYS = (b"bench:h:{chat.room-1}", b"bench:hm:{chat.room-1}")

_WRITER_LINE = (
    "local writer = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')"
)
_REPACK = """local message = cmsgpack.unpack(ARGV[3])
message['offset'] = offset
message['epoch'] = epoch
local payload = cmsgpack.pack(message)"""
_XTRIM = "redis.call('XTRIM', KEYS[1], 'MINID', now_ms - ttl)"


def _without(source: str, part: str, replacement: str = "") -> str:
    if part not in source:
        raise RuntimeError(f"the append script changed: {part[:40]!r} not found")
    return source.replace(part, replacement)


VARIANTS: dict[str, str | None] = {
    "publish": None,
    "append": APPEND,
    "append, no INFO": _without(APPEND, _WRITER_LINE, "local writer = 'fixed'"),
    "append, no re-pack": _without(APPEND, _REPACK, "local payload = ARGV[3]"),
    "append, no XTRIM": _without(APPEND, _XTRIM),
}


def event() -> bytes:
    """A chat event as the consumer records it (the layer's MessagePack serializer)."""
    return msgpack.packb(
        {
            "type": "chat.message",
            "message": "lt1a2b3c4.12.345.987654321012345.",
            "user": "anonymous",
            "id": "0f8e2a4c6b1d4e3f9a7b5c3d1e2f4a6b",
            "ref": "r-12345",
            "sent_by": "host-app1:12345",
            "room": "lta1b2c3_7",
        }
    )


def send(port: int, password: str, source: str | None, count: int, batch: int) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    payload = event()
    sha = client.script_load(source) if source is not None else None
    sent = 0
    while sent < count:
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, count - sent)):
            if sha is None:
                pipe.execute_command("PUBLISH", CHANNEL, b"hdr:1:" + payload)
            else:
                pipe.evalsha(
                    sha, 2, *KEYS, CHANNEL, b"hdr:1:", payload, 200, 86_400_000, "e1", "PUBLISH"
                )
            sent += 1
        pipe.execute()
    client.close()


async def measure(
    port: int, password: str, pid: int, source: str | None, count: int, subscribers: int, batch: int
) -> float:
    """Redis CPU microseconds per message for one variant."""
    received = confirmed = 0
    ready, all_in = asyncio.Event(), asyncio.Event()

    def on_push(reply: list) -> None:
        nonlocal confirmed, received
        if reply[0] == b"message":
            received += 1
            if received == count * subscribers:
                all_in.set()
        elif reply[0] == b"subscribe":
            confirmed += 1
            if confirmed == subscribers:
                ready.set()

    address = RedisAddress(host="127.0.0.1", port=port, password=password)
    connections = [await RespConnection.open(address, on_push) for _ in range(subscribers)]
    for connection in connections:
        connection.write("SUBSCRIBE", CHANNEL)
    await asyncio.wait_for(ready.wait(), 10)
    cpu0 = procstat.cpu_seconds([pid])
    await asyncio.to_thread(send, port, password, source, count, batch)
    try:
        await asyncio.wait_for(all_in.wait(), 60)
    except TimeoutError:
        raise RuntimeError(f"{received} of {count * subscribers} messages arrived") from None
    cpu = procstat.cpu_seconds([pid]) - cpu0
    for connection in connections:
        connection.close()
    return cpu / count * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.history_bench", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--subscribers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=200, help="commands per round trip")
    options = parser.parse_args(argv)
    single = _Topology(Path(tempfile.mkdtemp(prefix="history-bench-")))
    port = free_ports(1)
    server = single._server(port)
    try:
        client = single.client(port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert server.process is not None
        rows: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(options.rounds):
            for name, source in VARIANTS.items():
                client.delete(*KEYS)
                us = asyncio.run(
                    measure(
                        port,
                        single.password,
                        server.process.pid,
                        source,
                        options.messages,
                        options.subscribers,
                        options.batch,
                    )
                )
                rows[name].append(us)
        print(
            f"\n{options.messages:,} messages per measurement, {options.subscribers} "
            f"subscribers, {options.batch} per round trip, {options.rounds} rounds: "
            "Redis CPU per message"
        )
        base = min(rows["append"])
        for name, values in rows.items():
            figures = " / ".join(f"{us:.1f}" for us in values)
            print(f"  {name:<20} {figures:>20} us   ({min(values) / base:.2f}x append)")
    finally:
        single.stop()


if __name__ == "__main__":
    main()
