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
    COMPOSE_TOPOLOGIES,
    DOCKERFILE,
    OVERLAYS,
    app_container_env,
    load_compose,
    one,
    redis_kind,
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
    "REDIS_TOPOLOGY": "the cluster and Sentinel variants say which they are",
    "REDIS_SENTINELS": "the Sentinel variants' own Sentinels",
    "REDIS_SENTINEL_PASSWORD": "the Sentinel variants' Sentinels require their own password",
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
    "CHANNEL_PREFIX",
    "WS_TOKEN_TTL",
    "WS_MAX_CONNECTIONS_PER_USER",
)
#: Stated explicitly by every deployment, whatever their value: which Redis the layer expects.
STATED = ("REDIS_TOPOLOGY",)


def _compose_app_env(topology: str = "single") -> dict[str, str]:
    services = load_compose(topology=topology)["services"]
    return {k: str(v) for k, v in services["app"]["environment"].items()}


def _k8s_app_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return app_container_env(docs)


def _check_names_and_values(environ: dict[str, Any], where: str) -> None:
    unknown = set(environ) - set(DEFAULTS) - set(EXTRA_NAMES)
    assert not unknown, f"{where}: not declared in app/config/env.py: {sorted(unknown)}"
    for name in (*PINNED, *STATED):
        assert name in environ, f"{where} must set {name}"
    for name, value in environ.items():
        if name in OVERRIDES or name in EXTRA_NAMES or isinstance(value, tuple):
            continue
        assert str(value) == DEFAULTS[name], (
            f"{where}: {name}={value!r} drifted from env.py's {DEFAULTS[name]!r}"
        )


@pytest.mark.parametrize("topology", COMPOSE_TOPOLOGIES)
def test_compose_uses_env_py_names_and_defaults(topology: str) -> None:
    _check_names_and_values(_compose_app_env(topology), f"docker-compose.yml ({topology})")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_uses_env_py_names_and_defaults(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    environ = _k8s_app_env(manifests[overlay])
    _check_names_and_values(environ, f"k8s/overlays/{overlay}")
    assert environ["DJANGO_SECRET_KEY"] == ("secret", "DJANGO_SECRET_KEY")
    assert environ["DATABASE_URL"] == ("secret", "DATABASE_URL")
    assert environ["WS_TOKEN_KEYS"] == ("secret", "WS_TOKEN_KEYS")


#: k8s render target's Redis (support.redis_kind) -> the REDIS_TOPOLOGY it must state.
K8S_TOPOLOGY = {"single": "single", "sentinel": "sentinel", "managed-cluster": "cluster"}


def _check_redis_settings(environ: dict[str, Any], topology: str, where: str) -> None:
    """What REDIS_TOPOLOGY says agrees with the rest of the Redis settings."""
    assert environ["REDIS_TOPOLOGY"] == topology, where
    sentinel_names = {"REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD"}
    if topology == "sentinel":
        assert environ["REDIS_SENTINELS"] and sentinel_names <= set(environ), where
        for entry in environ["REDIS_SENTINELS"].split(","):
            host, port = entry.rsplit(":", 1)
            assert host and port == "26379", f"{where}: {entry}"
    else:
        assert not sentinel_names & set(environ), f"{where}: Sentinel settings without Sentinel"
    if isinstance(environ["REDIS_URL"], tuple):
        return  # the whole URL is a Secret (managed Redis): test_kubernetes checks its example
    default = redis_url_parts(DEFAULTS["REDIS_URL"])
    parts = redis_url_parts(environ["REDIS_URL"].replace("$(REDIS_PASSWORD)", "pw"))
    assert parts["scheme"] == default["scheme"], where
    assert parts["port"] == default["port"], where
    assert parts["db"] == default["db"] == "0", f"{where}: cluster mode has database 0 only"
    assert parts["password"], f"{where}: Redis requires a password"


@pytest.mark.parametrize("topology", COMPOSE_TOPOLOGIES)
def test_compose_redis_settings_match_its_topology(topology: str) -> None:
    environ = _compose_app_env(topology)
    _check_redis_settings(environ, topology, f"compose ({topology})")
    services = load_compose(topology=topology)["services"]
    host = redis_url_parts(environ["REDIS_URL"])["host"]
    assert host == "redis" and host in services, "the seed node / first master"
    if topology == "sentinel":
        for entry in environ["REDIS_SENTINELS"].split(","):
            assert entry.rsplit(":", 1)[0] in services, entry


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_redis_settings_match_its_topology(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    docs = manifests[overlay]
    environ = _k8s_app_env(docs)
    _check_redis_settings(environ, K8S_TOPOLOGY[redis_kind(overlay)], f"k8s {overlay}")
    if redis_kind(overlay) == "single":
        assert redis_url_parts(environ["REDIS_URL"])["host"] == "redis"
        (service_port,) = one(docs, "Service", "redis")["spec"]["ports"]
        assert service_port["port"] == redis_url_parts(DEFAULTS["REDIS_URL"])["port"]


def test_sentinel_variants_agree_with_each_other(manifests: dict[str, list[dict]]) -> None:
    """Compose's and Kubernetes' Sentinel sets watch the same master name, env.py's default."""
    compose = _compose_app_env("sentinel")
    names = {"compose": compose["REDIS_SENTINEL_MASTER"]}
    for overlay, docs in manifests.items():
        if redis_kind(overlay) == "sentinel":
            names[overlay] = _k8s_app_env(docs)["REDIS_SENTINEL_MASTER"]
    assert len(names) >= 3, "compose and both overlays have a Sentinel variant"
    assert set(names.values()) == {DEFAULTS["REDIS_SENTINEL_MASTER"]}, names


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
