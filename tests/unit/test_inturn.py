"""A Kafka reader never steps over a record the broker showed late (streams/inturn.py `InTurn`)."""

from __future__ import annotations

from typing import NamedTuple

from streams.inturn import InTurn


class R(NamedTuple):
    offset: int


def rs(*offsets: int) -> list[R]:
    return [R(o) for o in offsets]


def test_contiguous_batches_pass_whole_and_the_expectation_moves_on() -> None:
    t: InTurn[int] = InTurn()
    assert t.take(0, rs(0, 1, 2)) == (rs(0, 1, 2), None)
    assert t.take(0, rs(3)) == (rs(3), None)
    assert t.expected(0) == 4


def test_a_hole_gives_the_run_before_it_and_the_offset_to_seek_back_to() -> None:
    t: InTurn[int] = InTurn()
    t.expect(0, 10)
    assert t.take(0, rs(10, 11, 13, 14)) == (rs(10, 11), 12)
    assert t.take(0, rs(14)) == ([], 12)  # still queued from before the seek: nothing, seek again
    assert t.take(0, rs(12, 13, 14)) == (rs(12, 13, 14), None)  # read again after the seek, in order


def test_a_record_delivered_again_is_dropped() -> None:
    t: InTurn[str] = InTurn()
    t.expect("a", 5)
    assert t.take("a", rs(3, 4, 5, 6)) == (rs(5, 6), None)
    assert t.take("a", rs(6, 7)) == (rs(7), None)


def test_partitions_are_independent_and_a_new_one_starts_at_its_first_record() -> None:
    t: InTurn[int] = InTurn()
    assert t.take(1, rs(40, 41)) == (rs(40, 41), None)
    assert t.take(2, rs(0, 2)) == (rs(0), 1)
    assert t.expected(1) == 42 and t.expected(2) == 1
    t.forget(2)
    assert t.take(2, rs(7)) == (rs(7), None)


def test_expired_records_are_skipped_once_the_caller_moves_the_expectation() -> None:
    t: InTurn[int] = InTurn()
    t.expect(0, 3)
    assert t.take(0, rs(50, 51)) == ([], 3)  # the caller finds 50 is the first offset the broker holds
    t.expect(0, 50)
    assert t.take(0, rs(50, 51)) == (rs(50, 51), None)
