"""Alarm latency benchmark: device publish -> `alert` frame on a websocket client, idle and under load.

    /tmp/v/bin/python bench/alarm_latency.py     # defaults: 2,000 background monitors at 1 Hz, 20 trials idle
                                                 # and 20 under load; about 1.5-2.5 minutes

Everything runs on 127.0.0.1 on free ports with a throwaway data dir, torn down even on failure (the
broker, records, hub and publisher of bench/ingest.py and bench/fanout.py):

1. a Mosquitto, the hub (`vigil run`) reaching it through VIGIL_MQTT_URL;
2. `--beds` background monitors (unit BENCH, each bound to its own patient, as in bench/ingest.py), and
   2 x `--trials` trial monitors, each on its own bed of one unit (`ALARM`) with an admitted patient, all
   registered straight into the hub's data dir;
3. one websocket client (admin token) subscribed to `alerts`, in its own process;
4. a trial: 11 obs messages to one fresh trial monitor, SpO2 70 with `ts` one second apart on device time
   and ending at now, written back to back. spo2_critical (SpO2 < 85 % for 10 s of device time) is due at
   the 11th; latency = the client's receipt of the `alert` frame of that bed with that condition - the wall
   time the 11th message was written to the socket. Trials are `--spacing` s apart;
5. first `--trials` trials with nothing else published (idle), then the same with the background
   publisher sending every background bed stable vitals (which raise nothing) once per `--period` s.

The last line on stdout is one JSON object; bench/README.md says how each figure is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import select
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fanout  # bench/fanout.py: token, websocket client
import ingest  # bench/ingest.py: broker, hub, publisher, CPU meters

CONDITION = "spo2_critical"
TRIAL_UNIT = "ALARM"
READINGS = 11  # 10 s of device time at 1 Hz: the on-delay ends at the 11th reading
AIM_P99_MS = 50


def now_ms() -> float:
    return time.time_ns() / 1e6


# ----------------------------------------------------------------------------------------------- client


class AlertClient(fanout.WsClient):
    """fanout.py's minimal websocket client, reporting the first `alert` frame of CONDITION per bed."""

    def __init__(self, port: int, token: str, out: Connection) -> None:
        super().__init__("127.0.0.1", port, token, "alerts", fanout.ClientState(1000, 1500))
        self.out = out
        self.seen: set[str] = set()

    def _message(self, payload: bytes) -> None:
        received = now_ms()
        msg = orjson.loads(payload)
        kind = msg.get("type")
        if kind == "subscribed" and not self.done.done():
            self.done.set_result("subscribed" if msg.get("topics") == ["alerts"] else f"refused: {msg}")
        elif kind == "alert":
            data = msg["data"]
            bed = data.get("bed_id")
            if data.get("condition") == CONDITION and bed and bed not in self.seen:
                self.seen.add(bed)
                self.out.send((bed, received, data.get("status"), data.get("raised_at")))
        elif kind == "error":
            self.out.send(("error", received, str(msg), None))


def client_main(port: int, token: str, out: Connection) -> None:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        uvloop.install()
    asyncio.run(_client(port, token, out))


async def _client(port: int, token: str, out: Connection) -> None:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: AlertClient(port, token, out), "127.0.0.1", port)
    why = await asyncio.wait_for(asyncio.shield(proto.done), 30)
    out.send(("ready", now_ms(), why, None))
    stopped = asyncio.Event()
    loop.add_reader(out.fileno(), stopped.set)  # anything from the bench (or its end) stops the client
    await stopped.wait()
    proto.close()
    await asyncio.sleep(0.2)
    if proto.transport is not None:
        proto.transport.close()


# -------------------------------------------------------------------------------------------- publisher


