"""The live fan-out hub: latest state per bed and patient, the vitals merge window, routing by topic.

The pure parts (`parse_topic`, `refusal`, `resume_decision`, `LatestState`, `AlertBook`, `VitalsMerger`,
`Subscriptions`) take the time as an argument and do no I/O, so they are tested without sockets or sleeping.
`LiveHub` runs them on the event loop: it tails the live feed and pushes frames, encoded once per topic, into
each client's bounded queue (`LiveClient`); `api/ws.py` moves frames between that queue and the socket.
Alerts follow IHE PCD ACM's report, disseminate, status: each new version to its places' subscribers, pages
to the named users, receipts back (`api/ws.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from api.app import iso
from api.auth import CLINICAL_ROLES, Principal
from streams.clock import Clock
from streams.codes import ACVPU, resolve_code
from streams.live import LiveFeed, LiveRecord
from streams.schemas import Alert, AlertPage, LiveUpdate, ObsItem

log = logging.getLogger(__name__)

MERGE_WINDOW_S = 1.0  # further vitals changes of a bed within this time of a send are merged into one
QUEUE_LIMIT = 1000  # frames waiting for one client; beyond it the client is closed as a slow consumer
CLOSE_SLOW_CONSUMER = 4008
CLOSE_UNAUTHORISED = 4401
YIELD_EVERY = 100  # live records applied between yields to the client writers (each may add 3 frames)
ALERT_MEMORY = 50_000  # alert ids whose latest version is remembered (upstream emits are at-least-once)
PAGE_MEMORY = 50_000  # page keys already pushed, and receipts already timed
VERSIONS_KEPT = 16  # per alert, the versions whose updated_at a receipt can be timed against

PLACE_KINDS = ("patient", "bed", "unit")
_TOPIC = re.compile(r"^(patient|bed|unit|queue|consult):([A-Za-z0-9._:-]{1,64})$")
_TOPIC_ROLES = {
    "alerts": frozenset(("nurse", "charge_nurse", "doctor", "admin")),
    "incidents": frozenset(("dispatcher", "admin")),
}
_PLACE_ROLES = frozenset(CLINICAL_ROLES)


# -- topics and permissions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed subscription topic: `kind` is patient, bed, unit, queue, consult, alerts or incidents."""

    kind: str
    ref: str | None = None

    @property
    def name(self) -> str:
        return self.kind if self.ref is None else f"{self.kind}:{self.ref}"


