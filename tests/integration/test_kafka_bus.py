"""`streams.kafka.KafkaBus` on a real Kafka-protocol broker (tansu): keyed, ordered, durable or raising."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path

import pytest

from streams import topics
from streams.kafka import KafkaBus, KafkaSettings, bootstrap_servers, ensure_topics, kafka_partition
from streams.schemas import DeadLetter, decode, encode
from tests.servers_kafka import Tansu, consume, tansu

pytestmark = pytest.mark.integration

TOPIC = topics.INGEST


def record(key: str, n: int) -> tuple[str, str, bytes]:
    dl = DeadLetter(id=f"{key}/{n}", received_at=n, transport="test", reason="malformed", detail=str(n))
    return (TOPIC, key, encode(dl))


async def started(broker: Tansu, delivery_timeout: float = 5.0) -> KafkaBus:
    bus = KafkaBus(
        KafkaSettings([broker.bootstrap], client_id="test-bus", delivery_timeout=delivery_timeout),
        required_topics=[TOPIC],
    )
    await bus.start()
    return bus


def test_bootstrap_servers_parses_the_url_forms() -> None:
    assert bootstrap_servers("kafka://a:1,b:2") == ["a:1", "b:2"]
    assert bootstrap_servers("tcp://h:9") == ["h:9"]
    assert bootstrap_servers("h") == ["h:9092"]


async def test_every_record_comes_back_in_key_order_each_key_in_one_partition(tmp_path: Path) -> None:
    with tansu(tmp_path) as broker:
        bus = await started(broker)
        try:
            assert await bus.ready()
            keys = [f"dev-{i}" for i in range(24)]
            sent: dict[str, list[int]] = defaultdict(list)
            n = 0
            # Concurrent appends of mixed batches, as concurrent MQTT batches would make them.
            for _ in range(5):
                batches = []
                for b in range(4):
                    batch = []
                    for k in keys[b::4]:
                        batch.append(record(k, n))
                        sent[k].append(n)
                        n += 1
                    batches.append(batch)
                await asyncio.gather(*(bus.append(batch) for batch in batches))
        finally:
            await bus.stop()

        got = await consume(broker.bootstrap, TOPIC, until=lambda rs: len(rs) >= n, timeout=15, settle=0.5)
    assert len(got) == n  # all present, none twice
    partitions: dict[str, set[int]] = defaultdict(set)
    order: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in got:
        key = r.key.decode()
        ev = decode(r.value)  # the bus encoding: schema name and version inside
        assert isinstance(ev, DeadLetter)
        assert ev.id.startswith(f"{key}/")
        partitions[key].add(r.partition)
        order[key].append((r.offset, ev.received_at))
    assert all(len(p) == 1 for p in partitions.values()), partitions
    # Where the producer's default partitioner would put each key (the workers' partition maths rely on it).
    assert all(ps == {kafka_partition(k, topics.PARTITIONS[TOPIC])} for k, ps in partitions.items())
    assert len({p for ps in partitions.values() for p in ps}) > 1  # keys do spread over the partitions
    for key, seen in order.items():
        assert [v for _, v in sorted(seen)] == sent[key], key  # per-key order kept


async def test_an_append_larger_than_one_record_batch_arrives_whole_and_in_order(tmp_path: Path) -> None:
    """3,000 records of one key (far more than one 16 KiB record batch) in one append."""
    with tansu(tmp_path) as broker:
        bus = await started(broker)
        try:
            await bus.append([record("dev-big", n) for n in range(3000)])
        finally:
            await bus.stop()
        got = await consume(broker.bootstrap, TOPIC, until=lambda rs: len(rs) >= 3000, timeout=15, settle=0.5)
    received = [decode(r.value) for r in sorted(got, key=lambda r: r.offset)]
    assert [ev.received_at for ev in received if isinstance(ev, DeadLetter)] == list(range(3000))
    assert {r.partition for r in got} == {kafka_partition("dev-big", topics.PARTITIONS[TOPIC])}


async def test_an_append_to_a_stopped_broker_raises_within_the_delivery_timeout(tmp_path: Path) -> None:
    with tansu(tmp_path) as broker:
        bus = await started(broker, delivery_timeout=2.0)
        try:
            await bus.append([record("dev-a", 1)])
            broker.stop()
            assert not await bus.ready()
            t0 = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017 - whatever aiokafka raises, the append must fail
                await bus.append([record("dev-a", 2), record("dev-b", 3)])
            assert time.monotonic() - t0 < 4.0  # bounded: the transport answers "not acknowledged" soon
        finally:
            await bus.stop()


async def test_an_append_to_a_hung_broker_raises_too(tmp_path: Path) -> None:
    with tansu(tmp_path) as broker:
        bus = await started(broker, delivery_timeout=1.5)
        try:
            await bus.append([record("dev-a", 1)])
            broker.freeze()
            t0 = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017
                await bus.append([record("dev-a", 2)])
            assert time.monotonic() - t0 < 3.0
        finally:
            broker.thaw()
            await bus.stop()


async def test_ensure_topics_is_idempotent_and_creates_the_partition_counts(tmp_path: Path) -> None:
    with tansu(tmp_path, create=False) as broker:
        first = await ensure_topics(broker.bootstrap, topics.PARTITIONS)
        again = await ensure_topics(broker.bootstrap, topics.PARTITIONS)
    assert first == again == topics.PARTITIONS


async def test_ready_names_missing_topics(tmp_path: Path) -> None:
    with tansu(tmp_path, create=False) as broker:
        bus = await started(broker)
        try:
            assert not await bus.ready()  # connected, but the ingest topic does not exist
            await ensure_topics(broker.bootstrap, {TOPIC: 4})
            assert await bus.ready()
        finally:
            await bus.stop()
