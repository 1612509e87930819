"""Parity: the behaviour that defines Vigil, written once and run against both runtimes.

`embedded`: one `vigil run` (tests/hub.py). `scaled`: tansu, PostgreSQL, Redis, InfluxDB 1.6 (v1, InfluxQL),
Mosquitto with dynamic security and two each of `vigil gateway`, `vigil worker`, `vigil api`
(tests/scaled_hub.py over vigil/devstack.py). One hub per runtime serves the module; each test keeps to its
own devices, beds, patients and `boot`, and reads device-time windows no other test writes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.hub import Hub
from tests.scaled_hub import ScaledHub
from vigil.settings import DEFAULT_CONFIG_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AnyHub = Hub | ScaledHub
T = TypeVar("T")
Msg = dict[str, Any]
WAIT = 30.0  # the scaled runtime's first batch waits for faust's consumer group to settle
HOUR_MS = 3_600_000
BASE_MS = (time.time_ns() // 1_000_000 // HOUR_MS - 48) * HOUR_MS  # device time: two days back
_minutes = itertools.count(1)


FAST_ESCALATION = """
version: 1
default:
  levels:
    - {after_s: 0, notify: [assignee]}
    - {after_s: 6, notify: ["role:charge_nurse"]}
    - {after_s: 12, notify: ["group:rapid_response"]}
  repeat_s: 6