def parse_topic(raw: object) -> Topic | None:
    """The topic named by `raw`, or None when it is not one the protocol knows."""
    if not isinstance(raw, str):
        return None
    if raw in _TOPIC_ROLES:
        return Topic(raw)
    m = _TOPIC.match(raw)
    return Topic(m[1], m[2]) if m else None


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a bed, unit or patient is now: what permissions are decided on."""

    site_id: str
    unit_id: str | None


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str  # forbidden, not_found, bad_topic, unavailable
    message: str


def refusal(principal: Principal, topic: Topic, scope: Scope | None) -> Refusal | None:
    """Why `principal` may not subscribe to `topic` (None: it may). `scope` is None for an unknown place.

    An unknown place and one of another site or unit get the same answer, so a refusal reveals nothing.
    """
    if topic.kind in _TOPIC_ROLES:
        if principal.role in _TOPIC_ROLES[topic.kind]:
            return None
        return Refusal("forbidden", f"role {principal.role} may not subscribe to {topic.kind}")
    if topic.kind in ("queue", "consult"):
        return Refusal("not_found", f"{topic.kind} topics are not available yet in this version")
    if principal.role not in _PLACE_ROLES:
        return Refusal("forbidden", f"role {principal.role} may not follow patients, beds or units")
    if scope is None or not principal.sees(scope.site_id, scope.unit_id):
        return Refusal("forbidden", f"no such {topic.kind} that you may see")
    return None


def resume_decision(after: object, oldest: int, end: int) -> int | None:
    """The cursor to resume after, or None when the client must resync.

    A valid cursor names a record still kept (or the one just before the oldest kept) or already issued:
    `oldest - 1 <= after < end`. A cursor at or past `end` was never issued by this feed.
    """
    if isinstance(after, bool):
        return None
    if isinstance(after, str) and after.lstrip("-").isdigit() and len(after) < 20:
        after = int(after)
    if not isinstance(after, int):
        return None
    if after < oldest - 1 or after >= end:
        return None
    return after


# -- messages --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Push:
    """One server message before its topic is known: `data` is encoded once for every topic and client."""

    cursor: int
    kind: str  # vitals, device, pump, news2, alert, page
    topics: tuple[str, ...]  # where it is routed: patient:P, bed:B, unit:U (and alerts for an alert)
    site_id: str
    unit_id: str | None
    data: str  # the JSON of the `data` object

    def frame(self, topic: str) -> str:
        name = orjson.dumps(topic).decode()
        return f'{{"id":{self.cursor},"type":"{self.kind}","topic":{name},"data":{self.data}}}'


def control_frame(kind: str, **fields: Any) -> str:
    """A message without a cursor: subscribed, error, resync, pong."""
    return orjson.dumps({"type": kind, **fields}).decode()


def state_key(u: LiveUpdate) -> str:
    """What vitals merge and latest state are kept per: the bed, else the patient, else the device."""
    if u.bed_id:
        return f"bed:{u.bed_id}"
    if u.patient_id:
        return f"patient:{u.patient_id}"
    return f"device:{u.device_id}"


def route(u: LiveUpdate) -> tuple[str, ...]:
    out = []
    if u.patient_id:
        out.append(f"patient:{u.patient_id}")
    if u.bed_id:
        out.append(f"bed:{u.bed_id}")
    if u.unit_id:
        out.append(f"unit:{u.unit_id}")
    return tuple(out)


def _envelope(u: LiveUpdate) -> dict[str, Any]:
    return {
        "site_id": u.site_id,
        "unit_id": u.unit_id,
        "bed_id": u.bed_id,
        "patient_id": u.patient_id,
        "device_id": u.device_id,
        "at": iso(u.at),
    }


def _value(item: ObsItem) -> dict[str, Any]:
    value = item.value
    if item.code == "acvpu" and not isinstance(value, str):
        value = ACVPU[int(value)]
    return {
        "code": item.code,
        "value": value,
        "unit": item.unit,
        "ts": iso(item.ts),
        "flags": list(item.flags),
    }


def _alias(code: str) -> str:
    info = resolve_code(code)
    return info.alias if info else code


def merge_items(updates: Iterable[LiveUpdate], into: dict[str, ObsItem] | None = None) -> dict[str, ObsItem]:
    """Newest value per code by its device time; a tie goes to the later record (updates in log order)."""
    values = {} if into is None else into
    for u in updates:
        for item in u.items:
            seen = values.get(item.code)
            if seen is None or item.ts >= seen.ts:
                values[item.code] = item
    return values


def vitals_push(cursor: int, newest: LiveUpdate, values: Mapping[str, ObsItem]) -> Push:
    data = _envelope(newest)
    data["values"] = {_alias(code): _value(item) for code, item in values.items()}
    return Push(cursor, "vitals", route(newest), newest.site_id, newest.unit_id, orjson.dumps(data).decode())


def state_push(cursor: int, u: LiveUpdate) -> Push:
    """A device or pump message; vitals go through `vitals_push`."""
    data = _envelope(u)
    if u.kind == "device":
        data["conditions"] = list(u.conditions)
        data["battery"] = u.battery
    else:
        for name in ("state", "drug", "rate_ml_h", "alarms"):
            data[name] = u.detail.get(name)
    return Push(cursor, u.kind, route(u), u.site_id, u.unit_id, orjson.dumps(data).decode())


def alert_push(cursor: int, a: Alert) -> Push:
    """One alert version, to `alerts` and to its patient, bed and unit: the contract's fields, where it is,
    and what the rule saw (label, value, unit, device, what inhibits it) when the engine said."""
    data: dict[str, Any] = {
        "id": a.id,
        "version": a.version,
        "patient_id": a.patient_id,
        "bed_id": a.bed_id,
        "site_id": a.site_id,
        "unit_id": a.unit_id,
        "condition": a.condition,
        "priority": a.priority,
        "status": a.status,
        "raised_at": iso(a.raised_at),
        "updated_at": iso(a.updated_at),
        "data_stale": a.data_stale,
        "retrospective": a.retrospective,
        "silenced_until": None if a.silenced_until is None else iso(a.silenced_until),
    }
    for name in ALERT_DETAIL:
        if name in a.detail:
            data[name] = a.detail[name]
    return Push(cursor, "alert", alert_route(a), a.site_id, a.unit_id, orjson.dumps(data).decode())


ALERT_DETAIL = ("label", "value", "unit", "device_id", "inhibited_by")


def alert_route(a: Alert) -> tuple[str, ...]:
    out = ["alerts"]
    if a.patient_id:
        out.append(f"patient:{a.patient_id}")
    if a.bed_id:
        out.append(f"bed:{a.bed_id}")
    if a.unit_id:
        out.append(f"unit:{a.unit_id}")
    return tuple(out)


def page_frame(cursor: int, page: AlertPage, username: str) -> str:
    """A page to one user, on each of its connections whatever they subscribed to (topic `user:NAME`)."""
    data = {
        "alert_id": page.alert_id,
        "alert_version": page.alert_version,
        "step": page.step,
        "level": page.level,
        "recipients": list(page.recipients),
        "site_id": page.site_id,
        "unit_id": page.unit_id,
        "bed_id": page.bed_id,
        "patient_id": page.patient_id,
        "condition": page.condition,
        "priority": page.priority,
        "at": iso(page.at),
    }
    return Push(cursor, "page", (), page.site_id, page.unit_id, orjson.dumps(data).decode()).frame(
        f"user:{username}"
    )


def news2_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's NEWS2 result with its times (the score's and each component's) as RFC 3339."""
    out = dict(result)
    if isinstance(out.get("ts"), int):
        out["ts"] = iso(out["ts"])
    components = out.get("components")
    if isinstance(components, dict):
        out["components"] = {
            k: {**c, "ts": iso(c["ts"])} if isinstance(c, dict) and isinstance(c.get("ts"), int) else c
            for k, c in components.items()
        }
    return out


