"""The simulator runtime: one task per device, publishing its messages over MQTT or CoAP in scenario time.

Scenario time runs `speed` times faster than the wall clock; each device's `ts` is `start_ms` plus scenario
time. Messages made while the hub is away wait in the device's outbox and go out, in order and with their
original `ts`, once it is back; a device in an "offline" phase makes none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import aiocoap.error
import aiomqtt
import orjson

from devices.fleet import Fleet, SimDevice
from devices.messages import DeviceModel, DispatchOrder, Message, messages_at, model_for
from streams.clock import Clock, SystemClock

__all__ = ["Simulator", "messages_at"]

log = logging.getLogger("vigil.simulate")

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
PUBLISH_TIMEOUT_S = 5.0
COAP_JSON = 50  # content-format application/json


@dataclass(slots=True)
class Outbox:
    """A device's messages not yet acknowledged by the hub, oldest first."""

    items: deque[Message] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False  # no more messages will be added

    def put(self, message: Message) -> None:
        self.items.append(message)
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    async def next(self) -> Message | None:
        """The oldest message (left in place until `done`), or None once closed and empty."""
        while not self.items:
            if self.closed:
                return None
            self.ready.clear()
            await self.ready.wait()
        return self.items[0]

    def done(self) -> None:
        self.items.popleft()


