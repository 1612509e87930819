"""Websocket fan-out benchmark: devices at 1 Hz per bed -> Mosquitto -> the hub -> N websocket clients.

    /tmp/v/bin/python bench/fanout.py            # defaults: 2,000 beds in 100 units of 20, 2,000 msg/s,
                                                 # clients ramped 250, 500, 1000, 2000; about 3 minutes
    /tmp/v/bin/python bench/fanout.py --clients 2000 --seconds 30 --profile /tmp/fanout-prof

Everything runs on 127.0.0.1 on free ports with a throwaway data dir, torn down even on failure:

1. a Mosquitto as in bench/ingest.py (the hub reaches it through VIGIL_MQTT_URL, as a deployment of this size
   would: the embedded amqtt broker would run 2,000 device connections on the hub's own event loop);
2. `--beds` monitors registered straight into a fresh hub data dir, each bound to a bed of a `--unit-beds`-bed
   unit with its patient admitted (records.devices.add_device: one transaction);
3. `vigil run` with the open-files limit raised to the hard limit (inherited); one admin token for all
   clients;
4. one raw-socket MQTT publisher (bench/ingest.py's) sending every bed's obs once per `--period` (1 s), evenly
   spread, `ts` = publish time (epoch ms);
5. websocket clients in `--procs` processes (minimal raw-asyncio RFC 6455 clients, no compression offered:
   a fraction of the CPU of the `websockets` library, which the hub needs on 2 cores), each subscribed to one
   `unit:X` (round-robin over units), opened in steps of `--clients`; after `--settle` s each step is
   measured for `--seconds` s.

For every vitals message a client records now - `ts` of the newest value in it (device time; same clock).
The last line on stdout is one JSON object; bench/README.md says how each figure is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # bench/ingest.py: broker, hub, publisher, CPU meters

HIST_MS = 60_000  # latency histograms: 1 ms bins up to a minute, then one overflow bin
KINDS = ("all", "once", "held", "rx", "post")  # see Stats


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def raise_nofile() -> tuple[int, int]:
    """Raise this process's open-files soft limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ------------------------------------------------------------------------------------- websocket clients

_HOURS: dict[str, int] = {}


def iso_ms(s: str) -> int:
    """Epoch ms of Vigil's `YYYY-MM-DDTHH:MM:SS.mmmZ`, with the hour cached (cheap at 40k messages/s)."""
    hour = s[:13]
    base = _HOURS.get(hour)
    if base is None:
        base = int(datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp()) * 1000
        _HOURS[hour] = base
    return base + int(s[14:16]) * 60_000 + int(s[17:19]) * 1000 + int(s[20:23])


class Stats:
    """One client process's figures for one step.

    Latency histograms (ms, 1 ms bins): `all` now - ts of the newest value, every vitals message; `once` and
    `held` the same for messages classified as sent at once / held by the 1 s merge; `rx` data.at - ts
    (publish -> hub receipt); `post` now - data.at (hub receipt -> client, merge hold included).
    """

    def __init__(self) -> None:
        self.hist = {k: [0] * (HIST_MS + 1) for k in KINDS}
        self.frames = 0
        self.vitals = 0
        self.unclassified = 0  # a bed's first two messages on a connection (the first may be latest state)
        self.covered = 0  # publishes the classified messages stand for (each carries the newest only)
        self.superseded = 0  # publishes merged away: never the newest value of a message
        self.late = 0  # messages over --late-ms

    def add(self, kind: str, ms: int) -> None:
        self.hist[kind][min(HIST_MS, max(0, ms))] += 1

    def dump(self) -> dict[str, Any]:
        hist = {k: {i: n for i, n in enumerate(h) if n} for k, h in self.hist.items()}
        return {
            "hist": hist,
            "frames": self.frames,
            "vitals": self.vitals,
            "unclassified": self.unclassified,
            "covered": self.covered,
            "superseded": self.superseded,
            "late": self.late,
        }


class ClientState:
    """What the connections of one process share: the step's stats, the hub -> client delay estimate."""

    def __init__(self, period_ms: int, late_ms: int) -> None:
        self.period_ms = period_ms
        self.late_ms = late_ms
        self.stats = Stats()
        self.delay = 5.0  # EWMA of now - data.at of messages sent at once (hub processing + websocket)
        self.open = 0
        self.subscribed = 0
        self.closes: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()


