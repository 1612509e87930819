"""`kill -9` of the real hub under load loses nothing it acknowledged, and a device's resend is stored once.

A paho-mqtt device publishes 3000 QoS 1 readings as fast as it can; a third of the way through (by PUBACKs
received) the hub is killed with SIGKILL, then started again on the same ports and data dir. Every reading
the device saw acknowledged must be in the patient's trend before the device even reconnects; after the
device's client resends what it had in flight, all 3000 are there, each exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.hub import Hub

N = 3000
KILL_AFTER = N // 3
STEP_MS = 1000  # reading i has device time BASE + i * STEP_MS, so a stored ts names its reading


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def parse_ms(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(tmp_path / "hub").start()
    try:
        yield h
    finally:
        h.stop()


class Publisher:
    """A device on paho-mqtt (v2 callbacks): a persistent session, its PUBACKs recorded by message id."""

    def __init__(self, hub: Hub, device_id: str, secret: str) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{device_id}-dur", clean_session=False
        )
        self.client.username_pw_set(device_id, secret)
        self.client.max_inflight_messages_set(200)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.hub = hub
        self.topic = f"vigil/v1/{device_id}/obs"
        self.connected = threading.Event()
        self.acked: set[int] = set()
        self.seq_of: dict[int, int] = {}  # mid -> seq

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, *rest: object) -> None:
        self.acked.add(mid)

    def _on_connect(self, client: paho.Client, userdata: object, *rest: object) -> None:
        self.connected.set()

    def connect(self) -> None:
        self.connected.clear()
        self.client.connect("127.0.0.1", self.hub.mqtt_port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(10), "the device could not connect"

    def publish(self, seq: int, payload: bytes) -> None:
        info = self.client.publish(self.topic, payload, qos=1)
        assert info.rc == paho.MQTT_ERR_SUCCESS, info.rc
        self.seq_of[info.mid] = seq

    def acked_seqs(self) -> set[int]:
        return {self.seq_of[m] for m in list(self.acked)}


def stored_seqs(hub: Hub, patient_id: str, base: int) -> list[int]:
    """The readings (by seq) in the patient's HR trend, one entry per stored point."""
    r = hub.api(
        "GET",
        f"/api/v1/patients/{patient_id}/vitals",
        params={"code": "hr", "since": iso(base), "until": iso(base + N * STEP_MS), "limit": 100_000},
    )
    assert r.status_code == 200, r.text
    return [(parse_ms(p["ts"]) - base) // STEP_MS for p in r.json()["points"]]


def settled(hub: Hub, patient_id: str, base: int, quiet: float = 0.5) -> list[int]:
    """The trend once nothing new has arrived for `quiet` seconds."""
    last = stored_seqs(hub, patient_id, base)
    while True:
        time.sleep(quiet)
        now = stored_seqs(hub, patient_id, base)
        if now == last:
            return now
        last = now


def test_kill9_under_load_loses_no_acknowledged_reading_and_stores_each_once(hub: Hub) -> None:
    dev = hub.add_device("mon-k", "monitor", "--unit", "icu", "--bed", "icu-k", "--patient", "P-K")
    base = (time.time_ns() // 1_000_000 // 1000 - 2 * N) * 1000  # device time: the last two hours
    payloads = [
        json.dumps(
            {"seq": i, "boot": "k1", "ts": base + i * STEP_MS, "obs": [{"code": "hr", "value": 40 + i % 100}]}
        ).encode()
        for i in range(N)
    ]
    device = Publisher(hub, "mon-k", dev["secret"])
    device.connect()
    try:
        for seq, payload in enumerate(payloads):
            device.publish(seq, payload)
        deadline = time.monotonic() + 20
        while len(device.acked) < KILL_AFTER:
            assert time.monotonic() < deadline, f"only {len(device.acked)} PUBACKs in 20 s"
            time.sleep(0.001)
        hub.kill9()
        device.client.loop_stop()  # the device waits for the hub to come back
        acked_at_kill = device.acked_seqs()
        assert KILL_AFTER <= len(acked_at_kill) < N, len(acked_at_kill)

        hub.start()
        # Everything acknowledged before the kill is there, before the device sends anything again.
        hub.wait_for(lambda: acked_at_kill <= set(stored_seqs(hub, "P-K", base)), timeout=15, interval=0.2)
        before_resend = settled(hub, "P-K", base, quiet=1.0)
        assert len(before_resend) == len(set(before_resend)), "a reading was stored twice"
        # Appended but not acknowledged when the hub died: the device will send these again.
        in_log_unacked = set(before_resend) - acked_at_kill

        device.connect()
        hub.wait_for(lambda: len(device.acked) == N, timeout=20, interval=0.1)
        hub.wait_for(lambda: len(stored_seqs(hub, "P-K", base)) >= N, timeout=15, interval=0.2)
        final = settled(hub, "P-K", base)
    finally:
        device.client.loop_stop()
        device.client.disconnect()

    twice = sorted(seq for seq, n in Counter(final).items() if n > 1)
    assert twice == [], f"stored more than once: {twice[:20]}"
    assert set(final) == set(range(N)), f"missing: {sorted(set(range(N)) - set(final))[:20]}"
    # Each resend of a reading that was already in the log was recognised as a duplicate, not stored again.
    assert hub.metric("vigil_duplicates_total") == len(in_log_unacked)
    assert hub.metric("vigil_ingest_total", transport="mqtt", kind="obs") == N - len(acked_at_kill)
