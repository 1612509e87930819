"""What the gateway knows of a registered device at the moment a message arrives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A registered device and, resolved at lookup time, the bed and patient it is bound to."""

    id: str
    type: str  # monitor, pump, ambulance, pendant, analyzer
    site_id: str
    unit_id: str | None
    bed_id: str | None
    patient_id: str | None  # the device's own patient, else the current patient of its bed
    allow_plain_coap: bool
    enabled: bool = True


class DeviceDirectory(Protocol):
    """Device lookups for the gateway; answers from a cache that follows registry changes within a second."""

    def cached(self, device_id: str) -> DeviceInfo | None:
        """The device as the cache knows it now, without waiting (None: not in the cache)."""

    async def get(self, device_id: str) -> DeviceInfo | None:
        """The device, looking in the records when the cache lacks it (a device added a moment ago)."""

    async def check_secret(self, device_id: str, secret: str) -> bool: ...

    async def psk(self, device_id: str) -> bytes | None:
        """The device's DTLS pre-shared key (its secret as UTF-8), or None if unknown or disabled."""
