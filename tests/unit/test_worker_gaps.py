"""A worker never steps over a record its consumer skipped (vigil/worker.py `BatchRunner`): it applies the
batch up to the hole, seeks back to it, and applies the rest when it comes again, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from streams.effects import Effect
from streams.ports import LogRecord
from streams.schemas import Event, Tick, encode
from vigil.worker import OFFSET_GAPS, REWINDS, BatchRunner

TOPIC = "vigil.ingest.v1"


class Counting:
    """A processor whose state is the offsets' events it saw, in order."""

    name = "counting"
    topic = TOPIC

    def step(self, state: list[int] | None, event: Event) -> tuple[list[int], Sequence[Effect]]:
        assert isinstance(event, Tick)
        return [*(state or []), event.at], ()

    def encode_state(self, state: list[int]) -> bytes:
        return ",".join(map(str, state)).encode()

    def decode_state(self, raw: bytes) -> list[int]:
        return [int(x) for x in raw.decode().split(",") if x]


class Store:
    """The state port in memory: applied offsets and rows, committed together."""

    def __init__(self) -> None:
        self.applied_at: dict[tuple[str, str, int], int] = {}
        self.rows: dict[tuple[str, str], bytes] = {}

    async def applied(self, name: str, topic: str, partition: int) -> int:
        return self.applied_at.get((name, topic, partition), -1)

    async def load(self, name: str, keys: Sequence[str]) -> dict[str, bytes]:
        return {k: self.rows[(name, k)] for k in keys if (name, k) in self.rows}

    async def load_all(self, name: str) -> dict[str, bytes]:
        return {k: v for (n, k), v in self.rows.items() if n == name}

    async def commit(
        self, name: str, topic: str, partition: int, last: int, rows: Sequence[tuple[str, str, bytes | None]]
    ) -> None:
        for n, k, v in rows:
            if v is not None:
                self.rows[(n, k)] = v
        self.applied_at[(name, topic, partition)] = last


class Sink:
    async def apply(self, effects: Sequence[Effect]) -> None:
        pass


class Consumer:
    """Where the runner sought the partition, and the first offset Kafka holds."""

    def __init__(self, earliest: int = 0, *, assigned: bool = True) -> None:
        self.first = earliest
        self.assigned = assigned
        self.sought: list[int] = []

    async def rewind(self, topic: str, partition: int, offset: int) -> bool:
        self.sought.append(offset)
        return self.assigned

    async def earliest(self, topic: str, partition: int) -> int:
        return self.first


def _runner(store: Store, consumer: Consumer) -> BatchRunner:
    return BatchRunner(
        Counting(),  # type: ignore[arg-type]
        lambda: store,  # type: ignore[arg-type, return-value]
        Sink,
        rewind=consumer.rewind,
        earliest=consumer.earliest,
    )


def _records(*offsets: int) -> list[LogRecord]:
    return [LogRecord(TOPIC, 0, o, "k", encode(Tick(at=o, partition=0))) for o in offsets]


def _seen(store: Store) -> list[int]:
    return Counting().decode_state(store.rows.get(("counting", "k"), b""))


def _count(metric: Any) -> float:
    return metric.labels("counting")._value.get()  # type: ignore[no-any-return]


def test_contiguous_batches_are_applied_without_seeking() -> None:
    store, consumer = Store(), Consumer()
    r = _runner(store, consumer)
    asyncio.run(r.run(TOPIC, 0, _records(0, 1, 2)))
    asyncio.run(r.run(TOPIC, 0, _records(3, 4)))
    assert _seen(store) == [0, 1, 2, 3, 4]
    assert consumer.sought == []


def test_a_hole_inside_a_batch_is_applied_up_to_it_then_the_consumer_seeks_back() -> None:
    store, consumer = Store(), Consumer()
    r = _runner(store, consumer)
    gaps, rewinds = _count(OFFSET_GAPS), _count(REWINDS)
    asyncio.run(r.run(TOPIC, 0, _records(0, 1, 4, 5)))  # 2 and 3 skipped by the consumer
    assert _seen(store) == [0, 1] and store.applied_at[("counting", TOPIC, 0)] == 1
    assert consumer.sought == [2]
    asyncio.run(r.run(TOPIC, 0, _records(2, 3, 4, 5)))  # delivered again from 2
    assert _seen(store) == [0, 1, 2, 3, 4, 5]
    assert _count(OFFSET_GAPS) == gaps + 2 and _count(REWINDS) == rewinds + 1


def test_a_record_delivered_twice_in_one_batch_is_applied_once() -> None:
    store, consumer = Store(), Consumer()
    asyncio.run(_runner(store, consumer).run(TOPIC, 0, _records(0, 1, 2, 1, 2, 3)))
    assert _seen(store) == [0, 1, 2, 3] and consumer.sought == []


def test_a_hole_before_a_batch_applies_nothing_and_seeks_back() -> None:
    store, consumer = Store(), Consumer()
    r = _runner(store, consumer)
    asyncio.run(r.run(TOPIC, 0, _records(0)))
    asyncio.run(r.run(TOPIC, 0, _records(3, 4)))  # 1 and 2 never came
    asyncio.run(r.run(TOPIC, 0, _records(4)))  # a stale delivery still queued: seeks back again
    assert _seen(store) == [0] and consumer.sought == [1, 1]
    asyncio.run(r.run(TOPIC, 0, _records(1, 2, 3, 4)))
    assert _seen(store) == [0, 1, 2, 3, 4]


def test_a_partition_starts_at_the_first_offset_kafka_holds() -> None:
    store, consumer = Store(), Consumer(earliest=0)
    r = _runner(store, consumer)
    asyncio.run(r.run(TOPIC, 0, _records(1, 2)))  # offset 0 skipped before anything was applied
    assert _seen(store) == [] and consumer.sought == [0]
    asyncio.run(r.run(TOPIC, 0, _records(0, 1, 2)))
    assert _seen(store) == [0, 1, 2]

    store2, consumer2 = Store(), Consumer(earliest=7)  # older records expired: 7 is where it begins
    asyncio.run(_runner(store2, consumer2).run(TOPIC, 0, _records(7, 8)))
    assert _seen(store2) == [7, 8] and consumer2.sought == []


def test_records_expired_from_kafka_before_they_were_applied_are_counted_not_waited_for() -> None:
    store, consumer = Store(), Consumer()
    r = _runner(store, consumer)
    asyncio.run(r.run(TOPIC, 0, _records(0, 1)))
    consumer.first = 50  # retention removed 2..49 while no worker ran
    gaps = _count(OFFSET_GAPS)
    asyncio.run(r.run(TOPIC, 0, _records(50, 51)))
    assert _seen(store) == [0, 1, 50, 51] and consumer.sought == []
    assert _count(OFFSET_GAPS) == gaps + 48


def test_a_partition_that_moved_away_is_left_to_its_new_owner() -> None:
    store, consumer = Store(), Consumer(assigned=False)
    r = _runner(store, consumer)
    asyncio.run(r.run(TOPIC, 0, _records(0, 2)))
    assert _seen(store) == [0] and store.applied_at[("counting", TOPIC, 0)] == 0
