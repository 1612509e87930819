"""Per-message validation (contract section 3): what is accepted, canonicalised, flagged and dead-lettered."""

from __future__ import annotations

import base64
import math
from datetime import UTC, datetime
from typing import Any

import cbor2
import orjson
import pytest

from gateway.device import DeviceInfo
from gateway.outcome import Outcome
from streams.schemas import (
    DEVICE_TYPES,
    FLAG_ARTIFACT,
    FLAG_FUTURE_TS,
    KINDS,
    CrewMessage,
    DeviceStatus,
    GpsFix,
    LabReport,
    Observations,
    PumpStatus,
    Sos,
    decode,
    encode,
)
from streams.validation import KINDS_BY_TYPE, Limits, Parsed, deadletter, excerpt, parse_message

T0 = 1_795_428_000_000  # 2026-11-23T10:00:00Z
RX = T0 + 500
TS = "2026-11-23T10:00:00.120Z"
UNIT_STATES = [
    "available",
    "dispatched",
    "en_route",
    "on_scene",
    "transporting",
    "at_hospital",
    "out_of_service",
]


def device(type_: str = "monitor", patient: str | None = "P-1") -> DeviceInfo:
    return DeviceInfo(f"{type_}-1", type_, "site-a", "icu", "bed-3", patient, False)


MONITOR = device("monitor")
PUMP = device("pump")
AMBULANCE = device("ambulance")
PENDANT = device("pendant")
ANALYZER = device("analyzer", patient=None)


def parse(
    body: Any,
    kind: str = "obs",
    dev: DeviceInfo = MONITOR,
    *,
    fmt: str = "json",
    received_at: int = RX,
    **kw: Any,
) -> Parsed:
    encoder = orjson.dumps if fmt == "json" else cbor2.dumps
    payload = body if isinstance(body, bytes) else encoder(body)
    return parse_message(payload, transport="mqtt", device=dev, kind=kind, received_at=received_at, **kw)


def obs(*items: object, **envelope: Any) -> dict[str, Any]:
    return {"seq": 1, "ts": TS, **envelope, "obs": list(items)}


def hr(value: object, **more: Any) -> dict[str, Any]:
    return {"code": "hr", "value": value, **more}


def observations(p: Parsed) -> Observations:
    assert isinstance(p.event, Observations), p.deadletters
    return p.event


def refused(p: Parsed, outcome: Outcome, reason: str) -> str:
    """The message was refused as a whole with this outcome and reason; answers the detail."""
    assert p.outcome is outcome
    assert p.event is None
    assert len(p.deadletters) == 1
    dl = p.deadletters[0]
    assert dl.reason == reason
    assert dl.received_at == RX
    return dl.detail


def reasons(p: Parsed) -> list[str]:
    return [d.reason for d in p.deadletters]


# --- the contract's sample payloads -------------------------------------------------------------------------

CONTRACT_OBS = {
    "seq": 1042,
    "boot": "b7",
    "ts": TS,
    "obs": [
        {"code": "MDC_ECG_HEART_RATE", "value": 72, "unit": "/min"},
        {"code": "spo2", "value": 97},
        {"code": "nibp_sys", "value": 118, "ts": 1795428000000},
    ],
}
LAB_RESULT = {"loinc": "2823-3", "value": 6.8, "unit": "mmol/L", "flag": "HH", "status": "final"}
CONTRACT_SAMPLES = [
    ("status", "monitor", {"battery": 0.83, "conditions": ["lead_off"]}, DeviceStatus),
    (
        "pump",
        "pump",
        {
            "state": "running",
            "drug": "noradrenaline",
            "rate_ml_h": 5.0,
            "vtbi_ml": 50,
            "infused_ml": 12.5,
            "alarms": ["occlusion"],
        },
        PumpStatus,
    ),
    ("gps", "ambulance", {"lat": 51.5072, "lon": -0.1276, "speed_kmh": 42, "heading": 90}, GpsFix),
    ("crew", "ambulance", {"unit_state": "available"}, CrewMessage),
    ("crew", "ambulance", {"action": "accept", "incident_id": "I-17"}, CrewMessage),
    ("crew", "ambulance", {"action": "decline", "incident_id": "I-17"}, CrewMessage),
    ("sos", "pendant", {"action": "press", "lat": 51.50, "lon": -0.12, "note": "fall"}, Sos),
    ("sos", "pendant", {"action": "cancel"}, Sos),
    (
        "lab",
        "analyzer",
        {"patient_id": "P-1", "order_id": "O-9", "ordering_provider": "DR-7", "results": [LAB_RESULT]},
        LabReport,
    ),
]


