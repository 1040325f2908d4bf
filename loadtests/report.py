"""The report: a table on stdout, a JSON file, and a PNG when matplotlib is installed.

The PNG (``pip install -e '.[plot]'``) has two panels per run: the latency histogram of each
target's representative phase (its knee step for ``knee``) and deliveries per second over time
(every phase of the run, back to back).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.accounting import BIN_SECONDS, HISTOGRAM_EDGES_MS, replica_of
from loadtests.runner import Failure, Outcome
from loadtests.scenarios import PhaseResult, TargetRun, knee_of


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    out = [line, "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append(
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(out)


def representative(scenario: str, run: TargetRun, stepped: bool = False) -> PhaseResult | None:
    """The phase a target is judged by: its knee step when the rate was stepped, else its
    best phase (most deliveries per second)."""
    if not run.phases:
        return None
    if scenario == "knee" or stepped:
        return knee_of(run)
    return max(run.phases, key=lambda p: p.account.deliveries_per_s)


def _phase_columns(p: PhaseResult | None) -> list[str]:
    if p is None:
        return ["-"] * 12
    a = p.account
    lat = a.latency
    return [
        f"{a.received:,}/{a.expected:,}",
        f"{a.lost:,}",
        f"{a.duplicated:,}",
        f"{a.out_of_order:,}",
        _f(a.deliveries_per_s, 0),
        _f(lat["p50"]),
        _f(lat["p95"]),
        _f(lat["p99"]),
        _f(lat["max"]),
        _f(p.client_cpu_s / p.wall_s if p.wall_s else None, 2),
        _f(p.server_cpu_s.get("app", 0) / p.wall_s if p.wall_s and p.server_cpu_s else None, 2),
        _f(p.app_cpu_us_per_delivery, 1),
    ]


PHASE_HEADER = [
    "received/expected",
    "lost",
    "dup",
    "ooo",
    "deliv/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "client cores",
    "app cores",
    "app us/deliv",
]


def render(outcome: Outcome, options: Any) -> str:
    scenario = outcome.scenario
    out: list[str] = []
    for run in outcome.runs:
        target = run.target
        out.append("")
        out.append(f"== {target.label}  ({target.description})")
        c = run.connect_summary()
        out.append(
            f"connections: {c['opened']:,} opened of {c['attempted']:,} "
            f"({c['failed']} failed{': ' + str(c['failures']) if c['failed'] else ''}); "
            f"connect p50 {_f(c['p50_ms'])} ms, p99 {_f(c['p99_ms'])} ms, "
            f"{_f(c['per_s'], 0)}/s"
        )
        spread = run.spread()
        if spread.get("known"):
            out.append(
                f"placement: {spread['processes']} server processes in {spread['replicas']} "
                f"replicas; {spread['rooms_on_2plus_processes']}/{spread['rooms']} rooms span "
                f"2+ processes, {spread['rooms_on_2plus_replicas']}/{spread['rooms']} span 2+ "
                f"replicas"
            )
        for note in run.notes:
            out.append(f"note: {note}")
        if "memory" in run.extra:
            m = run.extra["memory"]
            for role in ("app", "nginx"):
                if role in m:
                    r = m[role]
                    out.append(
                        f"memory ({role}, {r['processes']} processes): RSS "
                        f"{r['rss_before_kib'] / 1024:,.1f} -> {r['rss_after_kib'] / 1024:,.1f} MiB"
                        f" for {m['connections_held']:,} idle connections = "
                        f"{r['kib_per_connection']:.1f} KiB per connection"
                        + (
                            f" (PSS {r['pss_kib_per_connection']:.1f})"
                            if "pss_kib_per_connection" in r
                            else ""
                        )
                    )
        rows = [[p.label, *_phase_columns(p), "ok" if p.passed else "FAIL"] for p in run.phases]
        if rows:
            out.append("")
            out.append(table(rows, ["phase", *PHASE_HEADER, "verdict"]))
        best = representative(scenario, run, bool(getattr(options, "step", False)))
        if scenario == "knee" or (scenario == "bigroom" and options.step):
            if best is not None:
                out.append(
                    f"KNEE: {best.account.deliveries_per_s:,.0f} deliveries/s "
                    f"({best.label}; p99 {best.account.latency['p99']:.1f} ms, zero loss)"
                )
            else:
                out.append("KNEE: no step passed")
        out.extend(_offsets_section(run))
        if "resume" in run.extra:
            out.extend(_resume_section(run.extra["resume"]))
        else:
            failed = [p for p in run.phases if not p.passed]
            for p in failed[:5]:
                out.append(f"  {p.label}: " + "; ".join(p.reasons))
        out.extend(_pairs_section(run))
    return "\n".join(out)


def _offsets_section(run: TargetRun) -> list[str]:
    """Gaps the receivers found by themselves, from the rooms' offsets."""
    phases = run.warmups + run.phases
    frames = sum(p.account.offset_frames for p in phases)
    if not frames:
        if any(p.account.received for p in phases):
            return ["OFFSET GAPS: not checked (the target's frames carry no offset)"]
        return []
    gaps = sum(p.account.offset_gaps for p in phases)
    skipped = sum(p.account.offsets_skipped for p in phases)
    epochs = sum(p.account.new_epochs for p in phases)
    return [
        f"OFFSET GAPS: {gaps:,} found in {frames:,} frames with offsets"
        + (f" ({skipped:,} offsets skipped)" if gaps else "")
        + f"; {epochs:,} new epochs seen"
    ]