def news2_push(cursor: int, u: LiveUpdate) -> Push:
    data = _envelope(u)
    del data["device_id"]
    data["news2"] = news2_json(u.detail.get("news2") or {})
    return Push(cursor, "news2", route(u), u.site_id, u.unit_id, orjson.dumps(data).decode())


# -- latest state ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class PlaceState:
    """The latest known state of one bed, patient or unbound device."""

    newest: LiveUpdate  # the newest record of any kind: where the place is now
    vitals: dict[str, ObsItem] = field(default_factory=dict)
    vitals_cursor: int = -1
    vitals_newest: LiveUpdate | None = None
    devices: dict[str, tuple[int, LiveUpdate]] = field(default_factory=dict)  # device status per device
    pumps: dict[str, tuple[int, LiveUpdate]] = field(default_factory=dict)
    news2: tuple[int, LiveUpdate] | None = None  # the newest NEWS2 of the patient (in this bed)

    def pushes(self, after: int = -1) -> list[Push]:
        """This place's state as messages, those with a cursor after `after`, oldest first."""
        out = []
        if self.vitals_newest is not None and self.vitals_cursor > after:
            out.append(vitals_push(self.vitals_cursor, self.vitals_newest, self.vitals))
        for cursor, u in (*self.devices.values(), *self.pumps.values()):
            if cursor > after:
                out.append(state_push(cursor, u))
        if self.news2 is not None and self.news2[0] > after:
            out.append(news2_push(*self.news2))
        out.sort(key=lambda p: p.cursor)
        return out


