// Vigil ICU board: login, unit picker, one live tile per bed, bed detail charts. Vanilla ES module, no build.
// Patient data never goes to the console: log messages are generic on purpose.

import {
  AlertStore, audiblePriority, bannerAlerts, conditionLabel, isUnacked, newestFirst, tileAlarm, valueText,
} from "./alarms.js";
import { renderBanner, renderList } from "./alarmview.js";
import { AlarmAudio } from "./audio.js";

const PARAMS = new URLSearchParams(location.search);
const num = (name, fallback) => {
  const v = Number(PARAMS.get(name));
  return Number.isFinite(v) && v > 0 ? v : fallback;
};

// Staleness thresholds: a value older than this is shown aged (greyed, with its age).
// `?stale_s=` overrides the continuous one (tests, demos); `?offline_s=` the device-offline delay.
const STALE_CONTINUOUS_MS = num("stale_s", 15) * 1000; // HR, PR, SpO2, RR, EtCO2
const STALE_NIBP_MS = 20 * 60 * 1000; // NIBP is intermittent
const STALE_TEMP_MS = 60 * 60 * 1000;
const STALE_OTHER_MS = 60 * 60 * 1000; // o2_supplement, acvpu: manual observations
const OFFLINE_MS = num("offline_s", 30) * 1000; // no data at all from a bed for this long: offline
const TREND_MS = 5 * 60 * 1000; // the tile's HR sparkline
const RECONNECT_MIN_MS = 500;
const RECONNECT_MAX_MS = 5_000; // a wall board must come back quickly once the hub is back
const PING_EVERY_MS = 10_000;
const SILENCE_MS = 25_000; // no frame at all (not even a pong) for this long: the socket is dead

const STALE_MS = {
  hr: STALE_CONTINUOUS_MS, pr: STALE_CONTINUOUS_MS, spo2: STALE_CONTINUOUS_MS, rr: STALE_CONTINUOUS_MS,
  etco2: STALE_CONTINUOUS_MS, nibp_sys: STALE_NIBP_MS, nibp_dia: STALE_NIBP_MS, nibp_mean: STALE_NIBP_MS,
  temp: STALE_TEMP_MS,
};
const staleAfter = (alias) => STALE_MS[alias] ?? STALE_OTHER_MS;

// What each technical condition makes unreliable (ECG leads: HR; SpO2 probe: SpO2 and pulse rate).
const CONDITION_INVALIDATES = { lead_off: ["hr"], probe_off: ["spo2", "pr"] };
const CONDITION_TEXT = { lead_off: "LEAD OFF", probe_off: "PROBE OFF", low_battery: "LOW BATTERY" };
const SILENCE_S = 120; // the silence button: the lifecycle caps an audio pause at 2 minutes

const TOKEN_KEY = "vigil.token";
const USER_KEY = "vigil.user";
const UNIT_KEY = "vigil.unit";
const PANEL_KEY = "vigil.alarmPanel";

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

// ---------------------------------------------------------------- state

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  unit: null, // {id, name, site_id}
  beds: new Map(), // bed_id -> Bed
  skewMs: 0, // server clock minus browser clock, from `as_of`
  ws: null,
  wsOpen: false,
  lastId: null, // cursor of the last message received, for resume
  reconnectDelay: RECONNECT_MIN_MS,
  reconnectTimer: null,
  reconnectAt: 0,
  lastFrameAt: 0,
  pingTimer: null,
  detailBed: null,
  charts: [],
  reloadTimer: null,
  generation: 0, // bumps on every unit (re)load; stale async answers are dropped
  alerts: new AlertStore(), // the unit's open alerts, from REST and `alert` frames
  receipts: new Set(), // "id:version" already receipted
  pendingReceipts: new Map(), // to send once the socket is up
  pending: new Map(), // alert id -> action in flight (its buttons are disabled)
  paged: new Set(), // alert ids this user was paged about
  audio: new AlarmAudio(),
};

const serverNow = () => Date.now() + state.skewMs;

// ---------------------------------------------------------------- HTTP

