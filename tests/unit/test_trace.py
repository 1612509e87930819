"""The recorded simulator trace: exact round trip, the committed 24 h / 40-bed file, and its coverage."""

from __future__ import annotations

import collections
import heapq
import itertools
from functools import cache
from pathlib import Path

import pytest

from devices.fleet import SimDevice, plan_fleet
from devices.messages import messages_at, model_for
from devices.scenarios import MONITOR_SCENARIOS
from devices.trace import (
    DEFAULT_BEDS,
    DEFAULT_DURATION_S,
    DEFAULT_PATH,
    DEFAULT_SEED,
    DEFAULT_START_MS,
    Trace,
    TraceMessage,
    device_messages,
    file_sha256,
    record,
)

# docs/TRACE.md: the committed file's checksums.
FILE_SHA256 = "7c338a9901b171643cafdaa5e5500a7c2374c6595ab03797a76f20dfbb6dd8b7"
CONTENT_SHA256 = "600e50796f94ce9735d76d6149630f98a8534f4137eacc4cc491d285e9cee954"


def expected(path_info: Trace) -> list[TraceMessage]:
    info = path_info.info
    streams = [
        device_messages(
            SimDevice.from_spec(s, ""), seed=info.seed, start_ms=info.start_ms, duration_s=info.duration_s
        )
        for s in info.devices
    ]
    return list(heapq.merge(*streams, key=lambda m: m[0]))


@pytest.mark.parametrize(("scenario", "workers"), [("mix", 1), ("sepsis", 2)])
def test_round_trip_is_exact(tmp_path: Path, scenario: str, workers: int) -> None:
    path = tmp_path / "t.vtrace.xz"
    info = record(
        path, beds=4, scenario=scenario, seed=3, duration_s=700, start_ms=DEFAULT_START_MS, workers=workers
    )
    trace = Trace(path)
    assert trace.info == info
    got = list(trace.messages())
    assert got == expected(trace)
    assert len(got) == info.messages
    assert [m[0] for m in got] == sorted(m[0] for m in got)
    trace.verify()
    only = list(trace.messages(["mon-01"]))
    assert only == [m for m in got if m[1] == "mon-01"] == list(trace.device("mon-01"))


def test_recording_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.xz", tmp_path / "b.xz"
    record(a, beds=2, duration_s=120, workers=1)
    record(b, beds=2, duration_s=120, workers=2)
    assert a.read_bytes() == b.read_bytes()


def test_a_tampered_trace_fails_verification(tmp_path: Path) -> None:
    path = tmp_path / "t.xz"
    record(path, beds=1, duration_s=60, workers=1)
    trace = Trace(path)
    trace.header["devices"][0]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="digest"):
        trace.verify()


# ---- the committed trace --------------------------------------------------------------------------------

committed = pytest.mark.skipif(not DEFAULT_PATH.exists(), reason="bench/data trace not recorded")


@cache
def committed_trace() -> Trace:
    return Trace(DEFAULT_PATH)


@committed
def test_committed_file_checksums() -> None:
    assert file_sha256(DEFAULT_PATH) == FILE_SHA256
    assert committed_trace().info.content_sha256 == CONTENT_SHA256


@committed
def test_committed_trace_is_the_documented_ward() -> None:
    info = committed_trace().info
    assert (info.beds, info.seed, info.scenario) == (DEFAULT_BEDS, DEFAULT_SEED, "mix") == (40, 0, "mix")
    assert info.duration_s == DEFAULT_DURATION_S == 86_400
    assert info.start_ms == DEFAULT_START_MS
    assert list(info.devices) == plan_fleet(40, "mix", seed=0)
    monitors = collections.Counter(d.scenario for d in info.devices if d.type == "monitor")
    assert sum(monitors.values()) == 40
    # "mix": every monitor scenario before any repeats, so 40 beds over 7 scenarios give 5 or 6 each.
    assert set(monitors) == set(MONITOR_SCENARIOS)
    assert all(c in (5, 6) for c in monitors.values())
    others = collections.Counter((d.type, d.scenario) for d in info.devices if d.type != "monitor")
    assert others[("pump", "pump_occlusion")] == 1
    assert others[("ambulance", "sos_ambulance")] == others[("pendant", "sos_ambulance")] == 1
    assert others[("analyzer", "hyperkalaemia")] == 1


def _first_of(scenario: str) -> SimDevice:
    spec = next(d for d in committed_trace().info.devices if d.scenario == scenario)
    return SimDevice.from_spec(spec, "")


@committed
@pytest.mark.parametrize(
    "scenario",
    ["sepsis", "artifact", "lead_off", "offline", "pump_occlusion", "sos_ambulance", "hyperkalaemia"],
)
def test_committed_trace_is_what_the_simulator_generates(scenario: str) -> None:
    trace = committed_trace()
    device = _first_of(scenario)
    model = model_for(device, seed=trace.info.seed, start_ms=trace.info.start_ms)
    by_second = collections.defaultdict(list)
    for t_ms, device_id, kind, payload in trace.device(device.id):
        assert device_id == device.id
        by_second[t_ms // 1000].append((kind, payload))
    # The whole scripted part, then samples across the day (the model steps forward, as the recorder did).
    samples = itertools.chain(range(2_500), range(43_190, 43_260), range(86_340, 86_400))
    for n in samples:
        assert by_second.get(n, []) == messages_at(model, n * 1000), (device.id, n)


@committed
def test_committed_trace_covers_the_day_for_every_bed() -> None:
    trace = committed_trace()
    monitors = [d for d in trace.info.devices if d.type == "monitor"]
    assert len(monitors) == 40
    for d in monitors:
        timeline = list(trace.timeline(d.id))
        assert timeline[0][0] == 0 and timeline[-1][0] == 86_399_000
        obs = [t for t, kind in timeline if kind == "obs"]
        assert len(obs) == 86_400 - (180 if d.scenario == "offline" else 0)
        assert len(set(obs)) == len(obs)
    kinds = collections.Counter(kind for d in trace.info.devices for _, kind in trace.timeline(d.id))
    assert kinds["obs"] == 35 * 86_400 + 5 * (86_400 - 180)
    assert kinds["sos"] == 1 and kinds["lab"] == 2
    assert kinds.total() == trace.info.messages


@committed
@pytest.mark.slow
def test_committed_trace_content_digest_of_a_sample_of_devices() -> None:
    """Every 6th device decoded and digested (the whole trace, about a minute: `bench/trace.py --verify`);
    `test_committed_file_checksums` covers every byte of the file."""
    committed_trace().verify(every=6)
