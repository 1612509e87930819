"""Unit and bed listings for the boards: the caller's units, and one unit's beds with their latest vitals."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, status

from api.app import ACVPU, ApiContext, iso
from api.auth import CLINICAL_ROLES, Principal, require
from records.places import list_beds
from records.units import list_units
from streams.codes import resolve_code
from streams.ports import VitalPoint


def _value(p: VitalPoint) -> float | str:
    return ACVPU[int(p.value)] if p.code == "acvpu" else p.value


def install(app: FastAPI, ctx: ApiContext) -> None:
    """Add `GET /api/v1/units` and `GET /api/v1/units/{unit_id}/beds`."""

    @app.get("/api/v1/units", tags=["board"])
    async def units(p: Principal = Depends(require(CLINICAL_ROLES))) -> dict[str, Any]:  # noqa: B008
        found = await list_units(ctx.db, sites=p.site_filter())
        return {
            "items": [
                {"id": u.id, "site_id": u.site_id, "name": u.name, "beds": u.beds}
                for u in found
                if p.sees(u.site_id, u.id)
            ]
        }

    @app.get("/api/v1/units/{unit_id}/beds", tags=["board"])
    async def unit_beds(
        unit_id: str,
        p: Principal = Depends(require(CLINICAL_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        found = await list_units(ctx.db, unit_id=unit_id)
        if not found or not p.sees(found[0].site_id, unit_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such unit")
        unit = found[0]
        beds = [b for b in await list_beds(ctx.db, site_id=unit.site_id) if b.unit_id == unit_id]
        latest = await asyncio.gather(
            *(ctx.vitals.latest(patient_id=b.patient_id) for b in beds if b.patient_id is not None)
        )
        by_patient = dict(zip((b.patient_id for b in beds if b.patient_id is not None), latest, strict=True))
        now = ctx.clock.now_ms()
        items = []
        for bed in beds:
            vitals: dict[str, Any] = {}
            for code, pt in sorted((by_patient.get(bed.patient_id, {}) if bed.patient_id else {}).items()):
                info = resolve_code(code)
                vitals[info.alias if info else code] = {
                    "code": code,
                    "value": _value(pt),
                    "unit": pt.unit,
                    "ts": iso(pt.ts),
                    "age_s": round(max(0, now - pt.ts) / 1000, 1),
                    "flags": list(pt.flags),
                    "device_id": pt.device_id,
                }
            items.append(
                {"bed_id": bed.id, "label": bed.label, "patient_id": bed.patient_id, "vitals": vitals}
            )
        return {
            "site_id": unit.site_id,
            "unit_id": unit.id,
            "name": unit.name,
            "as_of": iso(now),
            "items": items,
        }
