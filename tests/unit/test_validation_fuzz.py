"""Property-based fuzzing of parse_message: hostile bytes and structures never raise, and nothing vanishes."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import cbor2
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.device import DeviceInfo
from gateway.outcome import Outcome
from streams.codes import VITALS
from streams.schemas import DEVICE_TYPES, KINDS, decode, encode
from streams.validation import Parsed, parse_message

RX = 1_795_428_000_500
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

devices = st.builds(
    DeviceInfo,
    id=st.sampled_from(["mon-1", "pump-7", "amb-2", "pend-3", "lab-1"]),
    type=st.sampled_from([*DEVICE_TYPES, "toaster"]),
    site_id=st.just("site-a"),
    unit_id=st.none() | st.just("icu"),
    bed_id=st.none() | st.just("bed-1"),
    patient_id=st.none() | st.just("P-1"),
    allow_plain_coap=st.booleans(),
)
kinds = st.sampled_from([*KINDS, "", "obs/../x", "cmd"])
formats = st.sampled_from([None, "json", "cbor", "xml"])

# Any JSON/CBOR-ish value: the scalars hostile devices send, nested in lists and maps.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["", "2026-11-23T10:00:00Z", "2026-11-23T10:00:00", "A", "V", "[degF]", "kPa", "1"])
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)

# Near-valid messages, to reach the deep checks rather than stopping at the envelope.
codes = st.sampled_from(
    [c for v in VITALS for c in (v.ref, v.alias, v.code, str(v.code))] + ["nope", 147842.0, True, None]
)
times = (
    st.integers(min_value=RX - 40 * 86_400_000, max_value=RX + 3_600_000)
    | st.sampled_from(["2026-11-23T10:00:00.120Z", "2026-11-23T10:00:00", "2026-11-23T12:00:00+02:00", "x"])
    | st.none()
)
units = st.none() | st.sampled_from(["/min", "%", "mm[Hg]", "Cel", "[degF]", "kPa", "/s", "1", "K", "bpm", 5])
numbers = st.integers(min_value=-500, max_value=500) | st.floats(allow_nan=True, allow_infinity=True)
obs_items = st.fixed_dictionaries(
    {"code": codes, "value": numbers | scalars},
    optional={"unit": units, "ts": times, "extra": anything},
)
lab_results = st.fixed_dictionaries(
    {"loinc": st.sampled_from(["2823-3", "2823-4", "718-7", "x"]), "value": numbers | scalars},
    optional={
        "unit": units | st.text(max_size=40),
        "flag": st.sampled_from(["L", "HH", "Q", None]),
        "status": st.sampled_from(["final", "draft"]),
        "ts": times,
    },
)


def mostly(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any] = scalars
) -> st.SearchStrategy[Any]:
    """Mostly valid, so that most examples get past the envelope to the deep checks."""
    # one_of would weigh every inner alternative of `hostile` like the whole of `valid`.
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda ok: valid if ok else hostile)


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "seq": mostly(st.integers(min_value=0, max_value=2**63 - 1), st.integers(min_value=-2, max_value=2**64)),
    "boot": mostly(st.just("b7"), st.sampled_from(["", "a/b", "x" * 70]) | scalars),
    "id": mostly(st.just("m-1"), st.sampled_from(["a b"]) | scalars),
    "ts": mostly(st.integers(min_value=RX - 86_400_000, max_value=RX + 600_000), times),
    "obs": mostly(st.lists(obs_items, min_size=1, max_size=6), st.lists(obs_items | anything) | anything),
    "battery": mostly(st.floats(min_value=0, max_value=1), numbers | scalars),
    "conditions": st.lists(mostly(st.sampled_from(["lead_off", "probe_off", "charging"])), max_size=4),
    "state": mostly(st.sampled_from(["running", "alarm", "standby"])),
    "rate_ml_h": mostly(st.floats(min_value=0, max_value=1000), numbers),
    "alarms": st.lists(mostly(st.sampled_from(["occlusion", "other", "door_open"])), max_size=4),
    "drug": mostly(st.just("noradrenaline")),
    "lat": mostly(st.floats(min_value=-90, max_value=90), numbers),
    "lon": mostly(st.floats(min_value=-180, max_value=180), numbers),
    "speed_kmh": numbers,
    "heading": numbers,
    "unit_state": mostly(st.sampled_from(["available", "en_route"])),
    "action": mostly(st.sampled_from(["press", "cancel", "accept", "decline"])),
    "incident_id": mostly(st.just("I-17"), st.just("I 17") | scalars),
    "note": st.text(max_size=600) | scalars,
    "patient_id": mostly(st.just("P-1"), st.just("P-2") | scalars),
    "order_id": mostly(st.just("O-9")),
    "results": mostly(st.lists(lab_results, min_size=1, max_size=4), st.lists(lab_results | anything)),
}
# The fields each kind needs, so that most examples reach the checks beyond the envelope.
REQUIRED = {"obs": ["obs"], "status": [], "pump": ["state"], "gps": ["lat", "lon"], "sos": ["action"]}
REQUIRED |= {"crew": ["unit_state"], "lab": ["patient_id", "results"]}


def messages(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """Near-valid messages of a kind: its required fields mostly right, any other field maybe present."""
    required = {name: FIELDS[name] for name in REQUIRED[kind]}
    optional = {name: s for name, s in FIELDS.items() if name not in required}
    return st.fixed_dictionaries(required, optional=optional)


def check(p: Parsed) -> None:
    """The invariants every answer keeps, whatever came in."""
    assert p.event is not None or p.deadletters, "a message vanished without an event or a dead letter"
    for dl in p.deadletters:
        assert dl.reason and dl.reason == dl.reason.lower() and " " not in dl.reason
        assert dl.reason != "internal", dl.detail  # a bug in validation, not bad input
        assert dl.id and dl.detail and len(dl.detail) <= 300
        assert dl.payload is None or len(dl.payload) <= 1024 + len("base64:")
        assert decode(encode(dl)) == dl
    if p.outcome is not Outcome.ACCEPTED:
        assert p.event is None and len(p.deadletters) == 1
        assert p.deadletters[0].reason
    if p.event is not None:
        assert p.outcome is Outcome.ACCEPTED
        assert decode(encode(p.event)) == p.event  # everything accepted can travel the bus
        for item in getattr(p.event, "items", ()):
            assert isinstance(item.value, str) or math.isfinite(item.value)
    assert len({dl.id for dl in p.deadletters}) == len(p.deadletters)


def run(payload: bytes, device: DeviceInfo, kind: str, fmt: str | None) -> Parsed:
    p = parse_message(payload, transport="mqtt", device=device, kind=kind, received_at=RX, content_format=fmt)
    check(p)
    again = parse_message(
        payload, transport="mqtt", device=device, kind=kind, received_at=RX, content_format=fmt
    )
    assert again == p  # deterministic: a redelivery gives the same ids
    return p


@SETTINGS
@given(payload=st.binary(max_size=300), device=devices, kind=kinds, fmt=formats)
def test_arbitrary_bytes_never_raise(payload: bytes, device: DeviceInfo, kind: str, fmt: str | None) -> None:
    run(payload, device, kind, fmt)


@SETTINGS
@given(prefix=st.sampled_from([b"\xa1", b"\xbf", b"{", b" {", b"\xa0"]), rest=st.binary(max_size=200))
def test_bytes_that_look_like_a_map_never_raise(prefix: bytes, rest: bytes) -> None:
    run(prefix + rest, DeviceInfo("mon-1", "monitor", "s", None, None, None, False), "obs", None)


def _encode(body: Any, as_cbor: bool) -> bytes:
    if as_cbor:
        return cbor2.dumps(body)
    try:
        return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: JSON from orjson cannot carry it
        return cbor2.dumps(body)


@SETTINGS
@given(body=anything, device=devices, kind=kinds, as_cbor=st.booleans())
def test_arbitrary_structures_never_raise(body: Any, device: DeviceInfo, kind: str, as_cbor: bool) -> None:
    run(_encode(body, as_cbor), device, kind, None)


SENDER = {"obs": "monitor", "status": "monitor", "pump": "pump", "gps": "ambulance", "crew": "ambulance"}
SENDER |= {"sos": "pendant", "lab": "analyzer"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(KINDS), patient=st.none() | st.just("P-1"), cbor=st.booleans())
def test_near_valid_messages_never_raise(
    data: st.DataObject, kind: str, patient: str | None, cbor: bool
) -> None:
    body = data.draw(messages(kind))
    device = DeviceInfo("dev-1", SENDER[kind], "site-a", "icu", None, patient, False)
    run(_encode(body, cbor), device, kind, None)


@SETTINGS
@given(
    ts=st.datetimes(timezones=st.just(UTC)) | st.datetimes(),
    items=st.lists(obs_items, min_size=1, max_size=4),
)
def test_cbor_datetimes_never_raise(ts: datetime, items: list[dict[str, Any]]) -> None:
    payload = cbor2.dumps({"seq": 1, "ts": ts, "obs": items}, timezone=UTC)
    run(payload, DeviceInfo("mon-1", "monitor", "s", None, None, None, False), "obs", "cbor")
