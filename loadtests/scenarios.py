"""The scenarios: fanout, knee, connections, bigroom -- against one target or several (compare).

A :class:`Session` owns the client processes and numbers connections, rooms and phases across
every target of the run. A :class:`TargetRun` is one target's side of it: its open connections
(each in a room), where each sits (the ``delivered_by`` it reports), its phases.

A *phase* is: every sender sends ``count`` messages at ``rate`` per second, evenly staggered,
from a common start; then the client processes wait until every expected delivery arrived (or
nothing arrived for ``--quiet`` seconds, or ``--drain`` passed) and hand their receipts over for
:func:`loadtests.accounting.account`. Server CPU (app workers, nginx, Redis) and client CPU are
read around each phase, so a reader can tell who was busy.

Rooms are *deliberately spread*: after connecting, a warm-up message per room reveals which
server process holds each member; a room that sits on a single process while the target has
several gets half of its members reconnected (new source address, so nginx's least_conn and the
kernel place them afresh), up to three times.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtests import procstat
from loadtests.accounting import PhaseAccount, Receipts, account, percentile, replica_of
from loadtests.client import ClientPool, CollectOutcome, ConnSpec, SendOutcome
from loadtests.progress import Progress
from loadtests.targets import Target

#: Seconds between scheduling a phase and its first send (lets every client process get ready).
PHASE_LEAD_S = 0.3
#: Rounds of reconnecting members of rooms that sit on a single server process.
SPREAD_ROUNDS = 3


@dataclass
class Options:
    """Every knob of every scenario (the CLI fills the ones that apply)."""

    connections: int = 200
    room_size: int = 10
    senders: int = 0  # 0: every connection sends
    rate: float = 1.0  # messages per second per sender
    duration: float = 10.0
    rounds: int = 1
    drain: float = 20.0
    quiet: float = 3.0
    pad: int = 0
    per_ip: int = 100  # connections per loopback source address (0: all from the default)
    p99_ms: float | None = None
    # knee
    start_rate: float = 1.0
    factor: float = 1.5
    max_rate: float = 500.0
    refine: int = 2
    retries: int = 1  # repeats of a step that failed on latency alone
    step: bool = False  # bigroom: step the rate up like knee
    # connections
    hold: float = 10.0
    spread: bool = True


@dataclass
class PhaseResult:
    label: str
    rate: float
    duration: float
    senders: int
    account: PhaseAccount
    lag_ms: dict[str, float]
    send_failed: int
    client_cpu_s: float
    server_cpu_s: dict[str, float]
    wall_s: float
    late: int
    closed_by_server: dict[int, int]
    passed: bool = True
    reasons: list[str] = field(default_factory=list)
    phase_id: int = 0
    #: sender -> sequence numbers it did not send (its socket was closed at the time)
    skipped: dict[int, list[int]] = field(default_factory=dict)

    @property
    def app_cpu_us_per_delivery(self) -> float:
        return self.cpu_us_per_delivery("app")

    def cpu_us_per_delivery(self, role: str) -> float:
        """CPU of the ``role`` processes (app, nginx, redis) per message received."""
        received = self.account.received
        if not received or role not in self.server_cpu_s:
            return math.nan
        return self.server_cpu_s[role] / received * 1e6

    @property
    def redis_cpu_us_per_message(self) -> float:
        """Redis CPU per chat message sent (each is one publish): the capacity model's input."""
        sent = self.account.sent
        if not sent or "redis" not in self.server_cpu_s:
            return math.nan
        return self.server_cpu_s["redis"] / sent * 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "rate_per_sender": self.rate,
            "duration_s": self.duration,
            "senders": self.senders,
            "passed": self.passed,
            "reasons": self.reasons,
            "send_lag_ms": self.lag_ms,
            "send_failed": self.send_failed,
            "client_cpu_s": self.client_cpu_s,
            "client_cores": self.client_cpu_s / self.wall_s if self.wall_s else None,
            "server_cpu_s": self.server_cpu_s,
            "app_cpu_us_per_delivery": self.app_cpu_us_per_delivery,
            "nginx_cpu_us_per_delivery": self.cpu_us_per_delivery("nginx"),
            "redis_cpu_us_per_delivery": self.cpu_us_per_delivery("redis"),
            "redis_cpu_us_per_message": self.redis_cpu_us_per_message,
            "wall_s": self.wall_s,
            "late_frames": self.late,
            "closed_by_server": self.closed_by_server,
            **self.account.as_dict(),
        }