class Unauthorised extends Error {}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const r = await fetch(path, { ...options, headers, cache: "no-store" });
  if (r.status === 401) throw new Unauthorised("unauthorised");
  if (!r.ok) {
    const err = new Error(`HTTP ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return r.json();
}

function handleError(err, target) {
  if (err instanceof Unauthorised) {
    logout("Your session has ended. Please sign in again.");
    return;
  }
  console.warn("vigil board: request failed", err && err.status ? err.status : "");
  if (target) target.textContent = "Could not load data from the hub. Retrying keeps the last values.";
}

// ---------------------------------------------------------------- views

function show(view) {
  for (const id of ["login-view", "units-view", "board-view", "detail-view"]) $(id).hidden = id !== view;
  const signedIn = view !== "login-view";
  $("logout").hidden = !signedIn;
  $("units-button").hidden = !(view === "board-view" || view === "detail-view");
  renderAlarms();
  if (view !== "detail-view") destroyCharts();
}

function logout(message) {
  closeSocket();
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(UNIT_KEY);
  state.token = null;
  state.unit = null;
  state.beds.clear();
  resetAlarms();
  $("grid").replaceChildren();
  $("where").textContent = "";
  $("link").textContent = "";
  setBanner(false);
  $("login-error").textContent = message || "";
  show("login-view");
  $("username").focus();
}

async function login(event) {
  event.preventDefault();
  const username = $("username").value.trim();
  const password = $("password").value;
  $("login-error").textContent = "";
  $("login-submit").disabled = true;
  try {
    const r = await fetch("/api/v1/auth/token", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username, password }),
    });
    if (!r.ok) {
      $("login-error").textContent = r.status === 401 ? "Wrong user name or password." : "Sign-in failed.";
      return;
    }
    state.token = (await r.json()).access_token;
    sessionStorage.setItem(TOKEN_KEY, state.token);
    sessionStorage.setItem(USER_KEY, username);
    $("password").value = "";
    await showUnits();
  } catch {
    $("login-error").textContent = "The hub cannot be reached.";
  } finally {
    $("login-submit").disabled = false;
  }
}

async function showUnits() {
  closeSocket();
  state.unit = null;
  resetAlarms();
  sessionStorage.removeItem(UNIT_KEY);
  $("where").textContent = "";
  show("units-view");
  const list = $("unit-list");
  list.replaceChildren();
  $("units-error").textContent = "";
  try {
    const { items } = await api("/api/v1/units");
    if (!items.length) $("units-error").textContent = "You have no units to watch.";
    for (const u of items) {
      const li = el("li");
      const b = el("button", "unit-button");
      b.type = "button";
      b.dataset.unit = u.id;
      b.append(el("span", "unit-name", u.name), el("span", "unit-beds", `${u.beds} bed${u.beds === 1 ? "" : "s"}`));
      b.addEventListener("click", () => openUnit(u));
      li.append(b);
      list.append(li);
    }
    list.querySelector("button")?.focus();
  } catch (err) {
    handleError(err, $("units-error"));
  }
}

// ---------------------------------------------------------------- unit board

async function openUnit(unit) {
  if (state.unit?.id !== unit.id) resetAlarms();
  state.unit = { id: unit.id, name: unit.name || unit.id, site_id: unit.site_id };
  sessionStorage.setItem(UNIT_KEY, JSON.stringify(state.unit));
  $("where").textContent = state.unit.name;
  show("board-view");
  await loadUnit();
  connect();
}

// The layout and initial values come from REST; live values from the websocket after that.
async function loadUnit() {
  const gen = ++state.generation;
  $("board-error").textContent = "";
  let body;
  try {
    body = await api(`/api/v1/units/${encodeURIComponent(state.unit.id)}/beds`);
  } catch (err) {
    if (err.status === 404) {
      $("board-error").textContent = "This unit does not exist or is not yours.";
      return;
    }
    handleError(err, $("board-error"));
    return;
  }
  if (gen !== state.generation) return;
  if (body.as_of) state.skewMs = Date.parse(body.as_of) - Date.now();
  if (body.name) $("where").textContent = body.name;
  const grid = $("grid");
  const keep = new Map(state.beds);
  state.beds.clear();
  for (const item of body.items) {
    let bed = keep.get(item.bed_id);
    if (bed && bed.patientId !== item.patient_id) {
      bed.destroy(); // another patient: nothing of the previous one may remain on the tile
      bed = null;
    }
    if (!bed) bed = new Bed(item);
    keep.delete(item.bed_id);
    bed.label = item.label || item.bed_id;
    bed.mergeValues(item.vitals || {}, true);
    state.beds.set(item.bed_id, bed);
  }
  for (const gone of keep.values()) gone.destroy();
  grid.replaceChildren(...[...state.beds.values()].map((b) => b.tile));
  if (!state.beds.size) $("board-error").textContent = "This unit has no beds.";
  for (const bed of state.beds.values()) {
    bed.render();
    bed.mountSpark();
    bed.loadTrend(gen);
    bed.loadNews2(gen);
  }
  loadAlerts(gen);
}

function scheduleReload() {
  if (state.reloadTimer) return;
  state.reloadTimer = setTimeout(() => {
    state.reloadTimer = null;
    if (state.unit) loadUnit();
  }, 1000);
}

function bedFor(data) {
  if (data.bed_id && state.beds.has(data.bed_id)) return state.beds.get(data.bed_id);
  if (data.patient_id) {
    for (const bed of state.beds.values()) if (bed.patientId === data.patient_id) return bed;
  }
  return null;
}

const fmt = {
  int: (v) => (typeof v === "number" ? String(Math.round(v)) : String(v)),
  temp: (v) => (typeof v === "number" ? v.toFixed(1) : String(v)),
};

function ageText(ms) {
  if (ms < 0) ms = 0;
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d`;
}

class Bed {
  constructor(item) {
    this.id = item.bed_id;
    this.label = item.label || item.bed_id;
    this.patientId = item.patient_id;
    this.values = {}; // alias -> {value, unit, ts (ms), flags}
    this.conditions = new Map(); // device_id -> [conditions]
    this.lastData = 0; // newest server-time ms of anything from this bed
    this.news2 = null; // the engine's News2Result JSON (contract section 5)
    this.trend = [[], []]; // HR sparkline: seconds, values
    this.spark = null;
    this.buildTile();
  }

  buildTile() {
    const t = el("button", "tile");
    t.type = "button";
    t.dataset.bed = this.id;
    t.addEventListener("click", () => openDetail(this));
    const head = el("div", "tile-head");
    this.labelEl = el("span", "bed-label");
    this.patientEl = el("span", "patient");
    this.stateEl = el("span", "device-state");
    head.append(this.labelEl, this.patientEl, el("span", "spacer"), this.stateEl);
    this.alarmEl = el("div", "tile-alarm");
    this.alarmEl.hidden = true;

    this.cells = {};
    const big = el("div", "big-row");
    big.append(this.cell("hr", "HR", "/min", "big hr"), this.cell("spo2", "SpO₂", "%", "big"));
    const small = el("div", "small-row");
    small.append(this.cell("rr", "RR", "/min", "small"), this.nibpCell(), this.cell("temp", "Temp", "°C", "small"));

    const foot = el("div", "tile-foot");
    const news = el("div", "news2");
    news.append(el("span", "label", "NEWS2"));
    this.newsScore = el("span", "news2-score", "--");
    this.newsNote = el("span", "news2-note", "incomplete");
    this.newsMissing = el("span", "news2-missing", "");
    news.append(this.newsScore, this.newsNote, this.newsMissing);
    this.newsBox = news;
    const trend = el("div", "trend");
    trend.setAttribute("aria-hidden", "true");
    this.sparkEl = el("div", "spark");
    trend.append(el("span", "label", "HR · last 5 min"), this.sparkEl);
    foot.append(news, trend);

    t.append(head, this.alarmEl, big, small, foot);
    this.tile = t;
  }

  cell(alias, name, unit, cls) {
    const c = el("div", `cell ${cls}`);
    const label = el("span", "label", name);
    const value = el("span", "value", "--");
    const u = el("span", "unit", unit);
    const age = el("span", "age", "no data");
    const top = el("div", "cell-top");
    top.append(label, u);
    c.append(top, value, age);
    this.cells[alias] = { c, value, age, label };
    return c;
  }

  nibpCell() {
    const c = el("div", "cell small nibp");
    const top = el("div", "cell-top");
    top.append(el("span", "label", "NIBP"), el("span", "unit", "mmHg"));
    const value = el("span", "value", "--/--");
    const age = el("span", "age", "no data");
    c.append(top, value, age);
    this.cells.nibp = { c, value, age };
    return c;
  }

  // Merge {alias: {value, unit, ts, flags}}: newest per alias wins, so late data never replaces a newer value.
  mergeValues(values, fromRest = false) {
    for (const [alias, v] of Object.entries(values)) {
      const ts = Date.parse(v.ts);
      if (!Number.isFinite(ts)) continue;
      const cur = this.values[alias];
      if (cur && cur.ts > ts) continue;
      this.values[alias] = { value: v.value, unit: v.unit, ts, flags: v.flags || [] };
      if (ts <= serverNow() + 5000) this.lastData = Math.max(this.lastData, ts);
      const flags = v.flags || [];
      if ((alias === "hr") && typeof v.value === "number" && !flags.includes("artifact") && !fromRest) {
        this.pushTrend(ts, v.value);
      }
    }
  }

  pushTrend(ts, value) {
    const [xs, ys] = this.trend;
    const x = ts / 1000;
    if (xs.length && x <= xs[xs.length - 1]) {
      const i = xs.findIndex((e) => e >= x);
      if (xs[i] === x) ys[i] = value;
      else { xs.splice(i, 0, x); ys.splice(i, 0, value); }
    } else {
      xs.push(x);
      ys.push(value);
    }
    const cut = (serverNow() - TREND_MS) / 1000;
    while (xs.length && xs[0] < cut) { xs.shift(); ys.shift(); }
    this.sparkDirty = true;
  }

  async loadTrend(gen) {
    if (!this.patientId) return;
    const since = new Date(serverNow() - TREND_MS).toISOString();
    try {
      const body = await api(`/api/v1/patients/${encodeURIComponent(this.patientId)}/vitals?code=hr&since=${encodeURIComponent(since)}`);
      if (gen !== state.generation) return;
      for (const p of body.points) {
        if (!(p.flags || []).includes("artifact") && typeof p.value === "number") this.pushTrend(Date.parse(p.ts), p.value);
      }
      this.drawSpark();
    } catch (err) {
      handleError(err, null);
    }
  }

  async loadNews2(gen) {
    if (!this.patientId) return;
    try {
      const snap = await api(`/api/v1/patients/${encodeURIComponent(this.patientId)}`);
      if (gen !== state.generation) return;
      if (snap.news2) this.setNews2(snap.news2);
      this.render();
    } catch (err) {
      handleError(err, null);
    }
  }

  mountSpark() {
    if (this.spark || typeof uPlot === "undefined") return;
    const width = Math.max(120, this.sparkEl.clientWidth || 200);
    this.spark = new uPlot({
      width, height: 56,
      cursor: { show: false }, legend: { show: false }, select: { show: false },
      scales: { x: { time: true }, y: { auto: true, range: (u, min, max) => [Math.min(min, 40) - 5, Math.max(max, 120) + 5] } },
      axes: [{ show: false }, { show: false }],
      series: [{}, { stroke: "#4ade80", width: 2, spanGaps: false }], // points only while sparse (uPlot's default)
    }, this.trend, this.sparkEl);
    this.drawSpark();
  }

  drawSpark() {
    if (!this.spark) return;
    const now = serverNow() / 1000;
    this.spark.batch(() => {
      this.spark.setData(this.trend, false);
      this.spark.setScale("x", { min: now - TREND_MS / 1000, max: now });
    });
    this.sparkDirty = false;
  }

  // Everything that depends on time or state is recomputed here, once a second and after each message.
  render() {
    const now = serverNow();
    this.labelEl.textContent = this.label;
    this.patientEl.textContent = this.patientId ? this.patientId : "no patient";
    this.patientEl.classList.toggle("empty", !this.patientId);

    const conditions = new Set([...this.conditions.values()].flat());
    const invalid = new Set();
    for (const c of conditions) for (const a of CONDITION_INVALIDATES[c] || []) invalid.add(a);

    // Technical state: link down trumps everything (we do not know), then offline (the last conditions are
    // as old as the data), then the device's current conditions.
    let stateText = "LIVE";
    let stateCls = "live";
    const techs = [...conditions].map((c) => CONDITION_TEXT[c] || c.replace(/_/g, " ").toUpperCase());
    if (!state.wsOpen) { stateText = "NO LINK"; stateCls = "unknown"; }
    else if (this.lastData <= 0) { stateText = "NO DATA"; stateCls = "offline"; }
    else if (now - this.lastData > OFFLINE_MS) { stateText = `OFFLINE ${ageText(now - this.lastData)}`; stateCls = "offline"; }
    else if (techs.length) { stateText = techs.join(" · "); stateCls = "technical"; }
    this.stateEl.textContent = stateText;
    this.stateEl.className = `device-state ${stateCls}`;
    this.tile.classList.toggle("offline", stateCls === "offline");

    // HR falls back to the pulse rate (labelled PR) when there is no ECG heart rate.
    const hrAlias = this.values.hr || !this.values.pr ? "hr" : "pr";
    this.cells.hr.label.textContent = hrAlias === "hr" ? "HR" : "PR";
    this.renderCell(this.cells.hr, hrAlias, now, invalid, fmt.int);
    this.renderCell(this.cells.spo2, "spo2", now, invalid, fmt.int);
    this.renderCell(this.cells.rr, "rr", now, invalid, fmt.int);
    this.renderCell(this.cells.temp, "temp", now, invalid, fmt.temp);
    this.renderNibp(now);
    this.renderNews2(now);
    this.renderAlarm();

    const live = state.wsOpen ? "" : ", live link down";
    this.tile.setAttribute("aria-label", `Bed ${this.label}, ${stateText}${live}. Open details.`);
    if (this.sparkDirty || this.spark) this.drawSpark();
  }

  renderCell(cell, alias, now, invalid, format) {
    const v = this.values[alias];
    cell.c.classList.remove("aged", "artifact", "invalid", "nodata");
    if (!v) {
      cell.value.textContent = "--";
      cell.age.textContent = "no data";
      cell.c.classList.add("nodata");
      return;
    }
    const age = now - v.ts;
    cell.value.textContent = format(v.value);
    if (v.flags.includes("artifact")) {
      cell.c.classList.add("artifact");
      cell.age.textContent = `artifact · ${ageText(age)}`;
    } else if (invalid.has(alias)) {
      cell.c.classList.add("invalid");
      cell.age.textContent = `unreliable · ${ageText(age)}`;
    } else if (age > staleAfter(alias)) {
      cell.c.classList.add("aged");
      cell.age.textContent = `${ageText(age)} old`;
    } else {
      cell.age.textContent = ageText(age);
    }
  }

  renderNibp(now) {
    const cell = this.cells.nibp;
    const sys = this.values.nibp_sys;
    const dia = this.values.nibp_dia;
    cell.c.classList.remove("aged", "artifact", "nodata");
    if (!sys && !dia) {
      cell.value.textContent = "--/--";
      cell.age.textContent = "no data";
      cell.c.classList.add("nodata");
      return;
    }
    cell.value.textContent = `${sys ? fmt.int(sys.value) : "--"}/${dia ? fmt.int(dia.value) : "--"}`;
    const ts = Math.max(sys ? sys.ts : 0, dia ? dia.ts : 0);
    const age = now - ts;
    const artifact = [sys, dia].some((v) => v && v.flags.includes("artifact"));
    if (artifact) cell.c.classList.add("artifact");
    else if (age > STALE_NIBP_MS) cell.c.classList.add("aged");
    cell.age.textContent = artifact ? `artifact · ${ageText(age)}` : `${ageText(age)} ago`;
  }

  // A newer score (by its own ts) replaces the shown one; a late frame never does.
  setNews2(n) {
    if (!n || typeof n !== "object") return;
    const ts = news2Ts(n);
    const cur = this.news2 ? news2Ts(this.news2) : -Infinity;
    if (Number.isFinite(ts) && Number.isFinite(cur) && ts < cur) return;
    this.news2 = n;
  }

  // NEWS2 comes only from the alarm engine; the board never computes or guesses a score. Coloured by the
  // engine's response: low (white), low-medium (cyan), medium (amber), high (red); an incomplete score shows
  // its partial sum and what is missing, coloured by its response floor when the engine gives one.
  renderNews2(now) {
    const n = this.news2;
    this.newsScore.className = "news2-score";
    this.newsBox.className = "news2";
    if (!this.patientId) {
      this.newsScore.textContent = "--";
      this.newsNote.textContent = "no patient";
      this.newsMissing.textContent = "";
      return;
    }
    if (!n) {
      this.newsScore.textContent = "--";
      this.newsNote.textContent = "incomplete";
      this.newsMissing.textContent = "";
      return;
    }
    const ts = news2Ts(n);
    const age = Number.isFinite(ts) ? ` · ${ageText(now - ts)}` : "";
    const missing = (n.missing || []).map((m) => NEWS2_NAMES[m] || m);
    const stale = (n.stale || []).map((m) => NEWS2_NAMES[m] || m);
    const complete = n.complete && typeof n.score === "number";
    if (complete) {
      this.newsScore.textContent = String(n.score);
      this.newsNote.textContent = `${(n.response || "").replace("_", "-")}${age}`;
      this.newsMissing.textContent = stale.length ? `stale: ${stale.join(", ")}` : "";
    } else {
      this.newsScore.textContent = "incomplete";
      this.newsScore.classList.add("incomplete");
      const partial = typeof n.partial === "number" ? `partial ${n.partial}` : "partial --";
      const floor = n.response ? ` · at least ${n.response.replace("_", "-")}` : "";
      this.newsNote.textContent = `${partial}${floor}${age}`;
      this.newsMissing.textContent = missing.length ? `missing: ${missing.join(", ")}` : "";
    }
    if (n.suppressed) {
      this.newsBox.classList.add("suppressed");
      this.newsNote.textContent += " · suppressed";
    } else if (n.response) {
      this.newsBox.classList.add(`resp-${n.response}`);
      this.newsScore.classList.add(`resp-${n.response}`);
    }
    this.newsBox.dataset.response = n.suppressed ? "suppressed" : (n.response || "");
  }

  // The tile's colour is its highest open alert's priority; only an unacknowledged one flashes.
  renderAlarm() {
    const alerts = state.alerts.all().filter((a) => bedFor(a) === this);
    const shown = tileAlarm(alerts);
    this.tile.classList.remove("alarm-high", "alarm-medium", "alarm-low", "alarm-unack", "alarm-ack");
    if (!shown) {
      this.alarmEl.hidden = true;
      delete this.tile.dataset.alarm;
      return;
    }
    const { top, count, flashing } = shown;
    this.tile.classList.add(`alarm-${top.priority}`, flashing ? "alarm-unack" : "alarm-ack");
    this.tile.dataset.alarm = `${top.priority} ${top.status}`;
    this.alarmEl.hidden = false;
    this.alarmEl.className = `tile-alarm prio-${top.priority} st-${top.status}`;
    const parts = [`${top.priority.toUpperCase()} ${conditionLabel(top)}`];
    const value = valueText(top);
    if (value) parts.push(value);
    if (top.status === "active_ack") parts.push("ack");
    if (top.status === "cleared_unack") parts.push("cleared");
    if (top.data_stale) parts.push("stale");
    if (top.retrospective) parts.push("retrospective");
    const text = `${parts.join(" · ")}${count > 1 ? ` +${count - 1}` : ""}`;
    if (this.alarmEl.textContent !== text) this.alarmEl.textContent = text;
  }

  destroy() {
    if (this.spark) this.spark.destroy();
    this.spark = null;
    this.tile.remove();
  }
}

const NEWS2_NAMES = {
  rr: "RR", spo2: "SpO₂", o2_supplement: "O₂", nibp_sys: "sys BP", pulse: "pulse", acvpu: "ACVPU", temp: "temp",
};

function news2Ts(n) {
  if (typeof n.ts === "number") return n.ts;
  const t = Date.parse(n.ts);
  return Number.isFinite(t) ? t : NaN;
}

// ---------------------------------------------------------------- alarms

function resetAlarms() {
  state.alerts.clear();
  state.receipts.clear();
  state.pendingReceipts.clear();
  state.pending.clear();
  state.paged.clear();
  $("alarm-error").textContent = "";
  renderAlarms();
}

// The REST list is the unit's open alerts at one moment; frames may overtake it, so an alert is dropped as
// gone only when the store had it, unchanged, before the request went out.
async function loadAlerts(gen) {
  const before = new Map(state.alerts.all().map((a) => [a.id, a.version]));
  let body;
  try {
    body = await api(`/api/v1/alerts?status=active&unit_id=${encodeURIComponent(state.unit.id)}`);
  } catch (err) {
    if (err instanceof Unauthorised) handleError(err, null);
    // No alert API (404) or a transient failure: the websocket still delivers alerts.
    return;
  }
  if (gen !== state.generation) return;
  const items = Array.isArray(body) ? body : body.items || [];
  const seen = new Set(items.map((a) => a.id));
  for (const [id, version] of before) {
    const cur = state.alerts.open.get(id);
    if (!seen.has(id) && cur && cur.version === version) state.alerts.open.delete(id);
  }
  for (const a of items) applyAlert(a, false);
  renderAlarms();
}

function ofThisUnit(a) {
  if (!state.unit) return false;
  if (a.unit_id) return a.unit_id === state.unit.id;
  return bedFor(a) !== null;
}

function applyAlert(a, render = true) {
  if (!a || typeof a.id !== "string" || !ofThisUnit(a)) return;
  if (state.alerts.apply(a) && a.status !== "closed") receipt(a);
  if (render) renderAlarms();
}

// The board tells the hub it has shown each version of each alert (escalation knows a screen displayed it).
function receipt(a) {
  const key = `${a.id}:${a.version}`;
  if (state.receipts.has(key)) return;
  const ws = state.ws;
  if (ws && ws.readyState === WebSocket.OPEN && state.wsOpen) {
    ws.send(JSON.stringify({ op: "receipt", alert_id: a.id, version: a.version }));
    state.receipts.add(key);
    state.pendingReceipts.delete(key);
  } else {
    state.pendingReceipts.set(key, a);
  }
}

// The hub could not record a receipt: send it again with the next tick.
function retryReceipt(alertId) {
  const a = state.alerts.open.get(alertId);
  if (!a) return;
  state.receipts.delete(`${a.id}:${a.version}`);
  state.pendingReceipts.set(`${a.id}:${a.version}`, a);
}

function flushReceipts() {
  for (const a of [...state.pendingReceipts.values()]) {
    if (state.alerts.open.get(a.id)?.version === a.version) receipt(a);
    else state.pendingReceipts.delete(`${a.id}:${a.version}`);
  }
}

const ACTION_PATH = { ack: "ack", silence: "silence", resolve: "resolve" };
const ACTION_FAILED = { ack: "acknowledge", silence: "silence", resolve: "resolve" };

async function alertAction(id, action) {
  if (state.pending.has(id) || !ACTION_PATH[action]) return;
  state.pending.set(id, action);
  $("alarm-error").textContent = "";
  renderAlarms();
  const body = action === "silence" ? { duration_s: SILENCE_S } : {};
  try {
    const r = await fetch(`/api/v1/alerts/${encodeURIComponent(id)}/${ACTION_PATH[action]}`, {
      method: "POST",
      headers: { Accept: "application/json", "Content-Type": "application/json", Authorization: `Bearer ${state.token}` },
      body: JSON.stringify(body),
      cache: "no-store",
    });
    if (r.status === 401) throw new Unauthorised("unauthorised");
    if (!r.ok) {
      const why = r.status === 403 ? "you may not" : r.status === 409 ? "the alarm changed; it was not" : "the hub could not";
      $("alarm-error").textContent = `Could not ${ACTION_FAILED[action]}: ${why} (HTTP ${r.status}).`;
      console.warn("vigil board: alert action failed", r.status);
      return;
    }
    // The engine's new version arrives as an `alert` frame; an answer that already holds it is applied now.
    const answer = await r.json().catch(() => null);
    const alert = answer && (answer.alert || answer);
    if (alert && typeof alert.id === "string" && typeof alert.version === "number" && alert.status) applyAlert(alert, false);
  } catch (err) {
    if (err instanceof Unauthorised) { handleError(err, null); return; }
    $("alarm-error").textContent = `Could not ${ACTION_FAILED[action]}: the hub cannot be reached.`;
  } finally {
    state.pending.delete(id);
    renderAlarms();
  }
}

function bedLabel(a) {
  const bed = bedFor(a);
  return bed ? bed.label : a.bed_id || "--";
}

// Banner, list, tiles and audio from the one store; runs after every change and once a second.
function renderAlarms() {
  const onBoard = Boolean(state.unit) && (!$("board-view").hidden || !$("detail-view").hidden);
  const all = state.alerts.all();
  const now = serverNow();
  const ctx = { now, bedLabel, onAction: alertAction, pending: state.pending, paged: state.paged };
  const banner = bannerAlerts(all);
  renderBanner($("alarm-banner"), onBoard ? banner : { top: [], others: 0 }, ctx);
  renderList($("alarm-rows"), [...all].sort(newestFirst), ctx);
  const unacked = all.filter(isUnacked).length;
  $("alarm-count").textContent = all.length
    ? `${all.length} open · ${unacked} unacknowledged` : "no open alarms";
  $("alarm-empty").hidden = all.length > 0;
  $("alarm-list").hidden = all.length === 0;
  for (const bed of state.beds.values()) bed.renderAlarm();
  renderAudio(onBoard, all, now);
}

function renderAudio(onBoard, all, now) {
  const armed = state.audio.armed;
  $("audio-state").hidden = !onBoard;
  $("audio-arm").hidden = !onBoard || armed;
  $("audio-state").textContent = armed ? "AUDIO ON" : "AUDIO OFF";
  $("audio-state").className = `audio-state ${armed ? "on" : "off"}`;
  document.body.classList.toggle("audio-off", onBoard && !armed);
  // Sound follows what the board last knew, even while the link is down: silence is never assumed.
  state.audio.update(onBoard ? audiblePriority(all, now) : null, performance.now());
  const sounding = state.audio.playing || "";
  $("audio-state").dataset.sounding = sounding;
  $("audio-state").title = sounding ? `sounding: ${sounding} priority` : "no alarm sounding";
}

function onPage(d) {
  if (!d || typeof d.alert_id !== "string") return;
  const me = sessionStorage.getItem(USER_KEY);
  if (Array.isArray(d.recipients) && me && !d.recipients.includes(me)) return;
  state.paged.add(d.alert_id);
  renderAlarms();
}

// ---------------------------------------------------------------- websocket

function setBanner(down, detail) {
  $("banner").hidden = !down;
  document.body.classList.toggle("disconnected", down);
  if (detail) $("banner-detail").textContent = detail;
  renderLink();
}

function renderLink() {
  $("link").textContent = state.unit ? (state.wsOpen ? "live" : "no live link") : "";
  $("link").className = `link ${state.wsOpen ? "up" : "down"}`;
}

function connect() {
  if (!state.unit || !state.token) return;
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/ws?access_token=${encodeURIComponent(state.token)}`);
  state.ws = ws;
  state.wsOpen = false;
  setBanner(true, "connecting to the hub…");
  ws.onopen = () => {
    if (state.ws !== ws) return;
    state.lastFrameAt = Date.now();
    ws.send(JSON.stringify({ op: "subscribe", topics: [`unit:${state.unit.id}`, "alerts"] }));
    if (state.lastId !== null) ws.send(JSON.stringify({ op: "resume", after: state.lastId }));
    clearInterval(state.pingTimer);
    state.pingTimer = setInterval(() => heartbeat(ws), PING_EVERY_MS);
  };
  ws.onmessage = (ev) => {
    if (state.ws !== ws) return;
    state.lastFrameAt = Date.now();
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    onMessage(ws, msg);
  };
  ws.onclose = (ev) => {
    if (state.ws !== ws) return;
    state.ws = null;
    lost(ev.code);
  };
  ws.onerror = () => { /* onclose follows and reconnects */ };
}

function heartbeat(ws) {
  if (ws.readyState !== WebSocket.OPEN) return;
  if (Date.now() - state.lastFrameAt > SILENCE_MS) {
    ws.close(4000, "silent"); // half-open connection: reconnect
    return;
  }
  ws.send(JSON.stringify({ op: "ping" }));
}

function lost(code) {
  clearInterval(state.pingTimer);
  state.wsOpen = false;
  if (code === 4401) {
    logout("Your session has ended. Please sign in again.");
    return;
  }
  for (const bed of state.beds.values()) bed.render();
  const delay = state.reconnectDelay * (0.8 + Math.random() * 0.4);
  state.reconnectDelay = Math.min(RECONNECT_MAX_MS, state.reconnectDelay * 2);
  state.reconnectAt = Date.now() + delay;
  state.reconnectTimer = setTimeout(connect, delay);
  updateBannerCountdown();
  console.warn("vigil board: live link lost, reconnecting");
}

function updateBannerCountdown() {
  if (state.wsOpen || !state.unit) return;
  if (state.reconnectTimer) {
    const s = Math.max(0, Math.ceil((state.reconnectAt - Date.now()) / 1000));
    setBanner(true, `live data is not updating · reconnecting in ${s} s`);
  }
}

function closeSocket() {
  clearTimeout(state.reconnectTimer);
  clearInterval(state.pingTimer);
  state.reconnectTimer = null;
  const ws = state.ws;
  state.ws = null;
  state.wsOpen = false;
  state.lastId = null;
  if (ws) ws.close(1000, "bye");
  setBanner(false);
}

function onMessage(ws, msg) {
  if (msg.id !== undefined && msg.id !== null) state.lastId = msg.id;
  switch (msg.type) {
    case "subscribed":
      // Live only once the unit itself is subscribed (the alerts topic alone is not a live board).
      if (!(msg.topics || []).includes(`unit:${state.unit?.id}`)) break;
      state.wsOpen = true;
      state.reconnectDelay = RECONNECT_MIN_MS;
      setBanner(false);
      for (const bed of state.beds.values()) bed.render();
      flushReceipts();
      break;
    case "error":
      if (msg.code === "unauthorised") logout("Your session has ended. Please sign in again.");
      else if (msg.code === "unavailable" && typeof msg.alert_id === "string") retryReceipt(msg.alert_id);
      else if (msg.topic && msg.topic.startsWith("unit:")) {
        $("board-error").textContent = "This unit cannot be watched live.";
        setBanner(true, "the hub refused live data for this unit");
      }
      break;
    case "resync":
      loadUnit();
      break;
    case "vitals": onVitals(msg.data || {}); break;
    case "device": onDevice(msg.data || {}); break;
    case "alert": applyAlert(msg.data || {}); break;
    case "page": onPage(msg.data || {}); break;
    case "news2": onNews2(msg.data || {}); break;
    default: break; // pong, pump and later types: nothing to show yet
  }
}

function onVitals(d) {
  const bed = bedFor(d);
  if (!bed) {
    if (d.unit_id === state.unit?.id) scheduleReload(); // a bed we do not know yet
    return;
  }
  if (d.patient_id && bed.patientId !== d.patient_id) scheduleReload(); // admission changed
  bed.mergeValues(d.values || {});
  const at = Date.parse(d.at);
  if (Number.isFinite(at)) bed.lastData = Math.max(bed.lastData, at);
  if (d.news2) bed.setNews2(d.news2);
  bed.render();
  if (state.detailBed === bed) appendDetail(d.values || {});
}

function onDevice(d) {
  const bed = bedFor(d);
  if (!bed) return;
  bed.conditions.set(d.device_id || "?", Array.isArray(d.conditions) ? d.conditions : []);
  const at = Date.parse(d.at);
  if (Number.isFinite(at)) bed.lastData = Math.max(bed.lastData, at);
  bed.render();
}

function onNews2(d) {
  const bed = bedFor(d);
  if (!bed || !d.news2) return;
  if (d.patient_id && bed.patientId && d.patient_id !== bed.patientId) return; // another admission's score
  bed.setNews2(d.news2);
  bed.render();
}

// ---------------------------------------------------------------- bed detail

const DETAIL_SERIES = [
// `soft`: the y range shown at least, so a flat trace is not blown up; values outside it widen it.
  { title: "Heart rate", codes: ["hr"], labels: ["HR"], unit: "/min", colors: ["#4ade80"], soft: [40, 140] },
  { title: "SpO₂", codes: ["spo2"], labels: ["SpO₂"], unit: "%", colors: ["#e5e7eb"], soft: [80, 100] },
  { title: "Respiratory rate", codes: ["rr"], labels: ["RR"], unit: "/min", colors: ["#e5e7eb"], soft: [5, 35] },
  { title: "NIBP", codes: ["nibp_sys", "nibp_dia"], labels: ["Sys", "Dia"], unit: "mmHg", colors: ["#e5e7eb", "#9ca3af"],
    points: true, soft: [40, 180] },
  { title: "Temperature", codes: ["temp"], labels: ["Temp"], unit: "°C", colors: ["#e5e7eb"], points: true, soft: [35, 40] },
];

function destroyCharts() {
  for (const c of state.charts) c.plot.destroy();
  state.charts = [];
  state.detailBed = null;
}

function openDetail(bed) {
  show("detail-view");
  state.detailBed = bed;
  $("detail-title").textContent = `Bed ${bed.label}${bed.patientId ? ` · ${bed.patientId}` : ""}`;
  $("detail-back").focus();
  loadDetail();
}

function closeDetail() {
  const id = state.detailBed?.id;
  show("board-view");
  const tile = id && state.beds.get(id)?.tile;
  if (tile) tile.focus();
}

async function loadDetail() {
  const bed = state.detailBed;
  destroyCharts();
  state.detailBed = bed;
  const box = $("charts");
  box.replaceChildren();
  $("detail-error").textContent = "";
  if (!bed.patientId) {
    $("detail-error").textContent = "No patient in this bed: the store keeps trends by patient.";
    return;
  }
  const hours = Number($("detail-hours").value) || 4;
  const since = new Date(serverNow() - hours * 3600_000).toISOString();
  const codes = DETAIL_SERIES.flatMap((s) => s.codes);
  let answers;
  try {
    answers = await Promise.all(codes.map((c) => api(
      `/api/v1/patients/${encodeURIComponent(bed.patientId)}/vitals?code=${c}&since=${encodeURIComponent(since)}`)));
  } catch (err) {
    handleError(err, $("detail-error"));
    return;
  }
  if (state.detailBed !== bed) return;
  const byCode = Object.fromEntries(codes.map((c, i) => [c, answers[i].points]));
  const width = Math.max(400, box.clientWidth - 8);
  for (const spec of DETAIL_SERIES) {
    let hidden = 0;
    const tables = spec.codes.map((c) => {
      const xs = [];
      const ys = [];
      for (const p of byCode[c]) {
        if ((p.flags || []).includes("artifact") || typeof p.value !== "number") { hidden += 1; continue; }
        xs.push(Date.parse(p.ts) / 1000);
        ys.push(p.value);
      }
      return [xs, ys];
    });
    const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
    const wrap = el("figure", "chart");
    const caption = el("figcaption", null, `${spec.title} (${spec.unit})`);
    if (!data[0].length) caption.append(el("span", "chart-note", " · no data in this window"));
    if (hidden) caption.append(el("span", "chart-note", ` · ${hidden} artifact sample${hidden === 1 ? "" : "s"} hidden`));
    const target = el("div");
    wrap.append(caption, target);
    box.append(wrap);
    const axis = { stroke: "#cbd5e1", grid: { stroke: "#1f2937" }, ticks: { stroke: "#374151" }, font: "14px system-ui, sans-serif" };
    const plot = new uPlot({
      width, height: 190,
      cursor: { drag: { x: true, y: false }, sync: { key: "vigil-detail" } },
      legend: { show: true, live: true },
      scales: {
        x: { time: true, min: serverNow() / 1000 - hours * 3600, max: serverNow() / 1000 },
        y: { range: (u, min, max) => [Math.min(min ?? spec.soft[0], spec.soft[0]), Math.max(max ?? spec.soft[1], spec.soft[1])] },
      },
      axes: [axis, { ...axis, size: 60 }],
      series: [
        { label: "time" },
        ...spec.codes.map((c, i) => ({
          label: spec.labels[i],
          stroke: spec.colors[i], width: 2, spanGaps: false,
          // Intermittent readings always show their points; continuous ones only while sparse (uPlot default).
          points: spec.points ? { show: true, size: 7, fill: spec.colors[i] } : { size: 6, fill: spec.colors[i] },
        })),
      ],
    }, data, target);
    state.charts.push({ plot, spec, data });
  }
}

// Live points are appended to the open detail charts (the x window stays where the user zoomed it).
function appendDetail(values) {
  for (const chart of state.charts) {
    const { spec } = chart;
    let changed = false;
    for (const [i, code] of spec.codes.entries()) {
      const v = values[code];
      if (!v || typeof v.value !== "number" || (v.flags || []).includes("artifact")) continue;
      const x = Date.parse(v.ts) / 1000;
      const xs = chart.data[0];
      if (xs.length && x <= xs[xs.length - 1]) continue;
      xs.push(x);
      chart.data.forEach((col, j) => { if (j > 0) col.push(j === i + 1 ? v.value : null); });
      changed = true;
    }
    if (changed) chart.plot.setData(chart.data, false);
  }
}

// ---------------------------------------------------------------- wiring

function tick() {
  $("clock").textContent = new Date(serverNow()).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  const who = sessionStorage.getItem(USER_KEY);
  renderLink();
  if (who && state.token) $("logout").title = `Signed in as ${who}`;
  if (!$("board-view").hidden) for (const bed of state.beds.values()) bed.render();
  renderAlarms();
  if (state.wsOpen && state.pendingReceipts.size) flushReceipts();
  updateBannerCountdown();
}

function init() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => logout(""));
  $("units-button").addEventListener("click", showUnits);
  $("detail-back").addEventListener("click", closeDetail);
  $("detail-refresh").addEventListener("click", loadDetail);
  $("detail-hours").addEventListener("change", loadDetail);
  $("audio-arm").addEventListener("click", async () => {
    await state.audio.arm();
    renderAlarms();
  });
  state.audio.onchange = () => renderAlarms(); // a suspended context shows AUDIO OFF again
  const panel = $("alarm-panel");
  panel.open = sessionStorage.getItem(PANEL_KEY) === "open";
  panel.addEventListener("toggle", () => sessionStorage.setItem(PANEL_KEY, panel.open ? "open" : "closed"));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !$("detail-view").hidden) closeDetail();
  });
  window.addEventListener("resize", () => {
    for (const bed of state.beds.values()) {
      if (bed.spark) bed.spark.setSize({ width: Math.max(120, bed.sparkEl.clientWidth), height: 56 });
    }
  });
  setInterval(tick, 1000);
  tick();
  if (!state.token) {
    show("login-view");
    return;
  }
  const saved = sessionStorage.getItem(UNIT_KEY);
  if (saved) {
    try { openUnit(JSON.parse(saved)); return; } catch { /* fall through to the picker */ }
  }
  showUnits();
}

init();
