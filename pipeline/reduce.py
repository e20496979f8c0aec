"""Merge every shard's partial statistics into the job's results, exactly.

The merge is order-independent (ties broken by token index), so the result is the same whatever
the number of workers and whichever shards were retried.
"""

from __future__ import annotations

import numpy as np

from pipeline.topk import merge_topk
from storage.errors import StoreError
from storage.store import Store


def merge_shards(store: Store) -> dict[str, dict[str, np.ndarray]]:
    """{hook: {"top_values", "top_index"}} over all shards; every shard must be committed."""
    spec = store.spec
    missing = sorted(set(range(store.n_shards)) - store.committed_shards())
    if missing:
        raise StoreError(f"{store.url}: {len(missing)} shard(s) are not committed yet (first: {missing[0]}). Re-run the job to finish them.")
    merged = {}
    for hook in spec.hooks:
        running = None
        for shard in range(store.n_shards):
            part = store.read_partial(shard, hook)
            pair = (part["top_values"], part["top_index"])
            running = pair if running is None else merge_topk([running, pair], spec.top_k)
        merged[hook] = {"top_values": running[0], "top_index": running[1]}
    return merged