def _resume_section(r: dict[str, Any]) -> list[str]:
    return [
        "",
        f"RESUME: worker {r['killed_process']} "
        + ("SIGKILLed" if r["killed"] else "NOT killed")
        + f" holding {r['connections_of_killed_process']} connections; "
        f"{r['resumes_of_killed_process_clients']} of them resumed "
        f"({r['resumes']} resumes in all: {r['recovered_true']} recovered, "
        f"{r['recovered_false']} recovered: false, {r['replayed_by_resumes']:,} messages "
        f"replayed; longest reconnect {_f(r['reconnect_s_max'], 2)} s; "
        f"{r['not_resumed_connections']} not resumed)",
        f"messages: {r['written']:,} written, {r['accepted']:,} accepted (a member got it), "
        f"{r['in_flight_to_killed_process']:,} in flight to the killed worker (never accepted), "
        f"{r['unaccounted']:,} unaccounted, {r['refused_unavailable']:,} refused (unavailable)",
        f"deliveries of accepted messages: {r['delivered']:,} of {r['expected_deliveries']:,} "
        f"({r['delivered_live']:,} live, {r['recovered_by_replay']:,} recovered by resume); "
        f"reported lost {r['reported_lost']:,}; offset gaps {r['gap_detected']:,}; "
        f"not resumed {r['not_resumed']:,}; SILENTLY LOST {r['silently_lost']:,}; "
        f"duplicated {r['duplicated']:,}; accepted offsets nobody received "
        f"{r['offsets_nobody_received']:,}",
    ]


def _pairs_section(run: TargetRun) -> list[str]:
    pairs: dict[tuple[str, str], int] = {}
    for p in run.warmups + run.phases:
        for s, d, n in p.account.pairs:
            if s is not None:
                pairs[(s, d)] = pairs.get((s, d), 0) + n
    if not pairs:
        if any(p.account.received for p in run.phases):
            return ["process pairs: the target does not report sent_by/delivered_by"]
        return []
    cross_process = {k: n for k, n in pairs.items() if k[0] != k[1]}
    cross_replica = {k: n for k, n in pairs.items() if replica_of(k[0]) != replica_of(k[1])}
    replica_pairs = {(replica_of(s), replica_of(d)) for s, d in pairs}
    total = sum(pairs.values())
    lines = [
        "",
        f"CROSS-PROCESS DELIVERY: {len(cross_process)} of {len(pairs)} distinct sent_by -> "
        f"delivered_by process pairs cross processes, carrying {sum(cross_process.values()):,} "
        f"of {total:,} deliveries; {len({k for k in replica_pairs if k[0] != k[1]})} of "
        f"{len(replica_pairs)} replica pairs cross replicas "
        f"({sum(cross_replica.values()):,} deliveries)",
    ]
    rows = []
    for (s, d), n in sorted(pairs.items(), key=lambda kv: -kv[1])[:12]:
        kind = (
            "cross-replica"
            if replica_of(s) != replica_of(d)
            else ("cross-process" if s != d else "same process")
        )
        rows.append([s, d, f"{n:,}", kind])
    lines.append(table(rows, ["sent_by", "delivered_by", "deliveries", "path"]))
    if len(pairs) > 12:
        lines.append(f"... and {len(pairs) - 12} more pairs (all in the JSON report)")
    return lines


def ratios(outcome: Outcome, baseline: str | None, options: Any = None) -> str:
    """``compare``: each target against the baseline."""
    runs = outcome.runs
    base = next((r for r in runs if r.target.label == baseline), None)
    if base is None:
        base = next((r for r in runs if r.target.label.startswith("tutorial")), runs[-1])
    stepped = bool(getattr(options, "step", False))
    figures: dict[str, dict[str, float]] = {}
    for run in runs:
        figures[run.target.label] = _headline(outcome.scenario, run, stepped)
    b = figures[base.target.label]
    rows = []
    for label, fig in figures.items():
        row = [label]
        for key in fig:
            value, ref = fig[key], b.get(key)
            ratio = (
                value / ref if ref and not math.isnan(ref) and not math.isnan(value) else math.nan
            )
            row.append(f"{_f(value, 1)} ({_f(ratio, 2)}x)")
        rows.append(row)
    header = ["target", *next(iter(figures.values())).keys()]
    return f"\nCOMPARE ({outcome.scenario}), ratios against {base.target.label}:\n" + table(
        rows, header
    )


