"""The shard worker: one model, many shards.

A plain callable class (Ray wraps it as an actor; tests call it directly). ``__init__`` loads the
model once; ``__call__(shard)`` runs the shard's sequences through it in batches, folds every
batch into on-device reductions, writes the shard's dense activations and partial statistics,
and commits the shard last. Everything a shard writes is a function of its tokens alone, so a
retried or duplicated shard writes the same bytes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model import HookedForward, load_job_model, prefer_sdpa, resolve_device
from pipeline.histogram import RunningHistogram
from pipeline.moments import RunningMoments
from pipeline.topk import RunningTopK
from storage.store import PAD, TEXT, Store


@dataclass(frozen=True)
class ShardResult:
    shard: int
    n_tokens: int  # positions processed, padding included
    seconds: float
    skipped: bool  # already committed by an earlier run or attempt


class ShardWorker:
    def __init__(self, store_url: str, *, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.store = Store.open(store_url, writable=True)
        self.spec = self.store.spec
        self.device = resolve_device(self.spec.device)
        self.model = load_job_model(self.spec, self.device)
        prefer_sdpa(self.model, self.spec.hooks)
        self.forward = HookedForward(self.model, self.spec.hooks)
        self.widths = {h: int(w) for h, w in self.store.model["hook_widths"].items()}
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dense-writer")

    def __call__(self, shard: int) -> ShardResult:
        start = time.perf_counter()
        first, last = self.store.shard_range(shard)
        n_tokens = (last - first) * self.spec.context_length
        if self.store.is_committed(shard):
            return ShardResult(shard, n_tokens, 0.0, skipped=True)
        partials, dense = self._reduce(first, last)
        # Dense chunks belong to this shard alone: write them whole, one hook per thread.
        writes = [
            self._writer.submit(self.store.dense(hook).__setitem__, slice(first, last), array)
            for hook, array in dense.items()
        ]
        for write in writes:
            write.result()
        record = {"first_seq": first, "last_seq": last, "n_tokens": n_tokens}
        self.store.write_partial(shard, partials, record)
        return ShardResult(shard, n_tokens, time.perf_counter() - start, skipped=False)

    def _reduce(self, first: int, last: int):
        spec, ctx = self.spec, self.spec.context_length
        data = self.store.read_tokens(first, last)
        tokens = torch.from_numpy(data["tokens"].astype(np.int64)).to(self.device)
        kinds = torch.from_numpy(data["kinds"]).to(self.device)
        counted = kinds != PAD if spec.include_special_tokens else kinds == TEXT
        attention = (kinds != PAD).long()
        reducers = {
            h: {
                "top": RunningTopK(spec.top_k, self.widths[h], self.device),
                "bottom": RunningTopK(spec.top_k, self.widths[h], self.device, largest=False),
                "stats": RunningMoments(self.widths[h], self.device, spec.threshold(h)),
                "hist": RunningHistogram(self.widths[h], self.device),
            }
            for h in spec.hooks
        }
        dense = {h: np.empty((last - first, ctx, self.widths[h]), dtype=np.float16) for h in spec.dense}
        for b0 in range(0, last - first, spec.batch_size):
            b1 = min(b0 + spec.batch_size, last - first)
            acts = self.forward(tokens[b0:b1], attention[b0:b1])
            mask = counted[b0:b1].reshape(-1)
            mask = None if bool(mask.all()) else mask  # decided once per batch: one host sync
            for hook, act in acts.items():
                flat = act.reshape(-1, act.shape[-1]).float()  # converted once for every reducer
                for reducer in reducers[hook].values():
                    reducer.update(flat, b0 * ctx, mask)
                if hook in dense:
                    dense[hook][b0:b1] = act.to(torch.float16).cpu().numpy()
        offset = first * ctx
        partials = {}
        for hook, parts in reducers.items():
            partials[hook] = {**parts["stats"].result(), **parts["hist"].result()}
            for side in ("top", "bottom"):
                values, index = parts[side].result()
                partials[hook][f"{side}_values"] = values
                partials[hook][f"{side}_index"] = np.where(index >= 0, index + offset, -1)
        return partials, dense
