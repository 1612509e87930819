"""FHIR R4 Observation search through the real hub: every Bundle is validated with fhir.resources."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from fhir.resources.R4B.bundle import Bundle

from records import people
from records.crypto import SecretCipher
from records.db import Database, sqlite_url
from records.devices import add_device
from records.people import add_user
from tests.hub import Hub

pytestmark = pytest.mark.integration

PW = "pw-of-a-clinician"
LOINC = "http://loinc.org"
MDC = "urn:iso:std:iso:11073:10101"
UCUM = "http://unitsofmeasure.org"
NOW = int(time.time() * 1000)
T0, T1, T2 = NOW - 120_000, NOW - 60_000, NOW - 30_000
UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def seed(data_dir: Path) -> str:
    """Monitor mon-f at bed icu-f with patient P-F, and users, as `vigil ... add` would; the secret."""
    db = Database(sqlite_url(data_dir))
    try:
        await db.migrate()
        cipher = SecretCipher.load(data_dir, env={})
        dev = await add_device(
            db, cipher, device_id="mon-f", type="monitor", unit="icu", bed="icu-f", patient="P-F", at=NOW
        )
        await add_device(
            db, cipher, device_id="mon-s2", type="monitor", site="s2", bed="b2", patient="P-S2", at=NOW
        )
        with pytest.MonkeyPatch.context() as mp:  # argon2 at full cost is beside the point here
            mp.setattr(people, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1))
            await add_user(
                db, username="nina", role="nurse", units=["icu"], password=PW, provider_id="N-17", at=NOW
            )
            await add_user(db, username="ed", role="nurse", sites=["s2"], password=PW, at=NOW)
            await add_user(db, username="disp", role="dispatcher", password=PW, at=NOW)
        return str(dev["secret"])
    finally:
        await db.close()


def publish(hub: Hub, secret: str, payload: dict[str, Any]) -> None:
    argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.mqtt_port), "-u", "mon-f", "-P", secret]
    argv += ["-i", "mon-f", "-q", "1", "-t", "vigil/v1/mon-f/obs", "-m", json.dumps(payload)]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("hub-fhir"))
    secret = asyncio.run(seed(h.dir / "var"))
    h.start()
    try:
        nibp = [
            {"code": "nibp_sys", "value": 118},
            {"code": "nibp_dia", "value": 76},
            {"code": "nibp_mean", "value": 90},
        ]
        publish(
            h,
            secret,
            {"seq": 1, "ts": T0, "obs": [*nibp, {"code": "hr", "value": 72}, {"code": "spo2", "value": 97}]},
        )
        publish(h, secret, {"seq": 2, "ts": T0 + 1, "obs": [{"code": "hr", "value": 350}]})  # artifact
        publish(
            h,
            secret,
            {"seq": 3, "ts": T1, "obs": [{"code": "hr", "value": 75}, {"code": "nibp_sys", "value": 130}]},
        )
        nina = h.token("nina", PW)
        manual = {"obs": [{"code": "rr", "value": 16}], "ts": T2}
        assert h.api("POST", "/api/v1/patients/P-F/observations", token=nina, json=manual).status_code == 201
        h.wait_for(
            lambda: (
                len(h.api("GET", "/fhir/Observation", params={"patient": "P-F"}).json().get("entry", [])) >= 6
            )
        )
        yield h
    finally:
        h.stop()


def search(hub: Hub, token: str | None = None, **params: Any) -> dict[str, Any]:
    r = hub.api("GET", "/fhir/Observation", token=token, params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = dict(r.json())
    Bundle.model_validate(body)  # raises on anything that is not a valid R4 Bundle of valid Observations
    assert body["type"] == "searchset"
    return body


def resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])]


def codes(resource: dict[str, Any]) -> dict[str, str]:
    return {c["system"]: c["code"] for c in resource["code"]["coding"]}


def test_bundle_carries_loinc_mdc_ucum_and_a_blood_pressure_panel(hub: Hub) -> None:
    obs = resources(search(hub, patient="P-F"))
    assert [codes(o)[LOINC] for o in obs] == ["8867-4", "59408-5", "85354-9", "8867-4", "8480-6", "9279-1"]
    for o in obs:
        assert o["status"] == "final" and o["subject"] == {"reference": "Patient/P-F"}
        assert o["category"][0]["coding"][0]["code"] == "vital-signs"
        assert UTC_MS.fullmatch(o["effectiveDateTime"])
    hr, spo2, panel, hr2, sys_alone, rr = obs
    assert codes(panel) == {LOINC: "85354-9", MDC: "150020"} and "valueQuantity" not in panel
    parts = {codes(c)[LOINC]: c["valueQuantity"] for c in panel["component"]}
    assert parts == {
        "8480-6": {"value": 118, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"},
        "8462-4": {"value": 76, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"},
        "8478-0": {"value": 90, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"},
    }
    assert codes(hr) == {LOINC: "8867-4", MDC: "147842"}
    assert hr["valueQuantity"] == {"value": 72, "unit": "/min", "system": UCUM, "code": "/min"}
    assert hr["device"]["identifier"]["value"] == "mon-f"
    assert datetime.fromisoformat(hr["effectiveDateTime"]) == datetime.fromtimestamp(T0 / 1000, tz=UTC)
    assert spo2["valueQuantity"]["code"] == "%" and codes(spo2)[MDC] == "150456"
    assert hr2["valueQuantity"]["value"] == 75
    assert sys_alone["valueQuantity"]["value"] == 130  # no diastolic at that time: not a panel
    # The HR of 350 is an artifact: left out. The manual entry names who charted it, by provider id.
    assert all(o.get("valueQuantity", {}).get("value") != 350 for o in obs)
    assert rr["performer"][0]["identifier"]["value"] == "N-17" and "device" not in rr
    assert {"system": "urn:vigil:flag", "code": "manual"} in rr["meta"]["tag"]
    assert len({o["id"] for o in obs}) == len(obs)
    assert resources(search(hub, patient="P-F")) == obs  # ids are stable across searches


def test_code_and_date_filters(hub: Hub) -> None:
    hrs = resources(search(hub, patient="P-F", code=f"{LOINC}|8867-4"))
    assert [o["valueQuantity"]["value"] for o in hrs] == [72, 75]
    systolic = resources(search(hub, patient="P-F", code="8480-6"))
    assert [o["valueQuantity"]["value"] for o in systolic] == [118, 130]  # components asked for alone
    panels = resources(search(hub, patient="P-F", code="85354-9"))
    assert [codes(o)[LOINC] for o in panels] == ["85354-9"]
    spo2 = resources(search(hub, patient="Patient/P-F", code=f"{MDC}|150456,{LOINC}|9279-1"))
    assert [codes(o)[LOINC] for o in spo2] == ["59408-5", "9279-1"]
    assert "entry" not in search(hub, patient="P-F", code="http://snomed.info/sct|364075005")
    t1 = datetime.fromtimestamp(T1 / 1000, tz=UTC).isoformat()
    later = resources(search(hub, patient="P-F", date=f"ge{t1}"))
    assert [codes(o)[LOINC] for o in later] == ["8867-4", "8480-6", "9279-1"]
    earlier = resources(search(hub, patient="P-F", date=f"lt{t1}"))
    assert [codes(o)[LOINC] for o in earlier] == ["8867-4", "59408-5", "85354-9"]
    day = datetime.fromtimestamp(T1 / 1000, tz=UTC).date().isoformat()
    assert len(resources(search(hub, patient="P-F", date=day))) >= 3  # a date is its whole day


def test_count_pages_with_a_next_link_through_every_result(hub: Hub) -> None:
    everything = [o["id"] for o in resources(search(hub, patient="P-F"))]
    seen: list[str] = []
    bundle = search(hub, patient="P-F", _count=2)
    pages = 1
    while True:
        page = resources(bundle)
        assert len(page) <= 2
        seen += [o["id"] for o in page]
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            break
        assert nxt[0].startswith(hub.url) and "_count=2" in nxt[0]
        r = httpx.get(nxt[0], headers={"Authorization": f"Bearer {hub.token()}"}, timeout=10)
        assert r.status_code == 200
        bundle = r.json()
        Bundle.model_validate(bundle)
        pages += 1
    assert seen == everything and pages == 3


def test_auth_and_scope_answer_operation_outcomes(hub: Hub) -> None:
    def outcome(r: httpx.Response, status: int) -> None:
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/fhir+json")
        assert r.json()["resourceType"] == "OperationOutcome"

    url = f"{hub.url}/fhir/Observation"
    outcome(httpx.get(url, params={"patient": "P-F"}), 401)
    outcome(hub.api("GET", "/fhir/Observation", token="garbage", params={"patient": "P-F"}), 401)
    outcome(hub.api("GET", "/fhir/Observation", token=hub.token("ed", PW), params={"patient": "P-F"}), 404)
    outcome(hub.api("GET", "/fhir/Observation", token=hub.token("disp", PW), params={"patient": "P-F"}), 403)
    outcome(hub.api("GET", "/fhir/Observation", params={"patient": "nobody"}), 404)
    outcome(hub.api("GET", "/fhir/Observation"), 400)
    outcome(hub.api("GET", "/fhir/Observation", params={"patient": "P-F", "_count": "0"}), 400)
    outcome(hub.api("GET", "/fhir/Observation", params={"patient": "P-F", "date": "sa2026-01-01"}), 400)
    outcome(hub.api("GET", "/fhir/Observation", params={"patient": "P-F", "date": "yesterday"}), 400)
    assert "entry" not in search(hub, token=hub.token("ed", PW), patient="P-S2")  # own site, no data yet
