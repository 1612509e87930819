"""Ingest benchmark: devices -> Mosquitto (QoS 1) -> the hub -> stored vitals, beside a raw MQTT subscriber.

    /tmp/v/bin/python bench/ingest.py            # defaults: under two minutes on a 2-core box

Everything runs on 127.0.0.1 on free ports with a throwaway data dir, and is torn down even on failure:

1. a Mosquitto (persistence off, TCP_NODELAY, unbounded queues, 1,000 in flight per client);
2. the devices registered straight into a fresh hub data dir (records.devices.add_device);
3. raw baseline: one aiomqtt QoS 1 subscriber (persistent session, fixed id) in its own process, fed first a
   flood (a fixed count, published as fast as the publisher can), then a paced load at the target rate;
4. the hub (`vigil run`, VIGIL_MQTT_URL at that Mosquitto) fed the same two loads. A message counts once its
   first vital is visible in `<data_dir>/vitals.db` (polled read-only every few ms).

The last line on stdout is one JSON object; bench/README.md says how each figure is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOPIC_FILTER = "vigil/v1/+/+"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ADMIN_PASSWORD = "bench-admin-pw"
RAW_ID = "bench-raw-subscriber"
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
CODES = ("hr", "spo2", "rr", "temp", "nibp_sys", "nibp_dia")
VALUES = (72, 97, 16, 36.8, 118, 76)


# --------------------------------------------------------------------------------------------- helpers


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads included (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def box_jiffies() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole box since boot, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


class Meter:
    """CPU seconds of some processes over a phase, and how much of the box went to anything else."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.box0 = box_jiffies()
        self.own0 = time.process_time()
        self.cpu0 = [cpu_seconds(p) for p in pids]

    def stop(self, others_cpu: float = 0.0) -> tuple[list[float], float]:
        """CPU seconds of each pid, and the share of the box used by processes outside the bench."""
        cpu = [cpu_seconds(p) - c for p, c in zip(self.pids, self.cpu0, strict=True)]
        b1, t1 = box_jiffies()
        busy = (b1 - self.box0[0]) / CLK_TCK
        capacity = (t1 - self.box0[1]) / CLK_TCK
        ours = sum(cpu) + (time.process_time() - self.own0) + others_cpu
        return cpu, max(0.0, busy - ours) / capacity if capacity > 0 else 0.0


def box_busy(seconds: float = 1.0) -> float:
    """Share of the whole box's CPU in use over `seconds` (0..1)."""
    b0, t0 = box_jiffies()
    time.sleep(seconds)
    b1, t1 = box_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


def payload(ts: int, seq: int, boot: str, items: int) -> bytes:
    # `ts` first, 13 digits at a fixed offset: the raw subscriber reads it without parsing the JSON.
    obs = ",".join(f'{{"code":"{CODES[i]}","value":{VALUES[i]}}}' for i in range(items))
    return f'{{"ts":{ts},"seq":{seq},"boot":"{boot}","obs":[{obs}]}}'.encode()


def device_ids(n: int) -> list[str]:
    return [f"bench-{i:04d}" for i in range(n)]


