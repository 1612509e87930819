"""Declarative rules: loading with file:line errors, unit conversion, on-delay, hysteresis, rate of change,
compound rules, per-unit defaults, per-patient overrides, the SpO2 safety floor and hot reload. Time is
injected through the readings; nothing sleeps."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest

from alerting.lifecycle import AlarmBook, step
from alerting.rules import (
    FLOOR_CONDITION,
    PatientOverride,
    PatientRulesState,
    Ruleset,
    Signal,
    evaluate,
    make_override,
)
from alerting.rules_schema import RuleError, RulesFile, load_rules
from streams.schemas import FLAG_ARTIFACT, ObsItem

T0 = 1_795_428_000_000
S = 1_000
SHIPPED = Path(__file__).resolve().parents[2] / "config" / "rules.yaml"
SPO2, HR, RR, SBP, TEMP = (
    "MDC_PULS_OXIM_SAT_O2",
    "MDC_ECG_HEART_RATE",
    "MDC_RESP_RATE",
    "MDC_PRESS_BLD_NONINV_SYS",
    "MDC_TEMP_BODY",
)


def load(text: str, file: str = "r.yaml") -> Ruleset:
    r = load_rules(textwrap.dedent(text), file)
    assert not isinstance(r, list), [str(e) for e in r]
    return r


def errors(text: str, file: str = "r.yaml") -> list[str]:
    r = load_rules(textwrap.dedent(text), file)
    assert isinstance(r, list)
    return [str(e) for e in r]


def shipped() -> Ruleset:
    return load(SHIPPED.read_text(), str(SHIPPED))


def obs(code: str, value: float, ts: int, *flags: str) -> ObsItem:
    return ObsItem(code, value, "", ts, tuple(flags))


def feed(
    ruleset: Ruleset,
    series: Iterable[tuple[str, float, int]],
    *,
    state: PatientRulesState | None = None,
    unit_id: str | None = None,
    overrides: Iterable[PatientOverride] = (),
) -> tuple[PatientRulesState, list[Signal]]:
    """One evaluate call per reading, as a 1 Hz monitor produces them."""
    out: list[Signal] = []
    ovs = tuple(overrides)
    for code, value, ts in series:
        state, sigs = evaluate(ruleset, state, [obs(code, value, ts)], ts, ovs, unit_id=unit_id)
        out.extend(sigs)
    assert state is not None
    return state, out


def every_second(code: str, value: float, start: int, seconds: int) -> list[tuple[str, float, int]]:
    return [(code, value, start + i * S) for i in range(seconds + 1)]


def named(signals: Iterable[Signal], condition: str) -> list[Signal]:
    return [s for s in signals if s.condition == condition]


SPO2_RULE = """\
version: 1
defaults:
  spo2_low:
    parameter: spo2
    op: "<"
    threshold: 90
    unit: "%"
    hysteresis: 2
    delay_s: 15
    priority: medium
