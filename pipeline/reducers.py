"""Every per-hook statistic behind one protocol, so that the worker and the merge loop over the
job's statistics instead of testing key names.

A :class:`Statistic` has two halves:

- a **reducer**, on the worker's device: ``update(x, batch)`` folds one batch of a hook's
  activations ``x`` [tokens, width]; ``state()`` gives the arrays its group writes (their names
  are the statistic's own: ``owns(name)``);
- a **fold**, on the host, in the reduce: ``add(state)`` takes the groups' states in group order,
  ``result()`` gives the merged arrays the tables are built from. Most folds are a merge of two
  states (:class:`Pairwise`), a function of the data alone so that the order of the groups does
  not matter for order statistics and counts; token sums add sparse rows into a dense sum.

``job_statistics(spec, site)`` lists what a job computes for one site, in a fixed order. Co-activation is not here:
its state spans every hook (``pipeline.coactivation``), and its merge is blockwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from actscope.pipeline.histogram import RunningHistogram
from actscope.pipeline.moments import FIELDS, RunningMoments, combine
from actscope.pipeline.nonzero import NonZeros
from actscope.pipeline.sampling import (
    RunningBandSamples,
    RunningRandomSamples,
    merge_band_samples,
    merge_random_samples,
)
from actscope.pipeline.tokenstats import RunningSparseTokenSums, RunningTokenSums, SparseTokenSumMerge, TokenSumMerge
from actscope.pipeline.topk import RunningTopK, RunningTopKPerDocument, merge_topk
from actscope.storage.spec import JobSpec

State = dict[str, np.ndarray]


class Reducer(Protocol):
    def update(self, x: torch.Tensor, batch) -> None: ...

    def state(self) -> State: ...


class Fold(Protocol):
    def add(self, state: State) -> None: ...

    def result(self) -> State: ...


@dataclass(frozen=True)
class Group:
    """What a reducer needs to know of the group it runs over."""

    hook: str
    width: int
    tokens: torch.Tensor  # the group's token ids, flat, on the device
    counted: torch.Tensor  # which of them count
    offset: int  # the group's first token index in the corpus
    tracked: torch.Tensor | None = None  # the token ids whose sums are kept (``tokenstats.tracked_tokens``); None: all


@dataclass(frozen=True)
class Statistic:
    name: str
    owns: Callable[[str], bool]
    reducer: Callable[[JobSpec, Group], Reducer]
    fold: Callable[[JobSpec, int, int, np.ndarray | None], Fold]  # (spec, width, vocabulary size, tracked token ids)


class Pairwise:
    """A fold from a merge of two states."""

    def __init__(self, merge: Callable[[State, State], State]):
        self.merge, self.value = merge, None

    def add(self, state: State) -> None:
        self.value = state if self.value is None else self.merge(self.value, state)

    def result(self) -> State:
        return dict(self.value or {})


# -- top and bottom examples --------------------------------------------------------------

class _Extremes:
    def __init__(self, spec: JobSpec, group: Group, side: str):
        self.side, self.offset = side, group.offset
        self.per_document = spec.examples == "document"
        kind = RunningTopKPerDocument if self.per_document else RunningTopK
        self.running = kind(spec.top_k, group.width, group.tokens.device, largest=side == "top")

    def update(self, x: torch.Tensor, batch) -> None:
        if self.per_document:
            self.running.update(x, batch.first, batch.counted, batch.docs)
        else:
            self.running.update(x, batch.first, batch.counted)

    def update_nonzero(self, x: torch.Tensor, nz, batch) -> None:
        if self.per_document:  # a document's best token needs every token
            self.update(x, batch)
        else:
            self.running.update(x, batch.first, batch.counted, nz)

    def state(self) -> State:
        values, index = self.running.result()
        out = {f"{self.side}_values": values, f"{self.side}_index": np.where(index >= 0, index + self.offset, -1)}
        if self.per_document:
            out[f"{self.side}_doc"] = self.running.docs.cpu().numpy()
        return out


def _extremes(side: str) -> Statistic:
    def merge(spec: JobSpec):
        def two(a: State, b: State) -> State:
            pairs = [(x[f"{side}_values"], x[f"{side}_index"]) for x in (a, b)]
            if spec.examples == "document":
                merged = merge_topk(pairs, spec.top_k, largest=side == "top", docs=[x[f"{side}_doc"] for x in (a, b)])
                return dict(zip((f"{side}_values", f"{side}_index", f"{side}_doc"), merged))
            return dict(zip((f"{side}_values", f"{side}_index"), merge_topk(pairs, spec.top_k, largest=side == "top")))

        return two

    return Statistic(
        side, lambda name: name.startswith(f"{side}_"),
        lambda spec, group: _Extremes(spec, group, side),
        lambda spec, width, vocab, tracked: Pairwise(merge(spec)),
    )


# -- the rest ---------------------------------------------------------------------------------

class _Counted:
    """A reducer whose update takes (x, first token index, counted mask), or the batch's
    non-zero entries (``update_nonzero``) where the running statistic can."""

    def __init__(self, running):
        self.running = running
        if hasattr(running, "update_nonzero"):
            self.update_nonzero = lambda x, nz, batch: running.update_nonzero(nz)

    def update(self, x: torch.Tensor, batch) -> None:
        self.running.update(x, batch.first, batch.counted)

    def state(self) -> State:
        return self.running.result()


class _Batched:
    """A reducer whose update takes (x, batch) and whose result is its state."""

    def __init__(self, running):
        self.running = running
        if hasattr(running, "update_nonzero"):
            self.update_nonzero = lambda x, nz, batch: running.update_nonzero(nz, batch)

    def update(self, x: torch.Tensor, batch) -> None:
        self.running.update(x, batch)

    def state(self) -> State:
        return self.running.result()


class _TokenFold:
    def __init__(self, spec: JobSpec, width: int, vocab: int, tracked: np.ndarray | None = None, merge=TokenSumMerge):
        self.spec = spec
        self.sums = merge(vocab, width) if merge is SparseTokenSumMerge else merge(vocab, width, tracked)

    def add(self, state: State) -> None:
        self.sums.add(state)

    def result(self) -> State:
        ids, means, counts = self.sums.top(self.spec.top_tokens, self.spec.min_token_count)
        return {"token_top_ids": ids, "token_top_mean": means, "token_top_count": counts}


MOMENTS = Statistic(
    "moments", lambda name: name in FIELDS,
    lambda spec, g: _Counted(RunningMoments(g.width, g.tokens.device, spec.threshold(g.hook))),
    lambda spec, width, vocab, tracked: Pairwise(combine),
)
HISTOGRAM = Statistic(
    "histogram", lambda name: name == "hist",
    lambda spec, g: _Counted(RunningHistogram(g.width, g.tokens.device)),
    lambda spec, width, vocab, tracked: Pairwise(lambda a, b: {"hist": a["hist"] + b["hist"]}),
)
BAND_SAMPLES = Statistic(
    "band samples", lambda name: name.startswith("band_"),
    lambda spec, g: _Batched(RunningBandSamples(spec.samples_per_band, g.width, g.tokens.device, spec.band_sample_rate)),
    lambda spec, width, vocab, tracked: Pairwise(lambda a, b: merge_band_samples(a, b, spec.seed)),
)
RANDOM_SAMPLES = Statistic(
    "random samples", lambda name: name.startswith("random_"),
    lambda spec, g: _Batched(RunningRandomSamples(spec.random_samples, g.width, g.tokens.device)),
    lambda spec, width, vocab, tracked: Pairwise(lambda a, b: merge_random_samples(a, b, spec.seed)),
)
TOKENS = Statistic(
    "token sums", lambda name: name.startswith("token_"),
    lambda spec, g: _Batched(RunningTokenSums(g.tokens, g.counted, g.width, g.tracked)),
    _TokenFold,
)
#: An SAE's latents: the same table from sparse (token, latent) sums (``pipeline.tokenstats``).
SPARSE_TOKENS = Statistic(
    "token sums", lambda name: name.startswith("token_"),
    lambda spec, g: _Batched(RunningSparseTokenSums(g.tokens, g.counted, g.width)),
    lambda spec, width, vocab, tracked: _TokenFold(spec, width, vocab, merge=SparseTokenSumMerge),
)


def job_statistics(spec: JobSpec, site: str) -> list[Statistic]:
    """The statistics ``spec`` computes for ``site`` (a hook, or an SAE's name), in a fixed order
    (top-k and moments always)."""
    chosen = [_extremes("top")]
    if spec.computes("bottom"):
        chosen.append(_extremes("bottom"))
    chosen.append(MOMENTS)
    if spec.computes("histogram"):
        chosen.append(HISTOGRAM)
    if spec.computes("samples"):
        chosen += [BAND_SAMPLES, RANDOM_SAMPLES]
    if spec.computes("tokens"):
        chosen.append(SPARSE_TOKENS if spec.sae(site) else TOKENS)
    return chosen


class HookStatistics:
    """Every statistic the job asks for, of one hook over one group, updated batch by batch."""

    def __init__(self, spec: JobSpec, group: Group):
        self.reducers = [statistic.reducer(spec, group) for statistic in job_statistics(spec, group.hook)]
        # An SAE's latents are sparse: the batch's non-zero entries are found once, and the
        # statistics that can work from them do (``pipeline.nonzero``).
        self.sparse = spec.sae(group.hook) is not None

    def update(self, x: torch.Tensor, batch, nonzeros: NonZeros | None = None) -> None:
        """``nonzeros``: the batch's non-zero entries over every token, if the caller found them."""
        nz = None
        if self.sparse:
            nz = NonZeros.of(x, batch.counted) if nonzeros is None else nonzeros.counted(batch.counted)
        for reducer in self.reducers:
            if nz is not None and hasattr(reducer, "update_nonzero"):
                reducer.update_nonzero(x, nz, batch)
            else:
                reducer.update(x, batch)

    def result(self) -> State:
        """The group's partial statistics (token indices global)."""
        out: State = {}
        for reducer in self.reducers:
            out.update(reducer.state())
        return out


class HookMerge:
    """Folds one hook's group partials, in the order they are added."""

    def __init__(self, spec: JobSpec, site: str, width: int, vocab_size: int, tracked: np.ndarray | None = None):
        """``tracked``: the token ids whose sums the groups kept (``tokenstats.tracked_tokens``)."""
        self.folds = [(statistic, statistic.fold(spec, width, vocab_size, tracked)) for statistic in job_statistics(spec, site)]

    def add(self, part: State) -> None:
        for statistic, fold in self.folds:
            fold.add({name: value for name, value in part.items() if statistic.owns(name)})

    def result(self) -> State:
        out: State = {}
        for _, fold in self.folds:
            out.update(fold.result())
        return out
