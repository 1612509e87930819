"""Ticks for processors with timers, the same in both runtimes (design rule 1).

A `Tick` record reaches every partition of a ticked topic (`topics.TICKED`) under a tick key. It is not
about one key: the host steps it through every key of the partition whose state says a timer is due
(`TimedProcessor.due`), kept in a `DueIndex`. Ticks come from the gateway side (`Ticker`), whose clock
stamps `received_at`, so a worker's own clock never decides a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from streams import topics
from streams.clock import Clock
from streams.effects import Effect
from streams.processor import Processor
from streams.schemas import Event, Tick, encode

log = logging.getLogger(__name__)


@runtime_checkable
class TimedProcessor(Protocol):
    """A processor some of whose keys need the time even when no event of theirs arrives."""

    def due(self, state: Any) -> int | None:
        """The earliest time (ms) a `Tick` could change this key's state, or None: no timer."""


class DueIndex:
    """When each key of one partition is next due; ticks older than the newest one applied are dropped."""

    __slots__ = ("_due", "last_tick")

    def __init__(self) -> None:
        self._due: dict[str, int] = {}
        self.last_tick = 0

    def set(self, key: str, due: int | None) -> None:
        if due is None:
            self._due.pop(key, None)
        else:
            self._due[key] = due

    def due_keys(self, at: int) -> list[str]:
        """Keys due at `at`, in a fixed order so that a replay steps them alike."""
        return sorted(k for k, d in self._due.items() if d <= at)

    def __len__(self) -> int:
        return len(self._due)


def step_one(
    proc: Processor[Any],
    states: dict[str, Any],
    dues: DueIndex | None,
    key: str,
    event: Event,
    dirty: set[str],
    effects: list[Effect],
) -> None:
    """Step one record: an ordinary event through its key, a tick through every due key."""
    if isinstance(event, Tick) and topics.tick_partition(key) is not None:
        if dues is None or event.at <= dues.last_tick:
            return  # an untimed processor, or a tick from a second gateway that is behind the first
        dues.last_tick = event.at
        for k in dues.due_keys(event.at):
            _step(proc, states, dues, k, event, dirty, effects)
        return
    _step(proc, states, dues, key, event, dirty, effects)


def _step(
    proc: Processor[Any],
    states: dict[str, Any],
    dues: DueIndex | None,
    key: str,
    event: Event,
    dirty: set[str],
    effects: list[Effect],
) -> None:
    new, eff = proc.step(states.get(key), event)
    states[key] = new
    dirty.add(key)
    effects.extend(eff)
    if dues is not None:
        dues.set(key, None if new is None else proc.due(new))  # type: ignore[attr-defined]


def build_index(
    proc: Processor[Any], states: dict[str, Any], rows: Iterable[tuple[str, bytes]]
) -> DueIndex | None:
    """A partition's due index from its stored states (which join the cache), or None if untimed."""
    if not isinstance(proc, TimedProcessor):
        return None
    index = DueIndex()
    for key, raw in rows:
        state = proc.decode_state(raw)
        states[key] = state
        index.set(key, proc.due(state))
    return index


class Ticker:
    """Appends a `Tick` to every partition of the ticked topics once a second, from the gateway's clock."""

    def __init__(
        self,
        append: Callable[[Sequence[tuple[str, str, bytes]]], Awaitable[None]],
        partitions: Callable[[str], int],
        clock: Clock,
        *,
        interval_ms: int = topics.TICK_INTERVAL_MS,
        ticked: Sequence[str] = topics.TICKED,
    ) -> None:
        self._append = append
        self._partitions = partitions
        self._clock = clock
        self._interval = interval_ms / 1000
        self._ticked = tuple(ticked)
        self._task: asyncio.Task[None] | None = None

    def records(self, at: int) -> list[tuple[str, str, bytes]]:
        out = []
        for topic in self._ticked:
            for p in range(self._partitions(topic)):
                out.append((topic, topics.tick_key(p), encode(Tick(at=at, partition=p))))
        return out

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick_loop(), name="ticker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tick_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._append(self.records(self._clock.now_ms()))
            except asyncio.CancelledError:
                raise
            except Exception:
                # The bus is down: timers wait for it like everything else; the next tick catches up.
                if not failing:
                    log.warning("ticker: appending ticks failed; retrying", exc_info=True)
                failing = True
                continue
            if failing:
                log.info("ticker: appending ticks again")
            failing = False
