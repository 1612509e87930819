"""FHIR R4 read access: Observation search returning a searchset Bundle of vital signs (LOINC, MDC, UCUM).

Choices (also in docs/CLINICAL_API.md):
- Values flagged `artifact` (outside the physiological range) or `inhibited` (their sensor was off) are left
  out: they are never used clinically, and a FHIR consumer would chart them as real.
- NIBP systolic and diastolic (with mean, if present) of one device at one `ts` form one blood-pressure panel
  (LOINC 85354-9) with components; anything else is a single Observation. A `code` filter that names only
  component codes (8480-6, ...) answers them as single Observations.
- Results are oldest first (`ts`, then the code table's order) and paged with an opaque `_cursor` in the
  `next` link, so pages stay stable while new readings arrive at the end.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from api.app import iso
from api.auth import CLINICAL_ROLES, Principal
from records.people import get_user
from records.places import get_bed, get_patient
from streams.codes import VITALS, CodeInfo
from streams.ports import VitalPoint
from streams.schemas import FLAG_ARTIFACT, FLAG_INHIBITED

if TYPE_CHECKING:
    from api.app import ApiContext

FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"
MDC = "urn:iso:std:iso:11073:10101"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DEVICE_SYSTEM = "urn:vigil:device"
USER_SYSTEM = "urn:vigil:user"
PROVIDER_SYSTEM = "urn:vigil:provider"
FLAG_SYSTEM = "urn:vigil:flag"
BP_PANEL_LOINC = "85354-9"
BP_PANEL_MDC = 150020  # MDC_PRESS_BLD_NONINV (SCADA 18948)
BP_PANEL_LABEL = "Blood pressure panel with all children optional"
BP_CODES = ("MDC_PRESS_BLD_NONINV_SYS", "MDC_PRESS_BLD_NONINV_DIA", "MDC_PRESS_BLD_NONINV_MEAN")
SEARCHABLE: tuple[CodeInfo, ...] = tuple(c for c in VITALS if c.loinc is not None and c.code is not None)
NOT_CLINICAL = frozenset({FLAG_ARTIFACT, FLAG_INHIBITED})
DEFAULT_COUNT = 50
MAX_COUNT = 1000
_SLACK = 64  # extra points fetched per code, so ties at a page's edge do not stall it
_IDS = uuid.UUID("6f1c3d1e-6a7b-5c1d-9e55-766967696c21")  # namespace of Vigil's FHIR resource ids
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR_TS = re.compile(r"[0-9]{1,15}")
_CURSOR_KEY = re.compile(r"[0-9]{2}[0-9a-f-]{36}|~")


class FhirError(Exception):
    """Answered as an OperationOutcome with this status."""

    def __init__(self, status: int, code: str, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.code = code
        self.text = text
        self.headers = headers


def outcome(status: int, code: str, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


@dataclass(frozen=True, slots=True)
class Search:
    patient_id: str
    codes: tuple[CodeInfo, ...]  # what to read from the vitals store
    panels: bool  # group NIBP into blood-pressure panels
    bp_singles: bool  # answer NIBP values that form no panel on their own
    since: int
    until: int | None
    count: int
    cursor: tuple[int, str] | None


def parse_codes(tokens: Sequence[str]) -> tuple[tuple[CodeInfo, ...], bool, bool]:
    """What a `code` search names (LOINC or MDC, with or without `system|`): the codes to read, whether NIBP
    readings form panels, and whether NIBP values outside a panel are answered on their own."""
    if not tokens:
        return SEARCHABLE, True, True
    wanted: list[CodeInfo] = []
    panels = components = False
    for token in (t for raw in tokens for t in raw.split(",") if t):
        system, _, code = token.rpartition("|")
        if system not in ("", LOINC, MDC):
            continue  # an unknown system matches nothing
        if (system != MDC and code == BP_PANEL_LOINC) or (system != LOINC and code == str(BP_PANEL_MDC)):
            panels = True
            wanted.extend(c for c in SEARCHABLE if c.ref in BP_CODES)
            continue
        for c in SEARCHABLE:
            if (system != MDC and code == c.loinc) or (system != LOINC and code in (str(c.code), c.ref)):
                wanted.append(c)
                components = components or c.ref in BP_CODES
    return tuple(dict.fromkeys(wanted)), panels, components or not panels


def _precision_end(raw: str, start: datetime) -> datetime:
    """The end of the range a FHIR date or dateTime value denotes (its precision)."""
    if len(raw) == 4:
        return start.replace(year=start.year + 1)
    if len(raw) == 7:
        return (start + timedelta(days=32)).replace(day=1)
    if len(raw) == 10:
        return start + timedelta(days=1)
    return start + (timedelta(milliseconds=1) if "." in raw else timedelta(seconds=1))


def _date_range(raw: str) -> tuple[int, int]:
    """[start, end) in epoch ms of a FHIR date or dateTime (a dateTime needs an offset)."""
    try:
        if len(raw) in (4, 7, 10) and "T" not in raw:
            parts = [int(x) for x in raw.split("-")]
            parts += [1] * (3 - len(parts))
            start = datetime(parts[0], parts[1], parts[2], tzinfo=UTC)
        else:
            start = datetime.fromisoformat(raw)
            if start.tzinfo is None:
                raise FhirError(400, "invalid", f"date {raw!r}: a time needs a UTC offset")
        end = _precision_end(raw, start)
    except (ValueError, IndexError, OverflowError):
        raise FhirError(400, "invalid", f"date {raw!r} is not a FHIR date or dateTime") from None
    return (start - _EPOCH) // timedelta(milliseconds=1), (end - _EPOCH) // timedelta(milliseconds=1)


def parse_dates(values: Sequence[str]) -> tuple[int, int | None]:
    """[since, until] (inclusive ms) from `date` parameters with prefixes eq, ge, gt, le, lt."""
    lo, hi = 0, None
    for value in values:
        prefix, raw = (value[:2], value[2:]) if value[:2].isalpha() else ("eq", value)
        start, end = _date_range(raw)
        if prefix in ("eq", "ge", "gt"):
            lo = max(lo, start if prefix != "gt" else end)
        if prefix in ("eq", "le", "lt"):
            bound = end - 1 if prefix != "lt" else start - 1
            hi = bound if hi is None else min(hi, bound)
        if prefix not in ("eq", "ge", "gt", "le", "lt"):
            raise FhirError(400, "not-supported", f"date prefix {prefix!r} is not supported (eq ge gt le lt)")
    return lo, hi


def parse_cursor(raw: str | None) -> tuple[int, str] | None:
    if raw is None:
        return None
    ts, _, rid = raw.partition("_")
    if _CURSOR_TS.fullmatch(ts) is None or _CURSOR_KEY.fullmatch(rid) is None:
        raise FhirError(400, "invalid", "_cursor is not one this server gave")
    return int(ts), rid


def resource_id(key: str) -> str:
    """A FHIR id ([A-Za-z0-9-.], at most 64) derived from a stored point's key: stable across searches."""
    return str(uuid.uuid5(_IDS, key))


