"""The dead-letter sink: every refused message or item is kept with its reason."""

from __future__ import annotations

from collections.abc import Sequence

from streams import topics
from streams.effects import Effect, RecordDeadLetters
from streams.schemas import DeadLetter, Event


class DeadLetterSink:
    """Processor of `topics.DEADLETTERS`; stateless."""

    name = "deadletters"
    topic = topics.DEADLETTERS

    def step(self, state: None, event: Event) -> tuple[None, Sequence[Effect]]:
        if isinstance(event, DeadLetter):
            return None, (RecordDeadLetters((event,)),)
        return None, ()

    def encode_state(self, state: None) -> bytes:
        return b""

    def decode_state(self, raw: bytes) -> None:
        return None
