"""events.Cursor: reading the events feed in id order without missing a late commit. Pure:
ids and monotonic times as numbers, no database."""

from __future__ import annotations

from broker.events import Cursor


def test_sqlite_reads_from_the_highest_id_seen() -> None:
    cursor = Cursor(10, rescan=False)
    assert cursor.floor(0.0) == 10
    assert cursor.take([11, 12], 0.0) == {11, 12}
    assert cursor.floor(0.5) == 12 and cursor.since == 12
    assert cursor.take([], 0.5) == set()


def test_postgresql_looks_back_for_ids_committed_late_and_hands_each_on_once() -> None:
    cursor = Cursor(10, rescan=True, rescan_seconds=10.0)
    # Ids 11 and 13 are visible; 12 was assigned earlier but commits later.
    assert cursor.take([11, 13], 0.0) == {11, 13}
    assert cursor.floor(1.0) == 10  # still looking back past 13
    assert cursor.take([11, 12, 13], 1.0) == {12}  # the late one, once
    assert cursor.take([11, 12, 13, 14], 2.0) == {14}
    # Ten seconds on, the floor moves up to what had been seen by then.
    assert cursor.floor(10.5) == 13
    assert cursor.take([14, 15], 10.5) == {15}
    assert cursor.floor(12.5) == 14  # seen by 2.0, ten seconds ago
    assert cursor.floor(20.5) == 15 and cursor.since == 15


def test_a_start_floor_below_since_rescans_from_there() -> None:
    cursor = Cursor(500, rescan=True, floor=0)
    assert cursor.floor(0.0) == 0
    assert cursor.take([499, 501], 0.0) == {499, 501}