class WsClient(asyncio.Protocol):
    """A minimal RFC 6455 client: handshake, one masked `subscribe`, then it only reads unmasked frames."""

    def __init__(self, host: str, port: int, token: str, topic: str, st: ClientState) -> None:
        self.request = (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        self.topic = topic
        self.st = st
        self.buf = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()  # "subscribed" / why not
        self.closed = False
        self.close_code: str | None = None
        self.beds: dict[str, list[int]] = {}  # bed -> [newest ts, data.at, received, messages]
        self.fragments: list[bytes] = []

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(*ingest.NODELAY)
        self.transport.write(self.request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            code = self.close_code or ("reset" if exc else "eof (no close frame)")
            if self.upgraded:
                self.st.open -= 1
                if self.done.done() and self.done.result() == "subscribed":
                    self.st.subscribed -= 1
            self.st.closes[code] += 1
        if not self.done.done():
            self.done.set_result(f"lost before subscribed: {self.close_code or exc}")

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if b" 101 " not in status:
                self._fail(f"handshake: {status.decode(errors='replace')}")
                return
            self.upgraded = True
            self.st.open += 1
            self._send(0x1, orjson.dumps({"op": "subscribe", "topics": [self.topic]}))
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:
                head += 4  # a server never masks; tolerate it anyway (payload would be garbled)
            if n - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            self._frame(b0, payload)
        if pos:
            del buf[:pos]

    # -- frames

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == 0x0:  # continuation
            self.fragments.append(payload)
            if b0 & 0x80:
                payload, self.fragments = b"".join(self.fragments), []
                self._message(payload)
        elif opcode in (0x1, 0x2):
            if b0 & 0x80:
                self._message(payload)
            else:
                self.fragments = [payload]
        elif opcode == 0x8:
            code = str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "1005"
            reason = payload[2:].decode(errors="replace")
            self.close_code = f"{code} {reason}".strip()
            self._send(0x8, payload[:2])
            if self.transport is not None:
                self.transport.close()
        elif opcode == 0x9:
            self._send(0xA, payload)

    def _message(self, payload: bytes) -> None:
        st = self.st
        stats = st.stats
        stats.frames += 1
        if not payload.startswith(b'{"id":'):
            msg = orjson.loads(payload)
            if msg.get("type") == "subscribed" and not self.done.done():
                if msg.get("topics") == [self.topic]:
                    st.subscribed += 1
                    self.done.set_result("subscribed")
                else:
                    self.done.set_result(f"not subscribed: {msg}")
            elif msg.get("type") == "error":
                st.errors[str(msg.get("code"))] += 1
            return
        msg = orjson.loads(payload)
        if msg["type"] != "vitals":
            return
        received = now_ms()
        data = msg["data"]
        ts = max(iso_ms(v["ts"]) for v in data["values"].values())
        at = iso_ms(data["at"])
        bed = self.beds.get(data["bed_id"])
        if bed is None:
            self.beds[data["bed_id"]] = [ts, at, received, 1]
            stats.unclassified += 1
            return  # possibly the latest state sent right after `subscribed`: no latency
        latency = received - ts
        stats.vitals += 1
        stats.add("all", latency)
        stats.add("rx", at - ts)
        stats.add("post", received - at)
        if latency > st.late_ms:
            stats.late += 1
        prev_ts, _prev_at, prev_received, count = bed
        if count >= 2:
            # The bed's window opened when its previous message was sent (about `delay` before the client got
            # it); a record reaching the hub `delay` before it is processed goes at once iff that is at least
            # a window later. A message standing for two or more publishes was held whatever the times say.
            covered = max(1, round((ts - prev_ts) / st.period_ms))
            stats.covered += covered
            stats.superseded += covered - 1
            if covered == 1 and at + st.delay >= prev_received + 1000:
                stats.add("once", latency)
                st.delay += (received - at - st.delay) / 64
            else:
                stats.add("held", latency)
        else:
            stats.unclassified += 1
        bed[0], bed[1], bed[2], bed[3] = ts, at, received, count + 1

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(head + mask + body)

    def _fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_result(why)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self._send(0x8, (1000).to_bytes(2, "big"))


def clients_main(
    port: int, token: str, topics: list[str], period_ms: int, late_ms: int, ctl: Connection
) -> None:
    """A client process: opens its connections in steps when told, reports a step's stats when asked."""
    raise_nofile()
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        uvloop.install()
    asyncio.run(_clients(port, token, topics, period_ms, late_ms, ctl))


async def _clients(
    port: int, token: str, topics: list[str], period_ms: int, late_ms: int, ctl: Connection
) -> None:
    loop = asyncio.get_running_loop()
    st = ClientState(period_ms, late_ms)
    conns: list[WsClient] = []
    failures: collections.Counter[str] = collections.Counter()
    opened = 0
    commands: asyncio.Queue[Any] = asyncio.Queue()
    loop.add_reader(ctl.fileno(), lambda: commands.put_nowait(ctl.recv()))
    sem = asyncio.Semaphore(64)  # handshakes in flight: the hub's accept backlog and subscribe lookups

    async def open_one(topic: str) -> None:
        async with sem:
            try:
                _, proto = await loop.create_connection(
                    lambda: WsClient("127.0.0.1", port, token, topic, st), "127.0.0.1", port
                )
            except OSError as exc:
                failures[f"connect: {exc.strerror or exc}"] += 1
                return
            conns.append(proto)
            try:
                why = await asyncio.wait_for(asyncio.shield(proto.done), 30)
            except TimeoutError:
                why = "no `subscribed` within 30s"
            if why != "subscribed":
                failures[why[:120]] += 1

    while True:
        cmd = await commands.get()
        if cmd[0] == "open":
            t0 = time.monotonic()
            batch, opened = topics[opened : opened + cmd[1]], opened + cmd[1]
            await asyncio.gather(*(open_one(t) for t in batch))
            ctl.send({"open": st.open, "subscribed": st.subscribed, "failures": dict(failures),
                      "seconds": time.monotonic() - t0})  # fmt: skip
        elif cmd[0] == "measure":
            st.stats = Stats()
        elif cmd[0] == "report":
            out = st.stats.dump()
            st.stats = Stats()
            out.update(open=st.open, subscribed=st.subscribed, closes=dict(st.closes), errors=dict(st.errors),
                       failures=dict(failures), delay_ms=st.delay)  # fmt: skip
            ctl.send(out)
        elif cmd[0] == "stop":
            for c in conns:
                c.close()
            await asyncio.sleep(0.5)
            for c in conns:
                if c.transport is not None:
                    c.transport.close()
            ctl.send("stopped")
            return


# ------------------------------------------------------------------------------------------------ bench


def hist_merge(parts: list[dict[int, int]]) -> list[int]:
    out = [0] * (HIST_MS + 1)
    for h in parts:
        for i, n in h.items():
            out[int(i)] += n
    return out


def hist_q(h: list[int], q: float) -> float:
    total = sum(h)
    if not total:
        return float("nan")
    want = max(1, math.ceil(q * total))
    acc = 0
    for i, n in enumerate(h):
        acc += n
        if acc >= want:
            return float(i)
    return float(HIST_MS)


class Fanout(ingest.Bench):
    """bench/ingest.py's broker, hub and publisher, with devices in beds of units."""

    def __init__(self, args: argparse.Namespace) -> None:
        args.devices = args.beds
        super().__init__(args)
        self.units = [f"FU{u:03d}" for u in range(math.ceil(args.beds / args.unit_beds))]
        self.devices = [f"fmon-{i:04d}" for i in range(args.beds)]

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
                    unit = self.units[i // self.a.unit_beds]
                    await add_device(
                        session,
                        cipher,
                        device_id=dev,
                        type="monitor",
                        unit=unit,
                        bed=f"{unit}-B{i % self.a.unit_beds:02d}",
                        patient=f"FP-{i:04d}",  # admitted to the bed; the device follows the bed
                        at=at,
                        actor="bench",
                    )
        finally:
            await db.close()

    def token(self) -> str:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/api/v1/auth/token",
            data=json.dumps({"username": "admin", "password": ingest.ADMIN_PASSWORD}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return str(json.load(r)["access_token"])


def summarise_profile(path: Path, top: int = 25) -> list[str]:
    """Per-function inclusive and self shares of py-spy's raw (collapsed) output."""
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]  # drop the thread frame
        total += int(n)
        for f in set(frames):
            incl[f] += int(n)
        if frames:
            own[frames[-1]] += int(n)
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; inclusive (self) share per function:"]
    for f, n in incl.most_common(top):
        lines.append(f"  {n / total:6.1%} ({own[f] / total:5.1%})  {f}")
    lines.append("top self:")
    for f, n in own.most_common(15):
        lines.append(f"  {n / total:6.1%}  {f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="250,500,1000,2000", help="websocket clients per step (ramp)")
    ap.add_argument("--beds", type=int, default=2000, help="beds, one monitor each")
    ap.add_argument("--unit-beds", type=int, default=20, help="beds per unit")
    ap.add_argument("--period", type=float, default=1.0, help="seconds between two publishes of one bed")
    ap.add_argument("--seconds", type=float, default=15, help="measured seconds per step")
    ap.add_argument("--settle", type=float, default=3, help="seconds after a step's connections open")
    ap.add_argument("--warmup", type=float, default=5, help="seconds of publishing before the first step")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--items", type=int, default=2, choices=range(1, 7), help="vitals per message")
    ap.add_argument("--late-ms", type=int, default=1500, help="messages later than this are counted late")
    ap.add_argument("--profile", type=Path, help="dir: py-spy the hub during the last step")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (hub.log, data)")
    a = ap.parse_args(argv)
    a.window = 1000  # publisher's unacknowledged messages (bench/ingest.py)
    steps = sorted({int(x) for x in a.clients.split(",") if x.strip()})
    rate = a.beds / a.period

    def interrupted(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    started = time.monotonic()
    nofile = raise_nofile()
    busy = ingest.box_busy()
    load = os.getloadavg()
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    print(f"box: {os.cpu_count()} CPUs, {busy:.0%} busy before the run (load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}); open files limit {nofile[0]} (hard {nofile[1]}), "
          f"somaxconn {somaxconn}")  # fmt: skip
    if busy > 0.1:
        print("WARNING: other processes are using the CPU; the figures below are not reliable")
    if steps[-1] + 200 > nofile[0]:
        print(f"WARNING: {steps[-1]} clients need more than the open-files limit {nofile[0]} allows")
    b = Fanout(a)
    clients: list[tuple[Any, Connection]] = []
    spy = None
    rows: list[dict[str, Any]] = []
    try:
        b.start_broker()
        t = time.monotonic()
        b.register()
        print(f"mosquitto on :{b.broker_port}; {a.beds} monitors in {len(b.units)} units of {a.unit_beds} "
              f"beds, each with an admitted patient, registered in {time.monotonic() - t:.1f}s")  # fmt: skip
        t = time.monotonic()
        b.start_hub()
        assert b.hub is not None
        hub_pid = b.hub.popen.pid
        hub_nofile = Path(f"/proc/{hub_pid}/limits").read_text()
        hub_limit = re.search(r"Max open files\s+(\d+)", hub_nofile)
        print(f"hub ready (MQTT connected) in {time.monotonic() - t:.1f}s, pid {hub_pid}, open files limit "
              f"{hub_limit[1] if hub_limit else '?'}")  # fmt: skip
        token = b.token()
        # Publish for the whole run (the publisher is stopped at the end), `ts` = publish time.
        count = int(rate * 3600)
        pub, pub_rx = b.run_publisher(count, rate, "fanout")
        print(f"publishing {rate:.0f} msg/s: {a.beds} beds every {a.period:g}s, {a.items} vitals per "
              f"message, QoS 1; warm-up {a.warmup:g}s")  # fmt: skip
        topics = [f"unit:{b.units[i % len(b.units)]}" for i in range(steps[-1])]
        for p in range(a.procs):
            rx, tx = b.ctx.Pipe()
            proc = b.ctx.Process(
                target=clients_main,
                args=(b.http_port, token, topics[p :: a.procs], round(a.period * 1000), a.late_ms, tx),
                name=f"ws-clients-{p}",
                daemon=True,
            )
            proc.start()
            b.procs.append(proc)
            clients.append((proc, rx))
        time.sleep(a.warmup)
        opened = 0
        for step_i, n in enumerate(steps):
            more = n - opened
            t = time.monotonic()
            for p, (_, rx) in enumerate(clients):
                rx.send(("open", sum(1 for i in range(opened, n) if i % a.procs == p)))
            got = [rx.recv() for _, rx in clients]
            opened = n
            held = sum(g["subscribed"] for g in got)
            fails = collections.Counter[str]()
            for g in got:
                fails.update(g["failures"])
            print(f"step {n}: opened {more} more in {time.monotonic() - t:.1f}s; subscribed {held} of {n}"
                  + (f"; failures {dict(fails)}" if fails else ""))  # fmt: skip
            time.sleep(a.settle)
            last = step_i == len(steps) - 1
            if last and a.profile is not None:
                a.profile.mkdir(parents=True, exist_ok=True)
                pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                spy = subprocess.Popen(
                    [pyspy, "record", "--pid", str(hub_pid), "--format", "raw", "--threads", "--rate", "100",
                     "--nonblocking", "-o", str(a.profile / "hub-fanout.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            m0 = b.metrics()
            pids = [hub_pid, b.broker_pid, pub.pid, *(p.pid for p, _ in clients)]
            meter = ingest.Meter(pids)
            for _, rx in clients:
                rx.send(("measure",))
            t0 = time.monotonic()
            time.sleep(a.seconds)
            for _, rx in clients:
                rx.send(("report",))
            reports = [rx.recv() for _, rx in clients]
            span = time.monotonic() - t0
            cpu, others = meter.stop()
            m1 = b.metrics()
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
            rows.append(step_row(n, reports, cpu, others, span, m0, m1, a))
            print(step_line(rows[-1]))
        if spy is not None and a.profile is not None:
            prof = a.profile / "hub-fanout.txt"
            if prof.exists():
                print(f"py-spy of the hub during the last step ({prof}):")
                print("\n".join(summarise_profile(prof)))
        hub_conns = b.metrics().get("vigil_ws_connections", float("nan"))
        for _, rx in clients:
            rx.send(("stop",))
        for _, rx in clients:
            if rx.poll(10):
                rx.recv()
        with contextlib.suppress(Exception):
            pub.terminate()
        del pub_rx
        print(f"total {time.monotonic() - started:.0f}s")
    except BaseException:
        for c in b.children:
            if c.popen.poll() is not None or c.name == "hub":
                print(f"--- {c.name} log tail ---\n{c.tail()}", file=sys.stderr)
        raise
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(5)
        b.close()
    last = rows[-1]
    result = {k: v for k, v in last.items() if not k.startswith("_")}
    result.update(
        hub_ws_connections_at_end=hub_conns,
        ceiling=max((r["clients_held"] for r in rows if r["keeps_up"]), default=0),
        steps=[
            {
                k: r[k]
                for k in (
                    "clients",
                    "clients_held",
                    "p50_ms",
                    "p99_ms",
                    "once_p99_ms",
                    "held_p50_ms",
                    "hub_cpu_pct",
                    "keeps_up",
                )
            }
            for r in rows
        ],
        beds=a.beds,
        units=len(b.units),
        period_s=a.period,
        broker="mosquitto (VIGIL_MQTT_URL)",
        open_files_limit=nofile[0],
        box_busy_before=round(busy, 2),
        load_avg_before=round(load[0], 2),
    )
    print(json.dumps(result))
    return 0


def step_row(
    n: int,
    reports: list[dict[str, Any]],
    cpu: list[float],
    others: float,
    span: float,
    m0: dict[str, float],
    m1: dict[str, float],
    a: argparse.Namespace,
) -> dict[str, Any]:
    h = {k: hist_merge([r["hist"][k] for r in reports]) for k in KINDS}
    counted = ("frames", "vitals", "unclassified", "covered", "superseded", "late")
    tot = {k: sum(r[k] for r in reports) for k in counted}
    closes: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    for r in reports:
        closes.update(r["closes"])
        errors.update(r["errors"])
        failures.update(r["failures"])
    once, held = sum(h["once"]), sum(h["held"])
    accepted = ingest.metric_sum(m1, "vigil_ingest_total") - ingest.metric_sum(m0, "vigil_ingest_total")
    expected = n * (a.beds / a.period) / max(1, math.ceil(a.beds / a.unit_beds)) * span  # messages to clients
    hub_cpu, broker_cpu, pub_cpu, *client_cpu = cpu
    p99 = hist_q(h["all"], 0.99)
    row = {
        "clients": n,
        "clients_held": sum(r["subscribed"] for r in reports),
        "ingest_msgs_per_s": round(accepted / span),
        "p50_ms": hist_q(h["all"], 0.5),
        "p99_ms": p99,
        "max_ms": max((i for i, c in enumerate(h["all"]) if c), default=None),
        "once_p50_ms": hist_q(h["once"], 0.5),
        "once_p99_ms": hist_q(h["once"], 0.99),
        "held_p50_ms": hist_q(h["held"], 0.5),
        "held_p99_ms": hist_q(h["held"], 0.99),
        "rx_p50_ms": hist_q(h["rx"], 0.5),
        "rx_p99_ms": hist_q(h["rx"], 0.99),
        "post_p50_ms": hist_q(h["post"], 0.5),
        "post_p99_ms": hist_q(h["post"], 0.99),
        "unmerged_fraction": round(once / tot["covered"], 3) if tot["covered"] else None,
        "held_fraction": round(held / (once + held), 3) if once + held else None,
        "superseded_fraction": round(tot["superseded"] / tot["covered"], 3) if tot["covered"] else None,
        "vitals_msgs_per_s": round(tot["vitals"] / span),
        "expected_msgs_per_s": round(expected / span),
        "delivered_ratio": round((tot["vitals"] + tot["unclassified"]) / expected, 3) if expected else None,
        "late": tot["late"],
        "hub_cpu_pct": round(hub_cpu / span * 100),
        "mosquitto_cpu_pct": round(broker_cpu / span * 100),
        "publisher_cpu_pct": round(pub_cpu / span * 100),
        "clients_cpu_pct": round(sum(client_cpu) / span * 100),
        "others_box_pct": round(others * 100),
        "closes": dict(closes),
        "errors": dict(errors),
        "connect_failures": dict(failures),
        "_delay_ms": [round(r["delay_ms"], 1) for r in reports],
    }
    # Keeping up: everything delivered (within 2 %), nothing closed, and no backlog (p99 under a second and
    # a half: the merge alone holds a message under a second).
    row["keeps_up"] = bool(
        row["clients_held"] == n
        and not closes
        and p99 == p99
        and p99 <= a.late_ms
        and (row["delivered_ratio"] or 0) >= 0.98
    )
    return row


def step_line(r: dict[str, Any]) -> str:
    return (
        f"  {r['clients']} clients ({r['clients_held']} held): {r['vitals_msgs_per_s']} vitals msgs/s "
        f"received "
        f"(expected {r['expected_msgs_per_s']}), ingest {r['ingest_msgs_per_s']}/s\n"
        f"    newest value publish -> client: p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
        f"max {r['max_ms']} ms; late (> threshold) {r['late']}\n"
        f"    sent at once ({r['unmerged_fraction']} of publishes): p50 {r['once_p50_ms']:.0f} ms, "
        f"p99 {r['once_p99_ms']:.0f} ms | held by the merge ({r['held_fraction']} of messages): "
        f"p50 {r['held_p50_ms']:.0f} ms, p99 {r['held_p99_ms']:.0f} ms | superseded in a window "
        f"{r['superseded_fraction']} of publishes\n"
        f"    publish -> hub receipt p50 {r['rx_p50_ms']:.0f} / p99 {r['rx_p99_ms']:.0f} ms; "
        f"hub receipt -> client p50 {r['post_p50_ms']:.0f} / p99 {r['post_p99_ms']:.0f} ms\n"
        f"    cpu: hub {r['hub_cpu_pct']} %, mosquitto {r['mosquitto_cpu_pct']} %, publisher "
        f"{r['publisher_cpu_pct']} %, clients {r['clients_cpu_pct']} % (of one core); others "
        f"{r['others_box_pct']} % of the box; closes {r['closes'] or 'none'}"
        + (f"; errors {r['errors']}" if r["errors"] else "")
        + ("" if r["keeps_up"] else "  <- NOT KEEPING UP")
    )


if __name__ == "__main__":
    sys.exit(main())
