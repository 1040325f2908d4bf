"""The load generator: several client processes, each holding many websockets.

One Python process cannot drive a stack that uses the same two cores, so the work is spread
over :class:`ClientPool` worker processes (``multiprocessing``, spawn), each running a uvloop
event loop with `picows` websockets (a Cython client: in a side-by-side run it used about 20 %
less CPU per received frame than the ``websockets`` and aiohttp clients). The parent drives
them through a pipe with a handful of commands -- connect, send a phase, collect a phase,
report placement, close -- and merges what they return (:mod:`loadtests.accounting`).

Every message carries its own accounting in its text, so any server that echoes ``message``
(Switchboard, the seeds' tutorial consumer, the no-Django bound) can be measured:
``<tag><phase>.<sender>.<seq>.<send time, CLOCK_MONOTONIC ns>.<padding>``. CLOCK_MONOTONIC is
one clock for every process of the machine, so a receiver computes the latency from the
sender's send to its own receipt on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import resource
import socket
import ssl
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from loadtests.accounting import Receipts

#: Concurrent handshakes per client process.
CONNECT_CONCURRENCY = 64
#: A send loop yields to the event loop after this many sends, so receipts keep flowing.
SEND_BATCH = 64
#: Distinct frames and message texts whose parse :meth:`Worker.on_text` keeps: every member a
#: server process delivers a message to receives the same bytes, so a room of 1,000 spread over
#: 6 processes is 6 JSON parses per client process, not 500. Frames are only read, never changed.
PARSED_KEPT = 4096
#: Resume mode: attempts to reopen a connection the server dropped, and the longest pause
#: between two (full jitter, doubling from 0.1 s), so a reconnect storm stays bounded.
RESUME_ATTEMPTS = 12
RESUME_MAX_DELAY_S = 2.0


@dataclass(frozen=True)
class Endpoint:
    """Where a target's websockets go: ``wss://<server_name>:<port>``, reached at ``address``."""

    server_name: str  # for the URL, the Host header and TLS verification
    address: str  # resolved loopback IP the sockets connect to
    port: int
    ca_file: str
    origin: str

    def url(self, path: str) -> str:
        host = f"[{self.server_name}]" if ":" in self.server_name else self.server_name
        return f"wss://{host}:{self.port}{path}"


@dataclass(frozen=True)
class ConnSpec:
    conn_id: int
    endpoint: Endpoint
    path: str
    room: int
    source_ip: str | None = None


@dataclass
class ConnectOutcome:
    conn_id: int
    ok: bool
    ms: float
    error: str | None = None


@dataclass
class SendOutcome:
    sent: dict[int, int]
    failed: int
    lag_ms: array  # how late each send was against its schedule
    cpu_s: float
    #: sender -> sequence numbers not sent (its socket was closed at the time)
    skipped: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class ResumeLog:
    """Resume mode: what each connection saw, for :func:`loadtests.accounting.account_resume`.

    ``deliveries``: connection -> ``(phase, sender, seq, epoch, offset, replayed)`` per chat
    message received; ``resumes``: one dict per reconnect (``since``, ``recovered``,
    ``replayed``, ...); ``reported_lost`` and ``gaps``: connection -> ``(epoch, first, last)``
    offset ranges the server reported lost (``recovered: false``) or the client saw skipped.
    """

    deliveries: dict[int, list[tuple]] = field(default_factory=dict)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    reported_lost: dict[int, list[tuple]] = field(default_factory=dict)
    gaps: dict[int, list[tuple]] = field(default_factory=dict)
    not_resumed: list[int] = field(default_factory=list)


@dataclass
class CollectOutcome:
    receipts: Receipts
    cpu_s: float
    late: int  # frames of an earlier phase that arrived after it was collected
    closed_by_server: dict[int, int] = field(default_factory=dict)  # connection -> close code
    errors: dict[tuple[int, str], int] = field(default_factory=dict)  # (connection, code) -> n


