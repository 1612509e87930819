"""Alerts at rest (records/alerts.py, records/facts.py) on SQLite and a throwaway PostgreSQL: versions and
their audit rows written once however often a batch is redelivered, pages, receipts, NEWS2, overrides, and
the escalation directory that the clinical engine asks who to page."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from argon2 import PasswordHasher

from records import people
from records.alerts import (
    AlertStore,
    alert_history,
    get_alert,
    latest_news2,
    list_alerts,
    list_history,
    list_overrides,
    record_receipt,
    remove_override,
    set_override,
)
from records.audit import list_audit
from records.db import Database
from records.facts import EscalationDirectory
from records.people import add_user
from records.places import ensure_bed
from records.staff import assign_nurse, set_roster
from streams.effects import AlertVersion, RecordNews2
from streams.schemas import Alert, AlertPage

pytestmark = pytest.mark.integration
T0 = 1_795_428_000_000


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = Database(url)
    await database.migrate()
    yield database
    await database.close()


def alert(
    condition: str = "spo2_low",
    *,
    patient: str | None = "P-1",
    bed: str = "icu-1",
    site: str = "s1",
    unit: str | None = "icu",
    raised: int = T0,
) -> Alert:
    return Alert(
        id=f"{patient or bed}~{condition}~{raised}",
        version=1,
        patient_id=patient,
        bed_id=bed,
        site_id=site,
        unit_id=unit,
        condition=condition,
        priority="medium",
        status="active_unack",
        raised_at=raised,
        updated_at=raised,
        detail={"label": "SpO2", "value": 88.0, "unit": "%"},
    )


def then(a: Alert, at: int, **fields: Any) -> Alert:
    return dataclasses.replace(a, version=a.version + 1, updated_at=at, **fields)


def page(a: Alert, step: int, recipients: tuple[str, ...], skipped: str | None = None) -> AlertPage:
    return AlertPage(
        alert_id=a.id,
        alert_version=a.version,
        step=step,
        level=step,
        recipients=recipients,
        at=a.updated_at + step,
        site_id=a.site_id,
        unit_id=a.unit_id,
        patient_id=a.patient_id,
        bed_id=a.bed_id,
        condition=a.condition,
        priority=a.priority,
        skipped=skipped,
    )


async def audit_of(db: Database, alert_id: str) -> list[tuple[str, str]]:
    return [(e.action, e.actor) for e in await list_audit(db, target_type="alert", target_id=alert_id)]


async def test_each_version_is_kept_and_audited_once_however_often_it_is_redelivered(db: Database) -> None:
    store = AlertStore(db)
    v1 = alert()
    v2 = then(v1, T0 + 5_000, status="active_ack")
    batch = [AlertVersion(v1, None, "raised", None), AlertVersion(v2, "active_unack", "acknowledged", "nina")]
    await store.record_alerts(batch)
    await store.record_alerts(batch)  # redelivery after a crash before the offset commit
    await store.record_alerts(batch[:1])

    current = await get_alert(db, v1.id)
    assert current == v2
    history = await alert_history(db, v1.id)
    assert history is not None
    assert [(v["version"], v["from_status"], v["to_status"], v["by"]) for v in history.versions] == [
        (1, None, "active_unack", None),
        (2, "active_unack", "active_ack", "nina"),
    ]
    assert await audit_of(db, v1.id) == [("alert.raised", "system"), ("alert.acknowledged", "nina")]


async def test_an_older_version_arriving_late_never_overwrites_a_newer_one(db: Database) -> None:
    store = AlertStore(db)
    v1 = alert()
    v2 = then(v1, T0 + 1_000, silenced_until=T0 + 121_000)
    v3 = then(v2, T0 + 2_000, status="active_ack")
    await store.record_alerts([AlertVersion(v1, None, "raised", None), AlertVersion(v3, "x", "x", "nina")])
    await store.record_alerts([AlertVersion(v2, "active_unack", "silenced", "nils")])  # out of order
    assert await get_alert(db, v1.id) == v3
    history = await alert_history(db, v1.id)
    assert history is not None and [v["version"] for v in history.versions] == [1, 2, 3]
    assert len(await audit_of(db, v1.id)) == 3


async def test_pages_and_skipped_levels_are_kept_and_audited_once(db: Database) -> None:
    store = AlertStore(db)
    a = alert()
    await store.record_alerts([AlertVersion(a, None, "raised", None)])
    pages = [page(a, 0, (), "no_assignee"), page(a, 1, ("carl",))]
    await store.record_pages(pages)
    await store.record_pages(pages)
    history = await alert_history(db, a.id)
    assert history is not None
    assert [(p["step"], p["recipients"], p["skipped"]) for p in history.pages] == [
        (0, [], "no_assignee"),
        (1, ["carl"], None),
    ]
    assert await audit_of(db, a.id) == [
        ("alert.raised", "system"),
        ("alert.escalation_skipped", "system"),
        ("alert.page", "system"),
    ]


async def test_a_receipt_is_new_once_per_user_and_version(db: Database) -> None:
    store = AlertStore(db)
    a = alert()
    await store.record_alerts([AlertVersion(a, None, "raised", None)])
    assert await record_receipt(db, a.id, 1, "nina", T0 + 400) is True
    assert await record_receipt(db, a.id, 1, "nina", T0 + 900) is False
    assert await record_receipt(db, a.id, 1, "carl", T0 + 700) is True
    history = await alert_history(db, a.id)
    assert history is not None
    assert history.receipts == [
        {"version": 1, "username": "nina", "received_at": T0 + 400},
        {"version": 1, "username": "carl", "received_at": T0 + 700},
    ]


async def test_the_newest_news2_of_a_patient_wins(db: Database) -> None:
    store = AlertStore(db)

    def n2(at: int, score: int) -> RecordNews2:
        return RecordNews2("P-1", "s1", at, {"score": score, "ts": at, "complete": True})

    assert await latest_news2(db, "P-1") is None
    await store.record_news2([n2(T0 + 2_000, 5), n2(T0 + 1_000, 3)])  # one batch, out of order
    assert await latest_news2(db, "P-1") == {"score": 5, "ts": T0 + 2_000, "complete": True}
    await store.record_news2([n2(T0 + 500, 1)])  # an older one, late
    assert (await latest_news2(db, "P-1") or {})["score"] == 5
    await store.record_news2([n2(T0 + 3_000, 7)])
    assert (await latest_news2(db, "P-1") or {})["score"] == 7


async def test_lists_filter_by_status_and_scope(db: Database) -> None:
    store = AlertStore(db)
    icu = alert("spo2_low", raised=T0)
    ward = alert("hr_high", patient="P-2", bed="ward-1", unit="ward", raised=T0 + 10)
    other_site = alert("rr_high", patient="P-9", bed="er-1", site="s2", unit="er", raised=T0 + 20)
    gone = alert("temp_high", raised=T0 + 30)
    await store.record_alerts(
        [AlertVersion(a, None, "raised", None) for a in (icu, ward, other_site, gone)]
        + [AlertVersion(then(gone, T0 + 40, status="closed"), "active_unack", "resolved", "nina")]
    )

    def ids(alerts: list[Alert]) -> set[str]:
        return {a.id for a in alerts}

    everywhere = await list_alerts(db, sites=None, units=None)
    assert ids(everywhere) == {icu.id, ward.id, other_site.id}  # active by default
    assert ids(await list_alerts(db, sites=None, units=None, statuses=("closed",))) == {gone.id}
    assert ids(await list_alerts(db, sites={"s1"}, units=None, statuses=None)) == {icu.id, ward.id, gone.id}
    assert ids(await list_alerts(db, sites={"s1"}, units=frozenset({"icu"}))) == {icu.id}
    assert ids(await list_alerts(db, sites=None, units=None, patient_id="P-2")) == {ward.id}


async def test_history_pages_newest_raised_first_with_a_stable_cursor(db: Database) -> None:
    store = AlertStore(db)
    alerts = [alert(f"c{i}", raised=T0 + i * 1_000) for i in range(5)]
    await store.record_alerts([AlertVersion(a, None, "raised", None) for a in alerts])
    closed_early = then(alerts[0], T0 + 500, status="closed")
    await store.record_alerts([AlertVersion(closed_early, "active_unack", "resolved", "nina")])

    first = await list_history(db, sites={"s1"}, units=None, since=T0, limit=2)
    assert [a.condition for a in first] == ["c4", "c3"]
    await store.record_alerts([AlertVersion(alert("c9", raised=T0 + 9_000), None, "raised", None)])
    after = (first[-1].raised_at, first[-1].id)
    rest = await list_history(db, sites={"s1"}, units=None, since=T0, after=after, limit=10)
    assert [a.condition for a in rest] == ["c2", "c1", "c0"]  # the new alert does not shift the pages
    # c0 closed at T0 + 500: not open at any time after T0 + 600; the others are open still.
    late = await list_history(db, sites={"s1"}, units=None, since=T0 + 600, until=T0 + 3_000)
    assert [a.condition for a in late] == ["c3", "c2", "c1"]


async def test_overrides_replace_expire_and_are_audited(db: Database) -> None:
    ov = {"condition": "spo2_low", "threshold": 85.0, "priority": None, "delay_ms": None, "reason": "COPD"}
    await set_override(
        db, patient_id="P-1", site_id="s1", override={**ov, "expires_at": T0 + 3_600_000}, at=T0, actor="dora"
    )
    current = await set_override(
        db,
        patient_id="P-1",
        site_id="s1",
        override={**ov, "threshold": 84.0, "expires_at": T0 + 7_200_000},
        at=T0 + 1,
        actor="dora",
    )
    assert [(o["condition"], o["threshold"], o["set_by"]) for o in current] == [("spo2_low", 84.0, "dora")]
    await set_override(
        db,
        patient_id="P-1",
        site_id="s1",
        override={**ov, "condition": "hr_high", "threshold": 140.0, "expires_at": T0 + 60_000},
        at=T0 + 2,
        actor="dora",
    )
    in_force = await list_overrides(db, "P-1", at=T0 + 120_000)
    assert [o["condition"] for o in in_force] == ["spo2_low"]  # hr_high expired
    assert await remove_override(
        db, patient_id="P-1", site_id="s1", condition="spo2_low", at=T0, actor="dora"
    )
    assert not await remove_override(
        db, patient_id="P-1", site_id="s1", condition="spo2_low", at=T0, actor="x"
    )
    actions = [e.action for e in await list_audit(db, target_type="patient", target_id="P-1")]
    assert actions == ["limits.set", "limits.set", "limits.set", "limits.removed"]


async def test_the_directory_knows_assignees_roles_and_rosters_per_unit(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(people, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1))
    for bed, unit, site in (("icu-1", "icu", "s1"), ("icu-2", "icu", "s1"), ("ward-1", "ward", "s1")):
        await ensure_bed(db, site, unit, bed)
    await ensure_bed(db, "s2", "er", "er-1")
    for name, role, site, units in (
        ("nina", "nurse", "s1", ["icu"]),
        ("nils", "nurse", "s1", ["icu"]),
        ("wanda", "nurse", "s1", ["ward"]),
        ("carl", "charge_nurse", "s1", ["icu"]),
        ("dora", "doctor", "s1", []),  # the whole site: every unit of it
        ("ed", "nurse", "s2", []),
    ):
        await add_user(db, username=name, role=role, sites=[site], units=units, password="pw", at=T0)
    await assign_nurse(db, bed_id="icu-1", username="nina", at=T0, actor="carl")
    await set_roster(db, unit_id="icu", group="rapid_response", usernames=["dora", "carl"], at=T0, actor="c")

    directory = EscalationDirectory(db)
    await directory.refresh(T0 + 1_000)
    icu = directory.facts(
        site_id="s1", unit_id="icu", bed_id="icu-1", patient_id="P-1", connected=frozenset({"nina"})
    )
    assert icu.assignee == "nina"
    assert icu.roles["nurse"] == ("nils", "nina")  # by name: a stable order
    assert icu.roles["charge_nurse"] == ("carl",)
    assert icu.roles["doctor"] == ("dora",)
    assert icu.groups == {"rapid_response": ("dora", "carl")}  # in escalation order
    assert icu.connected == frozenset({"nina"})

    ward = directory.facts(
        site_id="s1", unit_id="ward", bed_id="ward-1", patient_id=None, connected=frozenset()
    )
    assert ward.assignee is None
    assert set(ward.roles["nurse"]) == {"wanda"} and ward.roles["doctor"] == ("dora",)
    assert "charge_nurse" not in ward.roles and dict(ward.groups) == {}
    er = directory.facts(site_id="s2", unit_id="er", bed_id="er-1", patient_id=None, connected=frozenset())
    assert er.roles == {"nurse": ("ed",)}

    # A later refresh sees the change; the assignment before it is gone.
    await assign_nurse(db, bed_id="icu-1", username="nils", at=T0 + 2_000, actor="carl")
    await directory.refresh(T0 + 3_000)
    again = directory.facts(
        site_id="s1", unit_id="icu", bed_id="icu-1", patient_id=None, connected=frozenset()
    )
    assert again.assignee == "nils"


async def test_two_clinicians_setting_the_same_override_at_once_leave_one(db: Database) -> None:
    ov = {
        "condition": "spo2_low",
        "priority": None,
        "delay_ms": None,
        "expires_at": T0 + 60_000,
        "reason": "",
    }
    await asyncio.gather(
        *(
            set_override(
                db, patient_id="P-1", site_id="s1", override={**ov, "threshold": t}, at=T0, actor=who
            )
            for t, who in ((85.0, "dora"), (86.0, "dave"), (87.0, "carl"))
        )
    )
    [only] = await list_overrides(db, "P-1")
    assert (only["threshold"], only["set_by"]) in {(85.0, "dora"), (86.0, "dave"), (87.0, "carl")}
