"""Keeps an external Mosquitto 2.0 in step with the device registry through its dynamic-security plugin.

Each device gets a client (username = device id, password = secret) and a role `vigil-device-{id}` that lets
it publish under its own id and receive its own commands; removed or disabled devices are disabled, never
deleted, so their history in Mosquitto's file stays readable. The hub's account (created by `mosquitto_ctrl
dynsec init`) gets the role `vigil-hub`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import orjson

from gateway.broker_auth import TOPIC_ROOT, command_topic

_log = logging.getLogger(__name__)

DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"  # Debian's mosquitto package
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
HUB_ROLE = "vigil-hub"
MANAGED_TEXTNAME = "vigil device"
_FULL_REFRESH_S = 300.0  # re-read Mosquitto now and then: an operator may have changed it behind our back
_BENIGN = ("already exists",)  # create* on something present: the wanted state already holds

Devices = Callable[[], Awaitable[list[tuple[str, str, bool]]]]
"""Every registered device as (device_id, secret, enabled)."""


def mosquitto_conf(
    port: int,
    dynsec_path: str,
    *,
    host: str | None = None,
    persistence_location: str | None = None,
    plugin: str = DYNSEC_PLUGIN,
) -> str:
    """The Mosquitto 2.0 configuration Vigil ships for an external broker (create `dynsec_path` with init)."""
    lines = [
        "# Vigil: devices and the hub authenticate through the dynamic-security plugin, kept in step with",
        "# the registry by gateway/mosquitto_sync.py. Create its file once with:",
        f"#   mosquitto_ctrl dynsec init {dynsec_path} <hub-user> <hub-password>",
        "per_listener_settings false",
        f"listener {port}" + (f" {host}" if host else ""),
        "allow_anonymous false",
        f"plugin {plugin}",
        f"plugin_opt_config_file {dynsec_path}",
        # Nagle adds ~40 ms to each small message between processes (design.md).
        "set_tcp_nodelay true",
        # A slow hub must never make Mosquitto drop queued vitals (default: drop beyond 1000 messages).
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        "max_inflight_messages 1000",
        # Pass oversized messages through so that Vigil dead-letters them (contract: at most 64 KiB is valid).
        "message_size_limit 0",
        # Queued messages of the hub's persistent session survive a restart (saved every autosave_interval s).
        "persistence true",
        "autosave_interval 10",
    ]
    if persistence_location:
        lines.append(f"persistence_location {persistence_location}")
    return "\n".join(lines) + "\n"


def device_role(device_id: str) -> str:
    return f"vigil-device-{device_id}"


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """Publish under its own id, subscribe to and receive its own commands; never publish a command."""
    own = f"{TOPIC_ROOT}{device_id}/#"
    cmd = command_topic(device_id)
    return [
        {"acltype": "publishClientSend", "topic": cmd, "priority": 1, "allow": False},
        {"acltype": "publishClientSend", "topic": own, "allow": True},
        {"acltype": "subscribePattern", "topic": cmd, "allow": True},
        {"acltype": "publishClientReceive", "topic": cmd, "allow": True},
    ]


HUB_ACLS: list[dict[str, Any]] = [
    {"acltype": "subscribePattern", "topic": f"{TOPIC_ROOT}+/+", "allow": True},
    {"acltype": "subscribePattern", "topic": f"$share/+/{TOPIC_ROOT}+/+", "allow": True},
    {"acltype": "publishClientReceive", "topic": f"{TOPIC_ROOT}+/+", "allow": True},
    {"acltype": "publishClientSend", "topic": command_topic("+"), "allow": True},
]


@dataclass(frozen=True, slots=True)
class _Known:
    """What Mosquitto holds for one client; `secret` None when unknown (dynsec keeps only hashes)."""

    secret: str | None
    enabled: bool
    has_role: bool = True
    managed: bool = True  # created by Vigil (its role or text name): disabled when its device goes


class DynsecError(RuntimeError):
    """Mosquitto refused a dynamic-security command, or did not answer."""


class MosquittoSync:
    """Reconciles Mosquitto's dynsec clients with the registry; cheap when nothing changed since last push."""

    def __init__(
        self,
        *,
        mqtt_host: str,
        mqtt_port: int,
        admin_username: str,
        admin_password: str,
        devices: Devices,
    ) -> None:
        self._host = mqtt_host
        self._port = mqtt_port
        self._admin = admin_username
        self._admin_password = admin_password
        self._devices = devices
        self._pushed: dict[str, _Known] | None = None  # None: unknown, read Mosquitto first
        self._stale = False  # read Mosquitto again at the next sync, keeping the secrets pushed
        self._lock = asyncio.Lock()
        self._requests = itertools.count(1)

    async def sync(self) -> int:
        """Push what changed; answers the number of commands sent (0 when Mosquitto was already in step)."""
        async with self._lock:
            wanted = {d: (secret, enabled) for d, secret, enabled in await self._devices()}
            if self._stale or self._pushed is None:
                self._stale = False
                known = await self._refresh()
            else:
                known = self._pushed
            commands = _plan(wanted, known)
            if commands:
                try:
                    await self._request(commands)
                except Exception:
                    self._pushed = None  # partly applied, or not at all: read Mosquitto again next time
                    raise
            pushed = {d: _Known(secret, enabled) for d, (secret, enabled) in wanted.items()}
            for d, k in known.items():
                if d not in wanted:
                    pushed[d] = _Known(k.secret, enabled=False, has_role=k.has_role, managed=k.managed)
            self._pushed = pushed
            return len(commands)

    async def run(self, interval: float = 1.0) -> None:
        """Sync every `interval` seconds, reading Mosquitto again every few minutes; errors are logged."""
        loop = asyncio.get_running_loop()
        last_full = loop.time()
        while True:
            if loop.time() - last_full >= _FULL_REFRESH_S:
                self._stale = True
                last_full = loop.time()
            try:
                await self.sync()
            except Exception:
                _log.exception("Mosquitto dynsec sync failed; retrying in %.1fs", interval)
            await asyncio.sleep(interval)

    async def _refresh(self) -> dict[str, _Known]:
        """Read Mosquitto's clients; give the hub account its role first if it lacks it."""
        known, admin_roles = await self._read_clients()
        if HUB_ROLE not in admin_roles:
            await self._request([{"command": "createRole", "rolename": HUB_ROLE, "acls": HUB_ACLS}])
            # Mosquitto kicks a client whose roles change, the requester included, and then loses the
            # response: send this one alone, without waiting for an answer, and check it by reading back.
            await self._send_unanswered(
                {"command": "addClientRole", "username": self._admin, "rolename": HUB_ROLE}
            )
            known, admin_roles = await self._read_clients()
            if HUB_ROLE not in admin_roles:
                raise DynsecError(f"could not give {self._admin!r} the role {HUB_ROLE}")
        return known

    async def _read_clients(self) -> tuple[dict[str, _Known], set[str]]:
        (answer,) = await self._request([{"command": "listClients", "verbose": True, "count": -1}])
        pushed = self._pushed or {}
        known: dict[str, _Known] = {}
        admin_roles: set[str] = set()
        for client in answer.get("data", {}).get("clients", []):
            name = client.get("username")
            roles = {str(r.get("rolename")) for r in client.get("roles", [])}
            if name == self._admin:
                admin_roles = roles
            elif isinstance(name, str):
                has_role = device_role(name) in roles
                # A secret this process pushed is still the one in force; otherwise it is set again once.
                secret = pushed[name].secret if name in pushed else None
                managed = has_role or client.get("textname") == MANAGED_TEXTNAME
                known[name] = _Known(secret, not client.get("disabled", False), has_role, managed)
        return known, admin_roles

    async def _send_unanswered(self, command: dict[str, Any]) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async with self._client() as client:
                await client.publish(CONTROL_TOPIC, orjson.dumps({"commands": [command]}), qos=0)

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self._host,
            self._port,
            username=self._admin,
            password=self._admin_password,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            timeout=10,
        )

    async def _request(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one message; answers their responses, raising DynsecError on a real failure."""
        tag = f"vigil-{next(self._requests)}-"
        for i, command in enumerate(commands):
            command["correlationData"] = f"{tag}{i}"
        responses: list[dict[str, Any]] = []
        async with self._client() as client:
            await client.subscribe(RESPONSE_TOPIC, qos=1)
            await client.publish(CONTROL_TOPIC, orjson.dumps({"commands": commands}), qos=1)
            async with asyncio.timeout(10):
                async for message in client.messages:
                    body = orjson.loads(message.payload) if isinstance(message.payload, bytes) else {}
                    responses += [
                        r
                        for r in body.get("responses", [])
                        if str(r.get("correlationData", "")).startswith(tag)
                    ]
                    if len(responses) >= len(commands):
                        break
        failures = [
            f"{r.get('command')}: {r['error']}"
            for r in responses
            if r.get("error") and not any(b in str(r["error"]).lower() for b in _BENIGN)
        ]
        if failures:
            raise DynsecError("; ".join(failures))
        return responses


def _enable(device_id: str, enabled: bool) -> dict[str, Any]:
    return {"command": "enableClient" if enabled else "disableClient", "username": device_id}


def _plan(wanted: dict[str, tuple[str, bool]], known: dict[str, _Known]) -> list[dict[str, Any]]:
    """The dynsec commands that take Mosquitto from `known` to `wanted` (createRole is idempotent).

    Only what differs is sent: Mosquitto disconnects a client whose roles change (and may on a new password).
    """
    commands: list[dict[str, Any]] = []
    for device_id, (secret, enabled) in sorted(wanted.items()):
        k = known.get(device_id)
        role = device_role(device_id)
        if k is None or not k.has_role:
            commands.append({"command": "createRole", "rolename": role, "acls": device_acls(device_id)})
        if k is None:
            client: dict[str, Any] = {"command": "createClient", "username": device_id, "password": secret}
            client |= {"textname": MANAGED_TEXTNAME, "roles": [{"rolename": role}]}
            commands.append(client)
            if not enabled:
                commands.append(_enable(device_id, enabled))
            continue
        if not k.has_role:
            commands.append({"command": "addClientRole", "username": device_id, "rolename": role})
        if k.secret != secret:
            commands.append({"command": "setClientPassword", "username": device_id, "password": secret})
        if k.enabled != enabled:
            commands.append(_enable(device_id, enabled))
    for device_id, k in sorted(known.items()):
        if device_id not in wanted and k.managed and k.enabled:
            commands.append(_enable(device_id, False))
    return commands
