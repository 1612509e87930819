"""The compose deployment (docker-compose.yml, Dockerfile, deploy/, dashboards/grafana/), checked without a
Docker engine: Debian's docker-compose 1.29 validates and renders the file, and the files it mounts are read.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.mosquitto_sync import mosquitto_conf
from streams.codes import BY_REF
from tests.servers import require

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
VIGIL_ROLES = {"vigil-gateway": "gateway", "vigil-worker": "worker", "vigil-api": "api"}
INFRA = {"mosquitto", "kafka", "postgres", "influxdb", "redis", "grafana"}
# Host ports: the api, Mosquitto for devices, CoAP/CoAPS on the gateway, Grafana. Nothing else is reachable.
PUBLISHED = {
    "vigil-api": {(8080, "tcp")},
    "mosquitto": {(1883, "tcp")},
    "vigil-gateway": {(5683, "udp"), (5684, "udp")},
    "grafana": {(3000, "tcp")},
}
# What the Mosquitto image ships the plugin as (Debian's path is gateway.mosquitto_sync.DYNSEC_PLUGIN).
IMAGE_DYNSEC_PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"
DATASOURCE_YAML = REPO / "deploy/grafana/provisioning/datasources/vigil.yaml"
DASHBOARD = REPO / "dashboards/grafana/vitals.json"


def uncommented(path: Path) -> str:
    """A YAML or shell file without its comment lines (they may quote syntax as an example)."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def example_env() -> dict[str, str]:
    """The variables .env.example sets (every placeholder), the way a first deployment starts."""
    env = {}
    for raw in (REPO / ".env.example").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def compose(*args: str, env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """docker-compose on the repo's file with exactly `env`: an empty env file, so a developer's .env in the
    repository never leaks into the result."""
    binary = require("docker-compose")  # fails, naming the README's test command that installs it
    empty = tmp / "empty.env"
    empty.write_text("")
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "--env-file", str(empty), *args],
        env={**base, **env},
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@cache
def rendered() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        r = compose("config", env=example_env(), tmp=Path(d))
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = yaml.safe_load(r.stdout)
    return data


def test_config_validates_with_the_example_env(tmp_path: Path) -> None:
    r = compose("config", "-q", env=example_env(), tmp=tmp_path)
    assert r.returncode == 0, r.stderr


def test_secrets_are_required_not_defaulted(tmp_path: Path) -> None:
    """Without the secrets compose refuses to render: no password has a default in the file."""
    required = set(re.findall(r"\$\{(\w+):\?", uncommented(COMPOSE)))
    assert {
        "VIGIL_ADMIN_PASSWORD",
        "VIGIL_JWT_SECRET",
        "VIGIL_SECRET_KEY",
        "VIGIL_INFLUX_TOKEN",
        "VIGIL_MQTT_ADMIN_PASSWORD",
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "INFLUX_ADMIN_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "GRAFANA_INFLUX_PASSWORD",
    } <= required
    assert required <= set(example_env()), "every required variable has a placeholder in .env.example"
    for name in sorted(required):
        env = {k: v for k, v in example_env().items() if k != name}
        r = compose("config", "-q", env=env, tmp=tmp_path)
        assert r.returncode != 0, f"compose rendered without {name}"
        assert name in r.stderr
    for name, value in example_env().items():
        if name in required:
            assert "CHANGE" in value.upper(), f"{name} in .env.example must be an obvious placeholder"


def test_services_have_healthchecks_and_restart_policies() -> None:
    services = rendered()["services"]
    assert set(services) == INFRA | set(VIGIL_ROLES)
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable") and hc.get("test"), f"{name} has no healthcheck"
        assert svc.get("restart") == "unless-stopped", name
        for dep, how in (svc.get("depends_on") or {}).items():
            assert how == {"condition": "service_healthy"}, (name, dep, how)
            assert services[dep].get("healthcheck"), (name, dep)


