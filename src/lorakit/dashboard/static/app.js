// The page's router and live polling: #/ (runs), #/run?name=N&tab=T&vs=M, #/compare?name=A&name=B.
"use strict";

LK.state = { runs: [], root: "" };
const POLL_SECONDS = Number(document.querySelector('meta[name="poll-seconds"]').content) || 2;

async function loadRuns() {
  const data = await LK.api("/api/runs");
  const before = new Map(LK.state.runs.map((r) => [r.name, r.status]));
  LK.state.runs = data.runs;
  LK.state.root = data.root;
  document.getElementById("root-path").textContent = data.root;
  const changed = data.runs.filter((r) => before.has(r.name) && before.get(r.name) !== r.status);
  if (changed.length) LK.announce(changed.map((r) => `${r.name} is now ${r.status}`).join(". "));
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  return { path, params: new URLSearchParams(query || "") };
}

function currentView() {
  const { path } = parseHash();
  return path === "/run" ? LK.runView : path === "/compare" ? LK.compareView : LK.runsView;
}

async function route(focus) {
  const { params } = parseHash();
  const view = currentView();
  const main = document.getElementById("main");
  document.getElementById("nav-runs").toggleAttribute("aria-current", view === LK.runsView);
  document.getElementById("nav-compare").toggleAttribute("aria-current", view === LK.compareView);
  if (view === LK.runsView) document.title = "Runs · lorakit dashboard";
  else if (view === LK.runView) document.title = params.get("name") + " · lorakit dashboard";
  else document.title = "Compare adapters · lorakit dashboard";
  await view.render(main, params);
  if (focus) { const heading = main.querySelector("h1"); if (heading) { heading.tabIndex = -1; heading.focus(); } }
}

function setLive(text, problem) {
  const live = document.getElementById("live");
  live.textContent = text;
  live.classList.toggle("problem", !!problem);
}

async function tick() {
  try {
    await loadRuns();
    const view = currentView();
    if (view === LK.runsView) view.update(false);
    if (view === LK.runView) await view.update();
    setLive(`Live: updated ${new Date().toLocaleTimeString()}, every ${POLL_SECONDS} s`);
  } catch (err) {
    setLive(`Connection lost (${err.message}); retrying every ${POLL_SECONDS} s`, true);
  }
  setTimeout(tick, POLL_SECONDS * 1000);
}

async function start() {
  try {
    await loadRuns();
    setLive(`Live: updated ${new Date().toLocaleTimeString()}, every ${POLL_SECONDS} s`);
  } catch (err) {
    setLive(`Cannot read the runs (${err.message})`, true);
  }
  await route(false);
  document.documentElement.dataset.firstRenderMs = String(Math.round(performance.now()));
  window.addEventListener("hashchange", () => route(true));
  setTimeout(tick, POLL_SECONDS * 1000);
}

start();
