"""Alerts, pages and NEWS2 over the live feed: a `LiveHub` tailing a real SQLite log in this process, and the
whole path (mosquitto_pub -> clinical engine -> `/ws`) through the real `vigil run`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from api.auth import Principal
from api.livehub import LiveClient, LiveHub, Topic
from streams import topics
from streams.clock import SystemClock
from streams.live import LogLiveFeed
from streams.log import SqliteLog
from streams.schemas import Alert, AlertPage, Event, LiveUpdate, encode
from tests.hub import Hub

pytestmark = pytest.mark.integration

T0 = 1_795_428_000_000
NURSE = Principal("nina", "nurse", frozenset({"north"}), frozenset({"icu"}))
WARD_NURSE = Principal("walt", "nurse", frozenset({"north"}), frozenset({"ward"}))
ALERT_ID = "P-1~spo2_critical~1795428000000"


def alert(version: int, status: str = "active_unack", alert_id: str = ALERT_ID) -> Alert:
    return Alert(
        id=alert_id,
        version=version,
        patient_id="P-1",
        bed_id="icu-1",
        site_id="north",
        unit_id="icu",
        condition="spo2_critical",
        priority="high",
        status=status,
        raised_at=T0,
        updated_at=T0 + version,
        detail={"label": "SpO2 critical", "value": 70.0, "unit": "%", "device_id": "mon-1"},
    )


def page(step: int, *recipients: str) -> AlertPage:
    return AlertPage(
        alert_id=ALERT_ID,
        alert_version=1,
        step=step,
        level=step,
        recipients=recipients,
        at=T0 + step,
        site_id="north",
        unit_id="icu",
        patient_id="P-1",
        bed_id="icu-1",
        condition="spo2_critical",
        priority="high",
        skipped=None if recipients else "empty_role",
    )


def news2(score: int) -> LiveUpdate:
    result = {"score": score, "complete": True, "scale": 1, "components": {}, "ts": T0, "response": "medium"}
    return LiveUpdate(
        id=f"P-1/news2/{T0}",
        kind="news2",
        at=T0,
        site_id="north",
        unit_id="icu",
        bed_id="icu-1",
        patient_id="P-1",
        device_id="",
        detail={"news2": {**result, "partial": score, "missing": [], "stale": [], "suppressed": False}},
    )


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[SqliteLog]:
    lg = SqliteLog(tmp_path / "log.db", partitions=topics.PARTITIONS)
    await lg.start()
    try:
        yield lg
    finally:
        await lg.close()


async def append(log: SqliteLog, *events: Event) -> None:
    await log.append([(topics.LIVE, "north", encode(e)) for e in events])


async def next_frame(client: LiveClient, timeout: float = 5.0) -> dict[str, object]:
    return dict(orjson.loads(await asyncio.wait_for(client.next(), timeout)))


async def test_alerts_pages_and_news2_reach_their_subscribers_over_a_real_log(log: SqliteLog) -> None:
    hub = LiveHub(LogLiveFeed(log), SystemClock())
    await hub.ready()
    unit, ward, phone = LiveClient(NURSE), LiveClient(WARD_NURSE), LiveClient(NURSE)
    hub.attach(unit)
    hub.attach(phone)
    hub.attach(ward)
    hub.subscribe(unit, [Topic("unit", "icu")], {"icu-1": "P-1"})
    hub.subscribe(ward, [Topic("unit", "ward"), Topic("alerts")], {})
    assert hub.connected_users() == frozenset({"nina", "walt"})

    await append(log, alert(1), alert(1))  # at least once: the second is the same version
    first = await next_frame(unit)
    assert (first["type"], first["topic"]) == ("alert", "unit:icu")
    data = first["data"]
    assert isinstance(data, dict)
    assert (data["id"], data["version"], data["priority"], data["label"]) == (
        ALERT_ID,
        1,
        "high",
        "SpO2 critical",
    )

    await append(log, page(0, "nina"), page(1), page(0, "nina"), news2(6), alert(2, "active_ack"))
    got = [await next_frame(unit) for _ in range(3)]
    assert [(f["type"], f["topic"]) for f in got] == [
        ("page", "user:nina"),
        ("news2", "unit:icu"),
        ("alert", "unit:icu"),
    ]  # no repeated version, no skipped level, no repeated page
    assert got[2]["data"]["status"] == "active_ack"  # type: ignore[index]
    assert (await next_frame(phone))["topic"] == "user:nina"  # a page needs no subscription
    assert phone.pending() == 0
    assert ward.pending() == 0  # another unit's nurse sees none of it, not even on `alerts`
    await hub.stop()


async def test_a_restarted_hub_shows_open_alerts_and_news2_from_the_log(log: SqliteLog) -> None:
    await append(log, alert(1), alert(1, alert_id="gone"), alert(2, "closed", alert_id="gone"), news2(3))
    await append(log, page(0, "nina"))
    hub = LiveHub(LogLiveFeed(log), SystemClock())
    await hub.ready()
    client = LiveClient(NURSE)
    hub.attach(client)
    hub.subscribe(client, [Topic("bed", "icu-1")], {"icu-1": "P-1"})
    got = [await next_frame(client) for _ in range(2)]
    assert [(f["id"], f["type"]) for f in got] == [(0, "alert"), (3, "news2")]
    assert client.pending() == 0  # the closed alert is gone and the old page is not news
    await hub.replay(client, 0, {"icu-1": "P-1"})
    replayed = [await next_frame(client) for _ in range(client.pending())]
    assert [(f["id"], f["type"], f["topic"]) for f in replayed] == [
        (3, "news2", "bed:icu-1"),
        (1, "alert", "bed:icu-1"),
        (2, "alert", "bed:icu-1"),
        (4, "page", "user:nina"),
    ]
    await hub.stop()


# -- end to end: a monitor's desaturation through the clinical engine to the nurse's board ---------------

Msg = dict[str, Any]
UNIT, BED, PATIENT, MONITOR = "wa-icu", "wa-icu-1", "WA-1", "wa-mon-1"
PASSWORD = "wa-secret-pw"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("ws-alerts") / "hub").start()
    try:
        yield h
    finally:
        h.stop()


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def desaturate(hub: Hub, secret: str, start: int, seconds: int) -> None:
    """SpO2 70 % once a second of device time, in one mosquitto_pub session (QoS 1: acknowledged)."""
    lines = "".join(
        json.dumps(
            {"seq": i + 1, "boot": "wa", "ts": iso(start + i * 1000), "obs": [{"code": "spo2", "value": 70}]}
        )
        + "\n"
        for i in range(seconds)
    )
    argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.mqtt_port), "-u", MONITOR, "-P", secret]
    argv += ["-i", MONITOR, "-q", "1", "-t", f"vigil/v1/{MONITOR}/obs", "-l"]
    r = subprocess.run(argv, input=lines, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


async def connect(hub: Hub, token: str) -> ClientConnection:
    url = f"ws://127.0.0.1:{hub.http_port}/ws"
    return await websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"})


async def recv(ws: ClientConnection, timeout: float) -> Msg:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def until(ws: ClientConnection, pred: Any, timeout: float = 10.0) -> Msg:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        m = await recv(ws, left)
        if pred(m):
            return m
    raise AssertionError("no such message")


async def collect(ws: ClientConnection, seconds: float) -> list[Msg]:
    out: list[Msg] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(await recv(ws, left))
        except TimeoutError:
            break
    return out


async def subscribe(ws: ClientConnection, *topics: str) -> list[Msg]:
    await ws.send(json.dumps({"op": "subscribe", "topics": list(topics)}))
    out = []
    while (m := await recv(ws, 10))["type"] != "subscribed":
        out.append(m)
    return [*out, m]


def critical(m: Msg) -> bool:
    d = m.get("data", {})
    return (
        m.get("type") == "alert" and d.get("condition") == "spo2_critical" and d.get("patient_id") == PATIENT
    )


async def test_a_desaturation_reaches_the_units_nurse_who_confirms_it_and_no_other_unit(hub: Hub) -> None:
    secret = hub.add_device(MONITOR, "monitor", "--unit", UNIT, "--bed", BED, "--patient", PATIENT)["secret"]
    hub.add_user("wa-nurse", "nurse", "--unit", UNIT, "--password", PASSWORD)
    hub.add_user("wa-ward-nurse", "nurse", "--unit", "wa-ward", "--password", PASSWORD)
    hub.add_device("wa-mon-ward", "monitor", "--unit", "wa-ward", "--bed", "wa-ward-1")
    nurse = await connect(hub, hub.token("wa-nurse", PASSWORD))
    other = await connect(hub, hub.token("wa-ward-nurse", PASSWORD))
    assert (await subscribe(nurse, f"unit:{UNIT}"))[-1]["topics"] == [f"unit:{UNIT}"]
    answer = await subscribe(other, f"unit:{UNIT}", "unit:wa-ward", "alerts")
    assert [(m["type"], m.get("code")) for m in answer[:-1]] == [("error", "forbidden")]
    assert answer[-1]["topics"] == ["unit:wa-ward", "alerts"]
    timed = hub.metric("vigil_alert_delivery_seconds_count")

    start = time.time_ns() // 1_000_000 - 40_000
    await asyncio.to_thread(desaturate, hub, secret, start, 25)
    frame = await until(nurse, critical, timeout=30)
    alert = frame["data"]
    assert (frame["topic"], alert["priority"], alert["bed_id"], alert["unit_id"]) == (
        f"unit:{UNIT}",
        "high",
        BED,
        UNIT,
    )
    assert ms(alert["raised_at"]) - start <= 30_000, "raised later than 30 s of device time"
    assert not [m for m in await collect(other, 1.0) if m.get("type") == "alert"]

    await nurse.send(json.dumps({"op": "receipt", "alert_id": alert["id"], "version": alert["version"]}))
    assert await until(nurse, lambda m: m["type"] in ("receipt", "error")) == {
        "type": "receipt",
        "alert_id": alert["id"],
        "version": alert["version"],
    }
    await other.send(json.dumps({"op": "receipt", "alert_id": alert["id"], "version": alert["version"]}))
    refused = await until(other, lambda m: m["type"] in ("receipt", "error"))
    assert (refused["type"], refused["code"]) == ("error", "not_found")  # the same as an unknown id

    detail = hub.api("GET", f"/api/v1/alerts/{alert['id']}", token=hub.token("wa-nurse", PASSWORD))
    assert detail.status_code == 200, detail.text
    receipts = [(r["username"], r["version"]) for r in detail.json()["receipts"]]
    assert receipts == [("wa-nurse", alert["version"])]
    assert hub.metric("vigil_alert_delivery_seconds_count") == timed + 1

    late = await connect(hub, hub.token("wa-nurse", PASSWORD))  # a board opened later shows it at once
    await subscribe(late, f"bed:{BED}")
    shown = await until(late, critical, timeout=5)
    assert shown["data"]["id"] == alert["id"] and shown["data"]["status"] != "closed"
    for ws in (nurse, other, late):
        await ws.close()
