"""The clinical stage, keyed by patient (else bed): rules, NEWS2, technical alarms, lifecycle, escalation.

One processor of the design's shape, `step(state, event) -> (state, effects)`, hosted unchanged by both
runtimes. Time comes only from its inputs: a reading's device time for rule verdicts, the gateway's
received time for technical alarms and escalation, a clinician's action time, and `Tick`s for timers
(`due` tells the host when a key needs one). Effects: alert versions (records, audit, live push), pages,
NEWS2 results. docs/ALARMS.md describes the whole flow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from alerting import escalation, lifecycle, news2
from alerting.facts import FactsSource
from alerting.lifecycle import AlarmBook, Change, LifecycleConfig, Observed
from alerting.rules import PatientOverride, PatientRulesState, Ruleset, RuleState, effective_rules, evaluate
from alerting.technical import (
    ARTIFACT_RUN,
    ARTIFACT_WINDOW_MS,
    TECHNICAL,
    pump_conditions,
    status_conditions,
)
from streams import topics
from streams.codes import BY_REF
from streams.effects import AlertVersion, Count, Effect, Emit, RecordAlerts, RecordNews2, RecordPages
from streams.schemas import (
    FLAG_ARTIFACT,
    FLAG_BACKFILL,
    FLAG_INHIBITED,
    AdmissionChange,
    Alert,
    AlertCommand,
    AlertPage,
    DeviceLiveness,
    DeviceStatus,
    Event,
    LiveUpdate,
    Meta,
    Observations,
    ObsItem,
    PatientSettings,
    PumpStatus,
    Tick,
)

RECENT_MS = 10 * 60_000  # applied command/admission/liveness ids are remembered this long (redelivery)
# A NEWS2 response must hold this long (device time) before it alerts: a continuously monitored patient's
# score moves with every transient reading, while the RCP chart scores an observation round. The rules'
# own fast alarms (SpO2 < 85 for 10 s, and the floor) are not delayed by it.
NEWS2_HOLD_MS = 60_000
NEWS2_CODES = frozenset(("hr", "pr", "spo2", "rr", "temp", "nibp_sys", "o2_supplement", "acvpu"))
_ACVPU = "ACVPU"


@dataclass(slots=True)
class ClinicalState:
    """Everything the clinical stage keeps of one patient (or of a bed without one)."""

    site_id: str = ""
    unit_id: str | None = None
    bed_id: str | None = None
    patient_id: str | None = None
    rules: PatientRulesState = field(default_factory=PatientRulesState)
    news2_in: dict[str, tuple[float | str, int]] = field(default_factory=dict)  # alias -> (value, ts)
    news2_sig: str = ""  # what the last NEWS2 sent said: a change sends a new one
    news2_at: int = 0  # when NEWS2 was last scored
    news2_pending: tuple[str, int, float] | None = None  # (priority, since, value) of a response holding
    news2_scale: int = 1
    news2_suppressed: bool = False
    overrides: tuple[PatientOverride, ...] = ()
    book: AlarmBook = field(default_factory=AlarmBook)
    esc: escalation.EscalationState = field(default_factory=escalation.EscalationState)
    tech: dict[str, list[str]] = field(default_factory=dict)  # "status:dev" / "pump:dev" -> conditions
    offline: list[str] = field(default_factory=list)  # devices reported offline
    sources: dict[str, str] = field(default_factory=dict)  # MDC ref -> the device that last measured it
    artifacts: dict[str, list[int]] = field(default_factory=dict)  # device -> received times of artifacts
    recent: dict[str, int] = field(default_factory=dict)  # applied input ids -> time (redelivery guard)
    left: dict[str, int] = field(default_factory=dict)  # beds the patient left -> when (late readings)
    last_at: int = 0  # the newest received/tick time seen


class ClinicalEngine:
    """Processor of `topics.CLINICAL`."""

    name = "clinical"
    topic = topics.CLINICAL

    def __init__(
        self,
        rules: Callable[[], Ruleset],
        facts: FactsSource,
        *,
        config: LifecycleConfig = lifecycle.DEFAULT_CONFIG,
        policies: escalation.Policies = escalation.DEFAULT_POLICIES,
        news2_max_age_ms: dict[str, int] | None = None,
    ) -> None:
        self._rules = rules
        self._facts = facts
        self._config = config
        self._policies = policies
        self._news2_age = {**news2.DEFAULT_MAX_AGE_MS, **(news2_max_age_ms or {})}

    # -- the processor shape --

    def step(
        self, state: ClinicalState | None, event: Event
    ) -> tuple[ClinicalState | None, Sequence[Effect]]:
        st = state if state is not None else ClinicalState()
        out: list[Effect] = []
        meta: Meta | None = getattr(event, "meta", None)
        if meta is not None and meta.bed_id in st.left and meta.received_at <= st.left[meta.bed_id]:
            return st, ()  # from the bed the patient left, received before it: its alarms are closed
        match event:
            case Observations():
                self._where(st, event.meta)
                self._observations(st, event, out)
            case DeviceStatus():
                self._where(st, event.meta)
                was_low = "low_battery" in st.tech.get(f"status:{event.meta.device_id}", ())
                now = status_conditions(event.conditions, event.battery, was_low)
                self._technical(st, f"status:{event.meta.device_id}", now, event.meta, out)
            case PumpStatus():
                self._where(st, event.meta)
                self._technical(
                    st, f"pump:{event.meta.device_id}", pump_conditions(event.alarms), event.meta, out
                )
            case DeviceLiveness():
                if self._seen(st, event.id, event.at):
                    return st, ()
                self._liveness(st, event, out)
            case AlertCommand():
                if self._seen(st, event.id, event.at):
                    return st, ()
                self._command(st, event, out)
            case PatientSettings():
                if self._seen(st, event.id, event.at):
                    return st, ()
                self._settings(st, event, out)
            case AdmissionChange():
                if self._seen(st, event.id, event.at):
                    return st, ()
                return self._admission(st, event, out), out
            case Tick():
                self._tick(st, event.at, out)
            case _:
                return state, ()
        return st, out

    def due(self, state: ClinicalState) -> int | None:
        """The next time a tick can change this key: silence expiry, re-announcement, escalation, NEWS2
        inputs going stale, an artifact run ending."""
        dues: list[int] = []
        for alarm in state.book.alarms.values():
            a = alarm.alert
            if a.silenced_until is not None:
                dues.append(a.silenced_until)
            if a.status == "active_ack" and alarm.condition_true and alarm.acked_at is not None:
                dues.append(alarm.acked_at + self._config.reannounce_ms.get(a.priority, 5 * 60_000))
        dues.extend(r.due_at for r in state.esc.running.values() if r.started_at is not None)
        if state.patient_id is not None:  # an input about to go stale makes the score incomplete
            for code, (_, ts) in state.news2_in.items():
                stale_at = ts + self._news2_age[code] + 1
                if stale_at > state.news2_at:
                    dues.append(stale_at)
        pending = state.news2_pending
        if pending is not None and pending[1] + NEWS2_HOLD_MS > state.news2_at:
            dues.append(pending[1] + NEWS2_HOLD_MS)
        for times in state.artifacts.values():
            if times:
                dues.append(times[-1] + ARTIFACT_WINDOW_MS)
        return min(dues) if dues else None

    # -- inputs --

    def _where(self, st: ClinicalState, meta: Meta) -> None:
        if meta.received_at >= st.last_at:
            st.site_id, st.unit_id, st.bed_id = meta.site_id, meta.unit_id, meta.bed_id
            st.patient_id = meta.patient_id
            st.last_at = meta.received_at

    def _observations(self, st: ClinicalState, event: Observations, out: list[Effect]) -> None:
        meta = event.meta
        if st.patient_id is None and st.bed_id is None:
            return  # a device bound to nobody: nobody to alarm for
        inhibited = self._inhibited_params(st)
        usable: list[ObsItem] = []
        artifacts = 0
        backfill = False  # flagged by the device stage: replayed long after its time
        for item in event.items:
            if FLAG_ARTIFACT in item.flags:
                artifacts += 1
                continue
            if item.code in inhibited or FLAG_INHIBITED in item.flags:
                continue
            usable.append(item)
            st.sources[item.code] = meta.device_id
            if FLAG_BACKFILL in item.flags:
                backfill = True
        if meta.transport != "api":
            self._artifact_run(st, meta, artifacts, out)
        if not usable:
            return
        ruleset = self._rules()
        # Labels and units only: an override changes neither, so the unit's rules (no rebuild) suffice.
        rules_now = ruleset.rules_for(st.unit_id)
        st.rules, signals = evaluate(
            ruleset, st.rules, usable, meta.received_at, st.overrides, unit_id=st.unit_id
        )
        for sig in signals:
            rule = rules_now.get(sig.condition)
            detail = {"label": rule.label if rule else sig.condition}
            if rule is not None and len(rule.terms) == 1 and rule.terms[0].kind == "value":
                detail["unit"] = rule.terms[0].unit
            detail["device_id"] = meta.device_id
            obs = sig.observed(
                site_id=st.site_id,
                patient_id=st.patient_id,
                bed_id=st.bed_id,
                unit_id=st.unit_id,
                backfill=backfill,
            )
            self._lifecycle(st, replace(obs, detail=detail), meta.received_at, out)
        if st.patient_id is not None:
            changed = False
            for item in usable:
                info = BY_REF.get(item.code)
                alias = info.alias if info is not None else item.code
                if alias in NEWS2_CODES:
                    seen = st.news2_in.get(alias)
                    if seen is None or item.ts >= seen[1]:
                        st.news2_in[alias] = (item.value, item.ts)
                        changed = True
            if changed:
                at = max(ts for _, ts in st.news2_in.values())
                self._news2(st, at, meta.received_at, backfill, out)

    def _artifact_run(self, st: ClinicalState, meta: Meta, count: int, out: list[Effect]) -> None:
        times = st.artifacts.get(meta.device_id, [])
        rx = meta.received_at
        times = [t for t in times if t > rx - ARTIFACT_WINDOW_MS] + [rx] * count
        if times:
            st.artifacts[meta.device_id] = times[-ARTIFACT_RUN:]
        else:
            st.artifacts.pop(meta.device_id, None)
        self._artifact_verdict(st, rx, meta.device_id, out)

    def _artifact_verdict(self, st: ClinicalState, at: int, device_id: str, out: list[Effect]) -> None:
        running = self._artifact_run_on(st, at) or any("artifact" in c for c in st.tech.values())
        open_ = "artifact" in st.book.alarms and st.book.alarms["artifact"].condition_true
        if running != open_:
            self._technical_verdict(st, "artifact", running, at, device_id, out)

    @staticmethod
    def _artifact_run_on(st: ClinicalState, at: int) -> bool:
        return any(
            len([t for t in times if t > at - ARTIFACT_WINDOW_MS]) >= ARTIFACT_RUN
            for times in st.artifacts.values()
        )

    def _technical(
        self, st: ClinicalState, source: str, now: set[str], meta: Meta, out: list[Effect]
    ) -> None:
        before = set(st.tech.get(source, ()))
        if now:
            st.tech[source] = sorted(now)
        else:
            st.tech.pop(source, None)
        device_id = meta.device_id
        at = meta.received_at
        for cond in sorted(before ^ now):
            spec = TECHNICAL[cond]
            if spec.inhibits:
                conds = self._conditions_of(st, spec.inhibits)
                key = f"{cond}:{device_id}"
                ev: lifecycle.LifecycleEvent = (
                    lifecycle.Inhibit(key, conds, at) if cond in now else lifecycle.Uninhibit(key, conds, at)
                )
                self._apply(st, ev, at, out)
            active_anywhere = any(cond in c for c in st.tech.values())
            if cond == "artifact":  # a status's low signal and a run of artifact readings are one alarm
                active_anywhere = active_anywhere or self._artifact_run_on(st, at)
            self._technical_verdict(st, cond, active_anywhere, at, device_id, out)

    def _technical_verdict(
        self, st: ClinicalState, cond: str, active: bool, at: int, device_id: str, out: list[Effect]
    ) -> None:
        if st.patient_id is None and st.bed_id is None:
            return
        spec = TECHNICAL[cond]
        obs = Observed(
            cond, active, at, spec.priority, st.site_id, st.patient_id, st.bed_id, st.unit_id,
            detail={"label": spec.label, "device_id": device_id},
        )  # fmt: skip
        self._lifecycle(st, obs, at, out)

    def _liveness(self, st: ClinicalState, event: DeviceLiveness, out: list[Effect]) -> None:
        if st.site_id == "":
            st.site_id, st.unit_id, st.bed_id, st.patient_id = (
                event.site_id, event.unit_id, event.bed_id, event.patient_id,
            )  # fmt: skip
        dev = event.device_id
        params = frozenset(p for p, d in st.sources.items() if d == dev)
        conds = self._conditions_of(st, params)
        key = f"device_offline:{dev}"
        if not event.online:
            if dev in st.offline:
                return
            st.offline.append(dev)
            self._apply(st, lifecycle.Inhibit(key, conds, event.at), event.at, out)
            self._apply(st, lifecycle.DataStopped(event.at, conds), event.at, out)
        else:
            if dev not in st.offline:
                return
            st.offline.remove(dev)
            self._apply(st, lifecycle.Uninhibit(key, conds, event.at), event.at, out)
        self._technical_verdict(st, "device_offline", bool(st.offline), event.at, dev, out)

    def _command(self, st: ClinicalState, cmd: AlertCommand, out: list[Effect]) -> None:
        ev: lifecycle.LifecycleEvent
        if cmd.action == "ack":
            ev = lifecycle.Ack(cmd.alert_id, cmd.by, cmd.at)
        elif cmd.action == "silence":
            duration = lifecycle.SILENCE_MAX_MS if cmd.duration_ms is None else cmd.duration_ms
            ev = lifecycle.Silence(cmd.alert_id, cmd.by, cmd.at, duration)
        elif cmd.action == "resolve":
            ev = lifecycle.Resolve(cmd.alert_id, cmd.by, cmd.at)
        else:
            return  # the API refuses other actions; an old or foreign record changes nothing
        self._apply(st, ev, cmd.at, out)

    def _settings(self, st: ClinicalState, ev: PatientSettings, out: list[Effect]) -> None:
        if st.site_id == "":
            st.site_id, st.patient_id = ev.site_id, ev.patient_id
        if ev.news2_scale in (1, 2):
            st.news2_scale = ev.news2_scale
        if ev.news2_suppressed is not None:
            st.news2_suppressed = ev.news2_suppressed
        if ev.overrides is not None:
            st.overrides = tuple(PatientOverride(**o) for o in ev.overrides)
        if ev.news2_scale is not None or ev.news2_suppressed is not None:
            self._news2(st, max(st.last_at, ev.at), ev.at, False, out, force=True)

    def _admission(self, st: ClinicalState, ev: AdmissionChange, out: list[Effect]) -> ClinicalState:
        """A patient who left the bed (discharge, transfer), or a bed that got a patient or was freed: every
        alarm of this key closes with the reason, and nothing of it is kept for whoever comes next."""
        reason: lifecycle.CloseReason
        if st.patient_id is None and ev.patient_id is not None:
            reason = "admission"  # a bed's own alarms end when a patient takes it: theirs are the patient's
        else:
            reason = "transfer" if ev.reason == "transfer" else "discharge"
        self._apply(st, lifecycle.Discharged(reason, ev.at), ev.at, out)
        fresh = ClinicalState(recent=st.recent, last_at=max(st.last_at, ev.at), left=dict(st.left))
        if st.patient_id is not None:
            fresh.left[ev.bed_id] = ev.at
        fresh.news2_scale, fresh.news2_suppressed = st.news2_scale, st.news2_suppressed
        fresh.overrides = st.overrides  # the patient's own settings follow the patient
        if st.patient_id is None:  # a bed's own key: its next occupant is another key
            fresh.news2_scale, fresh.news2_suppressed, fresh.overrides = 1, False, ()
        return fresh

    def _tick(self, st: ClinicalState, at: int, out: list[Effect]) -> None:
        st.last_at = max(st.last_at, at)
        self._apply(st, Tick(at=at), at, out)
        if any(r.started_at is not None and r.due_at <= at for r in st.esc.running.values()):
            self._escalate(st, None, at, out)
        if st.patient_id is not None and st.news2_in:
            self._news2(st, at, at, False, out)
        for dev in sorted(st.artifacts):
            st.artifacts[dev] = [t for t in st.artifacts[dev] if t > at - ARTIFACT_WINDOW_MS]
            if not st.artifacts[dev]:
                del st.artifacts[dev]
        if "artifact" in st.book.alarms and st.book.alarms["artifact"].condition_true:
            self._artifact_verdict(st, at, "", out)
        for key in [k for k, t in st.recent.items() if t < at - RECENT_MS]:
            del st.recent[key]
        for bed in [b for b, t in st.left.items() if t < at - RECENT_MS]:
            del st.left[bed]

    # -- NEWS2 --

    def _news2(
        self,
        st: ClinicalState,
        at: int,
        rx: int,
        backfill: bool,
        out: list[Effect],
        *,
        force: bool = False,
    ) -> None:
        inputs = {
            code: news2.Reading(_ACVPU[int(v)] if code == "acvpu" and not isinstance(v, str) else v, ts)
            for code, (v, ts) in st.news2_in.items()
        }
        scale: news2.Scale = 2 if st.news2_scale == 2 else 1
        st.news2_at = max(st.news2_at, at)
        result = news2.score(
            inputs, at_ms=at, scale=scale, max_age_ms=self._news2_age, suppressed=st.news2_suppressed
        )
        comps = {k: (c.points if c else None) for k, c in result.components.items()}
        sig = orjson.dumps(
            [result.score, result.partial, result.response, result.complete, scale, result.suppressed,
             result.missing, result.stale, comps]
        ).decode()  # fmt: skip
        if sig == st.news2_sig and not force:
            self._news2_alert(st, at, rx, backfill, None, out)
            return
        st.news2_sig = sig
        body = result.to_json()
        assert st.patient_id is not None
        out.append(RecordNews2(st.patient_id, st.site_id, at, body))
        out.append(
            Emit(
                topics.LIVE,
                st.site_id,
                LiveUpdate(
                    id=f"{st.patient_id}/news2/{at}",
                    kind="news2",
                    at=rx,
                    site_id=st.site_id,
                    unit_id=st.unit_id,
                    bed_id=st.bed_id,
                    patient_id=st.patient_id,
                    device_id="",
                    detail={"news2": body},
                ),
            )
        )
        self._news2_alert(st, at, rx, backfill, result, out)

    def _news2_alert(
        self,
        st: ClinicalState,
        at: int,
        rx: int,
        backfill: bool,
        result: news2.News2Result | None,
        out: list[Effect],
    ) -> None:
        """Raise, upgrade or clear the `news2` alert once a response has held for `NEWS2_HOLD_MS`."""
        if result is not None:
            priority = result.priority
            if priority is None:
                st.news2_pending = None
                if "news2" in st.book.alarms:
                    obs = Observed(
                        "news2", False, at, "low", st.site_id, st.patient_id, st.bed_id, st.unit_id
                    )
                    self._lifecycle(st, obs, rx, out)
                return
            value = float(result.score if result.score is not None else result.partial)
            pending = st.news2_pending
            if pending is None or pending[0] != priority:
                st.news2_pending = (priority, at, value)
            else:
                st.news2_pending = (priority, pending[1], value)
        pending = st.news2_pending
        if pending is None or at - pending[1] < NEWS2_HOLD_MS:
            return
        priority_, _, value = pending
        label = "NEWS2 " + {"high": "high", "medium": "medium", "low": "low-medium"}[priority_]
        obs = Observed(
            "news2", True, at, priority_, st.site_id, st.patient_id, st.bed_id, st.unit_id,  # type: ignore[arg-type]
            value, backfill, {"label": label},
        )  # fmt: skip
        self._lifecycle(st, obs, rx, out)

    # -- lifecycle and escalation --

    def _lifecycle(self, st: ClinicalState, obs: Observed, rx: int, out: list[Effect]) -> None:
        self._apply(st, obs, rx, out)

    def _apply(self, st: ClinicalState, ev: lifecycle.LifecycleEvent, at: int, out: list[Effect]) -> None:
        st.book, changes = lifecycle.step(st.book, ev, self._config)
        by = getattr(ev, "by", None)
        for change in changes:
            self._publish(change, by, out)
            self._escalate(st, change.alert, at, out)

    def _publish(self, change: Change, by: str | None, out: list[Effect]) -> None:
        a, t = change.alert, change.transition
        out.append(RecordAlerts((AlertVersion(a, t.from_status, t.reason, t.by or by),)))
        out.append(Emit(topics.LIVE, a.site_id, a))
        out.append(Count("vigil_alert_transitions_total", (("priority", a.priority), ("reason", t.reason))))

    def _escalate(self, st: ClinicalState, alert: Alert | None, at: int, out: list[Effect]) -> None:
        if alert is None and not st.esc.running:
            return
        facts = self._facts.facts(
            site_id=st.site_id, unit_id=st.unit_id, bed_id=st.bed_id, patient_id=st.patient_id
        )
        event: escalation.EscalationEvent = (
            escalation.AlertChanged(alert, facts) if alert is not None else escalation.Due(facts)
        )
        st.esc, effects = escalation.step(st.esc, event, at, self._policies)
        if not effects:
            return
        alerts = {a.id: a for a in self._open_alerts(st)}
        if alert is not None:
            alerts[alert.id] = alert
        pages: list[AlertPage] = []
        for e in effects:
            a = alerts.get(e.alert_id)
            if a is None:
                continue
            if isinstance(e, escalation.Page):
                page = AlertPage(
                    e.alert_id, e.alert_version, e.step, e.level, e.recipients, e.at, a.site_id,
                    a.unit_id, a.patient_id, a.bed_id, a.condition, a.priority,
                )  # fmt: skip
            else:
                page = AlertPage(
                    e.alert_id, a.version, e.step, e.level, (), e.at, a.site_id, a.unit_id,
                    a.patient_id, a.bed_id, a.condition, a.priority, skipped=e.reason,
                )  # fmt: skip
            pages.append(page)
        if pages:
            out.append(RecordPages(tuple(pages)))
            for p in pages:
                out.append(Count("vigil_pages_total", (("outcome", p.skipped or "paged"),)))
            out.extend(Emit(topics.LIVE, p.site_id, p) for p in pages if p.recipients)

    @staticmethod
    def _open_alerts(st: ClinicalState) -> Iterable[Alert]:
        return (a.alert for a in st.book.alarms.values())

    # -- helpers --

    def _inhibited_params(self, st: ClinicalState) -> frozenset[str]:
        params: set[str] = set()
        for conds in st.tech.values():
            for c in conds:
                params |= TECHNICAL[c].inhibits
        for dev in st.offline:
            params |= {p for p, d in st.sources.items() if d == dev}
        return frozenset(params)

    def _conditions_of(self, st: ClinicalState, params: frozenset[str]) -> tuple[str, ...]:
        """The conditions whose readings come from `params` (rules, and NEWS2 when it uses one)."""
        rules = effective_rules(self._rules(), st.unit_id, st.overrides, st.last_at)
        out = sorted(c for c, r in rules.items() if r.params & params)
        return tuple(out)

    @staticmethod
    def _seen(st: ClinicalState, event_id: str, at: int) -> bool:
        """True for an input already applied (a redelivery); otherwise remember it."""
        if event_id in st.recent:
            return True
        st.recent[event_id] = at
        return False

    # -- state as bytes --

    def encode_state(self, state: ClinicalState) -> bytes:
        r = state.rules
        return orjson.dumps(
            {
                "w": [state.site_id, state.unit_id, state.bed_id, state.patient_id, state.last_at],
                "rl": r.latest,
                "rh": r.history,
                "rs": r.rules,
                "n": state.news2_in,
                "ns": state.news2_sig,
                "nc": [state.news2_scale, state.news2_suppressed, state.news2_at, state.news2_pending],
                "ov": state.overrides,
                "b": lifecycle.book_json(state.book),
                "e": escalation.state_json(state.esc),
                "t": state.tech,
                "off": state.offline,
                "src": state.sources,
                "art": state.artifacts,
                "rc": state.recent,
                "lb": state.left,
            }
        )

    def decode_state(self, raw: bytes) -> ClinicalState:
        d: dict[str, Any] = orjson.loads(raw)
        site, unit, bed, patient, last_at = d["w"]
        rules = PatientRulesState(
            latest={k: (v[0], v[1]) for k, v in d["rl"].items()},
            history={k: tuple((p[0], p[1]) for p in v) for k, v in d["rh"].items()},
            rules={k: RuleState(**v) for k, v in d["rs"].items()},
        )
        return ClinicalState(
            site_id=site,
            unit_id=unit,
            bed_id=bed,
            patient_id=patient,
            rules=rules,
            news2_in={k: (v[0], v[1]) for k, v in d["n"].items()},
            news2_sig=d["ns"],
            news2_scale=d["nc"][0],
            news2_suppressed=d["nc"][1],
            news2_at=d["nc"][2],
            news2_pending=None if d["nc"][3] is None else tuple(d["nc"][3]),
            overrides=tuple(PatientOverride(**o) for o in d["ov"]),
            book=lifecycle.book_from(d["b"]),
            esc=escalation.state_from(d["e"]),
            tech=d["t"],
            offline=d["off"],
            sources=d["src"],
            artifacts=d["art"],
            recent=d["rc"],
            left=d["lb"],
            last_at=last_at,
        )


def settings_id(patient_id: str, at: int, body: bytes) -> str:
    """A stable id for a PatientSettings message (the API derives it from what it publishes)."""
    return f"{patient_id}/settings/{at}/{hashlib.blake2b(body, digest_size=6).hexdigest()}"
