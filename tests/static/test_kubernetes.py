"""k8s/: every overlay renders, passes kubernetes-validate --strict, and keeps its invariants."""

from __future__ import annotations

import re
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
    pod_specs,
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


def test_production_secret_example_is_a_valid_secret(vbin: Path) -> None:
    example = ROOT / "k8s" / "overlays" / "production" / "secret.example.yaml"
    passed, findings = _kubernetes_validate(vbin, example)
    assert not findings, "\n".join(findings)
    assert passed == {"secret/switchboard-secrets"}


def _container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def _secret_keys(overlay: str, docs: list[dict[str, Any]]) -> set[str]:
    """Keys of "switchboard-secrets": generated (local) or documented (production)."""
    if overlay == "production":
        example = ROOT / "k8s" / "overlays" / "production" / "secret.example.yaml"
        return set(load_manifests(example.read_text())[0]["stringData"])
    name = generated_name(docs, "Secret", "switchboard-secrets")
    assert name, "the local overlay generates switchboard-secrets"
    return set(one(docs, "Secret", name)["data"])


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
    wanted = {
        item["valueFrom"]["secretKeyRef"]["key"]
        for _, pod_spec in pod_specs(docs)
        for container in pod_spec["containers"] + pod_spec.get("initContainers", [])
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    assert wanted <= _secret_keys(overlay, docs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    workloads = list(pod_specs(manifests[overlay]))
    assert len(workloads) >= 3
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
    if overlay == "production":
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
def test_network_policies_deny_by_default_and_guard_redis(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    docs = manifests[overlay]
    policies = find(docs, "NetworkPolicy")
    deny = one(docs, "NetworkPolicy", "default-deny-all")
    assert deny["spec"]["podSelector"] == {}
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]

    redis = one(docs, "Deployment", "redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    app_labels = one(docs, "Deployment", "switchboard")["spec"]["template"]["metadata"]["labels"]
    into_redis = [
        p
        for p in policies
        if "Ingress" in p["spec"]["policyTypes"]
        and p["spec"]["podSelector"].get("matchLabels", {}).items() <= redis_labels.items()
        and p["spec"]["podSelector"] != {}
    ]
    assert len(into_redis) == 1
    (rule,) = into_redis[0]["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "only pods of this namespace"
    assert peer["podSelector"]["matchLabels"].items() <= app_labels.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]

    # Redis' password comes from the Secret; the app's REDIS_URL is built from the same key.
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    password = next(e for e in container["env"] if e["name"] == "REDIS_PASSWORD")
    app_env = app_container_env(docs)
    assert app_env["REDIS_PASSWORD"] == ("secret", password["valueFrom"]["secretKeyRef"]["key"])
    assert "$(REDIS_PASSWORD)" in app_env["REDIS_URL"]

    # The database: in-cluster PostgreSQL locally, bring-your-own in production.
    if overlay == "local":
        assert one(docs, "StatefulSet", "postgres")
        assert one(docs, "Service", "postgres")
        assert one(docs, "NetworkPolicy", "postgres-from-clients")
    else:
        assert not find(docs, "StatefulSet", "postgres"), "production brings its own database"
        assert one(docs, "NetworkPolicy", "clients-to-database")


def test_settings_keys_are_declared_in_env_py(manifests: dict[str, list[dict]]) -> None:
    """A ConfigMap key the app does not know would be silently ignored: fail instead."""
    declared = {setting.name for setting in env.SETTINGS}
    for docs in manifests.values():
        name = generated_name(docs, "ConfigMap", "switchboard-config")
        assert name
        assert set(one(docs, "ConfigMap", name)["data"]) <= declared
