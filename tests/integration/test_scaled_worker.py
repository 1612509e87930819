"""`vigil worker` (faust on a real tansu, state in a throwaway PostgreSQL): kill -9 mid-stream loses nothing.

One scenario, in about a minute: events stream in; the worker is killed with SIGKILL while it works; a second
worker starts with an effect sink that fails its first batches (the test hook VIGIL_WORKER_FAIL_BATCHES); the
devices resend some events (same event ids). In the end every event's vital point is stored exactly once,
the duplicates were counted, and the clinical topic holds every event at least once (at-least-once: a crash
after the effects and before the state commit re-emits a batch, so duplicates are allowed there).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from streams import topics
from streams.kafka import KafkaBus, KafkaSettings
from streams.schemas import Meta, Observations, ObsItem, decode, encode
from tests.servers import Proc, free_port
from tests.servers_kafka import Tansu, consume, tansu
from tests.servers_pg import Postgres

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
N = 2000
DEVICES = 8
DUPLICATES = 200
FAIL_BATCHES = 3


def obs(i: int) -> tuple[str, str, bytes]:
    device = f"mon-{i % DEVICES}"
    seq = i // DEVICES
    meta = Meta(
        f"{device}/obs/b/{seq}",
        device,
        "obs",
        "mqtt",
        1_795_428_000_000 + i,
        1_795_428_000_500 + i,
        "default",
        "icu",
        f"icu-{i % DEVICES}",
        f"P-{i % DEVICES}",
        "b",
        seq,
    )
    item = ObsItem("MDC_ECG_HEART_RATE", 60.0 + i % 40, "/min", meta.ts)
    return topics.INGEST, device, encode(Observations(meta, (item,)))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Tansu]:
    with tansu(tmp_path / "tansu") as b:
        yield b


def vitals_keys(path: Path) -> list[str]:
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as c:
            return [r[0] for r in c.execute("SELECT key FROM vitals")]
    except sqlite3.OperationalError:  # the worker has not created the table yet
        return []


async def metric(port: int, name: str, labels: str = "") -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name:
                total += float(value)
    return total


async def wait_for(cond: object, timeout: float, what: str, proc: Proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.popen is not None and proc.popen.poll() is None, f"worker died:\n{proc.tail()}"
        if await cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{proc.tail()}")


async def test_kill9_mid_stream_then_resends_lose_and_double_nothing(
    tmp_path: Path, broker: Tansu, pg: Postgres
) -> None:
    vitals = tmp_path / "vitals.db"
    db_url = pg.create_database("scaled_worker")
    env = {
        **os.environ,
        "VIGIL_DATABASE_URL": db_url,
        "VIGIL_KAFKA_URL": broker.url,
        "VIGIL_DATA_DIR": str(tmp_path / "data"),
        "VIGIL_VITALS_SQLITE": str(vitals),
        "VIGIL_LOG_LEVEL": "warning",
    }
    events = [obs(i) for i in range(N)]
    bus = KafkaBus(KafkaSettings([broker.bootstrap], client_id="test-producer"))
    await bus.start()

    async def produce(records: list[tuple[str, str, bytes]], per_s: float) -> None:
        chunk = 50
        for i in range(0, len(records), chunk):
            await bus.append(records[i : i + chunk])
            await asyncio.sleep(chunk / per_s)

    port1 = free_port()
    w1 = Proc(
        [sys.executable, "-m", "vigil.worker"],
        tmp_path / "w1.log",
        env={**env, "VIGIL_HTTP_PORT": str(port1)},
        cwd=ROOT,
    ).start()
    w2: Proc | None = None
    try:
        await produce(events[:400], 2000)  # a backlog the first worker starts on
        producing = asyncio.create_task(produce(events[400:], 150))  # the rest streams in for ~10 s

        async def some_stored() -> bool:
            return len(vitals_keys(vitals)) >= 700

        await wait_for(some_stored, 45, "the first worker to store 700 points", w1)
        w1.kill9()
        killed_at = len(vitals_keys(vitals))
        assert killed_at < N, "the kill came too late to be mid-stream"

        port2 = free_port()
        w2 = Proc(
            [sys.executable, "-m", "vigil.worker"],
            tmp_path / "w2.log",
            env={**env, "VIGIL_HTTP_PORT": str(port2), "VIGIL_WORKER_FAIL_BATCHES": str(FAIL_BATCHES)},
            cwd=ROOT,
        ).start()
        await producing
        await produce(events[:DUPLICATES], 2000)  # devices resend: same event ids, new offsets
        w2_proc = w2

        async def all_stored() -> bool:
            return len(vitals_keys(vitals)) >= N

        await wait_for(all_stored, 45, f"all {N} points", w2_proc)

        async def dups_counted() -> bool:
            try:
                return await metric(port2, "vigil_duplicates_total") >= DUPLICATES
            except httpx.HTTPError:
                return False

        await wait_for(dups_counted, 20, "the resent events to be counted as duplicates", w2_proc)
        # The injected failures fall on whichever processors' batches come first (device, clinical, ...).
        assert await metric(port2, "vigil_processor_errors_total") >= FAIL_BATCHES
        assert await metric(port2, "vigil_worker_events_total", 'processor="device"') > 0

        async def healthy() -> bool:  # recovered: every processor's last batch went through
            async with httpx.AsyncClient() as client:
                health = await client.get(f"http://127.0.0.1:{port2}/healthz", timeout=5)
            return health.status_code == 200

        await wait_for(healthy, 15, "/healthz to report the worker recovered", w2_proc)

        keys = vitals_keys(vitals)
        expected = {f"{decode(v).meta.event_id}#0" for _, _, v in events}  # type: ignore[union-attr]
        assert len(keys) == len(set(keys)) == N  # exactly once: nothing missing, nothing twice
        assert set(keys) == expected

        def every_event(records: list[object]) -> bool:
            ids = {decode(r.value).meta.event_id for r in records}  # type: ignore[attr-defined]
            return len(ids) >= N

        clinical = await consume(broker.bootstrap, topics.CLINICAL, until=every_event, timeout=30)
        ids = [decode(r.value).meta.event_id for r in clinical]  # type: ignore[union-attr]
        assert set(ids) == {decode(v).meta.event_id for _, _, v in events}  # type: ignore[union-attr]
        # at-least-once downstream: a replayed batch re-emits; the resent duplicates are never emitted
        assert len(ids) >= N
        replayed = await metric(port2, "vigil_worker_replayed_total", 'processor="device"')
        # replayed: applied before the kill but not yet committed to Kafka (faust commits every 2.8 s), then
        # skipped by the stored offset; almost always > 0, not asserted (a kill right after a commit gives 0)
        print(f"killed at {killed_at} points; replayed and skipped {replayed:.0f}; clinical {len(ids)}")
    finally:
        await bus.stop()
        w1.stop()
        if w2 is not None:
            w2.stop()
