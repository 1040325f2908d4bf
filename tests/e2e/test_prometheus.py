"""A real Prometheus scrapes the 3 replicas of a native stack; PromQL says what happened.

The module starts its own stack (3 replicas x 2 workers: a worker is killed here) and Debian's
Prometheus, scraping every replica's ``/metrics`` every second with the alert rules of
``monitoring/rules/`` loaded. After real traffic through nginx/TLS, queries through Prometheus'
HTTP API must agree with what the clients themselves counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.harness import RunningStack, connections, recv_json, room_path, started
from tests.prometheus_server import Prometheus, binary, prometheus_server

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "rules" / "switchboard.rules.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "switchboard.json"

#: Every query asserted on and its value, in order (artifacts/observability/promql.json).
FIGURES: list[tuple[str, float]] = []


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningStack, Prometheus]]:
    with started(tmp_path_factory.mktemp("observed"), replicas=3, workers=2) as stack:
        targets = [f"127.0.0.1:{port}" for port in stack.stack.app_ports]
        with prometheus_server(tmp_path_factory.mktemp("prometheus"), targets, [RULES]) as prom:
            prom.wait_for_scrapes_after(time.time())
            yield stack, prom
    folder = ROOT / "artifacts" / "observability"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "promql.json").write_text(json.dumps(FIGURES, indent=1) + "\n")
    print("PromQL figures:", json.dumps(FIGURES, indent=1))


def measured(prom: Prometheus, expr: str) -> float:
    value = prom.value(expr)
    FIGURES.append((expr, value))
    return value


def total(prom: Prometheus, metric: str) -> float:
    return measured(prom, f"sum({metric})")


async def deliver_and_count(stack: RunningStack, rooms: int, members: int, each: int) -> int:
    """``rooms`` rooms of ``members`` clients; every client sends ``each`` messages; returns
    how many chat frames the clients received (every member gets every message of its room)."""
    received = 0

    async def room(index: int) -> None:
        nonlocal received
        async with connections(stack, room_path(f"observed-{index}"), members) as sockets:
            expected = members * each
            counts = [0] * members

            async def read(n: int) -> None:
                while counts[n] < expected:
                    frame = await recv_json(sockets[n], timeout=10)
                    assert frame["type"] == "chat.message"
                    assert not any(key.startswith("_") for key in frame), frame
                    counts[n] += 1

            readers = [asyncio.create_task(read(n)) for n in range(members)]
            for seq in range(each):
                for ws in sockets:
                    await ws.send(json.dumps({"message": f"m{seq}"}))
            await asyncio.gather(*readers)
            received += sum(counts)

    await asyncio.gather(*(room(i) for i in range(rooms)))
    return received


def test_exposition_is_valid_and_only_served_directly(
    observed: tuple[RunningStack, Prometheus],
) -> None:
    stack, _ = observed
    for port in stack.stack.app_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            exposition = response.read()
        lint = subprocess.run(
            [binary("promtool"), "check", "metrics"],
            input=exposition,
            capture_output=True,
            check=False,
        )
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
        text = exposition.decode()
        for name in (
            "switchboard_websocket_connections",
            "switchboard_fanout_latency_seconds_bucket",
            "switchboard_redis_round_trip_seconds_bucket",
            "switchboard_layer_dropped_total",
            'process_cpu_seconds_total{pid="',
            'role="master"',
            "switchboard_ready 1.0",
        ):
            assert name in text, name
        # Through a proxy (it adds X-Forwarded-For), the endpoint does not exist.
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"X-Forwarded-For": "203.0.113.9"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 404
    with stack.http() as client:
        assert client.get("/metrics").status_code == 404  # nginx


async def test_connections_and_deliveries_match_what_the_clients_counted(
    observed: tuple[RunningStack, Prometheus],
) -> None:
    stack, prom = observed
    deliveries_before = total(prom, "switchboard_websocket_deliveries_total")
    latency_before = total(prom, "switchboard_fanout_latency_seconds_count")
    refused_before = measured(
        prom, 'sum(switchboard_websocket_handshakes_total{outcome="invalid_room"}) or vector(0)'
    )

    async with connections(stack, room_path("observed-idle"), 10) as idle:
        # Refusals show by reason: a bad room name, and a foreign Origin.
        async with await stack.connect(room_path("bad.room")) as refused:
            assert (await recv_json(refused))["code"] == "invalid_room"
        with pytest.raises(websockets.InvalidStatus):
            await stack.connect(room_path("observed-idle"), origin="https://evil.example")
        prom.wait_for_scrapes_after(time.time())
        assert total(prom, "switchboard_websocket_connections") == len(idle)
        assert measured(prom, 'sum(switchboard_websocket_connections{endpoint="chat"})') == 10
        assert (
            measured(prom, 'sum(switchboard_websocket_handshakes_total{outcome="invalid_room"})')
            == refused_before + 1
        )
        assert measured(prom, 'sum(switchboard_websocket_handshakes_total{outcome="origin"})') >= 1
        assert measured(prom, 'sum(switchboard_websocket_closes_total{code="4400"})') >= 1

        # Traffic: 4 rooms x 6 members, every member sends 3 messages.
        received = await deliver_and_count(stack, rooms=4, members=6, each=3)
        assert received == 4 * 6 * 6 * 3
        FIGURES.append(("deliveries counted by the clients", received))
        # Each worker writes its deliveries and the layer's counters to the metric files once
        # a second (observability.metrics.SYNC_SECONDS).
        await asyncio.sleep(1.5)
        prom.wait_for_scrapes_after(time.time())
        deliveries = total(prom, "switchboard_websocket_deliveries_total") - deliveries_before
        assert deliveries == received
        latencies = total(prom, "switchboard_fanout_latency_seconds_count") - latency_before
        assert latencies == received
        p99 = measured(
            prom,
            "histogram_quantile(0.99, sum by (le) "
            "(increase(switchboard_fanout_latency_seconds_bucket[1m])))",
        )
        assert 0 < p99 < 5
        assert total(prom, "switchboard_layer_published_total") >= 4 * 6 * 3
        assert total(prom, 'switchboard_layer_dropped_total{reason="mailbox_full"}') == 0
        assert total(prom, "switchboard_redis_round_trip_seconds_count") > 0
        assert measured(prom, "min(switchboard_redis_up)") == 1
        assert measured(prom, "sum(switchboard_ready)") == 3
    prom.wait_for_scrapes_after(time.time())
    assert total(prom, "switchboard_websocket_connections") == 0


def test_deliveries_match_the_load_tests_own_count(
    observed: tuple[RunningStack, Prometheus], tmp_path: Path
) -> None:
    """``python -m loadtests fanout`` accounts for every frame its clients receive; the
    replicas' delivery counter, summed by Prometheus, must say the same number."""
    stack, prom = observed
    prom.wait_for_scrapes_after(time.time())
    before = total(prom, "switchboard_websocket_deliveries_total")
    report = tmp_path / "fanout.json"
    command = [
        *(sys.executable, "-m", "loadtests", "fanout", "--target", stack.base_url),
        *("--ca", str(stack.stack.ca_file), "--run-dir", str(stack.stack.run_dir)),
        *("--connections", "60", "--room-size", "10", "--rate", "2", "--duration", "3"),
        *("--json", str(report), "--no-plot", "--no-progress"),
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [target] = json.loads(report.read_text())["targets"]
    phases = target["warmups"] + target["phases"]
    assert sum(p["lost"] + p["duplicated"] for p in phases) == 0
    counted = sum(p["received"] + p["late_frames"] for p in phases)
    FIGURES.append(("deliveries counted by python -m loadtests fanout", counted))
    time.sleep(1.5)  # each worker writes its deliveries to the metric files once a second
    prom.wait_for_scrapes_after(time.time())
    assert total(prom, "switchboard_websocket_deliveries_total") - before == counted


async def test_a_killed_worker_shows_and_the_connection_gauge_recovers(
    observed: tuple[RunningStack, Prometheus],
) -> None:
    stack, prom = observed
    exits_before = total(prom, "switchboard_worker_exits_total")
    clients = 18
    sockets = [await stack.connect(room_path("observed-kill")) for _ in range(clients)]
    try:
        await sockets[0].send(json.dumps({"message": "where are you?"}))
        holders = [(await recv_json(ws))["delivered_by"] for ws in sockets]
        victim_process, on_victim = Counter(holders).most_common(1)[0]
        victim = int(victim_process.rsplit(":", 1)[1])
        prom.wait_for_scrapes_after(time.time())
        assert total(prom, "switchboard_websocket_connections") == clients

        os.kill(victim, signal.SIGKILL)
        placed = list(zip(sockets, holders, strict=True))
        survivors = [ws for ws, holder in placed if holder != victim_process]
        for ws, holder in placed:
            if holder == victim_process:
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
        # gunicorn notices, replaces the worker, and its child_exit hook removes the dead
        # worker's gauge file: the gauge counts only the sockets that are still open.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pids = {pid for n in range(1, 4) for pid in stack.worker_pids(f"app{n}")}
            if victim not in pids and len(pids) == 6:
                break
            await asyncio.sleep(0.2)
        prom.wait_for_scrapes_after(time.time())
        assert total(prom, "switchboard_worker_exits_total") == exits_before + 1
        assert total(prom, "switchboard_websocket_connections") == len(survivors)
        FIGURES.append(("sockets on the killed worker", on_victim))

        # Its clients reconnect: the gauge is back to every client.
        sockets = survivors + [
            await stack.connect(room_path("observed-kill")) for _ in range(on_victim)
        ]
        prom.wait_for_scrapes_after(time.time())
        assert total(prom, "switchboard_websocket_connections") == clients
        assert measured(prom, "count(process_start_time_seconds{role='worker'})") == 6
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


def test_every_dashboard_query_is_valid_promql_that_returns_data(
    observed: tuple[RunningStack, Prometheus],
) -> None:
    _, prom = observed
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 15
    empty = [expr for expr in exprs if not prom.query(expr)]
    assert not empty, f"queries that returned no data: {empty}"


def test_prometheus_loaded_and_evaluates_the_alert_rules(
    observed: tuple[RunningStack, Prometheus],
) -> None:
    _, prom = observed
    groups = prom.api("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 6
    assert all(rule["health"] == "ok" for rule in rules), rules
    # Healthy stack: nothing fires (the worker kill above is one exit, under the threshold).
    firing = [rule["name"] for rule in rules if rule["state"] == "firing"]
    assert not firing, firing


def test_metrics_endpoint_returns_nothing_through_the_gateway_path(
    observed: tuple[RunningStack, Prometheus],
) -> None:
    """A Gateway or load balancer in front of the pods adds X-Forwarded-For like nginx does."""
    stack, _ = observed
    port = stack.stack.app_ports[0]
    response = httpx.get(
        f"http://127.0.0.1:{port}/metrics", headers={"Forwarded": "for=198.51.100.7"}
    )
    assert response.status_code == 404


def test_redis_down_sets_off_the_alerts_on_real_data(
    observed: tuple[RunningStack, Prometheus],
) -> None:
    """Runs last: it stops the module's Redis. The alerts go pending as soon as their
    expressions hold on the scraped data (their ``for:`` durations are promtool's to test)."""
    stack, prom = observed
    stopped = stack.stack.supervisorctl("stop", "redis")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    try:
        moment = time.time()
        prom.wait_for_scrapes_after(moment)
        assert measured(prom, "max(switchboard_redis_up)") == 0
        assert measured(prom, "max(switchboard_ready)") == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            alerts = {a["labels"]["alertname"]: a for a in prom.api("/api/v1/alerts")["alerts"]}
            if {"SwitchboardRedisUnreachable", "SwitchboardNoReadyReplica"} <= set(alerts):
                break
            time.sleep(0.5)
        assert {"SwitchboardRedisUnreachable", "SwitchboardNoReadyReplica"} <= set(alerts)
        unreachable = [
            a
            for a in prom.api("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == "SwitchboardRedisUnreachable"
        ]
        assert len(unreachable) == 3, unreachable  # one per replica
    finally:
        started_again = stack.stack.supervisorctl("start", "redis")
        assert started_again.returncode == 0, started_again.stdout + started_again.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and prom.query("min(switchboard_ready) == 1") == []:
        time.sleep(0.5)
    assert measured(prom, "min(switchboard_redis_up)") == 1
