"""The registry version: a one-row counter that caches of devices, beds, admissions and users follow."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from records.models import RegistryVersion


async def bump_version(session: AsyncSession) -> None:
    """Count one change; call it in the same transaction as the change, so a cache never sees one alone."""
    await session.execute(
        update(RegistryVersion).where(RegistryVersion.id == 1).values(version=RegistryVersion.version + 1)
    )


async def registry_version(session: AsyncSession) -> int:
    return int(
        (await session.execute(select(RegistryVersion.version).where(RegistryVersion.id == 1))).scalar_one()
    )
