"""`vigil api`: a scaled API node. The client API and `/ws` of the embedded hub, over shared services.

- records: PostgreSQL (VIGIL_DATABASE_URL), shared by every node;
- live feed: the Redis Streams the live relay appends to (VIGIL_REDIS_URL; `streams/redis_live.py`). The
  relay runs on the API nodes (one relays, the others stand by: `vigil/relay.py`, VIGIL_LIVE_RELAY). Every
  node tails the streams and gives the same integer cursors, so a websocket client resumes on any node;
- vitals: trends from InfluxDB (VIGIL_INFLUX_URL; or VIGIL_VITALS_SQLITE=path in tests and single-box runs),
  latest values from Redis (`RedisLatest`, written by the workers);
- writes: manual observations to the ingest topic, admission changes to the admissions topic, on Kafka
  (VIGIL_KAFKA_URL).

Any number of nodes may run behind a load balancer; they hold no state a client depends on. Every node must
get the same VIGIL_JWT_SECRET, or a token issued by one is refused by the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from redis.asyncio import Redis

from alerting.rules import Ruleset
from alerting.rules_schema import RulesFile
from api.app import ApiContext, create_app
from api.auth import TokenIssuer, load_key
from records.alerts import record_receipt
from records.db import Database
from streams import topics
from streams.clock import Clock, SystemClock
from streams.kafka import KafkaBus, KafkaSettings, bootstrap_servers
from streams.ports import VitalsStore
from streams.redis_live import LatestFromRedis, RedisLatest, RedisLiveFeed, RedisPresence
from streams.schemas import AdmissionChange, Event, encode
from vigil.ports_check import check_free
from vigil.relay import live_relay, relay_role
from vigil.serve import serve
from vigil.settings import Settings

log = logging.getLogger(__name__)

PRESENCE_EVERY_S = 2.0


class RulesView:
    """The rules file as an API node shows it (GET /rules, limit checks), reloaded when it changes."""

    def __init__(self, path: Path) -> None:
        self._file = RulesFile(path)
        self._file.reload_if_changed()

    def ruleset(self) -> Ruleset:
        self._file.reload_if_changed()  # a stat per call: cheap, and these calls are rare
        return self._file.current


API_TOPICS = (topics.INGEST, topics.ADMISSIONS, topics.CLINICAL)  # what an API node writes


def _require(settings: Settings) -> None:
    if not settings.database_url or not settings.database_url.startswith(("postgresql", "postgres")):
        raise SystemExit("vigil api: set VIGIL_DATABASE_URL to PostgreSQL (the shared records database)")
    if not settings.kafka_url:
        raise SystemExit("vigil api: set VIGIL_KAFKA_URL (e.g. kafka://127.0.0.1:9092): the scaled bus")
    if not settings.redis_url:
        raise SystemExit("vigil api: set VIGIL_REDIS_URL (e.g. redis://redis:6379/0): the live feed")


def make_vitals(settings: Settings, clock: Clock, env: dict[str, str]) -> VitalsStore:
    from vigil.worker import make_vitals as worker_vitals  # noqa: PLC0415 - the same choice as the worker

    if not env.get("VIGIL_VITALS_SQLITE") and not settings.influx_url:
        log.warning("vigil api: neither VIGIL_INFLUX_URL nor VIGIL_VITALS_SQLITE: trends read a local file")
    return worker_vitals(settings, clock, env)


@dataclass
class ApiNode:
    settings: Settings
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    clock: Clock = field(default_factory=SystemClock)
    _started: list[str] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None
    db: Database = field(init=False)
    redis: Redis = field(init=False)
    bus: KafkaBus = field(init=False)
    vitals: VitalsStore = field(init=False)
    live: RedisLiveFeed = field(init=False)

    def __post_init__(self) -> None:
        _require(self.settings)
        relay_role(self.env)  # a bad VIGIL_LIVE_RELAY stops the node before it starts anything

    async def start(self) -> None:
        s = self.settings
        assert s.database_url and s.kafka_url and s.redis_url  # checked by _require
        check_free(s.host, [("VIGIL_HTTP_PORT", s.http_port, socket.SOCK_STREAM)])
        s.data_dir.mkdir(parents=True, exist_ok=True)

        self.db = Database(s.database_url)
        self._started.append("db")
        try:
            await self.db.migrate()
        except OSError as exc:
            raise ConnectionError(f"PostgreSQL (VIGIL_DATABASE_URL) does not answer: {exc}") from exc

        self.redis = Redis.from_url(s.redis_url)
        self._started.append("redis")
        self.live = RedisLiveFeed(self.redis)

        inner = make_vitals(s, self.clock, self.env)
        await inner.start()
        self.vitals = LatestFromRedis(inner, RedisLatest(self.redis))
        self._started.append("vitals")

        servers = bootstrap_servers(s.kafka_url)
        client_id = f"vigil-api-{socket.gethostname()}-{s.http_port}"
        self.bus = KafkaBus(KafkaSettings(servers, client_id=client_id), required_topics=API_TOPICS)
        await self.bus.start()
        self._started.append("bus")

        self._rules = RulesView(s.config_dir / "rules.yaml")
        self.presence = RedisPresence(self.redis, self.clock)
        ctx = ApiContext(
            db=self.db,
            vitals=self.vitals,
            tokens=TokenIssuer(load_key(s.data_dir, s.jwt_secret)),
            clock=self.clock,
            on_admission=self._admission,
            live=self.live,
            submit=self._submit,
            publish=self.bus.append,
            ruleset=self._rules.ruleset,
            on_receipt=self._receipt,
            readiness={
                "records": self.db.ping,
                "redis": self._redis_ready,
                "kafka": self.bus.ready,
                "vitals": self.vitals.ready,
            },
        )
        app = create_app(ctx)
        config = uvicorn.Config(
            app, host=s.host, port=s.http_port, log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise SystemExit(f"vigil api: the HTTP server did not start on VIGIL_HTTP_PORT {s.http_port}")
            await asyncio.sleep(0.02)
        self._hub = app.state.livehub
        self._presence_task = asyncio.create_task(self._presence_loop(), name="presence")
        relay = live_relay(s, self.env, "api")
        if relay is not None:  # one node relays, the others stand by (its consumer group; vigil/relay.py)
            self._relay_task = asyncio.create_task(relay.run(), name="live-relay")
        log.info("vigil api node ready on http://%s:%d", s.host, s.http_port)

    async def _redis_ready(self) -> bool:
        try:
            return await asyncio.wait_for(self.live.ping(), 2.0)
        except Exception:
            return False

    async def _presence_loop(self) -> None:
        """Tell the workers who is connected here (escalation skips a level nobody of which is)."""
        while True:
            try:
                await self.presence.publish(self._hub.connected_users())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("vigil api: presence not published (Redis?)", exc_info=True)
            await asyncio.sleep(PRESENCE_EVERY_S)

    async def _receipt(self, alert_id: str, version: int, username: str, at: int) -> None:
        await record_receipt(self.db, alert_id, version, username, at)

    async def _submit(self, events: Sequence[Event]) -> None:
        await self.bus.append(
            [(topics.INGEST, e.meta.device_id, encode(e)) for e in events if hasattr(e, "meta")]
        )

    async def _admission(self, change: AdmissionChange) -> None:
        await self.bus.append([(topics.ADMISSIONS, change.site_id, encode(change))])

    async def stop(self) -> None:
        for name in ("_presence_task", "_relay_task"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 12)
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 10)
        hub: Any = getattr(self, "_hub", None)
        if hub is not None:
            with contextlib.suppress(Exception):
                await hub.stop()
        if "bus" in self._started:
            with contextlib.suppress(Exception):
                await self.bus.stop()
        if "vitals" in self._started:
            with contextlib.suppress(Exception):
                await self.vitals.close()
        if "redis" in self._started:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        if "db" in self._started:
            await self.db.close()
        self._started.clear()


async def run_api(settings: Settings) -> None:
    """`vigil api`: start, serve until SIGTERM/SIGINT, stop gracefully."""
    await serve(ApiNode(settings), "api", f"http {settings.host}:{settings.http_port}")