"""


# Loading


def test_shipped_rules_load_without_errors_or_notes() -> None:
    rs = shipped()
    assert rs.notes == ()
    assert {"spo2_low", "spo2_critical", "hr_high", "hr_low", "rr_high", "rr_low", "nibp_sys_low",
            "temp_high", "shock_index", "etco2_high", "etco2_low"} <= rs.defaults.keys()  # fmt: skip
    for rules in (rs.defaults, *rs.units.values()):
        floor = rules[FLOOR_CONDITION]
        assert floor.priority == "high"
        assert floor.terms[0].threshold >= 80 and floor.delay_ms <= 15 * S
    body = orjson.loads(orjson.dumps(rs.to_public()))
    assert body["safety_floor"]["terms"][0]["threshold"] == 80
    spo2_low = next(r for r in body["defaults"] if r["condition"] == "spo2_low")
    assert spo2_low["delay_s"] == 15 and spo2_low["priority"] == "medium"
    assert spo2_low["source"].endswith("rules.yaml:18")


def test_every_kind_of_error_is_reported_with_its_file_and_line() -> None:
    text = """\
    version: 1
    defaults:
      a_rule:
        parameter: spo3
        op: "<"
        threshold: 90
        priority: medium
      b_rule:
        parameter: spo2
        op: "<"
        threshold: 10
        unit: kPa
        priority: medium
      c_rule:
        parameter: hr
        op: ">"
        threshold: 130
        priority: urgent
      d_rule:
        parameter: hr
        op: ">"
        threshold: 130
        delay_s: -5
        priority: low
      e_rule:
        parameter: hr
        op: ">"
      f_rule:
        parameter: hr
        op: "=>"
        threshold: 1
        colour: red
        priority: low
    """
    assert errors(text, "config/rules.yaml") == [
        "config/rules.yaml:4: unknown parameter 'spo3'",
        "config/rules.yaml:12: rule b_rule: unit 'kPa' is not convertible to '%' (spo2)",
        "config/rules.yaml:18: rule c_rule: priority must be high, medium or low, not 'urgent'",
        "config/rules.yaml:23: rule d_rule: delay_s must be >= 0",
        "config/rules.yaml:25: rule e_rule: missing field 'priority'",
        "config/rules.yaml:25: rule e_rule: missing field 'threshold'",
        "config/rules.yaml:30: rule f_rule: op must be one of < <= > >=, not '=>'",
        "config/rules.yaml:32: rule f_rule: unknown field 'colour'",
    ]


def test_structural_errors_have_lines() -> None:
    assert errors("version: 1\ndefaults:\n  x: [1\n") == [
        "r.yaml:4: YAML: expected ',' or ']', but got '<stream end>'"
    ]
    assert errors("") == ["r.yaml:1: empty rules file"]
    assert errors("defaults: {}\n") == ["r.yaml:1: missing field 'version'"]
    dup = "version: 1\ndefaults:\n  hr_x:\n    parameter: hr\n    parameter: rr\n    op: '>'\n"
    assert "r.yaml:5: rule hr_x: duplicate key 'parameter'" in errors(dup)
    both = "version: 1\ndefaults:\n  hr_x:\n    priority: low\n    parameter: hr\n    op: '>'\n"
    both += "    threshold: 1\n"
    both += "    any:\n      - {parameter: rr, op: '>', threshold: 1}\n"
    assert errors(both) == ["r.yaml:3: rule hr_x: give one condition: inline fields, 'all' or 'any'"]
    term = "version: 1\ndefaults:\n  si:\n    priority: low\n    all:\n      - ratio: [hr]\n        op: '>'\n"
    term += "        threshold: 1\n      - parameter: rr\n        threshold: x\n        op: '>'\n"
    assert errors(term) == [
        "r.yaml:6: rule si: ratio must be [numerator, denominator]",
        "r.yaml:10: rule si: threshold must be a number",
    ]


def test_thresholds_are_converted_to_canonical_units_at_load() -> None:
    rs = load("""\
    version: 1
    defaults:
      temp_high:
        parameter: temp
        op: ">"
        threshold: 102.2
        unit: "[degF]"
        hysteresis: 0.36
        priority: medium
      etco2_high:
        parameter: MDC_AWAY_CO2_ET
        op: ">"
        threshold: 6.67
        unit: kPa
        priority: medium
      temp_rise:
        parameter: temp
        change_over_s: 3600
        op: ">="
        threshold: 1.8
        unit: "[degF]"
        priority: low
    """)
    temp = rs.defaults["temp_high"].terms[0]
    assert temp.threshold == pytest.approx(39.0) and temp.hysteresis == pytest.approx(0.2)
    assert temp.unit == "Cel"
    etco2 = rs.defaults["etco2_high"].terms[0]
    assert etco2.threshold == pytest.approx(50.03, abs=0.01) and etco2.unit == "mm[Hg]"
    rise = rs.defaults["temp_rise"].terms[0]  # a difference: no -32 offset
    assert rise.kind == "change" and rise.threshold == pytest.approx(1.0) and rise.window_ms == 3_600 * S
    # A fever of 39.1 Cel reported as Cel (canonical) raises it; 39.0 does not.
    _, sigs = feed(rs, [(TEMP, 39.0, T0), (TEMP, 39.1, T0 + S)])
    assert [(s.active, s.value) for s in named(sigs, "temp_high")] == [(True, 39.1)]


# On-delay


def test_on_delay_edges_14999_ms_vs_15000_ms() -> None:
    rs = load(SPO2_RULE)
    series = [*every_second(SPO2, 85, T0, 14), (SPO2, 85, T0 + 14999)]
    state, sigs = feed(rs, series)
    assert named(sigs, "spo2_low") == []
    state, sigs = feed(rs, [(SPO2, 85, T0 + 15_000)], state=state)
    assert named(sigs, "spo2_low") == [Signal("spo2_low", True, T0 + 15_000, "medium", 85)]


def test_repeated_readings_never_reset_the_on_delay() -> None:
    rs = load(SPO2_RULE)
    series = [(SPO2, 85, T0 + i * 500) for i in range(31)]  # every half second, duplicates included
    series += [(SPO2, 85, T0 + 7 * S)]  # a late duplicate is ignored, not a restart
    _, sigs = feed(rs, series)
    assert [s.at for s in named(sigs, "spo2_low")][:1] == [T0 + 15 * S]


def test_a_gap_longer_than_max_gap_restarts_the_on_delay() -> None:
    rs = load(SPO2_RULE)
    series = every_second(SPO2, 85, T0, 10) + every_second(SPO2, 85, T0 + 21 * S, 14)  # 11 s gap
    _, sigs = feed(rs, series)
    assert named(sigs, "spo2_low") == []
    _, sigs = feed(rs, every_second(SPO2, 85, T0, 10) + every_second(SPO2, 85, T0 + 20 * S, 14))  # 10 s: ok
    assert named(sigs, "spo2_low")[0].at == T0 + 20 * S


def test_a_value_back_above_the_threshold_restarts_the_on_delay() -> None:
    rs = load(SPO2_RULE)
    series = [
        *every_second(SPO2, 85, T0, 10),
        (SPO2, 95, T0 + 11 * S),
        *every_second(SPO2, 85, T0 + 12 * S, 15),
    ]
    _, sigs = feed(rs, series)
    assert named(sigs, "spo2_low")[0].at == T0 + 27 * S


def test_artifact_values_are_ignored_and_zero_rates_are_real() -> None:
    rs = shipped()
    state, sigs = evaluate(rs, None, [obs(HR, 0, T0 + i * S, FLAG_ARTIFACT) for i in range(10)], T0 + 9 * S)
    assert sigs == [] and state.latest == {}
    _, sigs = feed(rs, every_second(HR, 0, T0, 5) + every_second(RR, 0, T0, 20))
    assert named(sigs, "hr_extreme_low")[0] == Signal("hr_extreme_low", True, T0 + 5 * S, "high", 0)
    assert named(sigs, "rr_apnoea")[0] == Signal("rr_apnoea", True, T0 + 20 * S, "high", 0)


def test_a_batch_is_judged_reading_by_reading_on_device_time() -> None:
    rs = load(SPO2_RULE)
    batch = [obs(SPO2, 85, T0 + i * S) for i in reversed(range(16))]
    _, sigs = evaluate(rs, None, batch, T0 + 16 * S)
    assert named(sigs, "spo2_low")[0].at == T0 + 15 * S


# Hysteresis


def test_hysteresis_holds_an_active_alarm_until_threshold_plus_margin() -> None:
    rs = load(SPO2_RULE)
    state, sigs = feed(rs, every_second(SPO2, 88, T0, 15))
    assert named(sigs, "spo2_low")[-1].active
    state, sigs = feed(rs, [(SPO2, 91, T0 + 16 * S)], state=state)
    assert named(sigs, "spo2_low") == [Signal("spo2_low", True, T0 + 16 * S, "medium", 91)]
    state, sigs = feed(rs, [(SPO2, 92, T0 + 17 * S)], state=state)
    assert named(sigs, "spo2_low") == [Signal("spo2_low", False, T0 + 17 * S, "medium", 92)]
    _, sigs = feed(rs, [(SPO2, 93, T0 + 18 * S)], state=state)
    assert named(sigs, "spo2_low") == []  # false is said once


def test_signals_drive_the_lifecycle() -> None:
    rs = load(SPO2_RULE)
    _, sigs = feed(rs, [*every_second(SPO2, 88, T0, 15), (SPO2, 93, T0 + 16 * S)])
    book = AlarmBook()
    statuses = []
    for s in sigs:
        book, changes = step(book, s.observed(site_id="s1", patient_id="p1", unit_id="icu"))
        statuses += [c.alert.status for c in changes]
    assert statuses == ["active_unack", "closed"]


# Rate of change and compound rules


def test_rate_of_change_fires_on_a_fast_fall_above_the_low_limit() -> None:
    rs = shipped()
    series = [(SPO2, 98 - i * 0.25, T0 + i * S) for i in range(25)]  # 98 -> 92 in 24 s
    series += every_second(SPO2, 92, T0 + 25 * S, 9)
    _, sigs = feed(rs, series)
    falling = named(sigs, "spo2_falling")
    assert (falling[0].active, falling[0].at, falling[0].priority) == (True, T0 + 34 * S, "low")
    assert falling[0].value == pytest.approx(-6.0)
    # A slow drift of the same size over 10 minutes stays quiet.
    slow = [(SPO2, 98 - i * 0.01, T0 + i * S) for i in range(600)]
    _, sigs = feed(rs, slow)
    assert named(sigs, "spo2_falling") == []


def test_shock_index_compound_with_an_intermittent_cuff() -> None:
    rs = shipped()
    series = [(SBP, 100, T0), *every_second(HR, 110, T0 + S, 61)]  # SI 1.1; SBP stands for 30 min
    state, sigs = feed(rs, series)
    si = named(sigs, "shock_index")
    assert (si[0].active, si[0].at, si[0].priority) == (True, T0 + 61 * S, "medium")
    assert si[0].value == pytest.approx(1.1)
    state, sigs = feed(rs, [(SBP, 120, T0 + 62 * S)], state=state)
    assert named(sigs, "shock_index")[0].active  # 110/120 = 0.92: inside the 0.1 hysteresis
    state, sigs = feed(rs, [(SBP, 130, T0 + 63 * S)], state=state)
    assert named(sigs, "shock_index")[0].active is False  # 0.85 < 1.0 - 0.1
    # Without a blood pressure younger than its stale limit the index is unknown: no alarm.
    _, sigs = feed(rs, [(SBP, 100, T0), *every_second(HR, 110, T0 + 1801 * S, 70)])
    assert named(sigs, "shock_index") == []


def test_any_mode_and_unknown_terms() -> None:
    rs = load("""\
    version: 1
    defaults:
      resp_distress:
        any:
          - {parameter: rr, op: ">", threshold: 30}
          - {parameter: spo2, op: "<", threshold: 88}
        priority: medium
    """)
    _, sigs = feed(rs, [(RR, 35, T0)])  # spo2 unknown, rr true: any is true
    assert named(sigs, "resp_distress")[0].active
    _, sigs = feed(rs, [(RR, 20, T0)])  # spo2 unknown, rr false: unknown, no verdict
    assert named(sigs, "resp_distress") == []


# Units and patients


def test_per_unit_defaults() -> None:
    rs = shipped()
    assert rs.rules_for("icu")["hr_high"].terms[0].threshold == 140
    assert rs.rules_for("icu")["hr_high"].delay_ms == 10 * S  # the rest is inherited
    assert "spo2_falling" not in rs.rules_for("icu")
    assert rs.rules_for("ward")["hr_high"].terms[0].threshold == 130
    assert rs.rules_for(None) is rs.defaults
    hr = every_second(HR, 135, T0, 10)
    assert named(feed(rs, hr, unit_id="ward")[1], "hr_high")
    assert named(feed(rs, hr, unit_id="icu")[1], "hr_high") == []
    respiratory = rs.rules_for("respiratory")["spo2_low"].terms[0]
    assert (respiratory.threshold, respiratory.hysteresis) == (88, 1)


def test_unit_override_can_replace_the_condition() -> None:
    rs = load(
        SPO2_RULE
        + "units:\n  icu:\n    spo2_low:\n      all:\n        - {parameter: spo2, op: '<', threshold: 85}\n"
    )
    rule = rs.rules_for("icu")["spo2_low"]
    assert rule.terms[0].threshold == 85 and rule.terms[0].hysteresis == 0 and rule.delay_ms == 15 * S


def test_patient_override_applies_until_it_expires() -> None:
    rs = shipped()
    ov = make_override(rs, "spo2_low", unit_id="ward", at_ms=T0, expires_at=T0 + 60 * S, threshold=0.85,
                       unit="1", set_by="dr.who", reason="COPD, target 88-92")  # fmt: skip
    assert isinstance(ov, PatientOverride) and ov.threshold == 85
    _, sigs = feed(rs, every_second(SPO2, 87, T0, 20), overrides=[ov], unit_id="ward")
    assert named(sigs, "spo2_low") == []
    _, sigs = feed(rs, every_second(SPO2, 87, T0 + 60 * S, 20), overrides=[ov], unit_id="ward")
    assert named(sigs, "spo2_low")[0].at == T0 + 75 * S
    prio = make_override(rs, "hr_high", unit_id=None, at_ms=T0, expires_at=T0 + S, priority="high")
    assert isinstance(prio, PatientOverride)
    _, sigs = feed(rs, every_second(HR, 135, T0 - 10 * S, 10), overrides=[prio])
    assert named(sigs, "hr_high")[0].priority == "high"


def test_override_validation() -> None:
    rs = shipped()

    def bad(condition: str, **kw: object) -> list[str]:
        args: dict[str, object] = {"unit_id": None, "at_ms": T0, "expires_at": T0 + S, **kw}
        got = make_override(rs, condition, **args)  # type: ignore[arg-type]
        assert isinstance(got, list)
        return got

    assert bad("nope") == ["no rule 'nope' in force for this unit"]
    assert bad("hr_high", expires_at=T0) == ["expires_at must be in the future and at most 72 h ahead"]
    assert bad("hr_high", expires_at=T0 + 73 * 3_600 * S)
    assert bad("hr_high", priority="urgent") == ["priority must be high, medium or low, not 'urgent'"]
    assert bad("shock_index", threshold=1.2) == ["shock_index has no single threshold to override"]
    assert "not convertible" in bad("spo2_low", threshold=10, unit="kPa")[0]
    assert bad(FLOOR_CONDITION, threshold=70) == ["the SpO2 safety floor can only be made stricter"]
    assert bad(FLOOR_CONDITION, priority="medium") == ["the SpO2 safety floor can only be made stricter"]
    assert isinstance(make_override(rs, FLOOR_CONDITION, unit_id=None, at_ms=T0, expires_at=T0 + S,
                                    threshold=88), PatientOverride)  # fmt: skip


# The safety floor


LOOSE_FLOOR = """\
version: 1
defaults:
  spo2_critical:
    parameter: spo2
    op: "<"
    threshold: 70
    delay_s: 60
    max_gap_s: 0.5
    priority: low
