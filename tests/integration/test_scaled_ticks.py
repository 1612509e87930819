"""The scaled runtime's gateways drive timers and follow admissions at once (tests/scaled_hub.py stack).

- Ticks: each `vigil gateway` appends a Tick to every partition of the ticked topics each second, so the
  workers' device stage reports a silent monitor offline on `vigil.clinical.v1`, and online again when it
  speaks.
- Admissions: a reading a device publishes right after `PUT /api/v1/beds/{bed}/patient` answered is
  attributed to the new patient (gateway/admissions.py), never to the previous one.

Both read `vigil.clinical.v1` straight from Kafka with aiokafka (from its beginning; each test matches its own
device's records).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aiomqtt
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import select

from records.db import Database
from records.state_models import ProcessorOffset, ProcessorState
from streams import topics
from streams.inturn import InTurn
from streams.processors.device import OFFLINE_AFTER_MS, DeviceStage
from streams.schemas import DeviceLiveness, Event, Observations, decode
from tests.scaled_hub import ScaledHub
from tests.servers_kafka import getmany_in_turn
from vigil.worker import SKIP_EVERY_ENV

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaledHub]:
    # Every worker withholds the first delivery of every 3rd event record, as a consumer that skipped one
    # would (faust can, around a rebalance): each test below still counts every event it sent.
    h = ScaledHub(tmp_path_factory.mktemp("scaled-ticks") / "hub", env_extra={SKIP_EVERY_ENV: "3"})
    h.start()
    try:
        yield h
    finally:
        h.stop()


class Clinical:
    """`vigil.clinical.v1` from its beginning, decoded, no record skipped (`getmany_in_turn`)."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._c = consumer
        self._turn: InTurn[TopicPartition] = InTurn()
        self.seen: list[Event] = []

    async def until(self, predicate: Callable[[Event], bool], timeout: float) -> Event:
        deadline = time.monotonic() + timeout
        for ev in self.seen:
            if predicate(ev):
                return ev
        while time.monotonic() < deadline:
            for r in await getmany_in_turn(self._c, self._turn):
                ev = decode(r.value)
                self.seen.append(ev)
                if predicate(ev):
                    return ev
        raise AssertionError(f"nothing matched within {timeout}s; saw {len(self.seen)} records")


@contextlib.asynccontextmanager
async def from_beginning(hub: ScaledHub, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of every partition of `topic` from its beginning (a few hundred records: this module's own
    stack), not from its end: nothing then depends on the broker's answer to ListOffsets, which tansu is
    known to get wrong."""
    c = AIOKafkaConsumer(bootstrap_servers=hub.s.kafka_url.split("://", 1)[1], group_id=None)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(topics.PARTITIONS[topic])]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def clinical(hub: ScaledHub) -> AsyncIterator[Clinical]:
    async with from_beginning(hub, topics.CLINICAL) as c:
        yield Clinical(c)


async def _ingested(hub: ScaledHub, device_id: str) -> list[tuple[int, int, str]]:
    """(partition, offset, event id) of the device's records on the ingest topic."""
    found: list[tuple[int, int, str]] = []
    async with from_beginning(hub, topics.INGEST) as c:
        turn: InTurn[TopicPartition] = InTurn()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for r in await getmany_in_turn(c, turn, 300):
                ev = decode(r.value)
                if isinstance(ev, Observations) and ev.meta.device_id == device_id:
                    found.append((r.partition, r.offset, ev.meta.event_id))
    return sorted(found)


async def _on_clinical(hub: ScaledHub, device_id: str) -> list[tuple[int, int, str]]:
    """(partition, offset, event id) of the device's observations on the clinical topic, by a fresh reader."""
    found: list[tuple[int, int, str]] = []
    async with from_beginning(hub, topics.CLINICAL) as c:
        turn: InTurn[TopicPartition] = InTurn()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for r in await getmany_in_turn(c, turn, 300):
                ev = decode(r.value)
                if isinstance(ev, Observations) and ev.meta.device_id == device_id:
                    found.append((r.partition, r.offset, ev.meta.event_id))
    return sorted(found)


async def _device_stage_state(hub: ScaledHub, device_id: str) -> str:
    """What the device stage holds of the device (the event ids it stepped) and its applied offsets."""
    db = Database(hub.s.database_url)
    try:
        async with db.session(read_only=True) as s:
            raw = await s.scalar(
                select(ProcessorState.value).where(
                    ProcessorState.namespace == "device", ProcessorState.key == device_id
                )
            )
            offsets = (
                await s.execute(
                    select(ProcessorOffset.partition, ProcessorOffset.offset).where(
                        ProcessorOffset.topic == topics.INGEST
                    )
                )
            ).all()
    finally:
        await db.close()
    st = DeviceStage().decode_state(bytes(raw)) if raw is not None else None
    stepped = None if st is None else (sorted(st.seen), st.seqs)
    return f"device stage stepped {stepped}; applied ingest offsets {sorted(tuple(o) for o in offsets)}"


def device_client(hub: ScaledHub, device_id: str, secret: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1", hub.mqtt_port, identifier=device_id, username=device_id, password=secret
    )


def obs(seq: int, value: float, boot: str) -> bytes:
    return json.dumps({"seq": seq, "boot": boot, "obs": [{"code": "hr", "value": value}]}).encode()


def liveness(device_id: str, online: bool) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, DeviceLiveness) and e.device_id == device_id and e.online is online


