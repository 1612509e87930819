"""Per-message validation (contract section 3): payload bytes in, a canonical event and/or dead letters out.

Pure and on the hot path: plain type checks on the decoded map, no models. Refusals are values: a message
that cannot be accepted becomes one dead letter; a refused item or optional field of an accepted message gets
its own dead letter while the rest is kept, so one bad reading never costs a good one.
"""

from __future__ import annotations

import base64
import io
import math
import re
import reprlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import cbor2
import orjson

from gateway.device import DeviceInfo
from gateway.outcome import Outcome
from streams.codes import CODE_LOOKUP, CodeInfo, is_loinc
from streams.schemas import (
    FLAG_ARTIFACT,
    FLAG_FUTURE_TS,
    FLAG_MANUAL,
    CrewMessage,
    DeadLetter,
    DeviceStatus,
    GpsFix,
    LabReport,
    LabResult,
    Meta,
    Observations,
    ObsItem,
    PumpStatus,
    Sos,
    seq_event_id,
)
from streams.units import UnitError, convert

DeviceEvent = Observations | DeviceStatus | PumpStatus | GpsFix | CrewMessage | Sos | LabReport


@dataclass(frozen=True, slots=True)
class Limits:
    """Size and time limits of device messages (contract section 3)."""

    max_payload: int = 65_536
    future_ms: int = 300_000  # ts more than this ahead of received_at: flag future_ts
    retention_ms: int = 30 * 86_400_000  # ts older than this before received_at: dead-letter "stale"


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Parsed:
    """The answer for one message: its outcome, the canonical event if any, and every dead letter."""

    outcome: Outcome  # ACCEPTED if event is not None, and whenever the envelope was valid
    event: DeviceEvent | None
    deadletters: tuple[DeadLetter, ...]  # message-level rejection, or items refused from an accepted message


# Reason codes, used verbatim as metric labels.
MALFORMED = "malformed"
SCHEMA = "schema"
OVERSIZED = "oversized"
UNKNOWN_KIND = "unknown_kind"
UNSUPPORTED_FORMAT = "unsupported_format"
KIND_NOT_ALLOWED = "kind_not_allowed"
PATIENT_MISMATCH = "patient_mismatch"
UNKNOWN_CODE = "unknown_code"
VALUE_RANGE = "value_range"
UNIT = "unit"
STALE = "stale"
INTERNAL = "internal"

KINDS_BY_TYPE: dict[str, frozenset[str]] = {
    "monitor": frozenset({"obs", "status"}),
    "pump": frozenset({"pump", "status"}),
    "ambulance": frozenset({"gps", "crew", "obs", "status"}),
    "pendant": frozenset({"sos", "status", "gps"}),
    "analyzer": frozenset({"lab", "status"}),
}
CONDITIONS = frozenset({"lead_off", "probe_off", "sensor_fault", "low_signal", "low_battery", "charging"})
PUMP_STATES = frozenset({"running", "paused", "stopped", "standby", "completed", "alarm"})
PUMP_ALARMS = frozenset(
    {
        "occlusion",
        "air_in_line",
        "end_of_infusion",
        "near_end_of_infusion",
        "low_battery",
        "door_open",
        "other",
    }
)
UNIT_STATES = frozenset(
    {"available", "dispatched", "en_route", "on_scene", "transporting", "at_hospital", "out_of_service"}
)
CREW_ACTIONS = frozenset({"accept", "decline"})
SOS_ACTIONS = frozenset({"press", "cancel"})
LAB_FLAGS = frozenset({"L", "H", "LL", "HH", "N", "A", "AA"})
LAB_STATUSES = frozenset({"preliminary", "final", "corrected"})

MAX_ID = 64
MAX_NOTE = 500
MAX_TEXT = 128  # free text such as a drug name
MAX_LAB_VALUE = 64
MAX_UNIT = 32
EXCERPT_BYTES = 1024
_MAX_DETAIL = 300
_MAX_TS_TEXT = 40
_MAX_SEQ = 2**63  # Kafka, SQLite and PostgreSQL hold a signed 64-bit integer

