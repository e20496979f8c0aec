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

from actscope.pipeline.nonzero import NonZeros


class RunningTokenSums:
    """Per (token id present in the group, neuron): count and sum of activations. ``tracked``:
    the token ids to keep (sorted), None for every one; the others' activations are added to
    one spare row, dropped at the end (no copy of the batch is made to leave them out)."""

    def __init__(self, shard_tokens: torch.Tensor, counted: torch.Tensor, width: int, tracked: torch.Tensor | None = None):
        present = torch.unique(shard_tokens[counted])  # sorted
        self.tracked = tracked is not None
        self.present = present[torch.isin(present, tracked)] if self.tracked else present
        rows = len(self.present) + self.tracked
        self.sums = torch.zeros((rows, width), dtype=torch.float64, device=shard_tokens.device)
        self.counts = torch.zeros(rows, dtype=torch.int64, device=shard_tokens.device)

    def update(self, x: torch.Tensor, batch) -> None:
        ids, x = (batch.token_ids, x) if batch.counted is None else (batch.token_ids[batch.counted], x[batch.counted])
        if len(ids) == 0:
            return
        row = torch.searchsorted(self.present, ids)
        if self.tracked:  # an untracked token's row is the spare one
            row = torch.where(torch.isin(ids, self.present), row, len(self.present))
        self.counts += torch.bincount(row, minlength=len(self.counts))
        if x.device.type == "cpu":
            self.sums.index_add_(0, row, x.double())
        else:
            order = torch.argsort(row, stable=True)
            rows, lengths = torch.unique_consecutive(row[order], return_counts=True)
            self.sums[rows] += torch.segment_reduce(x[order].double(), "sum", lengths=lengths, axis=0)

    def result(self) -> dict[str, np.ndarray]:
        n = len(self.present)
        return {
            "token_ids": self.present.to(torch.int32).cpu().numpy(),
            "token_counts": self.counts[:n].cpu().numpy(),
            "token_sums": self.sums[:n].cpu().numpy(),  # float64: equal means stay equal (ties by id)
        }


class TokenSumMerge:
    """Adds groups' sparse rows into dense [tokens, width] sums (float64), in the order given:
    a row for every vocabulary token, or for each of ``tracked`` (sorted token ids) only."""

    def __init__(self, vocab_size: int, width: int, tracked: np.ndarray | None = None):
        self.tracked = tracked
        rows = vocab_size if tracked is None else len(tracked)
        self.sums = np.zeros((rows, width), dtype=np.float64)
        self.counts = np.zeros(rows, dtype=np.int64)

    def add(self, part: dict[str, np.ndarray]) -> None:
        ids = part["token_ids"]
        rows = ids if self.tracked is None else np.searchsorted(self.tracked, ids)
        self.sums[rows] += part["token_sums"]
        self.counts[rows] += part["token_counts"]

    def top(self, m: int, min_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, means, counts), each [m, width], best first; id -1 where fewer than m
        tokens qualify. Ties in mean break by lower token id."""
        eligible = self.counts >= min_count
        rows = np.flatnonzero(eligible)
        m = min(m, len(rows))
        width = self.sums.shape[1]
        if m == 0:
            return np.full((0, width), -1), np.zeros((0, width)), np.zeros((0, width), dtype=np.int64)
        means = self.sums[rows] / self.counts[rows, None]
        order = top_rows(means, m)  # rows are in token id order, so ties still break by lower id
        best = rows[order]
        return best if self.tracked is None else self.tracked[best], np.take_along_axis(means, order, 0), self.counts[best]


def most_frequent(tokens: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` most frequent ids among ``tokens`` (ties by lower id), sorted by id."""
    counts = np.bincount(tokens)
    present = np.flatnonzero(counts)
    return np.sort(present[np.lexsort((present, -counts[present]))[:n]])


def tracked_tokens(store, span: tuple[int, int] | None = None) -> np.ndarray | None:
    """The token ids whose sums the job keeps (sorted), or None for every token: the
    ``store.model.tracked_tokens`` most frequent counted tokens of the corpus's first group of
    shards, a function of the corpus alone (the same for every worker, retry and resume).
    ``span``: that group's sequences, where the store's status does not know them yet (a group
    run while the corpus is still being tokenized)."""
    n = store.model.tracked_tokens
    if not n:
        return None
    from actscope.storage.store import PAD, TEXT

    first, last = span or store.group_range(0)
    data = store.read_tokens(first, last, ("tokens", "kinds"))
    counted = data["kinds"] != PAD if store.spec.include_special_tokens else data["kinds"] == TEXT
    return most_frequent(data["tokens"][counted].astype(np.int64), n)


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


# -- SAE latents: sparse sums -------------------------------------------------------------------
#
# A latent is zero at almost every token, and an SAE is 16k to 1M latents wide: dense rows of
# [ids present, width] float64 would be 8 V w bytes (10 GB for a 24k-latent SAE over GPT-2's
# vocabulary). Latent sites keep only the (token id, latent) pairs at which the latent fired, as
# one int64 key ``token_id * width + latent`` and its float64 sum: at most 16 bytes for every
# non-zero activation, and far fewer once repeated pairs are summed. A token ranks for a latent
# only where the latent fired at it at least once (the tokens where it never fires would tie at
# mean 0 and fill the ranking by id, which says nothing).


