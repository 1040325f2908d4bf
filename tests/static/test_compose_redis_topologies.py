"""The compose override files' Redis services work as written: the cluster forms (and a second
`up` finds it formed), and the Sentinels promote the replica when the master is killed.

No Docker engine here, so each service runs its exact merged compose command with the apt
redis-server (7.0; the compose files pin the 7.4 image) in a private network, mount and PID
namespace, on its own loopback address under its service name (tests/static/compose_redis.py
says what is simulated and how).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.static.support import run_isolated


@pytest.fixture(scope="module", params=["cluster", "sentinel"])
def seen(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    assert shutil.which("redis-server") or Path("/usr/sbin/redis-server").exists(), (
        "redis-server is missing: infra/install-system-deps.sh installs it"
    )
    work = tmp_path_factory.mktemp(f"compose-{request.param}")
    return {
        "topology": request.param,
        **run_isolated("tests.static.compose_redis", request.param, str(work)),
    }


def test_the_topology_comes_up_as_the_file_says(seen: dict[str, Any]) -> None:
    if seen["topology"] == "cluster":
        assert seen["nodes_healthy_after"] is not None
        assert seen["create_exit"] == 0
        assert seen["cluster_info"] == ["cluster_state:ok"]
        assert seen["roles"] == ["master"] * 3 + ["slave"] * 3
        # Slot maps name services, which Docker's DNS resolves; never container IPs.
        assert seen["endpoints"] == ["redis", *(f"redis-{i}" for i in range(2, 7))]
        assert seen["replicas_in_sync_after"] is not None, "replicas authenticate (masterauth)"
    else:
        assert None not in seen["healthy_after"], seen["healthy_after"]
        assert seen["sentinels_agree_after"] is not None, "Sentinels never found each other"
        assert seen["named_before"] == ["redis"]


def test_it_survives_what_it_is_for(seen: dict[str, Any]) -> None:
    if seen["topology"] == "cluster":
        # A second `up` re-runs the one-shot: it must succeed without touching the cluster.
        assert seen["second_create_exit"] == 0
        assert seen["second_create_says"] == ["cluster already formed"]
    else:
        assert seen["promoted_after"] is not None, "no promotion within 40 s"
        # Sentinels ping every second, so the 5 s down-after may start up to 1 s before the kill.
        assert seen["promoted_after"] >= 3.5, "promoted before down-after (5 s)?"
        assert seen["replica_role_after"] == ["master"]
