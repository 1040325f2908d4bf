"""monitoring/, the k8s monitoring and autoscaling components, the compose observability profile.

promtool (Debian's ``prometheus`` package) checks the rules and runs their unit tests, checks
every dashboard query's PromQL and the compose Prometheus configuration; the k8s components
render on both overlays and pass kubernetes-validate --strict; and every copy of a figure or a
rule (PrometheusRule, HPA target, README table) agrees with its one source.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from channel_layer.stats import stats
from observability import metrics
from tests.prometheus_server import binary
from tests.static.support import OVERLAYS, ROOT, kustomize_directory, load_compose
from tests.static.test_kubernetes import KUBERNETES_VERSIONS, _kubernetes_validate

MONITORING = ROOT / "monitoring"
RULES = MONITORING / "rules" / "switchboard.rules.yml"
RULE_TESTS = MONITORING / "rules" / "switchboard.rules.test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "switchboard.json"
COMPONENTS = ROOT / "k8s" / "components"
REQUIRED_ALERTS = {
    "SwitchboardNoReadyReplica",
    "SwitchboardLayerDrops",
    "SwitchboardRedisUnreachable",
    "SwitchboardFanoutLatencyHigh",
    "SwitchboardTooManyConnections",
}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout
    assert set(alert_rules()) >= REQUIRED_ALERTS
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    # Every alert has a unit test.
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested_alerts = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    assert tested_alerts == set(alert_rules())


def test_figures_in_rules_and_autoscaling_are_the_metrics_module_figures() -> None:
    rules = alert_rules()
    assert rules["SwitchboardTooManyConnections"]["expr"].endswith(
        f"> {metrics.CONNECTIONS_PER_REPLICA_CAPACITY}"
    )
    assert rules["SwitchboardFanoutLatencyHigh"]["expr"].strip().endswith("> 0.25")
    assert rules["SwitchboardFanoutLatencyHigh"]["for"] == "5m"
    component = yaml.safe_load(
        (COMPONENTS / "autoscaling-connections" / "kustomization.yaml").read_text()
    )
    [patch] = yaml.safe_load(component["patches"][0]["patch"])
    target = patch["value"]["pods"]["target"]
    assert patch["value"]["pods"]["metric"]["name"] == metrics.WEBSOCKET_CONNECTIONS._name
    assert int(target["averageValue"]) == metrics.AUTOSCALING_CONNECTIONS_PER_REPLICA
    adapter = yaml.safe_load(
        (COMPONENTS / "autoscaling-connections" / "prometheus-adapter-values.yaml").read_text()
    )
    [rule] = adapter["rules"]["custom"]
    assert rule["name"]["as"] == metrics.WEBSOCKET_CONNECTIONS._name
    assert rule["seriesQuery"].startswith(metrics.WEBSOCKET_CONNECTIONS._name + "{")


def _app_container_limits() -> dict[str, str]:
    docs = yaml.safe_load_all((ROOT / "k8s" / "base" / "app-deployment.yaml").read_text())
    [deployment] = [doc for doc in docs if doc and doc["kind"] == "Deployment"]
    [app] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "app"]
    return app["resources"]["limits"]


def test_the_connections_per_pod_figure_fits_the_pod_spec_and_the_measured_memory() -> None:
    """One figure: CONNECTIONS_PER_REPLICA_CAPACITY (the alert) and half of it (the HPA target)
    come from the app container's memory limit and processes -- the same in the k8s Deployment
    and in compose -- and the memory ``loadtests capacity`` measured, with 30 % of the limit free.
    """
    assert _app_container_limits()["memory"] == f"{metrics.POD_MEMORY_LIMIT_MIB}Mi"
    compose_app = load_compose()["services"]["app"]
    assert compose_app["deploy"]["resources"]["limits"]["memory"] == (
        f"{metrics.POD_MEMORY_LIMIT_MIB}M"
    )
    workers = metrics.POD_PROCESSES - 1  # and the gunicorn master
    config_env = (ROOT / "k8s" / "base" / "config.env").read_text()
    assert f"\nWEB_CONCURRENCY={workers}\n" in config_env
    assert compose_app["environment"]["WEB_CONCURRENCY"] == str(workers)
    # The measured figures are those of the capacity report.
    report = (ROOT / "loadtests" / "README.md").read_text()
    assert f"| one idle worker process | {metrics.MEASURED_PROCESS_MIB} MiB" in report
    assert (
        "| app workers, memory per idle connection (after one message each) | "
        f"{metrics.MEASURED_KIB_PER_CONNECTION} KiB"
    ) in report
    # At capacity the pod still has its headroom; a thousand more would eat into it.
    capacity = metrics.CONNECTIONS_PER_REPLICA_CAPACITY

    def used_mib(connections: int) -> float:
        return (
            metrics.POD_PROCESSES * metrics.MEASURED_PROCESS_MIB
            + connections * metrics.MEASURED_KIB_PER_CONNECTION / 1024
        )

    usable_mib = metrics.POD_MEMORY_LIMIT_MIB * (1 - metrics.POD_MEMORY_HEADROOM)
    assert used_mib(capacity) <= usable_mib < used_mib(capacity + 1000)
    assert capacity == metrics.AUTOSCALING_CONNECTIONS_PER_REPLICA * 2
    # The README says the same figures.
    readme = (ROOT / "README.md").read_text()
    scaling = readme[readme.index("### Scaling\n") : readme.index("## Operate it")]
    for figure in (capacity, metrics.AUTOSCALING_CONNECTIONS_PER_REPLICA):
        assert f"{figure:,}" in scaling, figure
    assert f"more than {capacity:,} websockets" in readme


def test_prometheus_rule_carries_exactly_the_rules_of_monitoring() -> None:
    [doc] = yaml.safe_load_all((COMPONENTS / "monitoring" / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    assert doc["spec"] == yaml.safe_load(RULES.read_text())


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (the e2e test runs them for data)."""
    exprs = dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{n}", "expr": e} for n, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    used = " ".join(exprs)
    for needed in (
        "switchboard_websocket_connections",
        "switchboard_websocket_deliveries_total",
        "switchboard_fanout_latency_seconds_bucket",
        "switchboard_layer_dropped_total",
        "switchboard_redis_up",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert needed in used, needed


def test_dashboard_is_provisionable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and "id" not in dashboard
    datasources = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    uids = {d["uid"] for d in datasources}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
    provider = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "dashboards" / "switchboard.yml").read_text()
    )["providers"][0]
    grafana = load_compose()["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"]}
    assert (ROOT / mounts[provider["options"]["path"]] / DASHBOARD.name).exists()


