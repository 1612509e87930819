"""`vigil worker`: the scaled runtime's stream processors, on faust-streaming, with state in PostgreSQL.

faust runs the streams (consumer group, partition assignment, batching, offset commits); it holds no
Tables, because on tansu their changelog recovery silently loses the last batch (docs/SCALED_SPIKE.md).
Processor state sits behind the port (design rule 6) in the records database (`streams/pgstate.py`).

Per batch and source partition (the partitions of a batch run side by side, each in order), exactly what
the embedded runtime (`streams/runtime.py`) does:

1. drop events at or below the partition's applied offset (a replay after a crash or a rebalance); the
   applied offset in PostgreSQL, not faust's Kafka commit, is the partition's position: a record the
   consumer skipped (a hole after the applied offset: faust can deliver out of order around a rebalance,
   and commits past offsets it counts as a gap) is never stepped over. The batch is applied up to the
   hole, the consumer is sought back to it and the records past it wait for their turn (`Rewind`);
2. load the keys' state (cached per partition; the cache is dropped when the partition is assigned or
   revoked), step every event through the processor (an undecodable record is logged, counted, skipped);
3. apply the effects through `PortEffects` (vitals store, Kafka with acks=all, dead letters in PostgreSQL);
4. write the touched keys' state and the partition's last offset in ONE transaction;
5. only then return to faust, which acks the events and commits their Kafka offsets later.

A failure anywhere in 1-4 never leaves the agent: faust's `take_events` acks (and so commits) its buffer
when the agent body raises. The worker logs it, forgets the partition's cached state, backs off and retries
the same batch until it succeeds. A crash (`kill -9`) between 3 and 5 replays the batch: the state commit
makes step 1 skip what was applied, and effects are idempotent (vitals by key, dead letters by id). Emits to
Kafka are at-least-once: a crash after 3 and before 4 sends them again (consumers deduplicate by event id).

The processors write the live topic (vitals, device state, alerts, pages, NEWS2) to Kafka only; the live
relay (`vigil/relay.py`, on the API nodes unless VIGIL_LIVE_RELAY=worker) moves it to Redis, so a Redis
outage delays the boards and never the vitals or the alarms (docs/WORKER.md). With VIGIL_REDIS_URL set, the
worker reads websocket presence from Redis for escalation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from records.alerts import AlertStore
from records.db import Database
from records.deadletters import add_deadletters
from records.facts import EscalationDirectory
from streams import topics
from streams.clock import Clock, SystemClock
from streams.effects import Effect, EffectSink
from streams.kafka import KafkaBus, KafkaSettings, bootstrap_servers, ensure_topics, kafka_partition
from streams.metrics import PROCESSOR_ERRORS, REGISTRY, VITALS_BACKLOG
from streams.pgstate import SqlStateStore
from streams.ports import LogRecord, VitalsStore
from streams.processor import Processor
from streams.processors.admissions import AdmissionRouter
from streams.processors.deadletters import DeadLetterSink
from streams.processors.device import DeviceStage
from streams.redis_live import RedisPresence
from streams.schemas import DeadLetter, decode
from streams.sink import PortEffects
from streams.timers import DueIndex, TimedProcessor, build_index, step_one
from streams.vitals.sqlite import SqliteVitalsStore
from vigil.clinical import ClinicalHost
from vigil.ports_check import check_free
from vigil.relay import live_relay, redis_client, relay_role
from vigil.settings import Settings

log = logging.getLogger(__name__)

APP_ID = "vigil-worker"  # the Kafka consumer group of every worker process
BATCH = 4000  # events per take_events batch
BATCH_WITHIN = 0.05  # seconds take_events waits to fill a batch
BATCH_WITHIN_ENV = "VIGIL_WORKER_BATCH_WITHIN"  # override of BATCH_WITHIN (seconds): latency for throughput
FAIL_BATCHES_ENV = "VIGIL_WORKER_FAIL_BATCHES"  # test hook: the first K effect batches fail
INLINE_DELIVERY_ENV = "VIGIL_WORKER_INLINE_DELIVERY"  # 0: faust's own consumer (vigil/faust_consumer.py)
SKIP_EVERY_ENV = "VIGIL_WORKER_SKIP_EVERY"  # test hook: withhold the first delivery of every Nth event
VITALS_SQLITE_ENV = "VIGIL_VITALS_SQLITE"  # vitals in this SQLite file instead of the configured store
EXIT_ABORTED_BATCH = 70  # os._exit code when the worker is cancelled in the middle of a batch

EVENTS = Counter(
    "vigil_worker_events_total",
    "Events a worker stepped through a processor",
    ["processor"],
    registry=REGISTRY,
)
REPLAYED = Counter(
    "vigil_worker_replayed_total",
    "Redelivered events skipped because their offset was applied already",
    ["processor"],
    registry=REGISTRY,
)
UNDECODABLE = Counter(
    "vigil_worker_undecodable_total",
    "Records that could not be decoded (logged, skipped)",
    ["processor"],
    registry=REGISTRY,
)
STEP_ERRORS = Counter(
    "vigil_worker_step_errors_total",
    "Events a processor raised on (logged, skipped: a bug, never a reason to stall the partition)",
    ["processor"],
    registry=REGISTRY,
)
OFFSET_GAPS = Counter(
    "vigil_worker_offset_gaps_total",
    "Offsets of a source partition that the consumer skipped (never delivered to the processor)",
    ["processor"],
    registry=REGISTRY,
)
REWINDS = Counter(
    "vigil_worker_rewinds_total",
    "Times a worker sought a source partition back to a record its consumer had skipped",
    ["processor"],
    registry=REGISTRY,
)
BATCHES = Counter(
    "vigil_worker_batches_total", "Partition batches committed", ["processor"], registry=REGISTRY
)

Rewind = Callable[[str, int, int], Awaitable[bool]]
"""Seek (topic, partition) back to offset; False when the partition is no longer this worker's."""
Earliest = Callable[[str, int], Awaitable[int]]
"""The first offset Kafka still holds of (topic, partition)."""


