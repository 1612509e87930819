"""Two `vigil api` nodes over Redis: the full scaled chain, every part a real process on a free port.

tansu, PostgreSQL, Redis, Mosquitto (dynamic security), `vigil gateway`, `vigil worker`, two `vigil api`.
A device publishes with mosquitto_pub; a websocket client on node 1 sees it; it disconnects, another value is
published, it reconnects to node 2 and resumes with its last cursor: it gets what it missed, nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from cryptography.fernet import Fernet
from websockets.asyncio.client import ClientConnection

from tests.servers import DynsecMosquitto, Proc, dynsec_mosquitto, free_port, require
from tests.servers_kafka import tansu
from tests.servers_pg import postgres
from tests.servers_redis import RedisServer, redis_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VIGIL = str(Path(sys.executable).with_name("vigil"))
ADMIN, ADMIN_PW = "vigil-admin", "admin-pw-1"
NURSE, NURSE_PW = "api-nurse", "nurse-pw-1"
Msg = dict[str, Any]


@dataclass
class Chain:
    env: dict[str, str]
    broker: DynsecMosquitto
    secret: str
    procs: dict[str, Proc]
    ports: dict[str, int]
    redis: RedisServer

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def tails(self) -> str:
        return "\n".join(f"--- {n}\n{p.tail(15)}" for n, p in self.procs.items())


def cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = subprocess.run([VIGIL, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def wait_ready(chain: Chain, name: str, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc = chain.procs[name]
        if proc.popen is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{name} exited\n{proc.tail()}")
        try:
            r = httpx.get(chain.url(name) + path, timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"{name} not ready: {last}\n{chain.procs[name].tail()}")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    tmp = tmp_path_factory.mktemp("scaled-api")
    broker = dynsec_mosquitto(tmp, ADMIN, ADMIN_PW)
    procs: dict[str, Proc] = {}
    with postgres() as pg, tansu(tmp / "tansu") as kafka, redis_server(tmp / "redis") as redis:
        broker.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
        env.update(
            VIGIL_HOST="127.0.0.1",
            VIGIL_KAFKA_URL=kafka.url,
            VIGIL_DATABASE_URL=pg.create_database("vigil_api"),
            VIGIL_MQTT_URL=f"mqtt://{ADMIN}:{ADMIN_PW}@127.0.0.1:{broker.port}",
            VIGIL_REDIS_URL=redis.url,
            VIGIL_SECRET_KEY=Fernet.generate_key().decode(),
            VIGIL_JWT_SECRET="test-jwt-secret-shared-by-every-api-node",
            VIGIL_VITALS_SQLITE=str(tmp / "vitals.db"),
            VIGIL_DATA_DIR=str(tmp / "operator"),
            VIGIL_LOG_LEVEL="INFO",
        )
        argv = ["devices", "add", "api-mon-1", "--type", "monitor", "--unit", "icu", "--bed", "api-b-1"]
        secret = str(cli(env, *argv, "--patient", "AP-1")["secret"])
        cli(env, "users", "add", NURSE, "--role", "nurse", "--unit", "icu", "--password", NURSE_PW)
        ports = {name: free_port() for name in ("gateway", "worker", "api1", "api2")}
        c = Chain(env, broker, secret, procs, ports, redis)

        def start(name: str, argv: list[str], **extra: str) -> None:
            e = {**env, "VIGIL_HTTP_PORT": str(ports[name]), "VIGIL_DATA_DIR": str(tmp / name), **extra}
            procs[name] = Proc(argv, tmp / f"{name}.log", env=e, cwd=ROOT).start()

        try:
            start(
                "gateway",
                [VIGIL, "gateway"],
                VIGIL_COAP_PORT=str(free_port(socket.SOCK_DGRAM)),
                VIGIL_COAPS_PORT=str(free_port(socket.SOCK_DGRAM)),
            )
            start("worker", [sys.executable, "-m", "vigil.worker"])
            wait_ready(c, "gateway", "/readyz", 40)  # migrated the records database: the nodes start after
            start("api1", [VIGIL, "api"])
            start("api2", [VIGIL, "api"])
            for name in ("api1", "api2"):
                wait_ready(c, name, "/readyz", 30)
            wait_ready(c, "worker", "/healthz", 30)
            yield c
        finally:
            for p in procs.values():
                p.stop(timeout=10)
            broker.stop()


def publish(chain: Chain, seq: int, hr: float) -> None:
    """One QoS 1 message from the device, retried until Mosquitto knows it (the gateway syncs each second)."""
    line = json.dumps({"seq": seq, "boot": "b1", "obs": [{"code": "hr", "value": hr}]})
    deadline = time.monotonic() + 15
    while True:
        r = subprocess.run(
            [
                *(require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(chain.broker.port)),
                *("-u", "api-mon-1", "-P", chain.secret, "-i", "api-mon-1-pub", "-q", "1"),
                *("-t", "vigil/v1/api-mon-1/obs", "-m", line),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"device refused: {r.stdout}{r.stderr}\n{chain.tails()}")
        time.sleep(0.2)


def token(chain: Chain, node: str) -> str:
    r = httpx.post(chain.url(node) + "/api/v1/auth/token", json={"username": NURSE, "password": NURSE_PW})
    r.raise_for_status()
    return str(r.json()["access_token"])


async def connect(chain: Chain, node: str, tok: str) -> ClientConnection:
    url = f"ws://127.0.0.1:{chain.ports[node]}/ws"
    return await websockets.connect(url, additional_headers={"Authorization": f"Bearer {tok}"})


async def recv(ws: ClientConnection, timeout: float) -> Msg:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def until(ws: ClientConnection, pred: Any, timeout: float, chain: Chain) -> Msg:
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            m = await recv(ws, left)
            if pred(m):
                return m
    except TimeoutError:
        pass
    raise AssertionError(f"no such message in {timeout}s\n{chain.tails()}")


async def collect(ws: ClientConnection, seconds: float) -> list[Msg]:
    out: list[Msg] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(await recv(ws, left))
        except TimeoutError:
            break
    return out


async def subscribe(ws: ClientConnection, topic: str) -> None:
    await ws.send(json.dumps({"op": "subscribe", "topics": [topic]}))
    while (await recv(ws, 10))["type"] != "subscribed":
        pass


def hr(m: Msg) -> Any:
    if m.get("type") != "vitals":
        return None
    return m["data"]["values"].get("hr", {}).get("value")


async def test_a_client_resumes_on_another_node_without_a_gap_or_a_duplicate(chain: Chain) -> None:
    tok = token(chain, "api1")  # issued by node 1, accepted by node 2 (the same VIGIL_JWT_SECRET)
    watcher = await connect(chain, "api2", tok)  # on node 2 all along: tells when node 2 has an update
    await subscribe(watcher, "patient:AP-1")
    ws = await connect(chain, "api1", tok)
    await subscribe(ws, "unit:icu")

    publish(chain, 1, 123)
    seen = await until(ws, lambda m: hr(m) == 123, 40, chain)  # the worker's first batch: faust starts up
    assert seen["topic"] == "unit:icu" and seen["data"]["patient_id"] == "AP-1"
    on_node2 = await until(watcher, lambda m: hr(m) == 123, 10, chain)
    assert on_node2["id"] == seen["id"]  # the same record has the same cursor on every node
    last = seen["id"]
    await ws.close()

    publish(chain, 2, 88)  # while the client is away
    away = await until(watcher, lambda m: hr(m) == 88, 20, chain)
    assert away["id"] > last

    ws = await connect(chain, "api2", tok)
    await subscribe(ws, "unit:icu")
    await collect(ws, 0.5)  # the latest state that comes with `subscribed`
    await ws.send(json.dumps({"op": "resume", "after": last}))
    replayed = await collect(ws, 1.5)
    vitals = [m for m in replayed if m.get("type") == "vitals"]
    assert [hr(m) for m in vitals] == [88], replayed  # what it missed, and not the 123 it had
    assert all(m["id"] > last for m in replayed if "id" in m)
    assert vitals[0]["id"] == away["id"]

    await ws.send(json.dumps({"op": "resume", "after": last + 10**9}))  # never issued by any node
    assert await recv(ws, 5) == {"type": "resync"}
    await ws.close()
    await watcher.close()

    r = httpx.get(
        chain.url("api2") + "/api/v1/patients/AP-1", headers={"Authorization": f"Bearer {tok}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    assert r.json()["vitals"]["hr"]["value"] == 88


def test_readyz_names_redis_kafka_and_records(chain: Chain) -> None:
    r = httpx.get(chain.url("api1") + "/readyz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_readyz_names_redis_while_it_is_down(chain: Chain) -> None:
    """Last in the module: it stops the module's Redis."""
    chain.redis.stop()
    r = httpx.get(chain.url("api2") + "/readyz", timeout=10)
    assert r.status_code == 503 and r.json()["not_ready"] == ["redis"], r.text
    assert httpx.get(chain.url("api2") + "/healthz", timeout=10).status_code == 200
