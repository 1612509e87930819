"""Nurse-to-bed assignments and unit rosters in the records layer, on SQLite and a throwaway PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from records import people
from records.audit import list_audit
from records.db import Database, head_revision
from records.errors import NotFoundError
from records.people import add_user
from records.places import ensure_bed
from records.staff import (
    StaffError,
    assign_nurse,
    current_assignments,
    current_roster,
    nurse_of_bed,
    set_roster,
)
from records.staff_models import Assignment

pytestmark = pytest.mark.integration
T0 = 1_795_428_000_000


@pytest.fixture
async def db(url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Database]:
    # Passwords are beside the point here: a cheap hash keeps seven users per test from costing seconds.
    monkeypatch.setattr(people, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1))
    database = Database(url)
    await database.migrate()
    await ensure_bed(database, "s1", "icu", "icu-1")
    await ensure_bed(database, "s1", "icu", "icu-2")
    await ensure_bed(database, "s1", "ward", "ward-1")
    await ensure_bed(database, "s2", "er", "er-1")
    for name, role, units in (
        ("nina", "nurse", ["icu"]),
        ("nils", "nurse", ["icu"]),
        ("wanda", "nurse", ["ward"]),
        ("carl", "charge_nurse", ["icu"]),
        ("dora", "doctor", []),
        ("dave", "doctor", []),
        ("other", "nurse", ["er"]),
    ):
        site = "s2" if name == "other" else "s1"
        await add_user(database, username=name, role=role, sites=[site], units=units, password="pw", at=T0)
    yield database
    await database.close()


async def test_assignment_history_answers_who_at_any_time(db: Database) -> None:
    first = await assign_nurse(db, bed_id="icu-1", username="nina", at=T0 + 100, actor="carl")
    assert first is not None and (first.username, first.unit_id, first.to_at) == ("nina", "icu", None)
    await assign_nurse(db, bed_id="icu-2", username="nina", at=T0 + 100, actor="carl")
    await assign_nurse(db, bed_id="icu-1", username="nils", at=T0 + 200, actor="carl")

    assert await current_assignments(db, at=T0 + 50, unit_id="icu") == []
    at_150 = {a.bed_id: a.username for a in await current_assignments(db, at=T0 + 150, unit_id="icu")}
    assert at_150 == {"icu-1": "nina", "icu-2": "nina"}
    at_200 = {a.bed_id: a.username for a in await current_assignments(db, at=T0 + 200, unit_id="icu")}
    assert at_200 == {"icu-1": "nils", "icu-2": "nina"}  # a change at `at` is in force at `at`
    assert await nurse_of_bed(db, bed_id="icu-1", at=T0 + 199) == "nina"
    assert await nurse_of_bed(db, bed_id="icu-1", at=T0 + 200) == "nils"

    # The same nurse again changes nothing; freeing the bed closes the row.
    await assign_nurse(db, bed_id="icu-1", username="nils", at=T0 + 300, actor="carl")
    await assign_nurse(db, bed_id="icu-1", username=None, at=T0 + 400, actor="carl")
    assert await nurse_of_bed(db, bed_id="icu-1", at=T0 + 400) is None
    assert await nurse_of_bed(db, bed_id="icu-1", at=T0 + 350) == "nils"

    actions = [(e.action, e.target_id, e.detail["username"]) for e in await list_audit(db, target_type="bed")]
    assert actions == [
        ("bed.assign", "icu-1", "nina"),
        ("bed.assign", "icu-2", "nina"),
        ("bed.assign", "icu-1", "nils"),
        ("bed.unassign", "icu-1", None),
    ]
    assert all(e.actor == "carl" and e.site_id == "s1" for e in await list_audit(db, target_type="bed"))


async def test_only_a_nurse_who_sees_the_unit_takes_a_bed(db: Database) -> None:
    for who in ("wanda", "other", "dora", "ghost"):  # another unit, another site, a doctor, nobody
        with pytest.raises(StaffError, match="who can see bed icu-1"):
            await assign_nurse(db, bed_id="icu-1", username=who, at=T0, actor="carl")
    with pytest.raises(NotFoundError):
        await assign_nurse(db, bed_id="nope", username="nina", at=T0, actor="carl")
    charge = await assign_nurse(db, bed_id="icu-1", username="carl", at=T0, actor="admin")
    assert charge is not None and charge.username == "carl"
    assert len(await list_audit(db, target_type="bed")) == 1


async def test_database_allows_one_open_assignment_per_bed(db: Database) -> None:
    await assign_nurse(db, bed_id="icu-1", username="nina", at=T0, actor="carl")
    with pytest.raises(IntegrityError):
        async with db.session() as s:
            s.add(Assignment(site_id="s1", unit_id="icu", bed_id="icu-1", username="nils", from_at=T0 + 1))
    async with db.session(read_only=True) as s:
        assert len((await s.execute(select(Assignment))).scalars().all()) == 1


async def test_roster_groups_keep_order_and_history(db: Database) -> None:
    await set_roster(db, unit_id="icu", group="doctor_on_duty", usernames=["dora"], at=T0 + 10, actor="carl")
    await set_roster(
        db, unit_id="icu", group="rapid_response", usernames=["dave", "nina"], at=T0 + 10, actor="carl"
    )
    assert await current_roster(db, unit_id="icu", at=T0 + 10) == {
        "doctor_on_duty": ["dora"],
        "rapid_response": ["dave", "nina"],
    }
    # A new order is a change; the same list again is not.
    await set_roster(
        db, unit_id="icu", group="rapid_response", usernames=["nina", "dave"], at=T0 + 20, actor="carl"
    )
    await set_roster(
        db, unit_id="icu", group="rapid_response", usernames=["nina", "dave"], at=T0 + 30, actor="carl"
    )
    await set_roster(db, unit_id="icu", group="doctor_on_duty", usernames=[], at=T0 + 40, actor="carl")
    assert await current_roster(db, unit_id="icu", at=T0 + 15) == {
        "doctor_on_duty": ["dora"],
        "rapid_response": ["dave", "nina"],
    }
    assert await current_roster(db, unit_id="icu", at=T0 + 40) == {"rapid_response": ["nina", "dave"]}
    assert await current_roster(db, unit_id="icu", at=T0 + 40, group="doctor_on_duty") == {}
    assert await current_roster(db, unit_id="ward", at=T0 + 40) == {}
    entries = await list_audit(db, target_type="unit")
    assert [(e.detail["group"], e.detail["usernames"]) for e in entries] == [
        ("doctor_on_duty", ["dora"]),
        ("rapid_response", ["dave", "nina"]),
        ("rapid_response", ["nina", "dave"]),
        ("doctor_on_duty", []),
    ]


async def test_roster_refuses_wrong_roles_scopes_and_names(db: Database) -> None:
    with pytest.raises(StaffError, match="doctor who can see"):
        await set_roster(db, unit_id="icu", group="doctor_on_duty", usernames=["nina"], at=T0, actor="carl")
    with pytest.raises(StaffError, match="who can see"):  # a nurse of another unit
        await set_roster(db, unit_id="icu", group="rapid_response", usernames=["wanda"], at=T0, actor="carl")
    with pytest.raises(StaffError, match="twice"):
        await set_roster(db, unit_id="icu", group="attending", usernames=["dora", "dora"], at=T0, actor="c")
    with pytest.raises(StaffError, match="group"):
        await set_roster(db, unit_id="icu", group="Bad Group", usernames=[], at=T0, actor="carl")
    with pytest.raises(NotFoundError):
        await set_roster(db, unit_id="nope", group="attending", usernames=[], at=T0, actor="carl")
    assert await current_roster(db, unit_id="icu", at=T0) == {}
    assert await list_audit(db, target_type="unit") == []


async def test_staff_tables_are_in_the_migrated_schema(db: Database) -> None:
    async with db.session(read_only=True) as s:
        version = (await s.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert version == head_revision()