# ------------------------------------------------------------------------------------------ the core


def partition_count(topic: str) -> int:
    return topics.PARTITIONS.get(topic, 1)


class BatchRunner:
    """Applies one partition's batch of one processor, retrying until it is durable (module docstring).

    `prepare` is awaited before every attempt (the worker starts its connections there, so a database or
    broker that is down at start-up is retried like any other failure)."""

    def __init__(
        self,
        proc: Processor[Any],
        store: Callable[[], SqlStateStore],
        sink: Callable[[], EffectSink],
        *,
        rewind: Rewind,
        earliest: Earliest,
        prepare: Callable[[], Awaitable[None]] | None = None,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
    ) -> None:
        self.proc = proc
        self._store = store
        self._sink = sink
        self._rewind = rewind
        self._earliest = earliest
        self._prepare = prepare
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._states: dict[tuple[str, int], dict[str, Any]] = {}
        self._applied: dict[tuple[str, int], int] = {}
        self._dues: dict[tuple[str, int], DueIndex | None] = {}
        self.healthy = True

    def invalidate(self, topic: str, partition: int) -> None:
        """Forget what is cached of a partition (assigned or revoked: another worker may have moved it)."""
        self._states.pop((topic, partition), None)
        self._applied.pop((topic, partition), None)
        self._dues.pop((topic, partition), None)

    async def run(self, topic: str, partition: int, records: Sequence[LogRecord]) -> None:
        """Returns only once the batch is applied and committed (or was applied before)."""
        delay = self._retry_initial
        name = self.proc.name
        while True:
            try:
                if self._prepare is not None:
                    await self._prepare()
                await self._once(topic, partition, records)
            except asyncio.CancelledError:
                raise
            except Exception:
                PROCESSOR_ERRORS.labels(name).inc()
                if self.healthy:
                    log.exception("processor %s %s/%d failed; retrying the batch", name, topic, partition)
                else:
                    log.warning("processor %s %s/%d still failing", name, topic, partition, exc_info=True)
                self.healthy = False
                self.invalidate(topic, partition)  # steps mutate state in place: reload it from the store
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            if not self.healthy:
                log.info("processor %s %s/%d recovered", name, topic, partition)
            self.healthy = True
            return

    async def _once(self, topic: str, partition: int, records: Sequence[LogRecord]) -> None:
        proc, name, tp = self.proc, self.proc.name, (topic, partition)
        store = self._store()
        applied = self._applied.get(tp)
        if applied is None:
            applied = self._applied[tp] = await store.applied(name, topic, partition)
        fresh = [r for r in records if r.offset > applied]
        if len(fresh) < len(records):
            REPLAYED.labels(name).inc(len(records) - len(fresh))
        if not fresh:
            return
        fresh = await self._in_turn(topic, partition, applied, fresh)
        if not fresh:  # nothing next in turn: the consumer was sought back to the hole
            return
        cache = self._states.setdefault(tp, {})
        if tp not in self._dues:  # a timed processor steps ticks through every due key of the partition
            mine: list[tuple[str, bytes]] = []
            if isinstance(proc, TimedProcessor):
                stored = await store.load_all(name)
                mine = [
                    (k, v)
                    for k, v in stored.items()
                    if kafka_partition(k, partition_count(topic)) == partition
                ]
            self._dues[tp] = build_index(proc, cache, mine)
        dues = self._dues[tp]
        missing = sorted({r.key for r in fresh if r.key not in cache})
        if missing:
            loaded = await store.load(name, missing)
            for k in missing:
                raw = loaded.get(k)
                cache[k] = None if raw is None else proc.decode_state(raw)
        before = {r.key: cache[r.key] is not None for r in fresh}  # had a stored row (ticked keys: always)
        effects: list[Effect] = []
        dirty: set[str] = set()
        for rec in fresh:
            try:
                event = decode(rec.value)
            except Exception:  # our own encoding: a record we cannot read is a bug, logged and counted
                log.exception("undecodable record %s/%d@%d skipped", rec.topic, rec.partition, rec.offset)
                UNDECODABLE.labels(name).inc()
                continue
            try:
                step_one(proc, cache, dues, rec.key, event, dirty, effects)
            except Exception:
                log.exception(
                    "processor %s raised on %s/%d@%d; event skipped", name, topic, partition, rec.offset
                )
                STEP_ERRORS.labels(name).inc()
                continue
        EVENTS.labels(name).inc(len(fresh))
        if effects:
            await self._sink().apply(effects)
        rows = [
            (name, k, None if cache[k] is None else proc.encode_state(cache[k]))
            for k in sorted(dirty)
            if cache[k] is not None or before.get(k, True)  # a stateless processor writes no rows at all
        ]
        last = fresh[-1].offset
        await store.commit(name, topic, partition, last, rows)
        self._applied[tp] = last
        BATCHES.labels(name).inc()

    async def _in_turn(
        self, topic: str, partition: int, applied: int, fresh: list[LogRecord]
    ) -> list[LogRecord]:
        """The records of `fresh` that come next after `applied`, without a hole; on a hole, seek the
        consumer back to it (the rest is delivered again, in order). Vigil's topics are neither compacted nor
        transactional, so a partition's offsets are contiguous: a hole is a record this worker never got."""
        expected = applied + 1 if applied >= 0 else await self._earliest(topic, partition)
        if all(r.offset == expected + i for i, r in enumerate(fresh)):  # the usual case: nothing to copy
            return fresh
        run: list[LogRecord] = []
        hole: LogRecord | None = None
        for r in fresh:
            if r.offset == expected:
                run.append(r)
                expected += 1
            elif r.offset > expected:
                hole = r
                break
            # else: delivered twice in one batch (a seek back re-reads what was still queued): once is enough
        if hole is None:
            return run
        if not run and expected < await self._earliest(topic, partition):
            # Gone from Kafka (retention) before any worker applied them: nothing can bring them back.
            OFFSET_GAPS.labels(self.proc.name).inc(hole.offset - expected)
            log.error(
                "processor %s %s/%d: offsets %d-%d expired from Kafka before they were applied",
                self.proc.name, topic, partition, expected, hole.offset - 1,
            )  # fmt: skip
            return await self._in_turn(topic, partition, hole.offset - 1, fresh)
        OFFSET_GAPS.labels(self.proc.name).inc(hole.offset - expected)
        REWINDS.labels(self.proc.name).inc()
        mine = await self._rewind(topic, partition, expected)
        log.warning(
            "processor %s %s/%d: offset %d was skipped by the consumer (got %d); %s",
            self.proc.name, topic, partition, expected, hole.offset,
            "sought back to it" if mine else "the partition has moved: its new owner resumes from it",
        )  # fmt: skip
        return run


