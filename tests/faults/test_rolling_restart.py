"""Restart the replicas one at a time, gracefully, while messages flow.

``supervisorctl restart appN`` sends gunicorn TERM: its workers stop accepting, close their
websockets with 1012 ("service restart") and exit; supervisord then starts the replica again.
The restarting replica's clients must see 1012 or 1001, never 1006, and reconnect through nginx
to another replica, resuming from the last offset they saw; every client ends with every
message, none twice; at every moment at least one replica is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

from tests.faults.tools import (
    ChatClient,
    eventually,
    locate,
    log_offsets,
    program_of,
    readyz,
    record_figures,
    send_paced,
    start_clients,
    unhandled_errors,
)
from tests.harness import RunningStack

pytestmark = pytest.mark.e2e

CLIENTS = 12
MESSAGES_PER_PHASE = 24
PER_SECOND = 8
GOING_AWAY = {1001, 1012}


async def monitor_readiness(
    stack: RunningStack, samples: list[tuple[float, int]], stop: asyncio.Event
) -> None:
    """Counts ready replicas every 100 ms (each replica's /readyz, asked directly)."""
    async with httpx.AsyncClient(timeout=3) as client:
        while not stop.is_set():

            async def status(port: int) -> bool:
                try:
                    return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            ready = await asyncio.gather(*(status(p) for p in stack.stack.app_ports))
            samples.append((time.monotonic(), sum(ready)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


async def test_rolling_restart_one_replica_at_a_time(fault_stack: RunningStack) -> None:
    stack = fault_stack
    offsets = log_offsets(stack)
    programs = [f"app{i}" for i in range(1, stack.stack.replicas + 1)]
    await eventually(lambda: readyz(stack) == [200] * len(programs), timeout=15, interval=0.2)
    clients = await start_clients(stack, "rolling", CLIENTS)
    samples: list[tuple[float, int]] = []
    stop_monitor = asyncio.Event()
    monitor = asyncio.create_task(monitor_readiness(stack, samples, stop_monitor))
    phases = []
    try:
        for index, program in enumerate(programs):
            if index:  # new arrivals: least_conn puts them on the replica restarted last
                arrivals = await start_clients(stack, "rolling", CLIENTS // 2)
                for n, client in enumerate(arrivals):
                    client.name = f"p{index}-{n}"
                clients += arrivals
            where = await locate(clients)
            leaving = [c for c in clients if program_of(where[c.name]) == program]
            staying = [c for c in clients if program_of(where[c.name]) != program]
            assert leaving and staying, f"{program}: all clients on one side: {where}"
            closes_before = {c.name: len(c.closes) for c in clients}
            reopened_before = {c.name: len(c.reopened) for c in clients}
            # The sender talks to a replica that stays up, directly (not through nginx).
            other_port = stack.stack.app_ports[(index + 1) % len(programs)]
            sender = ChatClient(
                stack,
                "rolling",
                url=f"ws://127.0.0.1:{other_port}",
                reconnect=False,
                name=f"sender-{program}",
            )
            await sender.start()
            flow = asyncio.create_task(
                send_paced(sender, f"roll-{program}", MESSAGES_PER_PHASE, PER_SECOND)
            )
            await asyncio.sleep(1)
            started = time.monotonic()
            restart = await asyncio.to_thread(stack.stack.supervisorctl, "restart", program)
            assert restart.returncode == 0, restart.stdout + restart.stderr
            port = stack.stack.app_ports[index]
            await eventually(
                lambda port=port: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200,
                timeout=60,
                interval=0.1,
            )
            back_after = time.monotonic() - started
            sent = await flow
            await asyncio.gather(*(c.wait_for_ref(sent[-1]) for c in staying))
            try:
                await eventually(
                    lambda leaving=leaving, before=reopened_before: all(
                        len(c.reopened) > before[c.name] for c in leaving
                    ),
                    timeout=20,
                )
            except TimeoutError:
                late = [(c.name, c.closes, c.reopened) for c in leaving]
                raise AssertionError(f"{program}: clients did not come back: {late}") from None
            await sender.stop()

            for client in staying:
                assert len(client.closes) == closes_before[client.name]
            # Every client, the restarted replica's included (they resumed from the last offset
            # they saw), has every message, none twice.
            await asyncio.gather(*(c.wait_for_ref(sent[-1]) for c in leaving))
            for client in clients:
                missing = set(sent) - client.refs
                assert not missing, f"{client.name} lost {sorted(missing)} ({program} restarting)"
                assert client.duplicates == 0, f"{client.name} got a message twice"
            resumed = [r for c in leaving for r in c.recoveries[-1:]]
            assert all(r["recovered"] for r in resumed), resumed
            codes = [c.closes[-1][1] for c in leaving]
            assert set(codes) <= GOING_AWAY, f"{program}'s clients were closed with {codes}"
            reconnect = [c.reopened[-1] - c.closes[-1][0] for c in leaving]
            after = await locate(clients)
            moved_elsewhere = sum(program_of(after[c.name]) != program for c in leaving)
            phases.append(
                {
                    "replica": program,
                    "clients_on_it": len(leaving),
                    "clients_elsewhere": len(staying),
                    "close_codes": sorted(set(codes)),
                    "reconnected_to_another_replica": moved_elsewhere,
                    "client_reconnect_s_max": round(max(reconnect), 3),
                    "replica_ready_again_after_s": round(back_after, 2),
                    "messages_sent": len(sent),
                    "messages_lost_elsewhere": 0,
                    "messages_accepted": len(sent),
                    "messages_lost_by_restarted_replicas_clients": 0,
                    "resumes_recovered": sum(r["recovered"] for r in resumed),
                    "resumes_reported_lost": sum(not r["recovered"] for r in resumed),
                }
            )
    finally:
        stop_monitor.set()
        await monitor
        await asyncio.gather(*(c.stop() for c in clients))

    assert samples and min(ready for _, ready in samples) >= 1, "no replica was ready"
    assert unhandled_errors(stack, offsets) == []
    record_figures(
        "rolling_restart",
        {
            "replicas": len(programs),
            "phases": phases,
            "readiness_samples": len(samples),
            "min_ready_replicas": min(ready for _, ready in samples),
        },
    )
