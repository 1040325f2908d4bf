"""``python -m loadtests capacity``: size a deployment from what this hardware measured.

Against a live stack (a URL with its run directory, or one the tool starts), it measures

* memory per idle connection: app workers, nginx and Redis (RSS growth over a ramp of
  ``--probe-connections`` websockets, from ``/proc``);
* CPU per delivery: app workers and nginx (TLS), during a fanout at ``--probe-rate``
  deliveries per second in rooms of the target ``--room-size``;
* Redis CPU per published message and per subscribed process: one PUBLISH costs Redis a fixed
  part plus a part per worker process subscribed to the room's channel. Two phases with a
  different number of subscribed processes per message (rooms of ``--room-size``, spread over
  the processes, and rooms of one) give both parts;

then projects them linearly onto ``--connections`` and ``--deliveries-per-second`` (:func:`project`)
and prints pods (cores, memory), front-proxy cores, Redis shards and the headroom kept, next to
Centrifugo's published million-connection run. Every figure of the plan comes from the
measurement; the only constants are the headroom, the pod shape (``--cores-per-pod``) and
Centrifugo's published row. A target the measurement cannot support is refused
(:class:`CannotExtrapolate`), with the reason.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests import procstat

#: Centrifugo's published run ("Million connections with Centrifugo", centrifugal.dev blog,
#: 2020-02-10): 1M websockets, each in a group channel of 10, ~500k deliveries/s at p99 <=
#: 200 ms, on 20 pods of about 2 CPUs, 5 Redis shards (1 CPU each), 27 GB of memory in all.
#: Published figures, not measured here: the comparison row only.
CENTRIFUGO = {
    "source": "https://centrifugal.dev/blog/2020/02/10/million-connections-with-centrifugo",
    "connections": 1_000_000,
    "deliveries_per_second": 500_000,
    "room_size": 10,
    "pods": 20,
    "cores_per_pod": 2,
    "redis_shards": 5,
    "memory_gib": 27,
}

#: Fewer deliveries than this in a probe phase make a per-delivery figure mostly noise.
MIN_PROBE_DELIVERIES = 2_000
#: The probe must run below saturation: a cost measured while queues grow is not per delivery.
PROBE_P99_LIMIT_MS = 100.0
KIB_PER_GIB = 1024 * 1024


class CannotExtrapolate(ValueError):
    """A target (or a measurement) the linear projection cannot honestly be stretched to."""


@dataclass(frozen=True)
class Measured:
    """What the probe measured on this hardware (per connection, per delivery, per message)."""

    app_kib_per_connection: float
    nginx_kib_per_connection: float
    redis_kib_per_connection: float
    app_process_baseline_kib: float  # RSS of one idle worker process before the ramp
    app_us_per_delivery: float
    nginx_us_per_delivery: float
    redis_us_per_message: float  # fixed part of one PUBLISH
    redis_us_per_subscriber: float  # per worker process subscribed to the message's channel
    probe_connections: int
    probe_room_size: int
    probe_processes: int
    probe_deliveries_per_second: float
    probe_p99_ms: float
    probe_lost: int
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: CPU each role used while the probe's connections sat idle (pings, timers), cores; taken
    #: off each probe phase's CPU before dividing by its deliveries or messages.
    idle_cores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Demand:
    """The load to size for."""

    connections: int
    deliveries_per_second: float
    room_size: int = 10


@dataclass(frozen=True)
class Plan:
    """The projection: continuous needs (linear in the demand) and what to deploy."""

    demand: Demand
    headroom: float
    cores_per_pod: int
    # Needs, before headroom and rounding: each is linear in the demand.
    worker_cores: float
    worker_memory_gib: float
    proxy_cores: float
    proxy_memory_gib: float
    redis_cores: float
    redis_memory_gib: float
    messages_per_second: float
    subscribed_processes_per_message: float
    # What to deploy (headroom kept, rounded up).
    pods: int
    memory_per_pod_gib: float
    connections_per_worker: int
    proxy_cores_to_deploy: float
    redis_shards: int

    @property
    def total_memory_gib(self) -> float:
        return self.pods * self.memory_per_pod_gib + self.proxy_memory_gib + self.redis_memory_gib


def expected_processes_per_room(room_size: int, processes: int) -> float:
    """Distinct worker processes a room of ``room_size`` members touches when members land on
    ``processes`` processes independently (as least_conn over replicas places them)."""
    if processes <= 1:
        return 1.0
    return processes * (1 - (1 - 1 / processes) ** room_size)


def check_measurement(measured: Measured) -> None:
    """Refuse a measurement that cannot carry a projection (see :class:`CannotExtrapolate`)."""
    problems = []
    if measured.probe_lost:
        problems.append(f"the probe lost {measured.probe_lost} deliveries")
    if not measured.probe_p99_ms <= PROBE_P99_LIMIT_MS:
        problems.append(
            f"the probe ran saturated (p99 {measured.probe_p99_ms:.0f} ms > "
            f"{PROBE_P99_LIMIT_MS:g} ms): its CPU figures include queueing; lower --probe-rate"
        )
    for name in ("app_kib_per_connection", "app_us_per_delivery", "nginx_us_per_delivery"):
        value = getattr(measured, name)
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{name} was not measured ({value}): are the process ids known?")
    if problems:
        raise CannotExtrapolate("; ".join(problems))


def check_demand(demand: Demand, *, headroom: float, probe_connections: int) -> None:
    """Refuse, before anything is measured, a demand no probe of ``probe_connections`` can
    support."""
    if demand.connections <= 0 or demand.deliveries_per_second <= 0 or demand.room_size <= 0:
        raise CannotExtrapolate("connections, deliveries per second and room size must be > 0")
    if demand.room_size > demand.connections:
        raise CannotExtrapolate("a room cannot have more members than there are connections")
    if demand.room_size > probe_connections:
        raise CannotExtrapolate(
            f"rooms of {demand.room_size} cannot be measured with {probe_connections} probe "
            f"connections: give --probe-connections {demand.room_size} or more"
        )
    if not 0 <= headroom < 1:
        raise CannotExtrapolate("headroom is a fraction in [0, 1)")


def project(
    measured: Measured,
    demand: Demand,
    *,
    headroom: float = 0.3,
    cores_per_pod: int = 2,
    workers_per_pod: int | None = None,
) -> Plan:
    """Project ``measured`` onto ``demand``, keeping ``headroom`` (a fraction of each resource
    left free). Needs are linear in the demand; pods and shards round them up.

    Refused (:class:`CannotExtrapolate`): a measurement that cannot carry a projection, a
    demand that is not positive, and a room size other than the probe's (the cost of a delivery
    depends on how many members one message reaches: a probe in rooms of 10 says nothing about
    rooms of 1,000).
    """
    check_measurement(measured)
    check_demand(demand, headroom=headroom, probe_connections=measured.probe_connections)
    if demand.room_size != measured.probe_room_size:
        raise CannotExtrapolate(
            f"room size {demand.room_size} was not measured (the probe used rooms of "
            f"{measured.probe_room_size}): run the probe with --room-size {demand.room_size}"
        )
    usable = 1 - headroom
    workers_per_pod = workers_per_pod or cores_per_pod
    worker_cores = demand.deliveries_per_second * measured.app_us_per_delivery / 1e6
    pods = max(1, math.ceil(worker_cores / (cores_per_pod * usable)))
    processes = pods * workers_per_pod
    connection_kib = demand.connections * measured.app_kib_per_connection
    worker_memory_gib = (connection_kib + processes * measured.app_process_baseline_kib) / (
        KIB_PER_GIB
    )
    messages = demand.deliveries_per_second / demand.room_size
    subscribed = expected_processes_per_room(demand.room_size, processes)
    redis_cores = (
        messages
        * (measured.redis_us_per_message + subscribed * measured.redis_us_per_subscriber)
        / 1e6
    )
    proxy_cores = demand.deliveries_per_second * measured.nginx_us_per_delivery / 1e6
    return Plan(
        demand=demand,
        headroom=headroom,
        cores_per_pod=cores_per_pod,
        worker_cores=worker_cores,
        worker_memory_gib=worker_memory_gib,
        proxy_cores=proxy_cores,
        proxy_memory_gib=demand.connections * measured.nginx_kib_per_connection / KIB_PER_GIB,
        redis_cores=redis_cores,
        redis_memory_gib=demand.connections * measured.redis_kib_per_connection / KIB_PER_GIB,
        messages_per_second=messages,
        subscribed_processes_per_message=subscribed,
        pods=pods,
        memory_per_pod_gib=worker_memory_gib / pods / usable,
        connections_per_worker=math.ceil(demand.connections / processes),
        proxy_cores_to_deploy=math.ceil(proxy_cores / usable * 10) / 10,
        # Redis runs commands on one core: a shard is one core's worth.
        redis_shards=max(1, math.ceil(redis_cores / usable)),
    )


# -- measuring ----------------------------------------------------------------------------------


def _rss(pids: dict[str, list[int]]) -> dict[str, int]:
    return {role: procstat.rss_kib(p) for role, p in pids.items()}


def measure(session: Any, run: Any, *, room_size: int, rate: float, seconds: float) -> Measured:
    """Run the probe on one target (``session``/``run``: :mod:`loadtests.scenarios`)."""
    options = session.options
    pids = run.target.pids()
    if not pids["app"]:
        raise CannotExtrapolate(
            "the target's process ids are unknown: give --run-dir for a URL target"
        )
    time.sleep(1.0)
    before = _rss(pids)
    baseline = before["app"] / len(pids["app"])
    # 1. Memory: the probe's connections, in rooms of the target's size, held idle.
    session.populate(run, options.connections, room_size, 0)
    pids = run.target.pids()
    idle_from = time.monotonic()
    idle_cpu = {role: procstat.cpu_seconds(p) for role, p in pids.items()}
    session.progress.start(f"{run.target.label}: hold", options.hold, "idle")
    while time.monotonic() < idle_from + options.hold:
        time.sleep(0.1)
        session.progress.tick()
    session.progress.done("held")
    idle_s = time.monotonic() - idle_from
    idle_cores = {
        role: (procstat.cpu_seconds(p) - idle_cpu[role]) / idle_s for role, p in pids.items()
    }
    session.refresh_placement(run)
    after = _rss(run.target.pids())
    held = len(run.rooms)
    per_connection = {role: (after[role] - before[role]) / held for role in before}
    spread = run.spread()
    k_room = spread.get("mean_processes_per_room", 1.0) if spread.get("known") else 1.0
    # 2. CPU per delivery, in rooms of room_size: every connection sends.
    per_sender = rate / (held * room_size)
    count = max(1, round(per_sender * seconds))
    room_phase = session.phase(
        run, rate=per_sender, count=count, senders=sorted(run.rooms), label="probe: rooms"
    )
    run.phases.append(room_phase)
    session.close(run)
    # 3. Rooms of one (one subscribed process per message), as many messages per second.
    singles = min(held, 500)
    session.populate(run, singles, 1, 0)
    messages_per_s = rate / room_size
    single_rate = messages_per_s / len(run.rooms)
    single_phase = session.phase(
        run,
        rate=single_rate,
        count=max(1, round(single_rate * seconds)),
        senders=sorted(run.rooms),
        label="probe: rooms of one",
    )
    run.phases.append(single_phase)
    session.close(run)
    busy = {
        phase.label: {
            role: max(0.0, cpu - idle_cores.get(role, 0.0) * phase.wall_s)
            for role, cpu in phase.server_cpu_s.items()
        }
        for phase in (room_phase, single_phase)
    }
    redis_a, redis_b = _redis_costs(
        busy[room_phase.label].get("redis", 0.0) / max(1, room_phase.account.sent),
        k_room,
        busy[single_phase.label].get("redis", 0.0) / max(1, single_phase.account.sent),
    )
    received = room_phase.account.received
    if received < MIN_PROBE_DELIVERIES:
        raise CannotExtrapolate(
            f"the probe delivered {received} messages, fewer than {MIN_PROBE_DELIVERIES}: "
            "raise --probe-rate or --probe-seconds"
        )
    return Measured(
        app_kib_per_connection=per_connection["app"],
        nginx_kib_per_connection=per_connection.get("nginx", math.nan),
        redis_kib_per_connection=max(0.0, per_connection.get("redis", 0.0)),
        app_process_baseline_kib=baseline,
        app_us_per_delivery=busy[room_phase.label].get("app", math.nan) / received * 1e6,
        nginx_us_per_delivery=busy[room_phase.label].get("nginx", math.nan) / received * 1e6,
        redis_us_per_message=redis_a,
        redis_us_per_subscriber=redis_b,
        probe_connections=held,
        probe_room_size=room_size,
        probe_processes=len(pids["app"]),
        probe_deliveries_per_second=room_phase.account.deliveries_per_s,
        probe_p99_ms=max(room_phase.account.latency["p99"], single_phase.account.latency["p99"]),
        probe_lost=room_phase.account.lost + single_phase.account.lost,
        load_average=os.getloadavg(),
        idle_cores=idle_cores,
    )


def _redis_costs(room_s: float, k_room: float, single_s: float) -> tuple[float, float]:
    """Redis µs per PUBLISH (fixed part) and per subscribed process, from its busy CPU seconds
    per published message in two phases: ``cost = a + b * k`` with k = ``k_room`` and k = 1.
    When the two k are too close to tell apart, or noise makes a part negative, the whole cost
    is put on the message (b = 0): an upper bound for rooms no larger than the probe's."""
    room_cost, single_cost = room_s * 1e6, single_s * 1e6
    if k_room - 1 < 0.5:
        return room_cost, 0.0
    b = (room_cost - single_cost) / (k_room - 1)
    a = single_cost - b
    if a < 0 or b < 0:
        return max(room_cost, single_cost), 0.0
    return a, b


