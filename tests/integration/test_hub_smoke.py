"""The embedded hub end to end: a device publishes with mosquitto_pub, a clinician reads it back."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub import Hub


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(tmp_path / "hub").start()
    try:
        yield h
    finally:
        h.stop()


def pub(
    hub: Hub, device: str, secret: str, kind: str, payload: dict[str, object]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(hub.mqtt_port),
            "-u",
            device,
            "-P",
            secret,
            "-i",
            device,
            "-q",
            "1",
            "-t",
            f"vigil/v1/{device}/{kind}",
            "-m",
            json.dumps(payload),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_hr_published_over_mqtt_shows_in_the_patient_snapshot(hub: Hub) -> None:
    dev = hub.add_device("mon-1", "monitor", "--unit", "icu", "--bed", "icu-1", "--patient", "P-1")
    r = pub(hub, "mon-1", dev["secret"], "obs", {"seq": 1, "obs": [{"code": "hr", "value": 123}]})
    assert r.returncode == 0, r.stderr

    def hr() -> object:
        snap = hub.api("GET", "/api/v1/patients/P-1").json()
        return snap["vitals"].get("hr", {}).get("value")

    assert hub.wait_for(hr) == 123
    assert hub.metric("vigil_ingest_total", transport="mqtt", kind="obs") == 1
