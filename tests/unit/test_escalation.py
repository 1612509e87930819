"""Escalation: timing edges, no black holes, the last level repeating, ack and silence, idempotent page keys,
and a restart mid-escalation. Time is injected; nothing sleeps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from alerting import lifecycle
from alerting.escalation import (
    AlertChanged,
    Due,
    EscalationEffect,
    EscalationState,
    Facts,
    Level,
    Page,
    Policies,
    Policy,
    Skipped,
    Target,
    decode_state,
    encode_state,
    step,
)
from streams.schemas import Alert, Tick

T0 = 1_795_428_000_000
S = 1_000

Effects = tuple[EscalationEffect, ...]
FACTS = Facts(
    assignee="nurse_a",
    roles={"charge_nurse": ("charge_b",)},
    groups={"rapid_response": ("rrt_c", "rrt_d")},
    connected=frozenset({"nurse_a", "charge_b", "rrt_c", "rrt_d"}),
)


def alert(version: int = 1, status: str = "active_unack", **fields: object) -> Alert:
    base = Alert(
        id=f"P1~spo2_low~{T0}",
        version=version,
        patient_id="P1",
        bed_id="B1",
        site_id="S1",
        unit_id="U1",
        condition="spo2_low",
        priority="high",
        status=status,
        raised_at=T0,
        updated_at=T0,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def started(facts: Facts = FACTS) -> tuple[EscalationState, tuple[EscalationEffect, ...]]:
    return step(None, AlertChanged(alert(), facts), T0)


def tick(state: EscalationState, at: int, facts: Facts = FACTS) -> tuple[EscalationState, Effects]:
    return step(state, Due(facts), at)


def pages(effects: Sequence[EscalationEffect]) -> list[tuple[int, tuple[str, ...]]]:
    return [(e.level, e.recipients) for e in effects if isinstance(e, Page)]


def test_primary_nurse_is_paged_at_once() -> None:
    _, effects = started()
    assert pages(effects) == [(0, ("nurse_a",))]
    assert effects[0].key == f"P1~spo2_low~{T0}/0"


def test_charge_nurse_not_at_59_999_s_but_at_60_s() -> None:
    state, _ = started()
    state, effects = tick(state, T0 + 59_999)
    assert effects == ()
    state, effects = tick(state, T0 + 60_000)
    assert pages(effects) == [(1, ("charge_b",))]


def test_rapid_response_not_at_119_999_s_but_at_120_s() -> None:
    state, _ = started()
    state, _ = tick(state, T0 + 60_000)
    state, effects = tick(state, T0 + 119_999)
    assert effects == ()
    state, effects = tick(state, T0 + 120_000)
    assert pages(effects) == [(2, ("rrt_c", "rrt_d"))]


def test_no_black_holes_last_level_repeats_until_acknowledged() -> None:
    state, _ = started()
    state, _ = tick(state, T0 + 120_000)  # a late tick catches up: levels 1 and 2
    steps = []
    for at in range(T0 + 121_000, T0 + 10 * 60_000, 1_000):
        state, effects = tick(state, at)
        steps += [(e.step, e.level, e.at) for e in effects]
    assert steps[0] == (3, 2, T0 + 180_000)
    assert [s[2] - T0 for s in steps] == list(range(180_000, 10 * 60_000, 60_000))
    state, _ = step(state, AlertChanged(alert(2, "active_ack"), FACTS), T0 + 10 * 60_000)
    state, effects = tick(state, T0 + 60 * 60_000)
    assert effects == ()


def test_no_black_holes_no_assignee_escalates_at_once() -> None:
    _, effects = started(replace(FACTS, assignee=None))
    assert isinstance(effects[0], Skipped) and effects[0].reason == "no_assignee"
    assert pages(effects) == [(1, ("charge_b",))]
    assert [e.step for e in effects] == [0, 1]


def test_no_black_holes_no_connected_client_escalates_at_once() -> None:
    _, effects = started(replace(FACTS, connected=frozenset({"charge_b"})))
    assert isinstance(effects[0], Skipped) and effects[0].reason == "not_connected"
    assert pages(effects) == [(1, ("charge_b",))]


def test_no_black_holes_empty_role_escalates_at_once() -> None:
    facts = replace(FACTS, roles={"charge_nurse": ()})
    state, _ = started(facts)
    state, effects = tick(state, T0 + 60_000, facts)
    assert isinstance(effects[0], Skipped) and effects[0].reason == "empty_role"
    assert pages(effects) == [(2, ("rrt_c", "rrt_d"))]


def test_no_black_holes_empty_last_level_pages_everyone_reachable() -> None:
    facts = replace(FACTS, groups={})
    state, _ = started(facts)
    state, effects = tick(state, T0 + 120_000, facts)
    assert pages(effects)[-1] == (2, ("nurse_a", "charge_b"))


def test_nobody_reachable_at_all_is_reported_every_interval() -> None:
    facts = Facts()
    state, effects = started(facts)
    assert [type(e) for e in effects] == [Skipped, Skipped, Skipped]
    state, effects = tick(state, T0 + 60_000, facts)
    assert [type(e) for e in effects] == [Skipped]
    # Someone connects: the next repeat pages them.
    state, effects = tick(state, T0 + 120_000)
    assert pages(effects) == [(2, ("rrt_c", "rrt_d"))]


def test_repeated_readings_never_reset_an_escalation_timer() -> None:
    state, _ = started()
    for i in range(1, 60):
        # The same alert again and again (redelivered, or a new version from a worsening): no reset.
        state, effects = step(state, AlertChanged(alert(1 + i % 3), FACTS), T0 + i * S)
        assert pages(effects) == []
    state, effects = tick(state, T0 + 60_000)
    assert pages(effects) == [(1, ("charge_b",))]


def test_acknowledgement_stops_escalation() -> None:
    state, _ = started()
    state, _ = step(state, AlertChanged(alert(2, "active_ack"), FACTS), T0 + 30 * S)
    state, effects = tick(state, T0 + 60 * 60_000)
    assert effects == ()


def test_silence_never_stops_escalation() -> None:
    state, _ = started()
    silenced = alert(2, silenced_until=T0 + 10 * S + 120_000)
    state, effects = step(state, AlertChanged(silenced, FACTS), T0 + 10 * S)
    assert effects == ()
    state, effects = tick(state, T0 + 60_000)
    assert pages(effects) == [(1, ("charge_b",))]


def test_latched_alarm_cleared_unacknowledged_keeps_escalating() -> None:
    state, _ = started()
    state, _ = step(state, AlertChanged(alert(2, "cleared_unack"), FACTS), T0 + 10 * S)
    state, effects = tick(state, T0 + 60_000)
    assert pages(effects) == [(1, ("charge_b",))]


def test_close_forgets_the_alert() -> None:
    state, _ = started()
    state, _ = step(state, AlertChanged(alert(2, "closed"), FACTS), T0 + S)
    assert state.running == {}


def test_reannounce_after_ack_starts_a_new_cycle_with_new_page_keys() -> None:
    state, first = started()
    state, _ = step(state, AlertChanged(alert(2, "active_ack"), FACTS), T0 + 10 * S)
    state, again = step(state, AlertChanged(alert(3), FACTS), T0 + 310 * S)
    assert pages(again) == [(0, ("nurse_a",))]
    assert again[0].key != first[0].key
    state, effects = tick(state, T0 + 310 * S + 60_000)
    assert pages(effects) == [(1, ("charge_b",))]


def test_redelivered_old_version_after_ack_does_not_restart() -> None:
    state, _ = started()
    state, _ = step(state, AlertChanged(alert(2, "active_ack"), FACTS), T0 + 10 * S)
    state, effects = step(state, AlertChanged(alert(1), FACTS), T0 + 11 * S)
    assert effects == ()


def test_backfilled_data_raises_retrospective_alarms_never_paged_as_new() -> None:
    state, effects = step(None, AlertChanged(alert(retrospective=True), FACTS), T0)
    assert effects == () and state.running == {}


def test_retrospective_alarm_confirmed_by_live_data_escalates() -> None:
    state, _ = step(None, AlertChanged(alert(retrospective=True), FACTS), T0)
    state, effects = step(state, AlertChanged(alert(2), FACTS), T0 + S)
    assert pages(effects) == [(0, ("nurse_a",))]


def test_restart_mid_escalation_loses_nothing() -> None:
    state, _ = started()
    state, _ = tick(state, T0 + 60_000)
    restored = decode_state(encode_state(state))
    assert restored == state
    _, effects = tick(restored, T0 + 120_000)
    assert pages(effects) == [(2, ("rrt_c", "rrt_d"))]
    assert effects[0].key == f"P1~spo2_low~{T0}/2"


def test_policy_per_unit_and_priority() -> None:
    slow = Policy((Level(0, (Target("assignee"),)), Level(300_000, (Target("role", "charge_nurse"),))))
    policies = Policies(by_unit={("U1", "low"): slow})
    state, _ = step(None, AlertChanged(alert(priority="low"), FACTS), T0, policies)
    state, effects = step(state, Due(FACTS), T0 + 299_999, policies)
    assert effects == ()
    state, effects = step(state, Due(FACTS), T0 + 300_000, policies)
    assert pages(effects) == [(1, ("charge_b",))]


def test_with_the_lifecycle_end_to_end() -> None:
    """What the clinical processor will do: lifecycle changes feed escalation; a Tick feeds both."""
    book, changes = lifecycle.step(
        None, lifecycle.Observed("spo2_low", True, T0, "high", "S1", "P1", "B1", "U1", value=85)
    )
    state: EscalationState | None = None
    sent: list[EscalationEffect] = []
    for change in changes:
        state, out = step(state, AlertChanged(change.alert, FACTS), T0)
        sent += out
    aid = changes[0].alert.id
    book, changes = lifecycle.step(book, lifecycle.Silence(aid, "nurse_a", T0 + S))
    for change in changes:
        state, out = step(state, AlertChanged(change.alert, FACTS), T0 + S)
        sent += out
    book, changes = lifecycle.step(book, Tick(T0 + 60_000))
    assert state is not None
    state, out = step(state, Due(FACTS), T0 + 60_000)
    sent += out
    assert pages(sent) == [(0, ("nurse_a",)), (1, ("charge_b",))]
    book, changes = lifecycle.step(book, lifecycle.Ack(aid, "charge_b", T0 + 70 * S))
    state, out = step(state, AlertChanged(changes[0].alert, FACTS), T0 + 70 * S)
    state, out = step(state, Due(FACTS), T0 + 600 * S)
    assert out == ()
