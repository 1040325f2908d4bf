"""checkov on the rendered overlays and the Dockerfile: zero failed checks.

A skipped check is allowed only through a ``checkov.io/skipN`` annotation beside the resource
that says why; the reasons are reviewed, and this test keeps the list from growing unnoticed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.static.support import DOCKERFILE
from tests.validators import run

#: check id -> why it may be skipped (the annotation beside each resource says the same).
JUSTIFIED_SKIPS = {
    "CKV_K8S_35": "the app reads its settings from the environment; values come by secretKeyRef",
    "CKV_K8S_43": "tags are pinned per overlay; digests are a release-pipeline decision",
    "CKV_K8S_15": "local overlay only: the image is side-loaded into kind/minikube",
}


@pytest.fixture(scope="session")
def checkov_report(
    vbin: Path,
    rendered: dict[str, Path],
    manifests: dict[str, list[dict]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, Any]]:
    """One checkov run (it is slow to start) over every overlay and the Dockerfile."""
    target = tmp_path_factory.mktemp("checkov")
    for overlay, path in rendered.items():
        shutil.copy(path, target / f"{overlay}.yaml")
    shutil.copy(DOCKERFILE, target / "Dockerfile")
    result = run(
        [
            str(vbin / "checkov"),
            "--directory",
            str(target),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "--output",
            "json",
        ],
        env={"BC_SKIP_MAPPING": "TRUE"},
    )
    assert result.stdout.strip(), f"checkov printed nothing:\n{result.stderr[-3000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {report["check_type"]: report for report in reports}
    by_type["_exit"] = {"code": result.returncode}
    return by_type


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_checkov_finds_nothing(
    framework: str, checkov_report: dict[str, dict[str, Any]], manifests: dict[str, list[dict]]
) -> None:
    report = checkov_report[framework]
    summary = report["summary"]
    failed = report["results"].get("failed_checks", [])
    assert summary["failed"] == 0, "\n".join(
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})" for c in failed
    )
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 50, "checkov ran no real checks?"
    if framework == "kubernetes":
        expected = sum(len(docs) for docs in manifests.values())
        # checkov counts each object, plus extra entries for some workloads.
        assert summary["resource_count"] >= expected, "every rendered object was scanned"
        # Each render target (overlays, and overlays with the Redis components) by itself.
        scanned = {Path(c["file_path"]).stem for c in report["results"]["passed_checks"]}
        assert scanned >= set(manifests), sorted(set(manifests) - scanned)
        # The Sentinel component's StatefulSet is among what was checked.
        sentinel = {
            c["file_path"]
            for c in report["results"]["passed_checks"]
            if "redis-sentinel" in c["resource"]
        }
        assert {Path(f).stem for f in sentinel} == {t for t in manifests if "redis-sentinel" in t}
    else:
        assert summary["resource_count"] == 1
    assert checkov_report["_exit"]["code"] == 0


def test_every_checkov_skip_is_justified(checkov_report: dict[str, dict[str, Any]]) -> None:
    skipped = checkov_report["kubernetes"]["results"].get("skipped_checks", [])
    skipped += checkov_report["dockerfile"]["results"].get("skipped_checks", [])
    assert skipped, "the annotated skips were not read: is the annotation syntax still right?"
    for check in skipped:
        where = f"{check['check_id']} on {check['resource']} ({check['file_path']})"
        assert check["check_id"] in JUSTIFIED_SKIPS, f"unreviewed skip: {where}"
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason) > 30, f"{where}: say why"
        if check["check_id"] == "CKV_K8S_15":
            assert "production" not in check["file_path"], f"{where}: production must pull"
