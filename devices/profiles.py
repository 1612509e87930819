"""Device types: which message kinds each sends and how often it sends the periodic ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Profile:
    """A device type; `every_s` holds the periodic kinds, the other kinds go out when something happens."""

    type: str
    kinds: tuple[str, ...]
    every_s: Mapping[str, int]

    def due(self, kind: str, t_s: int) -> bool:
        """Whether a periodic kind is due at scenario second `t_s` (each starts at 0)."""
        every = self.every_s.get(kind)
        return every is not None and t_s % every == 0


PROFILES: dict[str, Profile] = {
    p.type: p
    for p in (
        Profile("monitor", ("obs", "status"), {"obs": 1, "status": 30}),
        Profile("pump", ("pump", "status"), {"pump": 10, "status": 60}),
        Profile("ambulance", ("gps", "crew", "status"), {"gps": 2, "status": 60}),
        Profile("pendant", ("status", "sos", "gps"), {"status": 60}),
        Profile("analyzer", ("lab", "status"), {"status": 60}),
    )
}

# Within an obs message, how often the slower items ride along (seconds).
TEMP_EVERY_S = 60
NEWS2_INPUTS_EVERY_S = 60  # acvpu and o2_supplement, as a charting nurse's device would send them
