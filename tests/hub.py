"""A real Vigil hub for end-to-end tests: `vigil run` in a subprocess on free ports with a temp data dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.servers import Proc, free_port, wait_port

VIGIL = str(Path(sys.executable).with_name("vigil"))
ADMIN_PASSWORD = "admin-test-pw"


def prometheus_sample(text: str, name: str, labels: dict[str, str]) -> float:
    """The sum of the samples of `name` with exactly these labels in a /metrics text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, lbl = key.partition("{")
        if sample != name:
            continue
        got = ",".join(sorted(lbl.rstrip("}").split(","))) if lbl else ""
        if got == want:
            total += float(value)
    return total


class HubClient:
    """What the tests do with any hub, embedded or scaled: operator commands, tokens, API calls, waits."""

    _token: str | None

    @property
    def url(self) -> str:
        raise NotImplementedError

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def log_tail(self) -> str:
        raise NotImplementedError

    def add_user(self, name: str, role: str, *extra: str) -> dict[str, Any]:
        out = self.cli("users", "add", name, "--role", role, *extra)
        return dict(json.loads(out.stdout))

    def token(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
        r = httpx.post(f"{self.url}/api/v1/auth/token", json={"username": username, "password": password})
        r.raise_for_status()
        return str(r.json()["access_token"])

    def api(self, method: str, path: str, *, token: str | None = None, **kw: Any) -> httpx.Response:
        if token is None:
            token = self._token = self._token or self.token()
        return httpx.request(
            method, f"{self.url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10, **kw
        )

    def wait_for(self, predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
        """Poll until `predicate()` is truthy; returns its value or fails with the hub's log tail."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"condition not met in {timeout}s (last: {last!r})\n{self.log_tail()}")


@dataclass
class Hub(HubClient):
    """One `vigil run` process; `restart()` and `kill9()` keep the same ports and data dir."""

    dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    http_port: int = 0
    mqtt_port: int = 0
    coap_port: int = 0
    coaps_port: int = 0
    proc: Proc | None = None
    _token: str | None = None

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.mqtt_port = self.mqtt_port or free_port()
        self.coap_port = self.coap_port or free_port(socket.SOCK_DGRAM)
        self.coaps_port = self.coaps_port or free_port(socket.SOCK_DGRAM)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
        env.update(
            VIGIL_HOST="127.0.0.1",
            VIGIL_HTTP_PORT=str(self.http_port),
            VIGIL_MQTT_PORT=str(self.mqtt_port),
            VIGIL_COAP_PORT=str(self.coap_port),
            VIGIL_COAPS_PORT=str(self.coaps_port),
            VIGIL_MLLP_PORT=str(free_port()),
            VIGIL_DATA_DIR=str(self.dir / "var"),
            VIGIL_ADMIN_PASSWORD=ADMIN_PASSWORD,
            VIGIL_LOG_LEVEL="INFO",
        )
        env.update(self.env_extra)
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> Hub:
        self.proc = Proc([VIGIL, "run"], self.dir / "hub.log", env=self.env).start()
        try:
            wait_port(self.http_port, timeout=timeout, proc=self.proc.popen)
        except Exception as exc:
            raise RuntimeError(f"hub did not start: {exc}\n{self.proc.tail()}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"hub not healthy\n{self.proc.tail()}")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop(signal.SIGTERM, timeout=15)

    def kill9(self) -> None:
        if self.proc:
            self.proc.kill9()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `vigil` command against this hub's data dir (as an operator would, in another process)."""
        return subprocess.run(
            [VIGIL, *args], env=self.env, capture_output=True, text=True, check=check, timeout=60
        )

    def add_device(self, device_id: str, type_: str = "monitor", *extra: str) -> dict[str, Any]:
        out = self.cli("devices", "add", device_id, "--type", type_, *extra)
        return dict(json.loads(out.stdout))

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample (0 when absent)."""
        return prometheus_sample(httpx.get(f"{self.url}/metrics").text, name, labels)

    def log_tail(self) -> str:
        return self.proc.tail() if self.proc else ""
