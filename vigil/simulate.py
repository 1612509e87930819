"""`vigil simulate` wiring: registers the planned fleet in the records database, then runs it."""

from __future__ import annotations

import argparse
import time

from devices.cli import run
from devices.fleet import DeviceSpec, Fleet
from records.crypto import SecretCipher
from records.db import Database, sqlite_url
from records.devices import add_device, load_devices
from records.places import ensure_patient
from vigil.settings import Settings


async def register_fleet(cfg: Settings, specs: list[DeviceSpec]) -> Fleet:
    """Add each device as `vigil devices add` would; a device registered before keeps its secret."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.database_url or sqlite_url(cfg.data_dir))
    cipher = SecretCipher.from_data_dir(cfg.data_dir)
    now = time.time_ns() // 1_000_000
    secrets: dict[str, str] = {}
    try:
        await db.migrate()
        known = {row.id: row for row in await load_devices(db)}
        for spec in specs:
            row = known.get(spec.id)
            if row is not None:
                secrets[spec.id] = cipher.decrypt(row.secret_enc)
                continue
            analyzer = spec.type == "analyzer"  # reports for many patients: never bound to one
            if analyzer and spec.patient:
                await ensure_patient(db, spec.site, spec.patient, now)
            added = await add_device(
                db,
                cipher,
                device_id=spec.id,
                type=spec.type,
                site=spec.site,
                unit=spec.unit,
                bed=spec.bed,
                patient=None if analyzer else spec.patient,
                allow_plain_coap=spec.allow_plain_coap,
                at=now,
                actor="simulator",
            )
            secrets[spec.id] = str(added["secret"])
    finally:
        await db.close()
    return Fleet.from_specs(specs, secrets)


async def run_simulator(cfg: Settings, args: argparse.Namespace) -> None:
    async def register(specs: list[DeviceSpec]) -> Fleet:
        return await register_fleet(cfg, specs)

    code = await run(args, register)
    if code:
        raise SystemExit(code)
