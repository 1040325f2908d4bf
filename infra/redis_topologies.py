"""Real Redis topologies on free loopback ports: a 6-node Cluster and a Sentinel set.

Everything is Debian's ``redis-server`` / ``redis-cli`` (no containers, no mocks). The tests
(tests/redis_topologies.py), the load tests (``python -m loadtests compare``) and a developer
(``python -m infra.redis_topologies cluster|sentinel``, then ``make run`` with the printed
settings) start the same thing:

* :class:`LocalCluster`: 3 masters + 3 replicas made by ``redis-cli --cluster create
  --cluster-replicas 1``, ``cluster-node-timeout`` 1 s so that a failover takes seconds.
* :class:`LocalSentinelSet`: 1 master, 1 replica, 3 sentinels (``redis-server --sentinel``),
  ``down-after-milliseconds`` 1 s.

Every server requires a password (``requirepass``). The sentinels require one of their own,
another than the data servers' (REDIS_SENTINEL_PASSWORD), and optionally an ACL user
(REDIS_SENTINEL_USERNAME): a client that asks them with the master's password is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

#: Cluster and Sentinel failure detection: short, for failovers that take seconds in tests.
NODE_TIMEOUT_MS = 1000


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if not found:
        raise RuntimeError(f"{name} is not installed (Debian/Ubuntu: apt-get install redis-server)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, attempts: int = 200) -> int:
    """The first of ``count`` consecutive free loopback ports, below 55000 (cluster bus ports
    are configured explicitly, so nothing needs port + 10000)."""
    for _ in range(attempts):
        base = secrets.randbelow(25000 - count) + 30000
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if predicate():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout} s")


@dataclass
class _Server:
    port: int
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye to the cluster or the clients."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            self.process.wait(10)  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.alive:
            self.process.terminate()  # type: ignore[union-attr]
            try:
                self.process.wait(10)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class _Topology:
    directory: Path
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    servers: dict[int, _Server] = field(default_factory=dict)

    def client(self, port: int, **options: object) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            password=self.password,
            socket_timeout=2,
            socket_connect_timeout=2,
            **options,  # type: ignore[arg-type]
        )

    def _server(self, port: int, *args: str) -> _Server:
        folder = self.directory / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        server = _Server(
            port,
            [
                _binary("redis-server"),
                *args,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(folder),
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                self.password,
                "--masterauth",
                self.password,
            ],
            folder / "redis.log",
        )
        self.servers[port] = server
        server.start()
        return server

    def kill(self, port: int) -> None:
        self.servers[port].kill()

    def restart(self, port: int) -> None:
        server = self.servers[port]
        server.stop()
        server.start()

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def __enter__(self) -> _Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LocalCluster(_Topology):
    """A Redis Cluster of ``masters`` masters with one replica each."""

    masters: int = 3
    base: int = 0

    @property
    def ports(self) -> list[int]:
        return [self.base + i for i in range(self.masters * 2)]

    @property
    def url(self) -> str:
        """A seed node for REDIS_URL (any node would do)."""
        return f"redis://:{self.password}@127.0.0.1:{self.ports[0]}/0"

    def start(self) -> LocalCluster:
        count = self.masters * 2
        self.base = free_ports(count * 2)  # client ports, then cluster bus ports
        for port in self.ports:
            self._server(
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(port + count),
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                # A replica always takes over, however long ago it last heard its master.
                "--cluster-replica-validity-factor",
                "0",
            )
        try:
            for port in self.ports:
                _wait(lambda port=port: self.client(port).ping(), 10, f"redis-server :{port}")
            subprocess.run(
                [
                    _binary("redis-cli"),
                    "--no-auth-warning",
                    "-a",
                    self.password,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in self.ports),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every live node says ``cluster_state:ok`` and they agree on the slot owners."""

        def healthy() -> bool:
            live = [p for p in self.ports if self.servers[p].alive]
            views = set()
            for port in live:
                client = self.client(port)
                if client.cluster("info")["cluster_state"] != "ok":
                    return False
                views.add(tuple(sorted(self.slot_owners(client).items())))
            return len(views) == 1

        _wait(healthy, timeout, "cluster healthy")

    def slot_owners(self, client: redis.Redis | None = None) -> dict[tuple[int, int], int]:
        """``{(first slot, last slot): master port}`` as a node (default: a live one) sees it."""
        if client is None:
            client = self.client(next(p for p in self.ports if self.servers[p].alive))
        slots = client.execute_command("CLUSTER SLOTS")
        return {(int(r[0]), int(r[1])): int(r[2][1]) for r in slots}

    def owner_of(self, slot: int) -> int:
        for (first, last), port in self.slot_owners().items():
            if first <= slot <= last:
                return port
        raise LookupError(f"slot {slot} is not covered")

    def master_ports(self) -> list[int]:
        return sorted(set(self.slot_owners().values()))

    def node_id(self, port: int) -> str:
        return self.client(port).execute_command("CLUSTER MYID").decode()

    def move_slot(self, slot: int, target: int) -> None:
        """Migrate ``slot`` to the master on port ``target`` as ``redis-cli --cluster reshard``
        does: IMPORTING on the target, MIGRATING on the source, keys moved, then NODE on the
        target, the source and every other master."""
        source = self.owner_of(slot)
        source_id, target_id = self.node_id(source), self.node_id(target)
        self.client(target).execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        self.client(source).execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        while keys := self.client(source).execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            self.client(source).execute_command(
                "MIGRATE", "127.0.0.1", target, "", 0, 5000, "AUTH", self.password, "KEYS", *keys
            )
        for port in [
            target,
            source,
            *(p for p in self.master_ports() if p not in (source, target)),
        ]:
            self.client(port).execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


