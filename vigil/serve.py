"""Run a role until SIGTERM or SIGINT: start it, say it is ready, stop it gracefully."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Protocol


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve(service: Service, role: str, ready_line: str) -> None:
    """A start failure stops what did start and exits with one line naming the cause."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except OSError as exc:  # ConnectionError included: Kafka, PostgreSQL, Redis or a port
        await service.stop()
        raise SystemExit(f"vigil {role}: cannot start: {exc}") from None
    except BaseException:
        await service.stop()
        raise
    sys.stderr.write(f"vigil {role}: ready. {ready_line}\n")
    await stop.wait()
    await service.stop()
