"""Canonical events: immutable, slotted, versioned records that flow through the bus.

Every record carries `SCHEMA` (its name on the wire) and `VERSION`. Times are integer epoch milliseconds
(UTC). `encode`/`decode` turn any record into compact JSON bytes and back; the version travels with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

# Quality flags on a stored observation.
FLAG_ARTIFACT = "artifact"  # inside what the code can measure, outside the physiological range
FLAG_FUTURE_TS = "future_ts"  # device time > 5 min ahead of received time; ordered by received time
FLAG_LATE = "late"  # an unseen lower seq: stored in device-time order
FLAG_MANUAL = "manual"  # entered by a clinician, not a device
FLAG_INHIBITED = "inhibited"  # its sensor reported lead-off / probe-off at the time
FLAG_BACKFILL = "backfill"  # arrived long after its device time (replayed by a device or buffer)

KINDS = ("obs", "status", "pump", "gps", "crew", "sos", "lab")
DEVICE_TYPES = ("monitor", "pump", "ambulance", "pendant", "analyzer")


@dataclass(frozen=True, slots=True)
class Meta:
    """Envelope common to every device event: who sent it, when, and whom it is about."""

    event_id: str  # the dedup key: "{device}/{kind}/{boot}/{seq}" or "{device}/{kind}/id/{id}"
    device_id: str
    kind: str
    transport: str  # mqtt, coap, mllp, api
    ts: int  # device time of the message (ms)
    received_at: int  # gateway time (ms); liveness and attribution use this, never a worker clock
    site_id: str
    unit_id: str | None = None
    bed_id: str | None = None
    patient_id: str | None = None  # attribution at received time; never rewritten
    boot: str | None = None
    seq: int | None = None
    device_type: str | None = None  # monitor, pump, ...: its liveness timeout; None for manual entries


def seq_event_id(device_id: str, kind: str, boot: str | None, seq: int) -> str:
    """The dedup key of a message that carries `seq` and no `id` (contract section 3)."""
    return f"{device_id}/{kind}/{boot or '-'}/{seq}"


@dataclass(frozen=True, slots=True)
class ObsItem:
    """One measured value, already converted to the code's canonical UCUM unit."""

    code: str  # MDC reference id, or a Vigil code (o2_supplement, acvpu)
    value: float | str  # str only for acvpu
    unit: str  # UCUM, canonical for the code
    ts: int  # device time of this value (ms): the item's own ts or the message's
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Observations:
    SCHEMA: ClassVar[str] = "obs"
    VERSION: ClassVar[int] = 1
    meta: Meta
    items: tuple[ObsItem, ...]


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    SCHEMA: ClassVar[str] = "status"
    VERSION: ClassVar[int] = 1
    meta: Meta
    battery: float | None = None  # 0-1
    conditions: tuple[str, ...] = ()  # lead_off, probe_off, ...


@dataclass(frozen=True, slots=True)
class PumpStatus:
    SCHEMA: ClassVar[str] = "pump"
    VERSION: ClassVar[int] = 1
    meta: Meta
    state: str
    drug: str | None = None
    rate_ml_h: float | None = None
    vtbi_ml: float | None = None
    infused_ml: float | None = None
    alarms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GpsFix:
    SCHEMA: ClassVar[str] = "gps"
    VERSION: ClassVar[int] = 1
    meta: Meta
    lat: float
    lon: float
    speed_kmh: float | None = None
    heading: float | None = None


@dataclass(frozen=True, slots=True)
class CrewMessage:
    SCHEMA: ClassVar[str] = "crew"
    VERSION: ClassVar[int] = 1
    meta: Meta
    unit_state: str | None = None
    action: str | None = None  # accept, decline
    incident_id: str | None = None


@dataclass(frozen=True, slots=True)
class Sos:
    SCHEMA: ClassVar[str] = "sos"
    VERSION: ClassVar[int] = 1
    meta: Meta
    action: str  # press, cancel
    lat: float | None = None
    lon: float | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class LabResult:
    loinc: str
    value: float | str  # a string such as "<0.01" is kept as given
    unit: str | None
    flag: str | None  # the lab's own: L, H, LL, HH, N
    status: str  # preliminary, final, corrected
    ts: int


