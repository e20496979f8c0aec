"""Which vocabulary tokens drive each neuron: per-token sums of activations, accumulated on the
device and kept sparse.

A shard's worker sums each neuron's activation per *token id* over the shard's counted tokens,
for the token ids present in the shard only (a shard of 32k tokens holds a few thousand distinct
ids, not the whole vocabulary). The merge adds the shards' rows into one [vocab, width] float64
sum per hook, then ranks the tokens of each neuron by mean activation among those seen at least
``min_token_count`` times (a token seen once says little).

A shard sums in float64 and keeps its partial in float64, although float32 would be faster
(``index_add_`` of a 2048x1536 batch: 1.1 ms in float32, 4.3 ms converted to float64). Sums of a
few float32 activations are exact in float64 whatever their order, so tokens whose means are equal
stay equal and rank by id, whatever the shard split. A float32 sum rounds differently for each
split and breaks such ties either way: the Hypothesis split test in ``tests/test_merges.py`` finds
it (0.3 - 0.3 + 0.3 against -0.01 + 0.3 + 0.01), and ``test_equal_means_tie_by_id_in_any_split``
pins that case. Do not narrow these sums again. The merge adds the shards' sums in float64, in
shard order.

Determinism: on a CPU ``index_add_`` adds rows in order; on a GPU it would add them with atomics
in any order, so there the rows are summed by sorted segments instead (same result every run).
"""

from __future__ import annotations

import numpy as np
import torch


class RunningTokenSums:
    """Per (token id present in the shard, neuron): count and sum of activations."""

    def __init__(self, shard_tokens: torch.Tensor, counted: torch.Tensor, width: int):
        self.present = torch.unique(shard_tokens[counted])  # sorted
        self.sums = torch.zeros((len(self.present), width), dtype=torch.float64, device=shard_tokens.device)
        self.counts = torch.zeros(len(self.present), dtype=torch.int64, device=shard_tokens.device)

    def update(self, x: torch.Tensor, batch) -> None:
        ids, x = (batch.token_ids, x) if batch.counted is None else (batch.token_ids[batch.counted], x[batch.counted])
        if len(ids) == 0:
            return
        row = torch.searchsorted(self.present, ids)
        self.counts += torch.bincount(row, minlength=len(self.present))
        if x.device.type == "cpu":
            self.sums.index_add_(0, row, x.double())
        else:
            order = torch.argsort(row, stable=True)
            rows, lengths = torch.unique_consecutive(row[order], return_counts=True)
            self.sums[rows] += torch.segment_reduce(x[order].double(), "sum", lengths=lengths, axis=0)

    def result(self) -> dict[str, np.ndarray]:
        return {
            "token_ids": self.present.to(torch.int32).cpu().numpy(),
            "token_counts": self.counts.cpu().numpy(),
            "token_sums": self.sums.cpu().numpy(),  # float64: equal means stay equal (ties by id)
        }


class TokenSumMerge:
    """Adds shards' sparse rows into dense [vocab, width] sums (float64), in the order given."""

    def __init__(self, vocab_size: int, width: int):
        self.sums = np.zeros((vocab_size, width), dtype=np.float64)
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def add(self, part: dict[str, np.ndarray]) -> None:
        ids = part["token_ids"]
        self.sums[ids] += part["token_sums"]
        self.counts[ids] += part["token_counts"]

    def top(self, m: int, min_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, means, counts), each [m, width], best first; id -1 where fewer than m
        tokens qualify. Ties in mean break by lower token id."""
        eligible = self.counts >= min_count
        ids = np.flatnonzero(eligible)
        m = min(m, len(ids))
        width = self.sums.shape[1]
        if m == 0:
            return np.full((0, width), -1), np.zeros((0, width)), np.zeros((0, width), dtype=np.int64)
        means = self.sums[ids] / self.counts[ids, None]
        order = top_rows(means, m)
        best = ids[order]
        return best, np.take_along_axis(means, order, 0), self.counts[best]


def top_rows(scores: np.ndarray, m: int) -> np.ndarray:
    """Row indices of the m largest scores of each column, best first, ties by lower row: a
    partition does the work, and the rare columns with a tie across the m-th place are sorted in
    full."""
    rows = np.argpartition(-scores, m - 1, axis=0)[:m]
    kth = np.take_along_axis(scores, rows, 0).min(0)
    chosen = np.take_along_axis(scores, rows, 0)
    order = np.lexsort((rows, -chosen), axis=0)
    rows = np.take_along_axis(rows, order, 0)
    tied = np.flatnonzero((scores >= kth).sum(0) > m)
    for column in tied:
        rows[:, column] = np.lexsort((np.arange(len(scores)), -scores[:, column]))[:m]
    return rows
