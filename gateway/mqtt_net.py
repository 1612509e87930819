"""The restart net: a plain persistent subscription that catches what a Mosquitto restart would lose.

Gateways split the device topics with an MQTT v5 shared subscription (design.md). Mosquitto 2.0 restores a
persistent session's plain subscriptions from its persistence file after a restart, but not its shared
ones (seen with 2.0.11: a shared subscriber's queue is kept while it is away, and lost with the broker).
Until the first gateway has subscribed again, a device that reconnected faster gets PUBACKs for readings
that match no subscription: the broker drops them, and the device, rightly, forgets them.

The net closes that window. One gateway (`VIGIL_MQTT_RESTART_NET=1`) also holds a second session, MQTT
3.1.1 with clean session off, subscribed to the same topics without `$share`: that subscription survives
the restart, so the broker queues every reading for it from its first second up. The net's messages are
acknowledged and dropped while the gateway's own shared subscription is up (the shared group has them),
and made durable like any other while it is not, for `GRACE` seconds after both sessions are back, and for
as long as a backlog delivered in that time keeps coming. Readings taken both ways are one event twice,
which the event id makes harmless (design rule 3). The price is that this gateway receives every
reading twice; the net's decode is cheap (MQTT 3.1.1 carries no properties) and is counted in
`vigil_mqtt_net_total`.

If the net's gateway is down during a broker restart, its session keeps queuing, and what it holds is made
durable when the gateway is back (later, not lost). A graceful stop unsubscribes the net, so a gateway that
is scaled away leaves no queue growing behind it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter

from streams.metrics import REGISTRY

GRACE = 5.0  # seconds after both sessions are back during which the net's messages are still ingested

NET_TOTAL = Counter(
    "vigil_mqtt_net_total",
    "Messages the restart net received: ingested (a window the shared group may have missed) or skipped",
    ["outcome"],
    registry=REGISTRY,
)


class Subscribed(Protocol):
    @property
    def subscribed_at(self) -> float | None:
        """Monotonic time the session's subscription was confirmed; None while it is down."""


class RestartWindow:
    """Decides, for each batch of the net, whether the shared group may have missed it (module docstring)."""

    def __init__(
        self,
        shared: Subscribed,
        net: Subscribed,
        *,
        grace: float = GRACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shared = shared
        self._net = net
        self._grace = grace
        self._clock = clock
        self._open = False
        self._ingested = NET_TOTAL.labels("ingested")
        self._skipped = NET_TOTAL.labels("skipped")

    def admit(self, backlog: bool, size: int) -> bool:
        """True: make this batch durable. `backlog`: more messages were waiting when it was taken."""
        admitted = self.within_grace() or self._open  # a batch right after one that saw a backlog is of it
        self._open = admitted and backlog
        (self._ingested if admitted else self._skipped).inc(size)
        return admitted

    def within_grace(self) -> bool:
        shared, net = self._shared.subscribed_at, self._net.subscribed_at
        if shared is None or net is None:
            return True
        return self._clock() < max(shared, net) + self._grace
