"""What the gateway answers a transport after a message was offered to it."""

from __future__ import annotations

import enum
from typing import Protocol


class Outcome(enum.Enum):
    """Each value is a reason code; only ACCEPTED is success (durably logged; a duplicate is accepted too)."""

    ACCEPTED = "accepted"
    MALFORMED = "malformed"  # undecodable JSON/CBOR, or not a map
    SCHEMA = "schema"  # decodes, but the fields are wrong
    OVERSIZED = "oversized"  # more than 64 KiB
    UNSUPPORTED_FORMAT = "unsupported_format"  # CoAP content-format other than JSON (50) / CBOR (60)
    UNKNOWN_DEVICE = "unknown_device"
    UNAUTHORISED = "unauthorised"  # authenticated, but not as the path's device, or not allowed this way
    UNKNOWN_KIND = "unknown_kind"
    UNAVAILABLE = "unavailable"  # the durable log could not take it: do not acknowledge; the sender retries

    @property
    def ok(self) -> bool:
        return self is Outcome.ACCEPTED


class Ingest(Protocol):
    """The gateway's single entry point for device messages, shared by MQTT, CoAP and the API."""

    async def submit(
        self,
        *,
        transport: str,
        device_id: str,
        kind: str,
        payload: bytes,
        content_format: str | None = None,  # "json", "cbor", or None to sniff the first byte
    ) -> Outcome:
        """Validate at the edge, append to the durable log, and answer only once the append is durable.

        Anything refused is dead-lettered (with its reason, and counted) before this returns.
        """
