"""The gateway's Registry follows changes made by another process (a separate Database) within a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from gateway.device import DeviceDirectory
from gateway.registry import Registry
from records.admissions import admit, free_bed
from records.crypto import SecretCipher
from records.db import Database
from records.devices import add_device, set_device_enabled

pytestmark = pytest.mark.integration
T0 = 1_795_428_000_000


@pytest.fixture
def cipher(tmp_path: Path) -> SecretCipher:
    return SecretCipher.load(tmp_path, env={})


@pytest.fixture
async def hub_db(url: str) -> AsyncIterator[Database]:
    """The running hub's own connection."""
    db = Database(url)
    await db.migrate()
    yield db
    await db.close()


@pytest.fixture
async def cli_db(url: str, hub_db: Database) -> AsyncIterator[Database]:
    """Another process's connection, as `vigil devices add` would have."""
    db = Database(url)
    await db.migrate()
    yield db
    await db.close()


@pytest.fixture
async def registry(hub_db: Database, cipher: SecretCipher) -> AsyncIterator[Registry]:
    reg = Registry(hub_db, cipher)
    await reg.start()
    yield reg
    await reg.close()


async def _within(seconds: float, check: Callable[[], bool]) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, "the registry did not follow the change in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_device_added_elsewhere_is_seen_within_a_second(
    registry: Registry, cli_db: Database, cipher: SecretCipher
) -> None:
    directory: DeviceDirectory = registry
    assert await directory.get("mon-1") is None
    added = await add_device(cli_db, cipher, device_id="mon-1", type="monitor", site="s1", bed="b1", at=T0)
    # The background poll alone (no lookup of the id) picks it up.
    await _within(1.0, lambda: any(d.id == "mon-1" for d in registry.all_devices()))
    info = await directory.get("mon-1")
    assert info is not None and (info.site_id, info.bed_id, info.patient_id) == ("s1", "b1", None)
    assert await directory.check_secret("mon-1", added["secret"])
    assert not await directory.check_secret("mon-1", added["secret"] + "x")
    assert not await directory.check_secret("nobody", added["secret"])
    assert await directory.psk("mon-1") == added["secret"].encode()
    assert registry.credentials() == {"mon-1": added["secret"]}

    await set_device_enabled(cli_db, device_id="mon-1", enabled=False, at=T0, actor="admin")
    await _within(1.0, lambda: not registry.all_devices()[0].enabled)
    assert not await directory.check_secret("mon-1", added["secret"])
    assert await directory.psk("mon-1") is None


async def test_a_brand_new_device_works_at_once(
    hub_db: Database, cli_db: Database, cipher: SecretCipher
) -> None:
    reg = Registry(hub_db, cipher, poll_interval=3600)  # no help from the poller
    await reg.start()
    try:
        added = await add_device(cli_db, cipher, device_id="pump-1", type="pump", at=T0)
        assert await reg.check_secret("pump-1", added["secret"])
    finally:
        await reg.close()


async def test_a_device_added_just_after_a_miss_is_not_refused_as_unknown(
    hub_db: Database, cli_db: Database, cipher: SecretCipher
) -> None:
    """The broker may let a new device in before this gateway's map has it: its first message must still
    find it, even when another unknown id was looked up a moment before (CI found this as a lost reading)."""
    reg = Registry(hub_db, cipher, poll_interval=3600, miss_interval=0.5)
    await reg.start()
    try:
        assert await reg.get("ghost") is None  # a look just now
        await add_device(cli_db, cipher, device_id="mon-new", type="monitor", at=T0)
        start = time.monotonic()
        info = await reg.get("mon-new")
        assert info is not None and info.id == "mon-new"
        assert time.monotonic() - start < 1.0
        assert reg.cached("mon-new") == info
    finally:
        await reg.close()


async def test_a_flood_of_unknown_ids_is_not_a_flood_of_queries(
    hub_db: Database, cipher: SecretCipher
) -> None:
    reg = Registry(hub_db, cipher, poll_interval=3600)
    await reg.start()
    queries: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        queries.append(statement)

    event.listen(hub_db.engine.sync_engine, "before_cursor_execute", count)
    try:
        start = time.monotonic()
        answers = await asyncio.gather(*(reg.get(f"ghost-{i}") for i in range(500)))
        answers += await asyncio.gather(*(reg.get(f"ghost-b-{i}") for i in range(500)))
        assert answers == [None] * 1000
        assert 1 <= len([q for q in queries if "registry_version" in q]) <= 2
        assert time.monotonic() - start < 2.0  # two waves, one look each, at most one interval apart
    finally:
        event.remove(hub_db.engine.sync_engine, "before_cursor_execute", count)
        await reg.close()


async def test_attribution_follows_admissions(
    registry: Registry, cli_db: Database, cipher: SecretCipher
) -> None:
    await add_device(
        cli_db, cipher, device_id="mon", type="monitor", site="s1", bed="b1", patient="p1", at=T0
    )
    await add_device(cli_db, cipher, device_id="pendant", type="pendant", site="s1", patient="p9", at=T0)
    await add_device(cli_db, cipher, device_id="spare", type="monitor", site="s1", bed="b2", at=T0)

    async def patient_of(device_id: str) -> str | None:
        info = await registry.get(device_id)
        assert info is not None
        return info.patient_id

    await _within(1.0, lambda: len(registry.all_devices()) == 3)
    assert await patient_of("mon") == "p1"
    assert await patient_of("pendant") == "p9"
    assert await patient_of("spare") is None

    await admit(cli_db, site_id="s1", bed_id="b1", patient_id="p2", at=T0 + 1, actor="nurse")
    took = await _within(1.0, lambda: {d.id: d.patient_id for d in registry.all_devices()}["mon"] == "p2")
    assert took < 1.0
    await admit(cli_db, site_id="s1", bed_id="b2", patient_id="p2", at=T0 + 2, actor="nurse")
    await _within(1.0, lambda: {d.id: d.patient_id for d in registry.all_devices()}["spare"] == "p2")
    assert await patient_of("mon") is None  # the transfer freed b1: nothing of p2 leaks through its monitor
    await free_bed(cli_db, site_id="s1", bed_id="b2", at=T0 + 3, actor="nurse", reason="discharge")
    await registry.refresh()
    assert await patient_of("spare") is None
    assert await patient_of("pendant") == "p9"