def test_vigil_roles_are_built_from_the_repo_dockerfile() -> None:
    services = rendered()["services"]
    for name, role in VIGIL_ROLES.items():
        svc = services[name]
        assert Path(svc["build"]["context"]) == REPO, name
        assert svc["build"].get("dockerfile", "Dockerfile") == "Dockerfile", name
        assert svc["command"] == [role], name
        hc = " ".join(svc["healthcheck"]["test"])
        assert "/healthz" in hc, name
        env = svc["environment"]
        for var in (
            "VIGIL_KAFKA_URL",
            "VIGIL_REDIS_URL",
            "VIGIL_DATABASE_URL",
            "VIGIL_INFLUX_URL",
            "VIGIL_INFLUX_TOKEN",
            "VIGIL_INFLUX_ORG",
            "VIGIL_INFLUX_BUCKET",
            "VIGIL_INFLUX_DB",
            "VIGIL_MQTT_URL",
            "VIGIL_JWT_SECRET",
            "VIGIL_SECRET_KEY",
            "VIGIL_ADMIN_PASSWORD",
        ):
            assert env.get(var), (name, var)
        assert env["VIGIL_INFLUX_API"] == "v2"
        assert env["VIGIL_HOST"] == "0.0.0.0"  # reachable from the other containers
        assert env["VIGIL_DATABASE_URL"].startswith("postgresql://")
        assert (
            env["VIGIL_MQTT_URL"].startswith("mqtt://vigil-hub:")
            and "@mosquitto:1883" in env["VIGIL_MQTT_URL"]
        )
    assert services["vigil-gateway"]["deploy"]["replicas"] == 1

    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", dockerfile, re.M)
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert len(stages) >= 2 and set(stages) == {"${PYTHON_IMAGE}"}, "multi-stage, python:3.11-slim only"
    for dep in ("autoconf", "automake", "libtool", "gcc"):
        assert dep in dockerfile
    assert 'pip install ".[scaled]"' in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and not user[-1].startswith(("root", "0")), "the image runs as a non-root user"
    assert 'ENTRYPOINT ["vigil"]' in dockerfile
    assert re.search(r"^HEALTHCHECK .*/healthz", dockerfile, re.M | re.S)


def test_only_the_documented_ports_are_published() -> None:
    for name, svc in rendered()["services"].items():
        published = {(int(p["published"]), p.get("protocol", "tcp")) for p in svc.get("ports", [])}
        assert published == PUBLISHED.get(name, set()), name


def test_mosquitto_config_is_the_shipped_one_with_the_design_limits() -> None:
    conf = (REPO / "deploy/mosquitto/mosquitto.conf").read_text()
    shipped = mosquitto_conf(
        1883,
        "/mosquitto/data/dynamic-security.json",
        persistence_location="/mosquitto/data/",
        plugin=IMAGE_DYNSEC_PLUGIN,
    )
    assert shipped in conf, (
        "deploy/mosquitto/mosquitto.conf drifted from gateway.mosquitto_sync.mosquitto_conf"
    )
    directives = dict(
        line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#")
    )
    assert directives["set_tcp_nodelay"] == "true"
    assert int(directives["max_queued_messages"]) > 1000 or int(directives["max_queued_messages"]) == 0
    assert "max_queued_bytes" in directives
    assert directives["allow_anonymous"] == "false"

    mosq = rendered()["services"]["mosquitto"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in mosq["volumes"] if v.startswith("/")}
    assert mounts["/mosquitto/config/mosquitto.conf"] == str(REPO / "deploy/mosquitto/mosquitto.conf")
    init = REPO / "deploy/mosquitto/init-dynsec.sh"
    assert mounts["/vigil/init-dynsec.sh"] == str(init)
    script = uncommented(init)
    assert "dynsec=/mosquitto/data/dynamic-security.json" in script
    assert (
        'mosquitto_ctrl dynsec init "$dynsec" "$VIGIL_MQTT_ADMIN_USER" "$VIGIL_MQTT_ADMIN_PASSWORD"' in script
    )
    assert mosq["environment"]["VIGIL_MQTT_ADMIN_USER"] == "vigil-hub"
    assert any(v.startswith("mosquitto-data:/mosquitto/data") for v in mosq["volumes"]), "persistence volume"


