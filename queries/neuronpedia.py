"""Neuronpedia batches: the JSON files SAEDashboard's ``NeuronpediaRunner`` writes and
Neuronpedia's importer (``convert-saedashboard-to-neuronpedia-export.py``) reads.

One folder per hook holds ``batch-N.json`` files of 128 units each. Every field is one that
SAEDashboard's ``NeuronpediaDashboardBatch`` / ``NeuronpediaDashboardFeature`` /
``NeuronpediaDashboardActivation`` accept (tests construct them from every exported batch), and
every key its acceptance test asserts is present, empty where we have nothing to put in it. How
our tables map onto the fields, and what each means on the consumer's side, is in the README
("Neuronpedia batches").

- ``layer`` is an int (the block index of ``blocks.N.``; 0 for embedding hooks, ``n_layers`` for
  hooks after the last block): the importer builds its source id from it.
- Activation groups, as SAEDashboard writes them: the top examples (``bin_min`` and
  ``bin_contains`` the sentinel -1, ``bin_max`` the unit's max), then each band's samples, an
  interval with the band's bounds and ``bin_contains`` the fraction of all counted tokens in the
  band (exact: bands are unions of histogram bins), strongest band first; then the bottom
  examples as the interval [min, k-th lowest] holding k of the counted tokens.
- Snippets are ``2 * WINDOW + 1`` tokens around the example's token (fewer at a sequence's
  ends), so examples at different places of one sequence are different snippets (the importer
  hides repeated token lists); ``qualifying_token_index`` is that token, whose value is the cached
  activation itself.
- The frequency histogram is the consumer's: ``FREQ_BINS`` linear bins over the positive
  activations, from the unit's smallest positive bin to its max. Our histogram's bins are
  log-spaced (at most 12.5 % wide), so each bin's count is spread over the linear bins it
  overlaps, in proportion to the overlap; the total is exact (the number of tokens above 0) and
  each count lands within one of our bins of its value.
"""

from __future__ import annotations

import re

import numpy as np

from actscope.storage.bins import E_MIN
from actscope.storage.spec import model_title

WINDOW = 12
FREQ_BINS = 50  # SAEDashboard's ActsHistogramConfig default, which Neuronpedia draws
BATCH = 128
NEAR_ZERO = 2.0**E_MIN  # our histogram's near-zero bin holds |x| below this
_NO_DFA = {"dfa_values": [], "dfa_maxValue": 0, "dfa_targetIndex": -1}  # what SAEDashboard writes without DFA data


def layer_of(hook: str, n_layers: int) -> int:
    """The block a hook belongs to, as the int Neuronpedia's importer needs."""
    found = re.match(r"blocks\.(\d+)\.", hook)
    if found:
        return int(found.group(1))
    return 0 if "embed" in hook else n_layers


def set_name(hook: str) -> str:
    """A source-set name for the hook's units (``blocks.3.mlp.hook_post`` → ``mlp-post``), in the
    characters Neuronpedia allows in one."""
    site = re.sub(r"^blocks\.\d+\.", "", hook).replace("hook_", "")
    return re.sub(r"[^a-z0-9]+", "-", site.lower()).strip("-") or "units"


def batch_meta(catalog, hook: str, sae_set: str | None = None) -> dict:
    """The batch-level fields and the per-feature constants of one hook's export."""
    spec, model = catalog.store.spec, catalog.model
    return {
        "model_id": model_title(model.name).split("/")[-1],  # "gpt2", "pythia-70m": the name's last part
        # An SAE's latents sit at the layer of the hook it reads.
        "layer": layer_of(model.saes.get(hook, {}).get("hook", hook), int(model.n_layers)),
        "sae_set": sae_set or set_name(hook),
        "sae_id_suffix": None,
        "n_prompts_total": int(catalog.store.group["tokens"].shape[0]),
        "n_tokens_in_prompt": int(spec.context_length),
        "dataset": spec.dataset.path,
    }


def batch(docs: list[dict], meta: dict) -> dict:
    head = {k: meta[k] for k in ("model_id", "layer", "sae_set", "sae_id_suffix")}
    return {**head, "features": [feature(doc, meta) for doc in docs]}


