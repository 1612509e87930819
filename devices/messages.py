"""Device payloads (contract section 3) as a pure function of a device model and a scenario second.

`seq` is the device's second since boot plus one: it increases per (device, kind) because a device sends
at most one message of a kind per second, and it stays the same when a message is recomputed or resent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from devices.fleet import SimDevice
from devices.physiology import NIBP_DURATION_S, Physiology, half_up, uniform
from devices.profiles import NEWS2_INPUTS_EVERY_S, PROFILES, TEMP_EVERY_S
from devices.route import Run, fix_at, plan_run
from devices.scenarios import (
    ARTIFACT,
    HOME,
    LEAD_OFF,
    OCCLUSION,
    OFFLINE,
    STATION,
    WINDOW_DEVICE,
    LatLon,
    Scenario,
    get,
    step_at,
)

Message = tuple[str, dict[str, Any]]  # (kind, payload)

# (drug, rate ml/h, volume to be infused ml): a pump's infusion is picked by seed.
INFUSIONS = (
    ("noradrenaline", 5.0, 50.0),
    ("propofol", 12.0, 50.0),
    ("heparin", 2.0, 50.0),
    ("saline", 83.0, 1000.0),
)


@dataclass(frozen=True, slots=True)
class DispatchOrder:
    """A dispatch received on `vigil/v1/{id}/cmd`, stamped with the scenario second it arrived in."""

    received_s: int
    incident_id: str
    scene: LatLon | None = None


@dataclass(slots=True)
class DeviceModel:
    """Everything a device's messages depend on; `orders` grows as the hub sends dispatches."""

    device: SimDevice
    scenario: Scenario
    seed: int
    start_ms: int
    boot: str
    physiology: Physiology | None
    orders: list[DispatchOrder] = field(default_factory=list)
    _crew: tuple[int, list[tuple[int, dict[str, Any]]], tuple[Run, ...]] | None = None


def derive_seed(seed: int, key: str) -> int:
    """A sub-seed for one patient or device, so devices do not share noise."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "big")


def boot_id(device_id: str, seed: int, start_ms: int, restarts: int = 0) -> str:
    """The `boot` string: new at every run start or restart, so new seqs are never taken for duplicates."""
    return hashlib.blake2b(f"{device_id}/{seed}/{start_ms}/{restarts}".encode(), digest_size=4).hexdigest()


def model_for(device: SimDevice, *, seed: int, start_ms: int, restarts: int = 0) -> DeviceModel:
    """The model of one device; a monitor's patient model is seeded by its patient (else bed, else id)."""
    scenario = get(device.scenario)
    physiology = None
    if device.type == "monitor":
        physiology = Physiology(derive_seed(seed, device.patient or device.bed or device.id), scenario)
    return DeviceModel(
        device, scenario, seed, start_ms, boot_id(device.id, seed, start_ms, restarts), physiology
    )


def rfc3339(ms: int) -> str:
    """UTC with milliseconds, as `2026-11-23T10:00:00.120Z`."""
    return f"{datetime.fromtimestamp(ms // 1000, UTC):%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def messages_at(model: DeviceModel, t_ms: int) -> list[Message]:
    """The messages a device sends at scenario time `t_ms` (whole seconds; other times send nothing)."""
    if t_ms < 0 or t_ms % 1000:
        return []
    n = t_ms // 1000
    scenario, dtype = model.scenario, model.device.type
    if WINDOW_DEVICE[OFFLINE] == dtype and scenario.window(OFFLINE, n) is not None:
        return []
    head: dict[str, Any] = {"seq": n + 1, "boot": model.boot, "ts": rfc3339(model.start_ms + t_ms)}
    if dtype == "monitor":
        body = _monitor(model, n)
    elif dtype == "pump":
        body = _pump(model, n)
    elif dtype == "ambulance":
        body = _ambulance(model, n)
    elif dtype == "pendant":
        body = _pendant(model, n)
    else:
        body = _analyzer(model, n)
    return [(kind, head | payload) for kind, payload in body]


def _edge(scenario: Scenario, what: str, n: int) -> bool:
    """A window of this kind starts or ends at second n: devices report state changes at once."""
    return any(w.what == what and n in (w.start_s, w.end_s) for w in scenario.windows)


