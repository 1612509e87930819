"""The records layer on both databases it runs on: SQLite (temp dir) and a throwaway PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from records import alert_models  # noqa: F401  (its tables are in Base.metadata)
from records.admissions import admit, admit_all, bed_of_patient, current_patient, discharge, free_bed
from records.audit import audit, list_audit
from records.crypto import SecretCipher
from records.db import MIGRATIONS, Database, sqlite_url
from records.deadletters import add_deadletters, list_deadletters
from records.devices import add_device, load_devices, set_device_enabled
from records.errors import ConflictError, NotFoundError
from records.models import Admission, Base, RegistryVersion
from records.people import add_user, ensure_admin, get_user, verify_user
from records.places import ensure_bed, get_bed, get_patient, set_news2
from records.version import registry_version
from streams.schemas import DeadLetter

pytestmark = pytest.mark.integration
T0 = 1_795_428_000_000


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = Database(url)
    await database.migrate()
    yield database
    await database.close()


@pytest.fixture
def cipher(tmp_path: Path) -> SecretCipher:
    return SecretCipher.load(tmp_path, env={})


async def _version(db: Database) -> int:
    async with db.session(read_only=True) as s:
        return await registry_version(s)


async def test_migrate_twice_is_a_no_op_and_matches_the_models(db: Database) -> None:
    await db.migrate()
    async with db.session(read_only=True) as s:
        head = ScriptDirectory(str(MIGRATIONS)).get_current_head()  # the newest revision, whichever it is
        assert (await s.execute(text("SELECT version_num FROM alembic_version"))).scalars().all() == [head]
        assert (await s.execute(select(func.count()).select_from(RegistryVersion))).scalar_one() == 1

    def diff(connection: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    async with db.engine.connect() as connection:
        assert await connection.run_sync(diff) == []
    assert await db.ping()


async def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: Path) -> None:
    db = Database(sqlite_url(tmp_path))
    try:
        await db.migrate()
        async with db.session(read_only=True) as s:
            assert (await s.execute(text("PRAGMA journal_mode"))).scalar_one() == "wal"
            assert (await s.execute(text("PRAGMA foreign_keys"))).scalar_one() == 1
            assert (await s.execute(text("PRAGMA busy_timeout"))).scalar_one() >= 5000
    finally:
        await db.close()


async def test_add_device_then_duplicate_id_is_refused(db: Database, cipher: SecretCipher) -> None:
    before = await _version(db)
    added = await add_device(
        db, cipher, device_id="mon-1", type="monitor", site="s1", unit="icu", bed="b1", at=T0
    )
    assert added["id"] == "mon-1" and len(added["secret"]) == 16
    assert (added["site"], added["unit"], added["bed"]) == ("s1", "icu", "b1")
    assert await _version(db) > before
    (row,) = await load_devices(db)
    assert row.secret_enc != added["secret"] and cipher.decrypt(row.secret_enc) == added["secret"]
    with pytest.raises(ConflictError, match="mon-1"):
        await add_device(db, cipher, device_id="mon-1", type="pump", at=T0)
    with pytest.raises(ValueError, match="type"):
        await add_device(db, cipher, device_id="x", type="toaster", at=T0)
    (entry,) = [e for e in await list_audit(db) if e.action == "device.add"]
    assert entry.target_id == "mon-1" and added["secret"] not in str(entry.detail)

    await set_device_enabled(db, device_id="mon-1", enabled=False, at=T0 + 1, actor="admin")
    assert [d.enabled for d in await load_devices(db)] == [False]


async def test_device_with_bed_and_patient_admits_the_patient(db: Database, cipher: SecretCipher) -> None:
    added = await add_device(db, cipher, device_id="m", type="monitor", bed="b1", patient="p1", at=T0)
    assert added["patient"] == "p1" and added["site"] == "default"
    assert await current_patient(db, "b1") == "p1"
    (row,) = await load_devices(db)
    assert (row.bed_id, row.patient_id) == ("b1", None)  # bound to the bed, whoever lies in it

    await add_device(db, cipher, device_id="pendant", type="pendant", patient="p2", at=T0)
    rows = {d.id: d for d in await load_devices(db)}
    assert (rows["pendant"].bed_id, rows["pendant"].patient_id) == (None, "p2")


async def test_user_password_is_verified(db: Database) -> None:
    made = await add_user(
        db,
        username="nina",
        role="nurse",
        sites=["s1"],
        units=["icu"],
        password="pw-1",
        provider_id="N-1",
        at=T0,
    )
    assert made["username"] == "nina" and "password" not in made
    user = await verify_user(db, "nina", "pw-1")
    assert user is not None and user.role == "nurse" and user.provider_id == "N-1"
    assert user.scopes == (("s1", "icu"),) and user.units == frozenset({"icu"})
    assert user.can_see("s1", "icu") and not user.can_see("s1", "ward") and not user.can_see("s2", "icu")
    assert await verify_user(db, "nina", "wrong") is None
    assert await verify_user(db, "nobody", "pw-1") is None
    with pytest.raises(ConflictError):
        await add_user(db, username="nina", role="doctor", at=T0)
    with pytest.raises(ConflictError, match="provider"):
        await add_user(db, username="other", role="doctor", provider_id="N-1", at=T0)
    with pytest.raises(ValueError, match="role"):
        await add_user(db, username="x", role="janitor", at=T0)

    generated = await add_user(db, username="doc", role="doctor", at=T0)
    assert await verify_user(db, "doc", generated["password"]) is not None
    doc = await get_user(db, "doc")
    assert doc is not None and doc.scopes == (("default", None),) and doc.can_see("default", "any-unit")
    assert doc.units is None and doc.sites == frozenset({"default"})


async def test_admin_is_created_once_and_sees_every_site(db: Database) -> None:
    assert await ensure_admin(db, "first", T0)
    assert not await ensure_admin(db, "second", T0 + 1)
    assert await verify_user(db, "admin", "second") is None
    admin = await verify_user(db, "admin", "first")
    assert admin is not None and admin.all_sites and admin.can_see("anywhere", None)


async def test_admit_transfer_free(db: Database) -> None:
    for bed in ("b1", "b2"):
        await ensure_bed(db, "s1", "icu", bed)
    v0 = await _version(db)

    first = await admit(db, site_id="s1", bed_id="b1", patient_id="p1", at=T0, actor="nina")
    assert (first.id, first.patient_id, first.previous_patient_id, first.reason) == (
        f"adm/b1/{T0}/p1",
        "p1",
        None,
        "admit",
    )
    assert await current_patient(db, "b1") == "p1" and await bed_of_patient(db, "p1") == "b1"
    assert await _version(db) > v0
    patient = await get_patient(db, "p1")
    assert patient is not None and (patient.site_id, patient.bed_id) == ("s1", "b1")

    again = await admit(db, site_id="s1", bed_id="b1", patient_id="p1", at=T0 + 5, actor="nina")
    assert again.id == first.id  # a repeat names the original change

    moved = await admit_all(db, site_id="s1", bed_id="b2", patient_id="p1", at=T0 + 10, actor="nina")
    assert [(c.bed_id, c.patient_id, c.previous_patient_id, c.reason) for c in moved] == [
        ("b1", None, "p1", "transfer"),
        ("b2", "p1", None, "transfer"),
    ]
    assert await current_patient(db, "b1") is None and await bed_of_patient(db, "p1") == "b2"

    freed = await free_bed(db, site_id="s1", bed_id="b2", at=T0 + 20, actor="nina", reason="discharge")
    assert freed is not None and (freed.patient_id, freed.previous_patient_id, freed.reason) == (
        None,
        "p1",
        "discharge",
    )
    assert await free_bed(db, site_id="s1", bed_id="b2", at=T0 + 21, actor="nina", reason="free") is None
    assert await bed_of_patient(db, "p1") is None
    with pytest.raises(NotFoundError):
        await free_bed(db, site_id="other-site", bed_id="b1", at=T0, actor="x", reason="free")
    with pytest.raises(NotFoundError):
        await admit(db, site_id="s1", bed_id="nope", patient_id="p1", at=T0, actor="x")

    await admit(db, site_id="s1", bed_id="b1", patient_id="p3", at=T0 + 30, actor="adt")
    gone = await discharge(db, site_id="s1", patient_id="p3", at=T0 + 31, actor="adt")
    assert gone is not None and gone.bed_id == "b1" and gone.previous_patient_id == "p3"

    actions = [(e.action, e.target_id) for e in await list_audit(db, target_type="bed")]
    assert actions == [
        ("bed.admit", "b1"),
        ("bed.free", "b1"),
        ("bed.admit", "b2"),
        ("bed.free", "b2"),
        ("bed.admit", "b1"),
        ("bed.free", "b1"),
    ]


async def test_one_patient_per_bed(db: Database) -> None:
    await ensure_bed(db, "s1", None, "b1")
    await admit(db, site_id="s1", bed_id="b1", patient_id="p1", at=T0, actor="x")
    replaced = await admit(db, site_id="s1", bed_id="b1", patient_id="p2", at=T0 + 1, actor="x")
    assert (replaced.patient_id, replaced.previous_patient_id) == ("p2", "p1")
    assert await current_patient(db, "b1") == "p2" and await bed_of_patient(db, "p1") is None
    bed = await get_bed(db, "b1")
    assert bed is not None and bed.patient_id == "p2"

    # The database itself refuses a second open admission of a bed, whatever the code above does.
    with pytest.raises(IntegrityError):
        async with db.session() as s:
            s.add(Admission(patient_id="p1", bed_id="b1", site_id="s1", admitted_at=T0 + 2))
    async with db.session(read_only=True) as s:
        open_rows = await s.execute(
            select(func.count()).select_from(Admission).where(Admission.ended_at.is_(None))
        )
        assert open_rows.scalar_one() == 1


async def test_concurrent_writers_in_two_processes_do_not_fail(
    db: Database, url: str, cipher: SecretCipher
) -> None:
    other = Database(url)  # as `vigil devices add` next to a running hub
    try:
        await ensure_bed(db, "s1", None, "b1")
        writes = [
            add_device(target, cipher, device_id=f"d{i}", type="monitor", site="s1", at=T0)
            for i, target in enumerate([db, other] * 10)
        ] + [
            admit(target, site_id="s1", bed_id="b1", patient_id=f"p{i}", at=T0 + i, actor="x")
            for i, target in enumerate([other, db] * 5)
        ]
        await asyncio.gather(*writes)
    finally:
        await other.close()
    assert len(await load_devices(db)) == 20
    assert await current_patient(db, "b1") is not None


async def test_news2_settings_are_audited(db: Database) -> None:
    await ensure_bed(db, "s1", None, "b1")
    await admit(db, site_id="s1", bed_id="b1", patient_id="p1", at=T0, actor="x")
    info = await set_news2(db, patient_id="p1", spo2_scale=2, suppressed=True, at=T0 + 1, actor="dr")
    assert (info.news2_scale, info.news2_suppressed, info.bed_id) == (2, True, "b1")
    (entry,) = await list_audit(db, target_type="patient")
    assert entry.actor == "dr" and entry.detail["after"] == {"spo2_scale": 2, "suppressed": True}
    with pytest.raises(NotFoundError):
        await set_news2(db, patient_id="ghost", spo2_scale=1, suppressed=False, at=T0, actor="dr")


async def test_audit_rows_cannot_be_updated_or_deleted(db: Database) -> None:
    async with db.session() as s:
        await audit(
            s, at=T0, actor="nina", action="alert.ack", target_type="alert", target_id="a1", site_id="s1"
        )
    for statement in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"):
            async with db.session() as s:
                await s.execute(text(statement))
    (entry,) = await list_audit(db, sites={"s1"})
    assert (entry.actor, entry.target_id) == ("nina", "a1")
    assert await list_audit(db, sites={"s2"}) == []


async def test_deadletters_are_idempotent(db: Database) -> None:
    letters = [
        DeadLetter(
            id=f"mqtt/dev/{T0 + i}/0",
            received_at=T0 + i,
            transport="mqtt",
            reason="malformed",
            detail="not JSON",
            device_id="dev",
            kind="obs",
            site_id="s1" if i % 2 else "s2",
            payload="eyJ",
        )
        for i in range(50)
    ]
    await add_deadletters(db, letters)
    await add_deadletters(db, letters[:10] + letters[:10])  # redelivered, and repeated within one batch
    await add_deadletters(db, [])
    stored = await list_deadletters(db, sites=None, since=0, limit=1000)
    assert stored == letters
    s1 = await list_deadletters(db, sites={"s1"}, since=T0 + 40, limit=1000)
    assert [d.received_at for d in s1] == [T0 + 41, T0 + 43, T0 + 45, T0 + 47, T0 + 49]
    assert len(await list_deadletters(db, sites=None, since=0, limit=7)) == 7