def test_contract_obs_sample_is_accepted_and_canonicalised() -> None:
    p = parse(CONTRACT_OBS)
    assert p.outcome is Outcome.ACCEPTED and p.deadletters == ()
    ev = observations(p)
    m = ev.meta
    assert m.event_id == "monitor-1/obs/b7/1042"
    assert (m.device_id, m.kind, m.transport, m.ts, m.received_at) == (
        "monitor-1",
        "obs",
        "mqtt",
        T0 + 120,
        RX,
    )
    assert (m.site_id, m.unit_id, m.bed_id, m.patient_id) == ("site-a", "icu", "bed-3", "P-1")
    assert (m.boot, m.seq) == ("b7", 1042)
    assert [(i.code, i.value, i.unit, i.ts, i.flags) for i in ev.items] == [
        ("MDC_ECG_HEART_RATE", 72.0, "/min", T0 + 120, ()),
        ("MDC_PULS_OXIM_SAT_O2", 97.0, "%", T0 + 120, ()),
        ("MDC_PRESS_BLD_NONINV_SYS", 118.0, "mm[Hg]", T0, ()),
    ]


@pytest.mark.parametrize(("kind", "dev_type", "fields", "cls"), CONTRACT_SAMPLES)
@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_contract_samples_are_accepted(
    kind: str, dev_type: str, fields: dict[str, Any], cls: type, fmt: str
) -> None:
    p = parse({"seq": 5, "ts": TS, **fields}, kind, device(dev_type), fmt=fmt)
    assert p.outcome is Outcome.ACCEPTED
    assert p.deadletters == ()
    ev = p.event
    assert isinstance(ev, cls)
    assert isinstance(ev, (DeviceStatus, PumpStatus, GpsFix, CrewMessage, Sos, LabReport))
    assert ev.meta.event_id == f"{dev_type}-1/{kind}/-/5"
    assert ev.meta.ts == T0 + 120
    assert decode(encode(ev)) == ev  # it survives the bus


def test_contract_sample_fields_are_kept() -> None:
    pump = parse(CONTRACT_SAMPLES[1][2], "pump", PUMP).event
    assert isinstance(pump, PumpStatus)
    assert pump == PumpStatus(pump.meta, "running", "noradrenaline", 5.0, 50.0, 12.5, ("occlusion",))
    result = {"loinc": "10839-9", "value": "<0.01", "unit": "ng/mL", "status": "preliminary"}
    lab = parse({"patient_id": "P-2", "order_id": "O-9", "results": [result]}, "lab", ANALYZER).event
    assert isinstance(lab, LabReport)
    assert lab.meta.patient_id == "P-2"  # the lab message names its patient
    assert (lab.order_id, lab.ordering_provider) == ("O-9", None)
    r = lab.results[0]
    assert (r.loinc, r.value, r.unit, r.flag, r.status, r.ts) == (
        "10839-9",
        "<0.01",
        "ng/mL",
        None,
        "preliminary",
        RX,
    )


# --- values: ranges, artifacts, NaN, bool -------------------------------------------------------------------


@pytest.mark.parametrize("value", [130, -1, 100.5])
def test_spo2_outside_0_100_is_dead_lettered_value_range(value: float) -> None:
    p = parse(obs(hr(80), {"code": "spo2", "value": value}))
    assert p.outcome is Outcome.ACCEPTED  # the envelope is fine: the device must not retry forever
    assert [i.code for i in observations(p).items] == ["MDC_ECG_HEART_RATE"]
    assert reasons(p) == ["value_range"]
    assert "obs[1].value" in p.deadletters[0].detail
    assert orjson.loads(p.deadletters[0].payload or "") == {"code": "spo2", "value": value}


