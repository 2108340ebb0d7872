// One run: its status and key facts, then three tabs: curves (live), settings (diff to another run), samples.
"use strict";

const TABS = [["curves", "Curves"], ["settings", "Settings"], ["samples", "Samples"]];

LK.flatten = function (value, prefix, out) {
  out = out || {};
  for (const [key, v] of Object.entries(value || {})) {
    if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length) LK.flatten(v, (prefix || "") + key + ".", out);
    else out[(prefix || "") + key] = v;
  }
  return out;
};

// The events of the timeline a run kept: train and eval events that a divergence rollback dropped (logged before it,
// after the step it went back to, up to the one that diverged) are left out, as lorakit.train.metrics.kept_events does.
LK.keptEvents = function (events) {
  let out = [];
  for (const e of events) {
    if (e.kind === "rollback" && typeof e.step === "number" && typeof e.to_step === "number") {
      out = out.filter((x) => (x.kind !== "train" && x.kind !== "eval") || typeof x.step !== "number"
        || !(e.to_step < x.step && x.step <= e.step));
    }
    out.push(e);
  }
  return out;
};

LK.show = (v) => (v === null || v === undefined ? "null" : typeof v === "object" ? JSON.stringify(v) : String(v));

LK.runView = {
  async render(main, params) {
    const name = params.get("name");
    if (name !== this.name) {
      this.events = []; this.offset = 0; this.metricsHead = ""; this.samples = null; this.run = null;
    }
    this.drawnCount = -1; this.settingsDrawn = false; this.samplesDrawn = false; this.headKey = null;  // new panels
    this.name = name;
    this.tab = TABS.some((t) => t[0] === params.get("tab")) ? params.get("tab") : "curves";
    this.vs = params.get("vs") || "";
    const { h } = LK;
    const tablist = h("div", { role: "tablist", "aria-label": "Run views", class: "tabs" });
    const panels = TABS.map(([id, label]) => {
      const tab = h("button", { role: "tab", type: "button", id: "tab-" + id, "aria-controls": "panel-" + id,
        "aria-selected": String(id === this.tab), tabindex: id === this.tab ? "0" : "-1", text: label });
      tab.addEventListener("click", () => this.select(id));
      tab.addEventListener("keydown", (e) => {
        const i = TABS.findIndex((t) => t[0] === id);
        const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: TABS.length - 1 }[e.key];
        if (next === undefined) return;
        e.preventDefault();
        const target = TABS[(next + TABS.length) % TABS.length][0];
        this.select(target);
        document.getElementById("tab-" + target).focus();
      });
      tablist.append(tab);
      return h("section", { role: "tabpanel", id: "panel-" + id, "aria-labelledby": "tab-" + id, hidden: id !== this.tab, tabindex: "0" });
    });
    main.replaceChildren(
      h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/", text: "Runs" }), " / ", h("span", { text: name })),
      h("div", { id: "run-head" }, h("h1", { text: name })), tablist, ...panels);
    try {
      await this.update();
    } catch (err) {
      main.replaceChildren(h("h1", { text: name }), h("p", { class: "error", role: "alert", text: `Cannot show this run: ${err.message}` }),
        h("p", {}, h("a", { href: "#/", text: "Back to the runs" })));
      this.name = null;
    }
  },

  select(id) {
    this.tab = id;
    TABS.forEach(([t]) => {
      const tab = document.getElementById("tab-" + t);
      tab.setAttribute("aria-selected", String(t === id));
      tab.tabIndex = t === id ? 0 : -1;
      document.getElementById("panel-" + t).hidden = t !== id;
    });
    history.replaceState(null, "", this.hash());
    this.fillPanel();
  },

  hash() {
    const q = new URLSearchParams({ name: this.name, tab: this.tab });
    if (this.vs) q.set("vs", this.vs);
    return "#/run?" + q;
  },

  async update() {
    if (!this.name || !document.getElementById("run-head")) return;
    let run, metrics;
    try {
      [run, metrics] = await Promise.all([
        LK.api("/api/run", { name: this.name }),
        LK.api("/api/metrics", { name: this.name, offset: this.offset, head: this.metricsHead }),
      ]);
    } catch (err) {
      if (err.status !== 404 || !this.run) throw err;
      this.gone();  // the run folder was removed (or renamed) while shown: the connection is fine
      return;
    }
    this.events = metrics.reset ? metrics.events : this.events.concat(metrics.events);
    this.offset = metrics.offset;
    this.metricsHead = metrics.head;
    const grew = this.events.length !== this.drawnCount;
    const samplesAppeared = run.row.has_samples && this.samples && !this.samples.rows.length;
    if (samplesAppeared) { this.samples = null; this.samplesDrawn = false; }
    this.run = run;
    this.head();
    if (this.tab === "curves" && grew) this.curves();
    if (this.tab === "settings" && !this.settingsDrawn) await this.settings();
    if (this.tab === "samples" && !this.samplesDrawn) await this.samplesPanel();
  },

  gone() {
    const { h } = LK;
    document.getElementById("main").replaceChildren(h("h1", { text: this.name }),
      h("p", { class: "error", role: "alert", "data-gone": "true",
        text: "This run is no longer in the runs folder: it was removed or renamed." }),
      h("p", {}, h("a", { href: "#/", text: "Back to the runs" })));
    this.name = null;
    this.run = null;
  },

  fillPanel() {
    if (this.tab === "curves") this.curves();
    if (this.tab === "settings") this.settings();
    if (this.tab === "samples") this.samplesPanel();
  },

  head() {
    const { h } = LK;
    const r = this.run.row;
    const s = r.settings;
    const facts = [
      ["Model", h("span", { title: r.model, text: LK.shortModel(r.model) })],
      ["Task", r.task || "—"],
      ["LoRA r / α", `${LK.num(s.r)} / ${LK.num(s.alpha)}`],
      ["Learning rate", `${LK.num(s.lr)} (${s.scheduler || "—"})`],
      ["Batch", LK.num(s.batch)],
      ["Steps", r.total_steps ? `${r.step} / ${r.total_steps}` : String(r.step)],
      ["Best eval", r.best ? `${r.best.metric} ${LK.num(r.best.value)} at step ${r.best.step}` : "—"],
      ["Task score", r.scores ? `${r.scores.metric}: base ${LK.percent(r.scores.base)}, adapter ${LK.percent(r.scores.adapter)}` : "—"],
      ["Wall time", LK.duration(r.wall_seconds)],
      ["tokens/s", r.tokens_per_s ? LK.num(r.tokens_per_s, 0) : "—"],
      ["Checkpoints", r.checkpoints.length ? r.checkpoints.map((c) => "step " + c).join(", ") : "none"],
    ];
    const key = JSON.stringify([r, this.run.files]);
    if (key === this.headKey) return;
    this.headKey = key;
    const files = (this.run.files || []).map((path) =>
      h("a", { href: "/api/file?" + new URLSearchParams({ name: this.name, path }), "data-focus-key": "file:" + path, text: path }));
    const dl = h("dl", { class: "facts" }, facts.map(([k, v]) => h("div", {}, h("dt", { text: k }), h("dd", {}, v))),
      files.length ? h("div", { class: "files" }, h("dt", { text: "Files" }), h("dd", {}, files.flatMap((a, i) => (i ? [" · ", a] : [a])))) : null);
    const head = document.getElementById("run-head");
    LK.keepFocus(head, () => head.replaceChildren(
      h("h1", {}, h("span", { text: this.name }), " ", LK.badge(r.status, r.status_detail)),
      h("p", { class: "detail", id: "status-detail", text: r.status_detail }), dl));
  },

  curves() {
    const panel = document.getElementById("panel-curves");
    const ev = LK.keptEvents(this.events);
    this.drawnCount = this.events.length;
    const series = (kind, key, name, dots) => ({
      name, dots, points: ev.filter((e) => e.kind === kind && typeof e[key] === "number").map((e) => [e.step, e[key]]),
    });
    const taskKeys = [...new Set(ev.filter((e) => e.kind === "eval").flatMap((e) => Object.keys(e)))]
      .filter((k) => k.startsWith("eval_") && k !== "eval_loss" && ev.some((e) => typeof e[k] === "number")).sort();
    const task = taskKeys.map((k) => series("eval", k, k.replace(/^eval_/, ""), true));
    if (ev.some((e) => e.kind === "train" && typeof e.accuracy === "number")) task.push(series("train", "accuracy", "train accuracy", false));
    LK.keepFocus(panel, () => panel.replaceChildren(LK.h("div", { class: "charts" },
      LK.chart("loss", "Loss", [series("train", "loss", "train loss", false), series("eval", "eval_loss", "eval loss", true)],
        { empty: "No loss logged yet: the first point comes after train.logging_steps steps." }),
      LK.chart("lr", "Learning rate", [series("train", "lr", "learning rate", false)]),
      LK.chart("speed", "Throughput (tokens/s)", [series("train", "tokens_per_s", "tokens/s", false)]),
      LK.chart("task", "Task metrics", task, { empty: "No task metrics: set eval.task to score generations (base at step 0, adapter at the end)." }))));
  },

  async settings() {
    const { h } = LK;
    const panel = document.getElementById("panel-settings");
    const focusedId = document.activeElement && document.activeElement.id;
    this.settingsDrawn = true;
    const others = LK.state.runs.map((r) => r.name).filter((n) => n !== this.name);
    const select = h("select", { id: "settings-vs" }, h("option", { value: "", text: "(no other run)" }),
      others.map((n) => h("option", { value: n, selected: n === this.vs, text: n })));
    const only = h("input", { type: "checkbox", id: "settings-only-diff", checked: !!this.onlyDiff });
    select.addEventListener("change", () => { this.vs = select.value; history.replaceState(null, "", this.hash()); this.settings(); });
    only.addEventListener("change", () => { this.onlyDiff = only.checked; this.settings(); });
    const controls = h("div", { class: "toolbar" }, h("label", { for: "settings-vs", text: "Compare with" }), select,
      h("label", { class: "check" }, only, " Only differences"));
    let rows, summary;
    if (this.vs) {
      try {
        const diff = await LK.api("/api/diff", { a: this.name, b: this.vs });
        rows = diff.rows;
        summary = `${rows.filter((r) => r.differs).length} of ${rows.length} settings differ from ${this.vs}.`;
      } catch (err) {
        rows = []; summary = `Cannot compare with ${this.vs}: ${err.message}`;
      }
    } else {
      rows = Object.entries(LK.flatten(this.run.config)).map(([key, a]) => ({ key, a, differs: false }));
      summary = `${rows.length} settings from run_config.yaml.`;
    }
    const shown = this.onlyDiff && this.vs ? rows.filter((r) => r.differs) : rows;
    const head = h("tr", {}, h("th", { scope: "col", text: "Setting" }), h("th", { scope: "col", text: this.name }),
      this.vs ? [h("th", { scope: "col", text: this.vs }), h("th", { scope: "col", text: "Differs" })] : []);
    const body = h("tbody", {}, shown.map((r) => h("tr", { class: r.differs ? "differs" : null, "data-key": r.key, "data-differs": String(r.differs) },
      h("th", { scope: "row", text: r.key }), h("td", { text: LK.show(r.a) }),
      this.vs ? [h("td", { text: LK.show(r.b) }), h("td", { text: r.differs ? "≠ differs" : "" })] : [])));
    const table = h("table", { class: "settings", id: "settings-table" }, h("caption", { text: summary }), h("thead", {}, head), body);
    panel.replaceChildren(controls, LK.tableWrap("Settings", table));
    const again = focusedId && document.getElementById(focusedId);
    if (again) again.focus();
  },

  async samplesPanel() {
    const { h } = LK;
    const panel = document.getElementById("panel-samples");
    if (!this.samples) {
      panel.replaceChildren(h("p", { class: "muted", text: "Loading samples…" }));
      this.samples = await LK.api("/api/samples", { name: this.name });
    }
    this.samplesDrawn = true;
    const { rows, metric } = this.samples;
    if (!rows.length) {
      panel.replaceChildren(h("p", { class: "empty", id: "no-samples",
        text: "No samples.jsonl in this run: a run writes its held-out prompts with base and adapter outputs when eval.task is set and it finishes." }));
      return;
    }
    const v = (r, who) => (r[who + "_scores"] || {})[metric];
    const count = (f) => rows.filter(f).length;
    const hasBase = rows.some((r) => r.base !== null && r.base !== undefined);
    const filters = {
      all: ["All rows", () => true],
      differ: ["Base and adapter outputs differ", (r) => hasBase && (r.base || "").trim() !== (r.adapter || "").trim()],
      wrong: ["Adapter below full marks", (r) => v(r, "adapter") !== 1],
      fixed: ["Adapter better than base", (r) => hasBase && v(r, "adapter") > v(r, "base")],
      broke: ["Adapter worse than base", (r) => hasBase && v(r, "adapter") < v(r, "base")],
    };
    this.sampleFilter = this.sampleFilter in filters ? this.sampleFilter : "all";
    const select = h("select", { id: "samples-filter" }, Object.entries(filters).map(([k, [label, f]]) =>
      h("option", { value: k, selected: k === this.sampleFilter, text: `${label} (${count(f)})` })));
    select.addEventListener("change", () => { this.sampleFilter = select.value; this.samplesPanel().then(() => document.getElementById("samples-filter").focus()); });
    const mean = (who) => { const xs = rows.map((r) => v(r, who)).filter((x) => typeof x === "number"); return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null; };
    const summary = `${rows.length} held-out prompts; ${metric || "score"}: ` +
      (hasBase ? `base ${LK.percent(mean("base"))}, ` : "") + `adapter ${LK.percent(mean("adapter"))}.`;
    const shown = rows.filter(filters[this.sampleFilter][1]);
    const head = h("tr", {}, ["#", "Prompt", "Reference", hasBase ? "Base output" : null, "Adapter output"].filter(Boolean)
      .map((t) => h("th", { scope: "col", text: t })));
    const body = h("tbody", {}, shown.slice(0, 2000).map((r) => h("tr", { "data-row": r.id },
      h("td", { class: "num", text: r.id }), h("td", { class: "text", text: r.instruction }),
      h("td", { class: "text mono", text: Array.isArray(r.reference) ? r.reference.join("\n") : r.reference }),
      hasBase ? h("td", { class: "text mono", "data-who": "base" }, h("div", { class: "out", text: r.base }), LK.verdict(metric, v(r, "base"))) : null,
      h("td", { class: "text mono", "data-who": "adapter" }, h("div", { class: "out", text: r.adapter }), LK.verdict(metric, v(r, "adapter"))))));
    const table = h("table", { class: "samples", id: "samples-table" }, h("caption", { text: summary }), h("thead", {}, head), body);
    panel.replaceChildren(...[h("div", { class: "toolbar" }, h("label", { for: "samples-filter", text: "Show" }), select),
      shown.length > 2000 ? h("p", { class: "muted", text: `Showing the first 2000 of ${shown.length} rows.` }) : null,
      LK.tableWrap("Samples", table)].filter(Boolean));
  },
};
