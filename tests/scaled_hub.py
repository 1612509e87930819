"""The scaled runtime behind the `Hub` interface of tests/hub.py, so one behavioural test runs on both.

Built on `vigil/devstack.py`: tansu, PostgreSQL, Redis, InfluxDB 1.6 (`VIGIL_INFLUX_API=v1`: trends read
back over InfluxQL), Mosquitto with dynamic security, and two each of `vigil gateway`, `vigil worker` and
`vigil api`. `url`/`http_port` are the first API node's; `metric()` sums a sample over every Vigil process
(a counter lives in the process that counts: ingest in a gateway, duplicates in a worker).
`kill9()`/`restart()` act on the Vigil processes (the servers keep running: tansu keeps its log in memory);
`stack.kill9(name)`/`stack.restart(name)` act on any one part.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.hub import ADMIN_PASSWORD, HubClient, prometheus_sample
from vigil.devstack import MQTT_ADMIN, ROLES, DevStack, find_binary


@dataclass
class ScaledHub(HubClient):
    dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    stack: DevStack | None = None
    _token: str | None = None

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def s(self) -> DevStack:
        assert self.stack is not None, "start() the hub first"
        return self.stack

    @property
    def http_port(self) -> int:
        return self.s.ports["api1"]

    @property
    def mqtt_port(self) -> int:
        return self.s.mqtt_port

    @property
    def coap_port(self) -> int:
        return self.s.ports["gateway1-coap"]

    @property
    def coaps_port(self) -> int:
        return self.s.ports["gateway1-coaps"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def env(self) -> dict[str, str]:
        return self.s.env

    def vigil_processes(self) -> list[str]:
        return [n for role in ROLES for n in self.s.names(role)]

    def start(self, timeout: float = 60.0) -> ScaledHub:
        if self.stack is None:
            self.stack = DevStack(
                self.dir / "stack",
                admin_password=ADMIN_PASSWORD,
                start_timeout=timeout,
                env_extra=self.env_extra,
            )
            self.stack.start()
        else:
            for name in self.s.order():
                if not self.s.parts[name].running():
                    self.s.restart(name)
        return self

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()

    def kill9(self) -> None:
        for name in self.vigil_processes():
            self.s.kill9(name)

    def restart(self) -> None:
        for name in self.vigil_processes():
            self.s.parts[name].stop()
        for name in self.s.order():
            if name in self.vigil_processes():
                self.s.restart(name)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.s.vigil(*args, check=check)

    def add_device(self, device_id: str, type_: str = "monitor", *extra: str) -> dict[str, Any]:
        """Register a device; wait until Mosquitto knows it (the gateways sync the registry each second)."""
        out = dict(json.loads(self.cli("devices", "add", device_id, "--type", type_, *extra).stdout))
        self.wait_for(lambda: self._broker_knows(device_id), timeout=15, interval=0.2)
        return out

    def _broker_knows(self, client: str) -> bool:
        pw = self.s._secrets["mqtt_admin_password"]
        r = subprocess.run(
            [
                *(find_binary("mosquitto_ctrl"), "-h", "127.0.0.1", "-p", str(self.mqtt_port)),
                *("-u", MQTT_ADMIN, "-P", pw, "dynsec", "getClient", client),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=15,
        )
        roles = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("Roles:")]
        return r.returncode == 0 and bool(roles) and roles[0].split(":", 1)[1].strip() != ""

    def log_tail(self) -> str:
        return self.stack.tails() if self.stack else ""

    def metric(self, name: str, **labels: str) -> float:
        """The sum of one Prometheus sample over every Vigil process (0 when absent)."""
        total = 0.0
        for proc in self.vigil_processes():
            try:
                text = httpx.get(f"{self.s.url(proc)}/metrics", timeout=5).text
            except httpx.HTTPError:
                continue  # a process that is down counts nothing
            total += prometheus_sample(text, name, labels)
        return total
