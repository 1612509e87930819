"""Code tables: vital signs (IEEE 11073-10101 MDC, LOINC, UCUM), Vigil's NEWS2 codes, critical-lab LOINC.

Numbers are from the standards, not invented: an MDC context-free code is `partition * 65536 + term code`
(SCADA partition 2 for measurements, DIM partition 4 for units); LOINC codes carry a mod-10 check digit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MDC_PART_SCADA = 2
MDC_PART_DIM = 4


def mdc_code(partition: int, term: int) -> int:
    """The 32-bit context-free code of an MDC term (IEEE 11073-10101 section A.3)."""
    return partition * 65_536 + term


@dataclass(frozen=True, slots=True)
class MdcUnit:
    """An MDC unit of measure (partition DIM) and the UCUM unit it names."""

    ref: str
    code: int
    ucum: str


# Term codes of the DIM partition (IEEE 11073-10101, table A.6.3).
MDC_UNITS: dict[str, MdcUnit] = {
    u.ref: u
    for u in (
        MdcUnit("MDC_DIM_DIMLESS", mdc_code(MDC_PART_DIM, 512), "1"),
        MdcUnit("MDC_DIM_PERCENT", mdc_code(MDC_PART_DIM, 544), "%"),
        MdcUnit("MDC_DIM_BEAT_PER_MIN", mdc_code(MDC_PART_DIM, 2720), "/min"),
        MdcUnit("MDC_DIM_RESP_PER_MIN", mdc_code(MDC_PART_DIM, 2784), "/min"),
        MdcUnit("MDC_DIM_KILO_PASCAL", mdc_code(MDC_PART_DIM, 3843), "kPa"),
        MdcUnit("MDC_DIM_MMHG", mdc_code(MDC_PART_DIM, 3872), "mm[Hg]"),
        MdcUnit("MDC_DIM_KELVIN", mdc_code(MDC_PART_DIM, 4384), "K"),
        MdcUnit("MDC_DIM_FAHR", mdc_code(MDC_PART_DIM, 4416), "[degF]"),
        MdcUnit("MDC_DIM_DEGC", mdc_code(MDC_PART_DIM, 6048), "Cel"),
    )
}


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """One observation code: its identities, canonical unit and the two value ranges (canonical unit)."""

    ref: str  # MDC reference id, or a Vigil code (o2_supplement, acvpu)
    code: int | None  # MDC context-free code; None for Vigil codes
    alias: str  # the contract's short name
    label: str
    unit: str  # canonical UCUM unit
    mdc_unit: str | None  # MDC unit reference id of the canonical unit
    loinc: str | None  # the LOINC code FHIR vital-signs profiles use
    measurable: tuple[float, float]  # outside: the device cannot have measured it (dead letter value_range)
    physiological: tuple[float, float]  # outside: stored flagged artifact, never used clinically
    choices: tuple[str, ...] = ()  # an ordinal code's allowed values (acvpu); empty for numeric codes
    discrete: bool = False  # values are whole numbers (o2_supplement)

    @property
    def mdc_unit_code(self) -> int | None:
        return None if self.mdc_unit is None else MDC_UNITS[self.mdc_unit].code


ACVPU = ("A", "C", "V", "P", "U")  # NEWS2 consciousness; stored as 0-4 in this order


def _vital(
    ref: str, term: int, alias: str, unit: str, mdc_unit: str, loinc: str,
    measurable: tuple[float, float], physiological: tuple[float, float], label: str,
) -> CodeInfo:  # fmt: skip
    return CodeInfo(
        ref, mdc_code(MDC_PART_SCADA, term), alias, label, unit, mdc_unit, loinc, measurable, physiological
    )


# Term codes of the SCADA partition (IEEE 11073-10101, table A.7). Ranges are in the canonical unit.
# HR 0 and RR 0 are real (asystole, apnoea), never artifacts; HR 350 is. SpO2 and etCO2 have no artifact
# band: a low reading flagged artifact would be kept from the alarms that a real desaturation or apnoea needs.
# fmt: off
VITALS: tuple[CodeInfo, ...] = (
    _vital("MDC_ECG_HEART_RATE",        16770, "hr",        "/min",   "MDC_DIM_BEAT_PER_MIN", "8867-4",
           (0, 400), (0, 300), "Heart rate"),
    _vital("MDC_PULS_OXIM_PULS_RATE",   18458, "pr",        "/min",   "MDC_DIM_BEAT_PER_MIN", "8889-8",
           (0, 400), (0, 300), "Heart rate by pulse oximetry"),
    _vital("MDC_PULS_OXIM_SAT_O2",      19384, "spo2",      "%",      "MDC_DIM_PERCENT",      "59408-5",
           (0, 100), (0, 100), "Oxygen saturation by pulse oximetry"),
    _vital("MDC_RESP_RATE",             20490, "rr",        "/min",   "MDC_DIM_RESP_PER_MIN", "9279-1",
           (0, 200), (0, 100), "Respiratory rate"),
    _vital("MDC_TEMP_BODY",             19292, "temp",      "Cel",    "MDC_DIM_DEGC",         "8310-5",
           (0, 60), (20, 45), "Body temperature"),
    _vital("MDC_PRESS_BLD_NONINV_SYS",  18949, "nibp_sys",  "mm[Hg]", "MDC_DIM_MMHG",         "8480-6",
           (0, 400), (20, 300), "Systolic blood pressure (non-invasive)"),
    _vital("MDC_PRESS_BLD_NONINV_DIA",  18950, "nibp_dia",  "mm[Hg]", "MDC_DIM_MMHG",         "8462-4",
           (0, 400), (10, 250), "Diastolic blood pressure (non-invasive)"),
    _vital("MDC_PRESS_BLD_NONINV_MEAN", 18951, "nibp_mean", "mm[Hg]", "MDC_DIM_MMHG",         "8478-0",
           (0, 400), (15, 270), "Mean blood pressure (non-invasive)"),
    _vital("MDC_AWAY_CO2_ET",           20636, "etco2",     "mm[Hg]", "MDC_DIM_MMHG",         "19889-5",
           (0, 150), (0, 150), "End-tidal carbon dioxide"),
    # Vigil codes for the NEWS2 inputs that have no MDC numeric.
    CodeInfo("o2_supplement", None, "o2_supplement", "Supplemental oxygen (0 air, 1 oxygen)", "1", None, None,
             (0, 1), (0, 1), discrete=True),
    CodeInfo("acvpu", None, "acvpu", "Consciousness (ACVPU)", "1", None, None, (0, 4), (0, 4), choices=ACVPU),
)
# fmt: on

BY_REF: dict[str, CodeInfo] = {c.ref: c for c in VITALS}
BY_ALIAS: dict[str, CodeInfo] = {c.alias: c for c in VITALS}
BY_NUMBER: dict[int, CodeInfo] = {c.code: c for c in VITALS if c.code is not None}

# One dict for every spelling a device may use: ref id, alias, the number and its decimal string. Look up
# only a str or an int in it (a float or a bool hashes like the int it equals): `resolve_code` does.
CODE_LOOKUP: dict[str | int, CodeInfo] = {}
for _c in VITALS:
    CODE_LOOKUP[_c.ref] = CODE_LOOKUP[_c.alias] = _c
    if _c.code is not None:
        CODE_LOOKUP[_c.code] = CODE_LOOKUP[str(_c.code)] = _c


def resolve_code(x: str | int) -> CodeInfo | None:
    """The code named by an MDC ref id (case-sensitive), its numeric code (int or string) or an alias."""
    if type(x) is not str and type(x) is not int:  # not a bool, a float or anything unhashable
        return None
    return CODE_LOOKUP.get(x)


@dataclass(frozen=True, slots=True)
class LabCode:
    """A laboratory test (LOINC) and the UCUM unit its result is usually reported in."""

    loinc: str
    name: str
    unit: str


CRITICAL_LABS: dict[str, LabCode] = {
    c.loinc: c
    for c in (
        LabCode("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L"),
        LabCode("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L"),
        LabCode("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL"),
        LabCode("2524-7", "Lactate [Moles/volume] in Serum or Plasma", "mmol/L"),
        LabCode("10839-9", "Troponin I.cardiac [Mass/volume] in Serum or Plasma", "ng/mL"),
        LabCode("89579-7", "Troponin I.cardiac [Mass/volume] in Serum or Plasma by High sensitivity", "ng/L"),
        LabCode("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL"),
        LabCode("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL"),
        LabCode("6301-6", "INR in Platelet poor plasma by Coagulation assay", "{INR}"),
        LabCode("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL"),
        LabCode("2744-1", "pH of Arterial blood", "[pH]"),
        LabCode("2703-7", "Oxygen [Partial pressure] in Arterial blood", "mm[Hg]"),
        LabCode("2019-8", "Carbon dioxide [Partial pressure] in Arterial blood", "mm[Hg]"),
        LabCode("17861-6", "Calcium [Mass/volume] in Serum or Plasma", "mg/dL"),
        LabCode("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL"),
    )
}

_LOINC = re.compile(r"[0-9]{1,7}-[0-9]")


def loinc_check_digit(number: str) -> int:
    """The LOINC mod-10 check digit of the digits before the dash (the Luhn algorithm)."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = ord(ch) - 48
        if i % 2 == 0:  # from the right, every other digit starting with the rightmost is doubled
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return (10 - total % 10) % 10


def is_loinc(code: str) -> bool:
    """True for `digits-checkdigit` with a correct mod-10 check digit (e.g. 2823-3)."""
    if not isinstance(code, str) or _LOINC.fullmatch(code) is None:
        return False
    number, check = code.split("-")
    return loinc_check_digit(number) == int(check)
