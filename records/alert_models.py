"""Models of alerts at rest: current versions, their history, pages, receipts, overrides, latest NEWS2.

Migration 0004 creates these tables; `records/alerts.py` reads and writes them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from records.models import Base


class AlertRow(Base):
    """The newest version of each alert; an older or equal version never overwrites it."""

    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_site_status", "site_id", "status"),)

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    bed_id: Mapped[str | None] = mapped_column(String(64))
    site_id: Mapped[str] = mapped_column(String(64))
    unit_id: Mapped[str | None] = mapped_column(String(64))
    condition: Mapped[str] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    raised_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger, index=True)
    data_stale: Mapped[bool] = mapped_column(Boolean)
    retrospective: Mapped[bool] = mapped_column(Boolean)
    silenced_until: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class AlertVersionRow(Base):
    """Every version of an alert with the transition that made it: the alert's history."""

    __tablename__ = "alert_versions"

    alert_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(128))
    by: Mapped[str | None] = mapped_column(String(128))
    at: Mapped[int] = mapped_column(BigInteger)
    alert: Mapped[dict[str, Any]] = mapped_column(JSON)


class AlertPageRow(Base):
    """One escalation step of an alert: who was paged, or why the level was skipped."""

    __tablename__ = "alert_pages"

    alert_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_version: Mapped[int] = mapped_column(Integer)
    level: Mapped[int] = mapped_column(Integer)
    recipients: Mapped[list[str]] = mapped_column(JSON)
    skipped: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[int] = mapped_column(BigInteger)


class AlertReceiptRow(Base):
    """A client showed this version of the alert to this user (delivery receipt)."""

    __tablename__ = "alert_receipts"

    alert_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(128), primary_key=True)
    received_at: Mapped[int] = mapped_column(BigInteger)


class PatientOverrideRow(Base):
    """A patient's own limit for one condition, until `expires_at`."""

    __tablename__ = "patient_overrides"

    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    condition: Mapped[str] = mapped_column(String(64), primary_key=True)
    threshold: Mapped[float | None] = mapped_column(Float)
    priority: Mapped[str | None] = mapped_column(String(8))
    delay_ms: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    set_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(500))
    set_at: Mapped[int] = mapped_column(BigInteger)


class News2Row(Base):
    """The newest NEWS2 of a patient (the snapshot's `news2`)."""

    __tablename__ = "news2_latest"

    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(String(64))
    at: Mapped[int] = mapped_column(BigInteger)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
