"""Merge every shard's partial statistics into the job's results, exactly.

Shards are folded in shard order, and every merge is a function of the data alone (top-k and
samples by (value or priority, token index), sums in a fixed order), so the result is the same
whatever the number of workers and whichever shards were retried.
"""

from __future__ import annotations

import numpy as np

from pipeline.moments import FIELDS, combine
from pipeline.sampling import merge_band_samples, merge_random_samples
from pipeline.tokenstats import TokenSumMerge
from pipeline.topk import merge_topk
from storage.errors import StoreError
from storage.spec import JobSpec
from storage.store import Store


def merge_shards(store: Store) -> dict[str, dict[str, np.ndarray]]:
    """{hook: {top_values, top_index, bottom_*, count, mean, m2, ..., hist, band_*, random_*,
    token_*}} over all shards; every shard must be committed."""
    spec = store.spec
    missing = sorted(set(range(store.n_groups)) - store.committed_groups())
    if missing:
        raise StoreError(f"{store.url}: {len(missing)} group(s) of shards are not committed yet (first: {missing[0]}). Re-run the job to finish them.")
    widths = store.model["hook_widths"]
    merged = {}
    for hook in spec.hooks:
        merge = HookMerge(spec, widths[hook], store.model["vocab_size"])
        for group in range(store.n_groups):
            merge.add(store.read_partial(group, hook))
        merged[hook] = merge.result()
    return merged


class HookMerge:
    """Folds one hook's shard partials, in the order they are added."""

    def __init__(self, spec: JobSpec, width: int, vocab_size: int):
        self.spec = spec
        self.running: dict[str, np.ndarray] | None = None
        self.tokens = TokenSumMerge(vocab_size, width) if spec.computes("tokens") else None

    def add(self, part: dict[str, np.ndarray]) -> None:
        if self.tokens is not None:
            self.tokens.add(part)
        part = {k: v for k, v in part.items() if not k.startswith("token_")}
        self.running = part if self.running is None else self._merge(self.running, part)

    def _merge(self, a: dict, b: dict) -> dict:
        spec = self.spec
        out = combine({f: a[f] for f in FIELDS}, {f: b[f] for f in FIELDS})
        if "hist" in a:
            out["hist"] = a["hist"] + b["hist"]
        for side, largest in (("top", True), ("bottom", False)):
            if f"{side}_values" not in a:
                continue
            pairs = [(x[f"{side}_values"], x[f"{side}_index"]) for x in (a, b)]
            if spec.examples == "document":
                docs = [x[f"{side}_doc"] for x in (a, b)]
                out[f"{side}_values"], out[f"{side}_index"], out[f"{side}_doc"] = merge_topk(pairs, spec.top_k, largest=largest, docs=docs)
            else:
                out[f"{side}_values"], out[f"{side}_index"] = merge_topk(pairs, spec.top_k, largest=largest)
        if "band_index" in a:
            out.update(merge_band_samples(a, b, spec.seed))
            out.update(merge_random_samples(a, b, spec.seed))
        return out

    def result(self) -> dict[str, np.ndarray]:
        out = dict(self.running)
        if self.tokens is not None:
            ids, means, counts = self.tokens.top(self.spec.top_tokens, self.spec.min_token_count)
            out.update(token_top_ids=ids, token_top_mean=means, token_top_count=counts)
        return out
