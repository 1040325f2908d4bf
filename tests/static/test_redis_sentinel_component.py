"""k8s/components/redis-sentinel's scripts work: start, failover, restart, preStop, probes.

No cluster here, so the three pods run as processes with the apt redis-server (7.0; the
manifests pin the 7.4 image) in a private network, mount and PID namespace, each on its own
loopback address under its pod DNS name (tests/static/sentinel_pods.py says what is simulated
and how). What is measured: a SIGKILLed master is replaced by the Sentinels, the restarted
container rejoins as a replica of the new master, and preStop hands the master role over.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.static.sentinel_pods import PODS, host
from tests.static.support import run_isolated

#: down-after-milliseconds in start-sentinel.sh is 5 s; the election follows within seconds.
DOWN_AFTER = 5.0


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    assert shutil.which("redis-server") or Path("/usr/sbin/redis-server").exists(), (
        "redis-server is missing: infra/install-system-deps.sh installs it"
    )
    work = tmp_path_factory.mktemp("sentinel-pods")
    return run_isolated("tests.static.sentinel_pods", str(work))


def test_first_start_makes_pod_0_the_master_and_the_others_its_replicas(
    seen: dict[str, Any],
) -> None:
    assert all(seconds is not None for seconds in seen["ready_after"]), seen["ready_after"]
    assert seen["first_start"] == ["starting as master"] + [f"starting as replica of {host(0)}"] * (
        PODS - 1
    )
    assert seen["roles"][0][0] == "master"
    assert all(role == ["slave", host(0)] for role in seen["roles"][1:]), seen["roles"]
    assert seen["sentinels_agree_after"] is not None, "Sentinels never found each other"


def test_a_killed_master_is_replaced_and_rejoins_as_a_replica(seen: dict[str, Any]) -> None:
    assert seen["probe_of_a_dead_redis"] is False, "the probe must fail on a dead Redis"
    promoted = seen["promoted_after"]
    assert promoted is not None, "no promotion within 40 s"
    # Sentinels ping every second: down-after may start counting up to 1 s before the kill.
    assert promoted >= DOWN_AFTER - 1.5, "promoted before the master was declared down?"
    assert seen["new_master"] in {host(i) for i in range(1, PODS)}
    assert seen["restarted_first_start"] == f"starting as replica of {seen['new_master']}"
    assert seen["restarted_role"] == ["slave", seen["new_master"]]
    assert seen["restarted_in_sync_after"] is not None, "the restarted pod never synced"


def test_pre_stop_hands_the_master_role_over(seen: dict[str, Any]) -> None:
    assert seen["pre_stop_exit"] == 0
    assert seen["pre_stop_seconds"] <= 12, "bounded at 10 s (20 x 0.5 s) plus its questions"
    assert seen["after_pre_stop"] not in {"", seen["new_master"]}
