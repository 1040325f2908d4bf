"""Scenario drivers: start what must be started, run the phases, decide the verdict.

Each driver fills :class:`TargetRun` objects; :func:`verdict` turns them into failures and an
exit status:

* 1 -- unexpected loss (lost, duplicated or misdelivered messages; in ``knee`` only with
  ``--fail-on-loss``, since loss past the knee is what the ramp looks for);
* 3 -- the connect failure rate is above ``--max-connect-failures``;
* 4 -- no cross-process pair was observed on a target that reports ``delivered_by`` (or a
  started stack with several processes delivered everything from one);
* 5 -- ``bigroom`` (or ``fanout`` with ``--p99-ms``) missed its latency limit.

``resume`` fails with 1 when a message the server accepted was lost without the client being
told (silently), came twice, or when the killed worker's clients did not resume.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtests import procstat
from loadtests.accounting import account_resume
from loadtests.client import ResumeLog
from loadtests.scenarios import (
    PHASE_LEAD_S,
    FixedSteps,
    KneeSteps,
    Options,
    PhaseResult,
    Session,
    TargetRun,
    knee_of,
    round_robin,
)
from loadtests.targets import TargetError

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
        pss_before = {role: procstat.pss_kib(p) for role, p in pids.items()}
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
        pss_after = {role: procstat.pss_kib(p) for role, p in pids.items()}
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
                    # PSS splits pages shared between processes (nginx's workers share the
                    # library code a first handshake faults in; RSS counts it in each worker).
                    "pss_kib_per_connection": (pss_after[role] - pss_before[role]) / open_now,
                }
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


#: resume: the worker is killed this far into the sending window.
KILL_AT = 0.4


def _victim(run: TargetRun) -> tuple[int, str, set[int]]:
    """The target's app worker process holding the most of ``run``'s connections: its pid, its
    process id as frames report it, and those connections. Only a pid among the target's own
    worker processes is ever chosen."""
    workers = set(run.target.pids()["app"])
    holding: dict[str, set[int]] = {}
    for conn, process in run.placement.items():
        if process is not None:
            holding.setdefault(process, set()).add(conn)
    for process, conns in sorted(holding.items(), key=lambda kv: -len(kv[1])):
        pid = process.rsplit(":", 1)[-1]
        if pid.isdigit() and int(pid) in workers:
            return int(pid), process, conns
    raise TargetError(
        f"{run.target.label}: none of the processes holding connections ({sorted(holding)}) is a "
        f"known worker process of the target ({sorted(workers)}): resume needs a started "
        "switchboard target"
    )


def resume(session: Session, runs: Sequence[TargetRun]) -> None:
    """Send, SIGKILL the app worker that holds the most connections mid-phase, let its clients
    reconnect with ``?since=&epoch=``, and account every accepted message: delivered live,
    recovered by the replay, reported lost (``recovered: false``), or silently lost."""
    o = session.options
    pool = session.pool
    for run in runs:
        session.populate(run, o.connections, o.room_size, o.senders)
        session.refresh_placement(run)
        pid, process, conns = _victim(run)
        pool.broadcast("track", True)
        rooms = dict(run.rooms)
        count = max(1, round(o.rate * o.duration))
        kill_at = time.monotonic() + PHASE_LEAD_S + o.duration * KILL_AT
        killed: dict[str, float] = {}

        def kill(pid: int = pid, at: float = kill_at, killed: dict[str, float] = killed) -> None:
            if not killed and time.monotonic() >= at:
                os.kill(pid, signal.SIGKILL)
                killed["at"] = time.monotonic()

        result = session.phase(
            run,
            rate=o.rate,
            count=count,
            senders=sorted(run.senders),
            label=f"{o.rate:g} msg/s per sender, worker {process} killed",
            during=kill,
        )
        run.phases.append(result)
        log = ResumeLog()
        for part in pool.broadcast("log"):
            log.deliveries.update(part.deliveries)
            log.resumes.extend(part.resumes)
            log.reported_lost.update(part.reported_lost)
            log.gaps.update(part.gaps)
            log.not_resumed.extend(part.not_resumed)
        pool.broadcast("track", False)
        sent = {
            sender: set(range(account.sent)) - set(result.skipped.get(sender, ()))
            for sender, account in result.account.per_sender.items()
        }
        figures = account_resume(
            rooms,
            sent,
            result.phase_id,
            log.deliveries,
            reported_lost=log.reported_lost,
            gaps=log.gaps,
            killed=conns,
            not_resumed=log.not_resumed,
        )
        resumed = [r for r in log.resumes if r["conn"] in conns]
        figures.update(
            killed_process=process,
            killed=bool(killed),
            connections_of_killed_process=len(conns),
            resumes=len(log.resumes),
            resumes_of_killed_process_clients=len({r["conn"] for r in resumed}),
            recovered_true=sum(1 for r in log.resumes if r["recovered"] is True),
            recovered_false=sum(1 for r in log.resumes if r["recovered"] is False),
            replayed_by_resumes=sum(r["replayed"] for r in log.resumes),
            not_resumed_connections=len(log.not_resumed),
            reconnect_s_max=max(
                (r["down_s"] for r in log.resumes if r["down_s"] is not None), default=None
            ),
            refused_unavailable=result.account.errors.get("unavailable", 0),
        )
        run.extra["resume"] = figures
        # The phase is judged by what was accepted, not by what the senders wrote (a killed
        # worker's sockets drop what was in flight); the killed worker's CPU cannot be read.
        result.reasons = _resume_reasons(figures)
        result.passed = not result.reasons
        result.server_cpu_s.pop("app", None)


DRIVERS = {
    "fanout": fanout,
    "knee": knee,
    "bigroom": bigroom,
    "connections": connections,
    "resume": resume,
}


# -- verdict -------------------------------------------------------------------------------------


def _resume_failures(run: TargetRun) -> list[Failure]:
    r = run.extra.get("resume")
    label = run.target.label
    if r is None:
        return [Failure(label, EXIT_LOSS, "the resume phase did not run")]
    reasons = _resume_reasons(r)
    return [Failure(label, EXIT_LOSS, "; ".join(reasons))] if reasons else []


def _resume_reasons(r: dict[str, Any]) -> list[str]:
    reasons = [
        f"{r[key]} {text}"
        for key, text in (
            ("silently_lost", "deliveries silently lost"),
            ("offsets_nobody_received", "accepted offsets no member received"),
            ("unaccounted", "messages from sockets of live processes nobody received"),
            ("duplicated", "duplicated"),
            ("misdelivered", "misdelivered"),
            ("not_resumed_connections", "connections not resumed"),
        )
        if r[key]
    ]
    if not r["killed"]:
        reasons.append("the worker was not killed")
    elif not r["resumes_of_killed_process_clients"]:
        reasons.append("no client of the killed worker resumed")
    return reasons


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
        if scenario == "resume":  # the killed worker's sockets: judged by account_resume
            judged = run.warmups
            failures.extend(_resume_failures(run))
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