class Simulator:
    """Plays a fleet against a hub over the real protocols until `duration_s` of scenario time has passed."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        mqtt_host: str = "127.0.0.1",
        mqtt_port: int = 1883,
        coap_host: str = "127.0.0.1",
        coap_port: int = 5683,
        coaps_port: int | None = None,
        speed: float = 1.0,
        seed: int = 0,
        duration_s: float | None = None,
        start_ms: int | None = None,
        clock: Clock | None = None,
        flush_timeout_s: float = 10.0,
        on_sent: Callable[[str, str, dict[str, Any]], None] | None = None,
    ) -> None:
        if speed <= 0 or not math.isfinite(speed):
            raise ValueError("speed must be a positive number")
        self.fleet = fleet
        self.mqtt_host, self.mqtt_port = mqtt_host, mqtt_port
        self.coap_host, self.coap_port = coap_host, coap_port
        self.coaps_port = coaps_port if coaps_port is not None else coap_port + 1
        self.speed, self.seed, self.duration_s = speed, seed, duration_s
        self.clock: Clock = clock or SystemClock()
        self.start_ms = start_ms if start_ms is not None else self.clock.now_ms()
        self.flush_timeout_s = flush_timeout_s
        self.on_sent = on_sent
        self.sent: Counter[tuple[str, str]] = Counter()  # (device, kind) -> acknowledged by the hub
        self.refused: Counter[tuple[str, str]] = Counter()  # (device, kind) -> answered 4.xx over CoAP
        self.unsent: Counter[str] = Counter()  # device -> left in the outbox when the run ended
        self.models = {d.id: model_for(d, seed=seed, start_ms=self.start_ms) for d in fleet.devices}
        self._next_tick: dict[str, int] = dict.fromkeys(self.models, 0)
        self._t0 = 0.0

    async def run(self) -> None:
        """Run every device until the duration is over and its outbox is flushed (or cancelled)."""
        self._t0 = self.clock.monotonic()
        async with asyncio.TaskGroup() as tg:
            for device in self.fleet.devices:
                tg.create_task(self._device(device), name=f"sim-{device.id}")

    def scenario_s(self) -> float:
        """Scenario seconds elapsed since the run began."""
        return (self.clock.monotonic() - self._t0) * self.speed

    async def _device(self, device: SimDevice) -> None:
        model, outbox = self.models[device.id], Outbox()
        sender = self._mqtt_loop if device.transport == "mqtt" else self._coap_loop
        send = asyncio.create_task(sender(device, model, outbox), name=f"send-{device.id}")
        generate = asyncio.create_task(self._generate(model, outbox), name=f"tick-{device.id}")
        try:
            await asyncio.wait({send, generate}, return_when=asyncio.FIRST_COMPLETED)
            if send.done():
                send.result()  # the sender only ends early by a bug: let it surface
            await generate
            # Generation is over: give the sender a bounded time to flush what the hub has not taken.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(send), self.flush_timeout_s)
        finally:
            for task in (generate, send):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if outbox.items:
                self.unsent[device.id] = len(outbox.items)
                log.warning("%s: %d messages not delivered", device.id, len(outbox.items))

    async def _generate(self, model: DeviceModel, outbox: Outbox) -> None:
        """Tick every scenario second on time, queueing that second's messages."""
        k = 0
        try:
            while self.duration_s is None or k <= self.duration_s:
                delay = self._t0 + k / self.speed - self.clock.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                for message in messages_at(model, k * 1000):
                    outbox.put(message)
                k += 1
                self._next_tick[model.device.id] = k
        finally:
            outbox.close()

    def _sent(self, device: SimDevice, kind: str, payload: dict[str, Any]) -> None:
        self.sent[(device.id, kind)] += 1
        if self.on_sent is not None:
            self.on_sent(device.id, kind, payload)

    async def _mqtt_loop(self, device: SimDevice, model: DeviceModel, outbox: Outbox) -> None:
        """Connect, publish the outbox at QoS 1 in order, and reconnect with backoff when the broker goes."""
        backoff = BACKOFF_MIN_S
        while outbox.items or not outbox.closed:
            client = aiomqtt.Client(
                self.mqtt_host,
                self.mqtt_port,
                username=device.id,
                password=device.secret or None,
                identifier=device.id,
                # A persistent session keeps dispatch orders that arrive while the device is away.
                clean_session=False,
                keepalive=30,
                timeout=PUBLISH_TIMEOUT_S,
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            )
            try:
                async with client:
                    backoff = BACKOFF_MIN_S
                    await client.subscribe(f"vigil/v1/{device.id}/cmd", qos=1)
                    async with asyncio.TaskGroup() as tg:
                        # The receiver also notices a lost connection, which ends the publisher with it.
                        receiver = tg.create_task(self._receive(client, device, model))
                        await self._publish_all(client, device, outbox)
                        receiver.cancel()
                    return
            except* aiomqtt.MqttError as group:
                log.info("%s: MQTT %s; retrying in %.1fs", device.id, group.exceptions[0], backoff)
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _publish_all(self, client: aiomqtt.Client, device: SimDevice, outbox: Outbox) -> None:
        while (message := await outbox.next()) is not None:
            kind, payload = message
            await client.publish(f"vigil/v1/{device.id}/{kind}", orjson.dumps(payload), qos=1)
            outbox.done()  # only after the PUBACK: a message lost with the connection is sent again
            self._sent(device, kind, payload)

    async def _receive(self, client: aiomqtt.Client, device: SimDevice, model: DeviceModel) -> None:
        async for message in client.messages:
            if isinstance(message.payload, bytes | bytearray):
                self.on_command(device, model, bytes(message.payload))

    def on_command(self, device: SimDevice, model: DeviceModel, payload: bytes) -> None:
        """A downlink command: an ambulance takes a dispatch order from the next scenario second on."""
        order = parse_dispatch(payload, self._next_tick[device.id])
        if device.type != "ambulance" or order is None:
            log.info("%s: ignoring command %r", device.id, payload[:200])
            return
        log.info(
            "%s: dispatch order %s at scenario second %d", device.id, order.incident_id, order.received_s
        )
        model.orders.append(order)

    async def _coap_loop(self, device: SimDevice, model: DeviceModel, outbox: Outbox) -> None:
        """POST the outbox in order over CoAP (DTLS-PSK unless the device may use plain CoAP)."""
        if device.allow_plain_coap:
            base = f"coap://{self.coap_host}:{self.coap_port}"
        else:
            base = f"coaps://{self.coap_host}:{self.coaps_port}"
        backoff = BACKOFF_MIN_S
        while outbox.items or not outbox.closed:
            context = await aiocoap.Context.create_client_context()
            if not device.allow_plain_coap:
                context.client_credentials.load_from_dict(
                    {
                        f"{base}/*": {
                            "dtls": {"psk": device.secret.encode(), "client-identity": device.id.encode()}
                        }
                    }
                )
            try:
                while (message := await outbox.next()) is not None:
                    kind, payload = message
                    request = aiocoap.Message(
                        code=aiocoap.POST,
                        uri=f"{base}/v1/{device.id}/{kind}",
                        payload=orjson.dumps(payload),
                        content_format=COAP_JSON,
                    )
                    response = await asyncio.wait_for(context.request(request).response, PUBLISH_TIMEOUT_S)
                    if response.code.is_successful():
                        self._sent(device, kind, payload)
                    elif response.code.class_ == 4:
                        # The hub dead-lettered it: sending it again would not change the answer.
                        self.refused[(device.id, kind)] += 1
                        log.warning("%s: %s refused with %s", device.id, kind, response.code)
                    else:
                        raise ConnectionError(f"hub answered {response.code}")
                    outbox.done()
                    backoff = BACKOFF_MIN_S
                return
            except (OSError, TimeoutError, ConnectionError, aiocoap.error.Error) as e:
                log.info("%s: CoAP %s; retrying in %.1fs", device.id, e, backoff)
            finally:
                await context.shutdown()
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)


def parse_dispatch(payload: bytes, received_s: int) -> DispatchOrder | None:
    """Read `{"type": "dispatch", "incident_id": "I-17", "lat": .., "lon": ..}`; None if it is not one."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "dispatch" not in (data.get("type"), data.get("action")):
        return None
    incident = data.get("incident_id")
    if not isinstance(incident, str) or not incident:
        return None
    lat, lon = data.get("lat"), data.get("lon")
    scene = None
    if (
        isinstance(lat, int | float)
        and isinstance(lon, int | float)
        and -90 <= lat <= 90
        and -180 <= lon <= 180
    ):
        scene = (float(lat), float(lon))
    return DispatchOrder(received_s, incident, scene)
