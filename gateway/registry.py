"""The gateway's device directory: an in-memory map of devices, secrets and attribution over the records.

`get()` is a dict lookup on the hot path. The map follows the registry version (polled every 0.5 s), so a
device added or an admission changed by another process takes effect within a second; while the database
is down the last map keeps serving. A scaled gateway also reloads it as soon as an admission change reaches
Kafka, and fences each batch on it (gateway/admissions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from dataclasses import dataclass

from sqlalchemy import select

from gateway.device import DeviceInfo
from records.crypto import InvalidToken, SecretCipher
from records.db import Database
from records.models import Admission, Device
from records.version import registry_version
from streams.clock import Clock, SystemClock

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Entry:
    info: DeviceInfo
    secret: str | None  # None when the stored token does not decrypt with our key


class Registry:
    """`gateway.device.DeviceDirectory` over the records database (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        cipher: SecretCipher,
        *,
        poll_interval: float = 0.5,
        miss_interval: float = 0.5,
        clock: Clock | None = None,
    ) -> None:
        self._db = db
        self._cipher = cipher
        self._poll_interval = poll_interval
        self._miss_interval = miss_interval
        self._clock = clock or SystemClock()
        self._entries: dict[str, _Entry] = {}
        self._version = -1
        self._plain: dict[str, str] = {}  # secret token -> secret, so a reload decrypts only new ones
        self._lock = asyncio.Lock()
        self._miss_reload: asyncio.Task[None] | None = None
        self._miss_look_at = float("-inf")  # when the latest miss look starts (or started)
        self._miss_looking = False  # the latest miss look has begun reading the database
        self._poller: asyncio.Task[None] | None = None

    @property
    def version(self) -> int:
        """The registry version the map reflects (-1 before the first load)."""
        return self._version

    async def start(self) -> None:
        """Load every device (raises if the database is down), then follow changes in the background."""
        await self.refresh()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_loop(), name="registry-poll")

    async def close(self) -> None:
        for task in (self._poller, self._miss_reload):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._poller = self._miss_reload = None

    async def stop(self) -> None:
        """The same as `close`."""
        await self.close()

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload when the registry version moved (or when forced); True when the map was rebuilt."""
        async with self._lock:
            async with self._db.session(read_only=True) as session:
                # The version is read first: the rows read after it are at least that new.
                version = await registry_version(session)
                if version == self._version and not force:
                    return False
                devices = (await session.execute(select(Device))).scalars().all()
                occupied = await session.execute(
                    select(Admission.bed_id, Admission.patient_id).where(Admission.ended_at.is_(None))
                )
                bed_patient: dict[str, str] = {bed: patient for bed, patient in occupied.all()}
            plain: dict[str, str] = {}
            entries: dict[str, _Entry] = {}
            for d in devices:
                secret = self._plain.get(d.secret_enc)
                if secret is None:
                    try:
                        secret = self._cipher.decrypt(d.secret_enc)
                    except InvalidToken:
                        log.error(
                            "device %s: its secret does not decrypt with this key (VIGIL_SECRET_KEY)", d.id
                        )
                if secret is not None:
                    plain[d.secret_enc] = secret
                patient = d.patient_id or (bed_patient.get(d.bed_id) if d.bed_id is not None else None)
                info = DeviceInfo(
                    id=d.id,
                    type=d.type,
                    site_id=d.site_id,
                    unit_id=d.unit_id,
                    bed_id=d.bed_id,
                    patient_id=patient,
                    allow_plain_coap=d.allow_plain_coap,
                    enabled=d.enabled,
                )
                entries[d.id] = _Entry(info, secret)
            # Swapped whole, so a lookup never sees half a reload.
            self._entries, self._plain, self._version = entries, plain, version
            return True

    def cached(self, device_id: str) -> DeviceInfo | None:
        entry = self._entries.get(device_id)
        return None if entry is None else entry.info

    async def get(self, device_id: str) -> DeviceInfo | None:
        entry = self._entries.get(device_id)
        if entry is None:
            entry = await self._after_miss(device_id)
        return None if entry is None else entry.info

    async def check_secret(self, device_id: str, secret: str) -> bool:
        entry = self._entries.get(device_id) or await self._after_miss(device_id)
        if entry is None or entry.secret is None or not entry.info.enabled:
            return False
        return hmac.compare_digest(entry.secret.encode(), secret.encode())

    async def psk(self, device_id: str) -> bytes | None:
        entry = self._entries.get(device_id) or await self._after_miss(device_id)
        if entry is None or entry.secret is None or not entry.info.enabled:
            return None
        return entry.secret.encode()

    def all_devices(self) -> list[DeviceInfo]:
        """Every registered device as of the last reload (for the broker's credential sync)."""
        return [e.info for e in self._entries.values()]

    def credentials(self) -> dict[str, str]:
        """Device id -> secret of every enabled device (for a broker's password list)."""
        return {i: e.secret for i, e in self._entries.items() if e.secret is not None and e.info.enabled}

    async def _after_miss(self, device_id: str) -> _Entry | None:
        """Look at the database for an id the map lacks, with a look that starts after the miss was asked.

        A brand-new device thus works at once: its first message is never answered "unknown" from a map read
        before the device was added (the broker may already let it in). Misses asked together share one look,
        and looks start at most once per interval, so a flood of unknown ids costs one query per interval.
        """
        asked = self._clock.monotonic()
        task = self._miss_reload
        if task is None or task.done() or self._miss_looking:  # join a look only if it has not begun
            start = max(asked, self._miss_look_at + self._miss_interval)
            self._miss_look_at = start
            self._miss_looking = False
            task = self._miss_reload = asyncio.create_task(self._look_at(start), name="registry-miss-reload")
        await asyncio.shield(task)
        return self._entries.get(device_id)

    async def _look_at(self, start: float) -> None:
        wait = start - self._clock.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._miss_looking = True
        await self._quiet_refresh()

    async def _quiet_refresh(self) -> None:
        try:
            await self.refresh()
        except Exception:  # the database is down: keep serving the last map; the poller retries
            log.warning("registry reload failed; serving the last known devices", exc_info=True)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            await self._quiet_refresh()
