"""NEWS2, the Royal College of Physicians' National Early Warning Score 2 (2017), as a pure function.

Bands are those of the RCP's Chart 1 and responses those of Chart 3 (docs/NEWS2.md cites them). Inputs are
rounded half-up to the chart's resolution; a missing, stale or artifact-only parameter is never scored 0:
the score is then None and `complete` false, while `partial` (a lower bound) and a floor `response` stay
available, so a stale temperature never hides a red respiratory rate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

Scale = Literal[1, 2]
Response = Literal["low", "low_medium", "medium", "high"]
Priority = Literal["high", "medium", "low"]

# Chart order; these are the components' names.
PARAMETERS = ("rr", "spo2", "o2_supplement", "nibp_sys", "pulse", "acvpu", "temp")
PULSE_SOURCES = ("hr", "pr")  # contract section 3: NEWS2's pulse is hr, else pr

MINUTE_MS = 60_000
# Oldest usable reading per input code. Continuous monitor signals (1 s) are stale after 5 minutes without
# a reading; the NIBP cuff cycles every 5-30 minutes, and a NEWS2 of 5 or more calls for at least hourly
# observations; temperature, consciousness and oxygen are charted at the RCP's 4-6-hourly round (aggregate
# 1-4), so 4 hours, the stricter end. A unit that charts by hand passes its own (its observation interval).
DEFAULT_MAX_AGE_MS: Mapping[str, int] = {
    "hr": 5 * MINUTE_MS,
    "pr": 5 * MINUTE_MS,
    "spo2": 5 * MINUTE_MS,
    "rr": 5 * MINUTE_MS,
    "nibp_sys": 60 * MINUTE_MS,
    "temp": 240 * MINUTE_MS,
    "acvpu": 240 * MINUTE_MS,
    "o2_supplement": 240 * MINUTE_MS,
}

PRIORITY: Mapping[Response, Priority | None] = {
    "low": None,
    "low_medium": "low",
    "medium": "medium",
    "high": "high",
}

_WHOLE = Decimal(1)
_TENTH = Decimal("0.1")
_ACVPU = frozenset("ACVPU")


@dataclass(frozen=True, slots=True)
class Reading:
    """The latest value of one input: a number (o2_supplement 0 air, 1 oxygen) or an ACVPU letter."""

    value: int | float | Decimal | str
    ts: int  # epoch ms the value was measured (an item's own `ts`, e.g. the NIBP cuff start)
    artifact: bool = False  # flagged at ingest: outside the physiological range, never used clinically


@dataclass(frozen=True, slots=True)
class Component:
    """One scored parameter: the value as charted (rounded), its points, its time and which input it is."""

    value: int | float | str
    points: int
    ts: int
    source: str  # the input code: "hr" or "pr" for pulse, else the parameter's own

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "points": self.points, "ts": self.ts, "source": self.source}


@dataclass(frozen=True, slots=True)
class News2Result:
    """A NEWS2 at `ts`. `score` is None unless `complete`; `partial` sums the parameters that could be scored.

    When incomplete, `response` is a floor (missing parameters can only raise it) and None while that floor
    is `low`: an incomplete score never reads as a reassuring one.
    """

    score: int | None
    partial: int
    complete: bool
    scale: Scale
    components: Mapping[str, Component | None]
    ts: int
    response: Response | None
    missing: tuple[str, ...]  # parameters without a usable value, in chart order
    stale: tuple[str, ...]  # the inputs among them that have a value, but older than their maximum age
    suppressed: bool = False

    @property
    def priority(self) -> Priority | None:
        """The alert priority this response raises (contract section 5); None when suppressed or low."""
        if self.suppressed or self.response is None:
            return None
        return PRIORITY[self.response]

    def to_json(self) -> dict[str, Any]:
        """The snapshot's `"news2"` object (contract section 5), with Vigil's additions."""
        return {
            "score": self.score,
            "complete": self.complete,
            "scale": self.scale,
            "components": {k: (c.to_json() if c else None) for k, c in self.components.items()},
            "ts": self.ts,
            "response": self.response,
            "partial": self.partial,
            "missing": list(self.missing),
            "stale": list(self.stale),
            "suppressed": self.suppressed,
        }


def half_up(value: int | float | Decimal, step: Decimal = _WHOLE) -> Decimal:
    """Round as the chart is read: half away from zero at `step` (20.5 -> 21, 38.05 -> 38.1)."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise TypeError(f"a NEWS2 number, not {value!r}")
    return _quantized(value, step)


@functools.lru_cache(maxsize=8192, typed=True)
def _quantized(value: int | float | Decimal, step: Decimal) -> Decimal:
    """`half_up` of a checked number, cached: readings repeat a few hundred values all day. Typed, so a float
    never shares an entry with the Decimal of its exact binary value (they round differently); NaN is
    never equal to itself, so it is never served from the cache."""
    # str() of a float is its shortest repr, so 38.05 rounds as written rather than as 38.04999...
    d = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    if not d.is_finite():
        raise ValueError(f"NEWS2 input is not finite: {value!r}")
    return d.quantize(step, rounding=ROUND_HALF_UP)


def _bands(*edges: tuple[int | str, int]) -> Callable[[Decimal], int]:
    """Points from (upper bound inclusive, points) pairs in ascending order; the last bound is open."""
    table = [(Decimal(str(hi)), pts) for hi, pts in edges[:-1]]
    last = edges[-1][1]

    def points(v: Decimal) -> int:
        for hi, pts in table:
            if v <= hi:
                return pts
        return last

    return points


