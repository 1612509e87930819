"""SqlStateStore on SQLite and a throwaway PostgreSQL: state and applied offset move together, forwards."""

from __future__ import annotations

import asyncio
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


async def test_concurrent_commits_of_one_partition_keep_the_higher_offset(db: Database) -> None:
    """A zombie's commit racing the new owner's: whatever the order, the higher offset and its state win."""
    store = SqlStateStore(db)
    await store.commit("device", "t", 3, 5, [("device", "k", b"v5")])
    for _ in range(5):
        results = await asyncio.gather(
            store.commit("device", "t", 3, 30, [("device", "k", b"v30")]),
            store.commit("device", "t", 3, 20, [("device", "k", b"v20"), ("device", "z", b"zombie")]),
            return_exceptions=True,
        )
        assert results[0] is None
        assert results[1] is None or isinstance(results[1], OffsetRegressionError)
        assert await store.applied("device", "t", 3) == 30
        if results[1] is None:  # the zombie went first: the owner's commit then overwrote its state
            await store.commit("device", "t", 3, 30, [("device", "z", None)])
        assert await store.load("device", ["k", "z"]) == {"k": b"v30"}


async def test_a_commit_after_the_database_dropped_the_connection_succeeds(db: Database) -> None:
    """A connection the server closed is not handed out again for the next batch."""
    if db.dialect != "postgresql":
        pytest.skip("PostgreSQL only: a server that terminates sessions")
    store = SqlStateStore(db)
    await store.commit("device", "t", 4, 1, [("device", "a", b"1")])
    async with db.engine.connect() as conn:  # every other session of this database, pooled ones included
        await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        await conn.commit()
    await store.commit("device", "t", 4, 2, [("device", "a", b"2")])
    assert await store.load("device", ["a"]) == {"a": b"2"}
