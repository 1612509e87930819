"""The embedded `VitalsStore`: one SQLite file, written by one thread, read on another connection."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from streams.ports import VitalPoint

T = TypeVar("T")

DAY_MS = 86_400_000
# A point whose ts is further ahead of its received time than this never pins "latest" (contract section 3).
FUTURE_SLACK_MS = 5 * 60_000
_PRUNE_CHUNK = 20_000


class SqliteWorker:
    """One SQLite connection owned by one thread; work runs there so the event loop never blocks."""

    def __init__(self, path: Path, *, name: str, pragmas: Sequence[str] = ()) -> None:
        self._path = path
        self._pragmas = tuple(pragmas)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._submit(self._connect)

    def _connect(self) -> None:
        # Autocommit mode: every write transaction is an explicit BEGIN IMMEDIATE ... COMMIT.
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=30.0)
        for pragma in self._pragmas:
            conn.execute(f"PRAGMA {pragma}")
        self._conn = conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the worker thread.

        A cursor freed on another thread resets its cached statement while this thread may be running it
        again ("bad parameter or other API misuse"), so a returned cursor is closed here, on its own thread.
        """

        def call() -> T:
            result = fn(self._connection())
            if isinstance(result, sqlite3.Cursor):
                result.close()
            return result

        return await self._submit(call)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self._path} is not open: call start() first")
        return self._conn

    async def _submit(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._submit(conn.close)
        self._pool.shutdown(wait=True)


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn` in one write transaction: all of it is durable, or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


_SCHEMA = """
CREATE TABLE IF NOT EXISTS vitals (
    key TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    unit_id TEXT,
    bed_id TEXT,
    patient_id TEXT,
    device_id TEXT NOT NULL,
    code TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT NOT NULL,
    ts INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    flags TEXT NOT NULL DEFAULT ''
);
-- Serves trends (ascending) and latest (walked backwards; received_at is there for the future-ts filter).
CREATE INDEX IF NOT EXISTS vitals_patient_code_ts ON vitals (patient_id, code, ts, received_at);
CREATE INDEX IF NOT EXISTS vitals_ts ON vitals (ts);
"""

_COLUMNS = "key, site_id, unit_id, bed_id, patient_id, device_id, code, value, unit, ts, received_at, flags"
_Row = tuple[str, str, str | None, str | None, str | None, str, str, float, str, int, int, str]


def _to_row(p: VitalPoint) -> _Row:
    return (
        p.key,
        p.site_id,
        p.unit_id,
        p.bed_id,
        p.patient_id,
        p.device_id,
        p.code,
        float(p.value),
        p.unit,
        p.ts,
        p.received_at,
        ",".join(p.flags),
    )


def _from_row(r: _Row) -> VitalPoint:
    return VitalPoint(
        key=r[0],
        site_id=r[1],
        unit_id=r[2],
        bed_id=r[3],
        patient_id=r[4],
        device_id=r[5],
        code=r[6],
        value=r[7],
        unit=r[8],
        ts=r[9],
        received_at=r[10],
        flags=tuple(r[11].split(",")) if r[11] else (),
    )


class SqliteVitalsStore:
    """Vitals in SQLite (WAL, synchronous=FULL): durable once `write` returns, idempotent by key."""

    def __init__(self, path: Path, *, retention_ms: int = 30 * DAY_MS) -> None:
        self._path = path
        self.retention_ms = retention_ms
        # Durability matters more than speed: the pipeline commits its offsets after write() returns.
        self._writer = SqliteWorker(
            path,
            name="vitals-sqlite-writer",
            # A larger page cache keeps index pages hot: batched inserts touch many of them.
            pragmas=("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000", "cache_size=-65536"),
        )
        self._reader = SqliteWorker(
            path,
            name="vitals-sqlite-reader",
            pragmas=("busy_timeout=30000", "query_only=1", "cache_size=-32768"),
        )

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        await self._writer.open()
        await self._writer.run(lambda c: c.executescript(_SCHEMA))
        await self._reader.open()

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def write(self, points: Sequence[VitalPoint]) -> None:
        if not points:
            return
        rows = [_to_row(p) for p in points]
        sql = f"INSERT OR IGNORE INTO vitals ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
        await self._writer.run(lambda c: transaction(c, lambda t: t.executemany(sql, rows).close()))

    async def query(
        self, *, patient_id: str, code: str, since: int, until: int | None = None, limit: int = 10_000
    ) -> list[VitalPoint]:
        sql = f"SELECT {_COLUMNS} FROM vitals WHERE patient_id = ? AND code = ? AND ts >= ?"
        args: list[object] = [patient_id, code, since]
        if until is not None:
            sql += " AND ts <= ?"
            args.append(until)
        sql += " ORDER BY ts, key LIMIT ?"
        args.append(limit)
        rows = await self._reader.run(lambda c: c.execute(sql, args).fetchall())
        return [_from_row(r) for r in rows]

    async def latest(self, *, patient_id: str) -> dict[str, VitalPoint]:
        # Skip-scan the patient's codes through the index, then take each code's newest point whose ts
        # is not further ahead of its received time than the contract allows.
        sql = f"""
            WITH RECURSIVE codes(c) AS (
                SELECT min(code) FROM vitals WHERE patient_id = :p
                UNION ALL
                SELECT (SELECT min(code) FROM vitals WHERE patient_id = :p AND code > c)
                FROM codes WHERE c IS NOT NULL
            )
            SELECT {_COLUMNS} FROM codes JOIN vitals ON vitals.rowid = (
                SELECT rowid FROM vitals
                WHERE patient_id = :p AND code = codes.c AND ts <= received_at + :slack
                ORDER BY ts DESC, received_at DESC LIMIT 1
            )
        """
        args = {"p": patient_id, "slack": FUTURE_SLACK_MS}
        rows = await self._reader.run(lambda c: c.execute(sql, args).fetchall())
        return {r[6]: _from_row(r) for r in rows}

    async def prune(self, now_ms: int) -> int:
        """Delete points older than the retention window; answers how many went."""
        cutoff = now_ms - self.retention_ms
        sql = "DELETE FROM vitals WHERE rowid IN (SELECT rowid FROM vitals WHERE ts < ? LIMIT ?)"
        total = 0
        while True:
            # Small transactions, so a large prune never holds the write lock for long.
            n = await self._writer.run(
                lambda c: transaction(c, lambda t: t.execute(sql, (cutoff, _PRUNE_CHUNK)).rowcount)
            )
            total += n
            if n < _PRUNE_CHUNK:
                return total

    async def ready(self) -> bool:
        try:
            await self._reader.run(lambda c: c.execute("SELECT 1").fetchone())
        except (sqlite3.Error, RuntimeError):
            return False
        return True
