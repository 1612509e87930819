"""MQTT ingress from an external broker (Mosquitto): QoS 1, persistent session, PUBACK after the append.

aiomqtt acknowledges QoS 1 on receipt, so this adapter switches paho's manual acknowledgement on BEFORE
connecting (a persistent session's queue arrives right after CONNACK) and acknowledges each message only
once the gateway has made it durable. Messages are taken from the queue in batches so one log transaction
serves many of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiomqtt
import paho.mqtt._packet as paho_packet
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.ingest import Ingestor, Offer
from gateway.outcome import Outcome
from streams.metrics import MQTT_HELD

log = logging.getLogger(__name__)

TOPIC_FILTER = "vigil/v1/+/+"


class LightProperties(Properties):
    """paho's MQTT v5 `Properties` with its lookup tables built once instead of for every packet.

    paho builds three tables (about 50 entries) in `Properties.__init__` and walks one of them in `unpack`
    for every received PUBLISH: measured at 16 us of the gateway's ~45 us per message (41 % of its CPU under
    a flood, docs/SCALING.md). The tables are constants (paho only reads them), so instances share one set;
    decoding is paho's own, and a PUBLISH without properties (what devices send) skips the walk.
    """

    _shared = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]

    def __init__(self, packet_type: int) -> None:
        shared = LightProperties._shared
        object.__setattr__(self, "packetType", packet_type)
        object.__setattr__(self, "types", shared.types)
        object.__setattr__(self, "names", shared.names)
        object.__setattr__(self, "properties", shared.properties)

    def unpack(self, buffer: bytes) -> tuple[Properties, int]:
        if buffer[:1] == b"\x00":  # property length 0, in one byte: nothing to read, nothing to clear
            return self, 1
        return super().unpack(buffer)  # type: ignore[no-untyped-call, no-any-return]


paho_packet.Properties = LightProperties  # type: ignore[attr-defined]  # paho decodes PUBLISH with it


@dataclass(frozen=True, slots=True)
class MqttSettings:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    client_id: str = "vigil-gateway"
    shared_group: str | None = None  # MQTT v5 shared subscription: several gateway processes split the load
    max_batch: int = 2000
    reconnect_initial: float = 0.5
    reconnect_max: float = 10.0


def parse_topic(topic: str) -> tuple[str, str] | None:
    """`vigil/v1/{device_id}/{kind}` -> (device_id, kind); anything else is None."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "vigil" or parts[1] != "v1" or not parts[2] or not parts[3]:
        return None
    return parts[2], parts[3]


