"""Loading rules from YAML: schema checks with `file:line` errors, unit conversion, hot reload.

The only module of alerting/ that touches files (`RulesFile`); `load_rules` itself is pure on a string.
docs/RULES.md describes the format.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alerting.rules import (
    DEFAULT_MAX_GAP_MS,
    DEFAULT_STALE_MS,
    FLOOR_CONDITION,
    OPS,
    PRIORITIES,
    SECOND_MS,
    Op,
    Rule,
    Ruleset,
    Term,
    TermKind,
    enforce_floor,
    floor_rule,
)
from streams.codes import CodeInfo, resolve_code
from streams.units import accepted_units, convert

TOP_KEYS = frozenset({"version", "settings", "defaults", "units"})
SETTINGS_KEYS = frozenset({"max_gap_s", "stale_after_s"})
TERM_KEYS = frozenset({"parameter", "ratio", "op", "threshold", "unit", "hysteresis", "change_over_s"})
RULE_KEYS = TERM_KEYS | {"label", "priority", "delay_s", "max_gap_s", "disabled", "all", "any"}
CONDITION_KEYS = frozenset({"parameter", "ratio", "all", "any"})  # a unit giving one replaces the condition
_NAME = re.compile(r"[a-z][a-z0-9_]*")

Entries = dict[str, tuple[yaml.Node, yaml.Node]]  # key -> (key node, value node), in file order


@dataclass(frozen=True, slots=True)
class RuleError:
    """One problem in a rules file, at a 1-based line."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class _Ctx:
    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[RuleError] = []
        self.notes: list[str] = []
        self.max_gap_ms = DEFAULT_MAX_GAP_MS
        self._construct = yaml.constructor.SafeConstructor()

    def err(self, node: yaml.Node, message: str) -> None:
        e = RuleError(self.file, node.start_mark.line + 1, message)
        if e not in self.errors:  # a unit's merged rule re-checks the default's lines
            self.errors.append(e)

    def where(self, node: yaml.Node) -> str:
        return f"{self.file}:{node.start_mark.line + 1}"

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node  # a collection: callers reject it by type
        return self._construct.construct_object(node)

    def mapping(self, node: yaml.Node, what: str) -> Entries | None:
        if not isinstance(node, yaml.MappingNode):
            self.err(node, f"{what} must be a mapping")
            return None
        out: Entries = {}
        for k, v in node.value:
            key = self.scalar(k)
            if not isinstance(key, str):
                self.err(k, f"{what}: keys must be strings")
            elif key in out:
                self.err(k, f"{what}: duplicate key {key!r}")
            else:
                out[key] = (k, v)
        return out

    def unknown(self, entries: Entries, allowed: frozenset[str], what: str) -> None:
        for key, (k, _) in entries.items():
            if key not in allowed:
                self.err(k, f"{what}: unknown field {key!r}")

    def number(
        self, node: yaml.Node, what: str, *, minimum: float | None = None, strict: bool = False
    ) -> float | None:
        x = self.scalar(node)
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            self.err(node, f"{what} must be a number")
            return None
        if minimum is not None and (x <= minimum if strict else x < minimum):
            self.err(node, f"{what} must be {'>' if strict else '>='} {minimum:g}")
            return None
        return float(x)

    def string(self, node: yaml.Node, what: str) -> str | None:
        x = self.scalar(node)
        if not isinstance(x, str):
            self.err(node, f"{what} must be a string")
            return None
        return x


