"""The alarm lifecycle as a pure state machine: one alarm per (patient or bed, condition).

A clinical processor keyed by patient (or by bed, for alarms with no patient) holds one `AlarmBook` and feeds
it every input with `step`. Time comes only from the inputs (an observation's source time, a `Tick`). Every
change returns the new `Alert` (version bumped) with a `Transition` for the audit log. docs/ALARMS.md draws
the state diagram and explains the defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import orjson

from streams.schemas import Alert, Tick

Priority = Literal["high", "medium", "low"]
Status = Literal["active_unack", "active_ack", "cleared_unack", "closed"]
CloseReason = Literal["discharge", "transfer", "admission"]  # admission: a patient took a bed's place

ACTIVE_STATUSES: tuple[Status, ...] = ("active_unack", "active_ack", "cleared_unack")
MINUTE_MS = 60_000
SILENCE_MAX_MS = 2 * MINUTE_MS  # design.md: an audio pause lasts at most 2 minutes
_RANK: Mapping[str, int] = {"low": 0, "medium": 1, "high": 2}


@dataclass(frozen=True, slots=True)
class Worsening:
    """How far a value must move, and which way, to re-announce an alarm (SpO2 86 -> 78: step 4, lower)."""

    step: float
    lower_is_worse: bool


# Examples for the rules engine's condition names; a site passes its own.
DEFAULT_WORSENING: Mapping[str, Worsening] = {
    "spo2_low": Worsening(4.0, lower_is_worse=True),
    "hr_low": Worsening(10.0, lower_is_worse=True),
    "hr_high": Worsening(20.0, lower_is_worse=False),
    "rr_low": Worsening(3.0, lower_is_worse=True),
    "rr_high": Worsening(5.0, lower_is_worse=False),
    "nibp_sys_low": Worsening(10.0, lower_is_worse=True),
    "nibp_sys_high": Worsening(20.0, lower_is_worse=False),
    "temp_high": Worsening(1.0, lower_is_worse=False),
    "news2": Worsening(2.0, lower_is_worse=False),
}


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    """Re-announce delays of an acknowledged, persisting alarm; latching per priority; worsening steps."""

    reannounce_ms: Mapping[str, int] = field(
        default_factory=lambda: {"high": 5 * MINUTE_MS, "medium": 15 * MINUTE_MS, "low": 15 * MINUTE_MS}
    )
    latching: Mapping[str, bool] = field(
        default_factory=lambda: {"high": True, "medium": False, "low": False}
    )
    worsening: Mapping[str, Worsening] = field(default_factory=lambda: dict(DEFAULT_WORSENING))


DEFAULT_CONFIG = LifecycleConfig()


# Inputs. `at` is epoch ms from the input itself, never a worker clock.
@dataclass(frozen=True, slots=True)
class Observed:
    """A rule's verdict on one condition: true (with its priority and value) or false, at source time."""

    condition: str
    active: bool
    at: int
    priority: Priority
    site_id: str
    patient_id: str | None = None
    bed_id: str | None = None
    unit_id: str | None = None
    value: float | None = None
    backfill: bool = False  # data replayed long after its time: raises a retrospective alarm, never a page
    detail: Mapping[str, Any] = field(default_factory=dict)  # shown with the alert (label, unit, device)


@dataclass(frozen=True, slots=True)
class DataStopped:
    """No data for these conditions (device offline, gap): mark stale, never clear."""

    at: int
    conditions: tuple[str, ...] | None = None  # None: every open alarm of the book


@dataclass(frozen=True, slots=True)
class Inhibit:
    """A technical condition (lead-off of one ECG, probe-off of one SpO2) inhibits its sensor's parameters."""

    source: str  # the technical alarm's key, e.g. "lead_off:ecg-7"
    conditions: tuple[str, ...]
    at: int


@dataclass(frozen=True, slots=True)
class Uninhibit:
    source: str
    conditions: tuple[str, ...]
    at: int


@dataclass(frozen=True, slots=True)
class Ack:
    alert_id: str
    by: str
    at: int


@dataclass(frozen=True, slots=True)
class Silence:
    """Audio pause; capped at `SILENCE_MAX_MS`. Escalation ignores it (alerting/escalation.py)."""

    alert_id: str
    by: str
    at: int
    duration_ms: int = SILENCE_MAX_MS


@dataclass(frozen=True, slots=True)
class Resolve:
    """A clinician closes a cleared (latched) alarm."""

    alert_id: str
    by: str
    at: int


