"""`vigil gateway` end to end: Mosquitto (dynamic security, as shipped) in, Kafka (tansu) out, PostgreSQL.

Devices publish with mosquitto_pub, as real ones would; what the gateways wrote is read back from Kafka with
an aiokafka consumer. The gateway's own PUBACK to Mosquitto is what "acknowledged" means here: a message is
only acknowledged once Kafka holds it, which the broker-down tests check through Mosquitto's redelivery.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from streams import topics
from streams.schemas import DeadLetter, Observations, decode
from tests.servers import DynsecMosquitto, Proc, dynsec_mosquitto, free_port, require, wait_port
from tests.servers_kafka import Tansu, consume, tansu
from tests.servers_pg import postgres

pytestmark = pytest.mark.integration

VIGIL = str(Path(sys.executable).with_name("vigil"))
ADMIN, ADMIN_PW = "vigil-admin", "admin-pw-1"


@dataclass
class Gateway:
    """One `vigil gateway` process; `start()` again keeps its ports and MQTT client id (its session)."""

    name: str
    dir: Path
    base_env: dict[str, str]
    http_port: int = field(default_factory=free_port)
    coap_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    coaps_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def env(self) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(
            VIGIL_HTTP_PORT=str(self.http_port),
            VIGIL_COAP_PORT=str(self.coap_port),
            VIGIL_COAPS_PORT=str(self.coaps_port),
            VIGIL_DATA_DIR=str(self.dir / "var"),
            VIGIL_MQTT_CLIENT_ID=f"vigil-test-{self.name}",
        )
        return env

    def start(self, timeout: float = 30.0) -> Gateway:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc([VIGIL, "gateway"], self.dir / "gateway.log", env=self.env()).start()
        try:
            wait_port(self.http_port, timeout=timeout, proc=self.proc.popen)
            wait_until(lambda: self.ready()[0] == 200, timeout, "gateway ready", self)
        except Exception as exc:
            raise RuntimeError(f"gateway {self.name} did not start: {exc}\n{self.proc.tail()}") from exc
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop(signal.SIGTERM, timeout=15)

    def kill9(self) -> None:
        if self.proc:
            self.proc.kill9()

    def ready(self) -> tuple[int, dict[str, Any]]:
        try:
            r = httpx.get(f"{self.url}/readyz", timeout=5)
        except httpx.HTTPError:
            return 0, {}
        return r.status_code, r.json()

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            sample, _, lbl = key.partition("{")
            got = ",".join(sorted(lbl.rstrip("}").split(","))) if lbl else ""
            if sample == name and got == want:
                return float(value)
        return 0.0


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, gw: Gateway | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tail = gw.proc.tail() if gw and gw.proc else ""
    raise AssertionError(f"{what}: not within {timeout}s\n{tail}")


@dataclass
class Setup:
    kafka: Tansu
    broker: DynsecMosquitto
    env: dict[str, str]
    gw: Gateway
    tmp: Path
    secrets: dict[str, str]


def cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = subprocess.run([VIGIL, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("scaled-gateway")
    broker = dynsec_mosquitto(tmp, ADMIN, ADMIN_PW)
    with postgres() as pg, tansu(tmp / "tansu") as kafka:
        broker.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
        env.update(
            VIGIL_HOST="127.0.0.1",
            VIGIL_KAFKA_URL=kafka.url,
            VIGIL_DATABASE_URL=pg.create_database("vigil_gateway"),
            VIGIL_MQTT_URL=f"mqtt://{ADMIN}:{ADMIN_PW}@127.0.0.1:{broker.port}",
            VIGIL_SECRET_KEY=Fernet.generate_key().decode(),  # every scaled process shares the key
            VIGIL_DATA_DIR=str(tmp / "operator"),
            VIGIL_LOG_LEVEL="INFO",
        )
        secrets = {}
        for n in (1, 2, 3):
            argv = ["devices", "add", f"mon-{n}", "--type", "monitor", "--unit", "icu", "--bed", f"b-{n}"]
            secrets[f"mon-{n}"] = cli(env, *argv, "--patient", f"P-{n}")["secret"]
        gw = Gateway("a", tmp / "gw-a", env)
        try:
            gw.start()
            yield Setup(kafka, broker, env, gw, tmp, secrets)
        finally:
            gw.stop()
            broker.stop()


def pub(s: Setup, device: str, lines: list[str], kind: str = "obs") -> subprocess.CompletedProcess[str]:
    """Publish each line as one QoS 1 message, in one connection, as the device."""
    return subprocess.run(
        [
            *(require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(s.broker.port)),
            *("-u", device, "-P", s.secrets[device], "-i", f"{device}-pub", "-q", "1"),
            *("-t", f"vigil/v1/{device}/{kind}", "-l"),
        ],
        input="".join(line + "\n" for line in lines),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def publish_when_allowed(s: Setup, device: str, lines: list[str]) -> None:
    """Retry until Mosquitto knows the device (a gateway syncs the registry every second)."""
    deadline = time.monotonic() + 15
    while True:
        r = pub(s, device, lines)
        if r.returncode == 0:
            return
        assert "not authori" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
        if time.monotonic() > deadline:
            raise AssertionError(f"{device} still refused by Mosquitto\n{s.gw.proc and s.gw.proc.tail()}")
        time.sleep(0.2)


def obs(seq: int, hr: float) -> str:
    return json.dumps({"seq": seq, "boot": "b1", "obs": [{"code": "hr", "value": hr}]})


def read(s: Setup, topic: str, match: Callable[[Any], bool], want: int, settle: float = 0.5) -> list[Any]:
    """The records of `topic` that `match`, once `want` of them are there (and `settle` s more)."""

    def enough(records: list[Any]) -> bool:
        return sum(1 for r in records if match(r)) >= want

    records = asyncio.run(consume(s.kafka.bootstrap, topic, until=enough, timeout=15, settle=settle))
    return [r for r in records if match(r)]


def obs_of(device: str, seqs: set[int] | None = None) -> Callable[[Any], bool]:
    def match(r: Any) -> bool:
        if r.key != device.encode():
            return False
        ev = decode(r.value)
        return isinstance(ev, Observations) and (seqs is None or ev.meta.seq in seqs)

    return match


# ------------------------------------------------------------------------------------------------ tests


def test_gateway_refuses_to_start_without_kafka(setup: Setup) -> None:
    env = {k: v for k, v in setup.env.items() if k != "VIGIL_KAFKA_URL"}
    r = subprocess.run([VIGIL, "gateway"], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode != 0
    assert "VIGIL_KAFKA_URL" in r.stderr.strip().splitlines()[-1]


def test_an_obs_lands_on_the_ingest_topic_keyed_by_device_attributed_to_its_patient(setup: Setup) -> None:
    publish_when_allowed(setup, "mon-1", [obs(1, 72)])
    [rec] = read(setup, topics.INGEST, obs_of("mon-1", {1}), 1)
    ev = decode(rec.value)
    assert isinstance(ev, Observations)
    assert rec.key == b"mon-1"
    assert ev.meta.device_id == "mon-1"
    assert ev.meta.transport == "mqtt"
    assert ev.meta.patient_id == "P-1"
    assert [(i.code, i.value) for i in ev.items] == [("MDC_ECG_HEART_RATE", 72)]
    assert rec.value.startswith(b'{"_s":"obs","_v":1,')  # schema name and version inside every record


def test_a_malformed_payload_is_dead_lettered_on_kafka(setup: Setup) -> None:
    publish_when_allowed(setup, "mon-1", ["{not json"])

    def match(r: Any) -> bool:
        ev = decode(r.value)
        return r.key == b"mon-1" and isinstance(ev, DeadLetter) and ev.reason == "malformed"

    [rec] = read(setup, topics.DEADLETTERS, match, 1)
    dl = decode(rec.value)
    assert isinstance(dl, DeadLetter)
    assert dl.transport == "mqtt" and dl.device_id == "mon-1" and dl.kind == "obs"
    assert setup.gw.metric("vigil_deadletter_total", reason="malformed") >= 1


def test_health_readiness_and_metrics(setup: Setup) -> None:
    gw = setup.gw
    assert httpx.get(f"{gw.url}/healthz").json() == {"status": "ok"}
    assert gw.ready() == (200, {"status": "ready"})
    assert gw.metric("vigil_ingest_total", transport="mqtt", kind="obs") >= 1
    assert gw.metric("vigil_kafka_records_total", topic=topics.INGEST) >= 1


def test_a_hung_kafka_holds_the_puback_and_the_message_lands_once_it_answers(setup: Setup) -> None:
    gw = setup.gw
    held = gw.metric("vigil_gateway_held_total")
    publish_when_allowed(setup, "mon-3", [obs(1, 61)])
    read(setup, topics.INGEST, obs_of("mon-3", {1}), 1)
    setup.kafka.freeze()  # a broker that answers nothing
    try:
        # Mosquitto acknowledges the device; the gateway cannot make it durable and holds its own PUBACK.
        assert pub(setup, "mon-3", [obs(2, 62)]).returncode == 0
        wait_until(lambda: gw.metric("vigil_gateway_held_total") > held, 15, "message held", gw)
        assert gw.ready() == (503, {"status": "unavailable", "not_ready": ["kafka"]})
    finally:
        setup.kafka.thaw()
    # The gateway retries until Kafka takes it. A produce request that timed out while the broker hung may
    # still have been written when it resumed, so at least once: every copy is the same event (the device
    # stage deduplicates on its id).
    recs = read(setup, topics.INGEST, obs_of("mon-3", {2}), 1, settle=1.0)
    assert len({decode(r.value).meta.event_id for r in recs}) == 1  # type: ignore[union-attr]
    wait_until(lambda: gw.ready()[0] == 200, 10, "ready again", gw)


def test_with_kafka_down_vigil_never_acknowledges_so_mosquitto_redelivers(setup: Setup) -> None:
    gw = setup.gw
    held = gw.metric("vigil_gateway_held_total")
    setup.kafka.stop()
    try:
        assert pub(setup, "mon-3", [obs(3, 63)]).returncode == 0  # Mosquitto has it and acked the device
        wait_until(lambda: gw.metric("vigil_gateway_held_total") > held, 15, "message held", gw)
        assert gw.ready()[1].get("not_ready") == ["kafka"]
        # Kill the gateway while it holds the message: had it sent its PUBACK, Mosquitto would have dropped
        # the message and nothing could bring it back (tansu keeps nothing across a restart).
        gw.kill9()
    finally:
        setup.kafka.restart()  # empty, with Vigil's topics recreated
    gw.start()  # same client id: Mosquitto resumes the persistent session and redelivers
    [rec] = read(setup, topics.INGEST, obs_of("mon-3", {3}), 1, settle=1.0)
    ev = decode(rec.value)
    assert isinstance(ev, Observations) and ev.items[0].value == 63


def test_two_gateways_in_one_shared_group_split_the_messages_and_each_lands_once(setup: Setup) -> None:
    a = setup.gw
    b = Gateway("b", setup.tmp / "gw-b", setup.env).start()
    try:
        before_a = a.metric("vigil_ingest_total", transport="mqtt", kind="obs")
        publish_when_allowed(setup, "mon-2", [obs(seq, 60 + seq % 40) for seq in range(1, 201)])
        recs = read(setup, topics.INGEST, obs_of("mon-2"), 200, settle=1.5)
        seqs = sorted(decode(r.value).meta.seq for r in recs)  # type: ignore[union-attr, type-var]
        assert seqs == list(range(1, 201))  # all 200, none twice
        assert len({r.partition for r in recs}) == 1  # one device, one partition
        got_a = a.metric("vigil_ingest_total", transport="mqtt", kind="obs") - before_a
        got_b = b.metric("vigil_ingest_total", transport="mqtt", kind="obs")
        assert got_a > 0 and got_b > 0, (got_a, got_b)
        assert got_a + got_b == 200
    finally:
        b.stop()
    # B left gracefully (it unsubscribes first): Mosquitto 2.0 would otherwise keep queueing every other
    # message for B's offline persistent session. A now takes them all, at once.
    more = set(range(201, 221))
    assert pub(setup, "mon-2", [obs(seq, 70) for seq in sorted(more)]).returncode == 0
    recs = read(setup, topics.INGEST, obs_of("mon-2", more), 20, settle=0.5)
    assert sorted(decode(r.value).meta.seq for r in recs) == sorted(more)  # type: ignore[union-attr, type-var]
