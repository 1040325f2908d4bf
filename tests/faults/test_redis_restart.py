"""redis-server goes away for a few seconds during traffic, then comes back empty.

While it is down: every replica's /readyz says 503, senders get ``unavailable`` errors, sockets
stay open, no worker restarts. Within 10 s of Redis answering again /readyz is 200 and delivery
to the sockets that were open all along resumes by itself. With the default layer
(``CHANNEL_LAYER=fanout``) each worker process holds its groups itself and subscribes them
again on the new connection, refusing sends until every process has had time to
(``channel_layer/layer.py``); the ``redis`` layer's memberships, which Redis forgot (it keeps
nothing on disk), are restored by ``channel_layer/membership.py``
(tests/faults/test_redis_layer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis

from tests.faults.tools import (
    ChatClient,
    eventually,
    locate,
    log_offsets,
    readyz,
    record_figures,
    redis_client,
    start_clients,
    unhandled_errors,
    wait_until,
)
from tests.harness import RunningStack

pytestmark = pytest.mark.e2e

CLIENTS = 8
PER_SECOND = 5
DOWN_SECONDS = 3.0
RECOVERY_LIMIT = 10.0


def redis_answers(stack: RunningStack) -> bool:
    try:
        return bool(redis_client(stack).ping())
    except redis.RedisError:
        return False


async def test_redis_restart_during_traffic(fault_stack: RunningStack) -> None:
    stack = fault_stack
    offsets = log_offsets(stack)
    programs = [f"app{i}" for i in range(1, stack.stack.replicas + 1)]
    workers = {name: stack.worker_pids(name) for name in programs}
    masters = {name: stack.program_pid(name) for name in programs}
    clients = await start_clients(stack, "redis-restart", CLIENTS)
    sender = ChatClient(stack, "redis-restart", name="sender")
    await sender.start()
    sent: list[tuple[float, str]] = []
    stop_sending = asyncio.Event()

    async def traffic() -> None:
        n = 0
        while not stop_sending.is_set():
            ref = f"rr-{n}"
            await sender.send(f"message {n}", ref)
            sent.append((time.monotonic(), ref))
            n += 1
            await asyncio.sleep(1 / PER_SECOND)

    try:
        where = await locate([*clients, sender], probe=sender)
        assert len(set(where.values())) >= 3
        flow = asyncio.create_task(traffic())
        await asyncio.sleep(1.5)

        # -- down ------------------------------------------------------------------------------
        stop_requested = time.monotonic()
        stopping = await asyncio.to_thread(stack.stack.supervisorctl, "stop", "redis")
        assert stopping.returncode == 0, stopping.stdout
        stopped_at = time.monotonic()
        statuses_down = []
        while time.monotonic() - stopped_at < DOWN_SECONDS:
            statuses_down.append(await asyncio.to_thread(readyz, stack))
            await asyncio.sleep(0.3)
        sent_during = [ref for at, ref in sent if at > stopped_at]

        # -- up --------------------------------------------------------------------------------
        starting = asyncio.create_task(
            asyncio.to_thread(stack.stack.supervisorctl, "start", "redis")
        )
        await eventually(lambda: redis_answers(stack), timeout=30, interval=0.02)
        up_at = time.monotonic()
        ready_after = await asyncio.to_thread(
            wait_until, lambda: readyz(stack) == [200] * len(programs), RECOVERY_LIMIT
        )
        await starting
        # Delivery resumed: the first message sent after Redis came back that every client got.
        await asyncio.sleep(3)
        stop_sending.set()
        await flow
        after_up = [(at, ref) for at, ref in sent if at > up_at]
        last = after_up[-1][1]
        await asyncio.gather(*(c.wait_for_ref(last, timeout=RECOVERY_LIMIT) for c in clients))
        first_everywhere = next(
            (at, ref) for at, ref in after_up if all(ref in c.refs for c in clients)
        )
        received_at = max(c.arrived_at[first_everywhere[1]] for c in clients)
        delivery_after = received_at - up_at

        # -- checks ----------------------------------------------------------------------------
        assert all(s == [503] * len(programs) for s in statuses_down), statuses_down
        assert statuses_down
        # Nobody was disconnected, no worker restarted: the outage was ridden out in place.
        assert all(not c.closes for c in [*clients, sender])
        assert {name: stack.worker_pids(name) for name in programs} == workers
        assert {name: stack.program_pid(name) for name in programs} == masters
        # Each message reached every client or none. The ones that reached none were refused to
        # the sender (`unavailable`), but for those sent in the instant between Redis answering
        # and the memberships being restored: counted, and bounded.
        refs = [ref for _, ref in sent]
        # One more message once traffic stopped: a client whose last messages never reached it
        # sees the gap before it (its offset skips ahead) and resumes.
        await sender.send("final", "rr-final")
        await asyncio.gather(*(c.wait_for_ref("rr-final", timeout=RECOVERY_LIMIT) for c in clients))
        everywhere = {r for r in refs if all(r in c.refs for c in clients)}
        unavailable = sender.errors("unavailable")
        # Every message sent was refused (`unavailable`) or accepted -- given a position in the
        # room's history -- and nothing is in between: accepted + refused = sent, exactly.
        positions = {
            f["ref"]: (f["epoch"], f["offset"])
            for c in [*clients, sender]
            for f in c.messages
            if f.get("ref", "").startswith("rr-") and f["ref"] != "rr-final"
        }
        accepted = set(positions)
        assert len(accepted) + len(unavailable) == len(refs), (
            len(accepted),
            len(unavailable),
            len(refs),
        )
        epochs: list[str] = []  # in the order the sender's messages met them
        for ref in refs:
            if ref in positions and positions[ref][0] not in epochs:
                epochs.append(positions[ref][0])
        assert len(epochs) == 2, epochs  # Redis came back empty: the history's epoch changed
        new_epoch = epochs[-1]
        accepted_new = {r for r, (epoch, _) in positions.items() if epoch == new_epoch}
        # Every message accepted after the restart reached every client (live, or by the resume
        # its gap detection started), none twice. Messages of the old epoch that a client missed
        # went with Redis's data: the epoch change reports them (counted).
        reported_lost = 0
        for client in clients:
            assert accepted_new <= client.refs, sorted(accepted_new - client.refs)
            assert client.duplicates == 0
            reported_lost += len((accepted - accepted_new) - client.refs)
        silently_lost = 0
        assert {ref for at, ref in sent if at < stop_requested - 0.5} <= everywhere
        assert {ref for at, ref in after_up if at > up_at + ready_after} <= everywhere
        assert len(unavailable) >= len(sent_during) // 2, (len(unavailable), len(sent_during))
        assert ready_after < RECOVERY_LIMIT
        assert delivery_after < RECOVERY_LIMIT
        assert unhandled_errors(stack, offsets) == []
        restored = sum(
            stack.log(name)[offsets[name] :].count("memberships of") for name in programs
        )
        assert restored == sum(len(pids) for pids in workers.values())

        record_figures(
            "redis_restart",
            {
                "clients": CLIENTS,
                "redis_down_s": round(up_at - stopped_at, 2),
                "readyz_503_samples_while_down": len(statuses_down),
                "messages_sent_while_down": len(sent_during),
                "unavailable_errors_to_sender": len(unavailable),
                "messages_sent_total": len(refs),
                "messages_accepted": len(accepted),
                "messages_accepted_after_restart": len(accepted_new),
                "messages_delivered_to_all": len(everywhere),
                "messages_silently_lost": silently_lost,
                "old_epoch_messages_reported_lost": reported_lost,
                "gap_resumes": sum(c.gap_resumes for c in clients),
                "readyz_ready_after_redis_up_s": round(ready_after, 3),
                "delivery_resumed_after_redis_up_s": round(delivery_after, 3),
                "sockets_closed": 0,
                "workers_restarted": 0,
            },
        )
    finally:
        stop_sending.set()
        await asyncio.gather(*(c.stop() for c in [*clients, sender]))
        with contextlib.suppress(Exception):
            stack.stack.supervisorctl("start", "redis")
