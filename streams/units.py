"""UCUM units of the observation codes: accepted spellings and conversion to each code's canonical unit."""

from __future__ import annotations

from dataclasses import dataclass

from streams.codes import MDC_UNITS, VITALS, CodeInfo, resolve_code

# 1 mmHg = 13.5951 g/cm3 * 9.80665 m/s2 * 1 mm = 133.322387415 Pa (so 1 kPa = 7.50062 mmHg).
MMHG_IN_PA = 133.322387415
KPA_IN_MMHG = 1000 / MMHG_IN_PA


class UnitError(ValueError):
    """A unit that is unknown, or not convertible to the code's canonical unit."""


@dataclass(frozen=True, slots=True)
class Conversion:
    """canonical = (value + add) * mul."""

    mul: float = 1.0
    add: float = 0.0

    def apply(self, value: float) -> float:
        return (value + self.add) * self.mul


IDENTITY = Conversion()

# UCUM spellings convertible to each canonical unit, keyed by the canonical unit.
FAMILIES: dict[str, dict[str, Conversion]] = {
    "/min": {
        "/min": IDENTITY,
        "1/min": IDENTITY,
        "min-1": IDENTITY,
        "/s": Conversion(60.0),
        "/h": Conversion(1 / 60),
    },
    # A fraction (0.97) of one is a percentage (97 %); only SpO2 uses % here.
    "%": {"%": IDENTITY, "1": Conversion(100.0)},
    "mm[Hg]": {"mm[Hg]": IDENTITY, "kPa": Conversion(KPA_IN_MMHG), "Pa": Conversion(1 / MMHG_IN_PA)},
    "Cel": {"Cel": IDENTITY, "[degF]": Conversion(5 / 9, -32.0), "K": Conversion(1.0, -273.15)},
    "1": {"1": IDENTITY, "%": Conversion(0.01)},  # battery level and other fractions
}

# Annotated UCUM forms are only accepted where the annotation fits the code (a heart rate is not in breaths).
_ANNOTATED: dict[str, tuple[str, ...]] = {
    "MDC_DIM_BEAT_PER_MIN": ("{beats}/min", "{beat}/min"),
    "MDC_DIM_RESP_PER_MIN": ("{breaths}/min", "{breath}/min"),
}
# The MDC unit ids a code's canonical unit family accepts besides its own.
_MDC_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "%": ("MDC_DIM_PERCENT",),
    "mm[Hg]": ("MDC_DIM_MMHG", "MDC_DIM_KILO_PASCAL"),
    "Cel": ("MDC_DIM_DEGC", "MDC_DIM_FAHR", "MDC_DIM_KELVIN"),
}


def _table(info: CodeInfo) -> dict[str, Conversion]:
    if info.discrete or info.choices:  # a flag or a level has no other unit (o2_supplement 100 % is nonsense)
        return {info.unit: IDENTITY}
    family = FAMILIES[info.unit]
    table = dict(family)
    mdc_ids = list(_MDC_BY_FAMILY.get(info.unit, ()))
    if info.mdc_unit is not None:
        mdc_ids.append(info.mdc_unit)
        table.update(dict.fromkeys(_ANNOTATED.get(info.mdc_unit, ()), IDENTITY))
    for ref in mdc_ids:
        unit = MDC_UNITS[ref]
        table[ref] = table[str(unit.code)] = family[unit.ucum]
    return table


_BY_CODE: dict[str, dict[str, Conversion]] = {c.ref: _table(c) for c in VITALS}


def _info(code: str | CodeInfo) -> CodeInfo:
    info = code if isinstance(code, CodeInfo) else resolve_code(code)
    if info is None:
        raise UnitError(f"unknown code {code!r}")
    return info


def accepted_units(code: str | CodeInfo) -> frozenset[str]:
    """Every unit spelling (UCUM or MDC unit id) that converts to the code's canonical unit."""
    return frozenset(_BY_CODE[_info(code).ref])


def convert(value: float, from_unit: str | None, code: str | CodeInfo) -> float:
    """`value` in `from_unit` expressed in the code's canonical unit (None means already canonical)."""
    info = _info(code)
    if from_unit is None or from_unit == info.unit:
        return value
    conv = _BY_CODE[info.ref].get(from_unit)
    if conv is None:
        raise UnitError(f"unit {from_unit!r} is not convertible to {info.unit!r} for {info.ref}")
    return conv.apply(value)


def convert_quantity(value: float, from_unit: str, to_unit: str) -> float:
    """`value` in `from_unit` expressed in the canonical `to_unit` (e.g. battery 83 % -> 0.83)."""
    family = FAMILIES.get(to_unit)
    conv = None if family is None else family.get(from_unit)
    if conv is None:
        raise UnitError(f"unit {from_unit!r} is not convertible to {to_unit!r}")
    return conv.apply(value)
