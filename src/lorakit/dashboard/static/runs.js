// The runs table: every run under the folder with its status and key numbers; select 2-3 to compare.
"use strict";

const RUN_COLUMNS = [
  { key: "select", label: "Select", sortable: false },
  { key: "name", label: "Run", value: (r) => r.name },
  { key: "status", label: "Status", value: (r) => r.status },
  { key: "model", label: "Model", value: (r) => r.model || "" },
  { key: "task", label: "Task", value: (r) => r.task || "" },
  { key: "rank", label: "r / α", value: (r) => r.settings.r ?? -1 },
  { key: "lr", label: "lr", value: (r) => r.settings.lr ?? -1 },
  { key: "step", label: "Steps", value: (r) => r.step },
  { key: "best", label: "Best eval", value: (r) => (r.best ? r.best.value : Infinity) },
  { key: "score", label: "Task score base → adapter", value: (r) => (r.scores ? r.scores.adapter : -1) },
  { key: "wall", label: "Wall time", value: (r) => r.wall_seconds ?? -1 },
  { key: "speed", label: "tokens/s", value: (r) => r.tokens_per_s ?? -1 },
  { key: "updated", label: "Updated", value: (r) => r.updated },
];

LK.runsView = {
  sort: { key: "updated", dir: -1 },
  filter: "",
  selected: new Set(),

  render(main) {
    const { h } = LK;
    const count = h("span", { class: "count", id: "runs-count" });
    const filter = h("input", { id: "runs-filter", type: "search", value: this.filter, autocomplete: "off",
      placeholder: "name, model, task or status" });
    filter.addEventListener("input", () => { this.filter = filter.value; this.update(true); });
    const compare = h("button", { id: "compare-selected", type: "button", disabled: true });
    compare.addEventListener("click", () => { location.hash = "#/compare?" + [...this.selected].map((n) => "name=" + encodeURIComponent(n)).join("&"); });
    const head = h("tr", {}, RUN_COLUMNS.map((col) => {
      if (col.sortable === false) return h("th", { scope: "col" }, h("span", { class: "sr-only", text: col.label }));
      const button = h("button", { type: "button", class: "sort", "data-sort": col.key, text: col.label });
      button.addEventListener("click", () => {
        this.sort = { key: col.key, dir: this.sort.key === col.key ? -this.sort.dir : (col.key === "name" ? 1 : -1) };
        this.update(true);
      });
      return h("th", { scope: "col", "data-col": col.key }, button);
    }));
    const table = h("table", { class: "runs", id: "runs-table" },
      h("caption", { class: "sr-only", text: "Runs in the folder; column buttons sort" }), h("thead", {}, head), h("tbody", { id: "runs-body" }));
    main.replaceChildren(h("section", { "aria-labelledby": "runs-heading" },
      h("h1", { id: "runs-heading" }, "Runs ", count),
      h("div", { class: "toolbar" },
        h("label", { for: "runs-filter", text: "Filter" }), filter, compare,
        h("span", { class: "hint", id: "compare-hint", text: "Select 2 or 3 runs that have samples to compare their adapters." })),
      LK.tableWrap("Runs table", table)));
    this.update(true);
  },

  update(force) {
    const body = document.getElementById("runs-body");
    if (!body) return;
    const runs = LK.state.runs.filter((r) => this.matches(r));
    const col = RUN_COLUMNS.find((c) => c.key === this.sort.key);
    runs.sort((a, b) => { const x = col.value(a), y = col.value(b); return (x < y ? -1 : x > y ? 1 : 0) * this.sort.dir; });
    if (force || !this.rows || this.rows.body !== body) this.rows = { body, byName: new Map() };
    // Rows are updated in place (a poll never replaces the element under the pointer or the focus);
    // they move only when the order changes.
    const byName = this.rows.byName;
    for (const name of [...byName.keys()]) {
      if (!runs.some((r) => r.name === name)) { byName.get(name).tr.remove(); byName.delete(name); }
    }
    runs.forEach((r) => { if (!byName.has(r.name)) byName.set(r.name, this.row(r)); this.fill(byName.get(r.name), r); });
    const order = runs.map((r) => byName.get(r.name).tr);
    if (order.some((tr, i) => body.children[i] !== tr)) LK.keepFocus(body, () => body.replaceChildren(...order));
    document.querySelectorAll("#runs-table th[data-col]").forEach((th) => {
      th.setAttribute("aria-sort", th.dataset.col === this.sort.key ? (this.sort.dir > 0 ? "ascending" : "descending") : "none");
    });
    const total = LK.state.runs.length;
    document.getElementById("runs-count").textContent = runs.length === total ? `(${total})` : `(${runs.length} of ${total})`;
    const button = document.getElementById("compare-selected");
    button.textContent = `Compare selected (${this.selected.size})`;
    button.disabled = !(this.selected.size >= 2 && this.selected.size <= 3);
  },

  matches(r) {
    const words = this.filter.toLowerCase().split(/\s+/).filter(Boolean);
    const text = [r.name, r.model, r.task, r.status].join(" ").toLowerCase();
    return words.every((w) => text.includes(w));
  },

  row(r) {
    // The parts of a row that never change (checkbox, name link); the other cells are filled by `fill`.
    const { h } = LK;
    const box = h("input", { type: "checkbox", "aria-label": `Select ${r.name} to compare`, "data-focus-key": "select:" + r.name });
    box.addEventListener("change", () => {
      if (box.checked) this.selected.add(r.name); else this.selected.delete(r.name);
      this.update(false);
    });
    const cells = RUN_COLUMNS.slice(2).map(() => h("td"));
    const tr = h("tr", { "data-run": r.name }, h("td", {}, box),
      h("th", { scope: "row" }, h("a", { href: "#/run?name=" + encodeURIComponent(r.name), "data-focus-key": "link:" + r.name, text: r.name })),
      cells);
    return { tr, box, cells, keys: [] };
  },

  fill(entry, r) {
    const { box, cells, tr } = entry;
    tr.dataset.status = r.status;
    box.checked = this.selected.has(r.name);
    box.disabled = !r.has_samples && !this.selected.has(r.name);
    box.title = r.has_samples ? "" : "no samples.jsonl: set eval.task to score generations";
    const s = r.settings, scores = r.scores;
    const values = [
      [r.status + r.status_detail, () => LK.badge(r.status, r.status_detail)],
      [r.model, () => LK.shortModel(r.model), r.model || ""],
      [r.task, () => r.task || "—"],
      [`${LK.num(s.r)} / ${LK.num(s.alpha)}`],
      [LK.num(s.lr)],
      [r.total_steps ? `${r.step} / ${r.total_steps}` : String(r.step)],
      [r.best ? `${r.best.metric.replace(/^eval_/, "")} ${LK.num(r.best.value)} @ ${r.best.step}` : "—"],
      [scores ? `${scores.metric} ${LK.percent(scores.base)} → ${LK.percent(scores.adapter)}` : "—"],
      [LK.duration(r.wall_seconds)],
      [r.tokens_per_s ? LK.num(r.tokens_per_s, 0) : "—"],
      [LK.ago(r.updated)],
    ];
    values.forEach(([key, make, title], i) => {
      if (entry.keys[i] === key) return;
      entry.keys[i] = key;
      const content = make ? make() : key;
      cells[i].replaceChildren(content instanceof Node ? content : document.createTextNode(content));
      if (title !== undefined) cells[i].title = title;
    });
    cells.slice(3).forEach((td) => td.classList.add("num"));
    cells[cells.length - 1].classList.add("ago");
    cells[cells.length - 1].dataset.time = r.updated;
  },

};
