"""The embedded runtime: hosts processors over the SQLite log, one task per (processor, partition).

Per batch: read, step every record through the processor with its key's state, apply the effects, then
commit the offset, the changed state and the records the batch emits in one transaction. A crash between
the effects and the commit redelivers the batch: effects are idempotent and emits are not yet written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from streams.effects import Effect, EffectSink, Emit
from streams.log import SqliteLog
from streams.metrics import PROCESSOR_ERRORS
from streams.processor import Processor
from streams.schemas import decode, encode
from streams.timers import DueIndex, TimedProcessor, build_index, step_one

log = logging.getLogger(__name__)


class EmbeddedRuntime:
    """Runs processors until stopped; `idle()` tells tests and benchmarks when every input is drained."""

    def __init__(
        self,
        bus: SqliteLog,
        sink: EffectSink,
        processors: Sequence[Processor[Any]],
        *,
        batch: int = 2000,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
    ) -> None:
        self._bus = bus
        self._sink = sink
        self._processors = list(processors)
        self._batch = batch
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._done: dict[tuple[str, str, int], int] = {}  # (group, topic, partition) -> last committed offset
        self.healthy = True

    async def start(self) -> None:
        self._running = True
        for proc in self._processors:
            for part in range(self._bus.partitions(proc.topic)):
                self._tasks.append(
                    asyncio.create_task(self._run(proc, part), name=f"proc:{proc.name}:{part}")
                )

    async def stop(self) -> None:
        self._running = False
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    def lag(self, topic: str) -> int:
        """Records of `topic` appended but not yet committed by its slowest processor partition."""
        worst = 0
        for proc in self._processors:
            if proc.topic != topic:
                continue
            for part in range(self._bus.partitions(topic)):
                done = self._done.get((proc.name, topic, part))
                if done is None:
                    continue  # not started yet: its first batch tells
                worst = max(worst, self._bus.end_offset(topic, part) - 1 - done)
        return worst

    async def backpressure(self, topic: str, limit: int, *, poll: float = 0.05) -> None:
        """Wait while `topic`'s backlog exceeds `limit`: the gateway then holds its acknowledgements, so the
        devices' brokers and clients queue instead of the log growing without bound."""
        while self._running and self.lag(topic) > limit:
            await asyncio.sleep(poll)

    async def drained(self, timeout: float = 10.0) -> bool:
        """Wait until every processor has committed everything appended so far."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self._all_committed():
                return True
            await asyncio.sleep(0.02)
        return False

    async def _all_committed(self) -> bool:
        for proc in self._processors:
            for part in range(self._bus.partitions(proc.topic)):
                end = self._bus.end_offset(proc.topic, part)
                if end and await self._bus.committed(proc.name, proc.topic, part) < end - 1:
                    return False
        return True

    async def _load_index(self, proc: Processor[Any], part: int, states: dict[str, Any]) -> DueIndex | None:
        if not isinstance(proc, TimedProcessor):
            return None
        rows = await self._bus.load_all_state(proc.name)
        mine = [(k, v) for k, v in rows.items() if self._bus.partition_of(proc.topic, k) == part]
        return build_index(proc, states, mine)

    async def _run(self, proc: Processor[Any], part: int) -> None:
        states: dict[str, Any] = {}
        delay = self._retry_initial
        dues: DueIndex | None = None
        while self._running and dues is None and isinstance(proc, TimedProcessor):
            try:
                dues = await self._load_index(proc, part, states)
            except Exception:
                log.exception("processor %s partition %d: loading timers failed; retrying", proc.name, part)
                await asyncio.sleep(delay)
        while self._running:
            records = await self._bus.read(proc.name, proc.topic, part, max_records=self._batch, timeout=0.5)
            if not records:
                continue
            missing = {r.key for r in records if r.key not in states}
            if missing:
                for k, raw in (await self._bus.load_state(proc.name, missing)).items():
                    states[k] = proc.decode_state(raw)
            effects: list[Effect] = []
            dirty: set[str] = set()
            for rec in records:
                try:
                    event = decode(rec.value)
                except Exception:  # our own encoding: a record we cannot read is a bug, never silently lost
                    log.exception("undecodable record %s/%d@%d skipped", rec.topic, rec.partition, rec.offset)
                    PROCESSOR_ERRORS.labels(proc.name).inc()
                    continue
                step_one(proc, states, dues, rec.key, event, dirty, effects)
            # Emits go into the log in the commit's own transaction: emitted exactly once, one fsync fewer.
            emits = [(e.topic, e.key, encode(e.event)) for e in effects if isinstance(e, Emit)]
            others = [e for e in effects if not isinstance(e, Emit)] if emits else effects
            try:
                if others:
                    await self._sink.apply(others)
                state_rows = [
                    (proc.name, k, None if states[k] is None else proc.encode_state(states[k])) for k in dirty
                ]
                await self._bus.commit(proc.name, proc.topic, part, records[-1].offset, state_rows, emits)
                self._done[(proc.name, proc.topic, part)] = records[-1].offset
            except asyncio.CancelledError:
                raise
            except Exception:
                # A store is down or the log failed: forget the batch's state, re-read it later.
                PROCESSOR_ERRORS.labels(proc.name).inc()
                if self.healthy:
                    log.exception("processor %s partition %d failed; retrying", proc.name, part)
                self.healthy = False
                for k in dirty:
                    states.pop(k, None)
                if dues is not None:  # the forgotten keys' timers come back with their stored state
                    states.clear()
                    dues = None
                    while dues is None:
                        try:
                            dues = await self._load_index(proc, part, states)
                        except Exception:
                            await asyncio.sleep(delay)
                self._bus.seek(proc.name, proc.topic, part, records[0].offset)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            if not self.healthy:
                log.info("processor %s partition %d recovered", proc.name, part)
            self.healthy = True
            delay = self._retry_initial
