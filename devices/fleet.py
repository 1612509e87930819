"""Which devices the simulator plays: planned specs (no secrets) and a registered fleet (with secrets)."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices.profiles import PROFILES
from devices.scenarios import MONITOR_SCENARIOS, SCENARIOS

TRANSPORTS = ("mqtt", "coap")


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device to register: what `vigil devices add` takes. The registry answers its secret."""

    id: str
    type: str  # monitor, pump, ambulance, pendant, analyzer
    transport: str  # mqtt | coap
    site: str
    unit: str | None
    bed: str | None
    patient: str | None  # for an analyzer: the patient its results are about
    scenario: str
    allow_plain_coap: bool = False


@dataclass(frozen=True, slots=True)
class SimDevice:
    """A registered device the simulator plays, with the secret it authenticates with."""

    id: str
    secret: str
    type: str
    transport: str
    site: str
    unit: str | None
    bed: str | None
    patient: str | None
    scenario: str
    allow_plain_coap: bool = False

    @classmethod
    def from_spec(cls, spec: DeviceSpec, secret: str) -> SimDevice:
        return cls(secret=secret, **{f.name: getattr(spec, f.name) for f in dataclasses.fields(DeviceSpec)})


@dataclass
class Fleet:
    """The devices of one simulation run; saved as JSON so a later run reuses the registered secrets."""

    devices: list[SimDevice]

    @classmethod
    def from_specs(cls, specs: Sequence[DeviceSpec], secrets: Mapping[str, str]) -> Fleet:
        """Join planned specs with the secrets the registry answered (a KeyError names a missing one)."""
        return cls([SimDevice.from_spec(s, secrets[s.id]) for s in specs])

    def to_json(self) -> str:
        return json.dumps({"devices": [dataclasses.asdict(d) for d in self.devices]}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Fleet:
        """Parse and check a fleet file; a ValueError says what is wrong with it."""
        data: Any = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            raise ValueError('a fleet file is {"devices": [...]}')
        names = {f.name for f in dataclasses.fields(SimDevice)}
        devices = []
        defaults: dict[str, Any] = {"transport": "mqtt", "site": "default", "scenario": "stable"}
        defaults |= {"unit": None, "bed": None, "patient": None}
        for i, d in enumerate(data["devices"]):
            if not isinstance(d, dict) or not {"id", "secret", "type"} <= d.keys() or not d.keys() <= names:
                raise ValueError(f"device {i}: needs id, secret, type; may have {', '.join(sorted(names))}")
            try:
                device = SimDevice(**(defaults | d))
            except TypeError as e:
                raise ValueError(f"device {i}: {e}") from None
            check(device)
            devices.append(device)
        return cls(devices)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> Fleet:
        return cls.from_json(path.read_text())


def check(device: DeviceSpec | SimDevice) -> None:
    """Raise ValueError when a device names an unknown type, transport or scenario."""
    if device.type not in PROFILES:
        raise ValueError(f"device {device.id}: unknown type {device.type!r}")
    if device.transport not in TRANSPORTS:
        raise ValueError(f"device {device.id}: transport must be mqtt or coap, not {device.transport!r}")
    if device.scenario not in SCENARIOS:
        raise ValueError(f"device {device.id}: unknown scenario {device.scenario!r}")


def plan_fleet(
    beds: int,
    scenario_mix: str | Sequence[str] = "mix",
    *,
    seed: int = 0,
    site: str = "default",
    unit: str = "ward-a",
    transport: str = "mqtt",
) -> list[DeviceSpec]:
    """A ward of `beds` monitored beds (about half with a pump), one ambulance, one pendant, one analyzer.

    `scenario_mix` is a scenario name for every device, "mix" to spread the monitor scenarios over the beds
    by seed (pumps, pendant, ambulance and analyzer then play their own), or a list cycled over the beds.
    """
    if beds < 0:
        raise ValueError("beds must be >= 0")
    rng = random.Random(seed)
    single = scenario_mix if isinstance(scenario_mix, str) and scenario_mix != "mix" else None
    if single is not None:
        bed_scenarios = [single] * beds
    else:
        # "mix": every monitor scenario once before any repeats, in an order set by the seed.
        pool = list(MONITOR_SCENARIOS)
        if scenario_mix == "mix":
            rng.shuffle(pool)
        else:
            pool = list(scenario_mix)
        bed_scenarios = [pool[i % len(pool)] for i in range(beds)] if pool else []
    with_pump = [i for i in range(beds) if rng.random() < 0.5] or list(range(min(beds, 1)))

    specs: list[DeviceSpec] = []
    for i in range(beds):
        bed, patient = f"{unit}-bed-{i + 1:02d}", f"P-{seed % 1000:03d}-{i + 1:03d}"
        specs.append(
            DeviceSpec(f"mon-{i + 1:02d}", "monitor", transport, site, unit, bed, patient, bed_scenarios[i])
        )
        if i in with_pump:
            pump = single or ("pump_occlusion" if i == with_pump[0] else "stable")
            specs.append(DeviceSpec(f"pump-{i + 1:02d}", "pump", transport, site, unit, bed, patient, pump))
    sos = single or "sos_ambulance"
    specs.append(DeviceSpec("amb-1", "ambulance", transport, site, None, None, None, sos))
    home_patient = f"P-{seed % 1000:03d}-H01"
    specs.append(DeviceSpec("pendant-1", "pendant", transport, site, None, None, home_patient, sos))
    lab_patient = specs[0].patient if beds else home_patient
    specs.append(
        DeviceSpec("lab-1", "analyzer", transport, site, None, None, lab_patient, single or "hyperkalaemia")
    )
    for s in specs:
        check(s)
    return specs
