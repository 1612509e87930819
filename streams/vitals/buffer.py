"""A buffer on disk in front of a `VitalsStore`: a store outage delays vitals, loses none.

Writes go straight to the store while it answers and nothing is queued; otherwise to the on-disk queue,
which a background task drains into the store with retries (write-behind)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from streams.clock import Clock
from streams.ports import VitalPoint, VitalsStore
from streams.vitals.influx import StoreRejectedError
from streams.vitals.sqlite import SqliteWorker, transaction

log = logging.getLogger(__name__)

FUTURE_SLACK_MS = 5 * 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    patient_id TEXT,
    code TEXT NOT NULL,
    ts INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_patient_code_ts ON queue (patient_id, code, ts);
-- Points the store refused one by one (malformed for it): kept for an operator, never dropped.
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY,
    rejected_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    body BLOB NOT NULL
);
"""


def _encode(p: VitalPoint) -> tuple[str | None, str, int, int, bytes]:
    return (p.patient_id, p.code, p.ts, p.received_at, orjson.dumps(p))


def _decode(body: bytes) -> VitalPoint:
    d: dict[str, Any] = orjson.loads(body)
    d["flags"] = tuple(d.get("flags") or ())
    return VitalPoint(**d)


class BufferedVitalsStore:
    """Writes through to `inner` while it answers; else appends to a durable SQLite queue that is drained
    into `inner` in the background, with retries.

    It owns `inner`: `start()` and `close()` start and close it too.
    """

    def __init__(
        self,
        inner: VitalsStore,
        path: Path,
        *,
        clock: Clock,
        batch: int = 5000,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        close_timeout: float = 2.0,
        direct_timeout: float = 2.0,
    ) -> None:
        self._inner = inner
        self._path = path
        self._clock = clock
        self._batch = max(1, batch)
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._close_timeout = close_timeout
        self._direct_timeout = direct_timeout  # 0: always through the queue
        self._queue = SqliteWorker(
            path,
            name="vitals-buffer",
            pragmas=("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000"),
        )
        self._backlog = 0
        self._rejected = 0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._empty = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        await self._queue.open()
        await self._queue.run(lambda c: c.executescript(_SCHEMA))
        # Whatever a previous process left on disk is drained first: that is the backfill after a crash.
        self._backlog, self._rejected = await self._queue.run(
            lambda c: c.execute(
                "SELECT (SELECT count(*) FROM queue), (SELECT count(*) FROM rejected)"
            ).fetchone()
        )
        if self._backlog:
            log.info("vitals buffer %s: %d points left from before, backfilling", self._path, self._backlog)
        await self._inner.start()
        self._drain_task = asyncio.create_task(self._drain_forever(), name="vitals-buffer-drain")

    async def close(self) -> None:
        """Drain what the deadline allows; the rest stays on disk for the next start."""
        if self._drain_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), self._close_timeout)
            self._stop.set()
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
            self._drain_task = None
            if self._backlog:
                log.warning("vitals buffer closed with %d points queued on disk", self._backlog)
        await self._queue.close()
        await self._inner.close()

    async def write(self, points: Sequence[VitalPoint]) -> None:
        """Durable once this returns: in the store, or on disk and sent on when the store can take them.

        While nothing is queued the points go straight to the store (one round trip, no disk write and
        read-back); if it fails, refuses or takes longer than `direct_timeout`, they are queued, and so is
        everything after them until the queue has drained (the store is down: do not wait on it each time).
        A write that timed out may still land: the queued copy then rewrites the same points (idempotent).
        """
        if not points:
            return
        if self._backlog == 0 and self._direct_timeout > 0:
            try:
                await asyncio.wait_for(self._inner.write(points), self._direct_timeout)
            except Exception as e:  # down, slow, or refusing a point: the queue retries and sets it aside
                log.debug("direct vitals write failed, queueing %d points: %r", len(points), e)
            else:
                return
        rows = [_encode(p) for p in points]
        sql = "INSERT INTO queue (patient_id, code, ts, received_at, body) VALUES (?,?,?,?,?)"

        def append(c: sqlite3.Connection) -> None:
            transaction(c, lambda t: t.executemany(sql, rows).close())
            self._backlog += len(rows)  # counted on the queue's thread, in order with the drain's deletes

        await self._queue.run(append)
        self._wake.set()

    def backlog(self) -> int:
        """Points waiting on disk for the store."""
        return self._backlog

    def rejected(self) -> int:
        """Points the store refused one by one, kept in the buffer's `rejected` table."""
        return self._rejected

    async def flush(self) -> None:
        """Wait until the queue is empty (bound it with a timeout: the store may be down)."""
        while self._backlog:
            # The drain sets it the next time it finds the queue empty.
            self._empty.clear()
            await self._empty.wait()

    async def ready(self) -> bool:
        try:
            return await self._inner.ready()
        except Exception:  # a store that cannot even answer is not ready
            return False

    async def query(
        self, *, patient_id: str, code: str, since: int, until: int | None = None, limit: int = 10_000
    ) -> list[VitalPoint]:
        stored = await self._inner.query(
            patient_id=patient_id, code=code, since=since, until=until, limit=limit
        )
        sql = "SELECT body FROM queue WHERE patient_id = ? AND code = ? AND ts >= ?"
        args: list[object] = [patient_id, code, since]
        if until is not None:
            sql += " AND ts <= ?"
            args.append(until)
        rows = await self._queue.run(
            lambda c: c.execute(sql + " ORDER BY ts LIMIT ?", [*args, limit]).fetchall()
        )
        if not rows:
            return stored
        merged = {p.key: p for p in stored}
        for (body,) in rows:
            p = _decode(body)
            merged.setdefault(p.key, p)
        return sorted(merged.values(), key=lambda p: (p.ts, p.key))[:limit]

    async def latest(self, *, patient_id: str) -> dict[str, VitalPoint]:
        try:
            out = await self._inner.latest(patient_id=patient_id)
        except Exception as e:  # the board keeps what is queued rather than going blank during an outage
            log.debug("vitals store latest failed, answering from the buffer: %r", e)
            out = {}
        # SQLite takes the bare `body` column from the row holding max(ts).
        sql = (
            "SELECT code, max(ts), body FROM queue"
            " WHERE patient_id = ? AND ts <= received_at + ? GROUP BY code"
        )
        rows = await self._queue.run(lambda c: c.execute(sql, (patient_id, FUTURE_SLACK_MS)).fetchall())
        for code, ts, body in rows:
            have = out.get(code)
            if have is None or ts > have.ts:
                out[code] = _decode(body)
        return out

    async def _drain_forever(self) -> None:
        # A failure of the queue file itself (disk full, I/O error) must not end draining for good.
        while True:
            try:
                await self._drain_loop()
            except Exception:
                log.exception("vitals buffer drain failed; retrying in %.1f s", self._retry_max)
                await self._pause(self._retry_max)

    async def _drain_loop(self) -> None:
        size = self._batch
        delay = self._retry_initial
        outage_since: float | None = None
        while True:
            self._wake.clear()
            rows = await self._queue.run(functools.partial(self._next_batch, size=size))
            if not rows:
                self._empty.set()
                await self._wake.wait()
                continue
            try:
                await self._inner.write([_decode(body) for _, body in rows])
            except StoreRejectedError as e:
                if len(rows) > 1:
                    # Halve the batch until the refused point is alone, so the rest still goes through.
                    size = max(1, len(rows) // 2)
                    continue
                await self._set_aside(rows[0], str(e))
                size = self._batch
                continue
            except Exception as e:  # the store is down or failing: keep the queue and retry
                if outage_since is None:
                    outage_since = self._clock.monotonic()
                    log.warning(
                        "vitals store unavailable, buffering on disk (%d queued): %r", self._backlog, e
                    )
                await self._pause(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            # Only now is the batch the store's: delete it (a crash before this resends it, idempotently).
            await self._queue.run(functools.partial(self._delete_through, last=rows[-1][0]))
            if outage_since is not None:
                log.warning(
                    "vitals store back after %.1f s, backfilling %d queued points",
                    self._clock.monotonic() - outage_since,
                    self._backlog,
                )
                outage_since = None
            delay = self._retry_initial
            size = min(self._batch, size * 2)

    def _next_batch(self, c: sqlite3.Connection, size: int) -> list[tuple[int, bytes]]:
        rows: list[tuple[int, bytes]] = c.execute(
            "SELECT seq, body FROM queue ORDER BY seq LIMIT ?", (size,)
        ).fetchall()
        if not rows:
            self._backlog = 0
        return rows

    def _delete_through(self, c: sqlite3.Connection, last: int) -> None:
        n = transaction(c, lambda t: t.execute("DELETE FROM queue WHERE seq <= ?", (last,)).rowcount)
        self._backlog -= n

    async def _set_aside(self, row: tuple[int, bytes], reason: str) -> None:
        seq, body = row
        log.error(
            "vitals store refused point %s; kept in the buffer's rejected table: %s",
            _decode(body).key,
            reason,
        )
        now = self._clock.now_ms()

        def move(c: sqlite3.Connection) -> None:
            c.execute("INSERT OR REPLACE INTO rejected VALUES (?,?,?,?)", (seq, now, reason, body))
            c.execute("DELETE FROM queue WHERE seq = ?", (seq,))
            self._backlog -= 1
            self._rejected += 1

        await self._queue.run(lambda c: transaction(c, move))

    async def _pause(self, seconds: float) -> None:
        # New writes do not cut a backoff short (that would hammer a store that is down); close() does.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
