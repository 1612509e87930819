"""Configuration from the environment: the contract's VIGIL_* variables and their defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number, got {raw!r}") from None


@dataclass(frozen=True, slots=True)
class MqttUrl:
    host: str
    port: int
    username: str | None
    password: str | None


DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"  # the shipped defaults


@dataclass(frozen=True, slots=True)
class Settings:
    host: str
    http_port: int
    mqtt_port: int
    coap_port: int
    coaps_port: int
    mllp_port: int
    data_dir: Path
    admin_password: str | None
    mqtt_url: MqttUrl | None  # an external broker; None embeds one
    mqtt_dynsec: bool  # keep the external Mosquitto's dynamic-security clients in step with the registry
    mqtt_shared_group: str | None  # MQTT v5 shared subscription group, for several gateway processes
    mqtt_restart_net: bool  # this gateway also holds the restart net (gateway/mqtt_net.py)
    database_url: str | None  # PostgreSQL (scaled); None: SQLite in the data dir
    kafka_url: str | None
    redis_url: str | None
    influx_url: str | None
    influx_api: str
    influx_token: str | None
    influx_org: str | None
    influx_bucket: str
    influx_db: str
    jwt_secret: str | None
    default_site: str
    config_dir: Path  # rules.yaml (hot-reloaded), escalation.yaml

    @property
    def sqlite_records(self) -> Path:
        return self.data_dir / "records.db"


def parse_mqtt_url(url: str) -> MqttUrl:
    u = urlsplit(url if "://" in url else f"mqtt://{url}")
    if u.scheme not in ("mqtt", "tcp"):
        raise SystemExit(f"VIGIL_MQTT_URL must be mqtt://[user:password@]host:port, got scheme {u.scheme!r}")
    return MqttUrl(u.hostname or "127.0.0.1", u.port or 1883, u.username, u.password)


def load(env: dict[str, str] | None = None) -> Settings:
    e = dict(os.environ) if env is None else env
    coap = _int(e, "VIGIL_COAP_PORT", 5683)
    mqtt_url = e.get("VIGIL_MQTT_URL") or None
    return Settings(
        host=e.get("VIGIL_HOST", "127.0.0.1"),
        http_port=_int(e, "VIGIL_HTTP_PORT", 8080),
        mqtt_port=_int(e, "VIGIL_MQTT_PORT", 1883),
        coap_port=coap,
        coaps_port=_int(e, "VIGIL_COAPS_PORT", coap + 1),
        mllp_port=_int(e, "VIGIL_MLLP_PORT", 2575),
        data_dir=Path(e.get("VIGIL_DATA_DIR", "./var")).resolve(),
        admin_password=e.get("VIGIL_ADMIN_PASSWORD") or None,
        mqtt_url=parse_mqtt_url(mqtt_url) if mqtt_url else None,
        mqtt_dynsec=e.get("VIGIL_MQTT_DYNSEC", "1") not in ("0", "false", "no"),
        mqtt_shared_group=e.get("VIGIL_MQTT_SHARED_GROUP") or None,
        mqtt_restart_net=e.get("VIGIL_MQTT_RESTART_NET", "0") in ("1", "true", "yes"),
        database_url=e.get("VIGIL_DATABASE_URL") or None,
        kafka_url=e.get("VIGIL_KAFKA_URL") or None,
        redis_url=e.get("VIGIL_REDIS_URL") or None,
        influx_url=e.get("VIGIL_INFLUX_URL") or None,
        influx_api=e.get("VIGIL_INFLUX_API", "v2"),
        influx_token=e.get("VIGIL_INFLUX_TOKEN") or None,
        influx_org=e.get("VIGIL_INFLUX_ORG") or None,
        influx_bucket=e.get("VIGIL_INFLUX_BUCKET", "vigil"),
        influx_db=e.get("VIGIL_INFLUX_DB", "vigil"),
        jwt_secret=e.get("VIGIL_JWT_SECRET") or None,
        default_site=e.get("VIGIL_DEFAULT_SITE", "default"),
        config_dir=Path(e.get("VIGIL_CONFIG_DIR") or DEFAULT_CONFIG_DIR).resolve(),
    )
