"""The nurse's alarm view on the ICU board in a real browser (Playwright, system Chromium) against a real hub.

A monitor desaturates over MQTT; the alarm engine raises the alert; the board shows it in the banner, on the
tile and in the alarm list; the nurse acknowledges it from the board; the recovery clears the banner.
Screenshots of each step go to `test-artifacts/board-alarms-*.png` at the repository root.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api

from tests.hub import Hub
from tests.integration.test_board_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.servers import require

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NURSE = ("nina", "nina-pw-123")

# Observes (never changes) what the board sends on its websocket: the receipts of the alerts it shows.
RECORD_SENT = """
window.__sent = [];
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  send(data) { window.__sent.push(String(data)); return super.send(data); }
};
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


class Monitor:
    """A registered bedside monitor publishing with mosquitto_pub (QoS 1: returns once the hub appended)."""

    def __init__(self, hub: Hub, device_id: str, bed: str, patient: str) -> None:
        out = hub.add_device(device_id, "monitor", "--unit", "icu", "--bed", bed, "--patient", patient)
        self.hub, self.id, self.secret, self.seq = hub, device_id, str(out["secret"]), 0

    def send(self, ts: int, **values: float) -> None:
        self.seq += 1
        body = {
            "seq": self.seq,
            "boot": "b1",
            "ts": iso(ts),
            "obs": [{"code": k, "value": v} for k, v in values.items()],
        }
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.hub.mqtt_port), "-q", "1"]
        argv += ["-u", self.id, "-P", self.secret, "-i", self.id, "-t", f"vigil/v1/{self.id}/obs"]
        r = subprocess.run(
            [*argv, "-m", json.dumps(body)], capture_output=True, text=True, check=False, timeout=30
        )
        assert r.returncode == 0, r.stderr


class Feed:
    """Keeps a monitor alive (it goes offline after 10 s of silence) at one reading a second of wall time,
    device time one second apart after `ts`; `values` may be changed while it runs."""

    def __init__(self, monitor: Monitor, ts: int, **values: float) -> None:
        self.monitor, self.ts, self.values = monitor, ts, values
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Feed:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=35)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.ts += 1000
            self.monitor.send(self.ts, **self.values)


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


