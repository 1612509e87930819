"""The websocket `/ws` end to end: the real `vigil run`, mosquitto_pub as devices, `websockets` as clients.

One hub serves the module; each test uses its own unit, beds, devices and patients.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.hub import Hub

pytestmark = pytest.mark.integration

Msg = dict[str, Any]


FLEET = {  # device: its place (unit, bed, patient)
    "ws-mon-a": ("ws-icu", "ws-icu-1", "WP-1"),
    "ws-mon-m": ("ws-merge", "ws-merge-1", None),
    "ws-mon-f": ("ws-secret", "ws-secret-1", "WP-F"),
    "ws-mon-r": ("ws-res", "ws-res-1", "WP-R"),
    "ws-mon-s": ("ws-slow", "ws-slow-1", "WP-S"),
}
SOUTH_NURSE = ("ws-nurse-s", "pw-south-1")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("ws") / "hub").start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def secrets(hub: Hub) -> dict[str, str]:
    """Registers the module's devices and its nurse of another site, once for the module."""

    def vigil(*args: str) -> dict[str, Any]:
        r = hub.cli(*args, check=False)
        assert r.returncode == 0, f"vigil {' '.join(args)}: {r.stderr}"
        return dict(json.loads(r.stdout))

    def add(device: str) -> tuple[str, str]:
        unit, bed, patient = FLEET[device]
        extra = ["--unit", unit, "--bed", bed] + (["--patient", patient] if patient else [])
        return device, str(vigil("devices", "add", device, "--type", "monitor", *extra)["secret"])

    name, password = SOUTH_NURSE
    vigil(
        "users",
        "add",
        name,
        "--role",
        "nurse",
        "--site",
        "ws-south",
        "--unit",
        "ws-s",
        "--password",
        password,
    )
    return dict(add(device) for device in FLEET)


def pub(hub: Hub, device: str, secret: str, kind: str, *payloads: dict[str, Any]) -> None:
    """Publish one message per payload (QoS 1), in one mosquitto_pub session so they leave back to back."""
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.mqtt_port), "-u", device, "-P", secret]
    args += ["-i", device, "-q", "1", "-t", f"vigil/v1/{device}/{kind}"]
    if len(payloads) == 1:
        r = subprocess.run(
            [*args, "-m", json.dumps(payloads[0])], check=False, capture_output=True, text=True, timeout=20
        )
    else:
        lines = "".join(json.dumps(p) + "\n" for p in payloads)
        r = subprocess.run(
            [*args, "-l"], input=lines, check=False, capture_output=True, text=True, timeout=60
        )
    assert r.returncode == 0, r.stderr


def obs(seq: int, hr: float) -> dict[str, Any]:
    return {"seq": seq, "obs": [{"code": "hr", "value": hr}]}


async def connect(hub: Hub, token: str, *, query: bool = False, **kw: Any) -> ClientConnection:
    if query:
        return await websockets.connect(f"ws://127.0.0.1:{hub.http_port}/ws?access_token={token}", **kw)
    url = f"ws://127.0.0.1:{hub.http_port}/ws"
    return await websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}, **kw)


async def recv(ws: ClientConnection, timeout: float = 5.0) -> Msg:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def collect(ws: ClientConnection, seconds: float) -> list[Msg]:
    """Everything received within `seconds`."""
    out: list[Msg] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(await recv(ws, left))
        except TimeoutError:
            break
    return out


async def until(ws: ClientConnection, pred: Any, timeout: float = 5.0) -> Msg:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        m = await recv(ws, left)
        if pred(m):
            return m
    raise AssertionError("no such message")


async def subscribe(ws: ClientConnection, *topics: str) -> list[Msg]:
    """Subscribe; returns the answer up to `subscribed` (errors first). State follows as ordinary messages."""
    await ws.send(json.dumps({"op": "subscribe", "topics": list(topics)}))
    out = []
    while True:
        m = await recv(ws)
        out.append(m)
        if m["type"] == "subscribed":
            return out


def hr(m: Msg) -> Any:
    if m.get("type") != "vitals":
        return None
    return m["data"]["values"].get("hr", {}).get("value")