def feature(doc: dict, meta: dict) -> dict:
    """One unit as a ``NeuronpediaDashboardFeature``'s keyword arguments."""
    stats, hist = doc["stats"], doc["histogram"]
    count = stats["count"]
    top, bottom = doc["top_examples"], doc["bottom_examples"]
    activations = [_activation(doc, ex, -1, stats["max"], -1) for ex in top]
    for ex in doc["band_samples"]:
        lo, hi = ex["lo"], ex["hi"]
        inside = sum(b["count"] for b in hist if _within((b["lo"] + b["hi"]) / 2, lo, hi))
        activations.append(_activation(doc, ex, _bound(lo, stats["min"]), _bound(hi, stats["max"]), inside / count))
    if bottom:
        activations += [_activation(doc, ex, stats["min"], bottom[-1]["activation"], len(bottom) / count) for ex in bottom]
    partners = [p for p in doc["coactivation"]["pearson"] if p["hook"] == doc["hook"]]
    positive = doc["stats"]["frac_active"] * count if doc["threshold"] == 0 else None
    values, heights = freq_histogram(hist, positive, stats["min"], stats["max"])
    promote, suppress = doc["logit_effects"]["promote"], doc["logit_effects"]["suppress"]
    return {
        "feature_index": doc["neuron"],
        # SAE latents' alignment with the neuron basis and their decoder weights: not neurons'.
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        # The unit's co-activation partners in its own hook, by Pearson correlation. `_l1` is the
        # consumer's cosine similarity of the two activation vectors, which we do not keep.
        "correlated_features_indices": [p["neuron"] for p in partners],
        "correlated_features_pearson": [p["pearson"] for p in partners],
        "correlated_features_l1": [],
        "neg_str": [t["token"] for t in suppress], "neg_values": [t["effect"] for t in suppress],
        "pos_str": [t["token"] for t in promote], "pos_values": [t["effect"] for t in promote],
        "frac_nonzero": stats["frac_active"] or 0.0,
        "freq_hist_data_bar_values": values,
        "freq_hist_data_bar_heights": heights,
        # The histogram of the unit's logit effect over the whole vocabulary: we keep only its ends.
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": meta["n_prompts_total"],
        "n_tokens_in_prompt": meta["n_tokens_in_prompt"],
        "dataset": meta["dataset"],
        "decoder_weights_dist": [],
        "activations": activations,
    }


def snippet(doc: dict, ex: dict) -> tuple[list[str], list[float], int]:
    """An example's ``2 * WINDOW + 1`` tokens (fewer at a sequence's ends), this unit's value on
    each (the cached value itself at the example's token), and that token's index."""
    seq = doc["sequences"][str(ex["seq_id"])]
    here = ex["pos"] - seq["start"]
    a = max(0, min(here - WINDOW, len(seq["tokens"]) - (2 * WINDOW + 1)))
    b = min(len(seq["tokens"]), a + 2 * WINDOW + 1)
    values = seq["values"][a:b]
    values[here - a] = ex["activation"]
    return seq["tokens"][a:b], values, here - a


def _activation(doc: dict, ex: dict, bin_min, bin_max, bin_contains) -> dict:
    tokens, values, index = snippet(doc, ex)
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains, "tokens": tokens,
            "values": values, "qualifying_token_index": index, **_NO_DFA}


def _within(x: float, lo, hi) -> bool:
    return (lo is None or x >= lo) and (hi is None or x <= hi)


def _bound(edge, clip):
    """A band's edge (None where it reaches to infinity), closed by the unit's min or max."""
    return float(clip) if edge is None else float(edge)


def freq_histogram(hist: list[dict], positive: float | None, lo_clip, hi_clip) -> tuple[list[float], list[int]]:
    """``FREQ_BINS`` linear bins over the positive activations (bar centres, integer heights).

    ``hist`` is the unit's histogram (bins closed by its min and max); ``positive`` the number of
    tokens above 0 (None where the site's threshold is not 0), which tells how many of the
    near-zero bin's tokens are positive."""
    pieces = [(b["lo"], b["hi"], b["count"]) for b in hist if b["count"] and b["lo"] >= NEAR_ZERO]
    near = [b for b in hist if b["count"] and b["lo"] < NEAR_ZERO and b["hi"] > 0 and b["hi"] <= NEAR_ZERO]
    if near and positive is not None:
        above = round(positive) - sum(c for _, _, c in pieces)
        if above > 0:
            pieces.insert(0, (max(near[0]["lo"], 0.0), near[0]["hi"], min(above, near[0]["count"])))
    if not pieces or hi_clip is None:
        return [], []
    start, stop = pieces[0][0], float(hi_clip)
    width = (stop - start) / FREQ_BINS
    edges = start + width * np.arange(FREQ_BINS + 1)
    mass = np.zeros(FREQ_BINS)
    for a, b, c in pieces:
        if width <= 0 or b <= a:
            i = FREQ_BINS - 1 if width <= 0 else min(FREQ_BINS - 1, int((a - start) / width))
            mass[i] += c
            continue
        overlap = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None)
        mass += c * overlap / overlap.sum() if overlap.sum() > 0 else 0
    heights = _whole(mass, sum(c for _, _, c in pieces))
    return [round(float(x), 5) for x in edges[:-1] + width / 2], heights


def _whole(mass: np.ndarray, total: int) -> list[int]:
    """Integer heights with the given total, nearest to ``mass`` (largest remainders)."""
    floor = np.floor(mass).astype(np.int64)
    short = int(total - floor.sum())
    if short > 0:
        floor[np.argsort(-(mass - floor), kind="stable")[:short]] += 1
    return floor.tolist()


def batches(catalog, hook: str, pages, *, sae_set: str | None = None):
    """(file name, batch) for each ``BATCH`` units of ``pages`` (a :class:`HookPages`)."""
    meta = batch_meta(catalog, hook, sae_set)
    for first in range(0, pages.width, BATCH):
        docs = [pages.document(n) for n in range(first, min(first + BATCH, pages.width))]
        yield f"batch-{first // BATCH}.json", batch(docs, meta)


__all__ = ["BATCH", "FREQ_BINS", "WINDOW", "batch", "batch_meta", "batches", "feature", "freq_histogram", "layer_of", "set_name", "snippet"]
