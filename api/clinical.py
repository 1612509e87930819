"""Manual observations, nurse-to-bed assignments, the per-unit roster and the audit log, over HTTP.

A manual entry is validated with the device item rules (`streams.validation.parse_manual_observations`) and
then takes the device path: `ctx.submit` appends it to the ingest topic, where it is deduplicated, stored in
the vitals store and pushed live like any monitor's reading, from device `manual:{username}`.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path, Query, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.app import iso, parse_time
from api.auth import CLINICAL_ROLES, Principal, require
from records.audit import audit, list_audit
from records.db import transaction
from records.errors import NotFoundError
from records.models import AuditLog
from records.places import BedInfo, PatientInfo, get_bed, get_patient, list_beds
from records.staff import (
    StaffError,
    UnitInfo,
    assign_nurse,
    current_assignments,
    current_roster,
    get_unit,
    set_roster,
    valid_group,
)
from streams.codes import resolve_code
from streams.schemas import Observations
from streams.validation import parse_manual_observations

if TYPE_CHECKING:
    from api.app import ApiContext

MANUAL_ROLES = ("nurse", "charge_nurse", "doctor")
STAFF_ADMIN_ROLES = ("charge_nurse", "admin")
AUDIT_ROLES = ("charge_nurse", "admin")
MANUAL_ACTION = "patient.observations.manual"
IDEMPOTENCY_WINDOW_MS = 86_400_000  # a retried entry is recognised by its key for a day
_KEY = re.compile(r"[!-~]{1,128}")  # printable ASCII, as HTTP header values safely are


class AssignRequest(BaseModel):
    username: str = Field(min_length=1, max_length=128)


class RosterRequest(BaseModel):
    usernames: list[str] = Field(max_length=32)


def manual_device_id(username: str) -> str:
    return f"manual:{username}"


def manual_event_id(
    username: str, patient_id: str, *, key: str | None, received_at: int, content: bytes
) -> str:
    """Deterministic: a retry with the same Idempotency-Key maps to the same event (dedup downstream)."""
    device = manual_device_id(username)
    if key is not None:
        digest = hashlib.sha256(f"{username}\0{patient_id}\0{key}".encode()).hexdigest()[:32]
        return f"{device}/obs/key/{digest}"
    return f"{device}/obs/rx/{received_at}/{hashlib.sha256(content).hexdigest()[:16]}"


def _items_json(event: Observations) -> list[dict[str, Any]]:
    out = []
    for item in event.items:
        info = resolve_code(item.code)
        out.append(
            {
                "code": item.code,
                "alias": info.alias if info else item.code,
                "value": item.value,
                "unit": item.unit,
                "ts": iso(item.ts),
                "flags": list(item.flags),
            }
        )
    return out


def install(app: FastAPI, ctx: ApiContext) -> None:
    """Add this module's routes to the app."""

    async def visible_patient(patient_id: str, p: Principal) -> tuple[PatientInfo, BedInfo | None]:
        patient = await get_patient(ctx.db, patient_id)
        bed = await get_bed(ctx.db, patient.bed_id) if patient is not None and patient.bed_id else None
        if patient is None or not p.sees(patient.site_id, bed.unit_id if bed else None):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
        return patient, bed

    async def visible_bed(bed_id: str, p: Principal) -> BedInfo:
        bed = await get_bed(ctx.db, bed_id)
        if bed is None or not p.sees(bed.site_id, bed.unit_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bed")
        return bed

    async def visible_unit(unit_id: str, p: Principal) -> UnitInfo:
        unit = await get_unit(ctx.db, unit_id)
        if unit is None or not p.sees(unit.site_id, unit.id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such unit")
        return unit

    def at_param(at: str | None) -> int:
        return parse_time(at, "at") if at else ctx.clock.now_ms()

    @app.post("/api/v1/patients/{patient_id}/observations", tags=["patients"], status_code=201)
    async def manual_observations(
        patient_id: str,
        body: dict[str, Any] = Body(),  # noqa: B008  (checked item by item with the device rules)
        idempotency_key: str | None = Header(default=None, alias="Idempotency-Key"),
        p: Principal = Depends(require(MANUAL_ROLES)),  # noqa: B008
    ) -> JSONResponse:
        patient, bed = await visible_patient(patient_id, p)
        if idempotency_key is not None and _KEY.fullmatch(idempotency_key) is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY, "Idempotency-Key: 1-128 printable ASCII characters"
            )
        received_at = ctx.clock.now_ms()
        content = orjson.dumps(
            {"obs": body.get("obs"), "ts": body.get("ts")}, option=orjson.OPT_SORT_KEYS, default=str
        )
        content_hash = hashlib.sha256(content).hexdigest()
        event_id = manual_event_id(
            p.username, patient_id, key=idempotency_key, received_at=received_at, content=content
        )
        unit_id = bed.unit_id if bed else None
        parsed = parse_manual_observations(
            body.get("obs"),
            raw_ts=body.get("ts"),
            event_id=event_id,
            device_id=manual_device_id(p.username),
            site_id=patient.site_id,
            unit_id=unit_id,
            bed_id=patient.bed_id,
            patient_id=patient_id,
            received_at=received_at,
        )
        if parsed.event is None:
            refused = [{"index": r.index, "reason": r.reason, "detail": r.detail} for r in parsed.refused]
            return JSONResponse(
                {"detail": "observations refused; nothing was stored", "refused": refused}, status_code=422
            )
        event = parsed.event
        async with transaction(ctx.db) as session:
            if idempotency_key is not None:
                earlier = await _earlier_entry(session, patient_id, event_id, received_at)
                if earlier is not None:
                    if earlier.get("content") != content_hash:
                        raise HTTPException(
                            status.HTTP_409_CONFLICT, "this Idempotency-Key was used for another entry"
                        )
                    return JSONResponse(
                        earlier["answer"], status_code=201, headers={"Idempotent-Replayed": "true"}
                    )
            answer = {
                "patient_id": patient_id,
                "event_id": event_id,
                "device_id": manual_device_id(p.username),
                "site_id": patient.site_id,
                "unit_id": unit_id,
                "bed_id": patient.bed_id,
                "items": _items_json(event),
            }
            await audit(
                session,
                at=received_at,
                actor=p.username,
                action=MANUAL_ACTION,
                target_type="patient",
                target_id=patient_id,
                site_id=patient.site_id,
                detail={
                    "event_id": event_id,
                    "codes": [i.code for i in event.items],
                    "idempotency_key": idempotency_key,
                    "content": content_hash,
                    "answer": answer,
                },
            )
            # Appended before the audit row commits: a failed append rolls the audit back with it.
            await ctx.submit([event])
        return JSONResponse(answer, status_code=201)

    @app.get("/api/v1/audit", tags=["ops"])
    async def audit_log(
        after: int = Query(default=0, ge=0),
        target_type: str | None = Query(default=None, max_length=32),
        target_id: str | None = Query(default=None, max_length=128),
        limit: int = Query(default=100, ge=1, le=1000),
        p: Principal = Depends(require(AUDIT_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        rows = await list_audit(
            ctx.db,
            sites=p.site_filter(),
            after_seq=after,
            target_type=target_type,
            target_id=target_id,
            limit=limit,
        )
        items = [
            {
                "seq": r.seq,
                "at": iso(r.at),
                "actor": r.actor,
                "action": r.action,
                "target_type": r.target_type,
                "target_id": r.target_id,
                "site_id": r.site_id,
                "detail": {k: v for k, v in r.detail.items() if k != "answer"},
            }
            for r in rows
        ]
        return {"items": items, "next_after": rows[-1].seq if len(rows) == limit else None}

    @app.put("/api/v1/beds/{bed_id}/assignment", tags=["staff"])
    async def assign(
        bed_id: str,
        body: AssignRequest,
        p: Principal = Depends(require(STAFF_ADMIN_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        bed = await visible_bed(bed_id, p)
        now = ctx.clock.now_ms()
        try:
            row = await assign_nurse(ctx.db, bed_id=bed_id, username=body.username, at=now, actor=p.username)
        except StaffError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(e)) from None
        except NotFoundError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bed") from None
        return {
            "bed_id": bed_id,
            "unit_id": bed.unit_id,
            "username": body.username,
            "from": iso(row.from_at) if row else None,
        }

    @app.delete("/api/v1/beds/{bed_id}/assignment", tags=["staff"])
    async def unassign(
        bed_id: str,
        p: Principal = Depends(require(STAFF_ADMIN_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        bed = await visible_bed(bed_id, p)
        await assign_nurse(ctx.db, bed_id=bed_id, username=None, at=ctx.clock.now_ms(), actor=p.username)
        return {"bed_id": bed_id, "unit_id": bed.unit_id, "username": None, "from": None}

    @app.get("/api/v1/units/{unit_id}/assignments", tags=["staff"])
    async def assignments(
        unit_id: str,
        at: str | None = Query(default=None),
        p: Principal = Depends(require(CLINICAL_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        unit = await visible_unit(unit_id, p)
        when = at_param(at)
        current = {a.bed_id: a for a in await current_assignments(ctx.db, at=when, unit_id=unit_id)}
        beds = [b for b in await list_beds(ctx.db, site_id=unit.site_id) if b.unit_id == unit_id]
        items = []
        for bed in beds:  # every bed, so an unassigned one shows as such
            a = current.get(bed.id)
            items.append(
                {
                    "bed_id": bed.id,
                    "patient_id": bed.patient_id,
                    "username": a.username if a else None,
                    "from": iso(a.from_at) if a else None,
                }
            )
        return {"unit_id": unit_id, "at": iso(when), "items": items}

    @app.put("/api/v1/units/{unit_id}/roster/{group}", tags=["staff"])
    async def put_roster(
        unit_id: str,
        body: RosterRequest,
        group: str = Path(max_length=32),
        p: Principal = Depends(require(STAFF_ADMIN_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        await visible_unit(unit_id, p)
        if not valid_group(group):
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY, "group: lower case letters, digits and _ (up to 32)"
            )
        now = ctx.clock.now_ms()
        try:
            await set_roster(
                ctx.db, unit_id=unit_id, group=group, usernames=body.usernames, at=now, actor=p.username
            )
        except StaffError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(e)) from None
        return {"unit_id": unit_id, "group": group, "usernames": body.usernames, "from": iso(now)}

    @app.get("/api/v1/units/{unit_id}/roster", tags=["staff"])
    async def get_roster(
        unit_id: str,
        at: str | None = Query(default=None),
        p: Principal = Depends(require(CLINICAL_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        await visible_unit(unit_id, p)
        when = at_param(at)
        groups = await current_roster(ctx.db, unit_id=unit_id, at=when)
        items = [{"group": g, "usernames": names} for g, names in sorted(groups.items())]
        return {"unit_id": unit_id, "at": iso(when), "items": items}


async def _earlier_entry(
    session: AsyncSession, patient_id: str, event_id: str, now: int
) -> dict[str, Any] | None:
    """The audit detail of an entry already made with this event id (a retried POST), if any."""
    query = select(AuditLog.detail).where(
        AuditLog.action == MANUAL_ACTION,
        AuditLog.target_type == "patient",
        AuditLog.target_id == patient_id,
        AuditLog.at >= now - IDEMPOTENCY_WINDOW_MS,
    )
    for (detail,) in (await session.execute(query)).all():
        if isinstance(detail, dict) and detail.get("event_id") == event_id:
            return detail
    return None