def _coding(info: CodeInfo) -> list[dict[str, str]]:
    return [
        {"system": LOINC, "code": str(info.loinc), "display": info.label},
        {"system": MDC, "code": str(info.code), "display": info.ref},
    ]


def _quantity(p: VitalPoint) -> dict[str, Any]:
    return {"value": p.value, "unit": p.unit, "system": UCUM, "code": p.unit}


class _Builder:
    """Observations of one patient from stored points, with the actor of manual entries resolved once."""

    def __init__(self, ctx: ApiContext, patient_id: str) -> None:
        self._ctx = ctx
        self._patient_id = patient_id
        self._providers: dict[str, str | None] = {}

    async def _source(self, device_id: str) -> dict[str, Any]:
        if not device_id.startswith("manual:"):
            return {
                "device": {"identifier": {"system": DEVICE_SYSTEM, "value": device_id}, "display": device_id}
            }
        username = device_id.removeprefix("manual:")
        if username not in self._providers:
            user = await get_user(self._ctx.db, username)
            self._providers[username] = user.provider_id if user else None
        provider = self._providers[username]
        ident = (
            {"system": PROVIDER_SYSTEM, "value": provider}
            if provider
            else {"system": USER_SYSTEM, "value": username}
        )
        return {"performer": [{"identifier": ident, "display": username}]}

    async def _base(self, rid: str, first: VitalPoint, points: Sequence[VitalPoint]) -> dict[str, Any]:
        flags = sorted({f for p in points for f in p.flags})
        resource: dict[str, Any] = {"resourceType": "Observation", "id": rid}
        if flags:
            resource["meta"] = {"tag": [{"system": FLAG_SYSTEM, "code": f} for f in flags]}
        resource.update(
            {
                "status": "final",
                "category": [
                    {
                        "coding": [{"system": CATEGORY, "code": "vital-signs", "display": "Vital Signs"}],
                        "text": "Vital Signs",
                    }
                ],
            }
        )
        resource["subject"] = {"reference": f"Patient/{self._patient_id}"}
        resource["effectiveDateTime"] = iso(first.ts)
        resource["issued"] = iso(max(p.received_at for p in points))
        resource.update(await self._source(first.device_id))
        return resource

    async def single(self, info: CodeInfo, p: VitalPoint) -> tuple[int, str, dict[str, Any]]:
        rid = resource_id(p.key)
        r = await self._base(rid, p, [p])
        r["code"] = {"coding": _coding(info), "text": info.label}
        r["valueQuantity"] = _quantity(p)
        return p.ts, _sort_key(info, rid), _ordered(r)

    async def panel(self, parts: Sequence[tuple[CodeInfo, VitalPoint]]) -> tuple[int, str, dict[str, Any]]:
        first = parts[0][1]
        rid = resource_id("bp:" + "|".join(p.key for _, p in parts))
        r = await self._base(rid, first, [p for _, p in parts])
        r["code"] = {
            "coding": [
                {"system": LOINC, "code": BP_PANEL_LOINC, "display": BP_PANEL_LABEL},
                {"system": MDC, "code": str(BP_PANEL_MDC), "display": "MDC_PRESS_BLD_NONINV"},
            ],
            "text": "Blood pressure (non-invasive)",
        }
        r["component"] = [
            {"code": {"coding": _coding(info), "text": info.label}, "valueQuantity": _quantity(p)}
            for info, p in parts
        ]
        return first.ts, _sort_key(parts[0][0], rid), _ordered(r)