# RCP Chart 1, on values already rounded to the chart's resolution.
rr_points = _bands((8, 3), (11, 1), (20, 0), (24, 2), (0, 3))
spo2_scale1_points = _bands((91, 3), (93, 2), (95, 1), (0, 0))
_spo2_scale2_low = _bands((83, 3), (85, 2), (87, 1), (0, 0))  # up to 92, whatever the oxygen
_spo2_scale2_oxygen = _bands((94, 1), (96, 2), (0, 3))  # 93 and above, on oxygen
sbp_points = _bands((90, 3), (100, 2), (110, 1), (219, 0), (0, 3))
pulse_points = _bands((40, 3), (50, 1), (90, 0), (110, 1), (130, 2), (0, 3))
temp_points = _bands(("35.0", 3), ("36.0", 1), ("38.0", 0), ("39.0", 1), (0, 2))


def spo2_scale2_points(spo2: Decimal, oxygen: bool | None) -> int | None:
    """Scale 2 (target 88-92 %): 93 % and above scores 0 on air and 1-3 on oxygen; None if that is unknown."""
    if spo2 <= 92:
        return _spo2_scale2_low(spo2)
    if oxygen is None:
        return None
    return _spo2_scale2_oxygen(spo2) if oxygen else 0


def response_for(aggregate: int, any_red: bool) -> Response:
    """RCP Chart 3: 7+ high, 5-6 medium, a single parameter scoring 3 low-medium, else low."""
    if aggregate >= 7:
        return "high"
    if aggregate >= 5:
        return "medium"
    return "low_medium" if any_red else "low"


def _oxygen(value: int | float | Decimal | str) -> bool:
    if isinstance(value, str | bool) or value not in (0, 1):
        raise ValueError(f"o2_supplement is 0 (air) or 1 (oxygen), not {value!r}")
    return value == 1


def _acvpu(value: int | float | Decimal | str) -> str:
    if not isinstance(value, str) or value.upper() not in _ACVPU:
        raise ValueError(f"acvpu is one of A, C, V, P, U, not {value!r}")
    return value.upper()


def _number(value: int | float | Decimal | str, step: Decimal = _WHOLE) -> Decimal:
    if isinstance(value, str):
        raise TypeError(f"a NEWS2 number, not {value!r}")
    return half_up(value, step)


def score(
    inputs: Mapping[str, Reading],
    *,
    at_ms: int,
    scale: Scale = 1,
    max_age_ms: Mapping[str, int] = DEFAULT_MAX_AGE_MS,
    suppressed: bool = False,
) -> News2Result:
    """NEWS2 at `at_ms` from the latest reading of each input code (hr, pr, spo2, rr, temp, nibp_sys,
    o2_supplement, acvpu). Suppression is the caller's decision; it is carried, not applied.
    """
    if scale not in (1, 2):
        raise ValueError(f"SpO2 scale is 1 or 2, not {scale!r}")
    ages = {**DEFAULT_MAX_AGE_MS, **max_age_ms}
    stale: list[str] = []

    def usable(code: str) -> Reading | None:
        r = inputs.get(code)
        if r is None or r.artifact:
            return None
        if at_ms - r.ts > ages[code]:
            stale.append(code)
            return None
        return r

    comps: dict[str, Component | None] = dict.fromkeys(PARAMETERS)

    r = usable("rr")
    if r is not None:
        v = _number(r.value)
        comps["rr"] = Component(int(v), rr_points(v), r.ts, "rr")

    o2 = usable("o2_supplement")
    oxygen = None if o2 is None else _oxygen(o2.value)
    if o2 is not None and oxygen is not None:
        comps["o2_supplement"] = Component(int(oxygen), 2 if oxygen else 0, o2.ts, "o2_supplement")

    r = usable("spo2")
    if r is not None:
        v = _number(r.value)
        pts = spo2_scale1_points(v) if scale == 1 else spo2_scale2_points(v, oxygen)
        if pts is not None:
            comps["spo2"] = Component(int(v), pts, r.ts, "spo2")

    r = usable("nibp_sys")
    if r is not None:
        v = _number(r.value)
        comps["nibp_sys"] = Component(int(v), sbp_points(v), r.ts, "nibp_sys")

    for code in PULSE_SOURCES:
        r = usable(code)
        if r is not None:
            v = _number(r.value)
            comps["pulse"] = Component(int(v), pulse_points(v), r.ts, code)
            break

    r = usable("acvpu")
    if r is not None:
        letter = _acvpu(r.value)
        comps["acvpu"] = Component(letter, 0 if letter == "A" else 3, r.ts, "acvpu")

    r = usable("temp")
    if r is not None:
        v = _number(r.value, _TENTH)
        comps["temp"] = Component(float(v), temp_points(v), r.ts, "temp")

    missing = tuple(name for name, c in comps.items() if c is None)
    partial = sum(c.points for c in comps.values() if c is not None)
    floor = response_for(partial, any(c is not None and c.points == 3 for c in comps.values()))
    complete = not missing
    if comps["pulse"] is not None:
        # A stale hr with a usable pr: the pulse is known, so hr's age leaves no gap.
        stale = [c for c in stale if c not in PULSE_SOURCES]
    return News2Result(
        score=partial if complete else None,
        partial=partial,
        complete=complete,
        scale=scale,
        components=comps,
        ts=at_ms,
        response=floor if complete or floor != "low" else None,
        missing=missing,
        stale=tuple(stale),
        suppressed=suppressed,
    )
