"""Time-series servers for the tests: VictoriaMetrics and InfluxDB 1.6, on free ports with temp data dirs.

Each can be stopped and started again on the same port and data dir, so a test can take the store down.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.servers import Proc, free_port, require, wait_port


def _wait_http(url: str, ok: set[int], proc: Proc, timeout: float = 30.0) -> None:
    """Wait until `url` answers one of the `ok` statuses (the port opens before the server is ready)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"server exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code in ok:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s ({last}):\n{proc.tail()}")


@dataclass
class VictoriaMetrics:
    """A single-node VictoriaMetrics; it takes influx line protocol on `/write` and `/api/v2/write`."""

    dir: Path
    port: int = 0
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VictoriaMetrics:
        if not self.port:
            self.port = free_port()
        self.proc = Proc(
            [
                require("victoria-metrics"),
                f"-httpListenAddr=127.0.0.1:{self.port}",
                f"-storageDataPath={self.dir / 'vm-data'}",
                "-retentionPeriod=100y",
                "-search.latencyOffset=0s",
                "-search.disableCache",
                "-loggerLevel=WARN",
            ],
            self.dir / "victoria-metrics.log",
        ).start()
        wait_port(self.port, proc=self.proc.popen)
        _wait_http(f"{self.url}/health", {200}, self.proc)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def force_flush(self) -> None:
        """Make recent samples visible to reads (they sit in memory for up to a second otherwise)."""
        httpx.get(f"{self.url}/internal/force_flush", timeout=10.0).raise_for_status()

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every series matching a selector, as `/api/v1/export` JSON lines (metric, values, timestamps)."""
        self.force_flush()
        r = httpx.get(f"{self.url}/api/v1/export", params={"match[]": match, "start": "0"}, timeout=30.0)
        r.raise_for_status()
        return [orjson.loads(line) for line in r.content.splitlines() if line.strip()]

    def distinct_timestamps(self, match: str) -> set[int]:
        """Distinct sample timestamps across matching series (VictoriaMetrics keeps duplicate samples)."""
        return {int(t) for s in self.export(match) for t in s["timestamps"]}


@dataclass
class InfluxDB16:
    """Debian's InfluxDB 1.6 (`influxd`): v1 `/write` and InfluxQL `/query`, with one database created."""

    dir: Path
    db: str = "vigil"
    port: int = 0
    rpc_port: int = 0
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        d = self.dir
        return (
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{self.rpc_port}"\n'
            f'[meta]\n  dir = "{d / "meta"}"\n  logging-enabled = false\n'
            f'[data]\n  dir = "{d / "data"}"\n  wal-dir = "{d / "wal"}"\n  wal-fsync-delay = "0s"\n'
            "  query-log-enabled = false\n"
            '[coordinator]\n  write-timeout = "10s"\n'
            "[monitor]\n  store-enabled = false\n"
            "[subscriber]\n  enabled = false\n"
            f'[http]\n  enabled = true\n  bind-address = "127.0.0.1:{self.port}"\n  auth-enabled = false\n'
            "  log-enabled = false\n  pprof-enabled = false\n"
            '[logging]\n  level = "warn"\n  suppress-logo = true\n'
            "[continuous_queries]\n  enabled = false\n"
            "[[graphite]]\n  enabled = false\n"
            "[[collectd]]\n  enabled = false\n"
            "[[opentsdb]]\n  enabled = false\n"
            "[[udp]]\n  enabled = false\n"
        )

    def start(self) -> InfluxDB16:
        if not self.port:
            self.port = free_port()
        if not self.rpc_port:
            self.rpc_port = free_port()
        conf = self.dir / "influxdb.conf"
        conf.write_text(self.config())
        self.proc = Proc([require("influxd"), "-config", str(conf)], self.dir / "influxd.log").start()
        wait_port(self.port, proc=self.proc.popen)
        _wait_http(f"{self.url}/ping", {204}, self.proc)
        self.query(f'CREATE DATABASE "{self.db}"', post=True)  # a no-op when it exists
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def query(self, q: str, *, post: bool = False) -> list[dict[str, Any]]:
        """Run InfluxQL; answers the statement's series (name, columns, values, tags), epoch ms."""
        params = {"db": self.db, "q": q, "epoch": "ms"}
        if post:
            r = httpx.post(f"{self.url}/query", params=params, timeout=30.0)
        else:
            r = httpx.get(f"{self.url}/query", params=params, timeout=30.0)
        r.raise_for_status()
        result = r.json()["results"][0]
        if "error" in result:
            raise RuntimeError(result["error"])
        return list(result.get("series", []))


@contextlib.contextmanager
def victoria_metrics(tmp: Path) -> Iterator[VictoriaMetrics]:
    tmp.mkdir(parents=True, exist_ok=True)
    vm = VictoriaMetrics(tmp).start()
    try:
        yield vm
    finally:
        vm.stop()


@contextlib.contextmanager
def influxdb16(tmp: Path, db: str = "vigil") -> Iterator[InfluxDB16]:
    tmp.mkdir(parents=True, exist_ok=True)
    influx = InfluxDB16(tmp, db=db).start()
    try:
        yield influx
    finally:
        influx.stop()