def test_hr_350_is_stored_flagged_artifact() -> None:
    (item,) = observations(parse(obs(hr(350)))).items
    assert item.value == 350.0 and item.flags == (FLAG_ARTIFACT,)


def test_hr_0_and_rr_0_are_real_readings() -> None:
    p = parse(obs(hr(0), {"code": "rr", "value": 0}))
    assert p.deadletters == ()
    assert [(i.value, i.flags) for i in observations(p).items] == [(0.0, ()), (0.0, ())]


def test_temperature_outside_physiology_is_artifact() -> None:
    (item,) = observations(parse(obs({"code": "temp", "value": 15.0}))).items
    assert item.flags == (FLAG_ARTIFACT,)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_in_cbor_are_value_range(value: float) -> None:
    p = parse(obs({"code": "spo2", "value": value}, hr(60)), fmt="cbor")
    assert reasons(p) == ["value_range"]
    assert [i.code for i in observations(p).items] == ["MDC_ECG_HEART_RATE"]


def test_nan_literal_in_json_is_malformed() -> None:
    p = parse(b'{"seq": 1, "obs": [{"code": "hr", "value": NaN}]}')
    assert "JSON" in refused(p, Outcome.MALFORMED, "malformed")


def test_huge_cbor_integer_is_value_range() -> None:
    p = parse(obs(hr(10**400)), fmt="cbor")
    assert reasons(p) == ["value_range"] and p.event is None


@pytest.mark.parametrize("value", [True, False, "72", None, [72], {"v": 72}])
def test_non_numbers_and_bool_as_value_are_schema(value: object) -> None:
    p = parse(obs(hr(value)))
    assert p.outcome is Outcome.ACCEPTED and p.event is None
    assert reasons(p) == ["schema"]
    assert "obs[0].value" in p.deadletters[0].detail


def test_unknown_code_is_dead_lettered() -> None:
    p = parse(obs({"code": "MDC_ECG_HEART_RATE_X", "value": 1}, {"code": 150456, "value": 95}))
    assert reasons(p) == ["unknown_code"]
    assert observations(p).items[0].code == "MDC_PULS_OXIM_SAT_O2"


@pytest.mark.parametrize("code", [147842.0, True, None, ["hr"]])
def test_code_of_wrong_type_is_schema(code: object) -> None:
    assert reasons(parse(obs({"code": code, "value": 60}))) == ["schema"]


def test_numeric_string_code_resolves() -> None:
    (item,) = observations(parse(obs({"code": "151562", "value": 14}))).items
    assert item.code == "MDC_RESP_RATE"


def test_o2_supplement_and_acvpu() -> None:
    p = parse(obs({"code": "o2_supplement", "value": 1}, {"code": "acvpu", "value": "V"}))
    items = [(i.code, i.value, i.unit) for i in observations(p).items]
    assert items == [("o2_supplement", 1.0, "1"), ("acvpu", "V", "1")]


@pytest.mark.parametrize(
    "item",
    [
        {"code": "o2_supplement", "value": 0.5},
        {"code": "o2_supplement", "value": 2},
        {"code": "acvpu", "value": "X"},
        {"code": "acvpu", "value": "a"},
        {"code": "acvpu", "value": 1},
    ],
)
def test_o2_supplement_and_acvpu_out_of_range(item: dict[str, Any]) -> None:
    assert reasons(parse(obs(item))) == ["value_range"]


def test_every_refused_item_gets_its_own_dead_letter_and_no_event_when_none_survive() -> None:
    p = parse(obs({"code": "spo2", "value": 130}, {"code": "nope", "value": 1}, hr("x"), 7))
    assert p.outcome is Outcome.ACCEPTED and p.event is None
    assert reasons(p) == ["value_range", "unknown_code", "schema", "schema"]
    assert len({d.id for d in p.deadletters}) == 4


# --- units --------------------------------------------------------------------------------------------------