def message_text(tag: str, phase: int, sender: int, seq: int, sent_ns: int, pad: str) -> str:
    """The ``message`` a load-test client sends (see the module docstring)."""
    return f"{tag}{phase}.{sender}.{seq}.{sent_ns}.{pad}"


def parse_message(tag: str, text: str) -> tuple[int, int, int, int] | None:
    """``(phase, sender, seq, sent_ns)`` of a load-test message, else ``None``."""
    if not text.startswith(tag):
        return None
    try:
        phase, sender, seq, sent_ns, _ = text[len(tag) :].split(".", 4)
        return int(phase), int(sender), int(seq), int(sent_ns)
    except ValueError:
        return None


# -- the worker process ----------------------------------------------------------------------


class _Conn:
    __slots__ = (
        "close_code",
        "closing",
        "conn_id",
        "epoch",
        "is_open",
        "offset",
        "process",
        "replaying",
        "resume",
        "room",
        "spec",
        "transport",
    )

    def __init__(self, conn_id: int, room: int, spec: ConnSpec | None = None) -> None:
        self.conn_id = conn_id
        self.room = room
        self.spec = spec
        self.transport: Any = None
        self.is_open = False
        self.process: str | None = None
        self.close_code: int | None = None
        #: the room position of the last chat message seen (frames with offsets)
        self.epoch: str | None = None
        self.offset = 0
        self.closing = False  # closed by this tool: no resume
        self.resume: dict[str, Any] | None = None  # the reconnect under way (resume mode)
        self.replaying = False  # between a resume's handshake and its recovery frame


class _Phase:
    __slots__ = ("frames", "last_frame", "phase_id", "receipts", "t0_ns")

    def __init__(self, phase_id: int, t0_ns: int) -> None:
        self.phase_id = phase_id
        self.t0_ns = t0_ns
        self.receipts = Receipts()
        self.frames = 0
        self.last_frame = time.monotonic()


