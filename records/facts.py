"""Escalation facts from the records: the nurse assigned to each bed, users by role and roster groups per
unit. One `refresh` loads everything (the host calls it every second); `facts` answers from memory."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import or_, select

from alerting.escalation import Facts
from records.db import Database
from records.models import Unit, User, UserScope
from records.staff import current_assignments
from records.staff_models import RosterEntry


class EscalationDirectory:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._assignee: dict[str, str] = {}  # bed -> nurse
        self._roles: dict[str, dict[str, tuple[str, ...]]] = {}  # unit -> role -> users
        self._groups: dict[str, dict[str, tuple[str, ...]]] = {}  # unit -> group -> users in order

    async def refresh(self, at_ms: int) -> None:
        assignee = {a.bed_id: a.username for a in await current_assignments(self._db, at=at_ms)}
        roles: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        async with self._db.session(read_only=True) as s:
            units = (await s.execute(select(Unit.id, Unit.site_id))).all()
            by_site: dict[str, list[str]] = defaultdict(list)
            for unit_ref, site_ref in units:
                by_site[site_ref].append(unit_ref)
            scoped = await s.execute(
                select(User.username, User.role, UserScope.site_id, UserScope.unit_id)
                .join(UserScope, UserScope.username == User.username)
                .where(User.disabled.is_(False))
                .order_by(User.username)
            )
            for username, role, scope_site, scope_unit in scoped.all():
                if scope_unit is not None:
                    targets = [scope_unit]
                elif scope_site == "*":
                    targets = [u for us in by_site.values() for u in us]
                else:
                    targets = by_site.get(scope_site, [])
                for u in targets:
                    if username not in roles[u][role]:
                        roles[u][role].append(username)
            rows = await s.execute(
                select(RosterEntry.unit_id, RosterEntry.group, RosterEntry.username)
                .where(
                    RosterEntry.from_at <= at_ms,
                    or_(RosterEntry.to_at.is_(None), RosterEntry.to_at > at_ms),
                )
                .order_by(RosterEntry.unit_id, RosterEntry.group, RosterEntry.position)
            )
            for roster_unit, group, member in rows.all():
                groups[roster_unit][group].append(member)
        self._assignee = assignee
        self._roles = {u: {r: tuple(v) for r, v in rs.items()} for u, rs in roles.items()}
        self._groups = {u: {g: tuple(v) for g, v in gs.items()} for u, gs in groups.items()}

    def facts(
        self,
        *,
        site_id: str,
        unit_id: str | None,
        bed_id: str | None,
        patient_id: str | None,
        connected: frozenset[str],
    ) -> Facts:
        unit = unit_id or ""
        return Facts(
            assignee=self._assignee.get(bed_id) if bed_id else None,
            roles=self._roles.get(unit, {}),
            groups=self._groups.get(unit, {}),
            connected=connected,
        )