@dataclass
class TargetRun:
    target: Target
    rooms: dict[int, int] = field(default_factory=dict)  # open conn id -> room
    room_names: dict[int, str] = field(default_factory=dict)
    senders: set[int] = field(default_factory=set)
    placement: dict[int, str | None] = field(default_factory=dict)
    connect_ms: list[float] = field(default_factory=list)
    connect_failures: Counter = field(default_factory=Counter)
    connect_attempts: int = 0
    ever_opened: set[int] = field(default_factory=set)
    connect_wall_s: float = 0.0
    phases: list[PhaseResult] = field(default_factory=list)
    warmups: list[PhaseResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    active: bool = True

    # -- summaries -----------------------------------------------------------------------------
    @property
    def connect_failure_rate(self) -> float:
        return (
            sum(self.connect_failures.values()) / self.connect_attempts
            if self.connect_attempts
            else 0.0
        )

    def spread(self) -> dict[str, Any]:
        """How the rooms sit on server processes and replicas (from the last placement)."""
        by_room: dict[int, list[str]] = {}
        for conn, room in self.rooms.items():
            process = self.placement.get(conn)
            if process is not None:
                by_room.setdefault(room, []).append(process)
        processes = {p for members in by_room.values() for p in members}
        if not by_room:
            return {"known": False, "processes": 0}
        per_room = [len(set(m)) for m in by_room.values()]
        per_room_replicas = [len({replica_of(p) for p in m}) for m in by_room.values()]
        return {
            "known": True,
            "processes": len(processes),
            "replicas": len({replica_of(p) for p in processes}),
            "connections_per_process": dict(Counter(self.placement.values())),
            "rooms": len(by_room),
            "rooms_on_2plus_processes": sum(1 for n in per_room if n >= 2),
            "rooms_on_2plus_replicas": sum(1 for n in per_room_replicas if n >= 2),
            "min_processes_per_room": min(per_room),
            "mean_processes_per_room": sum(per_room) / len(per_room),
        }

    def connect_summary(self) -> dict[str, Any]:
        ordered = sorted(self.connect_ms)
        ok = len(ordered)
        return {
            "attempted": self.connect_attempts,
            "opened": ok,
            "failed": sum(self.connect_failures.values()),
            "failure_rate": self.connect_failure_rate,
            "failures": dict(self.connect_failures),
            "p50_ms": percentile(ordered, 50),
            "p99_ms": percentile(ordered, 99),
            "max_ms": ordered[-1] if ordered else math.nan,
            "wall_s": self.connect_wall_s,
            "per_s": ok / self.connect_wall_s if self.connect_wall_s else math.nan,
        }


class Session:
    """The client processes and the numbering shared by every target of one run."""

    def __init__(self, pool: ClientPool, tag: str, options: Options, progress: Progress) -> None:
        self.pool = pool
        self.tag = tag
        self.options = options
        self.progress = progress
        self._next_conn = 0
        self._next_room = 0
        self._next_phase = 0
        self._next_ip = 0

    # -- numbering -----------------------------------------------------------------------------
    def _source_ip(self) -> str | None:
        """Loopback source addresses, ``per_ip`` connections each: nginx limits handshakes and
        connections per client address, and a load test stands for many clients."""
        per_ip = self.options.per_ip
        if per_ip <= 0:
            return None
        index = self._next_ip // per_ip
        self._next_ip += 1
        return f"127.{100 + index // 62500}.{(index // 250) % 250 + 1}.{index % 250 + 1}"

    def new_rooms(self, count: int) -> list[int]:
        rooms = list(range(self._next_room, self._next_room + count))
        self._next_room += count
        return rooms

    # -- connections ---------------------------------------------------------------------------
    def open(self, run: TargetRun, rooms: Sequence[int], label: str = "connect") -> list[int]:
        """Open one connection per entry of ``rooms`` (a room id each); returns the new ids."""
        specs_by_worker: list[list[ConnSpec]] = [[] for _ in range(self.pool.size)]
        endpoint = run.target.endpoint
        for room in rooms:
            name = run.room_names.setdefault(room, f"lt{self.tag}_{room}")
            conn_id = self._next_conn
            self._next_conn += 1
            specs_by_worker[self.pool.owner(conn_id)].append(
                ConnSpec(conn_id, endpoint, f"/ws/chat/{name}/", room, self._source_ip())
            )
        self.progress.start(
            f"{run.target.label}: {label}", max(2.0, len(rooms) / 300), f"{len(rooms)} websockets"
        )
        started = time.monotonic()
        replies = self.pool.call(
            [("connect", (specs,)) if specs else None for specs in specs_by_worker],
            tick=self.progress.tick,
        )
        wall = time.monotonic() - started
        opened = []
        room_of = {s.conn_id: s.room for specs in specs_by_worker for s in specs}
        for outcomes in replies:
            for outcome in outcomes or ():
                run.connect_attempts += 1
                if outcome.ok:
                    run.connect_ms.append(outcome.ms)
                    run.rooms[outcome.conn_id] = room_of[outcome.conn_id]
                    run.ever_opened.add(outcome.conn_id)
                    opened.append(outcome.conn_id)
                else:
                    run.connect_failures[outcome.error] += 1
        run.connect_wall_s += wall
        failed = len(rooms) - len(opened)
        self.progress.done(
            f"{len(opened)} open in {wall:.1f} s ({len(opened) / wall:.0f}/s)"
            + (f", {failed} FAILED: {dict(run.connect_failures)}" if failed else "")
        )
        return opened

    def close(self, run: TargetRun, conn_ids: Sequence[int] | None = None) -> None:
        ids = list(run.rooms) if conn_ids is None else list(conn_ids)
        by_worker: list[list[int]] = [[] for _ in range(self.pool.size)]
        for conn_id in ids:
            by_worker[self.pool.owner(conn_id)].append(conn_id)
            run.rooms.pop(conn_id, None)
            run.placement.pop(conn_id, None)
            run.senders.discard(conn_id)
        self.pool.call([("close", (w,)) if w else None for w in by_worker])

    def refresh_placement(self, run: TargetRun) -> None:
        """Which connections are still open, and which server process holds each."""
        seen: dict[int, str | None] = {}
        for reply in self.pool.broadcast("placement"):
            seen.update(reply)
        dropped = [c for c in run.rooms if c not in seen]
        for conn_id in dropped:
            run.rooms.pop(conn_id)
            run.senders.discard(conn_id)
        if dropped:
            run.notes.append(f"{len(dropped)} connections closed before a phase")
        run.placement = {c: seen[c] for c in run.rooms}

    # -- phases --------------------------------------------------------------------------------
    def phase(
        self,
        run: TargetRun,
        *,
        rate: float,
        count: int,
        senders: Sequence[int],
        label: str,
        during: Callable[[], None] | None = None,
    ) -> PhaseResult:
        """Run one phase on ``run`` and account it (see the module docstring); ``during`` is
        called a few times a second while the messages are being sent."""
        options = self.options
        self.refresh_placement(run)
        rooms = dict(run.rooms)
        senders = [s for s in senders if s in rooms]
        self._next_phase += 1
        phase_id = self._next_phase
        duration = count / rate
        pad = "x" * options.pad
        by_worker: list[list[int]] = [[] for _ in range(self.pool.size)]
        for sender in senders:
            by_worker[self.pool.owner(sender)].append(sender)
        pids = run.target.pids()
        cpu0 = {role: procstat.cpu_seconds(p) for role, p in pids.items()}
        t0_ns = time.monotonic_ns() + int(PHASE_LEAD_S * 1e9)
        started = time.monotonic()
        self.progress.start(
            f"{run.target.label}: {label}",
            duration + PHASE_LEAD_S,
            f"{len(senders)} senders x {rate:g}/s, {len(rooms)} connections",
        )

        def tick() -> None:
            self.progress.tick()
            if during is not None:
                during()

        sends: list[SendOutcome] = self.pool.call(
            [("send", (phase_id, t0_ns, rate, count, w, pad)) for w in by_worker], tick=tick
        )
        sent: dict[int, int] = {}
        skipped: dict[int, list[int]] = {}
        lag: list[float] = []
        for outcome in sends:
            sent.update(outcome.sent)
            skipped.update(outcome.skipped)
            lag.extend(outcome.lag_ms)
        # What each client process should receive: for each of its connections, every message
        # sent into that connection's room.
        into_room: Counter = Counter()
        for sender, n in sent.items():
            into_room[rooms[sender]] += n
        expected = [0] * self.pool.size
        for conn, room in rooms.items():
            expected[self.pool.owner(conn)] += into_room[room]
        self.progress.set_detail("draining")
        collected: list[CollectOutcome] = self.pool.call(
            [("collect", (n, options.quiet, options.drain)) for n in expected],
            tick=self.progress.tick,
        )
        wall = time.monotonic() - started
        cpu1 = {role: procstat.cpu_seconds(p) for role, p in pids.items()}
        receipts = Receipts()
        closed: Counter = Counter()
        late = 0
        mine = set(rooms)
        for outcome in collected:
            receipts.merge(outcome.receipts)
            late += outcome.late
            for conn, code in outcome.closed_by_server.items():
                if conn in mine or conn in run.ever_opened:
                    closed[code] += 1
            for (conn, code), n in outcome.errors.items():
                if conn in run.ever_opened:
                    receipts.errors[code] += n
        acct = account(rooms, sent, receipts, duration_s=duration)
        lag.sort()
        result = PhaseResult(
            label=label,
            rate=rate,
            duration=duration,
            senders=len(senders),
            account=acct,
            lag_ms={
                "p50": percentile(lag, 50),
                "p99": percentile(lag, 99),
                "max": lag[-1] if lag else math.nan,
            },
            send_failed=sum(o.failed for o in sends),
            client_cpu_s=sum(o.cpu_s for o in sends) + sum(o.cpu_s for o in collected),
            server_cpu_s={role: cpu1[role] - cpu0[role] for role in cpu0 if pids[role]},
            wall_s=wall,
            late=late,
            closed_by_server=dict(closed),
            phase_id=phase_id,
            skipped=skipped,
        )
        self._judge(result)
        self.progress.done(self.describe(result))
        return result

    def _judge(self, result: PhaseResult) -> None:
        acct = result.account
        reasons = result.reasons
        if acct.lost:
            reasons.append(f"{acct.lost} lost")
        if acct.duplicated:
            reasons.append(f"{acct.duplicated} duplicated")
        if acct.misdelivered:
            reasons.append(f"{acct.misdelivered} misdelivered")
        if acct.offset_gaps:
            reasons.append(f"{acct.offset_gaps} offset gaps ({acct.offsets_skipped} skipped)")
        if acct.errors:
            reasons.append(f"server errors {acct.errors}")
        if result.closed_by_server:
            reasons.append(f"closed by server {result.closed_by_server}")
        if result.send_failed:
            reasons.append(f"{result.send_failed} sends failed")
        limit = self.options.p99_ms
        if limit is not None and not acct.latency["p99"] <= limit:
            reasons.append(f"p99 {acct.latency['p99']:.1f} ms > {limit:g} ms")
        result.passed = not reasons

    @staticmethod
    def describe(result: PhaseResult) -> str:
        acct = result.account
        lat = acct.latency
        verdict = "ok" if result.passed else "FAIL: " + "; ".join(result.reasons)
        return (
            f"{acct.received}/{acct.expected} delivered, {acct.deliveries_per_s:,.0f}/s, "
            f"p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} max {lat['max']:.1f} ms -- {verdict}"
        )

    # -- building blocks of the scenarios --------------------------------------------------------
    def populate(self, run: TargetRun, connections: int, room_size: int, senders: int) -> None:
        """Open ``connections`` in rooms of ``room_size`` (members interleaved across rooms, so
        consecutive connections land in different rooms), pick the senders, spread the rooms."""
        room_count = max(1, math.ceil(connections / room_size))
        rooms = self.new_rooms(room_count)
        layout = [rooms[i % room_count] for i in range(connections)]
        opened = self.open(run, layout)
        run.senders = set(opened) if senders <= 0 else set(self._pick_senders(run, senders))
        if self.options.spread:
            self.spread_rooms(run)
        else:
            self.warm_up(run)

    @staticmethod
    def _pick_senders(run: TargetRun, count: int) -> list[int]:
        """``count`` senders, spread over the rooms round-robin."""
        by_room: dict[int, list[int]] = {}
        for conn, room in sorted(run.rooms.items()):
            by_room.setdefault(room, []).append(conn)
        picked: list[int] = []
        depth = 0
        while len(picked) < count and any(len(m) > depth for m in by_room.values()):
            for members in by_room.values():
                if len(members) > depth and len(picked) < count:
                    picked.append(members[depth])
            depth += 1
        return picked

    def warm_up(self, run: TargetRun) -> PhaseResult:
        """One message into every room: checks delivery and reveals each member's process."""
        first: dict[int, int] = {}
        for conn, room in sorted(run.rooms.items()):
            first.setdefault(room, conn)
        result = self.phase(run, rate=1.0, count=1, senders=list(first.values()), label="warm-up")
        run.warmups.append(result)
        self.refresh_placement(run)
        return result

    def spread_rooms(self, run: TargetRun) -> None:
        for attempt in range(SPREAD_ROUNDS + 1):
            self.warm_up(run)
            processes = {p for p in run.placement.values() if p is not None}
            if len(processes) < 2:
                if not processes:
                    run.notes.append("the target does not report delivered_by: placement unknown")
                return
            members: dict[int, list[int]] = {}
            for conn, room in sorted(run.rooms.items()):
                members.setdefault(room, []).append(conn)
            lumped = [
                room
                for room, conns in members.items()
                if len(conns) >= 2 and len({run.placement.get(c) for c in conns}) < 2
            ]
            if not lumped or attempt == SPREAD_ROUNDS:
                if lumped:
                    run.notes.append(f"{len(lumped)} rooms still on a single process")
                return
            again: list[int] = []
            replace: list[int] = []
            for room in lumped:
                conns = members[room]
                for conn in conns[len(conns) // 2 :]:
                    replace.append(conn)
                    again.append(room)
            was_sender = [c for c in replace if c in run.senders]
            self.close(run, replace)
            opened = self.open(run, again, label=f"re-spread {len(lumped)} rooms")
            run.senders.update(opened[: len(was_sender)])


# -- steppers: which rate to try next --------------------------------------------------------


class FixedSteps:
    """``rounds`` phases at one rate."""

    def __init__(self, rate: float, rounds: int) -> None:
        self.rate, self.left = rate, rounds

    def next_rate(self) -> float | None:
        if self.left <= 0:
            return None
        self.left -= 1
        return self.rate

    def report(self, rate: float, passed: bool) -> None:
        """Fixed steps go on whatever happens."""


class KneeSteps:
    """Multiply the rate by ``factor`` from ``start`` until a step fails (or ``max_rate``), then
    bisect (geometrically) between the last pass and the first failure ``refine`` times."""

    def __init__(self, start: float, factor: float, max_rate: float, refine: int) -> None:
        self.start, self.factor, self.max_rate, self.refine = start, factor, max_rate, refine
        self.last_pass: float | None = None
        self.first_fail: float | None = None
        self.pending: float | None = start

    def next_rate(self) -> float | None:
        rate, self.pending = self.pending, None
        return rate

    def report(self, rate: float, passed: bool) -> None:
        if passed:
            self.last_pass = max(rate, self.last_pass or 0.0)
        else:
            self.first_fail = min(rate, self.first_fail or math.inf)
        if self.first_fail is None:
            following = rate * self.factor
            self.pending = following if following <= self.max_rate * 1.0001 else None
        elif self.refine > 0 and self.last_pass is not None:
            self.refine -= 1
            middle = math.sqrt(self.last_pass * self.first_fail)
            # Below ~5 % apart the difference is noise on this machine: stop.
            self.pending = middle if self.first_fail / self.last_pass > 1.05 else None


def round_robin(
    session: Session,
    runs: Sequence[TargetRun],
    steppers: Sequence[Any],
    phase: Callable[[TargetRun, float], PhaseResult],
) -> None:
    """Interleave the targets: one phase of each active target per round, until none is left."""
    while True:
        progressed = False
        for run, stepper in zip(runs, steppers, strict=True):
            if not run.active:
                continue
            rate = stepper.next_rate()
            if rate is None:
                run.active = False
                continue
            result = phase(run, rate)
            run.phases.append(result)
            for _ in range(session.options.retries):
                # On a shared machine one scheduling hiccup can push a step's p99 over the
                # limit: a step that failed on latency alone is run again, and its verdict is
                # the repeat's. Loss fails a step at once.
                if result.passed or not all(r.startswith("p99 ") for r in result.reasons):
                    break
                result = phase(run, rate)
                result.label += " (repeat)"
                run.phases.append(result)
            stepper.report(rate, result.passed)
            progressed = True
        if not progressed:
            return


def knee_of(run: TargetRun) -> PhaseResult | None:
    """The passing phase with the most deliveries per second (a step that passed only when
    repeated counts: its repeat passed)."""
    passing = [p for p in run.phases if p.passed]
    return max(passing, key=lambda p: p.account.deliveries_per_s, default=None)
