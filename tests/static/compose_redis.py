"""The Redis services of one compose topology, run with their exact compose commands by the real
redis-server, inside the private network, mount and PID namespace this module is started in.

Run by test_compose_redis_topologies.py as
``unshare --net --mount --pid --fork ... python -m tests.static.compose_redis TOPOLOGY WORKDIR``;
prints one JSON object of what it saw. No Docker engine here, so what a container would get
from it is made by hand, and nothing else: each service has its own loopback address
(127.0.2.N) under its service name in a private /etc/hosts (Docker's DNS), its environment, and
a folder for its /data tmpfs. Small wrappers bind redis-server (and Sentinel) to the service's
address, for listening and as the source of its connections, and point redis-cli at it, as a
container's own network would. Entrypoint, command, healthcheck and environment are the merged
compose file's, unchanged. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.static.support import load_compose, wait_for


class Container:
    """One compose service's process, with its address, environment and /data folder."""

    def __init__(self, work: Path, name: str, service: dict[str, Any], address: str) -> None:
        self.name = name
        self.service = service
        self.address = address
        self.root = work / name
        self.data = self.root / "data"
        bin_dir = self.root / "bin"
        for folder in (self.data, bin_dir):
            folder.mkdir(parents=True)
        redis_server = shutil.which("redis-server") or "/usr/sbin/redis-server"
        redis_cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        network = f"--bind {address} --bind-source-addr {address}"
        wrappers = {
            "redis-server": f'exec {redis_server} "$@" {network}',
            "redis-sentinel": f'exec {redis_server} "$1" --sentinel {network}',
            "redis-cli": (
                f'case " $* " in *" -h "*) exec {redis_cli} "$@";; esac\n'
                f'exec {redis_cli} -h {address} "$@"'
            ),
        }
        for tool, body in wrappers.items():
            wrapper = bin_dir / tool
            wrapper.write_text(f"#!/bin/sh\n{body}\n")
            wrapper.chmod(0o755)
        self.environ = {
            **os.environ,
            **{key: str(value) for key, value in service.get("environment", {}).items()},
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [*self.service.get("entrypoint", []), *self.service["command"]]
        argv = [arg.replace("/data/", f"{self.data}/") for arg in argv]
        log = (self.root / "log").open("wb")
        self.process = subprocess.Popen(
            argv, env=self.environ, cwd=self.data, stdout=log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return (self.root / "log").read_text(errors="replace")

    def healthy(self) -> bool:
        kind, command = self.service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        check = subprocess.run(
            ["sh", "-c", command], env=self.environ, capture_output=True, timeout=10, check=False
        )
        return check.returncode == 0

    def ask(self, *command: str, port: int = 6379) -> str:
        result = subprocess.run(
            ["redis-cli", "--no-auth-warning", "--raw", "-p", str(port), *command],
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def cluster(containers: dict[str, Container]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    create = containers.pop("redis-cluster-create")
    nodes = containers
    for node in nodes.values():
        node.start()
    seen["nodes_healthy_after"] = wait_for(lambda: all(n.healthy() for n in nodes.values()), 30)
    create.start()
    seen["create_exit"] = create.process.wait(90)
    seen["cluster_info"] = nodes["redis"].ask("cluster", "info").split()[:1]
    shards = nodes["redis"].ask("cluster", "shards").split()
    # Every endpoint a client is handed is a service name (cluster-preferred-endpoint-type).
    seen["endpoints"] = sorted(
        {shards[i + 1] for i, word in enumerate(shards) if word == "endpoint"}
    )
    seen["roles"] = sorted(n.ask("role").split()[0] for n in nodes.values())
    seen["replicas_in_sync_after"] = wait_for(
        lambda: (
            sum("master_link_status:up" in n.ask("info", "replication") for n in nodes.values())
            == 3
        ),
        30,
    )
    # A second `up` runs the one-shot again: it must find the cluster formed and succeed.
    (create.root / "log").unlink()
    create.start()
    seen["second_create_exit"] = create.process.wait(60)
    seen["second_create_says"] = create.log().strip().splitlines()[-1:]
    nodes["redis-cluster-create"] = create
    return seen


def sentinel(containers: dict[str, Container]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    servers = [containers["redis"], containers["redis-replica"]]
    sentinels = [c for name, c in containers.items() if name.startswith("redis-sentinel")]
    for group in (servers[:1], servers[1:], sentinels):  # the depends_on order
        for container in group:
            container.start()
        seen.setdefault("healthy_after", []).append(
            wait_for(lambda group=group: all(c.healthy() for c in group), 30)
        )
    master = containers["app"].service["environment"]["REDIS_SENTINEL_MASTER"]

    def fields(container: Container) -> dict[str, str]:
        reply = container.ask("sentinel", "master", master, port=26379).split()
        return dict(zip(reply[::2], reply[1::2], strict=False))

    seen["sentinels_agree_after"] = wait_for(
        lambda: all(
            fields(s).get("num-slaves") == "1" and fields(s).get("num-other-sentinels") == "2"
            for s in sentinels
        ),
        30,
    )

    def named() -> set[str]:
        return {
            s.ask("sentinel", "get-master-addr-by-name", master, port=26379).split()[0]
            for s in sentinels
        }

    seen["named_before"] = sorted(named())
    servers[0].stop()  # `docker compose kill redis`
    seen["promoted_after"] = wait_for(lambda: named() == {"redis-replica"}, 40)
    seen["replica_role_after"] = servers[1].ask("role").split()[:1]
    return seen


def main(topology: str, work: Path) -> dict[str, Any]:
    compose = load_compose(topology=topology)
    services = {
        name: service
        for name, service in compose["services"].items()
        if service.get("image", "").startswith("redis:")
    }
    addresses = {name: f"127.0.2.{i + 1}" for i, name in enumerate(services)}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    hosts = work / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in addresses.items()))
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    containers = {n: Container(work, n, s, addresses[n]) for n, s in services.items()}
    try:
        if topology == "cluster":
            return cluster(dict(containers))
        app = Container(work, "app", compose["services"]["app"], "127.0.2.250")
        return sentinel({**containers, "app": app})
    finally:
        for container in containers.values():
            container.stop()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
