"""Gaps found from the rooms' offsets, and the resume accounting, on synthetic frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from loadtests.accounting import account_resume
from loadtests.cli import main
from loadtests.client import Worker, _Conn, message_text

TAG = "t0"


def chat(sender: int, seq: int, offset: int, epoch: str = "e1", phase: int = 1) -> str:
    text = message_text(TAG, phase, sender, seq, 0, "")
    return orjson.dumps(
        {"type": "chat.message", "message": text, "offset": offset, "epoch": epoch}
    ).decode()


def offsets_after(frames: list[str], *, resume: bool = False) -> tuple[Worker, _Conn]:
    worker = Worker(0, None, TAG)  # type: ignore[arg-type]  # no pipe: frames fed directly
    if resume:
        worker.track(True)
    conn = _Conn(7, 0)
    for text in frames:
        worker.on_text(conn, text)
    return worker, conn


def test_contiguous_offsets_have_no_gap() -> None:
    worker, conn = offsets_after([chat(1, seq, offset) for seq, offset in enumerate([5, 6, 7])])
    assert worker.offsets == {"frames": 3}
    assert (conn.epoch, conn.offset) == ("e1", 7)


def test_an_offset_that_skips_ahead_in_the_same_epoch_is_a_gap() -> None:
    worker, conn = offsets_after(
        [chat(1, 0, 1), chat(1, 1, 2), chat(1, 2, 5), chat(1, 3, 6), chat(1, 4, 9)], resume=True
    )
    assert worker.offsets["gaps"] == 2
    assert worker.offsets["skipped"] == 4  # 3, 4, 7 and 8
    assert worker.resume_log is not None
    assert worker.resume_log.gaps == {7: [("e1", 3, 4), ("e1", 7, 8)]}
    assert conn.offset == 9


def test_a_new_epoch_is_counted_as_such_not_as_a_gap() -> None:
    worker, conn = offsets_after([chat(1, 0, 40), chat(1, 1, 41), chat(1, 2, 1, epoch="e2")])
    assert worker.offsets["new_epochs"] == 1
    assert worker.offsets["gaps"] == 0
    assert (conn.epoch, conn.offset) == ("e2", 1)


def test_recovered_false_reports_the_rest_of_the_old_epoch_and_the_new_one_lost() -> None:
    worker, conn = offsets_after([chat(1, 0, 10)], resume=True)
    conn.resume = {"conn": 7, "since": 10, "epoch_asked": "e1", "replayed": 0, "down_s": 0.1}
    worker.on_text(conn, '{"type": "recovery", "recovered": false, "epoch": "e2", "offset": 3}')
    assert worker.resume_log is not None
    [record] = worker.resume_log.resumes
    assert record["recovered"] is False
    assert worker.resume_log.reported_lost == {7: [("e1", 11, None), ("e2", 1, 3)]}
    assert (conn.epoch, conn.offset) == ("e2", 3)
    assert worker.offsets["new_epochs"] == 1


def test_replayed_frames_are_counted_until_the_recovery_frame() -> None:
    worker, conn = offsets_after([chat(1, 0, 1)], resume=True)
    conn.resume = {"conn": 7, "since": 1, "epoch_asked": "e1", "replayed": 0, "down_s": 0.1}
    conn.replaying = True
    worker.on_text(conn, chat(1, 1, 2))
    worker.on_text(conn, chat(1, 2, 3))
    worker.on_text(conn, '{"type": "recovery", "recovered": true, "epoch": "e1", "offset": 3}')
    worker.on_text(conn, chat(1, 3, 4))
    assert worker.resume_log is not None
    assert worker.resume_log.resumes[0]["replayed"] == 2
    assert [d[5] for d in worker.resume_log.deliveries[7]] == [False, True, True, False]


def test_resume_accounting_separates_recovered_reported_and_silent_loss() -> None:
    rooms = {1: 0, 2: 0, 3: 0}  # connection -> room; 1 sits on the killed process
    sent = {1: {0, 1, 2}, 2: {0, 1}}
    deliveries = {
        # receiver 1 (killed): message (2, 0) replayed after the resume; (1, 2) never accepted
        1: [(1, 1, 0, "e", 1, False), (1, 2, 0, "e", 2, True), (1, 1, 1, "e", 3, True)],
        2: [(1, 1, 0, "e", 1, False), (1, 2, 0, "e", 2, False), (1, 1, 1, "e", 3, False)],
        # receiver 3 missed offset 4 (reported lost) and offset 2 (nobody told it: silent)
        3: [(1, 1, 0, "e", 1, False), (1, 1, 1, "e", 3, False), (1, 1, 1, "e", 3, False)],
    }
    deliveries[2].append((1, 2, 1, "e", 4, False))
    deliveries[1].append((1, 2, 1, "e", 4, False))
    figures = account_resume(
        rooms,
        sent,
        1,
        deliveries,
        reported_lost={3: [("e", 4, None)]},
        gaps={},
        killed={1},
    )
    assert figures["written"] == 5
    assert figures["accepted"] == 4
    assert figures["in_flight_to_killed_process"] == 1  # (1, 2): nobody got an offset for it
    assert figures["unaccounted"] == 0
    assert figures["expected_deliveries"] == 12
    assert figures["recovered_by_replay"] == 2
    assert figures["delivered_live"] == 8
    assert figures["reported_lost"] == 1
    assert figures["silently_lost"] == 1
    assert figures["duplicated"] == 1
    assert figures["offsets_nobody_received"] == 0


def test_an_accepted_offset_nobody_received_and_an_unseen_message_from_a_live_socket() -> None:
    rooms = {1: 0, 2: 0}
    deliveries = {
        1: [(1, 1, 0, "e", 1, False), (1, 1, 2, "e", 3, False)],
        2: [(1, 1, 0, "e", 1, False), (1, 1, 2, "e", 3, False)],
    }
    figures = account_resume(
        rooms, {1: {0, 1, 2}}, 1, deliveries, reported_lost={}, gaps={}, killed=()
    )
    assert figures["offsets_nobody_received"] == 1
    assert figures["unaccounted"] == 1
    assert figures["silently_lost"] == 0  # unseen by all: counted above, not per receiver


def test_resume_refuses_a_stack_it_did_not_start(tmp_path: Path, capsys: Any) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("")
    assert main(["resume", "--target", "https://localhost:1", "--ca", str(ca)]) == 2
    assert "resume needs targets the tool starts" in capsys.readouterr().err
