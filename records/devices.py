"""Registered devices: identity, secret (encrypted at rest) and what they are bound to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from records.admissions import admit_all
from records.audit import audit
from records.crypto import SecretCipher, new_secret
from records.db import Database, transaction
from records.errors import ConflictError, NotFoundError
from records.models import Bed, Device
from records.places import DEFAULT_SITE, ensure_bed, ensure_patient, ensure_site, ensure_unit
from records.version import bump_version
from streams.schemas import DEVICE_TYPES


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """A device as stored, its secret still encrypted."""

    id: str
    type: str
    site_id: str
    unit_id: str | None
    bed_id: str | None
    patient_id: str | None
    secret_enc: str
    allow_plain_coap: bool
    enabled: bool


async def add_device(
    db: Database | AsyncSession,
    cipher: SecretCipher,
    *,
    device_id: str,
    type: str,  # the contract's own name for it (`--type`)
    site: str | None = None,
    unit: str | None = None,
    bed: str | None = None,
    patient: str | None = None,
    allow_plain_coap: bool = False,
    at: int,
    actor: str = "cli",
) -> dict[str, Any]:
    """Register a device and create the places it names; the answer holds its secret, shown this once.

    With both a bed and a patient, the patient is admitted to the bed and the device follows the bed.
    An id registered before is a `ConflictError`.
    """
    if type not in DEVICE_TYPES:
        raise ValueError(f"device type must be one of {', '.join(DEVICE_TYPES)}, not {type!r}")
    if not device_id or "/" in device_id or "+" in device_id or "#" in device_id:
        raise ValueError(f"device id {device_id!r} cannot name an MQTT topic level")
    site_id = site or DEFAULT_SITE
    secret = new_secret()
    async with transaction(db) as session:
        if await session.get(Device, device_id) is not None:
            raise ConflictError(f"device {device_id} is registered already")
        unit_id = unit
        if bed is not None:
            await ensure_bed(session, site_id, unit, bed)
            bed_row = await session.get(Bed, bed)
            assert bed_row is not None
            unit_id = bed_row.unit_id
        elif unit is not None:
            await ensure_unit(session, site_id, unit)
        else:
            await ensure_site(session, site_id)
        if patient is not None:
            await ensure_patient(session, site_id, patient, at)
        if bed is not None and patient is not None:
            await admit_all(session, site_id=site_id, bed_id=bed, patient_id=patient, at=at, actor=actor)
        session.add(
            Device(
                id=device_id,
                type=type,
                site_id=site_id,
                unit_id=unit_id,
                bed_id=bed,
                # A bed-bound device follows whoever is admitted there; only a bed-less one keeps a patient.
                patient_id=patient if bed is None else None,
                secret_enc=cipher.encrypt(secret),
                allow_plain_coap=allow_plain_coap,
                enabled=True,
                created_at=at,
            )
        )
        await session.flush()
        answer: dict[str, Any] = {
            "id": device_id,
            "type": type,
            "site": site_id,
            "unit": unit_id,
            "bed": bed,
            "patient": patient,
            "allow_plain_coap": allow_plain_coap,
            "created_at": at,
        }
        await audit(
            session,
            at=at,
            actor=actor,
            action="device.add",
            target_type="device",
            target_id=device_id,
            site_id=site_id,
            detail=answer,  # never the secret
        )
        await bump_version(session)
    return {**answer, "secret": secret}


async def set_device_enabled(
    db: Database | AsyncSession, *, device_id: str, enabled: bool, at: int, actor: str
) -> None:
    """Enable or disable a device; a disabled one is refused by the gateway as if unknown."""
    async with transaction(db) as session:
        device = await session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"no device {device_id}")
        if device.enabled == enabled:
            return
        device.enabled = enabled
        await session.flush()
        await audit(
            session,
            at=at,
            actor=actor,
            action="device.enable" if enabled else "device.disable",
            target_type="device",
            target_id=device_id,
            site_id=device.site_id,
        )
        await bump_version(session)


async def load_devices(db: Database | AsyncSession) -> list[DeviceRow]:
    """Every registered device, secrets still encrypted."""
    async with transaction(db, read_only=True) as session:
        rows = (await session.execute(select(Device).order_by(Device.id))).scalars().all()
    return [
        DeviceRow(
            d.id,
            d.type,
            d.site_id,
            d.unit_id,
            d.bed_id,
            d.patient_id,
            d.secret_enc,
            d.allow_plain_coap,
            d.enabled,
        )
        for d in rows
    ]
