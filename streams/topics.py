"""Topic names, their keys and partition counts (the same names in the SQLite log and in Kafka)."""

from __future__ import annotations

INGEST = "vigil.ingest.v1"  # canonical device events, keyed by device id (dedup, late data, liveness)
CLINICAL = "vigil.clinical.v1"  # deduplicated clinical events, keyed by patient (else bed, else device)
DISPATCH = "vigil.dispatch.v1"  # SOS, GPS and crew events, keyed by site: one writer decides dispatch
DEADLETTERS = "vigil.deadletters.v1"  # refused input with its reason, keyed by device (or transport)
ADMISSIONS = "vigil.admissions.v1"  # bed/patient changes, keyed by site
LIVE = (
    "vigil.live.v1"  # what clients are pushed (vitals, device state; later alerts), one partition: its offset
)
#                          is the websocket cursor; kept by time (at least the 10-minute replay window)

PARTITIONS: dict[str, int] = {INGEST: 4, CLINICAL: 4, DISPATCH: 1, DEADLETTERS: 1, ADMISSIONS: 1, LIVE: 1}
TIME_RETAINED = (LIVE,)

# Timers (offline detection, escalation, silence expiry, re-announcement) run on `Tick` records that the
# gateway side appends to every partition of these topics each second, in line with the events: a tick at
# T comes after what was received before T, so a worker catching up on a backlog never sees a false timeout.
TICKED = (INGEST, CLINICAL)
TICK_INTERVAL_MS = 1_000
_TICK_PREFIX = "~tick/"  # not a device, patient or site key: those never start with "~"


def tick_key(partition: int) -> str:
    """The key that routes a `Tick` to one partition (both buses honour it instead of hashing)."""
    return f"{_TICK_PREFIX}{partition}"


def tick_partition(key: str) -> int | None:
    """The partition a tick key names, else None (an ordinary key)."""
    if not key.startswith(_TICK_PREFIX):
        return None
    tail = key[len(_TICK_PREFIX) :]
    return int(tail) if tail.isdigit() else None  # pruned by age alone: no consumer group commits them


def clinical_key(patient_id: str | None, bed_id: str | None, device_id: str) -> str:
    """Clinical processors key by patient; a bed without a patient still raises alarms, keyed by bed."""
    if patient_id:
        return f"patient:{patient_id}"
    if bed_id:
        return f"bed:{bed_id}"
    return f"device:{device_id}"