def test_fahrenheit_is_converted_before_any_rule() -> None:
    (item,) = observations(parse(obs({"code": "temp", "value": 98.6, "unit": "[degF]"}))).items
    assert item.unit == "Cel" and item.value == pytest.approx(37.0) and item.flags == ()
    (item,) = observations(parse(obs({"code": "temp", "value": 115, "unit": "[degF]"}))).items
    assert item.value == pytest.approx(46.111, abs=1e-3) and item.flags == (FLAG_ARTIFACT,)  # > 45 Cel
    assert reasons(parse(obs({"code": "temp", "value": 212, "unit": "[degF]"}))) == ["value_range"]  # 100 Cel


def test_kpa_and_fraction_are_converted() -> None:
    (item,) = observations(parse(obs({"code": "nibp_sys", "value": 16, "unit": "kPa"}))).items
    assert (item.unit, item.flags) == ("mm[Hg]", ())
    assert item.value == pytest.approx(120.0099, abs=1e-4)
    (item,) = observations(parse(obs({"code": "spo2", "value": 0.97, "unit": "1"}))).items
    assert item.unit == "%" and item.value == pytest.approx(97.0)


def test_incompatible_unit_is_dead_lettered_unit() -> None:
    p = parse(obs(hr(72, unit="mm[Hg]"), {"code": "rr", "value": 12, "unit": "{breaths}/min"}))
    assert reasons(p) == ["unit"]
    assert observations(p).items[0].code == "MDC_RESP_RATE"
    assert reasons(parse(obs(hr(72, unit=5)))) == ["schema"]
    assert reasons(parse(obs({"code": "acvpu", "value": "A", "unit": "%"}))) == ["unit"]


# --- time ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "ms"),
    [
        ("2026-11-23T10:00:00Z", T0),
        ("2026-11-23T10:00:00.120Z", T0 + 120),
        ("2026-11-23T12:00:00.5+02:00", T0 + 500),
        ("2026-11-23T05:00:00-05:00", T0),
        ("2026-11-23T10:00:00.000999Z", T0),
        (T0 - 1, T0 - 1),
    ],
)
def test_ts_rfc3339_with_offset_or_epoch_ms(ts: object, ms: int) -> None:
    assert observations(parse(obs(hr(60), ts=ts))).meta.ts == ms


def test_absent_ts_means_received_at() -> None:
    ev = observations(parse({"seq": 1, "obs": [hr(60)]}))
    assert ev.meta.ts == RX and ev.items[0].ts == RX


@pytest.mark.parametrize(
    "ts", ["2026-11-23T10:00:00", "2026-11-23", "yesterday", "", TS + " " * 40, 1.5e12, True, [], {}]
)
def test_naive_or_bad_ts_is_schema(ts: object) -> None:
    assert "ts" in refused(parse(obs(hr(60), ts=ts)), Outcome.SCHEMA, "schema")


def test_naive_item_ts_refuses_only_the_item() -> None:
    p = parse(obs(hr(60, ts="2026-11-23T10:00:00"), {"code": "rr", "value": 12}))
    assert reasons(p) == ["schema"] and "obs[0].ts" in p.deadletters[0].detail
    assert len(observations(p).items) == 1


def test_cbor_datetime_tag_is_a_time() -> None:
    body = obs(hr(60), ts=datetime(2026, 11, 23, 10, 0, 0, 120000, tzinfo=UTC))
    assert observations(parse(body, fmt="cbor")).meta.ts == T0 + 120


def test_future_ts_is_kept_flagged_at_received_time() -> None:
    ahead = RX + 300_001
    p = parse(obs(hr(60), {"code": "rr", "value": 12, "ts": T0}, ts=ahead))
    ev = observations(p)
    assert p.deadletters == ()
    assert ev.meta.ts == RX
    assert [(i.ts, i.flags) for i in ev.items] == [(RX, (FLAG_FUTURE_TS,)), (T0, ())]
    assert observations(parse(obs(hr(350, ts=ahead)))).items[0].flags == (FLAG_ARTIFACT, FLAG_FUTURE_TS)
    assert observations(parse(obs(hr(60), ts=RX + 300_000))).items[0].flags == ()


def test_stale_message_is_dead_lettered() -> None:
    old = RX - 30 * 86_400_000 - 1
    assert "ts" in refused(parse(obs(hr(60), ts=old)), Outcome.SCHEMA, "stale")
    assert observations(parse(obs(hr(60), ts=old + 1))).meta.ts == old + 1


