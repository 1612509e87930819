"""NEWS2 against the RCP chart (2017): band edges, rounding, completeness, ages, pulse source, responses."""

from __future__ import annotations

from decimal import Decimal

import pytest

from alerting.news2 import (
    DEFAULT_MAX_AGE_MS,
    PARAMETERS,
    Reading,
    Scale,
    half_up,
    response_for,
    score,
)

AT = 1_795_428_000_000
NORMAL = {
    "rr": 16,
    "spo2": 97,
    "o2_supplement": 0,
    "nibp_sys": 120,
    "hr": 70,
    "acvpu": "A",
    "temp": 37.0,
}


def readings(**values: object) -> dict[str, Reading]:
    """A full normal set at AT, with `values` replacing (None removes an input)."""
    merged = {**NORMAL, **values}
    return {k: Reading(v, AT) for k, v in merged.items() if v is not None}  # type: ignore[arg-type]


def points(param: str, value: object, *, scale: Scale = 1, oxygen: int = 0) -> int:
    code = "hr" if param == "pulse" else param
    result = score(readings(**{code: value, "o2_supplement": oxygen}), at_ms=AT, scale=scale)
    component = result.components[param]
    assert component is not None
    return component.points


# (value, points) on both sides of every edge of RCP Chart 1.
RR = [(0, 3), (8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3), (60, 3)]
SPO2_SCALE1 = [(50, 3), (91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)]
SBP = [(40, 3), (90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3), (280, 3)]
PULSE = [(0, 3), (40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2), (131, 3)]
TEMP = [
    (33.0, 3),
    (35.0, 3),
    (35.1, 1),
    (36.0, 1),
    (36.1, 0),
    (38.0, 0),
    (38.1, 1),
    (39.0, 1),
    (39.1, 2),
    (42.0, 2),
]
# Scale 2: (SpO2, points on air, points on oxygen).
SPO2_SCALE2 = [
    (70, 3, 3),
    (83, 3, 3),
    (84, 2, 2),
    (85, 2, 2),
    (86, 1, 1),
    (87, 1, 1),
    (88, 0, 0),
    (92, 0, 0),
    (93, 0, 1),
    (94, 0, 1),
    (95, 0, 2),
    (96, 0, 2),
    (97, 0, 3),
    (100, 0, 3),
]


@pytest.mark.parametrize(("value", "expected"), RR)
def test_respiration_rate_bands(value: int, expected: int) -> None:
    assert points("rr", value) == expected


@pytest.mark.parametrize(("value", "expected"), SPO2_SCALE1)
@pytest.mark.parametrize("oxygen", [0, 1])
def test_spo2_scale1_bands_do_not_depend_on_oxygen(value: int, expected: int, oxygen: int) -> None:
    assert points("spo2", value, oxygen=oxygen) == expected


@pytest.mark.parametrize(("value", "on_air", "on_oxygen"), SPO2_SCALE2)
def test_spo2_scale2_bands_on_air_and_on_oxygen(value: int, on_air: int, on_oxygen: int) -> None:
    assert points("spo2", value, scale=2, oxygen=0) == on_air
    assert points("spo2", value, scale=2, oxygen=1) == on_oxygen


@pytest.mark.parametrize(("oxygen", "expected"), [(0, 0), (1, 2), (False, None), (True, None)])
def test_air_or_oxygen(oxygen: object, expected: int | None) -> None:
    if expected is None:  # booleans are not the contract's 0/1
        with pytest.raises(ValueError, match="o2_supplement"):
            points("o2_supplement", 0, oxygen=oxygen)  # type: ignore[arg-type]
    else:
        result = score(readings(o2_supplement=oxygen), at_ms=AT)
        assert result.components["o2_supplement"] is not None
        assert result.components["o2_supplement"].points == expected


@pytest.mark.parametrize(("value", "expected"), SBP)
def test_systolic_bands(value: int, expected: int) -> None:
    assert points("nibp_sys", value) == expected


@pytest.mark.parametrize(("value", "expected"), PULSE)
def test_pulse_bands(value: int, expected: int) -> None:
    assert points("pulse", value) == expected


@pytest.mark.parametrize(("value", "expected"), [("A", 0), ("C", 3), ("V", 3), ("P", 3), ("U", 3), ("c", 3)])
def test_consciousness(value: str, expected: int) -> None:
    assert points("acvpu", value) == expected


@pytest.mark.parametrize(("value", "expected"), TEMP)
def test_temperature_bands(value: float, expected: int) -> None:
    assert points("temp", value) == expected