class TrialPublisher:
    """A raw-socket MQTT 3.1.1 QoS 1 publisher (bench/ingest.py's packets) for the trials' messages."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(*ingest.NODELAY)
        self.sock.sendall(ingest._connect_packet("bench-alarm-trials"))
        connack = b""
        while len(connack) < 4:
            chunk = self.sock.recv(4 - len(connack))
            if not chunk:
                raise ConnectionError("broker closed the connection before CONNACK")
            connack += chunk
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"CONNACK refused: {connack!r}")
        self.pid = 0
        self.acked = 0
        self.pending = 0

    def packet(self, device: str, ts: int, seq: int) -> bytes:
        topic = f"vigil/v1/{device}/obs".encode()
        body = orjson.dumps(
            {
                "ts": ts,
                "seq": seq,
                "boot": "alarm",
                "obs": [{"code": "spo2", "value": 70}, {"code": "hr", "value": 72}],
            }
        )
        self.pid = self.pid % 65535 + 1
        head = len(topic).to_bytes(2, "big") + topic + self.pid.to_bytes(2, "big")
        return b"\x32" + ingest._varint(len(head) + len(body)) + head + body

    def trial(self, device: str) -> float:
        """Publish the trial's 11 readings back to back; returns the wall time (ms) the 11th was written."""
        end = int(now_ms())
        packets = [self.packet(device, end - (READINGS - 1 - i) * 1000, i + 1) for i in range(READINGS)]
        self.sock.sendall(b"".join(packets[:-1]))
        t = now_ms()
        self.sock.sendall(packets[-1])
        return t

    def drain(self) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("broker closed the trial publisher's connection")
            self.pending += len(data)
            self.acked += self.pending // 4
            self.pending %= 4

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")
        self.sock.close()


# ------------------------------------------------------------------------------------------------ bench


class AlarmBench(fanout.Fanout):
    """Background monitors as in ingest.py, plus the trial monitors on beds of one unit."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.trial_beds = [f"{TRIAL_UNIT}-B{i:02d}" for i in range(2 * args.trials)]
        self.trial_devices = [f"amon-{i:02d}" for i in range(2 * args.trials)]

    async def _register(self) -> None:
        # Background monitors as in ingest.py (each bound to its patient: no bed, no admission to write,
        # several times faster to register than fanout.py's beds), then the trial monitors in their beds.
        await ingest.Bench._register(self)
        from records.crypto import SecretCipher  # noqa: PLC0415
        from records.db import Database, sqlite_url  # noqa: PLC0415
        from records.devices import add_device  # noqa: PLC0415

        db = Database(sqlite_url(self.data_dir))
        cipher = SecretCipher.from_data_dir(self.data_dir)
        at = int(now_ms())
        try:
            async with db.session() as session:
                for i, dev in enumerate(self.trial_devices):
                    await add_device(
                        session,
                        cipher,
                        device_id=dev,
                        type="monitor",
                        unit=TRIAL_UNIT,
                        bed=self.trial_beds[i],
                        patient=f"AP-{i:02d}",
                        at=at,
                        actor="bench",
                    )
        finally:
            await db.close()


def run_trials(
    pub: TrialPublisher, rx: Connection, devices: list[str], beds: list[str], a: argparse.Namespace
) -> tuple[list[float], list[str]]:
    """One trial per device, at least `spacing` s apart; each waits up to `wait` s for its alert, then the
    stragglers get up to `drain` s more. Latencies (ms) of the alerts received, sorted; beds never alerted."""
    got: dict[str, float] = {}
    sent: dict[str, float] = {}

    def take(until: float, bed: str | None) -> None:
        while (bed is None or bed not in got) and time.monotonic() < until:
            if not rx.poll(max(0.0, until - time.monotonic())):
                return
            b, received, status, _raised = rx.recv()
            if b == "error":
                print(f"  websocket error frame: {status}")
            got.setdefault(b, received)

    for dev, bed in zip(devices, beds, strict=True):
        t0 = time.monotonic()
        sent[bed] = pub.trial(dev)
        take(t0 + a.wait, bed)
        pub.drain()
        time.sleep(max(0.0, t0 + a.spacing - time.monotonic()))
    end = time.monotonic() + a.drain
    while any(bed not in got for bed in beds) and time.monotonic() < end:
        take(end, next(bed for bed in beds if bed not in got))
    lat = sorted(got[bed] - sent[bed] for bed in beds if bed in got)
    per_trial = " ".join(f"{got[bed] - sent[bed]:.0f}" if bed in got else "-" for bed in beds)
    print(f"  per trial (ms, in order): {per_trial}")
    return lat, [bed for bed in beds if bed not in got]


def hub_log_summary(path: Path) -> list[str]:
    """The hub's JSON log lines counted by (level, logger, message), with the last line of one traceback."""
    seen: dict[tuple[str, str, str], list[Any]] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        key = (str(rec.get("level")), str(rec.get("logger")), str(rec.get("msg"))[:160])
        exc = [x for x in str(rec.get("exc") or "").strip().splitlines() if not x.startswith("(Background")]
        entry = seen.setdefault(key, [0, exc[-1][:200] if exc else ""])
        entry[0] += 1
    return [f"  {n} x {lvl} {logger}: {msg}" + (f" ({exc})" if exc else "")
            for (lvl, logger, msg), (n, exc) in seen.items()]  # fmt: skip


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN or Infinity