def test_stale_item_refuses_only_the_item() -> None:
    p = parse(obs(hr(60, ts="2020-01-01T00:00:00Z"), {"code": "rr", "value": 12}))
    assert reasons(p) == ["stale"]
    assert [i.code for i in observations(p).items] == ["MDC_RESP_RATE"]


def test_limits_are_configurable() -> None:
    limits = Limits(max_payload=100, future_ms=1000, retention_ms=60_000)
    assert observations(parse(obs(hr(60), ts=RX + 1001), limits=limits)).items[0].flags == (FLAG_FUTURE_TS,)
    refused(parse(obs(hr(60), ts=RX - 60_001), limits=limits), Outcome.SCHEMA, "stale")
    refused(parse(obs(*[hr(60)] * 5), limits=limits), Outcome.OVERSIZED, "oversized")


# --- envelope -----------------------------------------------------------------------------------------------


def test_oversized_is_refused_before_decoding() -> None:
    p = parse(b"{" + b" " * 65_536 + b"}")
    assert "65538 bytes" in refused(p, Outcome.OVERSIZED, "oversized")
    assert len(p.deadletters[0].payload or "") <= 1024  # a bounded excerpt, not the whole payload
    assert parse(orjson.dumps(obs(hr(60))).ljust(65_536)).outcome is Outcome.ACCEPTED


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"   ",
        b"hello",
        b"[1, 2]",
        b'{"seq": 1,',
        b'{"seq": 1} x',
        b"\xa1\x63seq",  # a truncated CBOR map
        cbor2.dumps({"seq": 1}) + b"\x00",  # bytes after the map
        b"\x82\x01\x02",  # a CBOR array
        b"\xff\xfe{",
    ],
)
def test_malformed(payload: bytes) -> None:
    refused(parse(payload), Outcome.MALFORMED, "malformed")


def test_json_and_cbor_that_are_not_maps_are_malformed() -> None:
    refused(parse(b"[1]", content_format="json"), Outcome.MALFORMED, "malformed")
    refused(parse(cbor2.dumps([1]), content_format="cbor"), Outcome.MALFORMED, "malformed")
    refused(parse(cbor2.dumps({"seq": 1}), content_format="json"), Outcome.MALFORMED, "malformed")


def test_sniffing_tolerates_leading_json_whitespace() -> None:
    assert parse(b"\r\n\t " + orjson.dumps(obs(hr(60)))).outcome is Outcome.ACCEPTED


def test_unsupported_content_format() -> None:
    p = parse(obs(hr(60)), content_format="xml")
    refused(p, Outcome.UNSUPPORTED_FORMAT, "unsupported_format")


def test_cbor_and_json_give_the_same_event() -> None:
    body = obs(
        {"code": "MDC_ECG_HEART_RATE", "value": 72, "unit": "/min"},
        {"code": "temp", "value": 98.6, "unit": "[degF]", "ts": "2026-11-23T09:59:00Z"},
        {"code": "acvpu", "value": "A"},
        id="m-77",
    )
    from_json = parse(body, fmt="json")
    from_cbor = parse(body, fmt="cbor")
    assert from_json.event == from_cbor.event
    assert observations(from_cbor).meta.event_id == "monitor-1/obs/id/m-77"
    assert parse(body, fmt="cbor", content_format="cbor").event == from_json.event


def test_unknown_kind() -> None:
    refused(parse(obs(hr(60)), "vitals"), Outcome.UNKNOWN_KIND, "unknown_kind")


@pytest.mark.parametrize(
    ("dev_type", "kind"), [("monitor", "sos"), ("pump", "obs"), ("pendant", "lab"), ("toaster", "obs")]
)
def test_kind_not_allowed_for_device_type(dev_type: str, kind: str) -> None:
    refused(parse({"seq": 1}, kind, device(dev_type)), Outcome.UNAUTHORISED, "kind_not_allowed")


