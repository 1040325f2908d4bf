"""The native stack on a real Sentinel set (1 master, 1 replica, 3 sentinels): the master is
SIGKILLed during chat traffic; Sentinel promotes the replica and every worker's layer follows
by itself. Delivery resumes within 10 s of the promotion; nothing is lost silently.
Figures: ``artifacts/faults/sentinel_failover.json``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.redis_topologies import LocalSentinelSet
from tests.faults.failover import RESUME_LIMIT, failover_during_traffic
from tests.faults.tools import record_figures
from tests.harness import RunningStack, started
from tests.redis_topologies import sentinel_fixture

pytestmark = pytest.mark.e2e

sentinel_set = sentinel_fixture()


@pytest.fixture(scope="module")
def sentinel_stack(
    sentinel_set: LocalSentinelSet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    """2 replicas x 2 workers (the smallest with other workers and another replica)."""
    with started(
        tmp_path_factory.mktemp("sentinel-stack"),
        replicas=2,
        workers=2,
        **sentinel_set.settings,  # the Sentinels' own password too
    ) as running:
        yield running


async def test_master_sigkill_during_traffic(
    sentinel_stack: RunningStack, sentinel_set: LocalSentinelSet
) -> None:
    old_master = sentinel_set.master_port()
    result = await failover_during_traffic(
        sentinel_stack,
        "sentinel-failover",
        kill=lambda: sentinel_set.kill(old_master),
        wait_promotion=lambda: sentinel_set.wait_promotion(old_master, 30),
    )
    figures = result["figures"]
    record_figures("sentinel_failover", figures)
    assert sentinel_set.master_port() != old_master
    assert result["resumed_at"] is not None, "delivery did not resume"
    assert result["resumed_at"] - result["promoted_at"] < RESUME_LIMIT
    assert figures["messages_silently_lost"] == 0, figures
    assert figures["duplicates"] == 0, figures
    assert figures["history_epochs_seen"] == 2, figures  # the promotion started a new epoch
    assert figures["unavailable_errors_to_sender"] > 0  # sends to the dead master were refused
    assert result["closes"] == 0, "sockets must ride it out"
    assert result["unhandled_errors"] == []
