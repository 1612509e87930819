"""Stage one, keyed by device: deduplication, late data, liveness, then vitals and the clinical stage.

Liveness: a device that sends nothing for its type's timeout (`OFFLINE_AFTER_MS`, judged on the gateway's
received time through ticks) is reported offline to the clinical stage once, and online again with its
next message. Ticks arrive every second, so a silence is reported at most a second after its timeout.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from streams import topics
from streams.effects import Count, Effect, Emit, WriteVitals
from streams.ports import VitalPoint
from streams.schemas import (
    FLAG_BACKFILL,
    FLAG_LATE,
    CrewMessage,
    DeviceLiveness,
    DeviceStatus,
    Event,
    GpsFix,
    LiveUpdate,
    Meta,
    Observations,
    PumpStatus,
    Sos,
    Tick,
    seq_event_id,
)

DEDUP_WINDOW_MS = 10 * 60_000  # the contract keeps dedup keys at least 10 minutes
DEDUP_PRUNE_SLACK_MS = 60_000  # ids are kept the window and up to this much longer (pruned in bulk)
# Messages keyed by seq are remembered as runs of consecutive seqs per (kind, boot): a device that sends in
# order keeps one run however long it runs, so its state stays a few bytes (it is written on every batch).
# A run is forgotten once nothing joined it for the dedup window; a device with more gaps than this keeps
# its most recently extended runs.
MAX_SEQ_RUNS = 256
ACVPU_SCORE = {"A": 0.0, "C": 1.0, "V": 2.0, "P": 3.0, "U": 4.0}
# A message whose delay (received time - device time) exceeds the device's usual delay by this much is
# backfill: buffered through an outage and sent late. The usual delay is the smallest seen in the last
# hour (in 10-minute buckets), so a device whose clock runs behind is not mistaken for one replaying.
BACKFILL_AFTER_MS = 60_000
DELAY_BUCKET_MS = 10 * 60_000
DELAY_BUCKETS = 6
# Silence after which a device is offline, per type: several of its periodic messages missed (monitors send
# obs every second, pumps every 10 s, ambulances GPS every 2 s, pendants and analyzers status every 60 s).
OFFLINE_AFTER_MS: dict[str, int] = {
    "monitor": 10_000,
    "pump": 35_000,
    "ambulance": 15_000,
    "pendant": 190_000,
    "analyzer": 190_000,
}


@dataclass(slots=True)
class DeviceState:
    """What stage one remembers of a device."""

    seen: dict[str, int] = field(default_factory=dict)  # id-keyed event id -> received_at (dedup window)
    # "kind/boot" -> runs [first seq, last seq, last received_at] of the seqs seen, sorted, disjoint
    seqs: dict[str, list[list[int]]] = field(default_factory=dict)
    high_seq: dict[str, int] = field(default_factory=dict)  # "kind/boot" -> highest seq seen
    last_received_at: int = 0
    oldest_seen: int = 0  # lower bound of `seen`'s received_at, so pruning is skipped when nothing is old
    offline: bool = False
    device_id: str = ""
    delays: list[list[int]] = field(default_factory=list)  # [bucket start, smallest delay] oldest first
    # Where the device last reported from (type, site, unit, bed, patient): whom its silence concerns.
    where: tuple[str | None, str, str | None, str | None, str | None] | None = None


class DeviceStage:
    """Processor of `topics.INGEST`."""

    name = "device"
    topic = topics.INGEST

    def due(self, state: DeviceState) -> int | None:
        if state.offline or state.where is None or not state.last_received_at:
            return None
        timeout = OFFLINE_AFTER_MS.get(state.where[0] or "")
        return None if timeout is None else state.last_received_at + timeout

    def step(self, state: DeviceState | None, event: Event) -> tuple[DeviceState | None, Sequence[Effect]]:
        if isinstance(event, Tick):
            return self._tick(state, event.at)
        meta: Meta | None = getattr(event, "meta", None)
        if meta is None:  # foreign records carry no device envelope
            return state, ()
        st = state if state is not None else DeviceState()
        rx = meta.received_at
        by_seq = meta.seq is not None and meta.event_id == seq_event_id(
            meta.device_id, meta.kind, meta.boot, meta.seq
        )
        if not self._first(st, meta, by_seq):
            return st, (Count("vigil_duplicates_total"),)
        effects: list[Effect] = []
        if meta.transport != "api":  # a manual entry says nothing of the device's link
            if st.offline and rx >= st.last_received_at:
                st.offline = False
                effects.append(self._liveness(st, meta.device_id, online=True, at=rx))
            if rx >= st.last_received_at:
                st.where = (meta.device_type, meta.site_id, meta.unit_id, meta.bed_id, meta.patient_id)
                st.device_id = meta.device_id
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
            extra = (FLAG_LATE,) if late else ()
            if meta.transport != "api" and self._backfill(st, rx, meta.ts):
                extra = (*extra, FLAG_BACKFILL)
                effects.append(Count("vigil_backfill_total"))
            if extra:
                event = replace(event, items=tuple(replace(i, flags=(*i.flags, *extra)) for i in event.items))
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
    def _backfill(st: DeviceState, rx: int, ts: int) -> bool:
        """Whether this message is far later than the device's usual delay; then remember its delay."""
        delay = rx - ts
        usual = min((b[1] for b in st.delays), default=None)
        bucket = rx - rx % DELAY_BUCKET_MS
        if st.delays and st.delays[-1][0] == bucket:
            st.delays[-1][1] = min(st.delays[-1][1], delay)
        else:
            st.delays.append([bucket, delay])
            del st.delays[:-DELAY_BUCKETS]
        return usual is not None and delay - usual > BACKFILL_AFTER_MS

    def _tick(self, state: DeviceState | None, at: int) -> tuple[DeviceState | None, Sequence[Effect]]:
        if state is None:
            return state, ()
        due = self.due(state)
        if due is None or at < due:
            return state, ()
        state.offline = True
        device_id = state.device_id
        return state, (self._liveness(state, device_id, online=False, at=at),)

    @staticmethod
    def _liveness(st: DeviceState, device_id: str, *, online: bool, at: int) -> Emit:
        assert st.where is not None
        dtype, site, unit, bed, patient = st.where
        word = "online" if online else "offline"
        event = DeviceLiveness(
            id=f"{device_id}/{word}/{st.last_received_at}",
            device_id=device_id,
            device_type=dtype,
            online=online,
            at=at,
            last_received_at=st.last_received_at,
            site_id=site,
            unit_id=unit,
            bed_id=bed,
            patient_id=patient,
        )
        return Emit(topics.CLINICAL, topics.clinical_key(patient, bed, device_id), event)

    @staticmethod
    def _first(st: DeviceState, meta: Meta, by_seq: bool) -> bool:
        """False for a duplicate; otherwise remember the message (and prune what left the window)."""
        rx = meta.received_at
        if by_seq:
            assert meta.seq is not None
            if not _add_seq(st.seqs.setdefault(f"{meta.kind}/{meta.boot or '-'}", []), meta.seq, rx):
                return False
        elif meta.event_id in st.seen:
            return False
        else:
            st.seen[meta.event_id] = rx
        if not st.oldest_seen:
            st.oldest_seen = rx
        cutoff = rx - DEDUP_WINDOW_MS
        if st.oldest_seen < cutoff - DEDUP_PRUNE_SLACK_MS:  # pruned once a minute, not on every event
            st.seen = {k: v for k, v in st.seen.items() if v >= cutoff}
            seqs: dict[str, list[list[int]]] = {}
            for slot, runs in st.seqs.items():
                kept = [r for r in runs if r[2] >= cutoff]
                if kept:
                    seqs[slot] = kept
            st.seqs = seqs
            st.oldest_seen = min(
                (*st.seen.values(), *(r[2] for runs in seqs.values() for r in runs)), default=rx
            )
        return True

    def encode_state(self, state: DeviceState) -> bytes:
        body: dict[str, Any] = {
            "s": state.seen, "q": state.seqs, "h": state.high_seq, "r": state.last_received_at,
            "o": state.oldest_seen,
        }  # fmt: skip
        if state.where is not None:
            body["w"] = state.where
            body["d"] = state.device_id
        if state.offline:
            body["x"] = True
        if state.delays:
            body["dl"] = state.delays
        return orjson.dumps(body)

    def decode_state(self, raw: bytes) -> DeviceState:
        d = orjson.loads(raw)
        where = d.get("w")
        return DeviceState(
            seen=d["s"],
            seqs=d.get("q", {}),
            high_seq=d["h"],
            last_received_at=d["r"],
            oldest_seen=d["o"],
            offline=bool(d.get("x", False)),
            where=None if where is None else tuple(where),
            device_id=d.get("d", ""),
            delays=d.get("dl", []),
        )


