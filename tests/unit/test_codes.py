"""The code tables: MDC numbers, the three lookups, LOINC check digits and the critical-lab table."""

from __future__ import annotations

import pytest

from streams.codes import (
    BY_REF,
    CRITICAL_LABS,
    MDC_UNITS,
    VITALS,
    is_loinc,
    loinc_check_digit,
    mdc_code,
    resolve_code,
)

# The contract's list: alias, numeric code, MDC reference id.
CONTRACT = [
    ("hr", 147842, "MDC_ECG_HEART_RATE"),
    ("pr", 149530, "MDC_PULS_OXIM_PULS_RATE"),
    ("spo2", 150456, "MDC_PULS_OXIM_SAT_O2"),
    ("rr", 151562, "MDC_RESP_RATE"),
    ("temp", 150364, "MDC_TEMP_BODY"),
    ("nibp_sys", 150021, "MDC_PRESS_BLD_NONINV_SYS"),
    ("nibp_dia", 150022, "MDC_PRESS_BLD_NONINV_DIA"),
    ("nibp_mean", 150023, "MDC_PRESS_BLD_NONINV_MEAN"),
    ("etco2", 151708, "MDC_AWAY_CO2_ET"),
]


def test_context_free_code_is_partition_times_65536_plus_term() -> None:
    assert mdc_code(2, 19384) == 150456
    assert mdc_code(2, 16770) == 147842
    assert mdc_code(4, 2720) == 264864


@pytest.mark.parametrize(("alias", "number", "ref"), CONTRACT)
def test_contract_codes_resolve_by_ref_number_string_and_alias(alias: str, number: int, ref: str) -> None:
    info = BY_REF[ref]
    assert info.code == number
    assert info.alias == alias
    assert resolve_code(ref) is info
    assert resolve_code(number) is info
    assert resolve_code(str(number)) is info
    assert resolve_code(alias) is info


@pytest.mark.parametrize(
    ("ref", "unit", "mdc_unit", "mdc_unit_code", "loinc"),
    [
        ("MDC_ECG_HEART_RATE", "/min", "MDC_DIM_BEAT_PER_MIN", 264864, "8867-4"),
        ("MDC_PULS_OXIM_PULS_RATE", "/min", "MDC_DIM_BEAT_PER_MIN", 264864, "8889-8"),
        ("MDC_PULS_OXIM_SAT_O2", "%", "MDC_DIM_PERCENT", 262688, "59408-5"),
        ("MDC_RESP_RATE", "/min", "MDC_DIM_RESP_PER_MIN", 264928, "9279-1"),
        ("MDC_TEMP_BODY", "Cel", "MDC_DIM_DEGC", 268192, "8310-5"),
        ("MDC_PRESS_BLD_NONINV_SYS", "mm[Hg]", "MDC_DIM_MMHG", 266016, "8480-6"),
        ("MDC_PRESS_BLD_NONINV_DIA", "mm[Hg]", "MDC_DIM_MMHG", 266016, "8462-4"),
        ("MDC_PRESS_BLD_NONINV_MEAN", "mm[Hg]", "MDC_DIM_MMHG", 266016, "8478-0"),
        ("MDC_AWAY_CO2_ET", "mm[Hg]", "MDC_DIM_MMHG", 266016, "19889-5"),
    ],
)
def test_units_and_loinc_of_each_vital(
    ref: str, unit: str, mdc_unit: str, mdc_unit_code: int, loinc: str
) -> None:
    info = BY_REF[ref]
    assert (info.unit, info.mdc_unit, info.mdc_unit_code, info.loinc) == (
        unit,
        mdc_unit,
        mdc_unit_code,
        loinc,
    )