class SkippingConsumer:
    """Test hook (`VIGIL_WORKER_SKIP_EVERY=N`): the first delivery of every Nth event record (ticks pass) is
    withheld from the processors, as a consumer that skipped a record would do; the runner must notice and
    seek back."""

    def __init__(self, every: int) -> None:
        self._every = every
        self._n = 0
        self._withheld: set[tuple[str, int, int]] = set()

    def keep(self, topic: str, partition: int, offset: int, key: str) -> bool:
        tpo = (topic, partition, offset)
        if topics.tick_partition(key) is not None or tpo in self._withheld:
            return True
        self._n += 1
        if self._n % self._every:
            return True
        self._withheld.add(tpo)
        return False


class FaustPosition:
    """`Rewind` and `Earliest` over the faust app's consumer (`app` is set once the app is built)."""

    def __init__(self) -> None:
        self.app: Any = None

    async def rewind(self, topic: str, partition: int, offset: int) -> bool:
        from faust.types import TP  # noqa: PLC0415

        consumer = self.app.consumer
        tp = TP(topic, partition)
        if tp not in consumer.assignment():
            return False
        # In the consumer's own thread (aiokafka's seek is not thread-safe), and it sets faust's read offset.
        await consumer._thread.seek_wait({tp: offset})
        return True

    async def earliest(self, topic: str, partition: int) -> int:
        from faust.types import TP  # noqa: PLC0415

        tp = TP(topic, partition)
        found = await self.app.consumer.earliest_offsets(tp)
        return int(found[tp])


