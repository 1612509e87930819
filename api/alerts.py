"""Alerts over REST: list, one with its history, acknowledge, silence, resolve; the rules in force;
per-patient limit overrides and NEWS2 settings. Clinician actions become `AlertCommand`s on the clinical
topic (the engine decides and audits them); the call waits briefly for the new version."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import Body, Depends, FastAPI, HTTPException, Query, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from alerting.engine import settings_id
from alerting.rules import PRIORITIES, make_override
from api.app import ApiContext, iso, parse_time
from api.auth import CLINICAL_ROLES, Principal, require
from records.alerts import (
    ACTIVE,
    alert_history,
    get_alert,
    list_alerts,
    list_history,
    list_overrides,
    remove_override,
    set_override,
)
from records.places import get_bed, get_patient, set_news2
from streams import topics
from streams.schemas import Alert, AlertCommand, PatientSettings, encode

ACT_ROLES = ("nurse", "charge_nurse", "doctor", "admin")
LIMIT_ROLES = ("doctor", "charge_nurse", "admin")
NEWS2_ROLES = ("doctor", "admin")
WAIT_S = 3.0  # how long an action waits for the engine's new version before answering 202
HISTORY_DEFAULT_MS = 24 * 3600 * 1000


def alert_json(a: Alert) -> dict[str, Any]:
    """The contract's alert object, with Vigil's additions (unit, site, label, value, unit of measure)."""
    d = a.detail or {}
    return {
        "id": a.id,
        "version": a.version,
        "patient_id": a.patient_id,
        "bed_id": a.bed_id,
        "unit_id": a.unit_id,
        "site_id": a.site_id,
        "condition": a.condition,
        "priority": a.priority,
        "status": a.status,
        "raised_at": iso(a.raised_at),
        "updated_at": iso(a.updated_at),
        "data_stale": a.data_stale,
        "retrospective": a.retrospective,
        "silenced_until": None if a.silenced_until is None else iso(a.silenced_until),
        "label": d.get("label"),
        "value": d.get("value"),
        "unit": d.get("unit"),
        "device_id": d.get("device_id"),
        "inhibited_by": d.get("inhibited_by", []),
    }


class SilenceRequest(BaseModel):
    duration_s: float = Field(default=120, gt=0, le=120)


class LimitRequest(BaseModel):
    threshold: float | None = None
    unit: str | None = Field(default=None, max_length=32)
    priority: str | None = None
    delay_s: float | None = Field(default=None, ge=0, le=3600)
    expires_at: str
    reason: str = Field(default="", max_length=500)


class News2Request(BaseModel):
    spo2_scale: int = Field(ge=1, le=2)
    suppressed: bool = False


def install(app: FastAPI, ctx: ApiContext) -> None:
    """Add this module's routes to the app."""

    async def visible_alert(alert_id: str, p: Principal) -> Alert:
        a = await get_alert(ctx.db, alert_id)
        if a is None or not p.sees(a.site_id, a.unit_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such alert")
        return a

    async def visible_patient(patient_id: str, p: Principal) -> tuple[str, str | None]:
        patient = await get_patient(ctx.db, patient_id)
        bed = await get_bed(ctx.db, patient.bed_id) if patient is not None and patient.bed_id else None
        unit = bed.unit_id if bed else None
        if patient is None or not p.sees(patient.site_id, unit):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
        return patient.site_id, unit

    @app.get("/api/v1/alerts", tags=["alerts"])
    async def alerts(
        status_: str = Query(default="active", alias="status", pattern="^(active|closed|all)$"),
        patient_id: str | None = Query(default=None, max_length=64),
        unit_id: str | None = Query(default=None, max_length=64),
        since: str | None = None,
        until: str | None = None,
        limit: int = Query(default=500, ge=1, le=2000),
        p: Principal = Depends(require(CLINICAL_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        statuses = {"active": ACTIVE, "closed": ("closed",), "all": None}[status_]
        items = await list_alerts(
            ctx.db,
            sites=p.site_filter(),
            units=p.units,
            statuses=statuses,
            patient_id=patient_id,
            unit_id=unit_id,
            since=None if since is None else parse_time(since, "since"),
            until=None if until is None else parse_time(until, "until"),
            limit=limit,
        )
        return {"items": [alert_json(a) for a in items]}

    @app.get("/api/v1/alerts/history", tags=["alerts"])
    async def history(
        since: str | None = None,
        until: str | None = None,
        patient_id: str | None = Query(default=None, max_length=64),
        unit_id: str | None = Query(default=None, max_length=64),
        cursor: str | None = Query(default=None, max_length=300),
        limit: int = Query(default=100, ge=1, le=1000),
        p: Principal = Depends(require(CLINICAL_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        """Alerts open at any time in [since, until] (default: the 24 h before `until` or now)."""
        end = None if until is None else parse_time(until, "until")
        if since is None:
            start = (ctx.clock.now_ms() if end is None else end) - HISTORY_DEFAULT_MS
        else:
            start = parse_time(since, "since")
        items = await list_history(
            ctx.db,
            sites=p.site_filter(),
            units=p.units,
            since=start,
            until=end,
            patient_id=patient_id,
            unit_id=unit_id,
            after=None if cursor is None else _parse_cursor(cursor),
            limit=limit,
        )
        last = items[-1] if len(items) == limit else None
        return {
            "items": [alert_json(a) for a in items],
            "cursor": None if last is None else f"{last.raised_at}:{last.id}",
        }

    @app.get("/api/v1/alerts/{alert_id}", tags=["alerts"])
    async def one_alert(
        alert_id: str,
        p: Principal = Depends(require(CLINICAL_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        await visible_alert(alert_id, p)
        h = await alert_history(ctx.db, alert_id)
        if h is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such alert")
        return {
            **alert_json(h.alert),
            "history": [{**v, "at": iso(v["at"])} for v in h.versions],
            "pages": [{**pg, "at": iso(pg["at"])} for pg in h.pages],
            "receipts": [{**r, "received_at": iso(r["received_at"])} for r in h.receipts],
        }

    async def act(alert_id: str, action: str, p: Principal, **extra: Any) -> Any:
        a = await visible_alert(alert_id, p)
        if a.status == "closed":
            raise HTTPException(status.HTTP_409_CONFLICT, "the alert is closed")
        if action == "resolve" and a.status != "cleared_unack":
            raise HTTPException(status.HTTP_409_CONFLICT, "only a cleared alert can be resolved")
        if action == "ack" and a.status == "active_ack":
            return alert_json(a)  # acknowledged already: nothing for the engine to do
        now = ctx.clock.now_ms()
        cmd = AlertCommand(
            f"{p.username}/{a.id}/{action}/{now}", a.id, action, p.username, now, a.site_id, **extra
        )
        key = topics.clinical_key(a.patient_id, a.bed_id, "")
        await ctx.publish([(topics.CLINICAL, key, encode(cmd))])
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            now_alert = await get_alert(ctx.db, a.id)
            if now_alert is not None and now_alert.version > a.version:
                return alert_json(now_alert)
        return JSONResponse({"status": "accepted", "alert": alert_json(a)}, status_code=202)

    @app.post("/api/v1/alerts/{alert_id}/ack", tags=["alerts"])
    async def ack(
        alert_id: str,
        body: dict[str, Any] | None = Body(default=None),  # noqa: B008
        p: Principal = Depends(require(ACT_ROLES)),  # noqa: B008
    ) -> Any:
        read_back = None if not body or body.get("read_back") is None else str(body["read_back"])[:64]
        return await act(alert_id, "ack", p, read_back=read_back)

    @app.post("/api/v1/alerts/{alert_id}/silence", tags=["alerts"])
    async def silence(
        alert_id: str,
        body: SilenceRequest | None = None,
        p: Principal = Depends(require(ACT_ROLES)),  # noqa: B008
    ) -> Any:
        duration = 120.0 if body is None else body.duration_s
        return await act(alert_id, "silence", p, duration_ms=round(duration * 1000))

    @app.post("/api/v1/alerts/{alert_id}/resolve", tags=["alerts"])
    async def resolve(
        alert_id: str,
        p: Principal = Depends(require(ACT_ROLES)),  # noqa: B008
    ) -> Any:
        return await act(alert_id, "resolve", p)

    @app.get("/api/v1/rules", tags=["alerts"])
    async def rules(p: Principal = Depends(require(CLINICAL_ROLES))) -> dict[str, Any]:  # noqa: B008
        if ctx.ruleset is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no rules engine in this process")
        return ctx.ruleset().to_public()

    async def publish_settings(patient_id: str, site_id: str, by: str, **fields: Any) -> None:
        now = ctx.clock.now_ms()
        body = orjson.dumps(fields, default=str)
        ev = PatientSettings(settings_id(patient_id, now, body), now, site_id, patient_id, by=by, **fields)
        await ctx.publish([(topics.CLINICAL, topics.clinical_key(patient_id, None, ""), encode(ev))])

    @app.get("/api/v1/patients/{patient_id}/limits", tags=["alerts"])
    async def limits(
        patient_id: str,
        p: Principal = Depends(require(CLINICAL_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        await visible_patient(patient_id, p)
        items = await list_overrides(ctx.db, patient_id, at=ctx.clock.now_ms())
        return {
            "items": [{**o, "expires_at": iso(o["expires_at"]), "set_at": iso(o["set_at"])} for o in items]
        }

    @app.put("/api/v1/patients/{patient_id}/limits/{condition}", tags=["alerts"])
    async def put_limit(
        patient_id: str,
        condition: str,
        body: LimitRequest,
        p: Principal = Depends(require(LIMIT_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        site_id, unit_id = await visible_patient(patient_id, p)
        if ctx.ruleset is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no rules engine in this process")
        if body.priority is not None and body.priority not in PRIORITIES:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "priority: high, medium or low")
        now = ctx.clock.now_ms()
        made = make_override(
            ctx.ruleset(), condition, unit_id=unit_id, at_ms=now,
            expires_at=parse_time(body.expires_at, "expires_at"), threshold=body.threshold, unit=body.unit,
            priority=body.priority, delay_s=body.delay_s, set_by=p.username, reason=body.reason,
        )  # fmt: skip
        if isinstance(made, list):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "; ".join(made))
        ov = {"condition": condition, "threshold": made.threshold, "priority": made.priority,
              "delay_ms": made.delay_ms, "expires_at": made.expires_at, "reason": body.reason}  # fmt: skip
        current = await set_override(ctx.db, patient_id=patient_id, site_id=site_id, override=ov, at=now,
                                     actor=p.username)  # fmt: skip
        await publish_settings(patient_id, site_id, p.username, overrides=tuple(_engine(o) for o in current))
        return {"patient_id": patient_id, **{**ov, "expires_at": iso(made.expires_at)}, "set_by": p.username}

    @app.delete("/api/v1/patients/{patient_id}/limits/{condition}", tags=["alerts"])
    async def delete_limit(
        patient_id: str,
        condition: str,
        p: Principal = Depends(require(LIMIT_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        site_id, _ = await visible_patient(patient_id, p)
        now = ctx.clock.now_ms()
        if not await remove_override(ctx.db, patient_id=patient_id, site_id=site_id, condition=condition,
                                     at=now, actor=p.username):  # fmt: skip
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such override")
        current = await list_overrides(ctx.db, patient_id)
        await publish_settings(patient_id, site_id, p.username, overrides=tuple(_engine(o) for o in current))
        return {"patient_id": patient_id, "condition": condition, "removed": True}

    @app.put("/api/v1/patients/{patient_id}/news2", tags=["alerts"])
    async def put_news2(
        patient_id: str,
        body: News2Request,
        p: Principal = Depends(require(NEWS2_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        site_id, _ = await visible_patient(patient_id, p)
        await set_news2(ctx.db, patient_id=patient_id, spo2_scale=body.spo2_scale, suppressed=body.suppressed,
                        at=ctx.clock.now_ms(), actor=p.username)  # fmt: skip
        await publish_settings(
            patient_id, site_id, p.username, news2_scale=body.spo2_scale, news2_suppressed=body.suppressed
        )
        return {"patient_id": patient_id, "spo2_scale": body.spo2_scale, "suppressed": body.suppressed}


def _parse_cursor(raw: str) -> tuple[int, str]:
    raised, sep, alert_id = raw.partition(":")
    if not sep or not raised.isdigit() or not alert_id:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "cursor: as returned by the last page")
    return int(raised), alert_id


def _engine(o: dict[str, Any]) -> dict[str, Any]:
    return {
        k: o[k] for k in ("condition", "expires_at", "threshold", "priority", "delay_ms", "set_by", "reason")
    }
