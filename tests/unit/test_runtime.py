"""The embedded runtime: effects before commit, retry on failure, state across restarts, backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from streams import topics
from streams.effects import Effect, WriteVitals
from streams.log import SqliteLog
from streams.processors.device import DeviceStage
from streams.runtime import EmbeddedRuntime
from streams.schemas import Meta, Observations, ObsItem, encode


class Sink:
    """Records effects; can fail or hold, like a store that is down or slow."""

    def __init__(self) -> None:
        self.points: list[str] = []
        self.fail = 0
        self.hold: asyncio.Event | None = None

    async def apply(self, effects: Sequence[Effect]) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("store down")
        for e in effects:
            if isinstance(e, WriteVitals):
                self.points.extend(p.key for p in e.points)


def obs(seq: int, device: str = "mon-1") -> tuple[str, str, bytes]:
    meta = Meta(
        f"{device}/obs/b/{seq}",
        device,
        "obs",
        "mqtt",
        1_000 + seq,
        2_000 + seq,
        "default",
        "icu",
        "icu-1",
        "P-1",
        "b",
        seq,
    )
    return (
        topics.INGEST,
        device,
        encode(Observations(meta, (ObsItem("MDC_ECG_HEART_RATE", 60.0, "/min", 1_000 + seq),))),
    )


async def start(path: Path, sink: Sink) -> tuple[SqliteLog, EmbeddedRuntime]:
    log = SqliteLog(path, partitions=topics.PARTITIONS)
    await log.start()
    rt = EmbeddedRuntime(log, sink, [DeviceStage()], retry_initial=0.01, retry_max=0.02)
    await rt.start()
    return log, rt


async def stop(log: SqliteLog, rt: EmbeddedRuntime) -> None:
    await rt.stop()
    await log.close()


async def test_failed_effects_are_retried_and_nothing_is_applied_twice(tmp_path: Path) -> None:
    sink = Sink()
    sink.fail = 2
    log, rt = await start(tmp_path / "log.db", sink)
    await log.append([obs(i) for i in range(50)])
    assert await rt.drained(5)
    assert sorted(sink.points) == sorted(f"mon-1/obs/b/{i}#0" for i in range(50))
    await stop(log, rt)


async def test_dedup_state_survives_a_restart(tmp_path: Path) -> None:
    sink = Sink()
    log, rt = await start(tmp_path / "log.db", sink)
    await log.append([obs(1), obs(2)])
    assert await rt.drained(5)
    await stop(log, rt)
    again = Sink()
    log, rt = await start(tmp_path / "log.db", again)
    await log.append([obs(2), obs(3)])  # seq 2 is a repeat from before the restart
    assert await rt.drained(5)
    assert again.points == ["mon-1/obs/b/3#0"]
    await stop(log, rt)


async def test_backpressure_holds_until_the_backlog_shrinks(tmp_path: Path) -> None:
    sink = Sink()
    log, rt = await start(tmp_path / "log.db", sink)
    await log.append([obs(0)])
    assert await rt.drained(5)
    sink.hold = asyncio.Event()
    await log.append([obs(i) for i in range(1, 200)])
    await asyncio.sleep(0.1)
    assert rt.lag(topics.INGEST) > 100
    gate = asyncio.create_task(rt.backpressure(topics.INGEST, 100, poll=0.01))
    await asyncio.sleep(0.1)
    assert not gate.done()  # acknowledgements are held while the processors are behind
    sink.hold.set()
    await asyncio.wait_for(gate, 5)
    assert await rt.drained(5)
    assert len(sink.points) == 200
    await stop(log, rt)
