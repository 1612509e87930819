"""The SQLite log: durable appends, partitions by key, offsets and state committed together."""

from __future__ import annotations

import asyncio
from pathlib import Path

from streams.log import SqliteLog, partition_for


async def test_append_read_commit_and_reopen(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", partitions={"t": 4})
    await log.start()
    recs = [("t", f"dev{i % 10}", f"m{i}".encode()) for i in range(200)]
    await asyncio.gather(log.append(recs[:100]), log.append(recs[100:]))
    got: dict[int, list[bytes]] = {}
    for p in range(4):
        rows = await log.read("g", "t", p, max_records=1000, timeout=0)
        got[p] = [r.value for r in rows]
        assert all(partition_for(r.key, 4) == p for r in rows)
        assert [r.offset for r in rows] == list(range(len(rows)))
    assert sum(len(v) for v in got.values()) == 200
    # Per key, order is append order.
    dev3 = [v for p in got.values() for v in p if int(v[1:]) % 10 == 3]
    assert dev3 == sorted(dev3, key=lambda b: int(b[1:]))
    await log.commit("g", "t", 0, len(got[0]) - 1, [("g", "k", b"state")])
    await log.close()

    again = SqliteLog(tmp_path / "log.db", partitions={"t": 4})
    await again.start()
    assert await again.read("g", "t", 0, timeout=0) == []  # committed
    assert len(await again.read("g", "t", 1, max_records=1000, timeout=0)) == len(got[1])  # not committed
    assert await again.load_state("g", ["k", "other"]) == {"k": b"state"}
    await again.append([("t", "dev0", b"next")])
    assert again.end_offset("t", partition_for("dev0", 4)) > 0
    await again.close()


async def test_read_waits_for_new_records(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", partitions={"t": 1})
    await log.start()
    reader = asyncio.create_task(log.read("g", "t", 0, timeout=2))
    await asyncio.sleep(0.05)
    await log.append([("t", "k", b"v")])
    rows = await asyncio.wait_for(reader, 1)
    assert [r.value for r in rows] == [b"v"]
    await log.close()


async def test_prune_keeps_uncommitted(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", partitions={"t": 1})
    await log.start()
    await log.append([("t", "k", b"a"), ("t", "k", b"b")], at=1000)
    await log.commit("g", "t", 0, 0)
    assert await log.prune(older_than_ms=2000) == 1
    await log.close()
    again = SqliteLog(tmp_path / "log.db", partitions={"t": 1})
    await again.start()
    assert [r.value for r in await again.read("g", "t", 0, timeout=0)] == [b"b"]
    await again.append([("t", "k", b"c")])
    assert again.end_offset("t", 0) == 3
    await again.close()


async def test_time_retained_topic_is_pruned_by_age_alone(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", partitions={"live": 1})
    await log.start()
    await log.append([("live", "s", b"old")], at=1_000)
    await log.append([("live", "s", b"new")], at=10_000)
    assert await log.prune(older_than_ms=5_000, by_time=("live",)) == 1
    assert [r.value for r in await log.records_after("live", 0, -1, 10)] == [b"new"]
    assert await log.first_offset("live", 0) == 1
    await log.close()
