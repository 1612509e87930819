"""The client API through the real hub (contract section 5): tokens, roles, site and unit scope, ops
endpoints, admissions and vitals windows; and `vigil run` refusing a taken port in one line (section 1)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.hub import VIGIL, Hub

pytestmark = pytest.mark.integration

PW = "pw-of-a-test-user"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("hub-api")).start()
    try:
        # Site `default`: unit U1 with bed B1 (patient P-U1) and the empty bed B3, unit U2 with bed B2
        # (patient P-U2). Site B: only a nurse of that site.
        h.add_device("mon-u1", "monitor", "--unit", "U1", "--bed", "B1", "--patient", "P-U1")
        h.add_device("mon-u2", "monitor", "--unit", "U2", "--bed", "B2", "--patient", "P-U2")
        h.add_device("mon-u1b", "monitor", "--unit", "U1", "--bed", "B3")  # an empty bed, for admissions
        h.add_user("nurse-a", "nurse", "--password", PW)
        h.add_user("nurse-b", "nurse", "--site", "B", "--password", PW)
        h.add_user("nurse-u1", "nurse", "--unit", "U1", "--password", PW)
        h.add_user("disp", "dispatcher", "--password", PW)
        yield h
    finally:
        h.stop()


def token_of(hub: Hub, user: str) -> str:
    return hub.token(user, PW)


def assert_clean_error(r: httpx.Response, status: int) -> dict[str, Any]:
    """The status, a JSON body with a short `detail`, and nothing that looks like a stack trace."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text
    return dict(body)


# --- tokens -----------------------------------------------------------------------------------------------


def test_token_for_the_right_password_and_401_with_a_clear_message_for_a_wrong_one(hub: Hub) -> None:
    r = httpx.post(f"{hub.url}/api/v1/auth/token", json={"username": "nurse-a", "password": PW})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] > 0 and body["access_token"].count(".") == 2
    assert hub.api("GET", "/api/v1/patients/P-U1", token=body["access_token"]).status_code == 200

    for user, pw in [("nurse-a", "wrong"), ("nobody", PW)]:
        r = httpx.post(f"{hub.url}/api/v1/auth/token", json={"username": user, "password": pw})
        detail = assert_clean_error(r, 401)["detail"]
        assert "password" in detail.lower(), detail


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": "vigil", "sub": "admin", "role": "admin", "sites": ["*"], "units": None}
    claims |= {"iat": now, "exp": now + 600}
    return claims | over


def test_missing_expired_and_tampered_tokens_answer_401(hub: Hub) -> None:
    key = (hub.dir / "var" / "jwt.key").read_text().strip()
    path = "/api/v1/patients/P-U1"
    # Positive control: a token signed with the hub's key is accepted, so the 401s below are about the token.
    assert hub.api("GET", path, token=jwt.encode(_claims(), key, algorithm="HS256")).status_code == 200

    r = httpx.get(f"{hub.url}{path}")
    assert_clean_error(r, 401)
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")

    now = int(time.time())
    expired = jwt.encode(_claims(iat=now - 7200, exp=now - 3600), key, algorithm="HS256")
    assert "expired" in assert_clean_error(hub.api("GET", path, token=expired), 401)["detail"]

    good = hub.token()
    head, payload, sig = good.split(".")
    mid = len(payload) // 2
    flipped = payload[:mid] + ("A" if payload[mid] != "A" else "B") + payload[mid + 1 :]
    for bad in [
        f"{head}.{flipped}.{sig}",  # claims changed, signature kept
        f"{head}.{payload}.{sig[:-3]}{'x' if sig[-3] != 'x' else 'y'}{sig[-2:]}",  # signature changed
        jwt.encode(_claims(), "not-the-hubs-key-" + "x" * 32, algorithm="HS256"),  # foreign key
        "not-a-jwt",
    ]:
        assert_clean_error(hub.api("GET", path, token=bad), 401)


