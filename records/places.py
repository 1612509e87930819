"""Sites, units, beds and patients: created on first mention, as the contract says, and looked up."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from records.audit import audit
from records.db import Database, transaction
from records.errors import ConflictError, NotFoundError
from records.models import Admission, Bed, Patient, Site, Unit
from records.version import bump_version

DEFAULT_SITE = "default"


@dataclass(frozen=True, slots=True)
class BedInfo:
    id: str
    site_id: str
    unit_id: str | None
    label: str
    patient_id: str | None  # the current admission's patient


@dataclass(frozen=True, slots=True)
class PatientInfo:
    id: str
    site_id: str
    created_at: int
    news2_scale: int  # SpO2 scale 1 or 2
    news2_suppressed: bool
    bed_id: str | None  # the bed of the current admission


async def ensure_site(db: Database | AsyncSession, site_id: str) -> None:
    """Create the site when it does not exist yet."""
    async with transaction(db) as session:
        if await session.get(Site, site_id) is None:
            session.add(Site(id=site_id, name=site_id))
            await session.flush()


async def ensure_unit(db: Database | AsyncSession, site_id: str, unit_id: str) -> None:
    """Create the unit (and its site) when missing; a unit of another site is a `ConflictError`."""
    async with transaction(db) as session:
        await ensure_site(session, site_id)
        unit = await session.get(Unit, unit_id)
        if unit is None:
            session.add(Unit(id=unit_id, site_id=site_id, name=unit_id))
            await session.flush()
        elif unit.site_id != site_id:
            raise ConflictError(f"unit {unit_id} belongs to site {unit.site_id}, not {site_id}")


async def ensure_bed(db: Database | AsyncSession, site_id: str, unit_id: str | None, bed_id: str) -> None:
    """Create the bed (and its site and unit) when missing; a bed elsewhere is a `ConflictError`."""
    async with transaction(db) as session:
        if unit_id is None:
            await ensure_site(session, site_id)
        else:
            await ensure_unit(session, site_id, unit_id)
        bed = await session.get(Bed, bed_id)
        if bed is None:
            session.add(Bed(id=bed_id, site_id=site_id, unit_id=unit_id, label=bed_id))
        elif bed.site_id != site_id:
            raise ConflictError(f"bed {bed_id} belongs to site {bed.site_id}, not {site_id}")
        elif unit_id is not None and bed.unit_id not in (None, unit_id):
            raise ConflictError(f"bed {bed_id} belongs to unit {bed.unit_id}, not {unit_id}")
        elif unit_id is not None and bed.unit_id is None:
            bed.unit_id = unit_id
        else:
            return
        await session.flush()
        await bump_version(session)


async def ensure_patient(db: Database | AsyncSession, site_id: str, patient_id: str, at: int) -> None:
    """Create the patient in `site_id` when unknown; a patient of another site is a `ConflictError`."""
    async with transaction(db) as session:
        await ensure_site(session, site_id)
        patient = await session.get(Patient, patient_id)
        if patient is None:
            session.add(Patient(id=patient_id, site_id=site_id, created_at=at))
            await session.flush()
        elif patient.site_id != site_id:
            raise ConflictError(f"patient {patient_id} belongs to site {patient.site_id}, not {site_id}")


async def get_bed(db: Database | AsyncSession, bed_id: str) -> BedInfo | None:
    async with transaction(db, read_only=True) as session:
        bed = await session.get(Bed, bed_id)
        if bed is None:
            return None
        patient = await _open_patient_of_bed(session, bed_id)
        return BedInfo(bed.id, bed.site_id, bed.unit_id, bed.label, patient)


async def list_beds(db: Database | AsyncSession, *, site_id: str | None = None) -> list[BedInfo]:
    """Beds (of one site, or all) with their current patients."""
    query = select(Bed, Admission.patient_id).outerjoin(
        Admission, (Admission.bed_id == Bed.id) & Admission.ended_at.is_(None)
    )
    if site_id is not None:
        query = query.where(Bed.site_id == site_id)
    async with transaction(db, read_only=True) as session:
        rows = (await session.execute(query.order_by(Bed.id))).all()
    return [BedInfo(b.id, b.site_id, b.unit_id, b.label, p) for b, p in rows]


async def get_patient(db: Database | AsyncSession, patient_id: str) -> PatientInfo | None:
    async with transaction(db, read_only=True) as session:
        patient = await session.get(Patient, patient_id)
        if patient is None:
            return None
        bed = await _open_bed_of_patient(session, patient_id)
        return _patient_info(patient, bed)


async def set_news2(
    db: Database | AsyncSession,
    *,
    patient_id: str,
    spo2_scale: int,
    suppressed: bool,
    at: int,
    actor: str,
) -> PatientInfo:
    """Choose the NEWS2 SpO2 scale and suppression of a patient (a doctor's decision); audited."""
    if spo2_scale not in (1, 2):
        raise ValueError("the NEWS2 SpO2 scale is 1 or 2")
    async with transaction(db) as session:
        patient = await session.get(Patient, patient_id)
        if patient is None:
            raise NotFoundError(f"no patient {patient_id}")
        before = {"spo2_scale": patient.news2_scale, "suppressed": patient.news2_suppressed}
        patient.news2_scale = spo2_scale
        patient.news2_suppressed = suppressed
        await session.flush()
        await audit(
            session,
            at=at,
            actor=actor,
            action="patient.news2",
            target_type="patient",
            target_id=patient_id,
            site_id=patient.site_id,
            detail={"before": before, "after": {"spo2_scale": spo2_scale, "suppressed": suppressed}},
        )
        bed = await _open_bed_of_patient(session, patient_id)
        return _patient_info(patient, bed)


async def _open_patient_of_bed(session: AsyncSession, bed_id: str) -> str | None:
    query = select(Admission.patient_id).where(Admission.bed_id == bed_id, Admission.ended_at.is_(None))
    return (await session.execute(query)).scalar_one_or_none()


async def _open_bed_of_patient(session: AsyncSession, patient_id: str) -> str | None:
    query = select(Admission.bed_id).where(Admission.patient_id == patient_id, Admission.ended_at.is_(None))
    return (await session.execute(query)).scalar_one_or_none()


def _patient_info(patient: Patient, bed_id: str | None) -> PatientInfo:
    return PatientInfo(
        patient.id, patient.site_id, patient.created_at, patient.news2_scale, patient.news2_suppressed, bed_id
    )
