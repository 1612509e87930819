"""The scaled runtime's bus: Kafka (any Kafka-protocol broker) behind the gateway's `Appender` port.

`KafkaBus.append` is durable once it returns: every record is sent with `acks="all"` and the call awaits
every delivery report. A failure (broker down, a timeout, a refused record) raises, so the `Ingestor`
answers UNAVAILABLE and the transport withholds its acknowledgement (MQTT PUBACK, CoAP 2.04).

Keys: each record is keyed by its key string's UTF-8 bytes and placed by the producer's default
partitioner (murmur2 of the key, as in the Java client, so faust and Java producers agree). The embedded
SQLite log places keys by crc32 instead; what both guarantee, and what the processors rely on, is that one
key always lands in one partition of its topic, in the order it was appended.

Values are the bus encoding of `streams/schemas.py` (`{"_s": schema, "_v": version, "d": ...}`): the schema
name and version travel inside every record, as in the SQLite log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2
from prometheus_client import Counter

from streams import topics
from streams.metrics import REGISTRY
from streams.topics import tick_partition

log = logging.getLogger(__name__)

APPEND_FAILURES = Counter(
    "vigil_kafka_append_failures_total",
    "Appends to Kafka that failed (nothing acknowledged upstream for them)",
    registry=REGISTRY,
)
KAFKA_RECORDS = Counter(
    "vigil_kafka_records_total", "Records made durable in Kafka", ["topic"], registry=REGISTRY
)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
TOPIC_ALREADY_EXISTS = 36  # Kafka error code of CreateTopics for a topic that is there already

# Retention by topic (ms). Events are kept a week: long enough to rebuild a worker's state or replay a
# consumer after an outage; the live feed only serves the websocket replay window (design: one hour).
RETENTION_MS: dict[str, int] = {
    topics.INGEST: 7 * DAY_MS,
    topics.CLINICAL: 7 * DAY_MS,
    topics.DISPATCH: 7 * DAY_MS,
    topics.DEADLETTERS: 14 * DAY_MS,  # also kept in the records database; here for reprocessing
    topics.ADMISSIONS: 7 * DAY_MS,
    topics.LIVE: HOUR_MS,
}
# State topics (latest value per key) are compacted, not deleted by age. The bus topics above are event
# streams; faust creates its own table changelogs (compacted) for the workers' state.
COMPACTED: frozenset[str] = frozenset()


class _Throttle(logging.Filter):
    """Lets each kind of aiokafka complaint through once per `every` seconds, with a count of the rest.

    While a broker is down aiokafka logs every retry (several lines every 100 ms); Vigil logs the outage
    itself (the failed append, the held messages), so one line of each kind now and then is enough.
    """

    def __init__(self, every: float = 30.0) -> None:
        super().__init__()
        self._every = every
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        kind = f"{record.name}:{str(record.msg)[:40]}"
        last, skipped = self._last.get(kind, (float("-inf"), 0))
        if record.created - last < self._every:
            self._last[kind] = (last, skipped + 1)
            return False
        self._last[kind] = (record.created, 0)
        if skipped:
            record.msg = f"{record.msg} ({skipped} similar messages not logged)"
        return True


_AIOKAFKA_LOGGERS = ("aiokafka", "aiokafka.conn", "aiokafka.producer.sender", "aiokafka.producer.producer")


def quiet_aiokafka(every: float = 30.0) -> None:
    """Install `_Throttle` on aiokafka's producer-side loggers (idempotent)."""
    for name in _AIOKAFKA_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Throttle) for f in logger.filters):
            logger.addFilter(_Throttle(every))


def kafka_partition(key: str, partitions: int) -> int:
    """The partition aiokafka's default partitioner picks for `key` (murmur2, as the Java client)."""
    tick = tick_partition(key)
    if tick is not None:
        return tick % partitions
    return (int(murmur2(key.encode())) & 0x7FFFFFFF) % partitions


