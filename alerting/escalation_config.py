"""Escalation policies from YAML (config/escalation.yaml): per unit and priority, with a default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from alerting.escalation import DEFAULT_POLICIES, Level, Policies, Policy, Target

PRIORITIES = ("high", "medium", "low")


class EscalationConfigError(ValueError):
    """The file is not a valid escalation policy; the message names the place."""


def _target(raw: object, where: str) -> Target:
    if raw == "assignee":
        return Target("assignee", "primary_nurse")
    if isinstance(raw, str) and ":" in raw:
        kind, name = raw.split(":", 1)
        if kind in ("role", "group") and name:
            return Target(kind, name)  # type: ignore[arg-type]  # checked just above
    raise EscalationConfigError(f"{where}: a target is assignee, role:NAME or group:NAME, not {raw!r}")


def _policy(raw: object, where: str) -> Policy:
    if not isinstance(raw, dict) or not isinstance(raw.get("levels"), list) or not raw["levels"]:
        raise EscalationConfigError(f"{where}: a policy needs a non-empty `levels` list")
    levels = []
    last = -1.0
    for i, lv in enumerate(raw["levels"]):
        at = f"{where}.levels[{i}]"
        if not isinstance(lv, dict) or not isinstance(lv.get("notify"), list) or not lv["notify"]:
            raise EscalationConfigError(f"{at}: needs `after_s` and a non-empty `notify` list")
        after = lv.get("after_s", 0)
        if not isinstance(after, int | float) or after < last:
            raise EscalationConfigError(f"{at}: after_s must be a number, not less than the level before")
        last = float(after)
        levels.append(Level(round(after * 1000), tuple(_target(t, at) for t in lv["notify"])))
    repeat = raw.get("repeat_s", 60)
    if not isinstance(repeat, int | float) or repeat <= 0:
        raise EscalationConfigError(f"{where}.repeat_s: must be a positive number of seconds")
    return Policy(tuple(levels), round(repeat * 1000))


def load_policies(text: str, file: str = "<escalation>") -> Policies:
    body: Any = yaml.safe_load(text) or {}
    if not isinstance(body, dict) or body.get("version") != 1:
        raise EscalationConfigError(f"{file}: `version: 1` is required")
    default = _policy(body["default"], f"{file}: default") if "default" in body else DEFAULT_POLICIES.default
    by_unit: dict[tuple[str, str], Policy] = {}
    for unit, spec in (body.get("units") or {}).items():
        if not isinstance(spec, dict):
            raise EscalationConfigError(f"{file}: units.{unit}: a map of priority (or all) to policy")
        for prio, raw in spec.items():
            if prio not in (*PRIORITIES, "all"):
                raise EscalationConfigError(f"{file}: units.{unit}.{prio}: high, medium, low or all")
            by_unit[(str(unit), "" if prio == "all" else prio)] = _policy(raw, f"{file}: units.{unit}.{prio}")
    return Policies(by_unit, default)


def load_policies_file(path: Path) -> Policies:
    """The file's policies; the built-in default when it does not exist."""
    if not path.exists():
        return DEFAULT_POLICIES
    return load_policies(path.read_text(encoding="utf-8"), str(path))
