"""Every Prometheus metric Switchboard exports, defined once, and the calls that update them.

Names follow Prometheus' conventions: a ``switchboard_`` prefix, base units (seconds, bytes),
``_total`` on counters (the client library appends it), ``_seconds`` on histograms. The README's
metrics table is generated from :data:`CATALOGUE` (``python -m observability.metrics``) and a
test keeps the two in step.

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set before any worker imports this module
(``infra/gunicorn.conf.py``), so every value lives in a memory-mapped file of its process and
``/metrics`` sums them over the replica's workers (:mod:`observability.asgi`). The connection
gauge uses the ``livesum`` mode: when a worker dies, gunicorn's ``child_exit`` hook deletes its
file, so its sockets leave the sum at once, whatever killed it. Counters of dead workers stay in
the sum: a counter never goes down because a process died.

With ``METRICS_ENABLED=false`` every call below returns at once and no event is stamped.
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from prometheus_client import Counter, Gauge, Histogram

from config import env
from observability import context

logger = logging.getLogger("switchboard.metrics")

ENABLED = env.get_bool("METRICS_ENABLED")

#: Key of the wall-clock time (``time.time()``) at which the sending worker accepted a message,
#: carried inside the channel-layer event. The base consumer removes it before any handler sees
#: the event, so no client frame ever carries it (the wire protocol is unchanged).
ACCEPTED_AT = "_switchboard_accepted_at"

#: The app container of one pod (k8s/base/app-deployment.yaml, docker-compose.yml): its memory
#: limit and its processes, the gunicorn master and WEB_CONCURRENCY uvicorn workers.
POD_MEMORY_LIMIT_MIB = 512
POD_PROCESSES = 1 + 2
#: Measured by ``python -m loadtests capacity`` on the reference machine (loadtests/README.md):
#: one idle worker process, and app memory per idle connection (after one message each). The
#: master is counted as a worker: an upper bound, it does not load Django (no preload).
MEASURED_PROCESS_MIB = 69
MEASURED_KIB_PER_CONNECTION = 17.4
#: Share of the memory limit kept free at capacity: busy sockets hold more than idle ones (frames
#: up to WS_MAX_MESSAGE_BYTES, send buffers), and an out-of-memory kill closes every socket of
#: the pod at once.
POD_MEMORY_HEADROOM = 0.3

#: Connections one pod (replica) is sized for: what fits in its memory limit with
#: POD_MEMORY_HEADROOM of it free, rounded down to a thousand (8,000). Memory, not CPU, is what
#: idle sockets cost; the CPU of their traffic is the HPA's CPU target. The "too many
#: connections" alert fires above it (the pod still has its headroom); autoscaling aims at half
#: of it, because new pods only get new connections. tests/static/test_monitoring.py checks the
#: alert, the HPA target, the pod spec and the measured figures against these.
CONNECTIONS_PER_REPLICA_CAPACITY = (
    int(
        (POD_MEMORY_LIMIT_MIB * (1 - POD_MEMORY_HEADROOM) - POD_PROCESSES * MEASURED_PROCESS_MIB)
        * 1024
        / MEASURED_KIB_PER_CONNECTION
    )
    // 1000
    * 1000
)
AUTOSCALING_CONNECTIONS_PER_REPLICA = CONNECTIONS_PER_REPLICA_CAPACITY // 2

#: Fan-out latency buckets (seconds): the load tests' p99 goal is 100 ms, the alert 250 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Redis round trips on loopback take tens of microseconds; a slow network, milliseconds.
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

# -- websockets (updated by realtime.consumers.GroupMemberConsumer) ------------------------------
WEBSOCKET_CONNECTIONS = Gauge(
    "switchboard_websocket_connections",
    "Open websocket connections, by endpoint.",
    ["endpoint"],
    multiprocess_mode="livesum",
)
HANDSHAKES = Counter(
    "switchboard_websocket_handshakes",
    "Websocket handshakes, by endpoint and outcome: accepted, or the refusal's reason.",
    ["endpoint", "outcome"],
)
CLOSES = Counter(
    "switchboard_websocket_closes",
    "Websocket connections ended, by endpoint and close code (1006: dropped without one; "
    "codes a client chose from 3000-4999: other).",
    ["endpoint", "code"],
)
FRAMES_RECEIVED = Counter(
    "switchboard_websocket_frames_received",
    "Frames received from clients, by endpoint.",
    ["endpoint"],
)
ERROR_FRAMES = Counter(
    "switchboard_websocket_error_frames",
    "Error frames sent to clients, by endpoint and error code.",
    ["endpoint", "code"],
)
DELIVERIES = Counter(
    "switchboard_websocket_deliveries",
    "Published messages written to a client's socket, by endpoint.",
    ["endpoint"],
)
FANOUT_LATENCY = Histogram(
    "switchboard_fanout_latency_seconds",
    "From the sending worker accepting a message to a receiving worker writing it to a socket "
    "(wall clocks of two processes: across hosts, their clock offset adds in).",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)

# -- the channel layer (channel_layer.stats, copied by the sync thread below) --------------------
LAYER_PUBLISHED = Counter(
    "switchboard_layer_published", "Messages the channel layer published to Redis."
)
LAYER_PUBLISH_FAILURES = Counter(
    "switchboard_layer_publish_failures",
    "Publishes refused or failed (Redis unreachable, or re-subscribing after an outage); the "
    "sender was told (unavailable).",
)
LAYER_RECEIVED = Counter(
    "switchboard_layer_received", "Messages the channel layer read from Redis."
)
LAYER_MAILBOX_DELIVERIES = Counter(
    "switchboard_layer_mailbox_deliveries",
    "Messages the channel layer put into a consumer's mailbox.",
)
LAYER_DROPPED = Counter(
    "switchboard_layer_dropped",
    "Messages the channel layer could not hand to a consumer, by reason: mailbox_full (a slow "
    "client), undeliverable (its consumer had gone), lost (never reached this process: a gap in "
    "its publisher's sequence numbers, e.g. during a failover).",
    ["reason"],
)
LAYER_RECONNECTS = Counter(
    "switchboard_layer_reconnects", "Times a worker's Redis subscription connection was lost."
)
LAYER_REDIS_ERRORS = Counter(
    "switchboard_layer_redis_errors",
    "Error replies Redis sent on a worker's subscription connection (each one also logged).",
)
LAYER_RESUBSCRIPTIONS = Counter(
    "switchboard_layer_resubscriptions",
    "Subscriptions a worker moved to another Redis node (failover, cluster slot migration).",
)
LAYER_REDIRECTS = Counter(
    "switchboard_layer_redirects",
    "Publishes a cluster node answered MOVED/ASK, sent again to the slot's new owner.",
)
REDIS_ROUND_TRIP = Histogram(
    "switchboard_redis_round_trip_seconds",
    "Time from sending a command to the channel layer's Redis to reading its reply.",
    buckets=REDIS_BUCKETS,
)

# -- processes (the gunicorn master counts its workers' exits) -----------------------------------
WORKER_EXITS = Counter(
    "switchboard_worker_exits",
    "Worker processes that exited, each replaced by gunicorn (a crash, a kill, or a restart).",
)


class Field(NamedTuple):
    counter: Counter
    labels: tuple[str, ...] = ()


#: ``channel_layer.stats()`` fields -> the counters they feed. A test fails when the layer grows
#: a field that is missing here, so nothing it counts goes unexported.
LAYER_FIELDS: dict[str, Field] = {
    "published": Field(LAYER_PUBLISHED),
    "publish_failures": Field(LAYER_PUBLISH_FAILURES),
    "received": Field(LAYER_RECEIVED),
    "delivered": Field(LAYER_MAILBOX_DELIVERIES),
    "dropped": Field(LAYER_DROPPED, ("mailbox_full",)),
    "undeliverable": Field(LAYER_DROPPED, ("undeliverable",)),
    "reconnects": Field(LAYER_RECONNECTS),
    "lost": Field(LAYER_DROPPED, ("lost",)),
    "redis_errors": Field(LAYER_REDIS_ERRORS),
    "rehomed": Field(LAYER_RESUBSCRIPTIONS),
    "redirects": Field(LAYER_REDIRECTS),
}

#: Measured when ``/metrics`` is scraped (observability.scrape), not kept in files.
SCRAPE_TIME_METRICS: tuple[tuple[str, str, str, str], ...] = (
    (
        "switchboard_ready",
        "gauge",
        "",
        "1 when the replica's /readyz checks pass (each within 0.5 s in a scrape), else 0.",
    ),
    ("switchboard_redis_up", "gauge", "", "1 when Redis answers PING, else 0."),
    (
        "process_cpu_seconds_total",
        "counter",
        "pid, role",
        "CPU time of each process of the replica (role: master, worker).",
    ),
    ("process_resident_memory_bytes", "gauge", "pid, role", "Resident memory of each process."),
    ("process_open_fds", "gauge", "pid, role", "Open file descriptors of each process."),
    ("process_start_time_seconds", "gauge", "pid, role", "Start time of each process (epoch)."),
)

CATALOGUE = (
    WEBSOCKET_CONNECTIONS,
    HANDSHAKES,
    CLOSES,
    FRAMES_RECEIVED,
    ERROR_FRAMES,
    DELIVERIES,
    FANOUT_LATENCY,
    LAYER_PUBLISHED,
    LAYER_PUBLISH_FAILURES,
    LAYER_RECEIVED,
    LAYER_MAILBOX_DELIVERIES,
    LAYER_DROPPED,
    LAYER_RECONNECTS,
    LAYER_REDIS_ERRORS,
    LAYER_RESUBSCRIPTIONS,
    LAYER_REDIRECTS,
    REDIS_ROUND_TRIP,
    WORKER_EXITS,
)


# -- calls from the consumers --------------------------------------------------------------------
@functools.cache
def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per label set (it costs a microsecond)."""
    return metric.labels(*labels)