def bootstrap_servers(url: str) -> list[str]:
    """`kafka://h1:9092,h2:9092` (or `tcp://`, or bare `h:p`) -> ["h1:9092", "h2:9092"]."""
    rest = url.split("://", 1)[1] if "://" in url else url
    rest = rest.split("/", 1)[0]
    servers = [s.strip() for s in rest.split(",") if s.strip()]
    if not servers:
        raise ValueError(f"no Kafka broker in {url!r}")
    return [s if ":" in s else f"{s}:9092" for s in servers]


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap: Sequence[str]
    client_id: str = "vigil-gateway"
    # aiokafka's idempotent producer is refused by tansu (the Kafka-compatible broker the tests and the local
    # scaled run use), so it is off by default. On Apache Kafka (or Redpanda) switch it on: retries can then
    # never write a record twice. Without it a retried batch may be duplicated, which the device stage's
    # dedup on the event id absorbs (redelivery is normal: design.md rule 3).
    idempotent: bool = False
    linger_ms: int = 2  # a small wait lets concurrent appends share one produce request
    # Bytes of one record batch. A partition has one batch in flight at a time, so a worker's append of a few
    # thousand records to one partition (the live topic has one) costs a round trip per batch: aiokafka's
    # 16 KiB made that dozens of round trips per worker batch. Kept under the broker's 1 MiB message limit.
    max_batch_size: int = 512 * 1024
    delivery_timeout: float = 5.0  # seconds an append may take before it fails (and nothing is acked)
    connect_timeout: float = 30.0  # seconds `start()` keeps trying to reach the cluster


def _compression() -> str | None:
    """lz4 when its library is installed (cheap on CPU, good on JSON), else none."""
    try:
        import lz4.frame  # noqa: F401, PLC0415
    except ImportError:
        return None
    return "lz4"


