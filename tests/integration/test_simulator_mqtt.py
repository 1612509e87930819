"""The simulator against a real Mosquitto: topics, JSON, QoS 1, device credentials, reconnect and downlink."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.credentials
import aiocoap.resource
import aiomqtt
import pytest

from devices.fleet import Fleet, SimDevice
from devices.messages import rfc3339
from devices.simulator import Simulator
from tests.servers import Mosquitto, free_port, mosquitto

pytestmark = pytest.mark.integration

START = 1_795_428_000_000
TOPIC = re.compile(r"^vigil/v1/([A-Za-z0-9._:-]+)/(obs|status|pump|gps|crew|sos|lab)$")


def ward(secret: str = "") -> Fleet:
    """One device of every type, each in the scenario that makes it speak early."""

    def dev(did: str, dtype: str, scenario: str, patient: str | None) -> SimDevice:
        return SimDevice(did, secret or f"pw-{did}", dtype, "mqtt", "default", "U1", None, patient, scenario)

    return Fleet(
        [
            dev("mon-1", "monitor", "desaturation", "P-1"),
            dev("pump-1", "pump", "pump_occlusion", "P-1"),
            dev("amb-1", "ambulance", "sos_ambulance", None),
            dev("pendant-1", "pendant", "sos_ambulance", "P-2"),
            dev("lab-1", "analyzer", "hyperkalaemia", "P-1"),
        ]
    )


@dataclass
class Received:
    messages: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)  # (topic, qos, payload)

    def of(self, device_id: str, kind: str) -> list[dict[str, Any]]:
        return [p for t, _, p in self.messages if t == f"vigil/v1/{device_id}/{kind}"]


@contextlib.asynccontextmanager
async def subscriber(
    port: int, username: str | None = None, password: str | None = None
) -> AsyncIterator[tuple[aiomqtt.Client, Received]]:
    """A QoS 1 subscriber to every device topic, recording what arrives."""
    got = Received()
    hub = aiomqtt.Client("127.0.0.1", port, identifier="test-hub", username=username, password=password)
    async with hub as client:
        await client.subscribe("vigil/v1/+/+", qos=1)

        async def collect() -> None:
            async for m in client.messages:
                if not str(m.topic).endswith("/cmd"):
                    assert isinstance(m.payload, bytes)
                    got.messages.append((str(m.topic), m.qos, json.loads(m.payload)))

        task = asyncio.create_task(collect())
        try:
            yield client, got
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def password_conf(passwords: Path) -> str:
    # Run as root, Mosquitto drops to its own user before reading the password file, which it then cannot
    # reach under pytest's private temp dir; tests/servers.py adds "user root" (ignored when not root).
    return f"allow_anonymous false\npassword_file {passwords}"


def simulator(fleet: Fleet, port: int, **kw: Any) -> Simulator:
    return Simulator(fleet, mqtt_port=port, speed=kw.pop("speed", 20.0), seed=3, start_ms=START, **kw)


async def settle(got: Received, count: int, timeout: float = 5.0) -> None:
    """Wait until the subscriber has `count` messages (the broker delivers after the PUBACK)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(got.messages) < count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


