"""Alerts at rest: the clinical stage's `AlertRecords` port and the queries the API answers from.

Every write is idempotent (a redelivered batch changes nothing and audits nothing twice): a version row is
inserted only if new, and only a new one writes its audit row, in the same transaction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from records import alert_models as m
from records.audit import audit
from records.db import Database
from streams.effects import AlertVersion, RecordNews2
from streams.schemas import Alert, AlertPage

ACTIVE = ("active_unack", "active_ack", "cleared_unack")
_ALERT_FIELDS = tuple(f.name for f in dataclasses.fields(Alert))


def _rows(result: Any) -> int:
    """Rows a write touched (SQLAlchemy's CursorResult; the async result type hides it)."""
    return int(result.rowcount or 0)


def _row(alert: Alert) -> dict[str, Any]:
    return {name: getattr(alert, name) for name in _ALERT_FIELDS}


def alert_of(row: m.AlertRow) -> Alert:
    return Alert(**{name: getattr(row, name) for name in _ALERT_FIELDS})


class AlertStore:
    """Implements `streams.effects.AlertRecords` over the records database."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert: Any = postgresql.insert if db.dialect == "postgresql" else sqlite.insert

    async def record_alerts(self, items: Sequence[AlertVersion]) -> None:
        if not items:
            return
        async with self._db.session() as s:
            for v in items:
                a = v.alert
                stmt = (
                    self._insert(m.AlertVersionRow)
                    .values(
                        alert_id=a.id,
                        version=a.version,
                        from_status=v.from_status,
                        to_status=a.status,
                        reason=v.reason,
                        by=v.by,
                        at=a.updated_at,
                        alert=_row(a),
                    )
                    .on_conflict_do_nothing(index_elements=["alert_id", "version"])
                )
                inserted = _rows(await s.execute(stmt))
                if not inserted:
                    continue  # seen before: a redelivery
                await self._upsert(s, a)
                await audit(
                    s,
                    at=a.updated_at,
                    actor=v.by or "system",
                    action=f"alert.{v.reason}"[:64],
                    target_type="alert",
                    target_id=a.id[:128],
                    site_id=a.site_id,
                    detail={
                        "version": a.version,
                        "from": v.from_status,
                        "to": a.status,
                        "priority": a.priority,
                        "condition": a.condition,
                        "patient_id": a.patient_id,
                        "bed_id": a.bed_id,
                    },
                )

    async def _upsert(self, s: AsyncSession, a: Alert) -> None:
        row = _row(a)
        stmt = self._insert(m.AlertRow).values(**row)
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={k: stmt.excluded[k] for k in row if k != "id"},
            where=m.AlertRow.version < stmt.excluded.version,
        )
        await s.execute(stmt)

    async def record_pages(self, items: Sequence[AlertPage]) -> None:
        if not items:
            return
        async with self._db.session() as s:
            for p in items:
                stmt = (
                    self._insert(m.AlertPageRow)
                    .values(
                        alert_id=p.alert_id,
                        step=p.step,
                        alert_version=p.alert_version,
                        level=p.level,
                        recipients=list(p.recipients),
                        skipped=p.skipped,
                        at=p.at,
                    )
                    .on_conflict_do_nothing(index_elements=["alert_id", "step"])
                )
                if not _rows(await s.execute(stmt)):
                    continue
                await audit(
                    s,
                    at=p.at,
                    actor="system",
                    action="alert.escalation_skipped" if p.skipped else "alert.page",
                    target_type="alert",
                    target_id=p.alert_id[:128],
                    site_id=p.site_id,
                    detail={
                        "step": p.step,
                        "level": p.level,
                        "recipients": list(p.recipients),
                        "skipped": p.skipped,
                    },
                )

    async def record_news2(self, items: Sequence[RecordNews2]) -> None:
        newest: dict[str, RecordNews2] = {}
        for n in items:
            if n.patient_id not in newest or n.at >= newest[n.patient_id].at:
                newest[n.patient_id] = n
        if not newest:
            return
        async with self._db.session() as s:
            for n in newest.values():
                stmt = self._insert(m.News2Row).values(
                    patient_id=n.patient_id, site_id=n.site_id, at=n.at, result=n.result
                )
                stmt = stmt.on_conflict_do_update(
                    index_elements=["patient_id"],
                    set_={
                        "site_id": stmt.excluded.site_id,
                        "at": stmt.excluded.at,
                        "result": stmt.excluded.result,
                    },
                    where=m.News2Row.at <= stmt.excluded.at,
                )
                await s.execute(stmt)


# -- queries ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlertHistory:
    alert: Alert
    versions: list[dict[str, Any]]
    pages: list[dict[str, Any]]
    receipts: list[dict[str, Any]]


async def get_alert(db: Database, alert_id: str) -> Alert | None:
    async with db.session(read_only=True) as s:
        row = await s.get(m.AlertRow, alert_id)
        return None if row is None else alert_of(row)


async def list_alerts(
    db: Database,
    *,
    sites: set[str] | None,
    units: frozenset[str] | None,
    statuses: Sequence[str] | None = ACTIVE,
    patient_id: str | None = None,
    unit_id: str | None = None,
    since: int | None = None,
    until: int | None = None,
    limit: int = 500,
) -> list[Alert]:
    """Alerts the caller may see, newest change first."""
    q = select(m.AlertRow)
    if statuses is not None:
        q = q.where(m.AlertRow.status.in_(statuses))
    if sites is not None:
        q = q.where(m.AlertRow.site_id.in_(sites))
    if units is not None:
        q = q.where(m.AlertRow.unit_id.in_(units))
    if patient_id is not None:
        q = q.where(m.AlertRow.patient_id == patient_id)
    if unit_id is not None:
        q = q.where(m.AlertRow.unit_id == unit_id)
    if since is not None:
        q = q.where(m.AlertRow.updated_at >= since)
    if until is not None:
        q = q.where(m.AlertRow.updated_at <= until)
    q = q.order_by(m.AlertRow.updated_at.desc(), m.AlertRow.id).limit(limit)
    async with db.session(read_only=True) as s:
        return [alert_of(r) for r in (await s.execute(q)).scalars().all()]


async def list_history(
    db: Database,
    *,
    sites: set[str] | None,
    units: frozenset[str] | None,
    since: int,
    until: int | None = None,
    patient_id: str | None = None,
    unit_id: str | None = None,
    after: tuple[int, str] | None = None,
    limit: int = 100,
) -> list[Alert]:
    """Alerts open at any time in [since, until], open and closed, newest raised first.

    `after` is the (raised_at, id) of the last alert of the previous page (keyset paging: stable while
    new alerts arrive).
    """
    t = m.AlertRow
    q = select(t).where(or_(t.updated_at >= since, t.status != "closed"))
    if until is not None:
        q = q.where(t.raised_at <= until)
    if sites is not None:
        q = q.where(t.site_id.in_(sites))
    if units is not None:
        q = q.where(t.unit_id.in_(units))
    if patient_id is not None:
        q = q.where(t.patient_id == patient_id)
    if unit_id is not None:
        q = q.where(t.unit_id == unit_id)
    if after is not None:
        q = q.where(or_(t.raised_at < after[0], and_(t.raised_at == after[0], t.id < after[1])))
    q = q.order_by(t.raised_at.desc(), t.id.desc()).limit(limit)
    async with db.session(read_only=True) as s:
        return [alert_of(r) for r in (await s.execute(q)).scalars().all()]


async def alert_history(db: Database, alert_id: str) -> AlertHistory | None:
    async with db.session(read_only=True) as s:
        row = await s.get(m.AlertRow, alert_id)
        if row is None:
            return None
        versions = (
            await s.execute(
                select(m.AlertVersionRow)
                .where(m.AlertVersionRow.alert_id == alert_id)
                .order_by(m.AlertVersionRow.version)
            )
        ).scalars()
        pages = (
            await s.execute(
                select(m.AlertPageRow)
                .where(m.AlertPageRow.alert_id == alert_id)
                .order_by(m.AlertPageRow.step)
            )
        ).scalars()
        receipts = (
            await s.execute(
                select(m.AlertReceiptRow)
                .where(m.AlertReceiptRow.alert_id == alert_id)
                .order_by(m.AlertReceiptRow.received_at)
            )
        ).scalars()
        return AlertHistory(
            alert_of(row),
            [
                {
                    "version": v.version,
                    "from_status": v.from_status,
                    "to_status": v.to_status,
                    "reason": v.reason,
                    "by": v.by,
                    "at": v.at,
                }
                for v in versions
            ],
            [
                {
                    "step": p.step,
                    "level": p.level,
                    "alert_version": p.alert_version,
                    "recipients": list(p.recipients),
                    "skipped": p.skipped,
                    "at": p.at,
                }
                for p in pages
            ],
            [{"version": r.version, "username": r.username, "received_at": r.received_at} for r in receipts],
        )


async def record_receipt(db: Database, alert_id: str, version: int, username: str, at: int) -> bool:
    """Remember that `username`'s client showed this version; True the first time."""
    insert: Any = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(m.AlertReceiptRow)
        .values(alert_id=alert_id, version=version, username=username, received_at=at)
        .on_conflict_do_nothing(index_elements=["alert_id", "version", "username"])
    )
    async with db.session() as s:
        return bool(_rows(await s.execute(stmt)))