@dataclass(frozen=True, slots=True)
class LabReport:
    SCHEMA: ClassVar[str] = "lab"
    VERSION: ClassVar[int] = 1
    meta: Meta
    order_id: str | None
    ordering_provider: str | None
    results: tuple[LabResult, ...]


@dataclass(frozen=True, slots=True)
class Tick:
    """Time for timers, sent to every partition; its time is the only clock a processor sees."""

    SCHEMA: ClassVar[str] = "tick"
    VERSION: ClassVar[int] = 1
    at: int  # ms
    partition: int = 0


@dataclass(frozen=True, slots=True)
class Alert:
    SCHEMA: ClassVar[str] = "alert"
    VERSION: ClassVar[int] = 1
    id: str
    version: int
    patient_id: str | None
    bed_id: str | None
    site_id: str
    unit_id: str | None
    condition: str
    priority: str  # high, medium, low (IEC 60601-1-8)
    status: str  # active_unack, active_ack, cleared_unack, closed
    raised_at: int
    updated_at: int
    data_stale: bool = False
    retrospective: bool = False
    silenced_until: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AlertCommand:
    """A clinician's action on an alert (REST or websocket), sent to the alert's clinical key.

    `id` makes it idempotent: a redelivered command is applied once.
    """

    SCHEMA: ClassVar[str] = "alert_cmd"
    VERSION: ClassVar[int] = 1
    id: str
    alert_id: str
    action: str  # ack, silence, resolve
    by: str  # username
    at: int  # ms, the API node's clock when the clinician acted
    site_id: str
    duration_ms: int | None = None  # silence only; capped at 2 minutes by the lifecycle
    read_back: str | None = None  # a critical result's acknowledgement repeats its value


@dataclass(frozen=True, slots=True)
class PatientSettings:
    """A patient's NEWS2 settings and limit overrides, as now in force (each field None: unchanged).

    `overrides` is the whole current set (each as `alerting.rules.PatientOverride` fields), so a
    redelivered or reordered message cannot resurrect a removed override.
    """

    SCHEMA: ClassVar[str] = "patient_settings"
    VERSION: ClassVar[int] = 1
    id: str
    at: int
    site_id: str
    patient_id: str
    news2_scale: int | None = None
    news2_suppressed: bool | None = None
    overrides: tuple[dict[str, Any], ...] | None = None
    by: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceLiveness:
    """A device went silent past its type's timeout, or spoke again: judged on the gateway's received time."""

    SCHEMA: ClassVar[str] = "liveness"
    VERSION: ClassVar[int] = 1
    id: str  # "{device}/offline/{last_received_at}" (and ".../online/..." for the return)
    device_id: str
    device_type: str | None
    online: bool
    at: int  # the tick (offline) or the message (online) that decided it
    last_received_at: int
    site_id: str
    unit_id: str | None = None
    bed_id: str | None = None
    patient_id: str | None = None


@dataclass(frozen=True, slots=True)
class AlertPage:
    """An escalation step: who is paged about an alert (none: the level was skipped, with `skipped`).

    Idempotent by `key` = "{alert_id}/{step}"; clients are pushed it once per key.
    """

    SCHEMA: ClassVar[str] = "page"
    VERSION: ClassVar[int] = 1
    alert_id: str
    alert_version: int
    step: int
    level: int
    recipients: tuple[str, ...]
    at: int
    site_id: str
    unit_id: str | None
    patient_id: str | None
    bed_id: str | None
    condition: str
    priority: str
    skipped: str | None = None  # no_assignee, empty_role, empty_group, not_connected

    @property
    def key(self) -> str:
        return f"{self.alert_id}/{self.step}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message or item that could not be accepted, with the reason code the contract names."""

    SCHEMA: ClassVar[str] = "deadletter"
    VERSION: ClassVar[int] = 1
    id: str  # derived from the input: transport, device, received time and position
    received_at: int
    transport: str
    reason: str  # malformed, schema, unknown_device, unauthorised, oversized, unit, value_range, stale, ...
    detail: str
    device_id: str | None = None
    kind: str | None = None
    site_id: str | None = None
    payload: str | None = None  # a bounded excerpt (base64 for binary), never the whole of a large payload