@pytest.mark.parametrize(
    ("param", "value", "charted", "expected"),
    [
        ("rr", 20.5, 21, 2),  # half up, not to even
        ("rr", 20.49, 20, 0),
        ("rr", 8.5, 9, 1),
        ("rr", 24.5, 25, 3),
        ("spo2", 95.5, 96, 0),
        ("spo2", 91.5, 92, 2),
        ("nibp_sys", 90.5, 91, 2),
        ("nibp_sys", 219.5, 220, 3),
        ("pulse", 40.5, 41, 1),
        ("pulse", 130.5, 131, 3),
        ("temp", 38.05, 38.1, 1),  # 38.05 is 38.049999... as a binary float: rounded as written
        ("temp", 38.04, 38.0, 0),
        ("temp", 35.05, 35.1, 1),
        ("temp", 36.05, 36.1, 0),
        ("temp", 39.05, 39.1, 2),
        ("temp", Decimal("35.049"), 35.0, 3),
    ],
)
def test_inputs_are_rounded_half_up_to_the_chart(
    param: str, value: object, charted: object, expected: int
) -> None:
    code = "hr" if param == "pulse" else param
    component = score(readings(**{code: value}), at_ms=AT).components[param]
    assert component is not None
    assert component.value == charted
    assert type(component.value) is type(charted)
    assert component.points == expected


def test_half_up_is_not_bankers_rounding() -> None:
    assert round(20.5) == 20  # what Python's round would chart
    assert half_up(20.5) == 21
    assert half_up(21.5) == 22
    assert half_up(38.05, Decimal("0.1")) == Decimal("38.1")
    with pytest.raises(ValueError, match="finite"):
        half_up(float("nan"))


def test_all_normal_is_zero_and_low() -> None:
    result = score(readings(), at_ms=AT)
    assert (result.score, result.complete, result.response, result.missing) == (0, True, "low", ())
    assert result.priority is None
    assert set(result.components) == set(PARAMETERS)


@pytest.mark.parametrize("absent", ["rr", "spo2", "o2_supplement", "nibp_sys", "acvpu", "temp"])
def test_a_missing_parameter_is_never_scored_zero(absent: str) -> None:
    result = score(readings(**{absent: None}), at_ms=AT)
    assert result.complete is False
    assert result.score is None
    assert result.components[absent] is None
    assert absent in result.missing
    assert result.partial == 0
    assert result.response is None  # a floor of "low" is no reassurance
    assert result.to_json()["score"] is None


def test_absent_oxygen_is_unknown_not_air() -> None:
    result = score(readings(o2_supplement=None), at_ms=AT, scale=1)
    assert result.missing == ("o2_supplement",)
    # On scale 2 an SpO2 of 93 or more scores 0 on air but 1-3 on oxygen: it cannot be scored either.
    result = score(readings(o2_supplement=None, spo2=97), at_ms=AT, scale=2)
    assert result.missing == ("spo2", "o2_supplement")
    # At 92 or below scale 2 does not depend on oxygen.
    result = score(readings(o2_supplement=None, spo2=85), at_ms=AT, scale=2)
    assert result.missing == ("o2_supplement",)
    assert result.components["spo2"] is not None
    assert result.components["spo2"].points == 2


@pytest.mark.parametrize("code", sorted(DEFAULT_MAX_AGE_MS))
def test_a_reading_older_than_its_max_age_is_incomplete(code: str) -> None:
    limit = DEFAULT_MAX_AGE_MS[code]
    fresh = dict(readings())
    fresh["pr"] = Reading(70, AT)
    at_limit = dict(fresh)
    at_limit[code] = Reading(fresh[code].value, AT - limit)
    assert score(at_limit, at_ms=AT).complete  # exactly the maximum age is still usable
    too_old = dict(fresh)
    too_old[code] = Reading(fresh[code].value, AT - limit - 1)
    result = score(too_old, at_ms=AT)
    if code in ("hr", "pr"):  # the other pulse source covers it
        assert result.complete and result.stale == ()
    else:
        assert not result.complete
        assert result.stale == (code,)


def test_max_age_can_be_set_per_input() -> None:
    old = dict(readings())
    old["temp"] = Reading(37.0, AT - 6 * 3_600_000)
    assert not score(old, at_ms=AT).complete
    assert score(old, at_ms=AT, max_age_ms={"temp": 12 * 3_600_000}).complete


def test_pulse_is_hr_else_pr() -> None:
    both = {**readings(hr=120), "pr": Reading(60, AT)}
    assert both["hr"].value == 120
    pulse = score(both, at_ms=AT).components["pulse"]
    assert pulse is not None and (pulse.source, pulse.points) == ("hr", 2)
    only_pr = {**readings(hr=None), "pr": Reading(60, AT)}
    pulse = score(only_pr, at_ms=AT).components["pulse"]
    assert pulse is not None and (pulse.source, pulse.value) == ("pr", 60)
    # hr flagged as artifact (HR 350) or stale (lead off) falls back to pr as well.
    artifact = {**readings(hr=None), "hr": Reading(350, AT, artifact=True), "pr": Reading(72, AT)}
    pulse = score(artifact, at_ms=AT).components["pulse"]
    assert pulse is not None and pulse.source == "pr"
    stale = {**readings(hr=None), "hr": Reading(70, AT - 600_000), "pr": Reading(72, AT)}
    pulse = score(stale, at_ms=AT).components["pulse"]
    assert pulse is not None and pulse.source == "pr"
    neither = score(readings(hr=None), at_ms=AT)
    assert neither.missing == ("pulse",)


