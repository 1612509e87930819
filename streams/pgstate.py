"""Processor state behind the port (design rule 6) in the records database: PostgreSQL scaled, SQLite too.

The scaled worker (`vigil/worker.py`) keeps each key's state here instead of in faust Tables, which lose
their changelog's tail on tansu (docs/SCALED_SPIKE.md). Per batch and source partition it writes the touched
keys' state and the last applied source offset in ONE transaction, and lets Kafka commit only afterwards. A
replay after a crash therefore re-delivers only events at or below the stored offset, which are skipped.

The offset never moves backwards: a commit below the stored offset (a zombie worker that lost its partition,
a replay racing the new owner) is refused as a whole, state included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from records.db import Database
from records.state_models import ProcessorOffset, ProcessorState

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
