"""The live hub's pure parts with times as arguments (no sleeping), then the hub over a fake feed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence

import orjson
import pytest

from api.auth import Principal
from api.livehub import (
    CLOSE_SLOW_CONSUMER,
    VERSIONS_KEPT,
    AlertBook,
    LatestState,
    LiveClient,
    LiveHub,
    Push,
    Scope,
    Subscriptions,
    Topic,
    VitalsMerger,
    deliver,
    parse_topic,
    refusal,
    resume_decision,
    state_push,
)
from streams.clock import ManualClock
from streams.live import LiveRecord
from streams.schemas import Alert, AlertPage, Event, LiveUpdate, ObsItem

T0 = 1_795_428_000_000
NURSE = Principal("n", "nurse", frozenset({"north"}), frozenset({"icu"}))
OTHER_NURSE = Principal("o", "nurse", frozenset({"south"}), None)
ADMIN = Principal("admin", "admin", frozenset({"*"}), None)


def vitals(
    code: str = "MDC_ECG_HEART_RATE",
    value: float = 72,
    *,
    ts: int = T0,
    bed: str | None = "icu-1",
    patient: str | None = "P-1",
    unit: str | None = "icu",
    device: str = "mon-1",
    seq: int = 0,
) -> LiveUpdate:
    return LiveUpdate(
        id=f"{device}/obs/b/{seq}",
        kind="vitals",
        at=ts,
        site_id="north",
        unit_id=unit,
        bed_id=bed,
        patient_id=patient,
        device_id=device,
        items=(ObsItem(code, value, "/min", ts),),
    )


def status(*, bed: str = "icu-1", patient: str | None = "P-1", battery: float = 0.5) -> LiveUpdate:
    return LiveUpdate(
        id="mon-1/status/b/1",
        kind="device",
        at=T0,
        site_id="north",
        unit_id="icu",
        bed_id=bed,
        patient_id=patient,
        device_id="mon-1",
        conditions=("lead_off",),
        battery=battery,
    )


def alert(
    version: int = 1,
    *,
    id: str = "P-1~spo2_low~1795428000000",
    status: str = "active_unack",
    patient: str | None = "P-1",
    bed: str | None = "icu-1",
    unit: str | None = "icu",
    site: str = "north",
    at: int = T0,
    detail: dict[str, object] | None = None,
) -> Alert:
    return Alert(
        id=id,
        version=version,
        patient_id=patient,
        bed_id=bed,
        site_id=site,
        unit_id=unit,
        condition="spo2_low",
        priority="high",
        status=status,
        raised_at=T0,
        updated_at=at,
        detail=detail or {},
    )


def page(
    step: int = 0, recipients: tuple[str, ...] = ("n",), alert_id: str = "P-1~spo2_low~1795428000000"
) -> AlertPage:
    return AlertPage(
        alert_id=alert_id,
        alert_version=1,
        step=step,
        level=step,
        recipients=recipients,
        at=T0 + step * 60_000,
        site_id="north",
        unit_id="icu",
        patient_id="P-1",
        bed_id="icu-1",
        condition="spo2_low",
        priority="high",
        skipped=None if recipients else "not_connected",
    )


def news2(score: int, *, bed: str | None = "icu-1", patient: str = "P-1", at: int = T0) -> LiveUpdate:
    result = {
        "score": score,
        "complete": True,
        "scale": 1,
        "components": {"rr": {"value": 24, "points": 2, "ts": at, "source": "mon-1"}, "temp": None},
        "ts": at,
        "response": "low",
        "partial": score,
        "missing": [],
        "stale": [],
        "suppressed": False,
    }
    return LiveUpdate(
        id=f"{patient}/news2/{at}",
        kind="news2",
        at=at,
        site_id="north",
        unit_id="icu",
        bed_id=bed,
        patient_id=patient,
        device_id="",
        detail={"news2": result},
    )


def data(p: Push) -> dict[str, object]:
    return dict(orjson.loads(p.data))


def hr_of(p: Push) -> object:
    values = data(p)["values"]
    assert isinstance(values, dict)
    return values["hr"]["value"]


# -- topics, permissions, resume -------------------------------------------------------------------------


def test_topics_parse_and_malformed_ones_do_not() -> None:
    assert parse_topic("unit:icu") == Topic("unit", "icu")
    assert parse_topic("patient:P-1").name == "patient:P-1"  # type: ignore[union-attr]
    assert parse_topic("alerts") == Topic("alerts")
    assert parse_topic("consult:C-9") == Topic("consult", "C-9")
    for bad in ("unit:", "ward:x", "unit:a b", "alerts:x", 7, None, "bed:" + "x" * 65):
        assert parse_topic(bad) is None


def test_a_foreign_place_and_an_unknown_one_get_the_same_refusal() -> None:
    assert refusal(NURSE, Topic("unit", "icu"), Scope("north", "icu")) is None
    foreign = refusal(NURSE, Topic("unit", "ward"), Scope("north", "ward"))
    unknown = refusal(NURSE, Topic("unit", "ward"), None)
    other_site = refusal(OTHER_NURSE, Topic("unit", "ward"), Scope("north", "ward"))
    assert foreign == unknown == other_site
    assert foreign is not None and foreign.code == "forbidden"
    # A patient in no bed is in none of a unit-scoped nurse's units; a nurse of the whole site sees them.
    assert refusal(NURSE, Topic("patient", "P-1"), Scope("north", None)) is not None
    site_nurse = Principal("s", "nurse", frozenset({"north"}), None)
    assert refusal(site_nurse, Topic("patient", "P-1"), Scope("north", None)) is None


def test_roles_decide_alerts_incidents_and_places() -> None:
    dispatcher = Principal("d", "dispatcher", frozenset({"north"}), None)
    assert refusal(NURSE, Topic("alerts"), None) is None
    assert refusal(NURSE, Topic("incidents"), None) is not None
    assert refusal(dispatcher, Topic("incidents"), None) is None
    assert refusal(dispatcher, Topic("alerts"), None) is not None
    assert refusal(dispatcher, Topic("bed", "icu-1"), Scope("north", "icu")) is not None
    why = refusal(ADMIN, Topic("queue", "Q"), None)
    assert why is not None and why.code == "not_found"


def test_resume_cursor_inside_the_window_or_resync() -> None:
    assert resume_decision(10, oldest=5, end=20) == 10
    assert resume_decision(4, oldest=5, end=20) == 4  # the client saw everything before the oldest kept
    assert resume_decision(3, oldest=5, end=20) is None
    assert resume_decision(19, oldest=5, end=20) == 19
    assert resume_decision(20, oldest=5, end=20) is None  # never issued
    assert resume_decision("12", oldest=5, end=20) == 12
    garbage: tuple[object, ...] = ("x", None, 1.5, True, [], "9" * 40)
    for bad in garbage:
        assert resume_decision(bad, oldest=5, end=20) is None
    assert resume_decision(-1, oldest=0, end=0) == -1  # an empty feed


# -- merging ---------------------------------------------------------------------------------------------


def test_first_change_goes_at_once_and_the_rest_of_the_second_is_merged_into_one() -> None:
    m = VitalsMerger(1.0)
    first = m.offer(0, vitals(value=60, seq=0), now=100.0)
    assert [p.cursor for p in first] == [0] and hr_of(first[0]) == 60
    for i in range(1, 5):  # four more within 200 ms
        assert m.offer(i, vitals(value=60 + i, ts=T0 + i * 50, seq=i), now=100.0 + i * 0.05) == []
    assert m.next_due() == 101.0
    assert m.due(100.999) == []
    merged = m.due(101.0)
    assert len(merged) == 1
    assert merged[0].cursor == 4 and hr_of(merged[0]) == 64  # the newest value, the newest cursor
    assert merged[0].topics == ("patient:P-1", "bed:icu-1", "unit:icu")
    # The merged send opened another window: a change half a second later waits for it to close.
    assert m.offer(5, vitals(value=90, ts=T0 + 1500, seq=5), now=101.5) == []
    assert [hr_of(p) for p in m.due(102.0)] == [90]
    assert m.due(103.0) == []  # a quiet window closes
    assert m.next_due() is None
    assert [p.cursor for p in m.offer(6, vitals(value=91, seq=6), now=103.5)] == [6]


def test_merged_values_keep_every_code_and_the_newest_by_device_time() -> None:
    m = VitalsMerger(1.0)
    m.offer(0, vitals(value=70), now=0.0)
    m.offer(1, vitals("MDC_PULS_OXIM_SAT_O2", 97, ts=T0 + 100, seq=1), now=0.1)
    m.offer(2, vitals(value=80, ts=T0 + 300, seq=2), now=0.2)
    m.offer(3, vitals(value=75, ts=T0 + 200, seq=3), now=0.3)  # late: older device time
    (p,) = m.due(1.0)
    values = data(p)["values"]
    assert isinstance(values, dict)
    assert values["hr"]["value"] == 80
    assert values["spo2"]["value"] == 97
    assert p.cursor == 3


def test_beds_merge_apart_and_a_new_patient_is_never_merged_with_the_last() -> None:
    m = VitalsMerger(1.0)
    assert len(m.offer(0, vitals(bed="a", patient="P-1"), now=0.0)) == 1
    assert len(m.offer(1, vitals(bed="b", patient="P-2"), now=0.1)) == 1  # another bed: at once
    assert m.offer(2, vitals(bed="a", patient="P-1", value=99, seq=2), now=0.2) == []
    out = m.offer(3, vitals(bed="a", patient="P-3", value=50, seq=3), now=0.3)  # a transfer mid-window
    assert [(p.cursor, data(p)["patient_id"], hr_of(p)) for p in out] == [(2, "P-1", 99), (3, "P-3", 50)]


def test_a_late_timer_sends_the_held_message_before_the_next_one() -> None:
    m = VitalsMerger(1.0)
    m.offer(0, vitals(value=60), now=0.0)
    m.offer(1, vitals(value=61, seq=1), now=0.5)
    out = m.offer(2, vitals(value=62, seq=2), now=1.7)  # the timer has not run yet
    assert [(p.cursor, hr_of(p)) for p in out] == [(1, 61), (2, 62)]


def test_a_device_at_one_hertz_with_jitter_is_never_held_long() -> None:
    # Timers run late by a few ms; the next window must start when the last was due, not when its timer
    # ran, or each late timer pushes the window on and every reading ends up held for up to a second.
    m = VitalsMerger(1.0)
    offered: dict[int, float] = {}
    holds: list[float] = []

    def run_timers(until: float) -> None:
        while (due := m.next_due()) is not None and due + 0.004 <= until:
            for p in m.due(due + 0.004):  # every timer fires 4 ms late
                holds.append(due + 0.004 - offered[p.cursor])

    for i in range(200):
        t = i + (0.001 if i % 2 else -0.001)  # a 1 Hz device with a millisecond of jitter
        run_timers(t)
        offered[i] = t
        holds.extend(0.0 for _ in m.offer(i, vitals(value=60 + i % 50, seq=i), now=t))
    run_timers(300.0)
    assert len(holds) == 200  # nothing merged away: one reading a second is one message a second
    assert max(holds) < 0.01


# -- latest state ----------------------------------------------------------------------------------------


def test_latest_state_per_bed_patient_and_unit_with_cursors() -> None:
    s = LatestState()
    s.apply(0, vitals(value=70))
    s.apply(1, status())
    s.apply(2, vitals("MDC_PULS_OXIM_SAT_O2", 95, seq=2))
    s.apply(3, vitals(bed=None, patient="P-9", value=88, device="patch-9"))  # bound to a patient only
    beds = {"icu-1": "P-1"}
    bed = s.pushes(Topic("bed", "icu-1"), beds)
    assert [(p.kind, p.cursor) for p in bed] == [("device", 1), ("vitals", 2)]
    values = data(bed[1])["values"]
    assert isinstance(values, dict) and set(values) == {"hr", "spo2"}
    assert [p.cursor for p in s.pushes(Topic("patient", "P-1"), {})] == [1, 2]
    assert [p.cursor for p in s.pushes(Topic("unit", "icu"), beds)] == [1, 2, 3]
    assert [p.cursor for p in s.pushes(Topic("bed", "icu-1"), beds, after=1)] == [2]  # resume: newer only
    assert s.pushes(Topic("bed", "icu-1"), beds, after=2) == []


def test_a_bed_never_shows_its_previous_patient() -> None:
    s = LatestState()
    s.apply(0, vitals(value=140, patient="P-1"))
    # Discharged, no data since: the bed's state is the old patient's and is not sent.
    assert s.pushes(Topic("bed", "icu-1"), {"icu-1": None}) == []
    assert s.pushes(Topic("unit", "icu"), {"icu-1": "P-2"}) == []
    s.apply(1, vitals("MDC_PULS_OXIM_SAT_O2", 96, patient="P-2", seq=1))
    (p,) = s.pushes(Topic("bed", "icu-1"), {"icu-1": "P-2"})
    values = data(p)["values"]
    assert isinstance(values, dict) and set(values) == {"spo2"}  # P-1's heart rate is gone
    assert hr_of(s.pushes(Topic("patient", "P-1"), {})[0]) == 140  # still P-1's own


# -- delivery --------------------------------------------------------------------------------------------


async def test_one_encode_per_topic_and_patients_checked_per_client() -> None:
    subs = Subscriptions()
    a, b, c = LiveClient(NURSE), LiveClient(NURSE), LiveClient(OTHER_NURSE)
    subs.add(a, ["unit:icu"])
    subs.add(b, ["unit:icu", "patient:P-1"])
    subs.add(c, ["patient:P-1"])  # allowed once, then the patient moved to a unit it may not see
    deliver(subs, [state_push(7, status())])
    fa, fb1, fb2 = await a.next(), await b.next(), await b.next()
    assert fa is fb1 or fa is fb2  # the same string object: encoded once for the topic
    assert {orjson.loads(f)["topic"] for f in (fb1, fb2)} == {"unit:icu", "patient:P-1"}
    assert orjson.loads(fa) == {
        "id": 7,
        "type": "device",
        "topic": "unit:icu",
        "data": {
            "site_id": "north",
            "unit_id": "icu",
            "bed_id": "icu-1",
            "patient_id": "P-1",
            "device_id": "mon-1",
            "at": "2026-11-23T10:00:00.000Z",
            "conditions": ["lead_off"],
            "battery": 0.5,
        },
    }
    assert c.pending() == 0


async def test_a_full_queue_closes_its_client_and_not_the_others() -> None:
    subs = Subscriptions()
    slow, fast = LiveClient(NURSE, limit=10), LiveClient(NURSE, limit=10)
    subs.add(slow, ["bed:icu-1"])
    subs.add(fast, ["bed:icu-1"])
    got = 0
    for i in range(25):
        closed = deliver(subs, [state_push(i, status(battery=i / 100))])
        if closed:
            assert closed == [slow]
        await fast.next()  # the fast one keeps up
        got += 1
    assert got == 25
    assert slow.closed.done() and slow.closed.result() == (CLOSE_SLOW_CONSUMER, "slow consumer")
    assert slow.topics == set() and subs.clients("bed:icu-1") == {fast}


# -- the hub over a fake feed ----------------------------------------------------------------------------


class FakeFeed:
    def __init__(self, events: Sequence[Event] = (), first: int = 0) -> None:
        self.records = [LiveRecord(first + i, e) for i, e in enumerate(events)]
        self.first = first
        self.poison: set[int] = set()
        self._new = asyncio.Event()

    def add(self, event: Event) -> int:
        cursor = self.end()
        self.records.append(LiveRecord(cursor, event))
        self._new.set()
        return cursor

    def end(self) -> int:
        return self.records[-1].cursor + 1 if self.records else self.first

    async def oldest(self) -> int:
        return self.records[0].cursor if self.records else self.first

    async def after(self, cursor: int, limit: int = 1000) -> Sequence[LiveRecord]:
        out = [r for r in self.records if r.cursor > cursor][:limit]
        if any(r.cursor in self.poison for r in out):
            raise ValueError("schema v9 is newer than this build")
        return out

    async def wait(self, cursor: int, timeout: float) -> None:
        if self.end() > cursor + 1:
            return
        self._new.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new.wait(), timeout)


async def frames(client: LiveClient) -> list[dict[str, object]]:
    out = []
    while client.pending():
        out.append(dict(orjson.loads(await client.next())))
    return out


async def settle(hub: LiveHub, feed: FakeFeed) -> None:
    for _ in range(200):
        if hub.position >= feed.end() - 1:
            return
        await asyncio.sleep(0)
    raise AssertionError("the hub did not catch up")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def test_the_hub_warms_from_the_oldest_record_then_follows(clock: ManualClock) -> None:
    feed = FakeFeed([vitals(value=70), status(), vitals(value=71, seq=1)], first=40)
    hub = LiveHub(feed, clock)
    await hub.ready()
    client = LiveClient(NURSE)
    hub.subscribe(client, [Topic("bed", "icu-1")], {"icu-1": "P-1"})
    warm = await frames(client)
    assert [(f["id"], f["type"]) for f in warm] == [(41, "device"), (42, "vitals")]
    assert warm[1]["data"]["values"]["hr"]["value"] == 71  # type: ignore[index]
    feed.add(vitals(value=72, seq=2))  # the bed's first change since warm-up: at once
    await settle(hub, feed)
    (live,) = await frames(client)
    assert (live["id"], live["topic"]) == (43, "bed:icu-1")
    await hub.stop()


async def test_a_slow_client_is_closed_without_holding_up_the_hub(clock: ManualClock) -> None:
    feed = FakeFeed()
    hub = LiveHub(feed, clock)
    await hub.ready()
    slow, fast = LiveClient(NURSE, limit=50), LiveClient(NURSE, limit=50)
    hub.subscribe(slow, [Topic("unit", "icu")], {})
    hub.subscribe(fast, [Topic("unit", "icu")], {})
    received = 0
    for i in range(200):  # device messages are never merged
        feed.add(status(battery=(i % 100) / 100))
        await settle(hub, feed)
        received += len(await frames(fast))
    assert received == 200
    assert slow.closed.result()[0] == CLOSE_SLOW_CONSUMER
    assert hub.subs.clients("unit:icu") == {fast}
    await hub.stop()


async def test_a_burst_closes_no_client_that_keeps_up(clock: ManualClock) -> None:
    feed = FakeFeed()
    hub = LiveHub(feed, clock)
    await hub.ready()
    client = LiveClient(NURSE)  # three frames per update: a burst of 1000 would be 3000 frames at once
    hub.subscribe(client, [Topic("unit", "icu"), Topic("bed", "icu-1"), Topic("patient", "P-1")], {})
    got = 0

    async def writer() -> None:
        nonlocal got
        while True:
            await client.next()
            got += 1

    task = asyncio.create_task(writer())
    for i in range(1000):
        feed.records.append(LiveRecord(i, status(battery=i / 1000)))
    feed.add(status())
    await settle(hub, feed)
    for _ in range(10):
        await asyncio.sleep(0)
    assert not client.closed.done()
    assert got == 3 * 1001
    task.cancel()
    await hub.stop()


async def test_replay_sends_newer_state_and_alerts_in_full(clock: ManualClock) -> None:
    feed = FakeFeed([vitals(value=70), vitals(value=71, seq=1), alert(), status()])
    hub = LiveHub(feed, clock)
    await hub.ready()
    client = LiveClient(NURSE)
    hub.subscribe(client, [Topic("bed", "icu-1"), Topic("alerts")], {"icu-1": "P-1"})
    await frames(client)
    await hub.replay(client, 0, {"icu-1": "P-1"})
    got = [(f["id"], f["type"], f["topic"]) for f in await frames(client)]
    # The state changed after the cursor, then every alert version after it, to each topic it routes to.
    assert got == [
        (1, "vitals", "bed:icu-1"),
        (3, "device", "bed:icu-1"),
        (2, "alert", "alerts"),
        (2, "alert", "bed:icu-1"),
    ]
    await hub.stop()


async def test_an_undecodable_record_is_stepped_over(clock: ManualClock) -> None:
    feed = FakeFeed([vitals(value=70), status(), vitals(value=71, seq=1)])
    feed.poison = {1}
    hub = LiveHub(feed, clock)
    await asyncio.wait_for(hub.ready(), 5)
    st = hub.state.place("bed:icu-1")
    assert st is not None and st.vitals_cursor == 2 and st.devices == {}
    await hub.stop()


# -- alerts, pages and NEWS2 -----------------------------------------------------------------------------


async def test_an_alert_goes_to_alerts_and_its_patient_bed_and_unit_for_those_who_may_see() -> None:
    feed = FakeFeed()
    hub = LiveHub(feed, ManualClock())
    await hub.ready()
    mine = LiveClient(NURSE)
    foreign = LiveClient(OTHER_NURSE)
    hub.subscribe(
        mine, [Topic("alerts"), Topic("unit", "icu"), Topic("bed", "icu-1"), Topic("patient", "P-1")], {}
    )
    hub.subscribe(foreign, [Topic("alerts")], {})
    detail = {"label": "SpO2 low", "value": 84.0, "unit": "%", "closed_reason": "x"}
    feed.add(vitals(value=70))
    feed.add(alert(detail=detail))
    await settle(hub, feed)
    got = [f for f in await frames(mine) if f["type"] == "alert"]
    assert sorted(str(f["topic"]) for f in got) == ["alerts", "bed:icu-1", "patient:P-1", "unit:icu"]
    assert got[0]["id"] == 1  # never merged with the vitals before it
    assert got[0]["data"] == {
        "id": "P-1~spo2_low~1795428000000",
        "version": 1,
        "patient_id": "P-1",
        "bed_id": "icu-1",
        "site_id": "north",
        "unit_id": "icu",
        "condition": "spo2_low",
        "priority": "high",
        "status": "active_unack",
        "raised_at": "2026-11-23T10:00:00.000Z",
        "updated_at": "2026-11-23T10:00:00.000Z",
        "data_stale": False,
        "retrospective": False,
        "silenced_until": None,
        "label": "SpO2 low",
        "value": 84.0,
        "unit": "%",
    }
    assert foreign.pending() == 0  # another site's alert never reaches its alerts topic
    await hub.stop()


async def test_a_repeated_or_older_version_is_pushed_once() -> None:
    feed = FakeFeed()
    hub = LiveHub(feed, ManualClock())
    await hub.ready()
    client = LiveClient(NURSE)
    hub.subscribe(client, [Topic("alerts")], {})
    for v in (1, 2, 1, 2, 3):  # the scaled runtime's emits are at-least-once, and may interleave
        feed.add(alert(v, at=T0 + v))
    await settle(hub, feed)
    assert [f["data"]["version"] for f in await frames(client)] == [1, 2, 3]  # type: ignore[index]
    known = hub.alerts.get("P-1~spo2_low~1795428000000")
    assert known is not None and known.version == 3 and known.updated_at == {1: T0 + 1, 2: T0 + 2, 3: T0 + 3}
    await hub.stop()


def test_the_alert_book_is_bounded_and_keeps_the_newest_versions_times() -> None:
    book = AlertBook(limit=2)
    assert book.offer(alert(id="a")) and book.offer(alert(id="b"))
    assert book.offer(alert(2, id="a"))  # a changed last: b is now the oldest
    assert book.offer(alert(id="c"))
    assert book.get("b") is None and book.get("a") is not None and len(book) == 2
    for v in range(3, 40):
        book.offer(alert(v, id="a", at=v))
    known = book.get("a")
    assert known is not None and len(known.updated_at) == VERSIONS_KEPT and max(known.updated_at) == 39


def test_new_subscribers_get_open_alerts_and_never_closed_ones() -> None:
    s = LatestState()
    s.apply(0, vitals())
    s.apply_alert(1, alert(id="open"))
    s.apply_alert(2, alert(id="gone"))
    s.apply_alert(3, alert(2, id="gone", status="closed"))
    s.apply_alert(4, alert(id="acked", status="active_ack"))
    s.apply_alert(5, alert(id="old-patient", patient="P-0"))  # the bed's previous patient
    s.apply_alert(6, alert(id="bed-only", patient=None))  # a technical alarm of the bed itself
    s.apply_alert(7, alert(id="moved", bed="icu-1"))
    s.apply_alert(8, alert(2, id="moved", bed="ward-1", unit="ward"))  # transferred with its patient

    def ids(topic: Topic, beds: Mapping[str, str | None]) -> list[tuple[int, str]]:
        return [(p.cursor, str(data(p)["id"])) for p in s.open_alerts(topic, beds)]

    beds = {"icu-1": "P-1"}
    assert ids(Topic("bed", "icu-1"), beds) == [(1, "open"), (4, "acked"), (6, "bed-only")]
    assert ids(Topic("unit", "icu"), beds) == [(1, "open"), (4, "acked"), (6, "bed-only")]
    assert ids(Topic("patient", "P-1"), {}) == [(1, "open"), (4, "acked"), (7 + 1, "moved")]
    assert ids(Topic("unit", "ward"), {"ward-1": "P-1"}) == [(8, "moved")]
    assert ids(Topic("bed", "icu-1"), {"icu-1": None}) == [(6, "bed-only")]  # freed: the patient's go


async def test_subscribing_sends_state_and_open_alerts_in_cursor_order() -> None:
    feed = FakeFeed([alert(id="x"), vitals(), alert(id="y"), alert(2, id="y", status="closed")])
    hub = LiveHub(feed, ManualClock())
    await hub.ready()
    client = LiveClient(NURSE)
    hub.subscribe(client, [Topic("unit", "icu")], {"icu-1": "P-1"})
    assert [(f["id"], f["type"]) for f in await frames(client)] == [(0, "alert"), (1, "vitals")]
    await hub.stop()


async def test_pages_reach_every_connection_of_their_users_once() -> None:
    feed = FakeFeed()
    hub = LiveHub(feed, ManualClock())
    await hub.ready()
    phone, board, other = LiveClient(NURSE), LiveClient(NURSE), LiveClient(OTHER_NURSE)
    for c in (phone, board, other):
        hub.attach(c)
    hub.subscribe(board, [Topic("unit", "icu")], {})  # the phone follows nothing
    assert hub.connected_users() == frozenset({"n", "o"})
    feed.add(page(0, ("n", "charge")))
    feed.add(page(0, ("n", "charge")))  # redelivered: same key
    feed.add(page(1, ()))  # a skipped level names nobody
    feed.add(page(2, ("o",)))
    await settle(hub, feed)
    (f,) = await frames(phone)
    assert (f["id"], f["type"], f["topic"]) == (0, "page", "user:n")
    assert f["data"] == {
        "alert_id": "P-1~spo2_low~1795428000000",
        "alert_version": 1,
        "step": 0,
        "level": 0,
        "recipients": ["n", "charge"],
        "site_id": "north",
        "unit_id": "icu",
        "bed_id": "icu-1",
        "patient_id": "P-1",
        "condition": "spo2_low",
        "priority": "high",
        "at": "2026-11-23T10:00:00.000Z",
    }
    assert [x["topic"] for x in await frames(board)] == ["user:n"]
    assert [(x["id"], x["topic"]) for x in await frames(other)] == [(3, "user:o")]
    hub.detach(phone)
    assert hub.connected_users() == frozenset({"n", "o"})  # the board is still open
    hub.detach(board)
    assert hub.connected_users() == frozenset({"o"})
    await hub.stop()


async def test_a_page_from_before_the_hub_started_is_not_pushed_again() -> None:
    feed = FakeFeed([page(0)])
    hub = LiveHub(feed, ManualClock())
    await hub.ready()
    client = LiveClient(NURSE)
    hub.attach(client)
    feed.add(page(0))  # a redelivery after a restart
    await settle(hub, feed)
    assert client.pending() == 0
    await hub.stop()


async def test_news2_is_pushed_apart_from_vitals_and_kept_as_state() -> None:
    feed = FakeFeed()
    hub = LiveHub(feed, ManualClock())
    await hub.ready()
    client = LiveClient(NURSE)
    hub.subscribe(client, [Topic("bed", "icu-1")], {"icu-1": "P-1"})
    feed.add(vitals(value=70))
    feed.add(news2(5, at=T0 + 1000))
    await settle(hub, feed)
    got = await frames(client)
    assert [(f["id"], f["type"]) for f in got] == [(0, "vitals"), (1, "news2")]  # not merged into vitals
    assert got[1]["data"] == {
        "site_id": "north",
        "unit_id": "icu",
        "bed_id": "icu-1",
        "patient_id": "P-1",
        "at": "2026-11-23T10:00:01.000Z",
        "news2": {
            "score": 5,
            "complete": True,
            "scale": 1,
            "components": {
                "rr": {"value": 24, "points": 2, "ts": "2026-11-23T10:00:01.000Z", "source": "mon-1"},
                "temp": None,
            },
            "ts": "2026-11-23T10:00:01.000Z",
            "response": "low",
            "partial": 5,
            "missing": [],
            "stale": [],
            "suppressed": False,
        },
    }
    later = LiveClient(NURSE)
    hub.subscribe(later, [Topic("patient", "P-1")], {})
    assert [(f["id"], f["type"]) for f in await frames(later)] == [(0, "vitals"), (1, "news2")]
    await hub.stop()


def test_a_bed_shows_news2_only_while_it_holds_that_patient() -> None:
    s = LatestState()
    s.apply(0, news2(7))
    assert [p.kind for p in s.pushes(Topic("bed", "icu-1"), {"icu-1": "P-1"})] == ["news2"]
    assert s.pushes(Topic("bed", "icu-1"), {"icu-1": "P-2"}) == []  # P-1 left; P-2 has no score yet
    s.apply(1, vitals(patient="P-2"))
    assert [p.kind for p in s.pushes(Topic("bed", "icu-1"), {"icu-1": "P-2"})] == ["vitals"]
    assert [p.kind for p in s.pushes(Topic("patient", "P-1"), {})] == ["news2"]  # still P-1's own


async def test_replay_sends_each_alert_version_once_and_the_users_pages() -> None:
    feed = FakeFeed([vitals(), alert(1), alert(2), alert(1), page(0), page(0), page(1, ("someone",))])
    hub = LiveHub(feed, ManualClock())
    await hub.ready()
    client = LiveClient(NURSE)
    hub.attach(client)
    hub.subscribe(client, [Topic("patient", "P-1")], {})
    await frames(client)
    await hub.replay(client, 0, {})
    got = [(f["id"], f["type"], f["topic"]) for f in await frames(client)]
    assert got == [(1, "alert", "patient:P-1"), (2, "alert", "patient:P-1"), (4, "page", "user:n")]
    await hub.stop()
