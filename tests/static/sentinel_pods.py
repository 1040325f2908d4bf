"""Three "pods" of k8s/components/redis-sentinel, run by their own scripts with the real
redis-server, inside the private network and mount namespace this module is started in.

Run by test_redis_sentinel_component.py as
``unshare --net --mount --pid --fork ... python -m tests.static.sentinel_pods WORKDIR``; prints
one JSON object of what it saw. What a pod would get from Kubernetes is made by hand, and
nothing else: each pod has its own loopback address (127.0.1.N), its DNS name
(redis-sentinel-N.redis-sentinel) in a private /etc/hosts, its `hostname`, and its volumes
(/scripts, /data, /sentinel, /etc/redis-auth) as folders under WORKDIR: the scripts are copied
there with those absolute paths pointed at the folders. Small wrappers bind redis-server and
Sentinel to the pod's address and point redis-cli at it, as a pod's own network would. Every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.static.support import ROOT, wait_for

SCRIPTS = ROOT / "k8s" / "components" / "redis-sentinel" / "scripts"
PODS = 3
SERVICE = "redis-sentinel"
MASTER_NAME = "switchboard"
PASSWORD = "sentinel-pods-test-password"
#: The Sentinels' own (REDIS_SENTINEL_PASSWORD): a script that asked them with PASSWORD fails.
SENTINEL_PASSWORD = "sentinel-pods-test-sentinel-password"
#: Port -> the password that server requires.
PASSWORDS = {6379: PASSWORD, 26379: SENTINEL_PASSWORD}
VOLUMES = ("/scripts/", "/data/", "/sentinel/", "/etc/redis-auth/")


def host(index: int) -> str:
    return f"{SERVICE}-{index}.{SERVICE}"


class Pod:
    """One pod's folders, wrappers and processes (its `redis` and `sentinel` containers)."""

    def __init__(self, work: Path, index: int) -> None:
        self.index = index
        self.address = f"127.0.1.{index + 1}"
        self.root = work / f"pod-{index}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        mounts = {path: self.root / path.strip("/").replace("/", "-") for path in VOLUMES}
        for folder in [*mounts.values(), self.root / "bin"]:
            folder.mkdir(parents=True)
        (mounts["/etc/redis-auth/"] / "password").write_text(PASSWORD)
        (mounts["/etc/redis-auth/"] / "sentinel-password").write_text(SENTINEL_PASSWORD)
        for script in SCRIPTS.glob("*.sh"):
            text = script.read_text()
            for path, folder in mounts.items():
                text = text.replace(path, f"{folder}/")
            (mounts["/scripts/"] / script.name).write_text(text)
        self.scripts = mounts["/scripts/"]
        redis_server = shutil.which("redis-server") or "/usr/sbin/redis-server"
        redis_cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        wrappers = {
            "hostname": f"echo {SERVICE}-{index}",
            "redis-server": f'exec {redis_server} "$@" --bind {self.address}',
            "redis-sentinel": f'exec {redis_server} "$1" --sentinel --bind {self.address}',
            "redis-cli": (
                f'case " $* " in *" -h "*) exec {redis_cli} "$@";; esac\n'
                f'exec {redis_cli} -h {self.address} "$@"'
            ),
        }
        for name, body in wrappers.items():
            wrapper = self.root / "bin" / name
            wrapper.write_text(f"#!/bin/sh\n{body}\n")
            wrapper.chmod(0o755)
        self.environ = {
            **os.environ,
            "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}",
            # The StatefulSet's env (redis-sentinel.yaml).
            "STATEFULSET_NAME": SERVICE,
            "SERVICE_NAME": SERVICE,
            "REPLICAS": str(PODS),
            "REDIS_MAXMEMORY": "64mb",
            "REDIS_SENTINEL_MASTER": MASTER_NAME,
        }

    def start(self, container: str) -> None:
        log = (self.root / f"{container}.log").open("wb")
        self.processes[container] = subprocess.Popen(
            ["sh", str(self.scripts / f"start-{container}.sh")],
            env=self.environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def run(self, script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", str(self.scripts / script), *args],
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def healthy(self, port: int) -> bool:
        return self.run("probe.sh", str(port), timeout=10).returncode == 0

    def ask(self, port: int, *command: str) -> list[str]:
        result = subprocess.run(
            ["redis-cli", "--no-auth-warning", "--raw", "-p", str(port), *command],
            env={**self.environ, "REDISCLI_AUTH": PASSWORDS[port]},
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout.split()

    def sentinel_field(self, field: str) -> str | None:
        reply = self.ask(26379, "sentinel", "master", MASTER_NAME)
        fields = dict(zip(reply[::2], reply[1::2], strict=False))
        return fields.get(field)

    def master_named_by_sentinel(self) -> str:
        reply = self.ask(26379, "sentinel", "get-master-addr-by-name", MASTER_NAME)
        return reply[0] if reply else ""

    def first_log_line(self, container: str) -> str:
        lines = (self.root / f"{container}.log").read_text().splitlines()
        return lines[0] if lines else ""

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


def main(work: Path) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    hosts = work / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n" + "".join(f"127.0.1.{i + 1} {host(i)}\n" for i in range(PODS))
    )
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    pods = [Pod(work, i) for i in range(PODS)]
    seen: dict[str, Any] = {}
    try:
        # OrderedReady: each pod starts once the previous one is ready (both containers).
        seen["ready_after"] = []
        for pod in pods:
            pod.start("redis")
            pod.start("sentinel")
            seen["ready_after"].append(
                wait_for(lambda pod=pod: pod.healthy(6379) and pod.healthy(26379), 30)
            )
        seen["first_start"] = [pod.first_log_line("redis") for pod in pods]
        seen["roles"] = [pod.ask(6379, "role")[:2] for pod in pods]
        seen["sentinels_agree_after"] = wait_for(
            lambda: all(
                pod.sentinel_field("num-other-sentinels") == str(PODS - 1)
                and pod.sentinel_field("num-slaves") == str(PODS - 1)
                for pod in pods
            ),
            40,
        )

        # The master's Redis is killed: the Sentinels promote a replica.
        old_master = pods[0]
        old_master.processes["redis"].send_signal(signal.SIGKILL)
        old_master.processes["redis"].wait(10)
        seen["probe_of_a_dead_redis"] = old_master.healthy(6379)

        def promoted() -> bool:
            named = {pod.master_named_by_sentinel() for pod in pods}
            return len(named) == 1 and named.pop() not in {"", host(0)}

        seen["promoted_after"] = wait_for(promoted, 40)
        new_master = pods[0].master_named_by_sentinel()
        seen["new_master"] = new_master

        # The kubelet restarts the container: it must rejoin as a replica of the new master.
        (old_master.root / "redis.log").unlink()
        old_master.start("redis")
        seen["restarted_ready_after"] = wait_for(lambda: old_master.healthy(6379), 30)
        seen["restarted_first_start"] = old_master.first_log_line("redis")
        seen["restarted_in_sync_after"] = wait_for(
            lambda: "master_link_status:up" in old_master.ask(6379, "info", "replication"), 30
        )
        seen["restarted_role"] = old_master.ask(6379, "role")[:2]

        # preStop on the current master hands the role over before it stops.
        current = next(pod for pod in pods if host(pod.index) == new_master)
        start = time.monotonic()
        result = current.run("pre-stop-redis.sh", timeout=30)
        seen["pre_stop_seconds"] = round(time.monotonic() - start, 2)
        seen["pre_stop_exit"] = result.returncode
        seen["after_pre_stop"] = current.master_named_by_sentinel()
        return seen
    finally:
        for pod in pods:
            pod.stop()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