class Worker:
    """One client process: its connections, the phase being recorded, the command loop."""

    def __init__(self, index: int, pipe: Connection, tag: str) -> None:
        self.index = index
        self.pipe = pipe
        self.tag = tag
        self.conns: dict[int, _Conn] = {}
        self.phase: _Phase | None = None
        self.late = 0
        self.foreign = 0
        #: (connection, error code) -> count, and connection -> close code: the parent charges
        #: them to the target that connection belongs to.
        self.errors: Counter = Counter()
        self.closed_by_server: dict[int, int] = {}
        #: offset bookkeeping since the last collect: frames with an offset, gaps, new epochs
        self.offsets: Counter = Counter()
        #: resume mode (``track``): reconnect dropped sockets with ?since=&epoch=, log everything
        self.resume_log: ResumeLog | None = None
        self.resuming: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._parsed: dict[str, tuple[int, int, int, int] | None] = {}
        self._frames: dict[str | bytes, Any] = {}
        from orjson import loads
        from picows import WSMsgType

        self._loads = loads
        self._text = WSMsgType.TEXT

    # -- frames (the hot path) -----------------------------------------------------------------
    def on_text(self, conn: _Conn, text: str | bytes) -> None:
        """One text frame (its UTF-8 payload, or the text): the client's cost per delivery, so
        the parse of a frame and of a message's own text are kept (:data:`PARSED_KEPT`)."""
        now = time.monotonic_ns()
        frames = self._frames
        frame = frames.get(text)
        try:
            if frame is None:
                frame = self._loads(text)
                if len(frames) >= PARSED_KEPT:
                    frames.clear()
                frames[text] = frame
            get = frame.get
            message = get("message")
        except (ValueError, AttributeError):
            self.foreign += 1
            return
        phase = self.phase
        kind = get("type")
        if kind == "recovery":
            self.on_recovery(conn, frame)
            return
        offset = get("offset")
        if offset is not None and kind == "chat.message":
            self.track_offset(conn, get("epoch"), offset)
        if type(message) is str:
            parsed_texts = self._parsed
            parsed = parsed_texts.get(message, False)
            if parsed is False:
                if len(parsed_texts) >= PARSED_KEPT:
                    parsed_texts.clear()
                parsed = parsed_texts[message] = parse_message(self.tag, message)
        else:
            parsed = None
        if parsed is None:
            if kind == "error":
                self.errors[(conn.conn_id, str(frame.get("code")))] += 1
            elif phase is not None:
                phase.receipts.foreign += 1
            else:
                self.foreign += 1
            return
        phase_id, sender, seq, sent_ns = parsed
        log = self.resume_log
        if log is not None:
            log.deliveries.setdefault(conn.conn_id, []).append(
                (phase_id, sender, seq, frame.get("epoch"), offset, conn.replaying)
            )
            if conn.replaying and conn.resume is not None:
                conn.resume["replayed"] += 1
        delivered_by = get("delivered_by")
        if delivered_by is not None:
            if conn.process is None:
                conn.process = delivered_by
            elif conn.process != delivered_by:
                conn.process = delivered_by
                if phase is not None:
                    phase.receipts.moved += 1
        if phase is None or phase_id != phase.phase_id:
            self.late += 1
            return
        phase.frames += 1
        phase.last_frame = now / 1e9  # time.monotonic(): the same clock
        phase.receipts.record(
            conn.conn_id,
            sender,
            seq,
            (now - sent_ns) / 1e6,
            (now - phase.t0_ns) / 1e9,
            get("sent_by"),
            delivered_by,
        )

    def track_offset(self, conn: _Conn, epoch: str | None, offset: int) -> None:
        """A chat message at ``offset`` of ``epoch`` in ``conn``'s room: one that skips ahead of
        the last offset this connection saw in the same epoch is a gap (messages it will never
        get live); a new epoch means the room's history was lost, and is counted as such."""
        counts = self.offsets
        counts["frames"] += 1
        if epoch != conn.epoch:
            if conn.epoch is not None:
                counts["new_epochs"] += 1
            conn.epoch, conn.offset = epoch, offset
            return
        if offset > conn.offset + 1:
            counts["gaps"] += 1
            counts["skipped"] += offset - conn.offset - 1
            if self.resume_log is not None:
                self.resume_log.gaps.setdefault(conn.conn_id, []).append(
                    (epoch, conn.offset + 1, offset - 1)
                )
        if offset > conn.offset:
            conn.offset = offset

    def on_recovery(self, conn: _Conn, frame: dict[str, Any]) -> None:
        """The end of a replay: with ``recovered: false`` whatever followed ``since`` is
        reported lost, and the connection goes on from the room's current position."""
        conn.replaying = False
        resume, conn.resume = conn.resume, None
        epoch, offset = frame.get("epoch") or None, int(frame.get("offset") or 0)
        recovered = bool(frame.get("recovered"))
        if resume is not None and self.resume_log is not None:
            resume.update(recovered=recovered, epoch=epoch, offset=offset)
            self.resume_log.resumes.append(resume)
            if not recovered:
                lost = self.resume_log.reported_lost.setdefault(conn.conn_id, [])
                if resume["epoch_asked"] is not None:
                    lost.append((resume["epoch_asked"], resume["since"] + 1, None))
                if epoch is not None:
                    lost.append((epoch, 1, offset))
        if not recovered:
            if conn.epoch is not None and epoch != conn.epoch:
                self.offsets["new_epochs"] += 1
            conn.epoch, conn.offset = epoch, offset

    # -- commands ------------------------------------------------------------------------------
    def _context(self, ca_file: str) -> ssl.SSLContext:
        context = self._contexts.get(ca_file)
        if context is None:
            context = self._contexts[ca_file] = ssl.create_default_context(cafile=ca_file)
        return context

    async def _connect_one(self, spec: ConnSpec) -> ConnectOutcome:
        conn = _Conn(spec.conn_id, spec.room, spec)
        outcome = await self._open(conn, spec.path)
        if outcome.ok:
            self.conns[spec.conn_id] = conn
        return outcome

    async def _open(self, conn: _Conn, path: str) -> ConnectOutcome:
        """Open ``conn``'s websocket at ``path`` (its first connection, or a resume)."""
        from picows import WSHandshakeError, WSListener, WSMsgType, ws_connect

        worker = self
        spec = conn.spec
        assert spec is not None

        class Listener(WSListener):  # type: ignore[misc]
            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                kind = frame.msg_type
                if kind == WSMsgType.TEXT:
                    worker.on_text(conn, frame.get_payload_as_bytes())  # orjson reads UTF-8
                elif kind == WSMsgType.CLOSE:
                    conn.close_code = frame.get_close_code()
                    worker.closed_by_server[conn.conn_id] = int(conn.close_code)
                    transport.send_close(conn.close_code)
                    transport.disconnect()

            def on_ws_disconnected(self, transport: Any) -> None:
                if conn.transport is transport:
                    conn.is_open = False
                    worker.on_disconnected(conn)

        endpoint = spec.endpoint
        loop = asyncio.get_running_loop()

        async def make_socket(_url: Any) -> socket.socket:
            family = socket.AF_INET6 if ":" in endpoint.address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if spec.source_ip:
                    sock.bind((spec.source_ip, 0))
                await loop.sock_connect(sock, (endpoint.address, endpoint.port))
            except BaseException:
                sock.close()
                raise
            return sock

        started = time.perf_counter()
        try:
            transport, _ = await ws_connect(
                Listener,
                endpoint.url(path),
                ssl_context=self._context(endpoint.ca_file),
                extra_headers={"Origin": endpoint.origin},
                socket_factory=make_socket,
                websocket_handshake_timeout=20,
                read_buffer_init_size=4096,
                max_frame_size=1 << 20,
                max_redirects=0,
            )
        except WSHandshakeError as exc:
            status = getattr(getattr(exc, "response", None), "status", None)
            error = f"HTTP {int(status)}" if status is not None else "handshake failed"
            return ConnectOutcome(spec.conn_id, False, (time.perf_counter() - started) * 1e3, error)
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:60]}"
            return ConnectOutcome(spec.conn_id, False, (time.perf_counter() - started) * 1e3, error)
        conn.transport = transport
        conn.is_open = True
        return ConnectOutcome(spec.conn_id, True, (time.perf_counter() - started) * 1e3)

    def on_disconnected(self, conn: _Conn) -> None:
        """Resume mode: a socket the server (or its dying worker) dropped is reopened."""
        if self.resume_log is None or conn.closing or conn.conn_id in self.resuming:
            return
        self.resuming.add(conn.conn_id)
        task = asyncio.get_running_loop().create_task(self._resume(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self, conn: _Conn) -> None:
        """Reconnect with ``?since=<last offset>&epoch=<epoch>`` (bounded attempts, jittered
        backoff); the replay and the recovery frame then arrive through :meth:`on_text`."""
        import random

        assert self.resume_log is not None and conn.spec is not None
        dropped = time.monotonic()
        try:
            for attempt in range(RESUME_ATTEMPTS):
                await asyncio.sleep(random.uniform(0, min(RESUME_MAX_DELAY_S, 0.1 * 2**attempt)))
                if conn.closing:
                    return
                since, epoch = conn.offset, conn.epoch
                path = conn.spec.path
                if epoch is not None:
                    path += f"?since={since}&epoch={epoch}"
                # The replay and its recovery frame may arrive before ``_open`` returns: the
                # record is shared, and completed by :meth:`on_recovery`.
                record: dict[str, Any] = {
                    "conn": conn.conn_id,
                    "since": since,
                    "epoch_asked": epoch,
                    "attempts": attempt + 1,
                    "replayed": 0,
                    "down_s": None,
                }
                conn.resume = record
                conn.replaying = epoch is not None
                conn.close_code = None
                outcome = await self._open(conn, path)
                if outcome.ok:
                    record["down_s"] = time.monotonic() - dropped
                    if epoch is None:  # nothing to resume from: a plain reconnect
                        record.update(recovered=None, epoch=None, offset=None)
                        self.resume_log.resumes.append(record)
                        conn.resume, conn.replaying = None, False
                    return
                conn.resume, conn.replaying = None, False
            self.resume_log.not_resumed.append(conn.conn_id)
        finally:
            self.resuming.discard(conn.conn_id)

    def track(self, enabled: bool) -> None:
        """Resume mode on or off (see :class:`ResumeLog`)."""
        self.resume_log = ResumeLog() if enabled else None

    def take_log(self) -> ResumeLog | None:
        log = self.resume_log
        if log is not None:
            self.resume_log = ResumeLog()
        return log

    async def connect(self, specs: Sequence[ConnSpec]) -> list[ConnectOutcome]:
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(spec: ConnSpec) -> ConnectOutcome:
            async with limit:
                return await self._connect_one(spec)

        return list(await asyncio.gather(*(one(spec) for spec in specs)))

    async def send_phase(
        self,
        phase_id: int,
        t0_ns: int,
        rate: float,
        count: int,
        senders: Sequence[int],
        pad: str,
    ) -> SendOutcome:
        """Start recording ``phase_id``; each of ``senders`` sends ``count`` messages at ``rate``
        per second, evenly staggered, from ``t0_ns``; returns once all were sent."""
        self.phase = _Phase(phase_id, t0_ns)
        cpu0 = time.process_time()
        sent = dict.fromkeys(senders, 0)
        skipped: dict[int, list[int]] = {}
        lag = array("f")
        failed = 0
        conns = [self.conns.get(s) for s in senders]
        k = len(conns)
        total = k * count
        step_ns = 1e9 / (rate * k) if k else 0.0
        tag = self.tag
        text_frame = self._text
        j = 0
        while j < total:
            now = time.monotonic_ns()
            due = t0_ns + j * step_ns
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
                continue
            batch = 0
            while j < total and t0_ns + j * step_ns <= now and batch < SEND_BATCH:
                slot = j % k
                conn = conns[slot]
                seq = j // k
                j += 1
                batch += 1
                if conn is None or not conn.is_open:
                    failed += 1
                    if conn is not None:
                        skipped.setdefault(conn.conn_id, []).append(seq)
                    continue
                sent_ns = time.monotonic_ns()
                lag.append((sent_ns - (t0_ns + (j - 1) * step_ns)) / 1e6)
                text = message_text(tag, phase_id, conn.conn_id, seq, sent_ns, pad)
                try:
                    conn.transport.send(text_frame, b'{"message":"' + text.encode() + b'"}')
                except Exception:
                    failed += 1
                    continue
                sent[conn.conn_id] = seq + 1
            await asyncio.sleep(0)
        return SendOutcome(sent, failed, lag, time.process_time() - cpu0, skipped)

    async def collect(self, expected: int, quiet_s: float, max_s: float) -> CollectOutcome:
        """Wait until ``expected`` frames of the current phase arrived, nothing arrived for
        ``quiet_s`` seconds, or ``max_s`` passed; then stop recording and hand the phase over."""
        phase = self.phase
        assert phase is not None, "collect without a phase"
        cpu0 = time.process_time()
        deadline = time.monotonic() + max_s
        # Resumes under way are waited for (bounded by ``max_s``): their replays belong here.
        while phase.frames < expected or self.resuming:
            now = time.monotonic()
            if now >= deadline or (now - phase.last_frame >= quiet_s and not self.resuming):
                break
            await asyncio.sleep(0.02)
        self.phase = None
        late, self.late = self.late, 0
        phase.receipts.foreign += self.foreign
        self.foreign = 0
        phase.receipts.offsets.update(self.offsets)
        self.offsets = Counter()
        errors, self.errors = dict(self.errors), Counter()
        closed, self.closed_by_server = self.closed_by_server, {}
        return CollectOutcome(phase.receipts, time.process_time() - cpu0, late, closed, errors)

    def placement(self) -> dict[int, str | None]:
        return {conn_id: conn.process for conn_id, conn in self.conns.items() if conn.is_open}

    async def close(self, conn_ids: Sequence[int] | None) -> int:
        ids = list(self.conns) if conn_ids is None else [i for i in conn_ids if i in self.conns]
        for conn_id in ids:
            conn = self.conns.pop(conn_id)
            conn.closing = True
            if conn.is_open:
                with contextlib.suppress(Exception):
                    conn.transport.send_close(1000)
                    conn.transport.disconnect()
        await asyncio.sleep(0.05)
        return len(ids)

    def status(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "pid": os.getpid(),
            "open": sum(1 for c in self.conns.values() if c.is_open),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_kib": usage.ru_maxrss,
        }

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        handlers: dict[str, Callable[..., Any]] = {
            "connect": self.connect,
            "send": self.send_phase,
            "collect": self.collect,
            "placement": self.placement,
            "close": self.close,
            "status": self.status,
            "track": self.track,
            "log": self.take_log,
        }
        while True:
            command, args = await loop.run_in_executor(None, self.pipe.recv)
            if command == "stop":
                await self.close(None)
                self.pipe.send(("ok", None))
                return
            try:
                result = handlers[command](*args)
                if asyncio.iscoroutine(result):
                    result = await result
                reply = ("ok", result)
            except Exception:
                reply = ("error", traceback.format_exc())
            self.pipe.send(reply)


def _worker_main(index: int, pipe: Connection, tag: str) -> None:
    import uvloop

    uvloop.run(Worker(index, pipe, tag).serve())


# -- the parent's side -----------------------------------------------------------------------


class ClientError(RuntimeError):
    """A client process failed a command (its traceback is the message)."""


class ClientPool:
    """``processes`` client processes; connection ``i`` lives in process ``i % processes``."""

    def __init__(self, processes: int, tag: str) -> None:
        self.size = max(1, processes)
        self.tag = tag
        self._pipes: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []

    def __enter__(self) -> ClientPool:
        context = multiprocessing.get_context("spawn")
        for index in range(self.size):
            parent, child = context.Pipe()
            proc = context.Process(
                target=_worker_main,
                args=(index, child, self.tag),
                daemon=True,
                name=f"loadtests-client-{index}",
            )
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)
        return self

    def __exit__(self, *exc: object) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(Exception):
                pipe.send(("stop", ()))
        for pipe, proc in zip(self._pipes, self._procs, strict=True):
            with contextlib.suppress(Exception):
                if pipe.poll(5):
                    pipe.recv()
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)

    def owner(self, conn_id: int) -> int:
        return conn_id % self.size

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def call(
        self,
        commands: Sequence[tuple[str, tuple] | None],
        tick: Callable[[], None] | None = None,
        timeout: float = 600,
    ) -> list[Any]:
        """Send ``commands[i]`` to process ``i`` (``None``: skip it) and wait for every reply,
        calling ``tick`` a few times a second meanwhile."""
        for pipe, command in zip(self._pipes, commands, strict=True):
            if command is not None:
                pipe.send(command)
        replies: list[Any] = [None] * self.size
        waiting = {i for i, c in enumerate(commands) if c is not None}
        deadline = time.monotonic() + timeout
        while waiting:
            for i in sorted(waiting):
                if self._pipes[i].poll(0.05 / max(1, len(waiting))):
                    status, value = self._pipes[i].recv()
                    if status != "ok":
                        raise ClientError(f"client process {i}:\n{value}")
                    replies[i] = value
                    waiting.discard(i)
            if tick is not None:
                tick()
            if time.monotonic() > deadline:
                raise ClientError(f"client processes {sorted(waiting)} did not answer in time")
            for i in waiting:
                if not self._procs[i].is_alive():
                    raise ClientError(f"client process {i} died")
        return replies

    def broadcast(self, command: str, *args: Any, tick: Callable[[], None] | None = None) -> list:
        return self.call([(command, args)] * self.size, tick)
