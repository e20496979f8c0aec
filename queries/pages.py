"""Everything a neuron's page shows, as one JSON-ready document per neuron.

:class:`HookPages` reads a hook's tables once (one query per table, sorted by neuron), reads the
tokens of every sequence the pages quote, gathers the per-token activations for colouring in
blocks (:mod:`queries.activations`), and then cuts one document per neuron out of those arrays.
A single report and an export of a whole layer take the same path; only the neuron set differs.

A document's numbers are the tables' numbers (the same float32 and float64 values); per-token
activations are rounded to about four significant digits, except at each example's marked
token, which carries the cached value itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from actscope.queries.activations import TokenActivations, check_marked
from actscope.storage.spec import model_title
from actscope.storage.store import PAD

if TYPE_CHECKING:
    from actscope.queries.catalog import Catalog

FORMAT = "actscope.neuron/1"
WINDOW = 12  # tokens either side of an example's token, as pages show them
EXAMPLE_KINDS = ("top_examples", "bottom_examples", "band_samples", "random_samples")
STAT_COLUMNS = ("count", "mean", "std", "min", "max", "frac_active", "skew", "kurtosis", "p50", "p90", "p99")


def finite(x):
    """JSON has no NaN or infinity: they become null."""
    return x if x is None or math.isfinite(x) else None


@dataclass
class _Grouped:
    """A table's rows for one hook, sorted by neuron, with each neuron's row range."""

    columns: dict[str, np.ndarray]
    starts: np.ndarray
    neurons: np.ndarray

    @classmethod
    def of(cls, table: pa.Table, by: str = "neuron") -> _Grouped:
        columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        keys = columns[by]
        neurons, starts = np.unique(keys, return_index=True)
        return cls(columns, np.append(starts, len(keys)), neurons)

    def rows(self, neuron: int) -> dict[str, np.ndarray]:
        i = np.searchsorted(self.neurons, neuron)
        if i == len(self.neurons) or self.neurons[i] != neuron:
            return {name: column[:0] for name, column in self.columns.items()}
        return {name: column[self.starts[i] : self.starts[i + 1]] for name, column in self.columns.items()}


class HookPages:
    """The documents of ``neurons`` (default: all) of one hook. ``document(n)`` gives one."""

    def __init__(self, catalog: Catalog, hook: str, neurons: list[int] | None = None, *, k: int = 20):
        self.catalog, self.hook, self.k = catalog, hook, k
        self.store = catalog.store
        self.spec = self.store.spec
        catalog.check_neuron(hook, 0)  # a recorded hook
        self.width = int(catalog.model.hook_widths[hook])
        if neurons is None:
            neurons = list(range(self.width))
        for n in neurons:
            catalog.check_neuron(hook, n)
        self.neurons = np.asarray(sorted(set(neurons)), np.int64)
        self.vocab = np.asarray(catalog.arrow("SELECT token FROM vocab ORDER BY token_id").column(0).to_pylist(), dtype=object)
        self._load_tables()
        self._load_sequences()

    # -- bulk reads -------------------------------------------------------------------------

    def _select(self, sql: str, *params) -> pa.Table:
        lo, hi = int(self.neurons.min()), int(self.neurons.max())
        return self.catalog.arrow(sql, [self.hook, lo, hi, *params])

    def _load_tables(self) -> None:
        def where(alias: str = "") -> str:
            return f"{alias}hook = ? AND {alias}neuron BETWEEN ? AND ?"

        self.stats = _Grouped.of(self._select(f"SELECT neuron, {', '.join(STAT_COLUMNS)} FROM neuron_stats WHERE {where()}"))
        self.hist = _Grouped.of(self._select(f"SELECT neuron, lo, hi, count FROM histograms WHERE {where()} ORDER BY neuron, bin"))
        example = "neuron, rank, activation, seq_id, pos"
        self.examples = {
            "top_examples": _Grouped.of(self._select(f"SELECT {example} FROM top_examples WHERE {where()} AND rank <= ? ORDER BY neuron, rank", self.k)),
            "bottom_examples": _Grouped.of(self._select(f"SELECT {example} FROM bottom_examples WHERE {where()} AND rank <= ? ORDER BY neuron, rank", self.k)),
            # Strongest band first, as a reader scans down from the top examples.
            "band_samples": _Grouped.of(self._select(f"SELECT {example}, band, lo, hi FROM band_samples WHERE {where()} ORDER BY neuron, band DESC, rank")),
            "random_samples": _Grouped.of(self._select(f"SELECT {example} FROM random_samples WHERE {where()} ORDER BY neuron, rank")),
        }
        self.tokens = _Grouped.of(self._select(
            f"SELECT s.neuron, s.rank, s.token_id, v.token, s.mean_activation, s.count FROM token_stats s "
            f"JOIN vocab v USING (token_id) WHERE {where('s.')} AND s.rank <= ? ORDER BY s.neuron, s.rank", self.k))
        self.logits = _Grouped.of(self._select(
            f"SELECT e.neuron, e.direction, e.rank, e.token_id, v.token, e.effect FROM logit_effects e "
            f"JOIN vocab v USING (token_id) WHERE {where('e.')} ORDER BY e.neuron, e.direction, e.rank"))
        self.partners = _Grouped.of(self._select(
            "SELECT neuron_a AS neuron, ranking, rank, hook_b::VARCHAR AS hook, neuron_b, pearson, jaccard, p_b_given_a, lift, n_both "
            "FROM coactivation WHERE hook_a = ? AND neuron_a BETWEEN ? AND ? ORDER BY neuron_a, ranking, rank"))

    def _load_sequences(self) -> None:
        """Tokens of every quoted sequence, and this hook's activations on them for each neuron
        that quotes them, checked against the cached value at every marked token."""
        seqs, neurons, pos, cached = [], [], [], []
        for grouped in self.examples.values():
            c = grouped.columns
            keep = np.isin(c["neuron"], self.neurons)
            seqs.append(c["seq_id"][keep]), neurons.append(c["neuron"][keep].astype(np.int64))
            pos.append(c["pos"][keep]), cached.append(c["activation"][keep])
        seqs, neurons, pos = np.concatenate(seqs), np.concatenate(neurons), np.concatenate(pos)
        cached = np.concatenate(cached)
        pairs = np.unique(np.stack([neurons, seqs], axis=1), axis=0) if len(seqs) else np.zeros((0, 2), np.int64)
        self.source = TokenActivations(self.store, self.hook)
        self.pair_values = self.source.gather(pairs[:, 1], pairs[:, 0])
        self._pair_keys = pairs[:, 0] * (1 << 40) + pairs[:, 1]
        if len(seqs):
            rows = self._pair_rows(neurons, seqs)
            scale = np.abs(self.pair_values).max()
            check_marked(self.source, self.pair_values[rows], pos, cached, float(scale), "example")
            self.pair_values[rows, pos] = cached  # the marked tokens carry the cached values themselves
        unique = np.unique(seqs)
        self.seq_ids = unique
        rows = self.store.read_rows(unique.tolist()) if len(unique) else {"tokens": np.zeros((0, 0), np.int32), "kinds": np.zeros((0, 0), np.uint8)}
        tokens, kinds = rows["tokens"], rows["kinds"]
        self.seq_tokens = tokens
        self.seq_length = (kinds != PAD).sum(axis=1)  # padding only ever ends a sequence

    def _pair_rows(self, neurons: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._pair_keys, neurons * (1 << 40) + seqs)

    # -- one document -----------------------------------------------------------------------

    def document(self, neuron: int) -> dict:
        stats = self.stats.rows(neuron)
        summary = {name: finite(float(stats[name][0])) if len(stats[name]) else None for name in STAT_COLUMNS}
        summary["count"] = int(stats["count"][0]) if len(stats["count"]) else 0
        lo, hi = summary["min"], summary["max"]
        doc = {
            "format": FORMAT,
            "store": self.store.url,
            "fingerprint": self.store.fingerprint,
            "model": model_title(self.catalog.model.name),
            "architecture": self.catalog.model.architecture,
            "hook": self.hook,
            "sae": self.catalog.model.saes.get(self.hook),  # the SAE whose latents these are, or None
            "neuron": int(neuron),
            "width": self.width,
            "threshold": self.spec.threshold(self.hook),
            "stats": summary,
            "histogram": self._histogram(neuron, lo, hi),
            "activation_source": self.source.source,
        }
        for name in EXAMPLE_KINDS:
            doc[name] = self._examples(name, neuron)
        doc["window"] = WINDOW
        doc["sequences"] = self._sequences(doc, neuron, summary)
        t = self.tokens.rows(neuron)
        doc["top_tokens"] = [
            {"rank": int(r), "token_id": int(i), "token": s, "mean_activation": float(m), "count": int(c)}
            for r, i, s, m, c in zip(t["rank"], t["token_id"], t["token"], t["mean_activation"], t["count"])
        ]
        e = self.logits.rows(neuron)
        doc["logit_effects"] = {
            direction: [
                {"rank": int(r), "token_id": int(i), "token": s, "effect": float(v)}
                for d, r, i, s, v in zip(e["direction"], e["rank"], e["token_id"], e["token"], e["effect"]) if d == direction
            ]
            for direction in ("promote", "suppress")
        }
        p = self.partners.rows(neuron)
        doc["coactivation"] = {
            ranking: [
                {"rank": int(p["rank"][i]), "hook": p["hook"][i], "neuron": int(p["neuron_b"][i]),
                 **{m: finite(float(p[m][i])) for m in ("pearson", "jaccard", "p_b_given_a", "lift")},
                 "n_both": int(p["n_both"][i])}
                for i in np.flatnonzero(p["ranking"] == ranking)
            ]
            for ranking in ("pearson", "jaccard")
        }
        doc["coactivation_tokens"] = self.coactivation_tokens
        doc["snippet"] = snippet(self.store.url, self.hook, int(neuron), self.k)
        return doc

    @functools.cached_property
    def coactivation_tokens(self) -> int | None:
        """The tokens the co-activation figures are over (the merged co-moments' count)."""
        merged = self.store.merged_coactivation()
        return int(merged.read_vector("n")[0]) if merged is not None else None

    def _histogram(self, neuron: int, lo, hi) -> list[dict]:
        h = self.hist.rows(neuron)
        # The end bins reach to ±inf; the neuron's own min and max close them.
        return [
            {"lo": float(max(a, lo)) if lo is not None else finite(float(a)),
             "hi": float(min(b, hi)) if hi is not None else finite(float(b)), "count": int(c)}
            for a, b, c in zip(h["lo"], h["hi"], h["count"])
        ]

    def _examples(self, name: str, neuron: int) -> list[dict]:
        rows = self.examples[name].rows(neuron)
        columns = ["rank", "activation", "seq_id", "pos"] + (["band", "lo", "hi"] if name == "band_samples" else [])
        records = [dict(zip(columns, values)) for values in zip(*(rows[c].tolist() for c in columns))]
        for record in records:
            if name == "band_samples":
                record["lo"], record["hi"] = finite(record["lo"]), finite(record["hi"])
        return records

    def _sequences(self, doc: dict, neuron: int, summary: dict) -> dict[str, dict]:
        """The quoted text: whole sequences for top and bottom examples (a reader opens them in
        full), a window either side for band and random samples (there are many, and they are
        typical)."""
        spans: dict[int, tuple[int, int]] = {}
        for name in EXAMPLE_KINDS:
            for ex in doc[name]:
                seq, pos = ex["seq_id"], ex["pos"]
                n = int(self.seq_length[np.searchsorted(self.seq_ids, seq)])
                a, b = (0, n) if name in ("top_examples", "bottom_examples") else (max(0, pos - WINDOW), min(n, pos + WINDOW + 1))
                if seq in spans:
                    a, b = min(a, spans[seq][0]), max(b, spans[seq][1])
                spans[seq] = (a, b)
        if not spans:
            return {}
        seqs = np.fromiter(sorted(spans), np.int64, len(spans))
        rows = self._pair_rows(np.full(len(seqs), neuron), seqs)
        where = np.searchsorted(self.seq_ids, seqs)
        scale = max(abs(summary["min"] or 0.0), abs(summary["max"] or 0.0))
        decimals = max(0, 3 - math.floor(math.log10(scale))) if scale > 0 else 0
        marked: dict[int, list[tuple[int, float]]] = {}
        for name in EXAMPLE_KINDS:
            for ex in doc[name]:
                marked.setdefault(ex["seq_id"], []).append((ex["pos"], ex["activation"]))
        out = {}
        for seq, row, s in zip(seqs.tolist(), rows, where):
            a, b = spans[seq]
            # About four significant digits of the neuron's scale: plenty for colour and hover;
            # every example's own token keeps its cached value, in whichever snippet shows it.
            values = np.round(self.pair_values[row, a:b].astype(np.float64), decimals)
            for pos, value in marked[seq]:
                if a <= pos < b:
                    values[pos - a] = value
            out[str(seq)] = {
                "start": a, "length": int(self.seq_length[s]),
                "tokens": self.vocab[self.seq_tokens[s, a:b]].tolist(),
                "values": values.tolist(),
            }
        return out


def snippet(store_url: str, hook: str, neuron: int, k: int) -> str:
    """Python that reproduces a page's numbers from the store."""
    return (
        "import actscope\n\n"
        f"with actscope.connect({store_url!r}) as store:\n"
        f"    stats = store.sql(\"SELECT * FROM neuron_stats WHERE hook = ? AND neuron = ?\", [{hook!r}, {neuron}])\n"
        f"    top = store.top({hook!r}, {neuron}, k={k}, window=8)\n"
        f"    partners = store.coact({hook!r}, {neuron}, k=10)\n"
        f"    print(stats.records(), *top.records(), sep=\"\\n\")\n"
    )