"""


def fast_config(root: Path) -> dict[str, str]:
    """The shipped rules with a faster escalation, so escalation tests take seconds, not minutes."""
    conf = root / "config"
    conf.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEFAULT_CONFIG_DIR / "rules.yaml", conf / "rules.yaml")
    (conf / "escalation.yaml").write_text(FAST_ESCALATION)
    return {"VIGIL_CONFIG_DIR": str(conf)}


@pytest.fixture(scope="module", params=["embedded", "scaled"])
def hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnyHub]:
    """The hub of one runtime, started once for the module."""
    root = tmp_path_factory.mktemp(f"parity-{request.param}")
    env = fast_config(root)
    h: AnyHub = (
        Hub(root / "hub", env_extra=env)
        if request.param == "embedded"
        else ScaledHub(root / "hub", env_extra=env)
    )
    h.start()
    try:
        yield h
    finally:
        h.stop()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def window() -> int:
    return BASE_MS + next(_minutes) * 60_000


def until(hub: AnyHub, predicate: Callable[[], T]) -> T:
    found: T = hub.wait_for(predicate, timeout=WAIT, interval=0.1)
    return found


class Device:
    def __init__(self, hub: AnyHub, device_id: str, bed: str, patient: str, unit: str = "par-icu") -> None:
        out = hub.add_device(device_id, "monitor", "--unit", unit, "--bed", bed, "--patient", patient)
        self.hub, self.id, self.secret = hub, device_id, str(out["secret"])

    def send(self, payload: dict[str, Any]) -> None:
        """One QoS 1 message: mosquitto_pub returns once the hub acknowledged it (after the append)."""
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.hub.mqtt_port), "-q", "1"]
        argv += ["-u", self.id, "-P", self.secret, "-i", self.id, "-t", f"vigil/v1/{self.id}/obs"]
        r = subprocess.run(
            [*argv, "-m", json.dumps(payload)], capture_output=True, text=True, check=False, timeout=30
        )
        assert r.returncode == 0, r.stderr


def obs(*items: dict[str, Any], seq: int, boot: str, ts: int | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"seq": seq, "boot": boot, "obs": list(items)}
    if ts is not None:
        msg["ts"] = iso(ts)
    return msg


def trend(hub: AnyHub, patient: str, code: str, since: int, until_ms: int | None = None) -> list[Msg]:
    params = {"code": code, "since": iso(since)}
    if until_ms is not None:
        params["until"] = iso(until_ms)
    r = hub.api("GET", f"/api/v1/patients/{patient}/vitals", params=params)
    assert r.status_code == 200, r.text
    return list(r.json()["points"])


def in_window(hub: AnyHub, patient: str, code: str, start: int) -> list[Msg]:
    return trend(hub, patient, code, start, start + 59_999)


def deadletters(hub: AnyHub, since: int, **match: Any) -> list[Msg]:
    r = hub.api("GET", "/api/v1/deadletters", params={"since": iso(since), "limit": 1000})
    assert r.status_code == 200, r.text
    return [d for d in r.json()["items"] if all(d.get(k) == v for k, v in match.items())]


def test_an_obs_over_mqtt_shows_in_the_snapshot_and_the_trend(hub: AnyHub) -> None:
    t0 = now_ms() - 1000
    dev = Device(hub, "par-mon-1", "par-1", "PP-1")
    dev.send(obs({"code": "hr", "value": 123}, {"code": "spo2", "value": 96}, seq=1, boot="snap"))

    def snapshot_hr() -> Any:
        r = hub.api("GET", "/api/v1/patients/PP-1")
        return r.status_code == 200 and r.json()["vitals"].get("hr", {}).get("value")

    assert until(hub, snapshot_hr) == 123
    snap = hub.api("GET", "/api/v1/patients/PP-1").json()
    assert snap["bed_id"] == "par-1" and snap["vitals"]["spo2"]["value"] == 96
    [point] = until(hub, lambda: trend(hub, "PP-1", "hr", t0))
    assert point["value"] == 123 and point["unit"] == "/min"
    assert hub.metric("vigil_ingest_total", transport="mqtt", kind="obs") >= 1


def test_spo2_130_is_dead_lettered_value_range_and_the_rest_stored(hub: AnyHub) -> None:
    t0, start = now_ms() - 1000, window()
    dev = Device(hub, "par-mon-2", "par-2", "PP-2")
    before = hub.metric("vigil_deadletter_total", reason="value_range")
    items = ({"code": "spo2", "value": 130}, {"code": "hr", "value": 72}, {"code": "rr", "value": 16})
    dev.send(obs(*items, seq=1, boot="range", ts=start))
    [hr] = until(hub, lambda: in_window(hub, "PP-2", "hr", start))
    assert (hr["ts"], hr["value"], hr["flags"]) == (iso(start), 72, [])
    assert [p["value"] for p in until(hub, lambda: in_window(hub, "PP-2", "rr", start))] == [16]
    [dl] = until(hub, lambda: deadletters(hub, t0, reason="value_range", device_id="par-mon-2"))
    assert dl["kind"] == "obs" and dl["transport"] == "mqtt"
    assert "130" in dl["payload"] and "spo2" in dl["payload"]
    assert in_window(hub, "PP-2", "spo2", start) == []
    assert hub.metric("vigil_deadletter_total", reason="value_range") == before + 1


def test_a_repeated_boot_and_seq_is_stored_once(hub: AnyHub) -> None:
    start = window()
    dev = Device(hub, "par-mon-3", "par-3", "PP-3")
    dups = hub.metric("vigil_duplicates_total")
    message = obs({"code": "hr", "value": 77}, seq=5, boot="dup", ts=start)
    dev.send(message)
    dev.send(message)
    until(hub, lambda: hub.metric("vigil_duplicates_total") == dups + 1)
    dev.send(obs({"code": "hr", "value": 79}, seq=6, boot="dup", ts=start + 2000))  # a new message
    got = until(hub, lambda: [p["value"] for p in in_window(hub, "PP-3", "hr", start)] == [77, 79])
    assert got
    assert hub.metric("vigil_duplicates_total") == dups + 1


def test_an_admission_change_reattributes_later_readings(hub: AnyHub) -> None:
    start = window()
    dev = Device(hub, "par-mon-4", "par-4", "PP-OLD")
    dev.send(obs({"code": "hr", "value": 61}, seq=1, boot="bed", ts=start))
    until(hub, lambda: in_window(hub, "PP-OLD", "hr", start))

    r = hub.api("PUT", "/api/v1/beds/par-4/patient", json={"patient_id": "PP-NEW"})
    assert r.status_code == 200, r.text
    assert r.json()["previous_patient_id"] == "PP-OLD"
    # At once in both runtimes: the scaled gateways follow admissions and fence on them (docs/SCALING.md).
    dev.send(obs({"code": "hr", "value": 62}, seq=2, boot="bed", ts=start + 1000))

    [new] = until(hub, lambda: in_window(hub, "PP-NEW", "hr", start))
    assert (new["ts"], new["value"]) == (iso(start + 1000), 62)
    [old] = in_window(hub, "PP-OLD", "hr", start)
    assert (old["ts"], old["value"]) == (iso(start), 61)


async def _connect(hub: AnyHub, token: str) -> ClientConnection:
    url = f"ws://127.0.0.1:{hub.http_port}/ws"
    return await websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"})


async def _recv(ws: ClientConnection, timeout: float) -> Msg:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def _until(ws: ClientConnection, pred: Callable[[Msg], bool], timeout: float = WAIT) -> Msg:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            m = await _recv(ws, left)
        except TimeoutError:
            break
        if pred(m):
            return m
    raise AssertionError(f"no such message in {timeout}s")


async def _collect(ws: ClientConnection, seconds: float) -> list[Msg]:
    out: list[Msg] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(await _recv(ws, left))
        except TimeoutError:
            break
    return out


async def _subscribe(ws: ClientConnection, topic: str) -> None:
    await ws.send(json.dumps({"op": "subscribe", "topics": [topic]}))
    while (await _recv(ws, 10))["type"] != "subscribed":
        pass


def _hr(m: Msg) -> Any:
    return m["data"]["values"].get("hr", {}).get("value") if m.get("type") == "vitals" else None


async def test_a_websocket_client_sees_live_vitals_and_resumes_with_its_last_id(hub: AnyHub) -> None:
    dev = Device(hub, "par-mon-5", "par-5", "PP-5", unit="par-ws")
    token = hub.token()
    watcher = await _connect(hub, token)  # stays connected: tells when the away-time update is out
    await _subscribe(watcher, "patient:PP-5")
    ws = await _connect(hub, token)
    await _subscribe(ws, "unit:par-ws")

    await asyncio.to_thread(dev.send, obs({"code": "hr", "value": 70}, seq=1, boot="ws"))
    seen = await _until(ws, lambda m: _hr(m) == 70)
    assert seen["topic"] == "unit:par-ws" and seen["data"]["patient_id"] == "PP-5"
    last = seen["id"]
    await ws.close()

    await asyncio.to_thread(dev.send, obs({"code": "hr", "value": 99}, seq=2, boot="ws"))
    await _until(watcher, lambda m: _hr(m) == 99)

    ws = await _connect(hub, token)
    await _subscribe(ws, "unit:par-ws")
    await _collect(ws, 0.5)  # the latest state that comes with `subscribed`
    await ws.send(json.dumps({"op": "resume", "after": last}))
    replayed = await _collect(ws, 1.5)
    assert replayed, "nothing replayed"
    assert all(m["id"] > last for m in replayed if "id" in m)
    assert [_hr(m) for m in replayed if m.get("type") == "vitals"] == [99]
    await ws.close()
    await watcher.close()


# -- alarms ----------------------------------------------------------------------------------------------


class Ward:
    """A unit with a monitored bed, its assigned nurse and charge nurse, each with a token."""

    def __init__(self, hub: AnyHub, tag: str) -> None:
        self.hub, self.unit = hub, f"par-alarm-{tag}"
        self.bed, self.patient = f"par-al-{tag}", f"PA-{tag}"
        self.dev = Device(hub, f"par-mon-al-{tag}", self.bed, self.patient, unit=self.unit)
        self.tokens: dict[str, str] = {}
        for role in ("nurse", "charge_nurse"):
            name = f"par-{role}-{tag}".replace("_", "-")
            out = hub.add_user(name, role, "--unit", self.unit, "--password", "s3cret-pass")
            self.tokens[role] = hub.token(str(out["username"]), "s3cret-pass")
        self.nurse = f"par-nurse-{tag}"
        r = hub.api("PUT", f"/api/v1/beds/{self.bed}/assignment", json={"username": self.nurse})
        assert r.status_code == 200, r.text

    def desaturate(self, value: float, seconds: int, *, seq: int, start: int) -> int:
        for i in range(seconds):
            item = ({"code": "spo2", "value": value}, {"code": "hr", "value": 88})
            self.dev.send(obs(*item, seq=seq + i, boot="alarm", ts=start + i * 1000))
        return seq + seconds


def _alert(m: Msg, condition: str, **want: Any) -> bool:
    d = m.get("data", {})
    return (
        m.get("type") == "alert"
        and d.get("condition") == condition
        and all(d.get(k) == v for k, v in want.items())
    )


async def test_a_desaturation_alarms_the_nurse_who_acknowledges_it_and_it_closes_on_recovery(
    hub: AnyHub,
) -> None:
    ward = Ward(hub, "desat")
    nurse = await _connect(hub, ward.tokens["nurse"])
    await _subscribe(nurse, f"unit:{ward.unit}")
    start = now_ms() - 40_000
    seq = await asyncio.to_thread(ward.desaturate, 70, 20, seq=1, start=start)
    frame = await _until(nurse, lambda m: _alert(m, "spo2_critical", status="active_unack"))
    alert = frame["data"]
    assert (alert["priority"], alert["patient_id"], alert["bed_id"]) == ("high", ward.patient, ward.bed)

    listed = hub.api("GET", "/api/v1/alerts", params={"status": "active"}, token=ward.tokens["nurse"])
    assert alert["id"] in [a["id"] for a in listed.json()["items"]]
    r = hub.api("POST", f"/api/v1/alerts/{alert['id']}/ack", token=ward.tokens["nurse"])
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "active_ack"
    await _until(nurse, lambda m: _alert(m, "spo2_critical", id=alert["id"], status="active_ack"))

    await asyncio.to_thread(ward.desaturate, 97, 4, seq=seq, start=start + 20_000)
    await _until(nurse, lambda m: _alert(m, "spo2_critical", id=alert["id"], status="closed"))
    detail = hub.api("GET", f"/api/v1/alerts/{alert['id']}", token=ward.tokens["nurse"]).json()
    acks = [v for v in detail["history"] if v["to_status"] == "active_ack"]
    assert [v["by"] for v in acks] == [ward.nurse]
    await nurse.close()


async def test_an_unanswered_alarm_escalates_to_the_charge_nurse_across_a_restart(hub: AnyHub) -> None:
    ward = Ward(hub, "esc")
    nurse = await _connect(hub, ward.tokens["nurse"])
    charge = await _connect(hub, ward.tokens["charge_nurse"])
    await asyncio.sleep(2.5)  # presence: the escalation facts see both connected
    start = now_ms() - 40_000
    await asyncio.to_thread(ward.desaturate, 70, 20, seq=1, start=start)
    page = await _until(nurse, lambda m: m.get("type") == "page")
    alert_id = page["data"]["alert_id"]
    await asyncio.to_thread(hub.kill9)  # mid-escalation: the pending step must survive
    await asyncio.to_thread(hub.start)
    charge = await _connect(hub, ward.tokens["charge_nurse"])
    got = await _until(charge, lambda m: m.get("type") == "page" and m["data"]["alert_id"] == alert_id, 45)
    assert got["data"]["level"] >= 1
    pages = hub.api("GET", f"/api/v1/alerts/{alert_id}", token=ward.tokens["nurse"]).json()["pages"]
    steps = [p["step"] for p in pages]
    assert steps == sorted(set(steps)), "a step was paged twice"
    await charge.close()
    await nurse.close()


async def test_a_transfer_mid_alarm_closes_it_with_the_reason(hub: AnyHub) -> None:
    ward = Ward(hub, "xfer")
    start = now_ms() - 40_000
    await asyncio.to_thread(ward.desaturate, 70, 20, seq=1, start=start)

    def open_alert() -> Any:
        r = hub.api("GET", "/api/v1/alerts", params={"status": "active", "patient_id": ward.patient})
        items = [a for a in r.json()["items"] if a["condition"] == "spo2_critical"]
        return items[0] if items else None

    alert = until(hub, open_alert)
    hub.add_device("par-mon-al-xfer2", "monitor", "--unit", ward.unit, "--bed", "par-al-xfer2")
    r = hub.api("PUT", "/api/v1/beds/par-al-xfer2/patient", json={"patient_id": ward.patient})
    assert r.status_code == 200, r.text

    def closed() -> Any:
        a = hub.api("GET", f"/api/v1/alerts/{alert['id']}").json()
        return a if a["status"] == "closed" else None

    done = until(hub, closed)
    assert done["history"][-1]["reason"] == "transfer"
