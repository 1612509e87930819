"""The CoAP gateway against the real libcoap client (coap-client-openssl): DTLS-PSK, plain CoAP, Block1."""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiocoap
import cbor2
import orjson
import pytest

from gateway.coap import MAX_BODY, CoapGateway, PortInUseError, response_code
from gateway.coap_dtls import psk_identity_in
from gateway.device import DeviceInfo
from gateway.outcome import Outcome
from tests.servers import free_port, require

pytestmark = pytest.mark.integration

CLIENT = require("coap-client-openssl")
OBS = {"seq": 1, "boot": "b1", "ts": 1795428000000, "obs": [{"code": "hr", "value": 72}]}


@dataclass
class Submitted:
    transport: str
    device_id: str
    kind: str
    payload: bytes
    content_format: str | None


@dataclass
class RecordingIngest:
    """Ingest double: parses like the real edge (MALFORMED when the body does not decode to a map)."""

    calls: list[Submitted] = field(default_factory=list)
    answer: Outcome | None = None  # forces an outcome (for example UNAVAILABLE)

    async def submit(
        self, *, transport: str, device_id: str, kind: str, payload: bytes, content_format: str | None = None
    ) -> Outcome:
        self.calls.append(Submitted(transport, device_id, kind, payload, content_format))
        if self.answer is not None:
            return self.answer
        cbor = content_format == "cbor" or (
            content_format is None and payload[:1] and 0xA0 <= payload[0] <= 0xBF
        )
        try:
            body = cbor2.loads(payload) if cbor else orjson.loads(payload)
        except Exception:
            return Outcome.MALFORMED
        return Outcome.ACCEPTED if isinstance(body, dict) else Outcome.MALFORMED


@dataclass
class Directory:
    """DeviceDirectory double over two dicts; changes apply at once, like the registry's cache."""

    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    def add(self, device_id: str, *, allow_plain_coap: bool = False) -> str:
        secret = secrets.token_urlsafe(24)  # 32 characters, as the registry issues them
        self.devices[device_id] = DeviceInfo(
            id=device_id,
            type="monitor",
            site_id="default",
            unit_id=None,
            bed_id=None,
            patient_id=None,
            allow_plain_coap=allow_plain_coap,
        )
        self.secrets[device_id] = secret
        return secret

    def cached(self, device_id: str) -> DeviceInfo | None:
        return self.devices.get(device_id)

    async def get(self, device_id: str) -> DeviceInfo | None:
        return self.devices.get(device_id)

    async def check_secret(self, device_id: str, secret: str) -> bool:
        return self.secrets.get(device_id) == secret

    async def psk(self, device_id: str) -> bytes | None:
        info = self.devices.get(device_id)
        if info is None or not info.enabled:
            return None
        return self.secrets[device_id].encode()


@dataclass
class Hub:
    gateway: CoapGateway
    ingest: RecordingIngest
    directory: Directory
    refused: list[tuple[str, str, str | None, str | None, bytes]]
    port: int
    dtls_port: int


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    ingest = RecordingIngest()
    directory = Directory()
    refused: list[tuple[str, str, str | None, str | None, bytes]] = []

    async def on_refused(
        reason: str, transport: str, device_id: str | None, kind: str | None, payload: bytes
    ) -> None:
        refused.append((reason, transport, device_id, kind, payload))

    port, dtls_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    gateway = CoapGateway(
        ingest=ingest,
        directory=directory,
        host="127.0.0.1",
        port=port,
        dtls_port=dtls_port,
        on_refused=on_refused,
    )
    await gateway.start()
    try:
        yield Hub(gateway, ingest, directory, refused, port, dtls_port)
    finally:
        await gateway.stop()


@dataclass
class Reply:
    codes: list[str]
    output: str

    @property
    def code(self) -> str | None:
        """The final response code (libcoap prints every PDU at -v 6; requests show a method, not a code)."""
        return self.codes[-1] if self.codes else None


async def coap_client(*args: str, wait: float = 5) -> Reply:
    """Run coap-client-openssl without blocking the loop the gateway runs on; it exits 0 even on failure."""
    proc = await asyncio.create_subprocess_exec(
        CLIENT,
        "-v",
        "6",
        "-B",
        str(int(wait)),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), wait + 10)
    text = out.decode(errors="replace")
    return Reply(re.findall(r"^v:1 t:\w+ c:(\d\.\d\d)", text, re.MULTILINE), text)


async def post_dtls(hub: Hub, identity: str, key: str, path: str, *extra: str, wait: float = 5) -> Reply:
    return await coap_client(
        "-m", "post", "-u", identity, "-k", key, *extra, f"coaps://127.0.0.1:{hub.dtls_port}{path}", wait=wait
    )


async def post_plain(hub: Hub, path: str, *extra: str) -> Reply:
    return await coap_client("-m", "post", *extra, f"coap://127.0.0.1:{hub.port}{path}")


def json_body() -> str:
    return orjson.dumps(OBS).decode()


