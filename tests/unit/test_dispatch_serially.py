"""A consumer's receive loops (``realtime.consumers.dispatch_serially``): one message dispatched
at a time, in arrival order per source, and the first failure ends them all."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from realtime.consumers import _SerialDispatch, dispatch_serially


class Source:
    """Messages handed out as a test releases them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __call__(self) -> dict[str, Any]:
        message = await self.queue.get()
        if message.get("fail"):
            raise RuntimeError(f"{self.name} failed")
        return message


async def test_one_dispatch_at_a_time_in_order_per_source() -> None:
    websocket, layer = Source("websocket"), Source("layer")
    seen: list[tuple[str, int]] = []
    running = 0
    most = 0

    async def dispatch(message: dict[str, Any]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001 * (message["n"] % 3))  # handlers that suspend
        seen.append((message["source"], message["n"]))
        running -= 1
        if len(seen) == 40:
            raise EOFError  # the end (Channels' StopConsumer plays this part)

    for n in range(20):
        websocket.queue.put_nowait({"source": "websocket", "n": n})
        layer.queue.put_nowait({"source": "layer", "n": n})
    with pytest.raises(EOFError):
        await asyncio.wait_for(dispatch_serially([websocket, layer], dispatch), 10)
    assert most == 1
    for name in ("websocket", "layer"):
        assert [n for source, n in seen if source == name] == list(range(20))


async def test_a_failing_helper_source_ends_the_loop_with_its_error() -> None:
    websocket, layer = Source("websocket"), Source("layer")

    async def dispatch(message: dict[str, Any]) -> None:
        pass

    loop = asyncio.ensure_future(dispatch_serially([websocket, layer], dispatch))
    layer.queue.put_nowait({"n": 1})
    layer.queue.put_nowait({"fail": True})
    with pytest.raises(RuntimeError, match="layer failed"):
        await asyncio.wait_for(loop, 10)


async def test_a_waiter_cancelled_after_its_turn_came_passes_the_turn_on() -> None:
    state = _SerialDispatch(asyncio.current_task(), dispatch=None)  # type: ignore[arg-type]
    state.busy = True  # someone is dispatching
    first = asyncio.ensure_future(state._wait_turn())
    second = asyncio.ensure_future(state._wait_turn())
    await asyncio.sleep(0)
    state._pass_turn()  # the turn goes to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 5)  # so `second` has it
    assert state.busy
    state._pass_turn()
    assert not state.busy
    assert state.waiters is None  # no waiter list left behind
