"""The gateway's single entry point: validate at the edge, append durably, then let the transport answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.device import DeviceDirectory, DeviceInfo
from gateway.outcome import Outcome
from streams import topics
from streams.clock import Clock
from streams.metrics import DEADLETTER_TOTAL, INGEST_TOTAL
from streams.schemas import DeadLetter, encode
from streams.validation import DEFAULT_LIMITS, Limits, deadletter, parse_message

log = logging.getLogger(__name__)


class Appender(Protocol):
    """What the gateway needs of the bus: an atomic, durable append of (topic, key, value) records."""

    async def append(self, records: Sequence[tuple[str, str, bytes]]) -> None: ...


@dataclass(frozen=True, slots=True)
class Offer:
    """A message a transport offers to the gateway."""

    transport: str
    device_id: str
    kind: str
    payload: bytes
    content_format: str | None = None


class Ingestor:
    """Implements `gateway.outcome.Ingest` over any durable `Appender` (the SQLite log or Kafka)."""

    def __init__(
        self,
        bus: Appender,
        directory: DeviceDirectory,
        clock: Clock,
        *,
        limits: Limits = DEFAULT_LIMITS,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._gate = gate  # awaited before each batch: backpressure from the processors
        self._bus = bus
        self._directory = directory
        self._clock = clock
        self._limits = limits
        self._ingest_counters: dict[tuple[str, str], Any] = {}

    async def submit(
        self,
        *,
        transport: str,
        device_id: str,
        kind: str,
        payload: bytes,
        content_format: str | None = None,
    ) -> Outcome:
        return (await self.submit_many([Offer(transport, device_id, kind, payload, content_format)]))[0]

    async def submit_many(self, offers: Sequence[Offer]) -> list[Outcome]:
        """Validate a batch and make it durable in one append: one fsync is shared by all of them."""
        if self._gate is not None:
            await self._gate()
        received_at = self._clock.now_ms()
        records: list[tuple[str, str, bytes]] = []
        outcomes: list[Outcome] = []
        counted: list[tuple[str, str]] = []
        reasons: list[str] = []
        devices = await self._lookup(offers)
        for i, o in enumerate(offers):
            device = devices.get(o.device_id)
            if device is None or not device.enabled:
                dl = deadletter(
                    Outcome.UNKNOWN_DEVICE.value,
                    "device is not registered or is disabled",
                    transport=o.transport,
                    received_at=received_at,
                    payload=o.payload,
                    device_id=o.device_id,
                    kind=o.kind,
                    site_id=None,
                    index=i,
                )
                records.append((topics.DEADLETTERS, o.device_id, encode(dl)))
                reasons.append(dl.reason)
                outcomes.append(Outcome.UNKNOWN_DEVICE)
                continue
            parsed = parse_message(
                o.payload,
                transport=o.transport,
                device=device,
                kind=o.kind,
                received_at=received_at,
                content_format=o.content_format,
                limits=self._limits,
            )
            if parsed.event is not None:
                records.append((topics.INGEST, o.device_id, encode(parsed.event)))
                counted.append((o.transport, o.kind))
            for dl in parsed.deadletters:
                records.append((topics.DEADLETTERS, o.device_id, encode(dl)))
                reasons.append(dl.reason)
            outcomes.append(parsed.outcome)
        if records:
            try:
                await self._bus.append(records)
            except Exception:
                log.exception("durable append failed; %d device messages not acknowledged", len(offers))
                return [Outcome.UNAVAILABLE] * len(offers)
        for key in counted:
            self._count_ingest(*key)
        for reason in reasons:
            DEADLETTER_TOTAL.labels(reason).inc()
        return outcomes

    async def _lookup(self, offers: Sequence[Offer]) -> dict[str, DeviceInfo | None]:
        """The batch's devices; the ids the directory must look up are looked up together (one query)."""
        found: dict[str, DeviceInfo | None] = {}
        for o in offers:
            if o.device_id not in found:
                found[o.device_id] = self._directory.cached(o.device_id)
        missing = [i for i, d in found.items() if d is None]
        if missing:
            for device_id, device in zip(
                missing, await asyncio.gather(*(self._directory.get(i) for i in missing)), strict=True
            ):
                found[device_id] = device
        return found

    async def refuse(
        self,
        reason: str,
        detail: str,
        *,
        transport: str,
        device_id: str | None,
        kind: str | None,
        payload: bytes | None,
        received_at: int | None = None,
        site_id: str | None = None,
    ) -> DeadLetter:
        """Dead-letter a message a transport refused before `submit` (auth, content-format, ...)."""
        dl = deadletter(
            reason,
            detail,
            transport=transport,
            received_at=self._clock.now_ms() if received_at is None else received_at,
            payload=payload,
            device_id=device_id,
            kind=kind,
            site_id=site_id,
        )
        try:
            await self._bus.append([(topics.DEADLETTERS, device_id or transport, encode(dl))])
        except Exception:
            log.exception("could not log a dead letter (%s)", reason)
        DEADLETTER_TOTAL.labels(reason).inc()
        return dl

    def _count_ingest(self, transport: str, kind: str) -> None:
        key = (transport, kind)
        c = self._ingest_counters.get(key)
        if c is None:
            c = self._ingest_counters[key] = INGEST_TOTAL.labels(transport, kind)
        c.inc()