_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID}}}")
_UCUM = re.compile(rf"[!-~]{{1,{MAX_UNIT}}}")  # printable ASCII, no spaces: UCUM's case-sensitive syntax
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # control characters other than tab and newline
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_JSON_SPACE = b" \t\r\n"
_T = TypeVar("_T")

# Bounded reprs of hostile input for details and item excerpts: never huge, never deeply recursive.
_REPR = reprlib.Repr()
_REPR.maxstring = 40
_REPR.maxother = 40
_REPR.maxlevel = 3
_ITEM_REPR = reprlib.Repr()
_ITEM_REPR.maxstring = 200
_ITEM_REPR.maxother = 200
_ITEM_REPR.maxlevel = 4


class _RefusedError(Exception):
    """A refusal raised from deep in a check and turned into a dead letter by its caller."""

    def __init__(self, reason: str, detail: str, outcome: Outcome = Outcome.SCHEMA) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.outcome = outcome


def _show(value: object) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _safe_part(text: str | None) -> str:
    """An id segment: the text when it is a plain id, else a stable hash of it (nothing odd in ids)."""
    if text is None:
        return "-"
    if _ID.fullmatch(text):
        return text
    return "~" + format(zlib.crc32(text.encode("utf-8", "surrogatepass")), "08x")


