"""Where the live relay (Kafka `vigil.live.v1` -> Redis, `streams/redis_live.py` `LiveRelay`) runs.

`VIGIL_LIVE_RELAY=api` (the default): on the API nodes, which serve what it feeds; `worker`: in the workers
(as before; for a deployment whose API nodes cannot reach Kafka's live topic); `off`: nowhere (another
process relays). Wherever it runs, its consumer group makes one process relay and the others stand by, so
running it in several roles at once is harmless. On the API nodes it keeps its CPU (a fifth of a worker's,
docs/SCALING.md) off the processors' path.
"""

from __future__ import annotations

import socket
from typing import Any

from streams import topics
from streams.kafka import bootstrap_servers
from streams.redis_live import DEFAULT_RETENTION_S, MIN_RETENTION_S, LiveRelay
from vigil.settings import Settings

RELAY_ENV = "VIGIL_LIVE_RELAY"  # api (default), worker or off
RELAY_ROLES = ("api", "worker", "off")
LIVE_RETENTION_ENV = "VIGIL_LIVE_RETENTION_S"  # how long the Redis site streams keep live records


def relay_role(env: dict[str, str]) -> str:
    """The role that runs the relay; a value other than api, worker or off stops the process at start."""
    role = (env.get(RELAY_ENV) or "api").strip().lower()
    if role not in RELAY_ROLES:
        raise SystemExit(f"{RELAY_ENV} must be one of {', '.join(RELAY_ROLES)}, got {role!r}")
    return role


def redis_client(url: str) -> Any:
    """A Redis client whose calls fail within seconds instead of hanging on a Redis that stopped answering."""
    from redis.asyncio import Redis  # noqa: PLC0415

    return Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3, health_check_interval=10)


def live_relay(settings: Settings, env: dict[str, str], role: str) -> LiveRelay | None:
    """The relay for this process of `role` (api or worker), or None when it runs elsewhere or there is no
    Redis. Its Redis client opens on the loop that runs it."""
    if relay_role(env) != role or not settings.redis_url or not settings.kafka_url:
        return None
    retention = max(MIN_RETENTION_S, float(env.get(LIVE_RETENTION_ENV) or DEFAULT_RETENTION_S))
    return LiveRelay(
        bootstrap_servers(settings.kafka_url),
        redis_client(settings.redis_url),
        topic=topics.LIVE,
        retention_s=retention,
        client_id=f"vigil-{role}-relay-{socket.gethostname()}-{settings.http_port}",
    )
