"""The vitals write-behind buffer through the real hub (design.md, Storage): a store outage and a `kill -9` of
the hub while the store is down lose no point. v1 (`/write`) against InfluxDB 1.6, v2 against VictoriaMetrics.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hub import Hub
from tests.servers import require
from tests.servers_tsdb import influxdb16, victoria_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICE, PATIENT = "mon-1", "P-1"


class Device:
    """A monitor publishing obs over the hub's embedded MQTT broker; each reading has its own device time."""

    def __init__(self, hub: Hub, secret: str) -> None:
        self.hub = hub
        self.secret = secret
        self.seq = 0
        self.base = int(time.time() * 1000) - 15 * 60_000  # well inside retention, well before now
        self.sent: dict[int, float] = {}  # ts -> value

    def publish(self, n: int) -> None:
        """Publish n readings with one mosquitto_pub (QoS 1); when it returns, the hub acknowledged all."""
        payloads = []
        for _ in range(n):
            self.seq += 1
            ts = self.base + self.seq * 1000
            value = 40 + self.seq % 150
            self.sent[ts] = value
            payloads.append(
                {"seq": self.seq, "boot": "b1", "ts": ts, "obs": [{"code": "hr", "value": value}]}
            )
        r = subprocess.run(
            [
                *(require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(self.hub.mqtt_port)),
                *(
                    "-u",
                    DEVICE,
                    "-P",
                    self.secret,
                    "-i",
                    DEVICE,
                    "-q",
                    "1",
                    "-t",
                    f"vigil/v1/{DEVICE}/obs",
                    "-l",
                ),
            ],
            input="".join(json.dumps(p) + "\n" for p in payloads),
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr

    def latest_hr(self) -> Any:
        r = self.hub.api("GET", f"/api/v1/patients/{PATIENT}")
        assert r.status_code == 200, r.text
        return r.json()["vitals"].get("hr", {}).get("value")


def start_hub(dir: Path, env: dict[str, str]) -> tuple[Hub, Device]:
    hub = Hub(dir, env_extra=env)
    dev = hub.add_device(DEVICE, "monitor", "--unit", "icu", "--bed", "icu-1", "--patient", PATIENT)
    hub.start()
    return hub, Device(hub, dev["secret"])


def readyz(hub: Hub) -> httpx.Response:
    return httpx.get(f"{hub.url}/readyz", timeout=5)


def test_v1_influxdb_outage_and_kill9_of_the_hub_lose_no_point(tmp_path: Path) -> None:
    n_before, n_during, n_after = 100, 100, 100
    with influxdb16(tmp_path / "influx") as influx:
        hub, device = start_hub(
            tmp_path / "hub",
            {"VIGIL_INFLUX_URL": influx.url, "VIGIL_INFLUX_API": "v1", "VIGIL_INFLUX_DB": "vigil"},
        )
        try:

            def stored() -> dict[int, float]:
                series = influx.query(f'SELECT "value" FROM "vitals" WHERE "patient" = \'{PATIENT}\'')
                return {int(t): v for s in series for t, v in s["values"]}

            device.publish(n_before)
            assert hub.wait_for(lambda: len(stored()) == n_before, timeout=15)
            assert readyz(hub).status_code == 200

            influx.stop()
            device.publish(n_during // 2)
            # The board keeps answering from the buffer, and readiness names the store that is down.
            assert hub.wait_for(lambda: device.latest_hr() == device.sent[max(device.sent)], timeout=10)
            r = hub.wait_for(lambda: (r := readyz(hub)).status_code == 503 and r, timeout=5)
            assert "vitals" in r.json()["not_ready"], r.text
            device.publish(n_during - n_during // 2)
            hub.kill9()  # right after the last PUBACK, with the store down and every point still queued

            hub.start()  # the store is still down: the hub must come up and keep the backlog
            # What was acknowledged before the kill is replayed from the hub's log into the buffer.
            assert hub.wait_for(lambda: device.latest_hr() == device.sent[max(device.sent)], timeout=10)
            influx.start()  # same port and data dir
            device.publish(n_after)

            n = n_before + n_during + n_after
            assert hub.wait_for(lambda: len(stored()) == n, timeout=30, interval=0.5)
            assert stored() == device.sent  # every timestamp once, with its value
            (count,) = influx.query(f'SELECT count("value") FROM "vitals" WHERE "patient" = \'{PATIENT}\'')
            assert count["values"][0][1] == n
            assert hub.wait_for(lambda: readyz(hub).status_code == 200, timeout=5)
        finally:
            hub.stop()


def test_v2_path_against_victoriametrics_with_an_outage(tmp_path: Path) -> None:
    with victoria_metrics(tmp_path / "vm") as vm:
        hub, device = start_hub(
            tmp_path / "hub",
            {
                "VIGIL_INFLUX_URL": vm.url,
                "VIGIL_INFLUX_API": "v2",
                "VIGIL_INFLUX_TOKEN": "test-token",
                "VIGIL_INFLUX_ORG": "vigil",
                "VIGIL_INFLUX_BUCKET": "vigil",
            },
        )
        try:
            match = f'{{__name__="vitals_value",patient="{PATIENT}"}}'
            device.publish(60)
            assert hub.wait_for(lambda: len(vm.distinct_timestamps(match)) == 60, timeout=15, interval=0.3)

            vm.stop()
            device.publish(60)
            assert hub.wait_for(lambda: device.latest_hr() == device.sent[max(device.sent)], timeout=10)
            vm.start()
            device.publish(60)

            assert hub.wait_for(lambda: len(vm.distinct_timestamps(match)) == 180, timeout=30, interval=0.5)
            series = vm.export(match)
            assert len(series) == 1, [s["metric"] for s in series]
            got = dict(zip(series[0]["timestamps"], series[0]["values"], strict=True))
            assert got == device.sent
        finally:
            hub.stop()
