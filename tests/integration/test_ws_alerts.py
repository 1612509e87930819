"""Alerts, pages and NEWS2 over the live feed: a `LiveHub` tailing a real SQLite log in this process, and the
whole path (mosquitto_pub -> clinical engine -> `/ws`) through the real `vigil run`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from api.auth import Principal
from api.livehub import LiveClient, LiveHub, Topic
from streams import topics
from streams.clock import SystemClock
from streams.live import LogLiveFeed
from streams.log import SqliteLog
from streams.schemas import Alert, AlertPage, Event, LiveUpdate, encode

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
