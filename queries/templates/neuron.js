"use strict";
// Draws a neuron page from the JSON document embedded in it. Corpus text only ever reaches the
// page through text nodes (never innerHTML), so it shows as text whatever it contains.
(function () {
  const doc = JSON.parse(document.getElementById("neuron-data").textContent);
  const site = JSON.parse(document.getElementById("site-data").textContent);
  const WINDOW = doc.window;
  const lo = doc.stats.min ?? 0;
  const hi = doc.stats.max ?? 0;
  const page = document.getElementById("page");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, attrs || {});
    for (const child of children) node.append(child);
    return node;
  }

  function fmt(x) {
    if (x === null || x === undefined) return "—";
    if (x !== 0 && (Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3)) return x.toExponential(3);
    return x.toFixed(4);
  }

  // Newlines, tabs and control characters made visible; everything else as it is.
  function visible(text) {
    return text.replace(/\n/g, "↵").replace(/\t/g, "→").replace(/\r/g, "␍")
      .replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
  }

  // One scale for both signs, from the neuron's min to its max: white at 0, full red at the
  // larger of |min| and |max| (blue below 0), so a GELU's small negative values stay pale.
  const scale = Math.max(Math.abs(lo), Math.abs(hi));
  function colour(v) {
    if (!scale || !v) return "transparent";
    const alpha = Math.min(1, Math.abs(v) / scale).toFixed(3);
    return v > 0 ? `rgba(217, 72, 38, ${alpha})` : `rgba(48, 96, 214, ${alpha})`;
  }

  function token(text, value, marked) {
    const span = el("span", { className: marked ? "tok max" : "tok", title: `${fmt(value)}   ${JSON.stringify(text)}` }, visible(text));
    span.style.background = colour(value);
    span.dataset.value = String(value);
    return span;
  }

  // Tokens [from, to) of an example's sequence; a sequence entry holds tokens [start, start + n).
  function tokens(example, from, to) {
    const seq = doc.sequences[String(example.seq_id)];
    const box = el("span", {});
    if (from > 0) box.append("… ");
    const also = example.also || [];
    for (let i = from; i < to; i++) {
      const j = i - seq.start;
      const marked = i === example.pos || also.includes(i);
      box.append(token(seq.tokens[j], i === example.pos ? example.activation : seq.values[j], marked));
    }
    if (to < seq.length) box.append(" …");
    return box;
  }

  function example(ex, label) {
    const seq = doc.sequences[String(ex.seq_id)];
    const first = seq.start;
    const last = seq.start + seq.tokens.length;
    const marks = [ex.pos, ...(ex.also || [])];
    const from = Math.max(first, Math.min(...marks) - WINDOW);
    const to = Math.min(last, Math.max(...marks) + WINDOW + 1);
    const text = el("div", { className: "text" }, tokens(ex, from, to));
    if (first === 0 && last === seq.length && (from > 0 || to < last)) {
      const button = el("button", { className: "full", type: "button" }, "full sequence");
      let full = false;
      button.addEventListener("click", () => {
        full = !full;
        text.firstChild.replaceWith(full ? tokens(ex, first, last) : tokens(ex, from, to));
        button.textContent = full ? "window" : "full sequence";
      });
      text.append(button);
    }
    const meta = el("div", { className: "meta" }, el("b", {}, fmt(ex.activation)), el("br"), `${label} · seq ${ex.seq_id} · pos ${ex.pos}`);
    return el("div", { className: "example" }, meta, text);
  }

  function section(title, ...content) {
    page.append(el("h2", {}, title), ...content);
  }

  function stats() {
    const s = doc.stats;
    const items = [
      ["max", s.max], ["min", s.min], ["mean", s.mean], ["std", s.std], ["density", s.frac_active],
      ["skew", s.skew], ["kurtosis", s.kurtosis], ["p50", s.p50], ["p90", s.p90], ["p99", s.p99],
    ];
    const dl = el("dl", { className: "stats" });
    for (const [name, value] of items) dl.append(el("div", {}, el("dt", {}, name), el("dd", {}, fmt(value))));
    dl.append(el("div", {}, el("dt", {}, "tokens"), el("dd", {}, s.count.toLocaleString("en"))));
    dl.append(el("div", {}, el("dt", {}, "threshold"), el("dd", {}, fmt(doc.threshold))));
    page.append(dl);
  }

  function histogram() {
    const bins = doc.histogram;
    if (!bins.length) return;
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    const W = 1000, H = 150, top = 8, bottom = 22;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "hist");
    const peak = Math.log10(1 + Math.max(...bins.map((b) => b.count)));
    const width = W / bins.length;
    bins.forEach((b, i) => {
      const h = ((H - top - bottom) * Math.log10(1 + b.count)) / peak;
      const rect = document.createElementNS(NS, "rect");
      rect.setAttribute("x", (i * width + 0.5).toFixed(1));
      rect.setAttribute("width", Math.max(1, width - 1).toFixed(1));
      rect.setAttribute("y", (H - bottom - h).toFixed(1));
      rect.setAttribute("height", h.toFixed(1));
      rect.setAttribute("class", b.hi <= 0 ? "neg" : b.lo >= 0 ? "pos" : "zero");
      const title = document.createElementNS(NS, "title");
      title.textContent = `[${fmt(b.lo)}, ${fmt(b.hi)}): ${b.count.toLocaleString("en")} tokens`;
      rect.append(title);
      svg.append(rect);
    });
    for (const i of [0, Math.floor(bins.length / 2), bins.length - 1]) {
      const label = document.createElementNS(NS, "text");
      label.setAttribute("x", Math.min(W - 60, i * width).toFixed(1));
      label.setAttribute("y", String(H - 6));
      label.textContent = fmt(bins[i].lo);
      svg.append(label);
    }
    section("Activation histogram", el("p", { className: "legend" }, "counts on a log scale; bins are octaves of |x|, 8 per octave; hover for a bin's range"), svg);
    linearHistogram(bins);
  }

  // The positive activations on linear axes, as Neuronpedia draws them: the same bins, each as
  // wide as its range and as tall as its count per unit of activation.
  function linearHistogram(bins) {
    const positive = bins.filter((b) => b.lo >= 0 && b.hi > b.lo && b.count > 0);
    if (!positive.length) return;
    const W = 1000, H = 120, bottom = 20;
    const right = Math.max(...positive.map((b) => b.hi));
    const peak = Math.max(...positive.map((b) => b.count / (b.hi - b.lo)));
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("class", "histogram linear");
    for (const b of positive) {
      const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const h = ((H - bottom) * (b.count / (b.hi - b.lo))) / peak;
      rect.setAttribute("x", ((b.lo / right) * W).toFixed(2));
      rect.setAttribute("width", Math.max(0.5, ((b.hi - b.lo) / right) * W).toFixed(2));
      rect.setAttribute("y", (H - bottom - h).toFixed(2));
      rect.setAttribute("height", h.toFixed(2));
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = `${fmt(b.lo)} to ${fmt(b.hi)}: ${b.count.toLocaleString("en")}`;
      rect.append(title);
      svg.append(rect);
    }
    for (const [x, text] of [[0, "0"], [W - 60, fmt(right)]]) {
      const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
      label.setAttribute("x", String(x));
      label.setAttribute("y", String(H - 4));
      label.textContent = text;
      svg.append(label);
    }
    page.append(el("p", { className: "legend" }, "positive activations on linear axes (height: tokens per unit of activation)"), svg);
  }

  // Examples whose windows overlap (the same sequence, within two windows) are one example with
  // every one of them outlined, labelled with all their ranks: a neuron's top examples are often
  // neighbouring tokens of one passage. A run of examples at the same activation (a GELU's floor
  // fills the bottom examples) is one example and a count.
  function folded(list) {
    const out = [];
    for (const ex of list) {
      const near = out.find((o) => o.seq_id === ex.seq_id && [o.pos, ...o.also].some((p) => Math.abs(p - ex.pos) <= 2 * WINDOW));
      const same = out.length && out[out.length - 1].activation === ex.activation && out[out.length - 1].ranks.length;
      if (near) {
        near.also.push(ex.pos);
        near.ranks.push(ex.rank);
      } else if (same) {
        out[out.length - 1].same += 1;
        out[out.length - 1].ranks.push(ex.rank);
      } else {
        out.push({ ...ex, also: [], ranks: [ex.rank], same: 0 });
      }
    }
    return out;
  }

  function examples(list, title, label) {
    if (!list.length) return;
    const shown = folded(list);
    section(title, ...shown.map((ex) => {
      const ranks = ex.same ? `${label}s ${ex.ranks[0]}–${ex.ranks[ex.ranks.length - 1]}`
        : ex.ranks.length > 1 ? `${label}s ${ex.ranks.join(", ")}` : `${label} ${ex.rank}`;
      const node = example(ex, ranks);
      if (ex.same) node.querySelector(".meta").append(el("br"), `and ${ex.same} more at this activation`);
      return node;
    }));
  }

  function bands() {
    if (!doc.band_samples.length) return;
    const parts = [el("p", { className: "legend" }, "typical tokens at every activation level: a uniform sample of each octave band of the activation")];
    let band = null;
    for (const ex of doc.band_samples) {
      if (ex.band !== band) {
        band = ex.band;
        parts.push(el("h3", {}, `band ${ex.band}: ${fmt(ex.lo)} to ${fmt(ex.hi)}`));
      }
      parts.push(example(ex, `sample ${ex.rank}`));
    }
    section("Samples by activation band", ...parts);
  }

  function table(headers, rows) {
    const head = el("tr", {}, ...headers.map((h) => el("th", { className: h === "token" ? "tokcell" : "" }, h)));
    const body = rows.map((cells) => el("tr", {}, ...cells.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { className: typeof c === "string" ? "tokcell" : "" }, typeof c === "number" ? fmt(c) : visible(String(c)))))));
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
  }

  function topTokens() {
    if (!doc.top_tokens.length) return;
    section("Top tokens by mean activation", table(["rank", "token", "mean", "count"],
      doc.top_tokens.map((t) => [String(t.rank), t.token, t.mean_activation, t.count.toLocaleString("en")])));
  }

  function logits() {
    const { promote, suppress } = doc.logit_effects;
    if (!promote.length && !suppress.length) {
      section("Logit effects", el("p", { className: "legend" }, `none in this store: they need a causal language model's unembedding (this model is ${doc.architecture}) and the logits statistic`));
      return;
    }
    const column = (title, list) => el("div", {}, el("h3", {}, title), table(["rank", "token", "effect"], list.map((t) => [String(t.rank), t.token, t.effect])));
    section("Logit effects", el("p", { className: "legend" }, "the neuron's output direction through the final norm and the unembedding"),
      el("div", { className: "columns" }, column("promoted", promote), column("suppressed", suppress)));
  }

  function partnerLink(p) {
    const name = `${p.hook} #${p.neuron}`;
    if (!site || !site.hooks.includes(p.hook)) return el("span", {}, name);
    const href = (p.hook === doc.hook ? "" : `../${encodeURIComponent(p.hook)}/`) + `${p.neuron}.html`;
    return el("a", { href }, name);
  }

  function partners() {
    const { pearson, jaccard } = doc.coactivation;
    if (!pearson.length && !jaccard.length) return;
    const headers = ["rank", "neuron", "pearson", "jaccard", "P(b|a)", "lift", "both"];
    const rows = (list) => list.map((p) => [String(p.rank), partnerLink(p), p.pearson, p.jaccard, p.p_b_given_a, p.lift, p.n_both.toLocaleString("en")]);
    const over = doc.coactivation_tokens ? `over ${doc.coactivation_tokens.toLocaleString("en")} tokens (a fixed sample of the corpus)` : "";
    section("Co-activation partners", el("p", { className: "legend" }, over), el("div", { className: "columns" },
      el("div", {}, el("h3", {}, "by |correlation|"), table(headers, rows(pearson))),
      el("div", {}, el("h3", {}, "by Jaccard"), table(headers, rows(jaccard)))));
  }

  function pager() {
    const nav = document.getElementById("pager");
    if (!site) return;
    const go = (n, label) => el("a", { href: `${n}.html` }, label);
    if (doc.neuron > 0) nav.append(go(doc.neuron - 1, `← ${doc.neuron - 1}`));
    nav.append(el("a", { href: "index.html" }, "all neurons"));
    const random = el("a", { href: "#", id: "random" }, "random");
    random.addEventListener("click", (event) => {
      event.preventDefault();
      location.href = `${Math.floor(Math.random() * doc.width)}.html`;
    });
    nav.append(random);
    if (doc.neuron + 1 < doc.width) nav.append(go(doc.neuron + 1, `${doc.neuron + 1} →`));
  }

  pager();
  stats();
  page.append(el("p", { className: "legend" }, "colour: ",
    Object.assign(el("span", {}, fmt(lo)), { style: `background:${colour(lo)}` }), " 0 ",
    Object.assign(el("span", {}, fmt(hi)), { style: `background:${colour(hi)}` }),
    " · hover a token for its activation; the outlined token is the example's"));
  histogram();
  examples(doc.top_examples, "Top examples", "top");
  examples(doc.bottom_examples, "Bottom examples", "bottom");
  bands();
  topTokens();
  logits();
  partners();
  section("Reproduce", el("pre", { className: "snippet" }, el("code", {}, doc.snippet)));
})();
