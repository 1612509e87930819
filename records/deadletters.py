"""Dead letters at rest: every refused message with its reason code, kept for `GET /api/v1/deadletters`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from records.db import Database
from records.models import DeadLetterRecord
from streams.schemas import DeadLetter

_FIELDS = tuple(f.name for f in dataclasses.fields(DeadLetter))


async def add_deadletters(db: Database, items: Sequence[DeadLetter]) -> None:
    """Store a batch in one transaction; an id stored before is skipped, so redelivery is harmless."""
    if not items:
        return
    rows = [{name: getattr(item, name) for name in _FIELDS} for item in items]
    insert = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
    statement = insert(DeadLetterRecord).on_conflict_do_nothing(index_elements=["id"])
    async with db.session() as session:
        await session.execute(statement, rows)


async def list_deadletters(
    db: Database, *, sites: set[str] | None, since: int, limit: int = 100
) -> list[DeadLetter]:
    """Dead letters received at or after `since`, oldest first; `sites=None` includes those of no site."""
    query = (
        select(DeadLetterRecord)
        .where(DeadLetterRecord.received_at >= since)
        .order_by(DeadLetterRecord.received_at, DeadLetterRecord.id)
        .limit(limit)
    )
    if sites is not None:
        query = query.where(DeadLetterRecord.site_id.in_(sites))
    async with db.session(read_only=True) as session:
        rows = (await session.execute(query)).scalars().all()
    return [DeadLetter(**{name: getattr(r, name) for name in _FIELDS}) for r in rows]
