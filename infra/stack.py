"""The native stack: redis-server, N gunicorn replicas and nginx, under supervisord.

With REDIS_TOPOLOGY=cluster or sentinel the stack starts no redis-server of its own: REDIS_URL
(and REDIS_SENTINELS) point at the cluster or Sentinel set, e.g. one started by
``python -m infra.redis_topologies cluster`` (the tests use the same module).

    python -m infra.stack run      # foreground; Ctrl-C stops everything      (make run)
    python -m infra.stack start    # background; returns once every replica is ready (make start)
    python -m infra.stack stop     # stops a background stack                  (make stop)
    python -m infra.stack status

Everything generated lives in SWITCHBOARD_RUN_DIR (default ``.run/``): certificates, the Redis
password and config, the rendered nginx site, supervisord's config, pid files and logs. Settings
come from the environment (app/config/env.py); nothing here is a second copy of a default.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "app"))

from config import env  # noqa: E402
from infra.certs import ensure_certificates  # noqa: E402

NGINX_DIR = ROOT / "nginx"
SITE_TEMPLATE = NGINX_DIR / "templates" / "switchboard.conf.template"
BIN = Path(sys.executable).parent
#: The site's ``listen <port>`` and ``listen [::]:<port>``: every interface. Only probed here.
NGINX_ADDRESSES = ("0.0.0.0", "::")  # noqa: S104


def _system_binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if not found:
        raise SystemExit(f"{name} is not installed (Debian/Ubuntu: apt-get install {name})")
    return found


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``${NAME}`` like envsubst does for the nginx image; other ``$`` are left alone."""
    for name, value in values.items():
        template = template.replace("${" + name + "}", value)
    if "${NGINX_" in template:
        missing = template[template.index("${NGINX_") :].split("}", 1)[0] + "}"
        raise ValueError(f"template variable {missing} has no value")
    return template


