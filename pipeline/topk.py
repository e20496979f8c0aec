"""Exact top-k of every neuron, on the device, with ties broken by token order.

Every activation is packed with its token's index into one int64 *key* whose order is the order
we want: higher activation first, then lower token index first. The high 32 bits hold the
float32's bits remapped so that integer order equals float order; the low 32 bits hold
``2**32 - 1 - index``. One ``torch.topk`` over keys is then exact and deterministic, however
ties fall (ReLU zeros tie everywhere), and a running top-k folds batch after batch in place.

Shapes: ``acts`` is [tokens, neurons]; results are [k, neurons].
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from actscope.pipeline.ops import count_where, flat_where

#: The key of a position that does not count (padding, special tokens): below every real key.
EXCLUDED = torch.iinfo(torch.int64).min
_LOW = 0xFFFFFFFF
_FLIP = 0x7FFFFFFF
KEY_INDEX_LIMIT = 2**32  # a key carries its token index (within a group) in its low 32 bits


def ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """Map float32 to int64 so that integer order is float order (-0.0 folded into 0.0)."""
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, bits ^ _FLIP)


def unordered_bits(ordered: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ordered_bits`, back to float32."""
    bits = torch.where(ordered >= 0, ordered, ordered ^ _FLIP)
    return bits.to(torch.int32).view(torch.float32)


