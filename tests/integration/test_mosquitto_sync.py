"""MosquittoSync against a real Mosquitto 2.0 with the dynamic-security plugin, checked with mosquitto_pub."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from gateway.mosquitto_sync import HUB_ROLE, MosquittoSync, mosquitto_conf
from tests.integration.test_broker import codes
from tests.servers import DynsecMosquitto, require

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PW = "vigil-hub", "hub-pw-1"


class Registry:
    """The registry's view handed to MosquittoSync: (device_id, secret, enabled)."""

    def __init__(self) -> None:
        self.devices: dict[str, tuple[str, bool]] = {"amb-1": ("secret-a", True), "amb-2": ("secret-b", True)}

    async def __call__(self) -> list[tuple[str, str, bool]]:
        return [(d, s, e) for d, (s, e) in self.devices.items()]


@dataclass
class Setup:
    broker: DynsecMosquitto
    registry: Registry
    sync: MosquittoSync


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    # Mosquitto started as root drops to its own user, which must reach and write its files: pytest's tmp_path
    # sits under a 0700 directory, so use a world-traversable one.
    tmp_path = Path(tempfile.mkdtemp(prefix="vigil-dynsec-", dir="/tmp"))
    tmp_path.chmod(0o777)
    dynsec = tmp_path / "dynsec.json"
    subprocess.run(
        [require("mosquitto_ctrl"), "dynsec", "init", str(dynsec), ADMIN, ADMIN_PW],
        check=True,
        capture_output=True,
    )
    dynsec.chmod(0o666)
    broker = DynsecMosquitto(tmp_path, dynsec=dynsec)
    broker.start()
    registry = Registry()
    sync = MosquittoSync(
        mqtt_host="127.0.0.1",
        mqtt_port=broker.port,
        admin_username=ADMIN,
        admin_password=ADMIN_PW,
        devices=registry,
    )
    try:
        yield Setup(broker, registry, sync)
    finally:
        broker.stop()
        shutil.rmtree(tmp_path, ignore_errors=True)


async def pub(port: int, user: str, password: str, topic: str, payload: str = "{}") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        require("mosquitto_pub"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-u",
        user,
        "-P",
        password,
        "-i",
        f"{user}-pub",
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        payload,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out.decode(errors="replace")


def hub_client(port: int, name: str) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, username=ADMIN, password=ADMIN_PW, identifier=name)


async def test_synced_devices_authenticate_and_publish_only_as_themselves(setup: Setup) -> None:
    port = setup.broker.port
    assert await setup.sync.sync() > 0
    assert await setup.sync.sync() == 0  # nothing changed: nothing sent

    rc, out = await pub(port, "amb-1", "wrong", "vigil/v1/amb-1/gps")
    assert rc != 0 and "not authori" in out.lower(), out

    async with hub_client(port, "hub-watch") as hub:
        await hub.subscribe("vigil/v1/#", qos=1)
        assert (await pub(port, "amb-1", "secret-a", "vigil/v1/amb-2/gps", "spoof"))[0] == 0
        assert (await pub(port, "amb-1", "secret-a", "vigil/v1/amb-1/gps", "own"))[0] == 0
        assert (await pub(port, "amb-2", "secret-b", "vigil/v1/amb-2/gps", "b-own"))[0] == 0
        got = [await asyncio.wait_for(anext(hub.messages), 10) for _ in range(2)]
        assert [(str(m.topic), m.payload) for m in got] == [
            ("vigil/v1/amb-1/gps", b"own"),
            ("vigil/v1/amb-2/gps", b"b-own"),
        ]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(hub.messages), 0.5)


