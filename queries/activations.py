"""Per-token activations of chosen (sequence, neuron) pairs, for colouring text in reports.

They come from the dense store when the hook was stored densely (float16; an SAE's latents as
sparse rows per shard, float16 values), otherwise from
re-running the job's model on just those sequences (the job's spec is in the store). Either way
they are checked against the cached statistics at the tokens those name (see
:func:`check_marked`), so a page never colours text with numbers that disagree with its tables.
"""

from __future__ import annotations

import numpy as np

from actscope.storage.errors import StoreError
from actscope.storage.store import PAD, Store, read_checked

# How far a per-token value may stray from the cached one, relative to the neuron's scale:
# float16 storage keeps 11 significant bits; a re-run differs from the job's forward only by
# the order of floating-point sums (other batch neighbours), far below the dtype's precision.
TOLERANCE = {"dense": 2e-3, "float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


class TokenActivations:
    """``gather(seqs, neurons)`` gives ``[n, context_length]`` float32 activations of one hook."""

    def __init__(self, store: Store, hook: str):
        self.store, self.hook = store, hook
        self.spec = store.spec
        self.source = "dense" if hook in self.spec.dense else "recomputed"
        self._forward = None

    @property
    def tolerance(self) -> float:
        return TOLERANCE["dense" if self.source == "dense" else self.spec.dtype]

    def gather(self, seqs: np.ndarray, neurons: np.ndarray) -> np.ndarray:
        seqs, neurons = np.asarray(seqs, np.int64), np.asarray(neurons, np.int64)
        out = np.zeros((len(seqs), self.spec.context_length), np.float32)
        if len(seqs) == 0:
            return out
        read = self._dense_block if self.source == "dense" else self._recompute_block
        step = self.spec.shard_size if self.source == "dense" else self.spec.batch_size
        order = np.argsort(seqs, kind="stable")
        unique = np.unique(seqs)
        # Blocks of sequences: a dense chunk (one shard) at a time, or one model batch.
        if self.source == "dense":
            groups = np.split(unique, np.flatnonzero(np.diff(unique // step)) + 1)
        else:
            groups = [unique[i : i + step] for i in range(0, len(unique), step)]
        sorted_seqs = seqs[order]
        for group in groups:
            lo, hi = np.searchsorted(sorted_seqs, [group[0], group[-1] + 1])
            rows = order[lo:hi]
            block_neurons = neurons[rows]
            n_lo, n_hi = int(block_neurons.min()), int(block_neurons.max()) + 1
            block = read(group, n_lo, n_hi)  # [len(group), ctx, n_hi - n_lo]
            where = np.searchsorted(group, seqs[rows])
            out[rows] = block[where, :, block_neurons - n_lo]
        return out

    def _dense_block(self, group: np.ndarray, n_lo: int, n_hi: int) -> np.ndarray:
        if self.spec.sae(self.hook):
            return self._latent_block(group, n_lo, n_hi)
        first = int(group[0])
        span = read_checked(self.store.dense(self.hook), (slice(first, int(group[-1]) + 1), slice(None), slice(n_lo, n_hi)))
        return span[group - first].astype(np.float32)

    def _latent_block(self, group: np.ndarray, n_lo: int, n_hi: int) -> np.ndarray:
        """An SAE's stored latents (CSR rows per shard; ``group`` lies in one shard)."""
        ctx, size = self.spec.context_length, self.spec.shard_size
        shard = int(group[0]) // size
        rows = self.store.read_latents(self.hook, shard)
        indptr, index, value = rows["indptr"], rows["index"], rows["value"]
        out = np.zeros((len(group), ctx, n_hi - n_lo), np.float32)
        for i, seq in enumerate(group):
            t0 = (int(seq) - shard * size) * ctx
            lo, hi = indptr[t0], indptr[t0 + ctx]
            pos = np.repeat(np.arange(ctx), np.diff(indptr[t0:t0 + ctx + 1]))
            latent = index[lo:hi]
            keep = (latent >= n_lo) & (latent < n_hi)
            out[i, pos[keep], latent[keep] - n_lo] = value[lo:hi][keep]
        return out

    def _recompute_block(self, group: np.ndarray, n_lo: int, n_hi: int) -> np.ndarray:
        import torch

        forward, device = self.model()
        data = self.store.group
        tokens = torch.from_numpy(data["tokens"].oindex[group, :].astype(np.int64)).to(device)
        mask = torch.from_numpy((data["kinds"].oindex[group, :] != PAD).astype(np.int64)).to(device)
        acts = forward(tokens, mask)[self.hook][..., n_lo:n_hi]
        return acts.float().cpu().numpy()

    def model(self):
        """The job's model with this hook attached, loaded once: (forward, device)."""
        if self._forward is None:
            from actscope.pipeline.model import job_forward, resolve_device

            device = resolve_device(self.spec.device)
            self._forward = (job_forward(self.spec, self.store.model, device, [self.hook]), device)
        return self._forward


def check_marked(source: TokenActivations, values: np.ndarray, pos: np.ndarray, cached: np.ndarray, scale: float, what: str) -> None:
    """Refuse per-token values that disagree with the cached value at the marked token: that means
    the model (or the dense array) is not the one the job ran with."""
    got = values[np.arange(len(pos)), pos]
    limit = source.tolerance * max(scale, 1e-6)
    bad = np.flatnonzero(np.abs(got - cached) > limit)
    if len(bad):
        i = bad[0]
        raise StoreError(
            f"{source.hook}: {source.source} activations disagree with the cached {what} value at one of its tokens "
            f"({got[i]:.6g} vs {cached[i]:.6g}, tolerance {limit:.2g}). The model at {source.spec.model} or the "
            "store's dense array has changed since the job ran."
        )
