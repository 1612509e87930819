"""The live feed: what clients are pushed, in log order. A record's offset is the websocket cursor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from streams import topics
from streams.log import SqliteLog
from streams.schemas import Event, decode


@dataclass(frozen=True, slots=True)
class LiveRecord:
    cursor: int
    event: Event


class LiveFeed(Protocol):
    """Read the live feed by cursor (SQLite log embedded; a Redis Stream per site scaled)."""

    def end(self) -> int:
        """The cursor the next record will get."""

    async def oldest(self) -> int:
        """The oldest cursor still kept: a resume from before it must resync."""

    async def after(self, cursor: int, limit: int = 1000) -> Sequence[LiveRecord]:
        """Records with a cursor greater than `cursor`, oldest first."""

    async def wait(self, cursor: int, timeout: float) -> None:
        """Return once a record after `cursor` exists, or after `timeout` seconds."""


class LogLiveFeed:
    """The embedded runtime's live feed: partition 0 of `topics.LIVE` in the SQLite log."""

    def __init__(self, log: SqliteLog) -> None:
        self._log = log

    def end(self) -> int:
        return self._log.end_offset(topics.LIVE, 0)

    async def oldest(self) -> int:
        return await self._log.first_offset(topics.LIVE, 0)

    async def after(self, cursor: int, limit: int = 1000) -> Sequence[LiveRecord]:
        records = await self._log.records_after(topics.LIVE, 0, cursor, limit)
        return [LiveRecord(r.offset, decode(r.value)) for r in records]

    async def wait(self, cursor: int, timeout: float) -> None:
        await self._log.wait_for_records(topics.LIVE, 0, cursor, timeout)
