"""InfluxVitalsStore: v2 writes against VictoriaMetrics; v1 writes and InfluxQL reads against InfluxDB 1.6."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from streams.clock import SystemClock
from streams.ports import VitalPoint
from streams.schemas import FLAG_ARTIFACT, FLAG_FUTURE_TS
from streams.vitals.influx import (
    InfluxVitalsStore,
    StoreUnavailableError,
    quote_ident,
    quote_str,
    to_line,
)
from tests.servers import free_port
from tests.servers_tsdb import InfluxDB16, VictoriaMetrics, influxdb16, victoria_metrics

pytestmark = pytest.mark.integration

HR = "MDC_ECG_HEART_RATE"
SPO2 = "MDC_PULS_OXIM_SAT_O2"
# Both servers refuse samples far in the future, so the points sit around the real present.
T0 = SystemClock().now_ms() - 3_600_000


def point(
    i: int,
    *,
    patient: str = "P-1",
    code: str = HR,
    value: float = 72.0,
    ts: int | None = None,
    received_at: int | None = None,
    flags: tuple[str, ...] = (),
    bed: str | None = "icu-1",
    device: str = "mon-1",
) -> VitalPoint:
    ts = T0 + i * 1000 if ts is None else ts
    return VitalPoint(
        key=f"{device}/obs/b1/{i}#{code}",
        site_id="default",
        unit_id="icu north",  # a space: escaped in line protocol
        bed_id=bed,
        patient_id=patient,
        device_id=device,
        code=code,
        value=value,
        unit="/min" if code == HR else "%",
        ts=ts,
        received_at=ts + 40 if received_at is None else received_at,
        flags=flags,
    )


# Pure logic: the line protocol and InfluxQL quoting.


def test_line_protocol_escapes_and_omits_empty_tags() -> None:
    p = point(0, patient='P,1 "x"=y', bed=None, flags=(FLAG_ARTIFACT, "late"))
    line = to_line(p)
    assert line is not None
    assert line.startswith(r'vitals,code=MDC_ECG_HEART_RATE,device=mon-1,patient=P\,1\ "x"\=y,site=default')
    assert r",unit=icu\ north " in line and "bed=" not in line
    assert 'unit="/min",flags="artifact,late",received_at=' in line
    assert line.endswith(f'i,key="mon-1/obs/b1/0#{HR}" {T0}')
    assert to_line(point(0, value=float("nan"))) is None
    assert 'key="a\\"b\\\\c"' in (to_line(dataclasses.replace(p, key='a"b\\c')) or "")


def test_influxql_quoting_cannot_be_escaped() -> None:
    assert quote_str("P-1") == "'P-1'"
    assert quote_str("x' OR 1=1 --") == "'x\\' OR 1=1 --'"
    assert quote_str("a\\'b") == "'a\\\\\\'b'"
    assert quote_ident('we"ird') == '"we\\"ird"'


# v2 path (influxdb-client) against VictoriaMetrics.


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    with victoria_metrics(tmp_path_factory.mktemp("vm")) as server:
        yield server


@pytest.fixture
async def vm_store(vm: VictoriaMetrics) -> AsyncIterator[InfluxVitalsStore]:
    store = InfluxVitalsStore(vm.url, api="v2", token="unused", org="vigil", bucket="vitals")
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def test_v2_write_reaches_victoriametrics_with_tags(
    vm: VictoriaMetrics, vm_store: InfluxVitalsStore
) -> None:
    pts = [point(i, patient="P-v2", value=60.0 + i) for i in range(500)]
    await vm_store.write(pts)
    await vm_store.write(pts[:100])  # a repeat: VictoriaMetrics keeps duplicate samples
    series = vm.export('vitals_value{patient="P-v2"}')
    assert len(series) == 1
    labels = series[0]["metric"]
    assert labels == {
        "__name__": "vitals_value",
        "site": "default",
        "unit": "icu north",
        "bed": "icu-1",
        "patient": "P-v2",
        "device": "mon-1",
        "code": HR,
    }
    assert vm.distinct_timestamps('vitals_value{patient="P-v2"}') == {p.ts for p in pts}
    by_ts = dict(zip(series[0]["timestamps"], series[0]["values"], strict=True))
    assert by_ts[T0 + 7000] == 67.0
    received = vm.export('vitals_received_at{patient="P-v2"}')
    assert {int(v) for v in received[0]["values"]} == {p.received_at for p in pts}
    assert await vm_store.ready()


async def test_victoriametrics_reads_fail_loudly_rather_than_look_empty(vm_store: InfluxVitalsStore) -> None:
    # VictoriaMetrics has no InfluxQL: a trend that came back empty would read as "no data" to a clinician.
    await vm_store.write([point(0, patient="P-vm-read")])
    with pytest.raises(StoreUnavailableError, match="InfluxQL"):
        await vm_store.query(patient_id="P-vm-read", code=HR, since=T0 - 1000)
    with pytest.raises(StoreUnavailableError):
        await vm_store.latest(patient_id="P-vm-read")


async def test_v2_write_to_a_dead_port_raises_unavailable() -> None:
    store = InfluxVitalsStore(f"http://127.0.0.1:{free_port()}", api="v2", timeout=1.0)
    await store.start()
    try:
        with pytest.raises(StoreUnavailableError):
            await store.write([point(0)])
        assert not await store.ready()
    finally:
        await store.close()


# v1 path and InfluxQL reads against InfluxDB 1.6.


@pytest.fixture(scope="module")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB16]:
    with influxdb16(tmp_path_factory.mktemp("influx")) as server:
        yield server


@pytest.fixture
async def v1_store(influx: InfluxDB16) -> AsyncIterator[InfluxVitalsStore]:
    store = InfluxVitalsStore(influx.url, api="v1", db=influx.db)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def test_v1_write_and_influxql_read_back(influx: InfluxDB16, v1_store: InfluxVitalsStore) -> None:
    pts = [
        point(i, patient="P-a", value=60.0 + i, flags=(FLAG_ARTIFACT,) if i == 3 else ()) for i in range(200)
    ]
    pts += [point(i, patient="P-a", code=SPO2, value=97.0, bed=None) for i in range(20)]
    await v1_store.write(pts)
    got = await v1_store.query(patient_id="P-a", code=HR, since=T0)
    assert got == [p for p in pts if p.code == HR]  # every field and tag round-trips, oldest first
    assert got[3].flags == (FLAG_ARTIFACT,)
    spo2 = await v1_store.query(patient_id="P-a", code=SPO2, since=T0)
    assert len(spo2) == 20 and spo2[0].bed_id is None and spo2[0].unit == "%"
    assert await v1_store.query(patient_id="P-b", code=HR, since=T0) == []
    assert (
        influx.query('SELECT count("value") FROM "vitals" WHERE "patient" = \'P-a\'')[0]["values"][0][1]
        == 220
    )
    assert await v1_store.ready()


async def test_v1_trend_window_and_limit(v1_store: InfluxVitalsStore) -> None:
    await v1_store.write([point(i, patient="P-w") for i in range(100)])
    got = await v1_store.query(patient_id="P-w", code=HR, since=T0 + 10_000, until=T0 + 19_000)
    assert [p.ts for p in got] == [T0 + i * 1000 for i in range(10, 20)]
    limited = await v1_store.query(patient_id="P-w", code=HR, since=T0, limit=5)
    assert [p.ts for p in limited] == [T0 + i * 1000 for i in range(5)]


async def test_v1_repeat_write_overwrites(influx: InfluxDB16, v1_store: InfluxVitalsStore) -> None:
    pts = [point(i, patient="P-r") for i in range(100)]
    await v1_store.write(pts)
    await v1_store.write(pts)
    await v1_store.write(pts[:30])
    assert len(await v1_store.query(patient_id="P-r", code=HR, since=T0)) == 100
    assert (
        influx.query('SELECT count("value") FROM "vitals" WHERE "patient" = \'P-r\'')[0]["values"][0][1]
        == 100
    )


async def test_v1_latest_per_code_and_future_clock(v1_store: InfluxVitalsStore) -> None:
    await v1_store.write([point(i, patient="P-l", value=60.0 + i) for i in range(10)])
    await v1_store.write([point(i, patient="P-l", code=SPO2, value=90.0 + i) for i in range(5)])
    await v1_store.write([point(2, patient="P-l", device="mon-2", value=1.0)])
    latest = await v1_store.latest(patient_id="P-l")
    assert set(latest) == {HR, SPO2}
    assert latest[HR].value == 69.0 and latest[HR].device_id == "mon-1"
    assert latest[SPO2].value == 94.0
    # A device clock a day ahead, stored unflagged by mistake, does not pin latest; flagged ones use
    # their received time, which is how the gateway stores them.
    now = SystemClock().now_ms()
    await v1_store.write([point(500, patient="P-l", ts=now + 86_400_000, received_at=now, value=200.0)])
    flagged = point(501, patient="P-l", ts=now, received_at=now, flags=(FLAG_FUTURE_TS,), value=77.0)
    await v1_store.write([flagged])
    assert (await v1_store.latest(patient_id="P-l"))[HR] == flagged
    assert await v1_store.latest(patient_id="nobody") == {}


async def test_v1_hostile_ids_are_data_not_query(v1_store: InfluxVitalsStore) -> None:
    weird = 'P\' OR "patient" =~ /.*/ --\\'
    await v1_store.write([point(i, patient=weird) for i in range(3)])
    await v1_store.write([point(i, patient="P-victim") for i in range(3)])
    got = await v1_store.query(patient_id=weird, code=HR, since=T0)
    # InfluxDB 1.x cannot store a trailing backslash in a tag: it reads back as U+2216, consistently.
    assert [p.patient_id for p in got] == [weird.replace("\\", "\u2216")] * 3
    assert len(await v1_store.query(patient_id="P-victim", code=HR, since=T0)) == 3
    assert set(await v1_store.latest(patient_id="P' OR '1'='1")) == set()


async def test_v1_store_down_raises_unavailable(tmp_path: Path) -> None:
    with influxdb16(tmp_path / "influx") as server:
        store = InfluxVitalsStore(server.url, api="v1", db=server.db, timeout=1.0)
        await store.start()
        try:
            await store.write([point(0, patient="P-d")])
            server.stop()
            assert not await store.ready()
            with pytest.raises(StoreUnavailableError):
                await store.write([point(1, patient="P-d")])
            with pytest.raises(StoreUnavailableError):
                await store.query(patient_id="P-d", code=HR, since=T0)
            server.start()
            await store.write([point(1, patient="P-d")])
            assert len(await store.query(patient_id="P-d", code=HR, since=T0)) == 2
        finally:
            await store.close()
