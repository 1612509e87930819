"""An ambulance run: crew state changes and a GPS track, both as pure functions of scenario time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from devices.scenarios import LatLon

EARTH_RADIUS_KM = 6371.0088
TURNOUT_S = 30  # dispatched -> en_route: crew to the vehicle
ON_SCENE_S = 300  # assessment and loading
HANDOVER_S = 600  # at_hospital -> available
EN_ROUTE_KMH = 60.0  # under blue lights, in town
TRANSPORT_KMH = 45.0


def distance_km(a: LatLon, b: LatLon) -> float:
    """Great-circle distance (haversine)."""
    la1, lo1, la2, lo2 = map(math.radians, (*a, *b))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


def bearing_deg(a: LatLon, b: LatLon) -> float:
    """Initial course from a to b, 0..360 clockwise from north."""
    la1, lo1, la2, lo2 = map(math.radians, (*a, *b))
    y = math.sin(lo2 - lo1) * math.cos(la2)
    x = math.cos(la1) * math.sin(la2) - math.sin(la1) * math.cos(la2) * math.cos(lo2 - lo1)
    return math.degrees(math.atan2(y, x)) % 360.0


@dataclass(frozen=True, slots=True)
class Leg:
    """A straight drive from `start` to `end` beginning at scenario second `t0_s`."""

    start: LatLon
    end: LatLon
    t0_s: float
    kmh: float

    @property
    def duration_s(self) -> float:
        return max(1.0, distance_km(self.start, self.end) / self.kmh * 3600.0)

    @property
    def t1_s(self) -> float:
        return self.t0_s + self.duration_s


@dataclass(frozen=True, slots=True)
class Run:
    """One dispatch: its crew timeline (second, unit_state) and the two legs driven."""

    dispatched_s: float
    incident_id: str | None
    states: tuple[tuple[float, str], ...]
    legs: tuple[Leg, Leg]


def plan_run(
    dispatched_s: float, incident_id: str | None, station: LatLon, scene: LatLon, hospital: LatLon
) -> Run:
    """Dispatched at `dispatched_s`: turn out, drive to the scene, load, transport, hand over."""
    out = Leg(station, scene, dispatched_s + TURNOUT_S, EN_ROUTE_KMH)
    arrive = math.ceil(out.t1_s)
    back = Leg(scene, hospital, arrive + ON_SCENE_S, TRANSPORT_KMH)
    at_hospital = math.ceil(back.t1_s)
    states = (
        (dispatched_s, "dispatched"),
        (out.t0_s, "en_route"),
        (float(arrive), "on_scene"),
        (back.t0_s, "transporting"),
        (float(at_hospital), "at_hospital"),
        (float(at_hospital + HANDOVER_S), "available"),
    )
    return Run(dispatched_s, incident_id, states, (out, back))


@dataclass(frozen=True, slots=True)
class Fix:
    """A GPS fix: position, speed and heading."""

    lat: float
    lon: float
    speed_kmh: float
    heading: float


def fix_at(legs: Sequence[Leg], parked: LatLon, t_s: float) -> Fix:
    """Where the vehicle is at `t_s`: on a leg (interpolated along a straight line), else where it stopped."""
    where, heading = parked, 0.0
    for leg in legs:
        if t_s < leg.t0_s:
            break
        heading = bearing_deg(leg.start, leg.end)
        if t_s < leg.t1_s:
            f = (t_s - leg.t0_s) / leg.duration_s
            lat = leg.start[0] + (leg.end[0] - leg.start[0]) * f
            lon = leg.start[1] + (leg.end[1] - leg.start[1]) * f
            return Fix(round(lat, 6), round(lon, 6), leg.kmh, round(heading, 1))
        where = leg.end
    return Fix(round(where[0], 6), round(where[1], 6), 0.0, round(heading, 1))
