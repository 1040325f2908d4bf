"""``python -m loadtests <scenario> --target ...`` (also installed as ``switchboard-loadtest``).

Scenarios::

    fanout       C connections in rooms of R, S senders at r msg/s for D s, then a drain
    knee         fanout stepped up until p99 > --p99-ms or anything is lost: the knee
    connections  ramp N idle websockets, hold, server RSS per connection, broadcast check
    bigroom      one room of M members (default 1,000) across every process
    resume       fanout while one app worker is SIGKILLed: its clients resume with
                 ?since=&epoch=; every accepted message delivered, recovered or reported lost
    compare      one of the above against two or more targets, interleaved, with ratios
    capacity     measure this hardware, then size a deployment for N connections and R
                 deliveries/s: pods, front-proxy cores, Redis shards (loadtests/capacity.py)

Examples::

    python -m loadtests fanout --target https://localhost:8443            # make start first
    python -m loadtests fanout --target switchboard                       # the tool starts one
    python -m loadtests compare knee --target switchboard --target tutorial --target nodjango
    python -m loadtests compare knee --target switchboard \
        --target switchboard:CHAT_HISTORY_SIZE=0,label=history-off     # what history costs
    python -m loadtests resume --target switchboard                       # kill a worker
    python -m loadtests capacity --connections 1000000 --deliveries-per-second 500000
        (against the stack `make start` runs; --target switchboard starts one of its own)

Exit status: 0 pass; 1 unexpected loss; 2 usage; 3 connect failures above
--max-connect-failures; 4 no cross-process delivery seen; 5 latency limit missed (bigroom);
6 capacity: the target cannot be extrapolated to from what was measured (the reason is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from loadtests.scenarios import Options

SCENARIOS = ("fanout", "knee", "connections", "bigroom", "resume")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: capacity: the demand cannot be extrapolated to from what was measured.
EXIT_CANNOT_EXTRAPOLATE = 6

#: Per-scenario defaults; flags the user gives win. The knee defaults are the issue's anchor
#: setup -- 200 connections in rooms of 10, everyone sending, stepped up -- starting at 1/16
#: msg/s each (125 deliveries/s) so that the tutorial baseline has a first step to pass,
#: doubling until a step fails, then bisecting three times (to within ~10 %).
DEFAULTS: dict[str, dict[str, Any]] = {
    "fanout": {"connections": 200, "room_size": 10, "rate": 1.0, "duration": 10.0},
    "knee": {
        "connections": 200,
        "room_size": 10,
        "start_rate": 0.0625,
        "factor": 2.0,
        "duration": 8.0,
        "p99_ms": 100.0,
        "refine": 3,
    },
    "connections": {"connections": 2000, "room_size": 50, "hold": 10.0},
    "bigroom": {
        "connections": 1000,
        "senders": 10,
        "rate": 1.0,
        "duration": 10.0,
        "p99_ms": 100.0,
        "factor": 1.5,
    },
    # 10 messages a second into each room for 10 s: a resume after the kill stays well within
    # the room's history (CHAT_HISTORY_SIZE, 200 messages).
    "resume": {"connections": 100, "room_size": 10, "rate": 1.0, "duration": 10.0},
}


def _scenario_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("load shape (defaults depend on the scenario)")
    g.add_argument("--connections", "--members", type=int, help="websockets to open")
    g.add_argument("--room-size", type=int, help="members per room")
    g.add_argument("--senders", type=int, help="connections that send (0: all)")
    g.add_argument("--rate", type=float, help="messages per second per sender")
    g.add_argument("--duration", type=float, help="seconds of sending per phase (step)")
    g.add_argument("--rounds", type=int, help="phases per target (fanout, bigroom)")
    g.add_argument("--drain", type=float, help="longest wait for deliveries after sending, s")
    g.add_argument("--quiet", type=float, help="end a drain after this many silent seconds")
    g.add_argument("--pad", type=int, help="extra characters per message")
    g.add_argument(
        "--per-ip",
        type=int,
        help="connections per loopback source address (nginx limits per address); "
        "0: all from the default address",
    )
    g.add_argument("--p99-ms", type=float, help="latency limit for knee steps and bigroom")
    g.add_argument("--start-rate", type=float, help="knee: first rate per sender")
    g.add_argument("--factor", type=float, help="knee: rate multiplier per step")
    g.add_argument("--max-rate", type=float, help="knee: highest rate per sender tried")
    g.add_argument("--refine", type=int, help="knee: bisection steps after the first failure")
    g.add_argument(
        "--retries", type=int, help="repeats of a step that failed on latency alone (default 1)"
    )
    g.add_argument(
        "--step", action="store_true", default=None, help="bigroom: step the rate up like knee"
    )
    g.add_argument("--hold", type=float, help="connections: seconds to hold before measuring")
    g.add_argument(
        "--no-spread",
        dest="spread",
        action="store_false",
        default=None,
        help="do not reconnect members of rooms that sit on one server process",
    )


def _common_flags(parser: argparse.ArgumentParser, *, target_required: bool = True) -> None:
    g = parser.add_argument_group("targets and output")
    g.add_argument(
        "--target",
        action="append",
        required=target_required,
        metavar="URL|NAME[:K=V,...]",
        help="https://host:port of a running stack, or switchboard | tutorial | "
        "nodjango to start one (repeat for compare)",
    )
    g.add_argument("--ca", help="CA certificate for a URL target (default: <run dir>/tls/ca.crt)")
    g.add_argument("--origin", help="Origin header (default: the target's https://host:port)")
    g.add_argument("--run-dir", help="run directory of a running native stack (default: .run)")
    g.add_argument(
        "--clients", type=int, default=2, help="client processes generating the load (default: 2)"
    )
    g.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and PNG")
    g.add_argument("--json", type=Path, help="JSON report path (default: in --out)")
    g.add_argument("--plot", type=Path, help="PNG path (default: in --out)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG")
    g.add_argument("--keep", action="store_true", help="keep started stacks' run directories")
    g.add_argument(
        "--max-connect-failures",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="connect failure rate that still passes (default: 0)",
    )
    g.add_argument(
        "--fail-on-loss",
        action="store_true",
        help="knee: fail on loss at any step, not only during the warm-up",
    )
    g.add_argument(
        "--expect-cross-process",
        choices=("auto", "yes", "no"),
        default="auto",
        help="require cross-process delivery (auto: when the target reports "
        "delivered_by and runs several processes)",
    )
    g.add_argument(
        "--baseline",
        help="compare: label of the target ratios refer to "
        "(default: tutorial, else the last target)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="scenario")
    for name in SCENARIOS:
        p = sub.add_parser(name, help=f"the {name} scenario")
        _scenario_flags(p)
        _common_flags(p)
    p = sub.add_parser(
        "serve",
        help="start a target (switchboard, tutorial, nodjango) and "
        "keep it running until Ctrl-C, e.g. to profile it",
    )
    p.add_argument("spec", metavar="NAME[:K=V,...]")
    p = sub.add_parser(
        "capacity",
        help="measure this hardware and size a deployment (pods, proxy cores, Redis shards)",
    )
    g = p.add_argument_group("what to size for")
    g.add_argument("--connections", type=int, required=True, help="open websockets to serve")
    g.add_argument(
        "--deliveries-per-second", type=float, required=True, help="frames delivered per second"
    )
    g.add_argument("--room-size", type=int, default=10, help="members per room (default: 10)")
    g.add_argument("--headroom", type=float, default=0.3, help="fraction kept free (0.3)")
    g.add_argument("--cores-per-pod", type=int, default=2, help="cores of one app pod (2)")
    g = p.add_argument_group("the probe (what is measured on this hardware)")
    g.add_argument("--probe-connections", type=int, default=2000, help="websockets held (2000)")
    g.add_argument(
        "--probe-rate", type=float, default=3000.0, help="deliveries/s while measuring (3000)"
    )
    g.add_argument("--probe-seconds", type=float, default=10.0, help="seconds per phase (10)")
    g.add_argument("--hold", type=float, default=10.0, help="seconds idle before memory (10)")
    _common_flags(p, target_required=False)
    p = sub.add_parser("compare", help="one scenario against several targets, interleaved")
    p.add_argument("compared", choices=SCENARIOS, help="the scenario to run")
    _scenario_flags(p)
    _common_flags(p)
    return parser


def options_for(scenario: str, args: argparse.Namespace) -> Options:
    values = dict(DEFAULTS[scenario])
    for f in fields(Options):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return Options(**values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.scenario == "serve":
        return serve(args.spec)
    if args.scenario == "capacity":
        return capacity(args, argv)
    comparing = args.scenario == "compare"
    scenario = args.compared if comparing else args.scenario
    if comparing and len(args.target) < 2:
        print("compare needs two or more --target", file=sys.stderr)
        return 2
    if not comparing and len(args.target) > 1:
        print(f"one --target for {scenario}; use `compare {scenario}` for several", file=sys.stderr)
        return 2
    options = options_for(scenario, args)
    return run(scenario, options, args, argv, comparing)


def serve(spec: str) -> int:
    """Start a managed target, print where it is and its process ids, wait for Ctrl-C."""
    from loadtests.targets import TargetError, parse_target

    try:
        target = parse_target(spec)
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not target.managed:
        print("serve starts a named target (switchboard, tutorial, nodjango)", file=sys.stderr)
        return 2
    # Background jobs ignore SIGINT: TERM stops the target just as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    target.start()
    try:
        print(
            f"{target.label}: https://localhost:{target.endpoint.port}  "
            f"--ca {target.endpoint.ca_file}",
            flush=True,
        )
        print(f"process ids: {target.pids()}", flush=True)
        while target.stack is not None and target.stack.is_running():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        target.stop()
    return 0


def capacity(args: argparse.Namespace, argv: list[str]) -> int:
    """Measure one target, project the measurement onto the demand, print and save the plan."""
    from loadtests import capacity as planner
    from loadtests import report
    from loadtests.client import ClientPool
    from loadtests.progress import Progress
    from loadtests.runner import EXIT_USAGE
    from loadtests.scenarios import Session, TargetRun
    from loadtests.targets import TargetError, parse_target

    if args.target is None:  # the native stack `make start` runs
        from config import env

        args.target = [f"https://localhost:{env.get_int('SWITCHBOARD_HTTPS_PORT')}"]
    if len(args.target) != 1:
        print("capacity measures one --target", file=sys.stderr)
        return EXIT_USAGE
    demand = planner.Demand(args.connections, args.deliveries_per_second, args.room_size)
    try:
        planner.check_demand(
            demand, headroom=args.headroom, probe_connections=args.probe_connections
        )
        target = parse_target(
            args.target[0], ca_file=args.ca, origin=args.origin, run_dir=args.run_dir
        )
    except planner.CannotExtrapolate as exc:
        print(f"cannot size this: {exc}", file=sys.stderr)
        return EXIT_CANNOT_EXTRAPOLATE
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(enabled=not args.no_progress)
    options = Options(connections=args.probe_connections, room_size=args.room_size, hold=args.hold)
    try:
        if target.managed:
            progress.note(f"starting {target.label} ...")
            with contextlib.redirect_stdout(sys.stderr):
                target.start()
        with ClientPool(args.clients, secrets.token_hex(3)) as pool:
            session = Session(pool, pool.tag, options, progress)
            measured = planner.measure(
                session,
                TargetRun(target),
                room_size=args.room_size,
                rate=args.probe_rate,
                seconds=args.probe_seconds,
            )
    except planner.CannotExtrapolate as exc:
        print(f"cannot size this: {exc}", file=sys.stderr)
        return EXIT_CANNOT_EXTRAPOLATE
    finally:
        if target.managed:
            with contextlib.redirect_stdout(sys.stderr):
                target.stop(keep=args.keep)
    json_path = args.json or args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-capacity.json"
    try:
        plan = planner.project(
            measured, demand, headroom=args.headroom, cores_per_pod=args.cores_per_pod
        )
    except planner.CannotExtrapolate as exc:
        print(planner.render_measured(measured))
        report.write_json(planner.as_json(measured, None, argv, refused=str(exc)), json_path)
        print(f"JSON report: {json_path}")
        print(f"cannot size this: {exc}", file=sys.stderr)
        return EXIT_CANNOT_EXTRAPOLATE
    print(planner.render(measured, plan))
    report.write_json(planner.as_json(measured, plan, argv), json_path)
    print(f"JSON report: {json_path}")
    return 0


def run(
    scenario: str, options: Options, args: argparse.Namespace, argv: list[str], comparing: bool
) -> int:
    # Heavy imports here, so `--help` answers at once.
    from loadtests import report
    from loadtests.client import ClientPool
    from loadtests.progress import Progress
    from loadtests.runner import DRIVERS, EXIT_USAGE, Outcome, verdict
    from loadtests.scenarios import Session, TargetRun
    from loadtests.targets import TargetError, parse_target

    progress = Progress(enabled=not args.no_progress)
    try:
        targets = [
            parse_target(spec, ca_file=args.ca, origin=args.origin, run_dir=args.run_dir)
            for spec in args.target
        ]
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    unmanaged = [t.label for t in targets if not t.managed]
    if scenario == "resume" and unmanaged:
        # It kills one of the target's worker processes: only a stack this tool started.
        print(
            f"error: resume needs targets the tool starts (e.g. switchboard), not {unmanaged}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        print(f"error: two targets share a label ({labels}); add label=... to one", file=sys.stderr)
        return EXIT_USAGE
    tag = secrets.token_hex(3)
    started: list[Any] = []
    runs = [TargetRun(t) for t in targets]
    outcome = Outcome(scenario, runs)
    client_info: dict[str, Any] = {"processes": args.clients}
    try:
        for target in targets:
            if target.managed:
                progress.note(f"starting {target.label} ({target.description}) ...")
                t0 = time.monotonic()
                started.append(target)
                with contextlib.redirect_stdout(sys.stderr):  # the stack's banner
                    target.start()
                progress.note(
                    f"    {target.label} ready on https://localhost:"
                    f"{target.endpoint.port} in {time.monotonic() - t0:.1f} s"
                )
        with ClientPool(args.clients, tag) as pool:
            session = Session(pool, tag, options, progress)
            DRIVERS[scenario](session, runs)
            statuses = pool.broadcast("status")
            client_info["peak_rss_kib"] = [s["max_rss_kib"] for s in statuses]
            client_info["cpu_s"] = [s["cpu_s"] for s in statuses]
    except KeyboardInterrupt:
        progress.note("interrupted: stopping what was started")
        raise
    finally:
        for target in started:
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    target.stop(keep=args.keep)
            except (SystemExit, Exception) as exc:  # a stop problem must not hide the results
                progress.note(f"stopping {target.label}: {exc}")
    outcome.failures = verdict(
        scenario,
        runs,
        options,
        max_connect_failures=args.max_connect_failures,
        fail_on_loss=args.fail_on_loss,
        expect_cross_process=args.expect_cross_process,
    )
    print(report.render(outcome, options))
    if comparing:
        print(report.ratios(outcome, args.baseline, options))
    print(report.failures_text(outcome.failures))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{'compare-' if comparing else ''}{scenario}"
    json_path = args.json or args.out / f"{name}.json"
    report.write_json(report.as_json(outcome, options, argv, client_info), json_path)
    print(f"JSON report: {json_path}")
    if not args.no_plot:
        png = args.plot or args.out / f"{name}.png"
        if report.plot(outcome, options, png):
            print(f"plot: {png}")
        else:
            print("plot: skipped (pip install -e '.[plot]' for matplotlib)")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
