"""The records database: an async SQLAlchemy engine (aiosqlite or asyncpg) and its migrations."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_FILE = "records.db"
_READ_ONLY = "vigil_read_only"
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


@contextlib.asynccontextmanager
async def transaction(
    target: Database | AsyncSession, *, read_only: bool = False
) -> AsyncIterator[AsyncSession]:
    """The caller's session as it is, or a new transaction on a Database: lets record functions compose."""
    if isinstance(target, AsyncSession):
        yield target
    else:
        async with target.session(read_only=read_only) as session:
            yield session


def sqlite_url(data_dir: Path) -> str:
    """The URL of the embedded runtime's records database inside `data_dir` (created if missing)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{(data_dir / SQLITE_FILE).resolve()}"


def async_url(url: str) -> str:
    """`url` with its async driver: plain `sqlite:` and `postgresql:` URLs get aiosqlite and asyncpg."""
    parsed = make_url(url)
    driver = {
        "sqlite": "sqlite+aiosqlite",
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
    }
    name = driver.get(parsed.drivername)
    if name is not None:
        parsed = parsed.set(drivername=name)
    if parsed.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ValueError(f"records need SQLite (aiosqlite) or PostgreSQL (asyncpg), not {parsed.drivername}")
    return parsed.render_as_string(hide_password=False)


class Database:
    """An async engine, its sessions and its migrations. Create one per process; `close()` at the end."""

    def __init__(self, url: str) -> None:
        self.url = async_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        if self.dialect == "sqlite":
            self.engine: AsyncEngine = create_async_engine(self.url)
            _configure_sqlite(self.engine)
        else:
            self.engine = create_async_engine(self.url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        self._writer = async_sessionmaker(self.engine, expire_on_commit=False)
        self._reader = async_sessionmaker(
            self.engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False
        )

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision; a no-op when it is there already."""
        if await self._revision() == head_revision():
            return  # alembic itself takes most of a second to import: every CLI call would pay it
        async with self.engine.connect() as connection:
            await connection.run_sync(_upgrade, self.url)
            await connection.commit()

    @contextlib.asynccontextmanager
    async def session(self, *, read_only: bool = False) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed when the block ends, rolled back if it raises."""
        maker = self._reader if read_only else self._writer
        async with maker() as session, session.begin():
            yield session

    async def _revision(self) -> str | None:
        try:
            async with self.engine.connect() as connection:
                row = (await connection.execute(text("SELECT version_num FROM alembic_version"))).first()
        except Exception:  # no table yet: a new database
            return None
        return None if row is None else str(row[0])

    async def ping(self) -> bool:
        """True when the database answers a query."""
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception:  # any failure means "not ready"; /readyz reports it
            log.warning("records database does not answer", exc_info=True)
            return False
        return True

    async def close(self) -> None:
        await self.engine.dispose()


_REVISION = re.compile(r"^(down_)?revision(?::[^=]*)?\s*=\s*['\"]?([\w]+|None)['\"]?", re.MULTILINE)


def head_revision() -> str | None:
    """The newest migration, read from the revision files without importing alembic."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for down, value in _REVISION.findall(path.read_text()):
            if value != "None":
                (parents if down else revisions).add(value)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _upgrade(connection: Connection, url: str) -> None:
    from alembic import command  # noqa: PLC0415 - only when a migration is due (slow import)
    from alembic.config import Config  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _configure_sqlite(engine: AsyncEngine) -> None:
    """WAL, foreign keys and a busy timeout on every connection; writers take the lock when they begin."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own implicit transactions would start deferred; transactions are begun below instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA foreign_keys=ON",
            "PRAGMA busy_timeout=10000",
            "PRAGMA synchronous=FULL",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A deferred transaction that reads and then writes can fail at once with SQLITE_BUSY when another
        # process wrote in between (the busy timeout does not apply); writers therefore lock up front.
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
