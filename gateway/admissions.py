"""Admission changes pushed to a scaled gateway, and the fence that makes attribution follow them at once.

The contract attributes every reading to the patient bound at its received time. A scaled gateway's
registry follows the records by polling their version (`gateway/registry.py`, 0.5 s), so on its own a reading
that arrives just after `PUT /api/v1/beds/{bed}/patient` answered could still go to the previous patient.
Two things close that window:

- **Push.** `AdmissionFeed` reads `vigil.admissions.v1` from its end (its own consumer, no consumer group:
  nothing to commit, no rebalance) and reloads the registry as soon as a change arrives.
- **Fence.** The API appends the change to Kafka after it committed it and before it answers. `fence()`,
  awaited by the gateway before it stamps a batch's received time, asks Kafka for the topic's end offset
  and, when it is past what the registry reflects, waits until it reflects it. A reading received after
  the API answered is therefore attributed to the new patient. Concurrent batches share one request (one in
  flight, the next batches join the one after it), so the cost is one round trip to Kafka per wave of
  batches, not per message. A fence that cannot get an answer within `FENCE_TIMEOUT` lets the batch
  through (logged, counted) and so do later ones, unwaited, until the feed applies a change again:
  attribution then lags as it would with the poll alone, and ingest never stalls on the admissions topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Counter

from streams import topics
from streams.metrics import REGISTRY

log = logging.getLogger(__name__)

FENCE_TIMEOUT = 2.0  # seconds a batch waits for the registry to catch up before it goes through anyway
FENCE_WAITS = Counter(
    "vigil_admission_fence_waits_total",
    "Ingest batches that waited for an admission change to reach the gateway's registry",
    registry=REGISTRY,
)
FENCE_TIMEOUTS = Counter(
    "vigil_admission_fence_timeouts_total",
    "Ingest batches let through without knowing the latest admissions (Kafka or the records did not answer)",
    registry=REGISTRY,
)


class AdmissionFeed:
    """Follows `vigil.admissions.v1` and calls `refresh` (a registry reload) for every change it sees."""

    def __init__(
        self,
        bootstrap: Sequence[str],
        refresh: Callable[[], Awaitable[object]],
        *,
        client_id: str,
        topic: str = topics.ADMISSIONS,
        fence_timeout: float = FENCE_TIMEOUT,
    ) -> None:
        self._bootstrap = list(bootstrap)
        self._refresh = refresh
        self._client_id = client_id
        self._topic = topic
        self._fence_timeout = fence_timeout
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets: AIOKafkaConsumer | None = None  # end offsets only: its connection never holds a fetch
        self._tps: list[TopicPartition] = []
        self._task: asyncio.Task[None] | None = None
        self._applied: dict[TopicPartition, int] = {}  # next offset the registry does not reflect yet
        self._moved = asyncio.Condition()
        self._inflight: asyncio.Task[None] | None = None
        self._next: asyncio.Task[None] | None = None
        self._degraded = False  # a fence timed out: let batches through until the feed applies again

    async def start(self) -> None:
        """Position at the topic's end, reload once (nothing between the two is missed), then follow."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._client_id}-admissions",
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            request_timeout_ms=10_000,
        )
        offsets = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._client_id}-admission-offsets",
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=10_000,
        )
        await consumer.start()
        try:
            await offsets.start()
        except BaseException:
            await consumer.stop()
            raise
        try:
            parts = consumer.partitions_for_topic(self._topic)
            if not parts:
                parts = set(range(topics.PARTITIONS.get(self._topic, 1)))
            self._tps = [TopicPartition(self._topic, p) for p in sorted(parts)]
            consumer.assign(self._tps)
            await consumer.seek_to_end(*self._tps)
            for tp in self._tps:
                self._applied[tp] = await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            await offsets.stop()
            raise
        self._consumer, self._offsets = consumer, offsets
        await self._refresh()
        self._task = asyncio.create_task(self._follow_loop(), name="admission-feed")

    async def stop(self) -> None:
        for task in (self._task, self._inflight, self._next):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for consumer in (self._consumer, self._offsets):
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await consumer.stop()
        self._consumer = self._offsets = None

    async def _follow_loop(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        failing = False
        batch: dict[TopicPartition, list[Any]] = {}
        while True:
            try:
                if not batch:  # else a change read before still waits for its reload
                    batch = await consumer.getmany(timeout_ms=1000)
                if batch:
                    await self._refresh()  # the change is committed in the records before it is in Kafka
            except asyncio.CancelledError:
                raise
            except Exception:
                if not failing:
                    log.warning(
                        "admission feed: reading or applying a change failed; retrying", exc_info=True
                    )
                failing = True
                await asyncio.sleep(0.5)
                continue
            if failing:
                log.info("admission feed: following again")
            failing = self._degraded = False
            if batch:
                async with self._moved:
                    for tp, records in batch.items():
                        self._applied[tp] = max(self._applied.get(tp, 0), records[-1].offset + 1)
                    self._moved.notify_all()
                batch = {}

    async def fence(self) -> None:
        """Return once the registry reflects every admission change in Kafka when this call began."""
        if self._consumer is None or self._degraded:
            return
        # One check in flight; a caller arriving meanwhile joins the next one, which starts after it.
        if self._next is None:
            self._next = asyncio.create_task(self._check_after(self._inflight), name="admission-fence")
        task = self._next
        try:
            await asyncio.wait_for(asyncio.shield(task), self._fence_timeout)
        except TimeoutError:
            FENCE_TIMEOUTS.inc()
            self._degraded = True
            log.warning(
                "admission fence: no answer within %.1fs; attributing with what is known", self._fence_timeout
            )
        except Exception:
            FENCE_TIMEOUTS.inc()
            self._degraded = True
            log.warning("admission fence failed; attributing with what is known", exc_info=True)

    async def _check_after(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        self._inflight, self._next = self._next, None
        consumer = self._offsets
        if consumer is None:
            return
        ends = await consumer.end_offsets(self._tps)
        behind = any(ends[tp] > self._applied.get(tp, 0) for tp in self._tps)
        if not behind:
            return
        FENCE_WAITS.inc()
        async with asyncio.timeout(self._fence_timeout), self._moved:
            await self._moved.wait_for(lambda: all(ends[tp] <= self._applied.get(tp, 0) for tp in self._tps))
