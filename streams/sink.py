"""Applies a batch of effects through the ports: one store write, one append, one dead-letter write."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from gateway.ingest import Appender
from streams.clock import Clock
from streams.effects import (
    AlertRecords,
    AlertVersion,
    Count,
    Effect,
    Emit,
    RecordAlerts,
    RecordDeadLetters,
    RecordNews2,
    RecordPages,
    WriteVitals,
)
from streams.metrics import INGEST_LATENCY, count
from streams.ports import VitalPoint, VitalsStore
from streams.schemas import AlertPage, DeadLetter, encode


class PortEffects:
    """The `EffectSink` both runtimes use; what differs is only which adapters stand behind the ports."""

    def __init__(
        self,
        *,
        bus: Appender,
        vitals: VitalsStore,
        deadletters: Callable[[Sequence[DeadLetter]], Awaitable[None]],
        clock: Clock,
        on_vitals: Callable[[Sequence[VitalPoint]], None] | None = None,
        alerts: AlertRecords | None = None,
    ) -> None:
        self._alerts = alerts
        self._bus = bus
        self._vitals = vitals
        self._deadletters = deadletters
        self._clock = clock
        self._on_vitals = on_vitals

    async def apply(self, effects: Sequence[Effect]) -> None:
        points: list[VitalPoint] = []
        emits: list[tuple[str, str, bytes]] = []
        dls: list[DeadLetter] = []
        counts: list[Count] = []
        versions: list[AlertVersion] = []
        pages: list[AlertPage] = []
        news2: list[RecordNews2] = []
        for e in effects:
            if isinstance(e, WriteVitals):
                points.extend(e.points)
            elif isinstance(e, Emit):
                emits.append((e.topic, e.key, encode(e.event)))
            elif isinstance(e, RecordDeadLetters):
                dls.extend(e.items)
            elif isinstance(e, RecordAlerts):
                versions.extend(e.items)
            elif isinstance(e, RecordPages):
                pages.extend(e.items)
            elif isinstance(e, RecordNews2):
                news2.append(e)
            else:
                counts.append(e)
        if points:
            await self._vitals.write(points)
            now = self._clock.now_ms()
            observe = INGEST_LATENCY.observe
            for p in points:
                observe(max(0, now - p.received_at) / 1000)
            if self._on_vitals is not None:
                self._on_vitals(points)
        if dls:
            await self._deadletters(dls)
        if versions or pages or news2:
            # Records before the pushes: a client told of an alert finds it over REST at once.
            if self._alerts is None:
                raise RuntimeError("the clinical stage runs without an alert store")  # wiring bug
            if versions:
                await self._alerts.record_alerts(versions)
            if pages:
                await self._alerts.record_pages(pages)
            if news2:
                await self._alerts.record_news2(news2)
        if emits:
            await self._bus.append(emits)
        for c in counts:
            count(c.metric, c.labels, c.value)