def excerpt(payload: bytes) -> str:
    """At most 1 KiB of the payload: UTF-8 text as is, anything else as `base64:` of its head."""
    head = payload[:EXCERPT_BYTES]
    text: str | None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A character cut in two by the 1 KiB boundary does not make the text binary.
        cut = len(payload) > EXCERPT_BYTES and e.reason == "unexpected end of data"
        text = head[: e.start].decode("utf-8") if cut else None
    if text is not None and "\x00" not in text:  # PostgreSQL text cannot hold NUL
        return text
    return "base64:" + base64.b64encode(payload[: EXCERPT_BYTES * 3 // 4]).decode("ascii")


def deadletter(
    reason: str,
    detail: str,
    *,
    transport: str,
    received_at: int,
    payload: bytes | None,
    device_id: str | None,
    kind: str | None,
    site_id: str | None,
    index: int = 0,
) -> DeadLetter:
    """A dead letter whose id is derived from its input, so a redelivered message maps to the same one."""
    crc = 0 if payload is None else zlib.crc32(payload)
    dl_id = (
        f"{_safe_part(transport)}/{_safe_part(device_id)}/{_safe_part(kind)}/{received_at}/{crc:08x}/{index}"
    )
    return DeadLetter(
        id=dl_id,
        received_at=received_at,
        transport=transport,
        reason=reason,
        detail=detail if len(detail) <= _MAX_DETAIL else detail[: _MAX_DETAIL - 3] + "...",
        device_id=None if device_id is None else device_id[:256],
        kind=None if kind is None else kind[:64],
        site_id=site_id,
        payload=None if payload is None else excerpt(payload),
    )


class _Ctx:
    """What every check of one message needs, and the dead letters of its refused parts."""

    __slots__ = ("device", "dls", "kind", "limits", "payload", "received_at", "transport")

    def __init__(
        self,
        payload: bytes,
        *,
        transport: str,
        device: DeviceInfo,
        kind: str,
        received_at: int,
        limits: Limits,
    ) -> None:
        self.payload = payload
        self.transport = transport
        self.device = device
        self.kind = kind
        self.received_at = received_at
        self.limits = limits
        self.dls: list[DeadLetter] = []

    def refuse(self, outcome: Outcome, reason: str, detail: str) -> Parsed:
        dl = deadletter(
            reason,
            detail,
            transport=self.transport,
            received_at=self.received_at,
            payload=self.payload,
            device_id=self.device.id,
            kind=self.kind,
            site_id=self.device.site_id,
        )
        return Parsed(outcome, None, (dl,))

    def drop(self, refused: _RefusedError, part: object) -> None:
        """Dead-letter one item or optional field of an otherwise accepted message."""
        try:
            raw = orjson.dumps(part, default=str, option=orjson.OPT_NON_STR_KEYS)
        except Exception:  # a decoded CBOR part orjson cannot write (a huge integer, a tag): keep its repr
            raw = _ITEM_REPR.repr(part).encode("utf-8", "backslashreplace")
        self.dls.append(
            deadletter(
                refused.reason,
                refused.detail,
                transport=self.transport,
                received_at=self.received_at,
                payload=raw,
                device_id=self.device.id,
                kind=self.kind,
                site_id=self.device.site_id,
                index=len(self.dls) + 1,
            )
        )

    def ts(self, raw: object, name: str) -> tuple[int, bool]:
        """(epoch ms, future): a future time is replaced by received_at; a stale one is refused."""
        ms = raw if type(raw) is int else _ts_ms(raw, name)
        if ms > self.received_at + self.limits.future_ms:
            return self.received_at, True
        if ms < self.received_at - self.limits.retention_ms:
            raise _RefusedError(STALE, f"{name}: {_show(raw)} is older than the retention window")
        return ms, False


def _ts_ms(raw: object, name: str) -> int:
    if type(raw) is str:
        if len(raw) > _MAX_TS_TEXT:
            raise _RefusedError(SCHEMA, f"{name}: too long for an RFC 3339 time")
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            raise _RefusedError(SCHEMA, f"{name}: {_show(raw)} is not an RFC 3339 time") from None
    elif isinstance(raw, datetime):  # CBOR tags 0 and 1 arrive decoded
        dt = raw
    else:
        raise _RefusedError(SCHEMA, f"{name}: an RFC 3339 string or integer epoch milliseconds is required")
    if dt.tzinfo is None:
        raise _RefusedError(SCHEMA, f"{name}: {_show(raw)} has no UTC offset")
    try:
        return (dt - _EPOCH) // _MS  # exact integer arithmetic: a float timestamp can lose the last ms
    except OverflowError:
        raise _RefusedError(SCHEMA, f"{name}: {_show(raw)} is out of range") from None


def _finite(value: object, name: str) -> float:
    """A finite float from a JSON/CBOR number; bool is not a number."""
    if type(value) is float:
        v = value
    elif type(value) is int:
        try:
            v = float(value)
        except OverflowError:  # a CBOR bignum
            raise _RefusedError(VALUE_RANGE, f"{name}: {_show(value)} is out of range") from None
    else:
        raise _RefusedError(SCHEMA, f"{name}: a number is required, got {_show(value)}")
    if not math.isfinite(v):
        raise _RefusedError(VALUE_RANGE, f"{name}: {_show(value)} is not a finite number")
    return v


def _in_range(value: object, name: str, lo: float, hi: float) -> float:
    v = _finite(value, name)
    if not lo <= v <= hi:
        raise _RefusedError(VALUE_RANGE, f"{name}: {v:g} is outside {lo:g}..{hi:g}")
    return v


def _id(value: object, name: str) -> str:
    if type(value) is not str or _ID.fullmatch(value) is None:
        raise _RefusedError(SCHEMA, f"{name}: up to {MAX_ID} characters of A-Z a-z 0-9 . _ : - are required")
    return value


def _text(value: object, name: str, limit: int) -> str:
    if type(value) is not str or not value or len(value) > limit or _CONTROL.search(value):
        raise _RefusedError(SCHEMA, f"{name}: a string of 1..{limit} characters without control characters")
    return value


def _choice(value: object, name: str, allowed: frozenset[str]) -> str:
    if type(value) is not str or value not in allowed:
        raise _RefusedError(SCHEMA, f"{name}: {_show(value)} is not one of {', '.join(sorted(allowed))}")
    return value


def _optional(ctx: _Ctx, body: dict[Any, Any], name: str, check: Callable[[object, str], _T]) -> _T | None:
    """An optional field: absent or null is None; an invalid one is dead-lettered alone and dropped."""
    value = body.get(name)
    if value is None:
        return None
    try:
        return check(value, name)
    except _RefusedError as r:
        ctx.drop(r, {name: value})
        return None


def _known_strings(ctx: _Ctx, body: dict[Any, Any], name: str, allowed: frozenset[str]) -> tuple[str, ...]:
    """A list of known words; each unknown one is dead-lettered and the known ones are kept."""
    value = body.get(name)
    if value is None:
        return ()
    if type(value) is not list:
        ctx.drop(_RefusedError(SCHEMA, f"{name}: a list is required"), {name: value})
        return ()
    kept: list[str] = []
    for i, word in enumerate(value):
        if type(word) is str and word in allowed:
            if word not in kept:
                kept.append(word)
        else:
            ctx.drop(
                _RefusedError(
                    SCHEMA, f"{name}[{i}]: {_show(word)} is not one of {', '.join(sorted(allowed))}"
                ),
                word,
            )
    return tuple(kept)


def _meta(ctx: _Ctx, body: dict[Any, Any], patient_id: str | None) -> tuple[Meta, bool]:
    """The envelope (ids, time, attribution) and whether the message time was in the future."""
    seq = body.get("seq")
    boot = body.get("boot")
    msg_id = body.get("id")
    raw_ts = body.get("ts")
    if seq is not None and (type(seq) is not int or not 0 <= seq < _MAX_SEQ):
        raise _RefusedError(SCHEMA, f"seq: a non-negative integer is required, got {_show(seq)}")
    if boot is not None and (type(boot) is not str or _ID.fullmatch(boot) is None):
        _id(boot, "boot")  # raises with the detail
    if msg_id is not None and (type(msg_id) is not str or _ID.fullmatch(msg_id) is None):
        _id(msg_id, "id")
    ts, future = (ctx.received_at, False) if raw_ts is None else ctx.ts(raw_ts, "ts")
    dev = ctx.device
    if msg_id is not None:
        event_id = f"{dev.id}/{ctx.kind}/id/{msg_id}"
    elif seq is not None:
        event_id = seq_event_id(dev.id, ctx.kind, boot, seq)
    else:
        event_id = f"{dev.id}/{ctx.kind}/rx/{ctx.received_at}/{zlib.crc32(ctx.payload):08x}"
    meta = Meta(
        event_id, dev.id, ctx.kind, ctx.transport, ts, ctx.received_at, dev.site_id,
        dev.unit_id, dev.bed_id, patient_id, boot, seq, dev.type,
    )  # fmt: skip
    return meta, future


_ARTIFACT = (FLAG_ARTIFACT,)
_FUTURE = (FLAG_FUTURE_TS,)
_ARTIFACT_FUTURE = (FLAG_ARTIFACT, FLAG_FUTURE_TS)


def _obs_item(ctx: _Ctx, raw: object, i: int, msg_ts: int, msg_future: bool) -> ObsItem:
    """One observation, converted to its canonical unit and flagged; the hot path, hence inlined checks."""
    if type(raw) is not dict:
        raise _RefusedError(SCHEMA, f"obs[{i}]: a map is required")
    code = raw.get("code")
    if type(code) is not str and type(code) is not int:  # a float would hash like the int code it equals
        raise _RefusedError(SCHEMA, f"obs[{i}].code: an MDC reference id, numeric code or alias is required")
    info = CODE_LOOKUP.get(code)
    if info is None:
        raise _RefusedError(UNKNOWN_CODE, f"obs[{i}].code: {_show(code)} is not a known code")
    value = raw.get("value")
    unit = raw.get("unit")
    if unit is not None and type(unit) is not str:
        raise _RefusedError(SCHEMA, f"obs[{i}].unit: a UCUM string is required")
    raw_ts = raw.get("ts")
    ts, future = (msg_ts, msg_future) if raw_ts is None else ctx.ts(raw_ts, f"obs[{i}].ts")
    if info.choices:
        return ObsItem(info.ref, _ordinal(info, value, unit, i), info.unit, ts, _FUTURE if future else ())
    if type(value) is float:
        v = value
    elif type(value) is int:
        v = _finite(value, f"obs[{i}].value")
    else:
        raise _RefusedError(SCHEMA, f"obs[{i}].value: a number is required, got {_show(value)}")
    if not math.isfinite(v):
        raise _RefusedError(VALUE_RANGE, f"obs[{i}].value: {_show(value)} is not a finite number")
    if unit is not None and unit != info.unit:
        try:
            v = convert(v, unit, info)
        except UnitError as e:
            raise _RefusedError(UNIT, f"obs[{i}].unit: {e}") from None
    lo, hi = info.measurable
    if not lo <= v <= hi or (info.discrete and not v.is_integer()):
        raise _RefusedError(
            VALUE_RANGE, f"obs[{i}].value: {v:g} {info.unit} is not measurable for {info.ref}"
        )
    lo, hi = info.physiological
    if lo <= v <= hi:
        flags: tuple[str, ...] = _FUTURE if future else ()
    else:
        flags = _ARTIFACT_FUTURE if future else _ARTIFACT
    return ObsItem(info.ref, v, info.unit, ts, flags)


def _ordinal(info: CodeInfo, value: object, unit: str | None, i: int) -> str:
    if unit is not None and unit != info.unit:
        raise _RefusedError(UNIT, f"obs[{i}].unit: {info.ref} takes only {info.unit!r}, got {_show(unit)}")
    if type(value) is not str or value not in info.choices:
        levels = ", ".join(info.choices)
        raise _RefusedError(VALUE_RANGE, f"obs[{i}].value: {_show(value)} is not one of {levels}")
    return value


def _parse_obs(ctx: _Ctx, body: dict[Any, Any]) -> Observations | None:
    raw_items = body.get("obs")
    if type(raw_items) is not list or not raw_items:
        raise _RefusedError(SCHEMA, "obs: a non-empty list of observations is required")
    meta, future = _meta(ctx, body, ctx.device.patient_id)
    ts = meta.ts
    items: list[ObsItem] = []
    for i, raw in enumerate(raw_items):
        try:
            items.append(_obs_item(ctx, raw, i, ts, future))
        except _RefusedError as r:
            ctx.drop(r, raw)
    return Observations(meta, tuple(items)) if items else None


def _parse_status(ctx: _Ctx, body: dict[Any, Any]) -> DeviceStatus:
    meta, _ = _meta(ctx, body, ctx.device.patient_id)
    battery = _optional(ctx, body, "battery", lambda v, n: _in_range(v, n, 0.0, 1.0))
    return DeviceStatus(meta, battery, _known_strings(ctx, body, "conditions", CONDITIONS))


def _rate(value: object, name: str) -> float:
    return _in_range(value, name, 0.0, math.inf)


def _parse_pump(ctx: _Ctx, body: dict[Any, Any]) -> PumpStatus:
    state = _choice(body.get("state"), "state", PUMP_STATES)
    meta, _ = _meta(ctx, body, ctx.device.patient_id)
    return PumpStatus(
        meta,
        state,
        drug=_optional(ctx, body, "drug", lambda v, n: _text(v, n, MAX_TEXT)),
        rate_ml_h=_optional(ctx, body, "rate_ml_h", _rate),
        vtbi_ml=_optional(ctx, body, "vtbi_ml", _rate),
        infused_ml=_optional(ctx, body, "infused_ml", _rate),
        alarms=_known_strings(ctx, body, "alarms", PUMP_ALARMS),
    )


def _parse_gps(ctx: _Ctx, body: dict[Any, Any]) -> GpsFix:
    lat = _in_range(body.get("lat"), "lat", -90.0, 90.0)
    lon = _in_range(body.get("lon"), "lon", -180.0, 180.0)
    meta, _ = _meta(ctx, body, ctx.device.patient_id)
    return GpsFix(
        meta,
        lat,
        lon,
        speed_kmh=_optional(ctx, body, "speed_kmh", _rate),
        heading=_optional(ctx, body, "heading", lambda v, n: _in_range(v, n, 0.0, 360.0)),
    )


def _parse_crew(ctx: _Ctx, body: dict[Any, Any]) -> CrewMessage:
    unit_state = body.get("unit_state")
    action = body.get("action")
    incident_id = body.get("incident_id")
    if unit_state is None and action is None:
        raise _RefusedError(SCHEMA, "crew: unit_state or action is required")
    if unit_state is not None:
        _choice(unit_state, "unit_state", UNIT_STATES)
    if action is not None:
        _choice(action, "action", CREW_ACTIONS)
        _id(incident_id, "incident_id")
    elif incident_id is not None:
        _id(incident_id, "incident_id")
    meta, _ = _meta(ctx, body, ctx.device.patient_id)
    return CrewMessage(meta, unit_state, action, incident_id)


def _parse_sos(ctx: _Ctx, body: dict[Any, Any]) -> Sos:
    action = _choice(body.get("action"), "action", SOS_ACTIONS)
    bound = ctx.device.patient_id
    claimed = body.get("patient_id")
    if claimed is not None and bound is not None and claimed != bound:
        raise _RefusedError(
            PATIENT_MISMATCH,
            f"patient_id: {_show(claimed)} is not the patient this pendant is bound to",
            Outcome.UNAUTHORISED,
        )
    meta, _ = _meta(ctx, body, bound)
    # An SOS is never refused for its extras: a bad position or note is dropped on its own.
    raw_lat, raw_lon = body.get("lat"), body.get("lon")
    lat = lon = None
    if raw_lat is not None or raw_lon is not None:
        try:
            lat, lon = _in_range(raw_lat, "lat", -90.0, 90.0), _in_range(raw_lon, "lon", -180.0, 180.0)
        except _RefusedError as r:
            ctx.drop(r, {"lat": raw_lat, "lon": raw_lon})
    note = _optional(ctx, body, "note", lambda v, n: _text(v, n, MAX_NOTE))
    return Sos(meta, action, lat, lon, note)


def _lab_result(ctx: _Ctx, raw: object, name: str, msg_ts: int) -> LabResult:
    if type(raw) is not dict:
        raise _RefusedError(SCHEMA, f"{name}: a map is required")
    loinc = raw.get("loinc")
    if type(loinc) is not str or not is_loinc(loinc):
        raise _RefusedError(
            SCHEMA, f"{name}.loinc: {_show(loinc)} is not a LOINC code with a valid check digit"
        )
    value = raw.get("value")
    result_value: float | str
    if type(value) is str:
        result_value = _text(value, f"{name}.value", MAX_LAB_VALUE)
    elif type(value) is int or type(value) is float:
        result_value = _finite(value, f"{name}.value")
    else:
        raise _RefusedError(SCHEMA, f"{name}.value: a number or a string such as '<0.01' is required")
    unit = raw.get("unit")
    if unit is not None and (type(unit) is not str or _UCUM.fullmatch(unit) is None):
        raise _RefusedError(UNIT, f"{name}.unit: {_show(unit)} is not a UCUM unit")
    flag = raw.get("flag")
    if flag is not None:
        _choice(flag, f"{name}.flag", LAB_FLAGS)
    status = _choice(raw.get("status"), f"{name}.status", LAB_STATUSES)
    raw_ts = raw.get("ts")
    ts = msg_ts if raw_ts is None else ctx.ts(raw_ts, f"{name}.ts")[0]
    return LabResult(loinc, result_value, unit, flag, status, ts)


def _parse_lab(ctx: _Ctx, body: dict[Any, Any]) -> LabReport | None:
    patient_id = _id(body.get("patient_id"), "patient_id")
    raw_results = body.get("results")
    if type(raw_results) is not list or not raw_results:
        raise _RefusedError(SCHEMA, "results: a non-empty list of results is required")
    meta, _ = _meta(ctx, body, patient_id)
    order_id = _optional(ctx, body, "order_id", _id)
    provider = _optional(ctx, body, "ordering_provider", _id)
    results: list[LabResult] = []
    for i, raw in enumerate(raw_results):
        try:
            results.append(_lab_result(ctx, raw, f"results[{i}]", meta.ts))
        except _RefusedError as r:
            ctx.drop(r, raw)
    return LabReport(meta, order_id, provider, tuple(results)) if results else None


_PARSERS: dict[str, Callable[[_Ctx, dict[Any, Any]], DeviceEvent | None]] = {
    "obs": _parse_obs,
    "status": _parse_status,
    "pump": _parse_pump,
    "gps": _parse_gps,
    "crew": _parse_crew,
    "sos": _parse_sos,
    "lab": _parse_lab,
}


def _decode(payload: bytes, content_format: str | None) -> object:
    if content_format is None:
        if not payload:
            raise _RefusedError(MALFORMED, "empty payload", Outcome.MALFORMED)
        first = payload[0]
        if 0xA0 <= first <= 0xBF:
            content_format = "cbor"
        elif first == 0x7B or payload.lstrip(_JSON_SPACE)[:1] == b"{":
            content_format = "json"
        else:
            raise _RefusedError(MALFORMED, "neither a JSON object nor a CBOR map", Outcome.MALFORMED)
    if content_format == "json":
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as e:
            raise _RefusedError(MALFORMED, f"invalid JSON: {e}", Outcome.MALFORMED) from None
    if content_format == "cbor":
        fp = io.BytesIO(payload)
        try:
            body = cbor2.CBORDecoder(fp).decode()
        except Exception as e:  # cbor2 raises several types for hostile input (decode, value, recursion)
            raise _RefusedError(
                MALFORMED, f"invalid CBOR: {type(e).__name__}: {e}", Outcome.MALFORMED
            ) from None
        if fp.tell() != len(payload):
            raise _RefusedError(MALFORMED, "invalid CBOR: bytes after the first item", Outcome.MALFORMED)
        return body
    raise _RefusedError(
        UNSUPPORTED_FORMAT,
        f"content format {_show(content_format)} is not json or cbor",
        Outcome.UNSUPPORTED_FORMAT,
    )


def parse_message(
    payload: bytes,
    *,
    transport: str,
    device: DeviceInfo,
    kind: str,
    received_at: int,
    content_format: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Parsed:
    """Validate one device message and canonicalise it; every refusal comes back as a dead letter."""
    ctx = _Ctx(payload, transport=transport, device=device, kind=kind, received_at=received_at, limits=limits)
    if len(payload) > limits.max_payload:
        return ctx.refuse(Outcome.OVERSIZED, OVERSIZED, f"{len(payload)} bytes > {limits.max_payload}")
    parser = _PARSERS.get(kind)
    if parser is None:
        return ctx.refuse(
            Outcome.UNKNOWN_KIND, UNKNOWN_KIND, f"kind {_show(kind)} is not one of the contract's"
        )
    if kind not in KINDS_BY_TYPE.get(device.type, ()):
        return ctx.refuse(Outcome.UNAUTHORISED, KIND_NOT_ALLOWED, f"a {device.type} may not send {kind}")
    try:
        body = _decode(payload, content_format)
        if type(body) is not dict:
            raise _RefusedError(MALFORMED, "the message is not a map", Outcome.MALFORMED)
        event = parser(ctx, body)
    except _RefusedError as r:
        return ctx.refuse(r.outcome, r.reason, r.detail)
    except Exception as e:  # a bug must not become a poison message that blocks the device's queue
        return ctx.refuse(Outcome.SCHEMA, INTERNAL, f"validation failed: {type(e).__name__}: {e}")
    return Parsed(Outcome.ACCEPTED, event, tuple(ctx.dls) if ctx.dls else ())


# Manual observations (a clinician at a keyboard, through the API).
MAX_MANUAL_ITEMS = 64
FUTURE_TS = "future_ts"
PHYSIOLOGICAL_RANGE = "physiological_range"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one item (or, with `index` None, the entry as a whole) of a manual entry was refused."""

    index: int | None
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class ManualParsed:
    """A manual entry: the event when every item passed, else None and every refusal."""

    event: Observations | None
    refused: tuple[Refusal, ...]


def parse_manual_observations(
    raw_items: object,
    *,
    raw_ts: object,
    event_id: str,
    device_id: str,
    site_id: str,
    unit_id: str | None,
    bed_id: str | None,
    patient_id: str,
    received_at: int,
    limits: Limits = DEFAULT_LIMITS,
) -> ManualParsed:
    """Validate a clinician's `obs` list with the device item rules (codes, units, ranges, times).

    All or nothing, since a person can correct and resend: any refused item refuses the entry, and every
    refusal is reported. Two device outcomes become refusals here, because storing them would chart a value
    nobody uses: a value outside the physiological range (a device's is kept flagged `artifact`) and a time
    more than `limits.future_ms` ahead (a device's is moved to its received time and flagged `future_ts`).
    Accepted items are flagged `manual`; the event travels as transport `api`.
    """
    device = DeviceInfo(device_id, "manual", site_id, unit_id, bed_id, patient_id, allow_plain_coap=False)
    ctx = _Ctx(b"", transport="api", device=device, kind="obs", received_at=received_at, limits=limits)
    refused: list[Refusal] = []
    if type(raw_items) is not list or not raw_items:
        refused.append(Refusal(None, SCHEMA, "obs: a non-empty list of observations is required"))
        return ManualParsed(None, tuple(refused))
    if len(raw_items) > MAX_MANUAL_ITEMS:
        refused.append(Refusal(None, SCHEMA, f"obs: at most {MAX_MANUAL_ITEMS} observations per entry"))
        return ManualParsed(None, tuple(refused))
    ts = received_at
    if raw_ts is not None:
        try:
            ts, future = ctx.ts(raw_ts, "ts")
        except _RefusedError as r:
            refused.append(Refusal(None, r.reason, r.detail))
        else:
            if future:
                refused.append(Refusal(None, FUTURE_TS, f"ts: {_show(raw_ts)} is in the future"))
    items: list[ObsItem] = []
    for i, raw in enumerate(raw_items):
        try:
            item = _obs_item(ctx, raw, i, ts, False)
        except _RefusedError as r:
            refused.append(Refusal(i, r.reason, r.detail))
            continue
        if FLAG_FUTURE_TS in item.flags:
            own_ts = raw.get("ts") if type(raw) is dict else None
            refused.append(Refusal(i, FUTURE_TS, f"obs[{i}].ts: {_show(own_ts)} is in the future"))
        elif FLAG_ARTIFACT in item.flags:
            info = CODE_LOOKUP[item.code]
            lo, hi = info.physiological
            refused.append(
                Refusal(
                    i,
                    PHYSIOLOGICAL_RANGE,
                    f"obs[{i}].value: {item.value:g} {info.unit} is outside the physiological range "
                    f"{lo:g}..{hi:g} of {info.ref}; check the reading",
                )
            )
        else:
            items.append(ObsItem(item.code, item.value, item.unit, item.ts, (*item.flags, FLAG_MANUAL)))
    if refused:
        return ManualParsed(None, tuple(refused))
    meta = Meta(event_id, device_id, "obs", "api", ts, received_at, site_id, unit_id, bed_id, patient_id)
    return ManualParsed(Observations(meta, tuple(items)), ())
