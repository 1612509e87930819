"""Who answers for a bed or a unit: nurse-to-bed assignments and per-unit roster groups, with their history.

Alarm and lab routing ask "who at time `at`", so every read takes `at`; changes close the open rows and open
new ones (never rewrite them), and each change is audited in the same transaction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from records.audit import audit
from records.db import Database, transaction
from records.errors import NotFoundError, RecordsError
from records.models import Bed, Unit
from records.people import UserInfo, get_user
from records.staff_models import Assignment, RosterEntry

NURSE_ROLES = frozenset({"nurse", "charge_nurse"})
ROSTER_ROLES = frozenset({"nurse", "charge_nurse", "doctor"})
# Groups whose members must hold a given role; any other well-formed group takes any clinical role.
GROUP_ROLES: dict[str, frozenset[str]] = {
    "doctor_on_duty": frozenset({"doctor"}),
    "attending": frozenset({"doctor"}),
    "charge_nurse": frozenset({"charge_nurse"}),
    "rapid_response": ROSTER_ROLES,
}
MAX_ROSTER = 32
_GROUP = re.compile(r"[a-z][a-z0-9_]{0,31}")


class StaffError(RecordsError):
    """A staff change the records refuse (a user who may not take the bed or group); the message says why."""


@dataclass(frozen=True, slots=True)
class UnitInfo:
    id: str
    site_id: str
    name: str


@dataclass(frozen=True, slots=True)
class AssignmentInfo:
    bed_id: str
    site_id: str
    unit_id: str | None
    username: str
    from_at: int
    to_at: int | None


@dataclass(frozen=True, slots=True)
class RosterMember:
    group: str
    position: int
    username: str
    from_at: int
    to_at: int | None


def valid_group(group: str) -> bool:
    """A roster group name: lower case letters, digits and `_`, up to 32 characters."""
    return _GROUP.fullmatch(group) is not None


async def get_unit(db: Database | AsyncSession, unit_id: str) -> UnitInfo | None:
    async with transaction(db, read_only=True) as session:
        unit = await session.get(Unit, unit_id)
        return None if unit is None else UnitInfo(unit.id, unit.site_id, unit.name)


async def assign_nurse(
    db: Database | AsyncSession, *, bed_id: str, username: str | None, at: int, actor: str
) -> AssignmentInfo | None:
    """Make `username` the bed's nurse from `at` (None: nobody); closes the previous assignment. Audited.

    The nurse must be an enabled nurse or charge nurse who can see the bed's unit (`StaffError` otherwise).
    Assigning the nurse the bed already has is a no-op that answers the current assignment.
    """
    async with transaction(db) as session:
        # Locking the bed row serialises concurrent changes to its assignment (PostgreSQL; SQLite locks all).
        bed = await session.get(Bed, bed_id, with_for_update=True)
        if bed is None:
            raise NotFoundError(f"no bed {bed_id}")
        if username is not None:
            await _check_member(session, username, bed.site_id, bed.unit_id, NURSE_ROLES, f"bed {bed_id}")
        query = select(Assignment).where(Assignment.bed_id == bed_id, Assignment.to_at.is_(None))
        current = (await session.execute(query.with_for_update())).scalar_one_or_none()
        if current is not None and current.username == username:
            return _assignment(current)
        previous = None
        if current is not None:
            previous = current.username
            current.to_at = max(at, current.from_at)
            await session.flush()
        row = None
        if username is not None:
            row = Assignment(
                site_id=bed.site_id, unit_id=bed.unit_id, bed_id=bed_id, username=username, from_at=at
            )
            session.add(row)
            await session.flush()
        await audit(
            session,
            at=at,
            actor=actor,
            action="bed.assign" if username is not None else "bed.unassign",
            target_type="bed",
            target_id=bed_id,
            site_id=bed.site_id,
            detail={"unit_id": bed.unit_id, "username": username, "previous": previous},
        )
        return None if row is None else _assignment(row)


async def current_assignments(
    db: Database | AsyncSession, *, at: int, unit_id: str | None = None, site_id: str | None = None
) -> list[AssignmentInfo]:
    """The assignments in force at `at` (of one unit or site, or all), by bed."""
    query = select(Assignment).where(
        Assignment.from_at <= at, or_(Assignment.to_at.is_(None), Assignment.to_at > at)
    )
    if unit_id is not None:
        query = query.where(Assignment.unit_id == unit_id)
    if site_id is not None:
        query = query.where(Assignment.site_id == site_id)
    async with transaction(db, read_only=True) as session:
        rows = (await session.execute(query.order_by(Assignment.bed_id, Assignment.from_at))).scalars().all()
    # A bed reassigned at exactly `at` has its old row closed at `at`, so one row per bed remains.
    return [_assignment(r) for r in rows]


async def nurse_of_bed(db: Database | AsyncSession, *, bed_id: str, at: int) -> str | None:
    """The nurse assigned to the bed at `at`, if any."""
    query = select(Assignment.username).where(
        Assignment.bed_id == bed_id,
        Assignment.from_at <= at,
        or_(Assignment.to_at.is_(None), Assignment.to_at > at),
    )
    async with transaction(db, read_only=True) as session:
        found = await session.execute(query.order_by(Assignment.from_at.desc()).limit(1))
        return found.scalar_one_or_none()


async def set_roster(
    db: Database | AsyncSession,
    *,
    unit_id: str,
    group: str,
    usernames: Sequence[str],
    at: int,
    actor: str,
) -> list[RosterMember]:
    """Make `usernames` (in escalation order) the unit's `group` from `at`; an empty list empties it. Audited.

    Every member must be an enabled user who can see the unit, with a role the group takes (`StaffError`).
    The same list in the same order is a no-op.
    """
    if not valid_group(group):
        raise StaffError(f"roster group {group!r}: lower case letters, digits and _ (up to 32)")
    names = list(usernames)
    if len(set(names)) != len(names):
        raise StaffError("a user appears twice in the roster")
    if len(names) > MAX_ROSTER:
        raise StaffError(f"a roster group holds at most {MAX_ROSTER} users")
    roles = GROUP_ROLES.get(group, ROSTER_ROLES)
    async with transaction(db) as session:
        unit = await session.get(Unit, unit_id, with_for_update=True)  # one roster change of a unit at a time
        if unit is None:
            raise NotFoundError(f"no unit {unit_id}")
        for name in names:
            await _check_member(session, name, unit.site_id, unit.id, roles, f"roster group {group}")
        query = (
            select(RosterEntry)
            .where(RosterEntry.unit_id == unit_id, RosterEntry.group == group, RosterEntry.to_at.is_(None))
            .order_by(RosterEntry.position)
        )
        open_rows = list((await session.execute(query.with_for_update())).scalars().all())
        before = [r.username for r in open_rows]
        if before == names:
            return [_member(r) for r in open_rows]
        for r in open_rows:
            r.to_at = max(at, r.from_at)
        await session.flush()  # the open-member index must see the old rows closed before new ones open
        rows = [
            RosterEntry(
                site_id=unit.site_id, unit_id=unit_id, group=group, position=i, username=name, from_at=at
            )
            for i, name in enumerate(names)
        ]
        session.add_all(rows)
        await session.flush()
        await audit(
            session,
            at=at,
            actor=actor,
            action="roster.set",
            target_type="unit",
            target_id=unit_id,
            site_id=unit.site_id,
            detail={"group": group, "usernames": names, "previous": before},
        )
        return [_member(r) for r in rows]


async def current_roster(
    db: Database | AsyncSession, *, unit_id: str, at: int, group: str | None = None
) -> dict[str, list[str]]:
    """Each group of the unit at `at` (or only `group`) with its members in escalation order."""
    query = select(RosterEntry).where(
        RosterEntry.unit_id == unit_id,
        RosterEntry.from_at <= at,
        or_(RosterEntry.to_at.is_(None), RosterEntry.to_at > at),
    )
    if group is not None:
        query = query.where(RosterEntry.group == group)
    async with transaction(db, read_only=True) as session:
        rows = (
            (await session.execute(query.order_by(RosterEntry.group, RosterEntry.position))).scalars().all()
        )
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r.group, []).append(r.username)
    return out


async def _check_member(
    session: AsyncSession,
    username: str,
    site_id: str,
    unit_id: str | None,
    roles: frozenset[str],
    what: str,
) -> UserInfo:
    # One message whether the user is unknown, disabled or of another site: a caller learns nothing else.
    user = await get_user(session, username)
    if user is None or user.role not in roles or not user.can_see(site_id, unit_id):
        raise StaffError(f"{username!r} is not a {' or '.join(sorted(roles))} who can see {what}")
    return user


def _assignment(r: Assignment) -> AssignmentInfo:
    return AssignmentInfo(r.bed_id, r.site_id, r.unit_id, r.username, r.from_at, r.to_at)


def _member(r: RosterEntry) -> RosterMember:
    return RosterMember(r.group, r.position, r.username, r.from_at, r.to_at)