def test_hr_zero_is_a_real_reading() -> None:
    pulse = score(readings(hr=0), at_ms=AT).components["pulse"]
    assert pulse is not None and pulse.points == 3


def test_artifact_values_are_ignored() -> None:
    inputs = {**readings(), "rr": Reading(90, AT, artifact=True)}
    result = score(inputs, at_ms=AT)
    assert result.components["rr"] is None
    assert not result.complete


@pytest.mark.parametrize(
    ("aggregate", "red", "expected"),
    [
        (0, False, "low"),
        (4, False, "low"),
        (3, True, "low_medium"),
        (4, True, "low_medium"),
        (5, False, "medium"),
        (5, True, "medium"),
        (6, True, "medium"),
        (7, False, "high"),
        (7, True, "high"),
        (20, True, "high"),
    ],
)
def test_response_thresholds(aggregate: int, red: bool, expected: str) -> None:
    assert response_for(aggregate, red) == expected


@pytest.mark.parametrize(
    ("values", "scale", "total", "response", "priority"),
    [
        # Sepsis at 30 min in the simulator: RR 28, SpO2 91, HR 125, SBP 88, 39.2 °C, alert, on air.
        (
            {"rr": 28, "spo2": 91, "hr": 125, "nibp_sys": 88, "temp": 39.2},
            1,
            3 + 3 + 2 + 3 + 2,
            "high",
            "high",
        ),
        # New confusion alone: a single red parameter.
        ({"acvpu": "C"}, 1, 3, "low_medium", "low"),
        # RR 22 (2), SpO2 95 (1), HR 95 (1), 38.2 (1): medium.
        ({"rr": 22, "spo2": 95, "hr": 95, "temp": 38.2}, 1, 5, "medium", "medium"),
        # RR 21 (2), HR 105 (1), SBP 105 (1): low.
        ({"rr": 21, "hr": 105, "nibp_sys": 105}, 1, 4, "low", None),
        # COPD on scale 2, on oxygen at 97 % (3) and oxygen (2), RR 24 (2): high.
        ({"spo2": 97, "o2_supplement": 1, "rr": 24}, 2, 7, "high", "high"),
        # The same patient on air at 97 %: 0.
        ({"spo2": 97, "o2_supplement": 0, "rr": 24}, 2, 2, "low", None),
        # Scale 1 on oxygen at 97 %: oxygen 2 only.
        ({"spo2": 97, "o2_supplement": 1}, 1, 2, "low", None),
        # Scale 2 on oxygen at 99 %: RR 3, SpO2 3, oxygen 2, SBP 3, pulse 3, U 3, 40.0 °C 2.
        (
            {
                "rr": 30,
                "spo2": 99,
                "o2_supplement": 1,
                "nibp_sys": 230,
                "hr": 140,
                "acvpu": "U",
                "temp": 40.0,
            },
            2,
            19,
            "high",
            "high",
        ),
    ],
)
def test_worked_examples(
    values: dict[str, object], scale: Scale, total: int, response: str, priority: str
) -> None:
    result = score(readings(**values), at_ms=AT, scale=scale)
    assert result.complete
    assert result.score == total == result.partial
    assert result.response == response
    assert result.priority == priority


def test_incomplete_response_is_a_floor() -> None:
    # Temperature stale, but RR 30, SpO2 90 and HR 135 already make 9: the response cannot be lower than high.
    inputs = {**readings(rr=30, spo2=90, hr=135), "temp": Reading(37.0, AT - 5 * 3_600_000)}
    result = score(inputs, at_ms=AT)
    assert (result.complete, result.score, result.partial) == (False, None, 9)
    assert result.response == "high"
    assert result.priority == "high"
    red = score(readings(acvpu="V", temp=None), at_ms=AT)
    assert (red.score, red.partial, red.response) == (None, 3, "low_medium")


def test_suppressed_is_carried_not_applied() -> None:
    result = score(readings(acvpu="U"), at_ms=AT, suppressed=True)
    assert result.suppressed
    assert (result.score, result.response) == (3, "low_medium")
    assert result.priority is None  # the caller raises nothing for a suppressed patient


def test_snapshot_shape() -> None:
    result = score(readings(temp=38.05), at_ms=AT)
    out = result.to_json()
    assert {"score", "complete", "scale", "components", "ts", "response"} <= out.keys()
    assert out["ts"] == AT
    assert out["components"]["temp"] == {"value": 38.1, "points": 1, "ts": AT, "source": "temp"}


@pytest.mark.parametrize(
    ("code", "bad"),
    [("acvpu", "X"), ("acvpu", 1), ("o2_supplement", 2), ("o2_supplement", "1"), ("rr", "16")],
)
def test_bad_values_are_bugs(code: str, bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        score(readings(**{code: bad}), at_ms=AT)


def test_bad_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        score(readings(), at_ms=AT, scale=3)  # type: ignore[arg-type]
