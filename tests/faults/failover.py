"""A Redis failover during chat traffic through nginx, measured (Cluster and Sentinel tests).

Clients sit in one room, a sender sends numbered messages at a steady pace, ``kill`` takes the
master down (SIGKILL) and ``wait_promotion`` returns once a replica took over. Measured: when
delivery resumed (the first message sent after the kill that reached every client), how many
sends were refused (``unavailable``), how many messages the layers counted and logged as lost,
and how many were lost silently -- which must be none.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from tests.faults.tools import (
    ChatClient,
    locate,
    log_offsets,
    lost_logged,
    start_clients,
    unhandled_errors,
)
from tests.harness import RunningStack

#: The issue's bound for delivery to resume.
RESUME_LIMIT = 10.0
PER_SECOND = 8  # below the per-connection rate limit
CLIENTS = 6


async def failover_during_traffic(
    stack: RunningStack,
    room: str,
    kill: Callable[[], None],
    wait_promotion: Callable[[], None],
) -> dict[str, Any]:
    """Run the scenario; returns the figures, with monotonic ``killed_at``/``promoted_at``/
    ``resumed_at`` and the accounting the caller asserts on."""
    offsets = log_offsets(stack)
    clients = await start_clients(stack, room, CLIENTS)
    sender = ChatClient(stack, room, name="sender")
    await sender.start()
    sent: list[tuple[float, str]] = []
    stop_sending = asyncio.Event()

    async def traffic() -> None:
        for n in range(60 * PER_SECOND):
            if stop_sending.is_set():
                return
            ref = f"fo-{n}"
            await sender.send(f"message {n}", ref)
            sent.append((time.monotonic(), ref))
            await asyncio.sleep(1 / PER_SECOND)

    flow = asyncio.create_task(traffic())
    try:
        where = await locate([*clients, sender], probe=sender)
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        kill()
        await asyncio.to_thread(wait_promotion)
        promoted_at = time.monotonic()
        resumed_at = None
        while time.monotonic() - killed_at < RESUME_LIMIT + 20 and resumed_at is None:
            await asyncio.sleep(0.2)
            for at, ref in sent:
                if at > killed_at and all(ref in c.refs for c in clients):
                    resumed_at = max(c.arrived_at[ref] for c in clients)
                    break
        await asyncio.sleep(2.0)
        stop_sending.set()
        await flow
        last = sent[-1][1]
        await asyncio.gather(*(c.wait_for_ref(last, timeout=RESUME_LIMIT) for c in clients))
        await asyncio.sleep(0.5)
        refs = [ref for _, ref in sent]
        everywhere = {r for r in refs if all(r in c.refs for c in clients)}
        unavailable = len(sender.errors("unavailable"))
        lost = lost_logged(stack, offsets)
        not_everywhere = len(refs) - len(everywhere)
        return {
            "killed_at": killed_at,
            "promoted_at": promoted_at,
            "resumed_at": resumed_at,
            "closes": sum(len(c.closes) for c in [*clients, sender]),
            "unhandled_errors": unhandled_errors(stack, offsets),
            "figures": {
                "clients": CLIENTS,
                "processes": len(set(where.values())),
                "replica_promoted_after_kill_s": round(promoted_at - killed_at, 3),
                "delivery_resumed_after_kill_s": (
                    None if resumed_at is None else round(resumed_at - killed_at, 3)
                ),
                "delivery_resumed_after_promotion_s": (
                    None if resumed_at is None else round(resumed_at - promoted_at, 3)
                ),
                "messages_sent": len(refs),
                "messages_delivered_to_all": len(everywhere),
                "unavailable_errors_to_sender": unavailable,
                "messages_lost_counted_and_logged": lost,
                # Not everywhere, neither refused nor counted: must be 0.
                "messages_silently_lost": max(0, not_everywhere - unavailable - lost),
                "sockets_closed": sum(len(c.closes) for c in [*clients, sender]),
                # History: the promoted replica starts a new epoch (it may lack the last
                # appends); clients resume across live gaps and never show a message twice.
                "history_epochs_seen": len(
                    {f["epoch"] for c in clients for f in c.messages if "epoch" in f}
                ),
                "gap_resumes": sum(c.gap_resumes for c in clients),
                "duplicates": sum(c.duplicates for c in clients),
            },
        }
    finally:
        stop_sending.set()
        with contextlib.suppress(Exception):
            await flow
        await asyncio.gather(*(c.stop() for c in [*clients, sender]))
