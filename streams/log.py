"""The embedded runtime's durable log: an append-only, partitioned SQLite log with consumer offsets.

One writer thread owns the write connection. Appends and commits queue up while a transaction runs and go
together into the next one (group commit), so the cost of an fsync is shared by every message in it. A
record is durable, and may be acknowledged upstream, once `append` returns. Recent records stay in memory
per partition, so consumers that keep up never read the file.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.clock import Clock, SystemClock
from streams.ports import LogRecord
from streams.topics import tick_partition

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
  topic TEXT NOT NULL, part INTEGER NOT NULL, off INTEGER NOT NULL,
  key TEXT NOT NULL, value BLOB NOT NULL, at INTEGER NOT NULL,
  PRIMARY KEY (topic, part, off)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS offsets (
  grp TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, off INTEGER NOT NULL,
  PRIMARY KEY (grp, topic, part)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
  ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
  PRIMARY KEY (ns, key)) WITHOUT ROWID;
"""


class LogUnavailableError(Exception):
    """The log could not make a record durable; the sender must not be acknowledged."""


@dataclass(slots=True)
class _Append:
    records: Sequence[tuple[str, str, bytes]]
    at: int
    future: asyncio.Future[list[LogRecord]]


@dataclass(slots=True)
class _Commit:
    group: str
    topic: str
    partition: int
    offset: int
    state: Sequence[tuple[str, str, bytes | None]]
    records: Sequence[tuple[str, str, bytes]]
    at: int
    future: asyncio.Future[list[LogRecord]]


def partition_for(key: str, partitions: int) -> int:
    """Stable across processes and restarts (unlike `hash`); a tick key names its partition."""
    if key[:1] == "~":
        tick = tick_partition(key)
        if tick is not None:
            return tick % partitions
    return zlib.crc32(key.encode()) % partitions


