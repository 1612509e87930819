"""The faust App and topic schema the worker runs on: faust with less done per record.

- `App` leaves out faust's default `Monitor` sensor. It keeps in-memory statistics for faust's web views,
  which the worker turns off (it serves its own Prometheus metrics), at the cost of four sensor calls and
  their dictionaries for every record.
- `RawSchema` makes a record's event straight from the bytes Kafka holds, without the serializer registry
  (the worker decodes the canonical event itself, streams/schemas.py). Same `Event`, key, value, message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import faust
from faust.types import AppT, Message


class App(faust.App):
    """faust.App without the default monitor sensor (module docstring)."""

    def on_init_dependencies(self) -> Iterable[Any]:
        deps = super().on_init_dependencies()
        self.sensors.remove(self.monitor)  # faust added it just above
        return deps


class RawSchema(faust.Schema):  # type: ignore[type-arg]
    """Events whose key and value are the record's bytes, made without the serializer registry."""

    def __init__(self) -> None:
        super().__init__(key_serializer="raw", value_serializer="raw")

    def compile(self, app: AppT, *, default_propagate: bool = False, **_: Any) -> Any:
        create_event = app.create_event

        async def decode(message: Message, *, propagate: bool = default_propagate) -> Any:
            return create_event(message.key, message.value, message.headers or None, message)

        return decode