def _sort_key(info: CodeInfo, rid: str) -> str:
    """Within one time, vitals in the order of the code table (hr, pr, spo2, ...), then by id."""
    return f"{SEARCHABLE.index(info):02d}{rid}"


_ORDER = (
    "resourceType", "id", "meta", "status", "category", "code", "subject", "effectiveDateTime", "issued",
    "performer", "valueQuantity", "device", "component",
)  # fmt: skip


def _ordered(r: dict[str, Any]) -> dict[str, Any]:
    """The elements in the order the specification lists them (easier to read; JSON does not care)."""
    return {k: r[k] for k in _ORDER if k in r}


async def search_observations(
    ctx: ApiContext, s: Search
) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
    """One page of Observations and the cursor of the next page (None when this is the last)."""
    since = max(s.since, s.cursor[0]) if s.cursor else s.since
    fetch = s.count + _SLACK
    fetched: dict[str, list[VitalPoint]] = {}
    # From the last ts of a code whose read the limit cut, more may follow: the page ends before it.
    horizon: int | None = None
    for info in s.codes:
        points = await ctx.vitals.query(
            patient_id=s.patient_id, code=info.ref, since=since, until=s.until, limit=fetch
        )
        if len(points) == fetch:
            horizon = points[-1].ts if horizon is None else min(horizon, points[-1].ts)
        fetched[info.ref] = points
    by_ref = {c.ref: c for c in s.codes}
    chosen: list[tuple[CodeInfo, VitalPoint]] = []
    for ref, points in fetched.items():
        for p in points:
            if horizon is None or p.ts < horizon:
                chosen.append((by_ref[ref], p))
    if not chosen and horizon is not None:  # every point at one ms: take the edge whole rather than stall
        chosen = [(by_ref[ref], p) for ref, points in fetched.items() for p in points if p.ts <= horizon]
    chosen = [(i, p) for i, p in chosen if not NOT_CLINICAL.intersection(p.flags)]
    builder = _Builder(ctx, s.patient_id)
    entries: list[tuple[int, str, dict[str, Any]]] = []
    groups: dict[tuple[str, int], list[tuple[CodeInfo, VitalPoint]]] = {}
    for info, p in chosen:
        if s.panels and info.ref in BP_CODES:
            groups.setdefault((p.device_id, p.ts), []).append((info, p))
        else:
            entries.append(await builder.single(info, p))
    for parts in groups.values():
        refs = [i.ref for i, _ in parts]
        if BP_CODES[0] in refs and BP_CODES[1] in refs and len(set(refs)) == len(refs):
            parts.sort(key=lambda ip: BP_CODES.index(ip[0].ref))
            entries.append(await builder.panel(parts))
        elif s.bp_singles:  # not a full reading (or two of one code at one ms): each value on its own
            for info, p in parts:
                entries.append(await builder.single(info, p))
    entries.sort(key=lambda e: (e[0], e[1]))
    if s.cursor is not None:
        entries = [e for e in entries if (e[0], e[1]) > s.cursor]
    page = entries[: s.count]
    more = len(entries) > s.count or horizon is not None
    cursor = (page[-1][0], page[-1][1]) if more and page else None
    if more and not page and horizon is not None:
        cursor = (horizon, "~")  # nothing clinical up to the horizon: continue after it
    return [e[2] for e in page], cursor


