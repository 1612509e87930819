"""The alarm lifecycle: states, versions, re-alarm, worsening, latching, silence, inhibition, staleness,
backfill, transfer. Time is injected through the inputs; nothing sleeps. Tests named for a design.md
alarm-safety rule say so in their name."""

from __future__ import annotations

from alerting.lifecycle import (
    SILENCE_MAX_MS,
    Ack,
    AlarmBook,
    Change,
    DataStopped,
    Discharged,
    Inhibit,
    LifecycleConfig,
    LifecycleEvent,
    Observed,
    Priority,
    Resolve,
    Silence,
    Uninhibit,
    decode_book,
    encode_book,
    is_pageable,
    step,
)
from streams.schemas import Alert, Tick

T0 = 1_795_428_000_000
S = 1_000
MIN = 60_000


def obs(
    condition: str = "spo2_low",
    active: bool = True,
    at: int = T0,
    *,
    value: float | None = None,
    priority: Priority = "high",
    backfill: bool = False,
    patient: str = "P1",
) -> Observed:
    return Observed(
        condition, active, at, priority, "S1", patient, "B1", "U1", value=value, backfill=backfill
    )


def run(events: list[LifecycleEvent], book: AlarmBook | None = None) -> tuple[AlarmBook, list[Change]]:
    changes: list[Change] = []
    state = book
    for event in events:
        state, out = step(state, event)
        changes.extend(out)
    assert state is not None
    return state, changes


def alert_of(book: AlarmBook, condition: str = "spo2_low") -> Alert:
    return book.alarms[condition].alert


def test_condition_true_raises_active_unack_version_1_with_derived_id() -> None:
    book, changes = run([obs(value=85)])
    alert = alert_of(book)
    assert (alert.status, alert.version, alert.raised_at) == ("active_unack", 1, T0)
    assert alert.id == f"P1~spo2_low~{T0}"
    assert changes[0].transition.from_status is None
    assert changes[0].transition.reason == "raised"
    assert is_pageable(alert)


def test_repeated_readings_never_reset_anything() -> None:
    book, changes = run([obs(value=85, at=T0 + i * S) for i in range(30)])
    alert = alert_of(book)
    assert len(changes) == 1
    assert (alert.version, alert.raised_at, alert.updated_at) == (1, T0, T0)


def test_ack_then_condition_false_closes() -> None:
    book, _ = run([obs(value=85)])
    aid = alert_of(book).id
    book, changes = run([Ack(aid, "nurse1", T0 + 5 * S), obs(active=False, at=T0 + 10 * S)], book)
    assert [c.transition.to_status for c in changes] == ["active_ack", "closed"]
    assert [c.alert.version for c in changes] == [2, 3]
    assert changes[0].transition.by == "nurse1"
    assert "spo2_low" not in book.alarms


def test_high_priority_latches_when_condition_clears_unacknowledged() -> None:
    book, changes = run([obs(value=85), obs(active=False, at=T0 + 10 * S)])
    assert alert_of(book).status == "cleared_unack"
    book, changes = run([Ack(alert_of(book).id, "nurse1", T0 + 20 * S)], book)
    assert changes[0].transition.to_status == "closed"
    assert book.alarms == {}


def test_medium_priority_does_not_latch_by_default() -> None:
    book, changes = run([obs(priority="medium"), obs(active=False, priority="medium", at=T0 + S)])
    assert changes[-1].transition.to_status == "closed"
    assert book.alarms == {}


def test_latching_is_configurable() -> None:
    config = LifecycleConfig(latching={"high": False, "medium": True, "low": True})
    book, _ = step(None, obs(priority="medium"), config)
    book, changes = step(book, obs(active=False, priority="medium", at=T0 + S), config)
    assert changes[0].transition.to_status == "cleared_unack"


def test_latched_alarm_recurring_becomes_active_unack_same_id() -> None:
    book, _ = run([obs(), obs(active=False, at=T0 + S)])
    aid = alert_of(book).id
    book, changes = run([obs(at=T0 + 2 * S)], book)
    assert (alert_of(book).id, alert_of(book).status) == (aid, "active_unack")
    assert changes[0].transition.reason == "recurred"


