"""Alarm load: alarms per bed per day on the committed ward trace, shipped rules against naive thresholds.

    .venv/bin/python bench/alarm_load.py                  # the whole 24 h, 40 beds (docs/ALARM_LOAD.md)
    .venv/bin/python bench/alarm_load.py --hours 1 --beds 10
    .venv/bin/python bench/alarm_load.py --hours 2 --profile /tmp/alarm_load.prof

The trace (docs/TRACE.md) is replayed in-process through the real pure pipeline, without servers: each
message -> `streams.validation.parse_message` -> `DeviceStage` (keyed by device) -> its emits to
`vigil.clinical.v1` -> `ClinicalEngine` (keyed as emitted), with a `Tick` every second of device time
stepped through the due keys of both stages (`streams.timers.step_one`, `DueIndex`), as the runtimes do.
Validation and the device stage run once; the clinical events go to two engines, one per ruleset. A
simulated nurse acknowledges every unacknowledged alert `--ack-after` seconds after it became so. The last
line is one JSON object; docs/ALARM_LOAD.md explains the figures.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import heapq
import json
import platform
import pstats
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alerting.engine import ClinicalEngine
from alerting.escalation import Facts
from alerting.rules import Ruleset
from alerting.rules_schema import load_rules
from alerting.technical import TECHNICAL
from devices import trace as trace_mod
from devices.fleet import DeviceSpec
from gateway.device import DeviceInfo
from streams import topics
from streams.effects import Effect, Emit, RecordAlerts, RecordPages
from streams.processors.device import DeviceStage
from streams.schemas import AlertCommand, Event, Tick
from streams.timers import DueIndex, step_one
from streams.validation import parse_message

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_RULES = ROOT / "config" / "rules.yaml"
NAIVE_RULES = ROOT / "bench" / "data" / "naive_rules.yaml"
RX_DELAY_MS = 50  # received_at = device time + this: a ward network's usual delay, constant
DEFAULT_ACK_AFTER_S = 30.0
NURSE = "bench-nurse"
UNACK = frozenset({"active_unack", "cleared_unack"})
REANNOUNCE = ("worsened", "persisting", "recurred")
TICK_KEY = topics.tick_key(0)
DAY_MS = 86_400_000
EXAMPLES = 3  # raise times kept per (condition, scenario), for findings


def load(path: Path) -> Ruleset:
    loaded = load_rules(path.read_text(), str(path))
    if isinstance(loaded, list):
        raise SystemExit("\n".join(str(e) for e in loaded))
    return loaded


class Ward:
    """The facts of a fully staffed ward: an assigned nurse, a charge nurse, a rapid-response team, online."""

    FACTS = Facts(
        assignee="nurse-1",
        roles={"charge_nurse": ("charge-1",)},
        groups={"rapid_response": ("rrt-1",)},
        connected=frozenset({"nurse-1", "charge-1", "rrt-1"}),
    )

    def facts(
        self, *, site_id: str, unit_id: str | None, bed_id: str | None, patient_id: str | None
    ) -> Facts:
        return self.FACTS


def kind_of(condition: str) -> str:
    if condition == "news2":
        return "news2"
    return "technical" if condition in TECHNICAL else "physiological"


@dataclass
class Tally:
    """What one ruleset's engine said over the replay, counted from its RecordAlerts and RecordPages."""

    raised: int = 0
    by_priority: collections.Counter[str] = field(default_factory=collections.Counter)
    by_condition: collections.Counter[str] = field(default_factory=collections.Counter)
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    by_scenario: collections.Counter[str] = field(default_factory=collections.Counter)
    by_condition_scenario: dict[str, collections.Counter[str]] = field(default_factory=dict)
    reannounced: collections.Counter[str] = field(default_factory=collections.Counter)
    versions: int = 0
    retrospective: int = 0
    pages: int = 0  # escalation steps that paged somebody
    pages_by_level: collections.Counter[int] = field(default_factory=collections.Counter)
    pages_by_priority: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: int = 0
    acks: int = 0
    examples: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # "cond/scen" -> (key, t_s)

    def summary(self, beds: int, hours: float) -> dict[str, Any]:
        bed_days = beds * hours / 24
        per = (lambda n: round(n / bed_days, 2)) if bed_days else (lambda n: 0.0)
        announced = self.raised + sum(self.reannounced.values())
        return {
            "alarms": self.raised,
            "alarms_per_bed_day": per(self.raised),
            "announcements": announced,
            "announcements_per_bed_day": per(announced),
            "by_priority": dict(self.by_priority.most_common()),
            "by_kind": dict(self.by_kind.most_common()),
            "by_condition": dict(self.by_condition.most_common()),
            "by_scenario": dict(self.by_scenario.most_common()),
            "by_condition_scenario": {
                c: dict(s.most_common()) for c, s in sorted(self.by_condition_scenario.items())
            },
            "per_bed_day": {
                "alarms": per(self.raised),
                "high": per(self.by_priority["high"]),
                "medium": per(self.by_priority["medium"]),
                "low": per(self.by_priority["low"]),
                "physiological": per(self.by_kind["physiological"]),
                "technical": per(self.by_kind["technical"]),
                "news2": per(self.by_kind["news2"]),
                "reannounced": per(sum(self.reannounced.values())),
                "announcements": per(announced),
                "pages": per(self.pages),
            },
            "reannounced": dict(self.reannounced.most_common()),
            "retrospective": self.retrospective,
            "versions": self.versions,
            "pages": self.pages,
            "pages_by_level": {str(k): v for k, v in sorted(self.pages_by_level.items())},
            "pages_by_priority": dict(self.pages_by_priority.most_common()),
            "skipped_levels": self.skipped,
            "acks": self.acks,
            "examples": self.examples,
        }


