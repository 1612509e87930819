// Vigil ICU board: the alarm banner and the unit's alarm list (DOM only; what to show comes from alarms.js).
// Rows are keyed by alert id and updated in place every second, so a button being clicked is never replaced.

import {
  STATUS_TEXT, allowedActions, clock24, conditionLabel, mmss, silencedFor, toMs, valueText,
} from "./alarms.js";

const ACTION_TEXT = { ack: "Acknowledge", silence: "Silence 2 min", resolve: "Resolve" };
const PENDING_TEXT = { ack: "Acknowledging…", silence: "Silencing…", resolve: "Resolving…" };

const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

function ageText(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// Keep one element per key in `container`, in `items` order; `make` builds one, `update` refreshes it.
function reconcile(container, items, key, make, update) {
  const have = new Map([...container.children].map((c) => [c.dataset.key, c]));
  let at = 0;
  for (const item of items) {
    const k = key(item);
    let node = have.get(k);
    if (!node) {
      node = make(item);
      node.dataset.key = k;
    }
    have.delete(k);
    update(node, item);
    if (container.children[at] !== node) container.insertBefore(node, container.children[at] || null);
    at += 1;
  }
  for (const gone of have.values()) gone.remove();
}

// The markers every view shows the same way: cleared (latched), silenced, stale data, retrospective, paged.
function tags(a, ctx) {
  const out = [];
  if (a.status === "cleared_unack") out.push(["cleared", "CLEARED"]);
  const silenced = silencedFor(a, ctx.now);
  if (silenced) out.push(["silenced", `SILENCED ${mmss(silenced)}`]);
  if (a.data_stale) out.push(["stale", "STALE DATA"]);
  if (a.retrospective) out.push(["retro", "RETROSPECTIVE"]);
  if (ctx.paged.has(a.id)) out.push(["paged", "PAGED TO YOU"]);
  return out;
}

function setTags(box, list) {
  const text = list.map(([, t]) => t).join("|");
  if (box.dataset.tags === text) return;
  box.dataset.tags = text;
  box.replaceChildren(...list.map(([cls, t]) => el("span", `tag tag-${cls}`, t)));
}

function setButtons(box, a, ctx) {
  const allowed = allowedActions(a);
  const pending = ctx.pending.get(a.id);
  for (const action of ["ack", "silence", "resolve"]) {
    let b = box.querySelector(`button[data-action="${action}"]`);
    if (!allowed.includes(action)) {
      if (b) b.remove();
      continue;
    }
    if (!b) {
      b = el("button", `alarm-action act-${action}`);
      b.type = "button";
      b.dataset.action = action;
      b.addEventListener("click", (ev) => {
        ev.stopPropagation();
        ctx.onAction(box.closest("[data-alert]").dataset.alert, action);
      });
      const order = ["ack", "silence", "resolve"];
      const next = [...box.children].find((c) => order.indexOf(c.dataset.action) > order.indexOf(action));
      box.insertBefore(b, next || null);
    }
    const text = pending === action ? PENDING_TEXT[action] : ACTION_TEXT[action];
    if (b.textContent !== text) b.textContent = text;
    b.disabled = Boolean(pending);
  }
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// ---------------------------------------------------------------- banner

function makeBannerRow() {
  const row = el("div", "banner-alarm");
  row.append(
    el("span", "ba-prio"), el("span", "ba-bed"), el("span", "ba-cond"), el("span", "ba-value"),
    el("span", "ba-age"), el("span", "ba-tags"), el("span", "spacer"), el("span", "ba-actions"),
  );
  return row;
}

function updateBannerRow(row, a, ctx) {
  row.dataset.alert = a.id;
  row.dataset.status = a.status;
  row.dataset.priority = a.priority;
  row.className = `banner-alarm prio-${a.priority} st-${a.status}`;
  const [prio, bed, cond, value, age, tagBox, , actions] = row.children;
  setText(prio, String(a.priority || "").toUpperCase());
  setText(bed, ctx.bedLabel(a));
  setText(cond, conditionLabel(a));
  setText(value, valueText(a));
  setText(age, ageText(ctx.now - (toMs(a.raised_at) || ctx.now)));
  setTags(tagBox, tags(a, ctx));
  setButtons(actions, a, ctx);
}

export function renderBanner(root, { top, others }, ctx) {
  root.hidden = top.length === 0;
  root.className = `alarm-banner${top.length ? ` prio-${top[0].priority}` : ""}`;
  const rows = root.querySelector(".banner-rows");
  reconcile(rows, top, (a) => a.id, makeBannerRow, (row, a) => updateBannerRow(row, a, ctx));
  setText(root.querySelector(".banner-more"), others ? `+${others} more unacknowledged (see the alarm list)` : "");
}

// ---------------------------------------------------------------- alarm list

function makeListRow() {
  const tr = el("tr", "alarm-row");
  for (const cls of ["al-time", "al-bed", "al-prio", "al-cond", "al-value", "al-status", "al-tags", "al-actions"]) {
    tr.append(el("td", cls));
  }
  return tr;
}

function updateListRow(tr, a, ctx) {
  tr.dataset.alert = a.id;
  tr.dataset.status = a.status;
  tr.dataset.priority = a.priority;
  tr.className = `alarm-row prio-${a.priority} st-${a.status}`;
  const [time, bed, prio, cond, value, status, tagBox, actions] = tr.children;
  setText(time, clock24(toMs(a.raised_at)));
  setText(bed, ctx.bedLabel(a));
  setText(prio, String(a.priority || "").toUpperCase());
  setText(cond, conditionLabel(a));
  setText(value, valueText(a));
  setText(status, STATUS_TEXT[a.status] || a.status);
  setTags(tagBox, tags(a, ctx));
  setButtons(actions, a, ctx);
}

export function renderList(tbody, alerts, ctx) {
  reconcile(tbody, alerts, (a) => a.id, makeListRow, (tr, a) => updateListRow(tr, a, ctx));
}
