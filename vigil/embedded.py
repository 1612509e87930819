"""Composition root of the embedded runtime (`vigil run`): one process, nothing to install."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from api.app import ApiContext, create_app
from api.auth import TokenIssuer, load_key
from gateway.broker import EmbeddedBroker
from gateway.coap import CoapGateway
from gateway.ingest import Ingestor
from gateway.mosquitto_sync import MosquittoSync
from gateway.mqtt import MqttGateway, MqttSettings
from gateway.registry import Registry
from records.alerts import AlertStore, record_receipt
from records.crypto import SecretCipher
from records.db import Database, sqlite_url
from records.deadletters import add_deadletters
from records.facts import EscalationDirectory
from records.people import ensure_admin
from records.places import ensure_site
from streams import topics
from streams.clock import Clock, SystemClock
from streams.live import LogLiveFeed
from streams.log import SqliteLog
from streams.metrics import VITALS_BACKLOG
from streams.ports import VitalsStore
from streams.processor import Processor
from streams.processors.admissions import AdmissionRouter
from streams.processors.deadletters import DeadLetterSink
from streams.processors.device import DeviceStage
from streams.runtime import EmbeddedRuntime
from streams.schemas import AdmissionChange, DeadLetter, Event, encode
from streams.sink import PortEffects
from streams.timers import Ticker
from streams.vitals.buffer import BufferedVitalsStore
from streams.vitals.influx import InfluxVitalsStore
from streams.vitals.sqlite import SqliteVitalsStore
from vigil.clinical import ClinicalHost
from vigil.ports_check import check_free
from vigil.settings import Settings

log = logging.getLogger(__name__)

INGEST_BACKLOG_LIMIT = 200_000  # device messages logged but not yet processed before acks are held


def make_vitals_store(settings: Settings, clock: Clock) -> tuple[VitalsStore, BufferedVitalsStore | None]:
    """SQLite in the data dir, or the InfluxDB protocol behind an on-disk write-behind buffer."""
    if not settings.influx_url:
        return SqliteVitalsStore(settings.data_dir / "vitals.db"), None
    inner = InfluxVitalsStore(
        settings.influx_url,
        api="v1" if settings.influx_api == "v1" else "v2",
        token=settings.influx_token or "",
        org=settings.influx_org or "",
        bucket=settings.influx_bucket,
        db=settings.influx_db,
    )
    buffered = BufferedVitalsStore(inner, settings.data_dir / "vitals-buffer.db", clock=clock)
    return buffered, buffered


@dataclass
class EmbeddedHub:
    """Everything `vigil run` starts, in dependency order, and stops in reverse."""

    settings: Settings
    clock: Clock = field(default_factory=SystemClock)
    db: Database = field(init=False)
    registry: Registry = field(init=False)
    log: SqliteLog = field(init=False)
    vitals: VitalsStore = field(init=False)
    ingest: Ingestor = field(init=False)
    runtime: EmbeddedRuntime = field(init=False)
    _buffer: BufferedVitalsStore | None = field(init=False, default=None)
    _mqtt: MqttGateway | None = field(init=False, default=None)
    _broker: EmbeddedBroker | None = field(init=False, default=None)
    _coap: CoapGateway | None = field(init=False, default=None)
    _server: uvicorn.Server | None = field(init=False, default=None)
    _ticker: Ticker | None = field(init=False, default=None)
    _livehub: Any = field(init=False, default=None)
    clinical: ClinicalHost = field(init=False)
    _tasks: list[asyncio.Task[Any]] = field(init=False, default_factory=list)
    _background: set[asyncio.Task[Any]] = field(init=False, default_factory=set)

    def check_ports(self) -> None:
        s = self.settings
        wanted = [
            ("VIGIL_HTTP_PORT", s.http_port, socket.SOCK_STREAM),
            ("VIGIL_COAP_PORT", s.coap_port, socket.SOCK_DGRAM),
            ("VIGIL_COAPS_PORT", s.coaps_port, socket.SOCK_DGRAM),
        ]
        if s.mqtt_url is None:
            wanted.insert(1, ("VIGIL_MQTT_PORT", s.mqtt_port, socket.SOCK_STREAM))
        check_free(s.host, wanted)

    async def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.check_ports()
        self.db = Database(s.database_url or sqlite_url(s.data_dir))
        await self.db.migrate()
        now = self.clock.now_ms()
        await ensure_site(self.db, s.default_site)
        if s.admin_password:
            await ensure_admin(self.db, s.admin_password, now)
        cipher = SecretCipher.from_data_dir(s.data_dir)
        self.registry = Registry(self.db, cipher)
        await self.registry.start()

        self.log = SqliteLog(s.data_dir / "log.db", partitions=topics.PARTITIONS)
        await self.log.start()
        self.vitals, self._buffer = make_vitals_store(s, self.clock)
        await self.vitals.start()
        self.clinical = ClinicalHost(s, self.clock)
        self.clinical.attach(EscalationDirectory(self.db), self._connected_users)
        sink = PortEffects(
            bus=self.log,
            vitals=self.vitals,
            deadletters=self._record_deadletters,
            clock=self.clock,
            alerts=AlertStore(self.db),
        )
        processors: list[Processor[Any]] = [
            DeviceStage(),
            DeadLetterSink(),
            AdmissionRouter(),
            self.clinical.engine,
        ]
        self.runtime = EmbeddedRuntime(self.log, sink, processors)
        await self.runtime.start()
        self._ticker = Ticker(self.log.append, self.log.partitions, self.clock)
        self._ticker.start()
        runtime = self.runtime
        self.ingest = Ingestor(
            self.log,
            self.registry,
            self.clock,
            gate=lambda: runtime.backpressure(topics.INGEST, INGEST_BACKLOG_LIMIT),
        )

        if s.mqtt_url is None:
            self._broker = EmbeddedBroker(
                self.ingest,
                self.registry,
                host=s.host,
                port=s.mqtt_port,
                hub_username="vigil-hub",
                hub_password=secrets.token_urlsafe(24),
                on_refused=self._broker_refused,
            )
            await self._broker.start()
        else:
            u = s.mqtt_url
            if u.username and u.password and s.mqtt_dynsec:
                await self._start_dynsec_sync(u.host, u.port, u.username, u.password)
            self._mqtt = MqttGateway(
                self.ingest,
                MqttSettings(
                    host=u.host,
                    port=u.port,
                    username=u.username,
                    password=u.password,
                    shared_group=s.mqtt_shared_group,
                ),
            )
            await self._mqtt.start()
        self._coap = CoapGateway(
            ingest=self.ingest,
            directory=self.registry,
            host=s.host,
            port=s.coap_port,
            dtls_port=s.coaps_port,
            on_refused=self._coap_refused,
        )
        await self._coap.start()

        tokens = TokenIssuer(load_key(s.data_dir, s.jwt_secret))
        ctx = ApiContext(
            db=self.db,
            vitals=self.vitals,
            tokens=tokens,
            clock=self.clock,
            on_admission=self._admission,
            live=LogLiveFeed(self.log),
            submit=self._submit_events,
            publish=self.log.append,
            ruleset=self.clinical.ruleset,
            on_receipt=self._receipt,
            readiness={"records": self.db.ping, "vitals": self.vitals.ready, "mqtt": self._mqtt_ready},
        )
        app = create_app(ctx)
        self._livehub = app.state.livehub
        await self.clinical.start()
        config = uvicorn.Config(
            app,
            host=s.host,
            port=s.http_port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        http = asyncio.create_task(self._server.serve(), name="http")
        self._tasks.append(http)
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        while not self._server.started:
            if http.done():
                http.result()
                raise SystemExit(
                    f"vigil: the HTTP server did not start; is VIGIL_HTTP_PORT {s.http_port} free?"
                )
            await asyncio.sleep(0.02)
        log.info("vigil embedded hub ready on http://%s:%d", s.host, s.http_port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        for t in self._tasks:
            if t.get_name() != "http":
                t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for part in (self._coap, self._broker, self._mqtt):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        if self._ticker is not None:
            await self._ticker.stop()
        await self.clinical.stop()
        await self.runtime.stop()
        await self.vitals.close()
        await self.log.close()
        await self.registry.stop()
        await self.db.close()

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

    async def _connected_users(self) -> frozenset[str]:
        hub = self._livehub
        return frozenset() if hub is None else hub.connected_users()

    async def _receipt(self, alert_id: str, version: int, username: str, at: int) -> None:
        await record_receipt(self.db, alert_id, version, username, at)

    async def _mqtt_ready(self) -> bool:
        if self._mqtt is not None:
            return self._mqtt.connected.is_set()
        return self._broker is not None

    async def _record_deadletters(self, items: Sequence[DeadLetter]) -> None:
        await add_deadletters(self.db, items)

    async def _submit_events(self, events: Sequence[Event]) -> None:
        """Canonical events made by the API (manual observations) join the device path at the ingest topic."""
        await self.log.append(
            [(topics.INGEST, e.meta.device_id, encode(e)) for e in events if hasattr(e, "meta")]
        )

    async def _admission(self, change: AdmissionChange) -> None:
        await self.log.append([(topics.ADMISSIONS, change.site_id, encode(change))])
        await self.registry.refresh()  # attribution follows the bed at once

    def _broker_refused(self, reason: str, device_id: str, topic: str, payload: bytes) -> None:
        task = asyncio.create_task(self._refuse_mqtt(reason, device_id, topic, payload))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refuse_mqtt(self, reason: str, device_id: str, topic: str, payload: bytes) -> None:
        await self.ingest.refuse(
            reason,
            f"MQTT publish on {topic!r} refused",
            transport="mqtt",
            device_id=device_id,
            kind=None,
            payload=payload,
        )

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

    async def _housekeeping(self) -> None:
        next_vitals_prune = 0.0
        while True:
            await asyncio.sleep(5)
            if self._buffer is not None:
                VITALS_BACKLOG.set(self._buffer.backlog())
            if isinstance(self.vitals, SqliteVitalsStore) and self.clock.monotonic() >= next_vitals_prune:
                next_vitals_prune = self.clock.monotonic() + 600
                try:
                    await self.vitals.prune(self.clock.now_ms())
                except Exception:
                    log.exception("vitals retention pruning failed")
            with contextlib.suppress(Exception):
                await self.log.prune(
                    older_than_ms=self.clock.now_ms() - 3_600_000, by_time=topics.TIME_RETAINED
                )