class Clinical:
    """One ruleset's clinical stage: the engine's keyed states, its due index, a nurse who acks, a tally."""

    def __init__(
        self,
        rules: Ruleset,
        *,
        start_ms: int,
        scenario_of: Callable[[str], str],
        ack_after_ms: int | None,
    ) -> None:
        self.engine = ClinicalEngine(lambda: rules, Ward())
        self.states: dict[str, Any] = {}
        self.dues = DueIndex()
        self.tally = Tally()
        self._start = start_ms
        self._scenario_of = scenario_of
        self._ack_after = ack_after_ms
        self._acks: list[tuple[int, str, int, str, str]] = []  # (at, alert id, version, key, site)
        self._status: dict[str, tuple[int, str]] = {}  # alert id -> (version, status) of unacked alerts
        self._dirty: set[str] = set()

    def feed(self, key: str, event: Event) -> None:
        out: list[Effect] = []
        step_one(self.engine, self.states, self.dues, key, event, self._dirty, out)
        self._count(out)

    def tick(self, at: int) -> None:
        while self._acks and self._acks[0][0] <= at:
            _, alert_id, version, key, site = heapq.heappop(self._acks)
            if self._status.get(alert_id, (0, ""))[0] != version:
                continue  # changed since (acked, re-announced, closed): that version schedules its own
            cmd = AlertCommand(f"{NURSE}/{alert_id}/ack/{at}", alert_id, "ack", NURSE, at, site)
            self.tally.acks += 1
            self.feed(key, cmd)
        self.feed(TICK_KEY, Tick(at=at))
        self._dirty.clear()

    def _count(self, effects: Iterable[Effect]) -> None:
        t = self.tally
        for e in effects:
            if isinstance(e, RecordAlerts):
                for v in e.items:
                    a = v.alert
                    key = topics.clinical_key(a.patient_id, a.bed_id, "")  # a tick steps many keys
                    t.versions += 1
                    if v.from_status is None:
                        scen = self._scenario_of(key)
                        t.raised += 1
                        t.by_priority[a.priority] += 1
                        t.by_condition[a.condition] += 1
                        t.by_kind[kind_of(a.condition)] += 1
                        t.by_scenario[scen] += 1
                        t.by_condition_scenario.setdefault(a.condition, collections.Counter())[scen] += 1
                        t.retrospective += a.retrospective
                        ex = t.examples.setdefault(f"{a.condition}/{scen}", [])
                        if len(ex) < EXAMPLES:
                            ex.append((key, (a.raised_at - self._start) // 1000))
                    for reason in REANNOUNCE:
                        if reason in v.reason.split("+"):
                            t.reannounced[reason] += 1
                    if a.status in UNACK:
                        self._status[a.id] = (a.version, a.status)
                        if self._ack_after is not None:
                            when = a.updated_at + self._ack_after
                            heapq.heappush(self._acks, (when, a.id, a.version, key, a.site_id))
                    else:
                        self._status.pop(a.id, None)
            elif isinstance(e, RecordPages):
                for p in e.items:
                    if p.skipped:
                        t.skipped += 1
                    elif p.recipients:
                        t.pages += 1
                        t.pages_by_level[p.level] += 1
                        t.pages_by_priority[p.priority] += 1


def device_info(spec: DeviceSpec) -> DeviceInfo:
    """What the registry answers for a simulator device: a bed's device follows the patient admitted there."""
    return DeviceInfo(spec.id, spec.type, spec.site, spec.unit, spec.bed, spec.patient, spec.allow_plain_coap)


def bed_ids(specs: Iterable[DeviceSpec], beds: int | None) -> list[str]:
    """The first `beds` monitored beds of the fleet, in order (all of them for None)."""
    ids = sorted({s.bed for s in specs if s.type == "monitor" and s.bed is not None})
    return ids if beds is None else ids[:beds]


@dataclass
class Part:
    """What one replay of some beds counted: messages, dead letters, ticks, and one tally per ruleset."""

    beds: int
    end_ms: int
    counts: collections.Counter[str]
    deadletters: collections.Counter[str]
    ticks: int
    scenarios: dict[str, str]  # clinical key -> scenario of its bed's monitor
    tallies: dict[str, Tally]


def replay_part(
    tr: trace_mod.Trace,
    rulesets: dict[str, Ruleset],
    *,
    beds: Iterable[str],
    bedless: bool = True,
    hours: float | None = None,
    ack_after_s: float | None = DEFAULT_ACK_AFTER_S,
) -> Part:
    """Replay the devices of `beds` (and the bed-less ones) and tally each ruleset. No I/O but the trace."""
    info = tr.info
    start = info.start_ms
    wanted = set(beds)
    specs = [
        s for s in info.devices if (s.bed is None and bedless) or (s.bed is not None and s.bed in wanted)
    ]
    directory = {s.id: device_info(s) for s in specs}
    scenario_by_key: dict[str, str] = {}
    for s in specs:
        if s.type == "monitor":
            scenario_by_key[topics.clinical_key(s.patient, s.bed, s.id)] = s.scenario
    for s in specs:  # bed-less devices' own patients (pendant, analyzer) keep their own scenario
        scenario_by_key.setdefault(topics.clinical_key(s.patient, s.bed, s.id), f"{s.type}:{s.scenario}")

    def scenario_of(key: str) -> str:
        return scenario_by_key.get(key, "other")

    ack_ms = None if ack_after_s is None else round(ack_after_s * 1000)
    clinicals = {
        name: Clinical(rs, start_ms=start, scenario_of=scenario_of, ack_after_ms=ack_ms)
        for name, rs in rulesets.items()
    }
    stage = DeviceStage()
    dev_states: dict[str, Any] = {}
    dev_dues = DueIndex()
    dirty: set[str] = set()
    end_ms = info.duration_s * 1000 if hours is None else min(info.duration_s * 1000, round(hours * 3.6e6))
    counts: collections.Counter[str] = collections.Counter()
    deadletters: collections.Counter[str] = collections.Counter()
    second = -1
    ticks = 0
    out: list[Effect] = []

    def route(effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Emit) and e.topic == topics.CLINICAL:
                for c in clinicals.values():
                    c.feed(e.key, e.event)
        effects.clear()

    def tick(at: int) -> None:
        step_one(stage, dev_states, dev_dues, TICK_KEY, Tick(at=at), dirty, out)
        route(out)
        for c in clinicals.values():
            c.tick(at)

    for t_ms, device_id, kind, payload in tr.messages(directory):
        if t_ms >= end_ms:
            break
        while second < t_ms // 1000:  # a tick at each second's start, before that second's messages
            second += 1
            tick(start + second * 1000)
            ticks += 1
        rx = start + t_ms + RX_DELAY_MS
        parsed = parse_message(
            orjson.dumps(payload), transport="mqtt", device=directory[device_id], kind=kind, received_at=rx
        )
        counts[kind] += 1
        for dl in parsed.deadletters:
            deadletters[dl.reason] += 1
        if parsed.event is None:
            continue
        step_one(stage, dev_states, dev_dues, device_id, parsed.event, dirty, out)
        route(out)
        dirty.clear()
    while (second + 1) * 1000 < end_ms:  # the quiet tail, if the trace ended first
        second += 1
        tick(start + second * 1000)
        ticks += 1
    n_beds = sum(1 for s in specs if s.type == "monitor")
    tallies = {name: c.tally for name, c in clinicals.items()}
    return Part(n_beds, end_ms, counts, deadletters, ticks, scenario_by_key, tallies)


def merge(parts: list[Part]) -> Part:
    """Parts over disjoint beds summed into one (keys are independent: the engine keys by patient)."""
    first = parts[0]
    total = Part(0, first.end_ms, collections.Counter(), collections.Counter(), first.ticks, {}, {})
    for p in parts:
        total.beds += p.beds
        total.counts.update(p.counts)
        total.deadletters.update(p.deadletters)
        total.scenarios.update(p.scenarios)
        for name, t in p.tallies.items():
            into = total.tallies.setdefault(name, Tally())
            into.raised += t.raised
            into.versions += t.versions
            into.retrospective += t.retrospective
            into.pages += t.pages
            into.skipped += t.skipped
            into.acks += t.acks
            for attr in ("by_priority", "by_condition", "by_kind", "by_scenario", "reannounced",
                         "pages_by_level", "pages_by_priority"):  # fmt: skip
                getattr(into, attr).update(getattr(t, attr))
            for cond, by in t.by_condition_scenario.items():
                into.by_condition_scenario.setdefault(cond, collections.Counter()).update(by)
            for k, ex in t.examples.items():
                into.examples[k] = sorted([*into.examples.get(k, []), *ex], key=lambda e: e[1])[:EXAMPLES]
    return total


def _worker(args: tuple[Path, dict[str, Path], list[str], bool, float | None, float | None]) -> Part:
    path, rule_paths, beds, bedless, hours, ack = args
    rulesets = {name: load(p) for name, p in rule_paths.items()}
    return replay_part(
        trace_mod.Trace(path), rulesets, beds=beds, bedless=bedless, hours=hours, ack_after_s=ack
    )


def replay(
    path: Path,
    rule_paths: dict[str, Path],
    *,
    hours: float | None = None,
    beds: int | None = None,
    ack_after_s: float | None = DEFAULT_ACK_AFTER_S,
    workers: int = 1,
) -> dict[str, Any]:
    """Replay the first `beds` beds over `hours`, split over `workers` processes; the figures as a dict."""
    tr = trace_mod.Trace(path)
    ids = bed_ids(tr.info.devices, beds)
    content = tr.info.content_sha256
    workers = max(1, min(workers, len(ids) or 1))
    if workers == 1:
        rulesets = {name: load(p) for name, p in rule_paths.items()}
        part = replay_part(tr, rulesets, beds=ids, hours=hours, ack_after_s=ack_after_s)
    else:
        del tr  # each worker decompresses its own copy
        jobs = [(path, rule_paths, ids[i::workers], i == 0, hours, ack_after_s) for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            part = merge(list(pool.map(_worker, jobs)))
    hours_run = part.end_ms / 3.6e6
    result: dict[str, Any] = {
        "content_sha256": content,
        "beds": part.beds,
        "hours": round(hours_run, 4),
        "messages": sum(part.counts.values()),
        "by_kind": dict(sorted(part.counts.items())),
        "deadletters": dict(part.deadletters),
        "ticks": part.ticks,
        "ack_after_s": ack_after_s,
        "workers": workers,
        "scenarios": dict(collections.Counter(part.scenarios.values())),
    }
    for name, t in part.tallies.items():
        result[name] = t.summary(part.beds, hours_run)
    if "shipped" in part.tallies and "naive" in part.tallies:
        shipped, naive = part.tallies["shipped"], part.tallies["naive"]
        result["ratio"] = round(naive.raised / shipped.raised, 2) if shipped.raised else None
        said, naive_said = (t.raised + sum(t.reannounced.values()) for t in (shipped, naive))
        result["ratio_announcements"] = round(naive_said / said, 2) if said else None
        phys = shipped.by_kind["physiological"]
        result["ratio_physiological"] = round(naive.by_kind["physiological"] / phys, 2) if phys else None
    return result


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", type=Path, default=trace_mod.DEFAULT_PATH)
    parser.add_argument("--hours", type=float, default=24.0, help="device hours from the start (default 24)")
    parser.add_argument("--beds", type=int, default=None, help="the first N beds (default: all 40)")
    parser.add_argument("--rules", type=Path, default=SHIPPED_RULES, help="the shipped ruleset")
    parser.add_argument("--naive", type=Path, default=NAIVE_RULES, help="the comparison ruleset")
    parser.add_argument(
        "--ack-after",
        type=float,
        default=DEFAULT_ACK_AFTER_S,
        help="seconds after which the nurse acks an unacknowledged alert; < 0: never (default 30)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes, beds split between them (default 1)"
    )
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats here, print the top")
    parser.add_argument("--examples", action="store_true", help="keep example raise times in the JSON")
    args = parser.parse_args()

    t0 = time.perf_counter()
    commit = _git_commit()  # at the start: the code that runs is the code imported now
    rule_paths = {"shipped": args.rules, "naive": args.naive}
    ack = None if args.ack_after < 0 else args.ack_after
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        prof.enable()
    workers = 1 if prof is not None else args.workers
    result = replay(
        args.trace, rule_paths, hours=args.hours, beds=args.beds, ack_after_s=ack, workers=workers
    )
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    seconds = time.perf_counter() - t0
    for name in rule_paths:
        s = result[name]
        print(
            f"{name}: {s['alarms']} alarms, {s['alarms_per_bed_day']} per bed-day "
            f"({s['by_priority']}); pages {s['pages']}; re-announced {s['reannounced']}",
            file=sys.stderr,
        )
        if not args.examples:
            del s["examples"]
    out = {
        "trace": args.trace.name,
        "beds": result.pop("beds"),
        "hours": result.pop("hours"),
        "shipped": result.pop("shipped"),
        "naive": result.pop("naive"),
        "ratio": result.pop("ratio"),
        **result,
        "seconds": round(seconds, 1),
        "git": commit,
        "box": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