class FailingFirst:
    """Test hook (`VIGIL_WORKER_FAIL_BATCHES=K`): the first K effect batches raise before anything is
    applied, as a vitals store or database that is down would."""

    def __init__(self, inner: EffectSink, failures: int) -> None:
        self._inner = inner
        self.left = failures

    async def apply(self, effects: Sequence[Effect]) -> None:
        if self.left > 0:
            self.left -= 1
            raise ConnectionError(f"{FAIL_BATCHES_ENV}: injected effect failure ({self.left} left)")
        await self._inner.apply(effects)


# ---------------------------------------------------------------------------------- the worker process


def make_vitals(settings: Settings, clock: Clock, env: dict[str, str]) -> VitalsStore:
    """`VIGIL_VITALS_SQLITE=path` (tests, single-box runs), else as the embedded hub configures it: SQLite in
    the data dir, or the InfluxDB protocol behind the on-disk write-behind buffer."""
    path = env.get(VITALS_SQLITE_ENV)
    if path:
        return SqliteVitalsStore(Path(path))
    from vigil.embedded import make_vitals_store  # noqa: PLC0415 - pulls in the whole embedded hub

    store, buffer = make_vitals_store(settings, clock)
    if buffer is not None:  # read at each scrape: the points this process holds on disk for the store
        VITALS_BACKLOG.set_function(buffer.backlog)
    return store


