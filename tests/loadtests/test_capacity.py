"""The capacity planner's projection (loadtests/capacity.py), on synthetic measurements: linear
in its inputs, every figure driven by a measurement, and targets it cannot extrapolate to are
refused with the reason."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from loadtests.capacity import (
    CENTRIFUGO,
    KIB_PER_GIB,
    CannotExtrapolate,
    Demand,
    Measured,
    as_json,
    expected_processes_per_room,
    project,
    render,
    render_measured,
)

MEASURED = Measured(
    app_kib_per_connection=29.0,
    nginx_kib_per_connection=20.0,
    redis_kib_per_connection=0.05,
    app_process_baseline_kib=80 * 1024,
    app_us_per_delivery=60.0,
    nginx_us_per_delivery=25.0,
    redis_us_per_message=3.0,
    redis_us_per_subscriber=1.5,
    probe_connections=2000,
    probe_room_size=10,
    probe_processes=6,
    probe_deliveries_per_second=3000.0,
    probe_p99_ms=40.0,
    probe_lost=0,
)
DEMAND = Demand(connections=1_000_000, deliveries_per_second=500_000, room_size=10)


def needs(measured: Measured = MEASURED, demand: Demand = DEMAND, **options: float) -> dict:
    plan = project(measured, demand, **options)
    return {
        "worker_cores": plan.worker_cores,
        "proxy_cores": plan.proxy_cores,
        "proxy_memory_gib": plan.proxy_memory_gib,
        "redis_memory_gib": plan.redis_memory_gib,
        "messages_per_second": plan.messages_per_second,
        "plan": plan,
    }


@pytest.mark.parametrize("factor", [0.5, 2, 10])
def test_cpu_needs_scale_linearly_with_deliveries(factor: float) -> None:
    base = needs()
    scaled = needs(demand=dataclasses.replace(DEMAND, deliveries_per_second=500_000 * factor))
    for name in ("worker_cores", "proxy_cores", "messages_per_second"):
        assert scaled[name] == pytest.approx(base[name] * factor), name
    # What does not depend on the delivery rate does not move.
    assert scaled["proxy_memory_gib"] == pytest.approx(base["proxy_memory_gib"])


@pytest.mark.parametrize("factor", [0.5, 2, 10])
def test_memory_needs_scale_linearly_with_connections(factor: float) -> None:
    base = needs()
    scaled = needs(demand=dataclasses.replace(DEMAND, connections=int(1_000_000 * factor)))
    for name in ("proxy_memory_gib", "redis_memory_gib"):
        assert scaled[name] == pytest.approx(base[name] * factor), name
    # Workers: the connections' part scales; the per-process baseline stays (same pods).
    grown = scaled["plan"].worker_memory_gib - base["plan"].worker_memory_gib
    expected = (factor - 1) * 1_000_000 * MEASURED.app_kib_per_connection / KIB_PER_GIB
    assert grown == pytest.approx(expected)
    assert scaled["worker_cores"] == pytest.approx(base["worker_cores"])


@pytest.mark.parametrize(
    ("field", "need"),
    [
        ("app_us_per_delivery", "worker_cores"),
        ("nginx_us_per_delivery", "proxy_cores"),
        ("nginx_kib_per_connection", "proxy_memory_gib"),
        ("redis_kib_per_connection", "redis_memory_gib"),
    ],
)
def test_each_need_is_proportional_to_its_measurement(field: str, need: str) -> None:
    """No constant hides in the projection: doubling a measured cost doubles what it drives."""
    doubled = dataclasses.replace(MEASURED, **{field: getattr(MEASURED, field) * 2})
    assert needs(doubled)[need] == pytest.approx(needs()[need] * 2)


def test_redis_cost_is_per_message_plus_per_subscribed_process() -> None:
    plan = project(MEASURED, DEMAND)
    k = plan.subscribed_processes_per_message
    assert k == pytest.approx(expected_processes_per_room(10, plan.pods * 2))
    per_message = MEASURED.redis_us_per_message + k * MEASURED.redis_us_per_subscriber
    assert plan.redis_cores == pytest.approx(plan.messages_per_second * per_message / 1e6)
    assert plan.redis_shards == math.ceil(plan.redis_cores / 0.7)


def test_deployment_keeps_the_headroom_and_rounds_up() -> None:
    plan = project(MEASURED, DEMAND, headroom=0.3, cores_per_pod=2)
    assert plan.pods == math.ceil(plan.worker_cores / (2 * 0.7))
    assert plan.pods * 2 * 0.7 >= plan.worker_cores
    assert plan.memory_per_pod_gib * plan.pods * 0.7 == pytest.approx(plan.worker_memory_gib)
    assert plan.proxy_cores_to_deploy * 0.7 >= plan.proxy_cores
    no_headroom = project(MEASURED, DEMAND, headroom=0.0)
    assert no_headroom.pods <= plan.pods


def test_room_placement_model() -> None:
    assert expected_processes_per_room(1, 40) == pytest.approx(1)
    assert expected_processes_per_room(10, 1) == 1
    assert 9 < expected_processes_per_room(10, 1000) < 10
    assert expected_processes_per_room(1000, 6) == pytest.approx(6)


@pytest.mark.parametrize(
    ("measured", "demand", "reason"),
    [
        (MEASURED, dataclasses.replace(DEMAND, room_size=1000), "was not measured"),
        (MEASURED, dataclasses.replace(DEMAND, room_size=5000), "probe connections"),
        (MEASURED, dataclasses.replace(DEMAND, connections=0), "must be > 0"),
        (MEASURED, dataclasses.replace(DEMAND, deliveries_per_second=-1), "must be > 0"),
        (MEASURED, Demand(connections=5, deliveries_per_second=10, room_size=10), "more members"),
        (dataclasses.replace(MEASURED, probe_p99_ms=450.0), DEMAND, "saturated"),
        (dataclasses.replace(MEASURED, probe_lost=3), DEMAND, "lost 3"),
        (dataclasses.replace(MEASURED, nginx_us_per_delivery=math.nan), DEMAND, "not measured"),
        (dataclasses.replace(MEASURED, app_kib_per_connection=0.0), DEMAND, "not measured"),
    ],
)
def test_targets_it_cannot_extrapolate_to_are_refused(
    measured: Measured, demand: Demand, reason: str
) -> None:
    with pytest.raises(CannotExtrapolate, match=reason):
        project(measured, demand)


def test_headroom_must_be_a_fraction() -> None:
    with pytest.raises(CannotExtrapolate, match="headroom"):
        project(MEASURED, DEMAND, headroom=1.0)


def test_the_report_has_the_sizing_and_the_published_comparison() -> None:
    plan = project(MEASURED, DEMAND)
    table = render(MEASURED, plan)
    assert f"**{plan.pods} pods**" in table and f"**{plan.redis_shards} shard(s)**" in table
    assert "Centrifugo, published" in table and f"{CENTRIFUGO['pods']} pods" in table
    document = json.loads(json.dumps(as_json(MEASURED, plan, ["capacity"])))
    assert document["plan"]["pods"] == plan.pods
    assert document["measured"]["app_us_per_delivery"] == MEASURED.app_us_per_delivery


def test_a_refused_plan_still_reports_what_was_measured() -> None:
    saturated = dataclasses.replace(MEASURED, probe_p99_ms=450.0)
    with pytest.raises(CannotExtrapolate) as refused:
        project(saturated, DEMAND)
    document = json.loads(json.dumps(as_json(saturated, None, ["capacity"], str(refused.value))))
    assert document["plan"] is None and "saturated" in document["refused"]
    assert "450 ms" in render_measured(saturated)