units:
  icu:
    spo2_critical:
      disabled: true
"""


def test_the_safety_floor_cannot_be_loosened_by_the_yaml() -> None:
    rs = load(LOOSE_FLOOR)
    for rules in (rs.defaults, rs.rules_for("icu")):
        floor = rules[FLOOR_CONDITION]
        term = floor.terms[0]
        assert (term.op, term.threshold, floor.delay_ms, floor.priority) == ("<", 80, 15 * S, "high")
        assert floor.max_gap_ms >= 10 * S
    assert any(n.startswith("r.yaml:3: spo2_critical: threshold 70") for n in rs.notes)
    assert any("cannot be disabled" in n for n in rs.notes)
    for unit in (None, "icu"):
        _, sigs = feed(rs, every_second(SPO2, 79, T0, 15), unit_id=unit)
        assert named(sigs, FLOOR_CONDITION)[0] == Signal(FLOOR_CONDITION, True, T0 + 15 * S, "high", 79)


def test_the_safety_floor_is_present_when_the_yaml_omits_it_or_replaces_it() -> None:
    for text in (SPO2_RULE, SPO2_RULE.replace("spo2_low", FLOOR_CONDITION).replace("spo2", "hr", 1)):
        rs = load(text)
        _, sigs = feed(rs, every_second(SPO2, 75, T0, 15))
        assert Signal(FLOOR_CONDITION, True, T0 + 15 * S, "high", 75) in sigs
        assert rs.to_public()["safety_floor"]["priority"] == "high"


def test_a_stricter_floor_is_kept() -> None:
    floor = shipped().defaults[FLOOR_CONDITION]
    assert (floor.terms[0].threshold, floor.delay_ms) == (85, 10 * S)


# Hot reload


def test_hot_reload_keeps_the_old_ruleset_on_a_bad_edit(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    rf = RulesFile(path)
    assert isinstance(rf.reload_if_changed(), list)  # missing file: the floor alone stays in force
    assert set(rf.current.defaults) == {FLOOR_CONDITION}
    path.write_text(SPO2_RULE)
    first = rf.reload_if_changed()
    assert isinstance(first, Ruleset) and rf.current is first
    assert rf.reload_if_changed() is first  # unchanged
    path.write_text(SPO2_RULE.replace("medium", "urgent"))
    os.utime(path, ns=(1, 1))
    bad = rf.reload_if_changed()
    assert bad == [
        RuleError(str(path), 10, "rule spo2_low: priority must be high, medium or low, not 'urgent'")
    ]
    assert rf.current is first and rf.errors == bad
    assert rf.reload_if_changed() is first  # reported once; the ward keeps its rules
    path.write_text(SPO2_RULE.replace("90", "91"))
    good = rf.reload_if_changed()
    assert isinstance(good, Ruleset) and good.defaults["spo2_low"].terms[0].threshold == 91


def test_a_rule_removed_by_a_reload_clears_its_active_alarm() -> None:
    old = load(SPO2_RULE)
    state, sigs = feed(old, every_second(SPO2, 85, T0, 15))
    assert named(sigs, "spo2_low")[-1].active
    new = load("version: 1\ndefaults: {}\n")
    _, sigs = evaluate(new, state, [], T0 + 20 * S)
    assert sigs == [Signal("spo2_low", False, T0 + 20 * S, "medium")]