def _port_free_on(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (SO_REUSEADDR, as servers bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return True  # no IPv6 here: nothing can hold the port on it
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            # No IPv6 address here (EADDRNOTAVAIL): nothing can hold the port on it either.
            return exc.errno == errno.EADDRNOTAVAIL
    return True


def port_holder(port: int) -> str | None:
    """The process holding TCP ``port`` (listening on it, or a connection using it as its local
    port), as ``pid N (command line)``, from /proc (the sockets of /proc/net/tcp{,6} matched
    against every process's file descriptors); ``None`` when no socket holds it, a note when it
    belongs to a process this user cannot inspect."""
    inodes: dict[str, str] = {}  # socket -> what it is, listeners first
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] != "0":
                listening = fields[3] == "0A"
                inodes[f"socket:[{fields[9]}]"] = "" if listening else " (a connection from it)"
    if not inodes:
        return None
    holders = []
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            fds = list((process / "fd").iterdir())
            command = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone, or another user's
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile (the listing's own, too)
                if (link := os.readlink(fd)) in inodes:
                    holders.append((inodes[link], process.name, command))
    if holders:
        what, pid, command = min(holders)  # a listener before a connection
        return f"pid {pid} ({' '.join(command.split())[:100]}){what}"
    return "a process of another user"


#: Where free_port_block looks: below the kernel's ephemeral range, which outgoing connections
#: take ports from at any moment (a test stack once drew a port a client socket held).
FREE_PORTS_FROM = 20000


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return 32768, 60999
    return int(low), int(high)


def free_port_block(count: int, attempts: int = 200) -> int:
    """The first of ``count`` consecutive ports that any of the stack's listeners could bind
    now (on every address, as :meth:`Stack.check_ports` checks them), outside the ephemeral
    range when there is room below it."""
    ephemeral_low, _ = _ephemeral_ports()
    top = ephemeral_low if ephemeral_low - count > FREE_PORTS_FROM + 1000 else 60000
    for _ in range(attempts):
        base = secrets.randbelow(top - count - FREE_PORTS_FROM) + FREE_PORTS_FROM
        ports = range(base, base + count)
        if all(_port_free_on(host, port) for port in ports for host in NGINX_ADDRESSES):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


def isolated_environ(
    run_dir: Path, *, replicas: int, workers: int, environ: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a stack of its own (tests, load tests): free ports, its own run
    directory and SQLite file, production Django settings. The caller's ``DJANGO_*`` variables
    are dropped: a test run's debug mode must not leak into a stack that stands for production.
    """
    base = free_port_block(replicas + 3)
    source = os.environ if environ is None else environ
    isolated = {k: v for k, v in source.items() if not k.startswith("DJANGO_")}
    isolated.update(
        DJANGO_DEBUG="false",
        SWITCHBOARD_RUN_DIR=str(run_dir),
        SWITCHBOARD_REPLICAS=str(replicas),
        SWITCHBOARD_REDIS_PORT=str(base),
        SWITCHBOARD_HTTPS_PORT=str(base + 1),
        SWITCHBOARD_HTTP_PORT=str(base + 2),
        SWITCHBOARD_APP_PORT_BASE=str(base + 3),
        WEB_CONCURRENCY=str(workers),
        DATABASE_URL=f"sqlite:///{run_dir / 'db.sqlite3'}",
    )
    return isolated


@dataclass
class Stack:
    """One native stack, described entirely by its run directory and the environment."""

    run_dir: Path
    replicas: int
    app_port_base: int
    https_port: int
    http_port: int
    redis_port: int
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    #: The nginx configuration folder copied into the run directory (loadtests compare another).
    nginx_dir: Path = NGINX_DIR

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Stack:
        environ = dict(os.environ if environ is None else environ)
        run_dir = Path(env.get("SWITCHBOARD_RUN_DIR", environ))
        return cls(
            run_dir=run_dir if run_dir.is_absolute() else ROOT / run_dir,
            replicas=env.get_int("SWITCHBOARD_REPLICAS", minimum=1, environ=environ),
            app_port_base=env.get_int("SWITCHBOARD_APP_PORT_BASE", minimum=1, environ=environ),
            https_port=env.get_int("SWITCHBOARD_HTTPS_PORT", minimum=1, environ=environ),
            http_port=env.get_int("SWITCHBOARD_HTTP_PORT", minimum=1, environ=environ),
            redis_port=env.get_int("SWITCHBOARD_REDIS_PORT", minimum=1, environ=environ),
            environ=environ,
        )

    @property
    def own_redis(self) -> bool:
        """Whether the stack runs its own redis-server (REDIS_TOPOLOGY=single)."""
        return env.get("REDIS_TOPOLOGY", self.environ) == "single"

    # -- paths ---------------------------------------------------------------------------------
    @property
    def app_ports(self) -> list[int]:
        return [self.app_port_base + i for i in range(self.replicas)]

    @property
    def tls_dir(self) -> Path:
        return self.run_dir / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.crt"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def supervisor_conf(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.https_port}"

    def replica_name(self, index: int) -> str:
        return f"{socket.gethostname()}-app{index}"

    # -- ports ---------------------------------------------------------------------------------
    def listeners(self) -> list[tuple[int, str, str, tuple[str, ...]]]:
        """``(port, the SWITCHBOARD_* variable that sets it, who listens, on which addresses)``
        for every port the stack binds."""
        bind_host = env.get("BIND_HOST", self.environ)
        found = [
            (self.redis_port, "SWITCHBOARD_REDIS_PORT", "Redis", ("127.0.0.1", "::1")),
            (self.https_port, "SWITCHBOARD_HTTPS_PORT", "nginx HTTPS", NGINX_ADDRESSES),
            (self.http_port, "SWITCHBOARD_HTTP_PORT", "nginx HTTP", NGINX_ADDRESSES),
        ]
        found += [
            (port, "SWITCHBOARD_APP_PORT_BASE", f"replica app{index}", (bind_host,))
            for index, port in enumerate(self.app_ports, start=1)
        ]
        return found

    def check_ports(self) -> None:
        """Refuse to start, naming each port that is taken, who holds it and the variable to
        change, before anything is started or written: a stack that starts beside a foreign
        listener serves half-broken (a foreign redis-server on the Redis port: pages answer
        200, every websocket fails, and the app talks to the wrong Redis)."""
        taken = []
        for port, variable, role, hosts in self.listeners():
            if all(_port_free_on(host, port) for host in hosts):
                continue
            holder = port_holder(port) or "an unknown process"
            taken.append(
                f"  port {port} ({role}) is already in use by {holder}: "
                f"set {variable} to another port, or stop that process"
            )
        if taken:
            raise SystemExit("cannot start the stack:\n" + "\n".join(taken))

    # -- preparation ---------------------------------------------------------------------------
    def _secret(self, name: str, nbytes: int = 32) -> str:
        path = self.run_dir / "secrets" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(nbytes))
        return path.read_text().strip()

    def app_environment(self) -> dict[str, str]:
        """What every replica (and manage.py) sees: the caller's environment plus the wiring."""
        wired = dict(self.environ)
        redis_password = self._secret("redis_password")
        wired.setdefault("REDIS_URL", f"redis://:{redis_password}@127.0.0.1:{self.redis_port}/0")
        wired.setdefault("DJANGO_SECRET_KEY", self._secret("django_secret_key", 50))
        # Connection-token signing key (wsauth.tokens); rotate by putting a new `kid:secret` first.
        wired.setdefault("WS_TOKEN_KEYS", f"native-1:{self._secret('ws_token_key', 32)}")
        origins = [f"https://{host}:{self.https_port}" for host in ("localhost", "127.0.0.1")]
        wired.setdefault("DJANGO_CSRF_TRUSTED_ORIGINS", ",".join(origins))
        # Each stack collects its own static files: concurrent stacks never share a manifest.
        wired.setdefault("DJANGO_STATIC_ROOT", str(self.run_dir / "static"))
        wired.setdefault("PYTHONUNBUFFERED", "1")
        return wired

    def _write_redis_conf(self) -> None:
        redis_dir = self.run_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        conf = redis_dir / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(
            "\n".join(
                [
                    "# Generated by infra/stack.py. The channel layer is ephemeral: no persistence",
                    "# and never evict (an evicted group or queue is a silently lost message).",
                    f"port {self.redis_port}",
                    "bind 127.0.0.1 -::1",
                    "protected-mode yes",
                    f"requirepass {self._secret('redis_password')}",
                    f"dir {redis_dir}",
                    'save ""',
                    "appendonly no",
                    "maxmemory-policy noeviction",
                    "maxclients 10000",
                    "tcp-keepalive 60",
                    "daemonize no",
                    'logfile ""',
                    "",
                ]
            )
        )

    def _write_nginx(self) -> None:
        target = self.run_dir / "nginx"
        if target.exists():
            shutil.rmtree(target)
        (target / "conf.d").mkdir(parents=True)
        shutil.copy(self.nginx_dir / "nginx.conf", target / "nginx.conf")
        shutil.copytree(self.nginx_dir / "snippets", target / "snippets")
        shutil.copy("/etc/nginx/mime.types", target / "mime.types")
        # max_fails=0: a replica that refuses a connection (restarting) costs that request one
        # instant retry on the next replica, and nothing more. With max_fails=1, nginx would
        # count the replica as failed until a request to it *ends* -- for a websocket, when the
        # socket closes -- so after its restart it got one new socket per fail_timeout, and when
        # the other replica restarted next, nginx had "no live upstreams" (tests/faults/).
        servers = "\n".join(f"    server 127.0.0.1:{port} max_fails=0;" for port in self.app_ports)
        site = render(
            (self.nginx_dir / SITE_TEMPLATE.relative_to(NGINX_DIR)).read_text(),
            {
                "NGINX_UPSTREAM_SERVERS": servers,
                "NGINX_HTTP_PORT": str(self.http_port),
                "NGINX_HTTPS_PORT": str(self.https_port),
                "NGINX_PUBLIC_HTTPS_PORT": str(self.https_port),
                "NGINX_HTTP2": "http2",  # Debian's nginx 1.22 syntax
                "NGINX_TLS_DIR": str(self.tls_dir),
            },
        )
        (target / "conf.d" / "switchboard.conf").write_text(site)

    def _program(self, name: str, command: str, *, foreground: bool, **options: str) -> str:
        log = "/dev/stdout" if foreground else str(self.logs_dir / f"{name}.log")
        lines = [
            f"[program:{name}]",
            f"command={command}",
            "autostart=true",
            "autorestart=true",
            "startsecs=1",
            "redirect_stderr=true",
            f"stdout_logfile={log}",
            "stdout_logfile_maxbytes=0" if foreground else "stdout_logfile_maxbytes=50MB",
        ]
        lines += [f"{key}={value}" for key, value in options.items()]
        return "\n".join(lines) + "\n"

    def app_program(self, index: int, port: int, *, foreground: bool) -> str:
        """The supervisord section of replica ``index`` (1-based), listening on ``port``.

        A hook: loadtests' baselines serve other apps behind the same nginx and Redis.
        """
        graceful = env.get_int("GRACEFUL_TIMEOUT", environ=self.environ)
        return self._program(
            f"app{index}",
            f"{BIN / 'gunicorn'} -c {ROOT / 'infra' / 'gunicorn.conf.py'}",
            foreground=foreground,
            priority="20",
            directory=str(ROOT / "app"),
            # Each replica's metric files in a folder of its own (gunicorn empties it at start).
            environment=f'PORT="{port}",REPLICA_NAME="{self.replica_name(index)}",'
            f'METRICS_DIR="{self.run_dir / "metrics" / f"app{index}"}"',
            # gunicorn's TERM is graceful: websockets get GRACEFUL_TIMEOUT to close.
            stopsignal="TERM",
            stopwaitsecs=str(graceful + 10),
            stopasgroup="true",
            killasgroup="true",
            startsecs="2",
        )

    def _write_supervisor_conf(self, *, foreground: bool) -> None:
        sections = [
            f"[unix_http_server]\nfile={self.run_dir / 'supervisor.sock'}\nchmod=0700\n",
            "[supervisord]\n"
            f"logfile={self.logs_dir / 'supervisord.log'}\n"
            f"pidfile={self.run_dir / 'supervisord.pid'}\n"
            f"childlogdir={self.logs_dir}\n" + ("user=root\n" if os.geteuid() == 0 else ""),
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
            f"[supervisorctl]\nserverurl=unix://{self.run_dir / 'supervisor.sock'}\n",
        ]
        if self.own_redis:
            sections.append(
                self._program(
                    "redis",
                    f"{_system_binary('redis-server')} {self.run_dir / 'redis' / 'redis.conf'}",
                    foreground=foreground,
                    priority="10",
                )
            )
        for index, port in enumerate(self.app_ports, start=1):
            sections.append(self.app_program(index, port, foreground=foreground))
        sections.append(
            self._program(
                "nginx",
                f"{_system_binary('nginx')} -p {self.run_dir / 'nginx'}/ -c nginx.conf"
                " -g 'daemon off;'",
                foreground=foreground,
                priority="30",
                stopsignal="QUIT",
                stopwaitsecs="10",
            )
        )
        self.supervisor_conf.write_text("\n".join(sections))

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``manage.py`` with the stack's environment."""
        return subprocess.run(
            [str(BIN / "python"), str(ROOT / "app" / "manage.py"), *args],
            env=self.app_environment(),
            cwd=ROOT / "app",
            check=check,
            capture_output=True,
            text=True,
        )

    def prepare_app(self) -> None:
        """Migrate the database and collect static files (a hook, like :meth:`app_program`)."""
        for step in (("migrate", "--noinput"), ("collectstatic", "--noinput")):
            result = self.manage(*step, check=False)
            if result.returncode != 0:
                raise SystemExit(f"manage.py {' '.join(step)} failed:\n{result.stderr}")

    def prepare(self, *, foreground: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        ensure_certificates(self.tls_dir)
        if self.own_redis:
            self._write_redis_conf()
        elif "REDIS_URL" not in self.environ:
            raise SystemExit("REDIS_TOPOLOGY is not `single`: set REDIS_URL (and REDIS_SENTINELS)")
        self._write_nginx()
        self._write_supervisor_conf(foreground=foreground)
        self.prepare_app()
        result = subprocess.run(
            [
                _system_binary("nginx"),
                "-t",
                "-q",
                "-p",
                f"{self.run_dir / 'nginx'}/",
                "-c",
                "nginx.conf",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(f"nginx -t failed:\n{result.stderr}")

    # -- lifecycle -----------------------------------------------------------------------------
    def _supervisor_env(self) -> dict[str, str]:
        return self.app_environment()

    def run_foreground(self) -> None:
        self.check_ports()
        self.prepare(foreground=True)
        self._banner()
        os.execve(  # noqa: S606 (the launcher becomes supervisord / manage.py)
            str(BIN / "supervisord"),
            [str(BIN / "supervisord"), "-n", "-c", str(self.supervisor_conf)],
            self._supervisor_env(),
        )

    def start(self, timeout: float = 60) -> None:
        if self.is_running():
            raise SystemExit(f"a stack is already running from {self.run_dir} (make stop)")
        self.check_ports()
        self.prepare(foreground=False)
        subprocess.run(
            [str(BIN / "supervisord"), "-c", str(self.supervisor_conf)],
            env=self._supervisor_env(),
            check=True,
        )
        try:
            # supervisord's launcher exits as it daemonizes, a moment before the daemon writes
            # its pid file; wait_ready() would otherwise take "no pid file" for "it died".
            deadline = time.monotonic() + 10
            while not self.is_running() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.wait_ready(timeout)
        except BaseException:
            # A stack that did not get ready must not stay half up (make start failed).
            if self.is_running():
                self.stop()
            raise
        self._banner()

    def supervisorctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.supervisor_conf), *args],
            capture_output=True,
            text=True,
            check=check,
        )

    def supervisord_pid(self) -> int | None:
        try:
            pid = int((self.run_dir / "supervisord.pid").read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    def is_running(self) -> bool:
        return self.supervisord_pid() is not None

    def stop(self, timeout: float = 60) -> None:
        pid = self.supervisord_pid()
        if pid is None:
            print(f"no stack is running from {self.run_dir}")
            return
        os.kill(pid, 15)  # supervisord stops every program (in reverse priority), then exits
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print("stack stopped")
                return
            time.sleep(0.1)
        raise SystemExit(f"supervisord (pid {pid}) did not stop within {timeout} s")

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _ready(self, url: str, context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:  # noqa: S310
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every replica's /readyz and nginx's TLS port answer 200."""
        urls = [f"http://127.0.0.1:{port}/readyz" for port in self.app_ports]
        deadline = time.monotonic() + timeout
        seen_running = False
        while time.monotonic() < deadline:
            running = self.is_running()
            if seen_running and not running:
                break  # supervisord gave up: no point waiting
            seen_running |= running
            urls = [url for url in urls if not self._ready(url)]
            if not urls and self._ready(f"{self.base_url}/healthz", self.ssl_context()):
                return
            time.sleep(0.25)
        logs = "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            for log in sorted(self.logs_dir.glob("*.log"))
        )
        raise SystemExit(f"stack not ready within {timeout} s (waiting for {urls}).\n{logs}")

    def _banner(self) -> None:
        topology = env.get("REDIS_TOPOLOGY", self.environ)
        redis = f"redis on {self.redis_port}" if self.own_redis else f"Redis {topology}"
        print(
            f"\nSwitchboard: {self.base_url}/chat/lobby/   "
            f"({self.replicas} replicas on ports {self.app_ports[0]}-{self.app_ports[-1]}, "
            f"{redis}, http://localhost:{self.http_port} redirects)\n"
            f"Trust the local CA to verify TLS: {self.ca_file}\n"
            f"Add a user: make createsuperuser\n",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__)
    parser.add_argument("command", choices=["run", "start", "stop", "status", "manage"])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    stack = Stack.from_env()
    if options.command == "run":
        stack.run_foreground()
    elif options.command == "start":
        stack.start()
    elif options.command == "stop":
        stack.stop()
    elif options.command == "status":
        if not stack.is_running():
            raise SystemExit(f"no stack is running from {stack.run_dir}")
        print(stack.supervisorctl("status").stdout, end="")
    elif options.command == "manage":
        os.execve(  # noqa: S606 (the launcher becomes supervisord / manage.py)
            str(BIN / "python"),
            [str(BIN / "python"), str(ROOT / "app" / "manage.py"), *options.args],
            stack.app_environment(),
        )


if __name__ == "__main__":
    main()
