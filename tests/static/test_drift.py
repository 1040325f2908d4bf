"""Compose and Kubernetes use app/config/env.py's names, ports and limits: nothing drifts.

env.py is the one table of settings. A value may differ from its default only where the
deployment needs it to (OVERRIDES, each with its reason); everything else must be the default.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from config import env
from tests.static.support import (
    DOCKERFILE,
    OVERLAYS,
    app_container_env,
    load_compose,
    one,
    redis_url_parts,
    seconds,
)

DEFAULTS = {setting.name: setting.default for setting in env.SETTINGS}

#: Settings a container deployment sets away from its env.py default, and why.
OVERRIDES = {
    "BIND_HOST": "containers listen on every interface, not loopback",
    "FORWARDED_ALLOW_IPS": "the proxy's address varies; only the proxy can reach the app port",
    "DATABASE_URL": "PostgreSQL shared by every replica, not a SQLite file",
    "REDIS_URL": "the redis service, with its password",
    "DJANGO_SECRET_KEY": "a real secret (dev-only default in compose)",
    "WS_TOKEN_KEYS": "a real secret (dev-only default in compose)",
    "DJANGO_ALLOWED_HOSTS": "production serves its own host name",
    "DJANGO_CSRF_TRUSTED_ORIGINS": "production serves its own origin",
}
#: Names in a container's environment that are not app settings, and why they are there.
EXTRA_NAMES = {
    "POD_IP": "infra/probe.py targets the pod IP, as a kubelet would",
    "REDIS_PASSWORD": "REDIS_URL is assembled from it by $(REDIS_PASSWORD) expansion",
}
#: The limits every deployment must state explicitly (and equal to the defaults).
PINNED = (
    "PORT",
    "WEB_CONCURRENCY",
    "GRACEFUL_TIMEOUT",
    "WS_MAX_MESSAGE_BYTES",
    "WS_PING_INTERVAL",
    "WS_PING_TIMEOUT",
    "CHANNEL_CAPACITY",
    "CHANNEL_EXPIRY",
    "CHANNEL_GROUP_EXPIRY",
    "CHAT_MAX_MESSAGE_CHARS",
    "CHAT_RATE_PER_SECOND",
    "CHAT_RATE_BURST",
    "CHAT_FLOOD_CLOSE_AFTER",
    "WS_TOKEN_TTL",
    "WS_MAX_CONNECTIONS_PER_USER",
)


def _compose_app_env() -> dict[str, str]:
    return {k: str(v) for k, v in load_compose()["services"]["app"]["environment"].items()}


def _k8s_app_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return app_container_env(docs)


def _check_names_and_values(environ: dict[str, Any], where: str) -> None:
    unknown = set(environ) - set(DEFAULTS) - set(EXTRA_NAMES)
    assert not unknown, f"{where}: not declared in app/config/env.py: {sorted(unknown)}"
    for name in PINNED:
        assert name in environ, f"{where} must set {name}"
    for name, value in environ.items():
        if name in OVERRIDES or name in EXTRA_NAMES or isinstance(value, tuple):
            continue
        assert str(value) == DEFAULTS[name], (
            f"{where}: {name}={value!r} drifted from env.py's {DEFAULTS[name]!r}"
        )


def test_compose_uses_env_py_names_and_defaults() -> None:
    _check_names_and_values(_compose_app_env(), "docker-compose.yml")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_uses_env_py_names_and_defaults(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    environ = _k8s_app_env(manifests[overlay])
    _check_names_and_values(environ, f"k8s/overlays/{overlay}")
    assert environ["DJANGO_SECRET_KEY"] == ("secret", "DJANGO_SECRET_KEY")
    assert environ["DATABASE_URL"] == ("secret", "DATABASE_URL")
    assert environ["WS_TOKEN_KEYS"] == ("secret", "WS_TOKEN_KEYS")


def test_redis_url_has_the_same_shape_everywhere(manifests: dict[str, list[dict]]) -> None:
    default = redis_url_parts(DEFAULTS["REDIS_URL"])
    urls = {"compose": _compose_app_env()["REDIS_URL"]}
    for overlay, docs in manifests.items():
        urls[overlay] = _k8s_app_env(docs)["REDIS_URL"].replace("$(REDIS_PASSWORD)", "pw")
    for where, url in urls.items():
        parts = redis_url_parts(url)
        assert parts["scheme"] == default["scheme"], where
        assert parts["port"] == default["port"], where
        assert parts["db"] == default["db"], where
        assert parts["host"] == "redis", f"{where}: the redis service"
        assert parts["password"], f"{where}: Redis requires a password"
    for overlay, docs in manifests.items():
        (service_port,) = one(docs, "Service", "redis")["spec"]["ports"]
        assert service_port["port"] == default["port"], overlay


def test_ports_are_env_py_ports(manifests: dict[str, list[dict]]) -> None:
    port = int(DEFAULTS["PORT"])
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^EXPOSE {port}$", dockerfile, re.M)
    assert re.search(rf"^\s*PORT={port}$", dockerfile, re.M)
    services = load_compose()["services"]
    assert f"server app:{port} " in services["nginx"]["environment"]["NGINX_UPSTREAM_SERVERS"]
    published = {p.rsplit(":", 1)[1]: p.rsplit(":", 1)[0] for p in services["nginx"]["ports"]}
    assert published["443"] == DEFAULTS["SWITCHBOARD_HTTPS_PORT"]
    assert published["80"] == DEFAULTS["SWITCHBOARD_HTTP_PORT"]
    # The default CSRF origins name the public HTTPS port: compose's must be the same.
    assert (
        _compose_app_env()["DJANGO_CSRF_TRUSTED_ORIGINS"] == DEFAULTS["DJANGO_CSRF_TRUSTED_ORIGINS"]
    )
    for overlay, docs in manifests.items():
        deployment = one(docs, "Deployment", "switchboard")
        app = deployment["spec"]["template"]["spec"]["containers"][0]
        assert [p["containerPort"] for p in app["ports"]] == [port], overlay
        (service_port,) = one(docs, "Service", "switchboard")["spec"]["ports"]
        assert service_port["port"] == port, overlay


def test_replica_counts_and_shutdown_budget_agree(manifests: dict[str, list[dict]]) -> None:
    replicas = int(DEFAULTS["SWITCHBOARD_REPLICAS"])
    graceful = int(DEFAULTS["GRACEFUL_TIMEOUT"])
    app = load_compose()["services"]["app"]
    assert int(app["deploy"]["replicas"]) == replicas
    assert seconds(app["stop_grace_period"]) > graceful
    for overlay, docs in manifests.items():
        deployment = one(docs, "Deployment", "switchboard")
        assert deployment["spec"]["replicas"] == replicas, overlay
        assert one(docs, "HorizontalPodAutoscaler", "switchboard")["spec"]["minReplicas"] == (
            replicas
        ), overlay
        pod = deployment["spec"]["template"]["spec"]
        pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > pre_stop + graceful, overlay


def test_compose_and_kubernetes_agree_with_each_other(manifests: dict[str, list[dict]]) -> None:
    """Beyond env.py: the settings both deployments override are overridden alike."""
    compose = _compose_app_env()
    for overlay, docs in manifests.items():
        k8s = _k8s_app_env(docs)
        for name in ("BIND_HOST", "FORWARDED_ALLOW_IPS", *PINNED):
            assert str(k8s[name]) == compose[name], f"{overlay}: {name}"