async def test_commands_reach_only_their_device_and_the_hub_role_is_granted(setup: Setup) -> None:
    port = setup.broker.port
    await setup.sync.sync()
    async with aiomqtt.Client(
        "127.0.0.1", port, username="amb-1", password="secret-a", identifier="amb-1-sub"
    ) as dev:
        assert codes(await dev.subscribe("vigil/v1/amb-1/cmd", qos=1)) == [1]
        assert codes(await dev.subscribe("vigil/v1/amb-2/cmd", qos=1)) == [0x80]
        async with hub_client(port, "hub-cmd") as hub:
            # The hub's role: subscribe to every device topic (also shared), publish commands.
            granted = await hub.subscribe("$share/vigil/vigil/v1/+/+", qos=1)
            assert codes(granted) == [1]
            await hub.publish("vigil/v1/amb-1/cmd", b'{"incident_id": "I-17"}', qos=1)
        msg = await asyncio.wait_for(anext(dev.messages), 10)
        assert (str(msg.topic), msg.payload) == ("vigil/v1/amb-1/cmd", b'{"incident_id": "I-17"}')
    (answer,) = await setup.sync._request([{"command": "getClient", "username": ADMIN}])
    assert HUB_ROLE in {r["rolename"] for r in answer["data"]["client"]["roles"]}


async def test_disabled_removed_and_added_devices_follow_the_registry(setup: Setup) -> None:
    port = setup.broker.port
    await setup.sync.sync()
    assert (await pub(port, "amb-2", "secret-b", "vigil/v1/amb-2/gps"))[0] == 0

    setup.registry.devices["amb-2"] = ("secret-b", False)
    setup.registry.devices["amb-3"] = ("secret-c", True)
    assert await setup.sync.sync() > 0
    rc, out = await pub(port, "amb-2", "secret-b", "vigil/v1/amb-2/gps")
    assert rc != 0 and "not authori" in out.lower(), out
    assert (await pub(port, "amb-3", "secret-c", "vigil/v1/amb-3/gps"))[0] == 0

    del setup.registry.devices["amb-3"]  # removed from the registry: disabled in Mosquitto
    setup.registry.devices["amb-1"] = ("secret-a2", True)  # a new secret
    await setup.sync.sync()
    assert (await pub(port, "amb-3", "secret-c", "vigil/v1/amb-3/gps"))[0] != 0
    assert (await pub(port, "amb-1", "secret-a", "vigil/v1/amb-1/gps"))[0] != 0
    assert (await pub(port, "amb-1", "secret-a2", "vigil/v1/amb-1/gps"))[0] == 0

    setup.registry.devices["amb-3"] = ("secret-c", True)  # registered again
    setup.registry.devices["amb-2"] = ("secret-b", True)
    await setup.sync.sync()
    assert (await pub(port, "amb-3", "secret-c", "vigil/v1/amb-3/gps"))[0] == 0
    assert (await pub(port, "amb-2", "secret-b", "vigil/v1/amb-2/gps"))[0] == 0


async def test_a_restarted_hub_reads_mosquitto_and_converges(setup: Setup) -> None:
    port = setup.broker.port
    await setup.sync.sync()
    setup.registry.devices["amb-2"] = ("secret-b", False)
    fresh = MosquittoSync(
        mqtt_host="127.0.0.1",
        mqtt_port=port,
        admin_username=ADMIN,
        admin_password=ADMIN_PW,
        devices=setup.registry,
    )
    assert await fresh.sync() > 0
    assert await fresh.sync() == 0
    assert (await pub(port, "amb-1", "secret-a", "vigil/v1/amb-1/gps"))[0] == 0
    assert (await pub(port, "amb-2", "secret-b", "vigil/v1/amb-2/gps"))[0] != 0


async def test_run_loop_picks_up_a_device_added_later(setup: Setup) -> None:
    task = asyncio.create_task(setup.sync.run(interval=0.1))
    try:
        setup.registry.devices["pend-7"] = ("secret-p", True)
        for _ in range(100):
            if (await pub(setup.broker.port, "pend-7", "secret-p", "vigil/v1/pend-7/sos"))[0] == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("pend-7 never became able to publish")
    finally:
        task.cancel()


def test_shipped_config_has_what_design_requires() -> None:
    conf = mosquitto_conf(1883, "/var/lib/vigil/dynsec.json")
    for line in [
        "per_listener_settings false",
        "set_tcp_nodelay true",
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        "message_size_limit 0",
        "persistence true",
        "allow_anonymous false",
        "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "plugin_opt_config_file /var/lib/vigil/dynsec.json",
        "listener 1883",
    ]:
        assert line in conf.splitlines()
