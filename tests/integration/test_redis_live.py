"""`RedisLiveFeed` on a throwaway redis-server: the same cursors on every reader, resync past the trim."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from redis.asyncio import Redis

from api.livehub import resume_decision
from streams.redis_live import RedisLatest, RedisLiveFeed, RedisLiveWriter
from streams.schemas import LiveUpdate, ObsItem
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
    assert await writer.append([upd(1), upd(1, site="south"), upd(2), upd(2, site="south")]) == [1, 2, 3, 4]
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
    await writer.append([upd(3, site="south")])
    await asyncio.wait_for(waiting, 2.0)
    assert [r.cursor for r in await feed.after(4)] == [5]
    await other_redis.aclose()


async def test_a_redelivered_batch_is_appended_once(redis: Redis) -> None:
    writer = RedisLiveWriter(redis)
    feed = RedisLiveFeed(redis)
    batch = [upd(1), upd(2), upd(1, site="south")]
    assert await writer.append(batch) == [1, 2, 3]
    assert await writer.append(batch) == [0, 0, 0]  # the worker retried the batch after a crash
    assert await writer.append([upd(3), upd(2)]) == [4, 0]
    assert [r.cursor for r in await feed.after(0)] == [1, 2, 3, 4]


async def test_trimmed_by_age_and_a_cursor_from_before_it_must_resync(redis: Redis) -> None:
    writer = RedisLiveWriter(redis, retention_s=1.0)
    feed = RedisLiveFeed(redis)
    await writer.append([upd(1), upd(1, site="south"), upd(2)])  # 1-3, the first clock mark
    await asyncio.sleep(1.1)
    await writer.append([upd(3)])  # 4: a mark; nothing is a window old yet but number 1's mark
    await asyncio.sleep(1.1)
    await writer.append([upd(2, site="south")])  # 5: everything before 4's mark is older than the window
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
        await writer.append([upd(i, site="north" if i % 2 else "south") for i in range(1, 7)])
        seen = await node1.after(0, limit=4)
        last = seen[-1].cursor
        await writer.append([upd(i, site="north" if i % 3 else "south") for i in range(7, 10)])
        await writer.append([upd(2, site="south")])  # a redelivery arriving meanwhile: not shown again
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


async def test_the_worker_tee_sends_to_kafka_and_live_records_once_to_redis(redis: Redis) -> None:
    from streams import topics  # noqa: PLC0415
    from streams.redis_live import RedisLiveTee  # noqa: PLC0415
    from streams.schemas import encode  # noqa: PLC0415

    class Bus:
        def __init__(self) -> None:
            self.records: list[tuple[str, str, bytes]] = []

        async def append(self, records: Sequence[tuple[str, str, bytes]]) -> None:
            self.records.extend(records)

    bus = Bus()
    tee = RedisLiveTee(bus, RedisLiveWriter(redis), RedisLatest(redis), topics.LIVE)
    batch = [(topics.LIVE, "north-1", encode(upd(1, value=91))), ("vigil.other.v1", "k", b"x")]
    await tee.append(batch)
    await tee.append(batch)  # the worker retried the batch: Kafka gets it twice, clients once
    assert len(bus.records) == 4
    assert [r.cursor for r in await RedisLiveFeed(redis).after(0)] == [1]
    assert (await RedisLatest(redis).latest("P-1"))["MDC_ECG_HEART_RATE"].value == 91.0
