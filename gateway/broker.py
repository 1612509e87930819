"""The MQTT broker embedded in `vigil run` (amqtt 0.12.1): a device's publish goes to ingest, PUBACK after.

amqtt acknowledges an inbound QoS 1 PUBLISH in `ProtocolHandler._handle_qos1_message_flow`, right after
queueing it and before any plugin sees it (no plugin hook runs before the PUBACK), so a device's publish is
taken over in `_IngestHandler.handle_publish`. Authentication runs before amqtt touches an existing session,
so a wrong password cannot evict a connected device's session by reusing its client id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.packet import PUBACK
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import IncomingApplicationMessage
from amqtt.utils import gen_client_id

from gateway.broker_auth import (
    DeviceAuth,
    Identity,
    command_topic,
    may_publish,
    may_receive,
    may_subscribe,
    publish_kind,
)
from gateway.device import DeviceDirectory
from gateway.outcome import Ingest, Outcome

_log = logging.getLogger(__name__)

OnRefused = Callable[[str, str, str, bytes], None]
"""`(reason, device_id, topic, payload)`: a publish the broker refused before it could reach ingest."""

_PUBACK_HEADER = bytes((PUBACK << 4, 2))  # fixed header of a PUBACK; the packet id follows
_IDENTITY = "vigil.identity"  # key in amqtt's Session.attributes
# What a reconnecting client brings to its persistent session (as upstream's _initialize_client_session).
_RENEWED_ON_CONNECT = (
    "will_flag",
    "will_message",
    "will_topic",
    "will_qos",
    "keep_alive",
    "username",
    "password",
)


def _ignore_refused(reason: str, device_id: str, topic: str, payload: bytes) -> None:
    return None


def _identity(session: Any) -> Identity | None:
    if session is None:
        return None
    found = session.attributes.get(_IDENTITY)
    return found if isinstance(found, Identity) else None


class EmbeddedBroker:
    """An in-process MQTT 3.1.1 broker: devices log in with their secret and publish only as themselves."""

    def __init__(
        self,
        ingest: Ingest,
        directory: DeviceDirectory,
        *,
        host: str,
        port: int,
        hub_username: str,
        hub_password: str,
        on_refused: OnRefused = _ignore_refused,
    ) -> None:
        self._ingest = ingest
        self._auth = DeviceAuth(directory, hub_username=hub_username, hub_password=hub_password)
        self._host = host
        self._port = port
        self._on_refused = on_refused
        self._broker: _AmqttBroker | None = None

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        """Listen on host:port; an address in use raises the OSError (EADDRINUSE) that caused it."""
        bind = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        config = {
            "listeners": {"default": {"type": "tcp", "bind": bind, "max_connections": 0}},
            # Only what this module adds: no anonymous-auth, $SYS or packet-logging plugins on the hot path.
            "plugins": {},
        }
        broker = _AmqttBroker(config, ingest=self._ingest, auth=self._auth, on_refused=self._on_refused)
        try:
            await broker.start()
        except Exception as exc:
            cause = exc.__cause__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__
            if isinstance(cause, OSError):
                raise cause from exc
            raise
        self._broker = broker

    async def stop(self) -> None:
        """Close every connection, then wait for the appends already handed to ingest."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            await broker.drain_submits()

    async def publish_command(self, device_id: str, payload: bytes) -> None:
        """Queue a QoS 1 downlink on `vigil/v1/{device_id}/cmd` (kept for an offline persistent session)."""
        await self._require().internal_message_broadcast(command_topic(device_id), payload, QOS_1)

    def connected_devices(self) -> set[str]:
        broker = self._broker
        if broker is None:
            return set()
        found: set[str] = set()
        for session, _handler in broker.sessions.values():
            identity = _identity(session)
            if identity is not None and not identity.is_hub and session.transitions.is_connected():
                found.add(identity.username)
        return found

    def _require(self) -> _AmqttBroker:
        if self._broker is None:
            raise RuntimeError("the embedded broker is not running")
        return self._broker


