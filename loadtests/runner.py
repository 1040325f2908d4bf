"""Scenario drivers: start what must be started, run the phases, decide the verdict.

Each driver fills :class:`TargetRun` objects; :func:`verdict` turns them into failures and an
exit status:

* 1 -- unexpected loss (lost, duplicated or misdelivered messages; in ``knee`` only with
  ``--fail-on-loss``, since loss past the knee is what the ramp looks for);
* 3 -- the connect failure rate is above ``--max-connect-failures``;
* 4 -- no cross-process pair was observed on a target that reports ``delivered_by`` (or a
  started stack with several processes delivered everything from one);
* 5 -- ``bigroom`` (or ``fanout`` with ``--p99-ms``) missed its latency limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtests import procstat
from loadtests.scenarios import (
    FixedSteps,
    KneeSteps,
    Options,
    PhaseResult,
    Session,
    TargetRun,
    knee_of,
    round_robin,
)

EXIT_OK = 0
EXIT_LOSS = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_NO_CROSS_PROCESS = 4
EXIT_LATENCY = 5


@dataclass
class Failure:
    target: str
    status: int
    reason: str


@dataclass
class Outcome:
    scenario: str
    runs: list[TargetRun]
    failures: list[Failure] = field(default_factory=list)

    @property
    def status(self) -> int:
        return min((f.status for f in self.failures), default=EXIT_OK)


# -- drivers -------------------------------------------------------------------------------------


def _rate_phase(session: Session) -> Any:
    def phase(run: TargetRun, rate: float) -> PhaseResult:
        count = max(1, round(rate * session.options.duration))
        return session.phase(
            run,
            rate=rate,
            count=count,
            senders=sorted(run.senders),
            label=f"{rate:g} msg/s per sender",
        )

    return phase


def fanout(session: Session, runs: Sequence[TargetRun]) -> None:
    """C connections over rooms of R, S senders at r/s for D s; ``--rounds`` interleaved."""
    o = session.options
    for run in runs:
        session.populate(run, o.connections, o.room_size, o.senders)
    round_robin(session, runs, [FixedSteps(o.rate, o.rounds) for _ in runs], _rate_phase(session))


def knee(session: Session, runs: Sequence[TargetRun]) -> None:
    """Step the per-sender rate up until p99 passes ``--p99-ms`` or anything is lost."""
    o = session.options
    for run in runs:
        session.populate(run, o.connections, o.room_size, o.senders)
    round_robin(
        session,
        runs,
        [KneeSteps(o.start_rate, o.factor, o.max_rate, o.refine) for _ in runs],
        _rate_phase(session),
    )


def bigroom(session: Session, runs: Sequence[TargetRun]) -> None:
    """One room of ``--members`` across every process; ``--senders`` at r/s (or stepped)."""
    o = session.options
    for run in runs:
        session.populate(run, o.connections, o.connections, o.senders)
    steppers = [
        KneeSteps(o.rate, o.factor, o.max_rate, o.refine)
        if o.step
        else FixedSteps(o.rate, o.rounds)
        for _ in runs
    ]
    round_robin(session, runs, steppers, _rate_phase(session))


def connections(session: Session, runs: Sequence[TargetRun]) -> None:
    """Ramp N idle websockets, hold them, read server RSS per connection, then broadcast one
    message into every room and check every connection still receives. Targets one after the
    other (memory readings of one must not include another's ramp)."""
    o = session.options
    for run in runs:
        pids = run.target.pids()
        time.sleep(1.0)
        before = {role: procstat.rss_kib(p) for role, p in pids.items()}
        pss_before = procstat.pss_kib(pids["app"])
        room_count = max(1, math.ceil(o.connections / o.room_size))
        rooms = session.new_rooms(room_count)
        opened = session.open(
            run, [rooms[i % room_count] for i in range(o.connections)], label="ramp"
        )
        session.progress.start(f"{run.target.label}: hold", o.hold, f"{len(opened)} idle")
        deadline = time.monotonic() + o.hold
        while time.monotonic() < deadline:
            time.sleep(0.1)
            session.progress.tick()
        session.refresh_placement(run)
        pids = run.target.pids()
        after = {role: procstat.rss_kib(p) for role, p in pids.items()}
        pss_after = procstat.pss_kib(pids["app"])
        open_now = len(run.rooms)
        memory: dict[str, Any] = {"connections_held": open_now}
        for role in ("app", "nginx"):
            if pids[role] and open_now:
                delta = after[role] - before[role]
                memory[role] = {
                    "processes": len(pids[role]),
                    "rss_before_kib": before[role],
                    "rss_after_kib": after[role],
                    "kib_per_connection": delta / open_now,
                }
        if pids["app"] and open_now:
            memory["app"]["pss_kib_per_connection"] = (pss_after - pss_before) / open_now
        run.extra["memory"] = memory
        session.progress.done(
            ", ".join(
                f"{role} {m['kib_per_connection']:.1f} KiB/connection"
                for role, m in memory.items()
                if isinstance(m, dict)
            )
            or "process ids unknown: no memory figures"
        )
        # Everyone still hears: one message into every room.
        first: dict[int, int] = {}
        for conn, room in sorted(run.rooms.items()):
            first.setdefault(room, conn)
        result = session.phase(
            run, rate=1.0, count=1, senders=list(first.values()), label="broadcast to every room"
        )
        run.phases.append(result)
        session.refresh_placement(run)
        session.close(run)


DRIVERS = {"fanout": fanout, "knee": knee, "bigroom": bigroom, "connections": connections}


# -- verdict -------------------------------------------------------------------------------------


def verdict(
    scenario: str,
    runs: Sequence[TargetRun],
    options: Options,
    *,
    max_connect_failures: float,
    fail_on_loss: bool,
    expect_cross_process: str,
) -> list[Failure]:
    failures: list[Failure] = []
    for run in runs:
        label = run.target.label
        if run.connect_failure_rate > max_connect_failures:
            failures.append(
                Failure(
                    label,
                    EXIT_CONNECT,
                    f"connect failure rate {run.connect_failure_rate:.2%} > "
                    f"{max_connect_failures:.2%} ({dict(run.connect_failures)})",
                )
            )
        phases = run.warmups + run.phases
        judged = run.warmups if scenario == "knee" and not fail_on_loss else phases
        for p in judged:
            reasons = [r for r in p.reasons if not r.startswith("p99 ")]
            if reasons:
                failures.append(Failure(label, EXIT_LOSS, f"{p.label}: " + "; ".join(reasons)))
        pairs = {pair for p in phases for pair in p.account.process_pairs}
        processes = {d for _, d in pairs}
        cross = {(s, d) for s, d in pairs if s != d}
        reports_identity = bool(pairs)
        wanted = expect_cross_process == "yes" or (
            expect_cross_process == "auto"
            and reports_identity
            and ((run.target.expected_processes or 0) > 1 or len(processes) > 1)
        )
        if wanted and not cross:
            failures.append(
                Failure(
                    label,
                    EXIT_NO_CROSS_PROCESS,
                    f"no cross-process delivery observed (processes seen: {sorted(processes)})",
                )
            )
        if scenario in {"bigroom", "fanout"} and options.p99_ms is not None:
            slow = [p for p in run.phases if not p.account.latency["p99"] <= options.p99_ms]
            if scenario == "bigroom" and options.step:
                slow = [] if knee_of(run) is not None else run.phases[:1]
            for p in slow:
                failures.append(
                    Failure(
                        label,
                        EXIT_LATENCY,
                        f"{p.label}: p99 {p.account.latency['p99']:.1f} ms > {options.p99_ms:g} ms",
                    )
                )
    return failures
