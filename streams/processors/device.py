"""Stage one, keyed by device: deduplication, late data, liveness, then vitals and the clinical stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from streams import topics
from streams.effects import Count, Effect, Emit, WriteVitals
from streams.ports import VitalPoint
from streams.schemas import (
    FLAG_LATE,
    CrewMessage,
    DeviceStatus,
    Event,
    GpsFix,
    LiveUpdate,
    Meta,
    Observations,
    PumpStatus,
    Sos,
)

DEDUP_WINDOW_MS = 10 * 60_000  # the contract keeps dedup keys at least 10 minutes
ACVPU_SCORE = {"A": 0.0, "C": 1.0, "V": 2.0, "P": 3.0, "U": 4.0}


@dataclass(slots=True)
class DeviceState:
    """What stage one remembers of a device."""

    seen: dict[str, int] = field(default_factory=dict)  # event id -> received_at, for the dedup window
    high_seq: dict[str, int] = field(default_factory=dict)  # "kind/boot" -> highest seq seen
    last_received_at: int = 0
    oldest_seen: int = 0  # lower bound of `seen`'s received_at, so pruning is skipped when nothing is old


class DeviceStage:
    """Processor of `topics.INGEST`."""

    name = "device"
    topic = topics.INGEST

    def step(self, state: DeviceState | None, event: Event) -> tuple[DeviceState | None, Sequence[Effect]]:
        meta: Meta | None = getattr(event, "meta", None)
        if meta is None:  # ticks and foreign records carry no device envelope
            return state, ()
        st = state if state is not None else DeviceState()
        rx = meta.received_at
        if meta.event_id in st.seen:
            return st, (Count("vigil_duplicates_total"),)
        self._remember(st, meta)
        effects: list[Effect] = []
        late = False
        if meta.seq is not None:
            slot = f"{meta.kind}/{meta.boot or '-'}"
            high = st.high_seq.get(slot, -1)
            if meta.seq < high:
                late = True  # an unseen lower seq: stored in device-time order, not dropped
                effects.append(Count("vigil_late_total", (("kind", meta.kind),)))
            else:
                st.high_seq[slot] = meta.seq
        st.last_received_at = max(st.last_received_at, rx)
        if isinstance(event, Observations):
            if late:
                event = replace(
                    event, items=tuple(replace(i, flags=(*i.flags, FLAG_LATE)) for i in event.items)
                )
            effects.append(WriteVitals(tuple(vital_points(event))))
        live = live_update(event)
        if live is not None:
            effects.append(Emit(topics.LIVE, meta.site_id, live))
        if isinstance(event, GpsFix | CrewMessage | Sos):
            effects.append(Emit(topics.DISPATCH, meta.site_id, event))
        else:
            effects.append(
                Emit(
                    topics.CLINICAL, topics.clinical_key(meta.patient_id, meta.bed_id, meta.device_id), event
                )
            )
        return st, effects

    @staticmethod
    def _remember(st: DeviceState, meta: Meta) -> None:
        rx = meta.received_at
        st.seen[meta.event_id] = rx
        if not st.oldest_seen:
            st.oldest_seen = rx
        cutoff = rx - DEDUP_WINDOW_MS
        if st.oldest_seen < cutoff:
            st.seen = {k: v for k, v in st.seen.items() if v >= cutoff}
            st.oldest_seen = min(st.seen.values(), default=rx)

    def encode_state(self, state: DeviceState) -> bytes:
        return orjson.dumps(
            {"s": state.seen, "h": state.high_seq, "r": state.last_received_at, "o": state.oldest_seen}
        )

    def decode_state(self, raw: bytes) -> DeviceState:
        d = orjson.loads(raw)
        return DeviceState(seen=d["s"], high_seq=d["h"], last_received_at=d["r"], oldest_seen=d["o"])


def live_update(event: Event) -> LiveUpdate | None:
    """What the boards are pushed for an event (vitals, device conditions, pump state)."""
    extra: dict[str, Any]
    if isinstance(event, Observations):
        kind, extra = "vitals", {"items": event.items}
    elif isinstance(event, DeviceStatus):
        kind, extra = "device", {"conditions": event.conditions, "battery": event.battery}
    elif isinstance(event, PumpStatus):
        detail = {
            "state": event.state,
            "drug": event.drug,
            "rate_ml_h": event.rate_ml_h,
            "alarms": list(event.alarms),
        }
        kind, extra = "pump", {"detail": detail}
    else:
        return None
    m = event.meta
    return LiveUpdate(
        id=m.event_id,
        kind=kind,
        at=m.received_at,
        site_id=m.site_id,
        unit_id=m.unit_id,
        bed_id=m.bed_id,
        patient_id=m.patient_id,
        device_id=m.device_id,
        **extra,
    )


def vital_points(event: Observations) -> list[VitalPoint]:
    """One stored sample per item, keyed by event id and position so a repeat overwrites itself."""
    m = event.meta
    out: list[VitalPoint] = []
    for i, item in enumerate(event.items):
        value = ACVPU_SCORE[item.value] if isinstance(item.value, str) else float(item.value)
        out.append(
            VitalPoint(
                key=f"{m.event_id}#{i}",
                site_id=m.site_id,
                unit_id=m.unit_id,
                bed_id=m.bed_id,
                patient_id=m.patient_id,
                device_id=m.device_id,
                code=item.code,
                value=value,
                unit=item.unit,
                ts=item.ts,
                received_at=m.received_at,
                flags=item.flags,
            )
        )
    return out