@dataclass
class Child:
    """A server process in its own process group, stopped with its group."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        p = self.popen
        if p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    with log.open("ab") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Child(name, p, log)


# ------------------------------------------------------------------------------------------- publisher


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    # MQTT 3.1.1, clean session, keepalive 0 (off: a phase lasts less than a minute).
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + _varint(len(body)) + body


def publisher_main(
    port: int,
    devices: list[str],
    count: int,
    rate: float,
    boot: str,
    items: int,
    window: int,
    out: Connection,
) -> None:
    """Publish `count` obs messages QoS 1 round-robin over `devices`; `rate` 0 means as fast as possible.

    A minimal MQTT 3.1.1 client on a plain socket: PUBLISH packets are written as they fall due (several
    in one write when several are due), PUBACKs are counted, and at most `window` messages are ever
    unacknowledged, so `ts` is the time a message is handed to the kernel. paho costs over 100 us of CPU
    per message here, which on 2 cores would make the publisher the bottleneck of the flood.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(*NODELAY)
    sock.sendall(_connect_packet(f"bench-pub-{boot}-{os.getpid()}"))
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        if not chunk:
            raise ConnectionError("broker closed the connection before CONNACK")
        connack += chunk
    if connack[0] != 0x20 or connack[3] != 0:
        raise ConnectionError(f"CONNACK refused: {connack!r}")
    heads = [(f"vigil/v1/{d}/obs".encode(), len(f"vigil/v1/{d}/obs").to_bytes(2, "big")) for d in devices]
    nd = len(heads)
    cpu0 = time.process_time()
    t0 = now_ms()
    start = time.monotonic()
    sent = acked = 0
    pending = 0  # bytes of a partly received PUBACK
    while sent < count or acked < sent:
        # Messages due now: all of them in a flood, else as many as the rate allows by now.
        due = min(count, int((time.monotonic() - start) * rate) + 1) - sent if rate > 0 else count - sent
        n = min(due, window - (sent - acked), 500)
        if n > 0:
            ts = now_ms()
            buf = bytearray()
            for _ in range(n):
                topic, tlen = heads[sent % nd]
                body = payload(ts, sent // nd + 1, boot, items)
                pid = (sent % 65535 + 1).to_bytes(2, "big")
                buf += b"\x32" + _varint(2 + len(topic) + 2 + len(body)) + tlen + topic + pid + body
                sent += 1
            sock.sendall(buf)
            if sent == count:
                t_sent = now_ms()
        # Read PUBACKs (4 bytes each); block only when nothing can be sent now.
        if sent >= count or sent - acked >= window:
            wait = 0.05
        elif rate > 0:
            wait = max(0.0, start + sent / rate - time.monotonic())  # until the next message falls due
        else:
            wait = 0.0
        ready, _, _ = select.select([sock], [], [], wait)
        if ready:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("broker closed the connection")
            pending += len(data)
            acked += pending // 4
            pending %= 4
    t_acked = now_ms()
    cpu = time.process_time() - cpu0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    out.send({"sent": sent, "acked": acked, "t0": t0, "t_sent": t_sent, "t_acked": t_acked, "cpu": cpu,
              "cpu_total": ru.ru_utime + ru.ru_stime})  # fmt: skip


# -------------------------------------------------------------------------------------- raw subscriber


def raw_subscriber_main(port: int, ctl: Connection) -> None:
    """A bare aiomqtt QoS 1 subscriber (persistent session): counts messages, reads `ts` for latency."""
    asyncio.run(_raw_subscriber(port, ctl))


async def _raw_subscriber(port: int, ctl: Connection) -> None:
    import aiomqtt  # noqa: PLC0415 - only in this process

    loop = asyncio.get_running_loop()
    client = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=RAW_ID,
        clean_session=False,
        keepalive=30,
        socket_options=[NODELAY],
    )
    async with client:
        await client.subscribe(TOPIC_FILTER, qos=1)
        ctl.send("ready")
        messages = client.messages
        while True:
            cmd = await loop.run_in_executor(None, ctl.recv)
            if cmd[0] == "stop":
                await client.unsubscribe(TOPIC_FILTER)  # the session must not queue the hub's phase
                return
            expect, idle = int(cmd[1]), float(cmd[2])
            lat: list[int] = []
            first = last = 0

            async def consume(expect: int = expect, lat: list[int] = lat) -> None:
                nonlocal first, last
                async for m in messages:
                    t = now_ms()
                    p = m.payload
                    lat.append(t - int(p[6:19]))  # type: ignore[index, call-overload]
                    if not first:
                        first = t
                    last = t
                    if len(lat) >= expect:
                        return

            task = asyncio.create_task(consume())
            seen = -1
            while not task.done():  # stop waiting once nothing has arrived for `idle` seconds
                await asyncio.wait({task}, timeout=idle)
                if len(lat) == seen:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    break
                seen = len(lat)
            ctl.send({"received": len(lat), "first": first, "last": last, "lat": lat})


# ---------------------------------------------------------------------------------------------- phases


