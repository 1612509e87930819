"""The one processor shape both runtimes host: `step(state, event) -> (state, effects)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from streams.effects import Effect
from streams.schemas import Event

S = TypeVar("S")


class Processor(Protocol[S]):
    """Pure, keyed, deterministic: the same state and event always give the same result.

    `name` is the consumer group and the state namespace; `topic` the input. State is per key and is
    serialised by the processor itself, so faust Tables, SQLite or Redis can hold it.
    """

    name: str
    topic: str

    def step(self, state: S | None, event: Event) -> tuple[S | None, Sequence[Effect]]: ...

    def encode_state(self, state: S) -> bytes: ...

    def decode_state(self, raw: bytes) -> S: ...
