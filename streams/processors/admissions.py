"""Routes bed changes (API, HL7 ADT) from the site-keyed admissions topic to the clinical keys they end."""

from __future__ import annotations

from collections.abc import Sequence

from streams import topics
from streams.effects import Effect, Emit
from streams.schemas import AdmissionChange, Event


class AdmissionRouter:
    """Processor of `topics.ADMISSIONS`: the patient who left a bed and the bed itself each hear of it, so
    the clinical stage closes their alarms with the reason (contract section 2). Stateless."""

    name = "admissions"
    topic = topics.ADMISSIONS

    def step(self, state: None, event: Event) -> tuple[None, Sequence[Effect]]:
        if not isinstance(event, AdmissionChange):
            return None, ()
        out: list[Effect] = [Emit(topics.CLINICAL, topics.clinical_key(None, event.bed_id, ""), event)]
        left = event.previous_patient_id
        if left and left != event.patient_id:
            out.append(Emit(topics.CLINICAL, topics.clinical_key(left, None, ""), event))
        return None, out

    def encode_state(self, state: None) -> bytes:
        return b""

    def decode_state(self, raw: bytes) -> None:
        return None