async def test_token_by_header_or_query_and_connections_counted(hub: Hub) -> None:
    token = hub.token()
    a = await connect(hub, token)
    b = await connect(hub, token, query=True)
    for ws in (a, b):
        await ws.send(json.dumps({"op": "ping"}))
        assert await recv(ws) == {"type": "pong"}
    assert hub.metric("vigil_ws_connections") >= 2
    await a.close()
    await b.close()


@pytest.mark.parametrize("token", ["not-a-jwt", None])
async def test_a_bad_or_missing_token_gets_an_error_and_4401(hub: Hub, token: str | None) -> None:
    url = f"ws://127.0.0.1:{hub.http_port}/ws"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with websockets.connect(url, additional_headers=headers) as ws:
        m = await recv(ws)
        assert (m["type"], m["code"]) == ("error", "unauthorised")
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
        assert ws.close_code == 4401


async def test_subscribed_unit_gets_latest_state_then_live_vitals_within_a_second(
    hub: Hub, secrets: dict[str, str]
) -> None:
    token = hub.token()
    first = await connect(hub, token)
    assert (await subscribe(first, "unit:ws-icu"))[-1] == {"type": "subscribed", "topics": ["unit:ws-icu"]}
    pub(hub, "ws-mon-a", secrets["ws-mon-a"], "obs", obs(1, 80))
    live = await until(first, lambda m: hr(m) == 80)
    assert live["topic"] == "unit:ws-icu" and isinstance(live["id"], int)
    assert live["data"]["bed_id"] == "ws-icu-1" and live["data"]["patient_id"] == "WP-1"
    assert live["data"]["values"]["hr"]["code"] == "MDC_ECG_HEART_RATE"

    second = await connect(hub, token)
    await subscribe(second, "unit:ws-icu")
    state = await recv(second)  # the latest state comes right after `subscribed`
    assert (state["type"], state["id"], hr(state)) == ("vitals", live["id"], 80)

    await asyncio.sleep(1.1)  # past the merge window the first change went in
    t0 = time.monotonic()
    pub(hub, "ws-mon-a", secrets["ws-mon-a"], "obs", obs(2, 123))
    got = await until(second, lambda m: hr(m) == 123, timeout=2)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"HR 123 took {elapsed:.3f}s"
    assert got["id"] > live["id"]
    await first.close()
    await second.close()


async def test_changes_within_a_second_are_merged_into_one_message(hub: Hub, secrets: dict[str, str]) -> None:
    ws = await connect(hub, hub.token())
    await subscribe(ws, "bed:ws-merge-1")
    pub(hub, "ws-mon-m", secrets["ws-mon-m"], "obs", *(obs(i, 100 + i) for i in range(1, 6)))
    msgs = [m for m in await collect(ws, 2.0) if m.get("type") == "vitals"]
    assert [hr(m) for m in msgs] == [101, 105]  # the first at once, the other four merged: newest value
    assert msgs[0]["id"] < msgs[1]["id"]
    received = [datetime.fromisoformat(m["data"]["at"]) for m in msgs]  # when the hub received each
    assert (received[1] - received[0]).total_seconds() < 0.2, "the five publishes took over 200 ms"
    await ws.close()


async def test_a_nurse_of_another_site_is_refused_without_learning_what_exists(
    hub: Hub, secrets: dict[str, str]
) -> None:
    ws = await connect(hub, hub.token(*SOUTH_NURSE))
    answer = await subscribe(ws, "unit:ws-secret", "bed:ws-secret-1", "patient:WP-F", "unit:ws-nowhere")
    errors = {m["topic"]: m for m in answer if m["type"] == "error"}
    assert set(errors) == {"unit:ws-secret", "bed:ws-secret-1", "patient:WP-F", "unit:ws-nowhere"}
    assert {m["code"] for m in errors.values()} == {"forbidden"}
    assert errors["unit:ws-secret"]["message"] == errors["unit:ws-nowhere"]["message"]
    assert answer[-1] == {"type": "subscribed", "topics": []}
    answer = await subscribe(ws, "queue:Q-1", "incidents", "wing:x")
    assert [(m.get("topic"), m.get("code")) for m in answer[:-1]] == [
        ("queue:Q-1", "not_found"),
        ("incidents", "forbidden"),
        ("wing:x", "bad_topic"),
    ]
    await ws.close()


