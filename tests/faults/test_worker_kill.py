"""SIGKILL one uvicorn worker in the middle of a fan-out.

Gunicorn replaces it; clients on every other worker get every message; the killed worker's
clients see their connection drop, reconnect as the chat page does and resume from the last
offset they saw: they too end with every message, none twice. The test measures how
long gunicorn takes to have a new worker serving and how long the clients take to be back.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.faults.tools import (
    eventually,
    locate,
    log_offsets,
    pid_of,
    program_of,
    record_figures,
    send_paced,
    start_clients,
    unhandled_errors,
)
from tests.harness import RunningStack

pytestmark = pytest.mark.e2e

CLIENTS = 16
MESSAGES = 48
PER_SECOND = 8  # below the per-connection limit (10/s)
KILL_AFTER = 2.0


async def wait_for_new_worker(
    stack: RunningStack, program: str, before: set[int], log_offset: int, timeout: float = 60
) -> tuple[int, float, float]:
    """(new pid, seconds until forked, seconds until it logged that it serves)."""
    started = time.monotonic()
    forked_after = None
    master = stack.program_pid(program)
    children = Path(f"/proc/{master}/task/{master}/children")
    while time.monotonic() - started < timeout:
        new = {int(pid) for pid in children.read_text().split()} - before  # noqa: ASYNC240 (procfs)
        if new:
            pid = new.pop()
            forked_after = forked_after or time.monotonic() - started
            booted = rf"Started server process \[{pid}\]"
            if re.search(booted, stack.log(program)[log_offset:]):
                return pid, forked_after, time.monotonic() - started
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{program} has no new serving worker after {timeout} s")


async def test_killed_worker_is_replaced_and_its_clients_reconnect(
    fault_stack: RunningStack,
) -> None:
    stack = fault_stack
    offsets = log_offsets(stack)
    clients = await start_clients(stack, "kill-fanout", CLIENTS)
    try:
        where = await locate(clients)
        processes = sorted(set(where.values()))
        assert len(processes) >= 3, f"clients sit on only {processes}"
        # The victim: the worker holding the most clients; the sender sits elsewhere.
        victim = max(processes, key=list(where.values()).count)
        victims = [c for c in clients if where[c.name] == victim]
        survivors = [c for c in clients if where[c.name] != victim]
        assert victims and len(survivors) >= 2
        sender = survivors[0]
        program = program_of(victim)
        workers_before = set(stack.worker_pids(program))
        workers_at_kill = {name: stack.worker_pids(name) for name in ("app1", "app2")}
        masters = {name: stack.program_pid(name) for name in ("app1", "app2")}

        fanout = asyncio.create_task(send_paced(sender, "kill", MESSAGES, PER_SECOND))
        await asyncio.sleep(KILL_AFTER)
        killed_at = time.monotonic()
        os.kill(pid_of(victim), signal.SIGKILL)
        new_pid, forked_after, respawn = await wait_for_new_worker(
            stack, program, workers_before, offsets[program]
        )
        sent = await fanout
        await asyncio.gather(*(c.wait_for_ref(sent[-1]) for c in survivors))

        # Clients on every other worker lost nothing.
        for client in survivors:
            missing = set(sent) - client.refs
            assert not missing, f"{client.name} on {where[client.name]} lost {sorted(missing)}"

        # The killed worker's clients saw the drop and came back, elsewhere or on the new worker.
        await eventually(lambda: all(c.reopened for c in victims), timeout=20)
        reconnect = []
        for client in victims:
            assert client.closes, f"{client.name} never noticed its worker died"
            assert client.reopened, f"{client.name} did not reconnect"
            reconnect.append(client.reopened[0] - client.closes[0][0])
        after = await locate(clients, probe=sender)
        for client in victims:  # ... and receive again, from a live worker
            assert after[client.name] != victim
        # ... and, by resuming from the last offset they saw, got every message sent while
        # they were away: every client has every message, none twice.
        for client in clients:
            missing = set(sent) - client.refs
            assert not missing, f"{client.name} lost {sorted(missing)}"
            assert client.duplicates == 0, f"{client.name} got {client.duplicates} twice"
        resumed = [r for c in victims for r in c.recoveries]
        assert resumed and all(r["recovered"] for r in resumed), resumed

        # Gunicorn replaced exactly the killed worker; nothing else died.
        now = {name: stack.worker_pids(name) for name in ("app1", "app2")}
        assert set(now[program]) == (workers_before - {pid_of(victim)}) | {new_pid}
        for name, pids in workers_at_kill.items():
            if name != program:
                assert now[name] == pids
        assert {name: stack.program_pid(name) for name in masters} == masters
        assert unhandled_errors(stack, offsets) == []

        assert respawn < 30
        assert max(reconnect) < 10
        record_figures(
            "worker_kill",
            {
                "clients": CLIENTS,
                "victim_clients": len(victims),
                "survivor_clients": len(survivors),
                "messages_sent": len(sent),
                "messages_lost_by_survivors": 0,
                "messages_accepted": len(sent),
                "messages_delivered_to_every_client": len(sent),
                "victim_resumes_recovered": sum(r["recovered"] for r in resumed),
                "victim_resumes_reported_lost": sum(not r["recovered"] for r in resumed),
                "duplicates": 0,
                "victim_close_codes": sorted({c.closes[0][1] for c in victims}),
                "worker_forked_after_s": round(forked_after, 3),
                "worker_respawn_s": round(respawn, 3),
                "client_reconnect_s_max": round(max(reconnect), 3),
                "client_reconnect_s_mean": round(sum(reconnect) / len(reconnect), 3),
                "killed_at_s_into_fanout": KILL_AFTER,
                "killed_to_test_end_s": round(time.monotonic() - killed_at, 3),
            },
        )
    finally:
        await asyncio.gather(*(c.stop() for c in clients))
