"""UCUM unit handling: accepted spellings and conversions to a code's canonical unit, with exact figures."""

from __future__ import annotations

import pytest

from streams.codes import BY_REF
from streams.units import KPA_IN_MMHG, MMHG_IN_PA, UnitError, accepted_units, convert, convert_quantity


def test_pressure_factors() -> None:
    assert pytest.approx(7.50062, abs=5e-6) == KPA_IN_MMHG
    assert pytest.approx(133.322, abs=5e-4) == MMHG_IN_PA


@pytest.mark.parametrize("code", ["hr", "MDC_ECG_HEART_RATE", 147842, "147842", BY_REF["MDC_ECG_HEART_RATE"]])
def test_canonical_or_absent_unit_is_identity(code: str) -> None:
    assert convert(72.0, "/min", code) == 72.0
    assert convert(72.0, None, code) == 72.0


@pytest.mark.parametrize(
    ("value", "unit", "code", "expected"),
    [
        (98.6, "[degF]", "temp", 37.0),
        (32.0, "[degF]", "temp", 0.0),
        (104.0, "MDC_DIM_FAHR", "temp", 40.0),
        (104.0, "266560", "temp", 40.0),
        (310.15, "K", "temp", 37.0),
        (37.2, "MDC_DIM_DEGC", "temp", 37.2),
        (1.0, "kPa", "nibp_sys", 7.500615758),
        (16.0, "kPa", "nibp_sys", 120.00985213),
        (5.3, "kPa", "etco2", 39.753263518),
        (5.3, "MDC_DIM_KILO_PASCAL", "etco2", 39.753263518),
        (133.322387415, "Pa", "nibp_dia", 1.0),
        (118.0, "MDC_DIM_MMHG", "nibp_mean", 118.0),
        (1.2, "/s", "hr", 72.0),
        (0.25, "/s", "rr", 15.0),
        (4320.0, "/h", "pr", 72.0),
        (72.0, "{beats}/min", "hr", 72.0),
        (72.0, "MDC_DIM_BEAT_PER_MIN", "pr", 72.0),
        (72.0, "264864", "hr", 72.0),
        (16.0, "{breaths}/min", "rr", 16.0),
        (16.0, "MDC_DIM_RESP_PER_MIN", "rr", 16.0),
        (0.97, "1", "spo2", 97.0),
        (97.0, "MDC_DIM_PERCENT", "spo2", 97.0),
    ],
)
def test_conversions(value: float, unit: str, code: str, expected: float) -> None:
    assert convert(value, unit, code) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize(
    ("unit", "code"),
    [
        ("mm[Hg]", "hr"),  # a pressure is not a rate
        ("Cel", "spo2"),
        ("%", "temp"),
        ("/min", "nibp_sys"),
        ("{breaths}/min", "hr"),  # annotations must fit the code
        ("MDC_DIM_BEAT_PER_MIN", "rr"),
        ("MDC_DIM_DIMLESS", "spo2"),  # ambiguous (fraction or percent): refused rather than guessed
        ("%", "o2_supplement"),
        ("mmHg", "nibp_sys"),  # not UCUM: the UCUM spelling is mm[Hg]
        ("degF", "temp"),
        ("bpm", "hr"),
        ("", "hr"),
    ],
)
def test_incompatible_units_raise(unit: str, code: str) -> None:
    with pytest.raises(UnitError):
        convert(1.0, unit, code)


def test_unknown_code_raises() -> None:
    with pytest.raises(UnitError, match="unknown code"):
        convert(1.0, "/min", "heart")


def test_accepted_units_lists_spellings() -> None:
    assert {"/min", "{beats}/min", "MDC_DIM_BEAT_PER_MIN", "264864", "/s"} <= accepted_units("hr")
    assert "{breaths}/min" not in accepted_units("hr")
    assert accepted_units("acvpu") == frozenset({"1"})


def test_battery_percent_to_fraction() -> None:
    assert convert_quantity(83.0, "%", "1") == pytest.approx(0.83)
    assert convert_quantity(0.83, "1", "1") == 0.83
    with pytest.raises(UnitError):
        convert_quantity(83.0, "mV", "1")
    with pytest.raises(UnitError):
        convert_quantity(83.0, "%", "furlong")