def _monitor(model: DeviceModel, n: int) -> list[Message]:
    assert model.physiology is not None
    scenario, phys = model.scenario, model.physiology
    lead_off = scenario.window(LEAD_OFF, n) is not None
    v = phys.vitals(n, lead_off=lead_off)
    items: list[dict[str, Any]] = []
    if v.hr is not None:
        items.append({"code": "MDC_ECG_HEART_RATE", "value": int(v.hr), "unit": "/min"})
    items.append({"code": "MDC_PULS_OXIM_PULS_RATE", "value": int(v.pr), "unit": "/min"})
    items.append({"code": "MDC_PULS_OXIM_SAT_O2", "value": int(v.spo2), "unit": "%"})
    if v.rr is not None:
        items.append({"code": "MDC_RESP_RATE", "value": int(v.rr), "unit": "/min"})
    if n % TEMP_EVERY_S == 0:
        items.append({"code": "MDC_TEMP_BODY", "value": v.temp, "unit": "Cel"})
    changed = n > 0 and any(
        step_at(steps, n, "") != step_at(steps, n - 1, "") for steps in scenario.states.values()
    )
    if n % NEWS2_INPUTS_EVERY_S == 0 or changed:
        items.append({"code": "acvpu", "value": v.acvpu})
        items.append({"code": "o2_supplement", "value": v.o2_supplement})
    cycle = int(scenario.nibp_every_s)
    if n >= NIBP_DURATION_S and (n - NIBP_DURATION_S) % cycle == 0:
        # The reading is published when the cuff deflates, stamped with the time the cuff started.
        bp = phys.nibp(n - NIBP_DURATION_S)
        ts = model.start_ms + bp.started_s * 1000
        items += [
            {"code": "nibp_sys", "value": int(bp.sys), "unit": "mm[Hg]", "ts": ts},
            {"code": "nibp_dia", "value": int(bp.dia), "unit": "mm[Hg]", "ts": ts},
            {"code": "nibp_mean", "value": int(bp.mean), "unit": "mm[Hg]", "ts": ts},
        ]
    out: list[Message] = [("obs", {"obs": items})]
    if PROFILES["monitor"].due("status", n) or _edge(scenario, LEAD_OFF, n) or _edge(scenario, ARTIFACT, n):
        conditions = []
        if lead_off:
            conditions.append("lead_off")
        if v.artifact:
            conditions.append("low_signal")  # the contract's condition for a poor signal, here from motion
        out.append(("status", {"battery": 1.0, "conditions": conditions}))
    return out


def _pump(model: DeviceModel, n: int) -> list[Message]:
    scenario, seed = model.scenario, derive_seed(model.seed, model.device.id)
    out: list[Message] = []
    if PROFILES["pump"].due("pump", n) or _edge(scenario, OCCLUSION, n):
        drug, rate, vtbi = INFUSIONS[int(uniform(seed, "pump/drug") * len(INFUSIONS))]
        stopped = sum(max(0.0, min(n, w.end_s) - w.start_s) for w in scenario.windows if w.what == OCCLUSION)
        infused0 = half_up(uniform(seed, "pump/infused") * vtbi * 0.4, 0.1)
        infused = min(vtbi, infused0 + rate * (n - stopped) / 3600.0)
        state, alarms = "running", []
        if scenario.window(OCCLUSION, n) is not None:
            state, alarms = "alarm", ["occlusion"]
        elif infused >= vtbi:
            state, alarms = "completed", ["end_of_infusion"]
        out.append(
            (
                "pump",
                {
                    "state": state,
                    "drug": drug,
                    "rate_ml_h": rate,
                    "vtbi_ml": vtbi,
                    "infused_ml": round(infused, 2),
                    "alarms": alarms,
                },
            )
        )
    if PROFILES["pump"].due("status", n):
        out.append(("status", {"battery": 1.0, "conditions": []}))
    return out