async def test_a_silent_monitor_is_reported_offline_then_online_again(
    hub: ScaledHub, clinical: Clinical
) -> None:
    out = await asyncio.to_thread(
        hub.add_device, "tick-mon-1", "monitor", "--unit", "tick-icu", "--bed", "tick-1", "--patient", "PT-1"
    )
    topic = "vigil/v1/tick-mon-1/obs"
    async with device_client(hub, "tick-mon-1", str(out["secret"])) as dev:
        for seq in (1, 2, 3):
            await dev.publish(topic, obs(seq, 70 + seq, "ticks"), qos=1)
        await clinical.until(
            lambda e: isinstance(e, Observations) and e.meta.event_id.endswith("/ticks/3"), 30
        )
        silent_since = time.monotonic()
        # Timeout 10 s, a tick each second; the first batch of a fresh stack may wait for faust to settle.
        off = await clinical.until(liveness("tick-mon-1", False), 30)
        took = time.monotonic() - silent_since
        assert isinstance(off, DeviceLiveness)
        assert off.patient_id == "PT-1" and off.bed_id == "tick-1"
        assert off.at - off.last_received_at >= OFFLINE_AFTER_MS["monitor"]
        assert took < 15, f"offline reported {took:.1f}s after the last message"

        await dev.publish(topic, obs(4, 75, "ticks"), qos=1)
        on = await clinical.until(liveness("tick-mon-1", True), 30)
        assert isinstance(on, DeviceLiveness) and on.at > off.at


async def test_a_reading_right_after_an_admission_change_goes_to_the_new_patient(
    hub: ScaledHub, clinical: Clinical
) -> None:
    out = await asyncio.to_thread(
        hub.add_device, "adm-mon-1", "monitor", "--unit", "adm-icu", "--bed", "adm-1", "--patient", "PA-0"
    )
    topic = "vigil/v1/adm-mon-1/obs"
    expected: dict[int, str] = {}
    async with device_client(hub, "adm-mon-1", str(out["secret"])) as dev:
        await dev.publish(topic, obs(1, 60, "adm"), qos=1)
        expected[1] = "PA-0"
        for i in range(1, 6):  # each admission change, then a reading at once over a live connection
            patient = f"PA-{i}"
            r = await asyncio.to_thread(
                hub.api, "PUT", "/api/v1/beds/adm-1/patient", json={"patient_id": patient}
            )
            assert r.status_code == 200, r.text
            await dev.publish(topic, obs(i + 1, 60 + i, "adm"), qos=1)
            expected[i + 1] = patient
            # The device's PUBACK comes from Mosquitto, not from Vigil: wait until the gateway has the
            # reading before the next change, or it may rightly be stamped with a later admission.
            seq_id = f"adm-mon-1/obs/adm/{i + 1}"
            await clinical.until(lambda e, k=seq_id: isinstance(e, Observations) and e.meta.event_id == k, 30)

    # Each patient is its own clinical key, so the readings land on different partitions: wait for all.
    wanted = {f"adm-mon-1/obs/adm/{seq}" for seq in expected}

    def all_seen(_: object) -> bool:
        seen = {e.meta.event_id for e in clinical.seen if isinstance(e, Observations)}
        return wanted <= seen

    try:
        await clinical.until(all_seen, 30)
    except AssertionError:
        seen = {e.meta.event_id for e in clinical.seen if isinstance(e, Observations)}
        counters = [
            f"{proc}: {line}"
            for proc in hub.vigil_processes()
            for line in httpx.get(f"{hub.s.url(proc)}/metrics", timeout=5).text.splitlines()
            if line.startswith(
                ("vigil_deadletter_total", "vigil_ingest_total", "vigil_duplicates_total", "vigil_worker_")
            )
            and not line.startswith("vigil_worker_batches")
        ]
        counters.append(f"on {topics.INGEST}: {await _ingested(hub, 'adm-mon-1')}")
        counters.append(f"on {topics.CLINICAL}, read again: {await _on_clinical(hub, 'adm-mon-1')}")
        counters.append(f"in PostgreSQL: {await _device_stage_state(hub, 'adm-mon-1')}")
        raise AssertionError(
            f"never on {topics.CLINICAL}: {sorted(wanted - seen)}; counters: {counters}"
        ) from None
    got = {
        e.meta.seq: e.meta.patient_id
        for e in clinical.seen
        if isinstance(e, Observations) and e.meta.device_id == "adm-mon-1" and e.meta.seq is not None
    }
    assert got == expected
    rewinds = sum(hub.metric("vigil_worker_rewinds_total", processor=p) for p in ("device", "clinical"))
    assert rewinds > 0, "the workers' consumers were meant to skip records"
