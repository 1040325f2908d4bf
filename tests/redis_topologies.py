"""Real Redis topologies for tests: one 6-node Cluster or one Sentinel set per test module.

Thin wrappers around ``infra.redis_topologies`` (the load tests start the same ones), so that a
test module writes ``cluster = cluster_fixture()`` and gets a module-scoped fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.redis_topologies import LocalCluster, LocalSentinelSet


def cluster_fixture() -> object:
    """A module-scoped fixture: a running 3-master, 3-replica cluster."""

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
        with LocalCluster(tmp_path_factory.mktemp("cluster")).start() as running:
            yield running

    return cluster


def sentinel_fixture() -> object:
    """A module-scoped fixture: a running master, replica and 3 sentinels."""

    @pytest.fixture(scope="module")
    def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSentinelSet]:
        with LocalSentinelSet(tmp_path_factory.mktemp("sentinel")).start() as running:
            yield running

    return sentinel_set
