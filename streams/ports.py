"""Ports: the small interfaces the core and the runtimes depend on. Adapters implement them at the edge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record of the durable log."""

    topic: str
    partition: int
    offset: int
    key: str
    value: bytes


class Bus(Protocol):
    """A durable, partitioned, append-only log (SQLite embedded, Kafka scaled)."""

    def partitions(self, topic: str) -> int: ...

    async def append(self, records: Sequence[tuple[str, str, bytes]]) -> None:
        """Append (topic, key, value) records atomically; durable once this returns.

        The same key always lands in the same partition of a topic, in order.
        """

    async def read(
        self, group: str, topic: str, partition: int, *, max_records: int = 500, timeout: float = 0.5
    ) -> list[LogRecord]:
        """Records after the group's committed offset (and after what this reader was already given)."""

    async def commit(self, group: str, topic: str, partition: int, offset: int) -> None:
        """Mark everything up to and including `offset` as done for `group`."""


@dataclass(frozen=True, slots=True)
class VitalPoint:
    """A stored vital-sign sample. `key` makes writes idempotent: a repeat overwrites itself."""

    key: str  # "{event_id}#{item_index}"
    site_id: str
    unit_id: str | None
    bed_id: str | None
    patient_id: str | None
    device_id: str
    code: str  # MDC reference id (or o2_supplement / acvpu)
    value: float  # acvpu is stored as 0-4 for A, C, V, P, U
    unit: str  # UCUM
    ts: int  # ms: device time (received time when flagged future_ts)
    received_at: int
    flags: tuple[str, ...] = ()


class VitalsStore(Protocol):
    """Time-series storage for vitals (SQLite embedded; InfluxDB protocol scaled)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, points: Sequence[VitalPoint]) -> None:
        """Store points durably and idempotently (by `key`); raise if the store cannot take them."""

    async def query(
        self, *, patient_id: str, code: str, since: int, until: int | None = None, limit: int = 10_000
    ) -> list[VitalPoint]:
        """Points of one patient and code in [since, until], oldest first."""

    async def latest(self, *, patient_id: str) -> dict[str, VitalPoint]:
        """The newest point per code for a patient (device clocks in the future never pin it)."""

    async def ready(self) -> bool:
        """True while the store answers."""