class LatestState:
    """Latest state per bed and per patient (and per device bound to neither), warmed from the live feed,
    and the open alerts of each patient, bed and unit."""

    def __init__(self) -> None:
        self._places: dict[str, PlaceState] = {}
        self._by_unit: dict[str, set[str]] = {}
        self._open: dict[str, tuple[int, Alert]] = {}  # alert id -> (cursor, newest version), not closed
        self._open_at: dict[str, set[str]] = {}  # patient:P, bed:B, unit:U -> open alert ids

    def apply(self, cursor: int, u: LiveUpdate) -> None:
        keys = [state_key(u)]
        if u.bed_id and u.patient_id:
            keys.append(f"patient:{u.patient_id}")
        for key in keys:
            st = self._places.get(key)
            self._index(key, None if st is None else st.newest.unit_id, u.unit_id)
            if st is None or (key.startswith("bed:") and st.newest.patient_id != u.patient_id):
                st = PlaceState(u)  # a bed's new patient starts clean: nothing leaks between patients
                self._places[key] = st
            st.newest = u
            if u.kind == "vitals":
                merge_items((u,), st.vitals)
                st.vitals_cursor, st.vitals_newest = cursor, u
            elif u.kind == "device":
                st.devices[u.device_id] = (cursor, u)
            elif u.kind == "pump":
                st.pumps[u.device_id] = (cursor, u)
            elif u.kind == "news2":
                st.news2 = (cursor, u)

    def apply_alert(self, cursor: int, a: Alert) -> None:
        """Keep the newest version of each open alert with its places; a closed one is forgotten.

        Call it with new versions only (`AlertBook.offer`): an older one would reopen a closed alert.
        """
        seen = self._open.pop(a.id, None)
        if seen is not None:
            for key in alert_route(seen[1])[1:]:
                ids = self._open_at.get(key)
                if ids is not None:
                    ids.discard(a.id)
                    if not ids:
                        del self._open_at[key]
        if a.status == "closed":
            return
        self._open[a.id] = (cursor, a)
        for key in alert_route(a)[1:]:
            self._open_at.setdefault(key, set()).add(a.id)

    def open_alerts(self, topic: Topic, beds: Mapping[str, str | None]) -> list[Push]:
        """The open alerts a new subscriber of `topic` is sent, oldest change first.

        On a bed or unit, a patient's alert shows only while the patient is in that bed (`beds`), as values
        do.
        """
        out = []
        for alert_id in self._open_at.get(topic.name, ()):
            cursor, a = self._open[alert_id]
            if topic.kind != "patient" and a.bed_id and a.patient_id and beds.get(a.bed_id) != a.patient_id:
                continue
            out.append(alert_push(cursor, a))
        out.sort(key=lambda p: p.cursor)
        return out

    def _index(self, key: str, old: str | None, new: str | None) -> None:
        if old != new and old is not None:
            self._by_unit.get(old, set()).discard(key)
        if new is not None:
            self._by_unit.setdefault(new, set()).add(key)

    def place(self, key: str) -> PlaceState | None:
        return self._places.get(key)

    def pushes(self, topic: Topic, beds: Mapping[str, str | None], after: int = -1) -> list[Push]:
        """The latest state a subscriber of `topic` is sent (alerts apart: `open_alerts`); `beds` maps each
        bed concerned to its patient.

        A bed's state is sent only while the bed holds the patient it was recorded for, so a discharged or
        transferred patient's values never show on the bed's next occupant.
        """
        if topic.kind == "patient":
            st = self._places.get(topic.name)
            return st.pushes(after) if st else []
        if topic.kind == "bed":
            return self._bed(topic.name, beds, after)
        if topic.kind == "unit" and topic.ref is not None:
            out = []
            for key in sorted(self._by_unit.get(topic.ref, ())):
                if key.startswith("bed:"):
                    out.extend(self._bed(key, beds, after))
                    continue
                st = self._places[key]
                if st.newest.bed_id is None:  # a patient in a bed is shown through the bed
                    out.extend(st.pushes(after))
            return out
        return []

    def _bed(self, key: str, beds: Mapping[str, str | None], after: int) -> list[Push]:
        st = self._places.get(key)
        bed_id = key.removeprefix("bed:")
        if st is None or bed_id not in beds or beds[bed_id] != st.newest.patient_id:
            return []
        return st.pushes(after)


@dataclass(slots=True)
class KnownAlert:
    """What the hub remembers of an alert: where it is, its newest version, when recent versions changed."""

    site_id: str
    unit_id: str | None
    version: int
    updated_at: dict[int, int]  # version -> updated_at (ms), the newest `VERSIONS_KEPT`


class AlertBook:
    """The newest version seen per alert id, bounded (the oldest-changed alert is forgotten first)."""

    def __init__(self, limit: int = ALERT_MEMORY) -> None:
        self._limit = limit
        self._alerts: OrderedDict[str, KnownAlert] = OrderedDict()

    def offer(self, a: Alert) -> bool:
        """True for a new version; False for one seen already or older (at-least-once emits upstream)."""
        known = self._alerts.get(a.id)
        if known is not None and known.version >= a.version:
            return False
        if known is None:
            known = self._alerts[a.id] = KnownAlert(a.site_id, a.unit_id, a.version, {})
            if len(self._alerts) > self._limit:
                self._alerts.popitem(last=False)
        else:
            self._alerts.move_to_end(a.id)
        known.site_id, known.unit_id, known.version = a.site_id, a.unit_id, a.version
        known.updated_at[a.version] = a.updated_at
        if len(known.updated_at) > VERSIONS_KEPT:
            del known.updated_at[min(known.updated_at)]
        return True

    def get(self, alert_id: str) -> KnownAlert | None:
        return self._alerts.get(alert_id)

    def __len__(self) -> int:
        return len(self._alerts)


