"""The scaled runtime end to end on this box: devices -> Mosquitto -> gateway -> Kafka -> worker(s) -> Redis
-> API node -> websocket, with 1 then 2 workers, next to a raw aiokafka baseline on the same tansu.

    .venv/bin/python bench/scaled.py                  # about three minutes on 2 cores
    .venv/bin/python bench/scaled.py --profile /tmp/prof --count 30000

The stack is vigil/devstack.py with one process of each role (tansu, PostgreSQL, Redis, InfluxDB 1.6,
Mosquitto with dynamic security, `vigil gateway`, `vigil worker`, `vigil api`), on free ports in a temp dir
removed at the end; a second worker joins for the second round. Loopback only. The last line is one JSON
object (bench/README.md explains every figure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # Vigil itself (run from anywhere)
import ingest  # bench/ingest.py: the publisher, CPU helpers
from ingest import CLK_TCK, now_ms, payload, percentile

BENCH_USER, BENCH_PW = "bench-pub", "bench-pub-pw-1"
LOAD_UNITS, BEDS_PER_UNIT = 10, 20  # 200 load monitors
PROBES = 100  # monitors in their own unit, each publishing every --probe-period s (never merged)
PROBE_UNIT = "bench-probe"
RAW_TOPIC = "bench.raw.{phase}"
INGEST_TOPIC = "vigil.ingest.v1"


# ------------------------------------------------------------------------------------------ CPU meters


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in one process group (a part and its children)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ...
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


class GroupMeter:
    def __init__(self, groups: dict[str, int]) -> None:
        self.groups = groups
        self.t0 = time.monotonic()
        self.c0 = {n: group_cpu(g) for n, g in groups.items()}

    def stop(self) -> dict[str, float]:
        span = time.monotonic() - self.t0
        return {n: round((group_cpu(g) - self.c0[n]) / span * 100) for n, g in self.groups.items()}


# ---------------------------------------------------------------------------------- raw aiokafka baseline


def raw_consumer_main(bootstrap: str, topic: str, total: int, since: int, ctl: Connection) -> None:
    asyncio.run(_raw_consumer(bootstrap, topic, total, since, ctl))


async def _raw_consumer(bootstrap: str, topic: str, total: int, since: int, ctl: Connection) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: PLC0415

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=100)
    await c.start()
    tps = [TopicPartition(topic, p) for p in range(4)]
    c.assign(tps)
    await c.seek_to_beginning(*tps)
    for tp in tps:
        await c.position(tp)
    ctl.send("ready")
    got, first, last, lat = 0, 0, 0, []
    deadline = time.monotonic() + 120
    while got < total and time.monotonic() < deadline:
        batch = await c.getmany(timeout_ms=200, max_records=5000)
        rx = now_ms()
        for records in batch.values():
            for r in records:
                ts = int(r.value[6:19])
                if ts >= since:
                    lat.append(rx - ts)
                got += 1
        if batch:
            first, last = first or rx, rx
    await c.stop()
    ctl.send({"got": got, "first": first, "last": last, "lat": lat})


def raw_producer_main(bootstrap: str, topic: str, count: int, rate: float, ctl: Connection) -> None:
    asyncio.run(_raw_producer(bootstrap, topic, count, rate, ctl))


async def _raw_producer(bootstrap: str, topic: str, count: int, rate: float, ctl: Connection) -> None:
    """As the gateway's KafkaBus produces: acks=all, linger 2 ms, lz4 when installed, keyed by device."""
    from aiokafka import AIOKafkaProducer  # noqa: PLC0415

    from streams.kafka import _compression  # noqa: PLC0415

    p = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2, compression_type=_compression()
    )
    await p.start()
    devices = ingest.device_ids(LOAD_UNITS * BEDS_PER_UNIT)
    t0 = now_ms()
    start = time.monotonic()
    sent = 0
    while sent < count:
        if rate > 0:
            due = min(count, int((time.monotonic() - start) * rate) + 1)
            if due <= sent:
                await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
                continue
            n = due - sent
        else:
            n = min(1000, count - sent)
        ts = now_ms()
        futs = []
        for _ in range(n):
            d = devices[sent % len(devices)]
            futs.append(await p.send(topic, payload(ts, sent, "raw", 2), key=d.encode()))
            sent += 1
        await asyncio.gather(*futs)
    await p.stop()
    ctl.send({"sent": sent, "t0": t0})


# -------------------------------------------------------------------------------------------- publisher