@dataclass(frozen=True, slots=True)
class Discharged:
    """The patient left (discharge or transfer): every alarm closes with the reason and nothing is kept."""

    reason: CloseReason
    at: int
    by: str | None = None


LifecycleEvent = Observed | DataStopped | Inhibit | Uninhibit | Ack | Silence | Resolve | Discharged | Tick


@dataclass(frozen=True, slots=True)
class Transition:
    """One audited change: `from_status` is None when the alarm is raised."""

    alert_id: str
    version: int
    from_status: Status | None
    to_status: Status
    reason: str
    at: int
    by: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    alert: Alert
    transition: Transition


@dataclass(frozen=True, slots=True)
class Alarm:
    """An open alarm and what its timers and worsening need."""

    alert: Alert
    condition_true: bool
    last_obs_at: int  # source time of the last applied observation; older ones are ignored
    last_value: float | None = None
    announced_value: float | None = None  # the value when it was last announced; worsening compares to it
    acked_at: int | None = None
    acked_by: str | None = None


@dataclass(frozen=True, slots=True)
class AlarmBook:
    """All alarms of one key (a patient, or a bed without one): open alarms and inhibitions by condition."""

    alarms: Mapping[str, Alarm] = field(default_factory=dict)
    inhibited: Mapping[str, frozenset[str]] = field(default_factory=dict)


def is_pageable(alert: Alert) -> bool:
    """Whether the delivery layer may page for this alert: announced and not raised from backfilled data."""
    return alert.status == "active_unack" and not alert.retrospective


def alert_id(key: str, condition: str, raised_at: int) -> str:
    """`{patient or bed}~{condition}~{raised_at}`: derived from the input, and safe in a URL path segment."""
    return f"{key}~{condition}~{raised_at}"


def step(
    book: AlarmBook | None, event: LifecycleEvent, config: LifecycleConfig = DEFAULT_CONFIG
) -> tuple[AlarmBook, tuple[Change, ...]]:
    """Apply one input to a key's alarms; the same book and input always give the same result."""
    book = book or AlarmBook()
    match event:
        case Observed():
            return _observed(book, event, config)
        case Tick():
            return _tick(book, event.at, config)
        case DataStopped():
            return _data_stopped(book, event)
        case Inhibit() | Uninhibit():
            return _inhibit(book, event)
        case Ack() | Silence() | Resolve():
            return _user_action(book, event)
        case Discharged():
            return _discharged(book, event)


# ---- transitions ----


def _change(
    alarm: Alarm, at: int, reason: str, *, by: str | None = None, **fields: Any
) -> tuple[Alarm, Change]:
    old = alarm.alert
    alert = replace(old, version=old.version + 1, updated_at=at, **fields)
    transition = Transition(
        alert.id, alert.version, cast(Status, old.status), cast(Status, alert.status), reason, at, by
    )
    return replace(alarm, alert=alert), Change(alert, transition)


def _with(book: AlarmBook, condition: str, alarm: Alarm | None) -> AlarmBook:
    alarms = dict(book.alarms)
    if alarm is None or alarm.alert.status == "closed":
        alarms.pop(condition, None)
    else:
        alarms[condition] = alarm
    return replace(book, alarms=alarms)


def _raise(book: AlarmBook, obs: Observed) -> tuple[AlarmBook, tuple[Change, ...]]:
    key = obs.patient_id or obs.bed_id
    if key is None:
        raise ValueError("an alarm needs a patient or a bed")  # a bug in the caller, not data
    inhibitors = book.inhibited.get(obs.condition, frozenset())
    alert = Alert(
        id=alert_id(key, obs.condition, obs.at),
        version=1,
        patient_id=obs.patient_id,
        bed_id=obs.bed_id,
        site_id=obs.site_id,
        unit_id=obs.unit_id,
        condition=obs.condition,
        priority=obs.priority,
        status="active_unack",
        raised_at=obs.at,
        updated_at=obs.at,
        retrospective=obs.backfill,
        detail={**obs.detail, **({} if obs.value is None else {"value": obs.value}), **_detail(inhibitors)},
    )
    alarm = Alarm(alert, True, obs.at, obs.value, obs.value)
    reason = "raised_retrospective" if obs.backfill else "raised"
    transition = Transition(alert.id, 1, None, "active_unack", reason, obs.at)
    return _with(book, obs.condition, alarm), (Change(alert, transition),)


