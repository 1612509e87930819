"""Wiring of the clinical stage shared by both runtimes: rules (hot-reloaded), escalation policies, facts.

`ClinicalHost` builds the `ClinicalEngine` and runs its two background loops: reloading the rules file
(a bad edit keeps the rules in force and is logged with file and line) and refreshing the escalation
facts (assignments, roles and rosters from the records, plus who is connected).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from alerting.engine import ClinicalEngine
from alerting.escalation import Facts
from alerting.escalation_config import load_policies_file
from alerting.rules import Ruleset
from alerting.rules_schema import RulesFile
from streams.clock import Clock
from vigil.settings import Settings

log = logging.getLogger(__name__)

RULES_RELOAD_S = 2.0
FACTS_REFRESH_S = 1.0


class Directory(Protocol):
    """Who answers for which bed and unit (records/facts.py)."""

    async def refresh(self, at_ms: int) -> None: ...

    def facts(
        self,
        *,
        site_id: str,
        unit_id: str | None,
        bed_id: str | None,
        patient_id: str | None,
        connected: frozenset[str],
    ) -> Facts: ...


class ClinicalHost:
    """The clinical engine and what keeps its inputs current in one process."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.rules_file = RulesFile(settings.config_dir / "rules.yaml")
        self._report(self.rules_file.reload_if_changed())
        self.policies = load_policies_file(settings.config_dir / "escalation.yaml")
        self._directory: Directory | None = None
        self._connected: Callable[[], Awaitable[frozenset[str]]] | None = None
        self._online: frozenset[str] = frozenset()
        self._clock = clock
        self._tasks: list[asyncio.Task[Any]] = []
        self.engine = ClinicalEngine(self.ruleset, self, policies=self.policies)

    def ruleset(self) -> Ruleset:
        return self.rules_file.current

    def facts(
        self, *, site_id: str, unit_id: str | None, bed_id: str | None, patient_id: str | None
    ) -> Facts:
        if self._directory is None:
            return Facts()  # not attached: every level passes at once (nobody is hidden behind it)
        return self._directory.facts(
            site_id=site_id, unit_id=unit_id, bed_id=bed_id, patient_id=patient_id, connected=self._online
        )

    def attach(self, directory: Directory, connected: Callable[[], Awaitable[frozenset[str]]]) -> None:
        """Where facts come from (the host's records and presence), before the first step."""
        self._directory, self._connected = directory, connected

    async def start(self) -> None:
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._rules_loop(), name="rules-reload"))
        self._tasks.append(asyncio.create_task(self._facts_loop(), name="escalation-facts"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def refresh(self) -> None:
        if self._directory is not None:
            await self._directory.refresh(self._clock.now_ms())
        if self._connected is not None:
            self._online = await self._connected()

    def _report(self, result: object) -> None:
        if isinstance(result, list):
            for err in result:
                log.error("rules not reloaded, the rules in force stay: %s", err)

    async def _rules_loop(self) -> None:
        seen = self.rules_file.current
        while True:
            await asyncio.sleep(RULES_RELOAD_S)
            result = await asyncio.to_thread(self.rules_file.reload_if_changed)
            if result is not seen:
                self._report(result)
                if isinstance(result, Ruleset):
                    log.info("rules reloaded from %s (%s)", self.rules_file.path, result.digest[:12])
                seen = self.rules_file.current

    async def _facts_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(FACTS_REFRESH_S)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Escalation keeps the last facts it had; a level with nobody known still passes at once.
                if not failing:
                    log.exception("escalation facts could not be refreshed; keeping the last ones")
                failing = True
                continue
            failing = False