def connection_opened(*, handshake_accepted: bool) -> None:
    """A socket was accepted: to be served, or (``handshake_accepted=False``) only to be told
    why it is refused before it is closed."""
    if ENABLED:
        endpoint = context.current.get().endpoint
        if handshake_accepted:
            _child(HANDSHAKES, endpoint, "accepted").inc()
        _child(WEBSOCKET_CONNECTIONS, endpoint).inc()


#: Close codes that get a label value of their own: the protocol's (RFC 6455) and the app's
#: (4400, 4401, 4404). A client may close with any code from 3000 to 4999; those are "other",
#: so no client can make a series per code.
CLOSE_CODES = frozenset(range(1000, 1016)) | {4400, 4401, 4404}


def connection_closed(code: int, *, was_open: bool) -> None:
    if ENABLED:
        endpoint = context.current.get().endpoint
        _child(CLOSES, endpoint, str(code) if code in CLOSE_CODES else "other").inc()
        if was_open:
            _child(WEBSOCKET_CONNECTIONS, endpoint).dec()


def handshake_refused(reason: str) -> None:
    """A handshake refused: the Origin check (``origin``) or a consumer's ``refuse()``."""
    if ENABLED:
        _child(HANDSHAKES, context.current.get().endpoint, reason).inc()


def frame_received() -> None:
    if ENABLED:
        _frames_batch(context.current.get().endpoint).add()


