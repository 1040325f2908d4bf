"""The load tests' accounting on synthetic receipts: loss, duplicates, order, percentiles."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from loadtests.accounting import (
    BIN_SECONDS,
    Receipts,
    StreamStats,
    account,
    latency_histogram,
    percentile,
    replica_of,
)
from loadtests.client import message_text, parse_message
from loadtests.scenarios import KneeSteps
from loadtests.targets import TargetError, parse_target, require_loopback

ROOT = Path(__file__).resolve().parents[2]


def receive(
    receipts: Receipts,
    receiver: int,
    sender: int,
    seqs: list[int],
    *,
    sent_by: str = "h-app1:1",
    delivered_by: str = "h-app1:1",
    latency: float = 1.0,
    at: float = 0.05,
) -> None:
    for seq in seqs:
        receipts.record(receiver, sender, seq, latency, at, sent_by, delivered_by)


def test_stream_counts_duplicates_and_out_of_order() -> None:
    stream = StreamStats()
    for seq in [0, 1, 3, 2, 3, 5, 4, 0]:
        stream.record(seq)
    assert stream.received == 6  # 0..5
    assert stream.duplicates == 2  # the second 3 and the second 0
    assert stream.out_of_order == 2  # 2 after 3, 4 after 5
    assert stream.has(5) and not stream.has(6)


def test_every_member_gets_every_message_including_the_sender() -> None:
    rooms = {1: 0, 2: 0, 3: 0}
    receipts = Receipts()
    for receiver in rooms:
        receive(receipts, receiver, 1, [0, 1, 2])
    acct = account(rooms, {1: 3}, receipts, duration_s=1.0)
    assert (acct.sent, acct.expected, acct.received) == (3, 9, 9)
    assert acct.lost == acct.duplicated == acct.misdelivered == acct.unexpected == 0
    assert acct.messages_complete == 3
    assert acct.offered_per_s == 9.0


def test_loss_duplicates_and_order_are_charged_to_their_sender() -> None:
    rooms = {1: 0, 2: 0, 10: 1, 11: 1}
    receipts = Receipts()
    receive(receipts, 1, 1, [0, 1, 2, 3])
    receive(receipts, 2, 1, [0, 2, 3])  # lost 1
    receive(receipts, 10, 10, [1, 0, 0])  # out of order, duplicate
    receive(receipts, 11, 10, [0, 1])
    acct = account(rooms, {1: 4, 10: 2}, receipts, duration_s=2.0)
    assert acct.lost == 1
    assert acct.duplicated == 1
    assert acct.out_of_order == 1
    assert acct.per_sender[1].lost == 1 and acct.per_sender[1].duplicated == 0
    assert acct.per_sender[10].duplicated == 1 and acct.per_sender[10].out_of_order == 1
    assert (acct.messages_complete, acct.messages_partial, acct.messages_unseen) == (5, 1, 0)
    assert acct.received == 7 + 4


def test_a_receiver_that_got_nothing_loses_everything_and_messages_nobody_saw_count() -> None:
    rooms = {1: 0, 2: 0}
    receipts = Receipts()
    receive(receipts, 1, 1, [0])
    acct = account(rooms, {1: 2}, receipts, duration_s=1.0)
    assert acct.lost == 3  # receiver 2 got neither, receiver 1 missed seq 1
    assert (acct.messages_complete, acct.messages_partial, acct.messages_unseen) == (0, 1, 1)


def test_deliveries_outside_the_room_or_beyond_what_was_sent_are_misdelivered() -> None:
    rooms = {1: 0, 2: 1}
    receipts = Receipts()
    receive(receipts, 1, 1, [0, 5])  # 5 was never sent
    receive(receipts, 2, 1, [0])  # 2 is in another room
    acct = account(rooms, {1: 1}, receipts, duration_s=1.0)
    assert acct.misdelivered == 2
    assert acct.lost == 0 and acct.received == 1


def test_process_and_replica_pairs() -> None:
    rooms = {1: 0, 2: 0}
    receipts = Receipts()
    receive(receipts, 1, 1, [0], sent_by="h-app1:10", delivered_by="h-app1:10")
    receive(receipts, 2, 1, [0], sent_by="h-app1:10", delivered_by="h-app1:11")
    receive(receipts, 2, 2, [0], sent_by="h-app2:20", delivered_by="h-app1:11")
    receive(receipts, 1, 2, [0], sent_by="h-app2:20", delivered_by="h-app1:10")
    acct = account(rooms, {1: 1, 2: 1}, receipts, duration_s=1.0)
    assert len(acct.process_pairs) == 4
    assert acct.cross_process_pairs == {
        ("h-app1:10", "h-app1:11"),
        ("h-app2:20", "h-app1:11"),
        ("h-app2:20", "h-app1:10"),
    }
    assert acct.cross_replica_pairs == {("h-app2", "h-app1")}
    assert acct.cross_process_deliveries == 3
    assert replica_of("host-with-dashes-app2:1234") == "host-with-dashes-app2"


def test_nearest_rank_percentiles() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_latency_summary_histogram_and_rate_over_time() -> None:
    rooms = {1: 0}
    receipts = Receipts()
    for i, latency in enumerate([1.0, 2.0, 3.0, 4.0, 100.0]):
        receipts.record(1, 1, i, latency, 0.25 + i, "a:1", "a:1")
    acct = account(rooms, {1: 5}, receipts, duration_s=5.0)
    assert acct.latency["p50"] == 3.0
    assert acct.latency["max"] == 100.0
    assert sum(acct.latency_histogram) == 5
    assert latency_histogram([0.01, 1e9])[0] == 1 and latency_histogram([1e9])[-1] == 1
    # One delivery per second, in the bins 2, 12, 22, 32, 42 (0.1 s each).
    assert [i for i, n in enumerate(acct.timeline) if n] == [2, 12, 22, 32, 42]
    assert acct.active_s == pytest.approx(max(5.0, 43 * BIN_SECONDS))
    assert acct.deliveries_per_s == pytest.approx(1.0)


def test_receipts_from_several_client_processes_merge() -> None:
    a, b = Receipts(), Receipts()
    receive(a, 1, 1, [0, 1])
    receive(b, 2, 1, [0, 1], at=0.35)
    b.errors["rate_limited"] += 2
    a.merge(b)
    acct = account({1: 0, 2: 0}, {1: 2}, a, duration_s=1.0)
    assert acct.received == 4 and acct.lost == 0
    assert acct.errors == {"rate_limited": 2}
    assert a.timeline[0] == 2 and a.timeline[3] == 2


def test_message_text_round_trip() -> None:
    text = message_text("lt0a1b2c:", 7, 42, 3, 123456789, "xxxx")
    assert parse_message("lt0a1b2c:", text) == (7, 42, 3, 123456789)
    assert parse_message("lt0a1b2c:", "hello") is None
    assert parse_message("other:", text) is None


def test_knee_steps_double_then_bisect() -> None:
    steps = KneeSteps(start=1.0, factor=2.0, max_rate=100.0, refine=2)
    tried = []
    outcome = {1.0: True, 2.0: True, 4.0: False}
    while (rate := steps.next_rate()) is not None:
        tried.append(rate)
        steps.report(rate, outcome.get(rate, rate < 3.0))
    assert tried[:3] == [1.0, 2.0, 4.0]
    assert tried[3] == pytest.approx(math.sqrt(8))  # between the last pass and the failure
    assert len(tried) == 5


@pytest.mark.parametrize("spec", ["https://10.1.2.3:443", "https://192.168.0.1"])
def test_only_loopback_targets(spec: str) -> None:
    with pytest.raises(TargetError, match="loopback"):
        parse_target(spec, ca_file="/dev/null")


def test_loopback_names_resolve() -> None:
    assert require_loopback("127.0.0.1", 443) == "127.0.0.1"
    assert require_loopback("localhost", 443) in {"127.0.0.1", "::1"}


def test_a_started_target_takes_another_nginx_configuration(tmp_path: Path) -> None:
    """``nginx=<dir>``: two nginx configurations in front of the same app, in one run."""
    variant = tmp_path / "before" / "nginx"
    shutil.copytree(ROOT / "nginx", variant)
    tls = variant / "snippets" / "tls.conf"
    tls.write_text(tls.read_text() + "# the variant\n")
    target = parse_target(f"nodjango:nginx={variant},label=before", run_root=tmp_path)
    assert target.label == "before" and "nginx" not in target.settings
    target.stack._write_nginx()  # what Stack.prepare() runs before nginx starts
    copied = target.stack.run_dir / "nginx" / "snippets" / "tls.conf"
    assert copied.read_text().endswith("# the variant\n")
    with pytest.raises(TargetError, match=r"no nginx\.conf"):
        parse_target(f"nodjango:nginx={tmp_path / 'nowhere'}", run_root=tmp_path)