@dataclass
class LocalSentinelSet(_Topology):
    """One master, one replica and three sentinels watching them as ``master_name``.

    The sentinels require ``sentinel_password`` (not the data servers' ``password``); with
    ``sentinel_username``, only that ACL user is let in (the default user is switched off, and
    the sentinels authenticate to each other as that user too)."""

    master_name: str = "switchboard"
    base: int = 0
    sentinel_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    sentinel_username: str | None = None

    @property
    def data_ports(self) -> list[int]:
        return [self.base, self.base + 1]

    @property
    def sentinel_ports(self) -> list[int]:
        return [self.base + 2 + i for i in range(3)]

    @property
    def url(self) -> str:
        """REDIS_URL: the master's credentials and database (Sentinel gives its host)."""
        return f"redis://:{self.password}@127.0.0.1:{self.base}/0"

    @property
    def sentinels(self) -> str:
        """REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    @property
    def settings(self) -> dict[str, str]:
        """The app's settings for this set (REDIS_TOPOLOGY, REDIS_URL, REDIS_SENTINEL*)."""
        settings = {
            "REDIS_TOPOLOGY": "sentinel",
            "REDIS_URL": self.url,
            "REDIS_SENTINELS": self.sentinels,
            "REDIS_SENTINEL_MASTER": self.master_name,
            "REDIS_SENTINEL_PASSWORD": self.sentinel_password,
        }
        if self.sentinel_username:
            settings["REDIS_SENTINEL_USERNAME"] = self.sentinel_username
        return settings

    def _sentinel_auth_lines(self) -> list[str]:
        if not self.sentinel_username:
            return [
                f"requirepass {self.sentinel_password}",
                f"sentinel sentinel-pass {self.sentinel_password}",
            ]
        return [
            "user default off",
            f"user {self.sentinel_username} on >{self.sentinel_password} allcommands allchannels",
            f"sentinel sentinel-user {self.sentinel_username}",
            f"sentinel sentinel-pass {self.sentinel_password}",
        ]

    def start(self) -> LocalSentinelSet:
        self.base = free_ports(5)
        master, replica = self.data_ports
        self._server(master)
        self._server(replica, "--replicaof", "127.0.0.1", str(master))
        try:
            for port in self.sentinel_ports:
                folder = self.directory / str(port)
                folder.mkdir(parents=True, exist_ok=True)
                conf = folder / "sentinel.conf"
                conf.write_text(
                    "\n".join(
                        [
                            f"port {port}",
                            "bind 127.0.0.1",
                            f"dir {folder}",
                            *self._sentinel_auth_lines(),
                            f"sentinel monitor {self.master_name} 127.0.0.1 {master} 2",
                            f"sentinel auth-pass {self.master_name} {self.password}",
                            f"sentinel down-after-milliseconds {self.master_name} "
                            f"{NODE_TIMEOUT_MS}",
                            f"sentinel failover-timeout {self.master_name} 10000",
                            f"sentinel parallel-syncs {self.master_name} 1",
                            "",
                        ]
                    )
                )
                server = _Server(
                    port, [_binary("redis-server"), str(conf), "--sentinel"], folder / "log"
                )
                self.servers[port] = server
                server.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            username=self.sentinel_username,
            password=self.sentinel_password,
            socket_timeout=2,
            socket_connect_timeout=2,
        )

    def master_port(self) -> int:
        """The master's port as the sentinels' majority says now."""
        answers = []
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                reply = self.sentinel(port).execute_command(
                    "SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name
                )
                answers.append(int(reply[1]))
        return max(set(answers), key=answers.count)

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every sentinel knows the master, its replica and the two other sentinels."""

        def healthy() -> bool:
            for port in self.sentinel_ports:
                info = self.sentinel(port).sentinel_master(self.master_name)
                if info["num-slaves"] < 1 or info["num-other-sentinels"] < 2:
                    return False
                if info["is_sdown"] or info["is_odown"]:
                    return False
            master_port = self.master_port()
            master = self.client(master_port).info("replication")
            if master["role"] != "master" or master["connected_slaves"] < 1:
                return False
            replicas = [p for p in self.data_ports if p != master_port and self.servers[p].alive]
            return all(
                self.client(p).info("replication").get("master_link_status") == "up"
                for p in replicas
            )

        _wait(healthy, timeout, "sentinel set healthy")

    def failover(self, timeout: float = 30) -> tuple[int, int]:
        """``SENTINEL FAILOVER``: the master is demoted (it stays up, as a replica) and the
        replica promoted. Sentinel refuses or aborts it while it judges no replica good enough
        (just after a restart), so it is asked again until a promotion happens. Returns
        ``(old master port, new master port)``."""
        old = self.master_port()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.ResponseError):
                self.sentinel(self.sentinel_ports[0]).execute_command(
                    "SENTINEL FAILOVER", self.master_name
                )
            try:
                return old, self.wait_promotion(old, timeout=5)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise

    def wait_promotion(self, old_master: int, timeout: float = 30) -> int:
        """Until the sentinels name another master, which says ``role:master``; its port."""
        found: list[int] = []

        def promoted() -> bool:
            port = self.master_port()
            if port != old_master and self.client(port).info("replication")["role"] == "master":
                found.append(port)
                return True
            return False

        _wait(promoted, timeout, "sentinel promotion")
        return found[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infra.redis_topologies", description=__doc__)
    parser.add_argument("kind", choices=["cluster", "sentinel"])
    options = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix=f"switchboard-{options.kind}-"))
    topology = LocalCluster(directory) if options.kind == "cluster" else LocalSentinelSet(directory)
    with topology.start():
        if isinstance(topology, LocalSentinelSet):
            print(*(f"{name}={value}" for name, value in topology.settings.items()), sep="\n")
        else:
            print(f"REDIS_TOPOLOGY={options.kind}", f"REDIS_URL={topology.url}", sep="\n")
        print(f"# data and logs in {directory}; Ctrl-C stops everything", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    if os.environ.get("KEEP") != "1":
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