def test_a_desaturation_alarms_the_board_the_nurse_acknowledges_it_and_recovery_clears_it(hub: Hub) -> None:
    expect = sync_api.expect
    mon1 = Monitor(hub, "mon-1", "icu-1", "P-1")
    mon2 = Monitor(hub, "mon-2", "icu-2", "P-2")
    hub.add_user(NURSE[0], "nurse", "--unit", "icu", "--password", NURSE[1])
    r = hub.api("PUT", "/api/v1/beds/icu-1/assignment", json={"username": NURSE[0]})
    assert r.status_code == 200, r.text
    neighbour_feed = Feed(mon2, now_ms() - 1000, hr=64, spo2=98, rr=14).start()  # a stable neighbour
    ARTIFACTS.mkdir(exist_ok=True)
    shot = 0

    def snap(page: Any, name: str) -> Path:
        nonlocal shot
        shot += 1
        path = ARTIFACTS / f"board-alarms-{shot:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    console: list[str] = []
    feed: Feed | None = None
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 1080})
            page.on("console", lambda m: console.append(m.text))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.add_init_script(RECORD_SENT)
            page.goto(hub.url + "/")
            page.fill("#username", NURSE[0])
            page.fill("#password", NURSE[1])
            page.press("#password", "Enter")
            page.locator('button[data-unit="icu"]').click()
            tile = page.locator('.tile[data-bed="icu-1"]')
            neighbour = page.locator('.tile[data-bed="icu-2"]')
            banner = page.locator("#alarm-banner")
            expect(tile).to_be_visible(timeout=5000)
            expect(page.locator("#banner")).to_be_hidden(timeout=10_000)  # the websocket is up
            expect(banner).to_be_hidden()
            audio = page.locator("#audio-state")
            expect(audio).to_have_text("AUDIO OFF")
            expect(page.locator("#audio-arm")).to_be_visible()
            page.locator("#alarm-panel summary").click()  # the unit's alarm list

            time.sleep(2.5)  # presence: the escalation facts (refreshed each second) see the nurse connected
            # ~25 s of device time at SpO2 70, sent as fast as mosquitto_pub goes.
            start = now_ms() - 26_000  # the last reading is about now: the tile's values are current
            for i in range(25):
                mon1.send(start + i * 1000, spo2=70, hr=88)
            feed = Feed(mon1, start + 24_000, spo2=70, hr=88).start()
            high = banner.locator('.banner-alarm[data-priority="high"]')
            expect(high).to_be_visible(timeout=15_000)
            expect(banner).to_have_class(re.compile(r"\bprio-high\b"))
            expect(high.locator(".ba-bed")).to_have_text("icu-1")
            expect(high.locator(".ba-cond")).to_have_text(re.compile("spo2", re.IGNORECASE))
            expect(high.locator(".ba-value")).to_have_text("70 %")
            expect(tile).to_have_class(re.compile(r"\balarm-high\b.*\balarm-unack\b"))
            expect(tile.locator(".tile-alarm")).to_contain_text("HIGH")
            expect(neighbour).not_to_have_class(re.compile(r"\balarm-"))
            alert_id = high.get_attribute("data-alert")
            assert alert_id
            row = page.locator(f'.alarm-row[data-alert="{alert_id}"]')
            expect(row).to_have_attribute("data-status", "active_unack")
            expect(row.locator(".al-status")).to_have_text("active · unacknowledged")
            expect(row.locator(".al-time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
            expect(row.locator('button[data-action="resolve"]')).to_have_count(0)  # only for cleared ones
            # The board receipted the version it shows.
            page.wait_for_function(
                "id => window.__sent.some(s => { const m = JSON.parse(s);"
                " return m.op === 'receipt' && m.alert_id === id; })",
                arg=alert_id,
                timeout=5000,
            )

            def receipted() -> bool:  # the hub recorded it
                receipts = hub.api("GET", f"/api/v1/alerts/{alert_id}").json()["receipts"]
                return NURSE[0] in [r["username"] for r in receipts]

            hub.wait_for(receipted)
            # The nurse assigned to the bed was paged; the board marks it.
            expect(high.locator(".tag-paged")).to_be_visible(timeout=10_000)
            spo2 = tile.locator(".cell.big:not(.hr)")
            expect(spo2).not_to_have_class(re.compile(r"\baged\b"), timeout=5000)  # the merged vitals came
            expect(spo2.locator(".value")).to_have_text("70")
            path = snap(page, "raised")
            assert path.stat().st_size > 10_000

            # Audio stays off until armed by a click; armed, the high-priority tone is the one sounding.
            expect(audio).to_have_text("AUDIO OFF")
            page.click("#audio-arm")
            expect(audio).to_have_text("AUDIO ON")
            expect(page.locator("#audio-arm")).to_be_hidden()
            expect(audio).to_have_attribute("data-sounding", "high", timeout=3000)

            # Acknowledge from the banner: REST answers 200, the new version shows acknowledged everywhere.
            with page.expect_response(
                lambda resp: resp.request.method == "POST" and resp.url.endswith("/ack")
            ) as answer:
                high.locator('button[data-action="ack"]').click()
            assert answer.value.status == 200, answer.value.text()
            assert answer.value.json()["status"] == "active_ack"
            expect(row).to_have_attribute("data-status", "active_ack", timeout=5000)
            expect(row.locator(".al-status")).to_have_text("acknowledged")
            expect(banner.locator(f'.banner-alarm[data-alert="{alert_id}"]')).to_have_count(0)
            expect(tile).to_have_class(re.compile(r"\balarm-high\b.*\balarm-ack\b"))
            expect(tile.locator(".tile-alarm")).to_contain_text("ack")
            assert tile.evaluate("e => getComputedStyle(e).animationName") == "none"  # steady, not flashing
            expect(audio).not_to_have_attribute("data-sounding", "high")
            snap(page, "acknowledged")

            # The medium SpO2-low alarm now leads the banner; silencing it pauses its tone for 2 minutes.
            medium = banner.locator('.banner-alarm[data-priority="medium"]')
            expect(medium).to_be_visible()
            expect(audio).to_have_attribute("data-sounding", "medium", timeout=3000)
            with page.expect_response(
                lambda resp: resp.request.method == "POST" and resp.url.endswith("/silence")
            ) as answer:
                medium.locator('button[data-action="silence"]').click()
            assert answer.value.status == 200, answer.value.text()
            expect(medium.locator(".tag-silenced")).to_contain_text(re.compile(r"SILENCED [12]:\d\d"))
            expect(audio).to_have_attribute("data-sounding", "", timeout=3000)
            expect(medium).to_be_visible()  # silenced is not acknowledged: it stays in the banner

            # Recovery: the condition clears, the acknowledged alarm closes and the banner goes.
            feed.values = {"spo2": 97, "hr": 80}
            expect(banner).to_be_hidden(timeout=15_000)
            expect(row).to_have_count(0, timeout=5000)
            expect(tile).not_to_have_class(re.compile(r"\balarm-high\b"))
            expect(spo2.locator(".value")).to_have_text("97", timeout=5000)
            snap(page, "recovered")
        finally:
            if feed is not None:
                feed.close()
            neighbour_feed.close()
            browser.close()

    assert not [c for c in console if "pageerror" in c or "Refused" in c], console
    assert not [c for c in console if "P-1" in c or "P-2" in c], "patient data in the console"
