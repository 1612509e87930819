"""The websocket `/ws`: authentication, subscriptions with permission checks, resume and resync.

The protocol is contract section 6 with Vigil's message shapes (see `api/livehub.py`). Routing, merging and
latest state live in `api/livehub.py`; this module is the socket side: it reads a client's operations, looks
up where beds, units and patients are, and moves frames from the client's bounded queue to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jwt
import orjson
from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from sqlalchemy import select
from starlette.websockets import WebSocketState

from api.auth import Principal
from api.livehub import (
    CLOSE_UNAUTHORISED,
    PLACE_KINDS,
    LiveClient,
    LiveHub,
    Refusal,
    Scope,
    Topic,
    control_frame,
    parse_topic,
    refusal,
    resume_decision,
)
from records.db import Database, transaction
from records.models import Admission, Bed, Unit
from records.places import get_bed, get_patient
from streams.metrics import ALERT_DELIVERY, WS_CONNECTIONS, WS_OPS_FAILED

if TYPE_CHECKING:
    from api.app import ApiContext

log = logging.getLogger(__name__)

MAX_OP_BYTES = 64 * 1024  # a client's operation; anything larger is refused
MAX_TOPICS = 500  # per connection
CLOSE_TIMEOUT_S = 10.0  # a client that does not take our close frame is dropped after this
CLOSE_INTERNAL_ERROR = 1011  # RFC 6455: the server met an error it cannot go on after


def install(app: FastAPI, ctx: ApiContext) -> None:
    """Add `/ws`, served by one `LiveHub` per app (started by the first connection)."""
    hub = LiveHub(ctx.live, ctx.clock)
    app.state.livehub = hub

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await Connection(websocket, ctx, hub).run()


# -- where things are ------------------------------------------------------------------------------------


async def unit_scope(db: Database, unit_id: str) -> Scope | None:
    async with transaction(db, read_only=True) as session:
        site = (await session.execute(select(Unit.site_id).where(Unit.id == unit_id))).scalar_one_or_none()
    return None if site is None else Scope(site, unit_id)


async def beds_of_unit(db: Database, unit_id: str) -> dict[str, str | None]:
    """Each bed of the unit with its patient now (None: free)."""
    query = (
        select(Bed.id, Admission.patient_id)
        .outerjoin(Admission, (Admission.bed_id == Bed.id) & Admission.ended_at.is_(None))
        .where(Bed.unit_id == unit_id)
    )
    async with transaction(db, read_only=True) as session:
        return {bed: patient for bed, patient in (await session.execute(query)).all()}


async def resolve(db: Database, topic: Topic) -> tuple[Scope | None, dict[str, str | None]]:
    """Where a place topic's bed, unit or patient is now, and the beds whose state it shows."""
    ref = topic.ref or ""
    if topic.kind == "unit":
        scope = await unit_scope(db, ref)
        return scope, (await beds_of_unit(db, ref) if scope else {})
    if topic.kind == "bed":
        bed = await get_bed(db, ref)
        if bed is None:
            return None, {}
        return Scope(bed.site_id, bed.unit_id), {bed.id: bed.patient_id}
    patient = await get_patient(db, ref)
    if patient is None:
        return None, {}
    unit = None
    if patient.bed_id:
        bed = await get_bed(db, patient.bed_id)
        unit = bed.unit_id if bed else None
    return Scope(patient.site_id, unit), {}


# -- one connection --------------------------------------------------------------------------------------


def bearer(websocket: WebSocket) -> str | None:
    """`Authorization: Bearer ...`, else the `access_token` query parameter (browsers cannot set headers)."""
    header = websocket.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return websocket.query_params.get("access_token") or None


