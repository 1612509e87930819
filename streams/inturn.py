"""Reading a Kafka partition without stepping over a record the broker showed late.

Vigil's topics are neither compacted nor transactional, so a partition's offsets are contiguous: a reader
that receives offset n + 2 right after n has been handed a record past one it was never given. tansu (the
Kafka-protocol broker of the dev stack and the tests) does this when several producers append to one
partition at once: a live reader can get n + 2 before n + 1 is readable, and its position is then past
n + 1 for good, while a reader that comes later sees every offset (docs/TOPICS.md). Real Kafka only exposes
a partition up to its high watermark, below which every offset is readable; a guard costs one comparison
per record either way.

`InTurn` keeps each partition's next expected offset. `take` returns the records that come next in turn
and, at a hole, the offset to seek back to; the caller seeks there (`consumer.seek`) and gets the rest
again, in order. A hole below the first offset the broker still holds (retention removed it) cannot be
filled: the caller moves the expectation there with `expect`.

The faust workers guard their partitions the same way, against their applied offsets (vigil/worker.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class InTurn(Generic[P]):
    """The next expected offset of each partition; pure bookkeeping, no I/O."""

    def __init__(self) -> None:
        self._next: dict[P, int] = {}

    def expect(self, partition: P, offset: int) -> None:
        """The next offset to read of `partition` (after a seek, an assignment, or records that expired)."""
        self._next[partition] = offset

    def expected(self, partition: P) -> int | None:
        return self._next.get(partition)

    def forget(self, partition: P) -> None:
        self._next.pop(partition, None)

    def take(self, partition: P, records: Sequence[Any]) -> tuple[Sequence[Any], int | None]:
        """(the records of `records` next in turn, the offset to seek back to or None). Records must have
        `.offset`. Records at or below what was taken already (delivered again after a seek) are dropped. A
        partition with no expectation starts at its first record."""
        if not records:
            return records, None
        expected = self._next.get(partition, records[0].offset)
        if all(r.offset == expected + i for i, r in enumerate(records)):
            self._next[partition] = expected + len(records)  # the usual case: contiguous, nothing copied
            return records, None
        run = []
        for r in records:
            if r.offset == expected:
                run.append(r)
                expected += 1
            elif r.offset > expected:
                self._next[partition] = expected
                return run, expected
        self._next[partition] = expected
        return run, None
