"""Merge every shard's partial statistics into the job's results, exactly.

The merge is order-independent (ties broken by token index), so the result is the same whatever
the number of workers and whichever shards were retried.
"""

from __future__ import annotations

import numpy as np

from pipeline.moments import FIELDS, merge_moments
from pipeline.topk import merge_topk
from storage.errors import StoreError
from storage.store import Store


def merge_shards(store: Store) -> dict[str, dict[str, np.ndarray]]:
    """{hook: {top_values, top_index, bottom_values, bottom_index, count, mean, m2, ...}} over all
    shards, folded in shard order; every shard must be committed."""
    spec = store.spec
    missing = sorted(set(range(store.n_shards)) - store.committed_shards())
    if missing:
        raise StoreError(f"{store.url}: {len(missing)} shard(s) are not committed yet (first: {missing[0]}). Re-run the job to finish them.")
    merged = {}
    for hook in spec.hooks:
        running = None
        for shard in range(store.n_shards):
            part = store.read_partial(shard, hook)
            running = part if running is None else _merge(running, part, spec.top_k)
        merged[hook] = running
    return merged


def _merge(a: dict, b: dict, k: int) -> dict:
    out = merge_moments([{f: a[f] for f in FIELDS}, {f: b[f] for f in FIELDS}])
    out["hist"] = a["hist"] + b["hist"]
    for side, largest in (("top", True), ("bottom", False)):
        pairs = [(x[f"{side}_values"], x[f"{side}_index"]) for x in (a, b)]
        out[f"{side}_values"], out[f"{side}_index"] = merge_topk(pairs, k, largest=largest)
    return out
