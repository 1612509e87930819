"""The ICU board in a real browser (Playwright, system Chromium) against a real hub and a real MQTT publisher.

Screenshots of each step go to `test-artifacts/` at the repository root.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api

from tests.hub import Hub
from tests.servers import require

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
STALE_S = 3  # the board's continuous-value staleness, shortened through `?stale_s=`
NURSE = ("nora", "nora-pw-123")


def pub(hub: Hub, device: str, secret: str, seq: int, obs: list[dict[str, Any]], kind: str = "obs") -> None:
    """One QoS 1 publish: mosquitto_pub returns once the hub has acknowledged (after the durable append)."""
    argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(hub.mqtt_port), "-u", device, "-P", secret]
    argv += ["-i", device, "-q", "1", "-t", f"vigil/v1/{device}/{kind}"]
    body: dict[str, Any] = {"seq": seq, "boot": "b1"}
    body.update({"obs": obs} if kind == "obs" else {"conditions": [o["condition"] for o in obs]})
    argv += ["-m", json.dumps(body)]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run the README's test command, which installs chromium")
    require("mosquitto_pub")
    h = Hub(tmp_path / "hub").start()
    try:
        yield h
    finally:
        h.stop()


def test_board_shows_live_values_ages_them_and_survives_a_hub_restart(hub: Hub) -> None:
    expect = sync_api.expect
    mon1 = hub.add_device("mon-1", "monitor", "--unit", "icu", "--bed", "icu-1", "--patient", "P-1")
    mon2 = hub.add_device("mon-2", "monitor", "--unit", "icu", "--bed", "icu-2", "--patient", "P-2")
    hub.add_device("mon-3", "monitor", "--unit", "icu", "--bed", "icu-3")
    hub.add_user(NURSE[0], "nurse", "--site", "default", "--password", NURSE[1])
    # Some context on the neighbouring bed, so the screenshots show more than one tile with values.
    pub(hub, "mon-2", mon2["secret"], 1, [
        {"code": "hr", "value": 64}, {"code": "spo2", "value": 98}, {"code": "rr", "value": 14},
        {"code": "nibp_sys", "value": 121}, {"code": "nibp_dia", "value": 78},
        {"code": "temp", "value": 36.8},
    ])  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    shot = 0

    def snap(page: Any, name: str) -> None:
        nonlocal shot
        shot += 1
        page.screenshot(path=str(ARTIFACTS / f"board-{shot:02d}-{name}.png"), full_page=True)

    console: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 1080})
            page.on("console", lambda m: console.append(m.text))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(f"{hub.url}/?stale_s={STALE_S}&offline_s={STALE_S * 2}")

            # Log in, pick the unit.
            page.fill("#username", NURSE[0])
            page.fill("#password", NURSE[1])
            snap(page, "login")
            page.press("#password", "Enter")
            unit = page.locator('button[data-unit="icu"]')
            expect(unit).to_be_visible(timeout=5000)
            snap(page, "units")
            unit.click()
            tile = page.locator('.tile[data-bed="icu-1"]')
            hr = tile.locator(".cell.hr")
            expect(tile).to_be_visible(timeout=5000)
            expect(page.locator("#banner")).to_be_hidden(timeout=10_000)  # the websocket is up
            expect(page.locator('.tile[data-bed="icu-2"] .cell.hr .value')).to_have_text("64")

            # A live value reaches the right tile within 2 s of the hub's acknowledgement.
            pub(
                hub, "mon-1", mon1["secret"], 1, [{"code": "hr", "value": 123}, {"code": "spo2", "value": 95}]
            )
            start = time.monotonic()
            expect(hr.locator(".value")).to_have_text("123", timeout=2000)
            assert time.monotonic() - start < 2.0
            expect(page.locator('.tile[data-bed="icu-2"] .cell.hr .value')).to_have_text("64")
            expect(hr).not_to_have_class("aged")
            expect(tile.locator(".device-state")).to_have_text("LIVE")
            # A technical condition from the neighbour's `status`: a badge, and its ECG heart rate greyed.
            pub(hub, "mon-2", mon2["secret"], 2, [{"condition": "lead_off"}], kind="status")
            expect(page.locator('.tile[data-bed="icu-2"] .device-state')).to_have_text(
                "LEAD OFF", timeout=2000
            )
            expect(page.locator('.tile[data-bed="icu-2"] .cell.hr')).to_have_class("cell big hr invalid")
            snap(page, "live-123")

            # The device goes quiet: the value ages (grey, with its age in words), then the bed goes offline.
            expect(hr).to_have_class("cell big hr aged", timeout=(STALE_S + 3) * 1000)
            expect(hr.locator(".age")).to_contain_text("old")
            assert (
                page.locator(".tile[data-bed='icu-1'] .cell.hr .value").evaluate(
                    "e => getComputedStyle(e).color"
                )
                == "rgb(107, 114, 128)"
            )  # --aged grey
            snap(page, "aged")
            expect(tile.locator(".device-state")).to_contain_text("OFFLINE", timeout=(STALE_S * 2 + 3) * 1000)
            snap(page, "offline")

            # The hub goes away: the DISCONNECTED banner covers the width of the board.
            hub.stop()
            banner = page.locator("#banner")
            expect(banner).to_be_visible(timeout=5000)
            expect(banner).to_contain_text("DISCONNECTED")
            box = banner.bounding_box()
            assert box is not None
            assert box["width"] >= 1900
            expect(tile.locator(".device-state")).to_have_text("NO LINK")
            snap(page, "disconnected")

            # It comes back on the same ports: the board reconnects, resubscribes and shows new values.
            hub.start()
            expect(banner).to_be_hidden(timeout=20_000)
            pub(hub, "mon-1", mon1["secret"], 2, [{"code": "hr", "value": 99}])
            expect(hr.locator(".value")).to_have_text("99", timeout=2000)
            expect(hr).not_to_have_class("cell big hr aged")
            snap(page, "reconnected-99")

            # The bed detail (from the keyboard): trends from the store, one chart per vital.
            tile.focus()
            page.keyboard.press("Enter")
            expect(page.locator("#detail-view")).to_be_visible()
            expect(page.locator("#charts .chart")).to_have_count(5, timeout=5000)
            expect(page.locator("#detail-title")).to_contain_text("P-1")
            snap(page, "detail")
            page.keyboard.press("Escape")
            expect(page.locator("#board-view")).to_be_visible()
        finally:
            browser.close()

    assert not [c for c in console if "pageerror" in c or "Refused" in c], console
    assert not [c for c in console if "P-1" in c or "P-2" in c], "patient data in the console"


def test_api_docs_render_offline(hub: Hub) -> None:
    """/docs is Swagger UI served from the hub itself: it renders with no internet."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        failed: list[str] = []
        asked: list[str] = []
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.on("request", lambda r: asked.append(r.url))
        page.goto(f"{hub.url}/docs")
        sync_api.expect(page.get_by_text("/api/v1/patients/{patient_id}/vitals").first).to_be_visible(
            timeout=10_000
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "api-docs.png"))
        browser.close()
    assert failed == []
    assert [u for u in asked if not u.startswith(hub.url)] == []  # nothing from a CDN