def error_frame_sent(code: str) -> None:
    if ENABLED:
        _child(ERROR_FRAMES, context.current.get().endpoint, code).inc()


def stamp(event: dict[str, Any]) -> dict[str, Any]:
    """Mark ``event`` with the moment this worker accepted it (for the fan-out latency)."""
    if ENABLED:
        event[ACCEPTED_AT] = time.time()
    return event


class BatchedHistogram:
    """Observations of one histogram (and the counter of them, if any), summed in this process
    and written to the metric files by :func:`flush_batches`, once a second.

    Per delivery, a multiprocess ``Histogram.observe`` writes two memory-mapped values under a
    lock and the delivery counter one more; measured with ``loadtests compare``, that was several
    percent of a delivery's CPU. Here an observation is a bisect and three additions. The files
    lag by up to :data:`SYNC_SECONDS`; a worker killed with SIGKILL loses that last second.
    The buckets are written through the histogram's own values (``_buckets``, ``_sum``), the
    layout ``Histogram.observe`` writes; tests/unit/test_observability.py checks the result
    against ``observe``.
    """

    def __init__(self, histogram: Histogram, counter: Counter | None = None) -> None:
        self.histogram = histogram
        self.counter = counter
        self.bounds = list(histogram._upper_bounds[:-1])  # the last one is +Inf
        self.lock = threading.Lock()
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        BATCHES.append(self)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)  # buckets are "less than or equal"
        with self.lock:
            self.counts[index] += 1
            self.total += value

    def flush(self) -> None:
        with self.lock:
            counts, total = self.counts, self.total
            self.counts, self.total = [0] * len(counts), 0.0
        observed = sum(counts)
        if not observed:
            return
        for bucket, count in zip(self.histogram._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self.histogram._sum.inc(total)
        if self.counter is not None:
            self.counter.inc(observed)


class BatchedCounter:
    """A counter incremented per message, written to its file by :func:`flush_batches`."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.lock = threading.Lock()
        self.count = 0
        BATCHES.append(self)

    def add(self) -> None:
        with self.lock:
            self.count += 1

    def flush(self) -> None:
        with self.lock:
            count, self.count = self.count, 0
        if count:
            self.counter.inc(count)


BATCHES: list[BatchedHistogram | BatchedCounter] = []


@functools.cache
def _frames_batch(endpoint: str) -> BatchedCounter:
    return BatchedCounter(_child(FRAMES_RECEIVED, endpoint))


@functools.cache
def _delivery_batch(endpoint: str) -> BatchedHistogram:
    return BatchedHistogram(_child(FANOUT_LATENCY, endpoint), _child(DELIVERIES, endpoint))


def delivered(accepted_at: float, endpoint: str | None = None) -> None:
    """A stamped event was written to a socket of ``endpoint`` (default: this task's)."""
    if endpoint is None:
        endpoint = context.current.get().endpoint
    _delivery_batch(endpoint).observe(max(0.0, time.time() - accepted_at))


def flush_batches() -> None:
    for batch in list(BATCHES):
        batch.flush()


# -- calls from the channel layer ----------------------------------------------------------------
_round_trips: BatchedHistogram | None = None


def observe_redis_round_trip(sent_at: float) -> None:
    """A Redis reply arrived for a command sent at ``sent_at`` (``time.monotonic()``)."""
    global _round_trips
    if ENABLED:
        if _round_trips is None:
            _round_trips = BatchedHistogram(REDIS_ROUND_TRIP)
        _round_trips.observe(time.monotonic() - sent_at)


# -- the layer's counters, copied into the metrics ------------------------------------------------
#: Seconds between two copies of ``channel_layer.stats`` into the metric files.
SYNC_SECONDS = 1.0


class LayerStatsSync:
    """Adds what ``channel_layer.stats()`` counted since the last call to the counters.

    The layer keeps plain integers (the cheapest count on its hot path); a thread copies them
    every :data:`SYNC_SECONDS` into the metric files, where other processes can read them.
    """

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def sync(self, counts: Mapping[str, int]) -> None:
        for name, value in counts.items():
            field = LAYER_FIELDS.get(name)
            grown = value - self.seen.get(name, 0)
            if field is None or grown <= 0:
                continue
            counter = _child(field.counter, *field.labels) if field.labels else field.counter
            counter.inc(grown)
            self.seen[name] = value


_sync_started = False


def start_layer_sync() -> None:
    """Start this process's copying thread (once; a daemon: it dies with the worker): the
    layer's counters and the batched observations, into the metric files."""
    global _sync_started
    if not ENABLED or _sync_started:
        return
    _sync_started = True
    from channel_layer.stats import stats

    # Every series exists from the start, at 0: a query for drops or notifications returns a
    # value (0), not nothing, and increase() sees the first one.
    for field in LAYER_FIELDS.values():
        if field.labels:
            _child(field.counter, *field.labels)
    for endpoint in context.ENDPOINTS.values():
        for metric in (WEBSOCKET_CONNECTIONS, DELIVERIES, FRAMES_RECEIVED, FANOUT_LATENCY):
            _child(metric, endpoint)

    syncer = LayerStatsSync()

    def run() -> None:
        while True:
            try:
                syncer.sync(stats())
                flush_batches()
            except Exception:
                logger.exception("could not copy the channel layer's counters")
            time.sleep(SYNC_SECONDS)

    threading.Thread(target=run, name="layer-stats-sync", daemon=True).start()


# -- the README's table ---------------------------------------------------------------------------
def markdown_table() -> str:
    rows = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for metric in CATALOGUE:
        kind = metric._type  # prometheus_client has no public accessor
        name = metric._name + ("_total" if kind == "counter" else "")
        labels = ", ".join(metric._labelnames) or "-"
        rows.append(f"| `{name}` | {kind} | {labels} | {metric._documentation} |")
    for name, kind, labels, doc in SCRAPE_TIME_METRICS:
        rows.append(f"| `{name}` | {kind} | {labels or '-'} | {doc} |")
    return "\n".join(rows)


def with_table(readme: str) -> str:
    """``readme`` with the generated metrics table between its metrics-table markers."""
    return env.splice_table(readme, "metrics", markdown_table())


if __name__ == "__main__":
    import sys

    env.write_readme_table(sys.argv, with_table, markdown_table())