def load_rules(text: str, file: str = "<rules>") -> Ruleset | list[RuleError]:
    """A ruleset from YAML text, or every error found, each with its file and line."""
    ctx = _Ctx(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        return [RuleError(file, mark.line + 1 if mark else 1, f"YAML: {e.problem or e}")]
    if root is None:
        return [RuleError(file, 1, "empty rules file")]
    top = ctx.mapping(root, "rules file")
    if top is None:
        return ctx.errors
    ctx.unknown(top, TOP_KEYS, "rules file")
    if "version" not in top:
        ctx.err(root, "missing field 'version'")
    elif ctx.scalar(top["version"][1]) != 1:
        ctx.err(top["version"][1], "version must be 1")
    stale_ms, default_stale = (
        _settings(ctx, top["settings"][1]) if "settings" in top else ({}, DEFAULT_STALE_MS)
    )

    default_entries: dict[str, tuple[yaml.Node, Entries]] = {}
    if "defaults" not in top:
        ctx.err(root, "missing field 'defaults'")
    else:
        default_entries = _rule_entries(ctx, top["defaults"][1], "defaults")
    defaults = _with_floor(ctx, _build_all(ctx, default_entries))

    units: dict[str, dict[str, Rule]] = {}
    if "units" in top:
        unit_map = ctx.mapping(top["units"][1], "units")
        for unit_id, (_, unode) in (unit_map or {}).items():
            merged = dict(default_entries)
            for name, (nnode, entries) in _rule_entries(ctx, unode, f"units.{unit_id}").items():
                base = default_entries.get(name, (nnode, {}))[1]
                if CONDITION_KEYS & entries.keys():
                    base = {k: v for k, v in base.items() if k not in TERM_KEYS | {"all", "any"}}
                merged[name] = (nnode, {**base, **entries})
            units[unit_id] = _with_floor(ctx, _build_all(ctx, merged))
    if ctx.errors:
        return sorted(ctx.errors, key=lambda e: e.line)
    return Ruleset(defaults, units, stale_ms, default_stale, tuple(ctx.notes), file,
                   hashlib.sha256(text.encode()).hexdigest())  # fmt: skip


def _settings(ctx: _Ctx, node: yaml.Node) -> tuple[dict[str, int], int]:
    entries = ctx.mapping(node, "settings") or {}
    ctx.unknown(entries, SETTINGS_KEYS, "settings")
    if "max_gap_s" in entries:
        gap = ctx.number(entries["max_gap_s"][1], "max_gap_s", minimum=0, strict=True)
        ctx.max_gap_ms = DEFAULT_MAX_GAP_MS if gap is None else round(gap * SECOND_MS)
    stale: dict[str, int] = {}
    default = DEFAULT_STALE_MS
    if "stale_after_s" in entries:
        for key, (k, v) in (ctx.mapping(entries["stale_after_s"][1], "stale_after_s") or {}).items():
            secs = ctx.number(v, f"stale_after_s.{key}", minimum=0, strict=True)
            info = None if key == "default" else _parameter(ctx, k)
            if secs is not None and key == "default":
                default = round(secs * SECOND_MS)
            elif secs is not None and info is not None:
                stale[info.ref] = round(secs * SECOND_MS)
    return stale, default


def _rule_entries(ctx: _Ctx, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, Entries]]:
    out: dict[str, tuple[yaml.Node, Entries]] = {}
    for name, (k, v) in (ctx.mapping(node, what) or {}).items():
        if _NAME.fullmatch(name) is None:
            ctx.err(k, f"rule name {name!r} must be lower_snake_case")
            continue
        entries = ctx.mapping(v, f"rule {name}")
        if entries is not None:
            ctx.unknown(entries, RULE_KEYS, f"rule {name}")
            out[name] = (k, entries)
    return out


def _build_all(ctx: _Ctx, entries: Mapping[str, tuple[yaml.Node, Entries]]) -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for name, (nnode, e) in entries.items():
        if "disabled" in e:
            off = ctx.scalar(e["disabled"][1])
            if not isinstance(off, bool):
                ctx.err(e["disabled"][1], "disabled must be true or false")
            elif off and name == FLOOR_CONDITION:
                ctx.notes.append(f"{ctx.where(nnode)}: the SpO2 safety floor cannot be disabled: kept")
            elif off:
                continue
        rule = _build_rule(ctx, name, nnode, e)
        if rule is not None:
            rules[name] = rule
    return rules


def _with_floor(ctx: _Ctx, rules: dict[str, Rule]) -> dict[str, Rule]:
    if FLOOR_CONDITION not in rules:
        rules[FLOOR_CONDITION] = floor_rule()
        return rules
    tightened, notes = enforce_floor(rules[FLOOR_CONDITION])
    for n in notes:
        msg = f"{rules[FLOOR_CONDITION].source}: {FLOOR_CONDITION}: {n}"
        if msg not in ctx.notes:
            ctx.notes.append(msg)
    rules[FLOOR_CONDITION] = tightened
    return rules


def _build_rule(ctx: _Ctx, name: str, nnode: yaml.Node, e: Entries) -> Rule | None:
    n_errors = len(ctx.errors)
    priority = None
    if "priority" not in e:
        ctx.err(nnode, f"rule {name}: missing field 'priority'")
    else:
        p = ctx.scalar(e["priority"][1])
        if p in PRIORITIES:
            priority = p
        else:
            ctx.err(e["priority"][1], f"rule {name}: priority must be high, medium or low, not {p!r}")
    delay = 0.0
    if "delay_s" in e:
        delay = ctx.number(e["delay_s"][1], f"rule {name}: delay_s", minimum=0) or 0.0
    gap_ms = ctx.max_gap_ms
    if "max_gap_s" in e:
        gap = ctx.number(e["max_gap_s"][1], f"rule {name}: max_gap_s", minimum=0, strict=True)
        gap_ms = gap_ms if gap is None else round(gap * SECOND_MS)
    label = ""
    if "label" in e:
        label = ctx.string(e["label"][1], f"rule {name}: label") or ""

    modes = [m for m in ("all", "any") if m in e]
    inline = TERM_KEYS & e.keys()
    terms: list[Term] = []
    mode = "all"
    if len(modes) + bool(inline) > 1:
        ctx.err(nnode, f"rule {name}: give one condition: inline fields, 'all' or 'any'")
    elif modes:
        mode = modes[0]
        seq = e[mode][1]
        if not isinstance(seq, yaml.SequenceNode) or not seq.value:
            ctx.err(seq, f"rule {name}: {mode} must be a non-empty list of terms")
        else:
            for item in seq.value:
                te = ctx.mapping(item, f"rule {name}: term")
                if te is not None:
                    ctx.unknown(te, TERM_KEYS, f"rule {name}: term")
                    terms.extend(t for t in [_build_term(ctx, name, item, te)] if t is not None)
    elif inline:
        terms.extend(t for t in [_build_term(ctx, name, nnode, e)] if t is not None)
    else:
        ctx.err(nnode, f"rule {name}: missing a condition: parameter, ratio, all or any")
    if len(ctx.errors) > n_errors or priority is None or not terms:
        return None
    return Rule(name, tuple(terms), priority, round(delay * SECOND_MS), mode,  # type: ignore[arg-type]
                gap_ms, label, ctx.where(nnode))  # fmt: skip


