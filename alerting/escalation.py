"""Escalation of unacknowledged alarms as a pure state machine: `step(state, event, at) -> (state, effects)`.

The caller (a clinical processor keyed by patient) feeds every new version of an alert and every `Tick`,
each with the roster, assignment and connection facts of that moment. Pages are keyed by (alert id,
escalation step) so a redelivered input pages nobody twice. No black holes: a level with nobody to reach is
passed at once, and the last level repeats until somebody acknowledges. Silence never stops escalation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from streams.schemas import Alert

TargetKind = Literal["assignee", "role", "group"]


@dataclass(frozen=True, slots=True)
class Target:
    """Who a level pages: the patient's assigned nurse, a role of the unit, or a roster group of the unit."""

    kind: TargetKind
    name: str = ""


@dataclass(frozen=True, slots=True)
class Level:
    after_ms: int  # since the alarm was announced (or re-announced)
    targets: tuple[Target, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    levels: tuple[Level, ...]
    repeat_ms: int = 60_000  # the last level pages again this often until acknowledged

    def __post_init__(self) -> None:
        if not self.levels or self.repeat_ms <= 0:
            raise ValueError("a policy needs a level and a positive repeat")


DEFAULT_POLICY = Policy(
    (
        Level(0, (Target("assignee", "primary_nurse"),)),
        Level(60_000, (Target("role", "charge_nurse"),)),
        Level(120_000, (Target("group", "rapid_response"),)),
    )
)


@dataclass(frozen=True, slots=True)
class Policies:
    """Policies by (unit, priority), then by unit (priority ""), then the default."""

    by_unit: Mapping[tuple[str, str], Policy] = field(default_factory=dict)
    default: Policy = DEFAULT_POLICY

    def for_alert(self, unit_id: str | None, priority: str) -> Policy:
        unit = unit_id or ""
        return self.by_unit.get((unit, priority)) or self.by_unit.get((unit, "")) or self.default


DEFAULT_POLICIES = Policies()


@dataclass(frozen=True, slots=True)
class Facts:
    """Now: the patient's assignee, the unit's roles and roster groups, who is online."""

    assignee: str | None = None
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    connected: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AlertChanged:
    """A new version of an alert from alerting/lifecycle.py: starts, keeps or stops its escalation."""

    alert: Alert
    facts: Facts


@dataclass(frozen=True, slots=True)
class Due:
    """A `Tick` for the escalation timers, with the facts of that moment."""

    facts: Facts


EscalationEvent = AlertChanged | Due


@dataclass(frozen=True, slots=True)
class Page:
    """Page `recipients` about an alert; idempotent by (alert_id, step)."""

    alert_id: str
    alert_version: int
    step: int
    level: int
    recipients: tuple[str, ...]
    at: int

    @property
    def key(self) -> str:
        return f"{self.alert_id}/{self.step}"


@dataclass(frozen=True, slots=True)
class Skipped:
    """A level that had nobody to reach (audited): why, and that escalation went on at once."""

    alert_id: str
    step: int
    level: int
    reason: str  # no_assignee, empty_role, empty_group, not_connected
    at: int

    @property
    def key(self) -> str:
        return f"{self.alert_id}/{self.step}"


EscalationEffect = Page | Skipped


@dataclass(frozen=True, slots=True)
class Running:
    """One alert's escalation. `next_step` only grows, so every page of an alert has its own key."""

    alert_id: str
    alert_version: int
    unit_id: str | None
    priority: str
    started_at: int | None  # None: stopped (acknowledged); kept until closed so steps never repeat
    level: int = 0
    due_at: int = 0
    next_step: int = 0


@dataclass(frozen=True, slots=True)
class EscalationState:
    running: Mapping[str, Running] = field(default_factory=dict)


def step(
    state: EscalationState | None,
    event: EscalationEvent,
    at: int,
    policies: Policies = DEFAULT_POLICIES,
) -> tuple[EscalationState, tuple[EscalationEffect, ...]]:
    """Apply one input, then fire whatever is due at `at`."""
    running = dict((state or EscalationState()).running)
    if isinstance(event, AlertChanged):
        _on_alert(running, event.alert, at)
    effects: list[EscalationEffect] = []
    for alert_id in sorted(running):
        item = running[alert_id]
        if item.started_at is not None and item.due_at <= at:
            running[alert_id] = _fire(item, event.facts, at, policies, effects)
    return EscalationState(running), tuple(effects)


def _on_alert(running: dict[str, Running], alert: Alert, at: int) -> None:
    current = running.get(alert.id)
    if alert.status == "closed":
        running.pop(alert.id, None)
        return
    if current is not None and alert.version <= current.alert_version:
        return  # a redelivered or older version
    if alert.status == "active_ack":
        if current is not None:
            running[alert.id] = replace(current, alert_version=alert.version, started_at=None)
        return
    if alert.retrospective:
        return  # backfilled: shown, never paged as new
    if current is not None and current.started_at is not None:
        # Repeats, worsening, silence and clearing-while-latched keep the timer: never reset it.
        running[alert.id] = replace(current, alert_version=alert.version, priority=alert.priority)
        return
    if alert.status != "active_unack":
        return
    running[alert.id] = Running(
        alert_id=alert.id,
        alert_version=alert.version,
        unit_id=alert.unit_id,
        priority=alert.priority,
        started_at=at,
        level=0,
        due_at=at,
        next_step=current.next_step if current is not None else 0,
    )


_EMPTY: Mapping[str, str] = {"assignee": "no_assignee", "role": "empty_role", "group": "empty_group"}


def _recipients(level: Level, facts: Facts) -> tuple[tuple[str, ...], str]:
    """Reachable recipients of a level, else why there are none."""
    people: list[str] = []
    reasons: list[str] = []
    for target in level.targets:
        if target.kind == "assignee":
            found: tuple[str, ...] = (facts.assignee,) if facts.assignee else ()
        elif target.kind == "role":
            found = facts.roles.get(target.name, ())
        else:
            found = facts.groups.get(target.name, ())
        if not found:
            reasons.append(
                {"assignee": "no_assignee", "role": "empty_role", "group": "empty_group"}[target.kind]
            )
        people.extend(p for p in found if p not in people)
    reachable = tuple(p for p in people if p in facts.connected)
    if not reachable and people:
        reasons.append("not_connected")
    return reachable, ",".join(reasons)


def _fire(
    item: Running, facts: Facts, at: int, policies: Policies, effects: list[EscalationEffect]
) -> Running:
    """Fire every level due at `at`; a level with nobody to reach passes to the next one at once."""
    policy = policies.for_alert(item.unit_id, item.priority)
    last = len(policy.levels) - 1
    started = item.started_at
    assert started is not None, "only running escalations fire"
    while item.due_at <= at:
        level = min(item.level, last)
        reachable, why = _recipients(policy.levels[level], facts)
        if not reachable and level == last:
            # Nobody at the last level: page everyone reachable at any level rather than nobody.
            pooled: list[str] = []
            for lower in policy.levels:
                pooled.extend(p for p in _recipients(lower, facts)[0] if p not in pooled)
            reachable = tuple(pooled)
        if reachable:
            effects.append(Page(item.alert_id, item.alert_version, item.next_step, level, reachable, at))
        else:
            effects.append(Skipped(item.alert_id, item.next_step, level, why or "nobody", at))
        item = replace(item, next_step=item.next_step + 1)
        if level < last:
            scheduled = started + policy.levels[level + 1].after_ms
            item = replace(item, level=level + 1, due_at=scheduled if reachable else at)
        else:
            # The last level repeats; a late tick pages once, not once per missed interval.
            due = item.due_at + policy.repeat_ms
            item = replace(item, level=last, due_at=due if due > at else at + policy.repeat_ms)
    return item


# ---- state as plain data: a restart loses nothing ----


def state_json(state: EscalationState) -> dict[str, Any]:
    return {"running": list(state.running.values())}  # orjson serialises the dataclasses


def state_from(body: dict[str, Any]) -> EscalationState:
    items = [Running(**r) for r in body["running"]]
    return EscalationState({r.alert_id: r for r in items})


def encode_state(state: EscalationState) -> bytes:
    return orjson.dumps(state_json(state))


def decode_state(raw: bytes) -> EscalationState:
    return state_from(orjson.loads(raw))
