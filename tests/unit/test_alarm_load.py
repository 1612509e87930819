"""bench/alarm_load.py's core on six minutes of the committed trace: the figures' shape, and that the shipped
rules (on-delays, hysteresis) alarm less than naive thresholds on the same readings."""

from __future__ import annotations

import pytest

from bench.alarm_load import NAIVE_RULES, SHIPPED_RULES, replay
from devices.trace import DEFAULT_PATH

committed = pytest.mark.skipif(not DEFAULT_PATH.exists(), reason="bench/data trace not recorded")


@committed
def test_shipped_rules_alarm_less_than_naive_thresholds_on_the_same_trace() -> None:
    # The first 7 beds play the 7 monitor scenarios once each; every scenario starts in the first minutes.
    result = replay(DEFAULT_PATH, {"shipped": SHIPPED_RULES, "naive": NAIVE_RULES}, hours=0.1, beds=7)

    assert result["beds"] == 7
    assert result["hours"] == 0.1
    assert result["deadletters"] == {}
    assert result["ticks"] == 360
    assert {s for s in result["scenarios"] if ":" not in s} == {
        "stable", "sepsis", "desaturation", "bradycardia", "artifact", "lead_off", "offline",
    }  # fmt: skip
    for name in ("shipped", "naive"):
        s = result[name]
        assert s["alarms"] == sum(s["by_priority"].values()) == sum(s["by_kind"].values())
        assert s["alarms"] == sum(s["by_condition"].values()) == sum(s["by_scenario"].values())
        assert set(s["per_bed_day"]) >= {"alarms", "high", "medium", "low", "pages", "reannounced"}
        assert s["announcements"] == s["alarms"] + sum(s["reannounced"].values())
        assert s["alarms_per_bed_day"] == pytest.approx(s["alarms"] / (7 * 0.1 / 24), abs=0.01)
        assert s["pages"] > 0 and s["acks"] > 0  # a staffed ward is paged, and the nurse acknowledges
        assert s["by_kind"]["technical"] > 0  # lead-off, offline, pump occlusion, artifact
    shipped, naive = result["shipped"], result["naive"]
    assert shipped["alarms"] < naive["alarms"]
    assert shipped["announcements"] < naive["announcements"]
    assert shipped["by_kind"]["physiological"] < naive["by_kind"]["physiological"]
    assert shipped["by_kind"]["technical"] == naive["by_kind"]["technical"]  # the rules change none of them
    assert result["ratio"] == round(naive["alarms"] / shipped["alarms"], 2) > 1
