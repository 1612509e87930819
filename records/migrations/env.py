"""Alembic environment for async engines (aiosqlite, asyncpg).

`records.db.Database.migrate` hands in its own connection through `config.attributes["connection"]`; the
`alembic` command line gets an engine built from `sqlalchemy.url` instead.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool, text
from sqlalchemy.ext.asyncio import async_engine_from_config

# Importing the model modules registers their tables in Base.metadata.
from records import alert_models, staff_models, state_models  # noqa: F401
from records.models import Base

# Any fixed number: every process migrating the same PostgreSQL database waits on this lock in turn.
_PG_MIGRATION_LOCK = 7_241_305_118


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        context.run_migrations()


async def _run_from_url() -> None:
    section = context.config.get_section(context.config.config_ini_section, {})
    engine = async_engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


def _main() -> None:
    if context.is_offline_mode():
        context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    shared = context.config.attributes.get("connection")
    if shared is None:
        asyncio.run(_run_from_url())
    else:
        _run(shared)


_main()
