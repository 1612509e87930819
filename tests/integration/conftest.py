"""Shared fixtures of the integration tests: the records database on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from records.db import sqlite_url
from tests.servers_pg import Postgres, postgres

_names = itertools.count()


@pytest.fixture(scope="session")
def pg() -> Iterator[Postgres]:
    """One throwaway PostgreSQL for the whole run; each test gets its own database in it."""
    with postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh records database URL, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "data")
    server: Postgres = request.getfixturevalue("pg")
    return server.create_database(f"records_{next(_names)}")