def _detail(inhibitors: frozenset[str]) -> dict[str, Any]:
    return {"inhibited_by": sorted(inhibitors)} if inhibitors else {}


def _worsened(alarm: Alarm, obs: Observed, config: LifecycleConfig) -> bool:
    if _RANK[obs.priority] > _RANK[alarm.alert.priority]:
        return True
    rule = config.worsening.get(obs.condition)
    if rule is None or obs.value is None or alarm.announced_value is None:
        return False
    delta = alarm.announced_value - obs.value if rule.lower_is_worse else obs.value - alarm.announced_value
    return delta >= rule.step


def _observed(
    book: AlarmBook, obs: Observed, config: LifecycleConfig
) -> tuple[AlarmBook, tuple[Change, ...]]:
    if book.inhibited.get(obs.condition):
        return book, ()  # its sensor is off: the values are not the patient's
    alarm = book.alarms.get(obs.condition)
    if alarm is None:
        return _raise(book, obs) if obs.active else (book, ())
    if obs.at < alarm.last_obs_at:
        return book, ()  # a late reading never rewrites the present
    if obs.backfill and not alarm.alert.retrospective:
        return book, ()  # past data never changes a live alarm
    fresh = replace(alarm, last_obs_at=obs.at, last_value=obs.value if obs.active else alarm.last_value)
    fields: dict[str, Any] = {}
    reasons: list[str] = []
    if alarm.alert.data_stale:
        fields["data_stale"] = False
        reasons.append("data_resumed")
    if obs.active:
        fresh = replace(fresh, condition_true=True)
        status = alarm.alert.status
        if alarm.alert.retrospective and not obs.backfill:
            fields.update(retrospective=False, status="active_unack")
            reasons.append("confirmed_live")
        if status == "cleared_unack":
            fields["status"] = "active_unack"
            reasons.append("recurred")
        if _worsened(alarm, obs, config):
            if _RANK[obs.priority] > _RANK[alarm.alert.priority]:
                fields["priority"] = obs.priority
            fields["status"] = "active_unack"
            reasons.append("worsened")
        if fields.get("status") == "active_unack":
            announced = obs.value if obs.value is not None else alarm.announced_value
            fresh = replace(fresh, acked_at=None, acked_by=None, announced_value=announced)
    else:
        fresh = replace(fresh, condition_true=False)
        status = alarm.alert.status
        if status == "active_ack":
            fields["status"] = "closed"
            reasons.append("condition_cleared")
        elif status == "active_unack":
            latching = config.latching.get(alarm.alert.priority, True)
            fields["status"] = "cleared_unack" if latching else "closed"
            reasons.append("condition_cleared")
    if not fields:
        return _with(book, obs.condition, fresh), ()  # a repeat: nothing resets, nothing changes
    if obs.active and obs.value is not None:
        fields["detail"] = {**alarm.alert.detail, "value": obs.value}
    updated, change = _change(fresh, obs.at, "+".join(reasons), **fields)
    return _with(book, obs.condition, updated), (change,)


def _tick(book: AlarmBook, at: int, config: LifecycleConfig) -> tuple[AlarmBook, tuple[Change, ...]]:
    changes: list[Change] = []
    for condition, alarm in sorted(book.alarms.items()):
        current = alarm
        until = current.alert.silenced_until
        if until is not None and at >= until:
            current, change = _change(current, at, "silence_expired", silenced_until=None)
            changes.append(change)
        delay = config.reannounce_ms.get(current.alert.priority, 5 * MINUTE_MS)
        if (
            current.alert.status == "active_ack"
            and current.condition_true
            and current.acked_at is not None
            and at - current.acked_at >= delay
        ):
            current = replace(current, acked_at=None, acked_by=None, announced_value=current.last_value)
            current, change = _change(current, at, "persisting", status="active_unack")
            changes.append(change)
        if current is not alarm:
            book = _with(book, condition, current)
    return book, tuple(changes)


def _targets(book: AlarmBook, conditions: Iterable[str] | None) -> list[str]:
    wanted = book.alarms.keys() if conditions is None else conditions
    return sorted(c for c in set(wanted) if c in book.alarms)


def _data_stopped(book: AlarmBook, event: DataStopped) -> tuple[AlarmBook, tuple[Change, ...]]:
    changes: list[Change] = []
    for condition in _targets(book, event.conditions):
        alarm = book.alarms[condition]
        if not alarm.alert.data_stale:
            updated, change = _change(alarm, event.at, "data_stopped", data_stale=True)
            book = _with(book, condition, updated)
            changes.append(change)
    return book, tuple(changes)