def _add_seq(runs: list[list[int]], seq: int, rx: int) -> bool:
    """Add `seq` to sorted disjoint runs [first, last, last received_at]; False when it is in one already."""
    if runs:
        last = runs[-1]
        if last[1] == seq - 1:  # the usual case: the next one in order
            last[1] = seq
            last[2] = max(last[2], rx)
            return True
    i = bisect_right(runs, seq, key=_run_start)  # runs[i - 1] is the last run starting at or before seq
    before = runs[i - 1] if i else None
    if before is not None and seq <= before[1]:
        return False
    after = runs[i] if i < len(runs) else None
    if before is not None and before[1] == seq - 1:
        before[1] = seq
        before[2] = max(before[2], rx)
        if after is not None and after[0] == seq + 1:  # the gap between two runs is filled: join them
            before[1] = after[1]
            before[2] = max(before[2], after[2])
            del runs[i]
    elif after is not None and after[0] == seq + 1:
        after[0] = seq
        after[2] = max(after[2], rx)
    else:
        runs.insert(i, [seq, seq, rx])
        if len(runs) > MAX_SEQ_RUNS:  # forget the run extended longest ago
            del runs[min(range(len(runs)), key=lambda j: runs[j][2])]
    return True


def _run_start(run: list[int]) -> int:
    return run[0]


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