async def test_fleet_publishes_contract_topics_at_qos1_with_device_credentials(tmp_path: Path) -> None:
    fleet = ward()
    passwords = tmp_path / "passwd"
    passwords.write_text("".join(f"{d.id}:{d.secret}\n" for d in fleet.devices) + "test-hub:hub-pw\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True)
    with mosquitto(tmp_path / "mq", extra=password_conf(passwords)) as m:
        async with subscriber(m.port, username="test-hub", password="hub-pw") as (_, got):
            sim = simulator(fleet, m.port, duration_s=65)
            await asyncio.wait_for(sim.run(), 30)
            await settle(got, sum(sim.sent.values()))
    assert not sim.unsent and sum(sim.sent.values()) == len(got.messages)
    seqs: dict[tuple[str, str], int] = {}
    for topic, qos, payload in got.messages:
        match = TOPIC.match(topic)
        assert match, topic
        assert qos == 1
        key = (match[1], match[2])
        assert payload["seq"] > seqs.get(key, 0), f"{topic}: seq goes back"
        seqs[key] = payload["seq"]
    obs = got.of("mon-1", "obs")
    assert len(obs) == 66  # scenario seconds 0..65
    assert [p["ts"] for p in obs[:3]] == [rfc3339(START), rfc3339(START + 1000), rfc3339(START + 2000)]
    assert got.of("pendant-1", "sos")[0]["action"] == "press"
    assert [p["unit_state"] for p in got.of("amb-1", "crew")] == ["available", "dispatched"]
    assert [r["loinc"] for p in got.of("lab-1", "lab") for r in p["results"]] == ["2951-2", "2823-3"]
    assert [p["state"] for p in got.of("pump-1", "pump")] == ["running"] * 7


async def test_wrong_secret_is_refused_and_retried_not_lost(tmp_path: Path) -> None:
    fleet = Fleet([SimDevice("mon-1", "wrong", "monitor", "mqtt", "default", None, None, None, "stable")])
    passwords = tmp_path / "passwd"
    passwords.write_text("mon-1:right\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True)
    with mosquitto(tmp_path / "mq", extra=password_conf(passwords)) as m:
        sim = simulator(fleet, m.port, duration_s=10, flush_timeout_s=1.0)
        await asyncio.wait_for(sim.run(), 10)
    assert not sim.sent and sim.unsent["mon-1"] == 11 + 1  # every obs, and the status at second 0


async def test_messages_made_while_the_broker_is_away_arrive_later_with_their_ts(tmp_path: Path) -> None:
    fleet = Fleet([SimDevice("mon-1", "", "monitor", "mqtt", "default", None, None, "P-1", "stable")])
    broker = Mosquitto(tmp_path / "mq", port=free_port(), extra="allow_anonymous true")
    broker.dir.mkdir()
    sim = simulator(fleet, broker.port, speed=10.0, duration_s=40)
    run = asyncio.create_task(sim.run())
    try:
        await asyncio.sleep(1.5)  # ~15 scenario seconds with nobody to take them
        broker.start()
        async with subscriber(broker.port) as (_, got):
            await asyncio.wait_for(run, 30)
            await settle(got, sum(sim.sent.values()))
    finally:
        broker.stop()
    obs = got.of("mon-1", "obs")
    # The subscriber joined once the device had reconnected: what it sees must still be gap-free and in order.
    assert obs and [p["seq"] for p in obs] == list(range(obs[0]["seq"], 42))
    assert obs[0]["seq"] == 1 and all(p["ts"] == rfc3339(START + (p["seq"] - 1) * 1000) for p in obs)
    assert sim.sent[("mon-1", "obs")] == 41 and not sim.unsent


async def test_ambulance_accepts_a_dispatch_order_from_the_hub(tmp_path: Path) -> None:
    fleet = Fleet([SimDevice("amb-1", "", "ambulance", "mqtt", "default", None, None, None, "stable")])
    with mosquitto(tmp_path / "mq") as m:
        async with subscriber(m.port) as (client, got):
            sim = simulator(fleet, m.port, speed=20.0, duration_s=50)
            run = asyncio.create_task(sim.run())
            await settle(got, 3)
            order = {"type": "dispatch", "incident_id": "I-17", "lat": 51.5072, "lon": -0.1276}
            await client.publish("vigil/v1/amb-1/cmd", json.dumps(order), qos=1)
            await asyncio.wait_for(run, 30)
            await settle(got, sum(sim.sent.values()))
    crew = got.of("amb-1", "crew")
    assert crew[0] == crew[0] | {"unit_state": "available"}
    assert {"action": "accept", "incident_id": "I-17"}.items() <= crew[1].items()
    assert [p.get("unit_state") for p in crew[2:4]] == ["dispatched", "en_route"]
    assert max(p["speed_kmh"] for p in got.of("amb-1", "gps")) > 0


class Collector(aiocoap.resource.Resource):  # type: ignore[misc]
    """One CoAP path of the gateway (`POST /v1/{id}/{kind}`): records what comes and answers 2.04."""

    def __init__(self, path: tuple[str, ...], got: list[tuple[tuple[str, ...], int, dict[str, Any]]]) -> None:
        super().__init__()
        self.path, self.got = path, got

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self.got.append((self.path, int(request.opt.content_format), json.loads(request.payload)))
        return aiocoap.Message(code=aiocoap.CHANGED)


async def test_plain_coap_device_posts_json_to_v1_path() -> None:
    port = free_port(socket.SOCK_DGRAM)
    got: list[tuple[tuple[str, ...], int, dict[str, Any]]] = []
    site = aiocoap.resource.Site()
    for kind in ("lab", "status"):
        site.add_resource(["v1", "lab-1", kind], Collector(("v1", "lab-1", kind), got))
    server = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
    try:
        fleet = Fleet(
            [SimDevice("lab-1", "", "analyzer", "coap", "default", None, None, "P-1", "hyperkalaemia", True)]
        )
        sim = Simulator(fleet, coap_port=port, speed=20.0, seed=1, start_ms=START, duration_s=61)
        await asyncio.wait_for(sim.run(), 20)
    finally:
        await server.shutdown()
    paths = [p for p, _, _ in got]
    assert set(paths) == {("v1", "lab-1", "status"), ("v1", "lab-1", "lab")}
    assert {cf for _, cf, _ in got} == {50}
    labs = [b for p, _, b in got if p[-1] == "lab"]
    assert labs[-1]["results"][0]["value"] == 6.8 and labs[-1]["patient_id"] == "P-1"


async def test_coaps_device_authenticates_with_dtls_psk() -> None:
    port = free_port(socket.SOCK_DGRAM)
    got: list[tuple[tuple[str, ...], int, dict[str, Any]]] = []
    site = aiocoap.resource.Site()
    site.add_resource(["v1", "pendant-1", "status"], Collector(("v1", "pendant-1", "status"), got))
    credentials = aiocoap.credentials.CredentialsMap()
    credentials.load_from_dict(
        {":pendant-1": {"dtls": {"psk": b"pw-pendant-1", "client-identity": b"pendant-1"}}}
    )
    # aiocoap's DTLS server listens on the bound port plus one, as CoAPS does beside CoAP.
    server = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), server_credentials=credentials, transports=["tinydtls_server"]
    )
    try:
        fleet = Fleet(
            [
                SimDevice(
                    "pendant-1", "pw-pendant-1", "pendant", "coap", "default", None, None, "P-2", "stable"
                )
            ]
        )
        sim = Simulator(fleet, coaps_port=port + 1, speed=20.0, seed=1, start_ms=START, duration_s=60)
        await asyncio.wait_for(sim.run(), 20)
    finally:
        await server.shutdown()
    assert [b["seq"] for _, _, b in got] == [1, 61]
    assert sim.sent[("pendant-1", "status")] == 2 and not sim.unsent
