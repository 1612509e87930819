"""The gateway's light MQTT v5 properties decode exactly as paho's own (gateway/mqtt.py `LightProperties`)."""

from __future__ import annotations

from typing import Any

import paho.mqtt._packet as paho_packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mqtt import LightProperties


def _stock(buffer: bytes) -> tuple[dict[str, Any], int]:
    props, used = Properties(PacketTypes.PUBLISH).unpack(buffer)  # type: ignore[no-untyped-call]
    return props.json(), used


def _light(buffer: bytes) -> tuple[dict[str, Any], int]:
    props, used = LightProperties(PacketTypes.PUBLISH).unpack(buffer)
    return props.json(), used  # type: ignore[no-untyped-call]


def _packed(**values: Any) -> bytes:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return bytes(props.pack())  # type: ignore[no-untyped-call]


def test_paho_decodes_every_publish_with_the_light_properties() -> None:
    assert paho_packet.Properties is LightProperties  # type: ignore[attr-defined]


def test_a_publish_without_properties_decodes_as_paho_does() -> None:
    assert _light(b"\x00") == _stock(b"\x00") == ({}, 1)
    assert _light(b"\x00" + b"payload") == _stock(b"\x00" + b"payload")


def test_a_publish_with_properties_decodes_as_paho_does() -> None:
    buffer = _packed(
        ContentType="application/json",
        MessageExpiryInterval=30,
        UserProperty=[("site", "s1"), ("unit", "icu")],
        CorrelationData=b"\x01\x02",
    )
    light, stock = _light(buffer), _stock(buffer)
    assert light == stock
    assert light[0]["ContentType"] == "application/json"
    assert light[0]["UserProperty"] == [("site", "s1"), ("unit", "icu")]


def test_instances_share_the_tables_but_not_their_values() -> None:
    a = LightProperties(PacketTypes.PUBLISH)
    b = LightProperties(PacketTypes.PUBLISH)
    a.unpack(_packed(ContentType="text/plain"))
    assert a.names is b.names
    assert not hasattr(b, "ContentType")
    assert b.json() == {}  # type: ignore[no-untyped-call]