class BoundedSet:
    """Keys seen lately (page keys, receipts), forgetting the oldest beyond `limit`."""

    def __init__(self, limit: int = PAGE_MEMORY) -> None:
        self._limit = limit
        self._keys: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        """True the first time `key` is seen."""
        if key in self._keys:
            return False
        self._keys[key] = None
        if len(self._keys) > self._limit:
            self._keys.popitem(last=False)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._keys


# -- merging ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Window:
    until: float
    pending: list[tuple[int, LiveUpdate]] = field(default_factory=list)


class VitalsMerger:
    """Per bed (else patient, else device): the first vitals change goes at once, later ones within the
    window are merged into one message sent when it closes, which opens the next window."""

    def __init__(self, window_s: float = MERGE_WINDOW_S) -> None:
        self._window = window_s
        self._windows: dict[str, _Window] = {}
        self._due: list[tuple[float, str]] = []

    def offer(self, cursor: int, u: LiveUpdate, now: float) -> list[Push]:
        key = state_key(u)
        w = self._windows.get(key)
        out: list[Push] = []
        if w is not None and (now >= w.until or (w.pending and w.pending[-1][1].patient_id != u.patient_id)):
            # A late timer, or the bed changed hands: send what is held first, never mixed with the new.
            out.extend(self._flush(w))
            w = None
        if w is None:
            self._open(key, now)
            out.append(vitals_push(cursor, u, merge_items((u,))))
            return out
        w.pending.append((cursor, u))
        return out

    def due(self, now: float) -> list[Push]:
        """Merged messages of windows closed by `now`; a window that sent one stays open one more period."""
        out: list[Push] = []
        while self._due and self._due[0][0] <= now:
            until, key = heapq.heappop(self._due)
            w = self._windows.get(key)
            if w is None or w.until != until:
                continue
            if w.pending:
                out.extend(self._flush(w))
                # The next window starts when this one was due, not when the timer ran: otherwise every
                # timer's lateness shifts the window, and a device at exactly 1 Hz drifts into being held.
                self._open(key, until)
            else:
                del self._windows[key]
        return out

    def next_due(self) -> float | None:
        while self._due:
            until, key = self._due[0]
            w = self._windows.get(key)
            if w is not None and w.until == until:
                return until
            heapq.heappop(self._due)
        return None

    def _open(self, key: str, start: float) -> None:
        until = start + self._window
        self._windows[key] = _Window(until)
        heapq.heappush(self._due, (until, key))

    def _flush(self, w: _Window) -> list[Push]:
        if not w.pending:
            return []
        cursor, newest = w.pending[-1]
        values = merge_items(u for _, u in w.pending)
        w.pending = []
        return [vitals_push(cursor, newest, values)]


# -- subscriptions ---------------------------------------------------------------------------------------