def test_acknowledged_alarm_whose_condition_persists_realarms_after_set_time_high_5_min() -> None:
    book, _ = run([obs(value=85)])
    aid = alert_of(book).id
    acked = T0 + 10 * S
    book, _ = run([Ack(aid, "nurse1", acked), obs(value=85, at=acked + MIN)], book)
    book, changes = run([Tick(acked + 5 * MIN - 1)], book)
    assert changes == [] and alert_of(book).status == "active_ack"
    book, changes = run([Tick(acked + 5 * MIN)], book)
    assert changes[0].transition.to_status == "active_unack"
    assert changes[0].transition.reason == "persisting"
    assert alert_of(book).version == 3
    assert is_pageable(alert_of(book))


def test_acknowledged_persisting_medium_alarm_realarms_after_15_min() -> None:
    book, _ = run([obs(priority="medium")])
    book, _ = run([Ack(alert_of(book).id, "n", T0)], book)
    book, changes = run([Tick(T0 + 15 * MIN - 1)], book)
    assert changes == []
    book, changes = run([Tick(T0 + 15 * MIN)], book)
    assert alert_of(book).status == "active_unack"


def test_worsening_reannounces_spo2_86_to_78() -> None:
    book, _ = run([obs(value=86)])
    book, _ = run([Ack(alert_of(book).id, "nurse1", T0 + S)], book)
    book, changes = run([obs(value=84, at=T0 + 2 * S)], book)
    assert changes == []  # within the step: no re-announce
    book, changes = run([obs(value=78, at=T0 + 3 * S)], book)
    assert changes[0].transition.to_status == "active_unack"
    assert changes[0].transition.reason == "worsened"
    assert alert_of(book).version == 3


def test_worsening_while_unacknowledged_bumps_version_without_new_alarm() -> None:
    book, _ = run([obs(value=86)])
    book, changes = run([obs(value=80, at=T0 + S)], book)
    assert changes[0].alert.id == alert_of(book).id
    assert (changes[0].transition.from_status, changes[0].transition.to_status) == (
        "active_unack",
        "active_unack",
    )


def test_higher_priority_is_a_worsening() -> None:
    book, _ = run([obs("news2", priority="medium", value=5)])
    book, _ = run([Ack(alert_of(book, "news2").id, "n", T0 + S)], book)
    book, _ = run([obs("news2", priority="high", value=6, at=T0 + 2 * S)], book)
    assert alert_of(book, "news2").priority == "high"
    assert alert_of(book, "news2").status == "active_unack"


def test_hr_0_and_rr_0_are_real_readings_and_worsenings() -> None:
    for condition, first in (("hr_low", 30), ("rr_low", 6)):
        book, _ = run([obs(condition, value=first)])
        book, _ = run([Ack(alert_of(book, condition).id, "n", T0 + S)], book)
        book, changes = run([obs(condition, value=0, at=T0 + 2 * S)], book)
        assert changes[0].transition.reason == "worsened"
        # Raised at 0, the value is kept (0 is not "no value").
        book, _ = run([obs(condition, value=0)])
        assert book.alarms[condition].announced_value == 0


def test_priority_only_worsening_keeps_the_announced_value() -> None:
    book, _ = run([obs("spo2_low", priority="medium", value=86)])
    book, _ = run([obs("spo2_low", priority="high", at=T0 + S)], book)
    assert book.alarms["spo2_low"].announced_value == 86


def test_silence_lasts_at_most_two_minutes() -> None:
    book, _ = run([obs()])
    aid = alert_of(book).id
    book, changes = run([Silence(aid, "nurse1", T0 + S, duration_ms=10 * MIN)], book)
    assert alert_of(book).silenced_until == T0 + S + SILENCE_MAX_MS == T0 + S + 2 * MIN
    assert changes[0].transition.reason == "silenced"
    assert changes[0].transition.by == "nurse1"
    assert alert_of(book).status == "active_unack"  # silence is not an acknowledgement
    book, changes = run([Tick(T0 + S + 2 * MIN - 1)], book)
    assert changes == []
    book, changes = run([Tick(T0 + S + 2 * MIN)], book)
    assert changes[0].transition.reason == "silence_expired"
    assert alert_of(book).silenced_until is None


