"""Models of who is responsible for what: nurse-to-bed assignments and per-unit rosters (doctor on duty, ...).

Kept apart from `records.models` so the staff tables have one home; `records/migrations/env.py` imports this
module, so Alembic and the "models match the migrations" test see these tables in `Base.metadata`.
Times are integer epoch ms; a row holds from `from_at` until `to_at` (null: still open).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from records.models import AutoId, Base


class Assignment(Base):
    """A nurse responsible for a bed; the database allows one open row per bed."""

    __tablename__ = "assignments"
    __table_args__ = (
        Index(
            "uq_assignments_open_bed",
            "bed_id",
            unique=True,
            sqlite_where=text("to_at IS NULL"),
            postgresql_where=text("to_at IS NULL"),
        ),
        Index("ix_assignments_unit_from", "unit_id", "from_at"),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    unit_id: Mapped[str | None] = mapped_column(ForeignKey("units.id"))
    bed_id: Mapped[str] = mapped_column(ForeignKey("beds.id"))
    username: Mapped[str] = mapped_column(ForeignKey("users.username"), index=True)
    from_at: Mapped[int] = mapped_column(BigInteger)
    to_at: Mapped[int | None] = mapped_column(BigInteger)


class RosterEntry(Base):
    """A member of a unit's roster group (doctor_on_duty, rapid_response, ...) in escalation order."""

    __tablename__ = "roster"
    __table_args__ = (
        Index("ix_roster_unit_group_from", "unit_id", "group", "from_at"),
        Index(
            "uq_roster_open_member",
            "unit_id",
            "group",
            "username",
            unique=True,
            sqlite_where=text("to_at IS NULL"),
            postgresql_where=text("to_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    unit_id: Mapped[str] = mapped_column(ForeignKey("units.id"))
    group: Mapped[str] = mapped_column(String(32))
    position: Mapped[int] = mapped_column(Integer)  # 0 is asked first
    username: Mapped[str] = mapped_column(ForeignKey("users.username"), index=True)
    from_at: Mapped[int] = mapped_column(BigInteger)
    to_at: Mapped[int | None] = mapped_column(BigInteger)