# -- reporting ----------------------------------------------------------------------------------


def render_measured(measured: Measured) -> str:
    """What the probe measured (printed with the plan, and alone when no plan can be made)."""
    lines = [
        f"Measured on this host (probe: {measured.probe_connections:,} connections in rooms of "
        f"{measured.probe_room_size}, {measured.probe_processes} worker processes, "
        f"{measured.probe_deliveries_per_second:,.0f} deliveries/s, p99 "
        f"{measured.probe_p99_ms:.0f} ms, load average "
        + " ".join(f"{x:.1f}" for x in measured.load_average)
        + "):",
        f"  memory per idle connection: app {measured.app_kib_per_connection:.1f} KiB, nginx "
        f"{measured.nginx_kib_per_connection:.1f} KiB, Redis "
        f"{measured.redis_kib_per_connection:.2f} KiB; idle worker process "
        f"{measured.app_process_baseline_kib / 1024:.0f} MiB",
        f"  CPU per delivery: app workers {measured.app_us_per_delivery:.1f} µs, nginx (TLS) "
        f"{measured.nginx_us_per_delivery:.1f} µs",
        f"  Redis CPU: {measured.redis_us_per_message:.2f} µs per published message + "
        f"{measured.redis_us_per_subscriber:.2f} µs per subscribed worker process",
        "  (CPU while the connections sat idle, taken off the above: "
        + ", ".join(f"{role} {cores:.3f} cores" for role, cores in measured.idle_cores.items())
        + ")",
    ]
    return "\n".join(lines)


