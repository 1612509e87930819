"""The audit log: who did what to which record, and when. Append-only (the database refuses changes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from records.db import Database
from records.models import AuditLog


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: int
    actor: str
    action: str
    target_type: str
    target_id: str
    site_id: str | None
    detail: dict[str, Any] = field(default_factory=dict)


async def audit(
    session: AsyncSession,
    *,
    at: int,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    site_id: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one row in the caller's transaction, so the change and its record commit together."""
    session.add(
        AuditLog(
            at=at,
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            site_id=site_id,
            detail=detail or {},
        )
    )
    await session.flush()


async def list_audit(
    db: Database,
    *,
    sites: set[str] | None = None,
    after_seq: int = 0,
    target_type: str | None = None,
    target_id: str | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """Rows after `after_seq`, oldest first; `sites=None` is every site (rows without a site included)."""
    query = select(AuditLog).where(AuditLog.seq > after_seq).order_by(AuditLog.seq).limit(limit)
    if sites is not None:
        query = query.where(AuditLog.site_id.in_(sites))
    if target_type is not None:
        query = query.where(AuditLog.target_type == target_type)
    if target_id is not None:
        query = query.where(AuditLog.target_id == target_id)
    async with db.session(read_only=True) as session:
        rows = (await session.execute(query)).scalars().all()
    return [
        AuditEntry(r.seq, r.at, r.actor, r.action, r.target_type, r.target_id, r.site_id, dict(r.detail))
        for r in rows
    ]
