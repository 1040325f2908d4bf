"""Delivery accounting: what each message should have reached, what arrived, how fast, via whom.

The client processes (:mod:`loadtests.client`) record every receipt as they go, in a form that
is cheap to build and small to ship back: per *stream* (one receiver, one sender) the sequence
numbers seen, as a bitmap; latencies as a flat array; deliveries per 100 ms bin; and counts of
``sent_by -> delivered_by`` pairs. This module turns those records, together with the plan
(which connection sits in which room) and the senders' counts, into the report: expected vs
received, lost, duplicated and out-of-order deliveries per sender, latency percentiles, deliveries
per second and the process/replica pairs that carried them.

Everything here is pure and synchronous so the unit tests can feed it synthetic data.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Width of one bin of the deliveries-over-time series, in seconds.
BIN_SECONDS = 0.1
#: Edges of the latency histogram: ten bins per decade from 0.1 ms to 10 s (the first and last
#: bins also take what falls outside).
HISTOGRAM_EDGES_MS = [10 ** (i / 10) for i in range(-10, 41)]


class StreamStats:
    """Receipts of one receiver from one sender within one phase.

    ``record(seq)`` is called once per received frame. A sequence number seen before is a
    duplicate; one lower than the highest seen so far (and not a duplicate) arrived out of order.
    """

    __slots__ = ("duplicates", "max_seq", "out_of_order", "received", "seen")

    def __init__(self) -> None:
        self.received = 0  # distinct sequence numbers
        self.duplicates = 0
        self.out_of_order = 0
        self.max_seq = -1
        self.seen = bytearray()

    def record(self, seq: int) -> None:
        seen = self.seen
        if seq >= len(seen):
            seen.extend(bytes(seq + 64 - len(seen)))
        elif seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        self.received += 1
        if seq < self.max_seq:
            self.out_of_order += 1
        else:
            self.max_seq = seq

    def has(self, seq: int) -> bool:
        return seq < len(self.seen) and self.seen[seq] == 1

    def __getstate__(self) -> tuple[int, int, int, int, bytes]:
        return (self.received, self.duplicates, self.out_of_order, self.max_seq, bytes(self.seen))

    def __setstate__(self, state: tuple[int, int, int, int, bytes]) -> None:
        self.received, self.duplicates, self.out_of_order, self.max_seq, seen = state
        self.seen = bytearray(seen)


@dataclass
class Receipts:
    """What one client process saw during one phase (merged across processes by :meth:`merge`)."""

    streams: dict[tuple[int, int], StreamStats] = field(default_factory=dict)
    latencies_ms: array = field(default_factory=lambda: array("f"))
    timeline: list[int] = field(default_factory=list)
    pairs: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    #: frames that belong to no phase being recorded (late ones from an earlier phase, or
    #: frames this tool did not send)
    foreign: int = 0
    #: a connection whose frames came from more than one server process (it should never move)
    moved: int = 0
    #: room positions (servers that send ``offset``/``epoch``): ``frames`` with an offset,
    #: ``gaps`` (a receiver's offset skipped ahead in the same epoch), ``skipped`` (offsets
    #: those gaps jumped over), ``new_epochs`` (a receiver saw its room's history restart)
    offsets: Counter = field(default_factory=Counter)

    def record(
        self,
        receiver: int,
        sender: int,
        seq: int,
        latency_ms: float,
        elapsed_s: float,
        sent_by: str | None,
        delivered_by: str | None,
    ) -> None:
        """One delivery: ``receiver`` got message ``seq`` of ``sender`` after ``latency_ms``,
        ``elapsed_s`` after the phase started."""
        key = (receiver, sender)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = StreamStats()
        stream.record(seq)
        self.latencies_ms.append(latency_ms)
        slot = int(elapsed_s / BIN_SECONDS) if elapsed_s > 0 else 0
        timeline = self.timeline
        if slot >= len(timeline):
            timeline.extend([0] * (slot + 1 - len(timeline)))
        timeline[slot] += 1
        if delivered_by is not None:
            self.pairs[(sent_by, delivered_by)] += 1

    def merge(self, other: Receipts) -> None:
        for key, stream in other.streams.items():
            mine = self.streams.get(key)
            if mine is None:
                self.streams[key] = stream
                continue
            # Two processes never hold the same receiver, but keep merging correct anyway.
            for seq in range(len(stream.seen)):
                if stream.seen[seq]:
                    mine.record(seq)
            mine.duplicates += stream.duplicates
        self.latencies_ms.extend(other.latencies_ms)
        if len(other.timeline) > len(self.timeline):
            self.timeline.extend([0] * (len(other.timeline) - len(self.timeline)))
        for slot, count in enumerate(other.timeline):
            self.timeline[slot] += count
        self.pairs.update(other.pairs)
        self.errors.update(other.errors)
        self.foreign += other.foreign
        self.moved += other.moved
        self.offsets.update(other.offsets)


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (``nan`` when empty)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def latency_summary(latencies: Iterable[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "count": len(ordered),
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "max": float(ordered[-1]) if ordered else math.nan,
        "mean": (sum(ordered) / len(ordered)) if ordered else math.nan,
    }


def latency_histogram(latencies: Iterable[float]) -> list[int]:
    """Counts per bin of :data:`HISTOGRAM_EDGES_MS`."""
    bins = len(HISTOGRAM_EDGES_MS) - 1
    counts = [0] * bins
    for value in latencies:
        slot = math.floor(10 * math.log10(value)) + 10 if value > 0 else 0
        counts[min(bins - 1, max(0, slot))] += 1
    return counts


def replica_of(process: str) -> str:
    """``"host-app2:1234"`` -> ``"host-app2"`` (a process id is ``<replica>:<pid>``)."""
    return process.rsplit(":", 1)[0]


@dataclass
class SenderAccount:
    sent: int = 0
    expected: int = 0  # deliveries: sent x members of the sender's room
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0


@dataclass
class PhaseAccount:
    """The accounting of one phase; :meth:`as_dict` is its JSON form."""

    sent: int
    expected: int
    received: int
    lost: int
    duplicated: int
    out_of_order: int
    misdelivered: int
    messages_complete: int
    messages_partial: int
    messages_unseen: int
    latency: dict[str, float]
    latency_histogram: list[int]
    deliveries_per_s: float
    offered_per_s: float
    active_s: float
    per_sender: dict[int, SenderAccount]
    pairs: list[tuple[str | None, str, int]]
    errors: dict[str, int]
    foreign: int
    moved: int
    timeline: list[int]
    offset_frames: int = 0
    offset_gaps: int = 0
    offsets_skipped: int = 0
    new_epochs: int = 0

    @property
    def process_pairs(self) -> set[tuple[str, str]]:
        return {(s, d) for s, d, _ in self.pairs if s is not None}

    @property
    def cross_process_pairs(self) -> set[tuple[str, str]]:
        return {(s, d) for s, d in self.process_pairs if s != d}

    @property
    def replica_pairs(self) -> set[tuple[str, str]]:
        return {(replica_of(s), replica_of(d)) for s, d in self.process_pairs}

    @property
    def cross_replica_pairs(self) -> set[tuple[str, str]]:
        return {(s, d) for s, d in self.replica_pairs if s != d}

    @property
    def cross_process_deliveries(self) -> int:
        return sum(n for s, d, n in self.pairs if s is not None and s != d)

    @property
    def unexpected(self) -> int:
        """Deliveries that should not have happened or should have but did not."""
        return self.lost + self.duplicated + self.misdelivered

    def as_dict(self) -> dict[str, Any]:
        senders_with = {
            "loss": sum(1 for a in self.per_sender.values() if a.lost),
            "duplicates": sum(1 for a in self.per_sender.values() if a.duplicated),
            "out_of_order": sum(1 for a in self.per_sender.values() if a.out_of_order),
        }
        return {
            "sent": self.sent,
            "expected_deliveries": self.expected,
            "received": self.received,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "misdelivered": self.misdelivered,
            "messages": {
                "complete": self.messages_complete,
                "partial": self.messages_partial,
                "unseen": self.messages_unseen,
            },
            "latency_ms": self.latency,
            "latency_histogram": {"edges_ms": HISTOGRAM_EDGES_MS, "counts": self.latency_histogram},
            "deliveries_per_s": self.deliveries_per_s,
            "offered_deliveries_per_s": self.offered_per_s,
            "active_s": self.active_s,
            "senders_with": senders_with,
            "per_sender": {
                str(sender): vars(account) for sender, account in sorted(self.per_sender.items())
            },
            "pairs": [
                {
                    "sent_by": s,
                    "delivered_by": d,
                    "deliveries": n,
                    "cross_process": s is not None and s != d,
                    "cross_replica": s is not None and replica_of(s) != replica_of(d),
                }
                for s, d, n in self.pairs
            ],
            "distinct_process_pairs": len(self.process_pairs),
            "cross_process_pairs": len(self.cross_process_pairs),
            "cross_replica_pairs": len(self.cross_replica_pairs),
            "cross_process_deliveries": self.cross_process_deliveries,
            "server_errors": self.errors,
            "foreign_frames": self.foreign,
            "connections_that_moved": self.moved,
            "offsets": {
                "frames_with_offset": self.offset_frames,
                "gaps": self.offset_gaps,
                "offsets_skipped": self.offsets_skipped,
                "new_epochs": self.new_epochs,
            },
            "deliveries_per_bin": self.timeline,
            "bin_seconds": BIN_SECONDS,
        }


def account(
    rooms: Mapping[int, int],
    sent: Mapping[int, int],
    receipts: Receipts,
    *,
    duration_s: float,
    members: Mapping[int, Sequence[int]] | None = None,
) -> PhaseAccount:
    """Account one phase.

    ``rooms`` maps every connection that was open during the phase to its room; ``sent`` maps
    each sender to how many messages it sent (numbered 0..n-1). Every connection of a room is
    expected to receive every message sent into that room, its own included (a group send
    reaches the sender too). ``duration_s`` is the sending window, for the offered rate.
    """
    if members is None:
        grouped: dict[int, list[int]] = {}
        for conn, room in rooms.items():
            grouped.setdefault(room, []).append(conn)
        members = grouped
    streams = receipts.streams
    per_sender: dict[int, SenderAccount] = {}
    complete = partial = unseen = 0
    for sender, count in sent.items():
        acc = per_sender[sender] = SenderAccount(sent=count)
        if count == 0:
            continue
        room_members = members.get(rooms.get(sender, -1), ())
        acc.expected = count * len(room_members)
        member_streams = []
        for receiver in room_members:
            stream = streams.get((receiver, sender))
            if stream is None:
                acc.lost += count
                continue
            in_range = stream.received - sum(stream.seen[count:])
            acc.received += in_range
            acc.lost += count - in_range
            acc.duplicated += stream.duplicates
            acc.out_of_order += stream.out_of_order
            member_streams.append(stream.seen)
        # Per message: did every member get it, some of them, or none?
        for seq in range(count):
            got = sum(1 for seen in member_streams if seq < len(seen) and seen[seq])
            if got == len(room_members):
                complete += 1
            elif got:
                partial += 1
            else:
                unseen += 1
    # Receipts from a sender outside the receiver's room, or numbered beyond what was sent.
    misdelivered = 0
    for (receiver, sender), stream in streams.items():
        count = sent.get(sender, 0)
        if rooms.get(receiver) != rooms.get(sender, -2):
            misdelivered += stream.received
        else:
            misdelivered += sum(stream.seen[count:])
    received = sum(a.received for a in per_sender.values())
    expected = sum(a.expected for a in per_sender.values())
    timeline = receipts.timeline
    last_bin = max((i for i, n in enumerate(timeline) if n), default=-1)
    active_s = max(duration_s, (last_bin + 1) * BIN_SECONDS)
    return PhaseAccount(
        sent=sum(sent.values()),
        expected=expected,
        received=received,
        lost=sum(a.lost for a in per_sender.values()),
        duplicated=sum(a.duplicated for a in per_sender.values()),
        out_of_order=sum(a.out_of_order for a in per_sender.values()),
        misdelivered=misdelivered,
        messages_complete=complete,
        messages_partial=partial,
        messages_unseen=unseen,
        latency=latency_summary(receipts.latencies_ms),
        latency_histogram=latency_histogram(receipts.latencies_ms),
        deliveries_per_s=received / active_s if active_s > 0 else 0.0,
        offered_per_s=expected / duration_s if duration_s > 0 else 0.0,
        active_s=active_s,
        per_sender=per_sender,
        pairs=sorted(
            ((s, d, n) for (s, d), n in receipts.pairs.items()),
            key=lambda item: (-item[2], str(item[0]), item[1]),
        ),
        errors=dict(receipts.errors),
        foreign=receipts.foreign,
        moved=receipts.moved,
        timeline=list(timeline),
        offset_frames=receipts.offsets["frames"],
        offset_gaps=receipts.offsets["gaps"],
        offsets_skipped=receipts.offsets["skipped"],
        new_epochs=receipts.offsets["new_epochs"],
    )


# -- resume: every accepted message delivered, recovered or reported lost ------------------------


def _in_ranges(ranges: Iterable[tuple], epoch: str | None, offset: int | None) -> bool:
    """Whether ``(epoch, offset)`` lies in one of ``(epoch, first, last)`` (``last`` ``None``:
    open-ended)."""
    return offset is not None and any(
        e == epoch and first <= offset and (last is None or offset <= last)
        for e, first, last in ranges
    )


def account_resume(
    rooms: Mapping[int, int],
    sent: Mapping[int, Iterable[int]],
    phase_id: int,
    deliveries: Mapping[int, Sequence[tuple]],
    *,
    reported_lost: Mapping[int, Sequence[tuple]],
    gaps: Mapping[int, Sequence[tuple]],
    killed: Iterable[int] = (),
    not_resumed: Iterable[int] = (),
) -> dict[str, Any]:
    """Account a phase in which a server process was killed and its clients resumed.

    ``rooms``: every member connection -> room; ``sent``: sender -> the sequence numbers it
    wrote to its socket in phase ``phase_id``; ``deliveries``: receiver -> ``(phase, sender,
    seq, epoch, offset, replayed)`` per chat message received (any phase: offsets of every
    message fill the room's picture); ``reported_lost`` / ``gaps``: receiver -> ``(epoch,
    first, last)`` offset ranges the server reported lost (``recovered: false``) or the client
    saw skipped live; ``killed``: the connections of the killed process.

    A message is *accepted* when some member received it (with history on, it then has an
    offset; a server without history sends none, and nothing can be reported); the offsets a
    room's members saw between its lowest and highest, none of them received, are accepted
    messages nobody got. A message written to a socket of the killed process and received by
    nobody never reached the server (in flight when it died); one from another socket is
    counted as ``unaccounted``. Every member should get every accepted message of its room:
    live, by a resume's replay, or else it is ``reported_lost`` (in a ``recovered: false``
    range), ``gap_detected`` (the client saw the offset skip), ``not_resumed`` (its socket
    never came back), or ``silently_lost``.
    """
    killed = set(killed)
    not_resumed = set(not_resumed)
    position: dict[tuple[int, int], tuple[str | None, int]] = {}
    got: dict[int, dict[tuple[int, int], bool]] = {}  # receiver -> message -> replayed
    duplicates = 0
    room_offsets: dict[tuple[int, str | None], set[int]] = {}
    for receiver, entries in deliveries.items():
        mine = got.setdefault(receiver, {})
        room = rooms.get(receiver)
        for phase, sender, seq, epoch, offset, replayed in entries:
            if offset is not None and room is not None:
                room_offsets.setdefault((room, epoch), set()).add(offset)
            if phase != phase_id:
                continue
            message = (sender, seq)
            position.setdefault(message, (epoch, offset))
            if message in mine:
                duplicates += 1
            else:
                mine[message] = replayed
    written = {(sender, seq) for sender, seqs in sent.items() for seq in seqs}
    accepted = {m for m in written if m in position}
    in_flight = {m for m in written - accepted if m[0] in killed}
    unaccounted = written - accepted - in_flight
    holes = 0
    for offsets in room_offsets.values():
        holes += max(offsets) - min(offsets) + 1 - len(offsets)
    members: dict[int, list[int]] = {}
    for conn, room in rooms.items():
        members.setdefault(room, []).append(conn)
    counts = Counter()
    for sender, seq in sorted(accepted):
        epoch, offset = position[(sender, seq)]
        for receiver in members.get(rooms.get(sender, -1), ()):
            replayed = got.get(receiver, {}).get((sender, seq))
            if replayed is not None:
                counts["delivered_by_replay" if replayed else "delivered_live"] += 1
            elif _in_ranges(reported_lost.get(receiver, ()), epoch, offset):
                counts["reported_lost"] += 1
            elif _in_ranges(gaps.get(receiver, ()), epoch, offset):
                counts["gap_detected"] += 1
            elif receiver in not_resumed:
                counts["not_resumed"] += 1
            else:
                counts["silently_lost"] += 1
    misdelivered = sum(
        1
        for receiver, mine in got.items()
        for sender, _ in mine
        if rooms.get(receiver) != rooms.get(sender, -2)
    )
    expected = sum(len(members.get(rooms.get(s, -1), ())) for s, _ in accepted)
    return {
        "written": len(written),
        "accepted": len(accepted),
        "in_flight_to_killed_process": len(in_flight),
        "unaccounted": len(unaccounted),
        "offsets_nobody_received": holes,
        "expected_deliveries": expected,
        "delivered": counts["delivered_live"] + counts["delivered_by_replay"],
        "delivered_live": counts["delivered_live"],
        "recovered_by_replay": counts["delivered_by_replay"],
        "reported_lost": counts["reported_lost"],
        "gap_detected": counts["gap_detected"],
        "not_resumed": counts["not_resumed"],
        "silently_lost": counts["silently_lost"],
        "duplicated": duplicates,
        "misdelivered": misdelivered,
    }
