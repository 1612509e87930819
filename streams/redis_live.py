"""The scaled live feed: a Redis Stream per site, read by every API node through the `LiveFeed` port.

Cursors stay integers, honestly: every live record gets a number from ONE Redis counter
(`vigil:live:seq`), in the same Lua script that appends it to its site's stream, with that number as its
stream id (`{seq}-0`). A script runs atomically on the Redis server, so numbers are handed out in commit
order across all site streams: once a reader sees record n, every record below n is in its stream (or was
trimmed). A node reads all site streams in one MULTI/EXEC and merges them by number, so every node sees the
same records under the same cursors, and a cursor from one node resumes on any other after a reconnect.
A composite cursor (one stream id per site) is not needed for that; it would only be needed with several
Redis servers (or a cluster that splits the site streams), which this design does not support.

Trimming by age: the script keeps a coarse clock (`vigil:live:marks`, one number per second) and, once a
second, trims every site stream below the first number written at least `retention` ago (XTRIM MINID,
exact), then records the highest number that may have been trimmed in `vigil:live:trimmed`. `oldest()` is
that plus one: a resume from before it answers `resync` (some record after the client's cursor is gone).

Idempotent appends: the script first claims `vigil:live:seen:{event key}` (SET NX, kept as long as the
replay window): a redelivered worker batch appends nothing twice, so clients never see a record twice.
Costs about 100 bytes of Redis memory per live record in the window.

`RedisLatest` keeps the newest value per code of each patient (hash `vigil:latest:patient:{id}`, code ->
JSON of value/unit/ts/flags/device_id), written by the worker, read by the API's patient snapshot and board.

Redis must keep its data across restarts in production (AOF): a Redis that comes back empty restarts the
counter, and cursors issued before it are answered `resync` (they are past the end) until the counter
catches up with them (then they would resume at the wrong place).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from streams.clock import Clock
from streams.live import LiveRecord
from streams.ports import VitalPoint, VitalsStore
from streams.schemas import Alert, Event, LiveUpdate, decode, encode

PREFIX = "vigil:live"
LATEST_PREFIX = "vigil:latest:patient"
DEFAULT_RETENTION_S = 3600.0  # the replay window is at least 10 minutes (contract section 6)
MIN_RETENTION_S = 600.0
LATEST_TTL_S = 7 * 86400  # a patient's latest values are forgotten a week after the last one
NO_SITE = "_"

# KEYS: seq, sites, marks, trimmed, stream, seen. ARGV: site, payload, retention ms, seen ttl s, prefix.
_APPEND = """
if not redis.call('SET', KEYS[6], '1', 'NX', 'EX', tonumber(ARGV[4])) then return 0 end
local seq = redis.call('INCR', KEYS[1])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[5], seq .. '-0', 'e', ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
if #last == 0 or now - tonumber(last[2]) >= 1000 then
  redis.call('ZADD', KEYS[3], now, seq)
  local cut = redis.call('ZREVRANGEBYSCORE', KEYS[3], now - tonumber(ARGV[3]), '-inf',
    'WITHSCORES', 'LIMIT', 0, 1)
  if #cut > 0 then
    local c = tonumber(cut[1])
    for _, s in ipairs(redis.call('SMEMBERS', KEYS[2])) do
      redis.call('XTRIM', ARGV[5] .. ':' .. s, 'MINID', c .. '-0')
    end
    local was = tonumber(redis.call('GET', KEYS[4]) or '0')
    if c - 1 > was then redis.call('SET', KEYS[4], c - 1) end
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. cut[2])
  end
end
return seq
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


class RedisLiveWriter:
    """Appends live records to the site streams, idempotently (the worker's side)."""

    def __init__(
        self, redis: Redis, *, retention_s: float = DEFAULT_RETENTION_S, prefix: str = PREFIX
    ) -> None:
        self._redis = redis
        self._retention_ms = max(1000, int(retention_s * 1000))  # callers keep it >= MIN_RETENTION_S
        self._prefix = prefix
        self._script = redis.register_script(_APPEND)

    def _keys(self, site: str, key: str) -> list[str]:
        p = self._prefix
        return [f"{p}:seq", f"{p}:sites", f"{p}:marks", f"{p}:trimmed", f"{p}:{site}", f"{p}:seen:{key}"]

    async def append(self, events: Iterable[Event]) -> list[int]:
        """Append in order; answers each record's cursor (0: a copy of one appended before, skipped)."""
        pipe = self._redis.pipeline(transaction=False)
        n = 0
        for e in events:
            site = site_of(e)
            args: list[bytes | str | int] = [
                site,
                encode(e),
                self._retention_ms,
                self._retention_ms // 1000,
                self._prefix,
            ]
            await self._script(keys=self._keys(site, event_key(e)), args=args, client=pipe)
            n += 1
        if not n:
            return []
        return [int(x) for x in await pipe.execute()]


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


class RedisLiveTee:
    """The worker's bus: every record goes to `inner` (Kafka); live records ALSO go to the site streams and
    latest values in Redis (after Kafka took them: a failure retries the batch; both sides deduplicate)."""

    def __init__(self, inner: Any, writer: RedisLiveWriter, latest: RedisLatest, live_topic: str) -> None:
        self._inner = inner
        self._writer = writer
        self._latest = latest
        self._topic = live_topic

    async def append(self, records: Sequence[tuple[str, str, bytes]]) -> None:
        await self._inner.append(records)
        events = [decode(v) for t, _, v in records if t == self._topic]
        if events:
            await self._latest.write(e for e in events if isinstance(e, LiveUpdate))
            await self._writer.append(events)


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
