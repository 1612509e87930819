// Vigil ICU board: the unit's alarms as the board sees them (alarm engine alerts only, never computed here).
// Pure functions and one small store; no DOM, no clock of its own (callers pass `now`, the hub's time in ms).

export const PRIORITY_RANK = { high: 3, medium: 2, low: 1 };
export const OPEN_STATUSES = ["active_unack", "active_ack", "cleared_unack"];
const UNACK = new Set(["active_unack", "cleared_unack"]);

export const STATUS_TEXT = {
  active_unack: "active · unacknowledged",
  active_ack: "acknowledged",
  cleared_unack: "cleared · unacknowledged",
  closed: "closed",
};

// Labels for the technical conditions (clinical rules carry their own `label` from config/rules.yaml).
const CONDITION_LABEL = {
  news2: "NEWS2",
  device_offline: "Device offline",
  lead_off: "ECG lead off",
  probe_off: "SpO₂ probe off",
  low_battery: "Battery low",
  pump_occlusion: "Pump occlusion",
  pump_air_in_line: "Pump air in line",
  pump_end_of_infusion: "Pump end of infusion",
  artifact: "Artifact",
};

export const rank = (a) => PRIORITY_RANK[a.priority] || 0;
export const isUnacked = (a) => UNACK.has(a.status);
export const isOpen = (a) => OPEN_STATUSES.includes(a.status);

export function toMs(v) {
  if (typeof v === "number") return v;
  if (typeof v === "string") {
    const t = Date.parse(v);
    return Number.isFinite(t) ? t : NaN;
  }
  return NaN;
}

// The frame carries label/value/unit at the top level; a REST answer may keep them in `detail`.
export function conditionLabel(a) {
  const label = a.label ?? a.detail?.label;
  if (typeof label === "string" && label) return label;
  return CONDITION_LABEL[a.condition] || String(a.condition || "alarm").replace(/_/g, " ");
}

export function valueText(a) {
  const value = a.value ?? a.detail?.value;
  if (typeof value !== "number" || !Number.isFinite(value)) return "";
  const unit = a.unit ?? a.detail?.unit ?? "";
  const shown = Number.isInteger(value) ? String(value) : value.toFixed(1);
  return unit ? `${shown} ${unit}` : shown;
}

export function silencedFor(a, now) {
  const until = toMs(a.silenced_until);
  return Number.isFinite(until) && until > now ? until - now : 0;
}

export function clock24(ms) {
  if (!Number.isFinite(ms)) return "--:--:--";
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
}

export function mmss(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

// Highest priority first, then newest first.
export function byUrgency(a, b) {
  return rank(b) - rank(a) || (toMs(b.raised_at) || 0) - (toMs(a.raised_at) || 0);
}

export const newestFirst = (a, b) => (toMs(b.raised_at) || 0) - (toMs(a.raised_at) || 0);

// The banner: the unacknowledged alerts of the highest priority among them (latched cleared ones included).
export function bannerAlerts(alerts) {
  const unacked = alerts.filter(isUnacked).sort(byUrgency);
  if (!unacked.length) return { top: [], others: 0 };
  const best = rank(unacked[0]);
  const top = unacked.filter((a) => rank(a) === best);
  return { top, others: unacked.length - top.length };
}

// What sounds: the highest priority among unacknowledged, unsilenced open alerts (only one tone at a time).
export function audiblePriority(alerts, now) {
  let best = null;
  for (const a of alerts) {
    if (!isUnacked(a) || silencedFor(a, now) > 0 || !PRIORITY_RANK[a.priority]) continue;
    if (!best || PRIORITY_RANK[a.priority] > PRIORITY_RANK[best]) best = a.priority;
  }
  return best;
}

// The tile: its highest open alert decides the colour; only an unacknowledged one flashes.
export function tileAlarm(alerts) {
  const open = alerts.filter(isOpen).sort(byUrgency);
  if (!open.length) return null;
  const top = open.find((a) => rank(a) === rank(open[0]) && isUnacked(a)) || open[0];
  return { top, count: open.length, flashing: top.status === "active_unack" };
}

// Which buttons an alert offers (the engine decides; these only avoid offering what it would refuse).
export function allowedActions(a) {
  const out = [];
  if (isUnacked(a)) out.push("ack", "silence");
  if (a.status === "cleared_unack") out.push("resolve");
  return out;
}

// Every open alert of the unit by id; versions only move forward (a late or duplicate frame changes nothing).
export class AlertStore {
  constructor() {
    this.open = new Map();
    this.closed = new Map(); // id -> version it closed at, so a stale "open" copy cannot resurrect it
  }

  apply(a) {
    if (!a || typeof a.id !== "string") return false;
    const v = typeof a.version === "number" ? a.version : -1;
    const cur = this.open.get(a.id);
    if (cur && typeof cur.version === "number" && cur.version > v) return false;
    const closedAt = this.closed.get(a.id);
    if (closedAt !== undefined && closedAt >= v) return false;
    if (!isOpen(a)) {
      this.open.delete(a.id);
      this.closed.set(a.id, v);
      return true;
    }
    this.open.set(a.id, a);
    return true;
  }

  clear() {
    this.open.clear();
    this.closed.clear();
  }

  all() {
    return [...this.open.values()];
  }

  forBed(bedId) {
    return this.all().filter((a) => a.bed_id === bedId);
  }
}