class Connection:
    """A client's socket: a reader of operations and a writer of queued frames, closed as the hub decides."""

    def __init__(self, websocket: WebSocket, ctx: ApiContext, hub: LiveHub) -> None:
        self._ws = websocket
        self._ctx = ctx
        self._hub = hub

    async def run(self) -> None:
        ws = self._ws
        token = bearer(ws)
        await ws.accept()
        try:
            if token is None:
                raise HTTPException(401, "missing bearer token")
            principal = self._ctx.tokens.verify(token)
        except HTTPException as exc:
            with contextlib.suppress(Exception):
                await ws.send_text(control_frame("error", code="unauthorised", message=str(exc.detail)))
                await ws.close(CLOSE_UNAUTHORISED, "unauthorised")
            return
        self._hub.start()
        client = LiveClient(principal)
        self._hub.attach(client)
        expiry = self._expire_at(token, client)
        WS_CONNECTIONS.inc()
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._read_loop(client), name="ws-read"),
            asyncio.create_task(self._write_loop(client), name="ws-write"),
        ]
        try:
            await asyncio.wait([*tasks, client.closed], return_when=asyncio.FIRST_COMPLETED)
            self._failed(client, tasks)
        finally:
            self._hub.detach(client)
            expiry.cancel()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            WS_CONNECTIONS.dec()
        if client.closed.done() and ws.application_state != WebSocketState.DISCONNECTED:
            code, reason = client.closed.result()
            log.info("closing websocket of %s: %s (%d)", principal.username, reason, code)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code, reason), CLOSE_TIMEOUT_S)

    def _failed(self, client: LiveClient, tasks: list[asyncio.Task[Any]]) -> None:
        """A reader or writer that died of an error (not of the client leaving): log it and close 1011, so the
        client gets a close frame, reconnects and resumes (was: the socket dropped without one, unlogged)."""
        for t in tasks:
            exc = t.exception() if t.done() and not t.cancelled() else None
            if exc is None or isinstance(exc, WebSocketDisconnect | OSError) or self._gone():
                continue
            log.error("websocket: the connection's %s failed", t.get_name(), exc_info=exc)
            client.close(CLOSE_INTERNAL_ERROR, "internal error")

    def _gone(self) -> bool:
        ws = self._ws
        return WebSocketState.DISCONNECTED in (ws.client_state, ws.application_state)

    def _expire_at(self, token: str, client: LiveClient) -> asyncio.TimerHandle:
        """Close the connection (4401) when its token expires: a socket outliving its token is no loophole."""
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp", 0)
        delay = max(0.0, float(exp) - self._ctx.clock.now_ms() / 1000)
        return asyncio.get_running_loop().call_later(delay, client.close, CLOSE_UNAUTHORISED, "token expired")

    async def _write_loop(self, client: LiveClient) -> None:
        send = self._ws.send_text
        while True:
            await send(await client.next())

    async def _read_loop(self, client: LiveClient) -> None:
        while True:
            message = await self._ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = (message.get("bytes") or b"").decode("utf-8", "replace")
            await self._handle(client, raw)

    async def _handle(self, client: LiveClient, raw: str) -> None:
        """One operation. One that fails (the records database or Redis did not answer) is answered
        `unavailable` with its op: the client sends it again; the connection stays."""
        try:
            await self._operation(client, raw)
        except (asyncio.CancelledError, WebSocketDisconnect):
            raise
        except Exception as exc:
            if self._gone():
                raise
            log.error("websocket: an operation failed: %s", type(exc).__name__, exc_info=exc)
            WS_OPS_FAILED.inc()
            name = self._op_name(raw)
            client.push(control_frame("error", code="unavailable", op=name, message="failed; send it again"))

    @staticmethod
    def _op_name(raw: str) -> str | None:
        with contextlib.suppress(Exception):
            name = orjson.loads(raw).get("op")
            return name if isinstance(name, str) and len(name) <= 32 else None
        return None

    async def _operation(self, client: LiveClient, raw: str) -> None:
        op: Any = None
        if len(raw) <= MAX_OP_BYTES:
            with contextlib.suppress(orjson.JSONDecodeError):
                op = orjson.loads(raw)
        if not isinstance(op, dict):
            client.push(control_frame("error", code="bad_request", message="send one JSON object with an op"))
            return
        name = op.get("op")
        if name == "ping":
            client.push(control_frame("pong"))
        elif name == "subscribe":
            await self._subscribe(client, op.get("topics"))
        elif name == "unsubscribe":
            topics = op.get("topics")
            names = [t for t in topics if isinstance(t, str)] if isinstance(topics, list) else []
            self._hub.unsubscribe(client, names)
            client.push(control_frame("unsubscribed", topics=names))
        elif name == "resume":
            await self._resume(client, op.get("after"))
        elif name == "receipt":
            await self._receipt(client, op.get("alert_id"), op.get("version"))
        else:
            client.push(control_frame("error", code="bad_request", message=f"unknown op {name!r}"))

    async def _subscribe(self, client: LiveClient, raw: object) -> None:
        if not isinstance(raw, list) or not raw:
            client.push(control_frame("error", code="bad_request", message="topics must be a non-empty list"))
            return
        await self._hub.ready()
        allowed: list[Topic] = []
        beds: dict[str, str | None] = {}
        for name in dict.fromkeys(str(t) if not isinstance(t, str) else t for t in raw):
            if len(client.topics) + len(allowed) >= MAX_TOPICS:
                self._refuse(
                    client, name, Refusal("bad_topic", f"at most {MAX_TOPICS} topics per connection")
                )
                continue
            topic = parse_topic(name)
            if topic is None:
                self._refuse(client, name, Refusal("bad_topic", "unknown topic syntax"))
                continue
            why, where = await self._check(client.principal, topic)
            if why is not None:
                self._refuse(client, name, why)
                continue
            allowed.append(topic)
            beds.update(where)
        client.push(control_frame("subscribed", topics=[t.name for t in allowed]))
        self._hub.subscribe(client, allowed, beds)

    async def _resume(self, client: LiveClient, raw: object) -> None:
        await self._hub.ready()
        live = self._ctx.live
        after = resume_decision(raw, await live.oldest(), live.end())
        if after is None:
            client.push(control_frame("resync"))
            return
        # Permissions again: the caller's beds and patients may have moved since it first subscribed.
        beds: dict[str, str | None] = {}
        for name in sorted(client.topics):
            topic = parse_topic(name)
            if topic is None:
                continue
            why, where = await self._check(client.principal, topic)
            if why is not None:
                self._hub.unsubscribe(client, [name])
                self._refuse(client, name, why)
            beds.update(where)
        await self._hub.replay(client, after, beds)

    async def _receipt(self, client: LiveClient, alert_id: object, version: object) -> None:
        """The client showed this alert version to its user (ACM status): record it, time delivery once."""
        if (
            not isinstance(alert_id, str)
            or not 0 < len(alert_id) <= 255
            or isinstance(version, bool)
            or not isinstance(version, int)
        ):
            client.push(
                control_frame("error", code="bad_request", message="a receipt names alert_id and version")
            )
            return
        await self._hub.ready()
        known = self._hub.alerts.get(alert_id)
        p = client.principal
        if known is None or not p.sees(known.site_id, known.unit_id) or not 0 < version <= known.version:
            # An unknown alert and one of another site or unit get the same answer.
            client.push(
                control_frame("error", code="not_found", alert_id=alert_id, message="no such alert version")
            )
            return
        now = self._ctx.clock.now_ms()
        if self._ctx.on_receipt is not None:
            try:
                await self._ctx.on_receipt(alert_id, version, p.username, now)
            except Exception:
                log.exception("websocket: recording the receipt of %s v%d failed", alert_id, version)
                client.push(
                    control_frame(
                        "error",
                        code="unavailable",
                        alert_id=alert_id,
                        message="receipt not recorded; send again",
                    )
                )
                return
        updated_at = known.updated_at.get(version)
        if updated_at is not None and self._hub.receipts.add(f"{alert_id}/{version}/{p.username}"):
            ALERT_DELIVERY.observe(max(0, now - updated_at) / 1000)
        client.push(control_frame("receipt", alert_id=alert_id, version=version))

    async def _check(
        self, principal: Principal, topic: Topic
    ) -> tuple[Refusal | None, Mapping[str, str | None]]:
        if topic.kind not in PLACE_KINDS:
            return refusal(principal, topic, None), {}
        try:
            scope, beds = await resolve(self._ctx.db, topic)
        except Exception:
            log.exception("websocket: looking up %s failed", topic.name)
            return Refusal("unavailable", "could not check this topic now; try again"), {}
        return refusal(principal, topic, scope), beds

    @staticmethod
    def _refuse(client: LiveClient, name: str, why: Refusal) -> None:
        client.push(control_frame("error", code=why.code, topic=name, message=why.message))
