"""Fuzzing the real hub over MQTT: whatever a device sends, the hub stays up and every message is either
stored, recognised as a duplicate, or dead-lettered with a reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import cbor2
import httpx
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hub import Hub

KINDS = ["obs", "status", "pump", "gps", "crew", "sos", "lab", "bogus"]
CODES = [
    "hr",
    "spo2",
    "rr",
    "temp",
    "nibp_sys",
    "MDC_ECG_HEART_RATE",
    150456,
    "150456",
    "acvpu",
    "nope",
    None,
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
items = st.fixed_dictionaries(
    {"code": st.sampled_from(CODES), "value": scalars},
    optional={"unit": st.sampled_from(["/min", "%", "[degF]", "kPa", "mm[Hg]", "bpm", "", 5]), "ts": scalars},
)
near_valid = st.fixed_dictionaries(
    {},
    optional={
        "seq": st.one_of(st.integers(-5, 2**40), scalars),
        "boot": st.one_of(st.text(max_size=10), scalars),
        "ts": st.one_of(st.just("2026-11-24T10:00:00Z"), st.integers(0, 2**45), scalars),
        "obs": st.one_of(st.lists(items, max_size=4), json_values),
        "battery": scalars,
        "conditions": st.one_of(
            st.lists(st.sampled_from(["lead_off", "probe_off", "x"]), max_size=3), scalars
        ),
        "id": st.one_of(st.text(max_size=70), scalars),
    },
)


def encode(value: Any, as_cbor: bool) -> bytes:
    if as_cbor:
        return cbor2.dumps(value)
    return json.dumps(value, allow_nan=True).encode()


payloads = st.one_of(
    st.binary(max_size=200),
    st.tuples(near_valid, st.booleans()).map(lambda t: encode(t[0], t[1])),
    st.tuples(json_values, st.booleans()).map(lambda t: encode(t[0], t[1])),
)


def outcome_total(hub: Hub) -> float:
    """Messages the hub has accounted for: stored, duplicate, or dead-lettered (every reason)."""
    total = 0.0
    for line in httpx.get(f"{hub.url}/metrics").text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("vigil_ingest_total", "vigil_deadletter_total", "vigil_duplicates_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, mqtt.Client]]:
    hub = Hub(tmp_path_factory.mktemp("fuzz")).start()
    dev = hub.add_device("fuzz-1", "monitor", "--unit", "icu", "--bed", "icu-9", "--patient", "P-F")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzz-1")
    client.username_pw_set("fuzz-1", dev["secret"])
    client.connect("127.0.0.1", hub.mqtt_port)
    client.loop_start()
    try:
        yield hub, client
    finally:
        client.loop_stop()
        client.disconnect()
        hub.stop()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), payload=payloads)
def test_every_message_is_stored_or_dead_lettered(
    device: tuple[Hub, mqtt.Client], kind: str, payload: bytes
) -> None:
    hub, client = device
    before = outcome_total(hub)
    info = client.publish(f"vigil/v1/fuzz-1/{kind}", payload, qos=1)
    info.wait_for_publish(10)
    assert info.is_published()  # acknowledged: so it must be accounted for
    hub.wait_for(lambda: outcome_total(hub) > before, timeout=10)
    assert httpx.get(f"{hub.url}/healthz").status_code == 200