def _headline(scenario: str, run: TargetRun, stepped: bool = False) -> dict[str, float]:
    if scenario == "connections":
        m = run.extra.get("memory", {})
        c = run.connect_summary()
        return {
            "KiB/conn (app)": m.get("app", {}).get("kib_per_connection", math.nan),
            "KiB/conn (nginx)": m.get("nginx", {}).get("kib_per_connection", math.nan),
            "PSS (nginx)": m.get("nginx", {}).get("pss_kib_per_connection", math.nan),
            "connects/s": c["per_s"],
        }
    p = representative(scenario, run, stepped)
    if p is None:
        return {
            "deliveries/s": math.nan,
            "p99 ms": math.nan,
            "app us/delivery": math.nan,
            "nginx us/delivery": math.nan,
            "redis us/delivery": math.nan,
            "redis us/message": math.nan,
        }
    label = "knee deliveries/s" if scenario == "knee" or stepped else "deliveries/s"
    return {
        label: p.account.deliveries_per_s,
        "p99 ms": p.account.latency["p99"],
        "app us/delivery": p.app_cpu_us_per_delivery,
        "nginx us/delivery": p.cpu_us_per_delivery("nginx"),
        "redis us/delivery": p.cpu_us_per_delivery("redis"),
        "redis us/message": p.redis_cpu_us_per_message,
    }


def failures_text(failures: Sequence[Failure]) -> str:
    if not failures:
        return "\nRESULT: pass"
    lines = ["", "RESULT: FAIL"]
    lines += [f"  [{f.status}] {f.target}: {f.reason}" for f in failures]
    return "\n".join(lines)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def as_json(outcome: Outcome, options: Any, argv: Sequence[str], client: dict[str, Any]) -> dict:
    return {
        "scenario": outcome.scenario,
        "command": "python -m loadtests " + " ".join(argv),
        "created": __import__("datetime").datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "commit": _git_commit(),
        },
        "client": client,
        "options": vars(options),
        "status": outcome.status,
        "failures": [vars(f) for f in outcome.failures],
        "targets": [
            {
                "label": run.target.label,
                "description": run.target.description,
                "url": f"https://{run.target.endpoint.server_name}:{run.target.endpoint.port}",
                "settings": run.target.settings,
                "connect": run.connect_summary(),
                "placement": run.spread(),
                "notes": run.notes,
                **run.extra,
                "warmups": [p.as_dict() for p in run.warmups],
                "phases": [p.as_dict() for p in run.phases],
                "headline": _headline(outcome.scenario, run, bool(getattr(options, "step", False))),
            }
            for run in outcome.runs
        ],
    }


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=1, default=str) + "\n")


def _clean(value: Any) -> Any:
    """NaN -> null (JSON has no NaN); dict keys -> str."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def plot(outcome: Outcome, options: Any, path: Path) -> bool:
    """Latency histogram + deliveries/s over time; ``False`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (hist_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=90)
    edges = HISTOGRAM_EDGES_MS
    for run in outcome.runs:
        stepped = bool(getattr(options, "step", False))
        phase = representative(outcome.scenario, run, stepped) or (
            run.phases[-1] if run.phases else None
        )
        if phase is None or not phase.account.latency_histogram:
            continue
        counts = phase.account.latency_histogram
        total = sum(counts) or 1
        hist_ax.stairs(
            [c / total for c in counts], edges, label=f"{run.target.label} ({phase.label})"
        )
        series: list[float] = []
        for p in run.phases:
            bins = p.account.timeline
            per_second = [n / BIN_SECONDS for n in bins]
            # 1 s moving average: bins are 100 ms
            window = max(1, int(1 / BIN_SECONDS))
            smooth = [
                sum(per_second[max(0, i - window + 1) : i + 1]) / min(window, i + 1)
                for i in range(len(per_second))
            ]
            series.extend(smooth)
            series.extend([math.nan] * 3)
        time_ax.plot(
            [i * BIN_SECONDS for i in range(len(series))],
            series,
            label=run.target.label,
            linewidth=1,
        )
    hist_ax.set_xscale("log")
    hist_ax.set_xlabel("latency, send -> receipt (ms)")
    hist_ax.set_ylabel("share of deliveries")
    hist_ax.set_title("latency")
    hist_ax.legend(fontsize=7)
    time_ax.set_xlabel("phase time, phases back to back (s)")
    time_ax.set_ylabel("deliveries/s (1 s average)")
    time_ax.set_title(f"{outcome.scenario}: deliveries per second")
    time_ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
