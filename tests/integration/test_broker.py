"""The embedded amqtt broker against real MQTT clients: mosquitto_pub, paho and aiomqtt as devices."""

from __future__ import annotations

import asyncio
import socket
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker import EmbeddedBroker
from gateway.device import DeviceInfo
from gateway.outcome import Outcome
from tests.servers import free_port, require

pytestmark = pytest.mark.integration

HUB_USER, HUB_PASS = "vigil-hub", "hub-secret"
DEVICES = {"mon-1": "s3cret-1", "mon-2": "s3cret-2", "pump-9": "s3cret-9"}
OBS = b'{"seq": 1, "ts": 1795428000000, "obs": [{"code": "hr", "value": 72}]}'


def codes(granted: object) -> list[int]:
    """SUBACK return codes as integers, whatever aiomqtt wraps them in."""
    assert isinstance(granted, (list, tuple))
    return [g.value if isinstance(g, ReasonCode) else int(g) for g in granted]


class RecordingIngest:
    """Records every submit; can hold submits on an Event and answer scripted outcomes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, bytes]] = []
        self.returned_at: list[float] = []
        self.gate: asyncio.Event | None = None
        self.outcomes: list[Outcome] = []

    async def submit(
        self, *, transport: str, device_id: str, kind: str, payload: bytes, content_format: str | None = None
    ) -> Outcome:
        self.calls.append((transport, device_id, kind, payload))
        if self.gate is not None:
            await self.gate.wait()
        self.returned_at.append(time.monotonic())
        return self.outcomes.pop(0) if self.outcomes else Outcome.ACCEPTED

    def from_device(self, device_id: str) -> list[tuple[str, str, str, bytes]]:
        return [c for c in self.calls if c[1] == device_id]


class Directory:
    """A registry of devices with their secrets; `disabled` ones exist but may not connect."""

    def __init__(self, secrets: dict[str, str], disabled: set[str] | None = None) -> None:
        self.secrets = secrets
        self.disabled = disabled or set()

    def cached(self, device_id: str) -> DeviceInfo | None:
        return None  # the broker's tests look every device up

    async def get(self, device_id: str) -> DeviceInfo | None:
        if device_id not in self.secrets:
            return None
        return DeviceInfo(
            id=device_id,
            type="monitor",
            site_id="default",
            unit_id=None,
            bed_id=None,
            patient_id=None,
            allow_plain_coap=False,
            enabled=device_id not in self.disabled,
        )

    async def check_secret(self, device_id: str, secret: str) -> bool:
        return self.secrets.get(device_id) == secret

    async def psk(self, device_id: str) -> bytes | None:
        s = self.secrets.get(device_id)
        return None if s is None or device_id in self.disabled else s.encode()


class Hub:
    """The broker under test with its recording ingest, directory and refusals."""

    def __init__(self) -> None:
        self.ingest = RecordingIngest()
        self.directory = Directory(dict(DEVICES), disabled={"pump-9"})
        self.refused: list[tuple[str, str, str, bytes]] = []
        self.port = free_port()
        self.broker = EmbeddedBroker(
            self.ingest,
            self.directory,
            host="127.0.0.1",
            port=self.port,
            hub_username=HUB_USER,
            hub_password=HUB_PASS,
            on_refused=lambda *a: self.refused.append(a),
        )


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    h = Hub()
    await h.broker.start()
    try:
        yield h
    finally:
        await h.broker.stop()


async def mosquitto_pub(
    port: int, user: str | None, password: str | None, topic: str, *extra: str
) -> tuple[int, str]:
    """Run mosquitto_pub without blocking the loop the broker runs on; answers (exit code, output)."""
    argv = [require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", "1", *extra]
    if user is not None:
        argv += ["-u", user, "-i", f"{user}-pub"]
    if password is not None:
        argv += ["-P", password]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out.decode(errors="replace")


async def eventually(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def paho_device(port: int, device: str, *, client_id: str | None = None, clean: bool = True) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"{device}-paho", clean_session=clean)
    c.username_pw_set(device, DEVICES[device])
    c.reconnect_delay_set(min_delay=1, max_delay=1)
    return c


async def paho_connect(c: paho.Client, port: int) -> None:
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    await eventually(connected.is_set)


async def test_right_secret_reaches_ingest_with_device_kind_and_payload(hub: Hub) -> None:
    rc, out = await mosquitto_pub(
        hub.port, "mon-1", DEVICES["mon-1"], "vigil/v1/mon-1/obs", "-m", OBS.decode()
    )
    assert rc == 0, out
    await eventually(lambda: hub.ingest.calls)
    assert hub.ingest.calls == [("mqtt", "mon-1", "obs", OBS)]


async def test_wrong_secret_unknown_device_disabled_and_anonymous_are_refused(hub: Hub) -> None:
    for user, password in [
        ("mon-1", "wrong"),
        ("ghost", "x"),
        ("pump-9", DEVICES["pump-9"]),
        (None, None),
        (HUB_USER, "wrong"),
    ]:
        rc, out = await mosquitto_pub(hub.port, user, password, f"vigil/v1/{user}/obs", "-m", OBS.decode())
        assert rc != 0, (user, out)
        assert "not authori" in out.lower(), out
    await asyncio.sleep(0.2)
    assert hub.ingest.calls == []


async def test_publish_under_another_device_id_never_reaches_ingest(hub: Hub) -> None:
    for topic in ["vigil/v1/mon-2/obs", "vigil/v1/mon-1/obs/extra", "elsewhere", "vigil/v1/mon-1/cmd"]:
        rc, out = await mosquitto_pub(hub.port, "mon-1", DEVICES["mon-1"], topic, "-m", OBS.decode())
        assert rc == 0, out  # MQTT 3.1.1 has no negative PUBACK
    # A publish of its own afterwards: once it arrives, the refused ones were handled before it.
    await mosquitto_pub(hub.port, "mon-1", DEVICES["mon-1"], "vigil/v1/mon-1/status", "-m", '{"seq": 1}')
    await eventually(lambda: hub.ingest.calls)
    assert hub.ingest.calls == [("mqtt", "mon-1", "status", b'{"seq": 1}')]
    assert [(r[0], r[1], r[2]) for r in hub.refused] == [
        ("unauthorised", "mon-1", "vigil/v1/mon-2/obs"),
        ("unauthorised", "mon-1", "vigil/v1/mon-1/obs/extra"),
        ("unauthorised", "mon-1", "elsewhere"),
        ("unauthorised", "mon-1", "vigil/v1/mon-1/cmd"),
    ]


async def test_puback_only_after_ingest_returned(hub: Hub) -> None:
    hub.ingest.gate = asyncio.Event()
    c = paho_device(hub.port, "mon-1")
    acked_at: list[float] = []
    c.on_publish = lambda *a: acked_at.append(time.monotonic())
    await paho_connect(c, hub.port)
    try:
        info = c.publish("vigil/v1/mon-1/obs", OBS, qos=1)
        await eventually(lambda: hub.ingest.calls)  # ingest holds the message ...
        await asyncio.sleep(0.5)
        assert not acked_at and not info.is_published()  # ... and the device has no PUBACK yet
        hub.ingest.gate.set()
        await eventually(lambda: acked_at)
        assert hub.ingest.returned_at[0] <= acked_at[0]
    finally:
        c.loop_stop()
        c.disconnect()


async def test_unavailable_is_not_acknowledged_and_redelivered_after_reconnect(hub: Hub) -> None:
    hub.ingest.outcomes = [Outcome.UNAVAILABLE]
    c = paho_device(hub.port, "mon-1", client_id="mon-1-retry", clean=False)
    acked: list[int] = []
    disconnects: list[object] = []
    c.on_publish = lambda _c, _u, mid, *_: acked.append(mid)
    c.on_disconnect = lambda *a: disconnects.append(a)
    await paho_connect(c, hub.port)
    try:
        info = c.publish("vigil/v1/mon-1/obs", OBS, qos=1)
        await eventually(lambda: disconnects)  # the broker closed the connection instead of acknowledging
        assert acked == []
        await eventually(lambda: acked == [info.mid], timeout=15)  # paho reconnected and sent it again
        assert [c[1:] for c in hub.ingest.calls] == [("mon-1", "obs", OBS), ("mon-1", "obs", OBS)]
    finally:
        c.loop_stop()
        c.disconnect()


async def test_malformed_content_is_still_acknowledged(hub: Hub) -> None:
    hub.ingest.outcomes = [Outcome.MALFORMED]
    rc, out = await mosquitto_pub(hub.port, "mon-1", DEVICES["mon-1"], "vigil/v1/mon-1/obs", "-m", "not json")
    assert rc == 0, out
    assert hub.ingest.calls == [("mqtt", "mon-1", "obs", b"not json")]


@pytest.mark.parametrize("size", [100 * 1024, 256 * 1024 + 1])
async def test_large_payload_reaches_ingest(hub: Hub, tmp_path: Path, size: int) -> None:
    body = b"{" + b" " * (size - 2) + b"}"
    f = tmp_path / "big.json"
    f.write_bytes(body)
    rc, out = await mosquitto_pub(hub.port, "mon-1", DEVICES["mon-1"], "vigil/v1/mon-1/obs", "-f", str(f))
    assert rc == 0, out
    await eventually(lambda: hub.ingest.calls)
    assert hub.ingest.calls[0][3] == body


async def test_publish_command_reaches_subscribed_device(hub: Hub) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", hub.port, username="mon-1", password=DEVICES["mon-1"], identifier="mon-1-cmd"
    ) as device:
        granted = await device.subscribe("vigil/v1/mon-1/cmd", qos=1)
        assert list(granted) == [1]
        refused = await device.subscribe("vigil/v1/mon-2/cmd", qos=1)
        assert codes(refused) == [0x80]
        assert hub.broker.connected_devices() == {"mon-1"}
        await hub.broker.publish_command("mon-1", b'{"order": "go"}')
        await hub.broker.publish_command("mon-2", b'{"order": "not for mon-1"}')
        msg = await asyncio.wait_for(anext(device.messages), 10)
        assert (str(msg.topic), msg.payload, msg.qos) == ("vigil/v1/mon-1/cmd", b'{"order": "go"}', 1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(device.messages), 0.5)


async def test_hub_account_sees_device_traffic_and_commands(hub: Hub) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", hub.port, username=HUB_USER, password=HUB_PASS, identifier="hub-watch"
    ) as watcher:
        await watcher.subscribe("vigil/v1/#", qos=1)
        await mosquitto_pub(hub.port, "mon-1", DEVICES["mon-1"], "vigil/v1/mon-1/obs", "-m", OBS.decode())
        await mosquitto_pub(hub.port, "mon-1", DEVICES["mon-1"], "vigil/v1/mon-2/obs", "-m", "spoof")
        await watcher.publish("vigil/v1/mon-2/cmd", b"cmd", qos=1)
        got = [await asyncio.wait_for(anext(watcher.messages), 10) for _ in range(2)]
        assert [(str(m.topic), m.payload) for m in got] == [
            ("vigil/v1/mon-1/obs", OBS),
            ("vigil/v1/mon-2/cmd", b"cmd"),
        ]
    assert hub.ingest.calls == [("mqtt", "mon-1", "obs", OBS)]  # the hub's own publish is no device message


async def test_wrong_password_cannot_take_over_a_device_session(hub: Hub) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", hub.port, username="mon-1", password=DEVICES["mon-1"], identifier="mon-1-main"
    ) as device:
        await device.subscribe("vigil/v1/mon-1/cmd", qos=1)
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                "127.0.0.1", hub.port, username="mon-1", password="bad", identifier="mon-1-main"
            ):
                pass
        with pytest.raises(aiomqtt.MqttError):  # another device may not use mon-1's client id either
            async with aiomqtt.Client(
                "127.0.0.1", hub.port, username="mon-2", password=DEVICES["mon-2"], identifier="mon-1-main"
            ):
                pass
        await hub.broker.publish_command("mon-1", b"still here")
        msg = await asyncio.wait_for(anext(device.messages), 10)
        assert msg.payload == b"still here"


async def test_accepted_sockets_have_tcp_nodelay(hub: Hub) -> None:
    c = paho_device(hub.port, "mon-1")
    await paho_connect(c, hub.port)
    try:
        # No public accessor for the server side of a connection: read it from amqtt's session table.
        amqtt_broker = hub.broker._broker
        assert amqtt_broker is not None
        ((_session, handler),) = amqtt_broker.sessions.values()
        sock = handler.writer._writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        c.loop_stop()
        c.disconnect()


async def test_port_in_use_raises_oserror() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        b = EmbeddedBroker(
            RecordingIngest(),
            Directory({}),
            host="127.0.0.1",
            port=port,
            hub_username=HUB_USER,
            hub_password=HUB_PASS,
        )
        with pytest.raises(OSError, match="in use"):
            await b.start()


PUBLISHER = textwrap.dedent(
    """
    import sys, time, threading
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    port, n, qos = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    done = threading.Event(); acked = [0]
    def on_publish(*a):
        acked[0] += 1
        if acked[0] == n: done.set()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-" + "-".join(sys.argv[3:]))
    c.username_pw_set("mon-1", "s3cret-1")
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    payload = (b'{"seq": %d, "ts": 1795428000000, '
               b'"obs": [{"code": "hr", "value": 72}, {"code": "spo2", "value": 97}]}')
    t0 = time.perf_counter()
    for i in range(n):
        c.publish("vigil/v1/mon-1/obs", payload % i, qos=qos)
    if qos:
        done.wait(120)
    else:
        c.publish("vigil/v1/mon-1/status", b"{}", qos=1).wait_for_publish(120)
    print(f"{n / (time.perf_counter() - t0):.0f}")
    c.disconnect(); c.loop_stop()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("qos", [1, 0])
