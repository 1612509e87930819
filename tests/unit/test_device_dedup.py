"""The device stage's duplicate window: ids kept at least the contract's 10 minutes, and bounded."""

from __future__ import annotations

import random
from collections.abc import Sequence

from streams.effects import Count, Effect
from streams.processors.device import (
    DEDUP_PRUNE_SLACK_MS,
    DEDUP_WINDOW_MS,
    MAX_SEQ_RUNS,
    DeviceStage,
    DeviceState,
)
from streams.schemas import Meta, Observations, ObsItem

T0 = 1_795_428_000_000


def obs(seq: int, rx: int, boot: str = "b") -> Observations:
    meta = Meta(
        f"mon/obs/{boot}/{seq}", "mon", "obs", "mqtt", rx, rx, "default", "icu", "b1", "P1", boot, seq,
        "monitor",
    )  # fmt: skip
    return Observations(meta, (ObsItem("hr", 70.0, "/min", rx),))


def by_id(msg_id: str, rx: int) -> Observations:
    meta = Meta(f"mon/obs/id/{msg_id}", "mon", "obs", "mqtt", rx, rx, "default", "icu", "b1", "P1",
                None, None, "monitor")  # fmt: skip
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
    # ...and a device sending in order is remembered as one run of seqs, however long it has run.
    assert state is not None
    assert state.seqs == {"obs/b": [[1, 1200, last_rx]]} and state.seen == {}
    # Within a boot a seq never comes back (contract section 3): an old one is a duplicate, not late.
    state, effects = stage.step(state, obs(3, last_rx + 2))
    assert duplicate(effects)


def test_messages_with_an_id_are_remembered_the_window_and_the_state_stays_bounded() -> None:
    stage = DeviceStage()
    state: DeviceState | None = None
    for i in range(1, 20 * 60 + 1):
        state, effects = stage.step(state, by_id(f"m{i}", T0 + i * 1000))
        assert not duplicate(effects)
    assert state is not None
    last_rx = T0 + 20 * 60 * 1000
    state, effects = stage.step(state, by_id(f"m{20 * 60 - 599}", last_rx + 1))
    assert duplicate(effects)
    state, effects = stage.step(state, by_id("m5", last_rx + 2))  # 20 minutes old: forgotten
    assert not duplicate(effects)
    assert state is not None
    assert len(state.seen) <= (DEDUP_WINDOW_MS + DEDUP_PRUNE_SLACK_MS) // 1000 + 2


def test_out_of_order_seqs_fill_the_gaps_and_every_redelivery_is_caught() -> None:
    """Any order of a device's seqs, each delivered up to three times: each is new exactly once."""
    rng = random.Random(7)
    stage = DeviceStage()
    state: DeviceState | None = None
    seqs = list(range(500)) * 3
    rng.shuffle(seqs)
    new: list[int] = []
    for n, seq in enumerate(seqs):
        state, effects = stage.step(state, obs(seq, T0 + n))
        if not duplicate(effects):
            new.append(seq)
    assert sorted(new) == list(range(500))
    assert state is not None and [r[:2] for r in state.seqs["obs/b"]] == [[0, 499]]


def test_boots_are_apart_and_an_idle_boot_is_forgotten_after_the_window() -> None:
    stage = DeviceStage()
    state, _ = stage.step(None, obs(1, T0, boot="b1"))
    state, effects = stage.step(state, obs(1, T0 + 1000, boot="b2"))  # same seq, new boot: a new message
    assert not duplicate(effects)
    later = T0 + DEDUP_WINDOW_MS + DEDUP_PRUNE_SLACK_MS + 5_000
    state, _ = stage.step(state, obs(2, later, boot="b2"))
    assert state is not None and set(state.seqs) == {"obs/b2"}


def test_a_device_with_endless_gaps_keeps_a_bounded_number_of_runs() -> None:
    stage = DeviceStage()
    state: DeviceState | None = None
    for i in range(3 * MAX_SEQ_RUNS):
        state, _ = stage.step(state, obs(2 * i, T0 + i))  # every other seq: no run ever joins
    assert state is not None and len(state.seqs["obs/b"]) == MAX_SEQ_RUNS
    state, effects = stage.step(state, obs(2 * (3 * MAX_SEQ_RUNS - 1), T0 + 10_000))  # a recent one
    assert duplicate(effects)


def test_state_round_trips_through_its_encoding() -> None:
    stage = DeviceStage()
    state: DeviceState | None = None
    for seq in (1, 2, 3, 7, 8):
        state, _ = stage.step(state, obs(seq, T0 + seq))
    state, _ = stage.step(state, by_id("x", T0 + 10))
    assert state is not None
    again = stage.decode_state(stage.encode_state(state))
    assert again.seqs == state.seqs and again.seen == state.seen
    _, effects = stage.step(again, obs(7, T0 + 20))
    assert duplicate(effects)