def test_kinds_by_type_covers_every_device_type_and_kind() -> None:
    assert set(KINDS_BY_TYPE) == set(DEVICE_TYPES)
    assert set().union(*KINDS_BY_TYPE.values()) == set(KINDS)
    assert all("status" in kinds for kinds in KINDS_BY_TYPE.values())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", -1),
        ("seq", 1.0),
        ("seq", True),
        ("seq", "1"),
        ("seq", 2**63),
        ("boot", ""),
        ("boot", 7),
        ("boot", "b/7"),
        ("boot", "b" * 65),
        ("id", "x" * 65),
        ("id", 12),
        ("id", "a b"),
    ],
)
def test_wrong_envelope_field_types_are_schema_naming_the_field(field: str, value: object) -> None:
    p = parse({"seq": 1, field: value, "obs": [hr(1)]}, fmt="cbor")
    assert refused(p, Outcome.SCHEMA, "schema").startswith(field)


@pytest.mark.parametrize("obs_value", [None, [], {}, "hr", 5])
def test_obs_must_be_a_non_empty_list(obs_value: object) -> None:
    assert "obs" in refused(parse({"seq": 1, "obs": obs_value}), Outcome.SCHEMA, "schema")


def test_event_ids() -> None:
    def event_id(**envelope: Any) -> str:
        return observations(parse({**envelope, "obs": [hr(60)]})).meta.event_id

    assert event_id(id="abc", seq=4, boot="b1") == "monitor-1/obs/id/abc"
    assert event_id(seq=4, boot="b1") == "monitor-1/obs/b1/4"
    assert event_id(seq=0) == "monitor-1/obs/-/0"
    rx = event_id()
    assert rx.startswith(f"monitor-1/obs/rx/{RX}/") and len(rx.rsplit("/", 1)[1]) == 8
    assert event_id() == rx  # deterministic: a redelivery is a duplicate
    assert event_id(note="other payload") != rx


def test_attribution_comes_from_the_device_at_received_time() -> None:
    dev = DeviceInfo("m-9", "monitor", "site-b", None, None, None, False)
    m = observations(parse(obs(hr(60)), dev=dev)).meta
    assert (m.device_id, m.site_id, m.unit_id, m.bed_id, m.patient_id) == ("m-9", "site-b", None, None, None)


# --- status, pump, gps, crew, sos, lab ----------------------------------------------------------------------


def test_status_battery_out_of_range_is_dropped_but_conditions_kept() -> None:
    p = parse({"seq": 1, "battery": 1.5, "conditions": ["lead_off", "probe_off"]}, "status")
    assert p.outcome is Outcome.ACCEPTED and reasons(p) == ["value_range"]
    assert isinstance(p.event, DeviceStatus)
    assert p.event == DeviceStatus(p.event.meta, None, ("lead_off", "probe_off"))
    assert reasons(parse({"battery": True}, "status")) == ["schema"]
    assert reasons(parse({"battery": math.nan}, "status", fmt="cbor")) == ["value_range"]
    status = parse({"battery": 0, "conditions": []}, "status").event
    assert isinstance(status, DeviceStatus) and status.battery == 0.0


def test_status_unknown_condition_is_schema_and_known_ones_kept() -> None:
    p = parse({"conditions": ["lead_off", "on_fire", 3, "lead_off"]}, "status")
    assert reasons(p) == ["schema", "schema"]
    assert "conditions[1]" in p.deadletters[0].detail
    assert isinstance(p.event, DeviceStatus) and p.event.conditions == ("lead_off",)
    p = parse({"conditions": "lead_off"}, "status")
    assert reasons(p) == ["schema"] and isinstance(p.event, DeviceStatus)


def test_pump_state_is_required() -> None:
    assert "state" in refused(parse({"state": "exploding"}, "pump", PUMP), Outcome.SCHEMA, "schema")
    assert "state" in refused(parse({"rate_ml_h": 1}, "pump", PUMP), Outcome.SCHEMA, "schema")


def test_pump_bad_rates_and_alarms_are_dropped_alone() -> None:
    body = {"state": "alarm", "rate_ml_h": -1, "vtbi_ml": math.inf, "alarms": ["occlusion", "gremlins"]}
    p = parse(body, "pump", PUMP, fmt="cbor")
    assert reasons(p) == ["value_range", "value_range", "schema"]
    ev = p.event
    assert isinstance(ev, PumpStatus)
    assert (ev.state, ev.rate_ml_h, ev.vtbi_ml, ev.alarms) == ("alarm", None, None, ("occlusion",))
    assert reasons(parse({"state": "running", "drug": "x" * 129}, "pump", PUMP)) == ["schema"]
    assert reasons(parse({"state": "running", "rate_ml_h": 0}, "pump", PUMP)) == []