def _parameter(ctx: _Ctx, node: yaml.Node) -> CodeInfo | None:
    x = ctx.scalar(node)
    info = resolve_code(x) if isinstance(x, str | int) and not isinstance(x, bool) else None
    if info is None or info.choices or info.discrete:
        ctx.err(node, f"unknown parameter {x!r}")
        return None
    return info


def _build_term(ctx: _Ctx, name: str, where: yaml.Node, e: Entries) -> Term | None:
    what = f"rule {name}"
    for req in ("op", "threshold"):
        if req not in e:
            ctx.err(where, f"{what}: missing field {req!r}")
    if ("parameter" in e) == ("ratio" in e):
        ctx.err(where, f"{what}: give exactly one of 'parameter' or 'ratio'")
        return None
    op: Op | None = None
    if "op" in e:
        o = ctx.scalar(e["op"][1])
        if o in OPS:
            op = o
        else:
            ctx.err(e["op"][1], f"{what}: op must be one of < <= > >=, not {o!r}")
    threshold = ctx.number(e["threshold"][1], f"{what}: threshold") if "threshold" in e else None
    hyst = 0.0
    if "hysteresis" in e:
        hyst = ctx.number(e["hysteresis"][1], f"{what}: hysteresis", minimum=0) or 0.0
    window_ms = 0
    if "change_over_s" in e:
        w = ctx.number(e["change_over_s"][1], f"{what}: change_over_s", minimum=0, strict=True)
        window_ms = 0 if w is None else round(w * SECOND_MS)
        if "ratio" in e:
            ctx.err(e["change_over_s"][0], f"{what}: change_over_s needs a parameter, not a ratio")

    if "ratio" in e:
        seq = e["ratio"][1]
        infos: list[CodeInfo | None] = []
        if not isinstance(seq, yaml.SequenceNode) or len(seq.value) != 2:
            ctx.err(seq, f"{what}: ratio must be [numerator, denominator]")
        else:
            infos = [_parameter(ctx, n) for n in seq.value]
        if "unit" in e and ctx.scalar(e["unit"][1]) != "1":
            ctx.err(e["unit"][1], f"{what}: a ratio is of canonical units: unit must be '1' or absent")
        if op is None or threshold is None or len(infos) != 2 or infos[0] is None or infos[1] is None:
            return None
        return Term("ratio", (infos[0].ref, infos[1].ref), op, threshold, "1", hyst)

    info = _parameter(ctx, e["parameter"][1])
    unit = info.unit if info is not None else None
    if "unit" in e:
        unit = ctx.string(e["unit"][1], f"{what}: unit")
        if info is not None and unit is not None and unit not in accepted_units(info) | {info.unit}:
            ctx.err(e["unit"][1], f"{what}: unit {unit!r} is not convertible to {info.unit!r} ({info.alias})")
            unit = None
    if info is None or unit is None or op is None or threshold is None:
        return None

    def delta(x: float) -> float:  # a difference converts without the offset ([degF] to Cel)
        return convert(x, unit, info) - convert(0.0, unit, info)

    kind: TermKind = "change" if window_ms else "value"
    canonical = delta(threshold) if kind == "change" else convert(threshold, unit, info)
    return Term(kind, (info.ref,), op, round(canonical, 6), info.unit, round(delta(hyst), 6), window_ms)


class RulesFile:
    """A rules file reloaded on change; a bad edit keeps the rules in force (at first: the floor only)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.current = Ruleset({FLOOR_CONDITION: floor_rule()}, source="built-in floor")
        self.errors: list[RuleError] = []
        self._stamp: tuple[int, int] | None = None
        self._digest: str | None = None

    def reload_if_changed(self) -> Ruleset | list[RuleError]:
        """The ruleset now in force, or the errors of a changed file that was therefore not applied."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return self.current
            data = self.path.read_bytes()
        except OSError as e:
            self.errors = [RuleError(str(self.path), 0, f"cannot read: {e.strerror or e}")]
            self._stamp = None
            return self.errors
        self._stamp = stamp
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return self.current
        self._digest = digest
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.errors = [RuleError(str(self.path), 1, "not UTF-8 text")]
            return self.errors
        loaded = load_rules(text, str(self.path))
        if isinstance(loaded, list):
            self.errors = loaded
            return loaded
        self.current, self.errors = loaded, []
        return loaded
