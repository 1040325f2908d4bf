"""Base consumer shared by chat and notifications.

It adds what every long-lived group member needs:

* **Group renewal, where the layer needs it.** The default layer (``channel_layer``) keeps
  memberships in the worker process for as long as the socket lives. channels-redis
  (``CHANNEL_LAYER=redis``) forgets a membership after ``group_expiry`` seconds (default one
  day) and then silently stops delivering to that socket: with it, members re-add themselves at
  half that period.
* **Unknown or malformed events are logged, not fatal.** Channels raises ``ValueError`` for an
  event type with no handler, which kills the connection; code elsewhere (a view, a signal,
  another release) must not be able to disconnect clients by sending a new event type. Events
  a consumer declares in :attr:`~GroupMemberConsumer.event_schemas` are checked against their
  schema (``realtime.events``) before the handler runs: a malformed one is dropped and logged,
  not handed to a handler whose ``KeyError`` would close every socket of the group.
* **Nothing is left behind.** However a consumer ends -- a disconnect, or an exception -- it
  leaves its groups and the layer forgets its channel; a crashed consumer no longer stays a
  group member whose mailbox fills up to capacity.
* **Errors to the client** as ``{"type": "error", "code": ..., "detail": ...}``.
* **A channel-layer outage is survived, not fatal** (tests/faults/test_redis_restart.py).
  Channels lets an exception from the layer's ``receive`` end the consumer, so a Redis restart
  closed every socket abnormally with a traceback each. Here the receive is retried with backoff
  while the socket stays open; senders get ``unavailable`` errors meanwhile;
  ``channel_layer.membership`` restores the group memberships Redis lost; a connect that cannot
  join its group is refused with ``unavailable`` and close code 1013 (try again later) instead
  of an HTTP 500.
* **A cheaper dispatch loop** (measured by loadtests, see loadtests/README.md): no thread hop to
  close stale database connections before handlers that never touch the database
  (:data:`DB_EVENTS`), no new task per message (:func:`dispatch_serially`), and
  :meth:`~GroupMemberConsumer.send_frame` for frames, past the session middleware's per-send
  bookkeeping. Handlers still run one at a time, in arrival order per source.
* **No task switch per delivery** for events a consumer turns into one frame
  (:attr:`~GroupMemberConsumer.frame_handlers`): while the consumer is idle, the layer hands
  such an event to it in the layer's own callback and the frame is written at once
  (``FanoutChannelLayer.take_directly``, the worker's ``send_text_now``); otherwise (busy,
  a queue, a peer that stopped reading, another layer or server) it goes the usual way.
* **Metrics in one place** (``observability.metrics``): handshakes accepted and refused, open
  sockets, close codes, frames received, error frames, deliveries and their fan-out latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import redis.exceptions
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from channel_layer.membership import keeper
from observability import context as observability_context
from observability import metrics
from realtime import jsonframes
from realtime.events import DROPPED_EVENTS, EventSchema
from wsauth.authority import SocketAuthority

logger = logging.getLogger("switchboard.ws")

#: Close code for "the server cannot serve this now, reconnect later" (RFC 6455 registry).
CLOSE_TRY_AGAIN_LATER = 1013
#: Backoff of a consumer's channel-layer receive while the layer is unreachable.
RECEIVE_RETRY_FIRST_SECONDS = 0.1
RECEIVE_RETRY_MAX_SECONDS = 2.0


#: What a channel-layer call raises when Redis is unreachable (and only that is retried).
LAYER_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


#: Events whose handlers may use the database. Channels' dispatch closes stale database
#: connections before *every* handler, through a thread hop (``sync_to_async``); at thousands of
#: deliveries per second that hop was most of a worker's time (loadtests/README.md). Only these
#: events pay it here; any other handler must reach the ORM through ``database_sync_to_async``,
#: which does the same cleanup itself.
DB_EVENTS = frozenset({"websocket.connect", "websocket.disconnect"})


class _SerialDispatch:
    """The state of one :func:`dispatch_serially` call, in one small object per socket (no
    closures): the task that called it, the first helper that failed, and a lock with
    ``asyncio.Lock``'s semantics -- first come, first served; a waiter cancelled after being
    handed the lock passes it on -- whose waiter list exists only while someone waits (an
    ``asyncio.Lock`` keeps a deque of ~650 bytes for good once two sources met)."""

    __slots__ = ("busy", "dispatch", "failed", "owner", "waiters")

    def __init__(
        self, owner: asyncio.Task[Any], dispatch: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        self.owner = owner
        self.dispatch = dispatch
        self.failed: asyncio.Task[None] | None = None
        self.busy = False
        self.waiters: list[asyncio.Future[None]] | None = None

    async def pump(self, source: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        while True:
            message = await source()
            if self.busy or self.waiters:
                await self._wait_turn()
            self.busy = True
            try:
                await self.dispatch(message)
            finally:
                self._pass_turn()

    async def _wait_turn(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        if self.waiters is None:
            self.waiters = []
        self.waiters.append(waiter)
        try:
            await waiter  # done: the lock was handed over (``busy`` stayed true)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._pass_turn()  # handed over, but cancelled before it could run
            raise
        finally:
            if self.waiters is not None and waiter in self.waiters:
                self.waiters.remove(waiter)
            if not self.waiters:
                self.waiters = None

    def _pass_turn(self) -> None:
        while self.waiters:
            waiter = self.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return
        self.waiters = None
        self.busy = False

    def interrupt(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and self.failed is None:
            self.failed = task
            self.owner.cancel()


async def dispatch_serially(
    sources: list[Callable[[], Awaitable[dict[str, Any]]]],
    dispatch: Callable[[dict[str, Any]], Awaitable[None]],
    state: _SerialDispatch | None = None,
) -> None:
    """Channels' ``await_many_dispatch`` without a new task and an ``asyncio.wait`` per message.

    The first source is pumped in the calling task, each other one in a long-lived task of its
    own; a lock keeps dispatching one message at a time, as Channels does. The first exception
    (``StopConsumer`` included) ends every source and is raised here. ``state`` (made for the
    calling task, with ``dispatch``) lets the caller see whether a message is being dispatched
    (``state.busy``).
    """
    here = asyncio.current_task()
    assert here is not None
    if state is None:
        state = _SerialDispatch(here, dispatch)
    assert state.owner is here, "the state belongs to the task that pumps the first source"
    helpers = [asyncio.ensure_future(state.pump(source)) for source in sources[1:]]
    for task in helpers:
        task.add_done_callback(state.interrupt)
    try:
        await state.pump(sources[0])
    except asyncio.CancelledError:
        if state.failed is not None and here.uncancel() == 0:
            state.failed.result()  # a helper's exception (StopConsumer included) ends it all
        raise
    finally:
        for task in helpers:
            task.remove_done_callback(state.interrupt)
            task.cancel()
        for task in helpers:
            with contextlib.suppress(BaseException):
                await task


async def forget_channel(layer: Any, channel: str) -> int:
    """Let ``layer`` forget ``channel``, which nobody will read again; the number of messages
    still waiting in it, which are dropped.

    A channel layer forgets a consumer's channel when the consumer's receive is cancelled while
    the channel is in no group and holds nothing (``channel_layer.layer``; channels-redis drops
    its receive buffer then, and expires what Redis holds). Waiting messages are read first, at
    most ``capacity`` of them.
    """
    dropped = 0
    for _ in range(getattr(layer, "capacity", 100) + 1):
        receiving = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0)  # one step: a waiting message is returned without suspending
        if not receiving.done():
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiving
            break
        if receiving.exception() is not None:
            break
        dropped += 1
    return dropped


#: The last event :meth:`GroupMemberConsumer._take_directly` found valid, and the schema: the
#: layer offers one room message to every local member as the same object, which no taker may
#: change, so it is checked once per process, not once per member. (Held, so never reused.)
_last_valid: list[Any] = [None, None]


class LayerUnavailable(Exception):
    """The channel layer could not add this socket to its group."""


class GroupMemberConsumer(SocketAuthority, AsyncWebsocketConsumer):
    #: Internal event type -> the fields its handler relies on (``realtime.events``). An event
    #: of a listed type that does not match is dropped (and logged) before any handler runs.
    event_schemas: ClassVar[Mapping[str, EventSchema]] = {}
    #: Internal event type -> the name of a method that returns the one text frame the event's
    #: handler sends for it (``None``: none), without awaiting and without changing the event.
    #: The handler must do nothing else (see :meth:`_take_directly`): a subclass whose handler
    #: for such a type does more must leave the type out.
    frame_handlers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.joined: list[str] = []
        self._renewal: asyncio.Task | None = None
        self._accepted = False
        self._refusing = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """``AsyncConsumer.__call__`` with :func:`dispatch_serially` as its dispatch loop."""
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        if self.channel_layer is None:
            await super().__call__(scope, receive, send)
            return
        self.scope = scope
        self.channel_name = await self.channel_layer.new_channel()
        self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
        self.base_send = send
        # Channels' session middleware wraps ``send`` to save the session on HTTP responses; for
        # a websocket frame it only reads the session twice. Frames skip it (send_frame).
        wrapper = getattr(send, "__self__", None)
        real_send = getattr(wrapper, "real_send", None)
        saves_on = getattr(wrapper, "save_message_types", ("websocket.send",))
        self._frame_send = real_send if real_send and "websocket.send" not in saves_on else send
        self._serial = _SerialDispatch(asyncio.current_task(), self.dispatch)
        self._write_now: Callable[[str], bool] | None = getattr(
            getattr(self._frame_send, "__self__", None), "send_text_now", None
        )
        take = getattr(self.channel_layer, "take_directly", None)
        if not (self.frame_handlers and self._write_now is not None and take is not None):
            take = None
        elif take(self.channel_name, self._take_directly):
            self._endpoint = observability_context.current.get().endpoint
        ended_by_disconnect = False
        try:
            await dispatch_serially([receive, self.channel_receive], self.dispatch, self._serial)
        except StopConsumer:
            ended_by_disconnect = True  # websocket_disconnect left the groups
        finally:
            if take is not None:
                take(self.channel_name, None)
            if not ended_by_disconnect:
                await self._leave_after_failure()

    async def _leave_after_failure(self) -> None:
        """What a disconnect does, for a consumer ended by an exception (or cancelled): leave
        every group, then let the layer forget the channel. Best effort: errors are logged."""
        self.stop_authority()
        if self._accepted:  # the open-sockets gauge counted it: the server ends it with 1011
            metrics.connection_closed(1011, was_open=True)
            self._accepted = False
        keeper.discard(self)
        if self._renewal is not None:
            self._renewal.cancel()
        try:
            for group in self.joined:
                await self.channel_layer.group_discard(group, self.channel_name)
            self.joined.clear()
            dropped = await forget_channel(self.channel_layer, self.channel_name)
        except Exception as exc:  # Redis down: its memberships expire, the process's are gone
            logger.warning("ended consumer %s: cleanup failed (%s)", self.client, exc)
            return
        logger.info(
            "ended consumer %s: left its groups; %d undelivered message(s) dropped",
            self.client,
            dropped,
        )

    def _take_directly(self, event: dict[str, Any]) -> bool:
        """The layer's offer of ``event`` while this consumer waits for it: what dispatching it
        would do, done now, for an event in :attr:`frame_handlers` -- check it, write its frame,
        count the delivery. ``False`` (nothing done; the event is dispatched as usual) while a
        handler runs, for other or malformed events, when the frame cannot be written at once,
        or when building it fails (the usual way then fails the same way, and says so)."""
        if self._serial.busy:
            return False
        kind = event.get("type")
        name = self.frame_handlers.get(kind) if isinstance(kind, str) else None
        if name is None:
            return False
        schema = self.event_schemas.get(kind)
        if schema is not None and (event is not _last_valid[0] or schema is not _last_valid[1]):
            if schema.problem(event) is not None:
                return False
            _last_valid[:] = event, schema  # the next member gets the same object: checked
        try:
            text = getattr(self, name)(event)
        except Exception:
            return False
        if text is not None and not self._write_now(text):
            return False
        accepted_at = event.get(metrics.ACCEPTED_AT)
        if accepted_at is not None and metrics.ENABLED:
            metrics.delivered(accepted_at, self._endpoint)
        return True

    async def send_frame(self, text: str) -> None:
        """Send one text frame: ``self.send(text_data=text)`` without the wrappers' overhead."""
        await self._frame_send({"type": "websocket.send", "text": text})

    @property
    def client(self) -> str:
        host, port = self.scope.get("client") or ("?", 0)
        return f"{host}:{port}"

    # Channels' AsyncConsumer.__call__ assigns the layer's receive for this consumer's channel to
    # ``channel_receive`` and hands it to its dispatch loop; the property hands out the version
    # that outlives a layer outage instead.
    @property
    def channel_receive(self) -> Callable[[], Awaitable[dict[str, Any]]]:
        return self._receive_from_layer

    @channel_receive.setter
    def channel_receive(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._layer_receive = receive

    async def _receive_from_layer(self) -> dict[str, Any]:
        delay = RECEIVE_RETRY_FIRST_SECONDS
        while True:
            try:
                return await self._layer_receive()
            except Exception as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Being torn down (disconnect, worker shutdown). channels-redis can turn the
                    # CancelledError into another error on its way out (a KeyError from its
                    # receive buffer); retrying would swallow the cancellation and keep the
                    # worker's graceful shutdown waiting for GRACEFUL_TIMEOUT.
                    raise asyncio.CancelledError from exc
                if not isinstance(exc, LAYER_CONNECTION_ERRORS):
                    raise
                # Redis unreachable: channel_layer.membership logs the outage.
                logger.debug("channel layer receive failed (%s); retrying", type(exc).__name__)
                keeper.poke()
                jitter = random.uniform(0.5, 1.5)  # noqa: S311 (not cryptographic)
                await asyncio.sleep(RECEIVE_RETRY_FIRST_SECONDS * jitter)
                await keeper.wait_available(delay)
                delay = min(delay * 2, RECEIVE_RETRY_MAX_SECONDS)

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        try:
            await super().websocket_connect(message)
        except LayerUnavailable as exc:
            logger.warning("channel layer unavailable at connect (%s)", exc)
            await self.refuse(
                "unavailable",
                "The server cannot reach its message broker right now; reconnect shortly.",
                CLOSE_TRY_AGAIN_LATER,
            )

    async def join(self, group: str) -> None:
        try:
            await self.channel_layer.group_add(group, self.channel_name)
        except Exception as exc:
            raise LayerUnavailable(type(exc).__name__) from exc
        self.joined.append(group)
        # Only layers that keep memberships in Redis, with an expiry, need them renewed and
        # restored after a Redis restart (channel_layer.layer keeps them in the process and
        # re-subscribes by itself): no renewal task and no keeper entry per socket otherwise.
        if getattr(self.channel_layer, "group_expiry", None):
            keeper.add(self)
            if self._renewal is None:
                self._renewal = asyncio.create_task(self._renew_memberships())

    async def _renew_memberships(self) -> None:
        expiry = settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("group_expiry", 86400)
        while True:
            await asyncio.sleep(expiry / 2)
            for group in self.joined:
                try:
                    await self.channel_layer.group_add(group, self.channel_name)
                except Exception as exc:  # channel_layer.membership restores it when Redis is back
                    logger.warning("could not renew %s (%s)", group, type(exc).__name__)

    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        await super().accept(subprotocol, headers)
        self._accepted = True
        metrics.connection_opened(handshake_accepted=not self._refusing)

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        metrics.frame_received()
        await super().websocket_receive(message)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        self.stop_authority()  # wsauth: no token clock or session check for a closed socket
        metrics.connection_closed(message.get("code", 1000), was_open=self._accepted)
        self._accepted = False
        keeper.discard(self)
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        for group in self.joined:
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception as exc:  # Redis down: the membership expires by itself.
                logger.warning("could not leave %s (%s)", group, type(exc).__name__)
        self.joined.clear()
        await self.disconnect(message.get("code", 1000))
        raise StopConsumer()

    async def dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if not isinstance(kind, str):
            DROPPED_EVENTS.drop(f"<{type(kind).__name__}>", "no string 'type'")
            return
        handler_name = kind.replace(".", "_")
        if not handler_name.startswith("websocket_") and not hasattr(self, handler_name):
            DROPPED_EVENTS.drop(kind, "no handler for this type")
            return
        schema = self.event_schemas.get(kind)
        if schema is not None:
            problem = schema.problem(message)
            if problem is not None:
                DROPPED_EVENTS.drop(kind, problem)
                return
        if kind in DB_EVENTS:
            await super().dispatch(message)  # closes stale DB connections first (a thread hop)
            return
        # Removed whatever METRICS_ENABLED says here: no client frame may carry it.
        accepted_at = message.pop(metrics.ACCEPTED_AT, None)
        await getattr(self, handler_name)(message)
        if accepted_at is not None and metrics.ENABLED:
            metrics.delivered(accepted_at)

    async def send_error(self, code: str, detail: str) -> None:
        metrics.error_frame_sent(code)
        await self.send(
            text_data=jsonframes.dumps({"type": "error", "code": code, "detail": detail})
        )

    async def refuse(self, code: str, detail: str, close_code: int) -> None:
        """Accept only to say why, then close: browsers cannot read a refused handshake."""
        # %r: a path may carry (percent-decoded) newlines that would forge log lines.
        logger.info("refused %s %r: %s", self.client, self.scope.get("path"), code)
        metrics.handshake_refused(code)
        self._refusing = True
        await self.accept()
        await self.send_error(code, detail)
        await self.close(code=close_code)


#: Close code for a websocket path that has no consumer.
CLOSE_NOT_FOUND = 4404


class NotFoundConsumer(GroupMemberConsumer):
    async def connect(self) -> None:
        await self.refuse("not_found", "No websocket endpoint at this path.", CLOSE_NOT_FOUND)