async def latest_news2(db: Database, patient_id: str) -> dict[str, Any] | None:
    async with db.session(read_only=True) as s:
        row = await s.get(m.News2Row, patient_id)
        return None if row is None else dict(row.result)


# -- per-patient limit overrides -------------------------------------------------------------------------


def override_json(r: m.PatientOverrideRow) -> dict[str, Any]:
    """The fields of `alerting.rules.PatientOverride`, as the engine takes them."""
    return {
        "condition": r.condition,
        "expires_at": r.expires_at,
        "threshold": r.threshold,
        "priority": r.priority,
        "delay_ms": r.delay_ms,
        "set_by": r.set_by,
        "reason": r.reason,
    }


async def list_overrides(db: Database, patient_id: str, *, at: int | None = None) -> list[dict[str, Any]]:
    q = select(m.PatientOverrideRow).where(m.PatientOverrideRow.patient_id == patient_id)
    if at is not None:
        q = q.where(m.PatientOverrideRow.expires_at > at)
    async with db.session(read_only=True) as s:
        rows = (await s.execute(q.order_by(m.PatientOverrideRow.condition))).scalars().all()
        return [{**override_json(r), "set_at": r.set_at} for r in rows]


async def set_override(
    db: Database, *, patient_id: str, site_id: str, override: dict[str, Any], at: int, actor: str
) -> list[dict[str, Any]]:
    """Store (or replace) one override, audited; answers the patient's whole current set."""
    fields = {k: override[k] for k in ("condition", "threshold", "priority", "delay_ms", "expires_at")}
    fields.update(set_by=actor, reason=str(override.get("reason") or "")[:500], set_at=at)
    insert: Any = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
    stmt = insert(m.PatientOverrideRow).values(patient_id=patient_id, **fields)
    # An upsert: two clinicians setting the same limit at once leave one of theirs, never a duplicate key.
    stmt = stmt.on_conflict_do_update(
        index_elements=["patient_id", "condition"],
        set_={k: stmt.excluded[k] for k in fields if k != "condition"},
    )
    async with db.session() as s:
        await s.execute(stmt)
        await audit(
            s,
            at=at,
            actor=actor,
            action="limits.set",
            target_type="patient",
            target_id=patient_id,
            site_id=site_id,
            detail={k: v for k, v in fields.items() if k != "set_at"},
        )
    return await list_overrides(db, patient_id)


async def remove_override(
    db: Database, *, patient_id: str, site_id: str, condition: str, at: int, actor: str
) -> bool:
    async with db.session() as s:
        gone = _rows(
            await s.execute(
                delete(m.PatientOverrideRow).where(
                    m.PatientOverrideRow.patient_id == patient_id, m.PatientOverrideRow.condition == condition
                )
            )
        )
        if gone:
            await audit(
                s,
                at=at,
                actor=actor,
                action="limits.removed",
                target_type="patient",
                target_id=patient_id,
                site_id=site_id,
                detail={"condition": condition},
            )
    return bool(gone)