async def test_dtls_right_key_reaches_ingest(hub: Hub) -> None:
    key = hub.directory.add("mon-1")
    reply = await post_dtls(hub, "mon-1", key, "/v1/mon-1/obs", "-t", "50", "-e", json_body())
    assert reply.code == "2.04", reply.output
    [call] = hub.ingest.calls
    assert (call.transport, call.device_id, call.kind, call.content_format) == (
        "coap",
        "mon-1",
        "obs",
        "json",
    )
    assert orjson.loads(call.payload) == OBS
    assert hub.refused == []


async def test_dtls_new_handshake_from_same_port_replaces_session(hub: Hub) -> None:
    """Reconnecting from the same source port works (close_notify or a new ClientHello ends a session)."""
    key = hub.directory.add("mon-1")
    local_port = str(free_port(socket.SOCK_DGRAM))
    for _ in range(2):
        reply = await post_dtls(hub, "mon-1", key, "/v1/mon-1/obs", "-p", local_port, "-e", json_body())
        assert reply.code == "2.04", reply.output
    assert len(hub.ingest.calls) == 2


async def test_dtls_wrong_key_fails_handshake(hub: Hub) -> None:
    hub.directory.add("mon-1")
    reply = await post_dtls(
        hub, "mon-1", secrets.token_urlsafe(24), "/v1/mon-1/obs", "-e", json_body(), wait=3
    )
    assert reply.code is None, reply.output
    assert hub.ingest.calls == []


async def test_dtls_unknown_identity_fails_handshake(hub: Hub) -> None:
    reply = await post_dtls(
        hub, "ghost", secrets.token_urlsafe(24), "/v1/ghost/obs", "-e", json_body(), wait=3
    )
    assert reply.code is None, reply.output
    assert hub.ingest.calls == []


async def test_dtls_path_id_not_identity_is_forbidden(hub: Hub) -> None:
    key = hub.directory.add("mon-1")
    hub.directory.add("mon-2")
    reply = await post_dtls(hub, "mon-1", key, "/v1/mon-2/obs", "-e", json_body())
    assert reply.code == "4.03", reply.output
    assert hub.ingest.calls == []
    assert hub.refused == [("unauthorised", "coap", "mon-1", "obs", json_body().encode())]


async def test_plain_coap_refused_without_allow(hub: Hub) -> None:
    hub.directory.add("mon-1")
    reply = await post_plain(hub, "/v1/mon-1/obs", "-e", json_body())
    assert reply.code == "4.01", reply.output
    assert hub.ingest.calls == []
    assert hub.refused == [("unauthorised", "coap", "mon-1", "obs", json_body().encode())]


async def test_plain_coap_unknown_device(hub: Hub) -> None:
    reply = await post_plain(hub, "/v1/ghost/obs", "-e", json_body())
    assert reply.code == "4.01", reply.output
    assert [r[:3] for r in hub.refused] == [("unknown_device", "coap", "ghost")]


async def test_plain_coap_allowed(hub: Hub) -> None:
    hub.directory.add("pendant-1", allow_plain_coap=True)
    reply = await post_plain(
        hub, "/v1/pendant-1/sos", "-e", '{"seq": 1, "ts": 1795428000000, "action": "press"}'
    )
    assert reply.code == "2.04", reply.output
    [call] = hub.ingest.calls
    assert (call.transport, call.device_id, call.kind, call.content_format) == (
        "coap",
        "pendant-1",
        "sos",
        None,
    )


async def test_cbor_accepted(hub: Hub, tmp_path: Path) -> None:
    key = hub.directory.add("mon-1")
    body = tmp_path / "obs.cbor"
    body.write_bytes(cbor2.dumps(OBS))
    reply = await post_dtls(hub, "mon-1", key, "/v1/mon-1/obs", "-t", "60", "-f", str(body))
    assert reply.code == "2.04", reply.output
    [call] = hub.ingest.calls
    assert call.content_format == "cbor"
    assert cbor2.loads(call.payload) == OBS


async def test_xml_content_format_is_unsupported(hub: Hub) -> None:
    key = hub.directory.add("mon-1")
    reply = await post_dtls(hub, "mon-1", key, "/v1/mon-1/obs", "-t", "41", "-e", "<obs/>")
    assert reply.code == "4.15", reply.output
    assert hub.ingest.calls == []
    assert hub.refused == [("unsupported_format", "coap", "mon-1", "obs", b"<obs/>")]


async def test_malformed_json_is_bad_request(hub: Hub) -> None:
    key = hub.directory.add("mon-1")
    reply = await post_dtls(hub, "mon-1", key, "/v1/mon-1/obs", "-t", "50", "-e", '{"seq": 1,')
    assert reply.code == "4.00", reply.output
    assert len(hub.ingest.calls) == 1  # ingest dead-letters it (reason malformed)


