"""The board's listings through a real hub: units and beds, scoped to the caller's sites and units."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hub import Hub

pytestmark = pytest.mark.integration


def pub(hub: Hub, device: str, secret: str, payload: dict[str, Any]) -> None:
    argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.mqtt_port), "-u", device, "-P", secret]
    argv += ["-i", device, "-q", "1", "-t", f"vigil/v1/{device}/obs", "-m", json.dumps(payload)]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr


SECRETS: dict[str, str] = {}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(Path(tmp_path_factory.mktemp("board")) / "hub").start()
    try:
        SECRETS["mon-icu-1"] = h.add_device(
            "mon-icu-1", "monitor", "--unit", "icu", "--bed", "icu-1", "--patient", "P-1"
        )["secret"]
        h.add_device("mon-icu-2", "monitor", "--unit", "icu", "--bed", "icu-2")
        h.add_device("mon-ward-1", "monitor", "--unit", "ward", "--bed", "ward-1", "--patient", "P-2")
        h.add_device(
            "mon-n-1", "monitor", "--site", "north", "--unit", "n-icu", "--bed", "n-1", "--patient", "P-9"
        )
        h.add_user("nina", "nurse", "--site", "default", "--password", "nina-pw-123")
        h.add_user("ivan", "nurse", "--site", "default", "--unit", "icu", "--password", "ivan-pw-123")
        h.add_user("dora", "dispatcher", "--site", "default", "--password", "dora-pw-123")
        yield h
    finally:
        h.stop()


def units_of(hub: Hub, token: str | None = None) -> dict[str, dict[str, Any]]:
    r = hub.api("GET", "/api/v1/units", token=token)
    assert r.status_code == 200, r.text
    return {u["id"]: u for u in r.json()["items"]}


def test_admin_lists_every_unit_with_its_bed_count(hub: Hub) -> None:
    units = units_of(hub)
    assert units["icu"] == {"id": "icu", "site_id": "default", "name": "icu", "beds": 2}
    assert units["ward"]["beds"] == 1
    assert units["n-icu"]["site_id"] == "north"


def test_a_site_nurse_sees_only_her_sites_units(hub: Hub) -> None:
    token = hub.token("nina", "nina-pw-123")
    assert set(units_of(hub, token)) == {"icu", "ward"}
    r = hub.api("GET", "/api/v1/units/n-icu/beds", token=token)
    assert r.status_code == 404  # another site's unit answers as if it did not exist
    assert hub.api("GET", "/api/v1/units/no-such-unit/beds", token=token).status_code == 404


def test_a_unit_nurse_sees_only_her_unit(hub: Hub) -> None:
    token = hub.token("ivan", "ivan-pw-123")
    assert set(units_of(hub, token)) == {"icu"}
    assert hub.api("GET", "/api/v1/units/ward/beds", token=token).status_code == 404
    assert hub.api("GET", "/api/v1/units/icu/beds", token=token).status_code == 200


def test_beds_carry_their_patient_and_latest_vitals_with_age(hub: Hub) -> None:
    pub(hub, "mon-icu-1", SECRETS["mon-icu-1"], {"seq": 1, "obs": [{"code": "hr", "value": 77}]})

    def beds() -> dict[str, dict[str, Any]] | None:
        body = hub.api("GET", "/api/v1/units/icu/beds").json()
        items = {b["bed_id"]: b for b in body["items"]}
        return items if "hr" in items["icu-1"]["vitals"] else None

    items = hub.wait_for(beds)
    assert list(items) == ["icu-1", "icu-2"]
    assert items["icu-1"]["patient_id"] == "P-1"
    assert items["icu-1"]["label"] == "icu-1"
    hr = items["icu-1"]["vitals"]["hr"]
    assert hr["value"] == 77
    assert hr["unit"] == "/min"
    assert hr["flags"] == []
    assert hr["ts"].endswith("Z")
    assert 0 <= hr["age_s"] < 30
    assert items["icu-2"] == {"bed_id": "icu-2", "label": "icu-2", "patient_id": None, "vitals": {}}


def test_roles_and_tokens(hub: Hub) -> None:
    assert hub.api("GET", "/api/v1/units", token="not-a-token").status_code == 401
    dispatcher = hub.token("dora", "dora-pw-123")
    assert hub.api("GET", "/api/v1/units", token=dispatcher).status_code == 403
    assert hub.api("GET", "/api/v1/units/icu/beds", token=dispatcher).status_code == 403


def test_the_board_page_and_its_assets_are_served(hub: Hub) -> None:
    page = httpx.get(f"{hub.url}/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    for asset in ("app.js", "board.css", "vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css"):
        assert httpx.get(f"{hub.url}/static/{asset}").status_code == 200, asset
    assert httpx.get(f"{hub.url}/static/../pyproject.toml").status_code == 404