def test_mdc_unit_numbers() -> None:
    numbers = {ref: u.code for ref, u in MDC_UNITS.items()}
    assert numbers == {
        "MDC_DIM_DIMLESS": 262656,
        "MDC_DIM_PERCENT": 262688,
        "MDC_DIM_BEAT_PER_MIN": 264864,
        "MDC_DIM_RESP_PER_MIN": 264928,
        "MDC_DIM_KILO_PASCAL": 265987,
        "MDC_DIM_MMHG": 266016,
        "MDC_DIM_KELVIN": 266528,
        "MDC_DIM_FAHR": 266560,
        "MDC_DIM_DEGC": 268192,
    }


def test_vigil_codes_for_news2() -> None:
    o2 = resolve_code("o2_supplement")
    acvpu = resolve_code("acvpu")
    assert o2 is not None and acvpu is not None
    assert (o2.code, o2.discrete, o2.measurable) == (None, True, (0.0, 1.0))
    assert acvpu.choices == ("A", "C", "V", "P", "U")


def test_ranges_keep_hr_and_rr_zero_real_and_flag_hr_350() -> None:
    hr, rr, spo2 = BY_REF["MDC_ECG_HEART_RATE"], BY_REF["MDC_RESP_RATE"], BY_REF["MDC_PULS_OXIM_SAT_O2"]
    assert hr.physiological[0] <= 0 <= hr.physiological[1]
    assert rr.physiological[0] <= 0 <= rr.physiological[1]
    assert hr.measurable[0] <= 350 <= hr.measurable[1]
    assert not hr.physiological[0] <= 350 <= hr.physiological[1]
    assert (spo2.measurable[0], spo2.measurable[1]) == (0.0, 100.0)
    for info in VITALS:  # the artifact band lies inside what can be measured
        assert info.measurable[0] <= info.physiological[0] <= info.physiological[1] <= info.measurable[1]


@pytest.mark.parametrize(
    "x", ["mdc_ecg_heart_rate", "HR", "Spo2", "147842.0", " 147842", "", "MDC_ECG", 0, 1, 147843, -147842]
)
def test_lookup_misses(x: str | int) -> None:
    assert resolve_code(x) is None


@pytest.mark.parametrize("x", [True, False, 147842.0, None, ["hr"], {"hr": 1}, b"hr"])
def test_lookup_refuses_non_str_int_without_raising(x: object) -> None:
    assert resolve_code(x) is None  # type: ignore[arg-type]


def test_critical_lab_table() -> None:
    units = {loinc: c.unit for loinc, c in CRITICAL_LABS.items()}
    assert units == {
        "2823-3": "mmol/L",
        "2951-2": "mmol/L",
        "2345-7": "mg/dL",
        "2524-7": "mmol/L",
        "10839-9": "ng/mL",
        "89579-7": "ng/L",
        "718-7": "g/dL",
        "777-3": "10*3/uL",
        "6301-6": "{INR}",
        "2160-0": "mg/dL",
        "2744-1": "[pH]",
        "2703-7": "mm[Hg]",
        "2019-8": "mm[Hg]",
        "17861-6": "mg/dL",
        "6690-2": "10*3/uL",
    }


def test_every_loinc_in_the_tables_has_a_valid_check_digit() -> None:
    codes = [*CRITICAL_LABS, *(v.loinc for v in VITALS if v.loinc is not None)]
    assert len(codes) == 24
    assert all(is_loinc(c) for c in codes)


def test_loinc_check_digit_algorithm() -> None:
    assert loinc_check_digit("12345") == 5  # the LOINC user guide's worked example
    assert loinc_check_digit("2823") == 3
    assert loinc_check_digit("59408") == 5


@pytest.mark.parametrize(
    "code",
    ["2823-4", "8867-5", "2823", "2823-33", "-3", "28a3-3", " 2823-3", "2823-3 ", "12345678-1", "٢٨٢٣-٣"],
)
def test_loinc_format_and_check_digit_refused(code: str) -> None:
    assert not is_loinc(code)


def test_is_loinc_of_a_non_string_is_false() -> None:
    assert not is_loinc(28233)  # type: ignore[arg-type]
