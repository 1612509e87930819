"""Effects: what a processor asks the world to do. The runtime applies them idempotently, then commits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from streams.ports import VitalPoint
from streams.schemas import Alert, AlertPage, DeadLetter, Event


@dataclass(frozen=True, slots=True)
class WriteVitals:
    """Store samples; idempotent by `VitalPoint.key`."""

    points: tuple[VitalPoint, ...]


@dataclass(frozen=True, slots=True)
class Emit:
    """Append an event to another topic under a key (the next stage's key: patient, site, ...)."""

    topic: str
    key: str
    event: Event


@dataclass(frozen=True, slots=True)
class RecordDeadLetters:
    """Keep refused input with its reason; idempotent by `DeadLetter.id`."""

    items: tuple[DeadLetter, ...]


@dataclass(frozen=True, slots=True)
class Count:
    """Add to a counter of /metrics (duplicates, late data, ...)."""

    metric: str
    labels: tuple[tuple[str, str], ...] = ()
    value: float = 1.0


@dataclass(frozen=True, slots=True)
class AlertVersion:
    """One new version of an alert and the audited transition that made it (`from_status` None: raised)."""

    alert: Alert
    from_status: str | None
    reason: str
    by: str | None = None


@dataclass(frozen=True, slots=True)
class RecordAlerts:
    """Keep alert versions and their transitions (audit); idempotent by (alert id, version)."""

    items: tuple[AlertVersion, ...]


@dataclass(frozen=True, slots=True)
class RecordPages:
    """Keep escalation steps (pages and skipped levels, audited); idempotent by `AlertPage.key`."""

    items: tuple[AlertPage, ...]


@dataclass(frozen=True, slots=True)
class RecordNews2:
    """The latest NEWS2 of a patient (the snapshot's `news2`); a newer `at` replaces an older one."""

    patient_id: str
    site_id: str
    at: int
    result: dict[str, Any]


Effect = WriteVitals | Emit | RecordDeadLetters | Count | RecordAlerts | RecordPages | RecordNews2


class AlertRecords(Protocol):
    """Where the clinical stage's records go (the records database); every write is idempotent."""

    async def record_alerts(self, items: Sequence[AlertVersion]) -> None: ...

    async def record_pages(self, items: Sequence[AlertPage]) -> None: ...

    async def record_news2(self, items: Sequence[RecordNews2]) -> None: ...


class EffectSink(Protocol):
    """Applies a batch of effects; returns only when all of them are durable (or raises)."""

    async def apply(self, effects: Sequence[Effect]) -> None: ...
