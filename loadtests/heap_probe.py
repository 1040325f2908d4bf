"""Where an idle websocket's memory goes in one app worker, by allocation site.

    python -m loadtests.heap_probe [--connections 1000] [--frames 1] [--top 30] [--env K=V ...]

Starts a redis-server and one uvicorn server (the worker's own options,
``infra.uvicorn_worker.uvicorn_options``, serving ``config.asgi:application``) on loopback, in a
process of its own with ``tracemalloc`` on. This process opens ``--connections`` websockets
straight to it (rooms of ``--room-size``, with an allowed ``Origin``, as the load generator's
anonymous clients do), and compares the server's heap before and after: the Python heap per
socket, its largest allocation sites (``--frames`` > 1: by traceback), the growth in objects the
garbage collector tracks (by type), and the server's RSS per socket (tracemalloc's own
bookkeeping included: ``--frames 0`` turns it off for an RSS figure alone). A few sockets are
opened and closed first, so that first-use caches are not counted per socket.

What ``python -m loadtests connections`` measures through nginx, across every worker, is the
figure of record; this one says where it goes, and gives a before/after for one change in
seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from infra.redis_topologies import _Topology
from infra.stack import free_port_block

ROOT = Path(__file__).resolve().parent.parent
WARM_UP_SOCKETS = 20


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _control(conn: Any) -> None:
    """Answers the probe's requests from a thread of the server process."""
    while True:
        path = conn.recv()
        gc.collect()
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(path)
        conn.send((_rss_kib(os.getpid()), dict(types)))


def serve(port: int, frames: int, conn: Any, environ: dict[str, str]) -> None:
    """The server process: one uvicorn server, as a worker runs it."""
    os.environ.update(environ)
    sys.path[:0] = [str(ROOT), str(ROOT / "app")]
    os.chdir(ROOT / "app")
    if frames:
        tracemalloc.start(frames)
    import uvicorn

    from infra.uvicorn_worker import uvicorn_options

    config = uvicorn.Config(
        "config.asgi:application", host="127.0.0.1", port=port, log_level="warning",
        **uvicorn_options(),
    )  # fmt: skip
    threading.Thread(target=_control, args=(conn,), daemon=True).start()
    uvicorn.Server(config).run()


async def _open(uri: str, origin: str, count: int, room_size: int, tag: str) -> list[Any]:
    from websockets.asyncio.client import connect

    limit = asyncio.Semaphore(50)

    async def one(index: int) -> Any:
        async with limit:
            room = f"{tag}{index // room_size}"
            return await connect(
                f"{uri}/ws/chat/{room}/", origin=origin, ping_interval=None, max_queue=4
            )

    return await asyncio.gather(*(one(i) for i in range(count)))


async def _close(sockets: list[Any]) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets))


def _wait_listening(port: int, server: Any, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.is_alive():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server did not start listening")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.heap_probe", description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--room-size", type=int, default=50)
    parser.add_argument("--frames", type=int, default=1, help="tracemalloc frames (0: off)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--env", action="append", default=[], help="K=V for the server")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="heap-probe-") as tmp, _Topology(Path(tmp)) as redis:
        redis_port = free_port_block(2)
        app_port = redis_port + 1
        redis._server(redis_port)
        environ = {
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "heap-probe-" + "x" * 50,
            "DJANGO_ALLOWED_HOSTS": "localhost,127.0.0.1",
            "DATABASE_URL": f"sqlite:///{tmp}/db.sqlite3",
            "REDIS_URL": f"redis://:{redis.password}@127.0.0.1:{redis_port}/0",
            "WS_TOKEN_KEYS": "probe-1:" + "k" * 32,
            "METRICS_DIR": f"{tmp}/metrics",
            "DJANGO_LOG_LEVEL": "WARNING",
            **dict(item.split("=", 1) for item in args.env),
        }
        subprocess.run(
            [sys.executable, str(ROOT / "app" / "manage.py"), "migrate", "--noinput"],
            env={**os.environ, **environ}, check=True, capture_output=True,
        )  # fmt: skip
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        server = context.Process(target=serve, args=(app_port, args.frames, theirs, environ))
        server.start()
        try:
            _wait_listening(app_port, server)
            report(args, server.pid, ours, f"ws://127.0.0.1:{app_port}", tmp)
        finally:
            server.terminate()
            server.join(10)


def _snapshot(conn: Any, path: str) -> tuple[int, dict[str, int]]:
    conn.send(path)
    return conn.recv()


def report(args: argparse.Namespace, pid: int, conn: Any, uri: str, tmp: str) -> None:
    origin = "http://localhost"
    loop = asyncio.new_event_loop()
    warm = loop.run_until_complete(_open(uri, origin, WARM_UP_SOCKETS, 5, "warm"))
    loop.run_until_complete(_close(warm))
    time.sleep(1)
    rss_before, types_before = _snapshot(conn, f"{tmp}/before")
    started = time.monotonic()
    sockets = loop.run_until_complete(_open(uri, origin, args.connections, args.room_size, "r"))
    opened = time.monotonic() - started
    time.sleep(2)
    rss_after, types_after = _snapshot(conn, f"{tmp}/after")
    n = len(sockets)
    print(f"{n} websockets held by one uvicorn server (opened in {opened:.1f} s)")
    print(f"server RSS: {(rss_after - rss_before) / n:.2f} KiB per socket")
    if args.frames:
        before = tracemalloc.Snapshot.load(f"{tmp}/before")
        after = tracemalloc.Snapshot.load(f"{tmp}/after")
        ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
        before, after = before.filter_traces(ignore), after.filter_traces(ignore)
        key = "traceback" if args.frames > 1 else "lineno"
        diff = after.compare_to(before, key)
        total = sum(d.size_diff for d in diff)
        print(f"Python heap: {total / n:.0f} B per socket (tracemalloc)\n")
        print(f"{'B/socket':>9} {'blocks':>7}  allocated at")
        for stat in diff[: args.top]:
            frames = list(stat.traceback)[-min(len(stat.traceback), 4) :]
            where = " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in reversed(frames))
            print(f"{stat.size_diff / n:9.0f} {stat.count_diff / n:7.2f}  {where}")
    grown = {
        name: (types_after.get(name, 0) - types_before.get(name, 0)) / n
        for name in types_after.keys() | types_before.keys()
    }
    print("\nobjects the GC tracks, per socket (growth):")
    for name, per in sorted(grown.items(), key=lambda item: -item[1])[:20]:
        if per >= 0.05:
            print(f"{per:7.2f}  {name}")
    loop.run_until_complete(_close(sockets))
    loop.close()


def _short(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    if filename.startswith(str(ROOT)):
        return os.path.relpath(filename, ROOT)
    return "stdlib/" + Path(filename).name


if __name__ == "__main__":
    main()
