"""The scaled live feed: a Redis Stream per site, filled from `vigil.live.v1` by the workers' relay.

Cursors are the live topic's Kafka offsets (plus one), as the embedded runtime's are its log offsets: the
topic has one partition, so its offsets are one number line across every site. `LiveRelay` (run by every
`vigil worker`; one of them at a time holds the partition, through the consumer group `vigil-live-relay`)
reads the topic in offset order and appends each record to its site's stream under the id `{offset+1}-0`.
A node reads all site streams in one MULTI/EXEC and merges them by number, so every node sees the same
records under the same cursors, and a cursor from one node resumes on any other after a reconnect.

The relay's position is kept in Redis itself (`vigil:live:seq`, the newest cursor appended), written by the
same Lua script, atomically with the record: a retried or replayed record at or below it is skipped, so
nothing is appended twice and nothing is skipped. A relay that finds the position BELOW what it already
wrote (Redis restarted without its data, or lost its last second of AOF) seeks back to that position and
replays from Kafka (which keeps the live topic an hour): the site streams and latest values are rebuilt under
the same cursors, and the API nodes, whose positions are ahead, push only what they had not. When Redis is
down the relay retries the same records until it answers: the boards wait, the stream processors (vitals,
alarms) never do, because they only write the live topic to Kafka (docs/WORKER.md).

Idempotent by record id too: the worker emits to Kafka at least once (a crash between its effects and its
state commit re-emits a batch under new offsets), so the script also claims `vigil:live:seen:{event key}`
(SET NX, kept as long as the replay window); a copy advances the position and appends nothing. About 100
bytes of Redis memory per live record in the window.

Trimming by age: the script keeps a coarse clock (`vigil:live:marks`, one number per second) and, once a
second, trims every site stream below the first number written at least `retention` ago (XTRIM MINID,
exact), then records the highest number that may have been trimmed in `vigil:live:trimmed`. `oldest()` is
that plus one: a resume from before it answers `resync` (some record after the client's cursor is gone). A
relay that resumes past records it never appended (Kafka's retention deleted them first) marks them trimmed
the same way.

`RedisLatest` keeps the newest value per code of each patient (hash `vigil:latest:patient:{id}`, code ->
JSON of value/unit/ts/flags/device_id), written by the relay, read by the API's patient snapshot and board.

The live topic's offsets must only grow: if the topic is deleted and recreated, delete `vigil:live:*` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis

from streams.clock import Clock
from streams.inturn import InTurn
from streams.live import LiveRecord
from streams.metrics import PROCESSOR_ERRORS, REGISTRY
from streams.ports import VitalPoint, VitalsStore
from streams.schemas import Alert, Event, LiveUpdate, decode, encode

log = logging.getLogger(__name__)

PREFIX = "vigil:live"
LATEST_PREFIX = "vigil:latest:patient"
DEFAULT_RETENTION_S = 3600.0  # the replay window is at least 10 minutes (contract section 6)
MIN_RETENTION_S = 600.0
LATEST_TTL_S = 7 * 86400  # a patient's latest values are forgotten a week after the last one
NO_SITE = "_"
RELAY_GROUP = "vigil-live-relay"  # the Kafka consumer group of the workers' relays
RELAY_BATCH = 500  # live records per relay batch
RELAY_TIMEOUT_S = 5.0  # a Redis call that takes longer has failed (a hung Redis must not hang the relay)

RELAYED = Counter("vigil_live_relayed_total", "Live records the relay appended to Redis", registry=REGISTRY)
RELAY_FAILING = Gauge(
    "vigil_live_relay_failing", "1 while the relay cannot write to Redis (the boards wait)", registry=REGISTRY
)
RELAY_REWINDS = Counter(
    "vigil_live_relay_rewinds_total",
    "Times the relay got a live record past one it was never given and sought back to it",
    registry=REGISTRY,
)
RELAY_EXPIRED = Counter(
    "vigil_live_relay_expired_total",
    "Live records that left Kafka (retention) before the relay moved them to Redis",
    registry=REGISTRY,
)
RELAY_REPLAYS = Counter(
    "vigil_live_relay_replays_total",
    "Times the relay found Redis holding less than it wrote and replayed from Kafka",
    registry=REGISTRY,
)

# Appends a batch of live records in one call (one round trip, one command to encode).
# KEYS: seq, sites, marks, trimmed. ARGV: expected position, resumed (1: the first record was read right
# after a seek), retention ms, seen ttl s, prefix, then per record: site, payload, cursor, dedup key.
# Answers per record the cursor appended; 0: at or below the position, or a copy (skipped); -1: the
# position is below what the relay wrote before (Redis lost data): nothing more is written (every result
# from there on is -1), and the relay seeks back and replays.
_APPEND_MANY = """
local expected = tonumber(ARGV[1])
local retention = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local prefix = ARGV[5]
local out = {}
local function one(site, payload, n, seen, resumed)
  local last = tonumber(redis.call('GET', KEYS[1]) or '0')
  if n <= last then return 0 end
  if last < expected then return -1 end
  if resumed and n - 1 > last then
    local was = tonumber(redis.call('GET', KEYS[4]) or '0')
    if n - 1 > was then redis.call('SET', KEYS[4], n - 1) end
  end
  redis.call('SET', KEYS[1], n)
  if not redis.call('SET', prefix .. ':seen:' .. seen, '1', 'NX', 'EX', ttl) then return 0 end
  redis.call('SADD', KEYS[2], site)
  redis.call('XADD', prefix .. ':' .. site, n .. '-0', 'e', payload)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local marks = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
  if #marks == 0 or now - tonumber(marks[2]) >= 1000 then
    redis.call('ZADD', KEYS[3], now, n)
    local cut = redis.call('ZREVRANGEBYSCORE', KEYS[3], now - retention, '-inf',
      'WITHSCORES', 'LIMIT', 0, 1)
    if #cut > 0 then
      local c = tonumber(cut[1])
      for _, s in ipairs(redis.call('SMEMBERS', KEYS[2])) do
        redis.call('XTRIM', prefix .. ':' .. s, 'MINID', c .. '-0')
      end
      local was = tonumber(redis.call('GET', KEYS[4]) or '0')
      if c - 1 > was then redis.call('SET', KEYS[4], c - 1) end
      redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. cut[2])
    end
  end
  return n