def _principal(ctx: ApiContext, request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise FhirError(401, "login", "missing bearer token", {"WWW-Authenticate": "Bearer"})
    try:
        p = ctx.tokens.verify(token.strip())
    except HTTPException as e:
        raise FhirError(401, "login", str(e.detail), {"WWW-Authenticate": "Bearer"}) from None
    if p.role not in CLINICAL_ROLES:
        raise FhirError(403, "forbidden", f"role {p.role} may not do this")
    return p


def install(app: FastAPI, ctx: ApiContext) -> None:
    """Add `GET /fhir/Observation` (search) to the app."""

    async def visible_patient(raw: str, p: Principal) -> str:
        patient_id = raw.removeprefix("Patient/")
        patient = await get_patient(ctx.db, patient_id) if patient_id else None
        unit = None
        if patient is not None and patient.bed_id:
            bed = await get_bed(ctx.db, patient.bed_id)
            unit = bed.unit_id if bed else None
        if patient is None or not p.sees(patient.site_id, unit):
            raise FhirError(404, "not-found", "no such patient")
        return patient_id

    async def search(request: Request) -> JSONResponse:
        q = request.query_params
        p = _principal(ctx, request)
        patients = q.getlist("patient") or q.getlist("subject")
        if len(patients) != 1:
            raise FhirError(400, "required", "search needs exactly one patient (patient=ID)")
        patient_id = await visible_patient(patients[0], p)
        codes, panels, bp_singles = parse_codes(q.getlist("code"))
        since, until = parse_dates(q.getlist("date"))
        raw_count = q.get("_count", str(DEFAULT_COUNT))
        if not raw_count.isdigit() or not 1 <= int(raw_count) <= MAX_COUNT:
            raise FhirError(400, "invalid", f"_count must be 1..{MAX_COUNT}")
        s = Search(
            patient_id,
            codes,
            panels,
            bp_singles,
            since,
            until,
            int(raw_count),
            parse_cursor(q.get("_cursor")),
        )
        resources, cursor = (
            await search_observations(ctx, s) if codes and (until is None or until >= since) else ([], None)
        )
        self_url = str(request.url)
        links = [{"relation": "self", "url": self_url}]
        if cursor is not None:
            params = [(k, v) for k, v in q.multi_items() if k != "_cursor"]
            params.append(("_cursor", f"{cursor[0]}_{cursor[1]}"))
            links.append({"relation": "next", "url": str(request.url.replace(query=urlencode(params)))})
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": [
                {"fullUrl": f"urn:uuid:{r['id']}", "resource": r, "search": {"mode": "match"}}
                for r in resources
            ],
        }
        if not bundle["entry"]:
            del bundle["entry"]
        return JSONResponse(bundle, media_type=FHIR_JSON)

    @app.get("/fhir/Observation", tags=["fhir"], response_class=JSONResponse)
    async def observation_search(request: Request) -> JSONResponse:
        try:
            return await search(request)
        except FhirError as e:
            return outcome(e.status, e.code, e.text, e.headers)
