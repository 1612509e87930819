"""A throwaway `redis-server` for tests: 127.0.0.1, a free port (never the machine's 6379), no persistence."""

from __future__ import annotations

import contextlib
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import Proc, free_port, require, wait_port


@dataclass
class RedisServer:
    dir: Path
    port: int = 0
    proc: Proc | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.port = self.port or free_port()
        argv = [
            require("redis-server"),
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no"),
            *("--dir", str(self.dir)),
            "--protected-mode",
            "no",
        ]
        self.proc = Proc(argv, self.dir / "redis.log").start()
        wait_port(self.port, proc=self.proc.popen)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(signal.SIGTERM, timeout=5)


@contextlib.contextmanager
def redis_server(tmp: Path | None = None) -> Iterator[RedisServer]:
    root = tmp or Path(tempfile.mkdtemp(prefix="vigil-redis-"))
    root.mkdir(parents=True, exist_ok=True)
    server = RedisServer(root).start()
    try:
        yield server
    finally:
        server.stop()
