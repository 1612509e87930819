"""Composition roots of the scaled runtime's roles. `vigil gateway`: MQTT/CoAP in, Kafka out.

A gateway is the gateway part of the embedded hub (`vigil/embedded.py`) with Kafka instead of the SQLite log,
PostgreSQL for the records, an external MQTT broker, and no processors or client API: only /healthz, /readyz
and /metrics. Any number of gateway processes may run: they split the devices' MQTT traffic through an MQTT v5
shared subscription (group `VIGIL_MQTT_SHARED_GROUP`, default `vigil`), each on its own persistent session.

What stays true from the embedded runtime: a device message is acknowledged upstream (Vigil's PUBACK to the
broker, CoAP 2.04) only once Kafka holds it on every in-sync replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.admissions import AdmissionFeed
from gateway.coap import CoapGateway
from gateway.ingest import Ingestor
from gateway.mosquitto_sync import MosquittoSync
from gateway.mqtt import TOPIC_FILTER, MqttGateway, MqttSettings
from gateway.mqtt_net import RestartWindow
from gateway.registry import Registry
from records.crypto import KEY_ENV, KEY_FILE, SecretCipher
from records.db import Database
from streams import topics
from streams.clock import Clock, SystemClock
from streams.kafka import KafkaBus, KafkaSettings, bootstrap_servers, ensure_topics
from streams.metrics import REGISTRY
from streams.timers import Ticker
from vigil.ports_check import check_free
from vigil.serve import serve
from vigil.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_SHARED_GROUP = "vigil"
GATEWAY_TOPICS = (topics.INGEST, topics.DEADLETTERS)  # what a gateway writes


Check = Callable[[], Awaitable[bool]]


def partition_count(topic: str) -> int:
    return topics.PARTITIONS.get(topic, 1)


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.lower() not in ("0", "false", "no", "off")


async def _safe(check: Check) -> bool:
    try:
        return await check()
    except Exception:
        return False


def ops_app(readiness: dict[str, Check]) -> FastAPI:
    """/healthz, /readyz (503 naming what is not connected) and /metrics, as the client API answers them."""
    app = FastAPI(title="Vigil gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        results = await asyncio.gather(*(_safe(c) for c in readiness.values()))
        down = [name for name, ok in zip(readiness, results, strict=True) if not ok]
        if down:
            return JSONResponse({"status": "unavailable", "not_ready": down}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def _require(settings: Settings) -> None:
    """One clear line for each configuration the scaled gateway cannot run without."""
    if not settings.kafka_url:
        raise SystemExit("vigil gateway: set VIGIL_KAFKA_URL (e.g. kafka://127.0.0.1:9092): the scaled bus")
    if not settings.database_url or not settings.database_url.startswith(("postgresql", "postgres")):
        raise SystemExit(
            "vigil gateway: set VIGIL_DATABASE_URL to PostgreSQL "
            "(e.g. postgresql://vigil@db:5432/vigil): the scaled runtime shares one records database"
        )
    if settings.mqtt_url is None:
        raise SystemExit(
            "vigil gateway: set VIGIL_MQTT_URL (e.g. mqtt://hub:password@mosquitto:1883): "
            "the scaled runtime never embeds an MQTT broker"
        )


@dataclass
class ScaledGateway:
    """Everything `vigil gateway` starts, in dependency order, and stops in reverse."""

    settings: Settings
    clock: Clock = field(default_factory=SystemClock)
    db: Database = field(init=False)
    registry: Registry = field(init=False)
    bus: KafkaBus = field(init=False)
    ingest: Ingestor = field(init=False)
    mqtt: MqttGateway = field(init=False)
    _net: MqttGateway | None = field(init=False, default=None)  # the restart net (gateway/mqtt_net.py)
    _coap: CoapGateway | None = field(init=False, default=None)
    _ticker: Ticker | None = field(init=False, default=None)
    _admissions: AdmissionFeed | None = field(init=False, default=None)
    _server: uvicorn.Server | None = field(init=False, default=None)
    _tasks: list[asyncio.Task[Any]] = field(init=False, default_factory=list)
    _started: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        _require(self.settings)

    def check_ports(self) -> None:
        s = self.settings
        check_free(
            s.host,
            [
                ("VIGIL_HTTP_PORT", s.http_port, socket.SOCK_STREAM),
                ("VIGIL_COAP_PORT", s.coap_port, socket.SOCK_DGRAM),
                ("VIGIL_COAPS_PORT", s.coaps_port, socket.SOCK_DGRAM),
            ],
        )

    async def start(self) -> None:
        s = self.settings
        assert s.kafka_url and s.database_url and s.mqtt_url  # checked by _require
        self.check_ports()
        s.data_dir.mkdir(parents=True, exist_ok=True)
        if not os.environ.get(KEY_ENV) and not (s.data_dir / KEY_FILE).exists():
            log.warning(
                "neither %s nor %s exists: a new key is made, and secrets stored by other processes "
                "will not decrypt; give every scaled process the same %s",
                KEY_ENV,
                s.data_dir / KEY_FILE,
                KEY_ENV,
            )

        self.db = Database(s.database_url)
        self._started.append("db")
        try:
            await self.db.migrate()
        except OSError as exc:
            raise ConnectionError(f"PostgreSQL (VIGIL_DATABASE_URL) does not answer: {exc}") from exc
        self.registry = Registry(self.db, SecretCipher.from_data_dir(s.data_dir))
        await self.registry.start()
        self._started.append("registry")

        servers = bootstrap_servers(s.kafka_url)
        # Stable across restarts of this instance (its persistent MQTT session and queue come back with it)
        # and distinct between instances (one client id per connection, or they would kick each other off).
        client_id = (
            os.environ.get("VIGIL_MQTT_CLIENT_ID") or f"vigil-gateway-{socket.gethostname()}-{s.http_port}"
        )
        self.bus = KafkaBus(
            KafkaSettings(
                servers, client_id=client_id, idempotent=_env_flag("VIGIL_KAFKA_IDEMPOTENT", False)
            ),
            required_topics=GATEWAY_TOPICS,
        )
        await self.bus.start()  # keeps trying for a while: Kafka may still be starting
        self._started.append("bus")
        if _env_flag("VIGIL_KAFKA_CREATE_TOPICS", True):
            try:
                await ensure_topics(servers, topics.PARTITIONS)
            except Exception:  # e.g. not allowed to create topics: /readyz names kafka while any is missing
                log.exception("could not create Vigil's Kafka topics")
        # Attribution follows an admission change at once (gateway/admissions.py): pushed from Kafka, and
        # fenced before each batch is stamped, so a reading received after the API answered is attributed
        # to the new patient. The registry's version poll stays as the fallback.
        gate = None
        if _env_flag("VIGIL_ADMISSION_FENCE", True):
            feed = AdmissionFeed(servers, self.registry.refresh, client_id=client_id)
            try:
                await feed.start()
            except Exception:  # e.g. the topic is missing: attribution follows the poll alone
                log.exception(
                    "could not follow %s; admissions reach this gateway by polling", topics.ADMISSIONS
                )
                await feed.stop()
            else:
                self._admissions, gate = feed, feed.fence
        self.ingest = Ingestor(self.bus, self.registry, self.clock, gate=gate)
        # Timers (offline detection, escalations) run on ticks from the gateway's clock; several gateways
        # each ticking is fine: processors drop a tick older than the newest they applied.
        self._ticker = Ticker(self.bus.append, partition_count, self.clock)
        self._ticker.start()

        u = s.mqtt_url
        if u.username and u.password and s.mqtt_dynsec:
            await self._start_dynsec_sync(u.host, u.port, u.username, u.password)
        shared = MqttSettings(
            host=u.host,
            port=u.port,
            username=u.username,
            password=u.password,
            client_id=client_id,
            shared_group=s.mqtt_shared_group or DEFAULT_SHARED_GROUP,
        )
        self.mqtt = MqttGateway(self.ingest, shared)
        await self.mqtt.start()
        self._started.append("mqtt")
        if s.mqtt_restart_net:
            # A plain subscription (no shared group): Mosquitto restores it after a restart.
            net = replace(shared, client_id=f"{client_id}-net", shared_group=None)
            self._net = MqttGateway(self.ingest, net)
            self._net.admit = RestartWindow(self.mqtt, self._net).admit
            await self._net.start()
        self._coap = CoapGateway(
            ingest=self.ingest,
            directory=self.registry,
            host=s.host,
            port=s.coap_port,
            dtls_port=s.coaps_port,
            on_refused=self._coap_refused,
        )
        await self._coap.start()

        app = ops_app({"kafka": self.bus.ready, "mqtt": self._mqtt_ready, "records": self.db.ping})
        config = uvicorn.Config(
            app, host=s.host, port=s.http_port, log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        http = asyncio.create_task(self._server.serve(), name="http")
        self._tasks.append(http)
        while not self._server.started:
            if http.done():
                http.result()
                raise SystemExit(
                    f"vigil gateway: the HTTP server did not start; is VIGIL_HTTP_PORT {s.http_port} free?"
                )
            await asyncio.sleep(0.02)
        log.info(
            "vigil gateway %s ready: kafka %s, mqtt %s:%d (shared group %s), http %s:%d",
            client_id,
            ",".join(servers),
            u.host,
            u.port,
            s.mqtt_shared_group or DEFAULT_SHARED_GROUP,
            s.host,
            s.http_port,
        )

    async def stop(self) -> None:
        """Stop taking messages first, then flush the bus, then let go of the records."""
        if self._net is not None:
            try:
                await self._net.unsubscribe(TOPIC_FILTER)
            except Exception:
                log.warning("could not unsubscribe the restart net before stopping", exc_info=True)
            with contextlib.suppress(Exception):
                await self._net.stop()
        if "mqtt" in self._started:
            await self._leave_shared_group()
            with contextlib.suppress(Exception):
                await self.mqtt.stop()  # unacknowledged messages stay with the broker for the next session
        if self._coap is not None:
            with contextlib.suppress(Exception):
                await self._coap.stop()
        if self._ticker is not None:
            await self._ticker.stop()
        if self._server is not None:
            self._server.should_exit = True
        for t in self._tasks:
            if t.get_name() != "http":
                t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._admissions is not None:
            await self._admissions.stop()
        if "bus" in self._started:
            await self.bus.stop()
        if "registry" in self._started:
            await self.registry.stop()
        if "db" in self._started:
            await self.db.close()
        self._started.clear()

    async def _leave_shared_group(self) -> None:
        """Unsubscribe before a graceful stop, so the broker stops routing this gateway's share to it.

        Mosquitto 2.0 keeps handing a shared subscription's messages, in turn, to a member whose persistent
        session is offline: without this, a gateway that stops (scale-down, redeploy under a new client id)
        would collect every n-th device message in its session until it returns or the session expires.
        Messages already queued for or in flight to this session stay there for its next connection.
        A crashed gateway cannot do this: restart it under the same client id (VIGIL_MQTT_CLIENT_ID).
        """
        group = self.settings.mqtt_shared_group or DEFAULT_SHARED_GROUP
        if not self.mqtt.connected.is_set():
            return
        try:
            await self.mqtt.unsubscribe(f"$share/{group}/{TOPIC_FILTER}")
            await asyncio.sleep(0.2)  # let batches already taken in finish their append and PUBACK
        except Exception:
            log.warning("could not leave the MQTT shared group %s before stopping", group, exc_info=True)

    async def _mqtt_ready(self) -> bool:
        return self.mqtt.connected.is_set()

    async def _start_dynsec_sync(self, host: str, port: int, username: str, password: str) -> None:
        async def devices() -> list[tuple[str, str, bool]]:
            secrets_ = self.registry.credentials()
            return [(d.id, secrets_.get(d.id, ""), d.id in secrets_) for d in self.registry.all_devices()]

        sync = MosquittoSync(
            mqtt_host=host, mqtt_port=port, admin_username=username, admin_password=password, devices=devices
        )
        try:
            await asyncio.wait_for(sync.sync(), 15)
        except Exception:
            log.exception("could not bring Mosquitto's dynamic security in step with the registry; retrying")
        self._tasks.append(asyncio.create_task(sync.run(1.0), name="mosquitto-sync"))

    async def _coap_refused(
        self, reason: str, transport: str, device_id: str | None, kind: str | None, payload: bytes
    ) -> None:
        await self.ingest.refuse(
            reason,
            "CoAP request refused",
            transport=transport,
            device_id=device_id,
            kind=kind,
            payload=payload,
        )


async def run_gateway(settings: Settings) -> None:
    """`vigil gateway`: start, serve until SIGTERM/SIGINT, stop gracefully."""
    s = settings
    await serve(
        ScaledGateway(settings),
        "gateway",
        f"http {s.host}:{s.http_port}  coap {s.host}:{s.coap_port}/udp  coaps {s.host}:{s.coaps_port}/udp",
    )