class SqliteLog:
    """The `Bus` port on SQLite, plus keyed processor state committed atomically with offsets."""

    def __init__(
        self,
        path: Path,
        *,
        partitions: Mapping[str, int],
        synchronous: str = "FULL",
        tail: int = 20_000,
        default_partitions: int = 4,
        clock: Clock | None = None,
    ) -> None:
        self._path = path
        self._clock: Clock = clock or SystemClock()
        self._partitions = dict(partitions)
        self._default_partitions = default_partitions
        self._synchronous = synchronous
        self._tail_size = tail
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._next: dict[tuple[str, int], int] = {}
        self._tails: dict[tuple[str, int], collections.deque[LogRecord]] = {}
        self._positions: dict[tuple[str, str, int], int] = {}
        self._waiters: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._pending: list[_Append | _Commit] = []
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False
        # (last offset, append time) marks per partition, oldest first: pruning deletes by primary-key range
        # up to the newest mark older than the cutoff, never scanning what it keeps.
        self._marks: dict[tuple[str, int], collections.deque[tuple[int, int]]] = {}
        self.appended = 0
        self.transactions = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._wconn = await loop.run_in_executor(self._writer, self._open, True)
        self._rconn = await loop.run_in_executor(self._reader, self._open, False)
        rows = await loop.run_in_executor(
            self._writer,
            lambda: self._w.execute(
                "SELECT topic, part, MAX(off) FROM records GROUP BY topic, part"
            ).fetchall(),
        )
        for topic, part, off in rows:
            self._next[(topic, part)] = off + 1
        rows = await loop.run_in_executor(
            self._writer,
            lambda: self._w.execute(
                "SELECT topic, part, MAX(off) FROM offsets GROUP BY topic, part"
            ).fetchall(),
        )
        for topic, part, off in rows:
            # Offsets survive pruning even when every record of a partition was pruned.
            self._next[(topic, part)] = max(self._next.get((topic, part), 0), off + 1)
        started = self._clock.now_ms()
        for tp, nxt in self._next.items():
            self._marks[tp] = collections.deque([(nxt - 1, started)])  # all older records: "as of now"

    def _open(self, write: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        if write:
            conn.executescript(_SCHEMA)
        return conn

    @property
    def _w(self) -> sqlite3.Connection:
        assert self._wconn is not None, "log not started"
        return self._wconn

    async def close(self) -> None:
        self._closed = True
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await self._flushing
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(None)
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            await loop.run_in_executor(self._writer, self._wconn.close)
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    # -- Bus -------------------------------------------------------------------------------------------

    def partitions(self, topic: str) -> int:
        return self._partitions.get(topic, self._default_partitions)

    def partition_of(self, topic: str, key: str) -> int:
        return partition_for(key, self.partitions(topic))

    def end_offset(self, topic: str, partition: int) -> int:
        """The offset the next record of this partition will get."""
        return self._next.get((topic, partition), 0)

    async def append(self, records: Sequence[tuple[str, str, bytes]], *, at: int | None = None) -> None:
        await self.append_records(records, at=at)

    async def append_records(
        self, records: Sequence[tuple[str, str, bytes]], *, at: int | None = None
    ) -> list[LogRecord]:
        """Append and return the stored records with their partitions and offsets."""
        if self._closed:
            raise LogUnavailableError("log is closed")
        if not records:
            return []
        fut: asyncio.Future[list[LogRecord]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Append(records, self._clock.now_ms() if at is None else at, fut))
        self._kick()
        return await fut

    async def commit(
        self,
        group: str,
        topic: str,
        partition: int,
        offset: int,
        state: Sequence[tuple[str, str, bytes | None]] = (),
        records: Sequence[tuple[str, str, bytes]] = (),
    ) -> None:
        """Commit a consumer offset with keyed state (namespace, key, value or None to delete) and the
        records its batch emits (topic, key, value), all in one transaction: emitted exactly once."""
        fut: asyncio.Future[list[LogRecord]] = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Commit(group, topic, partition, offset, state, records, self._clock.now_ms(), fut)
        )
        self._kick()
        await fut

    async def read(
        self, group: str, topic: str, partition: int, *, max_records: int = 500, timeout: float = 0.5
    ) -> list[LogRecord]:
        pos_key = (group, topic, partition)
        pos = self._positions.get(pos_key)
        if pos is None:
            pos = await self.committed(group, topic, partition) + 1
            self._positions[pos_key] = pos
        out = await self._fetch(topic, partition, pos, max_records)
        if not out and timeout > 0 and not self._closed:
            waiter = self._waiters.get((topic, partition))
            if waiter is None or waiter.done():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters[(topic, partition)] = waiter
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            out = await self._fetch(topic, partition, pos, max_records)
        if out:
            self._positions[pos_key] = out[-1].offset + 1
        return out

    def seek(self, group: str, topic: str, partition: int, offset: int) -> None:
        """Make the next read of this group start at `offset` (used after a failed batch)."""
        self._positions[(group, topic, partition)] = offset

    async def committed(self, group: str, topic: str, partition: int) -> int:
        """The last committed offset of a group, -1 when none."""
        row = await asyncio.get_running_loop().run_in_executor(
            self._reader,
            lambda: self._r.execute(
                "SELECT off FROM offsets WHERE grp=? AND topic=? AND part=?", (group, topic, partition)
            ).fetchone(),
        )
        return int(row[0]) if row else -1

    async def records_after(self, topic: str, partition: int, after: int, limit: int) -> list[LogRecord]:
        """Records with offset > `after`, for replay to clients that resume."""
        return await self._fetch(topic, partition, after + 1, limit)

    async def wait_for_records(self, topic: str, partition: int, after: int, timeout: float) -> None:
        """Return once a record with offset > `after` exists, or after `timeout` seconds."""
        if self._next.get((topic, partition), 0) > after + 1 or self._closed:
            return
        waiter = self._waiters.get((topic, partition))
        if waiter is None or waiter.done():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[(topic, partition)] = waiter
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), timeout)

    async def first_offset(self, topic: str, partition: int) -> int:
        """The oldest offset still kept (the end offset when the partition is empty)."""
        row = await asyncio.get_running_loop().run_in_executor(
            self._reader,
            lambda: self._r.execute(
                "SELECT MIN(off) FROM records WHERE topic=? AND part=?", (topic, partition)
            ).fetchone(),
        )
        return int(row[0]) if row and row[0] is not None else self.end_offset(topic, partition)

    async def load_state(self, namespace: str, keys: Iterable[str]) -> dict[str, bytes]:
        wanted = list(keys)
        if not wanted:
            return {}

        def q() -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for k, v in self._r.execute(
                    f"SELECT key, value FROM state WHERE ns=? AND key IN ({marks})", (namespace, *chunk)
                ):
                    out[k] = v
            return out

        return await asyncio.get_running_loop().run_in_executor(self._reader, q)

    async def load_all_state(self, namespace: str) -> dict[str, bytes]:
        def q() -> dict[str, bytes]:
            return dict(self._r.execute("SELECT key, value FROM state WHERE ns=?", (namespace,)).fetchall())

        return await asyncio.get_running_loop().run_in_executor(self._reader, q)

    async def prune(self, *, older_than_ms: int, by_time: Sequence[str] = ()) -> int:
        """Delete records appended before `older_than_ms` that every consumer group has committed.

        Topics in `by_time` have no consumer group (clients follow them by cursor): age alone decides.
        """
        loop = asyncio.get_running_loop()
        committed: dict[tuple[str, int], int] = dict(
            ((t, p), off)
            for t, p, off in await loop.run_in_executor(
                self._reader,
                lambda: self._r.execute(
                    "SELECT topic, part, MIN(off) FROM offsets GROUP BY topic, part"
                ).fetchall(),
            )
        )
        ranges: list[tuple[str, int, int]] = []
        for tp, marks in self._marks.items():
            old = None
            while marks and marks[0][1] < older_than_ms:
                old = marks.popleft()[0]
            if old is None:
                continue
            done = self._next.get(tp, 0) - 1 if tp[0] in by_time else committed.get(tp, -1)
            upto = min(old, done)
            if upto < old:  # not yet consumed: keep the mark for the next round
                marks.appendleft((old, older_than_ms - 1))
            if upto >= 0:
                ranges.append((tp[0], tp[1], upto))

        def run() -> int:
            return sum(
                self._w.execute("DELETE FROM records WHERE topic=? AND part=? AND off<=?", r).rowcount
                for r in ranges
            )

        if not ranges:
            return 0
        deleted = await loop.run_in_executor(self._writer, run)
        for topic, part, upto in ranges:
            tail = self._tails.get((topic, part))
            while tail and tail[0].offset <= upto:
                tail.popleft()  # readers by cursor must not see what the file no longer holds
        return deleted

    # -- internals -------------------------------------------------------------------------------------

    @property
    def _r(self) -> sqlite3.Connection:
        assert self._rconn is not None, "log not started"
        return self._rconn

    async def _fetch(self, topic: str, partition: int, pos: int, limit: int) -> list[LogRecord]:
        tail = self._tails.get((topic, partition))
        end = self._next.get((topic, partition), 0)
        if pos >= end:
            return []
        if tail and tail[0].offset <= pos:
            start = pos - tail[0].offset
            stop = min(start + limit, len(tail))
            return [tail[i] for i in range(start, stop)]

        def q() -> list[LogRecord]:
            rows = self._r.execute(
                "SELECT off, key, value FROM records WHERE topic=? AND part=? AND off>=? "
                "ORDER BY off LIMIT ?",
                (topic, partition, pos, limit),
            ).fetchall()
            return [LogRecord(topic, partition, off, key, value) for off, key, value in rows]

        return await asyncio.get_running_loop().run_in_executor(self._reader, q)

    def _mark(self, stored: list[LogRecord], at: int) -> None:
        last: dict[tuple[str, int], int] = {}
        for rec in stored:
            last[(rec.topic, rec.partition)] = rec.offset
        for tp, off in last.items():
            marks = self._marks.setdefault(tp, collections.deque())
            if marks and at - marks[-1][1] < 1000:
                marks[-1] = (off, max(at, marks[-1][1]))  # one mark a second is fine-grained enough
            else:
                marks.append((off, at))

    def _kick(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await loop.run_in_executor(self._writer, self._write, batch)
            except Exception as exc:  # the disk or the file failed: nobody in the batch is acknowledged
                log.exception("log write failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(LogUnavailableError(str(exc)))
                continue
            self.transactions += 1
            touched: set[tuple[str, int]] = set()
            for job, stored in zip(batch, results, strict=True):
                for rec in stored:
                    tp = (rec.topic, rec.partition)
                    tail = self._tails.get(tp)
                    if tail is None:
                        tail = self._tails[tp] = collections.deque(maxlen=self._tail_size)
                    tail.append(rec)
                    self._next[tp] = rec.offset + 1
                    touched.add(tp)
                if stored:
                    self._mark(stored, job.at)
                self.appended += len(stored)
                if not job.future.done():
                    job.future.set_result(stored)
            for tp in touched:
                waiter = self._waiters.pop(tp, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    def _write(self, batch: list[_Append | _Commit]) -> list[list[LogRecord]]:
        conn = self._w
        nxt = dict(self._next)  # committed to self._next by the loop only after the transaction succeeds
        results: list[list[LogRecord]] = []
        rows: list[tuple[Any, ...]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in batch:
                stored: list[LogRecord] = []
                for topic, key, value in job.records:
                    part = partition_for(key, self._partitions.get(topic, self._default_partitions))
                    off = nxt.get((topic, part), 0)
                    nxt[(topic, part)] = off + 1
                    rows.append((topic, part, off, key, value, job.at))
                    stored.append(LogRecord(topic, part, off, key, value))
                results.append(stored)
                if isinstance(job, _Commit):
                    conn.execute(
                        "INSERT INTO offsets(grp, topic, part, off) VALUES (?,?,?,?) "
                        "ON CONFLICT(grp, topic, part) DO UPDATE SET off=excluded.off",
                        (job.group, job.topic, job.partition, job.offset),
                    )
                    puts = [(ns, k, v) for ns, k, v in job.state if v is not None]
                    dels = [(ns, k) for ns, k, v in job.state if v is None]
                    if puts:
                        conn.executemany("INSERT OR REPLACE INTO state(ns, key, value) VALUES (?,?,?)", puts)
                    if dels:
                        conn.executemany("DELETE FROM state WHERE ns=? AND key=?", dels)
            if rows:
                conn.executemany(
                    "INSERT INTO records(topic, part, off, key, value, at) VALUES (?,?,?,?,?,?)", rows
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return results
