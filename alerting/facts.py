"""The escalation facts port: who is assigned, rostered and connected, as the host knows it at step time.

Facts are the one input of the clinical engine that is not in the event: the host passes a view that it
refreshes in the background (records for assignments and rosters, websocket presence). A replay may see
other facts than the first run; that is safe because a page is keyed by (alert id, escalation step), so
a step is delivered once whoever it names.
"""

from __future__ import annotations

from typing import Protocol

from alerting.escalation import Facts


class FactsSource(Protocol):
    def facts(
        self, *, site_id: str, unit_id: str | None, bed_id: str | None, patient_id: str | None
    ) -> Facts: ...


class NoFacts:
    """Nobody is known: every level is skipped at once and the last one pages nobody (tests, tools)."""

    def facts(
        self, *, site_id: str, unit_id: str | None, bed_id: str | None, patient_id: str | None
    ) -> Facts:
        return Facts()