class KafkaBus:
    """`gateway.ingest.Appender` over an aiokafka producer (see the module docstring)."""

    def __init__(self, settings: KafkaSettings, *, required_topics: Iterable[str] = ()) -> None:
        self._s = settings
        self._required = tuple(required_topics)
        self._producer: AIOKafkaProducer | None = None
        self._counts: dict[str, int] = {}  # partitions per topic

    async def start(self) -> None:
        """Connect (retrying up to `connect_timeout`); raises ConnectionError if the cluster never answers."""
        s = self._s
        quiet_aiokafka()
        deadline = asyncio.get_running_loop().time() + s.connect_timeout
        delay = 0.2
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=list(s.bootstrap),
                client_id=s.client_id,
                acks="all",
                enable_idempotence=s.idempotent,
                linger_ms=s.linger_ms,
                max_batch_size=s.max_batch_size,
                compression_type=_compression(),
                request_timeout_ms=max(1000, int(s.delivery_timeout * 1000)),
                retry_backoff_ms=100,
            )
            try:
                await producer.start()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise ConnectionError(f"Kafka at {','.join(s.bootstrap)} does not answer: {exc}") from exc
                log.warning("Kafka at %s does not answer (%s); retrying", ",".join(s.bootstrap), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._producer = producer
            log.info("Kafka producer connected to %s", ",".join(s.bootstrap))
            return

    async def stop(self) -> None:
        """Flush what is pending (bounded by the delivery timeout) and disconnect."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), self._s.delivery_timeout + 5)
            except Exception:
                log.warning("Kafka producer did not stop cleanly", exc_info=True)

    async def close(self) -> None:
        await self.stop()

    async def append(self, records: Sequence[tuple[str, str, bytes]]) -> None:
        """Send every record keyed; return once all are acknowledged by all in-sync replicas, else raise.

        Records are grouped by partition (`kafka_partition`, the producer's own placement) and each group
        goes as whole record batches (`create_batch`/`send_batch`), in order: one call into the producer per
        batch rather than per record."""
        producer = self._producer
        if producer is None:
            APPEND_FAILURES.inc()
            raise ConnectionError("Kafka producer is not started")
        futures: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(self._s.delivery_timeout):
                groups: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}
                for topic, key, value in records:
                    n = self._counts.get(topic) or await self._partition_count(producer, topic)
                    groups.setdefault((topic, kafka_partition(key, n)), []).append((key.encode(), value))
                for (topic, partition), items in groups.items():
                    batch = producer.create_batch()
                    for k, v in items:
                        if batch.append(key=k, value=v, timestamp=None) is None:  # full: send it, go on
                            futures.append(await producer.send_batch(batch, topic, partition=partition))
                            batch = producer.create_batch()
                            if batch.append(key=k, value=v, timestamp=None) is None:
                                raise ValueError(f"a record of {len(v)} bytes does not fit a batch")
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                results = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException:
            APPEND_FAILURES.inc()
            for f in futures:  # delivery reports still pending: nobody will read them
                f.add_done_callback(_ignore_result)
            raise
        for r in results:
            if isinstance(r, BaseException):
                APPEND_FAILURES.inc()
                raise r
        for (topic, _), items in groups.items():
            KAFKA_RECORDS.labels(topic).inc(len(items))

    async def _partition_count(self, producer: AIOKafkaProducer, topic: str) -> int:
        """The topic's partition count from the cluster's metadata, kept (Vigil never changes it live:
        docs/TOPICS.md)."""
        found = await producer.partitions_for(topic)
        if not found:
            raise ConnectionError(f"Kafka has no partitions for {topic}")
        self._counts[topic] = len(found)
        return len(found)

    async def ready(self) -> bool:
        """The cluster answers a metadata request and the topics this process writes exist."""
        producer = self._producer
        if producer is None:
            return False
        try:
            # A metadata request for every topic: unlike one naming topics, it never auto-creates any.
            cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), 3)
        except Exception:
            return False
        present = cluster.topics()
        return all(t in present for t in self._required)


def _ignore_result(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()


async def ensure_topics(
    bootstrap: Sequence[str] | str,
    partitions: Mapping[str, int] = topics.PARTITIONS,
    *,
    retention_ms: Mapping[str, int] = RETENTION_MS,
    compacted: Iterable[str] = COMPACTED,
    replication: int | None = None,
    timeout: float = 15.0,
) -> dict[str, int]:
    """Create the topics that are missing (idempotent); answers each topic's partition count as found.

    Existing topics are never altered: a topic with fewer partitions than wanted is logged, since adding
    partitions to a keyed topic moves keys (an operator decision). Replication defaults to min(3, brokers),
    with `min.insync.replicas` 2 when there are 3 replicas, so that `acks=all` means two copies.
    """
    servers = bootstrap_servers(bootstrap) if isinstance(bootstrap, str) else list(bootstrap)
    compact = set(compacted)
    admin = AIOKafkaAdminClient(bootstrap_servers=servers, request_timeout_ms=int(timeout * 1000))
    await asyncio.wait_for(admin.start(), timeout)
    try:
        if replication is None:
            meta = await asyncio.wait_for(admin.describe_cluster(), timeout)
            replication = max(1, min(3, len(meta.get("brokers", [])) or 1))
        existing = set(await asyncio.wait_for(admin.list_topics(), timeout))
        wanted = []
        for name, count in partitions.items():
            if name in existing:
                continue
            configs = {"cleanup.policy": "compact" if name in compact else "delete"}
            if name in retention_ms and name not in compact:
                configs["retention.ms"] = str(retention_ms[name])
            if replication >= 3:
                configs["min.insync.replicas"] = "2"
            wanted.append(NewTopic(name, count, replication, topic_configs=configs))
        if wanted:
            response = await asyncio.wait_for(admin.create_topics(wanted), timeout)
            for name, code, message in _topic_errors(response):
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    raise RuntimeError(f"could not create Kafka topic {name}: error {code} {message}")
            log.info("created Kafka topics %s", ", ".join(t.name for t in wanted))
        found: dict[str, int] = {}
        for desc in await asyncio.wait_for(admin.describe_topics(list(partitions)), timeout):
            found[desc["topic"]] = len(desc.get("partitions", []))
        for name, count in partitions.items():
            if found.get(name, 0) < count:
                log.warning(
                    "Kafka topic %s has %d partitions, Vigil wants %d", name, found.get(name, 0), count
                )
        return found
    finally:
        await admin.close()


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    out = []
    for item in getattr(response, "topic_errors", []):
        name, code = item[0], item[1]
        message = item[2] if len(item) > 2 else None
        out.append((str(name), int(code), message))
    return out