def publisher_main(
    port: int, devices: list[str], count: int, rate: float, boot: str, window: int, out: Connection
) -> None:
    """bench/ingest.py's raw-socket QoS 1 publisher, logged in as the bench's own Mosquitto client."""

    def connect_packet(client_id: str) -> bytes:
        cid, user, pw = client_id.encode(), BENCH_USER.encode(), BENCH_PW.encode()
        body = b"\x00\x04MQTT\x04\xc2\x00\x00" + len(cid).to_bytes(2, "big") + cid  # clean, user, password
        body += len(user).to_bytes(2, "big") + user + len(pw).to_bytes(2, "big") + pw
        return b"\x10" + ingest._varint(len(body)) + body

    ingest._connect_packet = connect_packet  # this child process only
    ingest.publisher_main(port, devices, count, rate, boot, 2, window, out)


# ---------------------------------------------------------------------------------- websocket observer


def ws_main(url: str, token: str, topics: list[str], since: int, ctl: Connection) -> None:
    asyncio.run(_ws(url, token, topics, since, ctl))


async def _ws(url: str, token: str, topics: list[str], since: int, ctl: Connection) -> None:
    import orjson  # noqa: PLC0415
    import websockets  # noqa: PLC0415
    from fanout import iso_ms  # noqa: PLC0415

    lat: list[int] = []
    post: list[int] = []  # gateway receipt (data.at) -> client
    async with websockets.connect(
        f"ws{url.removeprefix('http')}/ws",
        additional_headers={"Authorization": f"Bearer {token}"},
        max_queue=None,
    ) as ws:
        await ws.send(json.dumps({"op": "subscribe", "topics": topics}))
        ctl.send("ready")
        while not ctl.poll():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.2)
            except TimeoutError:
                continue
            msg = orjson.loads(raw)
            if msg.get("type") != "vitals":
                continue
            rx = now_ms()
            ts = max(iso_ms(v["ts"]) for v in msg["data"]["values"].values())
            if ts >= since:  # not the latest state of an earlier phase
                lat.append(rx - ts)
                post.append(rx - iso_ms(msg["data"]["at"]))
    ctl.recv()
    ctl.send({"lat": lat, "post": post})