class _AmqttBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker with Vigil's authentication, topic ACL and ingest-before-PUBACK handler."""

    def __init__(
        self, config: dict[str, Any], *, ingest: Ingest, auth: DeviceAuth, on_refused: OnRefused
    ) -> None:
        super().__init__(config)
        self._ingest = ingest
        self._auth = auth
        self._on_refused = on_refused
        self._submits: set[asyncio.Future[Outcome]] = set()
        self._watchers: bool | None = None  # cached: does any non-device session subscribe to anything?

    # -- the publish path, called by _IngestHandler

    async def submit(self, device_id: str, kind: str, payload: bytes) -> Outcome:
        """Hand one publish to ingest; a bug in ingest answers UNAVAILABLE so that the device resends."""
        # Shielded: a device that disconnects mid-append must not cancel the append it started.
        task = asyncio.ensure_future(
            self._ingest.submit(transport="mqtt", device_id=device_id, kind=kind, payload=payload)
        )
        self._submits.add(task)
        task.add_done_callback(self._submits.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("ingest.submit failed for %s/%s; not acknowledged", device_id, kind)
            return Outcome.UNAVAILABLE

    def refuse(self, device_id: str, topic: str, payload: bytes) -> None:
        _log.warning("device %s may not publish on %r: refused (unauthorised)", device_id, topic)
        try:
            self._on_refused(Outcome.UNAUTHORISED.value, device_id, topic, payload)
        except Exception:
            _log.exception("on_refused callback failed")

    def has_watchers(self) -> bool:
        """Whether a device's publish needs the broker's fan-out at all (only the hub account subscribes)."""
        if self._watchers is None:
            self._watchers = any(
                (ident := _identity(session)) is None or ident.is_hub
                for subscribers in self._subscriptions.values()
                for session, _qos in subscribers
            )
        return self._watchers

    async def drain_submits(self) -> None:
        if self._submits:
            await asyncio.gather(*self._submits, return_exceptions=True)

    # -- amqtt overrides

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Nagle would hold a small PUBACK back for up to 40 ms (design.md, "Speed and the broker").
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await super().stream_connected(reader, writer, listener_name)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Any]:
        # Upstream's version, with authentication moved ahead of any change to an existing session.
        try:
            _unused, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc

        identity = await self._auth.authenticate(session.username, session.password)
        refusal: int | None = None
        if identity is None or (session.will_flag and not may_publish(identity, session.will_topic or "")):
            refusal = NOT_AUTHORIZED
        elif session.client_id and session.client_id in self._sessions:
            owner = _identity(self._sessions[session.client_id][0])
            if owner is not None and owner.username != identity.username:
                refusal = IDENTIFIER_REJECTED  # a client id belongs to the identity that holds its session
        if refusal is not None or identity is None:
            await ConnackPacket.build(0, refusal).to_stream(writer)
            await writer.close()
            msg = f"CONNECT from {remote_address}:{remote_port} as {session.username!r} refused ({refusal})"
            raise AMQTTError(msg)

        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing = self._sessions[session.client_id][0]
            for name in _RENEWED_ON_CONNECT:
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        session.attributes[_IDENTITY] = identity
        # [MQTT-3.1.2-24]: a client silent for 1.5 keep-alive periods is gone.
        session.keep_alive += session.keep_alive // 2
        return _IngestHandler(self.plugins_manager, self, loop=self._loop), session

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        return _identity(session) is not None  # checked in _initialize_client_session

    async def _topic_filtering(self, session: Any, topic: str, action: Action) -> bool:
        identity = _identity(session)
        if identity is None:
            return False
        if action == Action.PUBLISH:
            return may_publish(identity, topic)
        if action == Action.SUBSCRIBE:
            return may_subscribe(identity, topic)
        return may_receive(identity, topic)

    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        self._watchers = None
        result: int = await super().add_subscription(subscription, session)
        return result

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        self._watchers = None
        result: int = super()._del_subscription(a_filter, session)
        return result


class _IngestHandler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt ships no type information
    """One device connection: each PUBLISH goes to ingest, and is acknowledged only once ingest answered."""

    def __init__(
        self, plugins_manager: Any, broker: _AmqttBroker, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        super().__init__(plugins_manager, loop=loop)
        self._broker = broker
        self._previous_ack: asyncio.Future[None] | None = None
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._acks = bytearray()  # PUBACKs due in this loop iteration, written with one send

    async def handle_publish(self, publish_packet: Any) -> None:
        identity = _identity(self.session)
        if identity is None or identity.is_hub:
            await super().handle_publish(publish_packet)
            return
        topic: str | None = publish_packet.topic_name
        data: bytes | bytearray | None = publish_packet.data
        if topic is None or data is None:
            return
        qos: int = publish_packet.qos
        # amqtt starts one task per packet, in arrival order; taking a place in the acknowledgement chain
        # before the first await keeps PUBACKs in PUBLISH order [MQTT-4.6.0-2] while appends overlap.
        previous = self._previous_ack
        mine: asyncio.Future[None] = self._loop.create_future()
        self._previous_ack = mine
        try:
            payload = bytes(data)
            kind = publish_kind(identity.username, topic)
            if kind is None:
                # Another device's topic (or no uplink at all): it never reaches ingest.
                self._broker.refuse(identity.username, topic, payload)
                outcome = Outcome.UNAUTHORISED
            else:
                outcome = await self._broker.submit(identity.username, kind, payload)
            if previous is not None:
                await previous
            if self._closing:
                return
            if outcome is Outcome.UNAVAILABLE:
                # No PUBACK: close, so that the device's client sends it again after reconnecting.
                _log.warning("ingest unavailable: closing %s without PUBACK", identity.username)
                await self._close()
                return
            if qos == QOS_2:
                # amqtt's own QoS 2 flow (PUBREC, PUBREL, PUBCOMP); its delivery step re-checks the topic ACL.
                await super().handle_publish(publish_packet)
                return
            if qos == QOS_1:
                # MQTT 3.1.1 has no negative PUBACK: refused content was dead-lettered durably, so ack it too.
                self._queue_puback(publish_packet.packet_id)
            if kind is not None and self._broker.has_watchers() and self.session is not None:
                message = IncomingApplicationMessage(
                    publish_packet.packet_id, topic, qos, payload, publish_packet.retain_flag
                )
                message.publish_packet = publish_packet
                self.session.delivered_message_queue.put_nowait(message)
        finally:
            if not mine.done():
                mine.set_result(None)

    def _queue_puback(self, packet_id: int) -> None:
        # One send() per PUBACK is a syscall each (the largest single cost in a profile); acks that become due
        # in the same loop iteration go out together, still in order and without waiting for anything.
        if not self._acks:
            self._loop.call_soon(self._flush_acks)
        self._acks += _PUBACK_HEADER + packet_id.to_bytes(2, "big")

    def _flush_acks(self) -> None:
        if self._acks and self.writer is not None:
            self.writer.write(bytes(self._acks))
        self._acks.clear()

    def handle_read_timeout(self) -> None:
        # amqtt's broker ignores a silent client; drop it so its session and liveness reflect reality.
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        self._closing = True
        self._flush_acks()  # earlier messages were appended: their PUBACKs still go out
        if self.writer is not None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await self.writer.close()
