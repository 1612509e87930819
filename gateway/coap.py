"""The CoAP gateway: `POST /v1/{device_id}/{kind}` over plain CoAP and CoAPS (DTLS-PSK), into `Ingest`.

Identity over CoAPS is the DTLS PSK identity; plain CoAP only for devices registered with `allow_plain_coap`.
Every refusal is dead-lettered (through `on_refused` before `Ingest.submit` can be called, else by ingest).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiocoap
import aiocoap.resource
from aiocoap.numbers.codes import Code

from gateway.coap_dtls import DtlsPeer, DtlsPskInterface
from gateway.device import DeviceDirectory
from gateway.outcome import Ingest, Outcome

log = logging.getLogger(__name__)

OnRefused = Callable[[str, str, str | None, str | None, bytes], Awaitable[None]]
"""(reason, transport, device_id, kind, payload): records a dead letter for a refusal made before ingest."""

TRANSPORT = "coap"
MAX_BODY = 64 * 1024
FORMATS = {50: "json", 60: "cbor"}  # CoAP content-format -> Ingest's content_format
ASSEMBLY_SECONDS = 120.0  # a blockwise upload idle this long is forgotten (RFC 7252 EXCHANGE_LIFETIME-ish)
MAX_ASSEMBLIES = 256  # with MAX_BODY each, at most 16 MiB held for unfinished uploads
RETRY_AFTER_SECONDS = 5  # Max-Age on 5.03: when the device may try again

_ANY_ADDRESS = ("", "0.0.0.0", "::")

_CODES: dict[Outcome, Code] = {
    Outcome.ACCEPTED: Code.CHANGED,
    Outcome.MALFORMED: Code.BAD_REQUEST,
    Outcome.SCHEMA: Code.BAD_REQUEST,
    Outcome.OVERSIZED: Code.REQUEST_ENTITY_TOO_LARGE,
    Outcome.UNSUPPORTED_FORMAT: Code.UNSUPPORTED_CONTENT_FORMAT,
    Outcome.UNKNOWN_DEVICE: Code.UNAUTHORIZED,
    Outcome.UNAUTHORISED: Code.FORBIDDEN,
    Outcome.UNKNOWN_KIND: Code.NOT_FOUND,
    Outcome.UNAVAILABLE: Code.SERVICE_UNAVAILABLE,
}


def response_code(outcome: Outcome) -> Code:
    """The CoAP answer to an ingest outcome (contract section 3); success, duplicates included, is 2.04."""
    return Code.CHANGED if outcome.ok else _CODES[outcome]


class PortInUseError(OSError):
    """A CoAP port is taken; the message names the variable that moves it."""


@dataclass(slots=True)
class _Assembly:
    body: bytearray
    touched: float


class _Block1Spool:
    """Bounded reassembly of Block1 uploads: never more than MAX_BODY (+ one block) per upload."""

    def __init__(self) -> None:
        self._open: OrderedDict[Any, _Assembly] = OrderedDict()

    def feed(self, key: Any, block: Any, payload: bytes) -> bytearray | None:
        """The body so far, or None when the block does not continue a known upload (4.08)."""
        now = time.monotonic()
        self._expire(now)
        if block.block_number == 0:
            self._open.pop(key, None)
            while len(self._open) >= MAX_ASSEMBLIES:
                self._open.popitem(last=False)
            assembly = self._open[key] = _Assembly(bytearray(), now)
        else:
            found = self._open.get(key)
            if found is None:
                return None
            assembly = found
            self._open.move_to_end(key)
        start = block.block_number * block.size
        body = assembly.body
        if start == len(body):
            body += payload
        elif start + len(payload) > len(body) or body[start : start + len(payload)] != payload:
            # a gap or a conflicting overlap: the upload cannot be trusted
            self._open.pop(key, None)
            return None
        # else: a repeated block we already hold
        assembly.touched = now
        return body

    def drop(self, key: Any) -> None:
        self._open.pop(key, None)

    def _expire(self, now: float) -> None:
        while self._open:
            key, oldest = next(iter(self._open.items()))
            if now - oldest.touched < ASSEMBLY_SECONDS:
                return
            del self._open[key]


class _RefusedError(Exception):
    """A refusal decided before ingest: answered with `code`, dead-lettered with `reason`."""

    def __init__(self, code: Code, reason: str, device_id: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.device_id = device_id


class DeviceMessages(aiocoap.resource.Resource):  # type: ignore[misc]
    """The root resource: authenticates, reassembles Block1, and hands each message to `Ingest`."""

    def __init__(self, ingest: Ingest, directory: DeviceDirectory, on_refused: OnRefused) -> None:
        super().__init__()
        self._ingest = ingest
        self._directory = directory
        self._on_refused = on_refused
        self._spool = _Block1Spool()

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False  # reassembled here, with a size limit aiocoap's spool does not have

    async def render_post(self, request: Any) -> aiocoap.Message:
        path = tuple(request.opt.uri_path)
        payload = bytes(request.payload)
        if len(path) != 3 or path[0] != "v1" or not path[1] or not path[2]:
            return await self._refuse(_RefusedError(Code.NOT_FOUND, "not_found"), None, None, payload)
        device_id, kind = path[1], path[2]
        block1 = request.opt.block1
        spool_key = (request.remote.blockwise_key, device_id, kind, request.opt.content_format)
        body = payload
        try:
            await self._authenticate(request.remote, device_id)
            content_format = self._content_format(request.opt.content_format)
            if block1 is not None:
                if block1.block_number == 0 and (request.opt.size1 or 0) > MAX_BODY:
                    raise _RefusedError(Code.REQUEST_ENTITY_TOO_LARGE, Outcome.OVERSIZED.value)
                if block1.more and len(payload) != block1.size:
                    raise _RefusedError(Code.BAD_REQUEST, Outcome.MALFORMED.value)
                assembled = self._spool.feed(spool_key, block1, payload)
                if assembled is None:
                    # not a message (a fragment of an upload we do not hold): the device starts over
                    return aiocoap.Message(code=Code.REQUEST_ENTITY_INCOMPLETE)
                body = bytes(assembled)
            if len(body) > MAX_BODY:
                raise _RefusedError(Code.REQUEST_ENTITY_TOO_LARGE, Outcome.OVERSIZED.value)
        except _RefusedError as refused:
            self._spool.drop(spool_key)
            return await self._refuse(refused, refused.device_id or device_id, kind, body)
        if block1 is not None and block1.more:
            return aiocoap.Message(code=Code.CONTINUE, block1=block1)
        self._spool.drop(spool_key)
        outcome = await self._ingest.submit(
            transport=TRANSPORT, device_id=device_id, kind=kind, payload=body, content_format=content_format
        )
        response = aiocoap.Message(code=response_code(outcome))
        if block1 is not None:
            response.opt.block1 = block1
        if outcome is Outcome.UNAVAILABLE:
            response.opt.max_age = RETRY_AFTER_SECONDS
        elif outcome is Outcome.OVERSIZED:
            response.opt.size1 = MAX_BODY
        return response

    async def _authenticate(self, remote: Any, device_id: str) -> None:
        if isinstance(remote, DtlsPeer):
            identity = remote.psk_identity
            if identity != device_id:
                # authenticated, but not as the path's device: recorded against who really sent it
                raise _RefusedError(Code.FORBIDDEN, Outcome.UNAUTHORISED.value, identity)
            info = await self._directory.get(device_id)
            if info is None or not info.enabled:
                # removed or disabled since its handshake
                raise _RefusedError(Code.UNAUTHORIZED, Outcome.UNAUTHORISED.value)
            return
        info = await self._directory.get(device_id)
        if info is None:
            raise _RefusedError(Code.UNAUTHORIZED, Outcome.UNKNOWN_DEVICE.value)
        if not info.enabled or not info.allow_plain_coap:
            raise _RefusedError(Code.UNAUTHORIZED, Outcome.UNAUTHORISED.value)

    @staticmethod
    def _content_format(option: Any) -> str | None:
        if option is None:
            return None  # ingest sniffs the first byte
        fmt = FORMATS.get(int(option))
        if fmt is None:
            raise _RefusedError(Code.UNSUPPORTED_CONTENT_FORMAT, Outcome.UNSUPPORTED_FORMAT.value)
        return fmt

    async def _refuse(
        self, refused: _RefusedError, device_id: str | None, kind: str | None, payload: bytes
    ) -> aiocoap.Message:
        try:
            await self._on_refused(refused.reason, TRANSPORT, device_id, kind, payload)
        except Exception:
            # A refusal we could not record must not look final: 5.03 makes the device send it again.
            log.exception("coap: could not dead-letter a %s refusal from %s", refused.reason, device_id)
            return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, max_age=RETRY_AFTER_SECONDS)
        response = aiocoap.Message(code=refused.code)
        if refused.code == Code.REQUEST_ENTITY_TOO_LARGE:
            response.opt.size1 = MAX_BODY
        return response


class CoapGateway:
    """Serves plain CoAP on `port` and CoAPS (DTLS-PSK, keys from the directory) on `dtls_port`."""

    def __init__(
        self,
        *,
        ingest: Ingest,
        directory: DeviceDirectory,
        host: str,
        port: int,
        dtls_port: int,
        on_refused: OnRefused,
    ) -> None:
        self._host = host
        self._port = port
        self._dtls_port = dtls_port
        self._directory = directory
        self._site = DeviceMessages(ingest, directory, on_refused)
        self._context: Any = None

    async def start(self) -> None:
        """Bind both ports; a port in use raises PortInUseError naming its variable."""
        # aiocoap binds with SO_REUSEPORT, which would silently share a port with another hub: probe first.
        _probe(self._host, self._port, "VIGIL_COAP_PORT")
        _probe(self._host, self._dtls_port, "VIGIL_COAPS_PORT")
        # simplesocketserver needs one concrete address (it answers from it); udp6 serves the wildcard.
        transport = "udp6" if self._host in _ANY_ADDRESS else "simplesocketserver"
        context = await aiocoap.Context.create_server_context(
            self._site, bind=(self._host, self._port), transports=[transport], loggername="vigil.coap"
        )
        try:
            # aiocoap has no public hook for a custom transport; this is what create_server_context does.
            await context._append_tokenmanaged_messagemanaged_transport(
                lambda mman: DtlsPskInterface.create(
                    mman, log=context.log, host=self._host, port=self._dtls_port, lookup=self._directory.psk
                )
            )
        except OSError as exc:
            await context.shutdown()
            raise PortInUseError(
                exc.errno, f"CoAPS port {self._dtls_port}/udp: {exc.strerror}; set VIGIL_COAPS_PORT"
            ) from exc
        self._context = context
        log.info(
            "coap: listening on %s udp %d (coap) and %d (coaps)", self._host, self._port, self._dtls_port
        )

    async def stop(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            await context.shutdown()


def _probe(host: str, port: int, variable: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    exc.errno, f"UDP port {port} on {host} is in use: set {variable} to move it"
                ) from exc
            raise
