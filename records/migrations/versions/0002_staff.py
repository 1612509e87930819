"""Staff: nurse-to-bed assignments and per-unit rosters (doctor on duty, charge nurse, rapid response, ...).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_OPEN = sa.text("to_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "assignments",
        sa.Column("id", _AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("unit_id", sa.String(64), sa.ForeignKey("units.id"), nullable=True),
        sa.Column("bed_id", sa.String(64), sa.ForeignKey("beds.id"), nullable=False),
        sa.Column("username", sa.String(128), sa.ForeignKey("users.username"), nullable=False),
        sa.Column("from_at", sa.BigInteger(), nullable=False),
        sa.Column("to_at", sa.BigInteger(), nullable=True),
    )
    # At most one nurse per bed at a time, enforced by the database.
    op.create_index(
        "uq_assignments_open_bed",
        "assignments",
        ["bed_id"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )
    op.create_index("ix_assignments_unit_from", "assignments", ["unit_id", "from_at"])
    op.create_index("ix_assignments_username", "assignments", ["username"])
    op.create_table(
        "roster",
        sa.Column("id", _AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("unit_id", sa.String(64), sa.ForeignKey("units.id"), nullable=False),
        sa.Column("group", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(128), sa.ForeignKey("users.username"), nullable=False),
        sa.Column("from_at", sa.BigInteger(), nullable=False),
        sa.Column("to_at", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_roster_unit_group_from", "roster", ["unit_id", "group", "from_at"])
    op.create_index(
        "uq_roster_open_member",
        "roster",
        ["unit_id", "group", "username"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )
    op.create_index("ix_roster_username", "roster", ["username"])


def downgrade() -> None:
    op.drop_table("roster")
    op.drop_table("assignments")
