"""Initial schema: places, patients, admissions, devices, users, audit log, dead letters, registry version.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_OPEN = sa.text("ended_at IS NULL")

# The audit log is append-only in the database itself, so no code path (nor a hand-typed query) rewrites it.
_SQLITE_TRIGGERS = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
)
_PG_TRIGGERS = (
    "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege'; END $$",
    "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
)


def upgrade() -> None:
    op.create_table(
        "sites",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
    )
    op.create_table(
        "units",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
    )
    op.create_index("ix_units_site_id", "units", ["site_id"])
    op.create_table(
        "beds",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("unit_id", sa.String(64), sa.ForeignKey("units.id"), nullable=True),
        sa.Column("label", sa.String(200), nullable=False),
    )
    op.create_index("ix_beds_site_id", "beds", ["site_id"])
    op.create_index("ix_beds_unit_id", "beds", ["unit_id"])
    op.create_table(
        "patients",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("news2_scale", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("news2_suppressed", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )
    op.create_index("ix_patients_site_id", "patients", ["site_id"])
    op.create_table(
        "admissions",
        sa.Column("id", _AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("patient_id", sa.String(64), sa.ForeignKey("patients.id"), nullable=False),
        sa.Column("bed_id", sa.String(64), sa.ForeignKey("beds.id"), nullable=False),
        sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("admitted_at", sa.BigInteger(), nullable=False),
        sa.Column("ended_at", sa.BigInteger(), nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
    )
    # At most one open admission per bed and per patient, enforced by the database.
    op.create_index(
        "uq_admissions_open_bed",
        "admissions",
        ["bed_id"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )
    op.create_index(
        "uq_admissions_open_patient",
        "admissions",
        ["patient_id"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("unit_id", sa.String(64), sa.ForeignKey("units.id"), nullable=True),
        sa.Column("bed_id", sa.String(64), sa.ForeignKey("beds.id"), nullable=True),
        sa.Column("patient_id", sa.String(64), sa.ForeignKey("patients.id"), nullable=True),
        sa.Column("secret_enc", sa.Text(), nullable=False),
        sa.Column("allow_plain_coap", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.text("true")),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_devices_site_id", "devices", ["site_id"])
    op.create_table(
        "users",
        sa.Column("username", sa.String(128), primary_key=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("provider_id", sa.String(128), nullable=True, unique=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )
    op.create_table(
        "user_scopes",
        sa.Column("id", _AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column(
            "username", sa.String(128), sa.ForeignKey("users.username", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("site_id", sa.String(64), nullable=False),
        sa.Column("unit_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_user_scopes_username", "user_scopes", ["username"])
    op.create_table(
        "audit_log",
        sa.Column("seq", _AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=False),
        sa.Column("target_id", sa.String(128), nullable=False),
        sa.Column("site_id", sa.String(64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_site_id", "audit_log", ["site_id"])
    op.create_table(
        "deadletters",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=True),
        sa.Column("kind", sa.String(16), nullable=True),
        sa.Column("site_id", sa.String(64), nullable=True),
        sa.Column("payload", sa.Text(), nullable=True),
    )
    op.create_index("ix_deadletters_received_at", "deadletters", ["received_at"])
    version = op.create_table(
        "registry_version",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(version, [{"id": 1, "version": 0}])

    dialect = op.get_context().dialect.name
    triggers = {"sqlite": _SQLITE_TRIGGERS, "postgresql": _PG_TRIGGERS}.get(dialect)
    if triggers is None:
        raise NotImplementedError(f"records run on SQLite and PostgreSQL, not {dialect}")
    for statement in triggers:
        op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    for table in (
        "registry_version",
        "deadletters",
        "audit_log",
        "user_scopes",
        "users",
        "devices",
        "admissions",
        "patients",
        "beds",
        "units",
        "sites",
    ):
        op.drop_table(table)