# --- roles and scope --------------------------------------------------------------------------------------


def test_another_sites_nurse_gets_404_for_patients_and_beds_of_site_default(hub: Hub) -> None:
    tb = token_of(hub, "nurse-b")
    ta = token_of(hub, "nurse-a")
    assert hub.api("GET", "/api/v1/patients/P-U1", token=ta).status_code == 200
    r = hub.api("GET", "/api/v1/patients/P-U1", token=tb)
    missing = hub.api("GET", "/api/v1/patients/NO-SUCH-PATIENT", token=tb)
    assert_clean_error(r, 404)
    assert_clean_error(missing, 404)
    assert r.json() == missing.json()  # indistinguishable from a patient that does not exist

    now = datetime.now(UTC).isoformat()
    assert_clean_error(
        hub.api("GET", "/api/v1/patients/P-U1/vitals", token=tb, params={"code": "hr", "since": now}), 404
    )
    r = hub.api("PUT", "/api/v1/beds/B3/patient", token=tb, json={"patient_id": "P-B-1"})
    assert_clean_error(r, 404)
    assert_clean_error(hub.api("DELETE", "/api/v1/beds/B1/patient", token=tb), 404)
    # Nothing changed behind the 404s.
    assert hub.api("GET", "/api/v1/patients/P-U1").json()["bed_id"] == "B1"
    assert hub.api("GET", "/api/v1/patients/P-B-1").status_code == 404


def test_a_dispatcher_may_not_read_a_patient_snapshot(hub: Hub) -> None:
    r = hub.api("GET", "/api/v1/patients/P-U1", token=token_of(hub, "disp"))
    assert "dispatcher" in assert_clean_error(r, 403)["detail"]


def test_a_unit_nurse_sees_only_patients_in_beds_of_her_units(hub: Hub) -> None:
    t = token_of(hub, "nurse-u1")
    assert hub.api("GET", "/api/v1/patients/P-U1", token=t).status_code == 200
    assert_clean_error(hub.api("GET", "/api/v1/patients/P-U2", token=t), 404)
    assert_clean_error(hub.api("PUT", "/api/v1/beds/B2/patient", token=t, json={"patient_id": "X-1"}), 404)
    # The site-wide nurse of `default` sees both units.
    assert hub.api("GET", "/api/v1/patients/P-U2", token=token_of(hub, "nurse-a")).status_code == 200


# --- ops endpoints ----------------------------------------------------------------------------------------


