"""Manual observations, assignments, rosters and the audit log through the real hub (`vigil run`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from records import people
from records.crypto import SecretCipher
from records.db import Database, sqlite_url
from records.devices import add_device
from records.people import add_user
from tests.hub import Hub

pytestmark = pytest.mark.integration

PW = "pw-of-a-clinician"
OBS = "/api/v1/patients/{}/observations"


DEVICES = (  # (id, site, unit, bed, patient)
    ("mon-1", "default", "icu", "icu-1", "P-1"),
    ("mon-2", "default", "icu", "icu-2", "P-2"),
    ("mon-3", "default", "icu", "icu-3", "P-3"),
    ("mon-w", "default", "ward", "ward-1", None),
    ("mon-9", "s2", "er", "er-1", "P-9"),
)
USERS = (  # (name, role, sites, units)
    ("nina", "nurse", [], ["icu"]),
    ("wanda", "nurse", [], ["ward"]),
    ("carl", "charge_nurse", [], ["icu"]),
    ("dora", "doctor", [], []),
    ("ed", "nurse", ["s2"], []),
    ("cora", "charge_nurse", ["s2"], []),
)


async def seed(data_dir: Path) -> None:
    """What `vigil devices add` and `vigil users add` would do, in-process: eleven CLI runs cost a minute."""
    db = Database(sqlite_url(data_dir))
    try:
        await db.migrate()
        cipher = SecretCipher.load(data_dir, env={})
        at = int(time.time() * 1000)
        for dev, site, unit, bed, patient in DEVICES:
            await add_device(
                db,
                cipher,
                device_id=dev,
                type="monitor",
                site=site,
                unit=unit,
                bed=bed,
                patient=patient,
                at=at,
            )
        with pytest.MonkeyPatch.context() as mp:  # argon2 at full cost is beside the point here
            mp.setattr(people, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1))
            for name, role, sites, units in USERS:
                await add_user(db, username=name, role=role, sites=sites, units=units, password=PW, at=at)
    finally:
        await db.close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("hub-clinical"))
    # Site `default`: unit icu (beds icu-1 with P-1, icu-2 with P-2, icu-3 with P-3), unit ward (ward-1).
    # Site s2: unit er (er-1 with P-9). Seeded before the hub starts; the hub then runs on that data dir.
    asyncio.run(seed(h.dir / "var"))
    h.start()
    try:
        yield h
    finally:
        h.stop()


def post(hub: Hub, path: str, token: str, body: object, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{hub.url}{path}", json=body, headers={"Authorization": f"Bearer {token}", **headers}, timeout=10
    )


@pytest.fixture(scope="module")
def tokens(hub: Hub) -> dict[str, str]:
    return {u: hub.token(u, PW) for u in ("nina", "wanda", "carl", "dora", "ed", "cora")}


def since_iso(seconds_ago: float = 3600) -> str:
    return datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).isoformat()


def trend(hub: Hub, patient: str, code: str) -> list[dict[str, Any]]:
    r = hub.api("GET", f"/api/v1/patients/{patient}/vitals", params={"code": code, "since": since_iso()})
    assert r.status_code == 200, r.text
    return list(r.json()["points"])


# --- manual observations ----------------------------------------------------------------------------------


def test_manual_entry_is_stored_flagged_manual_and_shows_in_snapshot_and_trend(
    hub: Hub, tokens: dict[str, str]
) -> None:
    body = {
        "obs": [
            {"code": "hr", "value": 88},
            {"code": "MDC_PULS_OXIM_SAT_O2", "value": 95},
            {"code": "temp", "value": 98.6, "unit": "[degF]"},  # converted like a device's
            {"code": "acvpu", "value": "A"},
        ]
    }
    r = hub.api("POST", OBS.format("P-1"), token=tokens["nina"], json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["device_id"] == "manual:nina" and out["bed_id"] == "icu-1" and out["unit_id"] == "icu"
    by_alias = {i["alias"]: i for i in out["items"]}
    assert by_alias["temp"]["unit"] == "Cel" and by_alias["temp"]["value"] == pytest.approx(37.0)
    assert all(i["flags"] == ["manual"] for i in out["items"])

    def snapshot_hr() -> Any:
        vitals = hub.api("GET", "/api/v1/patients/P-1").json()["vitals"]
        return vitals if "hr" in vitals and "acvpu" in vitals else None

    vitals = hub.wait_for(snapshot_hr)
    assert vitals["hr"]["value"] == 88 and vitals["hr"]["flags"] == ["manual"]
    assert vitals["hr"]["device_id"] == "manual:nina"
    assert vitals["acvpu"]["value"] == "A" and vitals["spo2"]["value"] == 95
    (point,) = trend(hub, "P-1", "hr")
    assert point["value"] == 88 and point["flags"] == ["manual"]


def test_an_entry_with_a_refused_item_answers_422_with_reasons_and_stores_nothing(
    hub: Hub, tokens: dict[str, str]
) -> None:
    body = {
        "obs": [
            {"code": "rr", "value": 18},
            {"code": "bogus", "value": 1},
            {"code": "spo2", "value": 140},
            {"code": "temp", "value": 37, "unit": "mm[Hg]"},
            {"code": "hr", "value": 350},
            {"code": "hr", "value": "fast"},
        ]
    }
    r = hub.api("POST", OBS.format("P-2"), token=tokens["nina"], json=body)
    assert r.status_code == 422, r.text
    refused = {x["index"]: x for x in r.json()["refused"]}
    assert {i: x["reason"] for i, x in refused.items()} == {
        1: "unknown_code",
        2: "value_range",
        3: "unit",
        4: "physiological_range",
        5: "schema",
    }
    assert all(x["detail"].startswith(f"obs[{i}]") for i, x in refused.items())
    assert "nothing was stored" in r.json()["detail"]

    future = datetime.fromtimestamp(time.time() + 3600, tz=UTC).isoformat()
    r = hub.api(
        "POST",
        OBS.format("P-2"),
        token=tokens["nina"],
        json={"obs": [{"code": "rr", "value": 18}], "ts": future},
    )
    assert r.status_code == 422 and r.json()["refused"][0]["reason"] == "future_ts"
    for bad in ({"obs": []}, {"obs": "hr 80"}, {}):
        assert hub.api("POST", OBS.format("P-2"), token=tokens["nina"], json=bad).status_code == 422

    # A good entry afterwards is the only thing stored (the log is ordered, so once it shows, it is all).
    r = hub.api("POST", OBS.format("P-2"), token=tokens["nina"], json={"obs": [{"code": "hr", "value": 61}]})
    assert r.status_code == 201
    hub.wait_for(lambda: trend(hub, "P-2", "hr"))
    assert [p["value"] for p in trend(hub, "P-2", "hr")] == [61]
    assert trend(hub, "P-2", "rr") == []


def test_a_retried_post_with_the_same_idempotency_key_is_stored_once(
    hub: Hub, tokens: dict[str, str]
) -> None:
    ts = datetime.fromtimestamp(time.time() - 60, tz=UTC).isoformat()
    body = {"obs": [{"code": "rr", "value": 22}], "ts": ts}
    headers = {"Idempotency-Key": "entry-7f3a"}
    first = post(hub, OBS.format("P-3"), tokens["nina"], body, headers)
    again = post(hub, OBS.format("P-3"), tokens["nina"], body, headers)
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json() == first.json() and again.headers.get("idempotent-replayed") == "true"
    other = post(hub, OBS.format("P-3"), tokens["nina"], {"obs": [{"code": "rr", "value": 9}]}, headers)
    assert other.status_code == 409

    hub.wait_for(lambda: trend(hub, "P-3", "rr"))
    time.sleep(0.5)  # give a wrongly submitted duplicate time to land
    assert [p["value"] for p in trend(hub, "P-3", "rr")] == [22]
    audits = hub.api("GET", "/api/v1/audit", token=tokens["carl"], params={"target_id": "P-3"}).json()[
        "items"
    ]
    assert len(audits) == 1 and audits[0]["detail"]["idempotency_key"] == "entry-7f3a"


def test_manual_entry_scope_and_roles(hub: Hub, tokens: dict[str, str]) -> None:
    body = {"obs": [{"code": "hr", "value": 70}]}
    assert hub.api("POST", OBS.format("P-1"), token=tokens["ed"], json=body).status_code == 404  # other site
    assert (
        hub.api("POST", OBS.format("P-1"), token=tokens["wanda"], json=body).status_code == 404
    )  # other unit
    assert hub.api("POST", OBS.format("nobody"), token=tokens["nina"], json=body).status_code == 404
    assert hub.api("POST", OBS.format("P-1"), json=body).status_code == 403  # admin is not a clinician
    assert hub.api("POST", OBS.format("P-1"), token="not-a-token", json=body).status_code == 401
    r = hub.api("POST", OBS.format("P-9"), token=tokens["ed"], json=body)
    assert r.status_code == 201 and r.json()["site_id"] == "s2"


def test_manual_entries_are_in_the_audit_log_scoped_by_site(hub: Hub, tokens: dict[str, str]) -> None:
    r = hub.api(
        "POST", OBS.format("P-1"), token=tokens["dora"], json={"obs": [{"code": "nibp_sys", "value": 121}]}
    )
    assert r.status_code == 201
    items = hub.api("GET", "/api/v1/audit", token=tokens["carl"], params={"target_type": "patient"}).json()[
        "items"
    ]
    mine = [e for e in items if e["actor"] == "dora" and e["action"] == "patient.observations.manual"]
    assert mine and mine[-1]["target_id"] == "P-1" and mine[-1]["site_id"] == "default"
    assert mine[-1]["detail"]["codes"] == ["MDC_PRESS_BLD_NONINV_SYS"]
    assert mine[-1]["detail"]["event_id"] == r.json()["event_id"]
    assert all(e["site_id"] == "default" for e in items)
    other_site = hub.api("GET", "/api/v1/audit", token=tokens["cora"]).json()["items"]
    assert other_site and all(e["site_id"] == "s2" for e in other_site)
    assert hub.api("GET", "/api/v1/audit", token=tokens["nina"]).status_code == 403
    everything = hub.api("GET", "/api/v1/audit", params={"limit": 2}).json()  # admin: every site, paged
    assert len(everything["items"]) == 2 and everything["next_after"] == everything["items"][-1]["seq"]


# --- assignments and roster -------------------------------------------------------------------------------


def test_charge_nurse_assigns_beds_and_everyone_on_the_unit_sees_it(hub: Hub, tokens: dict[str, str]) -> None:
    r = hub.api("PUT", "/api/v1/beds/icu-1/assignment", token=tokens["carl"], json={"username": "nina"})
    assert r.status_code == 200, r.text
    assert r.json()["username"] == "nina" and r.json()["unit_id"] == "icu"
    listing = hub.api("GET", "/api/v1/units/icu/assignments", token=tokens["nina"]).json()
    beds = {i["bed_id"]: i for i in listing["items"]}
    assert set(beds) == {"icu-1", "icu-2", "icu-3"}
    assert beds["icu-1"]["username"] == "nina" and beds["icu-1"]["patient_id"] == "P-1"
    assert beds["icu-2"]["username"] is None  # unassigned beds show as such

    # Only a nurse of that unit takes the bed; only a charge nurse or admin assigns.
    r = hub.api("PUT", "/api/v1/beds/icu-2/assignment", token=tokens["carl"], json={"username": "wanda"})
    assert r.status_code == 422 and "wanda" in r.json()["detail"]
    assert (
        hub.api(
            "PUT", "/api/v1/beds/icu-2/assignment", token=tokens["carl"], json={"username": "dora"}
        ).status_code
        == 422
    )
    assert (
        hub.api(
            "PUT", "/api/v1/beds/icu-2/assignment", token=tokens["nina"], json={"username": "nina"}
        ).status_code
        == 403
    )
    # Across sites and units it does not exist.
    assert (
        hub.api(
            "PUT", "/api/v1/beds/er-1/assignment", token=tokens["carl"], json={"username": "nina"}
        ).status_code
        == 404
    )
    assert (
        hub.api(
            "PUT", "/api/v1/beds/ward-1/assignment", token=tokens["carl"], json={"username": "wanda"}
        ).status_code
        == 404
    )
    assert hub.api("GET", "/api/v1/units/icu/assignments", token=tokens["ed"]).status_code == 404
    assert hub.api("GET", "/api/v1/units/nope/assignments", token=tokens["carl"]).status_code == 404
    # The admin may assign anywhere; a freed bed shows unassigned.
    assert hub.api("PUT", "/api/v1/beds/ward-1/assignment", json={"username": "wanda"}).status_code == 200
    assert hub.api("DELETE", "/api/v1/beds/icu-1/assignment", token=tokens["carl"]).status_code == 200
    beds = {
        i["bed_id"]: i
        for i in hub.api("GET", "/api/v1/units/icu/assignments", token=tokens["carl"]).json()["items"]
    }
    assert beds["icu-1"]["username"] is None
    audits = hub.api("GET", "/api/v1/audit", token=tokens["carl"], params={"target_type": "bed"}).json()[
        "items"
    ]
    assert [(a["action"], a["target_id"]) for a in audits if a["actor"] == "carl"] == [
        ("bed.assign", "icu-1"),
        ("bed.unassign", "icu-1"),
    ]


def test_roster_is_set_by_charge_nurse_and_scoped(hub: Hub, tokens: dict[str, str]) -> None:
    path = "/api/v1/units/icu/roster"
    r = hub.api("PUT", f"{path}/doctor_on_duty", token=tokens["carl"], json={"usernames": ["dora"]})
    assert r.status_code == 200, r.text
    r = hub.api("PUT", f"{path}/rapid_response", token=tokens["carl"], json={"usernames": ["dora", "nina"]})
    assert r.status_code == 200, r.text
    got = hub.api("GET", path, token=tokens["nina"]).json()
    assert got["items"] == [
        {"group": "doctor_on_duty", "usernames": ["dora"]},
        {"group": "rapid_response", "usernames": ["dora", "nina"]},
    ]
    assert (
        hub.api(
            "PUT", f"{path}/doctor_on_duty", token=tokens["nina"], json={"usernames": ["dora"]}
        ).status_code
        == 403
    )
    assert (
        hub.api(
            "PUT", f"{path}/doctor_on_duty", token=tokens["carl"], json={"usernames": ["nina"]}
        ).status_code
        == 422
    )
    assert (
        hub.api("PUT", f"{path}/Not-A-Group", token=tokens["carl"], json={"usernames": []}).status_code == 422
    )
    assert hub.api("GET", path, token=tokens["ed"]).status_code == 404
    assert (
        hub.api(
            "PUT", "/api/v1/units/er/roster/attending", token=tokens["carl"], json={"usernames": []}
        ).status_code
        == 404
    )
    assert (
        hub.api("GET", "/api/v1/units/ward/roster", token=tokens["carl"]).status_code == 404
    )  # another unit

    # History: the roster as it was before a change.
    before = since_iso(0)
    time.sleep(0.01)
    assert (
        hub.api("PUT", f"{path}/doctor_on_duty", token=tokens["carl"], json={"usernames": []}).status_code
        == 200
    )
    assert {i["group"] for i in hub.api("GET", path, token=tokens["nina"]).json()["items"]} == {
        "rapid_response"
    }
    then = hub.api("GET", path, token=tokens["nina"], params={"at": before}).json()["items"]
    assert {"group": "doctor_on_duty", "usernames": ["dora"]} in then
    audits = hub.api("GET", "/api/v1/audit", token=tokens["carl"], params={"target_type": "unit"}).json()[
        "items"
    ]
    assert [a["detail"]["group"] for a in audits] == ["doctor_on_duty", "rapid_response", "doctor_on_duty"]
