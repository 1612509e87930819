"""The simulator's messages without a broker: determinism, scenario timelines, and contract payloads."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from devices.fleet import DeviceSpec, Fleet, SimDevice, plan_fleet
from devices.messages import DeviceModel, DispatchOrder, crew_schedule, messages_at, model_for, rfc3339
from devices.physiology import Physiology
from devices.route import distance_km
from devices.scenarios import HOME, SCENARIOS, get
from devices.simulator import parse_dispatch
from gateway.device import DeviceInfo

START = 1_795_428_000_000  # 2026-11-23T10:00:00Z
SEEDS = range(5)

# What the gateway lets each device type send (contract section 3, gateway KINDS_BY_TYPE).
KINDS_BY_TYPE = {
    "monitor": {"obs", "status"},
    "pump": {"pump", "status"},
    "ambulance": {"gps", "crew", "obs", "status"},
    "pendant": {"sos", "status", "gps"},
    "analyzer": {"lab", "status"},
}
CANONICAL_UNITS = {
    "MDC_ECG_HEART_RATE": "/min",
    "MDC_PULS_OXIM_PULS_RATE": "/min",
    "MDC_PULS_OXIM_SAT_O2": "%",
    "MDC_RESP_RATE": "/min",
    "MDC_TEMP_BODY": "Cel",
    "nibp_sys": "mm[Hg]",
    "nibp_dia": "mm[Hg]",
    "nibp_mean": "mm[Hg]",
}
UNIT_STATES = {
    "available",
    "dispatched",
    "en_route",
    "on_scene",
    "transporting",
    "at_hospital",
    "out_of_service",
}
CONDITIONS = {"lead_off", "probe_off", "sensor_fault", "low_signal", "low_battery", "charging"}
PUMP_ALARMS = {
    "occlusion",
    "air_in_line",
    "end_of_infusion",
    "near_end_of_infusion",
    "low_battery",
    "door_open",
}
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def device(dtype: str, scenario: str, did: str | None = None) -> SimDevice:
    did = did or f"{dtype}-1"
    patient = None if dtype == "ambulance" else "P-1"
    bed = "B-1" if dtype in ("monitor", "pump") else None
    return SimDevice(did, "s3cret", dtype, "mqtt", "default", "U", bed, patient, scenario)


def model(dtype: str, scenario: str, seed: int = 0) -> DeviceModel:
    return model_for(device(dtype, scenario), seed=seed, start_ms=START)


def run(m: DeviceModel, until_s: int, since_s: int = 0) -> Iterator[tuple[int, str, dict[str, Any]]]:
    for n in range(since_s, until_s):
        for kind, payload in messages_at(m, n * 1000):
            yield n, kind, payload


def obs(payload: dict[str, Any], code: str) -> Any:
    values = [i["value"] for i in payload["obs"] if i["code"] == code]
    return values[0] if values else None


def series(scenario: str, code: str, since_s: int, until_s: int, seed: int) -> list[tuple[int, Any]]:
    m = model("monitor", scenario, seed)
    return [
        (n, obs(p, code)) for n, k, p in run(m, until_s, since_s) if k == "obs" and obs(p, code) is not None
    ]


# --- determinism ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(KINDS_BY_TYPE))
def test_same_seed_gives_identical_messages(dtype: str) -> None:
    scenario = {"pump": "pump_occlusion", "ambulance": "sos_ambulance", "pendant": "sos_ambulance"}
    name = scenario.get(dtype, "hyperkalaemia" if dtype == "analyzer" else "sepsis")
    first = list(run(model(dtype, name, seed=7), 400))
    again = list(run(model(dtype, name, seed=7), 400))
    assert first and first == again


def test_another_seed_differs() -> None:
    a = [p["obs"] for _, k, p in run(model("monitor", "stable", seed=1), 120) if k == "obs"]
    b = [p["obs"] for _, k, p in run(model("monitor", "stable", seed=2), 120) if k == "obs"]
    assert a != b


def test_values_do_not_depend_on_what_was_asked_before() -> None:
    in_order = model("monitor", "sepsis", seed=3)
    sequential = {n: messages_at(in_order, n * 1000) for n in range(0, 1300)}
    jumping = model("monitor", "sepsis", seed=3)
    for n in (1299, 17, 900, 0, 601, 1200, 5):
        assert messages_at(jumping, n * 1000) == sequential[n]


def test_boot_changes_with_every_run_start_and_restart() -> None:
    d = device("monitor", "stable")
    boots = {
        model_for(d, seed=0, start_ms=START).boot,
        model_for(d, seed=0, start_ms=START + 1).boot,
        model_for(d, seed=0, start_ms=START, restarts=1).boot,
    }
    assert len(boots) == 3
    assert model_for(d, seed=0, start_ms=START).boot == model_for(d, seed=0, start_ms=START).boot


# --- scenario timelines (the tables in docs/SIMULATOR.md) -------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_desaturation_holds_spo2_at_or_below_80_then_recovers(seed: int) -> None:
    spo2 = dict(series("desaturation", "MDC_PULS_OXIM_SAT_O2", 0, 420, seed))
    assert all(spo2[n] >= 94 for n in range(0, 60))
    assert all(spo2[n] <= 80 for n in range(120, 240)), "sustained desaturation below 80 % for 2 min"
    assert min(spo2[n] for n in range(115, 245)) >= 75
    assert all(spo2[n] >= 94 for n in range(300, 420))


@pytest.mark.parametrize("seed", SEEDS)
def test_bradycardia_reaches_38(seed: int) -> None:
    hr = dict(series("bradycardia", "MDC_ECG_HEART_RATE", 0, 480, seed))
    hold = [hr[n] for n in range(180, 360)]
    assert max(hold) <= 46 and abs(sum(hold) / len(hold) - 38) <= 4
    assert all(60 <= hr[n] <= 80 for n in range(0, 60))
    assert all(hr[n] >= 60 for n in range(420, 480))


@pytest.mark.parametrize("seed", SEEDS)
def test_sepsis_deteriorates_over_30_minutes_and_confusion_at_40(seed: int) -> None:
    m = model("monitor", "sepsis", seed)
    msgs = list(run(m, 2460, 0))

    def mean(code: str, since: int, until: int) -> float:
        vals: list[float] = [
            obs(p, code) for n, k, p in msgs if k == "obs" and since <= n < until and obs(p, code) is not None
        ]
        return sum(vals) / len(vals)

    assert abs(mean("MDC_ECG_HEART_RATE", 0, 60) - 80) <= 6  # a minute is short for a 2-minute drift
    assert abs(mean("MDC_ECG_HEART_RATE", 1800, 2400) - 125) <= 4
    assert abs(mean("MDC_RESP_RATE", 1800, 2400) - 28) <= 2
    assert abs(mean("MDC_PULS_OXIM_SAT_O2", 1800, 2400) - 91) <= 1
    assert abs(mean("MDC_TEMP_BODY", 1800, 2400) - 39.2) <= 0.25
    late_sbp = [obs(p, "nibp_sys") for n, k, p in msgs if k == "obs" and n > 1830 and obs(p, "nibp_sys")]
    assert late_sbp and all(78 <= v <= 98 for v in late_sbp)
    acvpu = {n: obs(p, "acvpu") for n, k, p in msgs if k == "obs" and obs(p, "acvpu") is not None}
    assert set(v for n, v in acvpu.items() if n < 2400) == {"A"}
    assert acvpu[2400] == "C"


def test_nibp_comes_per_cuff_cycle_with_its_own_ts() -> None:
    nibp = [(n, i) for n, k, p in run(model("monitor", "stable"), 1900) if k == "obs" for i in p["obs"]]
    sys = [(n, i) for n, i in nibp if i["code"] == "nibp_sys"]
    assert [n for n, _ in sys] == [30, 930, 1830]
    assert [i["ts"] for _, i in sys] == [START, START + 900_000, START + 1_800_000]


@pytest.mark.parametrize("seed", SEEDS)
def test_artifact_bursts_spike_hr_and_flag_low_signal(seed: int) -> None:
    msgs = list(run(model("monitor", "artifact", seed), 320))
    hr = {n: obs(p, "MDC_ECG_HEART_RATE") for n, k, p in msgs if k == "obs"}
    for start in (60, 180, 300):
        assert {hr[n] for n in range(start, start + 10)} == {350, 0}
    assert all(40 <= hr[n] <= 150 for n in range(0, 60))
    status = {n: p["conditions"] for n, k, p in msgs if k == "status"}
    assert status[60] == ["low_signal"] and status[70] == []
    assert status[180] == ["low_signal"] and status[190] == []


@pytest.mark.parametrize("seed", SEEDS)
def test_lead_off_removes_hr_for_60_s(seed: int) -> None:
    msgs = list(run(model("monitor", "lead_off", seed), 240))
    has_hr = {n: obs(p, "MDC_ECG_HEART_RATE") is not None for n, k, p in msgs if k == "obs"}
    assert not any(has_hr[n] for n in range(120, 180))
    assert all(has_hr[n] for n in [*range(0, 120), *range(180, 240)])
    pulse = {n: obs(p, "MDC_PULS_OXIM_PULS_RATE") for n, k, p in msgs if k == "obs"}
    assert all(pulse[n] is not None for n in range(120, 180)), "the oximeter keeps reporting"
    status = {n: p["conditions"] for n, k, p in msgs if k == "status"}
    assert status[120] == ["lead_off"] and status[150] == ["lead_off"] and status[180] == []


def test_offline_sends_nothing_for_3_minutes() -> None:
    sent = {n for n, _, _ in run(model("monitor", "offline"), 360)}
    assert sent.isdisjoint(range(120, 300))
    assert {119, 300} <= sent


def test_pump_occlusion_alarms_and_stops_infusing() -> None:
    msgs = [(n, p) for n, k, p in run(model("pump", "pump_occlusion"), 300) if k == "pump"]
    by_n = dict(msgs)
    assert by_n[110]["state"] == "running" and by_n[110]["alarms"] == []
    during = [p for n, p in msgs if 120 <= n < 240]
    assert during and all(p["state"] == "alarm" and p["alarms"] == ["occlusion"] for p in during)
    assert len({p["infused_ml"] for p in during}) == 1, "nothing infuses through an occlusion"
    assert by_n[240]["state"] == "running" and by_n[240]["alarms"] == []
    assert by_n[250]["infused_ml"] > by_n[240]["infused_ml"]


def test_sos_press_then_ambulance_run_to_hospital() -> None:
    pendant = list(run(model("pendant", "sos_ambulance"), 120))
    sos = [(n, p) for n, k, p in pendant if k == "sos"]
    assert [(n, p["action"], p["note"]) for n, p in sos] == [(30, "press", "fall")]
    amb = model("ambulance", "sos_ambulance")
    msgs = list(run(amb, 1600))
    states = [(n, p["unit_state"]) for n, k, p in msgs if k == "crew"]
    assert [s for _, s in states] == [
        "available", "dispatched", "en_route", "on_scene", "transporting", "at_hospital", "available",
    ]  # fmt: skip
    at = dict((s, n) for n, s in reversed(states))
    assert at["dispatched"] == 60 and at["en_route"] == 90  # the times docs/SIMULATOR.md gives
    assert (at["on_scene"], at["transporting"], at["at_hospital"]) == (250, 550, 642)
    assert states[-1] == (1242, "available")
    gps = {n: p for n, k, p in msgs if k == "gps"}
    assert all(n % 2 == 0 for n in gps)
    on_scene = gps[at["on_scene"] + (at["on_scene"] % 2)]
    assert distance_km((on_scene["lat"], on_scene["lon"]), HOME) < 0.05 and on_scene["speed_kmh"] == 0
    assert gps[at["en_route"] + 20]["speed_kmh"] > 0
    assert distance_km((gps[120]["lat"], gps[120]["lon"]), HOME) < distance_km(
        (gps[90]["lat"], gps[90]["lon"]), HOME
    )


def test_dispatch_order_is_accepted_and_a_second_one_declined() -> None:
    amb = model("ambulance", "sos_ambulance")
    amb.orders.append(DispatchOrder(40, "I-17", HOME))
    amb.orders.append(DispatchOrder(100, "I-18", None))
    crew = [(n, p) for n, k, p in run(amb, 200) if k == "crew"]
    actions = [(n, p.get("action"), p.get("incident_id")) for n, p in crew if "action" in p]
    assert actions == [(40, "accept", "I-17"), (100, "decline", "I-18")]
    assert (41, "dispatched") in [(n, p.get("unit_state")) for n, p in crew]


def test_order_during_a_scripted_run_names_its_incident() -> None:
    amb = model("ambulance", "sos_ambulance")
    amb.orders.append(DispatchOrder(75, "I-20"))
    _, runs = crew_schedule(amb)
    assert len(runs) == 1 and runs[0].incident_id == "I-20" and runs[0].dispatched_s == 60


def test_analyzer_reports_critical_potassium() -> None:
    labs = [(n, p) for n, k, p in run(model("analyzer", "hyperkalaemia"), 120) if k == "lab"]
    assert [n for n, _ in labs] == [20, 60]
    p = labs[1][1]
    assert p["patient_id"] == "P-1"
    assert p["results"] == [
        {"loinc": "2823-3", "value": 6.8, "unit": "mmol/L", "flag": "HH", "status": "final"}
    ]


# --- contract section 3 ------------------------------------------------------------------------------------


def check_payload(dtype: str, kind: str, p: dict[str, Any]) -> None:
    """Raise AssertionError unless `p` is a contract section 3 payload of `kind` for a `dtype` device."""
    assert kind in KINDS_BY_TYPE[dtype], (dtype, kind)
    assert (
        isinstance(p["seq"], int)
        and p["seq"] >= 0
        and isinstance(p["boot"], str)
        and 0 < len(p["boot"]) <= 64
    )
    assert TS.match(p["ts"]) and datetime.fromisoformat(p["ts"]).utcoffset() is not None
    body = {k: v for k, v in p.items() if k not in ("seq", "boot", "ts")}
    if kind == "obs":
        assert set(body) == {"obs"} and body["obs"]
        for item in body["obs"]:
            code, value = item["code"], item["value"]
            assert set(item) <= {"code", "value", "unit", "ts"}
            if code == "acvpu":
                assert value in ("A", "C", "V", "P", "U")
            elif code == "o2_supplement":
                assert value in (0, 1)
            else:
                assert item["unit"] == CANONICAL_UNITS[code]
                assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                assert value >= 0 and (code != "MDC_PULS_OXIM_SAT_O2" or value <= 100)
            if "ts" in item:
                assert isinstance(item["ts"], int)
    elif kind == "status":
        assert set(body) == {"battery", "conditions"} and 0 <= body["battery"] <= 1
        assert set(body["conditions"]) <= CONDITIONS
    elif kind == "pump":
        assert set(body) == {"state", "drug", "rate_ml_h", "vtbi_ml", "infused_ml", "alarms"}
        assert body["state"] in ("running", "paused", "stopped", "standby", "completed", "alarm")
        assert body["rate_ml_h"] >= 0 and 0 <= body["infused_ml"] <= body["vtbi_ml"]
        assert set(body["alarms"]) <= PUMP_ALARMS
    elif kind == "gps":
        assert set(body) == {"lat", "lon", "speed_kmh", "heading"}
        assert -90 <= body["lat"] <= 90 and -180 <= body["lon"] <= 180
        assert body["speed_kmh"] >= 0 and 0 <= body["heading"] <= 360
    elif kind == "crew":
        if "unit_state" in body:
            assert set(body) == {"unit_state"} and body["unit_state"] in UNIT_STATES
        else:
            assert set(body) == {"action", "incident_id"} and body["action"] in ("accept", "decline")
    elif kind == "sos":
        assert body["action"] in ("press", "cancel") and set(body) <= {"action", "lat", "lon", "note"}
    elif kind == "lab":
        assert set(body) == {"patient_id", "order_id", "ordering_provider", "results"}
        for r in body["results"]:
            assert set(r) == {"loinc", "value", "unit", "flag", "status"} and re.match(
                r"^\d{1,7}-\d$", r["loinc"]
            )
            assert r["flag"] in ("L", "H", "LL", "HH", "N") and r["status"] in (
                "preliminary",
                "final",
                "corrected",
            )


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_and_device_sends_contract_payloads(scenario: str) -> None:
    length = int(get(scenario).length_s) + 120
    for dtype in KINDS_BY_TYPE:
        m = model(dtype, scenario, seed=11)
        last_seq: dict[str, int] = {}
        for n, kind, p in run(m, length):
            check_payload(dtype, kind, p)
            assert p["seq"] > last_seq.get(kind, -1), f"{dtype} {kind} seq must increase"
            last_seq[kind] = p["seq"]
            assert p["boot"] == m.boot and p["ts"] == rfc3339(START + n * 1000)
        if dtype != "ambulance" or scenario == "sos_ambulance":
            assert last_seq, f"{dtype} sent nothing in {scenario}"


def test_periodic_intervals() -> None:
    counts: dict[tuple[str, str], int] = {}
    for dtype in KINDS_BY_TYPE:
        for _, kind, _ in run(model(dtype, "stable"), 120):
            counts[(dtype, kind)] = counts.get((dtype, kind), 0) + 1
    assert counts[("monitor", "obs")] == 120 and counts[("monitor", "status")] == 4
    assert counts[("pump", "pump")] == 12 and counts[("ambulance", "gps")] == 60
    assert counts[("pendant", "status")] == 2


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339(START + 120) == "2026-11-23T10:00:00.120Z"


# --- physiology, fleet, commands ---------------------------------------------------------------------------


def test_physiology_rounds_as_a_monitor_shows() -> None:
    p = Physiology(5, get("sepsis"))
    for n in (0, 100, 1000):
        v = p.vitals(n)
        assert v.hr == int(v.hr or 0) and v.rr == int(v.rr or 0) and v.spo2 == int(v.spo2)
        assert v.temp == round(v.temp, 1)


def test_plan_fleet_builds_a_ward_without_secrets() -> None:
    specs = plan_fleet(9, "mix", seed=4)
    types = [s.type for s in specs]
    assert types.count("monitor") == 9 and 1 <= types.count("pump") <= 9
    assert types.count("ambulance") == types.count("pendant") == types.count("analyzer") == 1
    assert "secret" not in {f.name for f in fields(DeviceSpec)}
    monitors = {s.scenario for s in specs if s.type == "monitor"}
    assert {"stable", "sepsis", "desaturation", "bradycardia", "artifact", "lead_off", "offline"} <= monitors
    assert "pump_occlusion" in {s.scenario for s in specs if s.type == "pump"}
    assert len({s.id for s in specs}) == len(specs)
    assert plan_fleet(9, "mix", seed=4) == specs
    assert [s.scenario for s in plan_fleet(9, "mix", seed=5) if s.type == "monitor"] != [
        s.scenario for s in specs if s.type == "monitor"
    ]
    assert {s.scenario for s in plan_fleet(3, "desaturation")} == {"desaturation"}


def test_fleet_round_trips_through_json(tmp_path: Path) -> None:
    specs = plan_fleet(2, seed=1)
    fleet = Fleet.from_specs(specs, {s.id: f"secret-{s.id}" for s in specs})
    fleet.save(tmp_path / "fleet.json")
    assert Fleet.load(tmp_path / "fleet.json") == fleet


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"devices": [{"id": "x"}]}',
        '{"devices": [{"id": "x", "secret": "s", "type": "toaster"}]}',
        '{"devices": [{"id": "x", "secret": "s", "type": "monitor", "scenario": "nope"}]}',
        '{"devices": [{"id": "x", "secret": "s", "type": "monitor", "colour": "red"}]}',
    ],
)
def test_bad_fleet_files_say_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        Fleet.from_json(text)


def test_parse_dispatch() -> None:
    order = parse_dispatch(b'{"type": "dispatch", "incident_id": "I-17", "lat": 51.5, "lon": -0.12}', 42)
    assert order == DispatchOrder(42, "I-17", (51.5, -0.12))
    assert parse_dispatch(b'{"action": "dispatch", "incident_id": "I-3"}', 1) == DispatchOrder(1, "I-3", None)
    for bad in (b"nope", b"[]", b'{"type": "dispatch"}', b'{"type": "reboot", "incident_id": "I-1"}'):
        assert parse_dispatch(bad, 1) is None


def test_the_gateway_validator_accepts_every_message() -> None:
    """Cross-check with the hub's own edge validation: nothing dead-lettered, only HR 350 flagged."""
    validation = pytest.importorskip("streams.validation")
    flagged: set[tuple[str, float]] = set()
    for scenario in sorted(SCENARIOS):
        for dtype in sorted(KINDS_BY_TYPE):
            m = model(dtype, scenario, seed=1)
            if dtype == "ambulance":
                m.orders += [DispatchOrder(40, "I-1"), DispatchOrder(100, "I-2")]
            d = m.device
            info = DeviceInfo(d.id, dtype, d.site, d.unit, d.bed, d.patient, allow_plain_coap=False)
            for n, kind, p in run(m, int(get(scenario).length_s) + 60):
                parsed = validation.parse_message(
                    json.dumps(p).encode(),
                    transport="mqtt",
                    device=info,
                    kind=kind,
                    received_at=START + n * 1000,
                )
                assert parsed.outcome.ok and not parsed.deadletters, (
                    scenario,
                    dtype,
                    kind,
                    parsed.deadletters,
                )
                for item in getattr(parsed.event, "items", ()):
                    flagged |= {(f, item.value) for f in item.flags}
    assert flagged == {("artifact", 350)}
