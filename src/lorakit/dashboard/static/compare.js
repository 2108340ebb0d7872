// Two or three adapters on the same held-out prompts, the rows where they disagree first.
"use strict";

LK.compareView = {
  async render(main, params) {
    const { h } = LK;
    const chosen = params.getAll("name");
    const candidates = LK.state.runs.filter((r) => r.has_samples).map((r) => r.name);
    const labels = ["Run A", "Run B", "Run C (optional)"];
    const selects = labels.map((label, i) => h("select", { id: "compare-" + i, name: "name" },
      h("option", { value: "", text: i < 2 ? "(choose a run)" : "(none)" }),
      candidates.map((n) => h("option", { value: n, selected: chosen[i] === n, text: n }))));
    const form = h("form", { class: "toolbar compare-form", id: "compare-form" },
      labels.map((label, i) => h("span", { class: "field" }, h("label", { for: "compare-" + i, text: label }), selects[i])),
      h("button", { type: "submit", text: "Compare" }));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const names = selects.map((s) => s.value).filter(Boolean);
      location.hash = "#/compare?" + names.map((n) => "name=" + encodeURIComponent(n)).join("&");
    });
    const results = h("div", { id: "compare-results" });
    main.replaceChildren(h("h1", { text: "Compare adapters" }),
      h("p", { class: "muted", text: "Each run's samples.jsonl holds its adapter's output (and the base model's) on the held-out prompts. Rows where the task scorer's verdicts differ come first, then rows where only the outputs differ." }),
      form, results);
    if (!candidates.length) {
      results.append(h("p", { class: "empty", text: "No run in this folder has samples yet: runs write samples.jsonl when eval.task is set." }));
      return;
    }
    if (chosen.length < 2) {
      results.append(h("p", { class: "muted", text: "Choose two or three runs." }));
      return;
    }
    results.append(h("p", { class: "muted", text: "Loading…" }));
    let data;
    try {
      data = await LK.api("/api/compare", { name: chosen });
    } catch (err) {
      results.replaceChildren(h("p", { class: "error", role: "alert", text: `Cannot compare: ${err.message}` }));
      return;
    }
    this.table(results, data);
  },

  table(results, data) {
    const { h } = LK;
    const letters = ["A", "B", "C"];
    const totals = data.runs.map((n, i) => `${letters[i]} = ${n}: ${LK.percent(data.totals[n])}`).join("; ");
    const summary = h("p", { id: "compare-summary" },
      `${data.common} prompts in common. The verdicts differ on ${data.counts.verdict}, only the outputs on ${data.counts.output}, ` +
      `all agree on ${data.counts.same}. ${data.metric || "score"}: ${totals}.`);
    const hasBase = data.rows.some((r) => r.base !== null && r.base !== undefined);
    const head = h("tr", {}, h("th", { scope: "col", text: "Differs" }), h("th", { scope: "col", text: "Prompt" }),
      h("th", { scope: "col", text: "Reference" }), hasBase ? h("th", { scope: "col", text: "Base" }) : null,
      data.runs.map((n, i) => h("th", { scope: "col", title: n }, `${letters[i]}: `, h("span", { class: "run-name", text: n }))));
    const what = { verdict: "≠ verdicts", output: "≠ outputs", same: "agree" };
    const body = h("tbody", {}, data.rows.slice(0, 2000).map((r) => h("tr", { class: "dis-" + r.disagreement, "data-disagreement": r.disagreement },
      h("td", { text: what[r.disagreement] }), h("td", { class: "text", text: r.instruction }),
      h("td", { class: "text mono", text: Array.isArray(r.reference) ? r.reference.join("\n") : r.reference }),
      hasBase ? h("td", { class: "text mono" }, h("div", { class: "out", text: r.base }), LK.verdict(data.metric, r.base_verdict)) : null,
      r.outputs.map((out, i) => h("td", { class: "text mono", "data-run": data.runs[i] }, h("div", { class: "out", text: out }), LK.verdict(data.metric, r.verdicts[i]))))));
    const table = h("table", { class: "samples compare", id: "compare-table" }, h("caption", { class: "sr-only", text: "Outputs side by side" }),
      h("thead", {}, head), body);
    results.replaceChildren(summary, LK.tableWrap("Comparison", table));
  },
};
