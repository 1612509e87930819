"""Real servers for the tests: each starts on 127.0.0.1, on a free port, with a temp data dir, and stops.

Never the machine's own services on their standard ports: CI starts everything it uses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.mosquitto_sync import mosquitto_conf


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nobody listens on right now (TCP by default, UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, *, host: str = "127.0.0.1", timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until a TCP port accepts connections, failing early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class Proc:
    """A server process started by a test, with its log file."""

    argv: Sequence[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Proc:
        logf = self.log.open("ab")
        self.popen = subprocess.Popen(
            list(self.argv),
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        raise RuntimeError(f"{binary} is not installed: run the README's test command, which installs it")
    return path


@dataclass
class Mosquitto:
    """A Mosquitto broker with password + ACL files, or any extra config lines."""

    dir: Path
    port: int = 0
    extra: str = ""
    proc: Proc | None = None

    def config(self) -> str:
        return (
            f"listener {self.port} 127.0.0.1\n"
            # As root, Mosquitto drops to its own user, which cannot write the test's temp dir.
            "user root\n"
            f"persistence true\npersistence_location {self.dir}/\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 1000000\nmax_queued_bytes 0\nmax_inflight_messages 1000\n"
            "message_size_limit 0\n"
            f"{self.extra}\n"
        )

    def start(self) -> Mosquitto:
        if not self.port:
            self.port = free_port()
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.config())
        self.proc = Proc([require("mosquitto"), "-c", str(conf)], self.dir / "mosquitto.log").start()
        wait_port(self.port, proc=self.proc.popen)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class DynsecMosquitto(Mosquitto):
    """Mosquitto with exactly the configuration Vigil ships for an external broker (dynamic security)."""

    dynsec: Path = Path()

    def config(self) -> str:
        conf = mosquitto_conf(
            self.port, str(self.dynsec), host="127.0.0.1", persistence_location=f"{self.dir}/"
        )
        return conf + "user root\n"  # as root, Mosquitto would drop to a user that cannot write the test dirs


def dynsec_mosquitto(tmp: Path, admin: str, password: str) -> DynsecMosquitto:
    """A broker in `tmp/mosquitto` whose dynsec file (in `tmp`) knows `admin`; not started yet."""
    dynsec = tmp / "dynsec.json"
    subprocess.run(
        [require("mosquitto_ctrl"), "dynsec", "init", str(dynsec), admin, password],
        check=True,
        capture_output=True,
    )
    broker = DynsecMosquitto(tmp / "mosquitto", dynsec=dynsec)
    broker.dir.mkdir(parents=True, exist_ok=True)
    return broker


@contextlib.contextmanager
def mosquitto(tmp: Path, extra: str = "allow_anonymous true") -> Iterator[Mosquitto]:
    tmp.mkdir(parents=True, exist_ok=True)
    m = Mosquitto(tmp, extra=extra).start()
    try:
        yield m
    finally:
        m.stop()
