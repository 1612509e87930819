"""A throwaway PostgreSQL for tests: initdb into a temp dir, serve on a free 127.0.0.1 port, then remove it.

Independent of any system PostgreSQL (its port, socket dir and data are never touched). PostgreSQL refuses
to run as root, so as root the server runs as the `postgres` OS user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port, wait_port
from vigil.devstack import pg_bindir

PG_USER = "postgres"


@dataclass
class Postgres:
    """A running throwaway server; `url` is the asyncpg URL of its `postgres` database."""

    dir: Path
    port: int
    bindir: Path

    @property
    def url(self) -> str:
        return self.url_of(PG_USER)

    def url_of(self, database: str) -> str:
        return f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and answer its asyncpg URL (one per test keeps tests apart)."""
        self._run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, name]
        )
        return self.url_of(name)

    def _run(self, argv: list[str]) -> None:
        root = _pg_user_needed()
        proc = subprocess.run(
            argv,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            user=PG_USER if root else None,
            group=PG_USER if root else None,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"} if root else None,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")


def _pg_user_needed() -> bool:
    """True when running as root: the server's commands then run as the postgres OS user."""
    if os.geteuid() != 0:
        return False
    try:
        pwd.getpwnam(PG_USER)
    except KeyError as e:
        raise RuntimeError(f"running as root needs an OS user {PG_USER!r} (PostgreSQL refuses root)") from e
    return True


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """Start a fresh server; yields it with its URL; stops it and removes its files at the end."""
    bindir = pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="vigil-pg-"))
    data, sock, log = root / "data", root / "sock", root / "postgres.log"
    sock.mkdir()
    if os.geteuid() == 0:
        for path in (root, sock):
            shutil.chown(path, PG_USER, PG_USER)
        os.chmod(root, 0o700)
    server = Postgres(root, free_port(), bindir)
    started = False
    try:
        try:
            server._run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            )
            options = (
                f"-p {server.port} -k {sock} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
            )
            started = True  # from here on, stop it whatever happens: pg_ctl may fail after the server started
            server._run(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    options,
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            )
            wait_port(server.port)
        except Exception as e:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise RuntimeError(f"throwaway PostgreSQL did not start: {e}\n{tail}") from e
        yield server
    finally:
        if started:
            with contextlib.suppress(Exception):
                server._run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"])
        shutil.rmtree(root, ignore_errors=True)