def test_gps_rules() -> None:
    refused(parse({"lat": 91, "lon": 0}, "gps", AMBULANCE), Outcome.SCHEMA, "value_range")
    refused(parse({"lat": 0, "lon": -180.5}, "gps", AMBULANCE), Outcome.SCHEMA, "value_range")
    refused(parse({"lat": "51", "lon": 0}, "gps", AMBULANCE), Outcome.SCHEMA, "schema")
    refused(parse({"lon": 0}, "gps", AMBULANCE), Outcome.SCHEMA, "schema")
    p = parse({"lat": -90, "lon": 180, "speed_kmh": -3, "heading": 361}, "gps", AMBULANCE)
    assert reasons(p) == ["value_range", "value_range"]
    assert isinstance(p.event, GpsFix)
    assert p.event == GpsFix(p.event.meta, -90.0, 180.0, None, None)
    p = parse({"lat": 0, "lon": 0, "heading": 360, "speed_kmh": 0}, "gps", AMBULANCE)
    assert isinstance(p.event, GpsFix) and (p.event.heading, p.event.speed_kmh) == (360.0, 0.0)


@pytest.mark.parametrize(
    "body",
    [
        {"seq": 1},
        {"unit_state": "napping"},
        {"action": "accept"},
        {"action": "maybe", "incident_id": "I-1"},
        {"action": "accept", "incident_id": "I 1"},
    ],
)
def test_crew_refusals(body: dict[str, Any]) -> None:
    refused(parse(body, "crew", AMBULANCE), Outcome.SCHEMA, "schema")


@pytest.mark.parametrize("state", UNIT_STATES)
def test_crew_unit_states(state: str) -> None:
    ev = parse({"unit_state": state}, "crew", AMBULANCE).event
    assert isinstance(ev, CrewMessage) and ev.unit_state == state


def test_pendant_patient_mismatch_is_unauthorised() -> None:
    p = parse({"action": "press", "patient_id": "P-2"}, "sos", PENDANT)
    assert "patient_id" in refused(p, Outcome.UNAUTHORISED, "patient_mismatch")
    ev = parse({"action": "press", "patient_id": "P-1"}, "sos", PENDANT).event
    assert isinstance(ev, Sos) and ev.meta.patient_id == "P-1"
    unbound = parse({"action": "press", "patient_id": "P-2"}, "sos", device("pendant", patient=None)).event
    assert isinstance(unbound, Sos) and unbound.meta.patient_id is None  # a claim never attributes


def test_sos_is_never_refused_for_its_extras() -> None:
    p = parse({"action": "press", "lat": 95, "lon": 0, "note": "x" * 501}, "sos", PENDANT)
    assert p.outcome is Outcome.ACCEPTED and reasons(p) == ["value_range", "schema"]
    assert isinstance(p.event, Sos) and p.event == Sos(p.event.meta, "press")
    p = parse({"action": "press", "lat": 51.5}, "sos", PENDANT)  # a position needs both
    assert reasons(p) == ["schema"] and isinstance(p.event, Sos) and p.event.lat is None
    p = parse({"action": "press", "note": "fell\nin the hall"}, "sos", PENDANT)
    assert isinstance(p.event, Sos) and p.event.note == "fell\nin the hall"
    assert reasons(parse({"action": "press", "note": "bell\x07"}, "sos", PENDANT)) == ["schema"]
    refused(parse({"action": "help"}, "sos", PENDANT), Outcome.SCHEMA, "schema")


