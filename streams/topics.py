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
TIME_RETAINED = (LIVE,)  # pruned by age alone: no consumer group commits them


def clinical_key(patient_id: str | None, bed_id: str | None, device_id: str) -> str:
    """Clinical processors key by patient; a bed without a patient still raises alarms, keyed by bed."""
    if patient_id:
        return f"patient:{patient_id}"
    if bed_id:
        return f"bed:{bed_id}"
    return f"device:{device_id}"
