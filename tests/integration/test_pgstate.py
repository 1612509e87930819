"""SqlStateStore on SQLite and a throwaway PostgreSQL: state and applied offset move together, forwards."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from records.db import Database
from streams.pgstate import OffsetRegressionError, SqlStateStore

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = Database(url)
    await database.migrate()
    yield database
    await database.close()


async def test_commit_then_load_and_applied(db: Database) -> None:
    store = SqlStateStore(db)
    assert await store.applied("device", "t", 0) == -1
    assert await store.load("device", ["a", "b"]) == {}
    await store.commit("device", "t", 0, 41, [("device", "a", b"A1"), ("device", "b", b"B1")])
    assert await store.applied("device", "t", 0) == 41
    assert await store.applied("device", "t", 1) == -1  # other partition
    assert await store.applied("other", "t", 0) == -1  # other group
    assert await store.load("device", ["a", "b", "c"]) == {"a": b"A1", "b": b"B1"}
    assert await store.load("elsewhere", ["a"]) == {}  # namespaces are apart
    # an update, a delete (None) and an equal offset (a replayed batch re-committed) are all fine
    await store.commit("device", "t", 0, 41, [("device", "a", b"A2"), ("device", "b", None)])
    assert await store.load("device", ["a", "b"]) == {"a": b"A2"}
    await store.commit("device", "t", 0, 99, [])
    assert await store.applied("device", "t", 0) == 99


async def test_many_keys_load_in_chunks(db: Database) -> None:
    store = SqlStateStore(db)
    rows = [("device", f"k{i}", f"v{i}".encode()) for i in range(1200)]
    await store.commit("device", "t", 2, 5, rows)
    loaded = await store.load("device", [f"k{i}" for i in range(1300)])
    assert len(loaded) == 1200 and loaded["k1199"] == b"v1199"


async def test_offset_never_goes_backwards_and_a_refused_commit_writes_nothing(db: Database) -> None:
    store = SqlStateStore(db)
    await store.commit("device", "t", 0, 10, [("device", "a", b"new")])
    with pytest.raises(OffsetRegressionError):
        await store.commit("device", "t", 0, 9, [("device", "a", b"zombie"), ("device", "z", b"zombie")])
    assert await store.applied("device", "t", 0) == 10
    assert await store.load("device", ["a", "z"]) == {"a": b"new"}


async def test_state_and_offset_are_atomic(db: Database) -> None:
    """A commit that fails half-way (a state row the database refuses) leaves state and offset unchanged."""
    store = SqlStateStore(db)
    await store.commit("device", "t", 0, 10, [("device", "a", b"old")])
    if db.dialect == "postgresql":
        too_long = "k" * 300  # over VARCHAR(255): PostgreSQL refuses the row
        bad: list[tuple[str, str, bytes | None]] = [("device", "a", b"half"), ("device", too_long, b"x")]
    else:
        # SQLite does not enforce VARCHAR lengths: make the state insert fail with a trigger instead
        async with db.session() as s:
            await s.execute(
                text(
                    "CREATE TRIGGER refuse_bad BEFORE INSERT ON processor_state WHEN NEW.key = 'bad' "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
        bad = [("device", "a", b"half"), ("device", "bad", b"x")]
    with pytest.raises(Exception):  # noqa: B017 - the driver's own error type
        await store.commit("device", "t", 0, 20, bad)
    assert await store.applied("device", "t", 0) == 10
    assert await store.load("device", ["a", "bad"]) == {"a": b"old"}
