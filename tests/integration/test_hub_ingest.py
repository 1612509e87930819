"""Device messages over MQTT into the real hub (`vigil run`), seen as a nurse or an operator would see them.

One hub serves the module. Each test keeps to its own device-time minute (`window()`) and its own `boot`, so
the tests never see each other's readings or sequence numbers; metrics are compared before and after.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import pytest

from tests.hub import Hub

T = TypeVar("T")
WAIT = 15.0

HOUR_MS = 3_600_000
# Device time of the tests: whole minutes two days back, well inside the retention window.
BASE_MS = (time.time_ns() // 1_000_000 // HOUR_MS - 48) * HOUR_MS
_minutes = itertools.count(1)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    """UTC with milliseconds, as Vigil writes times."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def until(hub: Hub, predicate: Callable[[], T]) -> T:
    """`hub.wait_for` with room for a loaded CI machine (the hub answers in milliseconds when idle)."""
    found: T = hub.wait_for(predicate, timeout=WAIT)
    return found


def window() -> int:
    """The start of a device-time minute no other test uses."""
    return BASE_MS + next(_minutes) * 60_000


class Device:
    """A registered device that publishes with mosquitto_pub (QoS 1: it returns once the hub acknowledged)."""

    def __init__(self, hub: Hub, device_id: str, secret: str, patient_id: str | None) -> None:
        self.hub = hub
        self.id = device_id
        self.secret = secret
        self.patient_id = patient_id

    def pub(
        self,
        payload: dict[str, Any] | bytes,
        *,
        kind: str = "obs",
        topic: str | None = None,
        secret: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.hub.mqtt_port), "-q", "1"]
        argv += ["-u", self.id, "-P", self.secret if secret is None else secret]
        argv += ["-t", topic or f"vigil/v1/{self.id}/{kind}", "-s"]
        return subprocess.run(argv, input=data, capture_output=True, check=False, timeout=20)

    def send(self, payload: dict[str, Any] | bytes, **kw: Any) -> None:
        r = self.pub(payload, **kw)
        assert r.returncode == 0, r.stderr.decode(errors="replace")


def vitals(
    hub: Hub, patient_id: str, code: str, since: int, until: int | None = None
) -> list[dict[str, Any]]:
    """The trend a clinician reads: GET /api/v1/patients/{id}/vitals."""
    params = {"code": code, "since": iso(since)}
    if until is not None:
        params["until"] = iso(until)
    r = hub.api("GET", f"/api/v1/patients/{patient_id}/vitals", params=params)
    assert r.status_code == 200, r.text
    return list(r.json()["points"])


def in_window(hub: Hub, patient_id: str, code: str, start: int) -> list[dict[str, Any]]:
    return vitals(hub, patient_id, code, start, start + 59_999)


def deadletters(hub: Hub, since: int, **match: Any) -> list[dict[str, Any]]:
    """What an operator reads at GET /api/v1/deadletters, filtered by the given fields."""
    r = hub.api("GET", "/api/v1/deadletters", params={"since": iso(since), "limit": 1000})
    assert r.status_code == 200, r.text
    return [d for d in r.json()["items"] if all(d.get(k) == v for k, v in match.items())]


def deadletter_count(hub: Hub, reason: str) -> float:
    return hub.metric("vigil_deadletter_total", reason=reason)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("hub-ingest") / "hub").start()
    try:
        yield h
    finally:
        h.stop()


def _add(hub: Hub, device_id: str, bed: str, patient: str) -> Device:
    out = hub.add_device(device_id, "monitor", "--unit", "icu", "--bed", bed, "--patient", patient)
    return Device(hub, out["id"], out["secret"], patient)


@pytest.fixture(scope="module")
def mon(hub: Hub) -> Device:
    return _add(hub, "mon-a", "icu-a", "P-A")


@pytest.fixture(scope="module")
def other(hub: Hub) -> Device:
    return _add(hub, "mon-b", "icu-b", "P-B")


def obs(start: int, *items: dict[str, Any], seq: int = 1, boot: str, offset_ms: int = 0) -> dict[str, Any]:
    return {"seq": seq, "boot": boot, "ts": iso(start + offset_ms), "obs": list(items)}