async def test_oversized_blockwise_upload(hub: Hub, tmp_path: Path) -> None:
    key = hub.directory.add("mon-1")
    big = tmp_path / "big.json"
    big.write_bytes(b'{"pad": "' + b"x" * (70 * 1024) + b'"}')
    reply = await post_dtls(hub, "mon-1", key, "/v1/mon-1/obs", "-t", "50", "-b", "1024", "-f", str(big))
    assert reply.code == "4.13", reply.output
    assert "Block1:0/M/1024" in reply.output  # libcoap announces Size1 with block 0, refused at once
    assert hub.ingest.calls == []
    [(reason, transport, device_id, kind, payload)] = hub.refused
    assert (reason, transport, device_id, kind) == ("oversized", "coap", "mon-1", "obs")
    assert big.read_bytes().startswith(payload)


async def test_oversized_blockwise_without_size1(hub: Hub) -> None:
    """A client that does not announce Size1 is stopped once the reassembled body passes 64 KiB."""
    hub.directory.add("pump-1", allow_plain_coap=True)
    client = await aiocoap.Context.create_client_context()
    try:
        answers = []
        for number in range(70):
            request = aiocoap.Message(
                code=aiocoap.POST,
                uri=f"coap://127.0.0.1:{hub.port}/v1/pump-1/pump",
                payload=b"x" * 1024,
                content_format=50,
                block1=(number, True, 6),
            )
            response = await client.request(request, handle_blockwise=False).response
            answers.append(response.code)
            if response.code != aiocoap.CONTINUE:
                break
    finally:
        await client.shutdown()
    assert answers[:-1] == [aiocoap.CONTINUE] * 64
    assert answers[-1] == aiocoap.REQUEST_ENTITY_TOO_LARGE
    assert hub.ingest.calls == []
    [(reason, _, device_id, kind, payload)] = hub.refused
    assert (reason, device_id, kind, len(payload)) == ("oversized", "pump-1", "pump", 65 * 1024)


async def test_normal_blockwise_upload(hub: Hub, tmp_path: Path) -> None:
    key = hub.directory.add("mon-1")
    obs = {**OBS, "obs": [{"code": "hr", "value": 72, "note": "n" * 60} for _ in range(60)]}
    body = orjson.dumps(obs)
    assert 4096 < len(body) < MAX_BODY
    path = tmp_path / "obs.json"
    path.write_bytes(body)
    reply = await post_dtls(hub, "mon-1", key, "/v1/mon-1/obs", "-t", "50", "-b", "512", "-f", str(path))
    assert reply.code == "2.04", reply.output
    # libcoap hides the 2.31 Continues; the final answer acknowledges the last block of several
    assert re.search(r"c:2\.04 .*Block1:[1-9]\d*/_/512", reply.output), reply.output
    [call] = hub.ingest.calls
    assert call.payload == body


async def test_device_added_after_start_connects(hub: Hub) -> None:
    await asyncio.sleep(0.2)
    key = hub.directory.add("mon-late")
    started = time.monotonic()
    reply = await post_dtls(hub, "mon-late", key, "/v1/mon-late/obs", "-e", json_body())
    assert reply.code == "2.04", reply.output
    assert time.monotonic() - started < 2
    assert [c.device_id for c in hub.ingest.calls] == ["mon-late"]


async def test_unavailable_log_answers_503(hub: Hub) -> None:
    key = hub.directory.add("mon-1")
    hub.ingest.answer = Outcome.UNAVAILABLE
    reply = await post_dtls(hub, "mon-1", key, "/v1/mon-1/obs", "-e", json_body())
    assert reply.code == "5.03", reply.output


async def test_port_in_use_names_variable(hub: Hub) -> None:
    other = CoapGateway(
        ingest=hub.ingest,
        directory=hub.directory,
        host="127.0.0.1",
        port=hub.port,
        dtls_port=free_port(socket.SOCK_DGRAM),
        on_refused=lambda *_: asyncio.sleep(0),
    )
    with pytest.raises(PortInUseError, match="VIGIL_COAP_PORT"):
        await other.start()


def test_response_codes_follow_contract() -> None:
    assert str(response_code(Outcome.ACCEPTED)).startswith("2.04")
    assert str(response_code(Outcome.SCHEMA)).startswith("4.00")
    assert str(response_code(Outcome.UNAUTHORISED)).startswith("4.03")
    assert str(response_code(Outcome.UNKNOWN_DEVICE)).startswith("4.01")
    assert str(response_code(Outcome.UNAVAILABLE)).startswith("5.03")


def test_psk_identity_parsed_from_client_key_exchange() -> None:
    identity = b"mon-1"
    body = len(identity).to_bytes(2, "big") + identity
    handshake = (
        bytes([16]) + len(body).to_bytes(3, "big") + b"\0\2" + b"\0\0\0" + len(body).to_bytes(3, "big") + body
    )
    record = bytes([22, 0xFE, 0xFD, 0, 0]) + b"\0" * 6 + len(handshake).to_bytes(2, "big") + handshake
    change_cipher = bytes([20, 0xFE, 0xFD, 0, 0]) + b"\0" * 6 + b"\0\1\1"
    assert psk_identity_in(record + change_cipher) == identity
    assert psk_identity_in(change_cipher) is None
    assert psk_identity_in(b"\x16\xfe") is None