class RunningTopK:
    """The k largest (``largest=True``) or smallest values of each neuron seen so far.

    ``update`` takes one batch of activations with the shard-local index of its first token and
    a mask of the tokens that count (None: all of them, decided once per batch by the caller);
    ``result`` decodes values and indices, -1 where fewer than k tokens counted. Batches must
    come in token order.

    Only *candidates* are ranked: tokens strictly beyond the neuron's current k-th value. A later
    token equal to the k-th value loses the tie (its index is larger), and one beyond it can
    never enter, so this is exact. On a shard's first batch, before there is a k-th value, the
    bound is the k-th best of the extremes of 2k blocks of tokens: k distinct tokens reach it, so
    the batch's k-th value does too, and few tokens (about 2 % of a batch) are ranked. Where most
    tokens reach that bound by tying at it (a sparse latent's zeros: the bound is 0), the batch is
    taken as two, its first 4k tokens ranked whole and the rest as a later batch (ranking a
    first batch of SAE latents whole costs seconds). A batch then costs one comparison pass
    and a few operations on its candidates.

    The running keys are [width, k], so that every top-k runs along contiguous memory.
    """

    def __init__(self, k: int, width: int, device: torch.device, *, largest: bool = True):
        self.k = k
        self.largest = largest
        self.sign = 1.0 if largest else -1.0
        self.keys = torch.full((width, k), EXCLUDED, dtype=torch.int64, device=device)
        self.bound: torch.Tensor | None = None  # [width] the k-th value so far; None before any batch

    def update(self, acts: torch.Tensor, first_index: int, counted: torch.Tensor | None, nz=None) -> None:
        """``nz``: the batch's non-zero entries (``pipeline.nonzero``), if known: after the first
        batch, the candidates are then found among them, where no unit's zeros could enter."""
        n_tokens, width = acts.shape
        if first_index + n_tokens > KEY_INDEX_LIMIT:
            raise ValueError("a group holds more than 2**32 tokens; use smaller shards or fewer group_shards")
        x = acts.float()
        if self.bound is None:
            bound = self._first_bound(x, counted)
            reaches = operator.ge if self.largest else operator.le
            if n_tokens > 8 * self.k and count_where(reaches, x, bound) > 4 * self.k * width:
                # Many tokens tie at the bound (an SAE latent's zeros: the bound is 0): rank a
                # prefix of 4k tokens whole, then the rest beyond the prefix's k-th values.
                cut = 4 * self.k
                self.update(acts[:cut], first_index, None if counted is None else counted[:cut])
                self.update(acts[cut:], first_index + cut, None if counted is None else counted[cut:])
                return
            flat = flat_where(reaches, x, bound)
        elif nz is not None and not self._zeros_enter(nz):
            bound = torch.index_select(self.bound, 0, nz.units)
            beyond = nz.values > bound if self.largest else nz.values < bound
            flat = (nz.rows * width + nz.units)[beyond]
        else:
            flat = flat_where(operator.gt if self.largest else operator.lt, x, self.bound)
        token = torch.div(flat, width, rounding_mode="floor")
        if counted is not None:
            keep = counted[token]
            flat, token = flat[keep], token[keep]
        if len(flat):
            keys = pack(x.reshape(-1)[flat] * self.sign, first_index + token)
            if len(flat) * 4 > x.numel():  # many candidates: a block for every activation
                new = torch.full((n_tokens * width,), EXCLUDED, dtype=torch.int64, device=x.device)
                new[flat] = keys
                new = new.view(n_tokens, width).T
            else:  # few: a [width, most] block, one row per neuron
                neuron = flat - token * width
                per_neuron = torch.bincount(neuron, minlength=width)
                order = torch.argsort(neuron, stable=True)
                neuron, keys = neuron[order], keys[order]
                slot = torch.arange(len(neuron), device=x.device) - (torch.cumsum(per_neuron, 0) - per_neuron)[neuron]
                new = torch.full((width, int(per_neuron.max())), EXCLUDED, dtype=torch.int64, device=x.device)
                new[neuron, slot] = keys
            self.keys = torch.topk(torch.cat([self.keys, new], dim=1), self.k, dim=1, sorted=False).values
        kth = self.keys.amin(1)
        self.bound = torch.where(kth == EXCLUDED, -torch.inf, unordered_bits(kth >> 32)) * self.sign

    def _zeros_enter(self, nz) -> bool:
        """Whether a zero of this batch beats some unit's k-th value (a unit with fewer than k
        tokens so far, or a signed latent's k-th below zero): then every token must be looked at."""
        enters = self.bound < 0 if self.largest else self.bound > 0
        return bool((enters & (nz.per_unit() < nz.n)).any())

    def _first_bound(self, x: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
        """A value that the batch's k-th best reaches, per neuron (infinite: none known)."""
        n_tokens, width = x.shape
        worst = -torch.inf if self.largest else torch.inf
        blocks = 2 * self.k
        if n_tokens < blocks:
            return torch.full((width,), worst, device=x.device)
        if counted is not None:
            x = x.masked_fill(~counted.unsqueeze(1), worst)
        size = n_tokens // blocks
        tiles = x[: blocks * size].view(blocks, size, width)
        extremes = tiles.amax(1) if self.largest else tiles.amin(1)
        kth = torch.topk(extremes, self.k, dim=0, largest=self.largest, sorted=False).values
        return kth.amin(0) if self.largest else kth.amax(0)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values [k, width] float32, shard-local token index [k, width] int64, -1 = none)."""
        return decode(torch.sort(self.keys, dim=1, descending=True).values.T, self.sign)


def pack(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keys of (value, token index): higher value first, then lower index."""
    return (ordered_bits(values) << 32) | (_LOW - index)


def decode(keys: torch.Tensor, sign: float) -> tuple[np.ndarray, np.ndarray]:
    """Keys [k, width] back to (values, index), NaN and -1 where empty."""
    valid = keys != EXCLUDED
    values = torch.where(valid, unordered_bits(keys >> 32) * sign, torch.nan)
    index = torch.where(valid, _LOW - (keys & _LOW), -1)
    return values.cpu().numpy(), index.cpu().numpy()


