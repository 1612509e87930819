"""Scenario scripts as data: timelines of vital-sign targets, device windows, SOS runs and lab results.

Times are seconds of scenario time from the start. docs/SIMULATOR.md tabulates every timeline; keep the two
in step.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

Keyframes = tuple[tuple[float, float], ...]  # (scenario second, value), linear in between
Steps = tuple[tuple[float, str], ...]  # (scenario second, value), held until the next step

# Window kinds and the device type each one acts on.
LEAD_OFF = "lead_off"  # monitor: status condition lead_off, no ECG HR and no impedance RR
ARTIFACT = "artifact"  # monitor: HR spikes 350/0 from motion, reported as condition low_signal
OFFLINE = "offline"  # any device: publishes nothing
OCCLUSION = "occlusion"  # pump: state alarm, alarms ["occlusion"], infusion stops
WINDOW_DEVICE = {LEAD_OFF: "monitor", ARTIFACT: "monitor", OFFLINE: "monitor", OCCLUSION: "pump"}

LatLon = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Window:
    """A span of scenario time during which a device is in a special state."""

    what: str  # LEAD_OFF, ARTIFACT, OFFLINE, OCCLUSION
    start_s: float
    end_s: float

    def covers(self, t_s: float) -> bool:
        return self.start_s <= t_s < self.end_s


@dataclass(frozen=True, slots=True)
class SosScript:
    """A pendant press at home and the ambulance run that answers it."""

    press_at_s: float
    home: LatLon
    note: str
    station: LatLon  # where the ambulance waits, available
    hospital: LatLon
    dispatch_at_s: float  # scripted dispatch by phone, unless the hub's order came first


@dataclass(frozen=True, slots=True)
class LabResult:
    """One analyzer result, reported at `at_s` for the analyzer's patient."""

    at_s: float
    order_id: str
    ordering_provider: str
    loinc: str
    value: float | str
    unit: str
    flag: str
    status: str = "final"


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named, deterministic script; each device type plays the parts that concern it."""

    name: str
    title: str
    length_s: float  # where the script's last change happens; afterwards the last state holds
    tracks: Mapping[str, Keyframes] = field(default_factory=dict)  # hr, rr, spo2, temp, sbp, dbp
    states: Mapping[str, Steps] = field(default_factory=dict)  # acvpu, o2_supplement
    windows: tuple[Window, ...] = ()
    nibp_every_s: float = 900.0  # cuff cycle
    sos: SosScript | None = None
    labs: tuple[LabResult, ...] = ()

    def window(self, what: str, t_s: float) -> Window | None:
        """The window of this kind covering `t_s`, if any."""
        for w in self.windows:
            if w.what == what and w.covers(t_s):
                return w
        return None


HOME: LatLon = (51.5072, -0.1276)
STATION: LatLon = (51.5226, -0.1571)
HOSPITAL: LatLon = (51.4988, -0.1181)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("stable", "Stable patient: baseline values with normal noise", 0.0),
        Scenario(
            "sepsis",
            "Sepsis: HR, RR, temperature up, SBP and SpO2 down over 30 min; new confusion at 40 min",
            2400.0,
            tracks={
                "hr": ((0, 80), (1800, 125)),
                "rr": ((0, 14), (1800, 28)),
                "temp": ((0, 37.0), (1800, 39.2)),
                "sbp": ((0, 125), (1800, 88)),
                "dbp": ((0, 78), (1800, 50)),
                "spo2": ((0, 97), (1800, 91)),
            },
            states={"acvpu": ((0, "A"), (2400, "C")), "o2_supplement": ((0, "0"),)},
            nibp_every_s=300.0,
        ),
        Scenario(
            "desaturation",
            "Desaturation: SpO2 97 -> 78 over 60 s, held 2 min, recovers over 60 s",
            300.0,
            tracks={
                "spo2": ((60, 97), (120, 78), (240, 78), (300, 97)),
                "hr": ((60, 75), (120, 92), (240, 92), (300, 75)),
            },
        ),
        Scenario(
            "bradycardia",
            "Bradycardia: HR 70 -> 38 over 2 min, held 3 min, recovers over 1 min",
            420.0,
            tracks={"hr": ((60, 70), (180, 38), (360, 38), (420, 70))},
        ),
        Scenario(
            "artifact",
            "Motion artifact: bursts of ECG HR spikes 350/0 with condition low_signal",
            310.0,
            windows=(Window(ARTIFACT, 60, 70), Window(ARTIFACT, 180, 190), Window(ARTIFACT, 300, 310)),
        ),
        Scenario(
            "lead_off",
            "ECG lead off for 60 s: condition lead_off, no HR (and no impedance RR) while off",
            180.0,
            windows=(Window(LEAD_OFF, 120, 180),),
        ),
        Scenario(
            "offline",
            "Device offline: the monitor publishes nothing for 3 min",
            300.0,
            windows=(Window(OFFLINE, 120, 300),),
        ),
        Scenario(
            "pump_occlusion",
            "Pump occlusion: the pump alarms occlusion for 2 min, then runs again",
            240.0,
            windows=(Window(OCCLUSION, 120, 240),),
        ),
        Scenario(
            "sos_ambulance",
            "SOS with ambulance run: pendant press, dispatch, drive, on scene, transport, hospital",
            1500.0,
            sos=SosScript(
                press_at_s=30,
                home=HOME,
                note="fall",
                station=STATION,
                hospital=HOSPITAL,
                dispatch_at_s=60,
            ),
        ),
        Scenario(
            "hyperkalaemia",
            "Lab analyzer: sodium 139 (N) at 20 s, then potassium 6.8 mmol/L (HH, LOINC 2823-3) at 60 s",
            60.0,
            labs=(
                LabResult(20, "O-9001", "DR-7", "2951-2", 139, "mmol/L", "N"),
                LabResult(60, "O-9002", "DR-7", "2823-3", 6.8, "mmol/L", "HH"),
            ),
        ),
    )
}

# Scenarios a bedside monitor plays, for spreading a mixed ward.
MONITOR_SCENARIOS = ("stable", "sepsis", "desaturation", "bradycardia", "artifact", "lead_off", "offline")


def get(name: str) -> Scenario:
    """The scenario of that name; a KeyError names the known ones."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}: known are {', '.join(SCENARIOS)}") from None


def at(frames: Keyframes, t_s: float, default: float) -> float:
    """The value of a keyframe track at `t_s`: default before any frame, linear between, last after."""
    if not frames:
        return default
    if t_s <= frames[0][0]:
        return frames[0][1]
    for (t0, v0), (t1, v1) in itertools.pairwise(frames):
        if t_s <= t1:
            return v0 + (v1 - v0) * (t_s - t0) / (t1 - t0) if t1 > t0 else v1
    return frames[-1][1]


def step_at(steps: Steps, t_s: float, default: str) -> str:
    """The value of a step track at `t_s`: the last step at or before it."""
    value = default
    for t0, v in steps:
        if t0 <= t_s:
            value = v
    return value


def integral(frames: Keyframes, t_s: float, default: float) -> float:
    """The integral of a keyframe track from 0 to `t_s` (for phases that follow a changing rate)."""
    if not frames:
        return default * t_s
    total, t_prev = 0.0, 0.0
    points = [f for f in frames if 0.0 < f[0] < t_s]
    for t_next in [p[0] for p in points] + [t_s]:
        # The track is linear between consecutive points, so the trapezoid is exact.
        total += (at(frames, t_prev, default) + at(frames, t_next, default)) * (t_next - t_prev) / 2.0
        t_prev = t_next
    return total
