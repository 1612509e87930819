"""A pure, seeded model of one patient's vital signs, sampled at whole seconds of scenario time.

Each parameter is the scenario's target plus an Ornstein-Uhlenbeck drift and measurement noise; heart rate
and SpO2 carry a respiratory modulation. Every random draw is a hash of (seed, stream, step), so the same
seed, scenario and time give the same values whatever was asked before.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from devices.scenarios import ARTIFACT, Scenario, at, integral, step_at


def gauss(seed: int, stream: str, n: int) -> float:
    """A standard normal draw that depends only on its arguments (Box-Muller over BLAKE2b)."""
    h = hashlib.blake2b(f"{seed}/{stream}/{n}".encode(), digest_size=16).digest()
    u1 = (int.from_bytes(h[:8], "big") + 1) / 2.0**64  # (0, 1]: log is finite
    u2 = int.from_bytes(h[8:], "big") / 2.0**64
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def uniform(seed: int, stream: str) -> float:
    """A uniform draw in [0, 1) that depends only on its arguments."""
    h = hashlib.blake2b(f"{seed}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def half_up(x: float, step: float = 1.0) -> float:
    """Round as a monitor displays: half up to `step` (1 for HR/RR/SpO2, 0.1 for temperature)."""
    return math.floor(x / step + 0.5) * step


@dataclass(frozen=True, slots=True)
class Param:
    """How one parameter wanders: drift sd and time constant, measurement noise, and a cap on both."""

    drift_sd: float
    tau_s: float
    noise_sd: float
    # Monitors average over several beats: a reading never strays more than this from the target.
    max_dev: float


PARAMS: dict[str, Param] = {
    "hr": Param(drift_sd=2.0, tau_s=120, noise_sd=0.8, max_dev=6.0),
    "pr": Param(drift_sd=0.0, tau_s=1, noise_sd=0.7, max_dev=3.0),  # around the ECG HR
    "rr": Param(drift_sd=1.0, tau_s=180, noise_sd=0.5, max_dev=3.0),
    "spo2": Param(drift_sd=0.5, tau_s=60, noise_sd=0.25, max_dev=1.4),
    "temp": Param(drift_sd=0.08, tau_s=1800, noise_sd=0.02, max_dev=0.25),
    "sbp": Param(drift_sd=4.0, tau_s=600, noise_sd=3.0, max_dev=10.0),
    "dbp": Param(drift_sd=3.0, tau_s=600, noise_sd=2.0, max_dev=7.0),
}

RSA_HR = 1.5  # bpm of respiratory sinus arrhythmia
RSA_SPO2 = 0.3  # % of pleth-derived SpO2 swing with breathing
ARTIFACT_HR = (350.0, 0.0)  # motion spikes seen by the ECG
NIBP_DURATION_S = 30  # cuff inflation to reading


@dataclass(frozen=True, slots=True)
class Vitals:
    """What a monitor reports at one second, rounded as displayed; None when the sensor gives nothing."""

    hr: float | None
    pr: float
    rr: float | None
    spo2: float
    temp: float
    acvpu: str
    o2_supplement: int
    artifact: bool  # the HR is a motion spike


@dataclass(frozen=True, slots=True)
class Nibp:
    """One cuff reading (mmHg) and the scenario second at which the cuff started."""

    started_s: int
    sys: float
    dia: float
    mean: float


class Physiology:
    """One patient's vitals under a scenario; deterministic in (seed, scenario, second)."""

    CHECKPOINT = 300  # seconds between cached drift states, so random access stays cheap

    def __init__(self, seed: int, scenario: Scenario) -> None:
        self.seed = seed
        self.scenario = scenario
        self.baseline = baseline(seed)
        self._drift: dict[str, dict[int, float]] = {p: {} for p in PARAMS}
        self._last: dict[str, tuple[int, float]] = {}  # the last drift computed: sequential reads are O(1)

    def target(self, param: str, t_s: float) -> float:
        """The scripted value of a parameter (before drift and noise)."""
        if param == "pr":
            param = "hr"
        return at(self.scenario.tracks.get(param, ()), t_s, self.baseline[param])

    def drift(self, param: str, n: int) -> float:
        """The OU deviation at second n, stepped from the nearest cached checkpoint at or before n."""
        p = PARAMS[param]
        if p.drift_sd == 0.0 or n < 0:
            return 0.0
        cache = self._drift[param]
        k = n - n % self.CHECKPOINT
        while k > 0 and k not in cache:
            k -= self.CHECKPOINT
        x = cache.get(k)
        if x is None:
            k, x = 0, p.drift_sd * gauss(self.seed, f"{param}/ou", 0)
            cache[0] = x
        last = self._last.get(param)
        if last is not None and k <= last[0] <= n:
            k, x = last
        a = math.exp(-1.0 / p.tau_s)
        kick = p.drift_sd * math.sqrt(1.0 - a * a)
        for i in range(k + 1, n + 1):
            x = a * x + kick * gauss(self.seed, f"{param}/ou", i)
            if i % self.CHECKPOINT == 0:
                cache[i] = x
        self._last[param] = (n, x)
        return x

    def value(self, param: str, n: int) -> float:
        """Target plus drift plus noise at second n, capped at the parameter's maximum deviation."""
        p = PARAMS[param]
        dev = self.drift(param, n) + p.noise_sd * gauss(self.seed, f"{param}/noise", n)
        return self.target(param, n) + max(-p.max_dev, min(p.max_dev, dev))

    def vitals(self, n: int, *, lead_off: bool = False) -> Vitals:
        """The vitals a monitor shows at second n of the scenario."""
        rr = max(0.0, self.value("rr", n))
        # The breathing phase integrates the scripted rate, so the modulation follows RR as it changes.
        breaths = integral(self.scenario.tracks.get("rr", ()), n, self.baseline["rr"]) / 60.0
        phase = 2.0 * math.pi * (breaths + uniform(self.seed, "rsa/phase"))
        hr = max(0.0, self.value("hr", n) + RSA_HR * math.sin(phase))
        pr = max(0.0, hr + PARAMS["pr"].noise_sd * gauss(self.seed, "pr/noise", n))
        spo2 = min(100.0, max(0.0, self.value("spo2", n) + RSA_SPO2 * math.sin(phase + math.pi / 2)))
        spiking = self.scenario.window(ARTIFACT, n) is not None
        hr_shown: float | None = half_up(hr)
        if spiking:
            hr_shown = ARTIFACT_HR[n % 2]
        if lead_off:
            hr_shown = None  # ECG HR and impedance RR both come through the leads
        return Vitals(
            hr=hr_shown,
            pr=half_up(pr),
            rr=None if lead_off else half_up(rr),
            spo2=min(100.0, half_up(spo2)),
            temp=round(half_up(self.value("temp", n), 0.1), 1),
            acvpu=step_at(self.scenario.states.get("acvpu", ()), n, "A"),
            o2_supplement=int(step_at(self.scenario.states.get("o2_supplement", ()), n, "0")),
            artifact=spiking and not lead_off,
        )

    def nibp(self, started_s: int) -> Nibp:
        """The cuff reading of a cycle that started at `started_s`."""
        sys = self.value("sbp", started_s)
        dia = min(self.value("dbp", started_s), sys - 25.0)  # keep a plausible pulse pressure
        return Nibp(started_s, half_up(sys), half_up(dia), half_up(dia + (sys - dia) / 3.0))


def baseline(seed: int) -> dict[str, float]:
    """A patient's resting values, varied by seed within normal adult ranges."""

    def spread(name: str, lo: float, hi: float) -> float:
        return lo + (hi - lo) * uniform(seed, f"baseline/{name}")

    sbp = spread("sbp", 112, 135)
    return {
        "hr": spread("hr", 62, 88),
        "rr": spread("rr", 12, 18),
        "spo2": spread("spo2", 95.5, 98.5),
        "temp": spread("temp", 36.5, 37.1),
        "sbp": sbp,
        "dbp": sbp * spread("dbp", 0.58, 0.66),
    }