def crew_schedule(model: DeviceModel) -> tuple[list[tuple[int, dict[str, Any]]], tuple[Run, ...]]:
    """The ambulance's crew messages (second, payload) and runs, from the script and the orders received.

    An order while available is accepted and starts a run; one while on a scripted run (the phone call for
    the same SOS) is accepted and names that run's incident; one while on another incident is declined.
    """
    if model._crew is not None and model._crew[0] == len(model.orders):
        return model._crew[1], model._crew[2]
    sos = model.scenario.sos
    scene_default = sos.home if sos else HOME
    station, hospital = (sos.station, sos.hospital) if sos else (STATION, HOME)
    events: list[tuple[int, dict[str, Any]]] = [(0, {"unit_state": "available"})]
    runs: list[Run] = []
    pending: list[tuple[int, str | None, LatLon | None]] = sorted(
        [(o.received_s, o.incident_id, o.scene) for o in model.orders], key=lambda o: o[0]
    )
    scripted = int(sos.dispatch_at_s) if sos else None
    for received, incident, scene in pending:
        if scripted is not None and scripted < received and not runs:
            runs.append(plan_run(scripted, None, station, scene_default, hospital))
        busy = runs and received < runs[-1].states[-1][0]
        if busy and runs[-1].incident_id is None:
            events.append((received, {"action": "accept", "incident_id": incident}))
            last = runs[-1]
            runs[-1] = Run(last.dispatched_s, incident, last.states, last.legs)
        elif busy:
            events.append((received, {"action": "decline", "incident_id": incident}))
        else:
            events.append((received, {"action": "accept", "incident_id": incident}))
            start = runs[-1].legs[1].end if runs else station
            runs.append(plan_run(received + 1, incident, start, scene or scene_default, hospital))
    if scripted is not None and not runs:
        runs.append(plan_run(scripted, None, station, scene_default, hospital))
    for run in runs:
        events += [(int(t), {"unit_state": state}) for t, state in run.states]
    # One crew message per second keeps seq increasing: a collision moves the later one on.
    events.sort(key=lambda e: e[0])
    placed: list[tuple[int, dict[str, Any]]] = []
    for t, payload in events:
        placed.append((max(t, placed[-1][0] + 1) if placed else t, payload))
    model._crew = (len(model.orders), placed, tuple(runs))
    return placed, tuple(runs)


def _ambulance(model: DeviceModel, n: int) -> list[Message]:
    events, runs = crew_schedule(model)
    out: list[Message] = [("crew", payload) for t, payload in events if t == n]
    if PROFILES["ambulance"].due("gps", n):
        sos = model.scenario.sos
        legs = [leg for run in runs for leg in run.legs]
        fix = fix_at(legs, sos.station if sos else STATION, n)
        out.append(
            ("gps", {"lat": fix.lat, "lon": fix.lon, "speed_kmh": fix.speed_kmh, "heading": fix.heading})
        )
    if PROFILES["ambulance"].due("status", n):
        out.append(("status", {"battery": 1.0, "conditions": []}))
    return out


def _pendant(model: DeviceModel, n: int) -> list[Message]:
    out: list[Message] = []
    sos = model.scenario.sos
    if sos is not None and n == int(sos.press_at_s):
        lat, lon = sos.home
        out.append(("sos", {"action": "press", "lat": lat, "lon": lon, "note": sos.note}))
        out.append(("gps", {"lat": lat, "lon": lon, "speed_kmh": 0.0, "heading": 0.0}))
    if PROFILES["pendant"].due("status", n):
        # A coin cell: about 0.1 % a day, starting somewhere between 60 and 95 %.
        start = 0.6 + 0.35 * uniform(derive_seed(model.seed, model.device.id), "battery")
        out.append(("status", {"battery": round(start - n / 86_400_000.0, 3), "conditions": []}))
    return out


def _analyzer(model: DeviceModel, n: int) -> list[Message]:
    out: list[Message] = []
    patient = model.device.patient
    for lab in model.scenario.labs:
        if patient is not None and n == int(lab.at_s):
            result = {
                "loinc": lab.loinc,
                "value": lab.value,
                "unit": lab.unit,
                "flag": lab.flag,
                "status": lab.status,
            }
            out.append(
                (
                    "lab",
                    {
                        "patient_id": patient,
                        "order_id": lab.order_id,
                        "ordering_provider": lab.ordering_provider,
                        "results": [result],
                    },
                )
            )
    if PROFILES["analyzer"].due("status", n):
        out.append(("status", {"battery": 1.0, "conditions": []}))
    return out
