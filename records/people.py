"""Users: role, argon2 password hash, the sites and units they may see, and their HL7/FHIR provider id."""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from records.audit import audit
from records.db import Database, transaction
from records.errors import ConflictError
from records.models import ALL_SITES, ROLES, Unit, User, UserScope
from records.places import DEFAULT_SITE, ensure_site, ensure_unit
from records.version import bump_version

ADMIN = "admin"
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified when the user is unknown, so an unknown name takes as long to refuse as a wrong password."""
    return _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class UserInfo:
    """An authenticated user: role, provider id and scopes ((site, None) is every unit of that site)."""

    username: str
    role: str
    provider_id: str | None
    scopes: tuple[tuple[str, str | None], ...]

    @property
    def all_sites(self) -> bool:
        return any(site == ALL_SITES for site, _ in self.scopes)

    @property
    def sites(self) -> frozenset[str]:
        """The sites the user sees something of (`*` when every site)."""
        return frozenset(site for site, _ in self.scopes)

    @property
    def units(self) -> frozenset[str] | None:
        """The units the user is limited to, None when limited to none (whole sites); `can_see` is exact."""
        limited = frozenset(unit for _, unit in self.scopes if unit is not None)
        return limited or None

    def can_see(self, site_id: str, unit_id: str | None = None) -> bool:
        """True for a record of this site and unit (`unit_id=None`: a site-wide record needs a site scope)."""
        for site, unit in self.scopes:
            if site == ALL_SITES or (site == site_id and (unit is None or unit == unit_id)):
                return True
        return False


async def add_user(
    db: Database | AsyncSession,
    *,
    username: str,
    role: str,
    sites: Sequence[str] = (),
    units: Sequence[str] = (),
    password: str | None = None,
    provider_id: str | None = None,
    at: int,
    actor: str = "cli",
) -> dict[str, Any]:
    """Create a user; the answer holds the password only when generated here. A taken name: `ConflictError`.

    Scopes: an admin sees every site; otherwise each given unit (created in the first site when new), and
    every unit of each given site none of those units is in (site `default` when none is given).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not username:
        raise ValueError("a user needs a name")
    generated = password is None
    secret = password if password is not None else secrets.token_urlsafe(16)
    password_hash = await asyncio.to_thread(_hasher.hash, secret)
    async with transaction(db) as session:
        if await session.get(User, username) is not None:
            raise ConflictError(f"user {username} exists already")
        if provider_id is not None:
            taken = await session.execute(select(User.username).where(User.provider_id == provider_id))
            if taken.first() is not None:
                raise ConflictError(f"provider id {provider_id} belongs to another user")
        scopes = await _scopes(session, role, list(sites), list(units))
        session.add(
            User(
                username=username,
                role=role,
                password_hash=password_hash,
                provider_id=provider_id,
                created_at=at,
                disabled=False,
            )
        )
        await session.flush()
        session.add_all(UserScope(username=username, site_id=s, unit_id=u) for s, u in scopes)
        answer: dict[str, Any] = {
            "username": username,
            "role": role,
            "sites": sorted({s for s, _ in scopes}),
            "units": sorted({u for _, u in scopes if u is not None}),
            "provider_id": provider_id,
        }
        await audit(
            session,
            at=at,
            actor=actor,
            action="user.add",
            target_type="user",
            target_id=username,
            site_id=None if role == ADMIN else scopes[0][0],
            detail=answer,
        )
        await bump_version(session)
    if generated:
        answer["password"] = secret
    return answer


async def verify_user(db: Database | AsyncSession, username: str, password: str) -> UserInfo | None:
    """The user when the password is right and the account enabled; None otherwise."""
    async with transaction(db, read_only=True) as session:
        user = await session.get(User, username)
        known = user is not None and not user.disabled
        stored = user.password_hash if user is not None and known else _dummy_hash()
        info = await _info(session, user) if user is not None and known else None
    ok = await asyncio.to_thread(_verify, stored, password)
    if not ok or info is None:
        return None
    if _hasher.check_needs_rehash(stored):
        rehashed = await asyncio.to_thread(_hasher.hash, password)
        async with transaction(db) as session:
            row = await session.get(User, username)
            if row is not None:
                row.password_hash = rehashed
    return info


async def get_user(db: Database | AsyncSession, username: str) -> UserInfo | None:
    """An enabled user by name (for a token's subject), without a password check."""
    async with transaction(db, read_only=True) as session:
        user = await session.get(User, username)
        if user is None or user.disabled:
            return None
        return await _info(session, user)


async def ensure_admin(db: Database | AsyncSession, password: str, at: int) -> bool:
    """Create user `admin` (every site) with this password unless it exists; True when created."""
    async with transaction(db) as session:
        if await session.get(User, ADMIN) is not None:
            return False
        await add_user(session, username=ADMIN, role=ADMIN, password=password, at=at, actor="system")
        return True


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


async def _scopes(
    session: AsyncSession, role: str, sites: list[str], units: list[str]
) -> list[tuple[str, str | None]]:
    if role == ADMIN:
        return [(ALL_SITES, None)]
    if not sites:
        sites = [DEFAULT_SITE]
    scoped: list[tuple[str, str | None]] = []
    unit_sites: set[str] = set()
    for unit_id in units:
        unit = await session.get(Unit, unit_id)
        site_id = unit.site_id if unit is not None else sites[0]
        await ensure_unit(session, site_id, unit_id)
        unit_sites.add(site_id)
        scoped.append((site_id, unit_id))
    for site_id in sites:
        await ensure_site(session, site_id)
        if site_id not in unit_sites:
            scoped.append((site_id, None))
    return list(dict.fromkeys(scoped))


async def _info(session: AsyncSession, user: User) -> UserInfo:
    rows = await session.execute(
        select(UserScope.site_id, UserScope.unit_id).where(UserScope.username == user.username)
    )
    scopes = tuple((site, unit) for site, unit in rows.all())
    return UserInfo(user.username, user.role, user.provider_id, scopes)
