"""Session fixtures for the static checks: the validators' venv and the rendered overlays."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.static.support import OVERLAYS, kustomize_directory, load_manifests
from tests.validators import validators_bin

KUBECTL_HELP = (
    "kubectl is needed to render the kustomize overlays (`kubectl kustomize`). It is in no "
    "package registry this project uses: install it from https://kubernetes.io/docs/tasks/tools/ "
    "(or Debian/Ubuntu: the pkgs.k8s.io apt repository, package kubectl)."
)


@pytest.fixture(scope="session")
def vbin() -> Path:
    """bin/ of .venv-validators (created on first use; `make test` creates it beforehand)."""
    return validators_bin()


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        # Outside CI a laptop without kubectl may skip; in CI a missing kubectl is a failure.
        if os.environ.get("CI") == "true":
            pytest.fail(KUBECTL_HELP)
        pytest.skip(KUBECTL_HELP)
    return found


@pytest.fixture(scope="session")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """target (support.K8S_TARGETS) -> file holding `kubectl kustomize` of it."""
    out_dir = tmp_path_factory.mktemp("rendered")
    scratch = tmp_path_factory.mktemp("k8s-variants")
    files = {}
    for target in OVERLAYS:
        result = subprocess.run(
            [kubectl, "kustomize", str(kustomize_directory(target, scratch))],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
        assert result.stdout.strip(), f"{target} rendered nothing"
        files[target] = out_dir / f"{target}.yaml"
        files[target].write_text(result.stdout)
    return files


@pytest.fixture(scope="session")
def manifests(rendered: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    return {overlay: load_manifests(path.read_text()) for overlay, path in rendered.items()}