@dataclass(frozen=True, slots=True)
class AdmissionChange:
    """A patient admitted to, or removed from, a bed (API or HL7 ADT)."""

    SCHEMA: ClassVar[str] = "admission"
    VERSION: ClassVar[int] = 1
    id: str
    at: int
    site_id: str
    bed_id: str
    patient_id: str | None  # None: the bed was freed
    previous_patient_id: str | None
    reason: str  # admit, transfer, discharge, free


@dataclass(frozen=True, slots=True)
class LiveUpdate:
    """What a live board shows of a bed or patient: new values or device state, as the device sent them."""

    SCHEMA: ClassVar[str] = "live"
    VERSION: ClassVar[int] = 1
    id: str  # the input event's id
    kind: str  # vitals, device, pump
    at: int  # received time (ms)
    site_id: str
    unit_id: str | None
    bed_id: str | None
    patient_id: str | None
    device_id: str
    items: tuple[ObsItem, ...] = ()
    conditions: tuple[str, ...] = ()
    battery: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


Event = (
    Observations
    | DeviceStatus
    | PumpStatus
    | GpsFix
    | CrewMessage
    | Sos
    | LabReport
    | Tick
    | Alert
    | DeadLetter
    | AdmissionChange
    | LiveUpdate
    | AlertCommand
    | PatientSettings
    | DeviceLiveness
    | AlertPage
)

_TYPES: dict[str, type[Any]] = {
    t.SCHEMA: t
    for t in (
        Observations,
        DeviceStatus,
        PumpStatus,
        GpsFix,
        CrewMessage,
        Sos,
        LabReport,
        Tick,
        Alert,
        DeadLetter,
        AdmissionChange,
        LiveUpdate,
        AlertCommand,
        PatientSettings,
        DeviceLiveness,
        AlertPage,
    )
}
_TUPLE_FIELDS = {"items", "results", "conditions", "alarms", "flags", "recipients", "overrides"}


_HEADERS: dict[type[Any], bytes] = {
    t: f'{{"_s":"{t.SCHEMA}","_v":{t.VERSION},"d":'.encode() for t in _TYPES.values()
}


def encode(event: Event) -> bytes:
    """Compact JSON `{"_s": schema, "_v": version, "d": fields}`; orjson serialises dataclasses natively."""
    return _HEADERS[type(event)] + orjson.dumps(event) + b"}"


def decode(data: bytes) -> Event:
    """The inverse of `encode`; raises ValueError on an unknown schema or a newer version."""
    body = orjson.loads(data)
    name = body.get("_s")
    version = body.get("_v")
    cls = _TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown schema {name!r}")
    if not isinstance(version, int) or version > cls.VERSION:
        raise ValueError(f"schema {name} v{version} is newer than this build (v{cls.VERSION})")
    return _build(cls, body["d"])  # type: ignore[no-any-return]


def _items(raw: list[dict[str, Any]]) -> tuple[ObsItem, ...]:
    return tuple(ObsItem(i["code"], i["value"], i["unit"], i["ts"], tuple(i["flags"])) for i in raw)


_CONVERT: dict[str, Any] = {
    "meta": lambda v: Meta(**v),
    "items": _items,
    "results": lambda v: tuple(LabResult(**r) for r in v),
    **{name: tuple for name in _TUPLE_FIELDS - {"items", "results", "overrides"}},
    "overrides": lambda v: None if v is None else tuple(v),
}


def _build(cls: type[Any], body: dict[str, Any]) -> Any:
    convert = _CONVERT
    for name, value in body.items():
        conv = convert.get(name)
        if conv is not None:
            body[name] = conv(value)
    return cls(**body)
