"""What a load test runs against: a running stack by URL, or one the tool starts itself.

``--target`` takes either

* a URL, ``https://localhost:8443``: a stack that is already running (``make start``). Its CA
  comes from ``--ca``; ``--run-dir`` (default ``.run`` when it exists) lets the tool find the
  stack's process ids for memory and CPU figures;
* the name of a target the tool starts on free loopback ports, each with its own redis-server,
  nginx (the same configuration files as Switchboard) and CA, stopped again at the end:

  - ``switchboard``: this stack (``infra.stack.Stack``; 3 replicas x 2 uvicorn workers unless
    told otherwise);
  - ``tutorial``: the seeds' tutorial setup, one daphne process, stock ``RedisChannelLayer``;
  - ``nodjango``: the upper bound, a plain ``websockets`` server in 2 processes on Redis pub/sub.

  A name takes settings after a colon: ``switchboard:CHANNEL_LAYER=pubsub,WEB_CONCURRENCY=1``;
  ``replicas=N`` sets the number of app processes (replicas for Switchboard) and ``label=...``
  the name shown in the report. ``switchboard:REDIS_TOPOLOGY=cluster`` runs the stack on a
  6-node Redis Cluster of its own (3 masters + 3 replicas, ``infra.redis_topologies``), and
  ``REDIS_TOPOLOGY=sentinel`` on a master, a replica and 3 sentinels; Redis CPU is then the
  sum over all their processes. ``checkout=<dir>`` runs the app of another checkout (the
  code before a change) with this virtualenv, nginx and Redis; ``nginx=<dir>`` puts another
  nginx configuration folder (``nginx.conf``, ``snippets/``, ``templates/``; e.g. ``git
  archive <commit> nginx | tar -x -C <dir>``, then ``<dir>/nginx``) in front of any started
  target, so that two nginx configurations are measured in one run.

Only loopback addresses are ever targets: anything else is refused before a socket is opened.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from infra.redis_topologies import LocalCluster, LocalSentinelSet
from infra.stack import BIN, ROOT, Stack, isolated_environ
from loadtests.client import Endpoint

BASELINES = Path(__file__).resolve().parent / "baselines"

#: Settings every started Switchboard gets, on top of the defaults in app/config/env.py: the
#: load generator sends from a few hundred connections far faster than a person types, so the
#: per-connection chat rate limit would refuse most of it.
SWITCHBOARD_BENCH_ENV = {"CHAT_RATE_PER_SECOND": "100000", "CHAT_RATE_BURST": "100000"}


class TargetError(ValueError):
    """A --target that cannot be used (not loopback, unknown name, bad setting)."""


def require_loopback(host: str, port: int) -> str:
    """The first address ``host`` resolves to, if every address it resolves to is loopback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TargetError(f"cannot resolve {host!r}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    outside = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if outside or not addresses:
        raise TargetError(
            f"{host} resolves to {', '.join(outside) or 'nothing'}: load tests only run against "
            "loopback addresses (127.0.0.0/8, ::1)"
        )
    ipv4 = [a for a in addresses if ":" not in a]
    return ipv4[0] if ipv4 else addresses[0]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


class TutorialStack(Stack):
    """The seeds' tutorial setup behind Switchboard's nginx: one daphne process."""

    def app_program(self, index: int, port: int, *, foreground: bool) -> str:
        return self._program(
            f"app{index}",
            f"{BIN / 'daphne'} -b 127.0.0.1 -p {port} tutorial.asgi:application",
            foreground=foreground,
            priority="20",
            directory=str(BASELINES),
            environment='DJANGO_SETTINGS_MODULE="tutorial.settings"',
            stopsignal="TERM",
            stopwaitsecs="10",
            startsecs="2",
        )

    def prepare_app(self) -> None:
        """Nothing to migrate or collect: the tutorial keeps no data."""


class NoDjangoStack(Stack):
    """The no-Django upper bound behind Switchboard's nginx: one server process per 'replica'."""

    def app_program(self, index: int, port: int, *, foreground: bool) -> str:
        return self._program(
            f"app{index}",
            f"{BIN / 'python'} -m loadtests.baselines.nodjango --port {port} "
            f"--name {self.replica_name(index).replace('-app', '-nodjango')}",
            foreground=foreground,
            priority="20",
            directory=str(ROOT),
            stopsignal="TERM",
            stopwaitsecs="10",
            startsecs="2",
        )

    def prepare_app(self) -> None:
        """Nothing to migrate or collect."""


class CheckoutStack(Stack):
    """Switchboard's app from another checkout of this repository (``checkout=<dir>``, e.g.
    ``git archive <commit> | tar -x -C <dir>``), run with this virtualenv, nginx and Redis: a
    change and the code before it measured in one run."""

    checkout: Path = ROOT

    def app_program(self, index: int, port: int, *, foreground: bool) -> str:
        section = super().app_program(index, port, foreground=foreground)
        return section.replace(str(ROOT / "infra"), str(self.checkout / "infra")).replace(
            f"directory={ROOT / 'app'}", f"directory={self.checkout / 'app'}"
        )


#: name -> (Stack class, app processes by default, what it is)
MANAGED = {
    "switchboard": (Stack, 3, "this stack: gunicorn/uvicorn replicas, Channels, Redis layer"),
    "tutorial": (TutorialStack, 1, "seeds' tutorial: 1 daphne process, stock RedisChannelLayer"),
    "nodjango": (NoDjangoStack, 2, "upper bound: plain websockets, 2 processes, Redis pub/sub"),
}


@dataclass
class Target:
    """One thing under test, with what the report needs to know about it."""

    label: str
    endpoint: Endpoint
    description: str = ""
    stack: Stack | None = None
    managed: bool = False
    workers_per_replica: int = 1
    settings: dict[str, str] = field(default_factory=dict)
    #: A Redis Cluster or Sentinel set started for this target (REDIS_TOPOLOGY=...).
    redis_topology: LocalCluster | LocalSentinelSet | None = None

    @property
    def expected_processes(self) -> int | None:
        """Server processes that take websockets, when known."""
        if self.stack is None:
            return None
        return self.stack.replicas * self.workers_per_replica

    # -- processes, for memory and CPU ---------------------------------------------------------
    def _program_pid(self, program: str) -> int | None:
        if self.stack is None or not self.stack.is_running():
            return None
        out = self.stack.supervisorctl("pid", program).stdout.strip()
        return int(out) if out.isdigit() and out != "0" else None

    def pids(self) -> dict[str, list[int]]:
        """``{"app": [...], "nginx": [...], "redis": [...]}``: the processes serving this target
        (app: the worker processes that hold websockets). Empty when unknown."""
        found: dict[str, list[int]] = {"app": [], "nginx": [], "redis": []}
        if self.stack is None:
            return found
        for index in range(1, self.stack.replicas + 1):
            pid = self._program_pid(f"app{index}")
            if pid is not None:
                found["app"].extend(_children(pid) or [pid])
        nginx = self._program_pid("nginx")
        if nginx is not None:
            found["nginx"] = [nginx, *_children(nginx)]
        redis = self._program_pid("redis")
        if redis is not None:
            found["redis"] = [redis]
        if self.redis_topology is not None:
            found["redis"] = [
                server.process.pid
                for server in self.redis_topology.servers.values()
                if server.alive and server.process is not None
            ]
        return found

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.managed and self.stack is not None:
            if self.redis_topology is not None:
                self.redis_topology.start()
                self.stack.environ["REDIS_URL"] = self.redis_topology.url
                if isinstance(self.redis_topology, LocalSentinelSet):
                    self.stack.environ.update(self.redis_topology.settings)
            try:
                self.stack.start(timeout=120)
            except BaseException:
                if self.redis_topology is not None:
                    self.redis_topology.stop()
                raise

    def stop(self, keep: bool = False) -> None:
        if self.managed and self.stack is not None:
            self.stack.stop()
            if self.redis_topology is not None:
                self.redis_topology.stop()
            if not keep:
                shutil.rmtree(self.stack.run_dir, ignore_errors=True)


def _parse_settings(text: str) -> dict[str, str]:
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TargetError(f"setting {item!r} is not KEY=VALUE")
        settings[key.strip()] = value.strip()
    return settings


def _managed(name: str, settings: dict[str, str], run_root: Path | None) -> Target:
    cls, default_processes, description = MANAGED[name]
    label = settings.pop("label", name if not settings else f"{name}:{_describe(settings)}")
    replicas = int(settings.pop("replicas", default_processes))
    nginx_dir = settings.pop("nginx", None)
    if nginx_dir is not None and not (Path(nginx_dir) / "nginx.conf").exists():
        raise TargetError(f"nginx={nginx_dir}: no nginx.conf there (give the nginx/ folder)")
    workers = int(settings.get("WEB_CONCURRENCY", "2")) if cls is Stack else 1
    run_dir = Path(tempfile.mkdtemp(prefix=f"loadtest-{name}-", dir=run_root))
    environ = isolated_environ(run_dir, replicas=replicas, workers=workers)
    if name == "switchboard":
        environ.update(SWITCHBOARD_BENCH_ENV)
    environ.update(settings)
    topology = settings.get("REDIS_TOPOLOGY", "single")
    redis_topology: LocalCluster | LocalSentinelSet | None = None
    if topology == "cluster":
        redis_topology = LocalCluster(run_dir / "redis-cluster")
    elif topology == "sentinel":
        redis_topology = LocalSentinelSet(run_dir / "redis-sentinel")
    elif topology != "single":
        raise TargetError(f"REDIS_TOPOLOGY={topology!r}: single, sentinel or cluster")
    if redis_topology is not None:
        environ["REDIS_URL"] = "redis://placeholder/0"  # the real one once it has started
    checkout = settings.pop("checkout", None)
    if checkout is not None and isinstance(redis_topology, LocalSentinelSet):
        # Code from before REDIS_SENTINEL_PASSWORD asks the Sentinels with the master's.
        redis_topology.sentinel_password = redis_topology.password
    if checkout is not None:
        if name != "switchboard" or not (Path(checkout) / "app" / "manage.py").exists():
            raise TargetError(f"checkout={checkout}: not a checkout of Switchboard")
        cls = CheckoutStack
        environ.pop("checkout", None)
    stack = cls.from_env(environ)
    if isinstance(stack, CheckoutStack):
        stack.checkout = Path(checkout).resolve()
    if nginx_dir is not None:
        stack.nginx_dir = Path(nginx_dir).resolve()
    endpoint = Endpoint(
        server_name="localhost",
        address="127.0.0.1",
        port=stack.https_port,
        ca_file=str(stack.ca_file),
        origin=stack.base_url,
    )
    return Target(
        label=label,
        endpoint=endpoint,
        description=description,
        stack=stack,
        managed=True,
        workers_per_replica=workers,
        settings=settings,
        redis_topology=redis_topology,
    )


def _describe(settings: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items())


def _from_url(url: str, ca_file: str | None, origin: str | None, run_dir: str | None) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in {"https", "wss"} or not parts.hostname:
        raise TargetError(f"{url!r}: give https://host:port (TLS is verified against --ca)")
    port = parts.port or 443
    address = require_loopback(parts.hostname, port)
    stack = None
    candidate = Path(run_dir) if run_dir else ROOT / ".run"
    conf = candidate / "supervisord.conf"
    nginx_site = candidate / "nginx" / "conf.d" / "switchboard.conf"
    # Only a run directory whose nginx listens on this URL's port describes this stack.
    if conf.exists() and nginx_site.exists() and f"listen {port} ssl" in nginx_site.read_text():
        replicas = len(re.findall(r"^\[program:app\d+\]", conf.read_text(), re.MULTILINE))
        environ = dict(
            os.environ,
            SWITCHBOARD_RUN_DIR=str(candidate.resolve()),
            SWITCHBOARD_REPLICAS=str(max(1, replicas)),
            SWITCHBOARD_HTTPS_PORT=str(port),
        )
        stack = Stack.from_env(environ)
    ca = ca_file or (str(stack.ca_file) if stack is not None else None)
    if ca is None:
        raise TargetError(f"{url}: give --ca (the CA certificate that signed the server's)")
    base = f"https://{parts.netloc}"
    endpoint = Endpoint(
        server_name=parts.hostname,
        address=address,
        port=port,
        ca_file=ca,
        origin=origin or base,
    )
    workers = 2
    if stack is not None:
        workers = int(stack.environ.get("WEB_CONCURRENCY", "2"))
    return Target(
        label=base,
        endpoint=endpoint,
        description="running stack",
        stack=stack,
        workers_per_replica=workers,
    )


def parse_target(
    spec: str,
    *,
    ca_file: str | None = None,
    origin: str | None = None,
    run_dir: str | None = None,
    run_root: Path | None = None,
) -> Target:
    """A :class:`Target` from a ``--target`` value (see the module docstring)."""
    if "://" in spec:
        return _from_url(spec, ca_file, origin, run_dir)
    name, _, settings = spec.partition(":")
    if name not in MANAGED:
        known = ", ".join(MANAGED)
        raise TargetError(f"unknown target {name!r}: give https://host:port or one of {known}")
    if name == "tutorial" and shutil.which("daphne", path=str(BIN)) is None:
        raise TargetError("the tutorial baseline needs daphne: pip install -e '.[loadtest]'")
    return _managed(name, _parse_settings(settings), run_root)


def python_version() -> str:
    return sys.version.split()[0]
