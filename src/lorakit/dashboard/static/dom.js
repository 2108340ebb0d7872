// Small helpers shared by the views: element building (text only, never HTML), formatting, the API.
"use strict";
window.LK = window.LK || {};

LK.h = function (tag, attrs, ...children) {
  const el = document.createElementNS(
    ["svg", "path", "g", "line", "text", "circle", "rect", "title"].includes(tag) ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml",
    tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
};

LK.num = function (value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (typeof value !== "number") return String(value);
  const abs = Math.abs(value);
  if (digits !== undefined) return value.toFixed(digits);
  if (abs !== 0 && (abs < 1e-4 || abs >= 1e6)) return value.toExponential(2).replace(/\.?0+e/, "e");
  if (Number.isInteger(value)) return String(value);
  return abs >= 100 ? value.toFixed(0) : String(Number(value.toPrecision(3)));
};

LK.percent = (value) => (typeof value === "number" ? (100 * value).toFixed(1) + "%" : "—");

LK.duration = function (seconds) {
  if (typeof seconds !== "number") return "—";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
};

LK.ago = function (unixSeconds) {
  if (!unixSeconds) return "—";
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(unixSeconds * 1000).toLocaleDateString();
};

LK.shortModel = function (model) {
  if (!model) return "—";
  const parts = String(model).split("/").filter(Boolean);
  return parts.length > 1 && String(model).startsWith("/") ? parts[parts.length - 1] : String(model);
};

LK.STATUS_MARK = { running: "●", finished: "✓", failed: "✗", resumable: "↻" };

LK.badge = function (status, detail) {
  return LK.h("span", { class: "badge status-" + status, "data-status": status, title: detail || null },
    LK.h("span", { "aria-hidden": "true", text: (LK.STATUS_MARK[status] || "?") + " " }), status);
};

LK.verdict = function (metric, value) {
  // A 0/1 metric (exact match) reads as a word and a mark, any other as its number; colour is never alone.
  if (value === null || value === undefined) return LK.h("span", { class: "verdict none", text: "not scored" });
  if (value === 1 || value === 0) {
    const ok = value === 1;
    return LK.h("span", { class: "verdict " + (ok ? "good" : "bad"), "data-verdict": value },
      LK.h("span", { "aria-hidden": "true", text: ok ? "✓ " : "✗ " }), ok ? "match" : "miss");
  }
  return LK.h("span", { class: "verdict score", "data-verdict": value, text: (metric || "score") + " " + LK.num(value, 3) });
};

LK.api = async function (path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    for (const v of [].concat(value)) if (v !== undefined && v !== null) query.append(key, v);
  }
  const response = await fetch(path + (query.toString() ? "?" + query : ""), { cache: "no-store", credentials: "same-origin" });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return response.json();
};

LK.announce = function (text) {
  const region = document.getElementById("announce");
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 50);
};

LK.tableWrap = function (label, table) {
  // A wide table scrolls inside a focusable region, so keyboard users can scroll it too.
  return LK.h("div", { class: "table-wrap", role: "region", "aria-label": label, tabindex: "0" }, table);
};

LK.keepFocus = function (container, redraw) {
  // Redraw part of the page without losing the keyboard focus: refocus the element with the same data-focus-key.
  const active = document.activeElement;
  const key = active && container.contains(active) ? active.dataset.focusKey || active.id : null;
  redraw();
  if (!key) return;
  const again = container.querySelector(`[data-focus-key="${CSS.escape(key)}"]`) || document.getElementById(key);
  if (again) again.focus();
};
