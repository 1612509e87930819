"""BufferedVitalsStore against real stores: an outage, a kill -9 of the writer, a point the store refuses."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streams.clock import SystemClock
from streams.ports import VitalPoint
from streams.vitals.buffer import BufferedVitalsStore
from streams.vitals.influx import InfluxVitalsStore
from tests.servers_tsdb import influxdb16, victoria_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HR = "MDC_ECG_HEART_RATE"
T0 = SystemClock().now_ms() - 3_600_000


def point(i: int, patient: str, *, ts: int | None = None) -> VitalPoint:
    ts = T0 + i * 10 if ts is None else ts
    return VitalPoint(
        key=f"mon-1/obs/b1/{i}#0",
        site_id="default",
        unit_id="icu",
        bed_id="icu-1",
        patient_id=patient,
        device_id="mon-1",
        code=HR,
        value=float(60 + i % 40),
        unit="/min",
        ts=ts,
        received_at=ts + 30,
    )


def buffered(url: str, path: Path, *, api: str = "v2") -> BufferedVitalsStore:
    inner = InfluxVitalsStore(url, api="v1" if api == "v1" else "v2", timeout=1.0)
    return BufferedVitalsStore(inner, path, clock=SystemClock(), retry_initial=0.05, retry_max=0.5)


async def test_store_outage_mid_stream_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streams.vitals.buffer")
    with victoria_metrics(tmp_path / "vm") as vm:
        buf = buffered(vm.url, tmp_path / "buffer.db")
        await buf.start()
        try:
            n = 0
            for batch in range(20):
                if batch == 5:
                    vm.stop()
                if batch == 15:
                    vm.start()
                await buf.write([point(n + i, "P-out") for i in range(100)])
                n += 100
                if batch == 10:
                    assert buf.backlog() > 0
                    assert not await buf.ready()
                    # The board keeps what is queued while the store is down.
                    assert (await buf.latest(patient_id="P-out"))[HR].ts == T0 + (n - 1) * 10
                await asyncio.sleep(0.05)
            await asyncio.wait_for(buf.flush(), 30)
            assert buf.backlog() == 0
            assert await buf.ready()
        finally:
            await buf.close()
        assert vm.distinct_timestamps('vitals_value{patient="P-out"}') == {T0 + i * 10 for i in range(n)}
    outage = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage) == 1  # once per outage, not per retry
    assert any("back after" in r.getMessage() for r in caplog.records)


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import tests.integration.test_vitals_buffer as t
    from tests.integration.test_vitals_buffer import buffered, point

    t.T0 = int(sys.argv[4])  # the parent's time base, so both sides name the same points

    async def main(url: str, path: str, n: int) -> None:
        buf = buffered(url, Path(path))
        await buf.start()
        for start in range(0, n, 250):
            await buf.write([point(i, "P-crash") for i in range(start, min(n, start + 250))])
            print("acked", min(n, start + 250), flush=True)
        await asyncio.sleep(3600)  # killed while the drain retries against the stopped store

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


async def test_kill_9_then_restart_backfills_everything(tmp_path: Path) -> None:
    n = 3000
    path = tmp_path / "buffer.db"
    with victoria_metrics(tmp_path / "vm") as vm:
        vm.stop()  # the store is down for the whole life of the first process
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, vm.url, str(path), str(n), str(T0)],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parents[2],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        try:
            assert child.stdout is not None
            acked = 0
            while acked < n:
                line = child.stdout.readline().decode()
                assert line, f"child exited with {child.poll()}"
                acked = int(line.split()[1])
            await asyncio.sleep(0.3)  # let the drain fail a few times first
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        assert child.returncode == -signal.SIGKILL

        vm.start()
        buf = buffered(vm.url, path)
        await buf.start()
        try:
            assert buf.backlog() == n  # everything acknowledged was on disk
            await asyncio.wait_for(buf.flush(), 30)
        finally:
            await buf.close()
        assert vm.distinct_timestamps('vitals_value{patient="P-crash"}') == {T0 + i * 10 for i in range(n)}


async def test_a_refused_point_is_set_aside_and_the_rest_arrives(tmp_path: Path) -> None:
    with influxdb16(tmp_path / "influx") as influx:
        buf = buffered(influx.url, tmp_path / "buffer.db", api="v1")
        await buf.start()
        try:
            pts = [point(i, "P-poison") for i in range(99)]
            pts.insert(40, point(999, "P-poison", ts=10**16))  # past year 2262: InfluxDB refuses it
            await buf.write(pts)
            await asyncio.wait_for(buf.flush(), 30)
            assert buf.rejected() == 1
            got = await buf.query(patient_id="P-poison", code=HR, since=T0)
            assert [p.key for p in got] == [p.key for p in pts if p.ts < 10**16]
        finally:
            await buf.close()


async def test_while_the_store_answers_points_go_straight_to_it(tmp_path: Path) -> None:
    """No disk write and read-back on the hot path while the store is up: the queue is for outages."""
    import sqlite3  # noqa: PLC0415

    path = tmp_path / "buffer.db"
    with victoria_metrics(tmp_path / "vm") as vm:
        buf = buffered(vm.url, path)
        await buf.start()
        try:
            for start in range(0, 500, 100):
                await buf.write([point(i, "P-direct") for i in range(start, start + 100)])
                assert buf.backlog() == 0
        finally:
            await buf.close()
        with sqlite3.connect(path) as c:
            assert c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'queue'").fetchone() is None
        got = vm.distinct_timestamps('vitals_value{patient="P-direct"}')
        assert got == {T0 + i * 10 for i in range(500)}
