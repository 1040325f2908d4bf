"""k8s/: every overlay renders, passes kubernetes-validate --strict, and keeps its invariants."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from config import env
from tests.static.support import (
    OVERLAYS,
    ROOT,
    app_container_env,
    find,
    generated_name,
    load_manifests,
    one,
    overlay_of,
    pod_specs,
    redis_kind,
    redis_url_parts,
)
from tests.validators import run

#: API groups whose kinds kubernetes-validate has no schema for; they may only warn.
CRD_GROUPS = ("cert-manager.io", "gateway.networking.k8s.io", "monitoring.coreos.com")
_CRD_WARNING = re.compile(
    r"^WARN .* Couldn't find schema for kind \w+ with api version "
    r"(" + "|".join(re.escape(group) for group in CRD_GROUPS) + r")/"
)


#: The oldest Kubernetes the manifests support (the preStop `sleep` action is 1.30) and the
#: newest the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def _kubernetes_validate(
    vbin: Path, path: Path, version: str = KUBERNETES_VERSIONS[-1]
) -> tuple[set[str], list[str]]:
    """``(resources that passed, findings)`` of kubernetes-validate --strict on one file."""
    result = run([str(vbin / "kubernetes-validate"), "--strict", "-k", version, str(path)])
    passed, findings = set(), []
    for line in (result.stdout + result.stderr).splitlines():
        if " passed for resource " in line and line.startswith("INFO "):
            passed.add(line.split(" passed for resource ", 1)[1].split(" against ", 1)[0])
        elif _CRD_WARNING.match(line):
            continue  # a CRD: allowed to warn
        elif line.strip():
            findings.append(line)
    if result.returncode != 0 and not findings:
        findings.append(f"exit status {result.returncode}")
    return passed, findings


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_kubernetes_validate_strict(
    overlay: str,
    version: str,
    vbin: Path,
    rendered: dict[str, Path],
    manifests: dict[str, list[dict]],
) -> None:
    passed, findings = _kubernetes_validate(vbin, rendered[overlay], version)
    assert not findings, "\n".join(findings)
    builtin = {
        f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        for doc in manifests[overlay]
        if doc["apiVersion"].split("/")[0] not in CRD_GROUPS
    }
    assert builtin, "nothing but CRDs rendered?"
    assert builtin <= passed, f"not validated: {sorted(builtin - passed)}"


SECRET_EXAMPLE = ROOT / "k8s" / "overlays" / "production" / "secret.example.yaml"
MANAGED_REDIS = ROOT / "k8s" / "components" / "managed-redis-cluster"


@pytest.mark.parametrize(
    ("example", "resource"),
    [
        (SECRET_EXAMPLE, "secret/switchboard-secrets"),
        (MANAGED_REDIS / "redis-ca.example.yaml", "configmap/switchboard-redis-ca"),
    ],
    ids=["secret", "redis-ca"],
)
def test_production_examples_are_valid_objects(vbin: Path, example: Path, resource: str) -> None:
    passed, findings = _kubernetes_validate(vbin, example)
    assert not findings, "\n".join(findings)
    assert passed == {resource}


def _container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def _secret_keys(target: str, docs: list[dict[str, Any]]) -> set[str]:
    """Keys of "switchboard-secrets": generated (local) or documented (production; with the
    Sentinel component, its commented-out key counts as documented too)."""
    if overlay_of(target) == "production":
        text = SECRET_EXAMPLE.read_text()
        keys = set(load_manifests(text)[0]["stringData"])
        if redis_kind(target) == "sentinel":
            keys |= set(re.findall(r"^  # ([A-Z][A-Z0-9_]*): ", text, re.M))
        return keys
    name = generated_name(docs, "Secret", "switchboard-secrets")
    assert name, "the local overlay generates switchboard-secrets"
    return set(one(docs, "Secret", name)["data"])


def _secret_keys_read(docs: list[dict[str, Any]]) -> set[str]:
    """Every key of "switchboard-secrets" a workload reads, by env or as a mounted file."""
    wanted = set()
    for _, pod_spec in pod_specs(docs):
        for container in pod_spec["containers"] + pod_spec.get("initContainers", []):
            for item in container.get("env", []):
                if "secretKeyRef" in item.get("valueFrom", {}):
                    wanted.add(item["valueFrom"]["secretKeyRef"]["key"])
        for volume in pod_spec.get("volumes", []):
            if volume.get("secret", {}).get("secretName", "").startswith("switchboard-secrets"):
                wanted |= {item["key"] for item in volume["secret"]["items"]}
    return wanted


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_app_deployment_is_production_shaped(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    docs = manifests[overlay]
    namespace = one(docs, "Namespace", "switchboard")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(
        doc["metadata"].get("namespace") == "switchboard"
        for doc in docs
        if doc["kind"] not in {"Namespace", "GatewayClass", "ClusterIssuer"}
    ), "every namespaced object lives in the switchboard namespace"

    deployment = one(docs, "Deployment", "switchboard")
    spec = deployment["spec"]
    assert spec["replicas"] >= 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    app = _container(pod, "app")
    environ = app_container_env(docs)

    # Probes: exec infra/probe.py (200 only) against the pod IP, /healthz and /readyz.
    probes = {
        kind: app[kind]["exec"]["command"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    for command in probes.values():
        assert command[:3] == ["python", "-m", "infra.probe"]
    assert probes["readinessProbe"][3] == "/readyz"
    assert probes["livenessProbe"][3] == "/healthz"
    assert probes["startupProbe"][3] in {"/healthz", "/readyz"}
    assert environ["POD_IP"] == ("field", "status.podIP")

    # Shutdown: readiness drops during preStop, then gunicorn's graceful timeout runs.
    pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    graceful = int(environ["GRACEFUL_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + graceful
    assert pre_stop >= 5

    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    for container in pod["containers"] + pod.get("initContainers", []):
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    tmp = next(m for m in app["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])

    # Every Secret key the workloads read exists.
    wanted = _secret_keys_read(docs)
    assert wanted <= _secret_keys(overlay, docs), sorted(wanted - _secret_keys(overlay, docs))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    workloads = list(pod_specs(manifests[overlay]))
    assert len(workloads) >= 2
    for name, pod in workloads:
        pod_context = pod.get("securityContext", {})
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, where
            user = context.get("runAsUser", pod_context.get("runAsUser"))
            assert isinstance(user, int) and user >= 10000, where
            assert "privileged" not in context or context["privileged"] is False, where
        assert pod.get("automountServiceAccountToken") is False, name
        assert pod.get("enableServiceLinks") is False, name
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= {
                "emptyDir",
                "persistentVolumeClaim",
                "secret",
                "configMap",
                "projected",
                "downwardAPI",
                "ephemeral",
            }, f"{name}: volume {volume}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_traffic_and_operations_objects_fit_together(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    docs = manifests[overlay]
    deployment = one(docs, "Deployment", "switchboard")
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    app = _container(deployment["spec"]["template"]["spec"], "app")
    container_ports = {p["name"]: p["containerPort"] for p in app["ports"]}

    service = one(docs, "Service", "switchboard")
    assert service["spec"]["selector"].items() <= template_labels.items()
    (service_port,) = service["spec"]["ports"]
    assert container_ports[service_port["targetPort"]] == int(app_container_env(docs)["PORT"])

    # Gateway: HTTPS with the cert-manager secret; HTTPRoute to the Service; HTTP redirects.
    gateway = one(docs, "Gateway", "switchboard")
    listeners = {listener["name"]: listener for listener in gateway["spec"]["listeners"]}
    assert listeners["https"]["protocol"] == "HTTPS" and listeners["https"]["port"] == 443
    (cert_ref,) = listeners["https"]["tls"]["certificateRefs"]
    certificate = one(docs, "Certificate", "switchboard-tls")
    assert certificate["spec"]["secretName"] == cert_ref["name"]
    assert certificate["spec"]["dnsNames"]
    issuer = certificate["spec"]["issuerRef"]
    assert find(docs, issuer.get("kind", "Issuer"), issuer["name"]), f"no issuer {issuer}"
    route = one(docs, "HTTPRoute", "switchboard")
    assert route["spec"]["parentRefs"][0]["sectionName"] == "https"
    for rule in route["spec"]["rules"]:
        for backend in rule["backendRefs"]:
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"] == service_port["port"]
    ws_rule = next(r for r in route["spec"]["rules"] if r["matches"][0]["path"]["value"] == "/ws/")
    assert ws_rule["timeouts"]["request"] == "0s", "websockets need no request deadline"
    redirect = one(docs, "HTTPRoute", "switchboard-https-redirect")
    (rule,) = redirect["spec"]["rules"]
    assert rule["filters"][0]["requestRedirect"]["scheme"] == "https"
    if overlay_of(overlay) == "production":
        assert route["spec"]["hostnames"] == certificate["spec"]["dnsNames"]

    hpa = one(docs, "HorizontalPodAutoscaler", "switchboard")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "switchboard"
    assert hpa["spec"]["minReplicas"] >= deployment["spec"]["replicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = one(docs, "PodDisruptionBudget", "switchboard")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= template_labels.items()

    job = one(docs, "Job", "switchboard-migrate")
    assert _container(job["spec"]["template"]["spec"], "migrate")["command"][-2:] == [
        "migrate",
        "--noinput",
    ]
    init = _container(deployment["spec"]["template"]["spec"], "wait-for-migrations")
    assert "--check" in init["command"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default(overlay: str, manifests: dict[str, list[dict]]) -> None:
    docs = manifests[overlay]
    deny = one(docs, "NetworkPolicy", "default-deny-all")
    assert deny["spec"]["podSelector"] == {}
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]

    # The database: in-cluster PostgreSQL locally, bring-your-own in production.
    if overlay_of(overlay) == "local":
        assert one(docs, "StatefulSet", "postgres")
        assert one(docs, "Service", "postgres")
        assert one(docs, "NetworkPolicy", "postgres-from-clients")
    else:
        assert not find(docs, "StatefulSet", "postgres"), "production brings its own database"
        assert one(docs, "NetworkPolicy", "clients-to-database")


def _labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"].get("matchLabels", {})
    return selector != {} and selector.items() <= labels.items()


def _ports(rule: dict[str, Any]) -> set[int]:
    assert all(port["protocol"] == "TCP" for port in rule["ports"])
    return {port["port"] for port in rule["ports"]}


def _redis_guarded(docs: list[dict[str, Any]], redis: dict[str, Any], ports: set[int]) -> None:
    """Only app pods (and the Redis pods themselves) reach the Redis pods, on ``ports`` only;
    the app may leave for them on those ports."""
    redis_labels = _labels(redis)
    app_labels = _labels(one(docs, "Deployment", "switchboard"))
    policies = find(docs, "NetworkPolicy")
    into_redis = [
        p for p in policies if "Ingress" in p["spec"]["policyTypes"] and _selects(p, redis_labels)
    ]
    assert len(into_redis) == 1
    for rule in into_redis[0]["spec"]["ingress"]:
        assert _ports(rule) == ports
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "only pods of this namespace"
            allowed = peer["podSelector"]["matchLabels"].items()
            assert allowed <= app_labels.items() or allowed <= redis_labels.items(), peer
    out_of_app = [
        rule
        for p in policies
        if "Egress" in p["spec"]["policyTypes"] and _selects(p, app_labels)
        for rule in p["spec"]["egress"]
        if any(
            peer.get("podSelector", {}).get("matchLabels", {}).items() <= redis_labels.items()
            and "podSelector" in peer
            for peer in rule["to"]
        )
    ]
    assert out_of_app and set().union(*map(_ports, out_of_app)) == ports


def _check_single_redis(docs: list[dict[str, Any]]) -> None:
    redis = one(docs, "Deployment", "redis")
    assert redis["spec"]["strategy"]["type"] == "Recreate", "one pod: never two masters"
    _redis_guarded(docs, redis, {6379})
    # Redis' password comes from the Secret; the app's REDIS_URL is built from the same key.
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    password = next(e for e in container["env"] if e["name"] == "REDIS_PASSWORD")
    app_env = app_container_env(docs)
    assert app_env["REDIS_PASSWORD"] == ("secret", password["valueFrom"]["secretKeyRef"]["key"])
    url = redis_url_parts(app_env["REDIS_URL"])
    assert url["scheme"] == "redis" and url["host"] == "redis" and url["password"]
    (service_port,) = one(docs, "Service", "redis")["spec"]["ports"]
    assert service_port["port"] == url["port"] == 6379


def _check_managed_cluster(docs: list[dict[str, Any]]) -> None:
    """No Redis runs in the cluster; the app reaches a cluster-mode Redis over verified TLS."""
    images = [
        container["image"]
        for _, pod in pod_specs(docs)
        for container in pod["containers"] + pod.get("initContainers", [])
    ]
    assert not [image for image in images if re.match(r"(redis|valkey)\b", image)], images
    app_env = app_container_env(docs)
    assert app_env["REDIS_URL"] == ("secret", "REDIS_URL")
    assert "REDIS_PASSWORD" not in app_env, "the password travels inside REDIS_URL"

    # The documented REDIS_URL: TLS, database 0, and a CA file where the ConfigMap is mounted.
    example = load_manifests(SECRET_EXAMPLE.read_text())[0]["stringData"]["REDIS_URL"]
    url = redis_url_parts(example)
    assert url["scheme"] == "rediss" and url["db"] == "0" and url["password"], example
    (ca_file,) = urllib.parse.parse_qs(urllib.parse.urlsplit(example).query)["ssl_ca_certs"]
    pod = one(docs, "Deployment", "switchboard")["spec"]["template"]["spec"]
    app = _container(pod, "app")
    mount = next(m for m in app["volumeMounts"] if ca_file.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    items = {item["path"]: item["key"] for item in volume["configMap"]["items"]}
    key = items[ca_file.removeprefix(mount["mountPath"] + "/")]
    ca_example = load_manifests((MANAGED_REDIS / "redis-ca.example.yaml").read_text())[0]
    assert ca_example["metadata"]["name"] == volume["configMap"]["name"]
    assert "BEGIN CERTIFICATE" in ca_example["data"][key]

    # Out to the provider on the Redis port; no way in is needed.
    app_labels = _labels(one(docs, "Deployment", "switchboard"))
    egress = one(docs, "NetworkPolicy", "switchboard-to-managed-redis")
    assert _selects(egress, app_labels) and egress["spec"]["policyTypes"] == ["Egress"]
    (rule,) = egress["spec"]["egress"]
    assert _ports(rule) == {url["port"]}


def _check_sentinel(docs: list[dict[str, Any]]) -> None:
    """3 pods of Redis + Sentinel; the app's settings name exactly their Sentinels and master."""
    statefulset = one(docs, "StatefulSet", "redis-sentinel")
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    replicas = spec["replicas"]
    assert replicas == 3, "a quorum of 2 that survives one lost pod"
    redis, sentinel = _container(pod, "redis"), _container(pod, "sentinel")
    _redis_guarded(docs, statefulset, {6379, 26379})

    # The headless Service gives every pod the stable name the scripts and the app use.
    service = one(docs, "Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True, "pods find each other starting"
    assert service["spec"]["selector"].items() <= _labels(statefulset).items()
    container_ports = {p["name"]: p["containerPort"] for p in redis["ports"] + sentinel["ports"]}
    assert {p["port"]: container_ports[p["targetPort"]] for p in service["spec"]["ports"]} == {
        6379: 6379,
        26379: 26379,
    }
    script_env = {e["name"]: e.get("value", e.get("valueFrom")) for e in redis["env"]}
    assert script_env == {e["name"]: e.get("value", e.get("valueFrom")) for e in sentinel["env"]}
    assert script_env["STATEFULSET_NAME"] == statefulset["metadata"]["name"]
    assert script_env["SERVICE_NAME"] == spec["serviceName"]
    assert int(script_env["REPLICAS"]) == replicas

    app_env = app_container_env(docs)
    assert app_env["REDIS_TOPOLOGY"] == "sentinel"
    expected = [
        f"{statefulset['metadata']['name']}-{i}.{spec['serviceName']}" for i in range(replicas)
    ]
    sentinels = [entry.rsplit(":", 1) for entry in app_env["REDIS_SENTINELS"].split(",")]
    assert sentinels == [[host, "26379"] for host in expected]
    master_ref = script_env["REDIS_SENTINEL_MASTER"]["configMapKeyRef"]
    assert master_ref["name"] == generated_name(docs, "ConfigMap", "switchboard-config")
    assert master_ref["key"] == "REDIS_SENTINEL_MASTER"

    # Two passwords, each from one Secret key: the app's env and the pods' mounted files. The
    # servers' (in REDIS_URL) and the Sentinels' own (REDIS_SENTINEL_PASSWORD).
    volumes = {v["name"]: v for v in pod["volumes"]}
    auth = next(m for m in redis["volumeMounts"] if m["mountPath"] == "/etc/redis-auth")
    items = {i["path"]: i["key"] for i in volumes[auth["name"]]["secret"]["items"]}
    assert set(items) == {"password", "sentinel-password"}
    assert app_env["REDIS_PASSWORD"] == ("secret", items["password"])
    assert app_env["REDIS_SENTINEL_PASSWORD"] == ("secret", items["sentinel-password"])
    assert items["password"] != items["sentinel-password"]
    url = redis_url_parts(app_env["REDIS_URL"])
    assert url["password"] == "$(REDIS_PASSWORD)" and url["db"] == "0"

    # Every script the containers and probes run is in the mounted ConfigMap.
    scripts = one(docs, "ConfigMap", volumes["scripts"]["configMap"]["name"])["data"]
    for container in (redis, sentinel):
        commands = [container["command"]]
        commands += [container[p]["exec"]["command"] for p in PROBES if p in container]
        if "lifecycle" in container:
            commands.append(container["lifecycle"]["preStop"]["exec"]["command"])
        for command in commands:
            assert command[0] == "sh" and command[1].startswith("/scripts/"), command
            assert command[1].removeprefix("/scripts/") in scripts, command
        assert {p for p in PROBES if p in container} == set(PROBES), container["name"]
    for text in scripts.values():
        for sourced in re.findall(r"^\. /scripts/(\S+)$", text, re.M):
            assert sourced in scripts
    start = scripts["start-redis.sh"]
    for setting in ("maxmemory-policy noeviction", 'save ""', "appendonly no"):
        assert setting in start, setting
    assert (
        "sentinel monitor ${REDIS_SENTINEL_MASTER} $master 6379 2" in scripts["start-sentinel.sh"]
    ), "quorum 2 of 3"

    pdb = one(docs, "PodDisruptionBudget", statefulset["metadata"]["name"])
    assert pdb["spec"]["maxUnavailable"] == 1, "2 of 3 Sentinels stay: the quorum"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _labels(statefulset).items()


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
REDIS_CHECKS = {
    "single": _check_single_redis,
    "managed-cluster": _check_managed_cluster,
    "sentinel": _check_sentinel,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_layers_redis_is_guarded_and_wired(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    docs = manifests[overlay]
    kinds = {
        kind
        for kind, present in (
            ("single", find(docs, "Deployment", "redis")),
            ("sentinel", find(docs, "StatefulSet", "redis-sentinel")),
        )
        if present
    }
    expected = redis_kind(overlay)
    assert kinds == ({expected} if expected != "managed-cluster" else set()), kinds
    topology = app_container_env(docs)["REDIS_TOPOLOGY"]
    assert topology == {"single": "single", "managed-cluster": "cluster"}.get(expected, expected)
    REDIS_CHECKS[expected](docs)


def test_settings_keys_are_declared_in_env_py(manifests: dict[str, list[dict]]) -> None:
    """A ConfigMap key the app does not know would be silently ignored: fail instead."""
    declared = {setting.name for setting in env.SETTINGS}
    for docs in manifests.values():
        name = generated_name(docs, "ConfigMap", "switchboard-config")
        assert name
        assert set(one(docs, "ConfigMap", name)["data"]) <= declared