def test_unmeasurable_spo2_is_dead_lettered_and_the_rest_of_the_message_stored(hub: Hub, mon: Device) -> None:
    t0, start = now_ms(), window()
    before = deadletter_count(hub, "value_range")
    mon.send(
        obs(
            start,
            {"code": "spo2", "value": 130},
            {"code": "hr", "value": 72},
            {"code": "MDC_RESP_RATE", "value": 16, "unit": "/min"},
            boot="range",
        )
    )
    [hr] = until(hub, lambda: in_window(hub, "P-A", "hr", start))
    assert (hr["ts"], hr["value"], hr["unit"], hr["flags"]) == (iso(start), 72, "/min", [])
    assert [p["value"] for p in until(hub, lambda: in_window(hub, "P-A", "rr", start))] == [16]
    [dl] = until(hub, lambda: deadletters(hub, t0, reason="value_range", device_id="mon-a"))
    assert dl["kind"] == "obs" and dl["transport"] == "mqtt"
    assert "130" in dl["payload"] and "spo2" in dl["payload"]
    assert in_window(hub, "P-A", "spo2", start) == []
    assert deadletter_count(hub, "value_range") == before + 1


def test_hr_350_is_stored_flagged_artifact(hub: Hub, mon: Device) -> None:
    start = window()
    mon.send(obs(start, {"code": "hr", "value": 350}, boot="artifact"))
    [hr] = until(hub, lambda: in_window(hub, "P-A", "hr", start))
    assert (hr["value"], hr["flags"]) == (350, ["artifact"])


def test_hr_0_and_rr_0_are_real_readings(hub: Hub, mon: Device) -> None:
    start = window()
    mon.send(obs(start, {"code": "hr", "value": 0}, {"code": "rr", "value": 0}, boot="zero"))
    [hr] = until(hub, lambda: in_window(hub, "P-A", "hr", start))
    [rr] = until(hub, lambda: in_window(hub, "P-A", "rr", start))
    assert (hr["value"], hr["flags"]) == (0, [])
    assert (rr["value"], rr["flags"]) == (0, [])


def test_malformed_and_oversized_are_dead_lettered_and_the_hub_keeps_serving(hub: Hub, mon: Device) -> None:
    t0, start = now_ms(), window()
    malformed, oversized = deadletter_count(hub, "malformed"), deadletter_count(hub, "oversized")
    mon.send(b'{"seq": 1, "boot": "bad", "obs": [{"code": "hr", "value": 7')
    big = obs(start, {"code": "hr", "value": 99}, seq=2, boot="bad")
    big["pad"] = "x" * (70 * 1024)
    mon.send(json.dumps(big).encode())
    mon.send(obs(start, {"code": "hr", "value": 64}, seq=3, boot="bad", offset_ms=1000))

    [hr] = until(hub, lambda: in_window(hub, "P-A", "hr", start))
    assert (hr["ts"], hr["value"]) == (iso(start + 1000), 64)  # the good one; not the oversized one's 99

    def reasons() -> list[str]:
        return sorted(d["reason"] for d in deadletters(hub, t0, device_id="mon-a"))

    until(hub, lambda: reasons() == ["malformed", "oversized"])
    assert deadletter_count(hub, "malformed") == malformed + 1
    assert deadletter_count(hub, "oversized") == oversized + 1


def test_wrong_secret_cannot_connect_and_nothing_is_stored(hub: Hub, mon: Device) -> None:
    start = window()
    ingested = hub.metric("vigil_ingest_total", transport="mqtt", kind="obs")
    r = mon.pub(obs(start, {"code": "hr", "value": 111}, boot="wrong"), secret="not-the-secret")
    assert r.returncode != 0
    assert b"not authori" in (r.stdout + r.stderr).lower(), r.stderr
    # The device's next message, with the right secret, goes through; only it is stored.
    mon.send(obs(start, {"code": "hr", "value": 66}, seq=2, boot="wrong", offset_ms=1000))
    [hr] = until(hub, lambda: in_window(hub, "P-A", "hr", start))
    assert hr["value"] == 66
    assert hub.metric("vigil_ingest_total", transport="mqtt", kind="obs") == ingested + 1