def summary(lat: list[float]) -> dict[str, float | None]:
    return {
        "p50_ms": ingest.r1(ingest.percentile(lat, 0.5)),
        "p99_ms": ingest.r1(ingest.percentile(lat, 0.99)),
        "max_ms": ingest.r1(lat[-1]) if lat else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beds", type=int, default=2000, help="background beds, one monitor each")
    ap.add_argument("--period", type=float, default=1.0, help="seconds between two publishes of one bed")
    ap.add_argument("--items", type=int, default=2, choices=range(1, 7), help="vitals per background message")
    ap.add_argument("--trials", type=int, default=20, help="trials per phase (idle, loaded)")
    ap.add_argument("--spacing", type=float, default=0.75, help="seconds from one trial to the next")
    ap.add_argument("--wait", type=float, default=2.0, help="seconds a trial waits for its alert")
    ap.add_argument("--drain", type=float, default=15.0, help="seconds more for late alerts after a phase")
    ap.add_argument("--warmup", type=float, default=5, help="seconds of background load before its trials")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (hub.log, data)")
    a = ap.parse_args(argv)
    a.window = 1000  # publisher's unacknowledged messages (bench/ingest.py)
    a.unit_beds = 20  # fanout.Fanout's units (unused: the background monitors have no beds)
    rate = a.beds / a.period

    def interrupted(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    started = time.monotonic()
    fanout.raise_nofile()
    busy = ingest.box_busy()
    print(f"box: {os.cpu_count()} CPUs, {busy:.0%} busy before the run")
    if busy > 0.1:
        print("WARNING: other processes are using the CPU; the figures below are not reliable")
    b = AlarmBench(a)
    pub: TrialPublisher | None = None
    k = a.trials
    try:
        b.start_broker()
        t = time.monotonic()
        b.register()
        print(f"{a.beds} background monitors (unit BENCH, one patient each), {2 * k} trial monitors in unit "
              f"{TRIAL_UNIT}, registered in {time.monotonic() - t:.1f}s")  # fmt: skip
        t = time.monotonic()
        b.start_hub()
        assert b.hub is not None
        hub_pid = b.hub.popen.pid
        print(f"hub ready (MQTT connected) in {time.monotonic() - t:.1f}s, pid {hub_pid}")
        token = b.token()
        rx, tx = b.ctx.Pipe()
        proc = b.ctx.Process(target=client_main, args=(b.http_port, token, tx), name="ws-alerts", daemon=True)
        proc.start()
        b.procs.append(proc)
        if not rx.poll(30):
            raise RuntimeError("websocket client not subscribed in 30s")
        ready = rx.recv()
        if ready[0] != "ready" or ready[2] != "subscribed":
            raise RuntimeError(f"websocket client: {ready}")
        pub = TrialPublisher(b.broker_port)

        # Idle: nothing but the trials.
        m0 = b.metrics()
        meter = ingest.Meter([hub_pid])
        t = time.monotonic()
        idle, idle_lost = run_trials(pub, rx, b.trial_devices[:k], b.trial_beds[:k], a)
        idle_cpu, idle_others = meter.stop()
        m1 = b.metrics()
        idle_ingest = ingest.histogram_quantile(
            {key: m1[key] - m0.get(key, 0) for key in m1}, "vigil_ingest_latency_seconds", 0.99
        )
        s = summary(idle)
        print(f"idle: {len(idle)} of {k} alarms, publish -> alert frame p50 {s['p50_ms']} ms, "
              f"p99 {s['p99_ms']} ms, max {s['max_ms']} ms; "
              f"hub cpu {idle_cpu[0] / (time.monotonic() - t) * 100:.0f} %, others "
              f"{idle_others:.0%} of the box; ingest latency p99 <= {idle_ingest:g} ms")  # fmt: skip

        # Loaded: the background publisher runs for the rest of the bench.
        bg, _bg_rx = b.run_publisher(int(rate * 3600), rate, "background")
        print(f"background: {rate:.0f} msg/s ({a.beds} beds every {a.period:g}s, {a.items} vitals each, "
              f"QoS 1); warm-up {a.warmup:g}s")  # fmt: skip
        time.sleep(a.warmup)
        m0 = b.metrics()
        meter = ingest.Meter([hub_pid, b.broker_pid, bg.pid])
        t = time.monotonic()
        loaded, loaded_lost = run_trials(pub, rx, b.trial_devices[k:], b.trial_beds[k:], a)
        span = time.monotonic() - t
        cpu, others = meter.stop()
        m1 = b.metrics()
        delta = {key: m1[key] - m0.get(key, 0) for key in m1}
        accepted = ingest.metric_sum(delta, "vigil_ingest_total")
        ingest_p50 = ingest.histogram_quantile(delta, "vigil_ingest_latency_seconds", 0.5)
        ingest_p99 = ingest.histogram_quantile(delta, "vigil_ingest_latency_seconds", 0.99)
        s = summary(loaded)
        print(f"loaded: {len(loaded)} of {k} alarms, publish -> alert frame p50 {s['p50_ms']} ms, p99 "
              f"{s['p99_ms']} ms, max {s['max_ms']} ms; hub ingested {accepted / span:.0f} msg/s (published "
              f"{rate:.0f}); ingest latency (receipt -> stored) p50 <= {ingest_p50:g} ms, "
              f"p99 <= {ingest_p99:g} ms; "
              f"cpu hub {cpu[0] / span * 100:.0f} %, mosquitto {cpu[1] / span * 100:.0f} %, publisher "
              f"{cpu[2] / span * 100:.0f} % (of one core), others {others:.0%} of the box")  # fmt: skip
        assert b.hub is not None
        log_lines = hub_log_summary(b.hub.log)
        if log_lines:
            print("hub.log (warnings and errors over the run):")
            print("\n".join(log_lines))
        with contextlib.suppress(Exception):
            bg.terminate()
        with contextlib.suppress(OSError):
            rx.send("stop")
        proc.join(5)
        print(f"total {time.monotonic() - started:.0f}s")
    except BaseException:
        for c in b.children:
            if c.popen.poll() is not None or c.name == "hub":
                print(f"--- {c.name} log tail ---\n{c.tail()}", file=sys.stderr)
        raise
    finally:
        if pub is not None:
            pub.close()
        b.close()
    result = {
        "background_msgs_per_s": round(rate),
        "ingested_msgs_per_s": round(accepted / span),
        "trials": k,
        **summary(loaded),
        "idle_p50_ms": summary(idle)["p50_ms"],
        "idle_p99_ms": summary(idle)["p99_ms"],
        "idle_max_ms": summary(idle)["max_ms"],
        "aim_p99_ms": AIM_P99_MS,
        "lost": len(loaded_lost),
        "idle_lost": len(idle_lost),
        "ingest_p50_ms": finite(ingest_p50),
        "ingest_p99_ms": finite(ingest_p99),
        "hub_cpu_pct": round(cpu[0] / span * 100),
        "others_box_pct": round(others * 100),
        "box_busy_before": round(busy, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
