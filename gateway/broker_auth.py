"""Who may connect to the embedded MQTT broker, and which topics each identity may use (contract 3)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from gateway.device import DeviceDirectory

TOPIC_ROOT = "vigil/v1/"
CMD_KIND = "cmd"  # downlink: the hub publishes it, the device subscribes to it


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated MQTT connection: the hub's own account, or one device."""

    username: str
    is_hub: bool


def device_topic(device_id: str, kind: str) -> str:
    return f"{TOPIC_ROOT}{device_id}/{kind}"


def command_topic(device_id: str) -> str:
    return device_topic(device_id, CMD_KIND)


class DeviceAuth:
    """Checks CONNECT credentials against the hub account and the device registry; anonymous is refused."""

    def __init__(self, directory: DeviceDirectory, *, hub_username: str, hub_password: str) -> None:
        self._directory = directory
        self._hub_username = hub_username
        self._hub_password = hub_password.encode()

    @property
    def hub_username(self) -> str:
        return self._hub_username

    async def authenticate(self, username: str | None, password: str | None) -> Identity | None:
        """The identity these credentials prove, or None to refuse the connection."""
        if not username or password is None:
            return None
        if username == self._hub_username:
            # The hub's name never falls through to the registry, so no device can be registered under it.
            ok = hmac.compare_digest(password.encode(), self._hub_password)
            return Identity(username, is_hub=True) if ok else None
        if not await self._directory.check_secret(username, password):
            return None
        info = await self._directory.get(username)
        if info is None or not info.enabled:
            return None
        return Identity(username, is_hub=False)


def publish_kind(device_id: str, topic: str) -> str | None:
    """The kind a device publishes on `topic`, or None when the topic is not one of its own uplinks."""
    prefix_len = len(TOPIC_ROOT) + len(device_id) + 1
    if (
        len(topic) <= prefix_len
        or not topic.startswith(TOPIC_ROOT)
        or topic[prefix_len - 1] != "/"
        or topic[len(TOPIC_ROOT) : prefix_len - 1] != device_id
    ):
        return None
    kind = topic[prefix_len:]
    if "/" in kind or "+" in kind or "#" in kind or kind == CMD_KIND:
        return None
    return kind


def may_publish(identity: Identity, topic: str) -> bool:
    return identity.is_hub or publish_kind(identity.username, topic) is not None


def may_subscribe(identity: Identity, topic_filter: str) -> bool:
    """The hub may subscribe to anything; a device only to its own command topic, without wildcards."""
    return identity.is_hub or topic_filter == command_topic(identity.username)


def may_receive(identity: Identity, topic: str) -> bool:
    return identity.is_hub or topic == command_topic(identity.username)
