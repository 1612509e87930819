"""Admissions: which patient is in which bed. A bed holds at most one patient, a patient one bed.

Every change ends or opens rows in one transaction, bumps the registry version (so device attribution
follows within a second) and writes an audit row. Change ids are derived from bed, time and patient.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from records.audit import audit
from records.db import Database, transaction
from records.errors import NotFoundError
from records.models import Admission, Bed, Patient
from records.places import ensure_patient
from records.version import bump_version
from streams.schemas import AdmissionChange

# end_reason of an admission closed because another patient was admitted to its bed.
REPLACED = "replaced"
TRANSFER = "transfer"


def change_id(bed_id: str, at: int, patient_id: str | None) -> str:
    return f"adm/{bed_id}/{at}/{patient_id or '-'}"


async def admit_all(
    db: Database | AsyncSession,
    *,
    site_id: str,
    bed_id: str,
    patient_id: str,
    at: int,
    actor: str,
    reason: str = "admit",
) -> list[AdmissionChange]:
    """Admit a patient (created when unknown) to a bed of `site_id`; every bed it changes, in order.

    A patient in another bed moves (that bed is freed first, reason `transfer`); a patient already in the
    bed gives back the original admission's change, with its id, so a repeat is recognised downstream.
    """
    async with transaction(db) as session:
        bed = await _locked_bed(session, site_id, bed_id)
        await ensure_patient(session, site_id, patient_id, at)
        # Row locks (PostgreSQL; SQLite's writer lock covers it) keep concurrent admissions in order.
        await session.execute(select(Patient.id).where(Patient.id == patient_id).with_for_update())
        current = await _open_of_bed(session, bed.id)
        if current is not None and current.patient_id == patient_id:
            change = AdmissionChange(
                id=change_id(bed.id, current.admitted_at, patient_id),
                at=current.admitted_at,
                site_id=site_id,
                bed_id=bed.id,
                patient_id=patient_id,
                previous_patient_id=None,
                reason=reason,
            )
            return [change]

        changes: list[AdmissionChange] = []
        elsewhere = await _open_of_patient(session, patient_id)
        if elsewhere is not None:
            elsewhere.ended_at, elsewhere.end_reason = at, TRANSFER
            changes.append(
                AdmissionChange(
                    id=change_id(elsewhere.bed_id, at, None),
                    at=at,
                    site_id=elsewhere.site_id,
                    bed_id=elsewhere.bed_id,
                    patient_id=None,
                    previous_patient_id=patient_id,
                    reason=TRANSFER,
                )
            )
        previous = None
        if current is not None:
            previous = current.patient_id
            current.ended_at, current.end_reason = at, REPLACED
        # The partial unique indexes see the ended rows before the new one goes in.
        await session.flush()
        session.add(Admission(patient_id=patient_id, bed_id=bed.id, site_id=site_id, admitted_at=at))
        await session.flush()
        changes.append(
            AdmissionChange(
                id=change_id(bed.id, at, patient_id),
                at=at,
                site_id=site_id,
                bed_id=bed.id,
                patient_id=patient_id,
                previous_patient_id=previous,
                reason=TRANSFER if elsewhere is not None else reason,
            )
        )
        for change in changes:
            await _audit_change(session, change, actor)
        await bump_version(session)
        return changes


async def admit(
    db: Database | AsyncSession,
    *,
    site_id: str,
    bed_id: str,
    patient_id: str,
    at: int,
    actor: str,
    reason: str = "admit",
) -> AdmissionChange:
    """Admit a patient to a bed; the change of that bed (see `admit_all` for the bed a transfer frees)."""
    changes = await admit_all(
        db, site_id=site_id, bed_id=bed_id, patient_id=patient_id, at=at, actor=actor, reason=reason
    )
    return changes[-1]


async def free_bed(
    db: Database | AsyncSession, *, site_id: str, bed_id: str, at: int, actor: str, reason: str
) -> AdmissionChange | None:
    """End the bed's admission (`discharge`, `free`, ...); None when the bed was empty."""
    async with transaction(db) as session:
        bed = await _locked_bed(session, site_id, bed_id)
        current = await _open_of_bed(session, bed.id)
        if current is None:
            return None
        return await _end(session, current, at=at, actor=actor, reason=reason)


async def discharge(
    db: Database | AsyncSession,
    *,
    site_id: str,
    patient_id: str,
    at: int,
    actor: str,
    reason: str = "discharge",
) -> AdmissionChange | None:
    """End the patient's admission wherever it is (HL7 A03 names the patient); None when not admitted."""
    async with transaction(db) as session:
        current = await _open_of_patient(session, patient_id)
        if current is None:
            return None
        if current.site_id != site_id:
            raise NotFoundError(f"patient {patient_id} is not admitted in site {site_id}")
        return await _end(session, current, at=at, actor=actor, reason=reason)


async def current_patient(db: Database | AsyncSession, bed_id: str) -> str | None:
    async with transaction(db, read_only=True) as session:
        current = await _open_of_bed(session, bed_id)
        return None if current is None else current.patient_id


async def bed_of_patient(db: Database | AsyncSession, patient_id: str) -> str | None:
    async with transaction(db, read_only=True) as session:
        current = await _open_of_patient(session, patient_id)
        return None if current is None else current.bed_id


async def _end(
    session: AsyncSession, current: Admission, *, at: int, actor: str, reason: str
) -> AdmissionChange:
    current.ended_at, current.end_reason = at, reason
    await session.flush()
    change = AdmissionChange(
        id=change_id(current.bed_id, at, None),
        at=at,
        site_id=current.site_id,
        bed_id=current.bed_id,
        patient_id=None,
        previous_patient_id=current.patient_id,
        reason=reason,
    )
    await _audit_change(session, change, actor)
    await bump_version(session)
    return change


async def _locked_bed(session: AsyncSession, site_id: str, bed_id: str) -> Bed:
    bed = (await session.execute(select(Bed).where(Bed.id == bed_id).with_for_update())).scalar_one_or_none()
    if bed is None or bed.site_id != site_id:
        raise NotFoundError(f"no bed {bed_id} in site {site_id}")
    return bed


async def _open_of_bed(session: AsyncSession, bed_id: str) -> Admission | None:
    query = select(Admission).where(Admission.bed_id == bed_id, Admission.ended_at.is_(None))
    return (await session.execute(query)).scalar_one_or_none()


async def _open_of_patient(session: AsyncSession, patient_id: str) -> Admission | None:
    query = select(Admission).where(Admission.patient_id == patient_id, Admission.ended_at.is_(None))
    return (await session.execute(query)).scalar_one_or_none()


async def _audit_change(session: AsyncSession, change: AdmissionChange, actor: str) -> None:
    await audit(
        session,
        at=change.at,
        actor=actor,
        action="bed.admit" if change.patient_id is not None else "bed.free",
        target_type="bed",
        target_id=change.bed_id,
        site_id=change.site_id,
        detail={
            "change_id": change.id,
            "patient_id": change.patient_id,
            "previous_patient_id": change.previous_patient_id,
            "reason": change.reason,
        },
    )