def test_a_device_publishing_on_another_devices_topic_is_never_stored_under_it(
    hub: Hub, mon: Device, other: Device
) -> None:
    t0, start = now_ms(), window()
    before = deadletter_count(hub, "unauthorised")
    r = mon.pub(obs(start, {"code": "hr", "value": 150}, boot="spoof"), topic="vigil/v1/mon-b/obs")
    assert r.returncode == 0  # MQTT 3.1.1 has no negative PUBACK; the refusal is dead-lettered
    [dl] = until(hub, lambda: deadletters(hub, t0, reason="unauthorised", device_id="mon-a"))
    assert "150" in dl["payload"]
    assert deadletter_count(hub, "unauthorised") == before + 1
    # mon-b's own reading after it is stored; the spoofed one is under neither patient.
    other.send(obs(start, {"code": "hr", "value": 81}, boot="spoof", offset_ms=1000))
    assert [p["value"] for p in until(hub, lambda: in_window(hub, "P-B", "hr", start))] == [81]
    assert in_window(hub, "P-A", "hr", start) == []


def test_a_repeated_boot_and_seq_is_stored_once_and_counted(hub: Hub, mon: Device) -> None:
    start = window()
    dups = hub.metric("vigil_duplicates_total")
    message = obs(start, {"code": "hr", "value": 77}, seq=5, boot="dup")
    mon.send(message)
    mon.send(message)
    until(hub, lambda: hub.metric("vigil_duplicates_total") == dups + 1)
    # A different reading under the same (boot, seq) is the same message, too.
    mon.send(obs(start, {"code": "hr", "value": 78}, seq=5, boot="dup", offset_ms=500))
    until(hub, lambda: hub.metric("vigil_duplicates_total") == dups + 2)
    [hr] = in_window(hub, "P-A", "hr", start)
    assert (hr["ts"], hr["value"]) == (iso(start), 77)
    # The same seq under a new boot is a new message.
    mon.send(obs(start, {"code": "hr", "value": 79}, seq=5, boot="dup2", offset_ms=2000))
    got = until(hub, lambda: [p["value"] for p in in_window(hub, "P-A", "hr", start)] == [77, 79])
    assert got
    assert hub.metric("vigil_duplicates_total") == dups + 2


def test_a_repeated_message_id_is_stored_once(hub: Hub, mon: Device) -> None:
    start = window()
    dups = hub.metric("vigil_duplicates_total")
    for offset, value in [(0, 91), (1000, 92)]:  # the id wins over seq and ts
        mon.send(
            {"id": "msg-7", "seq": offset, "ts": iso(start + offset), "obs": [{"code": "hr", "value": value}]}
        )
    until(hub, lambda: hub.metric("vigil_duplicates_total") == dups + 1)
    assert [(p["ts"], p["value"]) for p in in_window(hub, "P-A", "hr", start)] == [(iso(start), 91)]


def test_a_late_lower_seq_is_stored_in_device_time_order(hub: Hub, mon: Device) -> None:
    start = window()
    for seq, value in [(10, 70), (12, 72), (11, 71)]:
        mon.send(obs(start, {"code": "hr", "value": value}, seq=seq, boot="late", offset_ms=seq * 1000))
    until(hub, lambda: len(in_window(hub, "P-A", "hr", start)) == 3)
    points = in_window(hub, "P-A", "hr", start)
    assert [(p["ts"], p["value"]) for p in points] == [
        (iso(start + 10_000), 70),
        (iso(start + 11_000), 71),
        (iso(start + 12_000), 72),
    ]


def test_an_unknown_code_is_dead_lettered(hub: Hub, mon: Device) -> None:
    t0, start = now_ms(), window()
    before = deadletter_count(hub, "unknown_code")
    mon.send(obs(start, {"code": "MDC_NO_SUCH_THING", "value": 1}, {"code": "hr", "value": 88}, boot="code"))
    [dl] = until(hub, lambda: deadletters(hub, t0, reason="unknown_code", device_id="mon-a"))
    assert "MDC_NO_SUCH_THING" in dl["payload"]
    assert [p["value"] for p in until(hub, lambda: in_window(hub, "P-A", "hr", start))] == [88]
    assert deadletter_count(hub, "unknown_code") == before + 1


