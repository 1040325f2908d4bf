"""What ``/metrics`` measures when it is scraped, on top of the workers' metric files.

* ``switchboard_ready`` and ``switchboard_redis_up``: the ``/readyz`` checks, run by the scrape.
  A replica that cannot reach Redis says so in the scrape Prometheus makes anyway; nothing has to
  poll ``/readyz`` for the alerts to work.
* ``process_*`` for every process of the replica (the gunicorn master and each worker, labelled
  ``pid`` and ``role``), read from ``/proc`` by prometheus_client's own ``ProcessCollector``. In
  multiprocess mode the library exports no process metrics at all; the scraping worker reads its
  siblings' instead, so a replica's CPU and memory are complete in every scrape.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


def replica_processes() -> dict[int, str]:
    """``{pid: role}`` of this replica: the gunicorn master (this worker's parent) and its
    children. Outside gunicorn (tests, ``runserver``) only this process, as ``worker``."""
    me, parent = os.getpid(), os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return {me: "worker"}
    if b"gunicorn" not in cmdline:
        return {me: "worker"}
    processes = {int(pid): "worker" for pid in children}
    processes[parent] = "master"
    processes[me] = "worker"
    return processes


class ReplicaProcessCollector(Collector):
    """``ProcessCollector`` for each process of the replica, with ``pid`` and ``role`` labels."""

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for pid, role in sorted(replica_processes().items()):
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
            for metric in collector.collect():
                family = families.get(metric.name)
                if family is None:
                    family = families[metric.name] = Metric(
                        metric.name, metric.documentation, metric.type
                    )
                for sample in metric.samples:
                    labels = {**sample.labels, "pid": str(pid), "role": role}
                    family.add_sample(sample.name, labels, sample.value)
        yield from families.values()


class ReadinessCollector(Collector):
    """The outcome of the ``/readyz`` checks that this scrape ran."""

    def __init__(self, checks: dict[str, str]) -> None:
        self.checks = checks

    def collect(self) -> Iterable[Metric]:
        ready = bool(self.checks) and all(value == "ok" for value in self.checks.values())
        yield GaugeMetricFamily(
            "switchboard_ready",
            "1 when the replica's /readyz checks pass (each within 0.5 s in a scrape), else 0.",
            int(ready),
        )
        if "redis" in self.checks:
            yield GaugeMetricFamily(
                "switchboard_redis_up",
                "1 when Redis answers PING, else 0.",
                int(self.checks["redis"] == "ok"),
            )