@dataclass
class Result:
    label: str
    sent: int = 0
    got: int = 0
    t0: int = 0  # first publish, epoch ms
    t_last: int = 0  # last message received (raw) or visible in vitals.db (hub)
    cpu: float = 0.0  # consumer CPU seconds over the phase
    broker_cpu: float = 0.0
    others: float = 0.0  # share of the box used by processes outside the bench during the phase
    pub: dict[str, Any] = field(default_factory=dict)
    lat: list[float] = field(default_factory=list)  # publish -> received / visible, ms, sorted
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        span = (self.t_last - self.t0) / 1000
        return self.got / span if span > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.got * 1e6 if self.got else float("nan")

    def line(self) -> str:
        pub_rate = self.pub["sent"] / max(1e-3, (self.pub["t_sent"] - self.pub["t0"]) / 1000)
        return (
            f"{self.label:<11} sent {self.sent:>6} (published at {pub_rate:>7.0f}/s)  "
            f"got {self.got:>6} in {(self.t_last - self.t0) / 1000:5.1f}s = {self.rate:>7.0f} msg/s  "
            f"cpu {self.cpu_us:6.1f} us/msg  latency p50 {percentile(self.lat, 0.5):7.1f} ms  "
            f"p99 {percentile(self.lat, 0.99):7.1f} ms  "
            f"[mosquitto {self.broker_cpu / max(1, self.sent) * 1e6:.0f} us/msg, "
            f"publisher {self.pub['cpu'] / max(1, self.sent) * 1e6:.0f} us/msg, "
            f"others {self.others:.0%} of the box]"
        )


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.tmp = Path(tempfile.mkdtemp(prefix="vigil-bench-"))
        self.ctx = mp.get_context("spawn")
        self.children: list[Child] = []
        self.procs: list[Any] = []
        self.devices = device_ids(args.devices)
        self.broker_port = 0
        self.broker: Child | None = None
        self.hub: Child | None = None
        self.http_port = 0
        self.data_dir = self.tmp / "hub"

    # -- lifecycle

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in reversed(self.children):
            c.stop()
        if self.a.keep:
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def start_broker(self) -> None:
        self.broker_port = free_port()
        conf = self.tmp / "mosquitto.conf"
        conf.write_text(
            f"listener {self.broker_port} 127.0.0.1\n"
            "user root\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 10000000\nmax_queued_bytes 0\nmax_inflight_messages 1000\n"
            "message_size_limit 0\n"
            "log_dest stdout\nlog_type error\nlog_type warning\n"
        )
        mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.broker = spawn("mosquitto", [mosq, "-c", str(conf)], self.tmp / "mosquitto.log")
        self.children.append(self.broker)
        wait_port(self.broker_port, self.broker.popen)

    def register(self) -> None:
        asyncio.run(self._register())

    async def _register(self) -> None:
        from records.crypto import SecretCipher  # noqa: PLC0415
        from records.db import Database, sqlite_url  # noqa: PLC0415
        from records.devices import add_device  # noqa: PLC0415

        self.data_dir.mkdir(parents=True)
        db = Database(sqlite_url(self.data_dir))
        cipher = SecretCipher.from_data_dir(self.data_dir)
        at = now_ms()
        try:
            await db.migrate()
            async with db.session() as session:  # one transaction for the whole fleet
                for i, dev in enumerate(self.devices):
                    await add_device(
                        session,
                        cipher,
                        device_id=dev,
                        type="monitor",
                        unit="BENCH",
                        patient=f"BENCH-P{i:04d}",  # bound to the device: no bed, no admission to write
                        at=at,
                        actor="bench",
                    )
        finally:
            await db.close()

    def start_hub(self) -> None:
        vigil = Path(sys.executable).with_name("vigil")
        argv = [str(vigil), "run"] if vigil.exists() else [sys.executable, "-m", "vigil.cli", "run"]
        self.http_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
        env.update(
            VIGIL_HOST="127.0.0.1",
            VIGIL_HTTP_PORT=str(self.http_port),
            VIGIL_MQTT_PORT=str(free_port()),
            VIGIL_COAP_PORT=str(free_port(socket.SOCK_DGRAM)),
            VIGIL_COAPS_PORT=str(free_port(socket.SOCK_DGRAM)),
            VIGIL_MLLP_PORT=str(free_port()),
            VIGIL_DATA_DIR=str(self.data_dir),
            VIGIL_ADMIN_PASSWORD=ADMIN_PASSWORD,
            VIGIL_MQTT_URL=f"mqtt://127.0.0.1:{self.broker_port}",
            VIGIL_MQTT_DYNSEC="0",
            VIGIL_LOG_LEVEL="WARNING",
        )
        self.hub = spawn("hub", argv, self.tmp / "hub.log", env)
        self.children.append(self.hub)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if self.hub.popen.poll() is not None:
                raise RuntimeError(f"hub exited with {self.hub.popen.returncode}\n{self.hub.tail()}")
            url = f"http://127.0.0.1:{self.http_port}/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"hub not ready (MQTT connected) in 40s\n{self.hub.tail()}")

    @property
    def broker_pid(self) -> int:
        assert self.broker is not None
        return self.broker.popen.pid

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def run_publisher(self, count: int, rate: float, boot: str) -> tuple[Any, Connection]:
        rx, tx = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(
            target=publisher_main,
            args=(self.broker_port, self.devices, count, rate, boot, self.a.items, self.a.window, tx),
            name=f"publisher-{boot}",
            daemon=True,
        )
        p.start()
        self.procs.append(p)
        tx.close()
        return p, rx

    @staticmethod
    def publisher_result(p: Any, rx: Connection, timeout: float = 120) -> dict[str, Any]:
        if not rx.poll(timeout):
            raise RuntimeError("publisher did not finish")
        res: dict[str, Any] = rx.recv()
        p.join(10)
        return res

    # -- raw baseline

    def raw_phases(self, flood: int, paced: int) -> tuple[Result, Result]:
        ctl, child_ctl = self.ctx.Pipe()
        sub = self.ctx.Process(
            target=raw_subscriber_main, args=(self.broker_port, child_ctl), name="raw-sub", daemon=True
        )
        sub.start()
        self.procs.append(sub)
        if not ctl.poll(20) or ctl.recv() != "ready":
            raise RuntimeError("raw subscriber did not connect")
        results = []
        for label, count, rate, boot in (
            ("raw flood", flood, 0.0, "rawflood"),
            ("raw paced", paced, self.a.rate, "rawpaced"),
        ):
            ctl.send(("expect", count, self.a.idle))
            meter = Meter([sub.pid, self.broker_pid])
            p, rx = self.run_publisher(count, rate, boot)
            pub = self.publisher_result(p, rx)
            if not ctl.poll(120):
                raise RuntimeError("raw subscriber did not report")
            got = ctl.recv()
            (cpu, broker_cpu), others = meter.stop(pub["cpu_total"])
            results.append(
                Result(
                    label,
                    sent=pub["sent"],
                    got=got["received"],
                    t0=pub["t0"],
                    t_last=got["last"],
                    cpu=cpu,
                    broker_cpu=broker_cpu,
                    others=others,
                    pub=pub,
                    lat=sorted(float(x) for x in got["lat"]),
                )
            )
        ctl.send(("stop",))
        sub.join(10)
        return results[0], results[1]

    # -- the hub

    def hub_phase(
        self, label: str, count: int, rate: float, boot: str, profile: Path | None, limit: float
    ) -> Result:
        """Feed the hub; wait until every message is stored, nothing new came for `--idle` s, or `limit` s."""
        assert self.hub is not None
        hub_pid = self.hub.popen.pid
        db = sqlite3.connect(f"file:{self.data_dir / 'vitals.db'}?mode=ro", uri=True, timeout=30)
        try:
            (last_rowid,) = db.execute("SELECT coalesce(max(rowid), 0) FROM vitals").fetchone()
            m0 = self.metrics()
            meter = Meter([hub_pid, self.broker_pid])
            spy = None
            if profile is not None:
                pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                argv = [pyspy, "record", "--pid", str(hub_pid), "--format", "raw", "--threads"]
                spy = subprocess.Popen(
                    [*argv, "--rate", "250", "--nonblocking", "-o", str(profile)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            p, rx = self.run_publisher(count, rate, boot)
            marker = f"/obs/{boot}/"
            seen = 0
            lat: list[float] = []
            rx_lat: list[float] = []
            t_last = 0
            give_up = time.monotonic() + limit
            drain_until = give_up + self.a.drain
            snap: tuple[int, int, list[float], float] | None = None  # seen, t_last, cpu, others at `limit`
            pub: dict[str, Any] | None = None
            quiet_since = time.monotonic()
            interval = self.a.poll / 1000
            while seen < count:
                rows = db.execute(
                    "SELECT rowid, key, ts, received_at FROM vitals WHERE rowid > ? ORDER BY rowid",
                    (last_rowid,),
                ).fetchall()
                t = now_ms()
                if rows:
                    last_rowid = rows[-1][0]
                    for _, key, ts, received_at in rows:
                        if key.endswith("#0") and marker in key:
                            seen += 1
                            lat.append(float(t - ts))
                            rx_lat.append(float(received_at - ts))
                    t_last = t
                    quiet_since = time.monotonic()
                if pub is None and rx.poll():
                    pub = self.publisher_result(p, rx)
                if pub is not None and time.monotonic() - quiet_since > self.a.idle:
                    break  # published everything, nothing new stored for a while: the rest is lost
                if snap is None and time.monotonic() > give_up and pub is not None:
                    # Measured up to here; keep polling so that the next phase starts with no backlog.
                    snap = (seen, t_last, *meter.stop(pub["cpu_total"]))
                    print(f"WARNING: {label}: {seen} of {count} stored after {limit:.0f}s; measured up to "
                          f"here, waiting up to {self.a.drain:.0f}s more for the rest")  # fmt: skip
                if time.monotonic() > drain_until:
                    break
                time.sleep(interval)
            if pub is None:
                pub = self.publisher_result(p, rx)
            stored = seen
            if snap is None:
                (cpu, broker_cpu), others = meter.stop(pub["cpu_total"])
            else:
                seen, t_last, (cpu, broker_cpu), others = snap
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(20)
                if spy.poll() is None:
                    spy.kill()
                    spy.wait(5)
            m1 = self.metrics()
        finally:
            db.close()
        lat.sort()
        rx_lat.sort()
        extra = {"metrics": {k: m1[k] - m0.get(k, 0.0) for k in m1}, "rx_lat": rx_lat, "stored": stored}
        return Result(label, pub["sent"], seen, pub["t0"], t_last, cpu, broker_cpu, others, pub, lat, extra)


# ----------------------------------------------------------------------------------------------- report


def histogram_quantile(delta: dict[str, float], name: str, q: float) -> float:
    """Upper bound (ms) of the bucket holding quantile q of a Prometheus histogram's increase."""
    buckets = []
    for key, v in delta.items():
        if key.startswith(f"{name}_bucket{{"):
            le = key.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), v))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if not total:
        return float("nan")
    for le, cum in buckets:
        if cum >= q * total:
            return le * 1000
    return float("inf")