def compact_sums(keys: list, sums: list, xp):
    """Sum equal keys of the concatenated pieces, keeping the pieces' order within a key (stable
    sort, then a sum per run): the same sums for the same pieces, on a CPU and on a GPU."""
    if xp is np:
        keys, sums = np.concatenate(keys), np.concatenate(sums)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, dtype=np.int64)
        return keys[starts], np.add.reduceat(sums[order], starts) if len(keys) else sums[:0]
    keys, sums = torch.cat(keys), torch.cat(sums)
    order = torch.argsort(keys, stable=True)
    unique, lengths = torch.unique_consecutive(keys[order], return_counts=True)
    if len(unique) == len(keys):
        return unique, sums[order]
    return unique, torch.segment_reduce(sums[order], "sum", lengths=lengths, axis=0)


class PendingSums:
    """Key/sum pieces folded into one sorted, summed run once they outgrow it (each value is
    then re-sorted O(log n) times in all)."""

    MIN_PENDING = 1 << 16

    def __init__(self, xp, keys, sums):
        self.xp, self.keys, self.sums, self.pending, self.n_pending = xp, keys, sums, [], 0

    def add(self, keys, sums) -> None:
        self.pending.append((keys, sums))
        self.n_pending += len(keys)
        if self.n_pending > max(len(self.keys), self.MIN_PENDING):
            self.compact()

    def compact(self):
        if self.pending:
            pieces = [(self.keys, self.sums), *self.pending]
            self.keys, self.sums = compact_sums([k for k, _ in pieces], [s for _, s in pieces], self.xp)
            self.pending, self.n_pending = [], 0
        return self.keys, self.sums


class RunningSparseTokenSums:
    """Per token id present in the group: its count; per (token id, latent) where the latent is
    non-zero: the sum of its activations (float64)."""

    def __init__(self, shard_tokens: torch.Tensor, counted: torch.Tensor, width: int):
        device = shard_tokens.device
        self.width = width
        self.present = torch.unique(shard_tokens[counted])
        self.counts = torch.zeros(len(self.present), dtype=torch.int64, device=device)
        self.sums = PendingSums(torch, torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.float64, device=device))

    def update(self, x: torch.Tensor, batch) -> None:
        self.update_nonzero(NonZeros.of(x, batch.counted), batch)

    def update_nonzero(self, nz, batch) -> None:
        """Fold one batch from its non-zero entries (``pipeline.nonzero``: counted, row-major)."""
        ids = batch.token_ids if batch.counted is None else batch.token_ids[batch.counted]
        if len(ids):
            self.counts += torch.bincount(torch.searchsorted(self.present, ids), minlength=len(self.present))
        if len(nz.rows):
            self.sums.add(batch.token_ids[nz.rows] * self.width + nz.units, nz.values.double())

    def result(self) -> dict[str, np.ndarray]:
        keys, sums = self.sums.compact()
        return {
            "token_ids": self.present.to(torch.int32).cpu().numpy(),
            "token_counts": self.counts.cpu().numpy(),
            "token_pair_keys": keys.cpu().numpy(),  # token_id * width + latent, sorted
            "token_pair_sums": sums.cpu().numpy(),
        }


class SparseTokenSumMerge:
    """Adds groups' counts into a [vocab] count and their pair sums into one sorted run, in the
    order given; peak memory 16 bytes per distinct (token, latent) pair, twice while folding."""

    def __init__(self, vocab_size: int, width: int):
        self.width = width
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.sums = PendingSums(np, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))

    def add(self, part: dict[str, np.ndarray]) -> None:
        self.counts[part["token_ids"]] += part["token_counts"]
        self.sums.add(part["token_pair_keys"], part["token_pair_sums"])

    def top(self, m: int, min_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`TokenSumMerge.top`, over the tokens at which each latent fired: [m, width]
        each, id -1 past the last such token seen ``min_count`` times; ties by lower id."""
        keys, sums = self.sums.compact()
        token, unit = np.divmod(keys, self.width)
        keep = self.counts[token] >= min_count
        token, unit, means = token[keep], unit[keep], sums[keep] / self.counts[token[keep]]
        order = np.lexsort((token, -means, unit))
        token, unit, means = token[order], unit[order], means[order]
        rank = np.arange(len(unit)) - np.searchsorted(unit, unit)  # place within the latent's run
        take = rank < m
        ids = np.full((m, self.width), -1, dtype=np.int64)
        out_means = np.zeros((m, self.width))
        counts = np.zeros((m, self.width), dtype=np.int64)
        at = (rank[take], unit[take])
        ids[at], out_means[at], counts[at] = token[take], means[take], self.counts[token[take]]
        return ids, out_means, counts