def _inhibit(book: AlarmBook, event: Inhibit | Uninhibit) -> tuple[AlarmBook, tuple[Change, ...]]:
    inhibited = dict(book.inhibited)
    for condition in event.conditions:
        now = inhibited.get(condition, frozenset())
        now = now | {event.source} if isinstance(event, Inhibit) else now - {event.source}
        if now:
            inhibited[condition] = now
        else:
            inhibited.pop(condition, None)
    book = replace(book, inhibited=inhibited)
    changes: list[Change] = []
    for condition in _targets(book, event.conditions):
        alarm = book.alarms[condition]
        detail = {**alarm.alert.detail, **_detail(inhibited.get(condition, frozenset()))}
        if not inhibited.get(condition):
            detail.pop("inhibited_by", None)
        if detail == alarm.alert.detail:
            continue
        fields: dict[str, Any] = {"detail": detail}
        reason = "inhibited" if isinstance(event, Inhibit) else "uninhibited"
        if isinstance(event, Inhibit):
            fields["data_stale"] = True  # its values stopped being the patient's: stale, never cleared
        updated, change = _change(alarm, event.at, reason, **fields)
        book = _with(book, condition, updated)
        changes.append(change)
    return book, tuple(changes)


def _user_action(book: AlarmBook, event: Ack | Silence | Resolve) -> tuple[AlarmBook, tuple[Change, ...]]:
    found = next(((c, a) for c, a in book.alarms.items() if a.alert.id == event.alert_id), None)
    if found is None:
        return book, ()  # closed, never existed, or a redelivery
    condition, alarm = found
    status = alarm.alert.status
    match event:
        case Ack():
            if status == "active_unack":
                alarm = replace(alarm, acked_at=event.at, acked_by=event.by)
                updated, change = _change(alarm, event.at, "acknowledged", by=event.by, status="active_ack")
            elif status == "cleared_unack":
                updated, change = _change(alarm, event.at, "acknowledged", by=event.by, status="closed")
            else:
                return book, ()
        case Silence():
            duration = max(0, min(event.duration_ms, SILENCE_MAX_MS))
            until = event.at + duration
            if duration == 0 or alarm.alert.silenced_until == until:
                return book, ()
            updated, change = _change(alarm, event.at, "silenced", by=event.by, silenced_until=until)
        case Resolve():
            if status != "cleared_unack":
                return book, ()  # an alarm whose condition persists cannot be closed by hand
            updated, change = _change(alarm, event.at, "resolved", by=event.by, status="closed")
    return _with(book, condition, updated), (change,)


def _discharged(book: AlarmBook, event: Discharged) -> tuple[AlarmBook, tuple[Change, ...]]:
    changes = [
        _change(alarm, event.at, event.reason, by=event.by, status="closed")[1]
        for _, alarm in sorted(book.alarms.items())
    ]
    return AlarmBook(), tuple(changes)  # nothing of this patient is kept for the bed's next one


# ---- state as plain data (faust Table, SQLite, Redis) ----


def book_json(book: AlarmBook) -> dict[str, Any]:
    return {
        "alarms": {c: _alarm_json(a) for c, a in book.alarms.items()},
        "inhibited": {c: sorted(s) for c, s in book.inhibited.items()},
    }


def book_from(body: dict[str, Any]) -> AlarmBook:
    alarms = {c: _alarm_from(dict(a)) for c, a in body["alarms"].items()}
    inhibited = {c: frozenset(s) for c, s in body["inhibited"].items()}
    return AlarmBook(alarms, inhibited)


def encode_book(book: AlarmBook) -> bytes:
    return orjson.dumps(book_json(book))


def decode_book(raw: bytes) -> AlarmBook:
    return book_from(orjson.loads(raw))


def _alarm_json(alarm: Alarm) -> dict[str, Any]:
    return {
        "alert": alarm.alert,  # orjson serialises the dataclass
        "condition_true": alarm.condition_true,
        "last_obs_at": alarm.last_obs_at,
        "last_value": alarm.last_value,
        "announced_value": alarm.announced_value,
        "acked_at": alarm.acked_at,
        "acked_by": alarm.acked_by,
    }


def _alarm_from(body: dict[str, Any]) -> Alarm:
    alert = dict(body.pop("alert"))
    return Alarm(alert=Alert(**alert), **body)