def test_alarm_is_never_cleared_because_data_stopped_it_is_marked_data_stale() -> None:
    book, _ = run([obs(value=85)])
    book, changes = run([DataStopped(T0 + MIN), Tick(T0 + 60 * MIN)], book)
    alert = alert_of(book)
    assert (alert.status, alert.data_stale) == ("active_unack", True)
    assert changes[0].transition.reason == "data_stopped"
    book, changes = run([DataStopped(T0 + 2 * MIN)], book)
    assert changes == []  # already stale: no new version
    book, changes = run([obs(value=85, at=T0 + 3 * MIN)], book)
    assert alert_of(book).data_stale is False
    assert changes[0].transition.reason == "data_resumed"


def test_device_offline_raises_a_technical_alarm_and_keeps_physiological_ones() -> None:
    book, _ = run([obs("spo2_low", value=85)])
    book, _ = run([obs("device_offline", at=T0 + MIN, priority="medium"), DataStopped(T0 + MIN)], book)
    assert alert_of(book, "device_offline").status == "active_unack"
    assert alert_of(book, "spo2_low").status == "active_unack"
    assert alert_of(book, "spo2_low").data_stale


def test_probe_off_inhibits_only_its_sensor_parameters_not_ecg_heart_rate() -> None:
    book, _ = run(
        [
            obs("spo2_low", value=85),
            obs("hr_high", value=150),
            obs("probe_off", at=T0 + S, priority="low"),
            Inhibit("probe_off:ox-1", ("spo2_low",), T0 + S),
        ]
    )
    assert alert_of(book, "probe_off").status == "active_unack"
    spo2 = alert_of(book, "spo2_low")
    assert spo2.data_stale and spo2.detail["inhibited_by"] == ["probe_off:ox-1"]
    assert spo2.status == "active_unack"  # inhibited values are not the patient's: never a clearing
    hr = alert_of(book, "hr_high")
    assert not hr.data_stale and "inhibited_by" not in hr.detail
    # An inhibited parameter's readings change nothing; ECG heart rate still works.
    book, changes = run([obs("spo2_low", False, T0 + 2 * S), obs("hr_high", False, T0 + 2 * S)], book)
    assert alert_of(book, "spo2_low").status == "active_unack"
    assert changes[0].alert.condition == "hr_high"


def test_lead_off_before_any_alarm_keeps_its_parameters_from_raising() -> None:
    book, _ = run([Inhibit("lead_off:ecg-1", ("hr_high", "hr_low"), T0), obs("hr_high", at=T0 + S)])
    assert "hr_high" not in book.alarms
    book, _ = run([Uninhibit("lead_off:ecg-1", ("hr_high", "hr_low"), T0 + 2 * S)], book)
    assert book.inhibited == {}
    book, _ = run([obs("hr_high", at=T0 + 3 * S)], book)
    assert alert_of(book, "hr_high").status == "active_unack"


def test_two_sources_inhibit_until_both_are_gone() -> None:
    book, _ = run(
        [
            obs("spo2_low"),
            Inhibit("probe_off:ox-1", ("spo2_low",), T0 + S),
            Inhibit("device_offline:mon-1", ("spo2_low",), T0 + S),
            Uninhibit("probe_off:ox-1", ("spo2_low",), T0 + 2 * S),
        ]
    )
    assert alert_of(book).detail["inhibited_by"] == ["device_offline:mon-1"]
    book, changes = run([Uninhibit("device_offline:mon-1", ("spo2_low",), T0 + 3 * S)], book)
    assert "inhibited_by" not in alert_of(book).detail
    assert changes[0].transition.reason == "uninhibited"


def test_backfilled_data_raises_retrospective_alarms_never_paged_as_new() -> None:
    book, changes = run([obs(value=85, at=T0 - 30 * MIN, backfill=True)])
    alert = alert_of(book)
    assert alert.retrospective and alert.status == "active_unack"
    assert changes[0].transition.reason == "raised_retrospective"
    assert not is_pageable(alert)
    # Live data confirming it makes it a live alarm, which pages.
    book, changes = run([obs(value=85, at=T0)], book)
    assert not alert_of(book).retrospective
    assert is_pageable(alert_of(book))
    assert "confirmed_live" in changes[0].transition.reason