def test_health_ready_and_metrics_need_no_token(hub: Hub) -> None:
    r = httpx.get(f"{hub.url}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = httpx.get(f"{hub.url}/readyz")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json") and isinstance(r.json(), dict)
    r = httpx.get(f"{hub.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    types = dict(line.split()[2:4] for line in r.text.splitlines() if line.startswith("# TYPE "))
    for name, kind in [
        ("vigil_ingest_total", "counter"),
        ("vigil_deadletter_total", "counter"),
        ("vigil_duplicates_total", "counter"),
        ("vigil_ingest_latency_seconds", "histogram"),
        ("vigil_alert_delivery_seconds", "histogram"),
        ("vigil_ws_connections", "gauge"),
    ]:
        assert types.get(name) == kind, f"{name}: {types.get(name)!r} in /metrics, want {kind}"
    assert "vigil_ingest_latency_seconds_bucket{" in r.text


# --- admissions -------------------------------------------------------------------------------------------


def test_admit_then_free_a_bed_shows_in_the_patients_bed_id(hub: Hub) -> None:
    t = token_of(hub, "nurse-u1")
    r = hub.api("PUT", "/api/v1/beds/B3/patient", token=t, json={"patient_id": "P-ADMIT"})
    assert r.status_code == 200, r.text
    assert r.json()["patient_id"] == "P-ADMIT"
    snap = hub.api("GET", "/api/v1/patients/P-ADMIT", token=t)
    assert snap.status_code == 200, snap.text
    assert snap.json()["bed_id"] == "B3"

    r = hub.api("DELETE", "/api/v1/beds/B3/patient", token=t)
    assert r.status_code == 200, r.text
    assert r.json()["previous_patient_id"] == "P-ADMIT" and r.json()["patient_id"] is None
    # Now in no bed: the site-wide nurse still sees the patient, with no bed.
    snap = hub.api("GET", "/api/v1/patients/P-ADMIT", token=token_of(hub, "nurse-a"))
    assert snap.status_code == 200 and snap.json()["bed_id"] is None


# --- vitals windows ---------------------------------------------------------------------------------------


def publish_lines(hub: Hub, device: str, secret: str, kind: str, payloads: list[dict[str, Any]]) -> None:
    """Publish one message per payload (QoS 1) with a single mosquitto_pub."""
    r = subprocess.run(
        [
            *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.mqtt_port), "-u", device, "-P", secret),
            *("-i", device, "-q", "1", "-t", f"vigil/v1/{device}/{kind}", "-l"),
        ],
        check=False,
        input="".join(json.dumps(p) + "\n" for p in payloads),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def test_vitals_window_with_since_and_until_and_422_for_an_unknown_code(hub: Hub) -> None:
    dev = hub.add_device("mon-vit", "monitor", "--unit", "U1", "--bed", "B-VIT", "--patient", "P-VIT")
    base = (int(time.time()) - 120) * 1000
    ts = [base + i * 10_000 for i in range(6)]  # 6 readings, 10 s apart
    publish_lines(
        hub,
        "mon-vit",
        dev["secret"],
        "obs",
        [{"seq": i + 1, "ts": t, "obs": [{"code": "hr", "value": 60 + i}]} for i, t in enumerate(ts)],
    )
    path = "/api/v1/patients/P-VIT/vitals"

    def all_points() -> list[dict[str, Any]]:
        r = hub.api("GET", path, params={"code": "hr", "since": iso(base - 1000)})
        return list(r.json()["points"]) if r.status_code == 200 else []

    assert [p["value"] for p in hub.wait_for(lambda: len(all_points()) == 6 and all_points())] == [
        60,
        61,
        62,
        63,
        64,
        65,
    ]
    # since and until are inclusive; a different alias of the same code answers the same points.
    r = hub.api("GET", path, params={"code": "MDC_ECG_HEART_RATE", "since": iso(ts[1]), "until": iso(ts[3])})
    assert r.status_code == 200, r.text
    points = r.json()["points"]
    assert [p["value"] for p in points] == [61, 62, 63]
    assert [p["ts"] for p in points] == [iso(t).replace("+00:00", "Z") for t in ts[1:4]]
    assert all(p["unit"] == "/min" and p["flags"] == [] for p in points)
    # Epoch ms works too; an empty window is an empty list, not an error.
    r = hub.api("GET", path, params={"code": "hr", "since": str(ts[5] + 1)})
    assert r.status_code == 200 and r.json()["points"] == []

    assert (
        "code"
        in assert_clean_error(hub.api("GET", path, params={"code": "no_such_code", "since": iso(base)}), 422)[
            "detail"
        ]
    )
    assert hub.api("GET", path, params={"code": "hr", "since": "yesterday"}).status_code == 422
    assert hub.api("GET", path, params={"code": "hr"}).status_code == 422  # since is required


# --- a taken port -----------------------------------------------------------------------------------------


def test_a_taken_http_port_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    h = Hub(tmp_path / "taken")
    with socket.socket() as s:
        s.bind(("127.0.0.1", h.http_port))
        s.listen()
        r = subprocess.run([VIGIL, "run"], check=False, env=h.env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "VIGIL_HTTP_PORT" in lines[0] and str(h.http_port) in lines[0], lines
    assert "Traceback" not in r.stderr and r.stdout == ""
