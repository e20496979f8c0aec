"use strict";
// The index of a hook: one row per neuron, sorted by a click on a column, filtered as you type.
(function () {
  const data = JSON.parse(document.getElementById("hook-data").textContent);
  const columns = [
    ["neuron", "neuron"], ["max", "max"], ["min", "min"], ["mean", "mean"], ["std", "std"],
    ["frac_active", "density"], ["kurtosis", "kurtosis"], ["skew", "skew"], ["top_tokens", "top tokens"],
  ];
  const n = data.columns.neuron.length;
  let order = Array.from({ length: n }, (_, i) => i);
  const head = document.querySelector("#neurons thead tr");
  const body = document.querySelector("#neurons tbody");
  const filter = document.getElementById("filter");

  function fmt(x) {
    if (x === null || x === undefined) return "—";
    if (x !== 0 && (Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3)) return x.toExponential(3);
    return x.toFixed(4);
  }

  function render() {
    const wanted = filter.value.trim().toLowerCase();
    const rows = document.createDocumentFragment();
    for (const i of order) {
      const neuron = data.columns.neuron[i];
      const tokens = data.columns.top_tokens[i];
      if (wanted && String(neuron) !== wanted && !tokens.toLowerCase().includes(wanted)) continue;
      const tr = document.createElement("tr");
      for (const [key] of columns) {
        const td = document.createElement("td");
        if (key === "neuron") {
          const a = document.createElement("a");
          a.href = `${neuron}.html`;
          a.textContent = String(neuron);
          td.append(a);
        } else if (key === "top_tokens") {
          td.className = "tokcell";
          td.textContent = tokens;
        } else {
          td.textContent = fmt(data.columns[key][i]);
        }
        tr.append(td);
      }
      rows.append(tr);
    }
    body.replaceChildren(rows);
  }

  function sortBy(th, key) {
    const descending = th.getAttribute("aria-sort") !== "descending";
    const values = data.columns[key];
    const missing = descending ? -Infinity : Infinity;  // nulls (NaN kurtosis of a constant neuron) last
    const value = (i) => (values[i] === null ? missing : values[i]);
    order.sort((a, b) => (descending ? value(b) - value(a) : value(a) - value(b)) || a - b);
    for (const other of head.children) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    render();
  }

  for (const [key, label] of columns) {
    const th = document.createElement("th");
    th.textContent = label;
    if (key !== "top_tokens") {
      th.dataset.sort = key;
      th.addEventListener("click", () => sortBy(th, key));
    } else {
      th.className = "tokcell";
    }
    head.append(th);
  }
  filter.addEventListener("input", render);
  render();
})();