def test_backfilled_false_reading_never_clears_a_live_alarm() -> None:
    book, _ = run([obs(value=85, at=T0)])
    book, changes = run([obs(active=False, at=T0 + S, backfill=True)], book)
    assert changes == [] and alert_of(book).status == "active_unack"


def test_late_reading_never_rewrites_the_present() -> None:
    book, _ = run([obs(at=T0)])
    book, changes = run([obs(active=False, at=T0 - S)], book)
    assert changes == [] and alert_of(book).status == "active_unack"


def test_resolve_closes_only_cleared_alarms() -> None:
    book, _ = run([obs()])
    aid = alert_of(book).id
    book, changes = run([Resolve(aid, "nurse1", T0 + S)], book)
    assert changes == [] and alert_of(book).status == "active_unack"
    book, changes = run([obs(active=False, at=T0 + 2 * S), Resolve(aid, "nurse1", T0 + 3 * S)], book)
    assert changes[-1].transition.to_status == "closed"
    assert changes[-1].transition.reason == "resolved"


def test_patient_transfer_closes_every_alarm_with_reason() -> None:
    book, _ = run([obs("spo2_low"), obs("hr_high"), Inhibit("probe_off:ox-1", ("rr_low",), T0)])
    book, changes = run([Discharged("transfer", T0 + MIN, by="adt")], book)
    assert {c.transition.to_status for c in changes} == {"closed"}
    assert {c.transition.reason for c in changes} == {"transfer"}
    assert len(changes) == 2
    assert book == AlarmBook()


def test_nothing_leaks_between_patients_across_a_transfer() -> None:
    book, _ = run([obs(value=85, patient="P1"), Inhibit("lead_off:ecg-1", ("hr_high",), T0)])
    book, _ = run([Discharged("transfer", T0 + MIN)], book)
    # The bed's next patient: the same condition is a new alarm with a new id, and nothing is inhibited.
    book, _ = run([obs(value=85, patient="P2", at=T0 + 2 * MIN), obs("hr_high", at=T0 + 2 * MIN)], book)
    alert = alert_of(book)
    assert (alert.patient_id, alert.version) == ("P2", 1)
    assert alert.id.startswith("P2~")
    assert "hr_high" in book.alarms


def test_ack_is_idempotent_and_ignores_unknown_ids() -> None:
    book, _ = run([obs()])
    aid = alert_of(book).id
    book, first = run([Ack(aid, "n", T0 + S)], book)
    book, again = run([Ack(aid, "n", T0 + 2 * S), Ack("P9/x/1", "n", T0 + 2 * S)], book)
    assert len(first) == 1 and again == []


def test_every_change_increases_version_by_one() -> None:
    _, changes = run(
        [
            obs(value=86),
            Silence(f"P1~spo2_low~{T0}", "n", T0 + S),
            Ack(f"P1~spo2_low~{T0}", "n", T0 + 2 * S),
            obs(value=78, at=T0 + 3 * S),
            DataStopped(T0 + 4 * S),
            obs(active=False, at=T0 + 5 * S),
        ]
    )
    assert [c.alert.version for c in changes] == list(range(1, len(changes) + 1))
    assert all(c.transition.version == c.alert.version for c in changes)


def test_book_round_trips_as_plain_data() -> None:
    book, _ = run(
        [
            obs(value=85),
            Ack(f"P1~spo2_low~{T0}", "n", T0 + S),
            Inhibit("probe_off:ox-1", ("spo2_low",), T0 + 2 * S),
        ]
    )
    restored = decode_book(encode_book(book))
    assert restored == book
    # The restored book keeps its timers: the re-alarm still fires at ack + 5 min.
    _, changes = step(restored, Tick(T0 + S + 5 * MIN))
    assert changes[0].transition.reason == "persisting"


def test_same_inputs_same_outputs() -> None:
    events: list[LifecycleEvent] = [obs(value=86), obs(value=70, at=T0 + S), Tick(T0 + 10 * MIN)]
    assert run(events) == run(events)