@dataclass
class Services:
    """The worker's connections, opened on faust's event loop at the first batch (and retried from there)."""

    settings: Settings
    env: dict[str, str]
    clock: Clock = field(default_factory=SystemClock)
    db: Database | None = None
    store: SqlStateStore | None = None
    bus: KafkaBus | None = None
    redis: Any = None
    vitals: VitalsStore | None = None
    sink: EffectSink | None = None
    clinical: ClinicalHost | None = None
    _lock: asyncio.Lock | None = None

    def started(self) -> bool:
        return self.sink is not None

    async def prepare(self) -> None:
        if self.started():
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.started():
                return
            s = self.settings
            assert s.database_url is not None and s.kafka_url is not None  # checked by main()
            if self.db is None:
                self.db = Database(s.database_url)
                self.store = SqlStateStore(self.db)
            if self.vitals is None:
                vitals = make_vitals(s, self.clock, self.env)
                await vitals.start()
                self.vitals = vitals
            if self.bus is None:
                bus = KafkaBus(KafkaSettings(bootstrap_servers(s.kafka_url), client_id=APP_ID))
                await bus.start()
                self.bus = bus
            db = self.db

            async def deadletters(items: Sequence[DeadLetter]) -> None:
                await add_deadletters(db, items)

            if self.clinical is not None:
                presence = self._presence(s.redis_url)
                self.clinical.attach(EscalationDirectory(db), presence)
                await self.clinical.start()
            sink: EffectSink = PortEffects(
                bus=self.bus,
                vitals=self.vitals,
                deadletters=deadletters,
                clock=self.clock,
                alerts=AlertStore(db),
            )
            failures = int(self.env.get(FAIL_BATCHES_ENV, "0") or 0)
            if failures > 0:
                log.warning(
                    "%s=%d: the first %d effect batches will fail", FAIL_BATCHES_ENV, failures, failures
                )
                sink = FailingFirst(sink, failures)
            self.sink = sink

    def _presence(self, url: str | None) -> Callable[[], Awaitable[frozenset[str]]]:
        """Who is connected to any API node (Redis), for escalation; nobody without Redis. While Redis fails,
        the last set read (escalation must neither stall nor treat everyone as gone because Redis is)."""
        if not url:

            async def nobody() -> frozenset[str]:
                return frozenset()

            return nobody
        if self.redis is None:
            self.redis = redis_client(url)
        presence = RedisPresence(self.redis, self.clock)
        last: frozenset[str] = frozenset()

        async def connected() -> frozenset[str]:
            nonlocal last
            try:
                last = await presence.connected()
            except Exception:
                log.warning("presence not read from Redis; keeping the last %d users", len(last))
            return last

        return connected

    def the_store(self) -> SqlStateStore:
        assert self.store is not None
        return self.store

    def the_sink(self) -> EffectSink:
        assert self.sink is not None
        return self.sink


async def _handle(
    runner: BatchRunner, events: Sequence[Any], skipping: SkippingConsumer | None = None
) -> None:
    """One take_events batch: each source partition in order, the partitions side by side (each commits its
    own state and offset). Never raises, except on cancellation."""
    parts: dict[tuple[str, int], list[LogRecord]] = {}
    for ev in events:
        m = ev.message
        key = m.key.decode() if isinstance(m.key, bytes) else str(m.key or "")
        if skipping is not None and not skipping.keep(m.topic, m.partition, m.offset, key):
            continue
        parts.setdefault((m.topic, m.partition), []).append(
            LogRecord(m.topic, m.partition, m.offset, key, m.value)
        )
    try:
        # Partitions are independent (own keys, state, offset): their round trips overlap.
        await asyncio.gather(*(runner.run(t, p, recs) for (t, p), recs in parts.items()))
    except asyncio.CancelledError:
        # faust would now ack (and could commit) the unapplied buffer: die as a kill -9 would, which is safe.
        log.critical("worker cancelled in the middle of a batch; exiting without acknowledging it")
        logging.shutdown()
        os._exit(EXIT_ABORTED_BATCH)


def build_app(
    settings: Settings,
    runners: Sequence[BatchRunner],
    *,
    within: float = BATCH_WITHIN,
    position: FaustPosition | None = None,
    skipping: SkippingConsumer | None = None,
    inline_delivery: bool = True,
) -> Any:
    """The faust app: one batching agent per processor, no Tables, no web server."""
    from vigil.faust_app import App, RawSchema  # noqa: PLC0415 - faust: slow import, only for the worker

    assert settings.kafka_url is not None
    broker = ";".join(f"kafka://{s}" for s in bootstrap_servers(settings.kafka_url))
    app = App(
        APP_ID,
        broker=broker,
        store="memory://",  # no Tables: state lives in the records database
        processing_guarantee="at_least_once",
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=6.0,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=16384,
        web_enabled=False,
        datadir=str(settings.data_dir / "faust"),
    )
    if inline_delivery:
        from vigil.faust_consumer import Transport  # noqa: PLC0415 - imports faust

        app.transport = Transport(app.conf.broker_consumer, app)
    by_topic = {r.proc.topic: r for r in runners}

    def agent_for(runner: BatchRunner) -> Callable[[Any], Awaitable[None]]:
        async def process(stream: Any) -> None:
            async for events in stream.take_events(BATCH, within=within):
                await _handle(runner, events, skipping)

        return process

    for runner in runners:
        topic = app.topic(
            runner.proc.topic,
            schema=RawSchema(),
            partitions=topics.PARTITIONS.get(runner.proc.topic),
        )
        app.agent(topic, name=f"vigil-{runner.proc.name}")(agent_for(runner))

    def forget(tps: Any) -> None:
        for tp in tps:
            r = by_topic.get(tp.topic)
            if r is not None:
                r.invalidate(tp.topic, tp.partition)

    async def on_assigned(sender: Any, *args: Any, signal: Any, **_: Any) -> None:
        forget(args[0] if args else _.get("assigned", ()))

    async def on_revoked(sender: Any, *args: Any, signal: Any, **_: Any) -> None:
        forget(args[0] if args else _.get("revoked", ()))

    app.on_partitions_assigned.connect(cast(Any, on_assigned))
    app.on_partitions_revoked.connect(cast(Any, on_revoked))
    if position is not None:
        position.app = app
    return app