async def test_throughput_with_a_paho_publisher(hub: Hub, qos: int) -> None:
    n = 20000
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PUBLISHER,
        str(hub.port),
        str(n),
        str(qos),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, out
    obs = hub.ingest.from_device("mon-1")
    assert len([c for c in obs if c[2] == "obs"]) == n
    seqs = [int(c[3].split(b",")[0].split(b":")[1]) for c in obs if c[2] == "obs"]
    assert seqs == list(range(n))  # handed to ingest in publish order
    print(
        f"\nembedded broker, paho publisher in another process, QoS {qos}: {out.decode().strip()} msg/s "
        f"({'every PUBACK after ingest returned' if qos else 'until a final QoS 1 publish was acked'})"
    )


async def test_qos2_publish_reaches_ingest_once_and_completes(hub: Hub) -> None:
    c = paho_device(hub.port, "mon-2")
    done: list[int] = []
    c.on_publish = lambda _c, _u, mid, *_: done.append(mid)
    await paho_connect(c, hub.port)
    try:
        info = c.publish("vigil/v1/mon-2/pump", b'{"seq": 9, "state": "running"}', qos=2)
        await eventually(lambda: done == [info.mid])
        assert hub.ingest.calls == [("mqtt", "mon-2", "pump", b'{"seq": 9, "state": "running"}')]
    finally:
        c.loop_stop()
        c.disconnect()
