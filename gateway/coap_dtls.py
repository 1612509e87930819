"""CoAPS server transport for aiocoap: DTLS 1.2 with pre-shared keys on OpenSSL (pyOpenSSL, memory BIOs).

aiocoap's own DTLS server runs on tinydtls (DTLSSocket 0.2.3), which takes keys of at most 16 bytes and
copies a longer one past its buffer; Vigil's device secrets are 32 characters, so CoAPS runs on OpenSSL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiocoap import error, interfaces
from aiocoap.numbers import COAPS_PORT, constants
from aiocoap.transports.generic_udp import GenericMessageInterface
from aiocoap.util import hostportjoin
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

log = logging.getLogger(__name__)

PskLookup = Callable[[str], Awaitable[bytes | None]]
"""A device id to its current pre-shared key, or None when it may not connect."""

# Preference order: AEAD suites first; PSK-AES128-CCM8 last, for RFC 7252 constrained devices (tinydtls)
# that offer nothing else. OpenSSL rates CCM8's 64-bit tag below security level 1: SECLEVEL=0 (PSK only).
CIPHERS = (
    b"PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305:PSK-AES128-CCM:PSK-AES128-CCM8"
    b":@SECLEVEL=0"
)
DTLS1_2_VERSION = 0xFEFD
MTU = 1400  # a 1024-byte block with CoAP and DTLS headers fits; below common path MTUs
MAX_PEERS = 4096
IDLE_SECONDS = 600.0  # a session unused this long is forgotten; the device handshakes again

_HANDSHAKE = 22
_CLIENT_KEY_EXCHANGE = 16


def psk_identity_in(datagram: bytes) -> bytes | None:
    """The PSK identity of a ClientKeyExchange in a datagram, if it holds one (epoch 0 is cleartext)."""
    pos = 0
    while pos + 13 <= len(datagram):
        content_type = datagram[pos]
        epoch = int.from_bytes(datagram[pos + 3 : pos + 5], "big")
        length = int.from_bytes(datagram[pos + 11 : pos + 13], "big")
        fragment = datagram[pos + 13 : pos + 13 + length]
        pos += 13 + length
        # handshake header: type(1) length(3) message_seq(2) fragment_offset(3) fragment_length(3)
        if (
            content_type == _HANDSHAKE
            and epoch == 0
            and len(fragment) >= 14
            and fragment[0] == _CLIENT_KEY_EXCHANGE
            and fragment[6:9] == b"\0\0\0"
        ):
            size = int.from_bytes(fragment[12:14], "big")
            if 14 + size <= len(fragment):
                return fragment[14 : 14 + size]
    return None


def starts_handshake(datagram: bytes) -> bool:
    """True when a datagram opens with a cleartext ClientHello (epoch 0)."""
    return len(datagram) > 13 and datagram[0] == _HANDSHAKE and datagram[3:5] == b"\0\0" and datagram[13] == 1


class DtlsPeer(interfaces.EndpointAddress):  # type: ignore[misc]
    """One DTLS association with a client address; after the handshake, its PSK identity is the device id."""

    is_multicast = False
    is_multicast_locally = False
    scheme = "coaps"
    maximum_block_size_exp = constants.MAX_REGULAR_BLOCK_SIZE_EXP

    def __init__(self, endpoint: DtlsEndpoint, address: tuple[str, int], conn: SSL.Connection) -> None:
        self._endpoint = endpoint
        self.address = address
        self.conn = conn
        self.psk_identity: str | None = None  # set by the PSK callback, trusted once `established`
        self.established = False
        self.closed = False
        self.staged: tuple[bytes, bytes | None] | None = None  # (identity, key) fetched for the handshake
        self.backlog: list[bytes] | None = None  # datagrams held while the key is fetched
        self.timer: asyncio.TimerHandle | None = None
        self.last_seen = 0.0

    def __repr__(self) -> str:
        return f"<DtlsPeer {self.hostinfo} identity={self.psk_identity!r}>"

    @property
    def hostinfo(self) -> str:
        host, port = self.address[:2]
        return str(hostportjoin(host, None if port == COAPS_PORT else port))

    @property
    def hostinfo_local(self) -> str:
        return self._endpoint.hostinfo_local

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://" + self.hostinfo_local

    @property
    def authenticated_claims(self) -> list[str]:
        return [self.psk_identity] if self.established and self.psk_identity else []

    @property
    def blockwise_key(self) -> tuple[tuple[str, int], str | None]:
        return (self.address, self.psk_identity)

    def send(self, data: bytes) -> None:
        self._endpoint.send(self, data)


class DtlsEndpoint(asyncio.DatagramProtocol):
    """The UDP socket: one OpenSSL connection per client address, fed and drained through memory BIOs."""

    def __init__(self, interface: DtlsPskInterface, lookup: PskLookup, hostinfo_local: str) -> None:
        self._interface = interface
        self._lookup = lookup
        self.hostinfo_local = hostinfo_local
        self._peers: collections.OrderedDict[tuple[str, int], DtlsPeer] = collections.OrderedDict()
        self._transport: asyncio.DatagramTransport | None = None
        self._current: DtlsPeer | None = None  # the peer whose handshake OpenSSL is running right now
        self._tasks: set[asyncio.Task[None]] = set()
        # OpenSSL asks for the key synchronously inside the handshake; the key was fetched before that
        # datagram was fed in (see datagram_received), so the callback only reads the staged value.
        self._psk_callback = _ffi.callback(
            "unsigned int(SSL *, const char *, unsigned char *, unsigned int)", self._psk_server
        )
        self._ctx = SSL.Context(SSL.DTLS_SERVER_METHOD)
        self._ctx.set_min_proto_version(DTLS1_2_VERSION)
        self._ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_CIPHER_SERVER_PREFERENCE)
        self._ctx.set_cipher_list(CIPHERS)
        _lib.SSL_CTX_set_psk_server_callback(self._ctx._context, self._psk_callback)

    # asyncio.DatagramProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        peer = self._peers.get(addr)
        if peer is not None and peer.established and starts_handshake(data):
            # A device that rebooted and kept its source port: a new session replaces the old one.
            self._drop(peer, ConnectionResetError("DTLS session replaced by a new handshake"))
            peer = None
        if peer is None:
            peer = self._new_peer(addr)
        else:
            self._peers.move_to_end(addr)
        peer.last_seen = loop.time()
        if peer.backlog is not None:
            peer.backlog.append(data)
            return
        identity = None if peer.established else psk_identity_in(data)
        if identity is not None:
            peer.backlog = [data]
            task = loop.create_task(self._fetch_key(peer, identity), name="coaps key lookup")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._feed(peer, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("coaps socket error: %s", exc)

    # peers

    def _new_peer(self, addr: tuple[str, int]) -> DtlsPeer:
        self._evict(asyncio.get_running_loop().time())
        conn = SSL.Connection(self._ctx, None)
        conn.set_accept_state()
        conn.set_ciphertext_mtu(MTU)
        peer = DtlsPeer(self, addr, conn)
        self._peers[addr] = peer
        return peer

    def _evict(self, now: float) -> None:
        while self._peers:
            oldest = next(iter(self._peers.values()))
            if len(self._peers) < MAX_PEERS and now - oldest.last_seen < IDLE_SECONDS:
                return
            self._drop(oldest, error.LibraryShutdown("DTLS session idle or evicted"))

    def _drop(self, peer: DtlsPeer, reason: Exception | None) -> None:
        peer.closed = True
        if peer.timer is not None:
            peer.timer.cancel()
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
        if reason is not None and peer.established:
            self._interface._received_exception(peer, reason)

    async def _fetch_key(self, peer: DtlsPeer, identity: bytes) -> None:
        key: bytes | None = None
        try:
            key = await self._lookup(identity.decode())
        except UnicodeDecodeError:
            key = None
        except Exception:
            log.exception("coaps: key lookup for %r failed", identity)
        peer.staged = (identity, key)
        backlog, peer.backlog = peer.backlog or [], None
        for data in backlog:
            if peer.closed:
                return
            self._feed(peer, data)

    def _psk_server(self, _ssl: Any, identity: Any, psk: Any, max_len: int) -> int:
        peer = self._current
        if peer is None or peer.staged is None:
            return 0
        wanted = _ffi.string(identity)
        staged_identity, key = peer.staged
        if key is None or wanted != staged_identity:
            return 0
        if len(key) > max_len:
            log.error("coaps: the key of %r is longer than OpenSSL takes (%d bytes)", wanted, max_len)
            return 0
        _ffi.memmove(psk, key, len(key))
        peer.psk_identity = wanted.decode()
        return len(key)

    # the DTLS engine

    def _feed(self, peer: DtlsPeer, data: bytes) -> None:
        conn = peer.conn
        plaintexts: list[bytes] = []
        closing = False
        try:
            conn.bio_write(data)
            self._current = peer
            if not peer.established:
                with contextlib.suppress(SSL.WantReadError):
                    conn.do_handshake()
                    peer.established = peer.psk_identity is not None
                    peer.staged = None  # the key is not needed after the handshake
                    log.debug("coaps: %s authenticated as %r", peer.address, peer.psk_identity)
            while peer.established:
                try:
                    plaintexts.append(conn.recv(65536))
                except SSL.WantReadError:
                    break
                except SSL.ZeroReturnError:  # close_notify
                    closing = True
                    break
        except SSL.Error as exc:
            # A wrong key or a broken record: the alert OpenSSL wrote is sent, the association forgotten.
            log.info("coaps: DTLS with %s failed: %s", peer.address, exc)
            self._current = None
            self._flush(peer)
            self._drop(peer, ConnectionResetError(f"DTLS failed: {exc}"))
            return
        finally:
            self._current = None
        self._flush(peer)
        for plaintext in plaintexts:
            self._interface._received_datagram(peer, plaintext)
        if closing:
            self._drop(peer, ConnectionResetError("DTLS close_notify"))
        else:
            self._arm_timer(peer)

    def _flush(self, peer: DtlsPeer) -> None:
        while self._transport is not None:
            try:
                out = peer.conn.bio_read(65536)
            except SSL.WantReadError:
                return
            if not out:
                return
            self._transport.sendto(out, peer.address)

    def _arm_timer(self, peer: DtlsPeer) -> None:
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = None
        if peer.established or peer.closed:
            return
        timeout = peer.conn.DTLSv1_get_timeout()
        if timeout is not None:
            peer.timer = asyncio.get_running_loop().call_later(timeout, self._retransmit, peer)

    def _retransmit(self, peer: DtlsPeer) -> None:
        peer.timer = None
        if peer.closed:
            return
        try:
            peer.conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._drop(peer, ConnectionResetError(f"DTLS failed: {exc}"))
            return
        self._flush(peer)
        self._arm_timer(peer)

    def send(self, peer: DtlsPeer, data: bytes) -> None:
        if peer.closed or not peer.established:
            log.info("coaps: not sending to %s: its DTLS session is gone", peer.address)
            return
        try:
            peer.conn.send(data)
        except SSL.Error as exc:
            self._drop(peer, ConnectionResetError(f"DTLS failed: {exc}"))
            return
        self._flush(peer)

    async def connect(self, sockaddr: Any) -> DtlsPeer:
        raise RuntimeError("the CoAPS server does not start DTLS sessions to devices")

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for peer in list(self._peers.values()):
            if peer.established:
                with contextlib.suppress(SSL.Error):
                    peer.conn.shutdown()
                self._flush(peer)
            self._drop(peer, error.LibraryShutdown("shutting down"))
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class DtlsPskInterface(GenericMessageInterface):  # type: ignore[misc]
    """aiocoap's message layer over `DtlsEndpoint`: plaintext CoAP in, plaintext CoAP out."""

    _pool: DtlsEndpoint

    @classmethod
    async def create(
        cls, mman: Any, *, log: logging.Logger, host: str, port: int, lookup: PskLookup
    ) -> DtlsPskInterface:
        loop = asyncio.get_running_loop()
        self = cls(mman, log, loop)
        _transport, endpoint = await loop.create_datagram_endpoint(
            lambda: DtlsEndpoint(self, lookup, str(hostportjoin(host, port))), local_addr=(host, port)
        )
        self._pool = endpoint
        return self

    async def determine_remote(self, request: Any) -> None:
        return None  # server only: responses go back on the peer the request came from

    async def recognize_remote(self, remote: Any) -> bool:
        return isinstance(remote, DtlsPeer) and remote._endpoint is self._pool