async def _serve_http(host: str, port: int, runners: Sequence[BatchRunner]) -> None:
    """/healthz (200 while every processor's last batch went through, else 503) and /metrics."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else "/"
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
            elif path in ("/healthz", "/readyz"):
                failing = [r.proc.name for r in runners if not r.healthy]
                status = "503 Service Unavailable" if failing else "200 OK"
                ctype = "application/json"
                body = json.dumps({"status": "failing" if failing else "ok", "failing": failing}).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    async with server:
        await server.serve_forever()


async def _prepare_cluster(settings: Settings) -> None:
    """Migrate the records database and create Vigil's topics before faust subscribes (tansu would
    auto-create a missing topic with its own partition count)."""
    assert settings.database_url is not None and settings.kafka_url is not None
    db = Database(settings.database_url)
    try:
        await db.migrate()
    finally:
        await db.close()
    await ensure_topics(bootstrap_servers(settings.kafka_url))


def main(settings: Settings, env: dict[str, str] | None = None) -> None:
    """`vigil worker`: runs until SIGTERM/SIGINT (kill -9 at any moment loses nothing)."""
    e = dict(os.environ) if env is None else env
    if not settings.database_url:
        raise SystemExit("vigil worker: set VIGIL_DATABASE_URL (PostgreSQL holds the processors' state)")
    if not settings.kafka_url:
        raise SystemExit("vigil worker: set VIGIL_KAFKA_URL (kafka://host:port)")
    relay_role(e)  # a bad VIGIL_LIVE_RELAY stops the worker here, before it joins the group
    if settings.http_port:
        check_free(settings.host, [("VIGIL_HTTP_PORT", settings.http_port, socket.SOCK_STREAM)])
    asyncio.run(_prepare_cluster(settings))
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level of datadir

    import faust  # noqa: PLC0415

    services = Services(settings, e)
    services.clinical = ClinicalHost(settings, services.clock)
    processors: tuple[Processor[Any], ...] = (
        DeviceStage(),
        DeadLetterSink(),
        AdmissionRouter(),
        services.clinical.engine,
    )
    position = FaustPosition()
    runners = [
        BatchRunner(
            proc,
            services.the_store,
            services.the_sink,
            rewind=position.rewind,
            earliest=position.earliest,
            prepare=services.prepare,
        )
        for proc in processors
    ]
    every = int(e.get(SKIP_EVERY_ENV) or 0)
    if every > 0:
        log.warning("%s=%d: the first delivery of every %dth event is withheld", SKIP_EVERY_ENV, every, every)
    app = build_app(
        settings,
        runners,
        within=float(e.get(BATCH_WITHIN_ENV) or BATCH_WITHIN),
        position=position,
        skipping=SkippingConsumer(every) if every > 0 else None,
        inline_delivery=e.get(INLINE_DELIVERY_ENV, "1") != "0",
    )
    if settings.http_port:

        async def http() -> None:
            await _serve_http(settings.host, settings.http_port, runners)

        app.task(http)
    relay = live_relay(settings, e, "worker")
    if relay is not None:

        async def relay_live() -> None:
            await relay.run()

        app.task(relay_live)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sys.argv = [sys.argv[0], "worker"]  # faust.Worker must not read `vigil`'s own arguments
    worker = faust.Worker(app, loop=loop, loglevel=e.get("VIGIL_LOG_LEVEL", "info").lower())
    worker.execute_from_commandline()


if __name__ == "__main__":
    from vigil.settings import load

    main(load())
