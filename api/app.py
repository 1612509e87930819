"""The FastAPI application: health, metrics, tokens, patients, vitals, beds and dead letters."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from api.auth import CLINICAL_ROLES, Principal, TokenIssuer, require
from records.admissions import admit_all, free_bed
from records.db import Database
from records.deadletters import list_deadletters
from records.people import verify_user
from records.places import get_bed, get_patient
from streams.clock import Clock
from streams.codes import resolve_code
from streams.live import LiveFeed
from streams.metrics import REGISTRY
from streams.ports import VitalPoint, VitalsStore
from streams.schemas import AdmissionChange, Event

if TYPE_CHECKING:
    from alerting.rules import Ruleset

log = logging.getLogger(__name__)

ACVPU = "ACVPU"


@dataclass
class ApiContext:
    """What the API needs from whichever runtime hosts it."""

    db: Database
    vitals: VitalsStore
    tokens: TokenIssuer
    clock: Clock
    on_admission: Callable[[AdmissionChange], Awaitable[None]]
    live: LiveFeed
    submit: Callable[[Sequence[Event]], Awaitable[None]]  # append canonical events to the ingest topic
    # Append (topic, key, value) records durably: alert commands and patient settings to the clinical topic.
    publish: Callable[[Sequence[tuple[str, str, bytes]]], Awaitable[None]]
    ruleset: Callable[[], Ruleset] | None = None  # the rules in force (GET /rules, limit overrides)
    # A client showed an alert version to its user: (alert_id, version, username, at_ms).
    on_receipt: Callable[[str, int, str, int], Awaitable[None]] | None = None
    readiness: dict[str, Callable[[], Awaitable[bool]]] = field(default_factory=dict)


class TokenRequest(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class AdmitRequest(BaseModel):
    patient_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")


def iso(ms: int) -> str:
    """UTC with milliseconds, as everything Vigil sends out."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def parse_time(raw: str, name: str) -> int:
    try:
        if raw.lstrip("-").isdigit():
            return int(raw)
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY, f"{name} must be RFC 3339 or epoch ms"
        ) from None
    if dt.tzinfo is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"{name} needs a UTC offset")
    return int(dt.timestamp() * 1000)


