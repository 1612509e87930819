"""Typed declarative models of the relational system of record. Times are integer epoch ms.

The schema itself is created by the Alembic revisions in `records/migrations`; these models must match them
(a test compares the two).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite makes only an INTEGER PRIMARY KEY an autoincrementing rowid; PostgreSQL gets a 64-bit identity.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

ROLES = ("nurse", "charge_nurse", "doctor", "dispatcher", "admin")
ALL_SITES = "*"  # a user scope on this site sees every site


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class Site(Base):
    __tablename__ = "sites"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))


class Unit(Base):
    __tablename__ = "units"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))


class Bed(Base):
    __tablename__ = "beds"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    unit_id: Mapped[str | None] = mapped_column(ForeignKey("units.id"), index=True)
    label: Mapped[str] = mapped_column(String(200))


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    news2_scale: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    news2_suppressed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class Admission(Base):
    """A patient in a bed from `admitted_at` until `ended_at`; the database allows one open row per bed."""

    __tablename__ = "admissions"
    __table_args__ = (
        Index(
            "uq_admissions_open_bed",
            "bed_id",
            unique=True,
            sqlite_where=text("ended_at IS NULL"),
            postgresql_where=text("ended_at IS NULL"),
        ),
        Index(
            "uq_admissions_open_patient",
            "patient_id",
            unique=True,
            sqlite_where=text("ended_at IS NULL"),
            postgresql_where=text("ended_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id"))
    bed_id: Mapped[str] = mapped_column(ForeignKey("beds.id"))
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    admitted_at: Mapped[int] = mapped_column(BigInteger)
    ended_at: Mapped[int | None] = mapped_column(BigInteger)
    end_reason: Mapped[str | None] = mapped_column(String(32))


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    unit_id: Mapped[str | None] = mapped_column(ForeignKey("units.id"))
    bed_id: Mapped[str | None] = mapped_column(ForeignKey("beds.id"))
    patient_id: Mapped[str | None] = mapped_column(ForeignKey("patients.id"))
    secret_enc: Mapped[str] = mapped_column(Text)  # Fernet token: DTLS-PSK needs the secret itself
    allow_plain_coap: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[int] = mapped_column(BigInteger)


class User(Base):
    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    password_hash: Mapped[str] = mapped_column(Text)  # argon2id
    provider_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class UserScope(Base):
    """A site (every unit) when `unit_id` is null, else one unit of it; site `*` is every site."""

    __tablename__ = "user_scopes"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(ForeignKey("users.username", ondelete="CASCADE"), index=True)
    site_id: Mapped[str] = mapped_column(String(64))  # no foreign key: `*` is not a site
    unit_id: Mapped[str | None] = mapped_column(String(64))


class AuditLog(Base):
    """Append-only: triggers in the database refuse UPDATE and DELETE."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    at: Mapped[int] = mapped_column(BigInteger, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(128))
    site_id: Mapped[str | None] = mapped_column(String(64), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class DeadLetterRecord(Base):
    """`streams.schemas.DeadLetter` at rest; its id is the primary key, so a repeat is a no-op."""

    __tablename__ = "deadletters"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    received_at: Mapped[int] = mapped_column(BigInteger, index=True)
    transport: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)
    device_id: Mapped[str | None] = mapped_column(String(128))
    kind: Mapped[str | None] = mapped_column(String(16))
    site_id: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[str | None] = mapped_column(Text)


class RegistryVersion(Base):
    """One row, bumped in the same transaction as any change to devices, beds, admissions or users."""

    __tablename__ = "registry_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)