def test_lab_envelope_refusals() -> None:
    good = {"loinc": "2823-3", "value": 6.8, "status": "final"}
    assert "patient_id" in refused(parse({"results": [good]}, "lab", ANALYZER), Outcome.SCHEMA, "schema")
    refused(parse({"patient_id": "P 1", "results": [good]}, "lab", ANALYZER), Outcome.SCHEMA, "schema")
    refused(parse({"patient_id": "P-1", "results": []}, "lab", ANALYZER), Outcome.SCHEMA, "schema")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"loinc": "2823-4"}, "schema"),  # wrong check digit
        ({"loinc": 28233}, "schema"),
        ({"value": True}, "schema"),
        ({"value": math.nan}, "value_range"),
        ({"value": ""}, "schema"),
        ({"value": None}, "schema"),
        ({"flag": "XX"}, "schema"),
        ({"status": "draft"}, "schema"),
        ({"status": None}, "schema"),
        ({"unit": "mmol L"}, "unit"),
        ({"ts": "2026-11-23T10:00:00"}, "schema"),
        ({"ts": T0 - 40 * 86_400_000}, "stale"),
    ],
)
def test_an_invalid_lab_result_is_an_item_dead_letter(change: dict[str, Any], reason: str) -> None:
    good = {"loinc": "2823-3", "value": 6.8, "status": "final"}
    p = parse({"patient_id": "P-1", "results": [good, {**good, **change}]}, "lab", ANALYZER, fmt="cbor")
    assert p.outcome is Outcome.ACCEPTED and reasons(p) == [reason]
    assert isinstance(p.event, LabReport) and len(p.event.results) == 1


def test_lab_optional_fields() -> None:
    result = {"loinc": "2823-3", "value": 6.8, "status": "corrected", "ts": T0, "flag": "AA"}
    p = parse({"patient_id": "P-1", "order_id": "O 9", "results": [result, "2823-3"]}, "lab", ANALYZER)
    assert reasons(p) == ["schema", "schema"]
    assert isinstance(p.event, LabReport) and p.event.order_id is None
    assert (p.event.results[0].ts, p.event.results[0].flag) == (T0, "AA")


# --- dead letters -------------------------------------------------------------------------------------------


def test_deadletter_id_is_deterministic_and_distinct() -> None:
    kw: dict[str, Any] = {
        "transport": "mqtt",
        "received_at": RX,
        "device_id": "m-1",
        "kind": "obs",
        "site_id": "s",
    }
    a = deadletter("unknown_device", "who?", payload=b"{}", **kw)
    assert a == deadletter("unknown_device", "who?", payload=b"{}", **kw)
    assert a.id != deadletter("unknown_device", "who?", payload=b"{ }", **kw).id
    assert a.id != deadletter("unknown_device", "who?", payload=b"{}", index=1, **kw).id
    assert a.id.startswith(f"mqtt/m-1/obs/{RX}/")


def test_deadletter_of_an_odd_device_id_keeps_the_id_plain() -> None:
    odd = deadletter(
        "unknown_device", "x", transport="mqtt", received_at=RX, payload=None,
        device_id="a/b#" * 100, kind=None, site_id=None,
    )  # fmt: skip
    assert odd.id.count("/") == 5 and len(odd.id) < 80 and odd.payload is None
    assert odd.device_id is not None and len(odd.device_id) <= 256
    assert len(deadletter("r", "d" * 5000, **{**_DL, "payload": None}).detail) <= 300


_DL: dict[str, Any] = {
    "transport": "coap",
    "received_at": RX,
    "device_id": None,
    "kind": None,
    "site_id": None,
}


def test_deadletter_payload_excerpt_is_bounded() -> None:
    assert excerpt(b'{"a": 1}') == '{"a": 1}'
    assert len(excerpt(b"x" * 70_000).encode()) == 1024
    binary = bytes(range(256)) * 10
    text = excerpt(binary)
    assert text.startswith("base64:") and base64.b64decode(text[7:]) == binary[:768]
    assert excerpt(b"a\x00b").startswith("base64:")  # PostgreSQL text holds no NUL
    assert excerpt(("é" * 600).encode()) == "é" * 512  # the 1 KiB boundary cuts a character: still text
    assert excerpt(b"\xff" + b"a" * 2000).startswith("base64:")


def test_message_dead_letter_carries_the_context() -> None:
    dl = parse(b"garbage", "obs").deadletters[0]
    assert (dl.transport, dl.device_id, dl.kind, dl.site_id) == ("mqtt", "monitor-1", "obs", "site-a")
    assert dl.payload == "garbage"