class RunningTopKPerDocument:
    """The k most extreme *documents* of each neuron: a document ranks by its best token, and
    appears at most once (Neuroscope's convention). Same keys and tie-breaking as
    :class:`RunningTopK`.

    Per batch, each document's best key per neuron comes from one ``scatter_reduce`` over its
    (contiguous) tokens; documents never interleave in the token stream, so only the batch's
    first document can already hold a running entry, and it is folded in before the top-k.
    """

    def __init__(self, k: int, width: int, device: torch.device, *, largest: bool = True):
        self.k = k
        self.sign = 1.0 if largest else -1.0
        self.keys = torch.full((k, width), EXCLUDED, dtype=torch.int64, device=device)
        self.docs = torch.full((k, width), -1, dtype=torch.int64, device=device)

    def update(self, acts: torch.Tensor, first_index: int, counted: torch.Tensor | None, docs: torch.Tensor) -> None:
        n_tokens, width = acts.shape
        index = torch.arange(first_index, first_index + n_tokens, device=acts.device, dtype=torch.int64)
        keys = pack(acts * self.sign, index.unsqueeze(1))
        if counted is not None:
            keys.masked_fill_(~counted.unsqueeze(1), EXCLUDED)
        seg_docs, segment = torch.unique_consecutive(docs, return_inverse=True)
        best = torch.full((len(seg_docs), width), EXCLUDED, dtype=torch.int64, device=acts.device)
        best.scatter_reduce_(0, segment.unsqueeze(1).expand(n_tokens, width), keys, "amax")
        carried = self.docs == seg_docs[0]
        best[0] = torch.maximum(best[0], torch.where(carried, self.keys, EXCLUDED).amax(0))
        keys = torch.cat([self.keys.masked_fill(carried, EXCLUDED), best])
        docs = torch.cat([self.docs, seg_docs.unsqueeze(1).expand(len(seg_docs), width)])
        top = torch.topk(keys, self.k, dim=0, sorted=True)
        self.keys, self.docs = top.values, docs.gather(0, top.indices)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values [k, width] float32, shard-local token index [k, width] int64, -1 = none)."""
        return decode(self.keys, self.sign)


def merge_topk(
    parts: list[tuple[np.ndarray, np.ndarray]], k: int, *, largest: bool = True, docs: list[np.ndarray] | None = None
) -> tuple[np.ndarray, ...]:
    """Merge partial top-k results (global token indices) exactly; order of ``parts`` is free.

    Each part is (values [k_i, width], index [k_i, width]) with index -1 for empty slots. With
    ``docs`` (each part's document ids), a document keeps only its best entry, and the merged
    document ids come back third.
    """
    docs = None if docs is None else np.concatenate(docs, axis=0)
    values = np.concatenate([p[0] for p in parts], axis=0)
    index = np.concatenate([p[1] for p in parts], axis=0)
    empty = index < 0
    score = np.where(empty, -np.inf, values if largest else -values)
    tiebreak = np.where(empty, np.iinfo(np.int64).max, index)
    order = np.lexsort((tiebreak, -score), axis=0)
    if docs is None:
        order = order[:k]
        return np.take_along_axis(values, order, axis=0), np.take_along_axis(index, order, axis=0)
    order, drop = _first_per_document(np.take_along_axis(docs, order, 0), empty, order)
    order, drop = order[:k], drop[:k]
    values = np.where(drop, np.nan, np.take_along_axis(values, order, axis=0))
    index = np.where(drop, -1, np.take_along_axis(index, order, axis=0))
    return values, index, np.where(drop, -1, np.take_along_axis(docs, order, axis=0))


def _first_per_document(docs: np.ndarray, empty: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``order`` (best first, per column) with every later entry of an already-seen document
    moved behind the rest, and the mask of those moved (and empty) entries in the new order."""
    rank = np.arange(len(order))[:, None]
    column = np.broadcast_to(np.arange(order.shape[1]), order.shape)
    grouped = np.lexsort((rank.repeat(order.shape[1], 1).ravel(), docs.ravel(), column.ravel()))
    dup = np.zeros(order.size, dtype=bool)
    same = (docs.ravel()[grouped][1:] == docs.ravel()[grouped][:-1]) & (column.ravel()[grouped][1:] == column.ravel()[grouped][:-1])
    dup[grouped[1:][same]] = True
    dup = dup.reshape(order.shape) | np.take_along_axis(empty, order, 0)
    behind = np.argsort(dup, axis=0, kind="stable")
    return np.take_along_axis(order, behind, 0), np.take_along_axis(dup, behind, 0)
