"""observability/: the metric calls, the fan-out stamp, the layer-counter copy, /metrics, JSON logs.

In-process (one process, no PROMETHEUS_MULTIPROC_DIR): values are read back through
prometheus_client's registry. The multiprocess side runs for real in tests/e2e/test_prometheus.py.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from prometheus_client import REGISTRY

from chat.routing import websocket_urlpatterns
from observability import context, metrics
from observability.asgi import MetricsEndpoint
from observability.logs import JsonFormatter


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_endpoints_are_a_bounded_label() -> None:
    assert context.endpoint_of("/ws/chat/lobby/") == "chat"
    assert context.endpoint_of("/ws/notifications/") == "notifications"
    assert context.endpoint_of("/ws/anything-else/") == "other"


@pytest.mark.usefixtures("layer_on_redis")
async def test_a_delivery_is_counted_timed_and_its_stamp_never_reaches_the_client() -> None:
    app = URLRouter(websocket_urlpatterns)
    metrics.flush_batches()  # what earlier tests delivered
    before = {
        "deliveries": sample("switchboard_websocket_deliveries_total", endpoint="other"),
        "latencies": sample("switchboard_fanout_latency_seconds_count", endpoint="other"),
        "frames": sample("switchboard_websocket_frames_received_total", endpoint="other"),
        "accepted": sample(
            "switchboard_websocket_handshakes_total", endpoint="other", outcome="accepted"
        ),
    }
    communicator = WebsocketCommunicator(app, "/ws/chat/stamped/")
    assert (await communicator.connect(timeout=10))[0]
    open_now = sample("switchboard_websocket_connections", endpoint="other")
    await communicator.send_json_to({"message": "hello"})
    frame = await communicator.receive_json_from(timeout=10)
    assert frame["message"] == "hello"
    assert metrics.ACCEPTED_AT not in frame and not any(k.startswith("_") for k in frame)
    await communicator.send_to(text_data="not json")
    assert (await communicator.receive_json_from(timeout=10))["code"] == "invalid_json"
    await communicator.disconnect()

    metrics.flush_batches()  # what each worker's sync thread does every second
    assert sample("switchboard_websocket_deliveries_total", endpoint="other") == (
        before["deliveries"] + 1
    )
    assert sample("switchboard_fanout_latency_seconds_count", endpoint="other") == (
        before["latencies"] + 1
    )
    assert sample("switchboard_websocket_frames_received_total", endpoint="other") == (
        before["frames"] + 2
    )
    assert sample(
        "switchboard_websocket_handshakes_total", endpoint="other", outcome="accepted"
    ) == (before["accepted"] + 1)
    assert sample("switchboard_websocket_error_frames_total", endpoint="other", code="invalid_json")
    assert sample("switchboard_websocket_connections", endpoint="other") == open_now - 1


def test_batched_observations_write_what_observe_writes() -> None:
    """BatchedHistogram writes through the histogram's own values: the exposition must be the
    one ``Histogram.observe`` gives for the same observations (a prometheus_client upgrade
    that changes its layout fails here)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    values = [0.0, 0.001, 0.0011, 0.05, 0.1, 0.3, 7.0, 0.25]
    exposed = []
    for batched in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("t_seconds", "t", buckets=metrics.LATENCY_BUCKETS, registry=registry)
        counter = Counter("t_observed", "t", registry=registry)
        batch = metrics.BatchedHistogram(histogram, counter)
        metrics.BATCHES.remove(batch)
        for value in values:
            if batched:
                batch.observe(value)
            else:
                histogram.observe(value)
                counter.inc()
        batch.flush()
        batch.flush()  # nothing twice
        lines = generate_latest(registry).decode().splitlines()
        exposed.append([line for line in lines if "created" not in line])
    assert exposed[0] == exposed[1]


def test_client_chosen_close_codes_cannot_grow_the_series() -> None:
    before = sample("switchboard_websocket_closes_total", endpoint="other", code="other")
    for code in (3000, 3999, 4000, 4999):
        metrics.connection_closed(code, was_open=False)
    metrics.connection_closed(4401, was_open=False)
    assert sample("switchboard_websocket_closes_total", endpoint="other", code="other") == (
        before + 4
    )
    assert sample("switchboard_websocket_closes_total", endpoint="other", code="4401") >= 1
    assert not sample("switchboard_websocket_closes_total", endpoint="other", code="3999")


def test_layer_counters_are_copied_as_increments() -> None:
    syncer = metrics.LayerStatsSync()
    published = sample("switchboard_layer_published_total")
    dropped = sample("switchboard_layer_dropped_total", reason="mailbox_full")
    syncer.sync({"published": 5, "dropped": 2, "undeliverable": 0})
    syncer.sync({"published": 7, "dropped": 2, "undeliverable": 0})
    assert sample("switchboard_layer_published_total") == published + 7
    assert sample("switchboard_layer_dropped_total", reason="mailbox_full") == dropped + 2


async def call(app: Any, scope: dict[str, Any]) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.usefixtures("layer_on_redis")
async def test_metrics_are_served_directly_and_never_through_a_proxy() -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("/metrics must not reach Django")

    app = MetricsEndpoint(inner)
    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": []}
    status, body = await call(app, scope)
    assert status == 200
    text = body.decode()
    assert "switchboard_websocket_connections" in text and "switchboard_ready 1.0" in text
    assert "switchboard_redis_up 1.0" in text
    for header in (b"x-forwarded-for", b"forwarded", b"x-real-ip"):
        status, _ = await call(app, {**scope, "headers": [(header, b"203.0.113.1")]})
        assert status == 404, header


def test_json_log_lines_carry_the_fixed_keys_only() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("chat", logging.INFO, __file__, 1, "connect %s", ("x",), None)
    record.request = "<ASGIRequest: GET '/ws/chat/x/?token=secret'>"  # an `extra`
    token = context.current.set(context.Connection("abcdef012345", "chat"))
    try:
        line = json.loads(formatter.format(record))
    finally:
        context.current.reset(token)
    assert line["message"] == "connect x" and line["level"] == "INFO" and line["logger"] == "chat"
    assert line["connection"] == "abcdef012345" and line["endpoint"] == "chat"
    assert {"timestamp", "pid", "replica"} <= set(line)
    assert "request" not in line and "secret" not in json.dumps(line)


def test_a_replica_starts_with_an_empty_metrics_folder(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files of an earlier run would add their counts to the new one: gunicorn's on_starting
    empties METRICS_DIR (or makes a new private folder) before any worker imports the metrics."""
    from observability import replica

    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_4242.db").write_bytes(b"stale")
    (folder / "keep.txt").write_text("not ours")
    monkeypatch.setenv("METRICS_DIR", str(folder))
    # Recorded, so that the variable prepare_metrics_dir() sets is undone after the test.
    monkeypatch.setenv(replica.ENV_VAR, "")
    assert replica.prepare_metrics_dir() == folder
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert __import__("os").environ[replica.ENV_VAR] == str(folder)

    monkeypatch.setenv("METRICS_DIR", "")
    private = replica.prepare_metrics_dir()
    assert private is not None and private.is_dir() and not any(private.iterdir())
    replica.remove_metrics_dir()
    assert not private.exists()
