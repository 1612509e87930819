"""Units with their bed counts, for the boards (read only)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from records.db import Database, transaction
from records.models import Bed, Unit


@dataclass(frozen=True, slots=True)
class UnitInfo:
    id: str
    site_id: str
    name: str
    beds: int


async def list_units(
    db: Database | AsyncSession, *, sites: Collection[str] | None = None, unit_id: str | None = None
) -> list[UnitInfo]:
    """Units (of the given sites, or all; or just `unit_id`) with how many beds each has, by id."""
    count = select(Bed.unit_id, func.count(Bed.id).label("n")).group_by(Bed.unit_id).subquery()
    query = select(Unit, func.coalesce(count.c.n, 0)).outerjoin(count, count.c.unit_id == Unit.id)
    if sites is not None:
        query = query.where(Unit.site_id.in_(list(sites)))
    if unit_id is not None:
        query = query.where(Unit.id == unit_id)
    async with transaction(db, read_only=True) as session:
        rows = (await session.execute(query.order_by(Unit.id))).all()
    return [UnitInfo(u.id, u.site_id, u.name, int(n)) for u, n in rows]