end
local failed = false
for i = 6, #ARGV, 4 do
  if failed then
    out[#out + 1] = -1
  else
    local r = one(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], i == 6 and ARGV[2] == '1')
    if r == -1 then failed = true end
    out[#out + 1] = r
  end
end
return out
"""

# KEYS: the patient's hash. ARGV: ttl s, then (code, ts, json) triples. Newest device time per code wins.
_LATEST = """
for i = 2, #ARGV, 3 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if (not old) or cjson.decode(old).ts <= tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


def site_of(event: Event) -> str:
    site = getattr(event, "site_id", None)
    return site if isinstance(site, str) and site else NO_SITE


def event_key(event: Event) -> str:
    """What a redelivered copy of `event` has in common with it: its schema, id (and alert version)."""
    schema = getattr(event, "SCHEMA", type(event).__name__)
    ident = getattr(event, "id", None)
    if ident is None:
        meta = getattr(event, "meta", None)
        ident = getattr(meta, "id", None)
    if ident is None:  # no id to deduplicate by: the content is the identity
        return f"{schema}:h:{hashlib.sha256(encode(event)).hexdigest()[:32]}"
    if isinstance(event, Alert):
        return f"{schema}:{ident}:{event.version}"
    return f"{schema}:{ident}"


@dataclass(frozen=True, slots=True)
class LiveIn:
    """One record of the live topic as the relay appends it: its cursor (offset + 1) and its bytes."""

    cursor: int
    value: bytes
    event: Event | None  # None: undecodable here (a newer schema); appended as it is, readers step over it


class RedisLiveWriter:
    """Appends live records to the site streams at their cursors, idempotently (the relay's side)."""

    def __init__(
        self, redis: Redis, *, retention_s: float = DEFAULT_RETENTION_S, prefix: str = PREFIX
    ) -> None:
        self._redis = redis
        self._retention_ms = max(1000, int(retention_s * 1000))  # callers keep it >= MIN_RETENTION_S
        self._prefix = prefix
        self._many = redis.register_script(_APPEND_MANY)

    async def position(self) -> int:
        """The newest cursor appended (0: none; Redis is empty or was restarted without its data)."""
        return int(await self._redis.get(f"{self._prefix}:seq") or 0)

    async def append(self, records: Sequence[LiveIn], *, expected: int, resumed: bool = False) -> list[int]:
        """Append in cursor order, given the position the caller knows Redis holds (`expected`).

        Answers per record its cursor, 0 when it was appended before (or is a copy), -1 when Redis holds less
        than `expected` (it lost data: seek back to `position()` and replay). `resumed`: the first record is
        the first read after a seek, so cursors skipped before it are gone for good (marked trimmed).
        """
        if not records:
            return []
        p = self._prefix
        args: list[bytes | str | int] = [
            expected,
            1 if resumed else 0,
            self._retention_ms,
            self._retention_ms // 1000,
            p,
        ]
        for r in records:
            if r.event is None:
                site, key = NO_SITE, f"raw:{hashlib.sha256(r.value).hexdigest()[:32]}"
            else:
                site, key = site_of(r.event), event_key(r.event)
            args.extend((site, r.value, r.cursor, key))
        got = await self._many(keys=[f"{p}:seq", f"{p}:sites", f"{p}:marks", f"{p}:trimmed"], args=args)
        return [int(x) for x in got]


class RedisLiveFeed:
    """The `LiveFeed` port over the site streams (an API node's side). See the module docstring."""

    def __init__(self, redis: Redis, *, prefix: str = PREFIX) -> None:
        self._redis = redis
        self._prefix = prefix
        self._end = 1  # numbers start at 1; refreshed by every read
        self._oldest = 1

    def end(self) -> int:
        return self._end

    async def refresh(self) -> None:
        seq, trimmed = await self._redis.mget([f"{self._prefix}:seq", f"{self._prefix}:trimmed"])
        self._end = max(self._end, int(seq or 0) + 1)
        self._oldest = int(trimmed or 0) + 1

    async def oldest(self) -> int:
        await self.refresh()
        return self._oldest

    async def _sites(self) -> list[str]:
        raw = await self._redis.smembers(f"{self._prefix}:sites")
        return sorted(s.decode() if isinstance(s, bytes) else str(s) for s in raw)

    async def after(self, cursor: int, limit: int = 1000) -> Sequence[LiveRecord]:
        sites = await self._sites()
        pipe = self._redis.pipeline(transaction=True)  # one snapshot of every stream: no number skipped
        pipe.get(f"{self._prefix}:seq")
        for s in sites:
            pipe.xrange(f"{self._prefix}:{s}", f"({max(cursor, 0)}-0", "+", count=limit)
        seq, *ranges = await pipe.execute()
        self._end = max(self._end, int(seq or 0) + 1)
        merged: list[tuple[int, bytes]] = []
        for entries in ranges:
            for sid, fields in entries:
                merged.append((_number(sid), fields[b"e"]))
        merged.sort(key=lambda x: x[0])
        return [LiveRecord(n, decode(payload)) for n, payload in merged[:limit]]

    async def wait(self, cursor: int, timeout: float) -> None:
        if self._end - 1 > cursor:
            return
        sites = await self._sites()
        if not sites:
            await asyncio.sleep(min(timeout, 0.5))
            return
        start = f"{max(cursor, 0)}-0"
        streams: dict[Any, Any] = {f"{self._prefix}:{s}": start for s in sites}
        # Capped, so a site stream that appears meanwhile is followed within a second.
        await self._redis.xread(streams, count=1, block=max(1, int(min(timeout, 1.0) * 1000)))

    async def ping(self) -> bool:
        return bool(await self._redis.ping())


def _number(stream_id: bytes | str) -> int:
    raw = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(raw.split("-", 1)[0])


class RedisLatest:
    """The newest value per code of each patient (written by the worker, read by the API nodes)."""

    def __init__(self, redis: Redis, *, prefix: str = LATEST_PREFIX, ttl_s: int = LATEST_TTL_S) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl = ttl_s
        self._script = redis.register_script(_LATEST)

    async def write(self, updates: Iterable[LiveUpdate]) -> None:
        """Record the vitals of `updates`; an older device time never replaces a newer value."""
        pipe = self._redis.pipeline(transaction=False)
        n = 0
        for u in updates:
            if u.kind != "vitals" or not u.patient_id or not u.items:
                continue
            args: list[Any] = [self._ttl]
            for item in u.items:
                doc = {
                    "value": item.value,
                    "unit": item.unit,
                    "ts": item.ts,
                    "flags": list(item.flags),
                    "device_id": u.device_id,
                    "site_id": u.site_id,
                    "unit_id": u.unit_id,
                    "bed_id": u.bed_id,
                    "received_at": u.at,
                    "key": f"{u.id}#{item.code}",
                }
                args.extend((item.code, item.ts, orjson.dumps(doc)))
            await self._script(keys=[f"{self._prefix}:{u.patient_id}"], args=args, client=pipe)
            n += 1
        if n:
            await pipe.execute()

    async def patient(self, patient_id: str) -> dict[str, dict[str, Any]]:
        raw: Mapping[Any, Any] = await self._redis.hgetall(f"{self._prefix}:{patient_id}")
        out = {}
        for code, doc in raw.items():
            out[code.decode() if isinstance(code, bytes) else str(code)] = orjson.loads(doc)
        return out

    async def latest(self, patient_id: str) -> dict[str, VitalPoint]:
        out = {}
        for code, d in (await self.patient(patient_id)).items():
            value = d["value"]
            if code == "acvpu" and isinstance(value, str):
                value = float("ACVPU".index(value)) if value in "ACVPU" else 0.0
            out[code] = VitalPoint(
                key=str(d.get("key", "")),
                site_id=str(d.get("site_id", "")),
                unit_id=d.get("unit_id"),
                bed_id=d.get("bed_id"),
                patient_id=patient_id,
                device_id=str(d.get("device_id", "")),
                code=code,
                value=float(value),
                unit=str(d["unit"]),
                ts=int(d["ts"]),
                received_at=int(d.get("received_at", d["ts"])),
                flags=tuple(d.get("flags", ())),
            )
        return out


class LatestFromRedis:
    """A `VitalsStore` whose `latest` comes from `RedisLatest`; trends (query) and writes from `inner`."""

    def __init__(self, inner: VitalsStore, latest: RedisLatest) -> None:
        self._inner = inner
        self._latest = latest

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    async def write(self, points: Sequence[VitalPoint]) -> None:
        await self._inner.write(points)

    async def query(
        self, *, patient_id: str, code: str, since: int, until: int | None = None, limit: int = 10_000
    ) -> list[VitalPoint]:
        return await self._inner.query(
            patient_id=patient_id, code=code, since=since, until=until, limit=limit
        )

    async def latest(self, *, patient_id: str) -> dict[str, VitalPoint]:
        return await self._latest.latest(patient_id)

    async def ready(self) -> bool:
        return await self._inner.ready()


class LiveRelay:
    """Moves `vigil.live.v1` from Kafka to Redis: each record to its site's stream at its cursor, vitals to
    the patients' latest values. Runs until cancelled; never raises (see the module docstring).

    One consumer group (`group`) over the topic's one partition: one worker relays, the others stand by and
    take over after a rebalance. No Kafka offset is committed: the position is `RedisLiveWriter.position()`,
    read again on every assignment and after Redis lost data. While Redis fails, the same records are
    retried (backing off to `retry_max`); the consumer keeps its group membership meanwhile.
    """

    def __init__(
        self,
        bootstrap: Sequence[str],
        redis: Redis,
        *,
        topic: str,
        group: str = RELAY_GROUP,
        retention_s: float = DEFAULT_RETENTION_S,
        client_id: str = RELAY_GROUP,
        retry_initial: float = 0.2,
        retry_max: float = 2.0,
        consumer: Callable[..., Any] | None = None,
    ) -> None:
        self._bootstrap = list(bootstrap)
        self._consumer = consumer  # AIOKafkaConsumer unless given (tests: one that withholds records)
        self._topic = topic
        self._group = group
        self._client_id = client_id
        self._writer = RedisLiveWriter(redis, retention_s=retention_s)
        self._latest = RedisLatest(redis)
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._seek = True  # (re)read the position from Redis before the next fetch
        self._expected = 0  # the position Redis is known to hold
        self._resumed = False
        self._turn: InTurn[Any] = InTurn()  # never steps over a record Kafka showed late (streams/inturn.py)
        self.failing = False

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer  # noqa: PLC0415
        from aiokafka.abc import ConsumerRebalanceListener  # noqa: PLC0415

        relay = self

        class Reseek(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                return None

            async def on_partitions_assigned(self, assigned: Any) -> None:
                relay._seek = True

        delay = self._retry_initial
        while True:
            consumer = (self._consumer or AIOKafkaConsumer)(
                bootstrap_servers=self._bootstrap,
                client_id=self._client_id,
                group_id=self._group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=6000,
                heartbeat_interval_ms=1000,
                fetch_max_wait_ms=50,  # the relay is one hop of every alarm's way to the nurse
                max_poll_interval_ms=24 * 3600 * 1000,  # a Redis outage may hold one batch for long
            )
            try:
                consumer.subscribe([self._topic], listener=Reseek())
                await consumer.start()
                log.info("live relay: following %s into Redis", self._topic)
                while True:
                    await self._step(consumer)
                    delay = self._retry_initial
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("live relay: Kafka consumer failed; restarting it", exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 10)

    async def _step(self, consumer: Any) -> None:
        if self._seek and consumer.assignment():
            await self._until_done(lambda: self._reposition(consumer))
        batch = await consumer.getmany(timeout_ms=500, max_records=RELAY_BATCH)
        for tp, msgs in batch.items():
            if not msgs or self._seek:
                continue
            run, hole = self._turn.take(tp, msgs)
            if run:
                await self._relay(consumer, run)
            if hole is not None and not self._seek:
                await self._back_to(consumer, tp, hole)

    async def _back_to(self, consumer: Any, tp: Any, hole: int) -> None:
        """Seek back to a record Kafka skipped, or past records that expired before they were relayed (the
        site streams then mark the gap, so a client resuming across it gets `resync`)."""
        first = (await consumer.beginning_offsets([tp]))[tp]
        if hole < first:
            RELAY_EXPIRED.inc(first - hole)
            log.error("live relay: offsets %d-%d left Kafka before they were relayed", hole, first - 1)
            self._turn.expect(tp, first)
            self._resumed = True
            consumer.seek(tp, first)
            return
        RELAY_REWINDS.inc()
        log.warning("live relay: offset %d of %s was skipped by the consumer; sought back to it", hole, tp)
        consumer.seek(tp, hole)

    async def _reposition(self, consumer: Any) -> None:
        position = await self._writer.position()
        for tp in consumer.assignment():
            if position > 0:
                consumer.seek(tp, position)  # cursor = offset + 1: the next offset to read
                self._turn.expect(tp, position)
            else:
                await consumer.seek_to_beginning(tp)
                self._turn.expect(tp, (await consumer.beginning_offsets([tp]))[tp])
        self._expected, self._resumed, self._seek = position, True, False
        log.info("live relay: resuming after cursor %d", position)

    async def _relay(self, consumer: Any, msgs: Sequence[Any]) -> None:
        records = []
        for m in msgs:
            try:
                event: Event | None = decode(m.value)
            except Exception:
                log.exception("live relay: undecodable live record at offset %d, appended as it is", m.offset)
                event = None
            records.append(LiveIn(m.offset + 1, m.value, event))

        async def once() -> None:
            updates = [r.event for r in records if isinstance(r.event, LiveUpdate)]
            await self._latest.write(updates)  # idempotent: the newest device time wins
            got = await self._writer.append(records, expected=self._expected, resumed=self._resumed)
            if -1 in got:
                log.warning("live relay: Redis holds less than it was given (restarted empty?); replaying")
                RELAY_REPLAYS.inc()
                self._seek = True  # the next step seeks back to what Redis holds
                return
            self._expected, self._resumed = records[-1].cursor, False
            RELAYED.inc(sum(1 for c in got if c > 0))

        await self._until_done(once)

    async def _until_done(self, attempt: Callable[[], Awaitable[None]]) -> None:
        delay = self._retry_initial
        while True:
            try:
                await asyncio.wait_for(attempt(), RELAY_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception:
                PROCESSOR_ERRORS.labels("live-relay").inc()
                if not self.failing:
                    log.warning("live relay: Redis failed; the boards wait, retrying", exc_info=True)
                self.failing = True
                RELAY_FAILING.set(1)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            if self.failing:
                log.info("live relay: Redis answers again")
            self.failing = False
            RELAY_FAILING.set(0)
            return


PRESENCE_KEY = "vigil:presence"
PRESENCE_TTL_MS = 10_000  # a node that stops refreshing (killed) drops its users after this


class RedisPresence:
    """Who has a websocket open on any API node: a sorted set of usernames scored by last refresh (ms).

    API nodes `publish` their users every couple of seconds; workers read `connected` for escalation
    ("nobody connected escalates at once").
    """

    def __init__(self, redis: Any, clock: Clock) -> None:
        self._redis = redis
        self._clock = clock

    async def publish(self, users: frozenset[str]) -> None:
        now = self._clock.now_ms()
        pipe = self._redis.pipeline(transaction=False)
        if users:
            pipe.zadd(PRESENCE_KEY, dict.fromkeys(users, now))
        pipe.zremrangebyscore(PRESENCE_KEY, "-inf", now - PRESENCE_TTL_MS)
        await pipe.execute()

    async def connected(self) -> frozenset[str]:
        now = self._clock.now_ms()
        raw = await self._redis.zrangebyscore(PRESENCE_KEY, now - PRESENCE_TTL_MS, "+inf")
        return frozenset(r.decode() if isinstance(r, bytes) else str(r) for r in raw)
