"""Technical alarms: what a device's own state says (leads off, probe off, offline, pump alarms) and which
parameters each one makes untrustworthy. Pure tables and functions; the clinical engine applies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from alerting.lifecycle import Priority


@dataclass(frozen=True, slots=True)
class Technical:
    """A technical condition: its IEC 60601-1-8 priority, label and the parameters it inhibits."""

    condition: str
    priority: Priority
    label: str
    inhibits: frozenset[str] = frozenset()  # MDC reference ids whose readings stop being the patient's


ECG_HR = "MDC_ECG_HEART_RATE"
SPO2 = "MDC_PULS_OXIM_SAT_O2"
PULSE_RATE = "MDC_PULS_OXIM_PULS_RATE"

# Priorities: an occluded or air-filled line stops a drug (noradrenaline) at once, hence high; a monitor
# that stopped reporting, or leads and probes off, blind the central station: medium; the rest, low.
TECHNICAL: Mapping[str, Technical] = {
    t.condition: t
    for t in (
        Technical("device_offline", "medium", "Device offline"),  # inhibits whatever that device measured
        Technical("lead_off", "medium", "ECG leads off", frozenset({ECG_HR})),
        Technical("probe_off", "medium", "SpO2 probe off", frozenset({SPO2, PULSE_RATE})),
        Technical("low_battery", "low", "Device battery low"),
        Technical("pump_occlusion", "high", "Infusion line occluded"),
        Technical("pump_air_in_line", "high", "Air in infusion line"),
        Technical("pump_end_of_infusion", "medium", "Infusion complete"),
        Technical("artifact", "low", "Signal artifact"),
    )
}

# A device status `conditions` entry -> the technical condition it raises.
STATUS_CONDITIONS: Mapping[str, str] = {
    "lead_off": "lead_off",
    "probe_off": "probe_off",
    "low_battery": "low_battery",
    "low_signal": "artifact",
    "sensor_fault": "artifact",
}
# A pump's `alarms` entry -> the technical condition it raises.
PUMP_ALARMS: Mapping[str, str] = {
    "occlusion": "pump_occlusion",
    "air_in_line": "pump_air_in_line",
    "end_of_infusion": "pump_end_of_infusion",
    "low_battery": "low_battery",
}
LOW_BATTERY = 0.15  # battery fraction below which a device without its own flag raises low_battery
LOW_BATTERY_CLEAR = 0.20  # and above which it clears (hysteresis: a battery hovering at 15 % does not flap)
ARTIFACT_RUN = 5  # artifact-flagged readings of one device ...
ARTIFACT_WINDOW_MS = 30_000  # ... within this window raise `artifact`; a window without any clears it


def status_conditions(conditions: Iterable[str], battery: float | None, was_low: bool) -> set[str]:
    """The technical conditions a device status message holds now."""
    out = {STATUS_CONDITIONS[c] for c in conditions if c in STATUS_CONDITIONS}
    low = battery is not None and (battery < LOW_BATTERY or (was_low and battery < LOW_BATTERY_CLEAR))
    if low and "charging" not in conditions:
        out.add("low_battery")
    return out


def pump_conditions(alarms: Iterable[str]) -> set[str]:
    """The technical conditions a pump status message holds now."""
    return {PUMP_ALARMS[a] for a in alarms if a in PUMP_ALARMS}
