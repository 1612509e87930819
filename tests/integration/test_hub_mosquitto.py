"""The hub behind an external Mosquitto with the dynamic-security plugin, end to end (contract section 3).

`vigil run` with VIGIL_MQTT_URL keeps Mosquitto's clients in step with the registry and consumes device topics
on a persistent QoS 1 session; devices publish with mosquitto_pub, as real ones would.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.hub import Hub
from tests.servers import DynsecMosquitto, Mosquitto, dynsec_mosquitto, require

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PW = "vigil-admin", "admin-pw-1"


@dataclass
class Setup:
    broker: DynsecMosquitto
    hub: Hub


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("hub-mosquitto")
    broker = dynsec_mosquitto(tmp, ADMIN, ADMIN_PW)
    broker.start()
    hub = Hub(tmp / "hub", env_extra={"VIGIL_MQTT_URL": f"mqtt://{ADMIN}:{ADMIN_PW}@127.0.0.1:{broker.port}"})
    try:
        hub.start()
        yield Setup(broker, hub)
    finally:
        hub.stop()
        broker.stop()


def pub(
    broker: Mosquitto, device: str, secret: str, topic: str, payloads: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """Publish each payload as one QoS 1 message, in one connection, as the device."""
    return subprocess.run(
        [
            *(require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(broker.port)),
            *("-u", device, "-P", secret, "-i", f"{device}-pub", "-q", "1", "-t", topic, "-l"),
        ],
        input="".join(json.dumps(p) + "\n" for p in payloads),
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    )


def obs(seq: int, hr: float, **extra: Any) -> dict[str, Any]:
    return {"seq": seq, "boot": "b1", "obs": [{"code": "hr", "value": hr}], **extra}


def hr_of(hub: Hub, patient: str) -> Any:
    r = hub.api("GET", f"/api/v1/patients/{patient}")
    assert r.status_code == 200, r.text
    return r.json()["vitals"].get("hr", {}).get("value")


def hr_points(hub: Hub, patient: str) -> list[float]:
    since = str(int(time.time() * 1000) - 3_600_000)
    r = hub.api("GET", f"/api/v1/patients/{patient}/vitals", params={"code": "hr", "since": since})
    assert r.status_code == 200, r.text
    return [p["value"] for p in r.json()["points"]]


def publish_when_allowed(s: Setup, device: str, secret: str, payloads: list[dict[str, Any]]) -> float:
    """Retry until Mosquitto accepts the device (the hub syncs it within seconds); answers the wait."""
    t0 = time.monotonic()
    while True:
        r = pub(s.broker, device, secret, f"vigil/v1/{device}/obs", payloads)
        if r.returncode == 0:
            return time.monotonic() - t0
        assert "not authori" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
        if time.monotonic() - t0 > 10:
            raise AssertionError(
                f"{device} still refused by Mosquitto after 10 s\n{s.hub.proc and s.hub.proc.tail()}"
            )
        time.sleep(0.2)


def test_a_device_added_while_the_hub_runs_can_publish_within_seconds(setup: Setup) -> None:
    hub = setup.hub
    before = hub.metric("vigil_ingest_total", transport="mqtt", kind="obs")
    dev = hub.add_device("mon-new", "monitor", "--unit", "icu", "--bed", "icu-1", "--patient", "P-NEW")
    # The hub pushes the registry to Mosquitto every second: accepted within seconds (10 s on a busy machine).
    publish_when_allowed(setup, "mon-new", dev["secret"], [obs(1, 88)])
    assert hub.wait_for(lambda: hr_of(hub, "P-NEW"), timeout=5) == 88
    assert hub.metric("vigil_ingest_total", transport="mqtt", kind="obs") == before + 1


def test_a_wrong_secret_is_refused_by_mosquitto(setup: Setup) -> None:
    hub = setup.hub
    dev = hub.add_device("mon-pw", "monitor", "--bed", "pw-1", "--patient", "P-PW")
    publish_when_allowed(setup, "mon-pw", dev["secret"], [obs(1, 70)])  # the device itself is known
    for secret in ["wrong-secret", dev["secret"][:-1], ""]:
        r = pub(setup.broker, "mon-pw", secret, "vigil/v1/mon-pw/obs", [obs(2, 199)])
        assert r.returncode != 0, f"secret {secret!r} accepted"
        assert "not authori" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    # A name Vigil never registered gets nowhere either.
    r = pub(setup.broker, "ghost", "whatever", "vigil/v1/ghost/obs", [obs(1, 50)])
    assert r.returncode != 0
    time.sleep(0.5)
    assert hr_points(hub, "P-PW") == [70]


def test_a_device_cannot_publish_as_another(setup: Setup) -> None:
    hub = setup.hub
    a = hub.add_device("mon-a", "monitor", "--bed", "a-1", "--patient", "P-A")
    b = hub.add_device("mon-b", "monitor", "--bed", "b-1", "--patient", "P-B")
    publish_when_allowed(setup, "mon-b", b["secret"], [])  # B is known to Mosquitto (no message sent)
    publish_when_allowed(setup, "mon-a", a["secret"], [])
    before = hub.metric("vigil_ingest_total", transport="mqtt", kind="obs")

    # A, authenticated as itself, publishes on B's topics (obs, and a pendant-style SOS for good measure),
    # then on its own: Mosquitto's ACL drops the first two, so once A's own reading is stored, anything that
    # had reached Vigil before it would be stored too.
    r = pub(setup.broker, "mon-a", a["secret"], "vigil/v1/mon-b/obs", [obs(1, 222), obs(2, 223)])
    assert r.returncode == 0, r.stderr  # MQTT 3.1.1 has no way to say no to a QoS 1 publish: it is dropped
    r = pub(setup.broker, "mon-a", a["secret"], "vigil/v1/mon-b/sos", [{"seq": 1, "action": "press"}])
    assert r.returncode == 0, r.stderr
    assert pub(setup.broker, "mon-a", a["secret"], "vigil/v1/mon-a/obs", [obs(1, 71)]).returncode == 0
    assert hub.wait_for(lambda: hr_of(hub, "P-A"), timeout=5) == 71

    assert hr_of(hub, "P-B") is None
    assert hr_points(hub, "P-B") == []
    assert hub.metric("vigil_ingest_total", transport="mqtt", kind="obs") == before + 1
    assert hub.metric("vigil_ingest_total", transport="mqtt", kind="sos") == 0
    letters = hub.api("GET", "/api/v1/deadletters").json()["items"]
    assert [d for d in letters if d["device_id"] == "mon-b"] == []  # not even dead-lettered: never arrived
    # B's own reading still goes through.
    assert pub(setup.broker, "mon-b", b["secret"], "vigil/v1/mon-b/obs", [obs(1, 64)]).returncode == 0
    assert hub.wait_for(lambda: hr_of(hub, "P-B"), timeout=5) == 64
    assert hr_points(hub, "P-B") == [64]


def test_messages_published_while_the_hub_is_down_come_from_mosquittos_queue(setup: Setup) -> None:
    hub = setup.hub
    dev = hub.add_device("mon-q", "monitor", "--bed", "q-1", "--patient", "P-Q")
    # Each reading carries its device time, so the stored order is defined even when they arrive together.
    base = int(time.time() * 1000) - 60_000
    publish_when_allowed(setup, "mon-q", dev["secret"], [obs(1, 61, ts=base + 1000)])
    assert hub.wait_for(lambda: hr_of(hub, "P-Q"), timeout=5) == 61

    hub.stop()
    # The device's PUBACK comes from Mosquitto, which queues these for the hub's persistent session.
    queued = [obs(i, 60 + i, ts=base + i * 1000) for i in range(2, 22)]
    assert pub(setup.broker, "mon-q", dev["secret"], "vigil/v1/mon-q/obs", queued).returncode == 0
    hub.start()

    want = [60.0 + i for i in range(1, 22)]
    assert hub.wait_for(lambda: hr_points(hub, "P-Q") == want and want, timeout=10)
    assert hr_of(hub, "P-Q") == 81
    # Counters restart with the process: exactly the 20 queued messages were taken in, none twice.
    assert hub.metric("vigil_ingest_total", transport="mqtt", kind="obs") == 20
    assert hub.metric("vigil_duplicates_total") == 0


def test_a_kill9_of_the_hub_mid_stream_loses_nothing_mosquitto_acknowledged(setup: Setup) -> None:
    hub = setup.hub
    dev = hub.add_device("mon-k", "monitor", "--bed", "k-1", "--patient", "P-K")
    base = int(time.time() * 1000) - 120_000
    publish_when_allowed(setup, "mon-k", dev["secret"], [obs(1, 1, ts=base + 1)])
    assert hub.wait_for(lambda: hr_of(hub, "P-K"), timeout=5) == 1

    # Mosquitto acknowledges these to the device; the hub is killed while it is still taking them in, so
    # some are appended and unacknowledged, some in flight, some queued: Mosquitto redelivers what the hub
    # did not acknowledge, and deduplication keeps the ones it had appended from being stored twice.
    burst = [obs(i, i, ts=base + i) for i in range(2, 302)]
    assert pub(setup.broker, "mon-k", dev["secret"], "vigil/v1/mon-k/obs", burst).returncode == 0
    hub.kill9()
    hub.start()

    want = [float(i) for i in range(1, 302)]
    assert hub.wait_for(lambda: hr_points(hub, "P-K") == want and want, timeout=15)
