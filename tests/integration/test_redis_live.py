"""`RedisLiveFeed` on a throwaway redis-server: the same cursors on every reader, resync past the trim; the
relay from a real tansu: every record once, through a Redis restart and a Redis that lost its data."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from redis.asyncio import Redis

from api.livehub import resume_decision
from streams import topics
from streams.live import LiveRecord
from streams.redis_live import (
    RELAY_REWINDS,
    LiveIn,
    LiveRelay,
    RedisLatest,
    RedisLiveFeed,
    RedisLiveWriter,
)
from streams.schemas import Alert, Event, LiveUpdate, ObsItem, encode
from tests.servers_kafka import tansu
from tests.servers_redis import RedisServer, redis_server

pytestmark = [pytest.mark.integration]

T0 = 1_795_428_000_000


def upd(n: int, *, site: str = "north", value: float = 72, ts: int = T0, patient: str = "P-1") -> LiveUpdate:
    return LiveUpdate(
        id=f"mon-{site}/obs/{n}",
        kind="vitals",
        at=ts,
        site_id=site,
        unit_id="icu",
        bed_id=f"{site}-1",
        patient_id=patient,
        device_id=f"mon-{site}",
        items=(ObsItem("MDC_ECG_HEART_RATE", value, "/min", ts + n),),
    )


async def soon(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return cond()


def at(first: int, *events: Event) -> list[LiveIn]:
    """`events` as the relay reads them from the live topic, from cursor `first` on."""
    return [LiveIn(first + i, encode(e), e) for i, e in enumerate(events)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(Path(tmp_path_factory.mktemp("redis"))) as s:
        yield s


@pytest.fixture
async def redis(server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(server.url)
    await r.flushdb()
    try:
        yield r
    finally:
        await r.aclose()


async def test_append_after_wait_and_the_same_cursors_on_two_readers(
    redis: Redis, server: RedisServer
) -> None:
    writer = RedisLiveWriter(redis)
    feed = RedisLiveFeed(redis)
    other_redis = Redis.from_url(server.url)
    other = RedisLiveFeed(other_redis)  # another API node
    assert await feed.oldest() == 1 and feed.end() == 1
    assert await feed.after(0) == []
    began = time.monotonic()
    await feed.wait(0, 0.3)  # nothing: waits out the timeout
    assert time.monotonic() - began >= 0.25

    # Two sites, interleaved: one number line across both streams.
    four = at(1, upd(1), upd(1, site="south"), upd(2), upd(2, site="south"))
    assert await writer.append(four, expected=0) == [1, 2, 3, 4]
    assert await writer.position() == 4
    assert feed.end() == 1  # refreshed by reads only
    got = await feed.after(0)
    sites = [(r.cursor, getattr(r.event, "site_id", None)) for r in got]
    assert sites == [(1, "north"), (2, "south"), (3, "north"), (4, "south")]
    assert feed.end() == 5
    again = await other.after(0)
    assert [(r.cursor, r.event) for r in again] == [(r.cursor, r.event) for r in got]
    assert [r.cursor for r in await other.after(2)] == [3, 4]
    assert [r.cursor for r in await other.after(1, limit=2)] == [2, 3]

    # wait returns as soon as a record after the cursor exists, on any site's stream.
    waiting = asyncio.create_task(feed.wait(4, 5.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await writer.append(at(5, upd(3, site="south")), expected=4)
    await asyncio.wait_for(waiting, 2.0)
    assert [r.cursor for r in await feed.after(4)] == [5]
    await other_redis.aclose()


async def test_a_record_is_appended_once_at_its_cursor_even_when_retried_or_emitted_twice(
    redis: Redis,
) -> None:
    writer = RedisLiveWriter(redis)
    feed = RedisLiveFeed(redis)
    batch = at(1, upd(1), upd(2), upd(1, site="south"))
    assert await writer.append(batch, expected=0) == [1, 2, 3]
    assert await writer.append(batch, expected=3) == [0, 0, 0]  # the relay retried the batch
    # The worker emitted upd(2) twice (at least once): the copy, at cursor 5, advances the position only.
    assert await writer.append(at(4, upd(3), upd(2)), expected=3) == [4, 0]
    assert await writer.position() == 5
    assert [r.cursor for r in await feed.after(0)] == [1, 2, 3, 4]


async def test_a_redis_that_lost_data_is_told_apart_from_a_gap_in_kafka(redis: Redis) -> None:
    writer = RedisLiveWriter(redis)
    feed = RedisLiveFeed(redis)
    await writer.append(at(1, upd(1), upd(2)), expected=0)
    await redis.flushdb()  # restarted without its data
    assert await writer.append(at(3, upd(3)), expected=2) == [-1]  # the relay must replay from position 0
    assert await writer.position() == 0 and await feed.after(0) == []
    # Replayed after a seek to the oldest record Kafka still has (cursor 2: Kafka's retention took 1).
    assert await writer.append(at(2, upd(2), upd(3)), expected=0, resumed=True) == [2, 3]
    assert await feed.oldest() == 2  # a client still at cursor 0 must resync: record 1 is gone
    assert [r.cursor for r in await feed.after(0)] == [2, 3]


async def test_trimmed_by_age_and_a_cursor_from_before_it_must_resync(redis: Redis) -> None:
    writer = RedisLiveWriter(redis, retention_s=1.0)
    feed = RedisLiveFeed(redis)
    await writer.append(at(1, upd(1), upd(1, site="south"), upd(2)), expected=0)  # 1-3, the first mark
    await asyncio.sleep(1.1)
    await writer.append(at(4, upd(3)), expected=3)  # 4: a mark; nothing is a window old but number 1's mark
    await asyncio.sleep(1.1)
    await writer.append(at(5, upd(2, site="south")), expected=4)  # 5: all before 4's mark is older
    oldest = await feed.oldest()
    assert oldest == 4
    got = await feed.after(0)
    assert [r.cursor for r in got] == [4, 5]  # both site streams were trimmed
    end = feed.end()
    assert resume_decision(1, oldest, end) is None  # record 2 and 3 are gone: resync
    assert resume_decision("2", oldest, end) is None
    assert resume_decision(3, oldest, end) == 3  # the client saw everything that is gone
    assert resume_decision(5, oldest, end) == 5
    assert resume_decision(6, oldest, end) is None  # never issued


async def test_resume_across_readers_has_no_gap_and_no_duplicate_at_the_seam(
    redis: Redis, server: RedisServer
) -> None:
    """A client read node 1 up to cursor c, left; records arrived; node 2 gives exactly those after c."""
    writer = RedisLiveWriter(redis)
    node1 = RedisLiveFeed(redis)
    node2_redis = Redis.from_url(server.url)
    node2 = RedisLiveFeed(node2_redis)
    try:
        await writer.append(
            at(1, *(upd(i, site="north" if i % 2 else "south") for i in range(1, 7))), expected=0
        )
        seen = await node1.after(0, limit=4)
        last = seen[-1].cursor
        more = at(7, *(upd(i, site="north" if i % 3 else "south") for i in range(7, 10)))
        await writer.append(more, expected=6)
        await writer.append(at(10, upd(2, site="south")), expected=9)  # a copy emitted again: not shown
        resumed = await node2.after(last)
        ids = [getattr(r.event, "id", None) for r in (*seen, *resumed)]
        assert len(ids) == len(set(ids)) == 9
        assert [r.cursor for r in (*seen, *resumed)] == list(range(1, 10))
    finally:
        await node2_redis.aclose()


async def test_latest_values_per_patient_keep_the_newest_device_time(redis: Redis) -> None:
    latest = RedisLatest(redis)
    await latest.write([upd(5, value=80), upd(1, value=60, patient="P-2")])
    await latest.write([upd(3, value=70)])  # an older device time: ignored
    got = await latest.latest("P-1")
    hr = got["MDC_ECG_HEART_RATE"]
    assert (hr.value, hr.ts, hr.unit, hr.device_id) == (80.0, T0 + 5, "/min", "mon-north")
    assert (await latest.latest("P-2"))["MDC_ECG_HEART_RATE"].value == 60.0
    assert await latest.latest("P-3") == {}


async def test_the_relay_moves_every_live_record_once_through_a_redis_restart_and_a_data_loss(
    tmp_path: Path,
) -> None:
    """Records of every kind, produced to a real tansu; Redis stops mid-stream, comes back, then loses
    everything: the site streams end with every record once, at its Kafka offset + 1."""

    def alert(n: int) -> Alert:
        return Alert(
            id=f"P-1~spo2_low~{n}",
            version=1,
            patient_id="P-1",
            bed_id="north-1",
            site_id="north",
            unit_id="icu",
            condition="spo2_low",
            priority="medium",
            status="active_unack",
            raised_at=T0 + n,
            updated_at=T0 + n,
        )

    events: list[Event] = [upd(i) if i % 5 else alert(i) for i in range(1, 61)]
    with tansu(tmp_path / "tansu") as kafka, redis_server(tmp_path / "redis") as server:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await producer.start()
        r = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        relay = LiveRelay([kafka.bootstrap], r, topic=topics.LIVE, retry_max=0.5)
        task = asyncio.create_task(relay.run())
        reader = Redis.from_url(server.url)
        feed = RedisLiveFeed(reader)

        async def send(batch: Sequence[Event]) -> None:
            for e in batch:
                await producer.send_and_wait(topics.LIVE, encode(e), key=b"north")

        async def relayed(n: int) -> list[int]:
            for _ in range(300):
                try:
                    got = [x.cursor for x in await feed.after(0, 10_000)]
                except Exception:
                    got = []
                if len(got) >= n:
                    return got
                await asyncio.sleep(0.1)
            raise AssertionError(f"relayed {len(got)} of {n}")

        try:
            await send(events[:20])
            assert await relayed(20) == list(range(1, 21))
            server.stop()
            await send(events[20:40])  # Kafka takes them; the relay retries Redis
            assert await soon(lambda: relay.failing)
            server.start()  # the same port, without its data: the relay replays the whole topic
            await send(events[40:50])
            assert await relayed(50) == list(range(1, 51))
            await reader.flushdb()  # lost everything again, while running
            await send(events[50:])
            got = await relayed(60)
            assert got == list(range(1, 61))
            ids = [getattr(x.event, "id", None) for x in await feed.after(0, 10_000)]
            assert ids == [e.id for e in events]  # type: ignore[union-attr]
            assert await soon(lambda: not relay.failing)
            latest = await RedisLatest(reader).latest("P-1")
            assert latest["MDC_ECG_HEART_RATE"].ts == T0 + 59
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await producer.stop()
            await r.aclose()
            await reader.aclose()


async def test_the_relay_skips_no_record_when_producers_append_to_the_live_topic_at_once(
    tmp_path: Path,
) -> None:
    """Three producers append 3,000 records each to the live topic's one partition side by side, as the
    workers do. tansu can then hand a live reader a record past one it never gets (docs/TOPICS.md); that is
    rare, so the relay's consumer also withholds the first delivery of every 400th record. The relay seeks
    back each time: every record is in Redis once, at its offset + 1, none missing."""
    per, producers = 3000, 3
    events = {p: [upd(n, site=f"s{p}", patient=f"P-{p}") for n in range(per)] for p in range(producers)}
    with tansu(tmp_path / "tansu") as kafka, redis_server(tmp_path / "redis") as server:
        r = Redis.from_url(server.url)
        reader = Redis.from_url(server.url)
        feed = RedisLiveFeed(reader)
        relay = LiveRelay([kafka.bootstrap], r, topic=topics.LIVE, consumer=Withholding)
        rewinds = RELAY_REWINDS._value.get()
        task = asyncio.create_task(relay.run())

        async def produce(p: int) -> None:
            producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=0)
            await producer.start()
            try:
                pending = []
                for e in events[p]:  # one record per batch, many in flight: a worker's small emits
                    batch = producer.create_batch()
                    batch.append(key=b"north", value=encode(e), timestamp=None)
                    pending.append(await producer.send_batch(batch, topics.LIVE, partition=0))
                await asyncio.gather(*pending)
            finally:
                await producer.stop()

        try:
            await asyncio.sleep(1.0)  # the relay has joined its group and follows the (empty) topic
            await asyncio.gather(*(produce(p) for p in range(producers)))
            total = per * producers
            got: Sequence[LiveRecord] = []
            for _ in range(300):
                got = await feed.after(0, 2 * total)
                if len(got) >= total:
                    break
                await asyncio.sleep(0.1)
            cursors = [x.cursor for x in got]
            assert cursors == list(range(1, total + 1)), (
                f"{len(cursors)} of {total} in Redis; missing "
                f"{sorted(set(range(1, total + 1)) - set(cursors))[:20]}"
            )
            ids = [getattr(x.event, "id", None) for x in got]
            assert sorted(map(str, ids)) == sorted(e.id for es in events.values() for e in es)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await r.aclose()
            await reader.aclose()
    assert RELAY_REWINDS._value.get() - rewinds >= total // Withholding.EVERY - 1


class Withholding(AIOKafkaConsumer):  # type: ignore[misc]
    """A real consumer that withholds the first delivery of every EVERY-th offset, as tansu sometimes does."""

    EVERY = 400  # never the last record (8,999): a hole shows only when a record after it arrives

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._withheld: set[tuple[Any, int]] = set()

    async def getmany(self, *partitions: Any, **kwargs: Any) -> dict[Any, list[Any]]:
        out = await super().getmany(*partitions, **kwargs)
        for tp, records in out.items():
            kept = []
            for r in records:
                if r.offset % self.EVERY == self.EVERY - 1 and (tp, r.offset) not in self._withheld:
                    self._withheld.add((tp, r.offset))
                    continue
                kept.append(r)
            out[tp] = kept
        return out
