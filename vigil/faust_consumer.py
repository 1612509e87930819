"""faust's Kafka consumer without four asyncio tasks per record.

faust's fetch loop (`Consumer._drain_messages`) hands every record to the conductor through
`Service.wait_first(callback(message), suspend_flow.wait())`, so that a rebalance can interrupt a delivery
that waits (flow control suspended, a full stream buffer). wait_first wraps each of its awaitables, the
service's stopped and crashed events included, in a task and then cancels the losers: four tasks and an
`asyncio.wait` per record, about a tenth of a worker's CPU (py-spy, docs/SCALING.md).

Almost every delivery never waits: the flow is active, the buffer has room and the callback returns at
its first step. `Consumer.wait_first` here runs that first step inline; only a delivery that actually
suspends goes to faust's wait_first, still racing the rebalance exactly as before, and the coroutine goes
on from where it stopped (`_resume`). Nothing else of faust changes: same ordering, acks and offsets.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.services import WaitArgT, WaitResults


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """Go on driving `coro`, which stopped on `pending` in a first step run outside any task."""
    while True:
        try:
            sent = yield pending
        except BaseException as exc:  # a cancellation (the rebalance won the race): into the coroutine
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            pending = coro.send(sent)
        except StopIteration as stop:
            return stop.value


FETCH_MAX_WAIT_MS = 50  # faust hard-codes 1,500


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread, with fetches that wait at most `FETCH_MAX_WAIT_MS` for data.

    faust builds its aiokafka consumer with `fetch_max_wait_ms=1500` and no setting to change it. A broker
    that holds an empty fetch for the whole wait and does not answer it early when records arrive (tansu
    does so) then adds up to 1.5 s to every record that finds its partition's fetch already parked: on
    each of a reading's two worker hops."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts its fetcher
        return consumer


class Consumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer; a delivery that completes at once costs no task (module docstring)."""

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def wait_first(self, *coros: WaitArgT, timeout: Any = None) -> WaitResults:
        first = coros[0] if coros else None
        if not isinstance(first, Coroutine) or self.should_stop or self._crashed.is_set():
            return await super().wait_first(*coros, timeout=timeout)
        try:
            pending = first.send(None)
        except BaseException as exc:
            for other in coros[1:]:
                if isinstance(other, Coroutine):
                    other.close()  # never started: closed, so it is not reported as never awaited
            if isinstance(exc, StopIteration):
                return WaitResults([first], [exc.value], False)
            raise
        resumed = asyncio.ensure_future(_resume(first, pending))
        try:
            got = await super().wait_first(resumed, *coros[1:], timeout=timeout)
        finally:
            if not resumed.done():
                resumed.cancel()
        return WaitResults([first if w is resumed else w for w in got.done], got.results, got.stopped)


class Transport(faust_aiokafka.Transport):
    """faust's aiokafka transport with the consumer above."""

    Consumer = Consumer