def render(measured: Measured, plan: Plan) -> str:
    """The sizing table a platform engineer can paste into a ticket."""
    d = plan.demand
    lines = [
        render_measured(measured),
        "",
        f"Plan for {d.connections:,} connections, {d.deliveries_per_second:,.0f} deliveries/s, "
        f"rooms of {d.room_size} ({plan.messages_per_second:,.0f} messages/s published), "
        f"{plan.headroom:.0%} headroom kept on every resource:",
        "",
        "| part | need (measured x demand) | deploy |",
        "|---|---:|---|",
        f"| app pods ({plan.cores_per_pod} cores each) | {plan.worker_cores:,.1f} cores, "
        f"{plan.worker_memory_gib:,.1f} GiB | **{plan.pods} pods** of {plan.cores_per_pod} cores "
        f"and {plan.memory_per_pod_gib:,.1f} GiB ({plan.connections_per_worker:,} sockets per "
        "worker process: raise its open-files limit above that) |",
        f"| front proxy (nginx, TLS) | {plan.proxy_cores:,.1f} cores, "
        f"{plan.proxy_memory_gib:,.1f} GiB | **{plan.proxy_cores_to_deploy:,.1f} cores**, "
        f"{plan.proxy_memory_gib / (1 - plan.headroom):,.1f} GiB |",
        f"| Redis (pub/sub) | {plan.redis_cores:,.2f} cores "
        f"({plan.subscribed_processes_per_message:.1f} subscribed processes per message), "
        f"{plan.redis_memory_gib:,.2f} GiB | **{plan.redis_shards} shard(s)** (one core each; "
        "sharded pub/sub: a classic PUBLISH reaches every node of a Redis Cluster) |",
        f"| total | {plan.worker_cores + plan.proxy_cores + plan.redis_cores:,.1f} cores, "
        f"{plan.worker_memory_gib + plan.proxy_memory_gib + plan.redis_memory_gib:,.1f} GiB | "
        f"{plan.pods * plan.cores_per_pod + plan.proxy_cores_to_deploy + plan.redis_shards:,.1f}"
        f" cores, {plan.total_memory_gib:,.1f} GiB |",
        f"| Centrifugo, published (rooms of {CENTRIFUGO['room_size']}) | "
        f"{CENTRIFUGO['connections']:,} connections, "
        f"{CENTRIFUGO['deliveries_per_second']:,} deliveries/s | {CENTRIFUGO['pods']} pods of "
        f"~{CENTRIFUGO['cores_per_pod']} cores, {CENTRIFUGO['redis_shards']} Redis shards, "
        f"{CENTRIFUGO['memory_gib']} GB in all |",
    ]
    return "\n".join(lines)


def as_json(
    measured: Measured, plan: Plan | None, argv: list[str], refused: str | None = None
) -> dict[str, Any]:
    """The report's JSON: the measurement, the plan (``None`` with the reason when refused)."""
    plan_dict = None
    if plan is not None:
        plan_dict = asdict(plan)
        plan_dict["total_memory_gib"] = plan.total_memory_gib
    return {
        "argv": argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "measured": asdict(measured),
        "plan": plan_dict,
        "refused": refused,
        "centrifugo_published": CENTRIFUGO,
    }