def test_influxdb_setup_and_dbrp_mapping() -> None:
    influx = rendered()["services"]["influxdb"]
    env = influx["environment"]
    assert env["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    assert env["DOCKER_INFLUXDB_INIT_BUCKET"] == "vigil"
    vigil_env = rendered()["services"]["vigil-worker"]["environment"]
    assert env["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"] == vigil_env["VIGIL_INFLUX_TOKEN"]
    assert env["DOCKER_INFLUXDB_INIT_ORG"] == vigil_env["VIGIL_INFLUX_ORG"]
    assert env["VIGIL_INFLUX_DB"] == vigil_env["VIGIL_INFLUX_DB"]
    script = REPO / "deploy/influxdb/init-vigil.sh"
    assert f"{script}:/docker-entrypoint-initdb.d/init-vigil.sh:ro" in influx["volumes"]
    # The image runs only executable *.sh files from /docker-entrypoint-initdb.d (run-parts).
    assert os.access(script, os.X_OK), "chmod +x deploy/influxdb/init-vigil.sh"
    text = script.read_text()
    assert "influx v1 dbrp create" in text and "--rp autogen" in text and "--default" in text
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


@cache
def datasource() -> dict[str, Any]:
    (ds,) = yaml.safe_load(DATASOURCE_YAML.read_text())["datasources"]
    return dict(ds)


def refs(node: Any) -> list[dict[str, Any]]:
    """Every datasource reference in a dashboard."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            found.append(node["datasource"])
        for v in node.values():
            found += refs(v)
    elif isinstance(node, list):
        for v in node:
            found += refs(v)
    return found


def test_grafana_provisions_the_datasource_and_the_vitals_dashboard() -> None:
    ds = datasource()
    assert ds["type"] == "influxdb" and ds["url"] == "http://influxdb:8086"
    assert ds["jsonData"]["version"] == "InfluxQL"
    assert ds["jsonData"]["dbName"] == "${VIGIL_INFLUX_DB}"  # the DBRP mapping's database

    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "vigil-vitals"
    all_refs = refs(dash)
    assert all_refs and all(r == {"type": "influxdb", "uid": ds["uid"]} for r in all_refs)

    variables = [v["name"] for v in dash["templating"]["list"]]
    assert variables == ["site", "unit", "bed", "patient"]
    titles = {p["title"] for p in dash["panels"]}
    assert {"Heart rate", "SpO2", "Respiratory rate", "NIBP", "Temperature"} <= titles
    for panel in dash["panels"]:
        for t in panel["targets"]:
            q = t["query"]
            code = re.search(r"\"code\"::tag = '(\w+)'", q)
            assert code and code.group(1) in BY_REF, q  # the MDC reference id Vigil stores as tag `code`
            assert 'FROM "vitals"' in q  # streams/vitals/influx.py MEASUREMENT
            for var in variables:
                assert f'"{var}"::tag =~ /^${var}$/' in q, (panel["title"], var)
            assert "artifact" in q  # readings flagged artifact are never shown as clinical values

    grafana = rendered()["services"]["grafana"]
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/vigil.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"{REPO / 'dashboards/grafana'}:{path}:ro" in grafana["volumes"]
    for kind in ("datasources", "dashboards"):
        mount = f"{REPO / 'deploy/grafana/provisioning' / kind}:/etc/grafana/provisioning/{kind}:ro"
        assert mount in grafana["volumes"]
    for var in re.findall(r"\$\{(\w+)\}", uncommented(DATASOURCE_YAML)):
        assert grafana["environment"].get(var), f"Grafana expands ${{{var}}} from its environment"
