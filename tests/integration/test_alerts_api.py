"""Alerts over REST through the real hub (`vigil run`, its clinical engine included): a desaturation sent
over MQTT is listed, acknowledged by the nurse (audited as hers), silenced, closed on recovery; nobody
outside the unit sees it; limit overrides and NEWS2 settings reach the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
import websockets

from api.app import ApiContext, create_app
from api.auth import Principal, TokenIssuer
from records.alerts import AlertStore
from records.db import Database, sqlite_url
from streams import topics
from streams.clock import SystemClock
from streams.effects import AlertVersion
from streams.schemas import Alert, AlertCommand, decode
from tests.hub import Hub

pytestmark = pytest.mark.integration

T = TypeVar("T")
PW = "pw-of-a-clinician"
WAIT = 20.0
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CONTRACT = {
    "id", "version", "patient_id", "bed_id", "condition", "priority", "status", "raised_at", "updated_at",
    "data_stale", "retrospective", "silenced_until",
}  # fmt: skip
USERS = (  # (name, role, extra CLI arguments)
    ("nina", "nurse", ["--unit", "icu"]),
    ("wanda", "nurse", ["--unit", "ward"]),
    ("carl", "charge_nurse", ["--unit", "icu"]),
    ("dora", "doctor", ["--site", "default"]),
    ("ed", "nurse", ["--site", "s2"]),
    ("cora", "charge_nurse", ["--site", "s2"]),
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def until(hub: Hub, predicate: Callable[[], T | None]) -> T:
    found: T = hub.wait_for(predicate, timeout=WAIT)
    return found


class Monitor:
    """A bedside monitor publishing over MQTT with mosquitto_pub (QoS 1: returns once the hub holds it)."""

    def __init__(self, hub: Hub, device_id: str, unit: str, bed: str, patient: str) -> None:
        out = hub.add_device(device_id, "monitor", "--unit", unit, "--bed", bed, "--patient", patient)
        self.hub, self.id, self.secret, self.patient = hub, out["id"], out["secret"], patient
        self.seq = 0

    def send(self, spo2: float, seconds: int, start: int) -> None:
        """One reading a second of device time from `start` (in the past: the on-delay is met at once)."""
        lines = []
        for i in range(seconds):
            self.seq += 1
            items = [{"code": "spo2", "value": spo2}, {"code": "hr", "value": 88}]
            lines.append(
                json.dumps({"seq": self.seq, "boot": "b1", "ts": iso(start + i * 1000), "obs": items})
            )
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.hub.mqtt_port), "-q", "1"]
        argv += ["-u", self.id, "-P", self.secret, "-t", f"vigil/v1/{self.id}/obs", "-l"]
        r = subprocess.run(
            argv, input="\n".join(lines).encode(), capture_output=True, check=False, timeout=30
        )
        assert r.returncode == 0, r.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("hub-alerts")).start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def icu(hub: Hub) -> Monitor:
    return Monitor(hub, "mon-icu-1", "icu", "icu-1", "P-1")


@pytest.fixture(scope="module")
def ward(hub: Hub) -> Monitor:
    mon = Monitor(hub, "mon-ward-1", "ward", "ward-1", "P-W")
    hub.add_device("mon-er-1", "monitor", "--site", "s2", "--unit", "er", "--bed", "er-1", "--patient", "P-9")
    return mon


@pytest.fixture(scope="module")
def tokens(hub: Hub, icu: Monitor, ward: Monitor) -> dict[str, str]:
    for name, role, extra in USERS:
        hub.add_user(name, role, *extra, "--password", PW)
    return {name: hub.token(name, PW) for name, _, _ in USERS}


def alerts(hub: Hub, token: str, **params: str) -> list[dict[str, Any]]:
    r = hub.api("GET", "/api/v1/alerts", params=params, token=token)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


def open_alert(hub: Hub, token: str, patient: str, condition: str) -> Callable[[], dict[str, Any] | None]:
    def find() -> dict[str, Any] | None:
        found = [a for a in alerts(hub, token, patient_id=patient) if a["condition"] == condition]
        return found[0] if found else None

    return find


def test_a_desaturation_is_listed_acknowledged_by_the_nurse_audited_and_closes_on_recovery(
    hub: Hub, icu: Monitor, tokens: dict[str, str]
) -> None:
    nina = tokens["nina"]
    start = now_ms() - 60_000
    icu.send(70, 20, start)
    alert = until(hub, open_alert(hub, nina, "P-1", "spo2_critical"))
    assert alert.keys() >= CONTRACT
    assert (alert["status"], alert["priority"], alert["bed_id"]) == ("active_unack", "high", "icu-1")
    assert (alert["unit_id"], alert["site_id"], alert["label"], alert["unit"]) == (
        "icu", "default", "SpO2 critically low", "%",
    )  # fmt: skip
    assert RFC3339_MS.match(alert["raised_at"]) and RFC3339_MS.match(alert["updated_at"])

    snapshot = hub.api("GET", "/api/v1/patients/P-1", token=nina).json()
    assert alert["id"] in [a["id"] for a in snapshot["alerts"]]

    r = hub.api("POST", f"/api/v1/alerts/{alert['id']}/ack", token=nina)
    assert r.status_code == 200, r.text
    acked = r.json()
    assert acked["status"] == "active_ack" and acked["version"] > alert["version"]
    again = hub.api("POST", f"/api/v1/alerts/{alert['id']}/ack", token=nina)
    assert again.status_code == 200 and again.json()["version"] == acked["version"]  # nothing to do
    resolve = hub.api("POST", f"/api/v1/alerts/{alert['id']}/resolve", token=nina)
    assert resolve.status_code == 409, resolve.text  # the condition persists: it cannot be closed by hand

    too_long = hub.api("POST", f"/api/v1/alerts/{alert['id']}/silence", json={"duration_s": 121}, token=nina)
    assert too_long.status_code == 422
    before = now_ms()
    r = hub.api("POST", f"/api/v1/alerts/{alert['id']}/silence", json={"duration_s": 60}, token=nina)
    assert r.status_code == 200, r.text
    until_ms = datetime.fromisoformat(r.json()["silenced_until"]).timestamp() * 1000
    assert before + 55_000 <= until_ms <= now_ms() + 61_000

    # The acknowledgement is audited once, as the nurse's (the engine's version row, not the API).
    rows = hub.api("GET", "/api/v1/audit", params={"target_type": "alert", "target_id": alert["id"]}).json()
    acks = [(e["action"], e["actor"]) for e in rows["items"] if e["action"] == "alert.acknowledged"]
    assert acks == [("alert.acknowledged", "nina")]
    detail = hub.api("GET", f"/api/v1/alerts/{alert['id']}", token=nina).json()
    assert [(v["to_status"], v["by"]) for v in detail["history"]][:2] == [
        ("active_unack", None),
        ("active_ack", "nina"),
    ]
    assert detail["pages"] and all(RFC3339_MS.match(p["at"]) for p in detail["pages"])
    assert detail["receipts"] == []

    icu.send(97, 5, start + 20_000)

    def closed() -> dict[str, Any] | None:
        a = hub.api("GET", f"/api/v1/alerts/{alert['id']}", token=nina).json()
        return a if a["status"] == "closed" else None

    until(hub, closed)
    assert alert["id"] not in [a["id"] for a in alerts(hub, nina)]
    assert alert["id"] in [a["id"] for a in alerts(hub, nina, status="closed")]
    late = hub.api("POST", f"/api/v1/alerts/{alert['id']}/ack", token=nina)
    assert late.status_code == 409, late.text
    history = hub.api("GET", "/api/v1/alerts/history", params={"patient_id": "P-1"}, token=nina).json()
    assert alert["id"] in [a["id"] for a in history["items"]]


def test_nobody_outside_the_unit_or_site_sees_or_acts_on_an_alert(
    hub: Hub, ward: Monitor, tokens: dict[str, str]
) -> None:
    ward.send(70, 20, now_ms() - 40_000)
    alert = until(hub, open_alert(hub, tokens["wanda"], "P-W", "spo2_critical"))
    path = f"/api/v1/alerts/{alert['id']}"
    for outsider in ("nina", "carl", "ed"):  # another unit of the site, and another site
        token = tokens[outsider]
        assert alert["id"] not in [a["id"] for a in alerts(hub, token, status="all")]
        assert hub.api("GET", path, token=token).status_code == 404
        assert hub.api("POST", f"{path}/ack", token=token).status_code == 404
        history = hub.api("GET", "/api/v1/alerts/history", token=token).json()["items"]
        assert alert["id"] not in [a["id"] for a in history]
    assert alert["id"] in [a["id"] for a in alerts(hub, tokens["dora"])]  # the site's doctor sees it
    assert hub.api("GET", path, token=tokens["wanda"]).status_code == 200


async def test_a_receipt_from_the_nurses_client_is_kept_with_the_alert(
    hub: Hub, ward: Monitor, tokens: dict[str, str]
) -> None:
    ward.send(70, 20, now_ms() - 40_000)
    alert = await asyncio.to_thread(until, hub, open_alert(hub, tokens["wanda"], "P-W", "spo2_critical"))
    url = f"ws://127.0.0.1:{hub.http_port}/ws"
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {tokens['wanda']}"}
    ) as ws:
        await ws.send(json.dumps({"op": "receipt", "alert_id": alert["id"], "version": alert["version"]}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            if frame.get("type") in ("receipt", "error"):
                break
    assert frame["type"] == "receipt", frame
    r = await asyncio.to_thread(hub.api, "GET", f"/api/v1/alerts/{alert['id']}", token=tokens["wanda"])
    receipts = [(x["version"], x["username"]) for x in r.json()["receipts"]]
    assert receipts == [(alert["version"], "wanda")]
    assert all(RFC3339_MS.match(x["received_at"]) for x in r.json()["receipts"])


def test_a_doctors_stricter_limit_raises_an_alarm_the_default_would_not(
    hub: Hub, icu: Monitor, tokens: dict[str, str]
) -> None:
    path = "/api/v1/patients/P-1/limits/spo2_low"
    body = {"threshold": 95, "unit": "%", "expires_at": iso(now_ms() + 3_600_000), "reason": "target 96 %"}
    assert hub.api("PUT", path, json=body, token=tokens["nina"]).status_code == 403
    assert hub.api("PUT", path, json=body, token=tokens["cora"]).status_code == 404  # another site
    far = {**body, "expires_at": iso(now_ms() + 73 * 3_600_000)}
    assert hub.api("PUT", path, json=far, token=tokens["dora"]).status_code == 422
    unknown = hub.api("PUT", "/api/v1/patients/P-1/limits/no_such_rule", json=body, token=tokens["dora"])
    assert unknown.status_code == 422
    r = hub.api("PUT", path, json=body, token=tokens["dora"])
    assert r.status_code == 200, r.text
    listed = hub.api("GET", "/api/v1/patients/P-1/limits", token=tokens["nina"]).json()["items"]
    assert [(o["condition"], o["threshold"], o["set_by"]) for o in listed] == [("spo2_low", 95.0, "dora")]

    icu.send(93, 20, now_ms() - 30_000)  # above the default limit of 90 %, below this patient's
    alert = until(hub, open_alert(hub, tokens["nina"], "P-1", "spo2_low"))
    assert alert["priority"] == "medium"

    assert hub.api("DELETE", path, token=tokens["carl"]).status_code == 200
    assert hub.api("DELETE", path, token=tokens["carl"]).status_code == 404
    assert hub.api("GET", "/api/v1/patients/P-1/limits", token=tokens["nina"]).json()["items"] == []
    actions = [
        (e["action"], e["actor"])
        for e in hub.api("GET", "/api/v1/audit", params={"target_id": "P-1"}).json()["items"]
        if e["action"].startswith("limits.")
    ]
    assert actions == [("limits.set", "dora"), ("limits.removed", "carl")]


def test_the_news2_scale_is_the_doctors_and_reaches_the_score(
    hub: Hub, icu: Monitor, tokens: dict[str, str]
) -> None:
    path = "/api/v1/patients/P-1/news2"
    assert hub.api("PUT", path, json={"spo2_scale": 2}, token=tokens["carl"]).status_code == 403
    assert hub.api("PUT", path, json={"spo2_scale": 3}, token=tokens["dora"]).status_code == 422
    r = hub.api("PUT", path, json={"spo2_scale": 2, "suppressed": False}, token=tokens["dora"])
    assert r.status_code == 200, r.text
    icu.send(96, 3, now_ms() - 5_000)

    def scored_on_scale_2() -> dict[str, Any] | None:
        news2 = hub.api("GET", "/api/v1/patients/P-1", token=tokens["nina"]).json()["news2"]
        return news2 if news2 and news2["scale"] == 2 else None

    news2 = until(hub, scored_on_scale_2)
    assert RFC3339_MS.match(news2["ts"]) and news2["complete"] is False  # no RR, temperature, ...
    audit = hub.api("GET", "/api/v1/audit", params={"target_id": "P-1"}).json()["items"]
    assert [e["actor"] for e in audit if e["action"] == "patient.news2"] == ["dora"]


def test_the_rules_in_force_are_public_to_clinicians(hub: Hub, tokens: dict[str, str]) -> None:
    r = hub.api("GET", "/api/v1/rules", token=tokens["nina"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["digest"] and body["safety_floor"]


# -- the API alone (no engine): what it sends, and what it answers while the engine has not answered ------


class Context:
    """The API on a real SQLite records database, with `publish` captured instead of a log."""

    def __init__(self, db: Database, apply: Callable[[AlertCommand], Awaitable[None]] | None) -> None:
        self.sent: list[tuple[str, str, AlertCommand]] = []
        self.issuer = TokenIssuer("a-key-for-this-test-only-" * 2)
        self._apply = apply

        async def publish(records: Sequence[tuple[str, str, bytes]]) -> None:
            for topic, key, value in records:
                cmd = decode(value)
                assert isinstance(cmd, AlertCommand)
                self.sent.append((topic, key, cmd))
                if self._apply is not None:
                    await self._apply(cmd)

        async def nothing(*_: Any) -> None:
            return None

        self.app = create_app(
            ApiContext(
                db=db,
                vitals=cast(Any, None),  # not read by these calls
                tokens=self.issuer,
                clock=SystemClock(),
                on_admission=nothing,
                live=cast(Any, None),
                submit=nothing,
                publish=publish,
            )
        )

    def client(self, username: str) -> httpx.AsyncClient:
        p = Principal(username, "nurse", frozenset({"s1"}), frozenset({"icu"}))
        token = self.issuer.issue(p, SystemClock().now_ms() // 1000)
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://api",
            headers={"Authorization": f"Bearer {token}"},
        )


def stored_alert(at: int) -> Alert:
    return Alert(
        id=f"P-1~spo2_low~{at}", version=1, patient_id="P-1", bed_id="icu-1", site_id="s1", unit_id="icu",
        condition="spo2_low", priority="medium", status="active_unack", raised_at=at, updated_at=at,
    )  # fmt: skip


async def test_an_ack_goes_to_the_patients_clinical_key_and_answers_the_engines_new_version(
    tmp_path: Path,
) -> None:
    db = Database(sqlite_url(tmp_path))
    await db.migrate()
    store = AlertStore(db)
    a = stored_alert(now_ms() - 5_000)
    await store.record_alerts([AlertVersion(a, None, "raised", None)])

    async def engine(cmd: AlertCommand) -> None:  # what the clinical engine does with the command
        acked = dataclasses.replace(a, version=2, status="active_ack", updated_at=cmd.at)
        await store.record_alerts([AlertVersion(acked, "active_unack", "acknowledged", cmd.by)])

    ctx = Context(db, engine)
    async with ctx.client("nina") as c:
        r = await c.post(f"/api/v1/alerts/{a.id}/ack", json={"read_back": 88})
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["status"]) == (2, "active_ack")
    [(topic, key, cmd)] = ctx.sent
    assert (topic, key) == (topics.CLINICAL, "patient:P-1")
    assert (cmd.alert_id, cmd.action, cmd.by, cmd.site_id, cmd.read_back) == (a.id, "ack", "nina", "s1", "88")
    assert cmd.id == f"nina/{a.id}/ack/{cmd.at}"
    await db.close()


async def test_an_action_the_engine_has_not_applied_in_time_answers_202_with_the_alert_as_it_was(
    tmp_path: Path,
) -> None:
    db = Database(sqlite_url(tmp_path))
    await db.migrate()
    a = stored_alert(now_ms() - 5_000)
    await AlertStore(db).record_alerts([AlertVersion(a, None, "raised", None)])
    ctx = Context(db, None)  # the command is appended; no engine runs
    async with ctx.client("nina") as c:
        r = await c.post(f"/api/v1/alerts/{a.id}/silence", json={"duration_s": 30})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "accepted" and r.json()["alert"]["version"] == 1
    [(_, _, cmd)] = ctx.sent
    assert (cmd.action, cmd.duration_ms) == ("silence", 30_000)
    await db.close()