def metric_sum(delta: dict[str, float], name: str) -> float:
    return sum(v for k, v in delta.items() if k == name or k.startswith(name + "{"))


def r1(x: float) -> float | None:
    return None if x != x else round(x, 1)  # NaN -> null


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=200, help="simulated devices (topics)")
    ap.add_argument("--count", type=int, default=40_000, help="messages in each flood phase")
    ap.add_argument("--rate", type=float, default=500, help="target total msg/s of the paced phases")
    ap.add_argument("--seconds", type=float, default=12, help="length of each paced phase")
    ap.add_argument("--items", type=int, default=2, choices=range(1, len(CODES) + 1), help="vitals per msg")
    ap.add_argument("--window", type=int, default=1000, help="publisher's unacknowledged messages")
    ap.add_argument("--poll", type=float, default=5, help="ms between vitals.db polls")
    ap.add_argument("--idle", type=float, default=10, help="s without progress before the rest is lost")
    ap.add_argument("--limit", type=float, default=60, help="s to wait for the hub's flood to be stored")
    ap.add_argument("--drain", type=float, default=30, help="s more to wait for the rest after --limit")
    ap.add_argument("--profile", type=Path, help="dir for py-spy profiles of the hub phases")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) for inspection")
    a = ap.parse_args(argv)
    paced = int(a.rate * a.seconds)

    def interrupted(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    started = time.monotonic()
    busy = box_busy()
    load = os.getloadavg()[0]
    print(f"box: {os.cpu_count()} CPUs, {busy:.0%} busy before the run (load average {load:.2f})")
    if busy > 0.1:
        print("WARNING: other processes are using the CPU; the figures below are not reliable")
    b = Bench(a)
    try:
        b.start_broker()
        t = time.monotonic()
        b.register()
        print(f"mosquitto on :{b.broker_port}; {a.devices} devices registered in {time.monotonic() - t:.1f}s")
        print(f"load: {a.count} msgs as fast as possible, then {a.rate:.0f} msg/s for {a.seconds:.0f}s; "
              f"{a.items} vitals per msg, QoS 1, {a.window} in flight")  # fmt: skip
        raw_flood, raw_paced = b.raw_phases(a.count, paced)
        print(raw_flood.line())
        print(raw_paced.line())
        t = time.monotonic()
        b.start_hub()
        print(f"hub ready (MQTT connected) in {time.monotonic() - t:.1f}s, pid {b.hub.popen.pid}")  # type: ignore[union-attr]
        profile = {k: a.profile / f"hub-{k}.txt" if a.profile else None for k in ("flood", "paced")}
        if a.profile:
            a.profile.mkdir(parents=True, exist_ok=True)
        flood = b.hub_phase("hub flood", a.count, 0.0, "flood", profile["flood"], a.limit)
        print(flood.line())
        hub_paced = b.hub_phase("hub paced", paced, a.rate, "paced", profile["paced"], a.seconds + a.limit)
        print(hub_paced.line())
        mets = [flood.extra["metrics"], hub_paced.extra["metrics"]]
        accepted = sum(metric_sum(m, "vigil_ingest_total") for m in mets)
        dead = sum(metric_sum(m, "vigil_deadletter_total") for m in mets)
        dups = sum(metric_sum(m, "vigil_duplicates_total") for m in mets)
        errors = sum(metric_sum(m, "vigil_processor_errors_total") for m in mets)
        hm = hub_paced.extra["metrics"]
        rx_p50 = histogram_quantile(hm, "vigil_ingest_latency_seconds", 0.5)
        rx_p99 = histogram_quantile(hm, "vigil_ingest_latency_seconds", 0.99)
        rx = hub_paced.extra["rx_lat"]
        print(f"hub paced: publish -> hub receipt (received_at - ts, exact) "
              f"p50 {percentile(rx, 0.5):.1f} ms, p99 {percentile(rx, 0.99):.1f} ms")  # fmt: skip
        sent = flood.sent + hub_paced.sent
        stored = flood.extra["stored"] + hub_paced.extra["stored"]
        print(f"hub: accepted into the log {accepted:.0f}, dead-lettered {dead:.0f}, duplicates {dups:.0f}, "
              f"processor batch retries {errors:.0f}, "
              f"stored {stored} of {sent} sent; paced receipt->stored (hub histogram, bucket bound) "
              f"p50 <= {rx_p50:g} ms, p99 <= {rx_p99:g} ms")  # fmt: skip
        n_raw = raw_flood.sent + raw_paced.sent
        print(f"total {time.monotonic() - started:.0f}s")
        ratio = flood.rate / raw_flood.rate if raw_flood.rate else float("nan")
        result = {
            "msgs_per_s": round(flood.rate),
            "raw_msgs_per_s": round(raw_flood.rate),
            "ratio": round(ratio, 3),
            "cpu_us_per_msg": r1(flood.cpu_us),
            "p50_ms": r1(percentile(hub_paced.lat, 0.5)),
            "p99_ms": r1(percentile(hub_paced.lat, 0.99)),
            "raw_cpu_us_per_msg": r1(raw_flood.cpu_us),
            "raw_p50_ms": r1(percentile(raw_paced.lat, 0.5)),
            "raw_p99_ms": r1(percentile(raw_paced.lat, 0.99)),
            "paced_rate": a.rate,
            "paced_msgs_per_s": round(hub_paced.rate),
            "paced_cpu_us_per_msg": r1(hub_paced.cpu_us),
            "raw_paced_cpu_us_per_msg": r1(raw_paced.cpu_us),
            "rx_p50_ms": r1(percentile(rx, 0.5)),
            "rx_p99_ms": r1(percentile(rx, 0.99)),
            "flood_p50_ms": r1(percentile(flood.lat, 0.5)),
            "flood_p99_ms": r1(percentile(flood.lat, 0.99)),
            "devices": a.devices,
            "items": a.items,
            "sent": sent,
            "stored": stored,
            "lost": sent - stored,
            "raw_lost": n_raw - raw_flood.got - raw_paced.got,
            "deadlettered": int(dead),
            "processor_errors": int(errors),
            "box_busy_before": round(busy, 2),
        }
    except BaseException:
        for c in b.children:
            if c.popen.poll() is not None or c.name == "hub":
                print(f"--- {c.name} log tail ---\n{c.tail()}", file=sys.stderr)
        raise
    finally:
        b.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