class MqttGateway:
    """Consumes device topics from an external broker and hands them to the `Ingestor`."""

    def __init__(
        self, ingest: Ingestor, settings: MqttSettings, *, admit: Callable[[bool, int], bool] | None = None
    ) -> None:
        """`admit(backlog, size)`, if given, is asked for each batch whether to ingest it (else it is
        acknowledged and dropped: gateway/mqtt_net.py); `backlog` says more messages were already waiting."""
        self._ingest = ingest
        self._s = settings
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.received = 0
        self.subscribed_at: float | None = None  # monotonic time of the current session's SUBACK, else None
        self.admit = admit

    async def start(self) -> None:
        self._task = asyncio.create_task(self._reconnect_loop(), name="mqtt-gateway")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def unsubscribe(self, topic: str, timeout: float = 3.0) -> None:
        """Leave a subscription before a graceful stop (the session stays for the next connection)."""
        if self._client is None:
            return
        await asyncio.wait_for(self._client.unsubscribe(topic), timeout)

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Downlink (commands to a device) over the gateway's own connection."""
        if self._client is None:
            raise ConnectionError("MQTT gateway is not connected")
        await self._client.publish(topic, payload, qos=qos)

    async def _reconnect_loop(self) -> None:
        delay = self._s.reconnect_initial
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except aiomqtt.MqttError as exc:
                log.warning(
                    "MQTT connection to %s:%d lost (%s); retrying in %.1fs",
                    self._s.host,
                    self._s.port,
                    exc,
                    delay,
                )
            except Exception:
                log.exception("MQTT gateway failed; retrying in %.1fs", delay)
            self.connected.clear()
            self.subscribed_at = None
            self._client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._s.reconnect_max)

    async def _session(self) -> None:
        s = self._s
        v5 = s.shared_group is not None
        client = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=_session_properties() if v5 else None,
            max_inflight_messages=1000,
            keepalive=30,
        )
        paho_client: paho.Client = client._client  # the one place that reaches into aiomqtt
        paho_client.manual_ack_set(True)  # before CONNECT: queued messages arrive right after CONNACK
        async with client:
            _nodelay(paho_client)
            self._client = client
            topic = f"$share/{s.shared_group}/{TOPIC_FILTER}" if s.shared_group else TOPIC_FILTER
            await client.subscribe(topic, qos=1)
            self.subscribed_at = time.monotonic()
            self.connected.set()
            log.info("MQTT gateway connected to %s:%d, subscribed to %s", s.host, s.port, topic)
            await self._receive_loop(client, paho_client)

    async def _receive_loop(self, client: aiomqtt.Client, paho_client: paho.Client) -> None:
        queue: asyncio.Queue[aiomqtt.Message] = client._queue
        inflight = asyncio.Semaphore(4)  # batches being made durable while the next one is validated
        tasks: set[asyncio.Task[None]] = set()
        async for first in client.messages:
            batch = [first]
            while len(batch) < self._s.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            self.received += len(batch)
            if self.admit is not None and not self.admit(not queue.empty(), len(batch)):
                for m in batch:
                    if m.qos:
                        with contextlib.suppress(Exception):
                            paho_client.ack(m.mid, m.qos)
                continue
            await inflight.acquire()
            t = asyncio.create_task(self._handle(batch, paho_client, inflight))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    async def _handle(
        self, batch: Sequence[aiomqtt.Message], paho_client: paho.Client, inflight: asyncio.Semaphore
    ) -> None:
        try:
            offers: list[Offer] = []
            placed: list[int] = []
            outcomes: list[Outcome] = [Outcome.ACCEPTED] * len(batch)
            for i, m in enumerate(batch):
                parsed = parse_topic(m.topic.value)
                if parsed is None or parsed[1] == "cmd":
                    continue  # our own downlink or a foreign topic: acknowledged, nothing to store
                payload = m.payload if isinstance(m.payload, bytes | bytearray) else str(m.payload).encode()
                offers.append(Offer("mqtt", parsed[0], parsed[1], bytes(payload)))
                placed.append(i)
            if offers:
                for i, outcome in zip(placed, await self._submit_holding(offers), strict=True):
                    outcomes[i] = outcome
            for m, outcome in zip(batch, outcomes, strict=True):
                if outcome is Outcome.UNAVAILABLE or m.qos == 0:
                    continue  # not acknowledged: the broker redelivers it on the next session
                with contextlib.suppress(Exception):
                    paho_client.ack(m.mid, m.qos)
        finally:
            inflight.release()

    async def _submit_holding(self, offers: Sequence[Offer]) -> list[Outcome]:
        """Submit; while the log or bus cannot take them, keep the messages and retry, PUBACK withheld.

        Leaving them unacknowledged in the broker's session instead would fill its in-flight window
        (ReceiveMaximum / max_inflight_messages) and stop all delivery to this gateway even after the bus
        came back. Retrying delays data and loses none: if the process dies meanwhile, the broker still
        holds every message and redelivers it on the session's next connection.
        """
        delay = 0.2
        held = False
        while True:
            outcomes = await self._ingest.submit_many(offers)
            if Outcome.UNAVAILABLE not in outcomes:
                if held:
                    log.info("bus is back: %d held MQTT messages made durable", len(offers))
                return outcomes
            if not held:
                held = True
                MQTT_HELD.inc(len(offers))
                log.warning("bus unavailable: holding %d MQTT messages (no PUBACK) and retrying", len(offers))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def _session_properties() -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 7 * 24 * 3600  # keep the queue while the gateway restarts
    props.ReceiveMaximum = 1000
    return props


def _nodelay(paho_client: paho.Client) -> None:
    # Nagle adds about 40 ms to small MQTT messages between processes (design.md).
    sock = paho_client.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
