"""Escalation policies from YAML: the shipped file, unit overrides, and errors that name the place."""

from __future__ import annotations

from pathlib import Path

import pytest

from alerting.escalation import DEFAULT_POLICY, Target
from alerting.escalation_config import EscalationConfigError, load_policies, load_policies_file

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "escalation.yaml"


def test_shipped_file_is_the_contract_default() -> None:
    policies = load_policies_file(SHIPPED)
    assert policies.default == DEFAULT_POLICY
    assert policies.for_alert("icu", "high") == DEFAULT_POLICY


def test_a_unit_sets_its_own_policy_for_one_priority() -> None:
    text = """
version: 1
units:
  icu:
    high:
      levels:
        - {after_s: 0, notify: [assignee]}
        - {after_s: 30, notify: ["role:charge_nurse", "group:attending"]}
      repeat_s: 20
"""
    policies = load_policies(text)
    icu = policies.for_alert("icu", "high")
    assert [lv.after_ms for lv in icu.levels] == [0, 30_000]
    assert icu.levels[1].targets == (Target("role", "charge_nurse"), Target("group", "attending"))
    assert icu.repeat_ms == 20_000
    assert policies.for_alert("icu", "low") == DEFAULT_POLICY


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("version: 2", "version"),
        ("version: 1\ndefault: {levels: []}", "default"),
        ("version: 1\ndefault: {levels: [{after_s: 0, notify: [pager]}]}", "target"),
        ("version: 1\nunits: {icu: {urgent: {levels: [{notify: [assignee]}]}}}", "units.icu.urgent"),
        (
            "version: 1\ndefault: {levels: [{after_s: 60, notify: [assignee]},"
            " {after_s: 0, notify: [assignee]}]}",
            "levels[1]",
        ),
    ],
)
def test_errors_name_what_is_wrong(text: str, where: str) -> None:
    with pytest.raises(EscalationConfigError) as e:
        load_policies(text, "esc.yaml")
    assert "esc.yaml" in str(e.value)
    assert where in str(e.value) or where in ("version", "target")
