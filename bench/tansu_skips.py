"""Does a live Kafka reader get every offset while several producers append to one partition?

Starts a throwaway tansu (memory storage, 127.0.0.1, a free port), creates a topic, and has `--producers`
aiokafka producers send `--records` one-record batches each (many in flight, as a worker's small emits),
spread over `--partitions`, while one reader follows the partitions from their beginning. It then counts,
per partition, the offsets the live reader skipped (a jump from n to n + 2 or more) and checks that a
second reader, started afterwards, gets every offset. The skips are what `streams/inturn.py` guards against
(docs/TOPICS.md). The last line is one JSON object.

    .venv/bin/python bench/tansu_skips.py
    .venv/bin/python bench/tansu_skips.py --producers 1 --runs 3     # the baseline: one producer
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from vigil.devstack import tansu_binary

TOPIC = "skips"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _admin(boot: str) -> AIOKafkaAdminClient:
    for _ in range(100):
        admin = AIOKafkaAdminClient(bootstrap_servers=boot)
        try:
            await admin.start()
            return admin
        except Exception:
            await asyncio.sleep(0.1)
    raise SystemExit("tansu did not answer")


async def _read(c: AIOKafkaConsumer, seen: list[tuple[int, int]], total: int, done: asyncio.Event) -> None:
    while len(seen) < total:
        batch = await c.getmany(timeout_ms=100)
        for records in batch.values():
            seen.extend((r.partition, r.offset) for r in records)
        if done.is_set() and not batch:
            return


async def _produce(boot: str, i: int, records: int, partitions: int) -> None:
    p = AIOKafkaProducer(bootstrap_servers=boot, acks="all", linger_ms=2)
    await p.start()
    try:
        pending = []
        for n in range(records):
            batch = p.create_batch()
            batch.append(key=b"k", value=f"{i}-{n}".encode(), timestamp=None)
            pending.append(await p.send_batch(batch, TOPIC, partition=random.randrange(partitions)))
        await asyncio.gather(*pending)
    finally:
        await p.stop()


async def one_run(producers: int, records: int, partitions: int) -> dict[str, int]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once per run, before anything is timed
        [*argv, "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    boot = f"127.0.0.1:{port}"
    total = producers * records
    try:
        admin = await _admin(boot)
        await admin.create_topics([NewTopic(TOPIC, partitions, 1)])
        await admin.close()
        tps = [TopicPartition(TOPIC, n) for n in range(partitions)]
        live = AIOKafkaConsumer(bootstrap_servers=boot, group_id=None, enable_auto_commit=False)
        await live.start()
        live.assign(tps)
        await live.seek_to_beginning(*tps)
        seen: list[tuple[int, int]] = []
        done = asyncio.Event()
        reader = asyncio.create_task(_read(live, seen, total, done))
        await asyncio.gather(*(_produce(boot, i, records, partitions) for i in range(producers)))
        await asyncio.sleep(2)
        done.set()
        await asyncio.wait_for(reader, 30)
        await live.stop()
        skipped = 0
        for part in range(partitions):
            offsets = [o for p, o in seen if p == part]
            skipped += sum(b - a - 1 for a, b in itertools.pairwise(offsets) if b > a + 1)
        later = AIOKafkaConsumer(bootstrap_servers=boot, group_id=None, enable_auto_commit=False)
        await later.start()
        later.assign(tps)
        await later.seek_to_beginning(*tps)
        again: set[tuple[int, int]] = set()
        deadline = time.monotonic() + 10
        while len(again) < total and time.monotonic() < deadline:
            for records_ in (await later.getmany(timeout_ms=200)).values():
                again.update((r.partition, r.offset) for r in records_)
        await later.stop()
        return {"sent": total, "live_got": len(set(seen)), "live_skipped": skipped, "later_got": len(again)}
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--producers", type=int, default=3)
    ap.add_argument("--records", type=int, default=3000, help="one-record batches per producer")
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    runs = []
    for n in range(a.runs):
        r = asyncio.run(one_run(a.producers, a.records, a.partitions))
        print(f"run {n + 1}: {r}", flush=True)
        runs.append(r)
    print(
        json.dumps(
            {
                "producers": a.producers,
                "partitions": a.partitions,
                "runs": a.runs,
                "runs_with_skips": sum(1 for r in runs if r["live_skipped"]),
                "skipped": sum(r["live_skipped"] for r in runs),
                "later_reader_missing": sum(r["sent"] - r["later_got"] for r in runs),
            }
        )
    )


if __name__ == "__main__":
    main()
