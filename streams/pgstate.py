"""Processor state behind the port (design rule 6) in the records database: PostgreSQL scaled, SQLite too.

The scaled worker (`vigil/worker.py`) keeps each key's state here instead of in faust Tables, which lose
their changelog's tail on tansu (docs/SCALED_SPIKE.md). Per batch and source partition it writes the touched
keys' state and the last applied source offset in ONE transaction, and lets Kafka commit only afterwards. A
replay after a crash therefore re-delivers only events at or below the stored offset, which are skipped.

The offset never moves backwards: a commit below the stored offset (a zombie worker that lost its partition,
a replay racing the new owner) is refused as a whole, state included.

On PostgreSQL the commit is one statement on the asyncpg connection (`_PG_COMMIT`: the offset move, the
upserts and the deletes as data-modifying CTEs, rows passed as arrays): one round trip and no ORM work per
partition batch, which was a seventh of a worker's CPU through SQLAlchemy's bulk insert. SQLite keeps the
ORM path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from records.db import Database
from records.state_models import ProcessorOffset, ProcessorState

# One statement, so atomic by itself: state is written and deleted only when the offset moved (`moved` has a
# row); ON CONFLICT DO UPDATE locks the offset row, so a concurrent commit of the same partition waits for
# this one and then sees its offset. A key is in at most one of the upsert and delete arrays.
_PG_COMMIT = """
WITH moved AS (
    INSERT INTO processor_offsets ("group", topic, "partition", "offset") VALUES ($1, $2, $3, $4)
    ON CONFLICT ("group", topic, "partition") DO UPDATE SET "offset" = excluded."offset"
    WHERE processor_offsets."offset" <= excluded."offset"
    RETURNING 1
), upserted AS (
    INSERT INTO processor_state (namespace, key, value)
    SELECT u.n, u.k, u.v FROM unnest($5::text[], $6::text[], $7::bytea[]) AS u(n, k, v)
    WHERE EXISTS (SELECT 1 FROM moved)
    ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value
), deleted AS (
    DELETE FROM processor_state s USING unnest($8::text[], $9::text[]) AS d(n, k)
    WHERE s.namespace = d.n AND s.key = d.k AND EXISTS (SELECT 1 FROM moved)
)
SELECT count(*) FROM moved
"""
_CHUNK = 500  # keys per IN (...) list: far below SQLite's and asyncpg's parameter limits


class OffsetRegressionError(Exception):
    """A commit tried to move a partition's applied offset backwards; nothing of it was written."""


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


class SqlStateStore:
    """Keyed processor state and applied offsets, committed atomically (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert: Any = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
        self._server_error: type[Exception] = Exception
        if db.dialect == "postgresql":
            from asyncpg import PostgresError  # noqa: PLC0415 - the driver of PostgreSQL URLs only

            self._server_error = PostgresError

    async def load(self, namespace: str, keys: Iterable[str]) -> dict[str, bytes]:
        """The stored state of those `keys` that have one."""
        wanted = sorted(set(keys))
        out: dict[str, bytes] = {}
        if not wanted:
            return out
        async with self._db.session(read_only=True) as s:
            for chunk in _chunks(wanted):
                rows = await s.execute(
                    select(ProcessorState.key, ProcessorState.value).where(
                        ProcessorState.namespace == namespace, ProcessorState.key.in_(chunk)
                    )
                )
                out.update((k, bytes(v)) for k, v in rows.all())
        return out

    async def load_all(self, namespace: str) -> dict[str, bytes]:
        """Every stored state of a namespace (a timed processor rebuilds its due index from them)."""
        async with self._db.session(read_only=True) as s:
            rows = await s.execute(
                select(ProcessorState.key, ProcessorState.value).where(ProcessorState.namespace == namespace)
            )
            return {k: bytes(v) for k, v in rows.all()}

    async def applied(self, group: str, topic: str, partition: int) -> int:
        """The last applied offset of the partition for `group`; -1 when nothing was applied yet."""
        async with self._db.session(read_only=True) as s:
            off = await s.scalar(
                select(ProcessorOffset.offset).where(
                    ProcessorOffset.group == group,
                    ProcessorOffset.topic == topic,
                    ProcessorOffset.partition == partition,
                )
            )
        return -1 if off is None else int(off)

    async def commit(
        self,
        group: str,
        topic: str,
        partition: int,
        offset: int,
        states: Sequence[tuple[str, str, bytes | None]],
    ) -> None:
        """In one transaction: move the applied offset to `offset` (equal is allowed, lower is refused with
        OffsetRegressionError) and upsert each (namespace, key, state), deleting those whose state is None."""
        if self._db.dialect == "postgresql":
            await self._commit_pg(group, topic, partition, offset, states)
            return
        ins = self._insert(ProcessorOffset).values(
            group=group, topic=topic, partition=partition, offset=offset
        )
        move = ins.on_conflict_do_update(
            index_elements=[ProcessorOffset.group, ProcessorOffset.topic, ProcessorOffset.partition],
            set_={"offset": ins.excluded.offset},
            where=ProcessorOffset.offset <= ins.excluded.offset,
        ).returning(ProcessorOffset.offset)
        upserts = [{"namespace": ns, "key": k, "value": v} for ns, k, v in states if v is not None]
        deletes: dict[str, list[str]] = {}
        for ns, k, v in states:
            if v is None:
                deletes.setdefault(ns, []).append(k)
        async with self._db.session() as s:
            # The offset row first: on PostgreSQL it also locks the partition against a concurrent commit.
            if (await s.execute(move)).first() is None:
                raise OffsetRegressionError(
                    f"{group} {topic}/{partition}: applied offset is past {offset}; commit refused"
                )
            if upserts:
                up = self._insert(ProcessorState)
                await s.execute(
                    up.on_conflict_do_update(
                        index_elements=[ProcessorState.namespace, ProcessorState.key],
                        set_={"value": up.excluded.value},
                    ),
                    upserts,
                )
            for ns, keys in deletes.items():
                for chunk in _chunks(keys):
                    await s.execute(
                        delete(ProcessorState).where(
                            ProcessorState.namespace == ns, ProcessorState.key.in_(chunk)
                        )
                    )

    async def _commit_pg(
        self,
        group: str,
        topic: str,
        partition: int,
        offset: int,
        states: Sequence[tuple[str, str, bytes | None]],
    ) -> None:
        up_ns: list[str] = []
        up_keys: list[str] = []
        up_values: list[bytes] = []
        del_ns: list[str] = []
        del_keys: list[str] = []
        for ns, k, v in states:
            if v is None:
                del_ns.append(ns)
                del_keys.append(k)
            else:
                up_ns.append(ns)
                up_keys.append(k)
                up_values.append(v)
        async with self._db.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                moved = await raw.driver_connection.fetchval(  # type: ignore[union-attr]
                    _PG_COMMIT, group, topic, partition, offset, up_ns, up_keys, up_values, del_ns, del_keys
                )
            except Exception as e:
                # SQLAlchemy did not see this statement fail: a broken link must not go back to the pool (an
                # error PostgreSQL answered with leaves the connection usable).
                if not isinstance(e, self._server_error):
                    raw.invalidate()
                raise
        if not moved:
            raise OffsetRegressionError(
                f"{group} {topic}/{partition}: applied offset is past {offset}; commit refused"
            )