def _news2_json(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    components = {
        k: None if c is None else {**c, "ts": iso(int(c["ts"]))}
        for k, c in (result.get("components") or {}).items()
    }
    return {**result, "ts": iso(int(result["ts"])), "components": components}


def _point_value(p: VitalPoint) -> float | str:
    if p.code == "acvpu":
        return ACVPU[int(p.value)]
    return p.value


def create_app(ctx: ApiContext) -> FastAPI:
    from api.alerts import alert_json  # noqa: PLC0415 - api.alerts imports this module
    from records.alerts import latest_news2, list_alerts  # noqa: PLC0415

    # /docs is served by dashboards/web.py from vendored Swagger UI: the default pulls it from a CDN.
    app = FastAPI(title="Vigil", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.tokens = ctx.tokens
    app.state.ctx = ctx

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in API")
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        down = []
        for name, check in ctx.readiness.items():
            try:
                ok = await check()
            except Exception:
                ok = False
            if not ok:
                down.append(name)
        if down:
            return JSONResponse({"status": "unavailable", "not_ready": down}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.post("/api/v1/auth/token", tags=["auth"])
    async def token(body: TokenRequest) -> dict[str, Any]:
        user = await verify_user(ctx.db, body.username, body.password)
        if user is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong username or password")
        principal = Principal(
            user.username,
            user.role,
            frozenset(user.sites),
            None if user.units is None else frozenset(user.units),
        )
        access = ctx.tokens.issue(principal, ctx.clock.now_ms() // 1000)
        return {"access_token": access, "token_type": "bearer", "expires_in": ctx.tokens.ttl_s}

    async def visible_patient(patient_id: str, p: Principal) -> Any:
        patient = await get_patient(ctx.db, patient_id)
        unit = None
        if patient is not None and patient.bed_id:
            bed = await get_bed(ctx.db, patient.bed_id)
            unit = bed.unit_id if bed else None
        if patient is None or not p.sees(patient.site_id, unit):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
        return patient

    @app.get("/api/v1/patients/{patient_id}", tags=["patients"])
    async def patient_snapshot(
        patient_id: str,
        p: Principal = Depends(require(CLINICAL_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        patient = await visible_patient(patient_id, p)
        now = ctx.clock.now_ms()
        latest = await ctx.vitals.latest(patient_id=patient_id)
        vitals = {}
        for code, pt in sorted(latest.items()):
            info = resolve_code(code)
            vitals[info.alias if info else code] = {
                "code": code,
                "value": _point_value(pt),
                "unit": pt.unit,
                "ts": iso(pt.ts),
                "age_s": round(max(0, now - pt.ts) / 1000, 1),
                "flags": list(pt.flags),
                "device_id": pt.device_id,
            }
        return {
            "patient_id": patient.id,
            "site_id": patient.site_id,
            "bed_id": patient.bed_id,
            "vitals": vitals,
            "news2": _news2_json(await latest_news2(ctx.db, patient_id)),
            "alerts": [
                alert_json(a)
                for a in await list_alerts(ctx.db, sites=None, units=None, patient_id=patient_id, limit=100)
            ],
            "as_of": iso(now),
        }

    @app.get("/api/v1/patients/{patient_id}/vitals", tags=["patients"])
    async def patient_vitals(
        patient_id: str,
        code: str = Query(min_length=1, max_length=64),
        since: str = Query(),
        until: str | None = Query(default=None),
        limit: int = Query(default=10_000, ge=1, le=100_000),
        p: Principal = Depends(require(CLINICAL_ROLES)),  # noqa: B008
    ) -> dict[str, Any]:
        await visible_patient(patient_id, p)
        info = resolve_code(code)
        if info is None:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"unknown code {code!r}")
        points = await ctx.vitals.query(
            patient_id=patient_id,
            code=info.ref,
            since=parse_time(since, "since"),
            until=parse_time(until, "until") if until else None,
            limit=limit,
        )
        return {
            "patient_id": patient_id,
            "code": info.ref,
            "points": [
                {"ts": iso(pt.ts), "value": _point_value(pt), "unit": pt.unit, "flags": list(pt.flags)}
                for pt in points
            ],
        }

    async def visible_bed(bed_id: str, p: Principal) -> Any:
        bed = await get_bed(ctx.db, bed_id)
        if bed is None or not p.sees(bed.site_id, bed.unit_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bed")
        return bed

    @app.put("/api/v1/beds/{bed_id}/patient", tags=["beds"])
    async def admit_to_bed(
        bed_id: str,
        body: AdmitRequest,
        p: Principal = Depends(require(("nurse", "charge_nurse", "doctor", "admin"))),  # noqa: B008
    ) -> dict[str, Any]:
        bed = await visible_bed(bed_id, p)
        existing = await get_patient(ctx.db, body.patient_id)
        if existing is not None and not p.sees_site(existing.site_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
        changes = await admit_all(
            ctx.db,
            site_id=bed.site_id,
            bed_id=bed_id,
            patient_id=body.patient_id,
            at=ctx.clock.now_ms(),
            actor=p.username,
        )
        for change in changes:  # a transfer also frees the patient's previous bed
            await ctx.on_admission(change)
        change = changes[-1]
        return {
            "bed_id": bed_id,
            "patient_id": body.patient_id,
            "previous_patient_id": change.previous_patient_id,
        }

    @app.delete("/api/v1/beds/{bed_id}/patient", tags=["beds"])
    async def free(
        bed_id: str,
        p: Principal = Depends(require(("nurse", "charge_nurse", "doctor", "admin"))),  # noqa: B008
    ) -> dict[str, Any]:
        bed = await visible_bed(bed_id, p)
        change = await free_bed(
            ctx.db,
            site_id=bed.site_id,
            bed_id=bed_id,
            at=ctx.clock.now_ms(),
            actor=p.username,
            reason="discharge",
        )
        if change is not None:
            await ctx.on_admission(change)
        return {
            "bed_id": bed_id,
            "patient_id": None,
            "previous_patient_id": change.previous_patient_id if change else None,
        }

    @app.get("/api/v1/deadletters", tags=["ops"])
    async def deadletters(
        since: str | None = Query(default=None),
        limit: int = Query(default=100, ge=1, le=1000),
        p: Principal = Depends(require(("admin", "charge_nurse", "doctor", "nurse", "dispatcher"))),  # noqa: B008
    ) -> dict[str, Any]:
        start = parse_time(since, "since") if since else ctx.clock.now_ms() - 86_400_000
        items = await list_deadletters(ctx.db, sites=p.site_filter(), since=start, limit=limit)
        return {
            "items": [
                {
                    "id": d.id,
                    "received_at": iso(d.received_at),
                    "transport": d.transport,
                    "reason": d.reason,
                    "detail": d.detail,
                    "device_id": d.device_id,
                    "kind": d.kind,
                    "site_id": d.site_id,
                    "payload": d.payload,
                }
                for d in items
            ]
        }

    for name in EXTENSIONS:
        importlib.import_module(name).install(app, ctx)
    return app


# Modules that add routes: each has `install(app: FastAPI, ctx: ApiContext) -> None`.
EXTENSIONS = ("api.alerts", "api.board", "api.clinical", "api.fhir", "api.ws", "dashboards.web")
