"""The scaled stack under faults: Redis, Mosquitto, an API node and the time-series store fail mid-stream.

One stack for the module (tests/scaled_hub.py over vigil/devstack.py: tansu, PostgreSQL, Redis, InfluxDB 1.6,
Mosquitto, two each of gateway, worker and API node). Each test has its own unit, beds and patients, and
counts everything at the end: every acknowledged reading stored once (by its device time, in InfluxDB), and
no record pushed twice to a websocket client (by its cursor `id`: a client that deduplicates by id never
sees a value twice, nor an older one after a newer). kill -9 of a worker or a gateway is in
test_scaled_worker.py / test_scaled_gateway.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import paho.mqtt.client as mqtt
import pytest
import websockets
from paho.mqtt.enums import CallbackAPIVersion
from websockets.asyncio.client import ClientConnection

from tests.scaled_hub import ScaledHub

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")
Msg = dict[str, Any]
WAIT = 40.0
_dev_time = itertools.count(1)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaledHub]:
    h = ScaledHub(tmp_path_factory.mktemp("scaled-faults") / "hub")
    h.start()
    try:
        yield h
    finally:
        h.stop()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def until(hub: ScaledHub, predicate: Callable[[], T], timeout: float = WAIT) -> T:
    found: T = hub.wait_for(predicate, timeout=timeout, interval=0.2)
    return found


class Device:
    """A monitor in its bed; every reading has its own device time (`ts`) and heart rate."""

    def __init__(self, hub: ScaledHub, tag: str, unit: str) -> None:
        self.hub, self.id, self.bed, self.patient = hub, f"flt-mon-{tag}", f"flt-bed-{tag}", f"FLT-{tag}"
        out = hub.add_device(self.id, "monitor", "--unit", unit, "--bed", self.bed, "--patient", self.patient)
        self.secret = str(out["secret"])
        self.t0 = now_ms() - 3_600_000 + next(_dev_time) * 60_000  # an hour back: a window of its own
        self.sent: dict[int, float] = {}  # device time -> hr, of every reading the hub acknowledged

    def reading(self, seq: int) -> tuple[int, float, str]:
        ts, hr = self.t0 + seq * 100, float(40 + seq % 150)
        line = json.dumps({"seq": seq, "boot": "flt", "ts": iso(ts), "obs": [{"code": "hr", "value": hr}]})
        return ts, hr, line

    def send(self, seqs: range) -> None:
        """QoS 1, one connection; mosquitto_pub returns once the broker acknowledged every message."""
        readings = [self.reading(s) for s in seqs]
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.hub.mqtt_port), "-q", "1", "-l"]
        argv += ["-u", self.id, "-P", self.secret, "-i", self.id, "-t", f"vigil/v1/{self.id}/obs"]
        r = subprocess.run(
            argv,
            input="".join(line + "\n" for _, _, line in readings),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        self.sent.update((ts, hr) for ts, hr, _ in readings)

    def last_hr(self) -> float:
        return self.sent[max(self.sent)]

    def stored(self) -> list[tuple[int, float]]:
        """Every point of this patient in InfluxDB: (device time ms, value), duplicates kept."""
        q = f'SELECT "value" FROM "vitals" WHERE "patient" = \'{self.patient}\''
        r = httpx.get(
            f"{self.hub.s.influx_url}/query", params={"db": "vigil", "q": q, "epoch": "ms"}, timeout=30
        )
        r.raise_for_status()
        series = r.json()["results"][0].get("series", [])
        return [(int(t), float(v)) for s in series for t, v in s["values"]]

    def all_stored_once(self) -> bool:
        got = self.stored()
        assert len(got) == len(set(got)), "a point stored twice"
        return dict(got) == self.sent


# -- websocket -------------------------------------------------------------------------------------------


async def connect(hub: ScaledHub, node: str, token: str) -> ClientConnection:
    url = f"ws://127.0.0.1:{hub.s.ports[node]}/ws"
    return await websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"})


async def recv(ws: ClientConnection, timeout: float) -> Msg:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def subscribe(ws: ClientConnection, topic: str, into: list[Msg]) -> None:
    await ws.send(json.dumps({"op": "subscribe", "topics": [topic]}))
    while (m := await recv(ws, 10))["type"] != "subscribed":
        into.append(m)


class Board:
    """What a client that deduplicates by cursor `id` shows: every frame kept, per topic and id."""

    def __init__(self) -> None:
        self.frames: list[Msg] = []

    async def read(self, ws: ClientConnection, done: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the board did not catch up in {timeout}s: {self.frames[-5:]}")
            try:
                self.frames.append(await recv(ws, min(left, 1.0)))
            except TimeoutError:
                continue

    async def settle(self, ws: ClientConnection, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.frames.append(await recv(ws, left))
            except TimeoutError:
                return

    def shown(self) -> list[Msg]:
        """The frames a deduplicating client shows; a cursor seen again must carry the same data."""
        out: dict[tuple[str, int], Msg] = {}
        for m in self.frames:
            if "id" not in m:
                continue
            key = (m["topic"], m["id"])
            if key in out:
                assert out[key]["data"] == m["data"], f"cursor {key} pushed with other data"
                continue
            out[key] = m
        return list(out.values())

    def hr_of(self, patient: str) -> list[float]:
        return [
            m["data"]["values"]["hr"]["value"]
            for m in self.shown()
            if m["type"] == "vitals" and m["data"]["patient_id"] == patient and "hr" in m["data"]["values"]
        ]

    def hr_ts_of(self, patient: str) -> list[str]:
        return [
            m["data"]["values"]["hr"]["ts"]
            for m in self.shown()
            if m["type"] == "vitals" and m["data"]["patient_id"] == patient and "hr" in m["data"]["values"]
        ]

    def last_id(self) -> int:
        return max(int(m["id"]) for m in self.frames if "id" in m)


def assert_forward_only(board: Board, dev: Device) -> None:
    """Device time only moves forward on the board: no value shown twice, none older after a newer."""
    ts = board.hr_ts_of(dev.patient)
    assert ts == sorted(set(ts)), ts


# -- the faults ------------------------------------------------------------------------------------------


async def test_a_redis_restart_delays_the_board_only_and_it_catches_up_without_duplicates(
    hub: ScaledHub,
) -> None:
    dev = Device(hub, "redis", "flt-redis")
    token = hub.token()
    ws = await connect(hub, "api1", token)
    board = Board()
    await subscribe(ws, f"patient:{dev.patient}", board.frames)
    await asyncio.to_thread(dev.send, range(1, 11))
    await board.read(ws, lambda: dev.last_hr() in board.hr_of(dev.patient))

    redis = hub.s.parts["redis"]
    redis.stop()
    try:
        await asyncio.to_thread(dev.send, range(11, 21))
        # Vitals (and alarms: the same batches) go on without Redis: all 20 stored while it is down.
        await asyncio.to_thread(until, hub, dev.all_stored_once)
        assert hub.metric("vigil_live_relay_failing") >= 1
        # A resume needs Redis (the replay log): it is answered `unavailable`, and the socket stays open.
        other = await connect(hub, "api1", token)
        await other.send(json.dumps({"op": "resume", "after": board.last_id()}))
        answer = await recv(other, 30)
        assert answer["type"] == "error" and answer["code"] == "unavailable" and answer["op"] == "resume"
        await other.send(json.dumps({"op": "ping"}))
        assert (await recv(other, 10))["type"] == "pong"
        await other.close()
    finally:
        # The same port, without its data (the devstack's Redis keeps none): the relay replays the live topic.
        await asyncio.to_thread(hub.s.restart, "redis")
    await asyncio.to_thread(dev.send, range(21, 31))
    await board.read(ws, lambda: dev.last_hr() in board.hr_of(dev.patient))
    await board.settle(ws, 1.5)
    await ws.close()

    assert_forward_only(board, dev)
    assert await asyncio.to_thread(dev.all_stored_once)
    assert len(dev.sent) == 30
    snap = hub.api("GET", f"/api/v1/patients/{dev.patient}").json()
    assert snap["vitals"]["hr"]["value"] == dev.last_hr()  # the latest values were rebuilt too
    assert hub.metric("vigil_live_relay_failing") == 0


def test_a_mosquitto_restart_loses_no_acknowledged_reading_and_stores_none_twice(hub: ScaledHub) -> None:
    dev = Device(hub, "mqtt", "flt-mqtt")
    acked: set[int] = set()
    mids: dict[int, int] = {}
    lock = threading.Lock()

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with lock:
            acked.add(mid)

    # A device with a persistent session (clean_session off) at QoS 1: what it has not had a PUBACK for,
    # it sends again after reconnecting; what it had a PUBACK for, the broker must have kept.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev.id, clean_session=False)
    client.username_pw_set(dev.id, dev.secret)
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    client.on_publish = on_publish
    client.connect("127.0.0.1", hub.mqtt_port)
    client.loop_start()
    n = 60
    try:
        for seq in range(1, n + 1):
            ts, hr, line = dev.reading(seq)
            info = client.publish(f"vigil/v1/{dev.id}/obs", line, qos=1)
            with lock:
                mids[info.mid] = seq
            dev.sent[ts] = hr
            if seq == 20:
                until(hub, lambda: len(acked) >= 20, 15)
                hub.s.restart("mosquitto")  # SIGTERM: it saves its sessions; the same port and data dir
            time.sleep(0.02)
        until(hub, lambda: len(acked) == n, 60)
    finally:
        client.loop_stop()
        client.disconnect()
    assert {mids[m] for m in acked} == set(range(1, n + 1))
    try:
        until(hub, dev.all_stored_once, 60)
    except AssertionError:
        missing = sorted((ts - dev.t0) // 100 for ts in set(dev.sent) - dict(dev.stored()).keys())
        raise AssertionError(f"acknowledged, never stored: seq {missing}") from None
    assert len(dev.stored()) == n


def test_what_a_restarted_mosquitto_acked_before_any_gateway_was_back_is_not_lost(hub: ScaledHub) -> None:
    """The window the restart net closes (gateway/mqtt_net.py), made certain: both gateways are frozen
    (SIGSTOP) while Mosquitto restarts and a device publishes, so no shared subscription exists when Mosquitto
    acknowledges its readings. Mosquitto 2.0 does not restore shared subscriptions: only the net's plain
    persistent subscription holds them until the gateways are back."""
    dev = Device(hub, "mqtt-gap", "flt-mqtt-gap")
    dev.send(range(1, 6))
    until(hub, dev.all_stored_once, 60)
    before = hub.metric("vigil_mqtt_net_total", outcome="ingested")
    gateways = [p for n, p in hub.s.parts.items() if n.startswith("gateway") and p.pid is not None]
    assert len(gateways) == 2
    for p in gateways:
        os.killpg(p.pid or 0, signal.SIGSTOP)
    try:
        hub.s.restart("mosquitto")
        dev.send(range(6, 31))  # mosquitto_pub returns once Mosquitto acknowledged every reading
    finally:
        for p in gateways:
            os.killpg(p.pid or 0, signal.SIGCONT)
    try:
        until(hub, dev.all_stored_once, 60)
    except AssertionError:
        missing = sorted((ts - dev.t0) // 100 for ts in set(dev.sent) - dict(dev.stored()).keys())
        raise AssertionError(f"acknowledged by Mosquitto, never stored: seq {missing}") from None
    assert hub.metric("vigil_mqtt_net_total", outcome="ingested") - before >= 25


async def test_kill9_of_an_api_node_the_client_resumes_on_the_other_without_a_gap_or_a_duplicate(
    hub: ScaledHub,
) -> None:
    unit = "flt-api"
    devs = [Device(hub, f"api-{i}", unit) for i in (1, 2)]
    token = hub.token()
    ws = await connect(hub, "api1", token)
    board = Board()
    await subscribe(ws, f"unit:{unit}", board.frames)
    stop = threading.Event()
    progress = {"seq": 0}

    def stream() -> None:
        seq = 1
        while not stop.is_set():
            for d in devs:
                d.send(range(seq, seq + 1))
            progress["seq"] = seq
            seq += 1
            time.sleep(0.3)

    streaming = asyncio.create_task(asyncio.to_thread(stream))
    try:
        await board.read(ws, lambda: all(len(board.hr_of(d.patient)) >= 3 for d in devs))
        await asyncio.to_thread(hub.s.kill9, "api1")
        with pytest.raises(websockets.ConnectionClosed):
            await board.read(ws, lambda: False, 10)
        last = board.last_id()
        await asyncio.sleep(1.0)  # readings arrive while the client is away
        ws = await connect(hub, "api2", token)
        await subscribe(ws, f"unit:{unit}", board.frames)
        await ws.send(json.dumps({"op": "resume", "after": last}))
        target = progress["seq"] + 5
        try:
            await board.read(ws, lambda: progress["seq"] >= target)
        except (AssertionError, websockets.ConnectionClosed) as exc:
            raise AssertionError(f"{exc!r}\n{hub.s.parts['api2'].tail(40)}") from exc
    finally:
        stop.set()
        await streaming
        if not hub.s.parts["api1"].running():
            await asyncio.to_thread(hub.s.restart, "api1")  # the next tests use it
    await board.read(ws, lambda: all(d.last_hr() in board.hr_of(d.patient)[-1:] for d in devs))
    await board.settle(ws, 1.5)
    await ws.close()

    assert {"type": "resync"} not in board.frames
    for d in devs:
        assert_forward_only(board, d)
        assert board.hr_of(d.patient)[-1] == d.last_hr()
        assert await asyncio.to_thread(until, hub, d.all_stored_once)
    after = [m for m in board.shown() if m["id"] > last and m["type"] == "vitals"]
    assert {m["data"]["patient_id"] for m in after} == {d.patient for d in devs}  # what it missed


async def test_a_stopped_time_series_store_buffers_the_vitals_and_backfills_them(hub: ScaledHub) -> None:
    dev = Device(hub, "tsdb", "flt-tsdb")
    token = hub.token()
    ws = await connect(hub, "api2", token)
    board = Board()
    await subscribe(ws, f"patient:{dev.patient}", board.frames)
    await asyncio.to_thread(dev.send, range(1, 21))
    await asyncio.to_thread(until, hub, dev.all_stored_once)

    influx = hub.s.parts["influxdb"]
    influx.stop()
    try:
        await asyncio.to_thread(dev.send, range(21, 61))
        # The board goes on from the live feed; the workers hold the points on disk.
        await board.read(ws, lambda: dev.last_hr() in board.hr_of(dev.patient))
        await asyncio.to_thread(until, hub, lambda: hub.metric("vigil_vitals_backlog") > 0)
    finally:
        await asyncio.to_thread(hub.s.restart, "influxdb")
    await asyncio.to_thread(dev.send, range(61, 81))
    assert await asyncio.to_thread(until, hub, dev.all_stored_once, 60)
    assert len(dev.stored()) == 80
    await asyncio.to_thread(until, hub, lambda: hub.metric("vigil_vitals_backlog") == 0)
    await board.settle(ws, 1.0)
    await ws.close()
    assert_forward_only(board, dev)