def test_metric_names_follow_prometheus_conventions() -> None:
    for metric in metrics.CATALOGUE:
        name, kind = metric._name, metric._type
        assert name.startswith("switchboard_"), name
        assert not name.endswith("_total"), f"{name}: the client library appends _total"
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        assert re.fullmatch(r"[a-z_]+", name), name


def test_every_layer_counter_is_exported() -> None:
    """When the channel layer grows a counter, it needs a metric (LAYER_FIELDS)."""
    assert set(stats()) <= set(metrics.LAYER_FIELDS)


def test_readme_metrics_table_is_generated_from_the_catalogue() -> None:
    readme = (ROOT / "README.md").read_text()
    assert metrics.with_table(readme) == readme, (
        "README metrics table is stale: make settings-table"
    )


# -- k8s components -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def with_components(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """overlay -> rendered overlay + the monitoring and autoscaling components."""
    files = {}
    scratch = tmp_path_factory.mktemp("monitoring-variants")
    for overlay in OVERLAYS:
        folder = tmp_path_factory.mktemp(f"components-{overlay}")
        overlay_dir = kustomize_directory(overlay, scratch)
        components = overlay_dir.parent.parent / "components"
        (folder / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [os.path.relpath(overlay_dir, folder)],
                    "components": [
                        os.path.relpath(components / "monitoring", folder),
                        os.path.relpath(components / "autoscaling-connections", folder),
                    ],
                }
            )
        )
        result = subprocess.run(
            [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(folder)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        files[overlay] = folder / "rendered.yaml"
        files[overlay].write_text(result.stdout)
    return files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_components_render_and_validate(
    overlay: str, with_components: dict[str, Path], vbin: Path
) -> None:
    passed, findings = _kubernetes_validate(vbin, with_components[overlay], KUBERNETES_VERSIONS[-1])
    assert not findings, "\n".join(findings)
    docs = [d for d in yaml.safe_load_all(with_components[overlay].read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("PodMonitor", "switchboard"), ("PrometheusRule", "switchboard")} <= kinds
    assert "networkpolicy/switchboard-from-prometheus" in passed
    assert "horizontalpodautoscaler/switchboard" in passed

    [monitor] = [d for d in docs if d["kind"] == "PodMonitor"]
    [deployment] = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "switchboard"
    ]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    ports = {
        p["name"]: p["containerPort"]
        for c in deployment["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    assert endpoint["path"] == "/metrics" and endpoint["port"] in ports

    [hpa] = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    kinds_of_metrics = {m["type"] for m in hpa["spec"]["metrics"]}
    assert kinds_of_metrics == {"Resource", "Pods"}, "CPU and connections, the larger wins"


def test_only_prometheus_in_the_monitoring_namespace_may_scrape(
    with_components: dict[str, Path],
) -> None:
    docs = [d for d in yaml.safe_load_all(with_components["production"].read_text()) if d]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    [scrape] = [p for p in policies if p["metadata"]["name"] == "switchboard-from-prometheus"]
    [rule] = scrape["spec"]["ingress"]
    [peer] = rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    # Nothing else in the monitoring namespace is let in by any policy.
    for policy in policies:
        for ingress in policy["spec"].get("ingress", []):
            for source in ingress.get("from", []):
                names = source.get("namespaceSelector", {}).get("matchLabels", {})
                if names.get("kubernetes.io/metadata.name") == "monitoring":
                    assert policy is scrape


# -- compose observability profile ----------------------------------------------------------------
def test_compose_observability_profile(tmp_path: Path) -> None:
    compose = load_compose()
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert service["profiles"] == ["observability"], name
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name} is published on loopback only"
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
                assert volume.endswith(":ro"), volume
    for name, service in services.items():
        if name not in {"prometheus", "grafana"}:
            assert "profiles" not in service, f"{name} must start without a profile"
    # The Prometheus configuration passes promtool with the rules where the container has them.
    prometheus = services["prometheus"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"]}
    config = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    rules_dir = ROOT / mounts["/etc/prometheus/rules"]
    config["rule_files"] = [
        str(rules_dir / Path(f).relative_to("/etc/prometheus/rules")) for f in config["rule_files"]
    ]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    checked = promtool("check", "config", str(local))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    [job] = config["scrape_configs"]
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["app"] and sd["port"] == int(services["app"]["environment"]["PORT"])
