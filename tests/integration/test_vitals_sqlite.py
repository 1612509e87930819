"""SqliteVitalsStore against a real SQLite file: read-back, trends, latest, idempotence, retention."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streams.ports import VitalPoint
from streams.schemas import FLAG_ARTIFACT, FLAG_FUTURE_TS
from streams.vitals.sqlite import DAY_MS, SqliteVitalsStore

pytestmark = pytest.mark.integration

T0 = 1_795_428_000_000
HR = "MDC_ECG_HEART_RATE"
SPO2 = "MDC_PULS_OXIM_SAT_O2"


def point(
    i: int,
    *,
    code: str = HR,
    patient: str | None = "P-1",
    ts: int | None = None,
    received_at: int | None = None,
    value: float = 72.0,
    flags: tuple[str, ...] = (),
    device: str = "mon-1",
) -> VitalPoint:
    ts = T0 + i * 1000 if ts is None else ts
    return VitalPoint(
        key=f"{device}/obs/b1/{i}#{code}",
        site_id="default",
        unit_id="icu",
        bed_id="icu-1",
        patient_id=patient,
        device_id=device,
        code=code,
        value=value,
        unit="/min" if code == HR else "%",
        ts=ts,
        received_at=ts + 50 if received_at is None else received_at,
        flags=flags,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteVitalsStore]:
    s = SqliteVitalsStore(tmp_path / "vitals.db")
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_write_and_read_back(store: SqliteVitalsStore) -> None:
    pts = [point(i, value=60.0 + i) for i in range(10)] + [point(i, code=SPO2, value=97.0) for i in range(3)]
    pts.append(point(99, flags=(FLAG_ARTIFACT, "late"), value=350.0))
    await store.write(pts)
    got = await store.query(patient_id="P-1", code=HR, since=T0)
    assert got == sorted([p for p in pts if p.code == HR], key=lambda p: p.ts)
    assert got[-1].flags == (FLAG_ARTIFACT, "late")
    assert got[0].unit_id == "icu" and got[0].bed_id == "icu-1"
    assert len(await store.query(patient_id="P-1", code=SPO2, since=T0)) == 3
    assert await store.query(patient_id="P-2", code=HR, since=T0) == []
    assert await store.ready()


async def test_trend_range_and_limit(store: SqliteVitalsStore) -> None:
    await store.write([point(i) for i in range(100)])
    got = await store.query(patient_id="P-1", code=HR, since=T0 + 10_000, until=T0 + 19_000)
    assert [p.ts for p in got] == [T0 + i * 1000 for i in range(10, 20)]  # both ends included
    assert len(await store.query(patient_id="P-1", code=HR, since=T0 + 90_000)) == 10
    limited = await store.query(patient_id="P-1", code=HR, since=T0, limit=5)
    assert [p.ts for p in limited] == [T0 + i * 1000 for i in range(5)]  # oldest first


async def test_repeat_write_is_a_no_op(store: SqliteVitalsStore) -> None:
    pts = [point(i) for i in range(50)]
    await store.write(pts)
    await store.write(pts)  # a redelivered batch
    await store.write([*pts[10:20], point(50)])
    got = await store.query(patient_id="P-1", code=HR, since=0)
    assert len(got) == 51
    assert len({p.key for p in got}) == 51


async def test_latest_per_code(store: SqliteVitalsStore) -> None:
    await store.write([point(i, value=60.0 + i) for i in range(10)])
    await store.write([point(i, code=SPO2, value=90.0 + i) for i in range(5)])
    await store.write([point(3, code=HR, value=1.0, device="mon-2")])  # older than mon-1's newest
    latest = await store.latest(patient_id="P-1")
    assert set(latest) == {HR, SPO2}
    assert latest[HR].value == 69.0 and latest[HR].ts == T0 + 9000
    assert latest[SPO2].value == 94.0
    assert await store.latest(patient_id="nobody") == {}


async def test_future_device_clock_never_pins_latest(store: SqliteVitalsStore) -> None:
    await store.write([point(i) for i in range(5)])
    # As the gateway stores it: flagged, ordered by received time.
    flagged = point(100, ts=T0 + 5000, received_at=T0 + 5000, flags=(FLAG_FUTURE_TS,), value=80.0)
    # And one that slipped through unflagged with a device clock a day ahead: it must not pin latest.
    rogue = point(101, ts=T0 + DAY_MS, received_at=T0 + 6000, value=200.0)
    await store.write([flagged, rogue])
    assert (await store.latest(patient_id="P-1"))[HR].key == flagged.key
    await store.write([point(7, value=75.0)])  # a later real reading takes over
    assert (await store.latest(patient_id="P-1"))[HR].value == 75.0
    # A ts exactly 5 minutes ahead of received time is still within the contract.
    edge = point(102, ts=T0 + 600_000, received_at=T0 + 300_000, value=66.0)
    await store.write([edge])
    assert (await store.latest(patient_id="P-1"))[HR].key == edge.key


async def test_prune_drops_only_points_past_retention(tmp_path: Path) -> None:
    store = SqliteVitalsStore(tmp_path / "v.db", retention_ms=10 * DAY_MS)
    await store.start()
    try:
        old = [point(i, ts=T0 - 11 * DAY_MS + i) for i in range(30)]
        fresh = [point(1000 + i, ts=T0 - 9 * DAY_MS + i) for i in range(20)]
        await store.write(old + fresh)
        assert await store.prune(T0) == 30
        assert await store.prune(T0) == 0
        got = await store.query(patient_id="P-1", code=HR, since=0)
        assert {p.key for p in got} == {p.key for p in fresh}
    finally:
        await store.close()


async def test_points_survive_reopen_and_use_wal(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    store = SqliteVitalsStore(path)
    await store.start()
    await store.write([point(i) for i in range(10)])
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = SqliteVitalsStore(path)
    await again.start()
    try:
        assert len(await again.query(patient_id="P-1", code=HR, since=0)) == 10
    finally:
        await again.close()


async def test_large_batches_are_stored_whole(store: SqliteVitalsStore) -> None:
    # Speed is measured by bench/ scripts, never asserted here; this checks a big batch lands whole.
    for b in range(3):
        await store.write([point(b * 10_000 + i, patient=f"P-{i % 40}") for i in range(10_000)])
    assert len(await store.query(patient_id="P-0", code=HR, since=0, limit=100_000)) == 750
