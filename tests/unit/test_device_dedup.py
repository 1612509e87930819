"""The device stage's duplicate window: ids kept at least the contract's 10 minutes, and bounded."""

from __future__ import annotations

from collections.abc import Sequence

from streams.effects import Count, Effect
from streams.processors.device import DEDUP_PRUNE_SLACK_MS, DEDUP_WINDOW_MS, DeviceStage, DeviceState
from streams.schemas import Meta, Observations, ObsItem

T0 = 1_795_428_000_000


def obs(seq: int, rx: int) -> Observations:
    meta = Meta(
        f"mon/obs/b/{seq}", "mon", "obs", "mqtt", rx, rx, "default", "icu", "b1", "P1", "b", seq, "monitor"
    )
    return Observations(meta, (ObsItem("hr", 70.0, "/min", rx),))


def duplicate(effects: Sequence[Effect]) -> bool:
    return any(isinstance(e, Count) and e.metric == "vigil_duplicates_total" for e in effects)


def test_a_redelivery_within_ten_minutes_is_dropped_and_the_window_stays_bounded() -> None:
    stage = DeviceStage()
    state: DeviceState | None = None
    for i in range(1, 20 * 60 + 1):  # 20 minutes at one message a second
        state, effects = stage.step(state, obs(i, T0 + i * 1000))
        assert not duplicate(effects)
    assert state is not None
    last_rx = T0 + 20 * 60 * 1000
    # Everything received in the last 10 minutes is still known...
    state, effects = stage.step(state, obs(20 * 60 - 599, last_rx + 1))
    assert duplicate(effects)
    # ...and no more than the window plus the pruning slack is kept.
    assert state is not None
    assert len(state.seen) <= (DEDUP_WINDOW_MS + DEDUP_PRUNE_SLACK_MS) // 1000 + 2