# ------------------------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        from vigil.devstack import DevStack  # noqa: PLC0415

        self.a = a
        self.ctx = mp.get_context("spawn")
        self.stack = DevStack(a.keep, nodes=1, admin_password="bench-admin-pw")
        self.stack.env_extra.update(dict(kv.split("=", 1) for kv in a.env))
        self.extra_workers: list[str] = []
        self.load = ingest.device_ids(LOAD_UNITS * BEDS_PER_UNIT)
        self.probes = [f"bench-probe-{i:03d}" for i in range(PROBES)]
        self.procs: list[Any] = []

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.stack.ports['tansu']}"

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for name in self.extra_workers:
            self.stack.parts[name].stop()
        self.stack.stop()

    def start(self) -> None:
        self.stack.start()
        self._mosquitto_client()
        asyncio.run(self._register())

    def _mosquitto_client(self) -> None:
        """A Mosquitto client that may publish as any device (Vigil leaves dynsec clients it did not make)."""
        from vigil.devstack import MQTT_ADMIN, find_binary  # noqa: PLC0415

        base = [find_binary("mosquitto_ctrl"), "-h", "127.0.0.1", "-p", str(self.stack.mqtt_port)]
        base += ["-u", MQTT_ADMIN, "-P", self.stack._secrets["mqtt_admin_password"], "dynsec"]
        for args in (
            ["createRole", BENCH_USER],
            ["addRoleACL", BENCH_USER, "publishClientSend", "vigil/v1/#", "allow"],
            ["createClient", BENCH_USER, "-p", BENCH_PW],
            ["addClientRole", BENCH_USER, BENCH_USER],
        ):
            subprocess.run([*base, *args], check=True, capture_output=True, timeout=30)

    async def _register(self) -> None:
        from records.crypto import SecretCipher  # noqa: PLC0415
        from records.db import Database  # noqa: PLC0415
        from records.devices import add_device  # noqa: PLC0415

        os.environ["VIGIL_SECRET_KEY"] = self.stack._secrets["secret_key"]
        db = Database(self.stack.database_url)
        cipher = SecretCipher.from_data_dir(self.stack.root / "operator")
        at = now_ms()
        try:
            async with db.session() as session:  # one transaction for the whole fleet
                for i, dev in enumerate(self.load + self.probes):
                    unit = f"bench-u{i // BEDS_PER_UNIT:02d}" if i < len(self.load) else PROBE_UNIT
                    await add_device(
                        session, cipher, device_id=dev, type="monitor", unit=unit,
                        bed=f"{unit}-b{i:04d}", patient=f"BP-{i:04d}", at=at, actor="bench",
                    )  # fmt: skip
        finally:
            await db.close()

    def add_worker(self) -> str:
        """A second `vigil worker` joins the consumer group (devstack's own role definition)."""
        from vigil.devstack import free_port  # noqa: PLC0415

        name = f"worker{2 + len(self.extra_workers)}"
        self.stack.ports[name] = free_port()
        self.stack._define_role("worker", 2, name, self.stack.root / "logs")
        self.stack._start_part(name)
        self.extra_workers.append(name)
        return name

    def groups(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.stack.parts.items() if p.pid is not None and p.running()}

    def metric(self, part: str, name: str) -> float:
        with urllib.request.urlopen(f"{self.stack.url(part)}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")
        )

    def workers(self) -> list[str]:
        return ["worker1", *self.extra_workers]

    def wait_workers_share(self, timeout: float = 60) -> float:
        """Until every worker steps events (ticks reach every partition each second): the group settled."""
        t = time.monotonic()
        before = {w: self.metric(w, "vigil_worker_events_total") for w in self.workers()}
        while time.monotonic() - t < timeout:
            time.sleep(1)
            now = {w: self.metric(w, "vigil_worker_events_total") for w in self.workers()}
            if all(now[w] > before[w] for w in self.workers()):
                return time.monotonic() - t
            before = now
        raise RuntimeError("the workers did not all get partitions")

    def live_len(self) -> int:
        import redis  # noqa: PLC0415

        r = redis.Redis.from_url(self.stack.redis_url)
        try:
            return int(r.xlen("vigil:live:default"))
        finally:
            r.close()

    def publish(self, devices: list[str], count: int, rate: float, boot: str) -> tuple[Any, Connection]:
        rx, tx = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(
            target=publisher_main,
            args=(self.stack.mqtt_port, devices, count, rate, boot, 1000, tx),
            daemon=True,
        )
        p.start()
        self.procs.append(p)
        return p, rx

    # ---- phases

    def raw(self, phase: str, count: int, rate: float) -> dict[str, Any]:
        from streams.kafka import ensure_topics  # noqa: PLC0415

        topic = RAW_TOPIC.format(phase=phase)
        asyncio.run(ensure_topics(self.bootstrap, {topic: 4}))
        since = now_ms()
        crx, ctx_ = self.ctx.Pipe()
        cons = self.ctx.Process(target=raw_consumer_main, args=(self.bootstrap, topic, count, since, ctx_))
        cons.start()
        self.procs.append(cons)
        assert crx.recv() == "ready"
        prx, ptx = self.ctx.Pipe(duplex=False)
        prod = self.ctx.Process(target=raw_producer_main, args=(self.bootstrap, topic, count, rate, ptx))
        meter = GroupMeter({"tansu": self.stack.parts["tansu"].pid or 0})
        prod.start()
        self.procs.append(prod)
        sent = prx.recv()
        got = crx.recv()
        cpu = meter.stop()
        lat = sorted(got["lat"])
        span = max(1, got["last"] - sent["t0"])
        return {
            "msgs_per_s": round(got["got"] / span * 1000),
            "got": got["got"],
            "sent": sent["sent"],
            "p50_ms": percentile(lat, 0.5),
            "p99_ms": percentile(lat, 0.99),
            "tansu_cpu_pct": cpu["tansu"],
        }

    def flood(self, boot: str) -> dict[str, Any]:
        a = self.a
        base = self.live_len()
        meter = GroupMeter(self.groups())
        pub, rx = self.publish(self.load, a.count, 0, boot)
        spy = self._spy(boot) if a.profile else None
        deadline = time.monotonic() + a.limit
        seen, t_last = base, now_ms()
        while time.monotonic() < deadline:
            n = self.live_len()
            if n > seen:
                seen, t_last = n, now_ms()
            if seen - base >= a.count:
                break
            time.sleep(0.05)
        cpu = meter.stop()
        self._unspy(spy)
        sent = rx.recv() if rx.poll(60) else {"sent": 0, "t0": 0}
        pub.join(10)
        done = seen - base
        return {
            "msgs_per_s": round(done / max(1, t_last - sent["t0"]) * 1000),
            "delivered": done,
            "sent": sent["sent"],
            "cpu_pct": cpu,
        }

    def drain(self, boot: str) -> dict[str, Any]:
        """The workers alone: with them stopped, the gateway puts a flood into Kafka; then they start on the
        backlog, timed from the first live record they produce to the last (their start-up and the group's
        rebalance are not counted). What one worker can take, whatever feeds it."""
        a = self.a
        workers = self.workers()
        for w in workers:
            self.stack.parts[w].stop()
        ingest_metric = f'vigil_kafka_records_total{{topic="{INGEST_TOPIC}"}}'
        before = self.metric("gateway1", ingest_metric)
        pub, rx = self.publish(self.load, a.count, 0, boot)
        sent = rx.recv() if rx.poll(a.limit + 60) else {"sent": 0, "t0": 0}
        pub.join(10)
        deadline = time.monotonic() + a.limit
        while self.metric("gateway1", ingest_metric) - before < sent["sent"] and time.monotonic() < deadline:
            time.sleep(0.1)
        backlog = round(self.metric("gateway1", ingest_metric) - before)
        base = self.live_len()
        for w in workers:
            self.stack._start_part(w)
        # Fresh processes: their counters start at 0, so what they show at the end is this drain's.
        meter: GroupMeter | None = None
        spy: list[subprocess.Popen[bytes]] | None = None
        first = last = 0.0
        seen = base
        deadline = time.monotonic() + a.limit + 60
        while time.monotonic() < deadline and seen - base < backlog:
            n = self.live_len()
            if n > seen:
                if seen == base:
                    first = time.monotonic()
                    meter = GroupMeter(self.groups())
                    spy = self._spy(boot) if a.profile else None
                seen, last = n, time.monotonic()
            time.sleep(0.02)
        cpu = meter.stop() if meter is not None else {}
        self._unspy(spy)
        done = seen - base
        per_batch: dict[str, float] = {}
        for proc in ("device", "clinical"):
            label = f'{{processor="{proc}"}}'
            events = sum(self.metric(w, f"vigil_worker_events_total{label}") for w in workers)
            batches = sum(self.metric(w, f"vigil_worker_batches_total{label}") for w in workers)
            per_batch[proc] = round(events / max(1.0, batches), 1)
        return {
            "msgs_per_s": round(done / max(0.001, last - first)),
            "backlog": backlog,
            "drained": done,
            "events_per_partition_batch": per_batch,
            "cpu_pct": cpu,
        }

    def paced(self, boot: str) -> dict[str, Any]:
        a = self.a
        token = self._token()
        since = now_ms()
        wrx, wtx = self.ctx.Pipe()
        ws = self.ctx.Process(
            target=ws_main,
            args=(self.stack.api_urls[0], token, [f"unit:{PROBE_UNIT}"], since, wtx),
            daemon=True,
        )
        ws.start()
        self.procs.append(ws)
        assert wrx.recv() == "ready"
        probe_rate = PROBES / a.probe_period
        load_rate = max(0.0, a.rate - probe_rate)
        base = self.live_len()
        meter = GroupMeter(self.groups())
        t0 = time.monotonic()
        pubs = [
            self.publish(self.load, int(load_rate * a.seconds), load_rate, boot + "l"),
            self.publish(self.probes, int(probe_rate * a.seconds), probe_rate, boot + "p"),
        ]
        for _, rx in pubs:
            rx.recv() if rx.poll(a.seconds + 60) else None
        span = time.monotonic() - t0
        cpu = meter.stop()
        time.sleep(2)  # the last messages through the pipeline
        wrx.send("stop")
        got = wrx.recv() if wrx.poll(20) else {"lat": [], "post": []}
        lat, post = sorted(got["lat"]), sorted(got["post"])
        done = self.live_len() - base
        return {
            "rate": round(a.rate),
            "msgs_per_s": round(done / span),
            "ws_p50_ms": percentile(lat, 0.5),
            "ws_p99_ms": percentile(lat, 0.99),
            "ws_post_p50_ms": percentile(post, 0.5),
            "ws_post_p99_ms": percentile(post, 0.99),
            "ws_samples": len(lat),
            "cpu_pct": cpu,
        }

    def _token(self) -> str:
        req = urllib.request.Request(
            f"{self.stack.api_urls[0]}/api/v1/auth/token",
            data=json.dumps({"username": "admin", "password": "bench-admin-pw"}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return str(json.load(r)["access_token"])

    def _spy(self, boot: str) -> list[subprocess.Popen[bytes]]:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(pyspy).exists():
            print("py-spy is not installed: no profile")
            return []
        self.a.profile.mkdir(parents=True, exist_ok=True)
        out = []
        for name in ("gateway1", *self.workers()):
            pid = self.stack.parts[name].pid
            argv = [pyspy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--nonblocking"]
            argv += ["--idle"] if self.a.profile_idle else []
            argv += ["-o", str(self.a.profile / f"{boot}-{name}.txt")]
            out.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return out

    @staticmethod
    def _unspy(spies: list[subprocess.Popen[bytes]] | None) -> None:
        for s in spies or []:
            s.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.wait(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=30000, help="messages in each flood")
    ap.add_argument("--rate", type=float, default=500, help="msg/s of the paced (latency) phase")
    ap.add_argument("--seconds", type=float, default=12, help="length of the paced phase")
    ap.add_argument("--probe-period", type=float, default=1.25, help="s between two messages of a probe bed")
    ap.add_argument("--limit", type=float, default=60, help="s a flood may take before it is cut off")
    ap.add_argument("--workers", default="1,2", help="worker counts, in order (1,2)")
    ap.add_argument("--profile", type=Path, help="dir: py-spy the gateway and workers during each flood")
    ap.add_argument("--keep", type=Path, help="dir: the stack's data and logs, kept after the run")
    ap.add_argument("--profile-idle", action="store_true", help="the profile counts waiting threads too")
    ap.add_argument("--env", action="append", default=[], help="K=V for every Vigil process (repeatable)")
    ap.add_argument("--phases", default="flood,drain,paced", help="which phases of each round, in order")
    a = ap.parse_args(argv)

    def interrupted(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    busy = ingest.box_busy()
    print(f"box: {os.cpu_count()} CPUs, {busy:.0%} busy before the run")
    if busy > 0.1:
        print("WARNING: other processes are using the CPU; the figures below are not reliable")
    b = Bench(a)
    result: dict[str, Any] = {}
    try:
        t = time.monotonic()
        b.start()
        print(
            f"stack up and {len(b.load) + len(b.probes)} monitors registered in {time.monotonic() - t:.0f}s"
        )
        raw_flood = b.raw("flood", a.count, 0)
        print(f"raw aiokafka flood: {raw_flood}")
        raw_paced = b.raw("paced", int(a.rate * a.seconds), a.rate)
        print(f"raw aiokafka paced at {a.rate:.0f}/s: {raw_paced}")
        rounds: list[dict[str, Any]] = []
        for n in [int(x) for x in a.workers.split(",")]:
            while len(b.workers()) < n:
                print(f"adding {b.add_worker()}")
            print(f"{n} worker(s): group settled in {b.wait_workers_share():.0f}s")
            time.sleep(2)
            phases = a.phases.split(",")
            fl = b.flood(f"f{n}") if "flood" in phases else {}
            print(f"  flood: {fl}")
            dr = b.drain(f"d{n}") if "drain" in phases else {}
            print(f"  drain (workers alone, on a backlog): {dr}")
            if dr:
                print(f"  group settled again in {b.wait_workers_share():.0f}s")
            pc = b.paced(f"p{n}") if "paced" in phases else {}
            print(f"  paced: {pc}")
            rounds.append({"workers": n, "flood": fl, "drain": dr, "paced": pc})
        by: dict[int, dict[str, Any]] = {r["workers"]: r for r in rounds}
        result = {
            "msgs_per_s_1w": by.get(1, {}).get("flood", {}).get("msgs_per_s"),
            "msgs_per_s_2w": by.get(2, {}).get("flood", {}).get("msgs_per_s"),
            "drain_msgs_per_s_1w": by.get(1, {}).get("drain", {}).get("msgs_per_s"),
            "drain_msgs_per_s_2w": by.get(2, {}).get("drain", {}).get("msgs_per_s"),
            "raw_msgs_per_s": raw_flood["msgs_per_s"],
            "ws_p50_ms_1w": by.get(1, {}).get("paced", {}).get("ws_p50_ms"),
            "ws_p99_ms_1w": by.get(1, {}).get("paced", {}).get("ws_p99_ms"),
            "ws_p50_ms_2w": by.get(2, {}).get("paced", {}).get("ws_p50_ms"),
            "ws_p99_ms_2w": by.get(2, {}).get("paced", {}).get("ws_p99_ms"),
            "raw_p50_ms": raw_paced["p50_ms"],
            "raw_p99_ms": raw_paced["p99_ms"],
            "paced_rate": a.rate,
            "rounds": rounds,
            "raw": {"flood": raw_flood, "paced": raw_paced},
            "box_busy_before": round(busy, 2),
            "seconds": round(time.monotonic() - started),
        }
    except BaseException:
        print(b.stack.tails(20), file=sys.stderr)
        raise
    finally:
        b.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