def test_fahrenheit_is_stored_in_celsius(hub: Hub, mon: Device) -> None:
    start = window()
    mon.send(obs(start, {"code": "temp", "value": 101.3, "unit": "[degF]"}, boot="unit"))
    [temp] = until(hub, lambda: in_window(hub, "P-A", "temp", start))
    assert temp["unit"] == "Cel"
    assert temp["value"] == pytest.approx(38.5, abs=1e-9)
    assert temp["flags"] == []


def test_a_ts_ten_minutes_ahead_is_stored_flagged_future_ts_at_its_received_time(
    hub: Hub, mon: Device
) -> None:
    t0 = now_ms()
    mon.send({"seq": 1, "boot": "future", "ts": iso(t0 + 600_000), "obs": [{"code": "etco2", "value": 41}]})
    [p] = until(hub, lambda: vitals(hub, "P-A", "etco2", t0 - 1000))
    assert p["flags"] == ["future_ts"]
    assert p["value"] == 41
    stored = datetime.fromisoformat(p["ts"]).timestamp() * 1000
    assert t0 - 1000 <= stored <= now_ms()  # ordered by received time, not the device's clock


def test_a_ts_older_than_the_retention_window_is_dead_lettered_stale(hub: Hub, mon: Device) -> None:
    t0 = now_ms()
    before = deadletter_count(hub, "stale")
    mon.send({"seq": 1, "boot": "stale", "ts": "2020-01-01T00:00:00Z", "obs": [{"code": "pr", "value": 70}]})
    [dl] = until(hub, lambda: deadletters(hub, t0, reason="stale", device_id="mon-a"))
    assert "2020-01-01" in dl["payload"]
    assert deadletter_count(hub, "stale") == before + 1
    assert vitals(hub, "P-A", "pr", 0) == []


def test_a_device_added_while_the_hub_runs_publishes_within_two_seconds(hub: Hub) -> None:
    start = window()
    out = hub.add_device("mon-late", "monitor", "--patient", "P-LATE")
    added = time.monotonic()
    dev = Device(hub, "mon-late", out["secret"], "P-LATE")
    message = obs(start, {"code": "hr", "value": 90}, boot="new")
    while (r := dev.pub(message)).returncode != 0:
        assert time.monotonic() - added < 2.0, r.stderr
        time.sleep(0.1)
    assert time.monotonic() - added < 2.0
    assert [p["value"] for p in until(hub, lambda: in_window(hub, "P-LATE", "hr", start))] == [90]


def test_cbor_over_mqtt_is_accepted(hub: Hub, mon: Device, tmp_path: Path) -> None:
    start = window()
    payload = cbor2.dumps(
        {
            "seq": 1,
            "boot": "cbor",
            "ts": start,
            "obs": [{"code": 147842, "value": 58}, {"code": "spo2", "value": 96}],
        }
    )
    assert 0xA0 <= payload[0] <= 0xBF
    mon.send(payload)
    [hr] = until(hub, lambda: in_window(hub, "P-A", "hr", start))
    [spo2] = until(hub, lambda: in_window(hub, "P-A", "spo2", start))
    assert (hr["value"], spo2["value"], spo2["unit"]) == (58, 96, "%")


def test_readmitting_a_bed_moves_attribution_forward_never_backward(hub: Hub) -> None:
    start = window()
    dev = _add(hub, "mon-bed", "icu-7", "P-OLD")
    dev.send(obs(start, {"code": "hr", "value": 61}, seq=1, boot="bed"))
    until(hub, lambda: in_window(hub, "P-OLD", "hr", start))

    r = hub.api("PUT", "/api/v1/beds/icu-7/patient", json={"patient_id": "P-NEW"})
    assert r.status_code == 200, r.text
    assert r.json()["previous_patient_id"] == "P-OLD"
    dev.send(obs(start, {"code": "hr", "value": 62}, seq=2, boot="bed", offset_ms=1000))

    [new] = until(hub, lambda: in_window(hub, "P-NEW", "hr", start))
    assert (new["ts"], new["value"]) == (iso(start + 1000), 62)
    [old] = in_window(hub, "P-OLD", "hr", start)  # the earlier reading stays with the earlier patient
    assert (old["ts"], old["value"]) == (iso(start), 61)
