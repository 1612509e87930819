"""Alerts: current versions, history, pages, receipts, patient limit overrides, latest NEWS2.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("bed_id", sa.String(64), nullable=True),
        sa.Column("site_id", sa.String(64), nullable=False),
        sa.Column("unit_id", sa.String(64), nullable=True),
        sa.Column("condition", sa.String(64), nullable=False),
        sa.Column("priority", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("raised_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("data_stale", sa.Boolean(), nullable=False),
        sa.Column("retrospective", sa.Boolean(), nullable=False),
        sa.Column("silenced_until", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
    )
    op.create_index("ix_alerts_patient_id", "alerts", ["patient_id"])
    op.create_index("ix_alerts_updated_at", "alerts", ["updated_at"])
    op.create_index("ix_alerts_site_status", "alerts", ["site_id", "status"])
    op.create_table(
        "alert_versions",
        sa.Column("alert_id", sa.String(255), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(128), nullable=False),
        sa.Column("by", sa.String(128), nullable=True),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("alert", sa.JSON(), nullable=False),
    )
    op.create_table(
        "alert_pages",
        sa.Column("alert_id", sa.String(255), primary_key=True),
        sa.Column("step", sa.Integer(), primary_key=True),
        sa.Column("alert_version", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("skipped", sa.String(64), nullable=True),
        sa.Column("at", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "alert_receipts",
        sa.Column("alert_id", sa.String(255), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("username", sa.String(128), primary_key=True),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "patient_overrides",
        sa.Column("patient_id", sa.String(64), primary_key=True),
        sa.Column("condition", sa.String(64), primary_key=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("priority", sa.String(8), nullable=True),
        sa.Column("delay_ms", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("set_by", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("set_at", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "news2_latest",
        sa.Column("patient_id", sa.String(64), primary_key=True),
        sa.Column("site_id", sa.String(64), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    for table in ("news2_latest", "patient_overrides", "alert_receipts", "alert_pages", "alert_versions"):
        op.drop_table(table)
    op.drop_index("ix_alerts_site_status", "alerts")
    op.drop_index("ix_alerts_updated_at", "alerts")
    op.drop_index("ix_alerts_patient_id", "alerts")
    op.drop_table("alerts")