class LiveClient:
    """One connection as the hub sees it: who it is, and a bounded queue of frames waiting for the socket."""

    def __init__(self, principal: Principal, *, limit: int = QUEUE_LIMIT) -> None:
        self.principal = principal
        self.topics: set[str] = set()
        self._queue: deque[str] = deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def push(self, frame: str) -> bool:
        """Queue a frame without waiting; a full queue closes the client (4008). False once closed."""
        if self.closed.done():
            return False
        if len(self._queue) >= self._limit:
            self._queue.clear()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            return False
        self._queue.append(frame)
        self._ready.set()
        return True

    def close(self, code: int, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result((code, reason))

    def pending(self) -> int:
        return len(self._queue)

    async def next(self) -> str:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()


class Subscriptions:
    """Which clients follow which topic, both ways."""

    def __init__(self) -> None:
        self._by_topic: dict[str, set[LiveClient]] = {}

    def add(self, client: LiveClient, topics: Iterable[str]) -> None:
        for t in topics:
            self._by_topic.setdefault(t, set()).add(client)
            client.topics.add(t)

    def remove(self, client: LiveClient, topics: Iterable[str]) -> None:
        for t in list(topics):
            subs = self._by_topic.get(t)
            if subs is not None:
                subs.discard(client)
                if not subs:
                    del self._by_topic[t]
            client.topics.discard(t)

    def drop(self, client: LiveClient) -> None:
        self.remove(client, client.topics)

    def clients(self, topic: str) -> set[LiveClient]:
        return self._by_topic.get(topic, set())

    def __len__(self) -> int:
        return len(self._by_topic)


def deliver(subs: Subscriptions, pushes: Iterable[Push]) -> list[LiveClient]:
    """Queue each push for the subscribers of each of its topics, encoding once per topic.

    A patient's topic is checked per client, since a transfer can take the patient to a unit the
    subscriber may not see; bed and unit topics cannot change place. Returns the clients it closed.
    """
    closed: list[LiveClient] = []
    for p in pushes:
        for topic in p.topics:
            clients = subs.clients(topic)
            if not clients:
                continue
            frame = p.frame(topic)
            check = topic == "alerts" or topic.startswith("patient:")
            for c in list(clients):
                if check and not c.principal.sees(p.site_id, p.unit_id):
                    continue
                if not c.push(frame):
                    subs.drop(c)
                    closed.append(c)
    return closed


# -- the hub ---------------------------------------------------------------------------------------------


class LiveHub:
    """One per API process: tails the live feed from its oldest record (so latest state survives a restart),
    then follows it, merging vitals, routing every update to its subscribers and every page to its users."""

    def __init__(
        self, feed: LiveFeed, clock: Clock, *, window_s: float = MERGE_WINDOW_S, batch: int = 1000
    ) -> None:
        self._feed = feed
        self._clock = clock
        self._batch = batch
        self.state = LatestState()
        self.merger = VitalsMerger(window_s)
        self.subs = Subscriptions()
        self.position = -1  # the newest cursor applied: later ones reach subscribers live
        self.alerts = AlertBook()
        self.receipts = BoundedSet()  # (alert, version, user) receipts already timed on this node
        self._pages = BoundedSet()  # page keys already pushed
        self._users: dict[str, set[LiveClient]] = {}  # connections per username, for pages and presence
        self._warm: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def start(self) -> None:
        """Start tailing the feed (once; again if the tail died)."""
        if self._task is None or self._task.done():
            self._warm = self._warm or asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._tail_loop(), name="live-hub")

    async def ready(self) -> None:
        """Wait until the latest-state cache holds everything the feed had when the hub started."""
        self.start()
        assert self._warm is not None
        await self._warm.wait()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(self, client: LiveClient, topics: Sequence[Topic], beds: Mapping[str, str | None]) -> None:
        """Follow `topics` and queue their latest state, in one step so that no update falls between."""
        self.subs.add(client, (t.name for t in topics))
        for t in topics:
            pushes = self.state.pushes(t, beds) + self.state.open_alerts(t, beds)
            pushes.sort(key=lambda p: p.cursor)
            for p in pushes:
                if not client.push(p.frame(t.name)):
                    return

    def unsubscribe(self, client: LiveClient, topics: Iterable[str]) -> None:
        self.subs.remove(client, topics)

    def attach(self, client: LiveClient) -> None:
        """A connection of `client.principal.username`: it receives that user's pages."""
        self._users.setdefault(client.principal.username, set()).add(client)

    def detach(self, client: LiveClient) -> None:
        self.subs.drop(client)
        users = self._users.get(client.principal.username)
        if users is not None:
            users.discard(client)
            if not users:
                del self._users[client.principal.username]

    def connected_users(self) -> frozenset[str]:
        """Usernames with an open websocket on this node (escalation: nobody connected escalates at once)."""
        return frozenset(self._users)

    async def replay(self, client: LiveClient, after: int, beds: Mapping[str, str | None]) -> None:
        """After a resume: the latest state changed after `after`, then every alert version after it in full
        (to `alerts` and to the client's patient, bed and unit topics) and every page to its user."""
        position = self.position  # later records reach the client live: none is sent twice
        for name in sorted(client.topics):
            t = parse_topic(name)
            if t is not None and t.kind in PLACE_KINDS:
                for p in self.state.pushes(t, beds, after):
                    if not client.push(p.frame(name)):
                        return
        user = client.principal.username
        versions: dict[str, int] = {}  # the feed may repeat a version: each is sent once
        pages = BoundedSet()
        cursor = after
        while cursor < position:
            records = await self._feed.after(cursor, self._batch)
            if not records:
                break
            for r in records:
                if r.cursor > position:
                    return
                event = r.event
                if isinstance(event, Alert):
                    if versions.get(event.id, 0) >= event.version:
                        continue
                    versions[event.id] = event.version
                    if not client.principal.sees(event.site_id, event.unit_id):
                        continue
                    push = alert_push(r.cursor, event)
                    for topic in push.topics:
                        if topic in client.topics and not client.push(push.frame(topic)):
                            return
                elif (
                    isinstance(event, AlertPage)
                    and user in event.recipients
                    and pages.add(event.key)
                    and not client.push(page_frame(r.cursor, event, user))
                ):
                    return
            cursor = records[-1].cursor
            await asyncio.sleep(0)  # let the writer drain before the next page

    # -- the feed --

    async def _tail_loop(self) -> None:
        assert self._warm is not None
        warm_to: int | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                if warm_to is None:
                    self.position = await self._feed.oldest() - 1
                    warm_to = self._feed.end() - 1
                records = await self._read(self.position)
                live = self._warm.is_set()
                for i, r in enumerate(records, 1):
                    self._apply(r, live=live)
                    self.position = max(self.position, r.cursor)
                    if live and i % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # writers drain between slices: a burst overflows no one
                if records:
                    self._arm_timer()
                if not self._warm.is_set() and self.position >= warm_to:
                    self._warm.set()
                    log.info("live hub warm at cursor %d", self.position)
                if not records:
                    began = loop.time()
                    await self._feed.wait(self.position, 1.0)
                    if self._feed.end() - 1 <= self.position and loop.time() - began < 0.01:
                        # Nothing new, yet `wait` returned (a closed log returns at once, and may not even
                        # suspend): never spin, or the loop starves and the process cannot shut down.
                        await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("live hub: reading the live feed failed; retrying")
                await asyncio.sleep(0.5)

    async def _read(self, cursor: int) -> Sequence[LiveRecord]:
        try:
            return await self._feed.after(cursor, self._batch)
        except ValueError:
            # An undecodable record (a newer schema) must not stall every board: find it and step over it.
            try:
                return await self._feed.after(cursor, 1)
            except ValueError:
                log.exception("live hub: skipping the live record after cursor %d", cursor)
                self.position = cursor + 1
                return []

    def _apply(self, record: LiveRecord, *, live: bool) -> None:
        event = record.event
        if isinstance(event, LiveUpdate):
            self.state.apply(record.cursor, event)
            if not live:
                return
            if event.kind == "vitals":
                pushes = self.merger.offer(record.cursor, event, self._clock.monotonic())
            elif event.kind == "news2":
                pushes = [news2_push(record.cursor, event)]
            else:
                pushes = [state_push(record.cursor, event)]
        elif isinstance(event, Alert):
            if not self.alerts.offer(event):
                return
            self.state.apply_alert(record.cursor, event)
            if not live:
                return
            pushes = [alert_push(record.cursor, event)]
        elif isinstance(event, AlertPage):
            # A skipped level names nobody; a page seen during warm-up is history, not news.
            if event.recipients and self._pages.add(event.key) and live:
                self._page(record.cursor, event)
            return
        else:
            return
        deliver(self.subs, pushes)

    def _page(self, cursor: int, page: AlertPage) -> None:
        """To every connection of each recipient: the escalation policy named them, so no topic is needed."""
        for user in dict.fromkeys(page.recipients):
            clients = self._users.get(user)
            if not clients:
                continue
            frame = page_frame(cursor, page, user)
            for c in list(clients):
                if not c.push(frame):
                    self.detach(c)

    def _arm_timer(self) -> None:
        due = self.merger.next_due()
        if due is None or (self._timer is not None and self._timer_at <= due):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        delay = max(0.0, due - self._clock.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            deliver(self.subs, self.merger.due(self._clock.monotonic()))
        except Exception:
            log.exception("live hub: sending merged vitals failed")
        self._arm_timer()
