"""OpenAI's neuron-explainer records: one ``NeuronRecord`` (``neuron_explainer.activations``)
per neuron, as the JSON its ``fast_dataclasses.loads`` reads back into the dataclasses.

- ``neuron_id``: ``layer_index`` the hook's block (as in Neuronpedia batches), ``neuron_index``.
- ``most_positive_activation_records``: the top examples, strongest first.
- ``random_sample``: the job's random samples (the same uniformly drawn counted tokens for every
  neuron of the job).
- ``quantile_boundaries``: the neuron's activation at ``QUANTILES`` of all its counted tokens,
  read from its histogram (within one bin, at most 12.5 % wide, of the exact quantile);
  ``random_sample_by_quantile``: one list per interval between them (``len(QUANTILES) + 1``,
  lowest first), holding every sampled token (band samples, random samples, top and bottom
  examples) whose activation lies in it, each once. The band samples are uniform within their
  octave of activation, so an interval's list is a sample of it, not a uniform one.
- ``mean``, ``variance`` (population), ``skewness``, ``kurtosis`` (excess): ``neuron_stats``.

Each record is a snippet of ``2 * WINDOW + 1`` tokens around its example's token (fewer at a
sequence's ends), the example's token carrying the cached activation exactly.
"""

from __future__ import annotations

import numpy as np

from actscope.queries.neuronpedia import layer_of, snippet
from actscope.storage.bins import N_BINS, bin_edges, quantiles

QUANTILES = (0.5, 0.9, 0.99, 0.999)


def neuron_record(doc: dict, n_layers: int) -> dict:
    stats = doc["stats"]
    boundaries = _boundaries(doc)
    buckets: list[list[dict]] = [[] for _ in range(len(boundaries) + 1)]
    seen = set()
    for name in ("band_samples", "random_samples", "top_examples", "bottom_examples"):
        for ex in doc[name]:
            if (ex["seq_id"], ex["pos"]) in seen:
                continue
            seen.add((ex["seq_id"], ex["pos"]))
            buckets[int(np.searchsorted(boundaries, ex["activation"], side="right"))].append(_record(doc, ex))
    std = stats["std"]
    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer_of((doc.get("sae") or {}).get("hook", doc["hook"]), n_layers), "neuron_index": doc["neuron"]},
        "random_sample": [_record(doc, ex) for ex in doc["random_samples"]],
        "random_sample_by_quantile": buckets,
        "quantile_boundaries": boundaries,
        "mean": stats["mean"],
        "variance": None if std is None else std * std,
        "skewness": stats["skew"],
        "kurtosis": stats["kurtosis"],
        "most_positive_activation_records": [_record(doc, ex) for ex in doc["top_examples"]],
    }


def _record(doc: dict, ex: dict) -> dict:
    tokens, values, _ = snippet(doc, ex)
    return {"dataclass_name": "ActivationRecord", "tokens": tokens, "activations": values}


def _boundaries(doc: dict) -> list[float]:
    """The activation at each of QUANTILES, from the document's histogram (non-empty bins)."""
    stats = doc["stats"]
    if not doc["histogram"] or stats["min"] is None:
        return []
    _, hi = bin_edges()
    counts = np.zeros((1, N_BINS), np.int64)
    # The document lists non-empty bins with their edges closed at min and max; place each by
    # its midpoint, which lies inside the bin either way.
    mids = np.array([(b["lo"] + b["hi"]) / 2 for b in doc["histogram"]])
    where = np.clip(np.searchsorted(hi, mids, side="right"), 0, N_BINS - 1)
    np.add.at(counts[0], where, [b["count"] for b in doc["histogram"]])
    values = quantiles(counts, QUANTILES, np.array([stats["min"]]), np.array([stats["max"]]))[:, 0]
    return [float(v) for v in values]


__all__ = ["QUANTILES", "neuron_record"]