async def test_resume_after_a_disconnect_sends_what_changed_while_away(
    hub: Hub, secrets: dict[str, str]
) -> None:
    token = hub.token()
    watcher = await connect(hub, token)  # stays connected: tells when the hub has the away-time update
    await subscribe(watcher, "patient:WP-R")
    ws = await connect(hub, token)
    await subscribe(ws, "bed:ws-res-1")
    pub(hub, "ws-mon-r", secrets["ws-mon-r"], "obs", obs(1, 70))
    last = (await until(ws, lambda m: hr(m) == 70))["id"]
    await ws.close()

    pub(hub, "ws-mon-r", secrets["ws-mon-r"], "obs", obs(2, 99))
    await until(watcher, lambda m: hr(m) == 99)  # merged after the first: up to a second

    ws = await connect(hub, token)
    await subscribe(ws, "bed:ws-res-1")
    await until(ws, lambda m: hr(m) == 99)  # the latest state comes with `subscribed` too
    await ws.send(json.dumps({"op": "resume", "after": last}))
    replayed = await collect(ws, 1.0)
    assert replayed, "nothing replayed"
    assert all(m["id"] > last for m in replayed)
    assert [hr(m) for m in replayed if m["type"] == "vitals"] == [99]

    await ws.send(json.dumps({"op": "resume", "after": last + 10**9}))
    assert await recv(ws) == {"type": "resync"}
    await ws.send(json.dumps({"op": "resume", "after": "not-a-cursor"}))
    assert await recv(ws) == {"type": "resync"}
    await ws.close()
    await watcher.close()


def raw_websocket(hub: Hub, token: str) -> socket.socket:
    """A client that does the handshake by hand, with a small receive buffer, and then reads only if told."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", hub.http_port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws?access_token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def send_text(sock: socket.socket, text: str) -> None:
    payload, mask = text.encode(), os.urandom(4)
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)


def close_code(sock: socket.socket, timeout: float) -> int | None:
    """Read frames until the server's close frame (its code) or the end of the stream (None)."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        while len(buf) >= 2:
            n, at = buf[1] & 0x7F, 2
            if n == 126:
                n, at = int.from_bytes(buf[2:4]), 4
            elif n == 127:
                n, at = int.from_bytes(buf[2:10]), 10
            if len(buf) < at + n:
                break
            if buf[0] & 0x0F == 0x8:
                return int.from_bytes(buf[at : at + 2])
            buf = buf[at + n :]
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk


@pytest.mark.slow
async def test_a_slow_consumer_is_closed_4008_while_others_keep_receiving(
    hub: Hub, secrets: dict[str, str]
) -> None:
    """End to end, the kernel's socket buffers (about 3 MB here) fill before the hub's queue of 1000 frames
    does, so this takes some 5,000 updates (5-15 s); `tests/unit/test_livehub.py` covers it at hub level."""
    token = hub.token()
    topics = ("unit:ws-slow", "bed:ws-slow-1", "patient:WP-S")  # three frames per update
    slow = raw_websocket(hub, token)
    send_text(slow, json.dumps({"op": "subscribe", "topics": topics}))
    fast = await connect(hub, token)
    await subscribe(fast, *topics)
    received: list[Msg] = []

    async def read_fast() -> None:
        while True:
            received.append(await recv(fast, 60))

    reader = asyncio.create_task(read_fast())
    await asyncio.sleep(0.3)
    base = hub.metric("vigil_ws_connections")
    seq, batch = 0, []
    for _ in range(16):  # device status is state, never merged
        batch = [{"seq": seq + i, "battery": i / 1000, "conditions": []} for i in range(1, 501)]
        seq += 500
        await asyncio.to_thread(pub, hub, "ws-mon-s", secrets["ws-mon-s"], "status", *batch)
        if hub.metric("vigil_ws_connections") < base:
            break
    assert hub.metric("vigil_ws_connections") == base - 1, "the slow consumer was not closed"
    assert await asyncio.to_thread(close_code, slow, 10) == 4008  # after what was sent before, the close
    slow.close()

    for _ in range(200):  # every update reached the other client, on each of its three topics
        if sum(m.get("type") == "device" for m in received) >= 3 * seq:
            break
        await asyncio.sleep(0.05)
    assert sum(m.get("type") == "device" for m in received) == 3 * seq
    assert [m["data"]["battery"] for m in received[-3:]] == [batch[-1]["battery"]] * 3
    assert not reader.done(), "the other client was closed"
    reader.cancel()
    await fast.close()
