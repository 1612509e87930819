"""Effects: what a processor asks the world to do. The runtime applies them idempotently, then commits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from streams.ports import VitalPoint
from streams.schemas import DeadLetter, Event


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


Effect = WriteVitals | Emit | RecordDeadLetters | Count


class EffectSink(Protocol):
    """Applies a batch of effects; returns only when all of them are durable (or raises)."""

    async def apply(self, effects: Sequence[Effect]) -> None: ...
