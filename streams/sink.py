"""Applies a batch of effects through the ports, their round trips side by side."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from gateway.ingest import Appender
from streams import topics
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
        if (versions or pages or news2) and self._alerts is None:
            raise RuntimeError("the clinical stage runs without an alert store")  # wiring bug
        # The ports are independent, so their round trips overlap. What a client is pushed (the live topic)
        # goes out only after the vitals and alert records it shows are stored: a client told of a value or
        # an alert finds it over REST at once. All of it is done before this returns.
        live = [e for e in emits if e[0] == topics.LIVE]
        other = [e for e in emits if e[0] != topics.LIVE] if live else emits
        work: list[Awaitable[None]] = []
        if dls:
            work.append(self._deadletters(dls))
        if other:
            work.append(self._bus.append(other))
        stored = self._stored(points, versions, pages, news2)
        if live:
            work.append(self._then_push(stored, live))
        else:
            work.append(stored)
        await (work[0] if len(work) == 1 else _all(work))
        for c in counts:
            count(c.metric, c.labels, c.value)

    async def _write_vitals(self, points: list[VitalPoint]) -> None:
        await self._vitals.write(points)
        now = self._clock.now_ms()
        observe = INGEST_LATENCY.observe
        for p in points:
            observe(max(0, now - p.received_at) / 1000)
        if self._on_vitals is not None:
            self._on_vitals(points)

    async def _stored(
        self,
        points: list[VitalPoint],
        versions: list[AlertVersion],
        pages: list[AlertPage],
        news2: list[RecordNews2],
    ) -> None:
        work: list[Awaitable[None]] = []
        if points:
            work.append(self._write_vitals(points))
        if versions or pages or news2:
            work.append(self._record_alerts(versions, pages, news2))
        if work:
            await (work[0] if len(work) == 1 else _all(work))

    async def _record_alerts(
        self, versions: list[AlertVersion], pages: list[AlertPage], news2: list[RecordNews2]
    ) -> None:
        alerts = self._alerts
        assert alerts is not None  # checked by apply()
        if versions:
            await alerts.record_alerts(versions)
        if pages:
            await alerts.record_pages(pages)
        if news2:
            await alerts.record_news2(news2)

    async def _then_push(self, stored: Awaitable[None], live: list[tuple[str, str, bytes]]) -> None:
        await stored
        await self._bus.append(live)


async def _all(work: list[Awaitable[None]]) -> None:
    """Await every one; when one fails, the others still finish before the first error is raised (no write
    is left running behind a batch that will be retried)."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
