"""CoAP and CoAPS (DTLS-PSK) into the real hub (`vigil run`) with libcoap's coap-client-openssl.

One hub serves the module; each test reads only its own patient's values or its own dead letters.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import pytest

from tests.hub import Hub
from tests.servers import require

T = TypeVar("T")
WAIT = 15.0

CLIENT = require("coap-client-openssl")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def until(hub: Hub, predicate: Callable[[], T]) -> T:
    """`hub.wait_for` with room for a loaded CI machine (the hub answers in milliseconds when idle)."""
    found: T = hub.wait_for(predicate, timeout=WAIT)
    return found


@dataclass
class Reply:
    codes: list[str]
    output: str

    @property
    def code(self) -> str | None:
        """The last response code libcoap printed (at -v 6 it prints every PDU; requests show no code)."""
        return self.codes[-1] if self.codes else None


def coap(uri: str, *args: str, wait: int = 5) -> Reply:
    """A POST with coap-client-openssl; it exits 0 even on failure, so the answer is read from its output."""
    r = subprocess.run(
        [CLIENT, "-v", "6", "-B", str(wait), "-m", "post", *args, uri],
        capture_output=True,
        check=False,
        timeout=wait + 10,
    )
    text = (r.stdout + r.stderr).decode(errors="replace")
    return Reply(re.findall(r"^v:1 t:\w+ c:(\d\.\d\d)", text, re.MULTILINE), text)


@dataclass
class CoapDevice:
    hub: Hub
    id: str
    secret: str
    patient_id: str

    def coaps(self, body: str, *args: str, path_id: str | None = None, kind: str = "obs") -> Reply:
        uri = f"coaps://127.0.0.1:{self.hub.coaps_port}/v1/{path_id or self.id}/{kind}"
        return coap(uri, "-u", self.id, "-k", self.secret, "-e", body, *args)

    def plain(self, body: str, *args: str, kind: str = "obs") -> Reply:
        return coap(f"coap://127.0.0.1:{self.hub.coap_port}/v1/{self.id}/{kind}", "-e", body, *args)


def reading(seq: int, hr: float) -> str:
    return json.dumps({"seq": seq, "ts": iso(now_ms()), "obs": [{"code": "hr", "value": hr}]})


def snapshot_hr(hub: Hub, patient_id: str) -> Any:
    r = hub.api("GET", f"/api/v1/patients/{patient_id}")
    assert r.status_code == 200, r.text
    return r.json()["vitals"].get("hr", {}).get("value")


def hr_points(hub: Hub, patient_id: str, since: int) -> list[Any]:
    r = hub.api("GET", f"/api/v1/patients/{patient_id}/vitals", params={"code": "hr", "since": iso(since)})
    assert r.status_code == 200, r.text
    return [p["value"] for p in r.json()["points"]]


def deadletters(hub: Hub, since: int, **match: Any) -> list[dict[str, Any]]:
    r = hub.api("GET", "/api/v1/deadletters", params={"since": iso(since), "limit": 1000})
    assert r.status_code == 200, r.text
    return [d for d in r.json()["items"] if all(d.get(k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("hub-coap") / "hub").start()
    try:
        yield h
    finally:
        h.stop()


def _add(hub: Hub, device_id: str, patient: str, *extra: str) -> CoapDevice:
    out = hub.add_device(device_id, "monitor", "--patient", patient, *extra)
    return CoapDevice(hub, out["id"], out["secret"], patient)


@pytest.fixture(scope="module")
def secure(hub: Hub) -> CoapDevice:
    return _add(hub, "mon-dtls", "P-DTLS")


@pytest.fixture(scope="module")
def plain_only(hub: Hub) -> CoapDevice:
    return _add(hub, "mon-plain", "P-PLAIN", "--allow-plain-coap")


def test_coaps_with_the_registered_psk_stores_the_value(hub: Hub, secure: CoapDevice) -> None:
    reply = secure.coaps(reading(1, 101), "-t", "50")
    assert reply.code == "2.04", reply.output
    assert until(hub, lambda: snapshot_hr(hub, "P-DTLS") == 101)
    assert hub.metric("vigil_ingest_total", transport="coap", kind="obs") >= 1


def test_coaps_cbor_is_accepted(hub: Hub, secure: CoapDevice, tmp_path: Path) -> None:
    t0 = now_ms()
    body = tmp_path / "obs.cbor"
    body.write_bytes(cbor2.dumps({"seq": 2, "ts": t0, "obs": [{"code": "hr", "value": 102}]}))
    uri = f"coaps://127.0.0.1:{hub.coaps_port}/v1/{secure.id}/obs"
    reply = coap(uri, "-u", secure.id, "-k", secure.secret, "-t", "60", "-f", str(body))
    assert reply.code == "2.04", reply.output
    assert until(hub, lambda: 102 in hr_points(hub, "P-DTLS", t0))


def test_coaps_with_a_wrong_key_stores_nothing(hub: Hub, secure: CoapDevice) -> None:
    t0 = now_ms()
    uri = f"coaps://127.0.0.1:{hub.coaps_port}/v1/{secure.id}/obs"
    reply = coap(uri, "-u", secure.id, "-k", "wrong-key", "-e", reading(3, 103), wait=2)
    assert reply.code in (None, "4.01"), reply.output  # the handshake fails: no CoAP answer at all
    # The next good message is stored; the one with the wrong key never is.
    assert secure.coaps(reading(4, 104)).code == "2.04"
    until(hub, lambda: 104 in hr_points(hub, "P-DTLS", t0))
    assert 103 not in hr_points(hub, "P-DTLS", t0)


def test_plain_coap_is_refused_for_a_device_not_allowed_it(hub: Hub, secure: CoapDevice) -> None:
    t0 = now_ms()
    before = hub.metric("vigil_deadletter_total", reason="unauthorised")
    reply = secure.plain(reading(5, 105))
    assert reply.code == "4.01", reply.output
    [dl] = until(hub, lambda: deadletters(hub, t0, device_id="mon-dtls"))
    assert (dl["reason"], dl["transport"], dl["kind"]) == ("unauthorised", "coap", "obs")
    assert "105" in dl["payload"]
    assert hub.metric("vigil_deadletter_total", reason="unauthorised") == before + 1
    assert 105 not in hr_points(hub, "P-DTLS", t0)


def test_plain_coap_is_accepted_for_a_device_registered_with_allow_plain_coap(
    hub: Hub, plain_only: CoapDevice
) -> None:
    reply = plain_only.plain(reading(1, 61), "-t", "50")
    assert reply.code == "2.04", reply.output
    assert until(hub, lambda: snapshot_hr(hub, "P-PLAIN") == 61)


def test_path_id_other_than_the_dtls_identity_is_forbidden(
    hub: Hub, secure: CoapDevice, plain_only: CoapDevice
) -> None:
    t0 = now_ms()
    reply = secure.coaps(reading(6, 66), path_id=plain_only.id)
    assert reply.code == "4.03", reply.output
    # Recorded against who really sent it, and stored under nobody.
    [dl] = until(hub, lambda: deadletters(hub, t0, device_id="mon-dtls"))
    assert dl["reason"] == "unauthorised"
    assert 66 not in hr_points(hub, "P-PLAIN", t0)
    assert 66 not in hr_points(hub, "P-DTLS", t0)


def test_an_unsupported_content_format_gets_4_15(hub: Hub, secure: CoapDevice) -> None:
    t0 = now_ms()
    reply = secure.coaps(reading(7, 107), "-t", "41")  # application/xml
    assert reply.code == "4.15", reply.output
    [dl] = until(hub, lambda: deadletters(hub, t0, device_id="mon-dtls"))
    assert dl["reason"] == "unsupported_format"
    assert 107 not in hr_points(hub, "P-DTLS", t0)


def test_malformed_json_gets_4_00_and_is_dead_lettered(hub: Hub, secure: CoapDevice) -> None:
    t0 = now_ms()
    reply = secure.coaps('{"seq": 8, "obs": [', "-t", "50")
    assert reply.code == "4.00", reply.output
    [dl] = until(hub, lambda: deadletters(hub, t0, device_id="mon-dtls"))
    assert dl["reason"] == "malformed"
