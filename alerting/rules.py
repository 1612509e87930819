"""Declarative alarm rules: the model, the SpO2 safety floor and a pure evaluator that feeds the lifecycle.

The YAML form is loaded by alerting/rules_schema.py; docs/RULES.md explains both and justifies the shipped
defaults. Thresholds are held in each parameter's canonical UCUM unit; time comes only from the inputs.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any, Literal

from alerting.lifecycle import Observed, Priority
from streams.codes import BY_REF, resolve_code
from streams.schemas import FLAG_ARTIFACT, ObsItem
from streams.units import UnitError, convert

Op = Literal["<", "<=", ">", ">="]
Mode = Literal["all", "any"]
TermKind = Literal["value", "ratio", "change"]

PRIORITIES: tuple[Priority, ...] = ("high", "medium", "low")
OPS: tuple[Op, ...] = ("<", "<=", ">", ">=")
SECOND_MS = 1_000
HOUR_MS = 3_600 * SECOND_MS
DEFAULT_MAX_GAP_MS = 10 * SECOND_MS  # a longer gap between readings restarts an on-delay
DEFAULT_STALE_MS = 10 * SECOND_MS  # how long a reading stands for its parameter in a compound rule
MAX_OVERRIDE_MS = 72 * HOUR_MS  # a per-patient limit must be reviewed at least every three days

# The contract's floor (section 5): whatever the configuration, SpO2 < 80 % for 15 s is a high-priority alarm.
FLOOR_CONDITION = "spo2_critical"
FLOOR_PARAMETER = "MDC_PULS_OXIM_SAT_O2"
FLOOR_THRESHOLD = 80.0
FLOOR_DELAY_MS = 15 * SECOND_MS


@dataclass(frozen=True, slots=True)
class Term:
    """One comparison: a parameter's value, a ratio of two, or a change over a window, against a threshold."""

    kind: TermKind
    params: tuple[str, ...]  # MDC reference ids; a ratio's numerator then denominator
    op: Op
    threshold: float  # canonical unit (a change: a delta in it; a ratio: canonical over canonical)
    unit: str  # the canonical unit the threshold is in ("1" for a ratio)
    hysteresis: float = 0.0  # an active term clears only this far past the threshold
    window_ms: int = 0  # change terms only

    def clear_threshold(self) -> float:
        return (
            self.threshold + self.hysteresis if self.op in ("<", "<=") else self.threshold - self.hysteresis
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """A named condition: its terms (all or any), priority, on-delay and the gap that breaks continuity."""

    condition: str
    terms: tuple[Term, ...]
    priority: Priority
    delay_ms: int = 0
    mode: Mode = "all"
    max_gap_ms: int = DEFAULT_MAX_GAP_MS
    label: str = ""
    source: str = ""  # file:line of its definition
    _params: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_params", frozenset(p for t in self.terms for p in t.params))

    @property
    def params(self) -> frozenset[str]:
        """Every parameter the rule reads (computed once: it is asked for each reading)."""
        return self._params


@dataclass(frozen=True, slots=True)
class Ruleset:
    """The rules in force: defaults, each unit's effective rules, per-parameter staleness, load warnings."""

    defaults: Mapping[str, Rule]
    units: Mapping[str, Mapping[str, Rule]] = field(default_factory=dict)
    stale_ms: Mapping[str, int] = field(default_factory=dict)
    default_stale_ms: int = DEFAULT_STALE_MS
    notes: tuple[str, ...] = ()  # "file:line: message" warnings, e.g. a floor that was tightened back
    source: str = ""
    digest: str = ""

    def rules_for(self, unit_id: str | None) -> Mapping[str, Rule]:
        if unit_id is not None and unit_id in self.units:
            return self.units[unit_id]
        return self.defaults

    def stale_after(self, ref: str) -> int:
        return self.stale_ms.get(ref, self.default_stale_ms)

    def to_public(self) -> dict[str, Any]:
        """The JSON body of GET /api/v1/rules."""
        return {
            "source": self.source,
            "digest": self.digest,
            "safety_floor": _public_rule(floor_rule()),
            "stale_after_s": {
                "default": self.default_stale_ms / SECOND_MS,
                **{_alias(r): ms / SECOND_MS for r, ms in sorted(self.stale_ms.items())},
            },
            "defaults": [_public_rule(r) for r in self.defaults.values()],
            "units": {
                u: [_public_rule(r) for r in rules.values()] for u, rules in sorted(self.units.items())
            },
            "notes": list(self.notes),
        }


def _alias(ref: str) -> str:
    info = BY_REF.get(ref)
    return ref if info is None else info.alias


def _public_rule(rule: Rule) -> dict[str, Any]:
    return {
        "condition": rule.condition,
        "label": rule.label,
        "priority": rule.priority,
        "delay_s": rule.delay_ms / SECOND_MS,
        "max_gap_s": rule.max_gap_ms / SECOND_MS,
        "mode": rule.mode,
        "terms": [
            {
                "kind": t.kind,
                "parameters": [_alias(p) for p in t.params],
                "op": t.op,
                "threshold": t.threshold,
                "unit": t.unit,
                "hysteresis": t.hysteresis,
                **({"window_s": t.window_ms / SECOND_MS} if t.kind == "change" else {}),
            }
            for t in rule.terms
        ],
        "source": rule.source,
    }


def floor_rule() -> Rule:
    """The built-in SpO2 floor, present in every unit's rules."""
    term = Term("value", (FLOOR_PARAMETER,), "<", FLOOR_THRESHOLD, "%", hysteresis=2.0)
    return Rule(FLOOR_CONDITION, (term,), "high", FLOOR_DELAY_MS, label="SpO2 critically low (safety floor)",
                source="built-in")  # fmt: skip


def enforce_floor(rule: Rule) -> tuple[Rule, tuple[str, ...]]:
    """The floor condition made at least as strict as the built-in floor, and what had to be tightened."""
    floor = floor_rule()
    term = rule.terms[0] if len(rule.terms) == 1 else None
    if (
        term is None
        or term.kind != "value"
        or term.params != (FLOOR_PARAMETER,)
        or term.op not in ("<", "<=")
    ):
        return floor, (f"{FLOOR_CONDITION} is the SpO2 safety floor: replaced by the built-in floor",)
    notes: list[str] = []
    if term.threshold < FLOOR_THRESHOLD:
        notes.append(f"threshold {term.threshold:g} is below the floor: raised to < {FLOOR_THRESHOLD:g} %")
        term = replace(term, op="<", threshold=FLOOR_THRESHOLD)
    delay = rule.delay_ms
    if delay > FLOOR_DELAY_MS:
        notes.append(
            f"delay {delay / SECOND_MS:g} s exceeds the floor's: shortened to {FLOOR_DELAY_MS // 1000} s"
        )
        delay = FLOOR_DELAY_MS
    if rule.priority != "high":
        notes.append(f"priority {rule.priority} is below the floor's: raised to high")
    gap = max(rule.max_gap_ms, DEFAULT_MAX_GAP_MS)  # a tiny gap would keep restarting the timer
    return replace(rule, terms=(term,), priority="high", delay_ms=delay, mode="all", max_gap_ms=gap), tuple(
        notes
    )


@dataclass(frozen=True, slots=True)
class PatientOverride:
    """A patient's own limit for one condition, valid until `expires_at` (epoch ms); stored by the caller."""

    condition: str
    expires_at: int
    threshold: float | None = None  # canonical unit of the rule's single term
    priority: Priority | None = None
    delay_ms: int | None = None
    set_by: str = ""
    reason: str = ""


def make_override(
    ruleset: Ruleset,
    condition: str,
    *,
    unit_id: str | None,
    at_ms: int,
    expires_at: int,
    threshold: float | None = None,
    unit: str | None = None,
    priority: str | None = None,
    delay_s: float | None = None,
    set_by: str = "",
    reason: str = "",
) -> PatientOverride | list[str]:
    """A validated override (threshold converted to the canonical unit), or why it is refused."""
    errors: list[str] = []
    rule = ruleset.rules_for(unit_id).get(condition)
    if rule is None:
        return [f"no rule {condition!r} in force for this unit"]
    if not at_ms < expires_at <= at_ms + MAX_OVERRIDE_MS:
        errors.append(f"expires_at must be in the future and at most {MAX_OVERRIDE_MS // HOUR_MS} h ahead")
    if priority is not None and priority not in PRIORITIES:
        errors.append(f"priority must be high, medium or low, not {priority!r}")
    if delay_s is not None and not (math.isfinite(delay_s) and delay_s >= 0):
        errors.append("delay_s must be >= 0")
    canonical: float | None = None
    if threshold is not None:
        if len(rule.terms) != 1 or rule.terms[0].kind == "ratio":
            errors.append(f"{condition} has no single threshold to override")
        elif not math.isfinite(threshold):
            errors.append("threshold must be a finite number")
        else:
            term = rule.terms[0]
            try:
                if term.kind == "change":  # a delta: no offset (degF to Cel)
                    canonical = convert(threshold, unit, term.params[0]) - convert(0.0, unit, term.params[0])
                else:
                    canonical = convert(threshold, unit, term.params[0])
            except UnitError as e:
                errors.append(str(e))
    if errors:
        return errors
    ov = PatientOverride(
        condition,
        expires_at,
        threshold=None if canonical is None else round(canonical, 6),
        priority=priority,  # type: ignore[arg-type]  # checked against PRIORITIES above
        delay_ms=None if delay_s is None else round(delay_s * SECOND_MS),
        set_by=set_by,
        reason=reason,
    )
    if condition == FLOOR_CONDITION and enforce_floor(apply_override(rule, ov))[1]:
        return ["the SpO2 safety floor can only be made stricter"]
    return ov


def apply_override(rule: Rule, ov: PatientOverride) -> Rule:
    terms = rule.terms
    if ov.threshold is not None and len(terms) == 1:
        terms = (replace(terms[0], threshold=ov.threshold),)
    return replace(
        rule,
        terms=terms,
        priority=ov.priority or rule.priority,
        delay_ms=rule.delay_ms if ov.delay_ms is None else ov.delay_ms,
        source=f"override by {ov.set_by}" if ov.set_by else "override",
    )


def effective_rules(
    ruleset: Ruleset, unit_id: str | None, overrides: Iterable[PatientOverride], at_ms: int
) -> dict[str, Rule]:
    """The unit's rules with the patient's unexpired overrides applied; the floor always holds.

    Read-only: without an override in force it is the unit's one shared mapping (built once per ruleset)."""
    return _effective(ruleset, unit_id, overrides, at_ms)[0]


@dataclass(frozen=True, slots=True)
class _InForce:
    """Rules in force for one evaluation, with what `evaluate` looks up for each reading."""

    rules: dict[str, Rule]
    windows: dict[str, int]  # the longest change window over each parameter
    ordered: tuple[tuple[str, Rule], ...]  # the rules in their order
    by_param: dict[str, tuple[int, ...]]  # parameter -> indexes in `ordered` of the rules reading it

    @staticmethod
    def of(rules: dict[str, Rule]) -> _InForce:
        ordered = tuple(rules.items())
        by_param: dict[str, list[int]] = {}
        for i, (_, rule) in enumerate(ordered):
            for ref in sorted(rule.params):
                by_param.setdefault(ref, []).append(i)
        return _InForce(rules, _windows(rules), ordered, {k: tuple(v) for k, v in by_param.items()})

    def touching(self, refs: set[str]) -> list[tuple[str, Rule]]:
        """The rules that read any of `refs`, in rule order."""
        if len(refs) == 1:
            (ref,) = refs
            return [self.ordered[i] for i in self.by_param.get(ref, ())]
        found = {i for ref in refs for i in self.by_param.get(ref, ())}
        return [self.ordered[i] for i in sorted(found)]


def _effective(
    ruleset: Ruleset, unit_id: str | None, overrides: Iterable[PatientOverride], at_ms: int
) -> tuple[dict[str, Rule], dict[str, int]]:
    """`effective_rules` and the change windows of those rules."""
    found = _in_force(ruleset, unit_id, overrides, at_ms)
    return found.rules, found.windows


def _in_force(
    ruleset: Ruleset, unit_id: str | None, overrides: Iterable[PatientOverride], at_ms: int
) -> _InForce:
    base = _unit_rules(ruleset, unit_id)
    live = [ov for ov in overrides if at_ms < ov.expires_at and ov.condition in base.rules]
    if not live:
        return base
    rules = dict(ruleset.rules_for(unit_id))
    for ov in live:
        if ov.condition in rules:
            rules[ov.condition] = apply_override(rules[ov.condition], ov)
    rules[FLOOR_CONDITION] = enforce_floor(rules.get(FLOOR_CONDITION, floor_rule()))[0]
    return _InForce.of(rules)


# (id(ruleset), unit) -> (the ruleset, its rules with the floor enforced and their lookups). The ruleset is
# kept in the entry, so an id reused by a later ruleset never matches a stale entry.
_UNIT_RULES: dict[tuple[int, str | None], tuple[Ruleset, _InForce]] = {}
_UNIT_RULES_MAX = 256


def _unit_rules(ruleset: Ruleset, unit_id: str | None) -> _InForce:
    key = (id(ruleset), unit_id)
    hit = _UNIT_RULES.get(key)
    if hit is not None and hit[0] is ruleset:
        return hit[1]
    rules = dict(ruleset.rules_for(unit_id))
    rules[FLOOR_CONDITION] = enforce_floor(rules.get(FLOOR_CONDITION, floor_rule()))[0]
    if len(_UNIT_RULES) >= _UNIT_RULES_MAX:  # hot reloads leave old rulesets behind: start over
        _UNIT_RULES.clear()
    found = _InForce.of(rules)
    _UNIT_RULES[key] = (ruleset, found)
    return found


def _windows(rules: Mapping[str, Rule]) -> dict[str, int]:
    """The longest change window over each parameter: how much history a reading must keep."""
    windows: dict[str, int] = {}
    for rule in rules.values():
        for t in rule.terms:
            if t.kind == "change":
                windows[t.params[0]] = max(windows.get(t.params[0], 0), t.window_ms)
    return windows


@dataclass(frozen=True, slots=True)
class RuleState:
    """One rule of one patient: whether it is active, since when it has held (on-delay), when last judged."""

    active: bool = False
    since: int | None = None
    last_seen: int | None = None
    priority: Priority = "low"


@dataclass(frozen=True, slots=True)
class PatientRulesState:
    """A patient's latest value per parameter, the history change terms need, and each rule's state."""

    latest: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    history: Mapping[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    rules: Mapping[str, RuleState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Signal:
    """A rule's verdict at device time; `observed` turns it into the lifecycle's input."""

    condition: str
    active: bool
    at: int
    priority: Priority
    value: float | None = None

    def observed(
        self,
        *,
        site_id: str,
        patient_id: str | None = None,
        bed_id: str | None = None,
        unit_id: str | None = None,
        backfill: bool = False,
    ) -> Observed:
        return Observed(self.condition, self.active, self.at, self.priority, site_id, patient_id, bed_id,
                        unit_id, self.value, backfill)  # fmt: skip


def evaluate(
    ruleset: Ruleset,
    state: PatientRulesState | None,
    readings: Iterable[ObsItem],
    at_ms: int,
    overrides: Iterable[PatientOverride] = (),
    *,
    unit_id: str | None = None,
) -> tuple[PatientRulesState, list[Signal]]:
    """Apply one patient's readings (canonical units) in device-time order and judge the rules they touch.

    `at_ms` is the evaluation's time for override expiry and for rules that no longer exist. A rule emits
    true on every judgement while active (the lifecycle needs values to see worsening) and false once.
    """
    state = state or PatientRulesState()
    in_force = _in_force(ruleset, unit_id, overrides, at_ms)
    rules, windows = in_force.rules, in_force.windows
    latest = dict(state.latest)
    history = dict(state.history)
    rstates = dict(state.rules)
    signals: list[Signal] = []
    for cond in [c for c in rstates if c not in rules]:  # removed by a reload or a unit change
        gone = rstates.pop(cond)
        if gone.active:
            signals.append(Signal(cond, False, at_ms, gone.priority))

    by_ts: dict[int, list[tuple[str, float]]] = {}
    for r in readings:
        if FLAG_ARTIFACT in r.flags or isinstance(r.value, str | bool):
            continue
        value = float(r.value)
        info = resolve_code(r.code)
        if info is None or not math.isfinite(value):
            continue
        by_ts.setdefault(r.ts, []).append((info.ref, value))

    for ts in sorted(by_ts):
        touched: set[str] = set()
        for ref, value in by_ts[ts]:
            prev = latest.get(ref)
            if prev is not None and ts < prev[0]:
                continue  # a late reading never rewrites the present
            latest[ref] = (ts, value)
            touched.add(ref)
            if ref in windows:  # kept in time order: a late reading never gets here
                kept = history.get(ref, ())
                cut = ts - windows[ref]
                if kept and kept[0][0] < cut:
                    kept = kept[bisect_left(kept, cut, key=_time) :]
                history[ref] = (*kept, (ts, value))
        if not touched:
            continue
        for cond, rule in in_force.touching(touched):
            st = rstates.get(cond, _NEVER_JUDGED)
            if st.last_seen is not None and ts < st.last_seen:
                continue
            new, sig = _judge(rule, st, ruleset, latest, history, ts)
            rstates[cond] = new
            if sig is not None:
                signals.append(sig)
    return PatientRulesState(latest, history, rstates), signals


_NEVER_JUDGED = RuleState()


_time = itemgetter(0)  # of a history point (device ms, value)
_value = itemgetter(1)


def _judge(
    rule: Rule,
    st: RuleState,
    ruleset: Ruleset,
    latest: Mapping[str, tuple[int, float]],
    history: Mapping[str, tuple[tuple[int, float], ...]],
    ts: int,
) -> tuple[RuleState, Signal | None]:
    terms = rule.terms
    if len(terms) == 1:
        holds, value = _term(terms[0], st.active, ruleset, latest, history, ts)
    else:
        verdicts = [_term(t, st.active, ruleset, latest, history, ts) for t in terms]
        holds = _combine([v for v, _ in verdicts], rule.mode)
        value = verdicts[0][1]
    since = st.since
    if st.last_seen is not None and ts - st.last_seen > rule.max_gap_ms:
        since = None  # not continuously true across a gap in the data
    if holds is None:  # a stale or missing input: unknown; the lifecycle hears of gaps from liveness
        return RuleState(st.active, None, ts, st.priority), None
    if not holds:
        new = RuleState(False, None, ts, st.priority)
        return new, (Signal(rule.condition, False, ts, st.priority, value) if st.active else None)
    since = ts if since is None else since
    if st.active or ts - since >= rule.delay_ms:
        return RuleState(True, since, ts, rule.priority), Signal(
            rule.condition, True, ts, rule.priority, value
        )
    return RuleState(False, since, ts, st.priority), None


def _combine(verdicts: list[bool | None], mode: Mode) -> bool | None:
    """Three-valued (Kleene) all/any: an unknown term makes the result unknown only if it could matter."""
    if mode == "all":
        if False in verdicts:
            return False
        return None if None in verdicts else True
    if True in verdicts:
        return True
    return None if None in verdicts else False


def _term(
    term: Term,
    active: bool,
    ruleset: Ruleset,
    latest: Mapping[str, tuple[int, float]],
    history: Mapping[str, tuple[tuple[int, float], ...]],
    ts: int,
) -> tuple[bool | None, float | None]:
    value: float | None
    kind = term.kind
    if kind == "value":
        value = _fresh(ruleset, latest, term.params[0], ts)
    elif kind == "ratio":
        num, den = _fresh(ruleset, latest, term.params[0], ts), _fresh(ruleset, latest, term.params[1], ts)
        value = None if num is None or den is None or den == 0 else num / den
    else:
        now = _fresh(ruleset, latest, term.params[0], ts)
        pts = history.get(term.params[0], ())
        cut = ts - term.window_ms
        if pts and pts[0][0] < cut:
            pts = pts[bisect_left(pts, cut, key=_time) :]
        if now is None or len(pts) < 2:
            value = None
        else:  # the largest swing inside the window in the direction the rule watches
            value = now - (min(pts, key=_value) if term.op in (">", ">=") else max(pts, key=_value))[1]
    if value is None:
        return None, None
    thr = term.clear_threshold() if active else term.threshold
    match term.op:
        case "<":
            return value < thr, value
        case "<=":
            return value <= thr, value
        case ">":
            return value > thr, value
        case ">=":
            return value >= thr, value


def _fresh(ruleset: Ruleset, latest: Mapping[str, tuple[int, float]], ref: str, ts: int) -> float | None:
    got = latest.get(ref)
    if got is None or ts - got[0] > ruleset.stale_ms.get(ref, ruleset.default_stale_ms):
        return None
    return got[1]
